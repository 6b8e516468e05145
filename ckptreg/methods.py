"""Shared validators and SLERP constants of the merge methods (no per-tensor merge code).

The per-tensor computations live in production code only: the method table
(:mod:`ckptreg.merge.table`) points at :mod:`ckptreg.merge.kernels`, which merges through
:mod:`ckptreg.ops` (compiled kernels or their PyTorch fallbacks). The test oracle every method is
checked against is ``tests/helpers_ref.py`` (float64, written from METHODS.md);
``tests/test_methods.py`` drives the production path with the old call signatures.

What is left here:

- :func:`check_lam`, :func:`finite_floats`: parameter validators (used by :mod:`ckptreg.lowrank`);
- :data:`SLERP_DOT_THRESHOLD`, :data:`SLERP_EPS`: mergekit's SLERP constants (used by
  :func:`ckptreg.merge.kernels.slerp_coeffs`): normalise a vector only when its norm exceeds
  ``SLERP_EPS``; fall back to linear interpolation when ``|cos| > SLERP_DOT_THRESHOLD``.

Imports no torch (a tensor given to :func:`finite_floats` is read through its own methods).
"""
from __future__ import annotations

import math

from .errors import ParameterError

__all__ = ["check_lam", "finite_floats", "SLERP_DOT_THRESHOLD", "SLERP_EPS"]

SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8


def finite_floats(vals, n: int, what: str = "weights", items: str = "input tensors") -> list[float]:
    """``vals`` (a sequence or tensor) as n finite floats, else ParameterError naming ``what``."""
    if hasattr(vals, "detach") and hasattr(vals, "tolist"):   # a torch tensor
        vals = vals.detach().reshape(-1).tolist()
    out = [float(x) for x in vals]
    if len(out) != n:
        raise ParameterError(f"{n} {items} but {len(out)} {what}")
    for i, x in enumerate(out):
        if not math.isfinite(x):
            raise ParameterError(f"{what} {i} is {x!r}; {what} must be finite")
    return out


def check_lam(lam) -> float:
    """``lam`` as a finite float, else ParameterError."""
    try:
        x = float(lam)
    except (TypeError, ValueError):
        raise ParameterError(f"lambda must be a finite number, got {lam!r}") from None
    if not math.isfinite(x):
        raise ParameterError(f"lambda must be finite, got {x!r}")
    return x

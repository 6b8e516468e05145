"""Per-tensor merge methods in plain PyTorch (readable reference implementations).

Production does not call the per-tensor functions here: the engine merges through
:mod:`ckptreg.ops` (compiled kernels or their PyTorch fallbacks) and imports from this module only
the validators :func:`check_lam` / :func:`finite_floats` (also used by :mod:`ckptreg.lowrank`) and
the SLERP constants. The test oracle is ``tests/helpers_ref.py`` (float64, from METHODS.md).

Every function follows ``METHODS.md`` "Merge methods". Inputs are float tensors of any storage
dtype (fp32/fp16/bf16/fp64); arithmetic runs in float32, or float64 when any input is float64,
and the result is returned as float32 (the engine casts to the output dtype). Weights are used
as given: the Σw = n rescaling of weighting schemes for task-vector methods is the engine's job
(:func:`ckptreg.weights.rescale_mean_one`).

Semantics pinned here (PEFT ``merge_utils``):

- trim (TIES step 1, magnitude prune): ``k = floor(density * numel)`` (``int(density * numel)``
  in PEFT, float product included); the threshold is the exact k-th largest ``|tau|`` and entries
  with ``|tau| >= threshold`` are kept, so ties at the threshold may keep more than k; k = 0
  keeps nothing (threshold +inf). When streaming a tensor in chunks, pass the whole tensor's
  ``thresholds`` (one per input), computed once with :func:`trim_threshold`.
- elect: ``gamma = sign(sum_i trimmed_i)`` ("total") or ``sign(sum_i sign(trimmed_i))``
  ("frequency") on the trimmed, *unweighted* task vectors; ``gamma = +1`` where the sum is 0.
- disjoint mean: ``sum_i w_i trimmed_i [sign(trimmed_i) == gamma] / max(1, #agreeing)``; a zero
  entry has sign 0 and never agrees.
- DARE: masks from :mod:`ckptreg.rng` keyed by (seed, tensor name, input index, element index);
  kept entries are divided by ``density``.

This module must not import :mod:`ckptreg.ops` (it is the oracle the compiled ops are tested
against).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import rng
from .errors import MismatchError, ParameterError

__all__ = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "slerp",
    "trim_threshold",
    "trim_k",
    "dare_masks",
    "SLERP_DOT_THRESHOLD",
    "SLERP_EPS",
]

SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
_SIGN_METHODS = ("total", "frequency")


# --------------------------------------------------------------------------- validation


def _compute_dtype(*tensors) -> torch.dtype:
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _check_tensors(tensors, base=None) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        raise ParameterError("tensors must be a list of tensors, one per input checkpoint")
    tensors = list(tensors)
    if not tensors:
        raise ParameterError("a merge needs at least one input tensor")
    ref = base if base is not None else tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ParameterError(f"input {i} is not a tensor ({type(t).__name__})")
        if not t.is_floating_point():
            raise ParameterError(f"input {i} has dtype {t.dtype}; merges need floating tensors")
        if t.shape != ref.shape:
            what = "base" if base is not None else "input 0"
            raise MismatchError(
                f"input {i} has shape {tuple(t.shape)}, {what} has {tuple(ref.shape)}"
            )
    if base is not None and not base.is_floating_point():
        raise ParameterError(f"base has dtype {base.dtype}; merges need floating tensors")
    return tensors


def finite_floats(vals, n: int, what: str = "weights", items: str = "input tensors") -> list[float]:
    """``vals`` (a sequence or tensor) as n finite floats, else ParameterError naming ``what``."""
    if isinstance(vals, torch.Tensor):
        vals = vals.detach().reshape(-1).tolist()
    out = [float(x) for x in vals]
    if len(out) != n:
        raise ParameterError(f"{n} {items} but {len(out)} {what}")
    for i, x in enumerate(out):
        if not math.isfinite(x):
            raise ParameterError(f"{what} {i} is {x!r}; {what} must be finite")
    return out


def _check_weights(weights, n: int) -> list[float]:
    return finite_floats(weights, n)


def _check_density(density) -> float:
    try:
        d = float(density)
    except (TypeError, ValueError):
        raise ParameterError(f"density must be a number in (0, 1], got {density!r}") from None
    if not (0.0 < d <= 1.0):  # also rejects NaN
        raise ParameterError(f"density must be in (0, 1], got {d!r}")
    return d


def check_lam(lam) -> float:
    try:
        x = float(lam)
    except (TypeError, ValueError):
        raise ParameterError(f"lambda must be a finite number, got {lam!r}") from None
    if not math.isfinite(x):
        raise ParameterError(f"lambda must be finite, got {x!r}")
    return x


def _check_sign(sign) -> str:
    if sign not in _SIGN_METHODS:
        raise ParameterError(f"sign method must be 'total' or 'frequency', got {sign!r}")
    return sign


def _check_thresholds(thresholds, n: int) -> list[float] | None:
    if thresholds is None:
        return None
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.detach().reshape(-1).tolist()
    th = [float(x) for x in thresholds]
    if len(th) != n:
        raise ParameterError(f"{n} input tensors but {len(th)} trim thresholds")
    for i, x in enumerate(th):
        if math.isnan(x) or x < 0:
            raise ParameterError(f"trim threshold {i} is {x!r}; must be >= 0 or +inf")
    return th


def _out(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


# --------------------------------------------------------------------------- building blocks


def trim_k(numel: int, density: float) -> int:
    """Number of entries TIES keeps: ``floor(density * numel)`` (the float product, as PEFT)."""
    d = _check_density(density)
    return int(math.floor(d * int(numel)))


def trim_threshold(tau: torch.Tensor, density: float) -> float:
    """The exact k-th largest ``|tau|`` with ``k = floor(density * numel)``; ``+inf`` when k = 0.

    Entries with ``|tau| >= threshold`` are the ones TIES / magnitude prune keep. ``tau`` is
    used in its own dtype (pass the float32/float64 task vector the merge uses)."""
    k = trim_k(tau.numel(), density)
    if k == 0:
        return math.inf
    a = tau.detach().reshape(-1).abs()
    n = a.numel()
    if k == n:
        return float(a.min())
    # k-th largest == (n - k + 1)-th smallest; kthvalue is O(n), no full sort
    return float(torch.kthvalue(a, n - k + 1).values)


def dare_masks(numel: int, n: int, density: float, seed: int, name: str, offset: int = 0, device=None):
    """The DARE keep masks of ``n`` inputs for elements ``[offset, offset + numel)``."""
    d = _check_density(density)
    return [
        rng.keep_mask(rng.dare_key(int(seed), str(name), i), int(offset), int(numel), d, device=device)
        for i in range(n)
    ]


def _task_vectors(base, tensors, dt):
    b = base.to(dt)
    return b, [t.to(dt) - b for t in tensors]


def _trim(taus, density, thresholds):
    th = thresholds if thresholds is not None else [trim_threshold(t, density) for t in taus]
    out = []
    for t, thr in zip(taus, th):
        if math.isinf(thr):
            out.append(torch.zeros_like(t))
        else:
            out.append(torch.where(t.abs() >= thr, t, torch.zeros_like(t)))
    return out


def _dare(taus, density, seed, name, offset):
    masks = dare_masks(taus[0].numel(), len(taus), density, seed, name, offset, device=taus[0].device)
    out = []
    for t, m in zip(taus, masks):
        flat = t.reshape(-1)
        kept = torch.where(m, flat / density, torch.zeros_like(flat))
        out.append(kept.reshape(t.shape))
    return out


def _elect_and_mean(trimmed, weights, sign):
    stack = torch.stack(trimmed, dim=0)
    signs = torch.sign(stack)
    if sign == "total":
        s = stack.sum(dim=0)
    else:
        s = signs.sum(dim=0)
    gamma = torch.where(s >= 0, torch.ones_like(s), -torch.ones_like(s))
    agree = signs == gamma
    w = torch.tensor(weights, dtype=stack.dtype, device=stack.device).reshape(
        (-1,) + (1,) * (stack.dim() - 1)
    )
    num = torch.where(agree, stack * w, torch.zeros_like(stack)).sum(dim=0)
    count = agree.sum(dim=0).to(stack.dtype).clamp(min=1.0)
    return num / count


def _weighted_sum(tensors, weights):
    acc = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        acc.add_(t, alpha=w)
    return acc


# --------------------------------------------------------------------------- methods


def linear(tensors: Sequence[torch.Tensor], weights) -> torch.Tensor:
    """Weighted sum ``sum_i w_i theta_i`` (linear / soup / MWA)."""
    tensors = _check_tensors(tensors)
    w = _check_weights(weights, len(tensors))
    dt = _compute_dtype(*tensors)
    return _out(_weighted_sum([t.to(dt) for t in tensors], w))


def task_arithmetic(base: torch.Tensor, tensors, weights, lam: float = 1.0) -> torch.Tensor:
    """``theta_0 + lam * sum_i w_i (theta_i - theta_0)``."""
    tensors = _check_tensors(tensors, base)
    w = _check_weights(weights, len(tensors))
    lam = check_lam(lam)
    dt = _compute_dtype(base, *tensors)
    b, taus = _task_vectors(base, tensors, dt)
    return _out(b + lam * _weighted_sum(taus, w))


def ties(base, tensors, weights, density: float, sign: str = "total", lam: float = 1.0, thresholds=None):
    """TIES (PEFT semantics): trim by magnitude per tensor, elect signs on the trimmed unweighted
    task vectors (+1 on a zero sum), disjoint weighted mean, ``theta_0 + lam * tau_m``.

    ``thresholds``: optional per-input trim thresholds (from :func:`trim_threshold` over the
    whole tensor) for chunked evaluation; computed from ``tensors`` when omitted."""
    tensors = _check_tensors(tensors, base)
    w = _check_weights(weights, len(tensors))
    density = _check_density(density)
    sign = _check_sign(sign)
    lam = check_lam(lam)
    th = _check_thresholds(thresholds, len(tensors))
    dt = _compute_dtype(base, *tensors)
    b, taus = _task_vectors(base, tensors, dt)
    trimmed = _trim(taus, density, th)
    return _out(b + lam * _elect_and_mean(trimmed, w, sign))


def dare_linear(base, tensors, weights, density: float, seed: int, name: str, lam: float = 1.0, offset: int = 0):
    """DARE then linear: ``theta_0 + lam * sum_i w_i dare(tau_i)``. ``offset`` is the element
    index (in the flattened tensor) of this chunk's first element, so chunking keeps masks."""
    tensors = _check_tensors(tensors, base)
    w = _check_weights(weights, len(tensors))
    density = _check_density(density)
    lam = check_lam(lam)
    _check_offset(offset)
    dt = _compute_dtype(base, *tensors)
    b, taus = _task_vectors(base, tensors, dt)
    return _out(b + lam * _weighted_sum(_dare(taus, density, seed, name, offset), w))


def dare_ties(base, tensors, weights, density: float, seed: int, name: str, sign: str = "total",
              lam: float = 1.0, offset: int = 0):
    """DARE (random drop + 1/density rescale) then TIES steps 2-4 (elect, disjoint mean)."""
    tensors = _check_tensors(tensors, base)
    w = _check_weights(weights, len(tensors))
    density = _check_density(density)
    sign = _check_sign(sign)
    lam = check_lam(lam)
    _check_offset(offset)
    dt = _compute_dtype(base, *tensors)
    b, taus = _task_vectors(base, tensors, dt)
    return _out(b + lam * _elect_and_mean(_dare(taus, density, seed, name, offset), w, sign))


def magnitude_prune(base, tensors, weights, density: float, lam: float = 1.0, thresholds=None):
    """TIES step 1 (trim by magnitude) then ``theta_0 + lam * sum_i w_i trimmed_i``."""
    tensors = _check_tensors(tensors, base)
    w = _check_weights(weights, len(tensors))
    density = _check_density(density)
    lam = check_lam(lam)
    th = _check_thresholds(thresholds, len(tensors))
    dt = _compute_dtype(base, *tensors)
    b, taus = _task_vectors(base, tensors, dt)
    return _out(b + lam * _weighted_sum(_trim(taus, density, th), w))


def slerp(t0: torch.Tensor, t1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation, mergekit semantics.

    Flatten; normalise each only when its norm > 1e-8; ``d = <v0_hat, v1_hat>``; if ``|d| >
    0.9995`` return ``(1-t) v0 + t v1``; else ``theta = arccos d`` and ``sin((1-t) theta)/sin
    theta * v0 + sin(t theta)/sin theta * v1`` on the un-normalised tensors. Norms and the dot
    product are taken in float64 (scalars), the combination in the compute dtype."""
    _check_tensors([t0, t1])
    try:
        tt = float(t)
    except (TypeError, ValueError):
        raise ParameterError(f"slerp t must be a number in [0, 1], got {t!r}") from None
    if not (0.0 <= tt <= 1.0):
        raise ParameterError(f"slerp t must be in [0, 1], got {tt!r}")
    dt = _compute_dtype(t0, t1)
    v0 = t0.to(dt)
    v1 = t1.to(dt)
    a = v0.reshape(-1).to(torch.float64)
    b = v1.reshape(-1).to(torch.float64)
    n0 = float(torch.linalg.vector_norm(a))
    n1 = float(torch.linalg.vector_norm(b))
    s0 = n0 if n0 > SLERP_EPS else 1.0
    s1 = n1 if n1 > SLERP_EPS else 1.0
    d = float(torch.dot(a, b)) / (s0 * s1)
    if abs(d) > SLERP_DOT_THRESHOLD:
        return _out((1.0 - tt) * v0 + tt * v1)
    theta = math.acos(max(-1.0, min(1.0, d)))
    st = math.sin(theta)
    c0 = math.sin((1.0 - tt) * theta) / st
    c1 = math.sin(tt * theta) / st
    return _out(c0 * v0 + c1 * v1)


def _check_offset(offset) -> None:
    if int(offset) != offset or offset < 0:
        raise ParameterError(f"offset must be a non-negative element index, got {offset!r}")

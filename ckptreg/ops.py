"""Typed wrappers over the compiled merge kernels (``torch.ops.ckptreg.*``) with a pure-PyTorch
fallback that computes the same numbers.

Backends
--------
``backend()`` reports which path a call takes: ``"cuda"`` (compiled CUDA kernels), ``"cpp"``
(compiled C++/OpenMP kernels, ``ckptreg._C``) or ``"python"`` (plain PyTorch, always there).
``CKPTREG_BACKEND=auto|cpp|cuda|python`` forces a path; forcing one that is not available raises
:class:`ckptreg.errors.BackendError`. Under ``auto`` each call uses the compiled kernel for the
device its tensors live on when there is one, and the Python fallback otherwise.

Conventions shared by every op
------------------------------
* Inputs must agree in shape, dtype and device (``MismatchError`` otherwise). Supported storage
  dtypes: float32, float16, bfloat16, float64. Arithmetic accumulates in float32 (float64 for
  float64 inputs).
* Non-contiguous inputs are accepted: the wrapper makes a contiguous copy before calling a kernel
  (the compiled kernels themselves read dense memory only).
* ``out_dtype`` defaults to the inputs' dtype. ``out=`` writes into a given tensor (any layout; a
  non-contiguous ``out`` is filled through a contiguous temporary).
* Fallback and compiled paths agree to float32 rounding (<= 1e-6 relative on sums) and produce
  identical DARE masks (``ckptreg.rng``), whatever the thread count or chunking.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple, Sequence

import torch

from . import rng as _rng
from .errors import BackendError, MismatchError, ParameterError

__all__ = [
    "backend",
    "available",
    "extension_status",
    "weighted_sum",
    "task_merge",
    "kth_largest_abs",
    "factored_svd_batched",
    "METHODS",
    "KERNEL_SETTINGS",
    "KernelSettings",
    "SPARSIFY",
    "CONSENSUS",
]

# The fused task-vector kernel has two settings (mergekit's generalized task arithmetic; defined
# once for the CPU and CUDA kernels in csrc/common/merge.h):
#   sparsify   "none" | "trim" (keep |τ_i| >= thresholds[i]) | "dare" (random keep, 1/density rescale)
#   consensus  "none" | "total" | "frequency" (TIES sign election among the sparsified τ_i)
# A method name is one row of KERNEL_SETTINGS: its sparsify setting and whether it elects a sign
# (then ``sign=`` picks the consensus, "total" or "frequency"). The method table reads this.
SPARSIFY = ("none", "trim", "dare")
CONSENSUS = ("none", "total", "frequency")
_SIGNS = ("total", "frequency")


class KernelSettings(NamedTuple):
    sparsify: str  # one of SPARSIFY
    elect: bool  # True: consensus = the call's ``sign``; False: consensus "none"

    def consensus(self, sign: str = "total") -> str:
        return sign if self.elect else "none"


KERNEL_SETTINGS: dict[str, KernelSettings] = {
    "ties": KernelSettings("trim", True),
    "dare_ties": KernelSettings("dare", True),
    "dare_linear": KernelSettings("dare", False),
    "magnitude_prune": KernelSettings("trim", False),
    "task_arithmetic": KernelSettings("none", False),
}
METHODS = tuple(KERNEL_SETTINGS)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_BACKENDS = ("auto", "cpp", "cuda", "python")

# --------------------------------------------------------------------------------------------
# loading the extension and choosing a backend
# --------------------------------------------------------------------------------------------
_EXT = None  # the imported ckptreg._C module, or False when it is missing
_EXT_ERROR: str | None = None


def _release(version: str) -> str:
    """``"2.13.0+cu130"`` -> ``"2.13.0"``: the public release, without the local build label."""
    return str(version).split("+", 1)[0].strip()


def _extension_compatible(built: str, running: str) -> bool:
    """Whether an extension compiled against torch ``built`` may be loaded into torch ``running``.

    The releases must be equal (``2.13.0+cpu`` and ``2.13.0+cu130`` match, ``2.13.0`` and
    ``2.13.1`` do not): torch promises no C++ ABI stability between releases, and setup.py pins
    the runtime requirement to the same ``torch==X.Y.Z``. A CPU/CUDA flavour mismatch of one
    release is left to the import itself (a CUDA build in a CPU torch fails to link and is
    reported as an ImportError)."""
    return bool(built) and _release(built) == _release(running)


def _built_torch() -> str | None:
    """The torch version ckptreg._C was compiled against, as recorded by setup.py at build time
    in ``ckptreg/_build_info.py``; None when the build did not record one (an extension built
    by an older setup.py)."""
    try:
        from . import _build_info
    except ImportError:
        return None
    return getattr(_build_info, "TORCH_VERSION", None)


def _load_ext() -> bool:
    global _EXT, _EXT_ERROR
    if _EXT is None:
        built = _built_torch()
        if built is not None and not _extension_compatible(built, torch.__version__):
            # Do not even import it: a library compiled against another libtorch may fail to
            # link, or link and misbehave. The Python path computes the same numbers.
            _EXT = False
            _EXT_ERROR = (
                f"ckptreg._C was built against torch {built} but torch {torch.__version__} is "
                "running; not loading it, using the Python fallback (rebuild ckptreg against "
                "this torch, e.g. pip install --no-build-isolation -e .)"
            )
            warnings.warn(_EXT_ERROR, RuntimeWarning, stacklevel=3)
            return False
        try:
            from . import _C  # noqa: F401  (registers torch.ops.ckptreg.*)

            _EXT = _C
        except Exception as exc:  # ImportError, or an ABI mismatch (OSError/ImportError)
            _EXT = False
            _EXT_ERROR = f"{type(exc).__name__}: {exc}"
    return bool(_EXT)


def extension_status() -> dict:
    """Why the compiled extension is or is not in use (for ``ckptreg doctor``).

    ``{"loaded": bool, "built_with_torch": str | None, "running_torch": str,
    "reason": str | None}``; ``reason`` is None when it loaded, else the import error or the
    build/run torch mismatch. ``built_with_torch`` is None when the build recorded no version."""
    loaded = _load_ext()
    return {
        "loaded": loaded,
        "built_with_torch": _built_torch(),
        "running_torch": torch.__version__,
        "reason": None if loaded else (_EXT_ERROR or "ckptreg._C is not loaded"),
    }


def _has_kernel(op: str, key: str) -> bool:
    if not _load_ext():
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"ckptreg::{op}", key))
    except Exception:
        return False


def available() -> dict[str, bool]:
    """Which backends this process can use: ``{"python": True, "cpp": ..., "cuda": ...}``."""
    cpp = _has_kernel("weighted_sum", "CPU")
    cuda = _has_kernel("weighted_sum", "CUDA") and torch.cuda.is_available()
    return {"python": True, "cpp": cpp, "cuda": cuda}


def _forced() -> str:
    val = os.environ.get("CKPTREG_BACKEND", "auto").strip().lower() or "auto"
    if val not in _BACKENDS:
        raise BackendError(f"CKPTREG_BACKEND={val!r} is not one of {', '.join(_BACKENDS)}")
    return val


def _missing(name: str) -> BackendError:
    why = f" ({_EXT_ERROR})" if _EXT_ERROR and name == "cpp" else ""
    if name == "cuda" and _load_ext() and not _has_kernel("weighted_sum", "CUDA"):
        why = " (ckptreg._C was built without CUDA kernels)"
    elif name == "cuda" and not torch.cuda.is_available():
        why = " (no CUDA device)"
    elif name == "cuda" and not _load_ext():
        why = f" ({_EXT_ERROR})"
    return BackendError(f"CKPTREG_BACKEND={name} but the {name} backend is not available{why}")


def backend() -> str:
    """The backend calls take by default: ``"cuda"``, ``"cpp"`` or ``"python"``.

    ``CKPTREG_BACKEND`` forces one; a forced backend that is missing raises BackendError."""
    forced = _forced()
    av = available()
    if forced == "auto":
        return "cuda" if av["cuda"] else ("cpp" if av["cpp"] else "python")
    if not av[forced]:
        raise _missing(forced)
    return forced


def _route(device: torch.device, op: str) -> str:
    """The path one call takes for tensors on ``device``: "python" or "compiled"."""
    forced = _forced()
    if forced == "python":
        return "python"
    key = "CUDA" if device.type == "cuda" else ("CPU" if device.type == "cpu" else None)
    if forced == "auto":
        return "compiled" if key is not None and _has_kernel(op, key) else "python"
    # forced cpp / cuda
    av = available()
    if not av[forced]:
        raise _missing(forced)
    want = "CPU" if forced == "cpp" else "CUDA"
    if key != want:
        raise BackendError(
            f"CKPTREG_BACKEND={forced} but the tensors are on {device}; move them to "
            f"{'cpu' if forced == 'cpp' else 'a CUDA device'} or unset CKPTREG_BACKEND"
        )
    if not _has_kernel(op, want):
        raise _missing(forced)
    return "compiled"


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _check_inputs(inputs: Sequence[torch.Tensor], what: str = "inputs") -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        raise MismatchError(f"{what} must be a list of tensors, not one tensor")
    inputs = list(inputs)
    if not inputs:
        raise MismatchError(f"{what} is empty: need at least one tensor")
    first = inputs[0]
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise MismatchError(f"{what}[{i}] is a {type(t).__name__}, not a tensor")
        if t.dtype not in _FLOATS:
            raise MismatchError(
                f"{what}[{i}] has dtype {t.dtype}; supported: float32, float16, bfloat16, float64"
            )
        if t.shape != first.shape:
            raise MismatchError(
                f"{what}[{i}] has shape {tuple(t.shape)} but {what}[0] has {tuple(first.shape)}"
            )
        if t.dtype != first.dtype:
            raise MismatchError(f"{what}[{i}] has dtype {t.dtype} but {what}[0] has {first.dtype}")
        if t.device != first.device:
            raise MismatchError(f"{what}[{i}] is on {t.device} but {what}[0] is on {first.device}")
    return inputs


def _check_out_dtype(out_dtype, default: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return default
    if isinstance(out_dtype, str):
        try:
            out_dtype = getattr(torch, out_dtype)
        except AttributeError:
            raise ParameterError(f"unknown out_dtype {out_dtype!r}") from None
    if out_dtype not in _FLOATS:
        raise ParameterError(f"out_dtype {out_dtype} is not one of float32, float16, bfloat16, float64")
    return out_dtype


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _deliver(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out


def _check_out(out: torch.Tensor, shape: tuple, device: torch.device) -> None:
    if not isinstance(out, torch.Tensor):
        raise MismatchError(f"out must be a tensor, not {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise MismatchError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype not in _FLOATS:
        raise MismatchError(f"out has dtype {out.dtype}; need a floating dtype")
    if out.device != device:
        raise MismatchError(f"out is on {out.device} but the inputs are on {device}")


# --------------------------------------------------------------------------------------------
# weighted_sum
# --------------------------------------------------------------------------------------------
def weighted_sum(inputs, weights, out_dtype=None, out=None) -> torch.Tensor:
    """M weighted sums of N same-shape tensors in one pass: ``out[m] = Σ_n weights[m, n] · inputs[n]``.

    ``weights``: float tensor (or nested list) of shape [M, N]; a 1-D [N] vector gives a single
    sum of the inputs' shape (no leading M dimension). Accumulates in float32 (float64 for float64
    inputs); the result has ``out_dtype`` (default: the inputs' dtype).
    """
    inputs = _check_inputs(inputs)
    n = len(inputs)
    ref = inputs[0]
    w = torch.as_tensor(weights)
    if not (w.is_floating_point() or w.dtype in (torch.int32, torch.int64)):
        raise MismatchError(f"weights must be real numbers, got dtype {w.dtype}")
    single = w.dim() == 1
    if single:
        w = w.unsqueeze(0)
    if w.dim() != 2 or w.shape[1] != n:
        raise MismatchError(
            f"weights must have shape [M, {n}] (or [{n}]) for {n} inputs, got {tuple(torch.as_tensor(weights).shape)}"
        )
    m = w.shape[0]
    odt = _check_out_dtype(out_dtype if out is None or out_dtype is not None else out.dtype, ref.dtype)
    w = w.to(device=ref.device, dtype=torch.float32).contiguous()
    full_shape = (m, *ref.shape)
    if out is not None:
        _check_out(out, tuple(ref.shape) if single else full_shape, ref.device)
        if out.dtype != odt:
            raise MismatchError(f"out has dtype {out.dtype} but out_dtype is {odt}")
    if not torch.isfinite(w).all():
        raise ParameterError("weights contain NaN or inf")
    xs = [_contig(t) for t in inputs]
    if _route(ref.device, "weighted_sum") == "compiled":
        if out is not None and out.is_contiguous():
            target = out.view(full_shape) if single else out
            torch.ops.ckptreg.weighted_sum_out(xs, w, odt, target)
            return out
        res = torch.ops.ckptreg.weighted_sum(xs, w, odt)
    else:
        res = _weighted_sum_py(xs, w, odt)
    if single:
        res = res[0]
    return _deliver(res, out)


def _weighted_sum_py(xs: list[torch.Tensor], w: torch.Tensor, odt: torch.dtype) -> torch.Tensor:
    acc_dt = _acc_dtype(xs[0].dtype)
    m, n = w.shape
    numel = xs[0].numel()
    acc = torch.zeros((m, numel), dtype=acc_dt, device=xs[0].device)
    wa = w.to(acc_dt)
    for i in range(n):
        acc.addr_(wa[:, i], xs[i].reshape(-1).to(acc_dt))
    return acc.to(odt).reshape(m, *xs[0].shape)


# --------------------------------------------------------------------------------------------
# task_merge
# --------------------------------------------------------------------------------------------
def task_merge(
    base,
    inputs,
    weights,
    *,
    method: str | None = None,
    sparsify: str | None = None,
    consensus: str | None = None,
    density: float = 1.0,
    thresholds=None,
    keys=None,
    sign: str = "total",
    lam: float = 1.0,
    offset: int = 0,
    out_dtype=None,
    out=None,
) -> torch.Tensor:
    """Task-vector merges of N same-shape tensors against ``base`` in one fused pass.

    ``method``: "ties" | "dare_ties" | "dare_linear" | "magnitude_prune" | "task_arithmetic",
    which names the kernel's two settings (``KERNEL_SETTINGS``; ``sign`` is the consensus of the
    electing methods). Instead of ``method``, ``sparsify`` ("none" | "trim" | "dare") and
    ``consensus`` ("none" | "total" | "frequency") may be given directly, each defaulting to "none";
    e.g. method="ties", sign="frequency" is sparsify="trim", consensus="frequency".
    τ_i = inputs[i] − base (base=None means zeros). Trim: TIES / magnitude_prune keep
    ``|τ_i| >= thresholds[i]`` (float[N]; when omitted they are computed over the whole tensor
    as the exact ⌊density·numel⌋-th largest |τ_i|, +inf when that is 0 — pass them explicitly when
    calling on chunks); DARE keeps ``rng.keep_mask(keys[i], offset, numel, density)`` and rescales
    by 1/density (``keys``: the 64-bit ``rng.dare_key(seed, name, i)``, signed or unsigned;
    ``offset``: element index of this chunk in the whole tensor). Signs are elected on the trimmed,
    unweighted τ̂ ("total": sign Σ τ̂_i, "frequency": sign Σ sign τ̂_i, +1 where the sum is 0); with
    a consensus the result is base + lam · Σ_i w_i τ̂_i [sign τ̂_i = γ] / max(1, count), without
    one base + lam · Σ_i w_i τ̂_i.
    """
    sparsify, consensus = _settings(method, sparsify, consensus, sign)
    inputs = _check_inputs(inputs)
    n = len(inputs)
    ref = inputs[0]
    if base is not None:
        if not isinstance(base, torch.Tensor):
            raise MismatchError(f"base must be a tensor or None, not {type(base).__name__}")
        if base.shape != ref.shape:
            raise MismatchError(f"base has shape {tuple(base.shape)} but inputs have {tuple(ref.shape)}")
        if base.dtype != ref.dtype:
            raise MismatchError(f"base has dtype {base.dtype} but inputs have {ref.dtype}")
        if base.device != ref.device:
            raise MismatchError(f"base is on {base.device} but inputs are on {ref.device}")
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1) if not isinstance(weights, torch.Tensor) else weights.detach().reshape(-1).to("cpu", torch.float64)
    if w.numel() != n:
        raise MismatchError(f"weights must have {n} entries (one per input), got {w.numel()}")
    wl = [float(x) for x in w.tolist()]
    if not all(math.isfinite(x) for x in wl):
        raise ParameterError("weights contain NaN or inf")
    density = float(density)
    lam = float(lam)
    offset = int(offset)
    if not math.isfinite(lam):
        raise ParameterError(f"lam must be finite, got {lam}")
    if offset < 0:
        raise ParameterError(f"offset must be >= 0, got {offset}")
    dare = sparsify == "dare"
    trim = sparsify == "trim"
    if dare or trim:
        if not (0.0 < density <= 1.0):
            raise ParameterError(f"density must be in (0, 1], got {density}")
    odt = _check_out_dtype(out_dtype if out is None or out_dtype is not None else out.dtype, ref.dtype)
    if out is not None:
        _check_out(out, tuple(ref.shape), ref.device)
        if out.dtype != odt:
            raise MismatchError(f"out has dtype {out.dtype} but out_dtype is {odt}")
    xs = [_contig(t) for t in inputs]
    b = _contig(base) if base is not None else None

    thr: list[float] | None = None
    if trim:
        if thresholds is None:
            numel = ref.numel()
            k = int(math.floor(density * numel))
            thr = [kth_largest_abs(x, k, b) if k > 0 else math.inf for x in xs]
        else:
            thr = [float(t) for t in (thresholds.tolist() if isinstance(thresholds, torch.Tensor) else thresholds)]
            if len(thr) != n:
                raise MismatchError(f"thresholds must have {n} entries, got {len(thr)}")
            if any(math.isnan(t) for t in thr):
                raise ParameterError("thresholds contain NaN")
    kl: list[int] | None = None
    if dare:
        if keys is None:
            what = f"method {method!r}" if method is not None else "sparsify 'dare'"
            raise ParameterError(f"{what} needs keys (rng.dare_key(seed, name, i) per input)")
        kl = [_rng.signed64(int(k)) for k in (keys.tolist() if isinstance(keys, torch.Tensor) else keys)]
        if len(kl) != n:
            raise MismatchError(f"keys must have {n} entries, got {len(kl)}")

    if _route(ref.device, "task_merge") == "compiled":
        args = (b, xs, wl, sparsify, consensus, density, thr, kl, lam, offset, odt)
        if out is not None and out.is_contiguous():
            torch.ops.ckptreg.task_merge_out(*args, out)
            return out
        res = torch.ops.ckptreg.task_merge(*args)
    else:
        res = _task_merge_py(b, xs, wl, sparsify, consensus, density, thr, kl, lam, offset, odt)
    return _deliver(res, out)


def _settings(method, sparsify, consensus, sign) -> tuple[str, str]:
    """The kernel's (sparsify, consensus) for a method name, or the settings given directly."""
    if method is not None:
        if sparsify is not None or consensus is not None:
            raise ParameterError("give either method or sparsify/consensus, not both "
                                 f"(method={method!r}, sparsify={sparsify!r}, consensus={consensus!r})")
        ks = KERNEL_SETTINGS.get(method)
        if ks is None:
            raise ParameterError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if sign not in _SIGNS:
        raise ParameterError(f"sign must be 'total' or 'frequency', got {sign!r}")
    if method is not None:
        return ks.sparsify, ks.consensus(sign)
    if sparsify is None and consensus is None:
        raise ParameterError("task_merge needs method= (or sparsify= and/or consensus=)")
    sparsify = "none" if sparsify is None else sparsify
    consensus = "none" if consensus is None else consensus
    if sparsify not in SPARSIFY:
        raise ParameterError(f"sparsify must be one of {', '.join(SPARSIFY)}, got {sparsify!r}")
    if consensus not in CONSENSUS:
        raise ParameterError(f"consensus must be one of {', '.join(CONSENSUS)}, got {consensus!r}")
    return sparsify, consensus


def _trimmed(x, b, i, sparsify, density, thr, keys, offset, acc_dt):
    """τ̂_i (before the 1/density rescale for DARE) in the accumulation dtype, flat."""
    t = x.reshape(-1).to(acc_dt)
    if b is not None:
        t = t - b.reshape(-1).to(acc_dt)
    if sparsify == "trim":
        t = torch.where(t.abs() >= thr[i], t, torch.zeros((), dtype=acc_dt, device=t.device))
    elif sparsify == "dare" and density < 1.0:
        mask = _rng.keep_mask(keys[i] & _rng.MASK64, offset, t.numel(), density, device=t.device)
        t = torch.where(mask, t, torch.zeros((), dtype=acc_dt, device=t.device))
    return t


def _task_merge_py(b, xs, wl, sparsify, consensus, density, thr, keys, lam, offset, odt):
    acc_dt = _acc_dtype(xs[0].dtype)
    dev = xs[0].device
    numel = xs[0].numel()
    # DARE rescale: multiply by the accumulation-dtype value of 1/density (the kernels do the same)
    scale = 1.0 / density if sparsify == "dare" else 1.0
    scale_t = torch.tensor(scale, dtype=acc_dt).item()
    if consensus != "none":
        # sign election on the unweighted, un-rescaled trimmed vectors (a positive rescale does
        # not change a sign, and leaving it out keeps the sum bit-identical to the kernels)
        s = torch.zeros(numel, dtype=acc_dt, device=dev)
        for i, x in enumerate(xs):
            t = _trimmed(x, b, i, sparsify, density, thr, keys, offset, acc_dt)
            s += t if consensus == "total" else torch.sign(t)
        gamma = torch.where(s >= 0, 1.0, -1.0).to(acc_dt)
        num = torch.zeros(numel, dtype=acc_dt, device=dev)
        cnt = torch.zeros(numel, dtype=acc_dt, device=dev)
        for i, x in enumerate(xs):
            t = _trimmed(x, b, i, sparsify, density, thr, keys, offset, acc_dt)
            agree = torch.sign(t) == gamma
            if scale != 1.0:
                t = t * scale_t
            num += torch.where(agree, t * wl[i], torch.zeros((), dtype=acc_dt, device=dev))
            cnt += agree.to(acc_dt)
        tm = num / cnt.clamp_min(1.0)
    else:
        tm = torch.zeros(numel, dtype=acc_dt, device=dev)
        for i, x in enumerate(xs):
            t = _trimmed(x, b, i, sparsify, density, thr, keys, offset, acc_dt)
            if scale != 1.0:
                t = t * scale_t
            tm += t * wl[i]
    res = tm * lam
    if b is not None:
        res = b.reshape(-1).to(acc_dt) + res
    return res.to(odt).reshape(xs[0].shape)


# --------------------------------------------------------------------------------------------
# kth_largest_abs
# --------------------------------------------------------------------------------------------
def kth_largest_abs(x, k: int, base=None) -> float:
    """The exact k-th largest value of ``|x - base|`` (k 1-based; k = 0 gives +inf, "keep
    nothing"), computed in float32 (float64 for float64 input). The compiled kernels use a radix
    select over the float bits: no sort and no copy of the tensor."""
    if not isinstance(x, torch.Tensor):
        raise MismatchError(f"x must be a tensor, not {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise MismatchError(f"x has dtype {x.dtype}; supported: float32, float16, bfloat16, float64")
    if base is not None:
        if not isinstance(base, torch.Tensor) or base.shape != x.shape or base.dtype != x.dtype or base.device != x.device:
            raise MismatchError(
                f"base must match x in shape, dtype and device (x: {tuple(x.shape)} {x.dtype} {x.device})"
            )
    k = int(k)
    numel = x.numel()
    if k < 0 or k > numel:
        raise ParameterError(f"k must be in [0, {numel}] for a tensor of {numel} elements, got {k}")
    if k == 0:
        return math.inf
    xc = _contig(x)
    bc = _contig(base) if base is not None else None
    if _route(x.device, "kth_largest_abs") == "compiled":
        return float(torch.ops.ckptreg.kth_largest_abs(xc, k, bc).item())
    return float(_kth_largest_abs_py(xc, k, bc))


def _kth_largest_abs_py(x, k, base):
    acc_dt = _acc_dtype(x.dtype)
    d = x.reshape(-1).to(acc_dt)
    if base is not None:
        d = d - base.reshape(-1).to(acc_dt)
    d = d.abs()
    return torch.kthvalue(d, d.numel() - k + 1).values


# --------------------------------------------------------------------------------------------
# factored_svd_batched
# --------------------------------------------------------------------------------------------
def factored_svd_batched(B, core, A, rank=None):
    """Exact thin SVD of ``B[l] @ core[l] @ A[l]`` for a batch of L layers without forming the
    d×k products: float64 Gram matrices BᵀB and AAᵀ, their R×R factors
    W (B = Q_B·W_B, Aᵀ = Q_A·W_A), the SVD of the small W_B·core·W_Aᵀ, U = Q_B·U_c,
    Vh = V_cᵀ·Q_Aᵀ. Rank-deficient factors (a zero LoRA B) give exact zero singular values (their
    U/Vh columns may be zero rather than orthonormal), never NaN; a layer with NaN or inf in its
    factors or core has NaN U, S and Vh (as a dense SVD of the product would), the others are
    unaffected. Shapes B [L, d, R], core [L, R, R], A [L, R, k]; returns
    U [L, d, r], S [L, r], Vh [L, r, k] with r = min(rank, d, k, R) (all of them when rank is None),
    in float32 (float64 for float64 input), singular values descending."""
    for nm, t in (("B", B), ("core", core), ("A", A)):
        if not isinstance(t, torch.Tensor):
            raise MismatchError(f"{nm} must be a tensor, not {type(t).__name__}")
        if t.dim() != 3:
            raise MismatchError(f"{nm} must be 3-D (batched over layers), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise MismatchError(f"{nm} has dtype {t.dtype}; need a floating dtype")
        if t.device != B.device:
            raise MismatchError(f"{nm} is on {t.device} but B is on {B.device}")
    L, d, R = B.shape
    if core.shape != (L, R, R):
        raise MismatchError(f"core must have shape {(L, R, R)} for B {tuple(B.shape)}, got {tuple(core.shape)}")
    if A.shape[0] != L or A.shape[1] != R:
        raise MismatchError(f"A must have shape ({L}, {R}, k) for B {tuple(B.shape)}, got {tuple(A.shape)}")
    if not (B.dtype == core.dtype == A.dtype):
        raise MismatchError(f"B, core and A must share a dtype, got {B.dtype}, {core.dtype}, {A.dtype}")
    if rank is not None:
        rank = int(rank)
        if rank < 1:
            raise ParameterError(f"rank must be >= 1, got {rank}")
    if _route(B.device, "factored_svd_batched") == "compiled":
        U, S, Vh = torch.ops.ckptreg.factored_svd_batched(_contig(B), _contig(core), _contig(A), rank)
        return U, S, Vh
    return _factored_svd_py(B, core, A, rank)


def _gram_factor_py(G: torch.Tensor):
    """G = W^T W (float64, [L, R, R] PSD): returns W and P with X P orthonormal (zero columns
    for directions X does not span) when G = X^T X. Eigendecomposition; eigenvalues below
    64·R·eps·λ_max are dropped (rank-deficient factors, e.g. a LoRA B that is still zero)."""
    lam, V = torch.linalg.eigh(G)
    n = G.shape[-1]
    lmax = lam.amax(dim=-1, keepdim=True).clamp_min(0.0)
    keep = lam > 64.0 * n * torch.finfo(torch.float64).eps * lmax
    sq = torch.where(keep, lam.clamp_min(0.0).sqrt(), torch.zeros_like(lam))
    inv = torch.where(keep, 1.0 / torch.where(keep, sq, torch.ones_like(sq)), torch.zeros_like(lam))
    W = sq[..., :, None] * V.mT          # diag(sqrt λ) Vᵀ
    P = V * inv[..., None, :]            # V diag(1/sqrt λ)
    return W, P


def _factored_svd_py(B, core, A, rank):
    # Same math as the compiled kernel: Gram matrices in float64 (G_B = BᵀB, G_A = AAᵀ), factors
    # B = Q_B W_B, Aᵀ = Q_A W_A with Q = X·P orthonormal (rank-deficient directions dropped), the
    # SVD of the small W_B·core·W_Aᵀ, then U = B·(P_B U_c), Vh = (P_A V_c)ᵀ·A. Thin BLAS-3 on the
    # tall factors plus R×R work; the kernel uses Cholesky where well conditioned and Jacobi
    # eigen/SVD solvers for the R×R steps, several layers per SIMD register (same numbers to
    # rounding; its Jacobi stops at cos ≤ 1e-9 between columns for float32 results).
    dt = _acc_dtype(B.dtype)
    L, d, R = B.shape
    k = A.shape[2]
    r = min(d, k, R) if rank is None else min(d, k, R, rank)
    if L == 0 or R == 0 or d == 0 or k == 0:
        z = B.new_zeros
        return z((L, d, r), dtype=dt), z((L, r), dtype=dt), z((L, r, k), dtype=dt)
    st = torch.float64 if dt == torch.float64 else torch.float32
    Bs, As = B.to(st), A.to(st)
    Bd, Ad, Cd = B.to(torch.float64), A.to(torch.float64), core.to(torch.float64)
    GB, GA = Bd.mT @ Bd, Ad @ Ad.mT
    # layers with NaN/inf in their Grams or core get NaN outputs (solved on the identity meanwhile)
    bad = ~(torch.isfinite(GB).flatten(1).all(1) & torch.isfinite(GA).flatten(1).all(1)
            & torch.isfinite(Cd).flatten(1).all(1))
    if bool(bad.any()):
        eye = torch.eye(R, dtype=torch.float64)
        sel = bad[:, None, None]
        GB, GA, Cd = torch.where(sel, eye, GB), torch.where(sel, eye, GA), torch.where(sel, eye, Cd)
    WB, PB = _gram_factor_py(GB)
    WA, PA = _gram_factor_py(GA)
    uc, s, vhc = torch.linalg.svd(WB @ Cd @ WA.mT, full_matrices=False)
    PBr = (PB @ uc)[..., :r]
    PAr = (PA @ vhc.mT)[..., :r]
    if bool(bad.any()):
        nan = float("nan")
        PBr, PAr = PBr.masked_fill(bad[:, None, None], nan), PAr.masked_fill(bad[:, None, None], nan)
        s = s.masked_fill(bad[:, None], nan)
    U = Bs @ PBr.to(st)
    Vh = PAr.mT.to(st) @ As
    return U.contiguous(), s[..., :r].to(dt).contiguous(), Vh.contiguous()


# --------------------------------------------------------------------------------------------
# fake (meta) implementations so the compiled ops trace under torch.compile
# --------------------------------------------------------------------------------------------
def _register_fakes() -> None:
    if not _load_ext():
        return
    lib = torch.library

    def _has(name):
        return hasattr(torch.ops.ckptreg, name)

    if _has("weighted_sum"):

        @lib.register_fake("ckptreg::weighted_sum")
        def _ws_fake(inputs, weights, out_dtype=None):
            x = inputs[0]
            dt = out_dtype if out_dtype is not None else x.dtype
            return x.new_empty((weights.shape[0], *x.shape), dtype=dt)

        @lib.register_fake("ckptreg::weighted_sum_out")
        def _ws_out_fake(inputs, weights, out_dtype, out):
            return None

    if _has("task_merge"):

        @lib.register_fake("ckptreg::task_merge")
        def _tm_fake(base, inputs, weights, sparsify, consensus, density, thresholds, keys, lam, offset, out_dtype=None):
            x = inputs[0]
            dt = out_dtype if out_dtype is not None else x.dtype
            return x.new_empty(x.shape, dtype=dt)

        @lib.register_fake("ckptreg::task_merge_out")
        def _tm_out_fake(base, inputs, weights, sparsify, consensus, density, thresholds, keys, lam, offset, out_dtype, out):
            return None

    if _has("kth_largest_abs"):

        @lib.register_fake("ckptreg::kth_largest_abs")
        def _kth_fake(x, k, base=None):
            return x.new_empty((), dtype=_acc_dtype(x.dtype))

    if _has("factored_svd_batched"):

        @lib.register_fake("ckptreg::factored_svd_batched")
        def _fsvd_fake(B, core, A, rank=None):
            L, d, R = B.shape
            k = A.shape[2]
            r = min(d, k, R)
            if rank is not None:
                r = min(r, rank)
            dt = _acc_dtype(B.dtype)
            return (B.new_empty((L, d, r), dtype=dt), B.new_empty((L, r), dtype=dt), B.new_empty((L, r, k), dtype=dt))


try:
    _register_fakes()
except Exception:  # a stale build without some op: the wrappers still work eagerly
    pass

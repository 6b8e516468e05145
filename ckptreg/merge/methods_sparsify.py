"""Breadcrumbs and DELLA (METHODS.md "Further task-vector methods (mergekit semantics)"), each one
:class:`~ckptreg.merge.table.MethodDef` of the ``task_vector`` strategy.

Both need whole tensors (breadcrumbs ranks |τ| over the tensor, DELLA per row), so ``prepare``
reads each input whole, one at a time, and computes the merged task vector of the tensor
(memory: a few tensors); the chunk function writes ``θ_0 + λ·Δ`` for the chunk. DELLA's
Bernoulli draws come from the counter-based generator of :mod:`ckptreg.rng`, keyed like DARE's
masks by (seed, tensor name, checkpoint index, flat element index), so the chunk size never
changes a mask.

- breadcrumbs / breadcrumbs_ties: N entries, keep = ⌊density·N⌋, n_top = ⌊γ·N⌋,
  n_bot = N − keep − n_top (negative: n_top += n_bot, n_bot = 0); entries of ascending-|τ| rank
  (n_bot, N − n_top] are kept (n_top = 0 zeroes nothing at the top: mergekit's ``[n_bot:-0]``
  slice empties the tensor, a bug not copied). Equal magnitudes rank by flat index (stable sort).
- della / della_linear: per row (dim 0; a 1-D tensor is one row, a row of a >2-D tensor is its
  flattened slice), ascending rank r = 1..n of |τ|, p = density − ε + 2ε(r − 1)/(n − 1)
  (p = density for n = 1), keep iff the element's 24 random bits < ⌊p·2^24⌋; kept entries scaled
  by L1(row of τ) / L1(row kept) (a row with nothing kept stays 0).
- ``_ties`` / della: mergekit's consensus on the weighted vectors: γ = sign(Σ w_i τ̂_i), +1 where
  0; mask_i = [sign(w_i τ̂_i) = γ]; Δ = Σ w_i τ̂_i mask_i / Σ w_i mask_i (divisor below 1e-8 in
  magnitude → 1). breadcrumbs / della_linear: Δ = Σ w_i τ̂_i.
"""
from __future__ import annotations

import math

from ..errors import ParameterError
from .table import TASK_VECTOR, MethodDef, ParamDef, register_method

#: DELLA's default ε and breadcrumbs' default γ (METHODS.md)
DELLA_EPSILON = 0.15
BREADCRUMBS_GAMMA = 0.01

_CONSENSUS = {"breadcrumbs": False, "breadcrumbs_ties": True, "della": True, "della_linear": False}


def _work_dtype(*ts):
    import torch

    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def breadcrumbs_window(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_bot, n_top): the entries of ascending-|τ| 0-based rank in [n_bot, numel − n_top) are kept."""
    keep = int(math.floor(density * numel))
    n_top = int(math.floor(gamma * numel))
    n_bot = numel - keep - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    return n_bot, n_top


def _breadcrumbs_mask(tau, density, gamma):
    import torch

    flat = tau.reshape(-1)
    n = flat.numel()
    n_bot, n_top = breadcrumbs_window(n, density, gamma)
    order = torch.sort(flat.abs(), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_bot:n - n_top]] = True
    return flat * mask


def _rows(t):
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)


def della_probabilities(tau, density, epsilon):
    """Keep probability of every entry (float64, shape of ``tau`` as rows × n)."""
    import torch

    rows = _rows(tau)
    n = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, dtype=order.dtype).expand_as(order).contiguous())
    if n == 1:
        return torch.full(rows.shape, float(density), dtype=torch.float64)
    return (density - epsilon) + (2.0 * epsilon) * rank.to(torch.float64) / (n - 1)


def _della_bits(key: int, numel: int):
    """The 24 random bits r_j of elements j = 0..numel-1 of one (seed, tensor, checkpoint) key."""
    import torch

    from .. import rng

    j = torch.arange(1, numel + 1, dtype=torch.int64)
    z = rng._mix_tensor(j * rng.signed64(rng.GAMMA) + rng.signed64(key))
    return (z >> 40) & ((1 << 24) - 1)


def _della_mask(tau, density, epsilon, key):
    import torch

    p = della_probabilities(tau, density, epsilon)
    thr = torch.floor(p * float(1 << 24)).to(torch.int64)
    keep = _della_bits(key, tau.numel()).reshape(p.shape) < thr
    rows = _rows(tau)
    kept = rows * keep
    before = rows.abs().sum(dim=1, keepdim=True)
    after = kept.abs().sum(dim=1, keepdim=True)
    scale = torch.where(after > 0, before / torch.where(after > 0, after, torch.ones_like(after)),
                        torch.zeros_like(after))
    return (kept * scale).reshape(-1)


def check_della(p: dict, method: str = "della") -> None:
    """0 < density ± ε < 1 (ParameterError naming both values). Called by ``check_params`` (the
    table's ``check``: before anything is read or written, for every merge of a sweep) and again
    per tensor (a recipe's per-tensor rules can change density or ε)."""
    d = float(p["density"])
    e = float(p.get("epsilon", DELLA_EPSILON))
    if not (0.0 < d - e and d + e < 1.0):
        raise ParameterError(f"{method} needs 0 < density - epsilon and density + epsilon < 1, "
                             f"got density {d!r}, epsilon {e!r}")


def _sparsified(method, name, tau, i, p):
    if method.startswith("breadcrumbs"):
        return _breadcrumbs_mask(tau, float(p["density"]), float(p.get("gamma", BREADCRUMBS_GAMMA)))
    from .. import rng

    key = rng.dare_key(int(p.get("seed", 0)), name, i)
    return _della_mask(tau, float(p["density"]), float(p.get("epsilon", DELLA_EPSILON)), key)


def sparsify_prepare(method, name, sources, base_src, numel, p):
    """Whole-tensor step: the merged task vector Δ of tensor ``name`` (flat, float32/float64)."""
    import torch

    if method.startswith("della"):
        check_della(p, method)
    if base_src is None:
        raise ParameterError(f"{method} needs a base checkpoint")
    base = base_src.full(name)
    shape = tuple(base.shape)
    base = base.reshape(-1)
    wd = _work_dtype(base)
    base = base.to(wd)

    def tau_hat(i, src):
        x = src.full(name).reshape(-1)
        t = (x.to(wd) - base).reshape(shape)
        del x
        return _sparsified(method, name, t, i, p)

    return {"base_full": base, "tau_hat": tau_hat, "sources": sources, "wd": wd}


def _merge_delta(method, ctx, w):
    """Δ from the sparsified inputs: a weighted sum, or mergekit's weighted consensus (two passes
    over the inputs, each recomputing τ̂_i: memory a few tensors, not one per input)."""
    import torch

    wd = ctx["wd"]
    acc = None
    for i, src in enumerate(ctx["sources"]):
        h = ctx["tau_hat"](i, src) * float(w[i])
        acc = h if acc is None else acc.add_(h)
        del h
    if not _CONSENSUS[method]:
        return acc
    gamma = torch.where(acc >= 0, 1.0, -1.0).to(wd)
    num = torch.zeros_like(acc)
    div = torch.zeros_like(acc)
    for i, src in enumerate(ctx["sources"]):
        h = ctx["tau_hat"](i, src) * float(w[i])
        m = torch.sign(h) == gamma
        num += h * m
        div += m.to(wd) * float(w[i])
        del h, m
    div = torch.where(div.abs() < 1e-8, torch.ones_like(div), div)
    return num / div


def sparsify_chunk(method, base_chunk, chunks, w, p, ctx, offset, out_dtype, out):
    """One chunk: θ_0 + λ Δ (Δ computed once per tensor, on the first chunk)."""
    if "delta" not in ctx:
        ctx["delta"] = _merge_delta(method, ctx, w.tolist())
    d = ctx["delta"][offset:offset + base_chunk.numel()]
    res = base_chunk.to(d.dtype) + float(p.get("lam", 1.0)) * d
    out.copy_(res.reshape(out.shape))
    return out


def _register():
    density = ParamDef("density", "float", None, "Fraction of each task vector kept, in (0, 1].", lo=0.0, hi=1.0,
                       lo_open=True, required=True, sweepable=True, fragment="d", name_default=0.5)
    lam = ParamDef("lam", "float", 1.0, "Scale of the merged task vector (λ).", finite=True, sweepable=True,
                   fragment="lam", cli="--lambda", aliases=("lambda",))
    gamma = ParamDef("gamma", "float", BREADCRUMBS_GAMMA, "Breadcrumbs: fraction of the largest |τ| entries "
                     "dropped as outliers, in [0, 1].", lo=0.0, hi=1.0, sweepable=True, fragment="g")
    eps = ParamDef("epsilon", "float", DELLA_EPSILON, "DELLA: spread ε of the rank-based keep probabilities "
                   "(density ± ε must lie in (0, 1)).", lo=0.0, hi=0.5, hi_open=True, sweepable=True,
                   fragment="eps")
    seed = ParamDef("seed", "int", 0, "DARE / DELLA mask seed.", fragment="seed")
    common = dict(strategy=TASK_VECTOR, fn=sparsify_chunk, prepare=sparsify_prepare, weight_rule="task_vector",
                  uses_base=True, spaces=("tensors", "factors", "delta", "core"), delta_rule="dense")
    register_method(MethodDef("breadcrumbs", params=(density, gamma, lam), fragment="breadcrumbs",
                              help="Drop the smallest and the largest |τ| (outliers) per tensor, weighted sum.",
                              **common))
    register_method(MethodDef("breadcrumbs_ties", params=(density, gamma, lam), fragment="breadcrumbs_ties",
                              help="Breadcrumbs trim, then TIES sign consensus (weighted, divisor Σ w·mask).",
                              **common))
    register_method(MethodDef("della", params=(density, eps, lam, seed), fragment="della",
                              check=lambda p: check_della(p, "della"),
                              help="DELLA: rank-based random drop per row (L1 kept), sign consensus, "
                                   "normalised by Σ w·mask.", **common))
    register_method(MethodDef("della_linear", params=(density, eps, lam, seed), fragment="della_linear",
                              check=lambda p: check_della(p, "della_linear"),
                              help="DELLA drop-and-rescale per row, then a weighted sum.", **common))


_register()

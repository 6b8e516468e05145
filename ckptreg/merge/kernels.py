"""Per-tensor functions of the built-in methods (``MethodDef.fn`` / ``prepare``), called by the
one streaming loop (:mod:`ckptreg.merge.stream`). Torch is imported inside the functions."""
from __future__ import annotations

import math
import re

_EMBED_RE = re.compile(r"(embed|wte|wpe)", re.I)


def _flat(t):
    return t.reshape(-1)


def linear_chunk(chunks, W, out_dtype, out):
    """linear strategy: rows of ``W [M, N]`` times the N input chunks into ``out [M, n]``."""
    from .. import ops

    return ops.weighted_sum(chunks, W, out_dtype=out_dtype, out=out)


def _thresholds(name, sources, base_view, density, numel):
    """TIES / magnitude-prune trim thresholds over whole tensors: each input is read in turn into
    one reused buffer (anonymous memory: one tensor, plus the base the caller holds)."""
    from .. import ops

    k = int(math.floor(density * numel))
    if k <= 0:
        return [math.inf] * len(sources)
    out, scratch = [], None
    for src in sources:
        v = _flat(src.full(name, out=scratch))
        if scratch is None and getattr(src.info.tensors[name], "offset", 0) >= 0:
            scratch = v
        out.append(ops.kth_largest_abs(v, k, base_view))
    return out


def task_prepare(method, name, sources, base_src, numel, p):
    """task_vector strategy, before the chunks: the whole base kept for TIES / magnitude-prune
    thresholds (its chunks are then slices of it), the DARE keys of the tensor."""
    from .. import rng

    density = float(p.get("density", 1.0))
    ctx = {"base_full": None, "thr": None, "keys": None}
    if method in ("ties", "magnitude_prune"):
        ctx["base_full"] = _flat(base_src.full(name)) if base_src is not None else None
        ctx["thr"] = _thresholds(name, sources, ctx["base_full"], density, numel)
    if method in ("dare_linear", "dare_ties"):
        seed = int(p.get("seed", 0))
        ctx["keys"] = [rng.signed64(rng.dare_key(seed, name, i)) for i in range(len(sources))]
    return ctx


def task_chunk(method, base_chunk, chunks, w, p, ctx, offset, out_dtype, out):
    """task_vector strategy, one chunk: ``ops.task_merge`` (the fused kernel)."""
    from .. import ops

    return ops.task_merge(base_chunk, chunks, w, method=method, density=float(p.get("density", 1.0)),
                          thresholds=ctx["thr"], keys=ctx["keys"], sign=p.get("sign", "total"),
                          lam=float(p.get("lam", 1.0)), offset=offset, out_dtype=out_dtype, out=out)


def slerp_coeffs(name, src0, src1, p, chunk, numel):
    """SLERP coefficients (c0, c1) of tensor ``name``, norms/dot accumulated chunkwise in float64."""
    import torch

    from ..methods import SLERP_DOT_THRESHOLD, SLERP_EPS

    t = float(p.get("t", 0.5))
    n00 = n11 = n01 = 0.0
    for s in range(0, numel, chunk):
        e = min(numel, s + chunk)
        a = src0.chunk(name, s, e).to(torch.float64)
        b = src1.chunk(name, s, e).to(torch.float64)
        n00 += float(torch.dot(a, a))
        n11 += float(torch.dot(b, b))
        n01 += float(torch.dot(a, b))
        del a, b
    n0, n1 = math.sqrt(n00), math.sqrt(n11)
    s0 = n0 if n0 > SLERP_EPS else 1.0
    s1 = n1 if n1 > SLERP_EPS else 1.0
    d = n01 / (s0 * s1)
    if abs(d) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, d)))
    st = math.sin(theta)
    return math.sin((1.0 - t) * theta) / st, math.sin(t * theta) / st


def cart_tensor(name, views_full, weights, p, odt):
    """per_matrix strategy: CART on one tensor (low-rank step on 2-D non-embedding matrices)."""
    from .. import lowrank

    lowrank_step = len(views_full[0].shape) == 2 and not _EMBED_RE.search(name)
    # METHODS.md ("Dense checkpoints"): the default truncated SVD is exact (equal to the float64
    # reference to 1e-4 on any spectrum); the randomized range finder only where asked
    # (``--svd randomized``, recorded in the lineage params).
    res = lowrank.cart_dense(list(views_full), weights, rank_ratio=float(p.get("rank_ratio", lowrank.DEFAULT_RANK_RATIO)),
                             lam=float(p.get("lam", 1.0)), lowrank=lowrank_step,
                             svd=str(p.get("svd", "exact")), seed=int(p.get("seed", 0)))
    return res.to(odt)

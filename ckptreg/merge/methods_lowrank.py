"""The SVD-family merge methods of METHODS.md "Low-rank families": ``tsv`` (TSV-M), ``iso_c``,
``iso_cts`` (dense only), ``star``, ``knots_ties`` and ``knots_dare_ties`` (LoRA only).

Each method is one :class:`~ckptreg.merge.table.MethodDef` of the ``per_matrix`` strategy with

- ``matrix_fn(taus [T, m, n], weights, params, name=None) -> Δ [m, n]``: the dense form on the
  task matrices of one 2-D tensor, batched over the T tasks (one ``torch.linalg.svd`` of the
  ``[T, m, n]`` stack; the polar factors by one thin SVD of the concatenation). The streamer
  (:func:`ckptreg.merge.stream._per_matrix`) writes θ_0 + Δ for 2-D non-embedding matrices and
  θ_0 + α·mean_t τ_t for every other tensor. Computed in float32 (float64 for float64 inputs);
  KnOTS's SVD in float64 (METHODS.md).
- ``delta_fn(fs, weights, params, r_out, name=None) -> (B [m, r], A [r, n])`` (``delta_rule
  "factored"``): the exact form for LoRA adapters, τ_t = s_t B_t A_t, computed in the span of the
  stacked factors (thin QRs and Σr×Σr cores, :func:`ckptreg.lowrank.factored_svd`), never forming
  an m×n matrix. ``B @ A`` is the merged update (the output adapter has lora_alpha = r, so its
  scaling is 1). Output rank: ``r_out`` (the best rank-r_out truncation of the exact result,
  zero-padded when the result has a smaller rank) or, when None, the exact result at its rank
  (at most Σ r_t), zero-padded to the upper bound Σ r_t.

Choices where METHODS.md is silent (documented):

- Weights: ``weight_rule="task_vector"``: one multiplier per input (default 1; a weighting
  scheme is rescaled to mean 1), applied to τ_t before anything else (τ_t ← w_t τ_t). With
  the default weights the methods are exactly those of METHODS.md.
- ``name`` (the tensor name; the lora_A tensor's name for adapters) keys KnOTS-DARE's masks:
  ``rng.dare_key(seed, name, t)``, element j = the flat index in X_t (k × n, row-major).
- STAR's rank rule compares Σ_{i≤k} σ_i ≥ (η/100)·Σσ with a relative tolerance of 1e-6 of Σσ,
  so an exact tie (the worked example σ = [4, 3, 2, 1], η = 40 → k = 1) is not lost to the
  rounding of a float32 SVD.
- Iso-C with an output rank below R: σ̄ is the same for every direction, so "the best rank-r
  truncation" keeps the r leading singular directions of Δ_TA.
- Tasks that are exactly zero (τ_t = 0) contribute no triplets (rank 0).
- Spaces: tsv, iso_c and star also take ``space="core"``: their results lie in the span of the
  stacked factors, so core space computes the same exact ``delta_fn`` (METHODS.md "Core space":
  they equal delta space exactly). KnOTS in core space would be a different merge (its TIES would
  trim the core blocks): not offered.
- KnOTS ``trim_scope``: "module" (per X_t of one module, the default); "global" (the official
  code's threshold over all modules of a task) is refused: delta space merges one module at a
  time.
"""
from __future__ import annotations

import math

from ..errors import MismatchError, ParameterError
from .table import PER_MATRIX, MethodDef, ParamDef, register_method

__all__ = ["RANK_RTOL", "ISO_CTS_COMMON", "tsv_matrix", "iso_c_matrix", "iso_cts_matrix", "star_matrix",
           "knots_matrix", "tsv_delta", "iso_c_delta", "star_delta", "knots_delta", "iso_cts_ranks", "star_rank",
           "register"]

#: numerical rank: the number of σ > σ_1 · RANK_RTOL (METHODS.md)
RANK_RTOL = 1e-6
#: Iso-CTS common-space fraction f (METHODS.md)
ISO_CTS_COMMON = 0.8
#: STAR's tolerance on its η threshold (relative to Σσ)
STAR_TIE_RTOL = 1e-6


# ------------------------------------------------------------------------------------------------
# small helpers


def _wdt(*ts):
    import torch

    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _ranks(S):
    """Numerical rank of each row of singular values ``S [..., p]`` (descending): #σ > σ_1·1e-6."""
    lead = S[..., :1]
    return ((S > lead * RANK_RTOL) & (S > 0)).sum(dim=-1)


def _polar(M):
    """Polar factor P Qᵀ of ``M = P Σ Qᵀ`` (thin SVD; batched over leading dims)."""
    import torch

    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def _weighted(taus, weights):
    import torch

    if weights is None:
        return taus
    w = torch.as_tensor([float(x) for x in weights], dtype=taus.dtype, device=taus.device)
    if w.numel() != taus.shape[-3]:
        raise ParameterError(f"{w.numel()} weights for {taus.shape[-3]} task matrices")
    return taus * w.reshape((-1, 1, 1))


def _scale(params, key="alpha") -> float:
    return float((params or {}).get(key, 1.0))


def _check_taus(taus):
    import torch

    if not isinstance(taus, torch.Tensor) or taus.dim() < 3:
        raise ParameterError("low-rank methods need task matrices stacked as [T, m, n]")
    return taus.to(_wdt(taus)) if taus.dtype not in (torch.float32, torch.float64) else taus


def _svd(taus, batched=True):
    """Thin SVD of every task matrix: one batched call (``batched``), or a Python loop of
    per-matrix calls (the same numbers; kept for the tests and the bench)."""
    import torch

    if batched:
        return torch.linalg.svd(taus, full_matrices=False)
    outs = [torch.linalg.svd(t, full_matrices=False) for t in taus.unbind(-3)]
    return tuple(torch.stack([o[i] for o in outs], dim=-3 if i != 1 else -2) for i in range(3))


def _tsv_keep(S, p: int, T: int):
    """TSV's k_t = min(⌊p/T⌋, rank τ_t) as a keep mask over the leading ⌊p/T⌋ triplets of each
    task: ``[T, kmax]`` bool (kmax = min(⌊p/T⌋, S.shape[-1]))."""
    import torch

    kmax = min(p // T, S.shape[-1])
    k = torch.clamp(_ranks(S), max=kmax)
    return torch.arange(kmax, device=S.device)[None, :] < k[:, None], kmax


# ------------------------------------------------------------------------------------------------
# dense forms (matrix_fn)


def tsv_matrix(taus, weights=None, params=None, name=None, *, batched=True):
    """TSV-M: per-task SVD, k_t = min(⌊p/T⌋, rank τ_t) leading triplets, U_cat/V_cat
    orthogonalised by their polar factors, Δ = α U⊥ diag(s_cat) V⊥ᵀ."""
    taus = _weighted(_check_taus(taus), weights)
    T, m, n = taus.shape[-3:]
    p = min(m, n)
    U, S, Vh = _svd(taus, batched)
    keep, kmax = _tsv_keep(S, p, T)
    flat = keep.reshape(-1)
    if not bool(flat.any()):
        return taus.new_zeros((m, n))
    # [T, m, kmax] -> [m, T*kmax] (task blocks side by side), then the kept columns
    Uc = U[..., :kmax].permute(1, 0, 2).reshape(m, T * kmax)[:, flat]
    Vc = Vh[..., :kmax, :].permute(2, 0, 1).reshape(n, T * kmax)[:, flat]
    sc = S[..., :kmax].reshape(-1)[flat]
    Up, Vp = _polar(Uc), _polar(Vc)
    return _scale(params) * ((Up * sc) @ Vp.mT)


def iso_c_matrix(taus, weights=None, params=None, name=None, *, batched=True):
    """Iso-C: Δ_TA = Σ_t τ_t; R = rank(Δ_TA); Δ = α σ̄ U_R V_Rᵀ (σ̄ = mean of the R values)."""
    import torch

    taus = _weighted(_check_taus(taus), weights)
    ta = taus.sum(dim=-3)
    U, S, Vh = torch.linalg.svd(ta, full_matrices=False)
    R = int(_ranks(S))
    if R == 0:
        return torch.zeros_like(ta)
    sbar = S[:R].mean()
    return _scale(params) * sbar * (U[:, :R] @ Vh[:R])


def iso_cts_ranks(p: int, T: int, f: float = ISO_CTS_COMMON):
    """(k_c, s): Iso-CTS's common and per-task dimensions. k_c = ⌊p·f⌋; s_tot = round((p −
    k_c)/T)·T (round half to even); k_c ← p − s_tot; s = s_tot / T."""
    kc = int(math.floor(p * f))
    s_tot = int(round((p - kc) / T)) * T
    s_tot = min(s_tot, p)
    return p - s_tot, s_tot // T


def iso_cts_matrix(taus, weights=None, params=None, name=None, *, batched=True):
    """Iso-CTS: common subspace top-k_c of SVD(Σ τ_t); top-s triplets of each residual
    R_t = τ_t − U_c U_cᵀ τ_t; task blocks then the common block, polar-orthogonalised; every σ
    replaced by the mean of all p concatenated σ; Δ = α σ̄ U⊥ V⊥ᵀ."""
    import torch

    taus = _weighted(_check_taus(taus), weights)
    T, m, n = taus.shape[-3:]
    p = min(m, n)
    kc, s = iso_cts_ranks(p, T)
    Ua, Sa, Vha = torch.linalg.svd(taus.sum(dim=-3), full_matrices=False)
    Uc, Sc, Vhc = Ua[:, :kc], Sa[:kc], Vha[:kc]
    parts_u, parts_v, parts_s = [], [], []
    if s > 0:
        res = taus - Uc @ (Uc.mT @ taus)
        Ur, Sr, Vhr = _svd(res, batched)
        parts_u.append(Ur[..., :s].permute(1, 0, 2).reshape(m, T * s))
        parts_v.append(Vhr[..., :s, :].permute(2, 0, 1).reshape(n, T * s))
        parts_s.append(Sr[..., :s].reshape(-1))
    parts_u.append(Uc)
    parts_v.append(Vhc.mT)
    parts_s.append(Sc)
    Ucat, Vcat, scat = torch.cat(parts_u, 1), torch.cat(parts_v, 1), torch.cat(parts_s)
    if scat.numel() == 0:
        return taus.new_zeros((m, n))
    return _scale(params) * scat.mean() * (_polar(Ucat) @ _polar(Vcat).mT)


def star_rank(S, eta: float):
    """STAR's k per row of ``S [..., p]``: the smallest k with Σ_{i≤k} σ_i ≥ (η/100)·Σσ (see the
    module docstring for the tolerance); 0 for an all-zero row."""
    import torch

    cs = torch.cumsum(S, dim=-1)
    tot = cs[..., -1:]
    thr = tot * (float(eta) / 100.0) - tot * STAR_TIE_RTOL
    k = (cs < thr).sum(dim=-1) + 1
    return torch.where(tot[..., 0] > 0, torch.clamp(k, max=S.shape[-1]), torch.zeros_like(k))


def _star_sigma(S, eta):
    """σ' of every task: σ_i·Σσ/Σ_{i≤k}σ_i for i ≤ k, 0 beyond (``[..., p]``)."""
    import torch

    k = star_rank(S, eta)
    keep = torch.arange(S.shape[-1], device=S.device) < k[..., None]
    kept = (S * keep).sum(dim=-1, keepdim=True)
    tot = S.sum(dim=-1, keepdim=True)
    ratio = torch.where(kept > 0, tot / torch.where(kept > 0, kept, torch.ones_like(kept)), torch.zeros_like(kept))
    return S * ratio * keep


def star_matrix(taus, weights=None, params=None, name=None, *, batched=True):
    """STAR: per task k (η % of the nuclear norm), σ' rescaled to keep Σσ; Δ = λ/T Σ_t τ̂_t."""
    taus = _weighted(_check_taus(taus), weights)
    T = taus.shape[-3]
    U, S, Vh = _svd(taus, batched)
    sp = _star_sigma(S, float((params or {}).get("eta", 40.0)))
    return (_scale(params, "lam") / T) * ((U * sp.unsqueeze(-2)) @ Vh).sum(dim=-3)


def _trim_mask(X, density):
    """Keep the ⌊density·numel⌋ largest |x| of each ``X[t]`` (flattened; exact count)."""
    import torch

    flat = X.reshape(X.shape[0], -1)
    k = int(math.floor(float(density) * flat.shape[1]))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(flat.abs(), k, dim=1, sorted=False).indices
        mask.scatter_(1, idx, True)
    return mask.reshape(X.shape)


def _dare(X, density, seed, name):
    """DARE on each ``X[t]``: keep with probability density (counter-based mask keyed by
    (seed, name, t), element = flat index), kept entries / density."""
    import torch

    from .. import rng

    if name is None:
        raise ParameterError("knots_dare_ties needs the tensor name to key its masks")
    out = torch.empty_like(X)
    for t in range(X.shape[0]):
        key = rng.dare_key(int(seed), name, t)
        m = rng.keep_mask(key, 0, X[t].numel(), float(density)).reshape(X[t].shape)
        out[t] = torch.where(m, X[t] / float(density), torch.zeros_like(X[t]))
    return out


def _ties_merge(X):
    """TIES steps 2–4 (unweighted, total sign) over the task axis of ``X [T, k, n]``."""
    import torch

    gamma = torch.sign(X.sum(dim=0))
    gamma = torch.where(gamma == 0, torch.ones_like(gamma), gamma)
    agree = torch.sign(X) == gamma
    cnt = agree.sum(dim=0).clamp(min=1).to(X.dtype)
    return (X * agree).sum(dim=0) / cnt


def _knots_x(X, method, params, name):
    p = params or {}
    density = float(p.get("density", 1.0))
    if p.get("trim_scope", "module") != "module":
        raise ParameterError("knots --trim-scope global is not supported (delta space merges one module at a "
                             "time); use --trim-scope module")
    if method == "knots_dare_ties":
        X = _dare(X, density, int(p.get("seed", 0)), name)
    else:
        X = X * _trim_mask(X, density)
    return _scale(p) * _ties_merge(X)


def knots_matrix(taus, weights=None, params=None, name=None, *, method="knots_ties"):
    """KnOTS (dense form, float64): SVD of W = [τ_1 … τ_T], σ > σ_1·1e-6 kept, X_t = diag(σ)V_tᵀ,
    TIES (or DARE then TIES) on the X_t, Δ = U (α x̄)."""
    import torch

    taus = _weighted(_check_taus(taus), weights)
    dt = taus.dtype
    T, m, n = taus.shape[-3:]
    W = taus.to(torch.float64).permute(1, 0, 2).reshape(m, T * n)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = int(_ranks(S))
    if k == 0:
        return taus.new_zeros((m, n))
    X = (S[:k, None] * Vh[:k]).reshape(k, T, n).permute(1, 0, 2)   # [T, k, n]
    return (U[:, :k] @ _knots_x(X, method, params, name)).to(dt)


# ------------------------------------------------------------------------------------------------
# LoRA delta space (delta_fn): exact in the span of the stacked factors


def _fs_check(fs, weights):
    if not fs:
        raise ParameterError("a delta-space merge needs at least one adapter")
    m, n = fs[0][1].shape[-2], fs[0][0].shape[-1]
    for i, (a, b, _) in enumerate(fs):
        if a.dim() != 2 or b.dim() != 2 or b.shape[-2] != m or a.shape[-1] != n or b.shape[-1] != a.shape[-2]:
            raise MismatchError(f"adapter {i}: lora_B {tuple(b.shape)} / lora_A {tuple(a.shape)} do not give a "
                                f"{m}x{n} update")
    w = [1.0] * len(fs) if weights is None else [float(x) for x in weights]
    if len(w) != len(fs):
        raise ParameterError(f"{len(w)} weights for {len(fs)} adapters")
    return int(m), int(n), w


def _task_svds(fs, w):
    """Exact thin SVD of each τ_t = w_t s_t B_t A_t (factored; batched over the tasks of the same
    rank). Returns [(U_t [m, r], S_t [r], Vh_t [r, n])] in task order."""
    import torch

    from .. import lowrank

    groups: dict = {}
    for t, (a, b, sc) in enumerate(fs):
        groups.setdefault(int(a.shape[0]), []).append(t)
    out = [None] * len(fs)
    for r, ts in groups.items():
        B = torch.stack([fs[t][1] for t in ts])
        A = torch.stack([fs[t][0] for t in ts])
        diag = torch.tensor([[w[t] * float(fs[t][2])] * r for t in ts], dtype=torch.float64)
        U, S, Vh = lowrank.factored_svd(B, diag, A)
        for i, t in enumerate(ts):
            out[t] = (U[i], S[i], Vh[i])
    return out


def _from_svd(U, S, Vh, alpha, r_out, r_nat):
    """Adapter factors (B, A) with B @ A = α U diag(S) Vh: sorted by S, truncated to ``r_out``
    (None: kept), zero-padded to ``r_out`` or ``r_nat``."""
    import torch

    from .. import lowrank

    order = torch.argsort(S, descending=True)
    U, S, Vh = U[:, order], S[order], Vh[order]
    r = r_out if r_out is not None else max(int(r_nat), 1)
    a = float(alpha)
    return lowrank.split_factors(U, S * abs(a), Vh, r, -1.0 if a < 0 else 1.0)


def _natural(fs):
    return sum(int(a.shape[0]) for a, _, _ in fs)


def tsv_delta(fs, weights=None, params=None, r_out=None, name=None):
    """TSV-M on LoRA updates: per-task factored SVDs, k_t = min(⌊p/T⌋, rank τ_t), polar factors of
    U_cat (m × Σk) and V_cat (n × Σk) by thin SVDs; Δ = α U⊥ diag(s_cat) V⊥ᵀ is already an SVD
    (orthonormal U⊥, V⊥), so its truncation is the top r_out of s_cat."""
    import torch

    m, n, w = _fs_check(fs, weights)
    T, p = len(fs), min(m, n)
    Us, Ss, Vs = [], [], []
    for U, S, Vh in _task_svds(fs, w):
        k = min(p // T, int(_ranks(S)))
        Us.append(U[:, :k])
        Ss.append(S[:k])
        Vs.append(Vh[:k].mT)
    Uc, sc, Vc = torch.cat(Us, 1), torch.cat(Ss), torch.cat(Vs, 1)
    if sc.numel() == 0:
        return _zeros(fs, r_out)
    return _from_svd(_polar(Uc), sc, _polar(Vc).mT, _scale(params), r_out, _natural(fs))


def _zeros(fs, r_out):
    a0, b0, _ = fs[0]
    r = r_out if r_out is not None else _natural(fs)
    dt = _wdt(*(t for f in fs for t in f[:2]))
    return b0.new_zeros((b0.shape[0], r), dtype=dt), a0.new_zeros((r, a0.shape[1]), dtype=dt)


def _stacked(fs, coeffs):
    import torch

    dt = _wdt(*(t for f in fs for t in f[:2]))
    B = torch.cat([b.to(dt) for _, b, _ in fs], 1)
    A = torch.cat([a.to(dt) for a, _, _ in fs], 0)
    diag = torch.cat([torch.full((int(a.shape[0]),), float(c), dtype=torch.float64) for (a, _, _), c in zip(fs, coeffs)])
    return B, A, diag


def iso_c_delta(fs, weights=None, params=None, r_out=None, name=None):
    """Iso-C on LoRA updates: the factored SVD of Σ_t τ_t; Δ = α σ̄ U_R V_Rᵀ."""
    import torch

    from .. import lowrank

    m, n, w = _fs_check(fs, weights)
    B, A, diag = _stacked(fs, [wt * float(sc) for wt, (_, _, sc) in zip(w, fs)])
    U, S, Vh = lowrank.factored_svd(B, diag, A)
    R = int(_ranks(S))
    if R == 0:
        return _zeros(fs, r_out)
    sbar = S[:R].mean()
    return _from_svd(U[:, :R], torch.full((R,), float(sbar), dtype=S.dtype), Vh[:R], _scale(params), r_out,
                     _natural(fs))


def star_delta(fs, weights=None, params=None, r_out=None, name=None):
    """STAR on LoRA updates: per-task factored SVDs, each truncated and rescaled (σ'), then the
    factored SVD of (λ/T) Σ_t τ̂_t (the τ̂_t stacked as factors)."""
    import torch

    from .. import lowrank

    m, n, w = _fs_check(fs, weights)
    T = len(fs)
    eta = float((params or {}).get("eta", 40.0))
    Bs, As, ds = [], [], []
    for U, S, Vh in _task_svds(fs, w):
        sp = _star_sigma(S, eta)
        k = int((sp > 0).sum())
        Bs.append(U[:, :k])
        As.append(Vh[:k])
        ds.append(sp[:k].to(torch.float64))
    d = torch.cat(ds)
    if d.numel() == 0:
        return _zeros(fs, r_out)
    U, S, Vh = lowrank.factored_svd(torch.cat(Bs, 1), d, torch.cat(As, 0))
    return _from_svd(U, S, Vh, _scale(params, "lam") / T, r_out, _natural(fs))


def knots_delta(fs, weights=None, params=None, r_out=None, name=None, *, method="knots_ties"):
    """KnOTS on LoRA updates: the SVD of W = [τ_1 … τ_T] = B_cat · blockdiag(c_t A_t) from thin QRs
    B_cat = Q_B R_B and A_tᵀ = Q_t R_t: W = Q_B · K · blockdiag(Q_t)ᵀ with the Σr×Σr core
    K = R_B · blockdiag(c_t R_tᵀ) (float64), so U = Q_B u and V_tᵀ = (vᵀ)_block t Q_tᵀ; TIES (or
    DARE-TIES) on X_t = diag(σ) V_tᵀ (k × n); Δ = U (α x̄), written back by the SVD of the k × n
    x̄ (U has orthonormal columns)."""
    import torch

    m, n, w = _fs_check(fs, weights)
    odt = _wdt(*(t for f in fs for t in f[:2]))
    # float64 throughout (METHODS.md: KnOTS's SVD in float64): TIES's trim and sign election are
    # discontinuous, so float32 rounding of the X_t flips entries (measured 2e-4 relative at 1024²)
    dt = torch.float64
    B = torch.cat([b.to(dt) for _, b, _ in fs], 1)
    qb, rb = torch.linalg.qr(B, mode="reduced")
    rb = rb.to(torch.float64)
    R = B.shape[1]
    blocks, qs, off = torch.zeros((R, R), dtype=torch.float64), [], 0
    for (a, _, sc), wt in zip(fs, w):
        r = int(a.shape[0])
        q, rt = torch.linalg.qr(a.to(dt).mT, mode="reduced")    # A_tᵀ = Q_t R_t, q [n, r']
        rr = q.shape[1]
        blocks[off:off + r, off:off + rr] = (wt * float(sc)) * rt.to(torch.float64).mT
        qs.append((off, rr, q))
        off += r
    # columns of K index the blocks of blockdiag(Q_t): r'_t = min(n, r_t) each (here off counts r_t)
    cols = torch.cat([torch.arange(o, o + rr) for o, rr, _ in qs])
    K = rb @ blocks[:, cols]
    u, S, vh = torch.linalg.svd(K, full_matrices=False)
    k = int(_ranks(S))
    if k == 0:
        return _zeros(fs, r_out)
    U = qb.to(torch.float64) @ u[:, :k]
    X, c0 = [], 0
    for (o, rr, q) in qs:
        X.append((S[:k, None] * vh[:k, c0:c0 + rr]) @ q.to(torch.float64).mT)   # [k, n]
        c0 += rr
    xbar = _knots_x(torch.stack(X), method, params, name)   # [k, n], α applied
    u2, s2, vh2 = torch.linalg.svd(xbar, full_matrices=False)
    return _from_svd((U @ u2).to(odt), s2.to(odt), vh2.to(odt), 1.0, r_out, _natural(fs))


# ------------------------------------------------------------------------------------------------
# registration


def _knots_dare_matrix(taus, weights=None, params=None, name=None):
    return knots_matrix(taus, weights, params, name, method="knots_dare_ties")


def _knots_dare_delta(fs, weights=None, params=None, r_out=None, name=None):
    return knots_delta(fs, weights, params, r_out, name, method="knots_dare_ties")


def _unused_fn(name, tensors, weights, params, odt):   # pragma: no cover (matrix_fn methods never call fn)
    raise ParameterError("low-rank methods run through matrix_fn")


def _check_knots(p: dict) -> None:
    if p.get("trim_scope", "module") != "module":
        raise ParameterError("knots --trim-scope global is not supported (delta space merges one module at a "
                             "time); use --trim-scope module")


ALPHA = ParamDef("alpha", "float", 1.0, "Scale α of the merged update (TSV-M, Iso-C/CTS, KnOTS).", finite=True,
                 sweepable=True, fragment="alpha")
LAM = ParamDef("lam", "float", 1.0, "Scale of the merged task vector (λ).", finite=True, sweepable=True,
               fragment="lam", cli="--lambda", aliases=("lambda",))
ETA = ParamDef("eta", "float", 40.0, "STAR: percent of each task's nuclear norm kept (η).", lo=0.0, hi=100.0,
               lo_open=True, sweepable=True, fragment="eta")
DENSITY = ParamDef("density", "float", None, "Fraction of each task vector kept, in (0, 1].", lo=0.0, hi=1.0,
                   lo_open=True, required=True, sweepable=True, fragment="d", name_default=0.5)
SEED = ParamDef("seed", "int", 0, "DARE mask seed.", fragment="seed")
TRIM_SCOPE = ParamDef("trim_scope", "choice", "module", "KnOTS trim scope: module (per X_t of one module); "
                      "global (the official code's, over all modules) is not supported.",
                      choices=("module", "global"))

_COMMON = dict(strategy=PER_MATRIX, fn=_unused_fn, weight_rule="task_vector", uses_base=True, delta_rule="factored")

METHODS_LOWRANK = (
    MethodDef("tsv", aliases=("tsv_m", "task_singular_vectors"), params=(ALPHA,), fragment="tsv",
              spaces=("tensors", "delta", "core"), matrix_fn=tsv_matrix, delta_fn=tsv_delta,
              help="TSV-M: per-task top ⌊p/T⌋ singular triplets, orthogonalised (polar), θ_0 + α Δ.", **_COMMON),
    MethodDef("iso_c", aliases=("iso",), params=(ALPHA,), fragment="iso_c", spaces=("tensors", "delta", "core"),
              matrix_fn=iso_c_matrix, delta_fn=iso_c_delta,
              help="Iso-C: the task-arithmetic sum with a flat (isotropic) spectrum, θ_0 + α σ̄ U Vᵀ.", **_COMMON),
    MethodDef("iso_cts", params=(ALPHA,), fragment="iso_cts", spaces=("tensors",), matrix_fn=iso_cts_matrix,
              help="Iso-CTS: common and task-specific subspaces, isotropic (dense checkpoints only).",
              **{**_COMMON, "delta_rule": None}),
    MethodDef("star", params=(LAM, ETA), fragment="star", spaces=("tensors", "delta", "core"), matrix_fn=star_matrix,
              delta_fn=star_delta,
              help="STAR: per-task truncation to η% of the nuclear norm, rescaled, averaged (θ_0 + λ mean).",
              **_COMMON),
    MethodDef("knots_ties", params=(DENSITY, ALPHA, TRIM_SCOPE), fragment="knots_ties", spaces=("delta",),
              matrix_fn=knots_matrix, delta_fn=knots_delta, check=_check_knots,
              help="KnOTS-TIES: TIES on the task blocks of the joint SVD of the LoRA updates (LoRA only).",
              **_COMMON),
    MethodDef("knots_dare_ties", params=(DENSITY, ALPHA, SEED, TRIM_SCOPE), fragment="knots_dare_ties",
              spaces=("delta",), matrix_fn=_knots_dare_matrix, delta_fn=_knots_dare_delta, check=_check_knots,
              help="KnOTS-DARE-TIES: DARE then TIES on the joint-SVD task blocks (LoRA only).", **_COMMON),
)


def register():
    for d in METHODS_LOWRANK:
        register_method(d)

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
- The delta_fns also take a leading layer dimension, A_t [L, r_t, n], B_t [L, m, r_t] (one
  scale s_t per task, equal across the layers) → B [L, m, r], A [L, r, n], ``name`` then the list
  of the L layers' names: the per-task factored SVDs, thin QRs and core SVDs are one batched
  call over the layers; the rank-dependent steps (TSV's Σk_t, Iso-C's R, STAR's kept count,
  KnOTS's k) are computed batched and the rest runs per sub-group of layers with the same count
  (KnOTS's TIES step per layer: its trim and DARE masks are per module). The result equals the
  per-layer calls bit for bit on CPU (measured: torch's CPU batched QR/SVD runs the same LAPACK
  call per matrix).
- The delta-space merge still calls them one module at a time (``delta_rule "factored"`` stays in
  :attr:`ckptreg.merge.delta.DeltaCache.UNBATCHED_RULES`): batching does not pay on CPU. Measured
  (bench/bench_lowrank_batched.py, T = 8 adapters, r = 16, 8 layers, 1 torch thread, process CPU
  time, best of 3, 2 cores shared with other jobs; float64 thin QRs of dc5a69d): 1024²: tsv
  per-layer 0.146 s / batched 0.149 s, iso_c 0.090 / 0.090, star 0.039 / 0.040, knots_ties
  0.155 / 0.144 (0.98-1.08×); 4096²: tsv 0.525 / 0.738, iso_c 0.333 / 0.441, star 0.159 /
  0.267, knots_ties 0.511 / 0.506 (0.60-1.01×: slower or even); float32 QRs before it: 1.00-1.13×
  and 0.59-0.97×. With 2 threads the wall times swung by up to 5× between runs on the loaded
  machine (ratios 0.09-1.55× for the same call), no steadier sign of a gain. The LAPACK work is the same either way (the batched CPU call loops over
  the matrices), the Python dispatch saved is well under a millisecond per layer against 4-60 ms
  of QR/SVD, and the L-times larger intermediates (32 MB and more at 4096²) cost more to move
  (a profile of STAR at 4096²: the batched ``to``/``cat``/``split_factors`` steps took 3-10× the
  time of the 8 per-layer ones, likely cache misses and allocations past glibc's mmap threshold).
  Per layer at 4096², TSV-M is 83% its two polar factors (the SVD of the m × Σk U_cat / V_cat and
  the product P Qᵀ).

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
- Tasks that are exactly zero (τ_t = 0) contribute no triplets (rank 0); KnOTS's X_t of such a
  task is exactly 0 (its block of the joint SVD's V would otherwise be rounding noise that the
  TIES trim keeps and counts in the disjoint mean).
- Spaces: tsv, iso_c and star also take ``space="core"``: their results lie in the span of the
  stacked factors, so core space computes the same exact ``delta_fn`` (METHODS.md "Core space":
  they equal delta space exactly). KnOTS in core space would be a different merge (its TIES would
  trim the core blocks): not offered.
- KnOTS's trim keeps |x| >= the ⌊density·N⌋-th largest |x| (the fused kernel's rule, as TIES
  elsewhere in ckptreg: entries tied with the threshold are all kept, so a tie can keep a few
  more than ⌊density·N⌋). The TIES step (trim or DARE, election, disjoint mean) runs in the
  compiled ``ops.task_merge`` (float64) when it is built, else in batched torch
  (:func:`_ties_x_torch`, the same numbers bit for bit; ``CKPTREG_BACKEND=python`` forces it).
- KnOTS ``trim_scope``: "module" (N = the entries of one module's X_t, the default) or "global"
  (knots_ties; the official code's: N_t = the entries of the X_t of all modules of task t). The
  global thresholds come from a pre-pass of the delta-space merge over every module
  (:func:`delta_params`, :func:`global_thresholds`: exact, two passes as a rule (a sampled
  bracket, then a count and the entries inside it; a radix select over the float64 bits when
  the bracket misses), each recomputing the X_t from the factors, so memory stays one module's
  X) before the first module is written; they reach ``knots_delta`` as ``params[GLOBAL_THRESHOLDS]`` (a reserved key a
  user's params may not carry). Named ``_trim_global``; recorded as ``trim_scope`` in the
  lineage. knots_dare_ties refuses "global": DARE has no magnitude trim (its mask is the same
  whatever the scope, in the official code too), so the setting would change nothing but the name.
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


#: params key holding KnOTS's per-task trim thresholds for ``trim_scope="global"`` (a list of T
#: floats, task order). Reserved: the delta-space setup fills it (:func:`delta_params`) from a
#: pre-pass over every module of the adapter; a user's params may not carry it.
GLOBAL_THRESHOLDS = "_knots_thresholds"


def _ties_x_torch(X, sparsify, density, thr, keys, alpha):
    """The fused kernel's ``task_merge(None, X.unbind(0), 1, consensus="total")`` in batched torch
    (the fallback; the same numbers): trim keeps |x| >= thr_t (module scope: the exact
    ⌊density·numel⌋-th largest |x| of X_t, +inf when that is 0), DARE keeps the counter-based
    mask of keys[t]; γ = sign Σ_t x̂_t (+1 where 0) on the un-rescaled x̂; DARE's kept entries
    times 1/density; x̄ = α · Σ_t x̂_t [sign x̂_t = γ] / max(1, count). Sums run over t in order,
    as the kernel's do."""
    import torch

    from .. import rng

    T = X.shape[0]
    flat = X.reshape(T, -1)
    numel = flat.shape[1]
    zero = torch.zeros((), dtype=X.dtype, device=X.device)
    if sparsify == "trim":
        if thr is None:
            k = int(math.floor(density * numel))
            thr_t = (torch.stack([torch.kthvalue(flat[t].abs(), numel - k + 1).values for t in range(T)]) if k > 0
                     else torch.full((T,), math.inf, dtype=X.dtype, device=X.device))   # per row: 2x faster
        else:
            thr_t = torch.as_tensor([float(x) for x in thr], dtype=X.dtype, device=X.device)
        xh = torch.where(flat.abs() >= thr_t[:, None], flat, zero)
    elif density < 1.0:   # dare
        xh = torch.stack([torch.where(rng.keep_mask(int(keys[t]) & rng.MASK64, 0, numel, density, device=X.device),
                                      flat[t], zero) for t in range(T)])
    else:
        xh = flat
    s = xh[0].clone()
    for t in range(1, T):
        s += xh[t]
    gamma = torch.where(s >= 0, 1.0, -1.0).to(X.dtype)
    agree = torch.sign(xh) == gamma
    if sparsify == "dare" and density != 1.0:
        xh = xh * torch.tensor(1.0 / density, dtype=X.dtype).item()
    num = torch.where(agree[0], xh[0], zero)
    cnt = agree[0].to(X.dtype)
    for t in range(1, T):
        num += torch.where(agree[t], xh[t], zero)
        cnt += agree[t].to(X.dtype)
    return ((num / cnt.clamp_min(1.0)) * alpha).reshape(X.shape[1:])


def _ties_x(X, sparsify, density, thr, keys, alpha):
    """TIES (trim or DARE, total-sign election, disjoint mean, α) over the task axis of
    ``X [T, k, n]``: the compiled fused kernel (``ops.task_merge``) when the call routes to it,
    else :func:`_ties_x_torch` (``CKPTREG_BACKEND=python``; the same numbers)."""
    from .. import ops

    if ops._route(X.device, "task_merge") == "compiled":
        X = X.contiguous()
        return ops.task_merge(None, list(X.unbind(0)), [1.0] * X.shape[0], sparsify=sparsify, consensus="total",
                              density=density, thresholds=thr, keys=keys, lam=alpha)
    return _ties_x_torch(X, sparsify, density, thr, keys, alpha)


def _knots_x(X, method, params, name):
    """KnOTS's TIES step on the task blocks ``X [T, k, n]`` (float64) of one module: x̄ [k, n] (α
    applied). knots_ties trims each X_t to the top ``density`` fraction by the kernel's rule
    (keep |x| >= the ⌊density·N⌋-th largest |x|, so exact ties at the threshold are all kept;
    N = the entries of X_t with ``trim_scope`` module, of every module's X_t of that task with
    global: the thresholds come in ``params[GLOBAL_THRESHOLDS]``); knots_dare_ties keeps the
    counter-based DARE mask of ``rng.dare_key(seed, name, t)`` (element = flat index in X_t)."""
    from .. import rng

    p = params or {}
    density = float(p.get("density", 1.0))
    T = X.shape[0]
    _check_knots_scope(method, p)
    thr = keys = None
    if method == "knots_dare_ties":
        if name is None:
            raise ParameterError("knots_dare_ties needs the tensor name to key its masks")
        sparsify = "dare"
        keys = [rng.dare_key(int(p.get("seed", 0)), name, t) for t in range(T)]
    else:
        sparsify = "trim"
        if p.get("trim_scope", "module") == "global":
            thr = p.get(GLOBAL_THRESHOLDS)
            if thr is None:
                raise ParameterError("knots_ties --trim-scope global trims with thresholds over every module of "
                                     "the adapter, computed by the delta-space merge before its first module "
                                     f"(params[{GLOBAL_THRESHOLDS!r}], one per task); this call has none")
            thr = [float(x) for x in thr]
            if len(thr) != T:
                raise ParameterError(f"{len(thr)} global trim thresholds for {T} tasks")
    return _ties_x(X, sparsify, density, thr, keys, _scale(p))


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
    X = torch.where((taus.reshape(T, -1) == 0).all(-1)[:, None, None], 0.0, X)   # τ_t = 0: X_t = 0 exactly
    return (U[:, :k] @ _knots_x(X, method, params, name)).to(dt)


# ------------------------------------------------------------------------------------------------
# LoRA delta space (delta_fn): exact in the span of the stacked factors


def _fs_check(fs, weights):
    """(m, n, w) of factors ``fs = [(A_t, B_t, s_t)]``: every A_t ``[r_t, n]`` and B_t ``[m, r_t]``,
    or all with one leading layer dimension L (``[L, r_t, n]`` / ``[L, m, r_t]``, the same L)."""
    if not fs:
        raise ParameterError("a delta-space merge needs at least one adapter")
    nd = fs[0][0].dim()
    m, n = fs[0][1].shape[-2], fs[0][0].shape[-1]
    lead = tuple(fs[0][0].shape[:-2])
    for i, (a, b, _) in enumerate(fs):
        if (nd not in (2, 3) or a.dim() != nd or b.dim() != nd or tuple(a.shape[:-2]) != lead
                or tuple(b.shape[:-2]) != lead or b.shape[-2] != m or a.shape[-1] != n or b.shape[-1] != a.shape[-2]):
            raise MismatchError(f"adapter {i}: lora_B {tuple(b.shape)} / lora_A {tuple(a.shape)} do not give a "
                                f"{m}x{n} update" + (f" on {lead[0]} layers" if len(lead) == 1 else ""))
    w = [1.0] * len(fs) if weights is None else [float(x) for x in weights]
    if len(w) != len(fs):
        raise ParameterError(f"{len(w)} weights for {len(fs)} adapters")
    return int(m), int(n), w


def _layered(fs):
    """(fs with a leading layer dim, L, squeeze): 2-D factors get L = 1 (squeezed on return)."""
    if fs[0][0].dim() == 3:
        return fs, int(fs[0][0].shape[0]), False
    return [(a.unsqueeze(0), b.unsqueeze(0), s) for a, b, s in fs], 1, True


def _out(parts, L, m, n, r, fs, squeeze):
    """The ``[L, m, r]`` / ``[L, r, n]`` result from ``parts = [(layer indices, B [Lg, m, r] or None
    (zeros), A)]`` (one entry per sub-group of layers; squeezed back for 2-D inputs)."""
    import torch

    got = [p for p in parts if p[1] is not None]
    if len(parts) == 1 and got:
        B, A = got[0][1], got[0][2]
    else:
        dt = got[0][1].dtype if got else _wdt(*(t for f in fs for t in f[:2]))
        dev = fs[0][0].device
        B = torch.zeros((L, m, r), dtype=dt, device=dev)
        A = torch.zeros((L, r, n), dtype=dt, device=dev)
        for rows, b, a in got:
            idx = torch.as_tensor(rows, device=dev)
            B[idx], A[idx] = b, a
    return (B[0], A[0]) if squeeze else (B, A)


def _by_count(counts):
    """Layer indices grouped by an integer per layer (``counts [L]``), in first-seen order: the
    sub-groups that share a rank-dependent size and so run their remaining steps batched."""
    groups: dict = {}
    for layer, c in enumerate(counts.tolist()):
        groups.setdefault(int(c), []).append(layer)
    return list(groups.items())


def _kept(X, mask, rows, dim=-1):
    """The entries of ``X [L, ..]`` along ``dim`` where ``mask [L, C]`` is True, for the layers
    ``rows`` (each keeps the same number K; the kept order is the original one): ``[Lg, .., K, ..]``."""
    import torch

    whole = len(rows) == X.shape[0]   # rows are ascending: all layers, in order
    sub = mask if whole else mask[rows]
    Xr = X if whole else X[rows]
    if bool(sub.all()):
        return Xr
    K = int(sub[0].sum())
    idx = torch.sort((~sub).to(torch.int8), dim=-1, stable=True).indices[:, :K]   # kept first, in order
    d = dim % Xr.dim()
    shape = [1] * Xr.dim()
    shape[0], shape[d] = len(rows), K
    idx = idx.reshape(shape).expand(*[Xr.shape[i] if i != d else K for i in range(Xr.dim())])
    return torch.gather(Xr, d, idx)


def _task_svds(fs, w):
    """Exact thin SVD of each τ_t = w_t s_t B_t A_t on every layer (factored; one batched call for
    the tasks of the same rank and all L layers). ``fs``: 3-D factors [L, ..]. Returns
    [(U_t [L, m, r], S_t [L, r], Vh_t [L, r, n])] in task order."""
    import torch

    from .. import lowrank

    groups: dict = {}
    for t, (a, b, sc) in enumerate(fs):
        groups.setdefault(int(a.shape[-2]), []).append(t)
    L = int(fs[0][0].shape[0])
    out = [None] * len(fs)
    for r, ts in groups.items():
        B = torch.stack([fs[t][1] for t in ts]).flatten(0, 1)   # [g·L, m, r]
        A = torch.stack([fs[t][0] for t in ts]).flatten(0, 1)
        diag = torch.tensor([[w[t] * float(fs[t][2])] * r for t in ts for _ in range(L)], dtype=torch.float64)
        U, S, Vh = lowrank.factored_svd(B, diag, A)
        U, S, Vh = (x.unflatten(0, (len(ts), L)) for x in (U, S, Vh))
        for i, t in enumerate(ts):
            out[t] = (U[i], S[i], Vh[i])
    return out


def _from_svd(U, S, Vh, alpha, r_out, r_nat):
    """Adapter factors (B, A) with B @ A = α U diag(S) Vh (batched over leading dims): sorted by S
    (stable: equal values keep their order), truncated to ``r_out`` (None: kept), zero-padded to
    ``r_out`` or ``r_nat``."""
    import torch

    from .. import lowrank

    order = torch.argsort(S, dim=-1, descending=True, stable=True)
    U = torch.gather(U, -1, order.unsqueeze(-2).expand(U.shape))
    Vh = torch.gather(Vh, -2, order.unsqueeze(-1).expand(Vh.shape))
    S = torch.gather(S, -1, order)
    r = r_out if r_out is not None else max(int(r_nat), 1)
    a = float(alpha)
    return lowrank.split_factors(U, S * abs(a), Vh, r, -1.0 if a < 0 else 1.0)


def _natural(fs):
    return sum(int(a.shape[-2]) for a, _, _ in fs)


def _out_rank(fs, r_out):
    return r_out if r_out is not None else max(_natural(fs), 1)


def tsv_delta(fs, weights=None, params=None, r_out=None, name=None):
    """TSV-M on LoRA updates: per-task factored SVDs, k_t = min(⌊p/T⌋, rank τ_t), polar factors of
    U_cat (m × Σk) and V_cat (n × Σk) by thin SVDs; Δ = α U⊥ diag(s_cat) V⊥ᵀ is already an SVD
    (orthonormal U⊥, V⊥), so its truncation is the top r_out of s_cat. Factors 2-D, or 3-D with a
    leading layer dim (every step batched over the layers; the polar factors per sub-group of
    layers with the same Σk)."""
    import torch

    m, n, w = _fs_check(fs, weights)
    fs, L, squeeze = _layered(fs)
    T, p = len(fs), min(m, n)
    svds = _task_svds(fs, w)
    keep = torch.cat([torch.arange(S.shape[-1])[None, :] < torch.clamp(_ranks(S), max=p // T)[:, None]
                      for _, S, _ in svds], -1)                                         # [L, Σr]
    Ua = torch.cat([U for U, _, _ in svds], -1)
    Sa = torch.cat([S for _, S, _ in svds], -1)
    Va = torch.cat([Vh.mT for _, _, Vh in svds], -1)
    parts = []
    for cnt, rows in _by_count(keep.sum(-1)):
        if cnt == 0:
            parts.append((rows, None, None))
            continue
        Uc, sc, Vc = _kept(Ua, keep, rows), _kept(Sa, keep, rows), _kept(Va, keep, rows)
        B, A = _from_svd(_polar(Uc), sc, _polar(Vc).mT, _scale(params), r_out, _natural(fs))
        parts.append((rows, B, A))
    return _out(parts, L, m, n, _out_rank(fs, r_out), fs, squeeze)


def _zeros(fs, r_out):
    a0, b0, _ = fs[0]
    r = r_out if r_out is not None else _natural(fs)
    dt = _wdt(*(t for f in fs for t in f[:2]))
    return (b0.new_zeros(tuple(b0.shape[:-1]) + (r,), dtype=dt),
            a0.new_zeros(tuple(a0.shape[:-2]) + (r, a0.shape[-1]), dtype=dt))


def _stacked(fs, coeffs):
    import torch

    dt = _wdt(*(t for f in fs for t in f[:2]))
    B = torch.cat([b.to(dt) for _, b, _ in fs], -1)
    A = torch.cat([a.to(dt) for a, _, _ in fs], -2)
    diag = torch.cat([torch.full((int(a.shape[-2]),), float(c), dtype=torch.float64)
                      for (a, _, _), c in zip(fs, coeffs)])
    return B, A, diag


def iso_c_delta(fs, weights=None, params=None, r_out=None, name=None):
    """Iso-C on LoRA updates: the factored SVD of Σ_t τ_t; Δ = α σ̄ U_R V_Rᵀ. Factors 2-D, or 3-D
    with a leading layer dim (one batched factored SVD; the rest per sub-group of equal R)."""
    import torch

    from .. import lowrank

    m, n, w = _fs_check(fs, weights)
    fs, L, squeeze = _layered(fs)
    B, A, diag = _stacked(fs, [wt * float(sc) for wt, (_, _, sc) in zip(w, fs)])
    U, S, Vh = lowrank.factored_svd(B, diag, A)
    parts = []
    for R, rows in _by_count(_ranks(S)):
        if R == 0:
            parts.append((rows, None, None))
            continue
        idx = torch.as_tensor(rows)
        sbar = S[idx, :R].mean(dim=-1, keepdim=True)
        Bg, Ag = _from_svd(U[idx, :, :R], sbar.expand(len(rows), R).contiguous(), Vh[idx, :R], _scale(params),
                           r_out, _natural(fs))
        parts.append((rows, Bg, Ag))
    return _out(parts, L, m, n, _out_rank(fs, r_out), fs, squeeze)


def star_delta(fs, weights=None, params=None, r_out=None, name=None):
    """STAR on LoRA updates: per-task factored SVDs, each truncated and rescaled (σ'), then the
    factored SVD of (λ/T) Σ_t τ̂_t (the τ̂_t stacked as factors). Factors 2-D, or 3-D with a
    leading layer dim (the per-task SVDs and truncations batched over the layers; the last
    factored SVD per sub-group of layers with the same total kept rank Σk)."""
    import torch

    from .. import lowrank

    m, n, w = _fs_check(fs, weights)
    fs, L, squeeze = _layered(fs)
    T = len(fs)
    eta = float((params or {}).get("eta", 40.0))
    svds = _task_svds(fs, w)
    sps = [_star_sigma(S, eta).to(torch.float64) for _, S, _ in svds]
    keep = torch.cat([sp > 0 for sp in sps], -1)                                # [L, Σr]
    Ua = torch.cat([U for U, _, _ in svds], -1)
    Va = torch.cat([Vh for _, _, Vh in svds], -2)
    da = torch.cat(sps, -1)
    parts = []
    for cnt, rows in _by_count(keep.sum(-1)):
        if cnt == 0:
            parts.append((rows, None, None))
            continue
        U, S, Vh = lowrank.factored_svd(_kept(Ua, keep, rows), _kept(da, keep, rows), _kept(Va, keep, rows, dim=-2))
        Bg, Ag = _from_svd(U, S, Vh, _scale(params, "lam") / T, r_out, _natural(fs))
        parts.append((rows, Bg, Ag))
    return _out(parts, L, m, n, _out_rank(fs, r_out), fs, squeeze)


def _knots_core(fs, w):
    """The joint SVD of W = [τ_1 … τ_T] (τ_t = w_t s_t B_t A_t) in factored form, float64,
    batched over the leading layer dim of 3-D factors: (Q_B [L, m, R'], u [L, R', R''],
    S [L, R''], vh [L, R'', Σr'], qs, k [L]) with k = #σ > σ_1·1e-6 per layer and qs the task
    blocks (column offset, r'_t, Q_t [L, n, r'_t]). B_cat = Q_B R_B and A_tᵀ = Q_t R_t give
    W = Q_B · K · blockdiag(Q_t)ᵀ with the Σr×Σr core K = R_B · blockdiag(c_t R_tᵀ), so
    U = Q_B u and V_tᵀ = (vᵀ)_block t Q_tᵀ."""
    import torch

    # float64 throughout (METHODS.md: KnOTS's SVD in float64): TIES's trim and sign election are
    # discontinuous, so float32 rounding of the X_t flips entries (measured 2e-4 relative at 1024²)
    dt = torch.float64
    B = torch.cat([b.to(dt) for _, b, _ in fs], -1)
    qb, rb = torch.linalg.qr(B, mode="reduced")
    R = B.shape[-1]
    L = B.shape[0]
    blocks, qs, off = torch.zeros((L, R, R), dtype=dt), [], 0
    for (a, _, sc), wt in zip(fs, w):
        r = int(a.shape[-2])
        q, rt = torch.linalg.qr(a.to(dt).mT, mode="reduced")    # A_tᵀ = Q_t R_t, q [L, n, r']
        rr = q.shape[-1]
        blocks[:, off:off + r, off:off + rr] = (wt * float(sc)) * rt.mT
        qs.append((off, rr, q))
        off += r
    # columns of K index the blocks of blockdiag(Q_t): r'_t = min(n, r_t) each (here off counts r_t)
    cols = torch.cat([torch.arange(o, o + rr) for o, rr, _ in qs])
    K = rb @ blocks[:, :, cols]
    u, S, vh = torch.linalg.svd(K, full_matrices=False)
    # a task that is exactly zero on a layer has V_t = 0 exactly: its block of vh is rounding noise
    # (about 1e-17), which TIES's trim would keep and count in the disjoint mean, so zero it
    for (o, rr, _), (a, b, sc), wt in zip(qs, fs, w):
        zero = (a.reshape(L, -1) == 0).all(-1) | (b.reshape(L, -1) == 0).all(-1) | (wt * float(sc) == 0)
        if bool(zero.any()):
            c0 = int((cols < o).sum())
            vh[zero, :, c0:c0 + rr] = 0
    return qb, u, S, vh, qs, _ranks(S)


def _knots_x_layer(core, layer, k, T, n):
    """X [T, k, n] (X_t = diag(σ) V_tᵀ, the k kept σ) of one layer of :func:`_knots_core`."""
    import torch

    _, _, S, vh, qs, _ = core
    X = torch.empty((T, k, n), dtype=torch.float64)
    c0 = 0
    for t, (o, rr, q) in enumerate(qs):
        torch.matmul(S[layer, :k, None] * vh[layer, :k, c0:c0 + rr], q[layer].mT, out=X[t])   # [k, n]
        c0 += rr
    return X


def _knots_blocks(fs, w):
    """(U [m, k], X [T, k, n]) of one module (2-D factors) from :func:`_knots_core`; (None, None)
    when k = 0. Deterministic: the delta-space pre-pass of ``trim_scope`` global recomputes the
    same X to select thresholds."""
    fs3, _, _ = _layered(fs)
    core = _knots_core(fs3, w)
    k = int(core[5][0])
    if k == 0:
        return None, None
    return core[0][0] @ core[1][0, :, :k], _knots_x_layer(core, 0, k, len(fs), int(fs[0][0].shape[-1]))


def _svd_wide(M):
    """Thin SVD of a wide ``M [.., k, n]`` (k ≤ n) through the QR of Mᵀ = Q R: M = Rᵀ Qᵀ, so
    SVD(Rᵀ) = u s vh gives M = u s (vh Qᵀ) (a k×k SVD instead of LAPACK's slower wide one)."""
    import torch

    if M.shape[-2] > M.shape[-1]:
        return torch.linalg.svd(M, full_matrices=False)
    q, r = torch.linalg.qr(M.mT, mode="reduced")
    u, s, vh = torch.linalg.svd(r.mT, full_matrices=False)
    return u, s, vh @ q.mT


def _layer_names(name, L):
    if isinstance(name, (list, tuple)):
        if len(name) != L:
            raise ParameterError(f"{len(name)} module names for {L} layers")
        return list(name)
    return [name] * L if L == 1 or name is None else None


def knots_delta(fs, weights=None, params=None, r_out=None, name=None, *, method="knots_ties"):
    """KnOTS on LoRA updates: the joint SVD of W = [τ_1 … τ_T] in factored form
    (:func:`_knots_core`); TIES (or DARE-TIES) on X_t = diag(σ) V_tᵀ (k × n, :func:`_knots_x`:
    the fused kernel); Δ = U (α x̄), written back by the SVD of the k × n x̄ (U has orthonormal
    columns). Factors 2-D, or 3-D with a leading layer dim: the QRs and core SVD batched over the
    layers, the TIES step per layer (its trim and DARE masks are per module; ``name`` then is the
    list of the layers' names), the write-back per sub-group of layers with the same k."""
    import torch

    m, n, w = _fs_check(fs, weights)
    odt = _wdt(*(t for f in fs for t in f[:2]))
    fs, L, squeeze = _layered(fs)
    names = _layer_names(name, L)
    if names is None:   # one name for several layers: fine for the trim, not for DARE's per-module masks
        if method == "knots_dare_ties":
            raise ParameterError(f"knots_dare_ties on {L} layers needs their {L} module names (a list) to key "
                                 "each layer's masks, got one name")
        names = [name] * L
    T = len(fs)
    core = _knots_core(fs, w)
    parts = []
    for k, rows in _by_count(core[5]):
        if k == 0:
            parts.append((rows, None, None))
            continue
        xbar = torch.stack([_knots_x(_knots_x_layer(core, layer, k, T, n), method, params, names[layer])
                            for layer in rows])   # [Lg, k, n], α applied
        u2, s2, vh2 = _svd_wide(xbar)
        idx = torch.as_tensor(rows)
        U = core[0][idx] @ core[1][idx, :, :k]
        Bg, Ag = _from_svd((U @ u2).to(odt), s2.to(odt), vh2.to(odt), 1.0, r_out, _natural(fs))
        parts.append((rows, Bg, Ag))
    return _out(parts, L, m, n, _out_rank(fs, r_out), fs, squeeze)


# ------------------------------------------------------------------------------------------------
# KnOTS --trim-scope global: exact per-task thresholds over every module, bounded memory

#: radix-select digit widths (bits): the first pass histograms the top RADIX_FIRST bits of |x|
#: (sign, exponent and 8 mantissa bits: bins of 1/256 of a binade), later passes RADIX_BITS more
#: (the last one what is left of the 64); a pass whose chosen prefix holds at most RADIX_COLLECT
#: entries of a task collects them instead of histogramming the next digit
RADIX_FIRST = 20
RADIX_BITS = 16
RADIX_COLLECT = 1 << 20
#: the most |x| samples :func:`global_thresholds` holds per task (its pass 1)
SAMPLE_MAX = 1 << 20


def global_thresholds(blocks, T: int, density: float) -> list[float]:
    """The exact ⌊density·N_t⌋-th largest |x| over the X_t of every module, for each task t
    (N_t = their total number of entries; +inf where ⌊density·N_t⌋ = 0), without holding them:
    ``blocks()`` returns a fresh iterator over the modules' ``X [T, k, n]`` (float64), called
    once per pass. Two passes as a rule: pass 1 counts N_t and keeps a systematic sample of |x|
    (every s-th entry, s doubled whenever the sample would exceed :data:`SAMPLE_MAX`), whose
    order statistics bracket the wanted one, [lo, hi] (a ±4σ binomial margin); pass 2 counts the
    entries above hi and collects those inside [lo, hi] (at most :data:`RADIX_COLLECT`), where
    the exact answer lies when count_above < k ≤ count_above + count_inside. A task whose bracket
    missed or held too many entries goes to the exact radix select (:func:`radix_thresholds`).
    Memory: one module's X, T samples of at most SAMPLE_MAX and T·RADIX_COLLECT candidates."""
    import torch

    N = [0] * T
    samples: list = [[] for _ in range(T)]
    stride, pos, held = 1, [0] * T, [0] * T
    for X in blocks():
        if X is None:
            continue
        if X.shape[0] != T:
            raise MismatchError(f"a module has {X.shape[0]} task blocks, expected {T}")
        a = X.abs().reshape(T, -1)
        for t in range(T):
            first = (-pos[t]) % stride
            samples[t].append(a[t, first::stride].clone())
            held[t] += samples[t][-1].numel()
            pos[t] += a.shape[1]
            N[t] += a.shape[1]
        while max(held) > SAMPLE_MAX:   # decimate: keep every other sampled entry (entries ≡ 0 mod 2s)
            for t in range(T):
                v = torch.cat(samples[t]) if samples[t] else torch.empty(0, dtype=torch.float64)
                samples[t] = [v[::2].clone()]
                held[t] = samples[t][0].numel()
            stride *= 2
    out: list = [None] * T
    lo, hi, kk = [0.0] * T, [math.inf] * T, [0] * T
    for t in range(T):
        kk[t] = int(math.floor(float(density) * N[t]))
        if kk[t] == 0:
            out[t] = math.inf
            continue
        v = torch.sort(torch.cat(samples[t]), descending=True).values
        S = v.numel()
        q = kk[t] / N[t]
        i, m = q * S, 4.0 * math.sqrt(S * q * (1.0 - q)) + 8.0
        hi_i, lo_i = int(math.floor(i - m)), int(math.ceil(i + m))
        hi[t] = float(v[hi_i]) if hi_i >= 0 else math.inf
        lo[t] = float(v[lo_i]) if lo_i < S else 0.0
    del samples
    if all(o is not None for o in out):
        return [float(o) for o in out]
    above, inside, full = [0] * T, [[] for _ in range(T)], [False] * T
    for X in blocks():
        if X is None:
            continue
        a = X.abs().reshape(T, -1)
        for t in range(T):
            if out[t] is not None:
                continue
            above[t] += int((a[t] > hi[t]).sum())
            if not full[t]:
                sel = a[t][(a[t] >= lo[t]) & (a[t] <= hi[t])]
                inside[t].append(sel)
                full[t] = sum(x.numel() for x in inside[t]) > RADIX_COLLECT
    missed = []
    for t in range(T):
        if out[t] is not None:
            continue
        n_in = sum(x.numel() for x in inside[t])
        if full[t] or not (above[t] < kk[t] <= above[t] + n_in):
            missed.append(t)
            continue
        v = torch.cat(inside[t])
        out[t] = float(torch.kthvalue(v, v.numel() - (kk[t] - above[t]) + 1).values)
    del inside
    if missed:
        for t, x in zip(missed, [radix_thresholds(blocks, T, density, missed)[t] for t in missed]):
            out[t] = x
    return [float(o) for o in out]


def radix_thresholds(blocks, T: int, density: float, tasks=None) -> list:
    """:func:`global_thresholds` by an exact radix select over the bit patterns of |x| (a
    non-negative float64 orders as its int64 bits), for the tasks in ``tasks`` (all when None;
    the others' entries are None): pass 1 histograms the top 20 bits (``bincount``) and picks
    the digit holding the k-th largest; each later pass either histograms the next 16 bits among
    the entries of the chosen prefix or, once at most :data:`RADIX_COLLECT` entries share it,
    collects them and takes the exact order statistic. 2 to 5 passes; memory: one module's X, T
    histograms of 2^20 counts, at most T·RADIX_COLLECT candidates."""
    import torch

    prefix = [0] * T        # value of the bits chosen so far
    plen = [0] * T          # how many leading bits are chosen
    kk = [0] * T            # rank (1-based, from the top) still wanted inside the prefix
    done: list = [None if tasks is None or t in tasks else False for t in range(T)]
    collect = [False] * T
    first = True
    N = [0] * T
    while any(d is None for d in done):
        width = [min(RADIX_FIRST if plen[t] == 0 else RADIX_BITS, 64 - plen[t]) for t in range(T)]
        hist = [None] * T
        cand: list = [[] for _ in range(T)]
        for X in blocks():
            if X is None:
                continue
            if X.shape[0] != T:
                raise MismatchError(f"a module has {X.shape[0]} task blocks, expected {T}")
            bits = X.abs().reshape(T, -1).view(torch.int64)
            for t in range(T):
                if done[t] is not None:
                    continue
                b = bits[t]
                if first:
                    N[t] += b.numel()
                elif plen[t]:
                    b = b[(b >> (64 - plen[t])) == prefix[t]]
                if collect[t]:
                    cand[t].append(b.clone())
                else:
                    nb = 1 << width[t]
                    h = torch.bincount((b >> (64 - plen[t] - width[t])) & (nb - 1), minlength=nb)
                    hist[t] = h if hist[t] is None else hist[t] + h
        for t in range(T):
            if done[t] is not None:
                continue
            if first:
                kk[t] = int(math.floor(float(density) * N[t]))
                if kk[t] == 0:
                    done[t] = math.inf
                    continue
            if collect[t]:
                v = torch.cat(cand[t]) if cand[t] else torch.empty(0, dtype=torch.int64)
                if v.numel() < kk[t]:   # pragma: no cover (the histogram counted them)
                    raise MismatchError("the task blocks changed between the passes of the global trim")
                bit = torch.kthvalue(v, v.numel() - kk[t] + 1).values
                done[t] = float(bit.reshape(1).view(torch.float64))
                continue
            h = hist[t] if hist[t] is not None else torch.zeros(1 << width[t], dtype=torch.int64)
            above = torch.flip(torch.cumsum(torch.flip(h, [0]), 0), [0])   # above[d] = #digits >= d
            d = int((above >= kk[t]).nonzero().max())
            kk[t] -= int(above[d] - h[d])
            prefix[t] = (prefix[t] << width[t]) | d
            plen[t] += width[t]
            if plen[t] == 64:
                done[t] = float(torch.tensor([prefix[t] - (1 << 64) if prefix[t] >= 1 << 63 else prefix[t]],
                                             dtype=torch.int64).view(torch.float64))
            elif int(h[d]) <= RADIX_COLLECT:
                collect[t] = True
        first = False
    return [float(x) if x is not False else None for x in done]


def delta_params(cache) -> dict:
    """The params a delta-space merge hands to ``delta_fn``: the method's own, plus for KnOTS-TIES
    with ``trim_scope`` global the per-task thresholds (:data:`GLOBAL_THRESHOLDS`) of a pre-pass
    over every module of the adapter (:func:`global_thresholds`; each pass recomputes the X_t of
    each module from its factors, exactly as the merge will), so each module trims with them.
    ``cache``: the :class:`~ckptreg.merge.delta.DeltaCache` (``method``, ``p``, ``coeffs``,
    ``module_factors()``)."""
    p = dict(cache.p or {})
    if cache.method != "knots_ties" or p.get("trim_scope", "module") != "global":
        return p
    T = len(cache.coeffs)
    w = [float(x) for x in cache.coeffs]

    def blocks():
        for _, fs in cache.module_factors():
            yield _knots_blocks(fs, w)[1]

    p[GLOBAL_THRESHOLDS] = global_thresholds(blocks, T, float(p.get("density", 1.0)))
    return p


# ------------------------------------------------------------------------------------------------
# registration


def _knots_dare_matrix(taus, weights=None, params=None, name=None):
    return knots_matrix(taus, weights, params, name, method="knots_dare_ties")


def _knots_dare_delta(fs, weights=None, params=None, r_out=None, name=None):
    return knots_delta(fs, weights, params, r_out, name, method="knots_dare_ties")


def _unused_fn(name, tensors, weights, params, odt):   # pragma: no cover (matrix_fn methods never call fn)
    raise ParameterError("low-rank methods run through matrix_fn")


def _check_knots_scope(method, p: dict) -> None:
    if method == "knots_dare_ties" and p.get("trim_scope", "module") != "module":
        raise ParameterError("knots_dare_ties has no magnitude trim (DARE keeps each entry at random with "
                             "probability density, the same mask whatever the scope), so --trim-scope global "
                             "would change nothing; leave --trim-scope at module (or use knots_ties)")


def _check_knots(p: dict) -> None:
    if GLOBAL_THRESHOLDS in p:
        raise ParameterError(f"{GLOBAL_THRESHOLDS} is reserved (the delta-space merge computes the global trim "
                             "thresholds itself); remove it from the parameters")
    _check_knots_scope("knots_ties", p)


def _check_knots_dare(p: dict) -> None:
    _check_knots(p)
    _check_knots_scope("knots_dare_ties", p)


ALPHA = ParamDef("alpha", "float", 1.0, "Scale α of the merged update (TSV-M, Iso-C/CTS, KnOTS).", finite=True,
                 sweepable=True, fragment="alpha")
LAM = ParamDef("lam", "float", 1.0, "Scale of the merged task vector (λ).", finite=True, sweepable=True,
               fragment="lam", cli="--lambda", aliases=("lambda",))
ETA = ParamDef("eta", "float", 40.0, "STAR: percent of each task's nuclear norm kept (η).", lo=0.0, hi=100.0,
               lo_open=True, sweepable=True, fragment="eta")
DENSITY = ParamDef("density", "float", None, "Fraction of each task vector kept, in (0, 1].", lo=0.0, hi=1.0,
                   lo_open=True, required=True, sweepable=True, fragment="d", name_default=0.5)
SEED = ParamDef("seed", "int", 0, "DARE mask seed.", fragment="seed")
TRIM_SCOPE = ParamDef("trim_scope", "choice", "module", "KnOTS trim scope: module (the top density fraction "
                      "of each X_t of one module) or global (of all modules' X_t of a task, as the official "
                      "code; knots_ties only). Named _trim_global.", choices=("module", "global"),
                      fragment="=trim_global")

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
              spaces=("delta",), matrix_fn=_knots_dare_matrix, delta_fn=_knots_dare_delta, check=_check_knots_dare,
              help="KnOTS-DARE-TIES: DARE then TIES on the joint-SVD task blocks (LoRA only).", **_COMMON),
)


def register():
    for d in METHODS_LOWRANK:
        register_method(d)

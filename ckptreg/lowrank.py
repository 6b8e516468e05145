"""Low-rank merging: exact factored SVD, delta-space LoRA merges, CART (METHODS.md "LoRA
adapters: two spaces" and "CART").

Shapes follow PEFT: ``lora_A.weight`` is ``[r, in]`` (here ``A_i``, ``[r_i, k]``),
``lora_B.weight`` is ``[out, r]`` (``B_i``, ``[d, r_i]``), and the update of adapter i is
``ΔW_i = s_i · B_i @ A_i`` (``[d, k]`` = ``[out, in]``) with ``s_i = lora_alpha / r`` (or
``lora_alpha / sqrt(r)`` for rsLoRA, see :func:`lora_scale`).

The delta-space trick: with ``B = [B_1 … B_n]`` (d×R, R = Σ r_i), ``A = [A_1; …; A_n]`` (R×k)
and thin QRs ``B = Q_B R_B``, ``Aᵀ = Q_A R_A``, every combination ``Σ c_i ΔW_i`` equals
``Q_B · K(c) · Q_Aᵀ`` with the small core ``K(c) = R_B · diag(c_i s_i 1_{r_i}) · R_Aᵀ``. Since
Q_B and Q_A have orthonormal columns, the SVD, the best rank-k approximation and every CART
step can be done on the R×R cores, exactly, in ``O((d + k) R²)``; no d×k matrix is formed.

Choices (documented; METHODS.md leaves them open):

- The thin QRs run in float32 (float64 for float64 inputs); the small R×R cores, their SVDs and
  every CART step on them run in float64 whatever the input dtype (O(R³), negligible). Results
  are returned in float32, or float64 for float64 inputs. Measured: singular values agree with a
  dense float64 SVD to ~1e-7 relative for float32 inputs.
- Writing a merged update back as an adapter: ``B_out = U_r · diag(sqrt(S_r / out_scale))``,
  ``A_out = diag(sqrt(S_r / out_scale)) · Vh_r`` (balanced split, equal column/row norms), so that
  ``out_scale · B_out @ A_out`` is the truncated update; pass the scaling of the adapter config
  you will write (``lora_alpha / r_out``) as ``out_scale``. When the requested rank exceeds the
  available rank (``min(d, k, R)``) the factors are padded with zeros (the product is unchanged).
- :func:`lora_delta_merge` keeps the inputs' rank by default (max r_i), so the merged adapter fits
  the same adapter config; :func:`cart_lowrank` returns the exact result by default (its rank is
  at most R = Σ r_i, since every LR_k(C_i) lives in the column space of B and row space of A).
- CART weights default to uniform (the paper). ``k = max(1, floor(ρ · min(d, k_dim)))`` uses the
  full matrix dimensions as in the paper/official code, and is then capped at the rank available.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .errors import MismatchError, ParameterError
from .methods import check_lam as _check_lam, finite_floats

__all__ = [
    "lora_scale",
    "cart_rank",
    "factored_svd",
    "lora_delta_merge",
    "lora_delta_merge_batched",
    "cart_lowrank",
    "cart_dense",
    "randomized_svd",
    "split_factors",
    "DEFAULT_RANK_RATIO",
]

DEFAULT_RANK_RATIO = 0.08
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- small helpers


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    try:
        a = float(alpha)
        rr = int(r)
    except (TypeError, ValueError):
        raise ParameterError(f"bad LoRA alpha/r: alpha={alpha!r}, r={r!r}") from None
    if rr < 1 or rr != r:
        raise ParameterError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not math.isfinite(a):
        raise ParameterError(f"lora_alpha must be finite, got {a!r}")
    return a / math.sqrt(rr) if use_rslora else a / rr


def cart_rank(rows: int, cols: int, rank_ratio: float = DEFAULT_RANK_RATIO) -> int:
    """CART's ``k = max(1, floor(ρ · min(rows, cols)))``."""
    rho = _check_ratio(rank_ratio)
    return max(1, int(math.floor(rho * min(int(rows), int(cols)))))


def _check_ratio(rank_ratio) -> float:
    try:
        rho = float(rank_ratio)
    except (TypeError, ValueError):
        raise ParameterError(f"rank_ratio must be a number in (0, 1], got {rank_ratio!r}") from None
    if not (0.0 < rho <= 1.0):
        raise ParameterError(f"rank_ratio must be in (0, 1], got {rho!r}")
    return rho


def _check_finite_list(vals, n: int, what: str) -> list[float]:
    return finite_floats(vals, n, what, items="adapters")


def _check_rank(rank, what="rank") -> int:
    try:
        r = int(rank)
    except (TypeError, ValueError):
        raise ParameterError(f"{what} must be a positive integer, got {rank!r}") from None
    if r < 1 or r != rank:
        raise ParameterError(f"{what} must be a positive integer, got {rank!r}")
    return r


def _out_dtype(*ts) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _check_adapters(Bs, As):
    Bs, As = list(Bs), list(As)
    if not Bs:
        raise ParameterError("need at least one adapter")
    if len(Bs) != len(As):
        raise ParameterError(f"{len(Bs)} B factors but {len(As)} A factors")
    lead = Bs[0].shape[:-2]
    d = Bs[0].shape[-2]
    k = As[0].shape[-1]
    for i, (b, a) in enumerate(zip(Bs, As)):
        for nm, t in (("B", b), ("A", a)):
            if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:
                raise ParameterError(f"adapter {i}: {nm} must be a floating tensor")
            if t.dim() < 2:
                raise MismatchError(f"adapter {i}: {nm} must be at least 2-D, got {tuple(t.shape)}")
        if b.shape[:-2] != lead or a.shape[:-2] != lead:
            raise MismatchError(f"adapter {i}: batch dims {tuple(b.shape[:-2])}/{tuple(a.shape[:-2])}, "
                                f"adapter 0 has {tuple(lead)}")
        if b.shape[-2] != d or a.shape[-1] != k:
            raise MismatchError(
                f"adapter {i}: update shape {(b.shape[-2], a.shape[-1])}, adapter 0 has {(d, k)}"
            )
        if b.shape[-1] != a.shape[-2]:
            raise MismatchError(
                f"adapter {i}: lora_B {tuple(b.shape)} [out, r] and lora_A {tuple(a.shape)} [r, in] "
                "disagree on r"
            )
    return Bs, As, int(d), int(k)


# --------------------------------------------------------------------------- factored SVD


def factored_svd(B: torch.Tensor, core: torch.Tensor | None, A: torch.Tensor, rank: int | None = None):
    """Exact thin SVD of ``B @ core @ A`` without forming it (batched over leading dims).

    ``B [..., d, R]``, ``core [..., R, R]`` (or a ``[..., R]`` diagonal, or None for identity),
    ``A [..., R, k]``. Thin QR ``B = Q_B R_B``, ``Aᵀ = Q_A R_A``, SVD of the small
    ``R_B core R_Aᵀ = u S vh``, then ``U = Q_B u``, ``Vh = vh Q_Aᵀ``. Returns ``U [..., d, r]``,
    ``S [..., r]`` (descending), ``Vh [..., r, k]`` with ``r = min(d, k, R)``, or ``rank`` if
    smaller. Cost ``O((d + k) R²)``; QR in float32 (float64 in: float64), the small SVD in
    float64; returned as float32 (float64 in: float64 out)."""
    odt = _out_dtype(B, A, *(t for t in (core,) if t is not None))
    qb, qa, small = _cores(B, core, A)
    return _svd_from_core(qb, small, qa, rank, odt)


def _thin_qrs(B, A):
    """Thin QRs ``B = Q_B R_B``, ``Aᵀ = Q_A R_A`` in float64, the R factors used as they are for
    the R×R steps. The one torch route of the factored SVD (the other is
    ``ckptreg.ops.factored_svd_batched``: compiled kernel, or its Gram/eigh fallback). Float64
    because a float32 QR puts the merged update ~1e-5 off the float64 truncation when the rank
    cut is nearly degenerate (σ_r/σ_{r+1} ≈ 1.001: bench/bench_lowrank.py), outside METHODS.md's
    1e-5; the QRs are O((d + k) R²) on d×R matrices, milliseconds either way."""
    qb, rb = torch.linalg.qr(B.to(torch.float64), mode="reduced")
    qa, ra = torch.linalg.qr(A.to(torch.float64).mT, mode="reduced")
    return qb, rb, qa, ra


def _cores(B, core, A):
    if B.shape[-1] != A.shape[-2]:
        raise MismatchError(f"B {tuple(B.shape)} and A {tuple(A.shape)} disagree on the inner dimension")
    qb, rb, qa, ra = _thin_qrs(B, A)
    if core is None:
        small = rb @ ra.mT
    else:
        c = core.to(torch.float64)
        R = B.shape[-1]
        if c.dim() == B.dim():  # full [.., R, R]
            if tuple(c.shape[-2:]) != (R, R):
                raise MismatchError(f"core {tuple(core.shape)} must be [..., {R}, {R}]")
            small = rb @ c @ ra.mT
        else:  # diagonal [.., R]
            if c.shape[-1] != R:
                raise MismatchError(f"diagonal core {tuple(core.shape)} must be [..., {R}]")
            small = (rb * c.unsqueeze(-2)) @ ra.mT
    return qb, qa, small


def _svd_from_core(qb, small, qa, rank, odt):
    u, s, vh = torch.linalg.svd(small, full_matrices=False)
    if rank is not None:
        r = _check_rank(rank)
        if r < s.shape[-1]:
            u, s, vh = u[..., :r], s[..., :r], vh[..., :r, :]
    U = qb @ u.to(qb.dtype)
    Vh = vh.to(qa.dtype) @ qa.mT
    return U.to(odt), s.to(odt), Vh.to(odt)


def split_factors(U, S, Vh, rank: int | None = None, out_scale: float = 1.0):
    """Adapter factors from SVD triplets: ``B = U diag(sqrt(S/out_scale))``,
    ``A = diag(sqrt(S/out_scale)) Vh``, so ``out_scale · B @ A = U diag(S) Vh``. ``rank`` larger
    than ``S.shape[-1]`` pads with zero columns/rows; smaller truncates."""
    sc = float(out_scale)
    if not math.isfinite(sc) or sc == 0.0:
        raise ParameterError(f"out_scale must be finite and non-zero, got {out_scale!r}")
    r_have = S.shape[-1]
    r = r_have if rank is None else _check_rank(rank)
    if r < r_have:
        U, S, Vh = U[..., :r], S[..., :r], Vh[..., :r, :]
    # a negative out_scale flips the sign of A
    root = torch.sqrt(S / abs(sc))
    B = U * root.unsqueeze(-2)
    A = root.unsqueeze(-1) * Vh * (1.0 if sc > 0 else -1.0)
    if r > r_have:
        pad = r - r_have
        B = torch.cat([B, B.new_zeros(B.shape[:-1] + (pad,))], dim=-1)
        A = torch.cat([A, A.new_zeros(A.shape[:-2] + (pad, A.shape[-1]))], dim=-2)
    return B.contiguous(), A.contiguous()


def _stack(Bs, As, scales, coeffs):
    dt = _out_dtype(*Bs, *As)
    B = torch.cat([b.to(dt) for b in Bs], dim=-1)
    A = torch.cat([a.to(dt) for a in As], dim=-2)
    diag = torch.cat(
        [torch.full((b.shape[-1],), c * s, dtype=torch.float64, device=b.device)
         for b, s, c in zip(Bs, scales, coeffs)]
    )
    return B, A, diag


def lora_delta_merge(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], scales, coeffs,
                     rank: int | None = None, *, out_scale: float = 1.0, use_ops: bool | None = False):
    """Merge LoRA adapters in delta space: the best rank-``rank`` approximation of
    ``Σ_i c_i s_i B_i A_i``, returned as adapter factors ``(B_out [..., d, rank], A_out [..., rank, k])``
    with ``out_scale · B_out @ A_out`` equal to it (see :func:`split_factors`).

    ``Bs[i]`` is lora_B ``[..., d, r_i]``, ``As[i]`` lora_A ``[..., r_i, k]`` (leading dims batch
    same-shape layers), ``scales[i] = s_i`` (:func:`lora_scale`), ``coeffs[i] = c_i`` (merge weights).
    ``rank`` defaults to the inputs' rank (max r_i). ``use_ops``: route the SVD through
    ``ckptreg.ops.factored_svd_batched`` (None: when available and inputs are 3-D)."""
    Bs, As, d, k = _check_adapters(Bs, As)
    n = len(Bs)
    scales = _check_finite_list(scales, n, "scales")
    coeffs = _check_finite_list(coeffs, n, "coefficients")
    r_out = max(b.shape[-1] for b in Bs) if rank is None else _check_rank(rank)
    odt = _out_dtype(*Bs, *As)
    B, A, diag = _stack(Bs, As, scales, coeffs)
    fn = _ops_fsvd() if (use_ops or (use_ops is None and B.dim() == 3)) else None
    if use_ops and fn is None:
        raise ParameterError("use_ops=True but ckptreg.ops.factored_svd_batched is not available")
    if fn is not None and B.dim() == 3:
        core = torch.diag_embed(diag.to(B.dtype)).expand(B.shape[0], -1, -1).contiguous()
        U, S, Vh = fn(B, core, A, None)
        U, S, Vh = U.to(odt), S.to(odt), Vh.to(odt)
    else:
        U, S, Vh = factored_svd(B, diag, A)
        U, S, Vh = U.to(odt), S.to(odt), Vh.to(odt)
    return split_factors(U, S, Vh, r_out, out_scale)


def lora_delta_merge_batched(Bs, As, scales, coeffs, rank: int | None = None, *, out_scale: float = 1.0):
    """:func:`lora_delta_merge` over L same-shape layers at once: ``Bs[i] [L, d, r]``,
    ``As[i] [L, r, k]``; uses ``ckptreg.ops.factored_svd_batched`` when it exists, else the
    batched torch implementation. Returns ``(B_out [L, d, rank], A_out [L, rank, k])``."""
    Bs, As = list(Bs), list(As)
    if not Bs or Bs[0].dim() != 3:
        raise MismatchError("lora_delta_merge_batched needs 3-D factors [L, d, r] / [L, r, k]")
    return lora_delta_merge(Bs, As, scales, coeffs, rank, out_scale=out_scale, use_ops=None)


def _ops_fsvd():
    try:
        from . import ops
    except ImportError:
        return None
    return getattr(ops, "factored_svd_batched", None)


# --------------------------------------------------------------------------- CART


def _lr_k(M: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(M, full_matrices=False)
    k = min(k, s.shape[-1])
    return (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]


def _default_weights(weights, n):
    if weights is None:
        return [1.0 / n] * n
    return _check_finite_list(weights, n, "weights")


def cart_lowrank(Bs, As, scales, weights=None, rank_ratio: float = DEFAULT_RANK_RATIO, lam: float = 1.0,
                 *, out_rank: int | None = None, out_scale: float = 1.0, dense: bool = False):
    """CART on LoRA updates, exact, in delta space.

    With ``ΔW_i = s_i B_i A_i``: ``avg = Σ w_i ΔW_i``, ``C_i = ΔW_i − avg`` (coefficients
    ``e_i − w``), ``LR_k`` the best rank-k approximation with ``k = max(1, floor(ρ·min(d, k_dim)))``,
    result update ``avg + λ Σ_i LR_k(C_i)`` (weights default to uniform 1/n). Every step runs on
    the R×R cores (R = Σ r_i); the result has rank ≤ R.

    Returns adapter factors ``(B_out, A_out)`` with ``out_scale · B_out @ A_out`` = the result
    truncated to ``out_rank`` (default: exact, rank R, padded with zeros where the update's
    available rank min(d, k, R) is smaller), or the dense ``[..., d, k]`` update with ``dense=True``.
    """
    Bs, As, d, kd = _check_adapters(Bs, As)
    n = len(Bs)
    scales = _check_finite_list(scales, n, "scales")
    w = _default_weights(weights, n)
    rho = _check_ratio(rank_ratio)
    lam = _check_lam(lam)
    odt = _out_dtype(*Bs, *As)
    k = cart_rank(d, kd, rho)
    B, A, _ = _stack(Bs, As, scales, [1.0] * n)
    qb, rb, qa, ra = _thin_qrs(B, A)
    ranks = [b.shape[-1] for b in Bs]
    svec = torch.cat([torch.full((r,), s, dtype=torch.float64, device=B.device) for r, s in zip(ranks, scales)])
    # coefficient matrix: row 0 = w (the average), row 1 + i = e_i - w (the centred update i)
    wv = torch.tensor(w, dtype=torch.float64, device=B.device)
    C = torch.cat([wv[None], torch.eye(n, dtype=torch.float64, device=B.device) - wv[None]], dim=0)
    Cexp = torch.repeat_interleave(C, torch.tensor(ranks, device=B.device), dim=1) * svec  # [n+1, R]
    # cores K(c) = R_B diag(c) R_Aᵀ for all n + 1 coefficient vectors at once: [..., n+1, mb, ma]
    rbx = rb.unsqueeze(-3) * Cexp.reshape((1,) * (rb.dim() - 2) + (n + 1, 1, -1))
    cores = rbx @ ra.mT.unsqueeze(-3)
    total = cores[..., 0, :, :] + lam * _lr_k(cores[..., 1:, :, :], k).sum(dim=-3)
    if dense:
        return (qb @ total.to(qb.dtype) @ qa.mT).to(odt)
    R = sum(ranks)
    return split_factors(*_svd_from_core(qb, total, qa, None, odt),
                         R if out_rank is None else _check_rank(out_rank, "out_rank"), out_scale)


def cart_dense(mats: Sequence[torch.Tensor], weights=None, rank_ratio: float = DEFAULT_RANK_RATIO,
               lam: float = 1.0, *, svd: str = "exact", oversample: int = 8, n_iter: int = 2, seed: int = 0,
               lowrank: bool | None = None) -> torch.Tensor:
    """CART on dense tensors (the reference for :func:`cart_lowrank`, and the dense-checkpoint
    path): ``θ_avg = Σ w_i θ_i``, ``C_i = θ_i − θ_avg``, ``θ = θ_avg + λ Σ_i LR_k(C_i)`` for 2-D
    tensors (``lowrank=None``: only when ndim == 2); other tensors return ``θ_avg``.
    ``svd="exact"`` uses ``torch.linalg.svd``; ``"randomized"`` uses :func:`randomized_svd`.
    Computed in float32 (float64 for float64 inputs) and returned in that dtype."""
    mats = list(mats)
    if not mats:
        raise ParameterError("CART needs at least one tensor")
    for i, m in enumerate(mats):
        if not isinstance(m, torch.Tensor) or m.dtype not in _FLOATS:
            raise ParameterError(f"input {i} must be a floating tensor")
        if m.shape != mats[0].shape:
            raise MismatchError(f"input {i} has shape {tuple(m.shape)}, input 0 has {tuple(mats[0].shape)}")
    n = len(mats)
    w = _default_weights(weights, n)
    rho = _check_ratio(rank_ratio)
    lam = _check_lam(lam)
    if svd not in ("exact", "randomized"):
        raise ParameterError(f"svd must be 'exact' or 'randomized', got {svd!r}")
    dt = _out_dtype(*mats)
    xs = [m.to(dt) for m in mats]
    avg = torch.zeros_like(xs[0])
    for x, wi in zip(xs, w):
        avg.add_(x, alpha=wi)
    if lowrank is None:
        lowrank = avg.dim() == 2
    if not lowrank:
        return avg
    if avg.dim() < 2:
        raise ParameterError(f"CART low-rank step needs a matrix, got shape {tuple(avg.shape)}")
    rows, cols = avg.shape[-2:]
    k = cart_rank(rows, cols, rho)
    acc = torch.zeros_like(avg)
    for x in xs:
        c = x - avg
        if svd == "exact":
            acc += _lr_k(c, k)
        else:
            U, S, Vh = randomized_svd(c, min(k, rows, cols), oversample=oversample, n_iter=n_iter, seed=seed)
            acc += (U * S.unsqueeze(-2)) @ Vh
    return avg + lam * acc


# --------------------------------------------------------------------------- randomized SVD


def randomized_svd(M: torch.Tensor, rank: int, oversample: int = 8, n_iter: int = 2, seed: int = 0):
    """Truncated SVD by randomized range finding (Halko, Martinsson & Tropp 2011), batched over
    leading dims: Gaussian test matrix of ``rank + oversample`` columns (from a CPU generator
    seeded with ``seed``, so the same seed gives the same sketch on every device), ``n_iter``
    power iterations with QR re-orthonormalisation, exact SVD of the small projection.
    Returns ``U [..., m, rank]``, ``S [..., rank]``, ``Vh [..., rank, n]`` in float32 (float64
    for float64 input)."""
    if not isinstance(M, torch.Tensor) or M.dtype not in _FLOATS or M.dim() < 2:
        raise ParameterError("randomized_svd needs a floating tensor with at least 2 dims")
    r = _check_rank(rank)
    m, n = M.shape[-2:]
    if r > min(m, n):
        raise ParameterError(f"rank {r} exceeds min(rows, cols) = {min(m, n)}")
    if int(oversample) < 0 or int(n_iter) < 0:
        raise ParameterError("oversample and n_iter must be >= 0")
    dt = _out_dtype(M)
    X = M.to(dt)
    ell = min(r + int(oversample), m, n)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(tuple(X.shape[:-2]) + (n, ell), generator=g, dtype=torch.float32).to(
        dtype=dt, device=X.device)
    Q, _ = torch.linalg.qr(X @ omega, mode="reduced")
    for _ in range(int(n_iter)):
        Z, _ = torch.linalg.qr(X.mT @ Q, mode="reduced")
        Q, _ = torch.linalg.qr(X @ Z, mode="reduced")
    small = Q.mT @ X
    u, s, vh = torch.linalg.svd(small, full_matrices=False)
    U = Q @ u[..., :r]
    return U, s[..., :r], vh[..., :r, :]

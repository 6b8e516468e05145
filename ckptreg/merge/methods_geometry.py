"""Geometry-based task-vector methods of METHODS.md ("Further task-vector methods (mergekit
semantics)"): ``model_stock`` (with ``--filter-wise``) and ``multislerp``.

Both are ``task_vector`` strategies of the method table: ``prepare`` streams the inputs and the
base once, chunk by chunk, and accumulates their Gram matrix in float64 (per row for
filter-wise model_stock); the coefficients follow from it, and ``fn`` writes each output chunk
as ``θ_0 + Σ_i c_i (θ_i − θ_0)`` (per-row ``c`` for filter-wise). Memory: one chunk per input
plus an N×N (or rows×N×N) float64 Gram matrix.

Spaces: stored tensors of dense checkpoints and LoRA A/B factors as stored (``factors``); LoRA
delta and core space go through ``delta.gram_coeffs`` (``delta_rule="gram"``: the same
coefficients from the updates' Gram matrix, exact in factored form).

LiNeS (``lines``, METHODS.md): both take the modifier through the per-tensor factor
``params[LINES_KEY]`` = λ(ℓ) (``MethodDef.lines = "scale"``): model_stock writes
θ_0 + λ(ℓ)·t·mean τ_i, multislerp θ_0 + λ(ℓ)·Σ c_i τ_i (its coefficients scaled). multislerp
without a base has no task vector to scale: ``lines`` is refused there (run._prepare).

Deviations / choices where METHODS.md is silent (documented here and in the report):

- model_stock ``--filter-wise`` on tensors of more than two dimensions: a "row" is a vector
  along the last dimension (mergekit's ``cosine_similarity(dim=-1)``); 1-D tensors are one row.
- multislerp: ``μ = normalise(Σ w_i u_i)`` is undefined when the weighted unit vectors cancel
  (‖Σ w_i u_i‖ < 1e-8): a ParameterError naming the tensor, except when every input vector is
  zero (a tensor no input changed from the base): then the result is the base (r · 0).
- multislerp's base is optional (``MethodDef.base_optional``): with one it works on
  τ_i = θ_i − θ_0 and adds the base back, without one on the θ_i themselves (METHODS.md "on τ_i
  when a base is given (else on θ_i)"): result r · Σ w_i ‖θ_i‖.
"""
from __future__ import annotations

import math

from ..errors import ParameterError
from .table import LINES_KEY, TASK_VECTOR, MethodDef, ParamDef

__all__ = ["MODEL_STOCK", "MULTISLERP", "model_stock_t", "multislerp_coeffs", "register"]

#: elements per chunk while the Gram matrix is accumulated
PREP_CHUNK = 1 << 18
#: model_stock: cosine denominator floor, t denominator bound (METHODS.md)
MS_COS_EPS = 1e-6
MS_DEN_EPS = 1e-8
#: multislerp: unit-vector epsilon and the ‖g‖ / ‖μ‖ thresholds (METHODS.md)
MSLERP_EPS = 1e-8


def _tau_chunks(name, sources, base_src, numel, chunk=PREP_CHUNK):
    """(start, stop, T[N, n] float64) over the tensor: τ_i = θ_i − θ_0 (θ_i without a base)."""
    import torch

    for s in range(0, numel, chunk):
        e = min(numel, s + chunk)
        T = torch.stack([src.chunk(name, s, e).to(torch.float64) for src in sources])
        if base_src is not None:
            T -= base_src.chunk(name, s, e).to(torch.float64)
        yield s, e, T


def _row_len(sources, name, numel) -> int:
    shape = tuple(sources[0].info.tensors[name].shape)
    return int(shape[-1]) if len(shape) >= 1 and shape[-1] > 0 else max(1, numel)


def model_stock_t(G, n: int):
    """t from Gram matrices ``G [..., N, N]`` (float64): cos_ij clamped to [−1, 1], c = mean over
    i<j, t = N c / (1 + (N − 1) c). Returns (t, denominator)."""
    import torch

    d = torch.sqrt(torch.clamp(torch.diagonal(G, dim1=-2, dim2=-1), min=0.0))
    cos = G / torch.clamp(d.unsqueeze(-1) * d.unsqueeze(-2), min=MS_COS_EPS)
    cos = torch.clamp(cos, -1.0, 1.0)
    iu = torch.triu_indices(n, n, offset=1)
    c = cos[..., iu[0], iu[1]].mean(dim=-1)
    den = 1.0 + (n - 1) * c
    return n * c / torch.where(den.abs() < MS_DEN_EPS, torch.ones_like(den), den), den


def model_stock_prepare(method, name, sources, base_src, numel, p):
    import torch

    n = len(sources)
    if n < 2:
        raise ParameterError(f"model_stock needs a base and at least 2 models, got {n} (tensor {name})")
    filter_wise = bool(p.get("filter_wise", False))
    if not filter_wise:
        G = torch.zeros((n, n), dtype=torch.float64)
        for _, _, T in _tau_chunks(name, sources, base_src, numel):
            G += T @ T.T
        t, den = model_stock_t(G, n)
        if abs(float(den)) < MS_DEN_EPS:
            raise ParameterError(f"model_stock: tensor {name}: 1 + (N-1)*c = {float(den):.3g} (mean cosine "
                                 f"{(float(den) - 1) / (n - 1):.6g} of {n} task vectors) is below 1e-8 in "
                                 "magnitude; t is undefined")
        return {"t": float(t), "row_len": None, "n": n}
    L = _row_len(sources, name, numel)
    rows = max(1, numel // L)
    G = torch.zeros((rows, n, n), dtype=torch.float64)
    # chunks of whole rows: each row's Gram matrix is one batched product
    for s, e, T in _tau_chunks(name, sources, base_src, numel, chunk=max(1, PREP_CHUNK // L) * L):
        R = T.view(n, (e - s) // L, L)
        G[s // L:e // L] += torch.einsum("ird,jrd->rij", R, R)
    t, den = model_stock_t(G, n)
    bad = (den.abs() < MS_DEN_EPS).nonzero().flatten()
    if bad.numel():
        r = int(bad[0])
        raise ParameterError(f"model_stock --filter-wise: tensor {name} row {r}: 1 + (N-1)*c = {float(den[r]):.3g} "
                             f"(mean cosine {(float(den[r]) - 1) / (n - 1):.6g} of {n} task vectors) is below "
                             "1e-8 in magnitude; t is undefined")
    return {"t": t, "row_len": L, "n": n}


def model_stock_chunk(method, base_chunk, chunks, w, p, ctx, offset, out_dtype, out):
    """θ = θ_0 + t · mean_i τ_i (= t · mean_i θ_i + (1 − t) θ_0), t per tensor or per row."""
    import torch

    b = base_chunk.to(torch.float64)
    mean_tau = torch.stack([x.to(torch.float64) for x in chunks]).mean(dim=0) - b
    if ctx["row_len"] is None:
        t = ctx["t"]
    else:
        idx = torch.arange(offset, offset + b.numel(), dtype=torch.int64) // ctx["row_len"]
        t = ctx["t"][idx]
    lam = p.get(LINES_KEY)   # LiNeS: λ(ℓ) scales the merged task vector t · mean τ_i
    if lam is not None:
        t = t * float(lam)
    out.copy_(b + t * mean_tau)
    return out


def multislerp_coeffs(G, w, name="tensor"):
    """Coefficients c (on the vectors x_i) of multislerp from their Gram matrix ``G`` (float64,
    N×N) and weights ``w``: result = Σ c_i x_i. METHODS.md: weights normalised; u_i = x_i/(‖x_i‖ +
    1e-8); μ = normalise(Σ w_i u_i); g = Σ w_i (u_i − ⟨u_i, μ⟩ μ); r = μ cos‖g‖ + g sin‖g‖/‖g‖
    (μ when ‖g‖ < 1e-8); result r · Σ w_i ‖x_i‖."""
    import torch

    w = torch.as_tensor(w, dtype=torch.float64)
    sw = float(w.sum())
    if not math.isfinite(sw) or abs(sw) < 1e-12:
        raise ParameterError(f"multislerp normalises the weights; their sum is {sw!r}")
    w = w / sw
    norms = torch.sqrt(torch.clamp(torch.diagonal(G), min=0.0))
    if float(norms.max()) == 0.0:
        return torch.zeros_like(w)
    inv = 1.0 / (norms + MSLERP_EPS)
    Gu = G * inv.unsqueeze(0) * inv.unsqueeze(1)          # Gram of the u_i

    def sq(a):
        return max(0.0, float(a @ Gu @ a))

    m = math.sqrt(sq(w))                                   # ‖Σ w_i u_i‖
    if m < MSLERP_EPS:
        raise ParameterError(f"multislerp: tensor {name}: the weighted unit vectors cancel "
                             f"(‖Σ w_i u_i‖ = {m:.3g} < 1e-8); their mean direction is undefined")
    mu = w / m                                             # μ in the u basis
    dots = Gu @ mu                                         # ⟨u_i, μ⟩
    g = w - float(w @ dots) * mu                           # Σ w_i u_i − (Σ w_i ⟨u_i, μ⟩) μ
    gn = math.sqrt(sq(g))
    r = mu if gn < MSLERP_EPS else mu * math.cos(gn) + g * (math.sin(gn) / gn)
    scale = float(w @ norms)                               # Σ w_i ‖x_i‖
    return r * scale * inv


def multislerp_prepare(method, name, sources, base_src, numel, p):
    import torch

    n = len(sources)
    G = torch.zeros((n, n), dtype=torch.float64)
    for _, _, T in _tau_chunks(name, sources, base_src, numel):
        G += T @ T.T
    return {"G": G, "name": name}


def multislerp_chunk(method, base_chunk, chunks, w, p, ctx, offset, out_dtype, out):
    import torch

    c = ctx.get("c")
    if c is None:
        c = ctx["c"] = multislerp_coeffs(ctx["G"], [float(x) for x in w], ctx["name"])
    X = torch.stack([x.to(torch.float64) for x in chunks])
    if base_chunk is not None:
        b = base_chunk.to(torch.float64)
        lam = p.get(LINES_KEY)   # LiNeS: λ(ℓ) scales the coefficients of the τ_i
        out.copy_(b + (c if lam is None else c * float(lam)) @ (X - b))
    else:
        out.copy_(c @ X)
    return out


FILTER_WISE = ParamDef("filter_wise", "choice", False, "model_stock: compute t per row (last dimension; a 1-D "
                       "tensor is one row) instead of per tensor.", choices=(False, True), cli="--filter-wise",
                       flag_value=True, fragment="=fw")

MODEL_STOCK = MethodDef(
    "model_stock", fn=model_stock_chunk, prepare=model_stock_prepare, strategy=TASK_VECTOR, weight_rule="unused",
    params=(FILTER_WISE,), aliases=("modelstock",), spaces=("tensors", "factors", "delta", "core"), delta_rule="gram",
    fragment="model_stock", uses_base=True, lines="scale",
    help="Model Stock: θ_0 + t·mean τ_i, t from the task vectors' mean cosine (N ≥ 2; weights unused).")

MULTISLERP = MethodDef(
    "multislerp", fn=multislerp_chunk, prepare=multislerp_prepare, strategy=TASK_VECTOR, weight_rule="convex",
    aliases=("multi_slerp",), spaces=("tensors", "factors", "delta", "core"), delta_rule="gram",
    fragment="multislerp", uses_base=True,
    base_optional=True, lines="scale",
    help="Spherical weighted mean of the task vectors (mergekit multislerp), scaled by Σ w_i ‖τ_i‖; "
         "without a base, of the checkpoints themselves.")


def register():
    """Add both methods to the table (called from ``table._builtins``)."""
    from .table import register_method

    for d in (MODEL_STOCK, MULTISLERP):
        register_method(d)

"""Float64 reference implementations written straight from METHODS.md, for tests.

Deliberately simple and independent of ``ckptreg.methods`` / ``ckptreg.lowrank`` / ``ckptreg.ops``:
loops over inputs, top-k trims, per-element integer DARE masks (``rng.keep_scalar``), numpy SVD
for CART. Every function takes tensors of any float dtype and returns a float64 tensor.

Use them from any test module: ``from helpers_ref import ref_ties`` (tests/ is on sys.path via
pytest's rootdir-relative import) or ``from tests.helpers_ref import ...``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ckptreg import rng

__all__ = [
    "ref_mwa_weights",
    "ref_linear",
    "ref_task_arithmetic",
    "ref_trim",
    "ref_ties",
    "ref_dare",
    "ref_dare_mask",
    "ref_magnitude_prune",
    "ref_slerp",
    "ref_cart_dense",
    "ref_lora_delta",
    "ref_best_rank",
]


def _f64(t):
    return t.detach().to(torch.float64).cpu()


# ---------------------------------------------------------------------------------- weights


def ref_mwa_weights(values, steps, p, q, direction="min"):
    """phi_i = p^(q^pos_i) * g(v_i), pos = zero-based rank best->worst, ties: later step first."""
    n = len(values)
    steps = list(steps) if steps is not None else [0] * n
    better = (lambda a, b: a < b) if direction == "min" else (lambda a, b: a > b)
    pos = []
    for i in range(n):
        # count how many checkpoints rank strictly before i
        before = 0
        for j in range(n):
            if j == i:
                continue
            if better(values[j], values[i]):
                before += 1
            elif values[j] == values[i] and (steps[j] > steps[i] or (steps[j] == steps[i] and j < i)):
                before += 1
        pos.append(before)
    phi = []
    for v, k in zip(values, pos):
        g = 1.0 / v if direction == "min" else v
        phi.append(p ** (q ** k) * g)
    total = sum(phi)
    return [x / total for x in phi]


# ---------------------------------------------------------------------------------- per-tensor methods


def ref_linear(tensors, weights):
    out = torch.zeros_like(_f64(tensors[0]))
    for t, w in zip(tensors, weights):
        out = out + float(w) * _f64(t)
    return out


def ref_task_arithmetic(base, tensors, weights, lam=1.0):
    b = _f64(base)
    acc = torch.zeros_like(b)
    for t, w in zip(tensors, weights):
        acc = acc + float(w) * (_f64(t) - b)
    return b + lam * acc


def ref_trim(tau, density):
    """Keep entries with |tau| >= the k-th largest |tau| (k = floor(density*numel)); k=0: none."""
    tau = _f64(tau)
    k = int(math.floor(density * tau.numel()))
    if k == 0:
        return torch.zeros_like(tau)
    flat = tau.reshape(-1).abs()
    kth = torch.topk(flat, k).values[-1]
    return torch.where(tau.abs() >= kth, tau, torch.zeros_like(tau))


def _elect_mean(trimmed, weights, sign):
    n = len(trimmed)
    s = torch.zeros_like(trimmed[0])
    for t in trimmed:
        s = s + (t if sign == "total" else torch.sign(t))
    gamma = torch.ones_like(s)
    gamma[s < 0] = -1.0
    num = torch.zeros_like(s)
    cnt = torch.zeros_like(s)
    for i in range(n):
        agree = (torch.sign(trimmed[i]) == gamma).to(torch.float64)
        num = num + float(weights[i]) * trimmed[i] * agree
        cnt = cnt + agree
    return num / torch.clamp(cnt, min=1.0)


def ref_ties(base, tensors, weights, density, sign="total", lam=1.0):
    b = _f64(base)
    trimmed = [ref_trim(_f64(t) - b, density) for t in tensors]
    return b + lam * _elect_mean(trimmed, weights, sign)


def ref_dare_mask(seed, name, index, numel, density, offset=0):
    """Explicit per-element integer mask from the rng spec (slow: keep tensors small)."""
    key = rng.dare_key(seed, name, index)
    thr = int(density * (1 << 24))
    return torch.tensor([rng.keep_scalar(key, offset + j, thr) for j in range(numel)], dtype=torch.bool)


def ref_dare(base, tensors, weights, density, seed, name, lam=1.0, ties=False, sign="total", offset=0):
    b = _f64(base)
    dropped = []
    for i, t in enumerate(tensors):
        tau = (_f64(t) - b).reshape(-1)
        m = ref_dare_mask(seed, name, i, tau.numel(), density, offset)
        dropped.append(torch.where(m, tau / density, torch.zeros_like(tau)).reshape(b.shape))
    if ties:
        return b + lam * _elect_mean(dropped, weights, sign)
    acc = torch.zeros_like(b)
    for t, w in zip(dropped, weights):
        acc = acc + float(w) * t
    return b + lam * acc


def ref_magnitude_prune(base, tensors, weights, density, lam=1.0):
    b = _f64(base)
    acc = torch.zeros_like(b)
    for t, w in zip(tensors, weights):
        acc = acc + float(w) * ref_trim(_f64(t) - b, density)
    return b + lam * acc


def ref_slerp(t0, t1, t, dot_threshold=0.9995, eps=1e-8):
    """mergekit's slerp, in numpy float64."""
    v0c = _f64(t0).numpy().copy()
    v1c = _f64(t1).numpy().copy()
    v0 = v0c.copy()
    v1 = v1c.copy()
    n0 = np.linalg.norm(v0.reshape(-1))
    n1 = np.linalg.norm(v1.reshape(-1))
    if n0 > eps:
        v0 = v0 / n0
    if n1 > eps:
        v1 = v1 / n1
    dot = float(np.sum(v0 * v1))
    if abs(dot) > dot_threshold:
        return torch.from_numpy((1 - t) * v0c + t * v1c)
    theta_0 = np.arccos(dot)
    sin_theta_0 = np.sin(theta_0)
    theta_t = theta_0 * t
    s0 = np.sin(theta_0 - theta_t) / sin_theta_0
    s1 = np.sin(theta_t) / sin_theta_0
    return torch.from_numpy(s0 * v0c + s1 * v1c)


# ---------------------------------------------------------------------------------- low rank


def ref_best_rank(M, k):
    """Best rank-k approximation (numpy SVD, float64)."""
    a = _f64(M).numpy()
    u, s, vh = np.linalg.svd(a, full_matrices=False)
    k = min(k, len(s))
    return torch.from_numpy((u[:, :k] * s[:k]) @ vh[:k])


def ref_cart_dense(mats, weights=None, rank_ratio=0.08, lam=1.0):
    """theta_avg + lam * sum_i LR_k(theta_i - theta_avg), k = max(1, floor(rho*min(rows, cols)))."""
    n = len(mats)
    if weights is None:
        weights = [1.0 / n] * n
    xs = [_f64(m) for m in mats]
    avg = torch.zeros_like(xs[0])
    for x, w in zip(xs, weights):
        avg = avg + float(w) * x
    if avg.dim() != 2:
        return avg
    k = max(1, int(math.floor(rank_ratio * min(avg.shape))))
    acc = torch.zeros_like(avg)
    for x in xs:
        acc = acc + ref_best_rank(x - avg, k)
    return avg + lam * acc


def ref_lora_delta(Bs, As, scales, coeffs):
    """Dense sum_i c_i s_i B_i @ A_i (PEFT shapes: B [out, r], A [r, in])."""
    out = None
    for b, a, s, c in zip(Bs, As, scales, coeffs):
        term = float(c) * float(s) * (_f64(b) @ _f64(a))
        out = term if out is None else out + term
    return out

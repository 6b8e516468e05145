"""The SVD-family methods (issue #13; METHODS.md "Low-rank families"): tsv, iso_c, iso_cts, star,
knots_ties, knots_dare_ties, dense (batched matrix_fn) and on LoRA adapters in delta space
(exact factored delta_fn), against float64 references written here from METHODS.md with numpy
(loops over tasks, one SVD per matrix), never calling the code under test."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckptreg import engine, ops
from ckptreg.cli import main
from ckptreg.errors import ParameterError
from ckptreg.merge import methods_lowrank as ML
from ckptreg.registry import Registry
from helpers_engine import load_any
from helpers_files import write_peft_adapter
from helpers_ref import _elect_mean, ref_dare_mask, ref_trim

# ------------------------------------------------------------------------------------------------
# float64 references (METHODS.md "Low-rank families"), numpy SVDs, one matrix at a time


def _np(t):
    return t.detach().to(torch.float64).cpu().numpy()


def _svd(M):
    return np.linalg.svd(M, full_matrices=False)


def _rank(s):
    return int(np.sum(s > s[0] * 1e-6)) if s.size and s[0] > 0 else 0


def _polar(M):
    P, _, Qt = _svd(M)
    return P @ Qt


def ref_tsv(taus, alpha=1.0):
    taus = [_np(t) for t in taus]
    T = len(taus)
    m, n = taus[0].shape
    p = min(m, n)
    Us, ss, Vs = [], [], []
    for tau in taus:
        u, s, vt = _svd(tau)
        k = min(p // T, _rank(s))
        Us.append(u[:, :k])
        ss.append(s[:k])
        Vs.append(vt[:k].T)
    U, s, V = np.concatenate(Us, 1), np.concatenate(ss), np.concatenate(Vs, 1)
    return alpha * _polar(U) @ np.diag(s) @ _polar(V).T


def ref_iso_c(taus, alpha=1.0):
    ta = sum(_np(t) for t in taus)
    u, s, vt = _svd(ta)
    R = _rank(s)
    return alpha * s[:R].mean() * u[:, :R] @ vt[:R]


def ref_iso_cts_dims(p, T):
    kc = math.floor(p * 0.8)
    s_tot = round((p - kc) / T) * T   # Python's round: half to even
    kc = p - s_tot
    return kc, s_tot // T


def ref_iso_cts(taus, alpha=1.0):
    taus = [_np(t) for t in taus]
    T = len(taus)
    m, n = taus[0].shape
    p = min(m, n)
    kc, s = ref_iso_cts_dims(p, T)
    u, sv, vt = _svd(sum(taus))
    Uc, Sc, Vc = u[:, :kc], sv[:kc], vt[:kc].T
    Us, ss, Vs = [], [], []
    for tau in taus:
        ru, rs, rvt = _svd(tau - Uc @ Uc.T @ tau)
        Us.append(ru[:, :s])
        ss.append(rs[:s])
        Vs.append(rvt[:s].T)
    U = np.concatenate(Us + [Uc], 1)
    V = np.concatenate(Vs + [Vc], 1)
    sbar = np.concatenate(ss + [Sc]).mean()
    return alpha * sbar * _polar(U) @ _polar(V).T


def ref_star_k(s, eta):
    tot = s.sum()
    acc = 0.0
    for i, x in enumerate(s):
        acc += x
        if acc >= eta / 100.0 * tot:
            return i + 1
    return len(s)


def ref_star(taus, lam=1.0, eta=40.0):
    taus = [_np(t) for t in taus]
    out = 0.0
    for tau in taus:
        u, s, vt = _svd(tau)
        if s.sum() == 0:   # a zero task contributes nothing (τ̂_t = 0)
            continue
        k = ref_star_k(s, eta)
        sp = s[:k] * s.sum() / s[:k].sum()
        out = out + u[:, :k] @ np.diag(sp) @ vt[:k]
    return lam * out / len(taus)


def ref_knots(taus, density, alpha=1.0, dare=False, seed=0, name=""):
    taus = [_np(t) for t in taus]
    T = len(taus)
    m, n = taus[0].shape
    u, s, vt = _svd(np.concatenate(taus, 1))
    k = _rank(s)
    X = []
    for t in range(T):
        x = torch.from_numpy(np.diag(s[:k]) @ vt[:k, t * n:(t + 1) * n])
        if not taus[t].any():   # τ_t = 0: V_t = 0 exactly (the SVD's block is rounding noise)
            x = torch.zeros_like(x)
        if dare:
            mask = ref_dare_mask(seed, name, t, x.numel(), density).reshape(x.shape)
            X.append(torch.where(mask, x / density, torch.zeros_like(x)))
        else:
            X.append(ref_trim(x, density))
    xbar = _elect_mean(X, [1.0] * T, "total").numpy()
    return u[:, :k] @ (alpha * xbar)


def ref_best(M, r):
    u, s, vt = _svd(M)
    return (u[:, :r] * s[:r]) @ vt[:r]


def rel(got, ref) -> float:
    got = _np(got) if isinstance(got, torch.Tensor) else got
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-300))


# ------------------------------------------------------------------------------------------------
# inputs


def task_mats(T, m, n, kind, seed, dtype=torch.float64):
    """T task matrices with the given spectrum (random singular vectors): "flat" (σ from 1 down to
    0.7, nearly flat but with gaps) or "decaying" (σ_j = 0.9^j); task t scaled by (1 + t/4)."""
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    j = torch.arange(p, dtype=torch.float64)
    s = 1.0 - 0.3 * j / max(1, p - 1) if kind == "flat" else 0.9 ** j
    out = []
    for t in range(T):
        u, _ = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))
        out.append(((u * (s * (1 + t / 4))) @ v.T).to(dtype))
    return torch.stack(out)


DENSE = {"tsv": (ML.tsv_matrix, lambda ts, a: ref_tsv(ts, a), "alpha"),
         "iso_c": (ML.iso_c_matrix, lambda ts, a: ref_iso_c(ts, a), "alpha"),
         "iso_cts": (ML.iso_cts_matrix, lambda ts, a: ref_iso_cts(ts, a), "alpha"),
         "star": (ML.star_matrix, lambda ts, a: ref_star(ts, a), "lam")}
# (T, m, n): ⌊p/T⌋ = ⌊14/3⌋ = 4 (TSV); Iso-CTS p=14,T=3 -> (11, 1); p=10,T=4: (10-8)/4 = 0.5 rounds
# to 0 (half to even; half up would give 1) -> (10, 0); p=25,T=2: 2.5 -> 2 (half up: 3) -> (21, 2)
SHAPES = [(3, 20, 14), (4, 10, 12), (2, 30, 25)]


def test_iso_cts_dims_round_half_to_even():
    assert [ML.iso_cts_ranks(p, T) for p, T in ((14, 3), (10, 4), (25, 2), (15, 2))] == \
           [ref_iso_cts_dims(p, T) for p, T in ((14, 3), (10, 4), (25, 2), (15, 2))] == [(11, 1), (10, 0), (21, 2), (11, 2)]


@pytest.mark.parametrize("method", list(DENSE))
@pytest.mark.parametrize("kind", ["flat", "decaying"])
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_matrix_fn_vs_float64_reference(method, kind, shape):
    fn, ref, scale = DENSE[method]
    T, m, n = shape
    taus = task_mats(T, m, n, kind, seed=m * 7 + T + (kind == "flat"))
    want = ref(taus, 1.3)
    got64 = fn(taus, None, {scale: 1.3})
    assert got64.dtype == torch.float64 and rel(got64, want) < 1e-9, (method, kind, shape, rel(got64, want))
    got32 = fn(taus.float(), None, {scale: 1.3})   # float32 accumulation
    assert got32.dtype == torch.float32 and rel(got32, want) < 1e-4, (method, kind, shape, rel(got32, want))


@pytest.mark.parametrize("method", list(DENSE))
def test_dense_weights_multiply_task_vectors(method):
    fn, ref, scale = DENSE[method]
    taus = task_mats(3, 20, 14, "decaying", seed=5)
    w = [0.5, 1.0, 2.0]
    want = ref([t * x for t, x in zip(taus, w)], 1.0)
    assert rel(fn(taus, w, {}), want) < 1e-9


@pytest.mark.parametrize("method", list(DENSE))
def test_batched_matrix_fn_equals_per_matrix_loop(method):
    fn = DENSE[method][0]
    taus = task_mats(4, 32, 24, "decaying", seed=9, dtype=torch.float32)
    a = fn(taus, None, {}, batched=True)
    b = fn(taus, None, {}, batched=False)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_star_worked_example(dtype):
    """METHODS.md: σ = [4, 3, 2, 1], η = 40 -> k = 1, σ' = [10] (rotated by random orthogonal
    factors, so the SVD's rounding is in play)."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 4, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 4, generator=g, dtype=torch.float64))
    tau = (u * torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ v.T
    assert int(ML.star_rank(torch.linalg.svdvals(tau.to(dtype)), 40.0)) == 1
    got = ML.star_matrix(tau.to(dtype)[None], None, {"eta": 40.0})
    want = 10.0 * torch.outer(u[:, 0], v[:, 0])
    assert rel(got, _np(want)) < (1e-12 if dtype == torch.float64 else 1e-6)
    assert ref_star_k(np.array([4.0, 3.0, 2.0, 1.0]), 40) == 1


def test_knots_dense_form_vs_reference():
    taus = task_mats(3, 12, 10, "decaying", seed=2)
    assert rel(ML.knots_matrix(taus, None, {"density": 0.4, "alpha": 1.5}), ref_knots(taus, 0.4, 1.5)) < 1e-9
    got = ML.knots_matrix(taus, None, {"density": 0.6, "seed": 4}, name="w", method="knots_dare_ties")
    assert rel(got, ref_knots(taus, 0.6, dare=True, seed=4, name="w")) < 1e-9


# ------------------------------------------------------------------------------------------------
# LoRA delta space: delta_fn equals the dense float64 computation on the formed updates


def lora_fs(m, n, ranks, scales, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(r, n, generator=g) / n ** 0.5).to(dtype), (torch.randn(m, r, generator=g) * 0.1).to(dtype),
             float(s)) for r, s in zip(ranks, scales)]


def formed(fs, w=None):
    w = w or [1.0] * len(fs)
    return [x * s * (b.double() @ a.double()) for (a, b, s), x in zip(fs, w)]


DELTA = {
    "tsv": (ML.tsv_delta, lambda ups, p: ref_tsv(ups, p["alpha"])),
    "iso_c": (ML.iso_c_delta, lambda ups, p: ref_iso_c(ups, p["alpha"])),
    "star": (ML.star_delta, lambda ups, p: ref_star(ups, p["lam"], p["eta"])),
    "knots_ties": (ML.knots_delta, lambda ups, p: ref_knots(ups, p["density"], p["alpha"])),
    "knots_dare_ties": (ML._knots_dare_delta,
                        lambda ups, p: ref_knots(ups, p["density"], p["alpha"], True, p["seed"], "m.lora_A.weight")),
}
PARAMS = {"alpha": 1.3, "lam": 0.8, "eta": 55.0, "density": 0.4, "seed": 7}


@pytest.mark.parametrize("method", list(DELTA))
@pytest.mark.parametrize("m,n,ranks", [(24, 20, (4, 12, 8)), (40, 36, (16, 16, 16, 16)), (6, 30, (2, 5))])
def test_delta_fn_equals_dense_float64(method, m, n, ranks):
    """Mixed ranks and scales; (24, 20) with T = 3: ⌊p/T⌋ = 6 < 8, 12 cuts TSV's per-task ranks;
    (6, 30): m < Σr (the joint rank is capped by m)."""
    fn, ref = DELTA[method]
    scales = [2.0, 0.5, 1.0, 4.0][:len(ranks)]
    fs = lora_fs(m, n, ranks, scales, seed=m + len(ranks))
    w = [1.0, 0.7, 1.3, 1.0][:len(ranks)]
    want = ref(formed(fs, w), PARAMS)
    B, A = fn(fs, w, PARAMS, None, name="m.lora_A.weight")
    assert B.shape == (m, sum(ranks)) and A.shape == (sum(ranks), n)   # natural rank bound Σ r_t, zero-padded
    assert rel(B.double() @ A.double(), want) < 1e-5, (method, rel(B.double() @ A.double(), want))
    # an output rank: the best rank-r truncation of the exact result (Iso-C: its flat spectrum has no
    # unique truncation; it keeps the leading directions of Σ τ_t, checked separately)
    if method != "iso_c":
        r = 3
        B, A = fn(fs, w, PARAMS, r, name="m.lora_A.weight")
        assert B.shape == (m, r)
        assert rel(B.double() @ A.double(), ref_best(want, r)) < 1e-5


def test_iso_c_delta_truncation_keeps_leading_directions():
    fs = lora_fs(24, 20, (4, 6), (2.0, 1.0), seed=3)
    ta = sum(formed(fs)).numpy()
    u, s, vt = _svd(ta)
    R = _rank(s)
    want = s[:R].mean() * u[:, :3] @ vt[:3]
    B, A = ML.iso_c_delta(fs, None, {"alpha": 1.0}, 3)
    assert rel(B.double() @ A.double(), want) < 1e-5


def test_knots_delta_global_scope_needs_thresholds():
    """knots_delta with trim_scope global but without the adapter-wide thresholds (a direct call:
    only the delta-space merge's pre-pass can compute them) is a ParameterError saying so."""
    fs = lora_fs(8, 8, (2, 2), (1.0, 1.0), seed=1)
    with pytest.raises(ParameterError, match="trim-scope global trims with thresholds over every module"):
        ML.knots_delta(fs, None, {"density": 0.5, "trim_scope": "global"}, None)
    with pytest.raises(ParameterError, match="2 global trim thresholds for 3 tasks"):
        ML.knots_delta(lora_fs(8, 8, (2, 2, 2), (1.0,) * 3, seed=1), None,
                       {"density": 0.5, "trim_scope": "global", ML.GLOBAL_THRESHOLDS: [0.1, 0.2]}, None)


def ref_global_thresholds(xs_by_module, density):
    """METHODS.md, --trim-scope global: task t's threshold is the ⌊density·N_t⌋-th largest |x| over
    the X_t of every module concatenated (N_t entries); keep nothing (+inf) when that is 0."""
    T = len(xs_by_module[0])
    out = []
    for t in range(T):
        cat = np.concatenate([np.abs(xs[t]).reshape(-1) for xs in xs_by_module])
        k = math.floor(density * cat.size)
        out.append(float(np.sort(cat)[::-1][k - 1]) if k > 0 else math.inf)
    return out


@pytest.mark.parametrize("collect,sample_max", [(None, None), (40, 16), (0, 16)])
def test_global_thresholds_exact_bounded_memory_select(monkeypatch, collect, sample_max):
    """The bounded-memory selection equals the order statistic of the concatenation, for
    densities down to k = 0 (+inf) and 1 (the smallest |x|, here an exact 0), with exact ties and
    magnitudes spread over many binades. Defaults: 2 passes (sample and bracket, then count and
    collect). A tiny sample (decimated down to 16 entries) and a tiny collect cap send tasks to
    the radix select: 40 -> a histogram pass then a collecting one, 0 -> all four histogram
    passes (20, 16, 16, 12 bits). radix_thresholds alone, for all tasks and for a subset."""
    if collect is not None:
        monkeypatch.setattr(ML, "RADIX_COLLECT", collect)
        monkeypatch.setattr(ML, "SAMPLE_MAX", sample_max)
    g = torch.Generator().manual_seed(3)
    mods = [torch.randn(3, k, 50, generator=g, dtype=torch.float64) * torch.logspace(-8, 3, 50, dtype=torch.float64)
            for k in (4, 7, 1)]
    mods[1][:, 0, :10] = 0.125       # ties
    mods[2][:, 0, 0] = 0.0
    passes = []

    def blocks():
        passes.append(1)
        return iter(mods)

    xs = [[_np(x) for x in m] for m in mods]
    for d in (1e-5, 0.01, 0.37, 0.5, 1.0):
        want = ref_global_thresholds(xs, d)
        passes.clear()
        assert ML.global_thresholds(blocks, 3, d) == want, d
        if collect is None:
            assert len(passes) <= 2
        passes.clear()
        assert ML.radix_thresholds(blocks, 3, d) == want, d
        assert len(passes) <= (4 if collect == 0 else 3)
        assert ML.radix_thresholds(blocks, 3, d, tasks=[1]) == [None, want[1], None]


def test_knots_trim_keeps_every_tie_at_the_threshold():
    """The kernel's rule (METHODS.md "trim to the top density fraction"): keep |x| >= the
    ⌊density·N⌋-th largest, so entries tied with it are all kept (not exactly k of them)."""
    X = torch.zeros(2, 2, 5, dtype=torch.float64)
    X[0] = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0], [0.5, 0.5, -0.5, 0.1, 0.0]])
    X[1] = torch.tensor([[-1.0, 4.0, 0.25, 0.25, 0.25], [0.25, 0.1, 0.1, 0.1, 0.1]])
    want = _elect_mean([ref_trim(X[0], 0.2), ref_trim(X[1], 0.2)], [1.0, 1.0], "total")   # k = 2
    assert int((ref_trim(X[0], 0.2) != 0).sum()) == 4   # 3 and all three 2s
    got = ML._knots_x(X, "knots_ties", {"density": 0.2, "alpha": 1.0}, "w")
    assert torch.equal(got, want)


needs_cpp = pytest.mark.skipif(not ops.available()["cpp"], reason="compiled extension not built")


@needs_cpp
@pytest.mark.parametrize("method,extra", [("knots_ties", {}), ("knots_ties", {"trim_scope": "global"}),
                                          ("knots_dare_ties", {"seed": 5}), ("knots_dare_ties", {"density": 1.0})])
def test_knots_compiled_kernel_equals_torch_fallback(monkeypatch, method, extra):
    """KnOTS's TIES step runs in the fused kernel (ops.task_merge) when compiled and in batched
    torch under CKPTREG_BACKEND=python: the same factors bit for bit (same trims, keyed DARE masks,
    elections and means), both equal to the float64 reference."""
    fs = lora_fs(40, 36, (8, 4, 8), (2.0, 0.5, 1.0), seed=4, dtype=torch.float64)
    p = {"density": 0.4, "alpha": 1.3, **extra}
    if p.get("trim_scope") == "global":
        X = ML._knots_blocks(fs, [1.0] * 3)[1]
        p[ML.GLOBAL_THRESHOLDS] = [float(torch.kthvalue(X[t].abs().reshape(-1), X[t].numel() - 2 * X[t].numel() // 5
                                                         + 1).values) for t in range(3)]   # one module: = module scope
    fn = ML.knots_delta if method == "knots_ties" else ML._knots_dare_delta
    monkeypatch.setenv("CKPTREG_BACKEND", "auto")
    assert ops._route(torch.device("cpu"), "task_merge") == "compiled"
    Bc, Ac = fn(fs, None, p, None, name="m.lora_A.weight")
    monkeypatch.setenv("CKPTREG_BACKEND", "python")
    Bp, Ap = fn(fs, None, p, None, name="m.lora_A.weight")
    assert torch.equal(Bc, Bp) and torch.equal(Ac, Ap)
    want = ref_knots(formed(fs), p["density"], 1.3, dare=method == "knots_dare_ties", seed=p.get("seed", 0),
                     name="m.lora_A.weight")
    assert rel(Bc @ Ac, want) < 1e-9


def ref_knots_global(ups_by_module, density, alpha=1.0):
    """KnOTS-TIES with --trim-scope global (METHODS.md): per module the SVD of [τ_1 … τ_T] and
    X_t = diag(σ) V_tᵀ block; each task's threshold over every module's X_t concatenated
    (:func:`ref_global_thresholds`); per module trim |x| >= it, elect, disjoint mean, U (α x̄)."""
    per = []
    for ups in ups_by_module:
        taus = [_np(t) for t in ups]
        n = taus[0].shape[1]
        u, s, vt = _svd(np.concatenate(taus, 1))
        k = _rank(s)
        per.append((u[:, :k], [np.diag(s[:k]) @ vt[:k, t * n:(t + 1) * n] for t in range(len(taus))]))
    thr = ref_global_thresholds([xs for _, xs in per], density)
    out = []
    for u, xs in per:
        trimmed = [torch.from_numpy(np.where(np.abs(x) >= thr[t], x, 0.0)) for t, x in enumerate(xs)]
        out.append(u @ (alpha * _elect_mean(trimmed, [1.0] * len(xs), "total").numpy()))
    return out


# ------------------------------------------------------------------------------------------------
# end to end: real safetensors checkpoints, real PEFT adapter folders, the engine and the CLI


def _dense_run(tmp_path, T=3):
    """A base and T checkpoints: 2-D weights (one 20×14), an embedding and a bias (the "other
    tensors" rule: θ_0 + α·mean τ)."""
    g = torch.Generator().manual_seed(11)
    base = {"layers.0.mlp.weight": torch.randn(20, 14, generator=g), "embed_tokens.weight": torch.randn(9, 6, generator=g),
            "layers.0.mlp.bias": torch.randn(20, generator=g)}
    taus = task_mats(T, 20, 14, "decaying", seed=3, dtype=torch.float32)
    reg = Registry(tmp_path / "r.duckdb")
    cks = [base] + [{"layers.0.mlp.weight": base["layers.0.mlp.weight"] + taus[t],
                     "embed_tokens.weight": base["embed_tokens.weight"] + 0.1 * (t + 1),
                     "layers.0.mlp.bias": base["layers.0.mlp.bias"] - 0.2 * t} for t in range(T)]
    for i, sd in enumerate(cks):
        f = tmp_path / f"c{i}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
        reg.add(f, run="r", step=(i + 1) * 10)
    return reg, cks


@pytest.mark.parametrize("method,params", [("tsv", {"alpha": 0.7}), ("iso_c", {}), ("iso_cts", {}),
                                           ("star", {"lam": 1.5, "eta": 60.0})])
def test_dense_checkpoints_end_to_end(tmp_path, method, params):
    reg, cks = _dense_run(tmp_path)
    ins = reg.select("r", 3)
    base = reg.first("r")
    spec = engine.make_spec(reg, method, ins, params=params, base=base, selection={"last": 3})
    c = engine.merge(reg, spec)
    got = load_any(c.path)
    b = {k: v.double() for k, v in cks[0].items()}
    taus = [cks[t]["layers.0.mlp.weight"].double() - b["layers.0.mlp.weight"] for t in (1, 2, 3)]
    scale = params.get("alpha", params.get("lam", 1.0))
    ref = {"tsv": lambda: ref_tsv(taus, scale), "iso_c": lambda: ref_iso_c(taus, scale),
           "iso_cts": lambda: ref_iso_cts(taus, scale), "star": lambda: ref_star(taus, scale, params.get("eta", 40.0))}
    want = _np(b["layers.0.mlp.weight"]) + ref[method]()
    assert rel(got["layers.0.mlp.weight"], want) < 1e-5
    for k in ("embed_tokens.weight", "layers.0.mlp.bias"):   # θ_0 + α·mean_t τ_t
        mean_tau = sum(cks[t][k].double() - b[k] for t in (1, 2, 3)) / 3
        assert torch.allclose(got[k].double(), b[k] + scale * mean_tau, atol=1e-5)
    assert reg.lineage(c.id)["method"] == method


def test_dense_cli_name_fragment_and_knots_refused_on_full_models(tmp_path):
    reg, cks = _dense_run(tmp_path)
    db = str(reg.path)
    del reg
    r = CliRunner().invoke(main, ["--db", db, "merge", "--run", "r", "--last", "3", "--base", "first", "--method", "tsv",
                                  "--alpha", "0.5", "--json", "-q"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["name"].startswith("tsv_last_3") and d["name"].endswith("_alpha0_5"), d["name"]
    r = CliRunner().invoke(main, ["--db", db, "merge", "--run", "r", "--last", "3", "--base", "first", "--method",
                                  "knots_ties", "--density", "0.5", "-q"])
    assert r.exit_code == 8 and "knots_ties runs in space delta, not on full checkpoints" in r.output, r.output
    assert [c.name for c in Registry(db).checkpoints("r", merged=True)] == [d["name"]]


def _adapters(tmp_path, specs, d=24, seed=0):
    """PEFT adapter folders with per-adapter rank and lora_alpha (mixed ranks and scales)."""
    reg = Registry(tmp_path / "a.duckdb")
    g = torch.Generator().manual_seed(seed)
    states = []
    for i, (r, alpha) in enumerate(specs):
        sd = {}
        for layer in range(2):
            for mod in ("q_proj", "v_proj"):
                pre = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
                sd[f"{pre}.lora_A.weight"] = torch.randn(r, d, generator=g) / d ** 0.5
                sd[f"{pre}.lora_B.weight"] = torch.randn(d, r, generator=g) * 0.1
        folder = write_peft_adapter(tmp_path / "ad" / f"checkpoint-{(i + 1) * 10}", sd, r=r, alpha=alpha, d=d)
        reg.add(folder, run="a", step=(i + 1) * 10)
        states.append((sd, alpha / r))
    return reg, states


def _updates(states, pre):
    return [s * (sd[f"{pre}.lora_B.weight"].double() @ sd[f"{pre}.lora_A.weight"].double()) for sd, s in states]


@pytest.mark.parametrize("method,extra,ref", [
    ("tsv", ["--alpha", "1.2"], lambda ups, pre: ref_tsv(ups, 1.2)),
    ("iso_c", [], lambda ups, pre: ref_iso_c(ups)),
    ("star", ["--eta", "50"], lambda ups, pre: ref_star(ups, 1.0, 50.0)),
    ("knots_ties", ["--density", "0.3"], lambda ups, pre: ref_knots(ups, 0.3)),
    ("knots_dare_ties", ["--density", "0.5", "--seed", "3"],
     lambda ups, pre: ref_knots(ups, 0.5, dare=True, seed=3, name=f"{pre}.lora_A.weight")),
])
def test_lora_delta_space_end_to_end_cli(tmp_path, method, extra, ref):
    """Mixed ranks (4, 8, 6) and lora_alpha (8, 4, 12) across the inputs; the CLI's default base for
    adapters in delta space is pretrained (τ_t = s_t B_t A_t); the output adapter (lora_alpha = r)
    times its scaling equals the float64 dense computation on the formed updates."""
    reg, states = _adapters(tmp_path, [(4, 8), (8, 4), (6, 12)])
    db = str(reg.path)
    del reg
    r = CliRunner().invoke(main, ["--db", db, "merge", "--run", "a", "--last", "3", "--method", method, *extra,
                                  "--space", "delta", "--json", "-q"])
    assert r.exit_code == 0, (r.output, r.exception)
    d = json.loads(r.stdout)
    cfg = json.loads((__import__("pathlib").Path(d["path"]) / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] == 18   # the exact result's rank bound Σ r_t, scaling 1
    got = load_any(d["path"])
    for layer in range(2):
        for mod in ("q_proj", "v_proj"):
            pre = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            upd = got[f"{pre}.lora_B.weight"].double() @ got[f"{pre}.lora_A.weight"].double()
            want = ref(_updates(states, pre), pre)
            assert rel(upd, want) < 1e-5, (method, pre, rel(upd, want))


def test_lora_delta_rank_and_peft_reload(tmp_path):
    """--rank 5: the best rank-5 truncation; the output folder loads with PEFT and its merged
    update (PEFT's own scaling) is that truncation."""
    peft = pytest.importorskip("peft")
    reg, states = _adapters(tmp_path, [(4, 8), (8, 16)], d=16)
    spec = engine.make_spec(reg, "tsv", reg.select("a", 2), params={"base": "pretrained"}, selection={"last": 2})
    c = engine.merge(reg, spec, space="delta", rank=5)
    from safetensors.torch import load_file

    cfg = peft.LoraConfig.from_pretrained(c.path)
    assert cfg.r == 5 and cfg.lora_alpha == 5
    sd = load_file(str(__import__("pathlib").Path(c.path) / "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.1.self_attn.v_proj"
    upd = (cfg.lora_alpha / cfg.r) * sd[f"{pre}.lora_B.weight"].double() @ sd[f"{pre}.lora_A.weight"].double()
    assert rel(upd, ref_best(ref_tsv(_updates(states, pre)), 5)) < 1e-5


def test_errors_iso_cts_delta_and_explicit_base(tmp_path):
    reg, _ = _adapters(tmp_path, [(4, 8), (4, 8)])
    db = str(reg.path)
    del reg
    r = CliRunner().invoke(main, ["--db", db, "merge", "--run", "a", "--last", "2", "--method", "iso_cts",
                                  "--space", "delta", "-q"])
    assert r.exit_code == 8 and "not iso_cts" in r.output, r.output
    r = CliRunner().invoke(main, ["--db", db, "merge", "--run", "a", "--last", "2", "--method", "tsv", "--base", "first",
                                  "--space", "delta", "-q"])
    assert r.exit_code == 8 and "use base pretrained" in r.output, r.output
    # knots_dare_ties has no magnitude trim: a global scope would change nothing, so it is refused
    r = CliRunner().invoke(main, ["--db", db, "merge", "--run", "a", "--last", "2", "--method", "knots_dare_ties",
                                  "--density", "0.5", "--trim-scope", "global", "--space", "delta", "-q"])
    assert r.exit_code == 8 and "knots_dare_ties has no magnitude trim" in r.output, r.output
    assert Registry(db).checkpoints("a", merged=True) == []
    reg = Registry(db)
    spec = engine.make_spec(reg, "knots_ties", reg.select("a", 2),
                            params={"density": 0.5, "base": "pretrained", ML.GLOBAL_THRESHOLDS: [1.0, 1.0]})
    with pytest.raises(ParameterError, match="_knots_thresholds is reserved"):
        engine.merge(reg, spec, space="delta")
    assert reg.checkpoints("a", merged=True) == []


def _adapters_multi(tmp_path, specs, seed=0):
    """PEFT adapters with modules of different shapes and magnitudes (q_proj 24×24 small, mlp
    up_proj 40×24 four times larger, down_proj 24×40), mixed ranks and lora_alpha: a global trim
    then keeps mostly up_proj entries, unlike a per-module one."""
    reg = Registry(tmp_path / "g.duckdb")
    g = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q_proj": (24, 24, 0.05), "mlp.up_proj": (40, 24, 0.2), "mlp.down_proj": (24, 40, 0.1)}
    states = []
    for i, (r, alpha) in enumerate(specs):
        sd = {}
        for layer in range(2):
            for mod, (m, n, sc) in shapes.items():
                pre = f"base_model.model.model.layers.{layer}.{mod}"
                sd[f"{pre}.lora_A.weight"] = torch.randn(r, n, generator=g) / n ** 0.5
                sd[f"{pre}.lora_B.weight"] = torch.randn(m, r, generator=g) * sc
        folder = write_peft_adapter(tmp_path / "gd" / f"checkpoint-{(i + 1) * 10}", sd, r=r, alpha=alpha,
                                    target_modules=["q_proj", "up_proj", "down_proj"])
        reg.add(folder, run="g", step=(i + 1) * 10)
        states.append((sd, alpha / r))
    return reg, states, [f"base_model.model.model.layers.{layer}.{mod}" for layer in range(2) for mod in shapes]


def test_knots_global_trim_scope_end_to_end(tmp_path):
    """--trim-scope global (METHODS.md, the official KnOTS code): each task's trim threshold is
    the ⌊density·N_t⌋-th largest |x| over the X_t of all 6 modules of the adapter (computed by a
    pre-pass before the first module is written); the merged updates equal the float64 reference
    that concatenates every module's X_t, differ from the per-module trim, the name has
    _trim_global and the lineage records trim_scope global; a sweep over density runs it too."""
    reg, states, pres = _adapters_multi(tmp_path, [(4, 8), (8, 4), (6, 12)])
    db = str(reg.path)
    del reg
    r = CliRunner().invoke(main, ["--db", db, "merge", "--run", "g", "--last", "3", "--method", "knots_ties",
                                  "--density", "0.3", "--alpha", "1.2", "--trim-scope", "global", "--space", "delta",
                                  "--json", "-q"])
    assert r.exit_code == 0, (r.output, r.exception)
    d = json.loads(r.stdout)
    assert d["name"].endswith("_trim_global"), d["name"]
    reg = Registry(db)
    c = [x for x in reg.checkpoints("g", merged=True) if x.name == d["name"]][0]
    assert reg.lineage(c.id)["params"]["trim_scope"] == "global"
    ups = [_updates(states, pre) for pre in pres]
    want = ref_knots_global(ups, 0.3, 1.2)
    got = load_any(d["path"])
    for pre, wnt, u in zip(pres, want, ups):
        upd = got[f"{pre}.lora_B.weight"].double() @ got[f"{pre}.lora_A.weight"].double()
        assert rel(upd, wnt) < 1e-5, (pre, rel(upd, wnt))
        if "q_proj" in pre:   # the small module loses most of its entries to the global trim
            assert rel(ref_knots(u, 0.3, 1.2), wnt) > 0.1
    spec = engine.make_spec(reg, "knots_ties", reg.select("g", 3), params={"density": 0.3, "alpha": 1.2,
                                                                          "base": "pretrained"})
    mod_scope = load_any(engine.merge(reg, spec, space="delta").path)
    pre = pres[0]
    upd = mod_scope[f"{pre}.lora_B.weight"].double() @ mod_scope[f"{pre}.lora_A.weight"].double()
    assert rel(upd, ref_knots(ups[0], 0.3, 1.2)) < 1e-5 and rel(upd, want[0]) > 0.1
    del reg
    r = CliRunner().invoke(main, ["--db", db, "sweep", "--run", "g", "--last", "3", "--method", "knots_ties",
                                  "--density", "0.3,0.6", "--trim-scope", "global", "--space", "delta",
                                  "-o", str(tmp_path / "sw"), "--json", "-q"])
    assert r.exit_code == 0, (r.output, r.exception)
    reg = Registry(db)
    pts = {float(reg.lineage(x.id)["params"]["density"]): x for x in reg.checkpoints("g", merged=True)
           if x.name.endswith("_trim_global") and x.name != d["name"]}
    assert sorted(pts) == [0.3, 0.6], pts
    want6 = ref_knots_global(ups, 0.6)
    got6 = load_any(pts[0.6].path)
    for pre, wnt in zip(pres, want6):
        upd = got6[f"{pre}.lora_B.weight"].double() @ got6[f"{pre}.lora_A.weight"].double()
        assert rel(upd, wnt) < 1e-5, (pre, rel(upd, wnt))


def test_methods_json_lists_lowrank_family():
    r = CliRunner().invoke(main, ["methods", "--json"])
    assert r.exit_code == 0, r.output
    by = {m["name"]: m for m in json.loads(r.stdout)}
    want = {"tsv": ({"alpha"}, {"tensors", "delta", "core"}), "iso_c": ({"alpha"}, {"tensors", "delta", "core"}),
            "iso_cts": ({"alpha"}, {"tensors"}), "star": ({"lam", "eta"}, {"tensors", "delta", "core"}),
            "knots_ties": ({"density", "alpha", "trim_scope"}, {"delta"}),
            "knots_dare_ties": ({"density", "alpha", "seed", "trim_scope"}, {"delta"})}
    for name, (params, spaces) in want.items():
        assert {p["name"] for p in by[name]["parameters"]} == params, name
        assert set(by[name]["spaces"]) == spaces, name
        assert by[name]["base"] is True
    assert [p["default"] for p in by["star"]["parameters"]] == [1.0, 40.0]


def test_sweep_over_alpha_and_factor_space_refused(tmp_path):
    """A CLI sweep of tsv over --alpha 0.5,1.0 on dense checkpoints registers both points, each
    equal to its reference; tsv on LoRA adapters in factor space (raw A/B factors) is refused
    with nothing registered."""
    reg, cks = _dense_run(tmp_path)
    db = str(reg.path)
    del reg
    r = CliRunner().invoke(main, ["--db", db, "sweep", "--run", "r", "--last", "3", "--method", "tsv", "--base", "first",
                                  "--alpha", "0.5,1.0", "-o", str(tmp_path / "sw"), "--json", "-q"])
    assert r.exit_code == 0, (r.output, r.exception)
    reg = Registry(db)
    merged = {c.name: c for c in reg.checkpoints("r", merged=True)}
    assert len(merged) == 2, merged
    b = cks[0]["layers.0.mlp.weight"].double()
    taus = [cks[t]["layers.0.mlp.weight"].double() - b for t in (1, 2, 3)]
    for c in merged.values():
        a = float(reg.lineage(c.id)["params"].get("alpha", 1.0))
        assert rel(load_any(c.path)["layers.0.mlp.weight"], _np(b) + ref_tsv(taus, a)) < 1e-5
    reg2, _ = _adapters(tmp_path / "ad2", [(4, 8), (4, 8)])
    db2 = str(reg2.path)
    del reg2
    r = CliRunner().invoke(main, ["--db", db2, "merge", "--run", "a", "--last", "2", "--base", "first", "--method", "tsv",
                                  "-q"])
    assert r.exit_code == 8 and "not on LoRA factors as stored" in r.output, r.output
    assert Registry(db2).checkpoints("a", merged=True) == []


@pytest.mark.parametrize("method", ["tsv", "iso_c", "star"])
def test_core_space_equals_delta_space(tmp_path, method):
    """METHODS.md "Core space": TSV/Iso/STAR results lie in the span of the stacked factors, so
    core space equals delta space exactly (same merged updates), under its own name."""
    reg, states = _adapters(tmp_path, [(4, 8), (6, 6)])
    got = {}
    for space in ("delta", "core"):
        spec = engine.make_spec(reg, method, reg.select("a", 2), params={"base": "pretrained"}, selection={"last": 2})
        c = engine.merge(reg, spec, space=space)
        got[space] = (c.name, load_any(c.path))
    assert got["delta"][0] != got["core"][0]
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    ups = [got[s][1][f"{pre}.lora_B.weight"].double() @ got[s][1][f"{pre}.lora_A.weight"].double()
           for s in ("delta", "core")]
    ref = {"tsv": ref_tsv, "iso_c": ref_iso_c, "star": ref_star}[method](_updates(states, pre))
    assert rel(ups[0], ref) < 1e-5 and rel(ups[1], ref) < 1e-5


def test_recipe_and_python_api(tmp_path):
    """A YAML recipe of star (eta, lambda) on dense checkpoints writes the same bytes as the CLI
    merge; ckptreg.merge (the Python API) runs knots_ties on adapters in delta space."""
    import ckptreg

    reg, cks = _dense_run(tmp_path)
    db = str(reg.path)
    del reg
    r = CliRunner().invoke(main, ["--db", db, "merge", "--run", "r", "--last", "3", "--base", "first", "--method", "star",
                                  "--eta", "60", "--lambda", "1.5", "-o", str(tmp_path / "a.safetensors"), "--name", "a",
                                  "-q"])
    assert r.exit_code == 0, r.output
    (tmp_path / "r.yaml").write_text("inputs: {run: r, last: 3}\nmethod: star\nbase: first\n"
                                     "parameters: {eta: 60, lambda: 1.5}\n"
                                     f"output: {tmp_path / 'b.safetensors'}\nname: b\n")
    r = CliRunner().invoke(main, ["--db", db, "merge", "--recipe", str(tmp_path / "r.yaml"), "-q"])
    assert r.exit_code == 0, r.output
    a, b = load_any(tmp_path / "a.safetensors"), load_any(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # same tensors bit for bit
    reg2, states = _adapters(tmp_path / "api", [(4, 8), (6, 12)])
    c = ckptreg.merge(str(reg2.path), run="a", last=2, method="knots_ties", params={"density": 0.4}, space="delta")
    got = load_any(c.path)
    pre = "base_model.model.model.layers.1.self_attn.q_proj"
    upd = got[f"{pre}.lora_B.weight"].double() @ got[f"{pre}.lora_A.weight"].double()
    assert rel(upd, ref_knots(_updates(states, pre), 0.4)) < 1e-5


# ------------------------------------------------------------------------------------------------
# the delta_fns on a leading layer dimension: one batched call == the per-layer calls


def layered_fs(m, n, ranks, scales, L, seed, degenerate=True):
    """L layers of factors per task (A [L, r_t, n], B [L, m, r_t]): layer 1 cuts task 1 to rank
    min(r_1, 5) - 1 (exact zero columns/rows: TSV's k_t, Iso-C's R and KnOTS's k drop there),
    layer 2 zeroes task 0, layer 3 zeroes every task (each rank-dependent count then differs
    between the layers; STAR's k differs with the spectra)."""
    layers = [lora_fs(m, n, ranks, scales, seed=seed + 10 * layer) for layer in range(L)]
    if degenerate:
        if L > 1 and len(ranks) > 1:
            a, b, s = layers[1][1]
            cut = min(ranks[1], 5) - 1
            a, b = a.clone(), b.clone()
            a[cut:] = 0
            b[:, cut:] = 0
            layers[1][1] = (a, b, s)
        if L > 2:
            a, b, s = layers[2][0]
            layers[2][0] = (torch.zeros_like(a), torch.zeros_like(b), s)
        if L > 3:
            layers[3] = [(torch.zeros_like(a), torch.zeros_like(b), s) for a, b, s in layers[3]]
    fs = [(torch.stack([layers[layer][t][0] for layer in range(L)]), torch.stack([layers[layer][t][1]
                                                                                    for layer in range(L)]), s)
          for t, s in enumerate(scales)]
    return fs, layers


@pytest.mark.parametrize("method", list(DELTA))
@pytest.mark.parametrize("m,n,ranks,L,r_out", [(24, 20, (4, 12, 8), 5, None), (24, 20, (4, 12, 8), 5, 3),
                                               (40, 36, (16, 16, 16, 16), 3, None), (6, 30, (2, 5), 2, None)])
def test_batched_delta_fn_equals_per_layer_calls_and_float64(method, m, n, ranks, L, r_out):
    """A delta_fn on factors with a leading layer dim (mixed ranks across tasks, equal shapes across
    layers, layers whose ranks and kept counts differ, a layer of zeros) returns [L, m, r] /
    [L, r, n] equal per layer to the 2-D call on that layer (1e-6 relative, the same output rank)
    and to the float64 dense reference (1e-5); KnOTS-DARE keys each layer's masks by its name."""
    fn, ref = DELTA[method]
    scales = [2.0, 0.5, 1.0, 4.0][:len(ranks)]
    w = [1.0, 0.7, 1.3, 1.0][:len(ranks)]
    fs, layers = layered_fs(m, n, ranks, scales, L, seed=m + len(ranks))
    names = [f"base_model.model.layers.{layer}.q_proj.lora_A.weight" for layer in range(L)]
    B, A = fn(fs, w, PARAMS, r_out, name=names)
    r = r_out if r_out is not None else sum(ranks)
    assert B.shape == (L, m, r) and A.shape == (L, r, n)
    for layer in range(L):
        b1, a1 = fn(layers[layer], w, PARAMS, r_out, name=names[layer])
        one = b1.double() @ a1.double()
        got = B[layer].double() @ A[layer].double()
        assert b1.shape == (m, r)
        if float(one.norm()) == 0.0:
            assert float(got.norm()) == 0.0, (method, layer)
            continue
        assert rel(got, _np(one)) < 1e-6, (method, layer, rel(got, _np(one)))
        p = dict(PARAMS)
        if method == "knots_dare_ties":
            want = ref_knots(formed(layers[layer], w), p["density"], p["alpha"], True, p["seed"], names[layer])
        else:
            want = ref(formed(layers[layer], w), p)
        if r_out is not None and method != "iso_c":
            want = ref_best(want, r_out)
        if r_out is None or method != "iso_c":
            assert rel(got, want) < 1e-5, (method, layer, rel(got, want))


def test_batched_delta_fn_rank_dependent_counts_differ_between_layers():
    """The inputs of the test above exercise the sub-groups: the per-layer counts (TSV's Σk_t,
    Iso-C's R, STAR's Σk_t, KnOTS's k) take more than one value across the layers."""
    fs, layers = layered_fs(24, 20, (4, 12, 8), (2.0, 0.5, 1.0), 5, seed=27)
    w = [1.0, 0.7, 1.3]
    svds = ML._task_svds(fs, w)
    tsv_k = sum(torch.clamp(ML._ranks(S), max=20 // 3) for _, S, _ in svds)
    star_k = sum((ML._star_sigma(S, PARAMS["eta"]) > 0).sum(-1) for _, S, _ in svds)
    B, A, d = ML._stacked(fs, [wt * s for wt, (_, _, s) in zip(w, fs)])
    from ckptreg import lowrank

    iso_r = ML._ranks(lowrank.factored_svd(B, d, A)[1])
    knots_k = ML._knots_core(fs, w)[5]
    for counts in (tsv_k, star_k, iso_r, knots_k):
        assert len(set(counts.tolist())) >= 3, counts


def test_batched_knots_dare_needs_every_layer_name():
    """knots_dare_ties keys its masks by the module name: a batched call with one name for several
    layers (or a list of the wrong length) is a ParameterError; knots_ties (no masks) accepts it."""
    fs, _ = layered_fs(12, 10, (3, 3), (1.0, 1.0), 2, seed=1, degenerate=False)
    with pytest.raises(ParameterError, match="knots_dare_ties on 2 layers needs their 2 module names"):
        ML._knots_dare_delta(fs, None, {"density": 0.5}, None, name="m.lora_A.weight")
    with pytest.raises(ParameterError, match="1 module names for 2 layers"):
        ML._knots_dare_delta(fs, None, {"density": 0.5}, None, name=["m.lora_A.weight"])
    B, A = ML.knots_delta(fs, None, {"density": 0.5}, None, name="m.lora_A.weight")
    assert B.shape == (2, 12, 6)


@pytest.mark.parametrize("method", ["knots_ties", "knots_dare_ties"])
def test_knots_zero_task_has_no_blocks(method):
    """A task that is exactly zero has X_t = 0 (V_t = 0 exactly), in the dense and the factored
    form: without that, its rounding-noise block of the joint SVD survived the trim / DARE and
    counted in the disjoint mean (0.2 relative off at 24x20)."""
    taus = task_mats(3, 12, 10, "decaying", seed=5)
    taus[1] = 0
    p = {"density": 0.4, "alpha": 1.5, "seed": 2}
    dare = method == "knots_dare_ties"
    want = ref_knots(taus, 0.4, 1.5, dare=dare, seed=2, name="w")
    assert rel(ML.knots_matrix(taus, None, p, name="w", method=method), want) < 1e-9
    fs = lora_fs(24, 20, (4, 6, 5), (2.0, 1.0, 0.5), seed=9)
    fs[0] = (torch.zeros_like(fs[0][0]), fs[0][1], fs[0][2])   # A_0 = 0: τ_0 = 0
    B, A = (ML.knots_delta if not dare else ML._knots_dare_delta)(fs, None, p, None, name="w")
    want = ref_knots(formed(fs), 0.4, 1.5, dare=dare, seed=2, name="w")
    assert rel(B.double() @ A.double(), want) < 1e-5

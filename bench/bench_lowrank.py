"""Delta-space (factored) LoRA merging and CART vs the dense SVD route.

Run (default sizes, a few minutes on 2 cores; no CI runs it):
    python -m pytest bench/bench_lowrank.py -s -p no:cacheprovider --benchmark-columns=min,mean,rounds

Full size of issue #13's headline (8 adapters, r = 16, 32 layers of 4096², the SVD family in delta
space vs the dense float64 route; ~20 min on 2 shared cores, dominated by the dense route's float64
4096² SVDs at ~40 s each: TSV-M runs ~10 per layer, STAR 8, so those two time 1 layer and scale ×32):
    LR_D=4096 LR_LAYERS=32 LR_DENSE_LAYERS=2 LR_DENSE_LAYERS_TSV=1 LR_DENSE_LAYERS_STAR=1 \
        python -m pytest bench/bench_lowrank.py -k test_lowrank_delta_vs_dense_route -s -p no:cacheprovider

Env knobs (SVD-family section at the end of the file):
    LR_D                 layer size LR_D×LR_D of the SVD-family delta-vs-dense bench (default 1024)
    LR_LAYERS            layers merged by the factored side (default 4)
    LR_DENSE_LAYERS      layers the dense route is timed on, scaled to LR_LAYERS (default 2; 0: skip it)
    LR_DENSE_LAYERS_<M>  the same for one method M in TSV, ISO_C, STAR, KNOTS_TIES
    LR_ROUNDS            rounds of the dense TSV-M batched-vs-loop bench (default 2)
    LR_DENSE_M           matrix size of that bench, 8 matrices of LR_DENSE_M² (default 1024)
The PEFT comparison (add_weighted_adapter svd vs delta-space linear + rank) is bench/bench_peft.py.

Scenario (METHODS.md "LoRA adapters: two spaces"): n = 4 adapters of a 4096×4096 layer, rank 16,
PEFT shapes (lora_B [4096, 16], lora_A [16, 4096]). The limit measured in the same run is the dense
route a user would otherwise take: form the merged update ΔW = Σ c_i s_i B_i A_i (4096×4096) and
``torch.linalg.svd`` it (one dense SVD, ~10-20 s on 2 cores). Reported: speed ratio dense/factored
and the max relative singular-value error (|S_fact − S_dense| / S_dense[0]) over the top n·r values.

CART is benchmarked the same way at 1024×1024 (dense CART needs one SVD per adapter: four 4096²
SVDs would take a minute on 2 cores), plus the factored CART alone at 4096².

Batched delta merge: 32 same-shape layers (1024×1024, r = 16) of n = 2, 3, 4, 6, 10 adapters in one
``lora_delta_merge_batched`` call (``ckptreg.ops.factored_svd_batched``, R = 16 n) vs a Python loop
of per-layer ``lora_delta_merge`` calls (LAPACK QR + SVD), interleaved, best of 3.
"""
from __future__ import annotations

import time

import pytest
import torch

from ckptreg import lowrank as L

N, D, K, R = 4, 4096, 4096, 16
SCALES = [2.0, 2.0, 1.0, 0.5]
COEFFS = [0.1, 0.2, 0.3, 0.4]
RESULTS: dict = {}


def _adapters(d, k, r=R, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d, r, generator=g) * 0.02 for _ in range(n)]
    As = [torch.randn(r, k, generator=g) * 0.02 for _ in range(n)]
    return Bs, As


def _dense_update(Bs, As, scales, coeffs):
    W = torch.zeros(Bs[0].shape[0], As[0].shape[1])
    for b, a, s, c in zip(Bs, As, scales, coeffs):
        W.addmm_(b, a, alpha=s * c)
    return W


@pytest.fixture(scope="module")
def big():
    return _adapters(D, K)


@pytest.fixture(scope="module")
def small():
    return _adapters(1024, 1024, seed=1)


# --------------------------------------------------------------------------- 4096² delta merge


def test_dense_svd_route(benchmark, big):
    Bs, As = big

    def run():
        W = _dense_update(Bs, As, SCALES, COEFFS)
        return torch.linalg.svd(W, full_matrices=False)

    U, S, Vh = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    RESULTS["dense_s"] = S[: N * R].double()
    RESULTS["dense_time"] = benchmark.stats.stats.min


def test_factored_delta_merge(benchmark, big):
    Bs, As = big
    out = benchmark.pedantic(lambda: L.lora_delta_merge(Bs, As, SCALES, COEFFS, rank=R),
                             rounds=20, iterations=1, warmup_rounds=2)
    RESULTS["fact_time"] = benchmark.stats.stats.min
    # singular values of the whole merged update (rank N*R) from the factored SVD
    B = torch.cat(Bs, 1)
    A = torch.cat(As, 0)
    diag = torch.tensor([s * c for s, c in zip(SCALES, COEFFS) for _ in range(R)])
    _, S, _ = L.factored_svd(B, diag, A)
    RESULTS["fact_s"] = S.double()
    assert out[0].shape == (D, R) and out[1].shape == (R, K)


def test_report_delta(benchmark):
    if "dense_s" not in RESULTS or "fact_s" not in RESULTS:
        pytest.skip("needs both sides")
    ds, fs = RESULTS["dense_s"], RESULTS["fact_s"]
    err = ((fs - ds).abs().max() / ds[0]).item()
    ratio = RESULTS["dense_time"] / RESULTS["fact_time"]
    benchmark.extra_info.update(speed_ratio=ratio, max_rel_sv_err=err)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\n[delta merge 4096x4096, n={N}, r={R}] dense SVD route {RESULTS['dense_time']:.2f} s, "
          f"factored {RESULTS['fact_time'] * 1e3:.2f} ms, speed ratio {ratio:,.0f}x, "
          f"max rel singular-value error {err:.2e}")
    assert err < 1e-5
    assert ratio > 10


# --------------------------------------------------------------------------- batched vs per layer


@pytest.mark.parametrize("n", [2, 3, 4, 6, 10])
def test_delta_batched_vs_per_layer(benchmark, n):
    g = torch.Generator().manual_seed(n)
    layers, d = 32, 1024
    Bs = [torch.randn(layers, d, R, generator=g) * 0.01 for _ in range(n)]
    As = [torch.randn(layers, R, d, generator=g) / d ** 0.5 for _ in range(n)]
    scales, coeffs = [2.0] * n, [1.0 / n] * n

    def per_layer():
        return [L.lora_delta_merge([b[i] for b in Bs], [a[i] for a in As], scales, coeffs, R)
                for i in range(layers)]

    def batched():
        return L.lora_delta_merge_batched(Bs, As, scales, coeffs, R)

    best = {"per_layer": float("inf"), "batched": float("inf")}
    for _ in range(3):
        for name, fn in (("per_layer", per_layer), ("batched", batched)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    Bb, Ab = batched()
    got = per_layer()
    # both routes against the float64 factored truncation (float64 QRs; the random sums here have
    # σ_16/σ_17 down to 1.001, so a rank-16 truncation amplifies float32 rounding ~1000x: the
    # per-layer float32-QR route measured 9e-6 (n = 6) and 1.2e-5 (n = 10) off it, the batched
    # route 4e-7)
    ref = [L.lora_delta_merge([b[i].double() for b in Bs], [a[i].double() for a in As], scales, coeffs, R)
           for i in range(layers)]

    def rel(b, a, i):
        P = ref[i][0] @ ref[i][1]
        return float((b.double() @ a.double() - P).abs().max() / P.abs().max())

    err = max(rel(Bb[i], Ab[i], i) for i in range(layers))
    err_pl = max(rel(got[i][0], got[i][1], i) for i in range(layers))
    benchmark.pedantic(batched, rounds=1, iterations=1)
    ratio = best["per_layer"] / best["batched"]
    benchmark.extra_info.update(speed_ratio=ratio, max_rel_err=err, max_rel_err_per_layer=err_pl)
    print(f"\n[delta merge batched, 32 layers 1024x1024, n={n}, R={n * R}] per layer "
          f"{best['per_layer'] * 1e3:.1f} ms, batched {best['batched'] * 1e3:.1f} ms, speed ratio {ratio:.2f}x, "
          f"max rel err of the product vs float64: batched {err:.1e}, per layer {err_pl:.1e}")
    assert err < 1e-5
    assert err_pl < 1e-4


# --------------------------------------------------------------------------- CART


@pytest.mark.parametrize("rho", [0.01, 0.08])
def test_cart_1024_dense_vs_factored(benchmark, small, rho):
    Bs, As = small
    ups = [_dense_update([b], [a], [s], [1.0]) for b, a, s in zip(Bs, As, SCALES)]
    t0 = time.perf_counter()
    dense = L.cart_dense(ups, None, rho, 1.5)   # N exact 1024² SVDs
    t_dense = time.perf_counter() - t0
    got = benchmark.pedantic(lambda: L.cart_lowrank(Bs, As, SCALES, None, rho, 1.5),
                             rounds=10, iterations=1, warmup_rounds=1)
    t_fact = benchmark.stats.stats.min
    # accuracy against the float64 dense CART (the float32 dense route itself is only ~1e-5 accurate)
    dense64 = L.cart_dense([u.double() for u in ups], None, rho, 1.5)
    err = ((got[0].double() @ got[1].double() - dense64).abs().max() / dense64.abs().max()).item()
    err32 = ((dense.double() - dense64).abs().max() / dense64.abs().max()).item()
    s_d = torch.linalg.svdvals(dense64)[: N * R]
    s_f = torch.linalg.svdvals(got[0].double() @ got[1].double())[: N * R]
    sv_err = ((s_f - s_d).abs().max() / s_d[0]).item()
    ratio = t_dense / t_fact
    benchmark.extra_info.update(speed_ratio=ratio, max_rel_err=err, max_rel_sv_err=sv_err, dense_s=t_dense,
                                dense_fp32_rel_err=err32)
    print(f"\n[CART 1024x1024, n={N}, r={R}, rho={rho}, k={L.cart_rank(1024, 1024, rho)}] dense {t_dense:.3f} s, "
          f"factored {t_fact * 1e3:.2f} ms, speed ratio {ratio:,.0f}x, max rel err vs fp64 dense {err:.2e} "
          f"(fp32 dense route: {err32:.2e}), "
          f"max rel singular-value error {sv_err:.2e}")
    assert err < 1e-5


@pytest.mark.parametrize("rho", [0.002, 0.08])
def test_cart_4096_factored(benchmark, big, rho):
    Bs, As = big
    out = benchmark.pedantic(lambda: L.cart_lowrank(Bs, As, SCALES, None, rho, 1.5, out_rank=R),
                             rounds=10, iterations=1, warmup_rounds=1)
    t = benchmark.stats.stats.min
    print(f"\n[CART 4096x4096, n={N}, r={R}, rho={rho}, k={L.cart_rank(D, K, rho)}] factored {t * 1e3:.2f} ms"
          + (f" (dense route >= {N} x {RESULTS['dense_time']:.1f} s SVDs: ratio >= "
             f"{N * RESULTS['dense_time'] / t:,.0f}x)" if "dense_time" in RESULTS else ""))
    assert out[0].shape == (D, R)


# --------------------------------------------------------------------------- SVD-family methods (#13)
#
# Dense TSV-M on T = 8 task matrices of 1024×1024: one batched torch.linalg.svd of the [8, m, n] stack
# (``methods_lowrank.tsv_matrix``) vs the same function with a Python loop of per-matrix SVDs,
# interleaved, best of LR_ROUNDS.
#
# Delta space vs the dense route: 8 adapters, r = 16, LR_LAYERS layers of LR_D×LR_D (default 1024;
# the size is LR_D=4096 LR_LAYERS=32, see the top of the file):
# each method's exact factored ``delta_fn`` over all layers vs the dense route on the same inputs
# (form the 8 updates s_t B_t A_t in float64, then the method's dense form: torch.linalg.svd per task / of the
# sum / of [τ_1 … τ_T]) timed on LR_DENSE_LAYERS layers (default 2) and scaled to LR_LAYERS (a
# full dense run is tens of minutes at 4096² on 2 cores). Same-run ratios; results compared with
# the dense route on the timed layers (relative Frobenius error of the merged update).
import os  # noqa: E402

from ckptreg.merge import methods_lowrank as ML  # noqa: E402

LR_T, LR_R = 8, 16
LR_D = int(os.environ.get("LR_D", "1024"))
LR_LAYERS = int(os.environ.get("LR_LAYERS", "4"))
LR_DENSE_LAYERS = int(os.environ.get("LR_DENSE_LAYERS", "2"))
LR_ROUNDS = int(os.environ.get("LR_ROUNDS", "2"))
LR_DENSE_M = int(os.environ.get("LR_DENSE_M", "1024"))
LR_PARAMS = {"alpha": 1.0, "lam": 1.0, "eta": 40.0, "density": 0.2, "seed": 0}
LR_METHODS = {"tsv": (ML.tsv_delta, ML.tsv_matrix), "iso_c": (ML.iso_c_delta, ML.iso_c_matrix),
              "star": (ML.star_delta, ML.star_matrix), "knots_ties": (ML.knots_delta, ML.knots_matrix)}


def test_tsv_dense_batched_vs_loop(benchmark):
    g = torch.Generator().manual_seed(0)
    taus = torch.randn(LR_T, LR_DENSE_M, LR_DENSE_M, generator=g) * 0.01
    best = {"loop": float("inf"), "batched": float("inf")}
    out = {}
    for _ in range(LR_ROUNDS):
        for name, batched in (("loop", False), ("batched", True)):
            t0 = time.perf_counter()
            out[name] = ML.tsv_matrix(taus, None, {}, batched=batched)
            best[name] = min(best[name], time.perf_counter() - t0)
    err = float((out["batched"] - out["loop"]).norm() / out["loop"].norm())
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    ratio = best["loop"] / best["batched"]
    benchmark.extra_info.update(speed_ratio=ratio, rel_err=err, loop_s=best["loop"], batched_s=best["batched"])
    print(f"\n[dense TSV-M, T={LR_T}, {LR_DENSE_M}x{LR_DENSE_M}, best of {LR_ROUNDS}] per-matrix loop "
          f"{best['loop']:.2f} s, batched {best['batched']:.2f} s, speed ratio {ratio:.2f}x, rel diff {err:.1e}")
    assert err < 1e-5


@pytest.fixture(scope="module")
def lr_layers():
    g = torch.Generator().manual_seed(42)
    scales = [2.0, 1.0, 0.5, 2.0, 1.0, 0.5, 2.0, 1.0]
    return [[(torch.randn(LR_R, LR_D, generator=g) / LR_D ** 0.5, torch.randn(LR_D, LR_R, generator=g) * 0.02, s)
             for s in scales] for _ in range(LR_LAYERS)]


@pytest.mark.parametrize("method", list(LR_METHODS))
def test_lowrank_delta_vs_dense_route(benchmark, lr_layers, method):
    dfn, mfn = LR_METHODS[method]
    name = "layer.lora_A.weight"

    def delta_all():
        return [dfn(fs, None, LR_PARAMS, None, name=name) for fs in lr_layers]

    delta_all()   # warm-up
    t_delta = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        got = delta_all()
        t_delta = min(t_delta, time.perf_counter() - t0)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    # per-method override (LR_DENSE_LAYERS_TSV=1 ...): the dense TSV-M / STAR routes run ~10 / 8
    # float64 SVDs of LR_D² per layer (~40 s each at 4096² on 2 shared cores)
    nd = min(int(os.environ.get(f"LR_DENSE_LAYERS_{method.upper()}", LR_DENSE_LAYERS)), LR_LAYERS)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    dense = []
    for fs in lr_layers[:nd]:
        # the formed updates in float64 (METHODS.md: delta space must equal the dense float64
        # computation): float32-formed updates of 4096² have rounding-noise singular values above
        # σ_1·1e-6, so the rank rule of Iso-C/TSV/KnOTS picks noise directions (measured: a float32
        # dense Iso-C 8.8e-2 off at 4096², 1.5e-6 at 1024²)
        dt = torch.float64
        taus = torch.stack([s * (b.to(dt) @ a.to(dt)) for a, b, s in fs])
        dense.append(mfn(taus, None, LR_PARAMS, name=name))
        del taus
    t_dense = (time.perf_counter() - t0) * LR_LAYERS / max(1, nd)
    if nd == 0:   # LR_DENSE_LAYERS=0: the factored side only
        print(f"\n[{method} delta space, T={LR_T}, r={LR_R}, {LR_LAYERS} layers of {LR_D}x{LR_D}] factored "
              f"{t_delta * 1e3:.1f} ms (dense route not run)")
        return
    err = max(float((B.double() @ A.double() - D.double()).norm() / D.double().norm())
              for (B, A), D in zip(got[:nd], dense))
    ratio = t_dense / t_delta
    benchmark.extra_info.update(speed_ratio=ratio, rel_err=err, dense_s=t_dense, dense_layers_timed=nd)
    print(f"\n[{method} delta space, T={LR_T}, r={LR_R}, {LR_LAYERS} layers of {LR_D}x{LR_D}] factored "
          f"{t_delta * 1e3:.1f} ms, dense route {t_dense:.1f} s (timed on {nd} layer(s), scaled to {LR_LAYERS}), "
          f"speed ratio {ratio:,.0f}x, max rel err vs the dense float64 route {err:.1e} "
          f"(load average {load0:.2f} -> {os.getloadavg()[0]:.2f}; "
          + (f"issue #13's target >= 100x: {'met' if ratio >= 100 else 'NOT met'})"
             if (LR_D, LR_LAYERS) == (4096, 32) else "issue #13's >= 100x target is for LR_D=4096 LR_LAYERS=32)"))
    assert err < 1e-5

"""The SVD-family delta_fns on a leading layer dimension: one batched call vs a loop of per-layer
calls (issue #13 item 3), on the same inputs, interleaved, best of LRB_ROUNDS.

Run (no CI runs it; a few minutes on 2 shared cores at the default sizes):
    python -m pytest bench/bench_lowrank_batched.py -s -p no:cacheprovider

Scenario: 8 adapters (T = 8), r = 16 each, LRB_LAYERS same-shape layers (default 8) of
LRB_D×LRB_D (default "1024,4096": both sizes), scales 2, 1, 0.5 repeated; tsv, iso_c, star and
knots_ties (density 0.2) with ``r_out`` None (the exact result, Σr = 128). Per-layer: the 2-D call
on each layer in turn (what the delta-space merge does for a method whose ``delta_fn`` is not
batched); batched: one call on the [L, ..] stacks (the stacking is timed too). Reported: both
times, the speed ratio per-layer / batched and the largest relative difference of a layer's merged
update B @ A between the two (float rounding: < 1e-6 asserted).

Env knobs: LRB_D (comma-separated sizes), LRB_LAYERS, LRB_ROUNDS (default 3), LRB_METHODS
(comma-separated subset of tsv,iso_c,star,knots_ties), LRB_THREADS (torch threads; the wall time
on a shared machine swings by 5x with the load, the process CPU time at 1 thread is the steadier
figure and is printed too).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from ckptreg.merge import methods_lowrank as ML

T, R = 8, 16
SIZES = [int(x) for x in os.environ.get("LRB_D", "1024,4096").split(",") if x]
LAYERS = int(os.environ.get("LRB_LAYERS", "8"))
ROUNDS = int(os.environ.get("LRB_ROUNDS", "3"))
PARAMS = {"alpha": 1.0, "lam": 1.0, "eta": 40.0, "density": 0.2}
METHODS = {"tsv": ML.tsv_delta, "iso_c": ML.iso_c_delta, "star": ML.star_delta, "knots_ties": ML.knots_delta}
CHOSEN = [m for m in os.environ.get("LRB_METHODS", ",".join(METHODS)).split(",") if m]
if os.environ.get("LRB_THREADS"):
    torch.set_num_threads(int(os.environ["LRB_THREADS"]))


def layers(d, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = [2.0, 1.0, 0.5] * 3
    return [[(torch.randn(R, d, generator=g) / d ** 0.5, torch.randn(d, R, generator=g) * 0.02, scales[t])
             for t in range(T)] for _ in range(L)]


def compare(method, d, L=LAYERS, rounds=ROUNDS):
    """(per-layer s, batched s, max rel diff, per-layer CPU s, batched CPU s) for one method and
    size, best of ``rounds`` (wall and process CPU time each)."""
    fn = METHODS[method]
    per = layers(d, L)
    names = [f"model.layers.{i}.q_proj.lora_A.weight" for i in range(L)]

    def loop():
        return [fn(fs, None, PARAMS, None, name=nm) for fs, nm in zip(per, names)]

    def batched():
        fs = [(torch.stack([per[i][t][0] for i in range(L)]), torch.stack([per[i][t][1] for i in range(L)]),
               per[0][t][2]) for t in range(T)]
        return fn(fs, None, PARAMS, None, name=names)

    best = {"loop": float("inf"), "batched": float("inf")}
    cpu = dict(best)
    out = {}
    for _ in range(rounds):
        for nm, f in (("loop", loop), ("batched", batched)):
            c0, t0 = time.process_time(), time.perf_counter()
            out[nm] = f()
            best[nm] = min(best[nm], time.perf_counter() - t0)
            cpu[nm] = min(cpu[nm], time.process_time() - c0)
    B, A = out["batched"]
    err = max(float((B[i].double() @ A[i].double() - b.double() @ a.double()).norm()
                    / max(float((b.double() @ a.double()).norm()), 1e-300)) for i, (b, a) in enumerate(out["loop"]))
    return best["loop"], best["batched"], err, cpu["loop"], cpu["batched"]


@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("method", CHOSEN)
def test_batched_vs_per_layer(method, d):
    load0 = os.getloadavg()[0]
    t_loop, t_bat, err, c_loop, c_bat = compare(method, d)
    print(f"\n[{method}, T={T}, r={R}, {LAYERS} layers of {d}x{d}, {torch.get_num_threads()} thread(s), best of "
          f"{ROUNDS}] per-layer {t_loop:.3f} s, batched {t_bat:.3f} s, ratio {t_loop / t_bat:.2f}x; CPU time "
          f"{c_loop:.3f} s vs {c_bat:.3f} s, ratio {c_loop / c_bat:.2f}x; max rel diff {err:.1e} "
          f"(load average {load0:.2f} -> {os.getloadavg()[0]:.2f})")
    assert err < 1e-6


if __name__ == "__main__":
    for d in SIZES:
        for m in CHOSEN:
            test_batched_vs_per_layer(m, d)

"""PEFT ``add_weighted_adapter(combination_type="svd")`` vs ckptreg's delta-space linear merge +
rank truncation, on the same real PEFT adapter folders (issue #13, "Benchmarks").

Run (default, small: 4 modules of 1024², ~15 s):
    python -m pytest bench/bench_peft.py -s -p no:cacheprovider --benchmark-disable
Full size (the issue's "4 adapters x 4 modules of 4096²"; ~4 min on 2 cores: PEFT ~50 s per round, the
float64 reference SVDs ~3 min):
    PEFT_D=4096 python -m pytest bench/bench_peft.py -s -p no:cacheprovider --benchmark-disable

Env knobs: PEFT_D (module size d×d, default 1024), PEFT_N (adapters, 4), PEFT_R (rank, 16),
PEFT_ROUNDS (rounds of each side, best taken; default 1: the PEFT side is one dense SVD per module).

Setup: a tiny torch model with 4 ``nn.Linear(d, d)`` modules (q/k/v/o_proj); N adapters made with
PEFT's ``get_peft_model`` (r = 16, lora_alpha = 32, 16, 32, 8: mixed scalings), their lora_A /
lora_B randomised (PEFT inits B = 0) and written with ``save_pretrained`` (real adapter folders),
then registered in a real DuckDB registry. Uniform weights 1/N on both sides (PEFT sums its weights,
ckptreg's linear normalises them).

Measured in the same run:
(a) the op alone: ``lowrank.lora_delta_merge`` on the in-memory factors, one call per module (and
    ``lora_delta_merge_batched`` over the 4 same-shape modules, what the engine does), vs PEFT's
    ``add_weighted_adapter(..., combination_type="svd", svd_rank=r)`` on the loaded model (per
    module: form Σ w_i s_i B_i A_i, a full float32 ``torch.linalg.svd``, keep r).
(b) the whole process: ``ckptreg merge --run p --last N --method linear --space delta --rank r``
    in-process (``click.testing.CliRunner``: registry lookup, reading the folders, merge, atomic
    write, lineage registration) vs PEFT: ``PeftModel.from_pretrained`` + N−1 ``load_adapter`` +
    ``add_weighted_adapter`` + ``save_pretrained``. PEFT also needs the base model in memory; its
    construction (here a fresh random init) is timed separately and NOT counted in PEFT's process
    (conservative for the ratio).
Agreement: merged updates s·B·A per module (ckptreg: its output folder read back, s = lora_alpha/r
of its adapter_config.json; PEFT: ``get_delta_weight("merged")``) against each other and against the
float64 best rank-r approximation of Σ w_i s_i B_i A_i (relative Frobenius error).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from click.testing import CliRunner  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ckptreg import lowrank as L  # noqa: E402
from ckptreg.cli import main  # noqa: E402
from ckptreg.registry import Registry  # noqa: E402

D = int(os.environ.get("PEFT_D", "1024"))
N = int(os.environ.get("PEFT_N", "4"))
R = int(os.environ.get("PEFT_R", "16"))
ROUNDS = int(os.environ.get("PEFT_ROUNDS", "1"))
MODS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALPHAS = [32, 16, 32, 8]
RESULTS: dict = {}


class _Tiny(torch.nn.Module):
    def __init__(self, d=D):
        super().__init__()
        for m in MODS:
            setattr(self, m, torch.nn.Linear(d, d, bias=False))

    def forward(self, x):
        return sum(getattr(self, m)(x) for m in MODS)


def _x(r):
    return f"{r:,.0f}x" if r >= 100 else f"{r:.2f}x"


def _load():
    return os.getloadavg()[0]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_peft")
    dirs, factors = [], []
    for i in range(N):
        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHAS[i % len(ALPHAS)], target_modules=list(MODS), lora_dropout=0.0)
        m = peft.get_peft_model(_Tiny(), cfg)
        g = torch.Generator().manual_seed(100 + i)
        fs = {}
        with torch.no_grad():
            for name, prm in m.named_parameters():
                if "lora_A" in name:
                    prm.copy_(torch.randn(prm.shape, generator=g) / D ** 0.5)
                elif "lora_B" in name:
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
            for mod in MODS:
                layer = getattr(m.base_model.model, mod)
                fs[mod] = (layer.lora_A["default"].weight.detach().clone(),
                           layer.lora_B["default"].weight.detach().clone(), float(layer.scaling["default"]))
        folder = d / "run" / f"checkpoint-{100 * (i + 1)}"
        m.save_pretrained(str(folder))
        dirs.append(folder)
        factors.append(fs)
        del m
    db = d / "reg.duckdb"
    reg = Registry(db)
    for i, f in enumerate(dirs):
        reg.add(f, run="p", step=100 * (i + 1))
    reg.close() if hasattr(reg, "close") else None
    return {"dir": d, "db": str(db), "dirs": dirs, "factors": factors}


def _reference(factors, mod):
    """float64 best rank-R approximation of Σ (1/N) s_i B_i A_i (METHODS.md, PEFT 'svd')."""
    W = sum((s / N) * (b.double() @ a.double()) for a, b, s in (f[mod] for f in factors))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U[:, :R] * S[:R]) @ Vh[:R]


def _rel(x, ref):
    return float((x.double() - ref).norm() / ref.norm())


def _ckptreg_updates(folder):
    folder = Path(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == R, cfg
    s = cfg["lora_alpha"] / cfg["r"]
    t = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for mod in MODS:
        a = t[f"base_model.model.{mod}.lora_A.weight"]
        b = t[f"base_model.model.{mod}.lora_B.weight"]
        assert a.shape == (R, D) and b.shape == (D, R)
        out[mod] = s * (b.double() @ a.double())
    return out


def _peft_process(adapters, out):
    """PEFT's whole route, timed by phase: load (from_pretrained + load_adapter), the op
    (add_weighted_adapter svd), save (save_pretrained of the merged adapter)."""
    t0 = time.perf_counter()
    base = _Tiny()
    t_base = time.perf_counter() - t0
    dirs = adapters["dirs"]
    t0 = time.perf_counter()
    m = peft.PeftModel.from_pretrained(base, str(dirs[0]), adapter_name="a0")
    for i, f in enumerate(dirs[1:], 1):
        m.load_adapter(str(f), adapter_name=f"a{i}")
    t1 = time.perf_counter()
    m.add_weighted_adapter([f"a{i}" for i in range(N)], [1.0 / N] * N, "merged", combination_type="svd",
                           svd_rank=R)
    t2 = time.perf_counter()
    m.save_pretrained(str(out), selected_adapters=["merged"])
    t3 = time.perf_counter()
    ups = {mod: getattr(m.base_model.model, mod).get_delta_weight("merged").detach().double() for mod in MODS}
    return {"base": t_base, "load": t1 - t0, "op": t2 - t1, "save": t3 - t2, "total": t3 - t0}, ups


def _ckptreg_process(adapters, k):
    out = adapters["dir"] / f"ck_{k}"
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["--db", adapters["db"], "merge", "--run", "p", "--last", str(N), "--method",
                                    "linear", "--space", "delta", "--rank", str(R), "-o", str(out), "--name",
                                    f"ck_{k}", "--quiet", "--json"])
    t = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    return t, json.loads(res.output)


def test_peft_whole_process_and_op(benchmark, adapters):
    load0 = _load()
    peft_best, peft_ups = None, None
    ck_best, ck_path = float("inf"), None
    for k in range(ROUNDS):   # interleaved
        ph, ups = _peft_process(adapters, adapters["dir"] / f"peft_{k}")
        if peft_best is None or ph["total"] < peft_best["total"]:
            peft_best = ph
        peft_ups = ups
        t, out = _ckptreg_process(adapters, k)
        if t < ck_best:
            ck_best, ck_path = t, out["path"] if "path" in out else None
    if ck_path is None:
        ck_path = str(adapters["dir"] / "ck_0")
    # the op alone on in-memory factors, per module (best of 5 after a warm-up), and batched
    fac = adapters["factors"]

    def op_per_module():
        return {mod: L.lora_delta_merge([f[mod][1] for f in fac], [f[mod][0] for f in fac],
                                        [f[mod][2] for f in fac], [1.0 / N] * N, R) for mod in MODS}

    def op_batched():
        Bs = [torch.stack([f[mod][1] for mod in MODS]) for f in fac]
        As = [torch.stack([f[mod][0] for mod in MODS]) for f in fac]
        return L.lora_delta_merge_batched(Bs, As, [f[MODS[0]][2] for f in fac], [1.0 / N] * N, R)

    times = {}
    for name, fn in (("per_module", op_per_module), ("batched", op_batched)):
        fn()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            res = fn()
            best = min(best, time.perf_counter() - t0)
        times[name] = (best, res)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    load1 = _load()
    # agreement of the merged updates
    ours = _ckptreg_updates(ck_path)
    op_out = times["per_module"][1]
    err = {"ckptreg_vs_ref": 0.0, "peft_vs_ref": 0.0, "ckptreg_vs_peft": 0.0, "op_vs_ref": 0.0}
    for mod in MODS:
        ref = _reference(fac, mod)
        err["ckptreg_vs_ref"] = max(err["ckptreg_vs_ref"], _rel(ours[mod], ref))
        err["peft_vs_ref"] = max(err["peft_vs_ref"], _rel(peft_ups[mod], ref))
        err["ckptreg_vs_peft"] = max(err["ckptreg_vs_peft"], _rel(ours[mod], peft_ups[mod]))
        b, a = op_out[mod]
        err["op_vs_ref"] = max(err["op_vs_ref"], _rel(b.double() @ a.double(), ref))
    r_proc = peft_best["total"] / ck_best
    r_op = peft_best["op"] / times["per_module"][0]
    r_opb = peft_best["op"] / times["batched"][0]
    benchmark.extra_info.update(peft=peft_best, ckptreg_process_s=ck_best, op_per_module_s=times["per_module"][0],
                                op_batched_s=times["batched"][0], ratio_process=r_proc, ratio_op=r_op,
                                ratio_op_batched=r_opb, **err)
    RESULTS.update(benchmark.extra_info)
    print(f"\n[PEFT svd vs ckptreg delta linear + rank {R}: {N} adapters x {len(MODS)} modules of {D}x{D}, "
          f"best of {ROUNDS}; load average {load0:.2f} -> {load1:.2f}]\n"
          f"  (a) op alone: PEFT add_weighted_adapter(svd) {peft_best['op']:.2f} s; ckptreg lora_delta_merge "
          f"{times['per_module'][0] * 1e3:.1f} ms per-module loop ({_x(r_op)}), "
          f"{times['batched'][0] * 1e3:.1f} ms batched over the {len(MODS)} modules ({_x(r_opb)})\n"
          f"  (b) whole process: PEFT load {peft_best['load']:.2f} s + op {peft_best['op']:.2f} s + save "
          f"{peft_best['save']:.2f} s = {peft_best['total']:.2f} s (+ base model build {peft_best['base']:.2f} s, "
          f"not counted); ckptreg merge --space delta --rank {R} (CLI in-process) {ck_best:.3f} s; "
          f"ratio {_x(r_proc)}\n"
          f"  merged updates s*B*A, max rel Frobenius error over modules: ckptreg vs float64 reference "
          f"{err['ckptreg_vs_ref']:.1e}, PEFT (float32 SVD) vs reference {err['peft_vs_ref']:.1e}, "
          f"ckptreg vs PEFT {err['ckptreg_vs_peft']:.1e}, op alone vs reference {err['op_vs_ref']:.1e}")
    assert err["ckptreg_vs_ref"] < 1e-5 and err["op_vs_ref"] < 1e-5
    # PEFT's float32 full SVD bounds the agreement with it
    assert err["ckptreg_vs_peft"] < max(1e-4, 2 * err["peft_vs_ref"])

"""Engine benchmarks (pytest-benchmark), each reported as a ratio to a limit measured in the same run.

1. End-to-end merge of N=8 checkpoints (MWA weights, registry lookups, fsync'ed atomic output,
   lineage registration) vs the machine's limit for the same I/O: a plain numpy read of every
   input file once + a write (and fsync) of one output of the same size. Inputs are in the page
   cache for both (warm), so the limit is memory bandwidth + the write path.
2. A sweep of 24 outputs (K = 2,3,4,5,8,10 × {uniform, MWA p = 0.5, 0.7, 0.9}) in one pass vs the
   same 24 merges run one by one.
3. A delta-space LoRA merge (3 adapters, 32 layers × 4 modules, d = 1024, r = 16) with same-shape
   modules batched into one factored SVD per group vs one module at a time (group size 1: each
   module through lowrank's per-layer torch route, as the engine did before grouping).

Run: ``pytest bench/bench_engine.py -s --benchmark-only`` (sizes: CKPTREG_BENCH_MIB per
checkpoint, default 256 for the N=8 merge). The machine may be shared: the summary prints the
load average next to the numbers.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ckptreg import engine, ops  # noqa: E402
from ckptreg.registry import Registry  # noqa: E402
from ckptreg.writer import StreamingWriter  # noqa: E402
from helpers_files import write_peft_adapter  # noqa: E402

MiB = 1 << 20
SIZE_MIB = int(os.environ.get("CKPTREG_BENCH_MIB", "256"))
RESULTS: dict = {}


def _write_run(d: Path, n: int, mib: int, run: str, n_tensors: int = 8, dtype="F32"):
    reg = Registry(d / "reg.duckdb")
    item = 4 if dtype == "F32" else 2
    per = mib * MiB // item // n_tensors
    cols = 4096
    rows = per // cols
    plan = [(f"model.layers.{j}.weight", dtype, (rows, cols)) for j in range(n_tensors)]
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows * cols, generator=g)
    tdt = torch.float32 if dtype == "F32" else torch.bfloat16
    paths = []
    for i in range(n):
        p = d / f"{run}_step_{(i + 1) * 100}.safetensors"
        with StreamingWriter(p, plan) as w:
            for j, (name, _, shape) in enumerate(plan):
                w.write(name, (base * (1 + 0.01 * i) + 0.001 * j).to(tdt).view(shape))
        reg.add(p, run=run, step=(i + 1) * 100, metrics={"train_loss": 1.0 + 0.05 * ((i * 7) % 5)})
        paths.append(p)
    return reg, paths


def _limit(paths, out_bytes, out_path):
    """Read every input once with numpy (into one reused buffer) + write/fsync one output."""
    buf = None
    t0 = time.perf_counter()
    for p in paths:
        size = os.path.getsize(p)
        if buf is None or buf.size < size:
            buf = np.empty(size, dtype=np.uint8)
        with open(p, "rb", buffering=0) as f:
            f.readinto(memoryview(buf)[:size])
    t1 = time.perf_counter()
    with open(out_path, "wb") as f:
        f.write(memoryview(buf)[:out_bytes])
        f.flush()
        os.fsync(f.fileno())
    t2 = time.perf_counter()
    os.unlink(out_path)
    return t2 - t0, t1 - t0, t2 - t1


@pytest.fixture(scope="module")
def n8(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_n8")
    reg, paths = _write_run(d, 8, SIZE_MIB, "big")
    yield d, reg, paths
    shutil.rmtree(d, ignore_errors=True)


def test_merge_n8_vs_io_limit(benchmark, n8):
    d, reg, paths = n8
    ins = reg.select("big", 8)
    out_bytes = os.path.getsize(paths[0])
    # warm the page cache and measure the limit (best of 3)
    lim = min((_limit(paths, out_bytes, d / "limit.bin") for _ in range(3)), key=lambda x: x[0])
    k = [0]

    def run():
        k[0] += 1
        spec = engine.make_spec(reg, "mwa", ins, metric="train_loss", penalty=0.7, selection={"last": 8},
                                name=f"bench_{k[0]}", out=str(d / f"out_{k[0]}.safetensors"))
        engine.merge(reg, spec)
        os.unlink(spec.out)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    t = benchmark.stats.stats.min
    ratio = t / lim[0]
    gbs = 8 * out_bytes / t / 1e9
    benchmark.extra_info.update({"limit_s": lim[0], "ratio_to_limit": ratio, "input_GBps": gbs,
                                 "backend": ops.backend()})
    RESULTS["merge"] = (t, lim, ratio, gbs, out_bytes)


@pytest.fixture(scope="module")
def run12(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_sweep")
    reg, paths = _write_run(d, 12, int(os.environ.get("CKPTREG_BENCH_SWEEP_MIB", "32")), "sw", n_tensors=4)
    yield d, reg
    shutil.rmtree(d, ignore_errors=True)


def _specs(reg, out_dir, tag):
    specs = []
    for k in (2, 3, 4, 5, 8, 10):
        ins = reg.select("sw", k)
        specs.append(engine.make_spec(reg, "uniform", ins, selection={"last": k}, name=f"{tag}_last_{k}_u"))
        for p in (0.5, 0.7, 0.9):
            s = engine.make_spec(reg, "mwa", ins, metric="train_loss", penalty=p, selection={"last": k})
            s.name = f"{tag}_{s.name}"
            specs.append(s)
    for s in specs:
        s.out = str(out_dir / f"{s.name}.safetensors")
    assert len(specs) == 24
    return specs


def test_sweep24_vs_separate(benchmark, run12):
    d, reg = run12
    k = [0]

    def separate():
        k[0] += 1
        out = d / f"sep{k[0]}"
        out.mkdir()
        t0 = time.perf_counter()
        for s in _specs(reg, out, f"sep{k[0]}"):
            engine.merge(reg, s)
        t = time.perf_counter() - t0
        shutil.rmtree(out)
        return t

    t_sep = min(separate() for _ in range(2))

    def sweep():
        k[0] += 1
        out = d / f"sw{k[0]}"
        out.mkdir()
        engine.sweep(reg, _specs(reg, out, f"sw{k[0]}"))
        shutil.rmtree(out)

    benchmark.pedantic(sweep, rounds=2, iterations=1)
    t_sw = benchmark.stats.stats.min
    benchmark.extra_info.update({"separate_s": t_sep, "speedup": t_sep / t_sw})
    RESULTS["sweep"] = (t_sw, t_sep)


@pytest.fixture(scope="module")
def lora3(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_delta")
    reg = Registry(d / "reg.duckdb")
    r, dim, layers = 16, 1024, 32
    mods = ["q_proj", "k_proj", "v_proj", "o_proj"]
    for i, step in enumerate((10, 20, 30)):
        g = torch.Generator().manual_seed(i)
        t = {}
        for layer in range(layers):
            for m in mods:
                pre = f"base_model.model.model.layers.{layer}.self_attn.{m}"
                t[f"{pre}.lora_A.weight"] = torch.randn(r, dim, generator=g) / dim ** 0.5
                t[f"{pre}.lora_B.weight"] = torch.randn(dim, r, generator=g) * 0.01
        folder = write_peft_adapter(d / "run" / f"checkpoint-{step}", t, r=r, alpha=32, target_modules=mods, d=dim)
        reg.add(folder, run="lora", step=step, metrics={"train_loss": 1.0 / (1 + i)})
    yield d, reg
    shutil.rmtree(d, ignore_errors=True)


def test_delta_grouped_vs_per_module(benchmark, lora3, monkeypatch):
    d, reg = lora3
    ins = reg.select("lora", 3)
    k = [0]

    def run():
        k[0] += 1
        spec = engine.make_spec(reg, "linear", ins, selection={"last": 3}, name=f"delta_{k[0]}",
                                out=str(d / f"delta_{k[0]}"))
        t0 = time.perf_counter()
        engine.merge(reg, spec, space="delta")
        t = time.perf_counter() - t0
        shutil.rmtree(spec.out)
        return t

    monkeypatch.setattr(engine._DeltaCache, "GROUP_LAYERS", 1)
    t_one = min(run() for _ in range(3))
    monkeypatch.undo()
    benchmark.pedantic(run, rounds=3, iterations=1)
    t_grp = benchmark.stats.stats.min
    benchmark.extra_info.update({"per_module_s": t_one, "speedup": t_one / t_grp})
    RESULTS["delta"] = (t_grp, t_one)


def teardown_module(module):
    load = os.getloadavg()
    lines = [f"\nckptreg engine benchmarks (backend {ops.backend()}, {os.cpu_count()} cpus, "
             f"load avg {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f})"]
    if "merge" in RESULTS:
        t, lim, ratio, gbs, ob = RESULTS["merge"]
        lines.append(f"  merge N=8 x {ob / MiB:.0f} MiB (MWA): {t:.2f} s  = {ratio:.2f}x the I/O limit "
                     f"{lim[0]:.2f} s (read {lim[1]:.2f} s + write/fsync {lim[2]:.2f} s); inputs at {gbs:.2f} GB/s")
    if "sweep" in RESULTS:
        t_sw, t_sep = RESULTS["sweep"]
        lines.append(f"  sweep of 24 outputs: {t_sw:.2f} s vs 24 separate merges {t_sep:.2f} s "
                     f"= {t_sep / t_sw:.2f}x faster")
    if "delta" in RESULTS:
        t_g, t_1 = RESULTS["delta"]
        lines.append(f"  delta-space merge, 128 LoRA modules x 3 adapters: {t_g:.3f} s grouped vs {t_1:.3f} s "
                     f"one module at a time = {t_1 / t_g:.2f}x faster")
    sys.stdout.write("\n".join(lines) + "\n")

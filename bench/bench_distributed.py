"""Distributed merge benchmark (issue #11): N full models merged by 1 rank vs R ranks (gloo, this
machine), linear and TIES, wall time of the whole command (process start-up included) and of
the merge alone (printed by each run).

    python bench/bench_distributed.py [--models 8] [--mib 640] [--ranks 2] [--dir /tmp/ckptreg-bench-dist]

The models are created once under --dir (reused across runs: same sizes, same seed); each run
merges into a fresh output folder with a fresh registry copy, so nothing is up to date.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_models(d: Path, n: int, mib: int, layers: int = 16) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    per = mib * (1 << 20) // 4 // layers          # float32 elements per layer tensor
    cols = 4096
    rows = max(1, per // cols)
    out = []
    for i in range(n):
        p = d / "models" / f"step_{(i + 1) * 100}.safetensors"
        out.append(p)
        if p.exists() and p.stat().st_size >= layers * rows * cols * 4:
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        save_file({f"layers.{k:02d}.weight": torch.randn(rows, cols, generator=g) for k in range(layers)}, str(p))
    return out


def registry(d: Path, models) -> Path:
    from ckptreg.registry import Registry

    db = d / "reg.duckdb"
    if not db.exists():
        reg = Registry(db)
        for i, m in enumerate(models):
            reg.add(m, run="bench", step=(i + 1) * 100, metrics={"train_loss": 1.0 + 1.0 / (i + 1)})
    return db


def run(db: Path, work: Path, ranks: int, method: list[str], tag: str) -> float:
    run_db = work / f"{tag}.duckdb"
    shutil.copy(db, run_db)
    out = work / f"out-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "ckptreg", "--db", str(run_db), "merge", "--run", "bench", "-q",
           "-o", str(out)] + method
    if ranks > 1:
        cmd += ["--nproc-per-node", str(ranks)]
    else:   # one process writes one .safetensors file (ranks write a folder of shards)
        cmd[cmd.index(str(out))] = str(out) + ".safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{tag} failed: {r.stderr[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    Path(str(out) + ".safetensors").unlink(missing_ok=True)
    return dt


def worker(argv) -> None:
    """``--worker DB OUT METHOD-ARGS-JSON``: one merge through the library, timed on rank 0 from
    a barrier after start-up (process group joined) to the registered result."""
    from ckptreg import api, engine
    from ckptreg.merge import distributed as D
    from ckptreg.registry import Registry

    db, out, margs = argv[0], argv[1], json.loads(argv[2])
    reg = Registry(db)
    spec = api.plan_merge(reg, run="bench", last=margs["last"], method=margs["method"],
                          params=margs.get("params") or {}, base=margs.get("base"), out=out)
    co = D.current()
    if co.active:
        import torch.distributed as dist

        dist.barrier(group=D._group())
    t = time.perf_counter()
    engine.merge(reg, spec)
    dt = time.perf_counter() - t
    if co.lead:
        print(f"MERGE_SECONDS {dt:.3f}", flush=True)
    D.shutdown(True)


def run_inner(db: Path, work: Path, ranks: int, margs: dict, tag: str) -> float:
    run_db = work / f"{tag}.duckdb"
    shutil.copy(db, run_db)
    out = work / (f"in-{tag}" + (".safetensors" if ranks == 1 else ""))
    shutil.rmtree(out, ignore_errors=True)
    args = [str(Path(__file__).resolve()), "--worker", str(run_db), str(out), json.dumps(margs)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"] + args
    else:
        cmd = [sys.executable] + args
    r = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{tag} failed: {r.stderr[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    if out.is_file():
        out.unlink()
    return float(next(x for x in r.stdout.splitlines() if x.startswith("MERGE_SECONDS")).split()[1])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--mib", type=int, default=640)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--dir", default="/tmp/ckptreg-bench-dist")
    a = ap.parse_args()
    d = Path(a.dir)
    t = time.perf_counter()
    models = make_models(d, a.models, a.mib)
    db = registry(d, models)
    print(f"inputs: {a.models} x {a.mib} MiB under {d} ({time.perf_counter() - t:.1f}s to create/check)")
    work = d / "work"
    work.mkdir(exist_ok=True)
    rows = []
    n = a.models
    for name, method in (("linear", ["--last", str(n), "--method", "linear"]),   # N inputs
                         ("ties", ["--last", str(n - 1), "--method", "ties", "--density", "0.2",
                                   "--base", "first"])):                       # N-1 inputs + the base
        for ranks in (1, a.ranks):
            best = min(run(db, work, ranks, method, f"{name}-{ranks}-{k}") for k in range(a.repeat))
            margs = {"last": int(method[1]), "method": name}
            if name == "ties":
                margs.update(params={"density": 0.2}, base="first")
            inner = min(run_inner(db, work, ranks, margs, f"{name}-{ranks}-i{k}") for k in range(a.repeat))
            rows.append({"method": name, "ranks": ranks, "seconds": round(best, 2), "merge_seconds": round(inner, 2),
                         "GB_per_s_read": round(a.mib * (1 << 20) * (a.models) / inner / 1e9, 2)})
            print(json.dumps(rows[-1]), flush=True)
    for name in ("linear", "ties"):
        one = next(r["seconds"] for r in rows if r["method"] == name and r["ranks"] == 1)
        many = next(r["seconds"] for r in rows if r["method"] == name and r["ranks"] == a.ranks)
        print(f"{name}: {a.ranks} ranks / 1 rank wall time = {many / one:.2f} (speed-up {one / many:.2f}x)")
        one = next(r["merge_seconds"] for r in rows if r["method"] == name and r["ranks"] == 1)
        many = next(r["merge_seconds"] for r in rows if r["method"] == name and r["ranks"] == a.ranks)
        print(f"{name}: {a.ranks} ranks / 1 rank merge time (after start-up) = {many / one:.2f} "
              f"(speed-up {one / many:.2f}x)")


if __name__ == "__main__":
    main()

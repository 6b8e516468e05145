"""Peak anonymous memory of a streamed merge: 8 checkpoints × 256 MiB stay within
largest tensor + 256 MiB above the process's baseline (after imports), whatever N and model size.

The merge runs in a subprocess; this process samples its RssAnon from /proc/<pid>/status every
~2 ms (VmHWM would count the file-backed mmap pages of the inputs, which are not the engine's
allocations)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ckptreg.registry import Registry
from ckptreg.writer import StreamingWriter

MiB = 1 << 20
N = 8
TENSOR_ELEMS = 16 << 20          # 64 MiB of float32 each
TENSORS_PER_FILE = 4             # 256 MiB per checkpoint

CHILD = r"""
import json, sys, os
def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
import torch
from ckptreg import engine, ops
from ckptreg.registry import Registry
reg = Registry(sys.argv[1])
ops.available()
print("BASE", rss_anon(), flush=True)
ins = reg.select("big", int(sys.argv[3]))
kw = json.loads(sys.argv[4])
spec = engine.make_spec(reg, kw.pop("method"), ins, selection={"last": len(ins)}, out=sys.argv[2], **kw)
c = engine.merge(reg, spec)
print("DONE", c.id, rss_anon(), flush=True)
"""

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")


def _rss_anon(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _run_sampled(args, timeout=120):
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            v = _rss_anon(p.pid)
            if v is not None:
                peak[0] = max(peak[0], v)
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        stop.set()
        th.join()
    assert p.returncode == 0, err[-3000:]
    base = int(next(line.split()[1] for line in out.splitlines() if line.startswith("BASE")))
    return base, peak[0], out


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("mem")
    reg = Registry(d / "reg.duckdb")
    g = torch.Generator().manual_seed(0)
    plan = [(f"layer{j}.weight", "F32", (TENSOR_ELEMS // 4096, 4096)) for j in range(TENSORS_PER_FILE)]
    shared = torch.randn(TENSOR_ELEMS, generator=g)
    for i in range(N):
        p = d / f"step_{(i + 1) * 100}.safetensors"
        with StreamingWriter(p, plan) as w:
            for j, (name, _, shape) in enumerate(plan):
                # cheap distinct data: a shared random vector, shifted and scaled per file/tensor
                w.write(name, (shared * (1 + 0.01 * i) + 0.001 * (i + j)).view(shape))
        reg.add(p, run="big", step=(i + 1) * 100, metrics={"train_loss": 1.0 + 0.1 * i})
    del shared
    yield d
    for f in d.iterdir():
        if f.is_file():
            f.unlink()
        else:
            import shutil

            shutil.rmtree(f, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [{"method": "mwa", "metric": "train_loss", "penalty": 0.7},
                                {"method": "ties", "base": "first", "params": {"density": 0.2}}],
                         ids=["mwa", "ties"])
def test_peak_anon_memory_bounded(big_run, kw):
    import json

    out = big_run / f"merged_{kw['method']}.safetensors"
    t0 = time.time()
    base, peak, _ = _run_sampled([sys.executable, "-c", CHILD, str(big_run / "reg.duckdb"), str(out), str(N),
                                  json.dumps(kw)])
    elapsed = time.time() - t0
    largest = TENSOR_ELEMS * 4
    grew = peak - base
    assert out.is_file() and out.stat().st_size > N and os.path.getsize(out) >= TENSORS_PER_FILE * largest
    print(f"\n{kw['method']}: baseline {base / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, grew {grew / MiB:.0f} MiB "
          f"(bound {(largest + 256 * MiB) / MiB:.0f} MiB), {elapsed:.1f}s")
    assert grew <= largest + 256 * MiB, (
        f"peak RssAnon grew {grew / MiB:.0f} MiB over the {base / MiB:.0f} MiB baseline; "
        f"bound {(largest + 256 * MiB) / MiB:.0f} MiB ({elapsed:.1f}s)")
    out.unlink()

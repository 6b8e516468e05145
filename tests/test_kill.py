"""A merge killed with SIGKILL mid-way leaves no output and no registry row; the next merge to the
same place succeeds and clears the dead temporary."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptreg.registry import Registry
from ckptreg.writer import TMP_MARK, StreamingWriter
from helpers_engine import load_any

CHILD = r"""
import sys, time, pathlib
from ckptreg import engine
from ckptreg.registry import Registry
reg = Registry(sys.argv[1])
ins = reg.select("big", 4)
spec = engine.make_spec(reg, "mwa", ins, metric="train_loss", penalty=0.7, selection={"last": 4}, out=sys.argv[2])
started = pathlib.Path(sys.argv[3])
def progress(done, total, name):
    if not started.exists():
        started.write_text("1")
    time.sleep(0.002)   # slow the merge down so the kill lands mid-way, deterministically
engine.merge(reg, spec, progress=progress, chunk_elems=1 << 16)
print("FINISHED")
"""


def _make(tmp_path, layout):
    reg = Registry(tmp_path / "reg.duckdb")
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        t = {f"w{j}": torch.randn(1 << 21, generator=g) for j in range(4)}   # 32 MiB per checkpoint
        if layout == "file":
            p = tmp_path / f"step_{(i + 1) * 10}.safetensors"
            with StreamingWriter(p, [(k, "F32", tuple(v.shape)) for k, v in t.items()]) as w:
                for k, v in t.items():
                    w.write(k, v)
        else:
            from helpers_files import write_hf_model

            p = write_hf_model(tmp_path / f"checkpoint-{(i + 1) * 10}", t, shards=2)
        reg.add(p, run="big", step=(i + 1) * 10, metrics={"train_loss": 1.0 + 0.1 * i})
    return reg


@pytest.mark.parametrize("layout", ["file", "sharded"])
def test_sigkill_mid_merge_leaves_nothing(tmp_path, layout):
    reg = _make(tmp_path, layout)
    out = tmp_path / "outs" / ("merged.safetensors" if layout == "file" else "merged")
    out.parent.mkdir()
    started = tmp_path / "started"
    n_before = len(reg.checkpoints())
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "reg.duckdb"), str(out), str(started)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    tmp_seen = None
    while time.time() < deadline:
        tmps = [x for x in out.parent.iterdir() if TMP_MARK in x.name]
        if tmps and started.exists():
            tmp_seen = tmps[0]
            break
        if p.poll() is not None:
            break
        time.sleep(0.001)
    assert tmp_seen is not None, p.communicate()[1][-2000:]
    time.sleep(0.3)  # well into the data
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not out.exists()
    assert len(reg.checkpoints()) == n_before
    assert all(not c.merged for c in reg.checkpoints())
    # the dead temporary is cleared by the next merge into the same folder, which succeeds
    from ckptreg import engine

    ins = reg.select("big", 4)
    spec = engine.make_spec(reg, "mwa", ins, metric="train_loss", penalty=0.7, selection={"last": 4}, out=str(out))
    c = engine.merge(reg, spec)
    assert [x for x in out.parent.iterdir() if TMP_MARK in x.name] == []
    assert reg.get(c.id).merged and set(load_any(c.path)) == {f"w{j}" for j in range(4)}

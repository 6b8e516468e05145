"""An input changed under a running merge (issue #9 "Nothing lost", item 5).

A trainer re-saving a checkpoint with ``open('wb')`` truncates it in place. The engine used to
read inputs through an mmap, and touching a truncated page of a map kills the process with
SIGBUS (leaving a temporary). Inputs are now read with ``preadv`` into reusable buffers: a
short read is a ChangedError (exit 10) naming the file, and a same-size rewrite or a replacement
by rename is caught by re-checking inode/size/mtime after the last read, before the output is
committed. Every case ends with nothing registered, no output and no ``.ckptreg-tmp`` left.

Truncation tests that could kill the interpreter on a regression run the merge in a child
process (a SIGBUS there fails the test instead of the whole session).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptreg import engine
from ckptreg.errors import ChangedError
from ckptreg.registry import Registry
from ckptreg.safetensors_io import file_ident, open_tensors

from helpers_files import write_peft_adapter

ROOT = Path(__file__).resolve().parents[1]


def _state(seed, n=3, rows=64, cols=48, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {f"layer{j}.weight": torch.randn(rows, cols, generator=g).to(dtype) for j in range(n)}


def _age(p: Path, seconds=60):
    """Set the file's mtime into the past, so that any later write shows as a new mtime."""
    t = time.time() - seconds
    os.utime(p, (t, t))


def _run(d: Path, n=3, seed=0, **kw) -> tuple[Registry, list[Path]]:
    reg = Registry(d / "reg.duckdb")
    paths = []
    for i in range(n):
        p = d / f"step_{(i + 1) * 100}.safetensors"
        save_file(_state(seed + i, **kw), str(p))
        _age(p)
        reg.add(p, run="r", step=(i + 1) * 100, metrics={"train_loss": 1.0 + 0.1 * i})
        paths.append(p)
    return reg, paths


def _leftovers(d: Path, inputs) -> list[str]:
    keep = {Path(x).name for x in inputs} | {"reg.duckdb", "reg.duckdb.wal", "reg.duckdb.lock"}
    return sorted(f.name for f in d.iterdir() if f.name not in keep and not f.name.startswith("reg.duckdb"))


# ------------------------------------------------------------------------------------------------
# the reader, deterministic

def test_read_after_in_place_truncation_is_changed_error(tmp_path):
    p = tmp_path / "a.safetensors"
    ref = _state(1)
    save_file(ref, str(p))
    with open_tensors(p) as f:
        assert torch.equal(f.read_tensor("layer0.weight"), ref["layer0.weight"])
        buf = torch.empty(1000)
        assert torch.equal(f.read("layer1.weight", 100, 1100, out=buf), ref["layer1.weight"].reshape(-1)[100:1100])
        with open(p, "wb"):   # what a trainer re-saving the checkpoint does first
            pass
        with pytest.raises(ChangedError) as e:
            f.read("layer2.weight", 0, 1000, out=buf)
        msg = str(e.value)
        assert msg.startswith(f"{p} changed while the merge read it (truncated: tensor 'layer2.weight'"), msg
        assert e.value.exit_code == 10
        with pytest.raises(ChangedError, match="changed while the merge read it"):
            f.check()


def test_chunked_reads_equal_the_stored_tensors(tmp_path):
    """read() into a reused buffer gives the stored values for every dtype, including unaligned
    offsets (a 3-byte bool tensor in front shifts everything after it)."""
    p = tmp_path / "m.safetensors"
    ref = {"a.mask": torch.tensor([True, False, True]), "b.bf16": torch.randn(37, 5).to(torch.bfloat16),
           "c.f64": torch.randn(11, dtype=torch.float64), "d.i64": torch.arange(7), "e.scalar": torch.tensor(2.5)}
    save_file(ref, str(p))
    with open_tensors(p) as f:
        for n, t in ref.items():
            assert torch.equal(f.read_tensor(n), t), n
            flat = t.reshape(-1)
            buf = torch.empty(4, dtype=t.dtype)
            got = torch.cat([f.read(n, s, s + 4, out=buf).clone() for s in range(0, flat.numel(), 4)])
            assert torch.equal(got, flat), n
        f.check()   # unchanged: no error


def test_check_catches_same_size_rewrite_and_rename(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file(_state(1), str(p))
    _age(p)
    with open_tensors(p) as f:
        raw = p.read_bytes()
        with open(p, "r+b") as w:   # same size, other bytes, in place
            w.seek(len(raw) - 8)
            w.write(b"\0" * 8)
        with pytest.raises(ChangedError, match=r"changed while the merge read it \(modified in place"):
            f.check()
    q = tmp_path / "b.safetensors"
    save_file(_state(2), str(q))
    with open_tensors(q) as f:
        nxt = tmp_path / "b.next"
        save_file(_state(3), str(nxt))
        os.replace(nxt, q)   # a writer that saves atomically: the path now holds another file
        f.read_tensor("layer0.weight")   # the open descriptor still reads the old, complete file
        with pytest.raises(ChangedError, match=r"changed while the merge read it \(replaced by another file"):
            f.check()


def test_open_refuses_a_file_changed_since_its_fingerprint_was_checked(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file(_state(1), str(p))
    _age(p)
    ident = file_ident(p)
    save_file(_state(2), str(p))   # rewritten between the check and the open
    with pytest.raises(ChangedError, match="since its fingerprint was checked"):
        open_tensors(p, expect=ident)
    with open_tensors(p, expect=file_ident(p)) as f:
        f.check()


WRITER = "import sys, time; t = time.time(); open(sys.argv[1], 'wb').close(); print(time.time() - t)"


def _leased(f):
    if not f.lease():
        pytest.skip("no read lease here (not the file's owner, no SIGIO to spare, or no leases on this filesystem)")


def test_read_lease_holds_a_writer_until_the_next_read(tmp_path, monkeypatch):
    """Zero-copy views under a read lease: a trainer's open('wb') waits in the kernel (no page can
    vanish under a view); the next view()/read() releases the lease to it and reads on with
    preadv, where the truncation is a ChangedError."""
    monkeypatch.setenv("CKPTREG_NO_LEASE", "0")
    p = tmp_path / "a.safetensors"
    ref = _state(1)
    save_file(ref, str(p))
    with open_tensors(p) as f:
        _leased(f)
        v = f.view("layer0.weight", 0, 100)
        assert torch.equal(v, ref["layer0.weight"].reshape(-1)[:100])
        w = subprocess.Popen([sys.executable, "-c", WRITER, str(p)], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert w.poll() is None, "the writer's open('wb') went through while the lease was held"
        assert p.stat().st_size > 0
        assert torch.equal(v, ref["layer0.weight"].reshape(-1)[:100])   # still readable: nothing truncated
        del v
        assert f.view("layer0.weight", 100, 200) is None   # lease given up to the waiting writer
        assert float(w.communicate(timeout=30)[0]) < 10.0
        with pytest.raises(ChangedError, match=rf"^{p} changed while the merge read it \(truncated: "):
            f.read("layer1.weight", 0, 100, out=torch.empty(100))


def test_close_releases_the_lease_even_with_views_alive(tmp_path, monkeypatch):
    """The map's duplicate descriptor shares the lease: close() must release it explicitly, or a
    writer would wait out lease-break-time (45 s) because of a view left alive."""
    monkeypatch.setenv("CKPTREG_NO_LEASE", "0")
    p = tmp_path / "a.safetensors"
    save_file(_state(1), str(p))
    f = open_tensors(p)
    _leased(f)
    v = f.view("layer0.weight", 0, 100)
    f.close()
    w = subprocess.run([sys.executable, "-c", WRITER, str(p)], capture_output=True, text=True, timeout=60)
    assert float(w.stdout) < 5.0, f"writer waited {w.stdout} s"
    del v   # never touched again: its pages are gone


# ------------------------------------------------------------------------------------------------
# the engine, in process: changes that cannot fault an mmap (rename, same-size rewrite)

def _assert_nothing_left(reg, before, d, paths, out):
    assert reg.dump() == before
    assert not Path(out).exists()
    assert _leftovers(d, paths) == [], _leftovers(d, paths)


@pytest.mark.parametrize("how", ["rename", "same_size"])
@pytest.mark.parametrize("method", ["mwa", "ties", "sweep"])
def test_merge_refuses_input_changed_mid_merge(tmp_path, monkeypatch, how, method):
    # preadv path: the change comes from this very process (the progress callback), which would
    # wait on its own read lease
    monkeypatch.setenv("CKPTREG_NO_LEASE", "1")
    reg, paths = _run(tmp_path, n=3)
    before = reg.dump()
    victim = paths[1]
    fired = []

    def change(done, total, name):
        if fired:
            return
        fired.append(name)
        if how == "rename":
            nxt = victim.with_suffix(".next")
            save_file(_state(99), str(nxt))
            os.replace(nxt, victim)
        else:
            size = victim.stat().st_size
            with open(victim, "r+b") as w:
                w.seek(size - 64)
                w.write(os.urandom(64))

    ins = reg.select("r", 3)
    out = tmp_path / f"merged_{method}.safetensors"
    with pytest.raises(ChangedError) as e:
        if method == "sweep":
            specs = [engine.make_spec(reg, "uniform", ins, selection={"last": 3}, name="u3",
                                      out=str(tmp_path / "u3.safetensors")),
                     engine.make_spec(reg, "mwa", ins, metric="train_loss", penalty=0.7, selection={"last": 3},
                                      out=str(out))]
            engine.sweep(reg, specs, progress=change, chunk_elems=512)
        else:
            kw = {"metric": "train_loss", "penalty": 0.7} if method == "mwa" else \
                {"base": "first", "params": {"density": 0.5}}
            spec = engine.make_spec(reg, method, ins, selection={"last": 3}, out=str(out), **kw)
            engine.merge(reg, spec, progress=change, chunk_elems=512)
    assert fired
    assert str(e.value).startswith(f"{victim} changed while the merge read it ("), str(e.value)
    _assert_nothing_left(reg, before, tmp_path, paths, out)


# ------------------------------------------------------------------------------------------------
# the engine, in a child process: an input truncated in place between two chunk reads

CHILD = r"""
import json, sys
from ckptreg import engine
from ckptreg.errors import CkptregError
from ckptreg.registry import Registry
for db, out, victim, kw in json.loads(sys.argv[1]):
    reg = Registry(db)
    ins = reg.select("r", kw.pop("n"))
    fired = []
    def truncate(done, total, name):
        if not fired:
            fired.append(name)
            with open(victim, "wb"):   # what a trainer re-saving the checkpoint does
                pass
    sweep = kw.pop("sweep", False)
    space = kw.pop("space", "factors")
    res = {"fired": fired, "error": None, "code": 0}
    try:
        spec = engine.make_spec(reg, kw.pop("method"), ins, selection={"last": len(ins)}, out=out, **kw)
        if sweep:
            other = engine.make_spec(reg, "uniform", ins, selection={"last": len(ins)}, name="other_u",
                                     out=out + ".u.safetensors")
            engine.sweep(reg, [other, spec], progress=truncate, chunk_elems=256)
        else:
            engine.merge(reg, spec, space=space, progress=truncate, chunk_elems=256)
    except CkptregError as e:
        res.update(error=str(e), code=e.exit_code)
    print(json.dumps(res), flush=True)
"""

CASES = {
    "linear": {"method": "linear"},
    "mwa_sweep": {"method": "mwa", "metric": "train_loss", "penalty": 0.7, "sweep": True},
    "ties": {"method": "ties", "base": "first", "params": {"density": 0.3}},
    "dare_ties": {"method": "dare_ties", "base": "first", "params": {"density": 0.5, "seed": 1}},
    "slerp": {"method": "slerp", "params": {"t": 0.3}},
    "cart": {"method": "cart", "params": {"rank_ratio": 0.25, "svd": "exact"}},
    "lora_delta": {"method": "linear", "space": "delta"},
}


def _case_setup(d: Path, kw: dict):
    n = 2 if kw["method"] == "slerp" else 3
    if kw.get("space") == "delta":
        reg = Registry(d / "reg.duckdb")
        paths = []
        for i in range(n):
            a = write_peft_adapter(d / f"checkpoint-{(i + 1) * 100}", i, n_layers=3, d=64, r=8)
            reg.add(a, run="r", step=(i + 1) * 100, metrics={"train_loss": 1.0 + 0.1 * i})
            paths.append(a)
        return reg, n, paths[1] / "adapter_model.safetensors", d / "merged"
    reg, paths = _run(d, n=n)
    return reg, n, paths[-1], d / "merged.safetensors"


@pytest.mark.slow
def test_truncated_between_chunks_is_changed_error_not_sigbus(tmp_path):
    """Every reading path (weighted sums, a sweep, TIES thresholds + chunks, DARE, SLERP's two
    passes, CART's whole tensors, LoRA delta-space factors): the input is truncated with
    open('wb') after the first chunk; the merge ends in ChangedError naming it, exit 10."""
    jobs, checks = [], []
    for case, kw in CASES.items():
        d = tmp_path / case
        d.mkdir()
        kw = dict(kw)
        reg, n, victim, out = _case_setup(d, kw)
        kw["n"] = n
        jobs.append((str(d / "reg.duckdb"), str(out), str(victim), kw))
        checks.append((case, d, reg, reg.dump(), victim, out))
    # preadv path (the truncating callback runs in the merging process: it would wait on its own lease)
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], capture_output=True, text=True,
                       timeout=300, cwd=str(ROOT), env={**os.environ, "CKPTREG_NO_LEASE": "1"})
    lines = p.stdout.strip().splitlines()
    assert p.returncode >= 0, (f"merge of case {checks[len(lines)][0]!r} died with "
                               f"{signal.Signals(-p.returncode).name}: {p.stderr[-2000:]}")
    assert p.returncode == 0 and len(lines) == len(checks), (p.returncode, p.stdout, p.stderr[-3000:])
    for (case, d, reg, before, victim, out), line in zip(checks, lines):
        res = json.loads(line)
        assert res["fired"], (case, res)
        assert res["code"] == 10, (case, res)
        assert res["error"].startswith(f"{victim} changed while the merge read it ("), (case, res["error"])
        assert reg.dump() == before, case
        assert not out.exists() and not Path(str(out) + ".u.safetensors").exists(), case
        left = [f.name for f in d.iterdir() if ".ckptreg-tmp" in f.name or f.name.startswith(".merged")]
        assert left == [], (case, left)


# ------------------------------------------------------------------------------------------------
# a REAL concurrent truncation: `ckptreg merge` in one process, a trainer-like open('wb') in another

CLI = "import sys; from ckptreg.cli import main; sys.exit(main())"


def _big_run(d: Path, n=3, mib=32):
    reg = Registry(d / "reg.duckdb")
    cols = 4096
    rows = mib * (1 << 20) // 4 // cols // 4
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=g)
    paths = []
    for i in range(n):
        p = d / f"step_{(i + 1) * 100}.safetensors"
        save_file({f"layer{j}.weight": base * (1 + 0.01 * i) + 0.001 * j for j in range(4)}, str(p))
        reg.add(p, run="r", step=(i + 1) * 100, metrics={"train_loss": 1.0 + 0.1 * i})
        paths.append(p)
    return reg, paths


@pytest.mark.slow
@pytest.mark.parametrize("lease", ["lease", "no_lease"])
def test_cli_merge_with_input_truncated_concurrently(tmp_path, lease):
    """Retried (bounded) until the truncation lands while the merge streams: the temporary output
    exists and has grown past its header, and the merge has not finished. With a read lease the
    trainer's open('wb') waits for the merge's next chunk; without one (CKPTREG_NO_LEASE=1) it
    truncates at once and the merge's next preadv comes up short."""
    env = {**os.environ, "CKPTREG_NO_LEASE": "1" if lease == "no_lease" else "0"}
    outcomes = []
    for attempt in range(6):
        d = tmp_path / f"a{attempt}"
        d.mkdir()
        reg, paths = _big_run(d)
        before = reg.dump()
        victim = paths[1]
        out = d / "out" / "merged.safetensors"
        out.parent.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", CLI, "--db", str(d / "reg.duckdb"), "merge", "--run", "r",
                                 "--last", "3", "--method", "linear", "-o", str(out), "--name", "m", "-q"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                                env=env)
        landed = False
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            tmps = [f for f in out.parent.iterdir() if ".ckptreg-tmp" in f.name]
            try:
                grown = any(f.stat().st_size > (4 << 20) for f in tmps)
            except OSError:
                grown = False
            if grown:
                t0 = time.time()
                with open(victim, "wb"):   # the trainer re-saves in place
                    pass
                waited = time.time() - t0
                landed = proc.poll() is None
                break
            time.sleep(0.0005)
        stdout, stderr = proc.communicate(timeout=120)
        outcomes.append((proc.returncode, landed))
        if not landed or proc.returncode == 0:
            continue   # too late (or never seen mid-stream): try again on fresh files
        assert proc.returncode >= 0, f"merge died with {signal.Signals(-proc.returncode).name}: {stderr[-2000:]}"
        assert proc.returncode == 10, (proc.returncode, stderr[-3000:])
        assert f"error: {victim} changed while the merge read it (" in stderr, stderr[-3000:]
        assert reg.dump() == before
        assert list(out.parent.iterdir()) == []
        assert waited < 5.0, f"the trainer's open('wb') waited {waited:.1f} s for the merge's lease"
        return
    pytest.fail(f"the truncation never landed mid-merge in {len(outcomes)} attempts: {outcomes}")

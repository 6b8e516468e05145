"""Nothing lost on the output side (issue #9): --overwrite replaces only ckptreg's own outputs,
one merge per target at a time, the output layout checked before writing, stale temporaries of
dead processes cleared, full / read-only filesystems as typed errors. Real files, real processes,
the CLI in-process."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckptreg import engine
from ckptreg.cli import main
from ckptreg.errors import (AccessError, DiskFullError, DuplicateError, LockTimeout, OutputExistsError,
                            TargetBusyError, UsageError)
from ckptreg.registry import Registry
from ckptreg.writer import (HOST_TAG, LOCK_MARK, TMP_MARK, find_stale_temporaries, remove_stale_temporaries,
                            write_file)
from helpers_engine import load_any, make_lora_run
from helpers_files import mounted_tmpfs

REPO = Path(__file__).resolve().parents[1]


def _cli(db, *args):
    return CliRunner().invoke(main, ["--db", str(db), *map(str, args)])


def _snapshot(path: Path) -> dict:
    """Every file under ``path`` (or the file itself) with its bytes."""
    path = Path(path)
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if TMP_MARK in p.name or p.name.endswith(LOCK_MARK))


@pytest.fixture
def lora(tmp_path):
    reg = make_lora_run(tmp_path, steps=(10, 20, 30, 40))
    return reg, tmp_path / "reg.duckdb", tmp_path


def _file_run(tmp_path, n=3, numel=1 << 10, run="files", folder=None):
    db = tmp_path / "reg.duckdb"
    reg = Registry(db)
    folder = Path(folder or tmp_path / run)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        p = folder / f"step_{(i + 1) * 10}.safetensors"
        save_file({"a": torch.randn(numel, generator=g), "b": torch.randn(numel, generator=g)}, str(p))
        reg.add(p, run=run, step=(i + 1) * 10, metrics={"train_loss": 1.0 + 0.1 * i})
    return reg, db


# ------------------------------------------------------------------------------------------ item 1

def test_overwrite_never_replaces_a_registered_input_of_any_run(lora):
    reg, db, tmp = lora
    # a second run in the same registry
    make_lora_run(tmp, run="other", steps=(5, 6), db=db)
    before = reg.dump()
    for victim in (reg.get("sft@30"), reg.get("other@5")):
        files = _snapshot(victim.path)
        res = _cli(db, "merge", "--run", "sft", "--last", 2, "-q", "-o", victim.path, "--overwrite")
        assert res.exit_code == OutputExistsError.exit_code, res.output
        assert victim.path in res.output and f"registered checkpoint {victim.ref}" in res.output
        assert _snapshot(victim.path) == files
    # the folder holding the run's checkpoints, and a path inside a checkpoint folder
    res = _cli(db, "merge", "--run", "sft", "--last", 2, "-q", "-o", tmp / "sft", "--overwrite")
    assert res.exit_code == OutputExistsError.exit_code and "holds registered checkpoint" in res.output
    inside = Path(reg.get("sft@10").path) / "merged"
    res = _cli(db, "merge", "--run", "sft", "--last", 2, "-q", "-o", inside)
    assert res.exit_code == OutputExistsError.exit_code and "inside registered checkpoint sft@10" in res.output
    assert not inside.exists()
    assert Registry(db).dump() == before
    # later merges still work: nothing changed since registration
    res = _cli(db, "merge", "--run", "sft", "--last", 4, "-q", "--name", "later")
    assert res.exit_code == 0, res.output
    for c in reg.checkpoints(merged=False):
        reg.check_unchanged(c)


def test_overwrite_never_deletes_what_ckptreg_did_not_write(lora, tmp_path):
    reg, db, tmp = lora
    before = reg.dump()
    # a folder of the user's
    mine = tmp / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    # a folder holding a safetensors ckptreg did not write
    foreign = tmp / "foreign"
    foreign.mkdir()
    save_file({"x": torch.ones(3)}, str(foreign / "adapter_model.safetensors"))
    (foreign / "adapter_config.json").write_text("{}")
    for target in (mine, foreign):
        files = _snapshot(target)
        res = _cli(db, "merge", "--run", "sft", "--last", 2, "-q", "-o", target, "--overwrite")
        assert res.exit_code == OutputExistsError.exit_code, res.output
        assert str(target) in res.output and "ckptreg" in res.output
        assert _snapshot(target) == files
    # a single .safetensors file ckptreg did not write (file-layout merge)
    freg, fdb = _file_run(tmp_path / "f")
    plain = tmp_path / "f" / "mine.safetensors"
    save_file({"a": torch.zeros(4)}, str(plain))
    fbefore = freg.dump()
    res = _cli(fdb, "merge", "--run", "files", "--last", 2, "-q", "-o", plain, "--overwrite")
    assert res.exit_code == OutputExistsError.exit_code and "no ckptreg recipe" in res.output, res.output
    assert torch.equal(load_any(plain)["a"], torch.zeros(4))
    assert Registry(db).dump() == before and Registry(fdb).dump() == fbefore
    assert _leftovers(tmp) == [] and _leftovers(tmp_path / "f") == []


def test_overwrite_replaces_its_own_output_but_not_other_merges_or_their_sources(lora):
    reg, db, tmp = lora
    res = _cli(db, "merge", "--run", "sft", "--last", 3, "-q", "--name", "a", "--json")
    a = json.loads(res.output)
    # replacing our own earlier output (same RUN@NAME) works
    res = _cli(db, "merge", "--run", "sft", "--last", 2, "-q", "--name", "a", "--overwrite", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["id"] == a["id"] and len(reg.lineage(a["id"])["inputs"]) == 2
    # ... but not when the user put a file of theirs into it
    (Path(a["path"]) / "eval.json").write_text("{}")
    files = _snapshot(a["path"])
    before = reg.dump()
    res = _cli(db, "merge", "--run", "sft", "--last", 3, "-q", "--name", "a", "--overwrite")
    assert res.exit_code == OutputExistsError.exit_code and "eval.json" in res.output, res.output
    assert _snapshot(a["path"]) == files and reg.dump() == before
    (Path(a["path"]) / "eval.json").unlink()
    # another merge's output (a different name) is refused
    res = _cli(db, "merge", "--run", "sft", "--last", 3, "-q", "--name", "x", "-o", a["path"], "--overwrite")
    assert res.exit_code == OutputExistsError.exit_code and "sft@a" in res.output, res.output
    # a merge that feeds another registered merge is never replaced
    res = _cli(db, "merge", str(a["id"]), "sft@40", "-q", "--name", "b", "--json")
    assert res.exit_code == 0, res.output
    b = json.loads(res.output)
    files = _snapshot(a["path"])
    before = reg.dump()
    res = _cli(db, "merge", "--run", "sft", "--last", 3, "-q", "--name", "a", "--overwrite")
    assert res.exit_code == OutputExistsError.exit_code, res.output
    assert "sft@b" in res.output and "input or base" in res.output
    assert _snapshot(a["path"]) == files and reg.dump() == before
    reg.check_unchanged(a["id"])
    reg.check_unchanged(b["id"])


# ------------------------------------------------------------------------------------------ item 2

HOLD = r"""
import sys, time
from ckptreg.writer import TargetLock
lk = TargetLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_busy_target_is_refused_with_exit_14_and_nothing_changes(lora):
    reg, db, tmp = lora
    out = tmp / "busy"
    before = reg.dump()
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "30"], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert p.stdout.readline().strip() == b"held"
        res = _cli(db, "merge", "--run", "sft", "--last", 2, "-q", "-o", out)
        assert res.exit_code == TargetBusyError.exit_code, res.output
        assert str(out) in res.output and f"pid {p.pid}" in res.output
        assert not out.exists() and reg.dump() == before
    finally:
        p.kill()
        p.wait()
    # the holder died: its lock does not block the next merge, which leaves no lock file behind
    res = _cli(db, "merge", "--run", "sft", "--last", 2, "-q", "-o", out)
    assert res.exit_code == 0, res.output
    assert _leftovers(tmp) == []


def test_sweep_takes_the_lock_of_every_target(lora):
    reg, db, tmp = lora
    outdir = tmp / "sw"
    before = reg.dump()
    busy = outdir / "last_3_unweighted_incl_final"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(busy), "30"], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert p.stdout.readline().strip() == b"held"
        res = _cli(db, "sweep", "--run", "sft", "--last", "2,3", "--method", "uniform", "-o", outdir, "-q")
        assert res.exit_code == TargetBusyError.exit_code, res.output
        assert str(busy) in res.output
        assert not (outdir / "last_2_unweighted_incl_final").exists() and reg.dump() == before
    finally:
        p.kill()
        p.wait()


RACER = r"""
import sys, time, pathlib
from ckptreg.cli import main
import ckptreg.engine, ckptreg.ops, torch   # everything imported before the start signal
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
ready.write_text("1")
while not go.exists():
    time.sleep(0.0005)
main(sys.argv[3:], prog_name="ckptreg")
"""


@pytest.mark.slow
def test_two_concurrent_merges_to_one_target_one_wins_one_exits_14(tmp_path):
    reg, db = _file_run(tmp_path, n=4, numel=1 << 22)      # 4 x 32 MiB inputs, 16 MiB output
    env = dict(os.environ, CKPTREG_DB=str(db))
    overlapped = False
    # Each attempt races two real processes onto one new target. Either outcome of an attempt must
    # be safe (one registered output, the other process exits non-zero and changes nothing); the
    # loser meets the lock (14) when the two overlap, or the finished output (9) when one process
    # started so late that the other was done. Up to 4 attempts until one overlaps.
    for attempt in range(4):
        out = tmp_path / f"outs{attempt}" / "merged.safetensors"
        go = tmp_path / f"go{attempt}"
        ready = [tmp_path / f"ready{attempt}-{i}" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", RACER, str(ready[i]), str(go), "--db", str(db), "merge",
                                   "--run", "files", "--last", "4", "--method", "ties", "--density", "0.3",
                                   "--base", "first", "-q", "-o", str(out), "--name", f"m{attempt}-{i}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)
                 for i in range(2)]   # TIES: the winner holds the lock ~1 s
        deadline = time.time() + 120
        while not all(r.exists() for r in ready) and time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.01)
        go.write_text("go")   # both children have imported everything: they start within a millisecond
        outs = [p.communicate(timeout=120) for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes in ([0, TargetBusyError.exit_code], [0, OutputExistsError.exit_code]), (codes, outs)
        loser = next(o for p, o in zip(procs, outs) if p.returncode != 0)
        assert str(out) in loser[1].decode()
        merged = [c for c in Registry(db).checkpoints(merged=True) if c.path == str(out)]
        assert len(merged) == 1
        Registry(db).check_unchanged(merged[0])   # the files are the registered ones, not a mix
        assert _leftovers(out.parent) == []
        if codes[1] == TargetBusyError.exit_code:
            assert "another ckptreg process" in loser[1].decode()
            overlapped = True
            break
    assert overlapped, "the two merges never overlapped in 4 attempts"


# ------------------------------------------------------------------------------------------ item 3

def test_single_file_output_needs_a_safetensors_name_checked_before_writing(tmp_path):
    reg, db = _file_run(tmp_path)
    before = reg.dump()
    out = tmp_path / "outs" / "merged"
    res = _cli(db, "merge", "--run", "files", "--last", 2, "-q", "-o", out)
    assert res.exit_code == UsageError.exit_code, res.output
    assert str(out) in res.output and ".safetensors" in res.output
    assert not out.exists() and not out.parent.exists() and reg.dump() == before
    # --out-shard-size writes a folder of shards: a .safetensors name is refused, a folder works
    res = _cli(db, "merge", "--run", "files", "--last", 2, "-q", "-o", str(out) + ".safetensors",
               "--out-shard-size", "4KiB")
    assert res.exit_code == UsageError.exit_code and "folder" in res.output, res.output
    assert reg.dump() == before
    res = _cli(db, "merge", "--run", "files", "--last", 2, "-q", "-o", out, "--out-shard-size", "4KiB", "--json")
    assert res.exit_code == 0, res.output
    c = reg.get(json.loads(res.output)["id"])
    assert c.path == str(out) and (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) == 2
    # the same merge to a correct file name now registers (the next version of the name),
    # never an orphan refused as "exists"
    res = _cli(db, "merge", "--run", "files", "--last", 2, "-q", "-o", str(out) + "2.safetensors", "--json")
    assert res.exit_code == 0, res.output
    c2 = reg.get(json.loads(res.output)["id"])
    assert c2.path == str(out) + "2.safetensors" and c2.version == 2 and c2.name == c.name


HOLD_DB = r"""
import sys, time
from ckptreg.registry import Registry
r = Registry(sys.argv[1])
with r.batch():
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_failed_registration_removes_the_output_and_restores_the_replaced_one(lora):
    reg, db, tmp = lora
    first = engine.merge(reg, engine.make_spec(reg, "uniform", reg.select("sft", 3), name="m"))
    old_files = _snapshot(first.path)
    before = reg.dump()
    holder = []

    def progress(done, total, name):
        if not holder:  # mid-merge, another process takes the registry and keeps it
            p = subprocess.Popen([sys.executable, "-c", HOLD_DB, str(db), "6"], stdout=subprocess.PIPE, cwd=REPO)
            holder.append(p)
            assert p.stdout.readline().strip() == b"held"

    impatient = Registry(db, lock_timeout=0.5)
    spec = engine.make_spec(impatient, "linear", impatient.select("sft", 3), weights=[0.5, 0.3, 0.2], name="m")
    try:
        with pytest.raises(LockTimeout):
            engine.merge(impatient, spec, overwrite=True, progress=progress)
    finally:
        holder[0].kill()
        holder[0].wait()
    assert _snapshot(first.path) == old_files          # the replaced output is back
    assert reg.dump() == before
    reg.check_unchanged(first)
    assert _leftovers(Path(first.path).parent) == []


def test_concurrent_merge_of_the_same_name_elsewhere_becomes_the_next_version(lora):
    # (was: the second registration of one RUN@NAME failed and had to leave nothing behind; merged
    # names are versioned now (issue #10), so both outputs are kept and registered)
    reg, db, tmp = lora
    out = tmp / "mine"
    other = tmp / "theirs"
    won = []

    def progress(done, total, name):
        if not won:  # meanwhile another merge registers the same RUN@NAME elsewhere
            won.append(engine.merge(reg, engine.make_spec(reg, "uniform", reg.select("sft", 2), name="same",
                                                          out=str(other))))

    spec = engine.make_spec(reg, "uniform", reg.select("sft", 3), name="same", out=str(out))
    mine = engine.merge(reg, spec, progress=progress)
    assert _leftovers(tmp) == []
    assert sorted((c.version, c.path) for c in reg.checkpoints(merged=True)) == [(1, str(other)), (2, str(out))]
    assert reg.get("sft@same").id == mine.id and reg.get("sft@same:v1").id == won[0].id
    assert mine.ref == "sft@same:v2"


# ------------------------------------------------------------------------------------------ item 4

KILLED = r"""
import sys, time, pathlib
from ckptreg import engine
from ckptreg.registry import Registry
reg = Registry(sys.argv[1])
spec = engine.make_spec(reg, "uniform", reg.select("files", 3), out=sys.argv[2], name="killed")
started = pathlib.Path(sys.argv[3])
def progress(done, total, name):
    started.write_text("1")
    time.sleep(0.01)
engine.merge(reg, spec, progress=progress, chunk_elems=1 << 12)
"""


@pytest.mark.slow
def test_sigkill_temporary_is_removed_by_the_next_merge_into_the_same_folder(tmp_path):
    reg, db = _file_run(tmp_path, numel=1 << 18)
    outs = tmp_path / "outs"
    outs.mkdir()
    (outs / ".hidden-of-the-user").write_text("mine")
    started = tmp_path / "started"
    p = subprocess.Popen([sys.executable, "-c", KILLED, str(db), str(outs / "a.safetensors"), str(started)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline and not started.exists() and p.poll() is None:
        time.sleep(0.005)
    assert started.exists(), p.communicate()[1][-2000:]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    left = [x.name for x in outs.iterdir() if TMP_MARK in x.name]
    assert left, "the killed merge should have left its temporary (else the test proves nothing)"
    assert find_stale_temporaries(outs) == [outs / n for n in sorted(left)]
    before = reg.dump()
    # a merge to ANOTHER target of that folder clears the dead temporary (and the dead lock file)
    res = _cli(db, "merge", "--run", "files", "--last", 2, "-q", "-o", outs / "b.safetensors")
    assert res.exit_code == 0, res.output
    assert sorted(x.name for x in outs.iterdir()) == [".hidden-of-the-user", "b.safetensors"]
    assert len(reg.dump()["checkpoints"]) == len(before["checkpoints"]) + 1


def test_find_and_remove_stale_temporaries_only_of_dead_writers(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        names = {
            "dead_file": f".a.safetensors{TMP_MARK}{dead.pid}-{HOST_TAG}-0123abcd",
            "dead_old_format": f".b.safetensors{TMP_MARK}{dead.pid}-89abcdef",
            "dead_dir": f".c{TMP_MARK}{dead.pid}-{HOST_TAG}-00ff00ff",
            "live": f".d.safetensors{TMP_MARK}{live.pid}-{HOST_TAG}-11111111",
            "self": f".e.safetensors{TMP_MARK}{os.getpid()}-{HOST_TAG}-22222222",
            "other_host": f".f.safetensors{TMP_MARK}{dead.pid}-{'0' * 8 if HOST_TAG != '0' * 8 else '1' * 8}-33333333",
            "unmarked": ".g.safetensors.tmp-123-44444444",
            "plain": "h.safetensors",
        }
        for k, n in names.items():
            if k == "dead_dir":
                (tmp_path / n).mkdir()
                (tmp_path / n / "model.safetensors").write_bytes(b"x")
            else:
                (tmp_path / n).write_bytes(b"x")
        stale = {tmp_path / names[k] for k in ("dead_file", "dead_old_format", "dead_dir")}
        assert set(find_stale_temporaries(tmp_path)) == stale
        assert set(remove_stale_temporaries(tmp_path)) == stale
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            names[k] for k in ("live", "self", "other_host", "unmarked", "plain"))
        assert find_stale_temporaries(tmp_path / "missing") == []
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------------------------ item 5

@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs mounted for the test (root only), unmounted afterwards."""
    with contextlib.ExitStack() as stack:
        mounts = []

        def mount(opts="size=1m"):
            d = stack.enter_context(mounted_tmpfs(tmp_path / f"mnt{len(mounts)}", options=opts))
            mounts.append(d)
            return d

        yield mount


@pytest.mark.parametrize("layout", ["file", "peft"])
def test_disk_full_is_a_typed_error_leaving_nothing(tmp_path, small_tmpfs, layout):
    full = small_tmpfs()
    if layout == "file":
        reg, db = _file_run(tmp_path, numel=1 << 18)     # 2 MiB merged output into 1 MiB
        out = full / "merged.safetensors"
        args = ["--run", "files", "--last", 3]
    else:
        reg = make_lora_run(tmp_path, steps=(10, 20), d=256, r=64, n_layers=4)  # ~1 MiB+ adapters
        db = tmp_path / "reg.duckdb"
        out = full / "merged"
        args = ["--run", "sft", "--last", 2]
    before = reg.dump()
    res = _cli(db, "merge", *args, "-q", "-o", out)
    assert res.exit_code == DiskFullError.exit_code, (res.output, res.exception)
    assert str(out) in res.output and "no space left" in res.output
    assert "Traceback" not in res.output
    assert sorted(os.listdir(full)) == []        # no temporary, no lock file, no partial output
    assert Registry(db).dump() == before


def test_read_only_or_unwritable_output_folder_is_access_error(tmp_path, small_tmpfs):
    reg, db = _file_run(tmp_path)
    before = reg.dump()
    if os.geteuid() == 0:
        ro = small_tmpfs("ro,size=1m")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
    try:
        for out in (ro / "merged.safetensors", ro / "sub" / "merged.safetensors"):
            res = _cli(db, "merge", "--run", "files", "--last", 2, "-q", "-o", out)
            assert res.exit_code == AccessError.exit_code, (res.output, res.exception)
            assert str(out) in res.output and ("read-only" in res.output or "permission denied" in res.output)
            assert os.listdir(ro) == []
    finally:
        if os.geteuid() != 0:
            ro.chmod(0o755)
    assert Registry(db).dump() == before


def test_plain_writer_full_disk_removes_its_temporary(small_tmpfs):
    full = small_tmpfs()
    with pytest.raises(DiskFullError) as ei:
        write_file(full / "x.safetensors", {"w": torch.zeros(1 << 19)})
    assert str(full / "x.safetensors") in str(ei.value)
    assert os.listdir(full) == []

"""A busy database never stalls training (issue #10 item 9): with the database held by a REAL
second process, ``ckptreg.add`` and the trainer callbacks spool after a short bound (<= 1 s) and
return; the entry is ingested later; the CLI keeps its longer wait; CKPTREG_LOCK_TIMEOUT is
honoured by every entry point."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

import ckptreg
from ckptreg.cli import main
from ckptreg.registry import Registry
from helpers_files import write_peft_adapter

#: holds the registry for argv[3] seconds: "file" = a DuckDB write connection to the database
#: file itself (what a long `ckptreg sql` or another tool does), "lock" = ckptreg's writer lock
#: (Registry.batch(), what a long bulk import does)
HOLDER = textwrap.dedent("""
    import sys, time
    db, how, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if how == "file":
        import _duckdb
        con = _duckdb.connect(db)
        con.execute("SELECT count(*) FROM checkpoints").fetchall()
        print("ready", flush=True)
        time.sleep(secs)
    else:
        from ckptreg.registry import Registry
        with Registry(db).batch():
            print("ready", flush=True)
            time.sleep(secs)
""")

BOUND = 1.5  # seconds an add may take, seen by the training loop (1 s bound + spool write)


@pytest.fixture
def hold():
    procs = []

    def start(db, how, secs=60.0):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), how, str(secs)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _release(p):
    p.kill()
    p.wait()


def _fresh_db(tmp_path):
    db = tmp_path / "reg.duckdb"
    Registry(db).add(write_peft_adapter(tmp_path / "first" / "checkpoint-1", 0), "r")
    return db


@pytest.mark.parametrize("how", ["file", "lock"])
def test_python_add_spools_within_bound_then_ingested(tmp_path, hold, how):
    db = _fresh_db(tmp_path)
    p = write_peft_adapter(tmp_path / "run" / "checkpoint-20", 1)
    holder = hold(db, how)
    t = time.monotonic()
    got = ckptreg.add(p, "r", metrics={"loss": 0.25}, db=str(db))
    took = time.monotonic() - t
    assert got is None and took <= BOUND, took
    assert len(Registry(db).spool_status()["pending"]) == 1
    _release(holder)
    # another process ingests it: the event keeps the writer (this process), not the ingester
    subprocess.run([sys.executable, "-c", f"from ckptreg.registry import Registry; Registry({str(db)!r}).ingest()"],
                   check=True)
    reg = Registry(db)
    c = reg.get("r@20")
    assert c.metrics == {"loss": 0.25} and c.path == str(p.resolve())
    ev = [e for e in reg.history("r@20") if e["op"] == "add"]
    assert len(ev) == 1 and ev[0]["pid"] == os.getpid()
    assert reg.spool_status() == {"pending": [], "rejected": []}


def test_hf_callback_spools_within_bound(tmp_path, hold):
    transformers = pytest.importorskip("transformers")
    from ckptreg.integrations.hf import CkptregCallback

    db = _fresh_db(tmp_path)
    out = tmp_path / "out"
    write_peft_adapter(out / "checkpoint-30", 3)
    args = transformers.TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True)
    state = transformers.TrainerState(global_step=30, log_history=[{"step": 30, "loss": 0.5}])
    cb = CkptregCallback(run="r", db=db, strict=True)
    holder = hold(db, "lock")
    t = time.monotonic()
    cb.on_train_begin(args, state, transformers.TrainerControl())   # run params: spooled too
    cb.on_save(args, state, transformers.TrainerControl())
    took = time.monotonic() - t
    assert took <= 2 * BOUND, took   # two bounded calls
    assert cb.registered == {30: None} and cb.errors == []
    _release(holder)
    reg = Registry(db)
    reg.ingest()
    assert reg.get("r@30").metrics["train_loss"] == 0.5
    assert reg.run_params("r")["training_args"]["output_dir"] == str(out)


def test_lock_timeout_env_is_honoured_everywhere(tmp_path, hold, monkeypatch):
    from ckptreg.cli import merge_cmds, registry_cmds
    from ckptreg.integrations import _Reporter

    db = _fresh_db(tmp_path)
    # defaults: the CLI waits 30 s, training-loop entry points 1 s
    assert registry_cmds._registry(str(db)).lock_timeout == 30.0
    assert merge_cmds._registry(str(db)).lock_timeout == 30.0
    cb = _Reporter()
    cb._init_common("r", str(db), None, strict=True, replace=None)
    assert cb._registry().lock_timeout == 1.0
    monkeypatch.setenv("CKPTREG_LOCK_TIMEOUT", "0.2")
    for make in (registry_cmds._registry, merge_cmds._registry, Registry):
        assert make(str(db)).lock_timeout == 0.2
    assert cb._registry().lock_timeout == 0.2
    holder = hold(db, "file")
    t = time.monotonic()
    assert ckptreg.add(write_peft_adapter(tmp_path / "checkpoint-40", 4), "r", db=str(db)) is None
    assert time.monotonic() - t <= 0.2 + 0.5
    # the CLI keeps its own (longer) wait, here 1.5 s from the environment, then spools
    t = time.monotonic()
    r = CliRunner().invoke(main, ["--db", str(db), "add", str(write_peft_adapter(tmp_path / "checkpoint-50", 5)),
                                  "--run", "r"], env={"CKPTREG_LOCK_TIMEOUT": "1.5"})
    took = time.monotonic() - t
    assert r.exit_code == 0 and "spooled" in r.stderr and took >= 1.5, (took, r.output)
    _release(holder)
    r = CliRunner().invoke(main, ["--db", str(db), "ls", "--json"], env={"CKPTREG_LOCK_TIMEOUT": "nope"})
    assert r.exit_code == 2
    assert "CKPTREG_LOCK_TIMEOUT must be a number of seconds >= 0, got 'nope'" in r.stderr
    Registry(db, lock_timeout=30).ingest()
    assert [c.step for c in Registry(db, lock_timeout=30).checkpoints("r")] == [1, 40, 50]

"""The registry suite on BOTH backends (issue 11): every test runs on a DuckDB file in tmp_path and
on a fresh PostgreSQL database of the session's real server (the ``backend_db`` fixture), through
the library and through the CLI in-process (``--db`` = the file or the URL). Same calls, same
answers: add, log, scan, refs, aliases, versions, gc, lineage + show, sql, spool, export."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers_backends import full_file, open_registry, snapshot
from helpers_files import random_full_state, write_hf_model, write_peft_adapter

import ckptreg
from ckptreg.cli import main
from ckptreg.errors import DuplicateError, NotFoundError, QueryError


def _cli(db, *args, env=None):
    return CliRunner().invoke(main, ["--db", str(db), *map(str, args)], env=env)


def _ok(db, *args, env=None):
    r = _cli(db, *args, env=env)
    assert r.exit_code == 0, (args, r.output)
    return r


def _j(db, *args):
    return json.loads(_ok(db, *args, "--json").stdout)


@contextlib.contextmanager
def busy(loc):
    """Make the registry busy for writers, the way each backend is busy: DuckDB: another process
    holds the writer lock file; PostgreSQL: another session holds an exclusive lock on the tables."""
    if isinstance(loc, Path):
        import filelock

        lock = filelock.FileLock(str(loc) + ".lock", is_singleton=False)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()
        return
    import psycopg

    with psycopg.connect(loc, connect_timeout=10) as con:
        con.execute("LOCK TABLE runs, checkpoints, metrics IN ACCESS EXCLUSIVE MODE")
        yield
        con.rollback()


# ----------------------------------------------------------------------------- add / log / refs

def test_add_log_ls_show_and_refs(backend_db, tmp_path):
    p1 = write_peft_adapter(tmp_path / "out" / "checkpoint-10", 1)
    r = _ok(backend_db, "add", p1, "--run", "r", "--metric", "loss=0.5", "--metric", "acc=nan", "--tag", "lr=1e-4")
    assert r.stdout.strip() == "1"
    reg = open_registry(backend_db)
    cid = reg.add(write_peft_adapter(tmp_path / "out" / "checkpoint-20", 2), "r", metrics={"loss": 0.25})
    assert cid == 2 and reg.last_add["status"] == "added"
    # the same files again: unchanged, same id; other files at a taken step: DuplicateError (exit 4)
    assert reg.add(tmp_path / "out" / "checkpoint-20", "r") == 2 and reg.last_add["status"] == "unchanged"
    with pytest.raises(DuplicateError, match="r@20 is already registered"):
        reg.add(write_peft_adapter(tmp_path / "other", 3), "r", step=20)
    r = _cli(backend_db, "add", tmp_path / "other", "--run", "r", "--step", "20")
    assert r.exit_code == DuplicateError.exit_code and "r@20" in r.stderr
    _ok(backend_db, "log", "r@10", "loss=0.4", "gsm8k=0.41")
    reg.log("r@20", {"gsm8k": 0.5})
    rows = _j(backend_db, "ls")
    assert [d["ref"] for d in rows] == ["r@10", "r@20"]
    d = _j(backend_db, "show", "r@10")
    assert d["metrics"] == {"loss": 0.4, "acc": "nan", "gsm8k": 0.41} and d["tags"] == {"lr": "1e-4"}
    c = reg.get("r@10")
    assert math.isnan(c.metrics["acc"]) and c.metrics["loss"] == 0.4
    # refs: id, RUN@STEP, RUN@latest / RUN@final, RUN@best:METRIC, a path, a user alias
    assert reg.get(1).ref == "r@10" and reg.get("r@latest").ref == "r@20" == reg.get("r@final").ref
    assert reg.get("r@best:loss").ref == "r@20" and reg.get("r@best:gsm8k:max").ref == "r@20"
    assert reg.get(str(p1)).id == 1
    assert _j(backend_db, "show", "r@latest")["id"] == 2
    _ok(backend_db, "alias", "r@10", "prod")
    assert reg.get("r@prod").id == 1 and _j(backend_db, "show", "r@prod")["ref"] == "r@10"
    assert [(a["ref"], a["target"]) for a in _j(backend_db, "aliases")] == [("r@prod", "r@10")]
    _ok(backend_db, "alias", "r@20", "prod")  # moved
    assert reg.get("r@prod").id == 2
    with pytest.raises(NotFoundError):
        reg.get("r@30")
    r = _cli(backend_db, "show", "r@nope")
    assert r.exit_code == NotFoundError.exit_code
    runs = reg.runs()
    assert [(x["run"], x["n"], x["first_step"], x["last_step"], x["final_id"]) for x in runs] == [("r", 2, 10, 20, 2)]
    # history: every change is an event
    assert [e["op"] for e in reg.history("r@10")][:2] == ["add", "log"]


def test_scan_hf_trainer_state(backend_db, tmp_path):
    root = tmp_path / "trainer"
    history = [{"step": s, "loss": 1.0 / s} for s in range(5, 31, 5)]
    history += [{"step": s, "eval_loss": 2.0 / s, "eval_acc": s / 100} for s in (10, 20, 30)]
    history.sort(key=lambda e: e["step"])
    for s in (10, 20, 30):
        d = write_peft_adapter(root / f"checkpoint-{s}", s)
        (d / "trainer_state.json").write_text(json.dumps(
            {"global_step": s, "log_history": [e for e in history if e["step"] <= s]}))
    res = _j(backend_db, "scan", root, "--run", "hf")
    assert [a["step"] for a in res["added"]] == [10, 20, 30] and res["skipped"] == []
    c = open_registry(backend_db).get("hf@20")
    assert c.metrics == {"train_loss": pytest.approx(1 / 20), "eval_loss": pytest.approx(2 / 20),
                         "eval_acc": pytest.approx(0.2)}
    r = _ok(backend_db, "scan", root, "--run", "hf")  # again: everything skipped, nothing changes
    assert all(f"skipped hf@{s}" in r.stderr for s in (10, 20, 30))
    assert len(open_registry(backend_db).checkpoints("hf")) == 3


# ----------------------------------------------------------------------------- lineage / versions

def _two_full(tmp_path, reg, run="m"):
    a = full_file(tmp_path / "in" / "a.safetensors", 1)
    b = full_file(tmp_path / "in" / "b.safetensors", 2)
    reg.add(a, run, step=1, metrics={"loss": 1.0})
    reg.add(b, run, step=2, metrics={"loss": 0.5})
    return a, b


def test_lineage_of_a_real_merge_and_show(backend_db, tmp_path):
    from safetensors.torch import load_file

    reg = open_registry(backend_db)
    a, b = _two_full(tmp_path, reg)
    out = tmp_path / "merged.safetensors"
    r = _ok(backend_db, "merge", "m@1", "m@2", "--method", "linear", "--weights", "metric", "--metric", "loss", "--name", "avg",
            "-o", out, "--json", "-q")
    d = json.loads(r.stdout)
    ta, tb, to = load_file(str(a)), load_file(str(b)), load_file(str(out))
    for k in to:
        assert (to[k] - (ta[k] / 3 + 2 * tb[k] / 3)).abs().max() <= 1e-6  # phi = 1/loss: 1 and 2
    c = reg.get("m@avg")
    assert c.merged and c.id == d["id"] and c.path == str(out.resolve())
    lin = reg.lineage("m@avg")
    assert lin["method"] == "linear"
    assert [(i["ref"], i["id"], i["weight"]) for i in lin["inputs"]] == [("m@1", 1, pytest.approx(1 / 3)), ("m@2", 2, pytest.approx(2 / 3))]
    shown = _j(backend_db, "show", "m@avg")
    assert shown["merged"] and [i["ref"] for i in shown["lineage"]["inputs"]] == ["m@1", "m@2"]
    # a merged checkpoint is an input of nothing plain; its inputs are protected from rm
    r = _cli(backend_db, "rm", "m@1")
    assert r.exit_code != 0 and "m@avg" in r.output
    assert reg.get("m@1").id == 1


def test_versions_of_a_merged_name(backend_db, tmp_path):
    reg = open_registry(backend_db)
    _two_full(tmp_path, reg)
    v1 = ckptreg.merge(reg, ["m@1", "m@2"], method="linear", name="avg", out=tmp_path / "v1.safetensors")
    v2 = ckptreg.merge(reg, ["m@1", "m@2"], method="linear", weights=[0.1, 0.9], name="avg",
                       out=tmp_path / "v2.safetensors")
    assert v2.id != v1.id
    assert reg.get("m@avg").id == v2.id and reg.get("m@avg:v1").id == v1.id and reg.get("m@avg:v2").id == v2.id
    assert [i["weight"] for i in reg.lineage("m@avg:v1")["inputs"]] == [0.5, 0.5]
    assert _j(backend_db, "show", "m@avg:v1")["id"] == v1.id


# ----------------------------------------------------------------------------- gc

def test_gc_dry_run_then_real_on_its_own_outputs(backend_db, tmp_path):
    reg = open_registry(backend_db)
    steps = [10, 20, 30, 40]
    for i, s in enumerate(steps):
        reg.add(write_hf_model(tmp_path / "run" / f"checkpoint-{s}", random_full_state(i, n_layers=1, d=8)), "g",
                step=s, metrics={"loss": 1.0 / (i + 1)})
    merged = ckptreg.merge(reg, ["g@30", "g@40"], method="linear", name="avg", out=tmp_path / "avg")
    stray = tmp_path / "run" / "checkpoint-10" / "optimizer.pt"
    stray.write_bytes(b"the trainer's, not registered")
    before = snapshot(reg)
    res = _j(backend_db, "gc", "--run", "g", "--keep-last", "1")
    assert res["dry_run"] is True and {d["step"] for d in res["delete"]} == {10, 20}  # 30: a merge input
    assert snapshot(reg) == before and (tmp_path / "run" / "checkpoint-20").exists()
    res = _j(backend_db, "gc", "--run", "g", "--keep-last", "1", "--yes")
    assert res["dry_run"] is False and {d["step"] for d in res["delete"]} == {10, 20}
    assert [c.ref for c in reg.checkpoints("g")] == ["g@30", "g@40", "g@avg"]
    assert not (tmp_path / "run" / "checkpoint-20").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoint-10").iterdir()) == ["optimizer.pt"]
    assert Path(merged.path).exists() and reg.lineage("g@avg")["inputs"][0]["ref"] == "g@30"
    assert sorted(e["ref"] for e in reg.history() if e["op"] == "gc") == ["g@10", "g@20"]


# ----------------------------------------------------------------------------- sql

def test_sql_reads_and_refuses_writes(backend_db, tmp_path):
    reg = open_registry(backend_db)
    _two_full(tmp_path, reg)
    cols, rows = reg.sql("SELECT run, count(*) AS n FROM checkpoints GROUP BY run ORDER BY run")
    assert cols == ["run", "n"] and [tuple(r) for r in rows] == [("m", 2)]
    out = _j(backend_db, "sql", "SELECT step FROM checkpoints ORDER BY step")
    assert [r["step"] for r in out] == [1, 2]
    before = snapshot(reg)
    for q in ("DELETE FROM checkpoints", "UPDATE checkpoints SET run = 'x'", "DROP TABLE metrics"):
        with pytest.raises(QueryError):
            reg.sql(q)
        r = _cli(backend_db, "sql", q)
        assert r.exit_code == QueryError.exit_code, r.output
    assert snapshot(reg) == before


# ----------------------------------------------------------------------------- spool

def test_busy_registry_spools_then_the_next_command_ingests(backend_db, tmp_path):
    reg = open_registry(backend_db)
    reg.add(full_file(tmp_path / "c1.safetensors", 1), "s", step=1)
    p2 = full_file(tmp_path / "c2.safetensors", 2)
    with busy(backend_db):
        # the training-loop path: bounded wait, then spooled, never raised
        assert ckptreg.add(p2, "s", step=2, metrics={"loss": 0.5}, db=str(backend_db), lock_timeout=0.3) is None
        pending = open_registry(backend_db, lock_timeout=0.3).spool_status()["pending"]
        assert len(pending) == 1 and str(pending[0]).startswith(str(tmp_path))
    d = _j(backend_db, "show", "s@2")  # any command that reaches the registry ingests
    assert d["metrics"] == {"loss": 0.5}
    assert open_registry(backend_db).spool_status() == {"pending": [], "rejected": []}
    assert [c.ref for c in reg.checkpoints("s")] == ["s@1", "s@2"]


# ----------------------------------------------------------------------------- export

def test_export_json_with_metrics_and_lineage(backend_db, tmp_path):
    reg = open_registry(backend_db)
    _two_full(tmp_path, reg)
    ckptreg.merge(reg, ["m@1", "m@2"], method="linear", name="avg", out=tmp_path / "avg.safetensors")
    out = tmp_path / "reg.json"
    res = _j(backend_db, "export", "-o", out)
    assert res["rows"] == 3
    rows = json.loads(out.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    by = {r["ref"]: r for r in rows}
    assert set(by) == {"m@1", "m@2", "m@avg"}
    assert by["m@1"]["metrics.loss"] == 1.0 if "metrics.loss" in by["m@1"] else by["m@1"]["metrics"]["loss"] == 1.0
    assert [i["ref"] for i in by["m@avg"]["inputs"]] == ["m@1", "m@2"]
    api = {r["ref"]: r for r in reg.export_rows()}
    assert api["m@avg"]["method"] == "linear" and [i["id"] for i in api["m@avg"]["inputs"]] == [1, 2]
    assert api["m@2"]["metrics"] == {"loss": 0.5}


def test_gc_merged_outputs_dry_run_then_real(backend_db, tmp_path):
    """gc --merged prunes ckptreg's own merge outputs: the newest and an aliased one stay, the
    others are unregistered and their files (written by ckptreg) deleted."""
    reg = open_registry(backend_db)
    _two_full(tmp_path, reg)
    outs = {}
    for name, w in (("o1", [0.2, 0.8]), ("o2", [0.4, 0.6]), ("o3", [0.6, 0.4]), ("o4", [0.8, 0.2])):
        outs[name] = Path(ckptreg.merge(reg, ["m@1", "m@2"], method="linear", weights=w, name=name,
                                        out=tmp_path / "out" / f"{name}.safetensors").path)
    reg.alias("m@o1", "paper")
    before = snapshot(reg)
    res = _j(backend_db, "gc", "--run", "m", "--merged", "--keep-last", "1")
    assert res["dry_run"] is True and sorted(d["ref"] for d in res["delete"]) == ["m@o2", "m@o3"]
    assert snapshot(reg) == before and all(p.exists() for p in outs.values())
    res = _j(backend_db, "gc", "--run", "m", "--merged", "--keep-last", "1", "--yes")
    assert sorted(d["ref"] for d in res["delete"]) == ["m@o2", "m@o3"]
    assert [c.ref for c in reg.checkpoints("m")] == ["m@1", "m@2", "m@o1", "m@o4"]
    assert not outs["o2"].exists() and not outs["o3"].exists()
    assert outs["o1"].exists() and outs["o4"].exists()
    assert reg.get("m@paper").ref == "m@o1"
    assert Path(reg.get("m@1").path).exists()  # inputs untouched

"""Registry: storage, validation before the database is touched, queries, lineage, spool."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import filelock
import pytest

from ckptreg import formats
from ckptreg.errors import (ChangedError, DuplicateError, FormatError, LockTimeout, NotFoundError,
                            QueryError, SelectionError, UsageError)
from ckptreg.registry import SCHEMA_VERSION, Checkpoint, Registry
from helpers_files import raw_safetensors, write_hf_model, random_full_state, write_peft_adapter


def _adapters(tmp_path, steps, run_dir="out", seed0=0):
    return {s: write_peft_adapter(tmp_path / run_dir / f"checkpoint-{s}", seed0 + s) for s in steps}


def _dump(reg):
    return reg.dump() if reg.path.exists() else None


# ----------------------------------------------------------------------------- add / get

def test_add_get_roundtrip(registry, tmp_path):
    p = write_peft_adapter(tmp_path / "out" / "checkpoint-100", 1)
    cid = registry.add(p, "r1", metrics={"loss": 0.5, "acc": 1}, tags={"lr": 0.001, "note": "x"})
    assert isinstance(cid, int)
    for ref in (cid, str(cid), "r1@100"):
        c = registry.get(ref)
        assert isinstance(c, Checkpoint)
        assert (c.id, c.run, c.step, c.name, c.merged) == (cid, "r1", 100, None, False)
    info = formats.inspect(p)
    assert c.ref == "r1@100"
    assert c.format == "peft" and c.kind == "lora" and c.base_model == "tiny"
    assert c.n_tensors == len(info.tensors) and c.n_params == info.n_params and c.nbytes == info.nbytes
    assert c.fingerprint == info.fingerprint
    assert c.metrics == {"loss": 0.5, "acc": 1.0}
    assert c.tags == {"lr": "0.001", "note": "x"}
    assert c.lora["r"] == 8 and c.lora["lora_alpha"] == 16
    assert registry.get(c) == c
    inv = registry.inventory(c)
    assert inv == dict(info.tensors)


def test_step_inferred_or_required(registry, tmp_path):
    p = write_peft_adapter(tmp_path / "step=70", 1)
    assert registry.get(registry.add(p, "r")).step == 70
    flat = tmp_path / "weights.safetensors"
    os.link(p / "adapter_model.safetensors", flat)
    before = _dump(registry)
    with pytest.raises(UsageError, match="step required"):
        registry.add(flat, "r")
    assert _dump(registry) == before
    assert registry.get(registry.add(flat, "r", step=5)).format == "safetensors"


def test_hf_sharded_model(registry, tmp_path):
    d = write_hf_model(tmp_path / "ckpt-3", random_full_state(0), shards=2)
    c = registry.get(registry.add(d, "full"))
    assert (c.step, c.format, c.kind) == (3, "hf", "full")
    assert len(c.files) == 2
    assert set(registry.inventory(c)) == set(formats.inspect(d).tensors)


@pytest.mark.parametrize("bad", ["missing", "truncated", "corrupt_header", "overlap", "bad_len"])
def test_bad_files_change_nothing(registry, tmp_path, bad):
    good = write_peft_adapter(tmp_path / "checkpoint-1", 1)
    registry.add(good, "r")
    before = _dump(registry)
    p = tmp_path / "bad" / "step-2.safetensors"
    p.parent.mkdir()
    f32 = b"\0" * 16
    if bad == "missing":
        p = tmp_path / "nope" / "checkpoint-2"
    elif bad == "truncated":
        raw_safetensors(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, f32[:7])
    elif bad == "corrupt_header":
        raw_safetensors(p, '{"a": {"dtype": "F32", "shape": [4], "data_off', f32)
    elif bad == "overlap":
        raw_safetensors(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                            "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, f32)
    elif bad == "bad_len":
        raw_safetensors(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, f32,
                        header_len=10 ** 9)
    with pytest.raises((FormatError, NotFoundError)) as ei:
        registry.add(p, "r")
    assert str(p) in str(ei.value) or p.name in str(ei.value)
    assert _dump(registry) == before


def test_bad_values_change_nothing(registry, tmp_path):
    p = write_peft_adapter(tmp_path / "checkpoint-1", 1)
    registry.add(p, "r")
    before = _dump(registry)
    p2 = write_peft_adapter(tmp_path / "checkpoint-2", 2)
    for kw, match in [({"metrics": {"loss": "low"}}, "loss"), ({"metrics": {"loss": None}}, "loss"),
                      ({"metrics": {"ok": True}}, "ok"), ({"metrics": [1]}, "dict"),
                      ({"step": -1}, "step"), ({"step": "x"}, "step"), ({"step": 1.5}, "step"),
                      ({"run": ""}, "run"), ({"run": "a@b"}, "@")]:
        args = {"run": "r", **kw}
        with pytest.raises(UsageError, match=match):
            registry.add(p2, **args)
        assert _dump(registry) == before


def test_duplicate_and_replace(registry, tmp_path):
    p = write_peft_adapter(tmp_path / "a" / "checkpoint-10", 1)
    q = write_peft_adapter(tmp_path / "b" / "checkpoint-10", 2)
    cid = registry.add(p, "r", metrics={"loss": 1.0})
    before = _dump(registry)
    with pytest.raises(DuplicateError, match="r@10"):
        registry.add(q, "r", metrics={"loss": 2.0})
    assert _dump(registry) == before
    cid2 = registry.add(q, "r", metrics={"acc": 3.0}, replace=True)
    c = registry.get("r@10")
    assert c.id == cid2 == cid
    assert c.path == str(q.resolve()) and c.fingerprint == formats.inspect(q).fingerprint
    assert c.metrics == {"acc": 3.0}
    assert len(registry.checkpoints("r")) == 1
    _, rows = registry.sql("SELECT count(*) FROM tensors")
    assert rows[0][0] == c.n_tensors


def test_nan_inf_metrics_stored_and_best_ignores_nan(registry, tmp_path):
    ps = _adapters(tmp_path, [10, 20, 30])
    registry.add(ps[10], "r", metrics={"loss": 0.9, "acc": 0.1})
    registry.add(ps[20], "r", metrics={"loss": float("nan"), "acc": float("nan")})
    registry.add(ps[30], "r", metrics={"loss": float("inf"), "acc": float("-inf")})
    c = registry.get("r@20")
    assert math.isnan(c.metrics["loss"])
    assert registry.get("r@30").metrics == {"loss": math.inf, "acc": -math.inf}
    assert registry.best("r", "loss").ref == "r@10"
    assert registry.best("r", "acc", maximize=True).ref == "r@10"
    assert registry.best("r", "acc").ref == "r@30"
    registry.log("r@10", {"loss": float("nan")})
    assert registry.best("r", "loss").ref == "r@30"  # latest value of r@10 is NaN now
    with pytest.raises(NotFoundError, match="loss, acc|acc, loss"):
        registry.best("r", "gsm8k")
    _, rows = registry.sql("SELECT count(*) FROM metrics WHERE isnan(value)")
    assert rows[0][0] == 3


def test_log_history_and_unknown(registry, tmp_path):
    p = write_peft_adapter(tmp_path / "checkpoint-5", 1)
    cid = registry.add(p, "r", metrics={"loss": 1.0})
    registry.log(cid, {"loss": 0.5, "eval_acc": 0.7})
    registry.log(registry.get(cid), {"loss": 0.25})
    assert registry.get(cid).metrics == {"loss": 0.25, "eval_acc": 0.7}
    _, rows = registry.sql("SELECT count(*) FROM metrics WHERE name = 'loss'")
    assert rows[0][0] == 3
    before = _dump(registry)
    with pytest.raises(NotFoundError):
        registry.log("r@6", {"loss": 1})
    with pytest.raises(UsageError):
        registry.log(cid, {"loss": "x"})
    assert _dump(registry) == before


def test_get_unknown_names_candidates(registry, tmp_path):
    ps = _adapters(tmp_path, [100, 200, 300])
    for s, p in ps.items():
        registry.add(p, "alpha-run")
    with pytest.raises(NotFoundError, match=r"'alpha-run@250'.*alpha-run@200.*alpha-run@300"):
        registry.get("alpha-run@250")
    with pytest.raises(NotFoundError, match=r"alpha-rnu@100.*closest runs: alpha-run"):
        registry.get("alpha-rnu@100")
    with pytest.raises(NotFoundError, match=r"id 99"):
        registry.get(99)
    with pytest.raises(NotFoundError):
        registry.get("nonsense")


def test_select_semantics(registry, tmp_path):
    ps = _adapters(tmp_path, [10, 20, 30, 40, 50, 60, 70, 80, 90])
    for p in ps.values():
        registry.add(p, "r")
    steps = lambda cs: [c.step for c in cs]  # noqa: E731
    assert steps(registry.select("r", 3)) == [70, 80, 90]
    assert steps(registry.select("r", 3, every=2)) == [50, 70, 90]  # METHODS.md worked example
    assert steps(registry.select("r", 3, exclude_final=True)) == [60, 70, 80]
    assert steps(registry.select("r", 5, every=2)) == [10, 30, 50, 70, 90]
    with pytest.raises(SelectionError, match=r"has 9 checkpoints.*needs 11"):
        registry.select("r", 6, every=2)
    with pytest.raises(SelectionError, match=r"8 without the final.*needs 9"):
        registry.select("r", 9, exclude_final=True)
    with pytest.raises(SelectionError):
        registry.select("r", 0)
    with pytest.raises(SelectionError, match="no plain checkpoints"):
        registry.select("zzz", 1)
    assert registry.final("r").step == 90 and registry.first("r").step == 10


def test_merge_lineage(registry, tmp_path):
    ps = _adapters(tmp_path, [1, 2, 3])
    ids = [registry.add(p, "r", metrics={"loss": 1.0 / s}) for s, p in ps.items()]
    out = write_peft_adapter(tmp_path / "merged" / "soup", 99)
    mid = registry.record_merge(path=out, run="r", name="last_3_unweighted", method="linear",
                                params={"scheme": "uniform"}, inputs=[(i, 1 / 3) for i in ids],
                                base="r@1")
    m = registry.get("r@last_3_unweighted")
    assert m.id == mid and m.merged and m.step is None and m.ref == "r@last_3_unweighted"
    lin = registry.lineage(mid)
    assert lin["method"] == "linear" and lin["params"] == {"scheme": "uniform"}
    assert [i["id"] for i in lin["inputs"]] == ids
    assert [i["ref"] for i in lin["inputs"]] == ["r@1", "r@2", "r@3"]
    assert [i["weight"] for i in lin["inputs"]] == pytest.approx([1 / 3] * 3)
    assert lin["base"] == ids[0] and lin["base_ref"] == "r@1"
    assert registry.lineage("r@1") is None
    assert [c.id for c in registry.checkpoints("r", merged=True)] == [mid]
    assert [c.step for c in registry.checkpoints("r", merged=False)] == [1, 2, 3]
    assert registry.final("r").step == 3  # merged never counts as final
    before = _dump(registry)
    with pytest.raises(DuplicateError):
        registry.record_merge(path=out, run="r", name="last_3_unweighted", method="linear",
                              params={}, inputs=[(ids[0], 1.0)])
    with pytest.raises(NotFoundError):
        registry.record_merge(path=out, run="r", name="other", method="linear", params={},
                              inputs=[(12345, 1.0)])
    assert _dump(registry) == before
    mid2 = registry.record_merge(path=out, run="r", name="last_3_unweighted", method="ties",
                                 params={"density": 0.5}, inputs=[(ids[1], 1.0)], replace=True)
    assert mid2 == mid
    assert registry.lineage(mid)["method"] == "ties"
    _, rows = registry.sql("SELECT count(*) FROM merges")
    assert rows[0][0] == 1


def test_ls_and_runs(registry, tmp_path):
    ps = _adapters(tmp_path, [1, 2, 3, 4])
    for s, p in ps.items():
        registry.add(p, "a", metrics={"loss": [0.3, 0.1, float("nan"), 0.2][s - 1]})
    registry.add(ps[1], "b", step=7, metrics={"loss": 5})
    assert [c.ref for c in registry.ls(run="a", sort="loss")] == ["a@2", "a@4", "a@1", "a@3"]
    assert [c.ref for c in registry.ls(last=2)] == ["a@3", "a@4", "b@7"]
    runs = {r["run"]: r for r in registry.runs()}
    assert runs["a"]["n"] == 4 and runs["a"]["first_step"] == 1 and runs["a"]["last_step"] == 4
    assert runs["a"]["metrics"] == {"loss": 0.2} and runs["b"]["metrics"] == {"loss": 5.0}


def test_verify_and_check_unchanged(registry, tmp_path):
    ps = _adapters(tmp_path, [1, 2, 3])
    for p in ps.values():
        registry.add(p, "r")
    assert {v["status"] for v in registry.verify()} == {"ok"}
    registry.check_unchanged("r@1")
    f2 = ps[2] / "adapter_model.safetensors"
    data = bytearray(f2.read_bytes())
    data[-1] ^= 0xFF
    f2.write_bytes(bytes(data))
    os.utime(f2, ns=(1, 1))
    (ps[3] / "adapter_model.safetensors").unlink()
    res = {v["ref"]: v for v in registry.verify()}
    assert [res[r]["status"] for r in ("r@1", "r@2", "r@3")] == ["ok", "changed", "missing"]
    with pytest.raises(ChangedError, match="adapter_model.safetensors"):
        registry.check_unchanged("r@2")
    with pytest.raises(ChangedError, match="missing"):
        registry.check_unchanged("r@3")
    assert registry.verify("r@1")[0]["status"] == "ok"


def test_sql_read_only(registry, tmp_path):
    registry.add(write_peft_adapter(tmp_path / "checkpoint-1", 1), "r", metrics={"loss": 1})
    cols, rows = registry.sql("SELECT run, step FROM checkpoints")
    assert cols == ["run", "step"] and rows == [("r", 1)]
    assert registry.sql("WITH x AS (SELECT 1 AS a) SELECT a FROM x")[1] == [(1,)]
    assert registry.sql("DESCRIBE checkpoints")[1]
    assert registry.sql("SHOW TABLES")[1]
    assert registry.sql("EXPLAIN SELECT 1")[1]
    before = _dump(registry)
    for q in ["DELETE FROM metrics", "DROP TABLE metrics", "INSERT INTO runs VALUES ('x', now(), NULL, NULL)",
              "SELECT 1; DELETE FROM metrics", "UPDATE checkpoints SET run = 'x'",
              "COPY checkpoints TO 'x.csv'", "ATTACH 'other.db'", "CREATE TABLE t (a INT)",
              "", "SELEC 1"]:
        with pytest.raises(QueryError):
            registry.sql(q)
    assert _dump(registry) == before


def test_schema_versioned(registry, tmp_path):
    registry.add(write_peft_adapter(tmp_path / "checkpoint-1", 1), "r")
    assert registry.schema_version() == SCHEMA_VERSION
    _, rows = registry.sql("SELECT version FROM schema_version ORDER BY 1")
    assert rows == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    reg2 = Registry(registry.path)
    assert reg2.get("r@1").step == 1
    assert reg2.sql("SELECT count(*) FROM schema_version")[1] == [(SCHEMA_VERSION,)]  # not re-applied
    import duckdb

    con = duckdb.connect(str(registry.path))
    con.execute("INSERT INTO schema_version VALUES (?, now())", [SCHEMA_VERSION + 1])
    con.close()
    with pytest.raises(FormatError, match="newer"):
        Registry(registry.path).get("r@1")


def test_migration_from_v1_keeps_data(db_path, tmp_path):
    """A database at schema version 1 (metric history, no `latest` flag) is migrated in place by
    the next opener, in one transaction, and reads the same."""
    import duckdb

    from ckptreg.registry import MIGRATIONS

    con = duckdb.connect(str(db_path))
    con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied TIMESTAMP NOT NULL)")
    for stmt in MIGRATIONS[0][1]:
        con.execute(stmt)
    con.execute("INSERT INTO schema_version VALUES (1, now())")
    con.execute("INSERT INTO runs VALUES ('r', now(), NULL, NULL)")
    con.execute("INSERT INTO checkpoints VALUES (1, 'r', 10, NULL, '/x', 'peft', 'lora', NULL, 1, 4, 16, 'fp', "
                "now(), '{}', NULL, false, '[]', '[]')")
    con.execute("INSERT INTO metrics VALUES (1, 1, 'loss', 0.9, 10, now()), (2, 1, 'loss', 0.5, 10, now()), "
                "(3, 1, 'acc', 'nan', 10, now())")
    con.close()
    reg = Registry(db_path)
    c = reg.get("r@10")
    assert c.metrics["loss"] == 0.5 and math.isnan(c.metrics["acc"])
    assert reg.schema_version() == SCHEMA_VERSION
    assert reg.sql("SELECT seq, latest FROM metrics ORDER BY seq")[1] == [(1, False), (2, True), (3, True)]
    reg.log("r@10", {"loss": 0.25})
    assert reg.get("r@10").metrics["loss"] == 0.25


def test_db_path_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTREG_DB", str(tmp_path / "env.duckdb"))
    assert Registry().path == tmp_path / "env.duckdb"
    assert Registry(tmp_path / "arg.duckdb").path == tmp_path / "arg.duckdb"
    monkeypatch.delenv("CKPTREG_DB")
    monkeypatch.chdir(tmp_path)
    assert Registry().path == tmp_path / "ckptreg.duckdb"


def test_readers_on_missing_db_do_not_create_it(registry):
    assert registry.checkpoints() == [] and registry.runs() == []
    with pytest.raises(NotFoundError):
        registry.get("r@1")
    assert not registry.path.exists()


# ----------------------------------------------------------------------------- busy database / spool

def _hold_lock(reg):
    lock = filelock.FileLock(str(reg.lock_path), is_singleton=False)
    lock.acquire()
    return lock


def test_add_spools_when_locked_then_ingested(db_path, tmp_path):
    ps = _adapters(tmp_path, [1, 2])
    reg = Registry(db_path, lock_timeout=0.2)
    reg.add(ps[1], "r", metrics={"loss": 1.0})
    lock = _hold_lock(reg)
    try:
        assert reg.add(ps[2], "r", metrics={"loss": float("nan")}) is None
        reg.log("r@2", {"acc": 0.5})
        reg.log("r@1", {"acc": 0.25})
        assert len(reg.spool_status()["pending"]) == 3
        entry = json.loads(open(reg.spool_status()["pending"][0]).read())
        assert entry["info"]["fingerprint"] == formats.inspect(ps[2]).fingerprint  # no re-read later
    finally:
        lock.release()
    c = Registry(db_path).get("r@2")  # any opener ingests
    assert math.isnan(c.metrics["loss"]) and c.metrics["acc"] == 0.5
    assert reg.get("r@1").metrics == {"loss": 1.0, "acc": 0.25}
    assert reg.spool_status() == {"pending": [], "rejected": []}


def test_spool_idempotent_and_conflicts_rejected(db_path, tmp_path):
    a = write_peft_adapter(tmp_path / "a" / "checkpoint-5", 1)
    b = write_peft_adapter(tmp_path / "b" / "checkpoint-5", 2)
    reg = Registry(db_path, lock_timeout=0.2)
    reg.add(write_peft_adapter(tmp_path / "checkpoint-1", 3), "r")
    lock = _hold_lock(reg)
    try:
        assert reg.add(a, "r") is None
        assert reg.add(a, "r") is None   # the same entry twice: the second is dropped
        assert reg.add(b, "r") is None   # conflicting run@step: rejected, kept for doctor
    finally:
        lock.release()
    assert reg.ingest() == 2
    assert [c.path for c in reg.checkpoints("r")] == [str((tmp_path / "checkpoint-1").resolve()), str(a.resolve())]
    st = reg.spool_status()
    assert st["pending"] == [] and len(st["rejected"]) == 1
    assert "already registered" in st["rejected"][0]["reason"]
    assert json.loads(open(st["rejected"][0]["file"]).read())["info"]["path"] == str(b.resolve())


def test_busy_database_file_is_retried_or_spooled(db_path, tmp_path):
    """Another process holding the DuckDB file itself (not our lock file): readers retry, writers spool."""
    ps = _adapters(tmp_path, [1, 2])
    reg = Registry(db_path, lock_timeout=0.3)
    reg.add(ps[1], "r")
    code = textwrap.dedent(f"""
        import duckdb, sys, time
        con = duckdb.connect({str(db_path)!r})
        print("held", flush=True)
        time.sleep(float(sys.argv[1]))
        con.close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code, "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout):
            reg.get("r@1")
        assert reg.add(ps[2], "r") is None
        patient = Registry(db_path, lock_timeout=30)
        assert patient.get("r@1").step == 1  # retried until the other process let go
    finally:
        proc.wait(timeout=30)
    assert reg.get("r@2").step == 2


def test_registry_does_not_import_torch(tmp_path):
    p = tmp_path / "x.safetensors"
    raw_safetensors(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    code = textwrap.dedent(f"""
        import sys
        from ckptreg.registry import Registry
        import ckptreg.cli.registry_cmds
        r = Registry({str(tmp_path / 'r.duckdb')!r})
        r.add({str(p)!r}, "r", step=1)
        r.get("r@1"); r.ls(); r.verify()
        assert "torch" not in sys.modules, "torch imported"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

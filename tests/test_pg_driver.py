"""The PostgreSQL driver (issue #11 item 1) against a REAL server (the ``pg_url`` session fixture:
a throwaway cluster, or CI's): a fresh database per test (``fresh_db("postgresql")``), the
library and the CLI in-process, concurrent writers in separate processes, an unreachable server
(a closed port) that makes training-loop adds spool, and ``sql``'s read-only transaction."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket

import pytest
from click.testing import CliRunner

# (helpers_files imports torch: imported inside the tests, so the spawned writer processes,
# which import this module, start in a fraction of a second)


def write_peft_adapter(*a, **kw):
    from helpers_files import write_peft_adapter as w

    return w(*a, **kw)


def write_hf_model(dir, seed):
    from helpers_files import random_full_state, write_hf_model as w

    return w(dir, random_full_state(seed))


@pytest.fixture
def url(fresh_db):
    return fresh_db("postgresql")


def _reg(url, **kw):
    from ckptreg.registry import Registry

    return Registry(url, **kw)


def _cli(*args, db):
    from ckptreg.cli import main

    return CliRunner().invoke(main, ["--db", db, *args], catch_exceptions=False)


def _closed_port_url(user="alice", password="s3cr3t-pw"):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # (closed when the with ends: nothing listens there)
    return f"postgresql://{user}:{password}@127.0.0.1:{port}/ckptreg", port


def test_picks_the_postgres_driver_and_masks_the_password():
    from ckptreg.registry import Registry

    r = Registry("postgresql://bob:hunter2@db.example:6543/reg")
    assert r.backend == "postgresql" and r.lock_path is None
    for shown in (str(r.path), repr(r), r.location):
        assert "hunter2" not in shown and "db.example:6543" in shown
    assert Registry("postgres://bob@h/x").backend == "postgresql"


def test_psycopg_missing_is_a_usage_error(monkeypatch):
    import sys

    from ckptreg.errors import UsageError
    from ckptreg.registry import Registry

    monkeypatch.setitem(sys.modules, "psycopg", None)   # import psycopg -> ImportError
    with pytest.raises(UsageError, match=r"psycopg is not installed: pip install 'ckptreg\[postgres\]'"):
        Registry("postgresql://u@127.0.0.1:1/x")


def test_add_log_ls_get_refs_aliases_versions_lineage_gc(url, tmp_path):
    from ckptreg.errors import DuplicateError, NotFoundError

    reg = _reg(url)
    ids = []
    for step in (100, 200, 300):
        d = write_peft_adapter(tmp_path / f"checkpoint-{step}", step)
        ids.append(reg.add(d, "sft", metrics={"loss": 1.0 / step, "acc": float("nan") if step == 100 else step / 1000}))
    assert ids == sorted(ids) and reg.last_add["status"] == "added"
    # the same files again: unchanged; other files at a registered step: DuplicateError
    assert reg.add(tmp_path / "checkpoint-100", "sft", step=100) == ids[0]
    assert reg.last_add["status"] == "unchanged"
    with pytest.raises(DuplicateError, match="sft@100 is already registered"):
        reg.add(write_peft_adapter(tmp_path / "other", 7), "sft", step=100)
    assert reg.log("sft@200", {"loss": 0.001}) == ids[1]
    c = reg.get("sft@200")
    assert c.metrics["loss"] == 0.001 and c.step == 200 and c.kind == "lora"
    assert reg.get(str(ids[2])).step == 300 and reg.get("sft@final").step == 300
    assert reg.get("sft@best:loss").step == 200
    assert reg.get("sft@best:acc:max").step == 300   # NaN never wins
    assert [x.step for x in reg.ls("sft", last=2)] == [200, 300]
    assert [x.step for x in reg.ls("sft", sort="loss")] == [200, 300, 100]
    assert reg.runs()[0]["n"] == 3 and reg.runs()[0]["final_id"] == ids[2]
    assert set(reg.inventory("sft@100")) == set(reg.inventory("sft@300"))
    # aliases
    assert reg.alias("sft@200", "prod")["status"] == "created"
    assert reg.get("sft@prod").id == ids[1]
    assert reg.alias("sft@300", "prod")["status"] == "moved"
    assert [a["target"] for a in reg.aliases("sft")] == ["sft@300"]
    # merges: lineage and versions
    out1 = write_peft_adapter(tmp_path / "merged1", 11)
    out2 = write_peft_adapter(tmp_path / "merged2", 12)
    m1 = reg.record_merge(path=out1, run="sft", name="avg", method="linear", params={"k": 2},
                          inputs=[("sft@100", 0.25), ("sft@200", 0.75)], base="sft@300")
    m2 = reg.record_merge(path=out2, run="sft", name="avg", method="linear", params={"k": 3},
                          inputs=[("sft@200", 0.5), ("sft@300", 0.5)])
    assert reg.get("sft@avg").id == m2 and reg.get("sft@avg:v1").id == m1
    lin = reg.lineage("sft@avg:v1")
    assert lin["method"] == "linear" and lin["params"] == {"k": 2} and lin["base_ref"] == "sft@300"
    assert [(i["ref"], i["weight"], i["position"]) for i in lin["inputs"]] == [("sft@100", 0.25, 0), ("sft@200", 0.75, 1)]
    rows = {r["id"]: r for r in reg.export_rows()}
    assert [(i["ref"], i["weight"]) for i in rows[m1]["inputs"]] == [("sft@100", 0.25), ("sft@200", 0.75)]
    assert rows[m2]["ref"] == "sft@avg:v2" and rows[m1]["base_ref"] == "sft@300"
    assert rows[ids[1]]["metrics"]["loss"] == 0.001 and rows[ids[1]]["inputs"] is None
    # gc dry run: the final, the aliased one and merge inputs are kept
    plan = reg.gc_plan("sft", keep_last=1)
    assert plan["dry_run"] and not plan["delete"]
    kept = {k["ref"]: k["reasons"] for k in plan["keep"]}
    assert "final" in kept["sft@300"] and any("input of merge" in r for r in kept["sft@100"])
    with pytest.raises(NotFoundError, match="no checkpoint 'sft@999'"):
        reg.get("sft@999")
    ops = [e["op"] for e in reg.history()]
    assert ops.count("add") == 3 and "merge" in ops and "alias" in ops and "log" in ops


def test_cli_on_postgres(url, tmp_path):
    d = write_hf_model(tmp_path / "checkpoint-5", 1)
    r = _cli("add", str(d), "--run", "r", "--metric", "loss=0.5", db=url)
    assert r.exit_code == 0, r.output
    cid = int(r.stdout.strip().splitlines()[-1])
    r = _cli("ls", "--json", db=url)
    assert r.exit_code == 0, r.output
    assert [x["ref"] for x in json.loads(r.stdout)] == ["r@5"]
    from ckptreg.cli import main

    r = CliRunner().invoke(main, ["ls", "--json"], env={"CKPTREG_DB": url}, catch_exceptions=False)
    assert r.exit_code == 0 and [x["ref"] for x in json.loads(r.stdout)] == ["r@5"]
    assert _cli("log", "r@5", "acc=0.7", db=url).exit_code == 0
    r = _cli("show", "r@5", "--json", db=url)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["id"] == cid
    r = _cli("sql", "SELECT run, step FROM checkpoints", db=url)
    assert r.exit_code == 0 and "r" in r.stdout and "5" in r.stdout
    r = _cli("gc", "--run", "r", "--keep-last", "1", db=url)
    assert r.exit_code == 0, r.output
    assert _cli("alias", "r@5", "prod", db=url).exit_code == 0
    r = _cli("show", "r@prod", "--json", db=url)
    assert r.exit_code == 0 and json.loads(r.stdout)["id"] == cid
    r = _cli("show", "r@nope", db=url)
    assert r.exit_code == 3 and "no checkpoint 'r@nope'" in r.output


def _add_same_step(url, folder, q):
    from ckptreg.errors import DuplicateError
    from ckptreg.registry import Registry

    try:
        q.put(("ok", Registry(url).add(folder, "race", step=7)))
    except DuplicateError as e:
        q.put(("dup", str(e)))
    except Exception as e:  # noqa: BLE001 (reported to the test)
        q.put(("error", f"{type(e).__name__}: {e}"))


def test_concurrent_adds_of_the_same_step_one_wins(url, tmp_path):
    _reg(url).check()   # migrate first: the race is the add's, not the schema's
    folders = [write_hf_model(tmp_path / f"f{i}", 10 + i) for i in range(2)]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_add_same_step, args=(url, str(f), q)) for f in folders]
    for p in ps:
        p.start()
    got = [q.get(timeout=60) for _ in ps]
    for p in ps:
        p.join(30)
    kinds = sorted(k for k, _ in got)
    assert kinds == ["dup", "ok"], got
    assert "race@7 is already registered" in next(m for k, m in got if k == "dup")
    assert len(_reg(url).checkpoints("race")) == 1


def _open_fresh(url, q):
    from ckptreg.registry import Registry

    try:
        q.put(("ok", Registry(url).check()["schema_version"]))
    except Exception as e:  # noqa: BLE001
        q.put(("error", f"{type(e).__name__}: {e}"))


def test_two_processes_migrating_a_fresh_database(url):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_open_fresh, args=(url, q)) for _ in range(3)]
    for p in ps:
        p.start()
    got = [q.get(timeout=60) for _ in ps]
    for p in ps:
        p.join(30)
    from ckptreg.registry import SCHEMA_VERSION

    assert got == [("ok", SCHEMA_VERSION)] * 3


def test_unreachable_server_spools_then_a_live_registry_ingests(url, tmp_path, monkeypatch):
    import ckptreg
    from ckptreg.errors import BackendError
    from ckptreg.registry import Registry, lock_timeout_for_training

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CKPTREG_SPOOL", raising=False)   # the default: beside the working directory
    down, port = _closed_port_url()
    d1 = write_peft_adapter(tmp_path / "checkpoint-10", 1)
    d2 = write_peft_adapter(tmp_path / "checkpoint-20", 2)
    # the training-loop path: never raises, spools beside the working directory
    assert ckptreg.add(d1, "job", metrics={"loss": 0.3}, db=down) is None
    reg = Registry(down, lock_timeout=lock_timeout_for_training())
    assert reg.add(d2, "job", metrics={"loss": 0.2}) is None
    assert reg.last_add["status"] == "spooled" and f"127.0.0.1:{port}" in reg.last_add["reason"]
    assert reg.log("job@10", {"acc": 0.9}) is None
    assert reg.spool_dir.parent == tmp_path / ".ckptreg-spool"
    assert len(reg.spool_status()["pending"]) == 3
    assert not any("s3cr3t-pw" in open(p).read() for p in reg.spool_status()["pending"])
    # a command on the unreachable server: exit 12, names host:port, never the password
    r = _cli("ls", db=down)
    assert r.exit_code == 12, r.output
    assert f"127.0.0.1:{port}" in r.output and "s3cr3t-pw" not in r.output
    with pytest.raises(BackendError):
        reg.ls()
    # the same spool, now pointed at a live server (the spool is keyed by host:port/dbname)
    monkeypatch.setenv("CKPTREG_SPOOL", str(reg.spool_dir.parent))
    live = Registry(url)
    assert live.spool_dir != reg.spool_dir
    for p in reg.spool_status()["pending"]:
        e = json.loads(open(p).read())
        e["db"] = live._spool_.db_path
        os.makedirs(live.spool_dir, exist_ok=True)
        with open(os.path.join(live.spool_dir, os.path.basename(p)), "w") as f:
            json.dump(e, f)
        os.unlink(p)
    got = {c.ref: c.metrics for c in live.ls("job")}
    assert got == {"job@10": {"loss": 0.3, "acc": 0.9}, "job@20": {"loss": 0.2}}
    assert live.spool_status() == {"pending": [], "rejected": []}


def test_spool_ingested_when_the_server_comes_back(pg_server, fresh_db, tmp_path, monkeypatch):
    """The same URL: spooled while the server's database does not accept connections, ingested
    by the next command once it does."""
    import psycopg

    from ckptreg.registry import Registry

    url = fresh_db("postgresql")
    monkeypatch.chdir(tmp_path)
    Registry(url).check()
    dbname = url.rsplit("/", 1)[1]
    with psycopg.connect(pg_server.url, autocommit=True) as c:
        c.execute(f"ALTER DATABASE {dbname} ALLOW_CONNECTIONS false")
        c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [dbname])
    try:
        d = write_peft_adapter(tmp_path / "checkpoint-3", 3)
        reg = Registry(url, lock_timeout=1.0)
        assert reg.add(d, "back", metrics={"loss": 1.5}) is None
        assert reg.last_add["status"] == "spooled"
    finally:
        with psycopg.connect(pg_server.url, autocommit=True) as c:
            c.execute(f"ALTER DATABASE {dbname} ALLOW_CONNECTIONS true")
    r = _cli("ls", "--json", db=url)
    assert r.exit_code == 0, r.output
    assert [x["ref"] for x in json.loads(r.stdout)] == ["back@3"]
    assert Registry(url).spool_status()["pending"] == []


def test_sql_is_read_only_single_statement_and_bounded(url, tmp_path):
    from ckptreg.errors import QueryError

    reg = _reg(url)
    reg.add(write_peft_adapter(tmp_path / "checkpoint-1", 1), "s")
    cols, rows = reg.sql("SELECT run, step FROM checkpoints")
    assert cols == ["run", "step"] and rows == [("s", 1)]
    with pytest.raises(QueryError, match="refused.*DELETE FROM checkpoints"):
        reg.sql("DELETE FROM checkpoints")
    with pytest.raises(QueryError, match="exactly one statement"):
        reg.sql("SELECT 1; DELETE FROM checkpoints")
    # a write the keyword screen lets through: the READ ONLY transaction refuses it
    with pytest.raises(QueryError, match="read-only.*WITH d AS"):
        reg.sql("WITH d AS (DELETE FROM checkpoints RETURNING id) SELECT count(*) FROM d")
    with pytest.raises(QueryError, match="read-only"):
        reg.sql("SELECT nextval('checkpoint_id_seq')")
    with pytest.raises(QueryError, match="time limit"):
        reg.sql("SELECT pg_sleep(5)", timeout=0.3)
    # the server refuses a second statement on its own (extended protocol)
    with pytest.raises(QueryError, match="multiple commands"):
        reg._db.query_read_only("SELECT 1; COMMIT; DELETE FROM checkpoints", 5)
    # COPY ... TO a server file runs in a READ ONLY transaction: refused before it is sent
    out = tmp_path / "copied.csv"
    with pytest.raises(QueryError, match="only a query is allowed.*not COPY"):
        reg.sql(f"COPY (SELECT * FROM checkpoints) TO '{out}'")
    assert not out.exists()
    assert reg.sql("-- a comment first\n(SELECT count(*) AS n FROM checkpoints)") == (["n"], [(1,)])
    assert len(reg.checkpoints()) == 1
    r = _cli("sql", "DELETE FROM checkpoints", db=url)
    assert r.exit_code == 16 and "refused" in r.output


def test_an_add_that_loses_the_race_is_retried_and_reports_the_duplicate(url, tmp_path):
    """Deterministic race: another transaction holds an uncommitted row for race@7 while this
    add inserts the same key (it waits on the unique index); once the other commits, the add's
    transaction fails with a unique violation, is run again, sees the committed row and reports
    the DuplicateError a sequential add gets (not psycopg's UniqueViolation)."""
    import threading
    import time

    import psycopg

    from ckptreg.errors import DuplicateError

    reg = _reg(url, lock_timeout=20.0)
    reg.check()
    folder = write_hf_model(tmp_path / "mine", 3)
    other = psycopg.connect(url, autocommit=True)
    try:
        other.execute("BEGIN")
        other.execute("INSERT INTO runs (name, created) VALUES ('race', now())")
        other.execute("INSERT INTO checkpoints (id, run, step, path, format, kind, n_tensors, n_params, "
                      "nbytes, fingerprint, created, merged) VALUES (nextval('checkpoint_id_seq'), 'race', 7, "
                      "'/elsewhere', 'hf', 'full', 0, 0, 0, 'v2:other', now(), false)")
        got = {}

        def add():
            try:
                got["id"] = reg.add(folder, "race", step=7)
            except Exception as e:  # noqa: BLE001 (checked below)
                got["error"] = e

        t = threading.Thread(target=add)
        t.start()
        time.sleep(1.0)
        assert t.is_alive(), got   # waiting on the other transaction's key
        other.execute("COMMIT")
        t.join(30)
    finally:
        other.close()
    assert isinstance(got.get("error"), DuplicateError), got
    assert "race@7 is already registered" in str(got["error"])
    assert [c.path for c in reg.checkpoints("race")] == ["/elsewhere"]


def test_a_cached_connection_survives_a_server_restart(pg_server, fresh_db, tmp_path):
    from ckptreg.registry import Registry

    url = fresh_db("postgresql")
    reg = Registry(url)
    reg.add(write_peft_adapter(tmp_path / "checkpoint-1", 1), "rs")
    pg_server.restart()   # the process's cached connection is now dead
    assert [c.step for c in Registry(url).ls("rs")] == [1]
    assert reg.add(write_peft_adapter(tmp_path / "checkpoint-2", 2), "rs") is not None


def test_export_csv_json_parquet_on_postgres(url, tmp_path):
    import csv

    reg = _reg(url)
    a = reg.add(write_peft_adapter(tmp_path / "checkpoint-1", 1), "e", metrics={"loss": 0.5}, tags={"k": "v"})
    b = reg.add(write_peft_adapter(tmp_path / "checkpoint-2", 2), "e")
    m = reg.record_merge(path=write_peft_adapter(tmp_path / "m", 3), run="e", name="mix", method="linear",
                         params={}, inputs=[(a, 0.5), (b, 0.5)])
    res = reg.export(tmp_path / "x.csv")
    rows = list(csv.DictReader(open(tmp_path / "x.csv")))
    assert res["rows"] == 3 and [r["ref"] for r in rows] == ["e@1", "e@2", "e@mix"]
    assert rows[0]["merged"] == "false" and rows[0]["metrics.loss"] == "0.5"
    assert json.loads(rows[0]["tags"]) == {"k": "v"}
    assert [i["ref"] for i in json.loads(rows[2]["inputs"])] == ["e@1", "e@2"]
    got = json.loads(open(reg.export(tmp_path / "x.json")["path"]).read())
    assert [r["id"] for r in got] == [a, b, m] and got[2]["inputs"][1]["weight"] == 0.5
    pq = pytest.importorskip("pyarrow.parquet")
    t = pq.read_table(reg.export(tmp_path / "x.parquet")["path"])
    assert t.column("ref").to_pylist() == ["e@1", "e@2", "e@mix"]
    assert t.column("inputs").to_pylist()[2][0]["ref"] == "e@1"


def test_one_process_at_a_time_ingests_a_spool_folder(url, tmp_path, monkeypatch):
    """Without a writer lock, two processes opening the server with the same spool folder would
    both apply its entries (a spooled log twice); the one that does not get the folder's advisory
    lock leaves them to the one that has it."""
    import hashlib

    import psycopg

    from ckptreg.registry import Registry

    monkeypatch.setenv("CKPTREG_SPOOL", str(tmp_path / "spool"))
    reg = Registry(url)
    reg.add(write_peft_adapter(tmp_path / "checkpoint-1", 1), "g")
    entry = reg._spool({"op": "log", "ckpt": "g@1", "metrics": {"acc": 0.5}, "step": None,
                        "created": "2026-01-01T00:00:00", "actor": ["h", "u", 1]})
    key = int.from_bytes(hashlib.sha256(f"ckptreg-spool:{reg.spool_dir}".encode()).digest()[:8], "big", signed=True)
    other = psycopg.connect(url, autocommit=True)
    try:
        assert other.execute("SELECT pg_try_advisory_lock(%s)", [key]).fetchone()[0]
        assert Registry(url).ingest() == 0          # another session is ingesting that folder
        assert os.path.exists(entry) and "acc" not in Registry(url).get("g@1").metrics
    finally:
        # unlock before closing: a closed session's locks are released by its server process
        # shortly after, not by close() itself (the next ingest could still find it held)
        other.execute("SELECT pg_advisory_unlock(%s)", [key])
        other.close()
    assert Registry(url).ingest() == 1
    assert not os.path.exists(entry) and Registry(url).get("g@1").metrics == {"acc": 0.5}
    assert [e["op"] for e in Registry(url).history("g@1")].count("log") == 1


def test_a_writer_kept_waiting_past_lock_timeout_spools(url, tmp_path, monkeypatch):
    """Busy means spool on PostgreSQL too: an add that waits on another transaction's
    uncommitted key longer than its bound (the training loop's 1 s) spools instead of stalling;
    the next command ingests it."""
    import time

    import psycopg

    from ckptreg.registry import Registry, lock_timeout_for_training

    monkeypatch.setenv("CKPTREG_SPOOL", str(tmp_path / "spool"))
    Registry(url).check()
    d = write_peft_adapter(tmp_path / "checkpoint-4", 4)
    other = psycopg.connect(url, autocommit=True)
    try:
        other.execute("BEGIN")
        other.execute("INSERT INTO runs (name, created) VALUES ('busy', now())")
        reg = Registry(url, lock_timeout=lock_timeout_for_training())
        t0 = time.monotonic()
        assert reg.add(d, "busy", step=4) is None
        assert time.monotonic() - t0 < 10
        assert reg.last_add["status"] == "spooled" and "locked" in reg.last_add["reason"]
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert [c.ref for c in Registry(url).ls("busy")] == ["busy@4"]

"""Registry hardening ("nothing lost"): a read-only SQL surface by construction, validated spool
entries, out-of-space / read-only / broken databases, full-content verification, stale
temporaries. Real files, real DuckDB databases, the CLI in-process."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest
from click.testing import CliRunner

from ckptreg.cli import main
from ckptreg.errors import FormatError
from ckptreg.registry import Registry
from helpers_files import fill_filesystem, mounted_tmpfs, write_peft_adapter


@pytest.fixture
def cli(db_path):
    runner = CliRunner()

    def run(*args, db=None, env=None):
        return runner.invoke(main, ["--db", str(db or db_path), *map(str, args)], env=env,
                             catch_exceptions=False)

    return run


def _bytes(*paths) -> dict:
    return {str(p): (p.read_bytes() if p.exists() else None) for p in map(pathlib.Path, paths)}


# ----------------------------------------------------------------------------- item 7: sql

@pytest.fixture
def reg_with_adapter(cli, db_path, tmp_path):
    ad = write_peft_adapter(tmp_path / "run" / "checkpoint-1", 1)
    assert cli("add", ad, "--run", "r", "--metric", "loss=0.5").exit_code == 0
    files = [db_path, pathlib.Path(str(db_path) + ".wal"), ad / "adapter_model.safetensors",
             ad / "adapter_config.json"]
    return ad, files


ATTACKS = {
    "explain-analyze-copy-over-adapter": "EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO '{adapter}'",
    "copy-to-file": "COPY checkpoints TO '{tmp}/out.csv'",
    "explain-analyze-create": "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1 AS a",
    "explain-analyze-set": "EXPLAIN ANALYZE SET enable_external_access = true",
    "set-external-access": "SET enable_external_access = true",
    "explain-analyze-checkpoint": "EXPLAIN ANALYZE CHECKPOINT",
    "read_text": "SELECT * FROM read_text('/etc/passwd')",
    "read_blob": "SELECT * FROM read_blob('/etc/passwd')",
    "glob": "SELECT * FROM glob('/etc/*')",
    "read_csv": "SELECT * FROM read_csv('/etc/passwd')",
    "attach": "ATTACH '{tmp}/other.duckdb' AS o",
    "install": "INSTALL sqlite",
    "delete": "DELETE FROM metrics",
    "update": "UPDATE checkpoints SET run = 'x'",
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_sql_attack_refused_files_unchanged(cli, db_path, tmp_path, reg_with_adapter, name):
    ad, files = reg_with_adapter
    before_dump = Registry(db_path).dump()
    before = _bytes(*files)
    q = ATTACKS[name].format(adapter=ad / "adapter_model.safetensors", tmp=tmp_path)
    r = cli("sql", q)
    if name == "explain-analyze-checkpoint":
        # a CHECKPOINT on a read-only file is a no-op: allowed, but nothing may change
        assert r.exit_code in (0, 16), r.output
    else:
        assert r.exit_code == 16, (q, r.output)
        assert r.stderr.startswith("error: sql: ") and "Error" in r.stderr, r.stderr
    assert _bytes(*files) == before
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "other.duckdb").exists()
    assert Registry(db_path).dump() == before_dump


def test_sql_reads_work(cli, reg_with_adapter):
    def rows(q):
        r = cli("sql", "--json", "--", q)  # `--`: a query starting with a comment is not an option
        assert r.exit_code == 0, (q, r.output)
        return [list(d.values()) for d in json.loads(r.stdout)]

    assert rows("-- a leading comment\nSELECT step FROM checkpoints") == [[1]]
    assert rows("(SELECT 1 AS a) UNION ALL (SELECT 2 AS a)") == [[1], [2]]
    assert rows("WITH x AS (SELECT name, value FROM metrics) SELECT * FROM x") == [["loss", 0.5]]
    assert rows("/* block */ SELECT count(*) AS n FROM tensors /* tail */;") == [[8]]
    assert rows("PRAGMA version")
    assert cli("sql", "DESCRIBE checkpoints").exit_code == 0


def test_sql_timeout(cli, reg_with_adapter):
    r = cli("sql", "SELECT count(*) FROM range(1000000000000) a", "--timeout", "0.5")
    assert r.exit_code == 16, r.output
    assert "time limit of 0.5 s" in r.stderr
    assert cli("sql", "SELECT 1", "--timeout", "5").exit_code == 0


def test_sql_sqlite_file_is_not_opened_with_an_extension(cli, tmp_path):
    import sqlite3

    p = tmp_path / "not-duckdb.db"
    s = sqlite3.connect(p)
    s.execute("CREATE TABLE checkpoints (id INTEGER)")
    s.commit()
    s.close()
    before = p.read_bytes()
    for args in (("sql", "SELECT * FROM checkpoints"), ("ls",)):
        r = cli(*args, db=p)
        assert r.exit_code == FormatError.exit_code, r.output
        assert f"{p}: not a usable ckptreg registry: a SQLite database" in r.stderr, r.stderr
    assert p.read_bytes() == before


# ----------------------------------------------------------------------------- item 8: spool

def _hold_lock(db_path):
    import filelock

    lock = filelock.FileLock(str(db_path) + ".lock", is_singleton=False)
    lock.acquire()
    return lock


def _spooled_add(db_path, path, run="r", step=None):
    """A real spool entry: the registry is locked by someone else, so add() spools it."""
    lock = _hold_lock(db_path)
    try:
        assert Registry(db_path, lock_timeout=0.1).add(path, run, step=step) is None
    finally:
        lock.release()


BAD_ENTRIES = {
    "list.json": [1, 2, 3],
    "string.json": "hello",
    "info-not-dict.json": {"op": "add", "run": "r", "step": 7, "metrics": {}, "tags": {}, "replace": False,
                           "created": "2024-01-01T00:00:00", "info": "notadict"},
    "bad-op.json": {"op": "drop", "run": "r"},
    "metrics-not-numbers.json": {"op": "log", "ckpt": "r@1", "metrics": {"loss": "low"},
                                 "step": None, "created": "2024-01-01T00:00:00"},
    "tensors-malformed.json": {"op": "add", "run": "r", "step": 8, "metrics": {}, "tags": {}, "replace": False,
                               "created": "2024-01-01T00:00:00",
                               "info": {"path": "/x", "format": "peft", "kind": "lora", "files": ["/x/a"],
                                        "tensors": [["a", "F32", "notashape", "/x/a", 0, 4]],
                                        "n_params": 1, "nbytes": 4, "fingerprint": "ab"}},
}


def test_bad_spool_entries_rejected_everything_else_goes_on(cli, db_path, tmp_path):
    import ckptreg

    a1 = write_peft_adapter(tmp_path / "checkpoint-1", 1)
    a2 = write_peft_adapter(tmp_path / "checkpoint-2", 2)
    assert cli("add", a1, "--run", "r").exit_code == 0
    _spooled_add(db_path, a2)                       # one good entry among the bad ones
    spool = pathlib.Path(str(db_path) + ".spool")
    for name, e in BAD_ENTRIES.items():
        (spool / name).write_text(json.dumps(e))
    r = cli("ls", "--json")                         # any command ingests; none fails
    assert r.exit_code == 0, r.output
    assert [d["step"] for d in json.loads(r.stdout)] == [1, 2]
    a3 = write_peft_adapter(tmp_path / "checkpoint-3", 3)
    assert ckptreg.add(a3, "r", db=str(db_path)) is not None   # the training-loop API does not raise
    d = json.loads(cli("doctor", "--json").stdout)
    assert d["spool_pending"] == 0 and d["spool_rejected"] == len(BAD_ENTRIES)
    reasons = {pathlib.Path(x["file"]).name: x["reason"] for x in d["spool_rejected_entries"]}
    assert "expected a JSON object, got list" in reasons["list.json"]
    assert "expected a JSON object, got str" in reasons["string.json"]
    assert "field 'info'" in reasons["info-not-dict.json"]
    assert "unknown op 'drop'" in reasons["bad-op.json"]
    assert "field 'metrics'" in reasons["metrics-not-numbers.json"]
    assert "field 'info.tensors'" in reasons["tensors-malformed.json"]
    assert Registry(db_path).get("r@1").metrics == {}


def test_spooled_entry_whose_file_changed_is_rejected(cli, db_path, tmp_path):
    a1 = write_peft_adapter(tmp_path / "checkpoint-1", 1)
    assert cli("add", a1, "--run", "r").exit_code == 0
    a2 = write_peft_adapter(tmp_path / "checkpoint-2", 2)
    _spooled_add(db_path, a2)
    before = Registry(db_path, lock_timeout=0.1)
    write_peft_adapter(a2, 99)                      # another checkpoint now sits at the spooled path
    r = cli("ls", "--json")
    assert r.exit_code == 0 and [d["step"] for d in json.loads(r.stdout)] == [1]
    st = before.spool_status()
    assert st["pending"] == [] and len(st["rejected"]) == 1
    assert f"{a2.resolve()}: not the checkpoint that was spooled" in st["rejected"][0]["reason"]
    assert "fingerprint differs" in st["rejected"][0]["reason"]


def test_spooled_entry_whose_file_is_gone_is_rejected(cli, db_path, tmp_path):
    a1 = write_peft_adapter(tmp_path / "checkpoint-1", 1)
    assert cli("add", a1, "--run", "r").exit_code == 0
    a2 = write_peft_adapter(tmp_path / "checkpoint-2", 2)
    _spooled_add(db_path, a2)
    (a2 / "adapter_model.safetensors").unlink()
    assert cli("ls").exit_code == 0
    st = Registry(db_path).spool_status()
    assert len(st["rejected"]) == 1 and "cannot re-inspect the spooled checkpoint" in st["rejected"][0]["reason"]
    assert [c.step for c in Registry(db_path).checkpoints()] == [1]


# ----------------------------------------------------------------------------- item 10: the database side

@pytest.fixture
def tmpfs(tmp_path):
    """A REAL small tmpfs mounted for the test (root only)."""
    with mounted_tmpfs(tmp_path / "mnt", "16m") as mnt:
        yield mnt


_fill = fill_filesystem


def test_disk_full_cli_add_is_diskfullerror_python_add_spools_elsewhere(cli, tmpfs, tmp_path, monkeypatch):
    import ckptreg
    from ckptreg.integrations import _Reporter

    db = tmpfs / "reg.duckdb"
    a1 = write_peft_adapter(tmp_path / "checkpoint-1", 1)
    # enough tensors that the commit needs new pages of the WAL
    a2 = write_peft_adapter(tmp_path / "checkpoint-2", 2, n_layers=200, d=4, r=1)
    a3 = write_peft_adapter(tmp_path / "checkpoint-3", 3, n_layers=200, d=4, r=1)
    assert cli("add", a1, "--run", "r", db=db).exit_code == 0
    before = Registry(db).dump()
    filler = _fill(tmpfs)
    r = cli("add", a2, "--run", "r", db=db)
    assert r.exit_code == 13, r.output
    assert r.stderr.startswith(f"error: {db}: no space left on the database's filesystem"), r.stderr
    assert Registry(db).dump() == before           # intact, and still readable while full
    monkeypatch.setenv("CKPTREG_SPOOL", str(tmp_path / "fallback-spool"))
    assert ckptreg.add(a2, "r", db=str(db)) is None  # spooled, not raised into the loop
    cb = _Reporter()
    cb._init_common("r", str(db), None, strict=False, replace=False)
    assert cb._add(str(a3), 3, {"loss": 0.1}) is None and cb.errors == []   # a trainer callback too
    st = Registry(db).spool_status()
    assert len(st["pending"]) == 2 and all(p.startswith(str(tmp_path / "fallback-spool")) for p in st["pending"])
    assert not list(pathlib.Path(str(db) + ".spool").glob("*.json"))
    assert not list(pathlib.Path(str(db) + ".spool").glob(".*"))   # no partial spool file left
    assert Registry(db).dump() == before
    filler.unlink()
    got = json.loads(cli("ls", "--json", db=db).stdout)   # the next opener ingests the fallback spool
    assert [d["step"] for d in got] == [1, 2, 3]
    assert Registry(db).get("r@3").metrics == {"loss": 0.1}
    assert Registry(db).spool_status() == {"pending": [], "rejected": []}


def test_read_only_database_folder_is_accesserror(cli, tmpfs, tmp_path):
    import ckptreg
    from ckptreg.errors import AccessError

    db = tmpfs / "reg.duckdb"
    a1 = write_peft_adapter(tmp_path / "checkpoint-1", 1)
    a2 = write_peft_adapter(tmp_path / "checkpoint-2", 2)
    assert cli("add", a1, "--run", "r", db=db).exit_code == 0
    before = Registry(db).dump()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    r = cli("add", a2, "--run", "r", db=db)
    assert r.exit_code == 15, r.output
    assert f"error: {tmpfs}: the registry's folder is not writable" in r.stderr, r.stderr
    with pytest.raises(AccessError, match=str(tmpfs)):
        ckptreg.add(a2, "r", db=str(db))
    assert json.loads(cli("ls", "--json", db=db).stdout)[0]["step"] == 1    # reads still work
    assert Registry(db).dump() == before


def _drop_table(db, table):
    import duckdb

    con = duckdb.connect(str(db))
    con.execute(f"DROP TABLE {table}")
    con.close()


def test_missing_table_is_formaterror_and_doctor_fails(cli, db_path, tmp_path):
    assert cli("add", write_peft_adapter(tmp_path / "checkpoint-1", 1), "--run", "r").exit_code == 0
    assert cli("doctor").exit_code == 0
    _drop_table(db_path, "metrics")
    msg = f"error: {db_path}: not a usable ckptreg registry: table metrics missing"
    for args in (("ls",), ("show", "r@1"), ("add", write_peft_adapter(tmp_path / "checkpoint-2", 2), "--run", "r"),
                 ("doctor",)):
        r = cli(*args)
        assert r.exit_code == FormatError.exit_code, (args, r.output)
        assert msg in r.stderr, (args, r.stderr)
    r = cli("doctor", "--json")
    assert r.exit_code == FormatError.exit_code and json.loads(r.stdout)["usable"] is False


def test_doctor_fails_on_corrupt_newer_and_unreadable_databases(cli, db_path, tmp_path):
    import duckdb

    assert cli("add", write_peft_adapter(tmp_path / "checkpoint-1", 1), "--run", "r").exit_code == 0
    newer = tmp_path / "newer.duckdb"
    newer.write_bytes(db_path.read_bytes())
    wal = pathlib.Path(str(db_path) + ".wal")
    if wal.exists():
        pathlib.Path(str(newer) + ".wal").write_bytes(wal.read_bytes())
    con = duckdb.connect(str(newer))
    con.execute("INSERT INTO schema_version VALUES (99, now())")
    con.close()
    garbage = tmp_path / "garbage.duckdb"
    garbage.write_bytes(b"\x01" * 8192)
    folder = tmp_path / "dir.duckdb"
    folder.mkdir()
    for db, what in ((newer, "newer than this ckptreg"), (garbage, "not a DuckDB file"),
                     (folder, "it is a directory")):
        r = cli("doctor", db=db)
        assert r.exit_code == FormatError.exit_code, (db, r.output)
        assert what in r.stderr and str(db) in r.stderr, (db, r.stderr)


# ----------------------------------------------------------------------------- item 13: verify --full

def _big_model(path, seed=0):
    """One .safetensors file with a 6 MiB tensor (larger than any head/tail a cheap hash reads)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({"big.weight": torch.randn(1536, 1024, generator=g), "small.bias": torch.zeros(8)}, str(path))
    return path


def _flip_middle_byte(path):
    """Change one byte in the middle of the file, same size, mtime restored."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_verify_full_records_lazily_then_catches_a_middle_byte(cli, db_path, tmp_path):
    m = _big_model(tmp_path / "step-1.safetensors")
    assert cli("add", m, "--run", "r").exit_code == 0
    r = cli("verify", "--full", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0]["detail"] == "full hash recorded (first full verify)"
    stored = Registry(db_path).sql("SELECT full_hash FROM checkpoints")[1][0][0]
    assert str(m.resolve()) in json.loads(stored)
    r = cli("verify", "--full", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["detail"] == "full hash matches"
    before = Registry(db_path).dump()
    _flip_middle_byte(m)
    r = cli("verify", "--full", "--json")
    assert r.exit_code == 10, r.output
    row = json.loads(r.stdout)[0]
    assert row["status"] == "changed" and str(m.resolve()) in row["detail"]
    assert "content changed since its full hash was recorded" in row["detail"]
    assert "r@1 (changed)" in r.stderr
    assert Registry(db_path).dump() == before      # a failed full verify records nothing


def test_add_full_hash_then_verify_full(cli, db_path, tmp_path):
    m = _big_model(tmp_path / "step-1.safetensors", seed=1)
    assert cli("add", m, "--run", "r", "--full-hash").exit_code == 0
    assert Registry(db_path).sql("SELECT full_hash IS NOT NULL FROM checkpoints")[1] == [(True,)]
    _flip_middle_byte(m)                            # tampered before any full verify
    r = cli("verify", "--full")
    assert r.exit_code == 10 and str(m.resolve()) in r.stdout + r.stderr


def test_schema_v2_registry_migrates_and_keeps_verifying(cli, db_path, tmp_path):
    import duckdb

    from ckptreg.registry import SCHEMA_VERSION

    m = _big_model(tmp_path / "step-1.safetensors", seed=2)
    assert cli("add", m, "--run", "r").exit_code == 0
    con = duckdb.connect(str(db_path))             # make it what ckptreg with schema 2 wrote
    for q in ["DROP INDEX checkpoints_run_step", "DROP INDEX checkpoints_run_name",
              "ALTER TABLE checkpoints DROP COLUMN full_hash",
              "ALTER TABLE checkpoints DROP COLUMN version",          # schema 4's additions
              "ALTER TABLE runs DROP COLUMN params",
              "DROP TABLE aliases", "DROP TABLE events", "DROP SEQUENCE event_seq",
              "CREATE UNIQUE INDEX checkpoints_run_step ON checkpoints(run, step)",
              "CREATE UNIQUE INDEX checkpoints_run_name ON checkpoints(run, name)",
              "DELETE FROM schema_version WHERE version > 2"]:
        con.execute(q)
    con.close()
    assert cli("verify").exit_code == 0            # migrated on open; the stored fingerprint still checks
    assert Registry(db_path).schema_version() == SCHEMA_VERSION >= 4
    assert cli("verify", "--full").exit_code == 0
    _flip_middle_byte(m)
    assert cli("verify", "--full").exit_code == 10


# ----------------------------------------------------------------------------- verify: stale temporaries

def test_verify_lists_stale_temporaries(cli, db_path, tmp_path):
    from ckptreg.writer import TMP_MARK

    a = write_peft_adapter(tmp_path / "out" / "checkpoint-1", 1)
    assert cli("add", a, "--run", "r").exit_code == 0
    p = subprocess.Popen(["true"])
    p.wait()                                        # a pid that is no longer running
    dead = tmp_path / "out" / f".merged-model{TMP_MARK}{p.pid}-deadbeef"
    dead.mkdir()
    inside = a / f".adapter_model.safetensors{TMP_MARK}{p.pid}-0badf00d"
    inside.write_bytes(b"partial")
    live = tmp_path / "out" / f".other{TMP_MARK}{os.getpid()}-cafebabe"
    live.write_bytes(b"in progress")               # a live process's: not listed
    (tmp_path / "out" / ".hidden-but-ours-not").write_bytes(b"x")
    r = cli("verify", "--json")
    assert r.exit_code == 0, r.output               # the checkpoints themselves are fine
    rows = json.loads(r.stdout)
    stale = sorted(d["path"] for d in rows if d["status"] == "stale-temporary")
    assert stale == sorted([str(dead), str(inside)])
    assert [d["status"] for d in rows if d["id"] is not None] == ["ok"]
    r = cli("verify")
    assert r.exit_code == 0 and r.stdout.count("stale-temporary") == 2
    assert dead.exists() and inside.exists() and live.exists()   # verify only reports


def test_check_unchanged_full(db_path, tmp_path):
    from ckptreg.errors import ChangedError

    m = _big_model(tmp_path / "step-1.safetensors", seed=3)
    reg = Registry(db_path)
    reg.add(m, "r", full_hash=True)
    reg.check_unchanged("r@1", full=True)
    _flip_middle_byte(m)
    with pytest.raises(ChangedError, match="content changed since its full hash was recorded"):
        reg.check_unchanged("r@1", full=True)


def test_cli_sql_query_may_start_with_a_comment(cli, db_path, tmp_path):
    """A leading `-- comment` is a query, not an option, on the command line too."""
    import json

    m = _big_model(tmp_path / "step-1.safetensors", seed=3)
    assert cli("add", m, "--run", "r").exit_code == 0
    r = cli("sql", "-- how many\nSELECT count(*) AS n FROM checkpoints", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == [{"n": 1}]
    r = cli("sql", "--timeout", "5", "(SELECT 1 AS x) UNION ALL (SELECT 2)", "--json")
    assert r.exit_code == 0 and [d["x"] for d in json.loads(r.stdout)] == [1, 2]

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
from ckptreg.registry import Registry
from helpers_files import write_peft_adapter


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
        assert r.exit_code == 2, r.output
        assert f"{p}: not a usable ckptreg registry: a SQLite database" in r.stderr, r.stderr
    assert p.read_bytes() == before

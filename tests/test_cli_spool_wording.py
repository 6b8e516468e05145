"""`ckptreg add` / `log` say WHY an entry was spooled: a PostgreSQL server that cannot be reached
(a closed port: nothing listens there) is "server unreachable", naming host:port and never the
password; a DuckDB registry held by another writer is "registry busy". Both exit 0 (a training
job's shell step is never failed by it) and leave the entry in the spool."""
from __future__ import annotations

import json
import socket

import filelock
import pytest
from click.testing import CliRunner


def _closed_port_url(user="alice", password="s3cr3t-pw"):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # (closed when the with ends: nothing listens there)
    return f"postgresql://{user}:{password}@127.0.0.1:{port}/ckptreg", port


def _cli(*args, db, env=None):
    from ckptreg.cli import main

    return CliRunner().invoke(main, ["--db", str(db), *args], env=env, catch_exceptions=False)


def test_add_and_log_to_an_unreachable_server_say_unreachable(tmp_path, monkeypatch):
    pytest.importorskip("psycopg")
    from helpers_files import write_peft_adapter

    from ckptreg.registry import Registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CKPTREG_SPOOL", raising=False)
    down, port = _closed_port_url()
    p = write_peft_adapter(tmp_path / "checkpoint-10", 1)

    r = _cli("add", str(p), "--run", "job", db=down)
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    line = r.stderr.strip()
    assert line.startswith(f"spooled: {p} as job@10 (server unreachable: cannot reach the PostgreSQL "
                           f"registry at 127.0.0.1:{port} (database ckptreg)"), line
    assert "ingested by the next command that reaches the server" in line
    assert "busy" not in line and "s3cr3t-pw" not in line

    d = json.loads(_cli("add", str(write_peft_adapter(tmp_path / "checkpoint-20", 2)), "--run", "job", "--json",
                        db=down).stdout)
    assert d["status"] == "spooled" and d["id"] is None and d["cause"] == "unreachable"
    assert f"127.0.0.1:{port}" in d["reason"] and "s3cr3t-pw" not in d["reason"]

    r = _cli("log", "job@10", "acc=0.5", db=down)
    assert r.exit_code == 0, r.output
    line = r.stderr.strip()
    assert line.startswith(f"spooled: server unreachable (cannot reach the PostgreSQL registry at 127.0.0.1:{port}"), line
    assert "acc=0.5 for job@10 is ingested by the next command that reaches the server" in line
    assert "busy" not in line and "s3cr3t-pw" not in line

    reg = Registry(down)
    assert len(reg.spool_status()["pending"]) == 3   # add, add, log: all kept for the server


def test_add_and_log_to_a_locked_duckdb_say_busy(tmp_path):
    from helpers_files import write_peft_adapter

    from ckptreg.registry import Registry

    db = tmp_path / "reg.duckdb"
    assert _cli("add", str(write_peft_adapter(tmp_path / "checkpoint-1", 1)), "--run", "r", db=db).exit_code == 0
    lock = filelock.FileLock(str(db) + ".lock", is_singleton=False)
    lock.acquire()
    try:
        env = {"CKPTREG_LOCK_TIMEOUT": "0.2"}
        p = write_peft_adapter(tmp_path / "checkpoint-2", 2)
        r = _cli("add", str(p), "--run", "r", db=db, env=env)
        assert r.exit_code == 0, r.output
        line = r.stderr.strip()
        assert line.startswith(f"spooled: {p} as r@2 (registry busy: registry {db} is locked by another writer"), line
        assert "ingested by the next writer" in line and "unreachable" not in line
        d = json.loads(_cli("add", str(write_peft_adapter(tmp_path / "checkpoint-3", 3)), "--run", "r", "--json",
                            db=db, env=env).stdout)
        assert d["status"] == "spooled" and d["cause"] == "busy"
        r = _cli("log", "r@1", "loss=1", db=db, env=env)
        assert r.stderr.startswith("spooled: database busy; loss=1 for r@1") and "unreachable" not in r.stderr
    finally:
        lock.release()
    assert sorted(c.ref for c in Registry(db).ls("r")) == ["r@1", "r@2", "r@3"]   # ingested by the next opener

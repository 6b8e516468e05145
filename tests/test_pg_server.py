"""The PostgreSQL test server (the ``pg_url`` / ``pg_server`` fixtures of conftest.py) and the
building blocks the PostgreSQL registry and ``ckptreg sql`` path will stand on (issue 11): a real
server, psycopg 3, a READ ONLY transaction with a statement timeout, ``pg_ctl restart`` and
reconnecting. Nothing here is mocked."""
from __future__ import annotations

import time
import uuid

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed (pip install 'ckptreg[postgres]')")
from psycopg import errors as pgerr  # noqa: E402


@pytest.fixture
def table(pg_url):
    """A fresh table with three rows on the session's server (a unique name: the server is shared)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_url, connect_timeout=10) as con:
        con.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY, run text NOT NULL)")
        con.execute(f"INSERT INTO {name} VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    yield name
    with psycopg.connect(pg_url, connect_timeout=10) as con:
        con.execute(f"DROP TABLE IF EXISTS {name}")


def _count(url, table):
    with psycopg.connect(url, connect_timeout=10) as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_server_is_real_and_local(pg_url):
    assert pg_url.startswith("postgresql://") and "127.0.0.1" in pg_url
    with psycopg.connect(pg_url, connect_timeout=10) as con:
        version = con.execute("SHOW server_version_num").fetchone()[0]
        listen = con.execute("SHOW listen_addresses").fetchone()[0]
        assert int(version) >= 120000
        assert listen in ("127.0.0.1", "localhost"), listen  # never reachable from outside


def test_read_only_transaction_with_statement_timeout(pg_url, table):
    with psycopg.connect(pg_url, connect_timeout=10) as con:
        # reads inside READ ONLY work
        with con.transaction():
            con.execute("SET TRANSACTION READ ONLY")
            con.execute("SET LOCAL statement_timeout = '300ms'")
            assert con.execute(f"SELECT run FROM {table} ORDER BY id").fetchall() == [("a",), ("b",), ("c",)]
        # every kind of write is refused inside it (SQLSTATE 25006)
        for stmt in (f"INSERT INTO {table} VALUES (4, 'd')", f"UPDATE {table} SET run = 'x'",
                     f"DELETE FROM {table}", f"DROP TABLE {table}", "CREATE TABLE t_evil (x int)"):
            with pytest.raises(pgerr.ReadOnlySqlTransaction):
                with con.transaction():
                    con.execute("SET TRANSACTION READ ONLY")
                    con.execute(stmt)
        # and the transaction cannot be switched back to read-write once it has read
        with pytest.raises(pgerr.ActiveSqlTransaction):
            with con.transaction():
                con.execute("SET TRANSACTION READ ONLY")
                con.execute("SELECT 1")
                con.execute("SET TRANSACTION READ WRITE")
        # a query past the statement timeout is cancelled by the server (SQLSTATE 57014), promptly
        t0 = time.monotonic()
        with pytest.raises(pgerr.QueryCanceled):
            with con.transaction():
                con.execute("SET TRANSACTION READ ONLY")
                con.execute("SET LOCAL statement_timeout = '300ms'")
                con.execute("SELECT pg_sleep(5)")
        assert time.monotonic() - t0 < 3
        # SET LOCAL ends with its transaction: the connection is usable and has no timeout left
        assert con.execute("SHOW statement_timeout").fetchone()[0] == "0"
    assert _count(pg_url, table) == 3


def test_multiple_statements_cannot_escape_on_the_extended_protocol(pg_url, table):
    """`ckptreg sql` must run the user's text as ONE statement: with no parameters psycopg sends it
    on the simple protocol, where "COMMIT; DELETE ..." would leave the read-only transaction;
    prepare=True (extended protocol) refuses more than one command."""
    with psycopg.connect(pg_url, connect_timeout=10) as con:
        with pytest.raises(pgerr.SyntaxError, match="multiple commands"):
            with con.transaction():
                con.execute("SET TRANSACTION READ ONLY")
                con.execute(f"COMMIT; DELETE FROM {table}", prepare=True)
    assert _count(pg_url, table) == 3


def test_restart_cuts_connections_and_data_survives(pg_server, table):
    con = psycopg.connect(pg_server.url, connect_timeout=10, autocommit=True)
    try:
        con.execute(f"INSERT INTO {table} VALUES (4, 'committed before restart')")
        t0 = time.monotonic()
        pg_server.restart()
        restart_s = time.monotonic() - t0
        with pytest.raises(psycopg.OperationalError):
            con.execute("SELECT 1")  # the old session is gone (fast shutdown)
    finally:
        con.close()
    with psycopg.connect(pg_server.url, connect_timeout=10) as con2:  # reconnect
        assert con2.execute(f"SELECT run FROM {table} WHERE id = 4").fetchone() == ("committed before restart",)
    assert _count(pg_server.url, table) == 4
    assert restart_s < 30

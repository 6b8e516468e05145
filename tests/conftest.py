"""Shared fixtures (kept small: area helpers live in tests/helpers_<area>.py)."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_default_db(tmp_path, monkeypatch):
    """No test may touch ./ckptreg.duckdb of the working directory: point the default elsewhere."""
    monkeypatch.setenv("CKPTREG_DB", str(tmp_path / "default-registry.duckdb"))
    monkeypatch.delenv("CKPTREG_LOCK_TIMEOUT", raising=False)


@pytest.fixture
def db_path(tmp_path):
    """A registry database path inside tmp_path (the file does not exist yet)."""
    return tmp_path / "registry.duckdb"


@pytest.fixture
def registry(db_path):
    """A Registry on a fresh database in tmp_path."""
    from ckptreg.registry import Registry

    return Registry(db_path, lock_timeout=20.0)


# ----------------------------------------------------------------------------- PostgreSQL server

class PgServer:
    """A REAL PostgreSQL server for the tests: a throwaway cluster (initdb in a temporary folder,
    trust auth, listening on 127.0.0.1 only) started with pg_ctl, or the one `.ci/run` started
    (``$CKPTREG_TEST_PG_URL``, with ``$CKPTREG_TEST_PG_DATA`` / ``$CKPTREG_TEST_PG_BIN`` so that
    :meth:`restart` works on it too). Layout: ``<tmp>/data`` (cluster), ``<tmp>/server.log``,
    unix socket in ``<tmp>``. As root, the server commands run as the data folder's owner
    (``runuser -u postgres``): initdb and postgres refuse to run as root."""

    def __init__(self, url, datadir=None, bindir=None, owned=False):
        self.url, self.datadir, self.bindir, self.owned = url, datadir, bindir, owned
        self.start_s = self.stop_s = None  # seconds, for the record

    @staticmethod
    def find_bindir():
        """The folder holding initdb and pg_ctl: $CKPTREG_TEST_PG_BIN, PATH, or Debian's newest
        /usr/lib/postgresql/<v>/bin; None when there is no server binary."""
        import glob
        import os
        import shutil

        cands = [os.environ.get("CKPTREG_TEST_PG_BIN")]
        if shutil.which("pg_ctl"):
            cands.append(os.path.dirname(os.path.realpath(shutil.which("pg_ctl"))))
        cands += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda p: [int(x) for x in p.split("/")[-2].split(".") if x.isdigit()], reverse=True)
        for d in cands:
            if d and all(os.access(os.path.join(d, b), os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
                return d
        return None

    def _cmd(self, *args):
        import os
        import pwd

        argv = [os.path.join(self.bindir, args[0]), *args[1:]]
        if os.geteuid() == 0:
            owner = pwd.getpwuid(os.stat(self.datadir if os.path.exists(self.datadir)
                                         else os.path.dirname(self.datadir)).st_uid).pw_name
            argv = ["runuser", "-u", owner, "--", *argv]
        return argv

    def _run(self, *args, timeout=120):
        import os
        import subprocess

        # stdout/stderr to files, never pipes: pg_ctl's postmaster would inherit a pipe and keep it open
        log = self.datadir + ".cmd.log"
        with open(log, "ab") as out:
            # cwd: a folder the server's user can enter (a 0700 checkout is not one)
            r = subprocess.run(self._cmd(*args), stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, timeout=timeout,
                               cwd=os.path.dirname(self.datadir))
        if r.returncode != 0:
            tail = open(log, errors="replace").read()[-2000:]
            server = self.logfile
            if server and os.path.exists(server):
                tail += "\n--- server.log ---\n" + open(server, errors="replace").read()[-2000:]
            raise RuntimeError(f"{' '.join(args[:2])} failed (exit {r.returncode}):\n{tail}")

    @property
    def logfile(self):
        import os

        return os.path.join(os.path.dirname(self.datadir), "server.log") if self.datadir else None

    @classmethod
    def start_new(cls):
        import os
        import pwd
        import shutil
        import socket
        import tempfile
        import time

        bindir = cls.find_bindir()
        if bindir is None:
            pytest.skip("no PostgreSQL server binary (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin: "
                        "apt-get install postgresql, or set CKPTREG_TEST_PG_URL to a server's URL")
        t0 = time.monotonic()
        base = tempfile.mkdtemp(prefix="ckptreg-pg-")
        os.chmod(base, 0o755)
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(base)
                pytest.skip("running as root and there is no 'postgres' user to run the server as")
            os.chown(base, pw.pw_uid, pw.pw_gid)
        srv = cls(None, os.path.join(base, "data"), bindir, owned=True)
        try:
            srv._run("initdb", "-D", srv.datadir, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                     "--locale=C", "--no-sync", "--no-instructions")
            for attempt in range(5):  # a free port can be taken between the probe and the bind
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                try:
                    srv._run("pg_ctl", "-D", srv.datadir, "-l", srv.logfile, "-w", "-t", "60",
                             "-o", f"-h 127.0.0.1 -p {port} -k {base}", "start")
                    break
                except RuntimeError:
                    if attempt == 4:
                        raise
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise
        srv.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        srv.start_s = time.monotonic() - t0
        return srv

    @classmethod
    def from_env(cls):
        import os

        url = os.environ.get("CKPTREG_TEST_PG_URL")
        if not url:
            return None
        data = os.environ.get("CKPTREG_TEST_PG_DATA") or None
        return cls(url, data, cls.find_bindir() if data else None)

    def restart(self):
        """``pg_ctl restart`` (fast shutdown: open connections are cut), waiting until it accepts
        connections again; skips the calling test for a server it did not get the data folder of."""
        if not (self.datadir and self.bindir):
            pytest.skip("CKPTREG_TEST_PG_URL is set without CKPTREG_TEST_PG_DATA: cannot restart that server")
        self._run("pg_ctl", "-D", self.datadir, "-l", self.logfile, "-m", "fast", "-w", "-t", "60", "restart")

    def stop(self):
        import os
        import shutil
        import time

        if not self.owned:
            return
        t0 = time.monotonic()
        try:
            self._run("pg_ctl", "-D", self.datadir, "-m", "fast", "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(os.path.dirname(self.datadir), ignore_errors=True)
            self.stop_s = time.monotonic() - t0


@pytest.fixture(scope="session")
def pg_server():
    """The session's PostgreSQL server (:class:`PgServer`): CI's (``$CKPTREG_TEST_PG_URL``) or a
    throwaway cluster started here and removed at the end; skips when there is no server binary."""
    srv = PgServer.from_env() or PgServer.start_new()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def pg_url(pg_server):
    """URL of the session's PostgreSQL server, e.g. postgresql://postgres@127.0.0.1:PORT/postgres."""
    return pg_server.url


# ----------------------------------------------------------------------------- both backends

def pg_registry_supported() -> str | None:
    """None when the PostgreSQL backend can be used here; else why not (psycopg missing)."""
    import importlib.util

    if importlib.util.find_spec("psycopg") is None:
        return "psycopg 3 is not installed (pip install 'ckptreg[postgres]')"
    return None


def _db_url(url, dbname):
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(url)
    return urlunsplit((u.scheme, u.netloc, "/" + dbname, u.query, u.fragment))


@pytest.fixture
def fresh_db(request, tmp_path, monkeypatch):
    """A factory: ``fresh_db("duckdb")`` -> a new .duckdb path in tmp_path (not created yet);
    ``fresh_db("postgresql")`` -> the URL of a new, empty database on the session's server
    (``CREATE DATABASE t_<uuid>``, dropped at the end of the test, with FORCE: a driver's cached
    connections must not keep it; ``$CKPTREG_SPOOL`` set to a folder in tmp_path). Skips the test when the PostgreSQL backend is unavailable."""
    import uuid

    made: list[str] = []
    server: list[str] = []

    def make(kind):
        if kind == "duckdb":
            return tmp_path / f"reg-{uuid.uuid4().hex[:8]}.duckdb"
        assert kind == "postgresql", kind
        why = pg_registry_supported()
        if why:
            pytest.skip(why)
        import psycopg

        if not server:
            server.append(request.getfixturevalue("pg_url"))
            # a server's spool is beside the working directory unless $CKPTREG_SPOOL: keep it in tmp_path
            monkeypatch.setenv("CKPTREG_SPOOL", str(tmp_path / "pg-spool"))
        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(server[0], autocommit=True, connect_timeout=10) as con:
            con.execute(f"CREATE DATABASE {name}")
        made.append(name)
        return _db_url(server[0], name)

    yield make
    if made:
        import psycopg

        with psycopg.connect(server[0], autocommit=True, connect_timeout=10) as con:
            for name in made:
                con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["duckdb", "postgresql"])
def backend_db(request, fresh_db):
    """A fresh registry location on each backend: a tmp_path .duckdb file, or a new database on
    the session's PostgreSQL server (see :func:`fresh_db`). ``request.param`` is the kind."""
    return fresh_db(request.param)

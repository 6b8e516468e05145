"""The DuckDB driver: everything the registry needs from an embedded DuckDB file, and nothing else.

Connections (one in-memory engine per process that ATTACHes the registry file for one operation
and DETACHes it at once), the writers' lock file with jittered retries, busy detection, schema
migration, typed conversion of DuckDB / OS errors, the read-only locked-down connection of
``Registry.sql``, and the DuckDB-only SQL (list parameters, unnest batch inserts, COPY, Arrow)
behind small methods. :class:`DuckDBDriver` implements the ``Driver`` protocol documented in the
package docstring (:mod:`ckptreg.registry`).

This module must not import torch (``ckptreg add`` stays fast).
"""
from __future__ import annotations

import itertools
import os
import pathlib
import random
import threading
import time
from contextlib import contextmanager
from typing import Any

from ..errors import (
    AccessError,
    CkptregError,
    DiskFullError,
    FormatError,
    LockTimeout,
    NotFoundError,
    QueryError,
)
from .model import _Busy, _now, _short, _sql_str
from .schema import MIGRATIONS, SCHEMA_VERSION, SchemaChecks

_READ_ONLY_KINDS = {"SELECT", "EXPLAIN"}

#: DuckDB connect errors that mean "someone else holds the file right now": retried with jitter.
#: (another process holds it; another thread of this process holds it with another config; two
#: threads of this process attaching it at the same moment.)
_BUSY_MARKERS = ("Could not set lock", "Conflicting lock", "different configuration",
                 "already attached", "Resource In Use", "lock on file")


_DUCKDB = None

#: The process's DuckDB engine: one in-memory database whose only job is to ATTACH the registry
#: file for one operation and DETACH it at once (see :func:`_engine`). (pid, connection).
_ENGINE: tuple[int, Any] | None = None
_ENGINE_LOCK = threading.Lock()
#: Engines inherited through fork(): their threads did not survive, so they are never used or
#: destroyed (destroying one would join threads that do not exist in the child).
_FORKED_ENGINES: list = []


def _forget_engine_after_fork() -> None:
    global _ENGINE, _ENGINE_LOCK
    if _ENGINE is not None:
        _FORKED_ENGINES.append(_ENGINE)
    _ENGINE = None
    _ENGINE_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_engine_after_fork)


def _engine():
    """The process's in-memory DuckDB instance, created on first use.

    Creating a DuckDB instance costs ~14 ms whatever the file (it builds the catalog of built-in
    functions), which was most of a short-lived ``duckdb.connect(path)``. Attaching the registry
    file to a live instance and detaching it after the operation costs ~1 ms and holds the file
    (DuckDB's lock on it included) exactly as long as the old connect/close did: nothing outside
    the operation keeps it. DuckDB refuses a second attachment of the same file in one process
    (``Unique file handle conflict``, a busy marker), so threads still serialise on the file."""
    global _ENGINE
    e = _ENGINE
    pid = os.getpid()
    if e is not None and e[0] == pid:
        return e[1]
    with _ENGINE_LOCK:
        e = _ENGINE
        if e is None or e[0] != pid:
            if e is not None:
                _FORKED_ENGINES.append(e)
            e = _ENGINE = (pid, _duckdb().connect(":memory:", config=_ENGINE_CONFIG))
        return e[1]


def _retire_engine() -> None:
    global _ENGINE
    with _ENGINE_LOCK:
        e, _ENGINE = _ENGINE, None
    if e is not None and e[0] == os.getpid():
        try:
            e[1].close()
        except Exception:
            pass


_ALIASES = itertools.count()

#: DETACH does not checkpoint (~8 ms per add of a 500-tensor adapter: it rewrote the tables and
#: their indexes into the main file). Durability is unchanged: DuckDB fsyncs the WAL at COMMIT.
#: The WAL is folded into the file by the commit that takes it past the threshold, so the replay
#: every attach does (readers included) stays ~1 ms.
#: The registry never needs an extension: a file that is not DuckDB's (a SQLite database, say)
#: must fail to open, not make DuckDB download and load a scanner.
#: 256 KB: every operation ATTACHes the file and so replays the WAL; with 2 MB the replay was
#: ~16 ms of a ~21 ms add and 8 concurrent writers managed 35 adds/s (target 50). With 256 KB the
#: attach is ~1 ms and the checkpoint cost moves into the commit that crosses it: API add 17.9 ms,
#: 8 writers 54 adds/s (bench/bench_registry.py, same run). The first add of a fresh registry
#: checkpoints at once (a ~3 MB file), which a nearly full disk then refuses as DiskFullError.
_ENGINE_CONFIG = {"checkpoint_on_detach": "DISABLED", "wal_autocheckpoint": "256KB",
                  "autoinstall_known_extensions": False, "autoload_known_extensions": False}

#: ``Registry.sql``'s dedicated connection: read-only by construction. No file access beyond the
#: registry itself (COPY ... TO, read_text/read_blob/read_csv/glob, ATTACH, INSTALL/LOAD are
#: refused by DuckDB), no extension autoload/autoinstall, no spill directory (nothing is written
#: beside the db), and the configuration locked so that no statement can SET any of it back.
#: (Not applied to the shared engine: a locked configuration there would break later writes.)
_SQL_CONFIG = {"enable_external_access": False, "autoinstall_known_extensions": False,
               "autoload_known_extensions": False, "temp_directory": "", "lock_configuration": True}


#: Schema-version cache shared by every Registry of this process (``ckptreg.add()`` builds a new
#: Registry per call): resolved db path -> identity of the file (:func:`_file_id`) as last seen,
#: while attached, at :data:`SCHEMA_VERSION`. A match skips the version query (~0.5 ms per
#: operation). Any change to the file by anyone else (a write to it or its WAL, a delete and
#: re-create, a migration by a newer ckptreg) changes the identity, and the next operation asks
#: the database again; writers re-record it after their own writes, before they detach.
_SCHEMA_SEEN: dict[str, tuple] = {}


def _file_id(path: str):
    """(st_dev, st_ino, size, mtime_ns) of the file and (size, mtime_ns) of its WAL; None when
    the file cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    try:
        w = os.stat(path + ".wal")
        wal = (w.st_size, w.st_mtime_ns)
    except OSError:
        wal = None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, wal)


def _schema_seen(path: str) -> None:
    """Record the file's identity as at SCHEMA_VERSION (call only while it is attached and was
    checked: nobody else can change it then)."""
    fid = _file_id(path)
    if fid is None:
        _SCHEMA_SEEN.pop(path, None)
    else:
        _SCHEMA_SEEN[path] = fid



def _duckdb():
    """The DuckDB module. Prefers the native ``_duckdb`` (same ``connect`` and exception classes
    as ``duckdb``) because ``import duckdb`` also loads its pure-Python relational layer and an
    importlib.metadata version lookup: ~0.1 s that ``ckptreg add`` cannot afford."""
    global _DUCKDB
    if _DUCKDB is None:
        try:
            import _duckdb as mod

            if not all(hasattr(mod, a) for a in ("connect", "Error", "extract_statements")):
                raise ImportError("unexpected _duckdb layout")
        except ImportError:
            import duckdb as mod
        _DUCKDB = mod
    return _DUCKDB



# --------------------------------------------------------------------------- database errors

_NOSPACE_MARKERS = ("No space left on device", "Disk quota exceeded", "errno 28", "Errno 28")
_ACCESS_MARKERS = ("Permission denied", "Read-only file system", "Operation not permitted")
_MISSING_TABLE = __import__("re").compile(r"Table with name (\S+?) does not exist")


def _db_error(path, e: BaseException) -> CkptregError | None:
    """The typed error for a DuckDB (or OS) error while using the registry file ``path``, or
    None when it is not one of the known kinds (out of space, no access, a schema that is not
    ckptreg's)."""
    if isinstance(e, CkptregError):
        return None
    msg = str(e)
    en = getattr(e, "errno", None)
    if en in (28, 122) or any(k in msg for k in _NOSPACE_MARKERS):
        return DiskFullError(f"{path}: no space left on the database's filesystem; nothing was "
                             f"written, the registry is unchanged ({_short(msg)})")
    if en in (1, 13, 30) or any(k in msg for k in _ACCESS_MARKERS):
        return AccessError(f"{path}: cannot write the registry: permission denied or read-only "
                           f"filesystem ({_short(msg)})")
    duckdb = _duckdb()
    if isinstance(e, getattr(duckdb, "CatalogException", ())) or msg.startswith("Catalog Error"):
        m = _MISSING_TABLE.search(msg)
        if m:
            return FormatError(f"{path}: not a usable ckptreg registry: table {m.group(1)} missing")
        return FormatError(f"{path}: not a usable ckptreg registry: {_short(msg)}")
    return None



# --------------------------------------------------------------------------- the driver

class DuckDBDriver(SchemaChecks):
    """The registry's DuckDB file at ``path``: connections, the writers' lock, migration, errors.

    ``on_open(con)``: called by :meth:`writer` (``ingest=True``) after the schema check, before
    the caller's work; the registry sets it to its spool ingest."""

    name = "duckdb"

    def __init__(self, path: pathlib.Path, lock_timeout: float, *, force_local_locks: bool = False):
        self.path = path
        self.lock_timeout = lock_timeout
        #: skip the network-filesystem refusal (``--force-local-locks``; see :meth:`check_locks`)
        self.force_local_locks = bool(force_local_locks)
        self._locks_ok = False  # check_locks passed once for this object
        self.lock_path = pathlib.Path(str(self.path) + ".lock")
        self.on_open = None
        self.held = None  # the connection while inside hold() (Registry.batch)
        self._schema_ok = False
        self._aliases: dict[int, str] = {}  # id(connection) -> name the file is attached as

    # ----------------------------------------------------------------- connections

    def _deadline(self, timeout=None) -> float:
        return time.monotonic() + (self.lock_timeout if timeout is None else timeout)

    @staticmethod
    def _sleep(attempt: int) -> None:
        # jittered, capped at 10 ms: with several writers queued behind a lock held ~10 ms per
        # add, a longer cap (it was 100 ms) left the lock idle between holders most of the time
        # (8 writers: 24 adds/s in total); a retry is a non-blocking flock (microseconds)
        time.sleep(random.uniform(0.0, min(0.001 * (2 ** min(attempt, 4)), 0.01)))

    def check_parent(self) -> None:
        """NotFoundError when the database's folder does not exist: a typo in ``--db`` /
        ``$CKPTREG_DB`` must not silently start a second registry somewhere new."""
        parent = self.path.parent
        if not parent.is_dir():
            raise NotFoundError(f"{self.path}: the registry's folder {parent} does not exist "
                                f"(check --db / CKPTREG_DB; create the folder to start a new registry there)")
        self.check_locks()

    def check_locks(self) -> None:
        """AccessError (exit 15) when the database is on a filesystem whose file locks do not keep
        two machines' writers apart (NFS, SMB, sshfs, ...: :func:`ckptreg.fsinfo.check_local_locks`),
        unless ``force_local_locks`` or ``$CKPTREG_FORCE_LOCAL_LOCKS``. Runs before any lock file,
        connection or database file is made; decided once per object (a statfs, and the mount
        table for FUSE), a refusal is re-raised on every call."""
        if self._locks_ok:
            return
        from ..fsinfo import check_local_locks

        check_local_locks(self.path, force=self.force_local_locks)
        self._locks_ok = True

    def _acquire_lock(self, deadline: float):
        import filelock

        self.check_parent()
        try:
            lock = filelock.FileLock(str(self.lock_path), is_singleton=False)
        except (OSError, NotImplementedError) as e:
            self._raise_no_access(e)
            raise _Busy(f"cannot create lock file {self.lock_path}: {e}") from e
        attempt = 0
        while True:
            try:
                lock.acquire(timeout=0)
                return lock
            except filelock.Timeout:
                pass
            except (OSError, NotImplementedError) as e:  # filesystem without locks
                self._raise_no_access(e)
                raise _Busy(f"cannot lock {self.lock_path}: {e}") from e
            if time.monotonic() >= deadline:
                raise _Busy(f"registry {self.path} is locked by another writer "
                            f"(waited {self.lock_timeout:g} s for {self.lock_path})")
            self._sleep(attempt)
            attempt += 1

    def _raise_no_access(self, e: BaseException) -> None:
        """AccessError naming the database folder for a permission / read-only-filesystem error."""
        import errno

        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise AccessError(f"{self.path.parent}: the registry's folder is not writable "
                              f"({e.strerror}): cannot create {self.lock_path.name} there") from e

    @staticmethod
    def _is_busy(e: BaseException) -> bool:
        """Does this DuckDB error mean "someone else holds the file right now"?"""
        duckdb = _duckdb()
        return (isinstance(e, getattr(duckdb, "ResourceInUseException", ()))
                or any(k in str(e) for k in _BUSY_MARKERS))

    def _connect(self, read_only: bool, deadline: float):
        """Attach the registry file to this process's engine (:func:`_engine`) on a fresh
        connection of its own, the file as that connection's default database; retried with
        jitter while another process (or thread) holds the file. Undo with :meth:`_close`."""
        self.check_locks()
        duckdb = _duckdb()
        eng = _engine()
        alias = f"ckptreg_{next(_ALIASES)}"
        attach = f"ATTACH {_sql_str(str(self.path))} AS {alias}" + (" (READ_ONLY)" if read_only else "")
        attempt = 0
        while True:
            con = eng.cursor()
            try:
                con.execute(attach)
                con.execute(f"USE {alias}")
                self._aliases[id(con)] = alias
                return con
            except duckdb.Error as e:
                self._detach(con, alias)
                msg = str(e)
                if not self._is_busy(e):
                    raise self._open_error(e) from e
                if time.monotonic() >= deadline:
                    raise _Busy(f"registry {self.path} is held by another process "
                                f"(waited {self.lock_timeout:g} s): {msg}") from e
            self._sleep(attempt)
            attempt += 1

    def _open_error(self, e: BaseException) -> CkptregError:
        """The typed error for a registry file that cannot be opened (not busy)."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(16)
        except IsADirectoryError:
            return FormatError(f"{self.path}: not a usable ckptreg registry: it is a directory")
        except PermissionError as pe:
            return AccessError(f"{self.path}: cannot read the registry: {pe.strerror}")
        except OSError:
            head = None
        if head is not None and len(head) >= 12 and head[8:12] != b"DUCK":
            what = "a SQLite database" if head.startswith(b"SQLite format 3") else "not a DuckDB file"
            return FormatError(f"{self.path}: not a usable ckptreg registry: {what}")
        conv = _db_error(self.path, e)
        if conv is not None:
            return conv
        return FormatError(f"cannot open registry {self.path}: {_short(e)}")

    def _close(self, con) -> None:
        """Detach the registry file (releasing it for other processes) and drop the connection.
        A DuckDB error here (its checkpoint at DETACH failed: a disk that filled up) is raised as
        the typed error, so it cannot reach a training loop as an untyped exception."""
        try:
            self._detach(con, self._aliases.pop(id(con), None))
        except _duckdb().Error as e:
            conv = _db_error(self.path, e)
            if conv is None:
                conv = FormatError(f"{self.path}: the registry could not be closed cleanly: {_short(str(e))}")
            raise conv from e

    @staticmethod
    def _detach(con, alias) -> None:
        """DETACH (which releases the file) and close. Should that fail, the engine is retired:
        it is released (and the file with it) once its other connections close, and the next
        operation starts a new one, so the file is never left held by this process."""
        try:
            if alias is not None:
                detach = f"USE memory; DETACH DATABASE IF EXISTS {alias}"
                try:
                    con.execute(detach)
                except Exception:
                    try:  # an open transaction keeps it attached: end it, then detach
                        con.execute("ROLLBACK")
                    except Exception:
                        pass
                    try:
                        con.execute(detach)
                    except Exception:
                        _retire_engine()
                        raise
        finally:
            con.close()

    @contextmanager
    def writer(self, ingest: bool = True, timeout=None):
        """Lock file + read-write connection; migrates, then (``ingest``) calls :attr:`on_open`."""
        if self.held is not None:
            yield self.held
            return
        deadline = self._deadline(timeout)
        lock = self._acquire_lock(deadline)
        try:
            con = self._connect(False, deadline)
            try:
                self.migrate(con)
                if ingest and self.on_open is not None:
                    self.on_open(con)
                yield con
            except BaseException as e:
                _SCHEMA_SEEN.pop(str(self.path), None)
                self.raise_typed(e)
                raise
            else:
                if self._schema_ok:
                    _schema_seen(str(self.path))
            finally:
                self._close(con)
        finally:
            lock.release()

    @contextmanager
    def reader(self):
        """A read-only connection (or, when the database does not exist yet, an empty in-memory one)."""
        if self.held is not None:
            yield self.held
            return
        if not self.path.exists():
            self.check_parent()
            con = _duckdb().connect(":memory:")
            try:
                self._schema_ok = False  # the file is gone (or never was): the cache means nothing
                self.migrate(con)
                yield con
            finally:
                con.close()
            return
        deadline = self._deadline()
        while True:
            con = self._connect(True, deadline)
            if self._schema_ok:
                break
            seen = _SCHEMA_SEEN.get(str(self.path))
            if seen is not None and seen == _file_id(str(self.path)):
                self._schema_ok = True
                break
            have = self.schema_version(con)
            if have == SCHEMA_VERSION:
                try:
                    self.check_tables(con)
                except BaseException:
                    self._close(con)
                    raise
                self._schema_ok = True
                _schema_seen(str(self.path))
                break
            self._close(con)
            if have > SCHEMA_VERSION:
                raise self.too_new(have)
            with self.writer():  # needs a migration: do it under the lock, then read
                pass
        try:
            yield con
        except BaseException as e:
            self.raise_typed(e)
            raise
        finally:
            self._close(con)

    @contextmanager
    def hold(self):
        """Hold the writer lock and one read-write connection: :meth:`writer` and :meth:`reader`
        reuse it until the ``with`` ends (``Registry.batch``)."""
        if self.held is not None:
            yield self.held
            return
        with self.writer() as con:
            self.held = con
            try:
                yield con
            finally:
                self.held = None

    def raise_typed(self, e: BaseException) -> None:
        """Re-raise a DuckDB error met while using the file as its typed error (out of space,
        no access, missing table); return for anything else."""
        if isinstance(e, _duckdb().Error):
            conv = _db_error(self.path, e)
            if conv is not None:
                raise conv from e

    def is_error(self, e: BaseException) -> bool:
        """Is ``e`` an error of the database engine (not an OS or ckptreg error)?"""
        return isinstance(e, _duckdb().Error)

    @staticmethod
    def error_kind(e: BaseException) -> str | None:
        """"nospace" / "access" for an engine error that says the disk is full / access is
        denied, else None (``Registry.export`` names its own file in the message)."""
        msg = str(e)
        if any(k in msg for k in _NOSPACE_MARKERS):
            return "nospace"
        if any(k in msg for k in _ACCESS_MARKERS):
            return "access"
        return None

    @staticmethod
    def tx(con, fn):
        """Run ``fn()`` in one transaction on ``con``: COMMIT, or ROLLBACK and re-raise."""
        con.execute("BEGIN TRANSACTION")
        try:
            r = fn()
            con.execute("COMMIT")
            return r
        except BaseException:
            try:
                con.execute("ROLLBACK")
            except Exception:
                pass
            raise

    # ----------------------------------------------------------------- schema

    @staticmethod
    def schema_version(con) -> int:
        try:
            r = con.execute("SELECT max(version) FROM schema_version").fetchone()
        except Exception:
            return 0
        return int(r[0] or 0)

    def migrate(self, con) -> None:
        if self._schema_ok:
            return
        key = str(self.path)
        seen = _SCHEMA_SEEN.get(key)
        if seen is not None and seen == _file_id(key):
            self._schema_ok = True
            return
        have = self.schema_version(con)
        if have < SCHEMA_VERSION:
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute("CREATE TABLE IF NOT EXISTS schema_version "
                            "(version INTEGER PRIMARY KEY, applied TIMESTAMP NOT NULL)")
                for version, steps in MIGRATIONS:
                    if version <= have:
                        continue
                    for stmt in steps:
                        con.execute(stmt)
                    con.execute("INSERT INTO schema_version VALUES (?, ?)", [version, _now()])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        elif have > SCHEMA_VERSION:
            raise self.too_new(have)
        self.check_tables(con)
        if con is not None and self.path.exists():
            self._schema_ok = True

    @staticmethod
    def table_names(con, current: bool = True) -> set[str]:
        """Tables of the attached registry (``current``) or of every attached database."""
        q = "SELECT table_name FROM duckdb_tables()"
        if current:
            q += " WHERE database_name = current_database()"
        return {r[0] for r in con.execute(q).fetchall()}

    @property
    def location(self):
        """What messages name: the database file's path (:class:`SchemaChecks`)."""
        return self.path

    def dump(self, con, tables) -> dict[str, list[tuple]]:
        """Every row of each of ``tables`` that exists, in a stable order."""
        present = self.table_names(con, current=False)
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in tables if t in present}

    # ----------------------------------------------------------------- DuckDB-only SQL

    @staticmethod
    def in_list(expr: str, typ: str = "BIGINT", ph: str = "?") -> str:
        """A predicate: ``expr`` is one of the list bound to placeholder ``ph`` (a Python list)."""
        return f"list_contains({ph}::{typ}[], {expr})"

    @staticmethod
    def not_nan(expr: str) -> str:
        return f"NOT isnan({expr})"

    @staticmethod
    def list_agg(fields: list[tuple[str, str]], order: str, where: str) -> str:
        """An aggregate: the list of structs {key: expr} ordered by ``order``, of the rows where
        ``where`` (NULL when none)."""
        obj = ", ".join(f"'{k}': {v}" for k, v in fields)
        return f"list({{{obj}}} ORDER BY {order}) FILTER (WHERE {where})"

    @staticmethod
    def json_text(expr: str) -> str:
        """``expr`` (a list / struct) as JSON text."""
        return f"to_json({expr})::VARCHAR"
    @staticmethod
    def insert_tensors(con, cid: int, ts) -> None:
        """One row per TensorInfo-like ``ts`` (name, dtype, shape, file, offset, nbytes) of
        checkpoint ``cid``, in one statement with the columns as list parameters."""
        # dtype and file are dictionary-encoded (a few distinct values): passing a Python list
        # as a parameter costs ~1-2 us an element, so two small lists of distinct values plus
        # two integer index lists (~1.3 ms less for 500 tensors than two string lists).
        dtypes: dict[str, int] = {}
        files: dict[str, int] = {}
        di = [dtypes.setdefault(t.dtype, len(dtypes) + 1) for t in ts]
        fi = [files.setdefault(str(t.file), len(files) + 1) for t in ts]
        con.execute(
            "INSERT INTO tensors SELECT $1, n, s, list_extract($8::VARCHAR[], d), "
            "list_extract($9::VARCHAR[], f), o, b FROM (SELECT unnest($2::VARCHAR[]) AS n, "
            "unnest($3::BIGINT[][]) AS s, unnest($4::INTEGER[]) AS d, unnest($5::INTEGER[]) AS f, "
            "unnest($6::BIGINT[]) AS o, unnest($7::BIGINT[]) AS b)",
            [cid, [t.name for t in ts], [list(t.shape) for t in ts], di, fi,
             [int(t.offset) for t in ts], [int(t.nbytes) for t in ts], list(dtypes), list(files)])

    @staticmethod
    def unmark_latest(con, cid: int, names: list[str]) -> None:
        """The values of metrics ``names`` of ``cid`` are no longer the latest ones."""
        con.execute("UPDATE metrics SET latest = false WHERE checkpoint_id = $1 AND latest "
                    "AND list_contains($2::VARCHAR[], name)", [cid, names])

    @staticmethod
    def insert_metric_rows(con, cid: int, names: list[str], values: list[float], steps: list,
                           logged) -> None:
        """One ``metrics`` row (latest) per name, in one statement."""
        if len(names) <= 8:
            # the usual few metrics: a VALUES row each (~0.7 ms for one, vs ~1.2 ms via unnest)
            rows = ", ".join(f"(nextval('metric_seq'), $1, ${3 + 3 * i}, ${4 + 3 * i}, ${5 + 3 * i}, $2, true)"
                             for i in range(len(names)))
            params = [cid, logged]
            for k, v, s in zip(names, values, steps):
                params += [k, v, s]
            con.execute("INSERT INTO metrics (seq, checkpoint_id, name, value, step, logged, latest) "
                        f"VALUES {rows}", params)
            return
        con.execute(
            "INSERT INTO metrics (seq, checkpoint_id, name, value, step, logged, latest) "
            "SELECT nextval('metric_seq'), $1, n, v, s, $5, true "
            "FROM (SELECT unnest($2::VARCHAR[]) AS n, unnest($3::DOUBLE[]) AS v, unnest($4::BIGINT[]) AS s)",
            [cid, names, values, steps, logged])

    @staticmethod
    def insert_merge_inputs(con, mid: int, ids: list[int], weights: list) -> None:
        """The inputs of merge ``mid``, positions 0..n-1, in one statement."""
        con.execute(
            "INSERT INTO merge_inputs SELECT $1, unnest($2::BIGINT[]), unnest($3::INTEGER[]), "
            "unnest($4::DOUBLE[])",
            [mid, ids, list(range(len(ids))), weights])

    @staticmethod
    def copy_to(con, query: str, path: str, fmt: str) -> None:
        """Write the result of ``query`` to the file ``path`` as parquet or csv (with a header)."""
        opts = "FORMAT parquet" if fmt == "parquet" else "FORMAT csv, HEADER true"
        con.execute(f"COPY ({query}) TO {_sql_str(str(path))} ({opts})")

    @staticmethod
    def to_arrow(con, query: str):
        """The result of ``query`` as a pyarrow Table."""
        import duckdb  # the full package: the native module alone (what _duckdb() prefers) has
        # no Arrow output on a connection; importing the package installs its relational layer

        rel = con.sql(query)
        # the method's name moved between DuckDB releases (2.x: to_arrow_table; 1.x:
        # fetch_arrow_table / arrow, the latter a RecordBatchReader in some)
        fetch = next(getattr(rel, n) for n in ("to_arrow_table", "fetch_arrow_table", "arrow")
                     if hasattr(rel, n))
        t = fetch()
        del duckdb
        return t.read_all() if hasattr(t, "read_all") else t

    @staticmethod
    def to_pandas(con, query: str):
        """The result of ``query`` as a pandas DataFrame."""
        return con.execute(query).df()

    # ----------------------------------------------------------------- Registry.sql

    @staticmethod
    def count_statements(query: str) -> int:
        """How many statements ``query`` holds; QueryError when it does not parse."""
        duckdb = _duckdb()
        try:
            return len(duckdb.extract_statements(query))
        except duckdb.Error as e:
            raise QueryError(f"sql: {e}") from None

    def query_read_only(self, query: str, timeout: float | None) -> tuple[list[str], list[tuple]]:
        """Run one statement on a dedicated, read-only, locked-down connection (see
        ``Registry.sql``), interrupted after ``timeout`` seconds (None: never). QueryError
        (with DuckDB's reason) for a refused / failed / timed-out statement."""
        duckdb = _duckdb()
        con = self._sql_connect()
        timer = None
        fired = threading.Event()
        if timeout is not None:
            def stop():
                fired.set()
                try:
                    con.interrupt()
                except Exception:
                    pass

            timer = threading.Timer(float(timeout), stop)
            timer.daemon = True
            timer.start()
        try:
            cur = con.execute(query)
            rows = cur.fetchall()
            cols = [d[0] for d in cur.description] if cur.description else []
        except duckdb.Error as e:
            if fired.is_set() or isinstance(e, getattr(duckdb, "InterruptException", ())):
                raise QueryError(f"sql: query interrupted: it ran past the time limit of "
                                 f"{timeout:g} s (ckptreg sql --timeout SECONDS)") from None
            raise QueryError(f"sql: {e}") from None
        finally:
            if timer is not None:
                timer.cancel()
            try:
                con.close()
            except Exception:
                pass
        return cols, rows

    def _sql_connect(self):
        """A dedicated, locked-down, read-only connection to the registry file (see
        ``Registry.sql``); an empty in-memory registry when the file does not exist. Retried
        while busy."""
        self.check_locks()
        duckdb = _duckdb()
        if not self.path.exists():
            con = duckdb.connect(":memory:", config=dict(_SQL_CONFIG))
            try:
                con.execute("BEGIN TRANSACTION")
                con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied TIMESTAMP NOT NULL)")
                for version, steps in MIGRATIONS:
                    for stmt in steps:
                        con.execute(stmt)
                    con.execute("INSERT INTO schema_version VALUES (?, ?)", [version, _now()])
                con.execute("COMMIT")
            except BaseException:
                con.close()
                raise
            return con
        deadline = self._deadline()
        attempt = 0
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=True, config=dict(_SQL_CONFIG))
            except duckdb.Error as e:
                msg = str(e)
                if not self._is_busy(e):
                    raise self._open_error(e) from None
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"registry {self.path} is held by another process "
                                      f"(waited {self.lock_timeout:g} s): {msg}") from None
            self._sleep(attempt)
            attempt += 1

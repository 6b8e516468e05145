"""The PostgreSQL driver: the registry in a PostgreSQL server, through psycopg 3 (issue #11).

The same schema and migrations as the DuckDB file (:mod:`.schema`, with the few type names that
differ mapped by :meth:`PostgresDriver.ddl`), the same domain logic (:mod:`.core`), another thin
driver: :class:`PostgresDriver` implements the ``Driver`` protocol of :mod:`ckptreg.registry`.

* **Writers need no lock file.** Every write runs in one REPEATABLE READ transaction
  (:meth:`PostgresDriver.tx`); the schema's unique constraints decide races. A transaction that
  loses one (a unique violation: two processes adding the same RUN@STEP, or the first checkpoint
  of the same new run), a serialization failure or a deadlock is rolled back and run again from
  the start, with the DuckDB driver's jittered backoff: the second attempt sees the winner's
  committed row and the domain logic answers exactly as it does for two sequential adds (the same
  files: unchanged; other files: DuplicateError).
* **Migrations** run in one transaction under ``pg_advisory_xact_lock`` so that two processes
  opening a fresh database do not race.
* **Connections** are short operations on a small per-thread, per-process cache (one connection
  per server URL); a cached connection the server dropped (a restart) is discarded and the
  operation reconnects once. A server that is down, refused, unknown (DNS) or refuses the login
  is :class:`_Unreachable` (a :class:`~ckptreg.errors.BackendError`, exit 12) naming host:port,
  never the password; ``Registry.add`` / ``log`` / ``set_run_params`` spool on it.
* **``sql``** runs one statement in a READ ONLY transaction with ``SET LOCAL statement_timeout``,
  sent with the extended protocol (``prepare=True``), which refuses more than one statement.

psycopg is imported lazily (only for a ``postgresql://`` URL). This module must not import torch.
"""
from __future__ import annotations

import math
import os
import re
import threading
import time
import urllib.parse
from contextlib import contextmanager

from ..errors import (
    AccessError,
    BackendError,
    DiskFullError,
    FormatError,
    QueryError,
    UsageError,
)
from .model import _Busy, _now, _short
from .schema import MIGRATIONS, SCHEMA_VERSION, SchemaChecks

URL_PREFIXES = ("postgresql://", "postgres://")

#: key of the transaction-level advisory lock migrations take ("ckptreg" in ASCII)
_MIGRATE_LOCK = 0x636B7074726567

#: attempts of one transaction that loses a race (unique violation, serialization failure,
#: deadlock) before it is reported
_TX_ATTEMPTS = 12


def is_url(path) -> bool:
    """Is ``path`` a PostgreSQL URL (``postgresql://`` or ``postgres://``)?"""
    return isinstance(path, str) and path.strip().lower().startswith(URL_PREFIXES)


class _Unreachable(BackendError):
    """The PostgreSQL server cannot be reached or refuses the connection (down, refused, DNS,
    authentication, connection lost). Exit 12; ``add`` / ``log`` spool on it."""


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise UsageError("PostgreSQL URL given but psycopg is not installed: "
                         "pip install 'ckptreg[postgres]'") from None
    return psycopg


class PgLocation(str):
    """The registry's location for a PostgreSQL URL: the URL with its password masked (what
    ``Registry.path`` / ``str`` / messages show). ``exists()`` is True (a server database, not a
    file: whether it can be reached is the next operation's answer)."""

    host_port: str
    dbname: str

    def exists(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return self.dbname


def _parse(url: str) -> tuple[PgLocation, str, str, str]:
    """(masked location, host:port, dbname, identity) of a PostgreSQL URL. The identity
    (``postgresql://host:port/dbname``, no user or password) keys the spool."""
    u = urllib.parse.urlsplit(url.strip())
    host = u.hostname or ""
    try:
        port = u.port or 5432
    except ValueError:
        raise UsageError(f"PostgreSQL URL: bad port in {_mask(url)!r}") from None
    q = urllib.parse.parse_qs(u.query)
    if not host:
        host = (q.get("host") or ["localhost"])[0]
    if "port" in q:
        port = q["port"][0]
    dbname = urllib.parse.unquote(u.path.lstrip("/")) or (q.get("dbname") or [None])[0] \
        or urllib.parse.unquote(u.username or "") or os.environ.get("PGDATABASE") or "postgres"
    hp = f"{host}:{port}"
    loc = PgLocation(_mask(url))
    loc.host_port, loc.dbname = hp, dbname
    return loc, hp, dbname, f"postgresql://{hp}/{dbname}"


def _mask(url: str) -> str:
    """The URL with any password (in the netloc or a ``password=`` parameter) as ``***``."""
    u = urllib.parse.urlsplit(url.strip())
    netloc = u.netloc
    if "@" in netloc:
        cred, _, hostpart = netloc.rpartition("@")
        if ":" in cred:
            cred = cred.split(":", 1)[0] + ":***"
        netloc = cred + "@" + hostpart
    query = re.sub(r"(?i)(^|&)(password)=[^&]*", r"\1\2=***", u.query)
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, query, u.fragment))


# --------------------------------------------------------------------------- placeholders

_TRANSLATED: dict[str, tuple[str, str]] = {}


_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def _sql_pieces(sql: str):
    """``sql`` as (kind, text) pieces, the one scanner of the placeholder translation and the
    statement split: "quoted" ('...' or "..." with doubled quotes), "comment" (``--`` to the end
    of the line, ``/* */``), "dollar" (``$tag$ ... $tag$``), "numbered" (a ``$N`` placeholder),
    else "char" (one character)."""
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"":
            j = i + 1
            while j < n:
                if sql[j] == ch:
                    if j + 1 < n and sql[j + 1] == ch:
                        j += 2
                        continue
                    break
                j += 1
            yield "quoted", sql[i:j + 1]
            i = j + 1
            continue
        if sql.startswith("--", i):
            j = sql.find("\n", i)
            j = n if j < 0 else j
            yield "comment", sql[i:j]
            i = j
            continue
        if sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            j = n if j < 0 else j + 2
            yield "comment", sql[i:j]
            i = j
            continue
        if ch == "$" and not (i and (sql[i - 1].isalnum() or sql[i - 1] == "_")):
            if i + 1 < n and sql[i + 1].isdigit():
                j = i + 1
                while j < n and sql[j].isdigit():
                    j += 1
                yield "numbered", sql[i:j]
                i = j
                continue
            m = _DOLLAR.match(sql, i)
            if m:
                tag = m.group(0)
                j = sql.find(tag, i + len(tag))
                j = n if j < 0 else j + len(tag)
                yield "dollar", sql[i:j]
                i = j
                continue
        yield "char", ch
        i += 1


def _translate(sql: str) -> tuple[str, str]:
    """Core SQL (qmark ``?`` or numbered ``$1`` placeholders) -> psycopg's (``%s`` / ``%(pN)s``,
    literal ``%`` doubled), and which style it used ("qmark" | "numbered" | "none"). Quotes,
    dollar quotes and comments are skipped (a ``?`` inside a string literal is not a
    placeholder). Cached."""
    got = _TRANSLATED.get(sql)
    if got is not None:
        return got
    out, style = [], "none"
    for kind, text in _sql_pieces(sql):
        if kind == "char" and text == "?":
            out.append("%s")
            style = "qmark"
        elif kind == "numbered":
            out.append(f"%(p{text[1:]})s")
            style = "numbered"
        else:
            out.append(text.replace("%", "%%"))
    got = ("".join(out), style)
    if len(_TRANSLATED) < 4096:
        _TRANSLATED[sql] = got
    return got


def _bind(sql: str, params):
    """(query, params) for psycopg."""
    if params is None or (not isinstance(params, dict) and len(params) == 0):
        q, style = _translate(sql)
        if style == "none":
            return sql, None   # no parameters: sent as is (psycopg reads no % then)
        return q, params
    q, style = _translate(sql)
    if style == "numbered":
        params = {f"p{k + 1}": v for k, v in enumerate(params)}
    return q, list(params) if not isinstance(params, dict) else params


def split_statements(query: str) -> list[str]:
    """The non-empty statements of ``query`` split at top-level ``;`` (quotes, comments and
    dollar quotes skipped)."""
    stmts, cur = [], []
    for kind, text in _sql_pieces(query):
        if kind == "comment":
            if text.startswith("/*"):
                cur.append(" ")
            continue
        if kind == "char" and text == ";":
            st = "".join(cur).strip()
            if st:
                stmts.append(st)
            cur = []
            continue
        cur.append(text)
    st = "".join(cur).strip()
    if st:
        stmts.append(st)
    return stmts


_READ_KINDS = {"SELECT", "WITH", "VALUES", "TABLE", "EXPLAIN", "SHOW"}


def _first_keyword(query: str) -> str:
    """The first keyword of ``query`` (upper case), past comments and opening parentheses."""
    q = query
    while True:
        q = q.lstrip().lstrip("(").lstrip()
        if q.startswith("--"):
            nl = q.find("\n")
            q = "" if nl < 0 else q[nl + 1:]
        elif q.startswith("/*"):
            end = q.find("*/")
            q = "" if end < 0 else q[end + 2:]
        else:
            break
    m = re.match(r"[A-Za-z_]+", q)
    return m.group(0).upper() if m else ""


# --------------------------------------------------------------------------- connections

#: per thread: {(pid, conninfo): connection}; connections inherited through fork() are kept
#: referenced (never used or closed: closing one would end the parent's session)
_LOCAL = threading.local()
_FORKED: list = []
#: locations whose schema was seen at SCHEMA_VERSION by this process
_SCHEMA_OK: set[str] = set()


class _Con:
    """A connection as core.py uses it: ``execute(sql, params)`` with qmark / numbered
    placeholders (translated for psycopg), returning psycopg's cursor."""

    __slots__ = ("raw", "_drv", "used")

    def __init__(self, drv: "PostgresDriver", raw):
        self.raw, self._drv, self.used = raw, drv, False

    def execute(self, sql: str, params=None):
        q, p = _bind(sql, params)
        psycopg = _psycopg()
        try:
            cur = self.raw.execute(q, p)
        except psycopg.OperationalError as e:
            if not self.raw.broken and not self.raw.closed:
                raise
            if self.used:
                self._drv._drop(self.raw)
                raise self._drv._unreachable(e) from e
            # a cached connection the server dropped (restart): reconnect once, run it again
            self._drv._drop(self.raw)
            self.raw = self._drv._new_raw()
            self._drv._apply_lock_timeout(self.raw)
            cur = self.raw.execute(q, p)
        self.used = True
        return cur

    @property
    def in_transaction(self) -> bool:
        psycopg = _psycopg()
        return self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE


class PostgresDriver(SchemaChecks):
    """The registry in the PostgreSQL database of ``url`` (see the module docstring)."""

    name = "postgresql"

    def __init__(self, url: str, lock_timeout: float):
        _psycopg()  # UsageError naming the extra when psycopg is missing
        self._url = url.strip()
        self.location, self.host_port, self.dbname, self.identity = _parse(self._url)
        self.path = self.location
        self.lock_path = None          # writers need no lock file
        self.lock_timeout = lock_timeout
        self.on_open = None
        self.held = None
        u = urllib.parse.urlsplit(self._url)
        self._secrets = [p for p in [u.password] + urllib.parse.parse_qs(u.query).get("password", []) if p]

    # ----------------------------------------------------------------- messages

    def _scrub(self, msg: str) -> str:
        msg = str(msg).replace(self._url, str(self.location))
        for p in self._secrets:
            msg = msg.replace(p, "***")
        return msg

    def _unreachable(self, e: BaseException) -> _Unreachable:
        reason = _short(self._scrub(str(e)).strip().replace("\n", " "))
        return _Unreachable(f"cannot reach the PostgreSQL registry at {self.host_port} "
                            f"(database {self.dbname}): {reason}")

    # ----------------------------------------------------------------- connections

    def _connect_timeout(self) -> int:
        # libpq's connect_timeout is whole seconds, 2 at least
        return int(max(2, min(10, math.ceil(self.lock_timeout or 0))))

    def _new_raw(self):
        psycopg = _psycopg()
        try:
            raw = psycopg.connect(self._url, autocommit=True, connect_timeout=self._connect_timeout(),
                                  application_name="ckptreg")
        except psycopg.Error as e:
            raise self._unreachable(e) from None
        except Exception as e:  # a malformed URL: psycopg raises ProgrammingError / ValueError
            raise UsageError(f"PostgreSQL URL {self.location}: {_short(self._scrub(str(e)))}") from None
        self._cache()[self._key()] = raw
        return raw

    def _key(self):
        return self._url

    @staticmethod
    def _cache() -> dict:
        pid = os.getpid()
        c = getattr(_LOCAL, "conns", None)
        if c is None or _LOCAL.pid != pid:
            if c:
                _FORKED.extend(c.values())
            c = _LOCAL.conns = {}
            _LOCAL.pid = pid
        return c

    def _drop(self, raw) -> None:
        _LOCAL.__dict__.get("lt", {}).pop(id(raw), None)
        c = self._cache()
        if c.get(self._key()) is raw:
            del c[self._key()]
        try:
            raw.close()
        except Exception:
            pass

    def _checkout(self) -> _Con:
        raw = self._cache().get(self._key())
        if raw is None or raw.closed or raw.broken:
            if raw is not None:
                self._drop(raw)
            raw = self._new_raw()
        try:
            self._apply_lock_timeout(raw)
        except _psycopg().OperationalError:
            # a cached connection the server dropped (restart): reconnect once
            self._drop(raw)
            raw = self._new_raw()
            self._apply_lock_timeout(raw)
        return _Con(self, raw)

    def _apply_lock_timeout(self, raw) -> None:
        """Row-lock waits of this connection end after :attr:`lock_timeout` (then: busy, which
        spools an add); a round trip only when the value changes."""
        lt = f"{int(max(0.0, float(self.lock_timeout)) * 1000)}ms"
        seen = _LOCAL.__dict__.setdefault("lt", {})
        if seen.get(id(raw)) != (raw, lt):
            raw.execute(f"SET lock_timeout = '{lt}'")
            seen[id(raw)] = (raw, lt)

    def _checkin(self, con: _Con) -> None:
        raw = con.raw
        if raw.closed or raw.broken:
            self._drop(raw)
            return
        try:
            if con.in_transaction:
                raw.execute("ROLLBACK")
        except Exception:
            self._drop(raw)

    @contextmanager
    def _session(self, write: bool):
        if self.held is not None:
            yield self.held
            return
        con = self._checkout()
        try:
            if write:
                self.migrate(con)
                if self.on_open is not None and self._ingest:
                    self.on_open(con)
            elif self.location not in _SCHEMA_OK:
                have = self.schema_version(con)
                if have > SCHEMA_VERSION:
                    raise self.too_new(have)
                if have < SCHEMA_VERSION:
                    self.migrate(con)
                else:
                    self.check_tables(con)
                    _SCHEMA_OK.add(self.location)
            yield con
        except BaseException as e:
            if self.is_error(e):
                _SCHEMA_OK.discard(self.location)
            self.raise_typed(e)
            raise
        finally:
            self._checkin(con)

    @contextmanager
    def writer(self, ingest: bool = True, timeout=None):
        """A read-write connection (no lock: transactions and constraints serialise writers);
        migrates, then (``ingest``) calls :attr:`on_open`."""
        old_lt, old_ing = self.lock_timeout, getattr(self, "_ingest", True)
        if timeout is not None:
            self.lock_timeout = timeout
        self._ingest = ingest
        try:
            with self._session(True) as con:
                yield con
        finally:
            self.lock_timeout, self._ingest = old_lt, old_ing

    @contextmanager
    def reader(self):
        with self._session(False) as con:
            yield con

    @contextmanager
    def hold(self):
        """One connection reused by every operation until the ``with`` ends (``Registry.batch``)."""
        if self.held is not None:
            yield self.held
            return
        with self.writer() as con:
            self.held = con
            try:
                yield con
            finally:
                self.held = None

    @contextmanager
    def ingest_guard(self, con, key: str):
        """Yield True when this session got the (session-level, non-blocking) advisory lock of
        spool folder ``key``, released at the end; False when another session holds it (it is
        ingesting that folder right now)."""
        import hashlib

        k = int.from_bytes(hashlib.sha256(f"ckptreg-spool:{key}".encode()).digest()[:8], "big", signed=True)
        got = bool(con.execute("SELECT pg_try_advisory_lock(?)", [k]).fetchone()[0])
        try:
            yield got
        finally:
            if got:
                try:
                    if con.in_transaction:   # (never left open by tx(); an aborted one would refuse the unlock)
                        con.raw.execute("ROLLBACK")
                    con.execute("SELECT pg_advisory_unlock(?)", [k])
                except Exception:   # a dead connection took the lock with it
                    pass

    @staticmethod
    def _sleep(attempt: int) -> None:
        from .duckdb_driver import DuckDBDriver

        DuckDBDriver._sleep(attempt)

    def tx(self, con, fn):
        """``fn()`` in one REPEATABLE READ transaction, committed; a transaction that loses a
        race (unique violation, serialization failure, deadlock) is rolled back and run again
        (jittered backoff; the retry sees the winner's row); anything else is rolled back and
        re-raised."""
        psycopg = _psycopg()
        errs = psycopg.errors
        retry = (errs.UniqueViolation, errs.SerializationFailure, errs.DeadlockDetected)
        attempt = 0
        while True:
            con.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            try:
                r = fn()
                con.execute("COMMIT")
                return r
            except BaseException as e:
                try:
                    if con.in_transaction:
                        con.raw.execute("ROLLBACK")
                except Exception:
                    pass
                if isinstance(e, retry) and attempt + 1 < _TX_ATTEMPTS:
                    self._sleep(attempt)
                    attempt += 1
                    continue
                if isinstance(e, (errs.SerializationFailure, errs.DeadlockDetected)):
                    raise _Busy(f"registry {self.location}: the transaction kept conflicting with "
                                f"concurrent writers ({attempt + 1} attempts): {_short(str(e))}") from e
                raise

    # ----------------------------------------------------------------- errors

    def raise_typed(self, e: BaseException) -> None:
        """Re-raise a psycopg error as its typed error (server unreachable, busy, out of space,
        no access, missing table); return for anything else."""
        psycopg = _psycopg()
        if not isinstance(e, psycopg.Error):
            return
        errs = psycopg.errors
        msg = _short(self._scrub(str(e)))
        st = getattr(e, "sqlstate", None) or ""
        if isinstance(e, errs.LockNotAvailable):
            raise _Busy(f"registry {self.location} is locked by another writer "
                        f"(waited {self.lock_timeout:g} s): {msg}") from e
        if st.startswith("53"):
            raise DiskFullError(f"{self.location}: the PostgreSQL server is out of space or resources; "
                                f"nothing was written, the registry is unchanged ({msg})") from e
        if isinstance(e, (errs.InsufficientPrivilege, errs.ReadOnlySqlTransaction)):
            raise AccessError(f"{self.location}: cannot write the registry: {msg}") from e
        if isinstance(e, errs.UndefinedTable):
            m = re.search(r'relation "([^"]+)" does not exist', str(e))
            raise FormatError(f"{self.location}: not a usable ckptreg registry: table "
                              f"{m.group(1) if m else '?'} missing") from e
        if isinstance(e, psycopg.OperationalError) and (not st or st.startswith(("08", "57P"))):
            raise self._unreachable(e) from e

    def is_error(self, e: BaseException) -> bool:
        try:
            import psycopg
        except ImportError:
            return False
        return isinstance(e, psycopg.Error)

    @staticmethod
    def error_kind(e: BaseException) -> str | None:
        st = getattr(e, "sqlstate", None) or ""
        if st.startswith("53"):
            return "nospace"
        if st in ("42501", "25006"):
            return "access"
        return None

    # ----------------------------------------------------------------- schema

    @staticmethod
    def ddl(stmt: str) -> str:
        """A statement of :data:`MIGRATIONS` (DuckDB's dialect) in PostgreSQL's: ``DOUBLE`` ->
        ``DOUBLE PRECISION``, ``JSON`` -> ``JSONB`` (comparable, so it can be grouped and
        compared; psycopg decodes it, which ``_jloads`` accepts)."""
        stmt = re.sub(r"\bDOUBLE\b(?!\s+PRECISION)", "DOUBLE PRECISION", stmt)
        return re.sub(r"\bJSON\b", "JSONB", stmt)

    @staticmethod
    def schema_version(con) -> int:
        try:
            r = con.execute("SELECT max(version) FROM schema_version").fetchone()
        except Exception as e:
            psycopg = _psycopg()
            if isinstance(e, psycopg.errors.UndefinedTable):
                return 0
            raise
        return int(r[0] or 0)

    def migrate(self, con) -> None:
        """Apply the pending :data:`MIGRATIONS` in one transaction under a transaction-level
        advisory lock (two processes opening a fresh database do not race)."""
        if self.location in _SCHEMA_OK:
            return
        have = self.schema_version(con)
        if have > SCHEMA_VERSION:
            raise self.too_new(have)
        if have < SCHEMA_VERSION:
            con.execute("BEGIN")
            try:
                con.execute("SELECT pg_advisory_xact_lock(?)", [_MIGRATE_LOCK])
                con.execute("CREATE TABLE IF NOT EXISTS schema_version "
                            "(version INTEGER PRIMARY KEY, applied TIMESTAMP NOT NULL)")
                have = int(con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0])
                if have > SCHEMA_VERSION:
                    raise self.too_new(have)
                for version, steps in MIGRATIONS:
                    if version <= have:
                        continue
                    for stmt in steps:
                        con.execute(self.ddl(stmt))
                    con.execute("INSERT INTO schema_version VALUES (?, ?)", [version, _now()])
                con.execute("COMMIT")
            except BaseException:
                try:
                    con.raw.execute("ROLLBACK")
                except Exception:
                    pass
                raise
        self.check_tables(con)
        _SCHEMA_OK.add(self.location)

    @staticmethod
    def table_names(con, current: bool = True) -> set[str]:
        return {r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()").fetchall()}

    def dump(self, con, tables) -> dict[str, list[tuple]]:
        present = self.table_names(con)
        out = {}
        for t in tables:
            if t not in present:
                continue
            ncol = len(con.execute(f"SELECT * FROM {t} LIMIT 0").description)
            order = ", ".join(str(i + 1) for i in range(ncol))
            out[t] = con.execute(f"SELECT * FROM {t} ORDER BY {order}").fetchall()
        return out

    # ----------------------------------------------------------------- dialect

    @staticmethod
    def in_list(expr: str, typ: str = "BIGINT", ph: str = "?") -> str:
        return f"({expr} = ANY(CAST({ph} AS {typ}[])))"

    @staticmethod
    def not_nan(expr: str) -> str:
        return f"{expr} <> 'NaN'::float8"

    @staticmethod
    def list_agg(fields: list[tuple[str, str]], order: str, where: str) -> str:
        """An aggregate: the list of objects {key: expr} ordered by ``order``, of the rows where
        ``where`` (NULL when none): jsonb (psycopg reads it as a list of dicts)."""
        obj = ", ".join(f"'{k}', {v}" for k, v in fields)
        return f"jsonb_agg(jsonb_build_object({obj}) ORDER BY {order}) FILTER (WHERE {where})"

    @staticmethod
    def json_text(expr: str) -> str:
        return f"CAST({expr} AS TEXT)"

    @staticmethod
    def insert_tensors(con, cid: int, ts) -> None:
        # shapes as '{d0,d1}' text cast per row: tensors of different ranks cannot form one
        # (rectangular) PostgreSQL array
        con.execute(
            'INSERT INTO tensors (checkpoint_id, name, shape, dtype, file, "offset", nbytes) '
            "SELECT ?, n, CAST(s AS BIGINT[]), d, f, o, b FROM unnest(CAST(? AS TEXT[]), CAST(? AS TEXT[]), "
            "CAST(? AS TEXT[]), CAST(? AS TEXT[]), CAST(? AS BIGINT[]), CAST(? AS BIGINT[])) AS u(n, s, d, f, o, b)",
            [cid, [t.name for t in ts], ["{" + ",".join(str(int(x)) for x in t.shape) + "}" for t in ts],
             [t.dtype for t in ts], [str(t.file) for t in ts], [int(t.offset) for t in ts],
             [int(t.nbytes) for t in ts]])

    @staticmethod
    def unmark_latest(con, cid: int, names: list[str]) -> None:
        con.execute("UPDATE metrics SET latest = false WHERE checkpoint_id = ? AND latest "
                    "AND name = ANY(CAST(? AS TEXT[]))", [cid, names])

    @staticmethod
    def insert_metric_rows(con, cid: int, names: list[str], values: list[float], steps: list,
                           logged) -> None:
        con.execute(
            "INSERT INTO metrics (seq, checkpoint_id, name, value, step, logged, latest) "
            "SELECT nextval('metric_seq'), ?, n, v, s, ?, true FROM unnest(CAST(? AS TEXT[]), "
            "CAST(? AS DOUBLE PRECISION[]), CAST(? AS BIGINT[])) WITH ORDINALITY AS u(n, v, s, k) ORDER BY k",
            [cid, logged, list(names), [float(v) for v in values], list(steps)])

    @staticmethod
    def insert_merge_inputs(con, mid: int, ids: list[int], weights: list) -> None:
        con.execute(
            "INSERT INTO merge_inputs (merge_id, input_id, position, weight) "
            "SELECT ?, i, p, w FROM unnest(CAST(? AS BIGINT[]), CAST(? AS INTEGER[]), "
            "CAST(? AS DOUBLE PRECISION[])) AS u(i, p, w)",
            [mid, [int(i) for i in ids], list(range(len(ids))), list(weights)])

    # ----------------------------------------------------------------- data out

    @staticmethod
    def _columns(con, query: str):
        import json

        cur = con.execute(query)
        cols = [d[0] for d in cur.description]
        rows = cur.fetchall()
        data = {c: [] for c in cols}
        for r in rows:
            for c, v in zip(cols, r):
                if isinstance(v, (dict, list)) and c != "inputs":
                    v = json.dumps(v, sort_keys=True)   # JSON columns as text, as DuckDB gives them
                data[c].append(v)
        return cols, data

    def to_arrow(self, con, query: str):
        import pyarrow as pa

        cols, data = self._columns(con, query)
        return pa.table({c: data[c] for c in cols})

    def to_pandas(self, con, query: str):
        import pandas as pd

        cols, data = self._columns(con, query)
        return pd.DataFrame({c: data[c] for c in cols}, columns=cols)

    def copy_to(self, con, query: str, path: str, fmt: str) -> None:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(self.to_arrow(con, query), str(path))
            return
        import csv
        import json
        from datetime import datetime

        def cell(v):
            # as DuckDB's COPY writes them: true/false, "YYYY-MM-DD HH:MM:SS.ffffff", JSON text
            if v is None:
                return ""
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, datetime):
                return v.isoformat(sep=" ")
            if isinstance(v, (dict, list)):
                return json.dumps(v, sort_keys=True)
            return v

        cur = con.execute(query)
        with open(path, "x", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([d[0] for d in cur.description])
            for row in cur:
                w.writerow([cell(v) for v in row])

    # ----------------------------------------------------------------- Registry.sql

    @staticmethod
    def count_statements(query: str) -> int:
        return len(split_statements(query))

    def query_read_only(self, query: str, timeout: float | None) -> tuple[list[str], list[tuple]]:
        """One statement in a READ ONLY transaction with ``SET LOCAL statement_timeout``, sent
        with the extended protocol (``prepare=True``: the server refuses a second statement, so
        ``SELECT 1; COMMIT; DELETE ...`` cannot leave the transaction), on a connection of its
        own, rolled back and closed after. QueryError for a refused, failed or timed-out one."""
        psycopg = _psycopg()
        errs = psycopg.errors
        shown = _short(" ".join(query.split()))
        head = _first_keyword(query)
        if head not in _READ_KINDS:
            # (COPY ... TO 'file' runs in a READ ONLY transaction and, for a superuser, writes
            # a file on the server: a read-only query starts with one of these)
            raise QueryError(f"sql: refused: only a query is allowed (SELECT, WITH, VALUES, TABLE, "
                             f"EXPLAIN, SHOW), not {head or 'this statement'}: {shown}")
        try:
            raw = psycopg.connect(self._url, autocommit=True, connect_timeout=self._connect_timeout(),
                                  application_name="ckptreg sql")
        except psycopg.Error as e:
            raise self._unreachable(e) from None
        try:
            raw.execute("BEGIN")
            raw.execute("SET TRANSACTION READ ONLY")
            ms = 0 if timeout is None else max(1, int(round(float(timeout) * 1000)))
            raw.execute(f"SET LOCAL statement_timeout = {ms}")
            try:
                cur = raw.execute(query, prepare=True)
                rows = cur.fetchall() if cur.description else []
                cols = [d[0] for d in cur.description] if cur.description else []
            except errs.QueryCanceled:
                raise QueryError(f"sql: query interrupted: it ran past the time limit of "
                                 f"{timeout:g} s (ckptreg sql --timeout SECONDS)") from None
            except errs.ReadOnlySqlTransaction as e:
                raise QueryError(f"sql: refused: the registry is read-only here "
                                 f"({_short(str(e).strip())}): {shown}") from None
            except psycopg.OperationalError as e:
                if raw.broken or raw.closed:
                    raise self._unreachable(e) from None
                raise QueryError(f"sql: {_short(self._scrub(str(e)).strip())}: {shown}") from None
            except psycopg.Error as e:
                raise QueryError(f"sql: {_short(self._scrub(str(e)).strip())}: {shown}") from None
            return cols, rows
        finally:
            try:
                raw.close()   # ends (rolls back) the read-only transaction
            except Exception:
                pass

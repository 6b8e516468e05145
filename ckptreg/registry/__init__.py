"""The checkpoint registry: one embedded DuckDB file, or a PostgreSQL database; safe for many
concurrent writers.

Storage
-------
One DuckDB file (path = argument > ``$CKPTREG_DB`` > ``./ckptreg.duckdb``) with a versioned
schema (``schema_version`` table; :data:`MIGRATIONS` applied in order, in one transaction), or,
when that path is a ``postgresql://`` / ``postgres://`` URL, the same schema in a PostgreSQL
database (:class:`~.pg_driver.PostgresDriver`; see "The PostgreSQL driver" below).

Concurrency
-----------
DuckDB lets one process hold the file for writing and then blocks every other process, readers
included. So every operation opens a short-lived connection and closes it at once; writers are
serialised by a lock file beside the database (``<db>.lock``, :mod:`filelock`) taken with
jittered retries up to ``lock_timeout``; readers open the file ``read_only`` and retry (with
jitter) while another process holds it. When :meth:`Registry.add` / :meth:`Registry.log` cannot
get the lock or the file within the bound, the already-validated entry (with the inspected
file information, so nothing is re-read) is written atomically to ``<db>.spool/<uuid>.json`` and
the call returns ``None``. Every writer first ingests spooled entries, idempotently: an entry
identical to what is registered is dropped; one that conflicts is moved to
``<db>.spool/rejected/`` (reported by ``ckptreg doctor``).

Layout
------
=========================  ==================================================================
``core.py``                :class:`Registry`: the domain logic (add, log, record_merge, refs,
                           aliases, tags, versions, rm / gc / retention, history, export,
                           verify, sql), written against the driver below; no engine code
``duckdb_driver.py``       :class:`DuckDBDriver`: engine / ATTACH / DETACH, lock file, retry
                           with jitter, busy detection, migration, typed error conversion, the
                           locked-down connection of ``sql``, DuckDB-only SQL (list parameters,
                           unnest batch inserts, COPY, Arrow / pandas)
``pg_driver.py``           :class:`PostgresDriver` (psycopg 3, imported lazily): connections,
                           placeholder translation, retried transactions, advisory-locked
                           migrations, unreachable-server errors, read-only ``sql``
``spool.py``               :class:`Spool`: atomic spool files, fallback spool, entry validation,
                           rejected entries (backend-neutral; :meth:`Registry._ingest_spool`
                           applies entries)
``schema.py``              DDL, :data:`MIGRATIONS`, :data:`SCHEMA_VERSION`, table and column lists
``model.py``               :class:`Checkpoint`, refs, argument validation, JSON helpers, retention
                           policies, lock bounds (no database)
=========================  ==================================================================

The driver interface
--------------------
``Registry`` talks to its backend only through ``self._db``, an object with the methods of
:class:`Driver` below: :class:`DuckDBDriver`, or :class:`~.pg_driver.PostgresDriver` chosen in
``Registry.__init__`` from the path (a ``postgresql://`` URL); the domain logic is not copied.

What a driver must provide (and what the PostgreSQL one does):

* **Connections and transactions.** ``writer(ingest=True, timeout=None)``: a context manager
  yielding a connection that may write; it serialises writers (DuckDB: the lock file; PostgreSQL:
  nothing, transactions and constraints do it), migrates the schema, then calls
  ``on_open(con)`` (the spool ingest) when ``ingest``. ``reader()``: a read connection (migrating
  through ``writer`` when the schema is older). ``hold()``: keep one writer connection for a burst
  (``Registry.batch``; ``held`` is that connection or None). ``tx(con, fn)``: ``fn()`` in one
  transaction, committed, or rolled back and re-raised. A connection has
  ``execute(sql, params) -> cursor`` with ``fetchone`` / ``fetchall`` / ``description`` (DB-API;
  both DuckDB's and psycopg 3's connections do).
* **Busy means spool.** When the lock, the file or the server cannot be had within
  ``lock_timeout`` seconds, the driver raises ``_Busy`` (a :class:`~ckptreg.errors.LockTimeout`);
  ``add`` / ``log`` / ``set_run_params`` then spool. A server that is down or unreachable is busy.
* **Placeholders.** Core SQL uses qmark (``?``) and numbered (``$1``, reused within a statement)
  placeholders, never both in one statement. A driver whose client uses another paramstyle
  (psycopg: ``%s``) rewrites statements (cache the rewrite: the same strings recur).
* **Insert-many.** ``insert_tensors(con, cid, tensors)``, ``insert_metric_rows(con, cid, names,
  values, steps, logged)``, ``unmark_latest(con, cid, names)``, ``insert_merge_inputs(con, mid,
  ids, weights)``: one statement each (DuckDB: unnest of list parameters; PostgreSQL:
  ``unnest(%s::text[], ...)`` or ``executemany``).
* **List predicates and NaN.** ``in_list(expr, typ="BIGINT", ph="?")`` -> SQL "expr is one of the
  list bound to ph" (DuckDB ``list_contains(?::BIGINT[], expr)``; PostgreSQL ``expr = ANY(%s)``);
  ``not_nan(expr)`` (DuckDB ``NOT isnan(x)``; PostgreSQL ``x <> 'NaN'::float8``).
* **Sequences and ids.** The schema's sequences (``checkpoint_id_seq``, ``metric_seq``,
  ``merge_id_seq``, ``event_seq``) are read with ``nextval('name')`` in core SQL and ids come
  back with ``INSERT ... RETURNING id``: both work as written on PostgreSQL.
* **JSON columns.** Core writes JSON columns as text (``_jdumps``, NaN/inf made strings by
  ``_jsafe`` where the engine refuses them) and reads them with ``_jloads``, which accepts text
  (DuckDB) or already-decoded values (psycopg's ``json`` / ``jsonb``).
* **Schema.** ``migrate(con)``, ``schema_version(con)``, ``check_tables(con)``, ``too_new(v)``,
  ``table_names(con, current=True)``, ``dump(con, tables)``. The DDL in :mod:`.schema` is DuckDB's
  dialect; a driver maps the types that differ (``DOUBLE`` -> ``double precision``, ``VARCHAR``,
  ``BIGINT[]`` and ``JSON`` work as they are) and may skip the DROP/CREATE INDEX steps that
  exist only because old DuckDBs cannot ALTER an indexed table.
* **Read-only SQL.** ``count_statements(query)`` (QueryError when it does not parse) and
  ``query_read_only(query, timeout)``: one statement in a read-only session with a statement
  timeout (DuckDB: a dedicated read-only connection, external access off, configuration locked,
  a timer that interrupts it; PostgreSQL: ``BEGIN READ ONLY`` + ``SET LOCAL statement_timeout``)
  -> (columns, rows); QueryError for a refused, failed or timed-out statement.
* **Data out.** ``copy_to(con, query, path, fmt)`` (parquet / csv), ``to_arrow(con, query)``,
  ``to_pandas(con, query)``.
* **Error classification.** ``raise_typed(e)`` re-raises an engine error as
  DiskFullError / AccessError / FormatError when it is one of those (else returns),
  ``is_error(e)`` (is it the engine's), ``error_kind(e)`` ("nospace" | "access" | None).
  Opening a file (or server) that is not a usable registry is a FormatError / AccessError from
  ``writer`` / ``reader``, a missing folder a NotFoundError.
* **Attributes.** ``path``, ``lock_path`` (DuckDB's lock file), ``lock_timeout`` (read and set by
  ``Registry.lock_timeout``), ``on_open``, ``held``, ``name`` ("duckdb").

* **Aggregates that differ.** ``list_agg(fields, order, where)`` (the export's lineage inputs:
  DuckDB ``list({...} ORDER BY ...) FILTER``, PostgreSQL ``jsonb_agg(jsonb_build_object(...))``;
  both read back as a list of dicts) and ``json_text(expr)`` (CSV). The rest of core SQL is
  written once in the dialect both accept (window functions in a subquery instead of
  ``QUALIFY``, correlated ``ORDER BY ... LIMIT 1`` instead of ``arg_max``, explicit ``GROUP BY``).
* **DDL hook.** ``PostgresDriver.ddl(stmt)`` maps a :data:`MIGRATIONS` statement (``DOUBLE`` ->
  ``DOUBLE PRECISION``, ``JSON`` -> ``JSONB``); there is one list of migrations.

The PostgreSQL driver
---------------------
Writers take no lock: each write is one REPEATABLE READ transaction, and one that loses a race
(unique violation: the same RUN@STEP, or the first checkpoint of the same new run; a
serialization failure; a deadlock) is rolled back and run again with jitter, so the retry sees the
winner's row and answers as a sequential add would (DuplicateError, or "unchanged"). Migrations run
under ``pg_advisory_xact_lock``. A server that cannot be reached (down, refused, DNS, login) is
``_Unreachable`` (a BackendError, exit 12, naming host:port, never the password); ``add`` / ``log``
/ ``set_run_params`` spool on it into ``./.ckptreg-spool/<dbname>-<hash>/`` (or
``$CKPTREG_SPOOL/...``), ingested by the next command that reaches the server. ``Registry.path`` is
the URL with its password masked (:class:`~.pg_driver.PgLocation`, ``exists()`` True);
``Registry.location`` is what messages print for either backend.

This package must not import torch (``ckptreg add`` stays fast).
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Protocol

from .core import Registry
from .duckdb_driver import (
    _ACCESS_MARKERS,
    _BUSY_MARKERS,
    _ENGINE_CONFIG,
    _MISSING_TABLE,
    _NOSPACE_MARKERS,
    _READ_ONLY_KINDS,
    _SCHEMA_SEEN,
    _SQL_CONFIG,
    DuckDBDriver,
    _db_error,
    _duckdb,
    _engine,
    _file_id,
    _retire_engine,
    _schema_seen,
)
from .pg_driver import PostgresDriver
from .model import (
    _BUILTIN_ALIASES,
    _GC_KEYS,
    _REMOVED_KEY,
    _VERSION_SUFFIX,
    DEFAULT_LOCK_TIMEOUT,
    TRAINING_LOCK_TIMEOUT,
    Checkpoint,
    _actor,
    _Busy,
    _check_metric_steps,
    _check_metrics,
    _check_name,
    _check_ref_name,
    _check_step,
    _check_tags,
    _check_timeout,
    _file_stats,
    _files_present,
    _gc_policy,
    _jdumps,
    _jloads,
    _jsafe,
    _need,
    _now,
    _ref_of,
    _same,
    _short,
    _spooled_actor,
    _sql_str,
    _to_float,
    lock_timeout_for_training,
    lock_timeout_from_env,
    parse_ref,
    retention_policy,
)
from .schema import _CK_COLS, _CK_SEL, MIGRATIONS, SCHEMA_VERSION, TABLES
from .spool import Spool, _info_from_dict, _info_to_dict, _spool_entry_problem


class Driver(Protocol):
    """What :class:`Registry` needs from a backend (see the package docstring)."""

    name: str
    path: Any
    lock_path: Any
    lock_timeout: float
    on_open: Callable[[Any], Any] | None
    held: Any

    def writer(self, ingest: bool = True, timeout: float | None = None) -> ContextManager[Any]: ...
    def reader(self) -> ContextManager[Any]: ...
    def hold(self) -> ContextManager[Any]: ...
    def tx(self, con, fn: Callable[[], Any]) -> Any: ...

    def schema_version(self, con) -> int: ...
    def migrate(self, con) -> None: ...
    def check_tables(self, con) -> None: ...
    def too_new(self, have: int) -> Exception: ...
    def table_names(self, con, current: bool = True) -> set[str]: ...
    def dump(self, con, tables) -> dict[str, list[tuple]]: ...

    def in_list(self, expr: str, typ: str = "BIGINT", ph: str = "?") -> str: ...
    def not_nan(self, expr: str) -> str: ...
    def insert_tensors(self, con, cid: int, ts) -> None: ...
    def unmark_latest(self, con, cid: int, names: list[str]) -> None: ...
    def insert_metric_rows(self, con, cid: int, names: list[str], values: list[float], steps: list,
                           logged) -> None: ...
    def insert_merge_inputs(self, con, mid: int, ids: list[int], weights: list) -> None: ...

    def count_statements(self, query: str) -> int: ...
    def query_read_only(self, query: str, timeout: float | None) -> tuple[list[str], list[tuple]]: ...
    def copy_to(self, con, query: str, path: str, fmt: str) -> None: ...
    def to_arrow(self, con, query: str): ...
    def to_pandas(self, con, query: str): ...

    def raise_typed(self, e: BaseException) -> None: ...
    def is_error(self, e: BaseException) -> bool: ...
    def error_kind(self, e: BaseException) -> str | None: ...


__all__ = [
    "Checkpoint", "DEFAULT_LOCK_TIMEOUT", "Driver", "DuckDBDriver", "MIGRATIONS", "PostgresDriver", "Registry",
    "SCHEMA_VERSION", "Spool", "TABLES", "TRAINING_LOCK_TIMEOUT", "lock_timeout_for_training",
    "lock_timeout_from_env", "parse_ref", "retention_policy",
]

"""The registry's domain logic: add, log, merges and lineage, refs, aliases, tags, versions,
rm / gc / retention, history, export, verify, sql, written against the driver interface
(``self._db``: see the package docstring) and the spool (:class:`~.spool.Spool`).

This module must not import torch (``ckptreg add`` stays fast).
"""
from __future__ import annotations

import difflib
import json
import math
import os
import pathlib
import uuid
from contextlib import contextmanager
from datetime import datetime
from typing import Iterable

from ..errors import (
    AccessError,
    ChangedError,
    CkptregError,
    DiskFullError,
    DuplicateError,
    FormatError,
    LockTimeout,
    NotFoundError,
    QueryError,
    SelectionError,
    UsageError,
)
from .duckdb_driver import DuckDBDriver
from .pg_driver import _Unreachable, is_url
from .model import (
    _REMOVED_KEY,
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
    _VERSION_SUFFIX,
    lock_timeout_from_env,
    parse_ref,
    retention_policy,
)
from .schema import _CK_COLS, _CK_SEL, TABLES
from .spool import Spool, _info_from_dict, _info_to_dict


def _spool_cause(e: BaseException) -> str:
    """Why a write spooled instead of being stored: "unreachable" (the PostgreSQL server is down,
    refuses the connection or the login), "disk_full", or "busy" (other writers held the registry
    past the lock bound)."""
    if isinstance(e, _Unreachable):
        return "unreachable"
    if isinstance(e, DiskFullError):
        return "disk_full"
    return "busy"


def _run_merged_filter(run, merged) -> tuple[list[str], list]:
    """WHERE terms and parameters for "of this run" and "merged or plain" (None: any)."""
    where, params = ["TRUE"], []
    if run is not None:
        where.append("run = ?")
        params.append(run)
    if merged is not None:
        where.append("merged = ?")
        params.append(bool(merged))
    return where, params

class Registry:
    """A checkpoint registry: one DuckDB file, or a PostgreSQL database (``path`` a
    ``postgresql://`` / ``postgres://`` URL). See the package docstring for concurrency."""

    def __init__(self, path=None, *, lock_timeout: float | None = None, force_local_locks: bool = False):
        if path is None:
            path = os.environ.get("CKPTREG_DB") or "ckptreg.duckdb"
        # None: $CKPTREG_LOCK_TIMEOUT, else DEFAULT_LOCK_TIMEOUT (interactive / CLI wait); the
        # training-loop entry points pass lock_timeout_for_training() instead (short, then spool)
        timeout = lock_timeout_from_env() if lock_timeout is None else _check_timeout(lock_timeout)
        if is_url(path):
            from .pg_driver import PostgresDriver

            #: the backend (connections, migrations, engine-specific SQL)
            self._db = PostgresDriver(path, timeout)
            #: the password-masked URL (a str; ``exists()`` is True)
            self.path = self._db.location
            self._spool_ = Spool.for_server(self._db.identity, self._db.dbname)
        else:
            self.path = pathlib.Path(path).expanduser().absolute()
            # force_local_locks: open a DuckDB file on a network filesystem anyway (otherwise
            # AccessError, exit 15, before anything is written; see DuckDBDriver.check_locks)
            self._db = DuckDBDriver(self.path, timeout, force_local_locks=force_local_locks)
            self._spool_ = Spool(self.path)
        self._db.on_open = self._ingest_spool
        #: What the last add() on this object did: {"id", "ref", "status": "added" | "unchanged"
        #: | "replaced" | "spooled", ...} (see add); None before the first add. A spooled add also
        #: has "reason" (the error's message) and "cause": "unreachable" (a PostgreSQL server that
        #: is down or refuses the connection), "busy" (locked by other writers past the bound) or
        #: "disk_full" (the database's filesystem, with ``spool_on_full``).
        self.last_add: dict | None = None
        #: The last log() on this object when it spooled: {"id": None, "ref", "status": "spooled",
        #: "reason", "cause"} as for :attr:`last_add`; None when it was stored (or before any log).
        self.last_log: dict | None = None
        self.lock_path = self._db.lock_path
        self.spool_dir = self._spool_.dir
        self.rejected_dir = self._spool_.rejected_dir

    @property
    def lock_timeout(self) -> float:
        """Seconds an operation waits for a busy database before it spools or fails."""
        return self._db.lock_timeout

    @lock_timeout.setter
    def lock_timeout(self, v) -> None:
        self._db.lock_timeout = v  # (a plain attribute before the split: not validated here either)

    @property
    def backend(self) -> str:
        """"duckdb" or "postgresql"."""
        return self._db.name

    @property
    def location(self) -> str:
        """Where the registry is, as messages show it: the DuckDB file's path, or the
        PostgreSQL URL with its password masked."""
        return str(self.path)

    def __repr__(self) -> str:
        return f"Registry({self.location!r})"

    # ----------------------------------------------------------------- connections

    def _writer(self, ingest: bool = True, timeout=None):
        """Lock + read-write connection (the driver's); migrates and ingests the spool first."""
        return self._db.writer(ingest=ingest, timeout=timeout)

    @contextmanager
    def _reader(self):
        """A read-only connection (or, when the database does not exist yet, an empty in-memory
        one); pending spool entries are ingested first when the lock can be had at once."""
        if self._db.held is not None:
            yield self._db.held
            return
        if self._spool_.pending():
            try:  # opportunistic: make spooled entries visible; never block a reader on it
                with self._writer(timeout=min(self.lock_timeout, 1.0)):
                    pass
            except (_Busy, _Unreachable, DiskFullError, AccessError):  # a read goes on; the entries stay spooled
                pass
        with self._db.reader() as con:
            yield con

    def _tx(self, con, fn):
        return self._db.tx(con, fn)

    @contextmanager
    def batch(self):
        """Hold the writer lock and one read-write connection for a burst of operations (bulk
        imports, merge validation/registration): every Registry call on this object inside the
        ``with`` reuses it. Other processes wait (or spool), so keep bursts short; the object must
        not be shared between threads while a batch is open. LockTimeout if it cannot be had."""
        with self._db.hold():
            yield self

    # ----------------------------------------------------------------- schema

    def schema_version(self) -> int:
        with self._reader() as con:
            return self._db.schema_version(con)

    #: Every table a usable registry has (``check`` looks for each).
    TABLES = TABLES

    @staticmethod
    def _event(con, op: str, *, run=None, checkpoint_id=None, ref=None, detail=None, time=None,
               actor=None) -> None:
        """Append one row to the events table (inside the caller's transaction). Every change of
        the registry records one: add, log, replace, rm, alias, tag, gc, merge. ``actor``:
        (host, user, pid) of the process that made the change (a spooled entry's writer), else
        this process."""
        host, user, pid = _actor() if actor is None else actor
        con.execute('INSERT INTO events (seq, time, op, run, checkpoint_id, ref, detail, host, "user", pid) '
                    "VALUES (nextval('event_seq'), ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [time or _now(), op, run, checkpoint_id, ref, _jdumps(detail), host, user, pid])

    def check(self) -> dict:
        """Open the database as every operation does and look for every table; {"schema_version",
        "runs", "checkpoints"}. FormatError / AccessError when it is not usable (a missing table,
        a corrupt or foreign file, a newer schema, an unreadable file)."""
        with self._reader() as con:
            self._db.check_tables(con)
            runs, ckpts = con.execute(
                "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM checkpoints)").fetchone()
            return {"schema_version": self._db.schema_version(con), "runs": int(runs), "checkpoints": int(ckpts)}

    # ----------------------------------------------------------------- spool

    def fallback_spool_dir(self) -> pathlib.Path:
        """Where entries go when the spool beside the database cannot be written (its filesystem
        is full, say): ``$CKPTREG_SPOOL`` else ``$XDG_CACHE_HOME/ckptreg/spool`` (``~/.cache``),
        in a sub-folder keyed by the database path. Every opener ingests it too."""
        return self._spool_.fallback_dir()

    def spool_status(self) -> dict:
        """{"pending": [paths], "rejected": [{"file", "reason"}]} over the spool beside the
        database and the fallback spool (:meth:`fallback_spool_dir`)."""
        return self._spool_.status()

    def _spool(self, entry: dict) -> str:
        return self._spool_.write(entry)

    def _ingest_spool(self, con) -> int:
        sp = self._spool_
        if not sp.pending():
            return 0
        # a server backend has no writer lock: one process at a time ingests a given spool
        # folder (the others go on; the entries are not applied twice by concurrent ingests)
        guard = getattr(self._db, "ingest_guard", None)
        if guard is None:
            return self._ingest_entries(con, sp)
        with guard(con, str(sp.dir)) as mine:
            return self._ingest_entries(con, sp) if mine else 0

    def _ingest_entries(self, con, sp) -> int:
        n = 0
        for p, entry in sp.entries():
            try:
                self._apply_spooled(con, entry)
                n += 1
            except CkptregError as e:
                sp.reject(p, entry, str(e))
                continue
            sp.done(p)
        return n

    def _reinspect(self, spooled):
        """The checkpoint at the spooled entry's path, inspected now; FormatError when it is not
        the checkpoint the entry describes (files, tensor inventory or fingerprint differ)."""
        from .. import formats

        path = spooled.path
        try:
            now = formats.inspect(path, allow_pickle=spooled.format == "pickle")
        except CkptregError as e:
            raise FormatError(f"{path}: cannot re-inspect the spooled checkpoint: {e}") from None

        def inv(info):
            return sorted((t.name, t.dtype, tuple(t.shape), os.path.basename(str(t.file)), int(t.offset),
                           int(t.nbytes)) for t in info.tensors.values())

        diffs = []
        if (now.format, now.kind) != (spooled.format, spooled.kind):
            diffs.append(f"layout {now.format}/{now.kind}, spooled {spooled.format}/{spooled.kind}")
        if sorted(map(str, now.files)) != sorted(map(str, spooled.files)):
            diffs.append("tensor files differ")
        if inv(now) != inv(spooled):
            diffs.append("tensor inventory differs")
        if now.fingerprint != spooled.fingerprint and not self._fingerprint_ok(spooled.fingerprint, now.files):
            diffs.append("fingerprint differs")
        if diffs:
            raise FormatError(f"{path}: not the checkpoint that was spooled ({'; '.join(diffs)})")
        return now

    def _apply_spooled(self, con, e: dict) -> None:
        if e.get("op") == "add":
            info = self._reinspect(_info_from_dict(e["info"]))
            created = datetime.fromisoformat(e["created"])
            row = con.execute("SELECT id, fingerprint, path FROM checkpoints WHERE run = ? AND step = ?",
                              [e["run"], e["step"]]).fetchone()
            if row is not None and row[1] == info.fingerprint and row[2] == info.path:
                return  # already there (ingested before, or added twice): idempotent
            full = e.get("full_hash") if isinstance(e.get("full_hash"), dict) else None
            self._tx(con, lambda: self._insert(con, info, e["run"], e["step"], None, e["metrics"],
                                               e["tags"], False, e["replace"], created, full,
                                               actor=_spooled_actor(e),
                                               metric_steps=e.get("metric_steps") or None))
        elif e.get("op") == "log":
            metrics = e["metrics"]
            cid = self._resolve(con, e["ckpt"]).id
            have = self._latest_metrics(con, [cid]).get(cid, {})
            if all(k in have and _same(have[k], v) for k, v in metrics.items()):
                return
            def do_log():
                self._insert_metrics(con, cid, metrics, e.get("step"), datetime.fromisoformat(e["created"]))
                self._log_event(con, cid, metrics, e.get("step"), datetime.fromisoformat(e["created"]),
                                _spooled_actor(e))
            self._tx(con, do_log)
        elif e.get("op") == "params":
            created = datetime.fromisoformat(e["created"])
            self._tx(con, lambda: self._set_params(con, e["run"], e["params"], created, _spooled_actor(e)))
        else:
            raise UsageError(f"unknown spool entry op {e.get('op')!r}")

    # ----------------------------------------------------------------- insert helpers
    def _insert(self, con, info, run, step, name, metrics, tags, merged, replace, created,
                full: dict | None = None, *, actor=None, version: int = 1,
                metric_steps: dict | None = None) -> int:
        # One query answers both "is RUN@STEP taken?" and "does the run exist?": the run row is
        # inserted only for a new run (writers are serialised, so check-then-insert is safe),
        # which spares an add to an existing run a statement (~1 ms in DuckDB).
        # (UNION ALL of two point lookups: ~0.3 ms faster than scalar subqueries in DuckDB.)
        col, key, what = ("step", step, f"{run}@{step}") if step is not None else ("name", name, f"{run}@{name}")
        old, have_run = None, False
        old_row = None
        for tag, i, ofp, opath in con.execute(
                f"SELECT 0, id, fingerprint, path FROM checkpoints WHERE run = $1 AND {col} = $2 "
                + ("" if step is not None else f"AND version = {int(version)} ") +
                "UNION ALL SELECT 1, NULL, NULL, NULL FROM runs WHERE name = $1", [run, key]).fetchall():
            if tag == 0:
                old, old_row = i, (int(i), ofp, opath)
            else:
                have_run = True
        if step is not None and not merged:
            self._refuse_same_files(con, info, run, step, what)
        self._outcome = {"id": None, "ref": what, "status": "added"}
        if old is not None and step is not None and not merged:
            # same files again: a no-op returning the existing id; other files: a relaunch
            # (DuplicateError naming both unless replace)
            same = self._plain_conflict(old_row, info, what, replace)
            if same:
                self._outcome = {"id": int(old), "ref": what, "status": "unchanged"}
                if replace is True:
                    # an explicit --replace of the same files: the user vouches for them as they
                    # are now, so their stats (inode change time...) are recorded again (and the
                    # full hash, when one was computed); a plain re-add never does that
                    sets, args = "files = ?", [_jdumps(_file_stats(info.files))]
                    if full is not None:
                        sets, args = sets + ", full_hash = ?", args + [_jdumps(full)]
                    con.execute(f"UPDATE checkpoints SET {sets} WHERE id = ?", args + [int(old)])
                    self._outcome["refreshed"] = True
                return int(old)
            self._outcome = {"id": int(old), "ref": what, "status": "replaced",
                             "previous": {"path": old_row[2], "fingerprint": old_row[1]}}
        if old is not None:
            if not replace:
                raise DuplicateError(f"{what} is already registered (id {old}); "
                                     f"pass replace=True / --replace to replace it")
            cid = int(old)  # replace keeps the id: lineage that names it stays valid
            self._delete_rows(con, cid)
        else:
            cid = None
        if not have_run:
            con.execute("INSERT INTO runs (name, created) VALUES (?, ?)", [run, created])
        # a new id straight from the sequence (~0.35 ms less than coalesce(NULL, nextval(...)));
        # a replaced checkpoint keeps its id (an integer from the database, inlined)
        id_sql = "nextval('checkpoint_id_seq')" if cid is None else str(int(cid))
        cid = con.execute(
            f"INSERT INTO checkpoints ({_CK_COLS}, full_hash, version) VALUES "
            f"({id_sql},?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,{int(version)}) RETURNING id",
            [run, step, name, str(info.path), info.format, info.kind, info.base_model,
             len(info.tensors), int(info.n_params), int(info.nbytes), info.fingerprint, created,
             _jdumps(tags or {}), _jdumps(info.lora), bool(merged), _jdumps(_file_stats(info.files)),
             _jdumps([str(f) for f in (getattr(info, "config_files", None) or [])]),
             _jdumps(full)]).fetchone()[0]
        ts = list(info.tensors.values())
        if ts:
            self._db.insert_tensors(con, cid, ts)
        if metrics:
            self._insert_metrics(con, cid, metrics, {**{k: step for k in metrics}, **metric_steps}
                                 if metric_steps else step, created, fresh=True)
        if step is not None and not merged:
            self._outcome["id"] = int(cid)
            self._record_add_event(con, info, run, step, int(cid), metrics, tags, created, actor)
        return cid

    def _insert_metrics(self, con, cid, metrics: dict, step, logged, fresh: bool = False) -> None:
        """``step``: the step every value was logged at, or a dict name -> step (per value;
        names it lacks get None). The new values are the latest (``fresh``: there are no older
        ones of this checkpoint)."""
        names = list(metrics)
        steps = [step.get(k) for k in names] if isinstance(step, dict) else [step] * len(names)
        if not fresh:
            self._db.unmark_latest(con, cid, names)
        self._db.insert_metric_rows(con, cid, names, [float(metrics[k]) for k in names], steps, logged)

    @staticmethod
    def _delete_rows(con, cid: int) -> None:
        con.execute("DELETE FROM metrics WHERE checkpoint_id = ?", [cid])
        con.execute("DELETE FROM tensors WHERE checkpoint_id = ?", [cid])
        con.execute("DELETE FROM merge_inputs WHERE merge_id IN (SELECT id FROM merges WHERE checkpoint_id = ?)", [cid])
        con.execute("DELETE FROM merges WHERE checkpoint_id = ?", [cid])
        con.execute("DELETE FROM checkpoints WHERE id = ?", [cid])

    # ----------------------------------------------------------------- add / log

    def add(self, path, run, step=None, metrics=None, tags=None, replace=False, allow_pickle=False,
            *, full_hash: bool = False, spool_on_full: bool = True, metric_steps: dict | None = None):
        """Register a checkpoint. Returns its id, or None when the database was busy (or its
        filesystem full, with ``spool_on_full``) and the (fully validated) entry was spooled for
        the next opener to ingest; beside the database, or in :meth:`fallback_spool_dir` when
        that cannot be written. ``full_hash``: also record a hash of every byte of the tensor
        files (what ``verify(full=True)`` compares with). ``metric_steps``: name -> the step a
        value of ``metrics`` was logged at (default: the checkpoint's step).

        RUN@STEP already registered: the same files (path and fingerprint) again are a no-op
        returning the existing id; other files are a DuplicateError saying they differ from the
        registered ones, unless ``replace`` (True: replace; ``"stale"``, what the trainer
        callbacks pass: replace only an entry whose files were overwritten in place, i.e. a
        relaunch into the same folder). :attr:`last_add` says which happened."""
        from .. import formats

        run = _check_name("run", run)
        metrics = _check_metrics(metrics)
        tags = _check_tags(tags)
        metric_steps = _check_metric_steps(metric_steps, metrics)
        if not os.path.exists(os.fspath(path)):
            raise NotFoundError(f"{path}: no such file or folder")
        # what the path is comes first: a folder that is not a checkpoint is reported as such,
        # not as a missing step
        info = formats.inspect(path, allow_pickle=allow_pickle)
        if step is None:
            step = formats.infer_step(path)
            if step is None:
                raise UsageError(f"step required: cannot infer a step from {path} "
                                 f"(name it checkpoint-N / step=N, or pass step=)")
        step = _check_step(step)
        full = self._full_hashes(info.files) if full_hash else None
        created = _now()
        self.last_add = None
        try:
            with self._writer() as con:
                cid = self._tx(con, lambda: self._insert(con, info, run, step, None, metrics, tags,
                                                         False, replace, created, full,
                                                         metric_steps=metric_steps))
                self.last_add = dict(self._outcome, path=str(info.path), fingerprint=info.fingerprint)
                return cid
        except (_Busy, _Unreachable, DiskFullError) as e:   # (_Unreachable: a server that is down)
            if isinstance(e, DiskFullError) and not spool_on_full:
                raise
            entry = {"op": "add", "run": run, "step": step, "metrics": metrics, "tags": tags,
                     "replace": replace if replace == "stale" else bool(replace),
                     "created": created.isoformat(), "info": _info_to_dict(info), "actor": list(_actor())}
            if full is not None:
                entry["full_hash"] = full
            if metric_steps:
                entry["metric_steps"] = metric_steps
            where = self._spool(entry)
            self.last_add = {"id": None, "ref": f"{run}@{step}", "status": "spooled", "path": str(info.path),
                             "fingerprint": info.fingerprint, "spool_file": where, "reason": str(e),
                             "cause": _spool_cause(e)}
            return None

    def log(self, ckpt, metrics: dict, *, step: int | None = None) -> int | None:
        """Add metric values to a registered checkpoint (history is kept; the latest value wins).
        Returns the checkpoint's id, or None when the database was busy and the entry was
        spooled (the checkpoint must then be given as id or RUN@STEP)."""
        metrics = _check_metrics(metrics)
        if not metrics:
            raise UsageError("log: no metrics given")
        if step is not None:
            step = _check_step(step)
        ref = ckpt.id if isinstance(ckpt, Checkpoint) else ckpt
        created = _now()
        self.last_log = None
        try:
            with self._writer() as con:
                c = self._resolve(con, ref)

                def do_log():
                    self._insert_metrics(con, c.id, metrics, c.step if step is None else step, created)
                    self._log_event(con, c.id, metrics, c.step if step is None else step, created)
                self._tx(con, do_log)
                return c.id
        except (_Busy, _Unreachable) as e:
            if isinstance(ckpt, Checkpoint):
                ref = ckpt.ref
            self._spool({"op": "log", "ckpt": ref, "metrics": metrics, "step": step,
                         "created": created.isoformat(), "actor": list(_actor())})
            self.last_log = {"id": None, "ref": ref, "status": "spooled", "reason": str(e), "cause": _spool_cause(e)}

    def record_merge(self, *, path, run, name, method, params: dict, inputs, base=None,
                     replace=False) -> int:
        """Inspect the merge output at ``path`` and register it (merged=True) with its lineage, in
        one transaction. Merged names are versioned: under a name the run already has, the output
        becomes the next version (RUN@NAME is then the newest, RUN@NAME:vK a given one);
        ``replace`` replaces the newest version instead (same id, same version)."""
        from .. import formats

        run = _check_name("run", run)
        name = _check_ref_name("merged name", _check_name("name", name))
        if not isinstance(method, str) or not method:
            raise UsageError(f"method must be a non-empty string, got {method!r}")
        try:
            params_json = json.dumps(params or {}, sort_keys=True, allow_nan=True, default=str)
        except (TypeError, ValueError) as e:
            raise UsageError(f"merge params are not JSON-serialisable: {e}") from e
        norm_inputs = []
        for item in inputs:
            try:
                ref, w = item
            except (TypeError, ValueError):
                raise UsageError(f"merge inputs must be (checkpoint, weight) pairs, got {item!r}") from None
            norm_inputs.append((ref.id if isinstance(ref, Checkpoint) else ref,
                                None if w is None else _to_float(f"weight of {ref}", w)))
        if not norm_inputs:
            raise UsageError("a merge needs at least one input")
        base_ref = base.id if isinstance(base, Checkpoint) else base
        info = formats.inspect(path)
        created = _now()
        with self._writer() as con:
            ids = [self._resolve(con, r).id for r, _ in norm_inputs]
            base_id = None if base_ref is None else self._resolve(con, base_ref).id

            def do():
                al = con.execute("SELECT checkpoint_id FROM aliases WHERE run = ? AND name = ?",
                                 [run, name]).fetchone()
                if al is not None:
                    raise DuplicateError(f"{run}@{name} is a user alias (of id {al[0]}); a merged name may "
                                         f"not shadow it: choose another name, or delete the alias "
                                         f"(ckptreg alias {run}@{name} {name} --delete)")
                newest = con.execute("SELECT max(version) FROM checkpoints WHERE run = ? AND name = ?",
                                     [run, name]).fetchone()[0]
                if newest is not None and not replace:
                    same = con.execute("SELECT id, version FROM checkpoints WHERE run = ? AND name = ? "
                                       "AND path = ? ORDER BY version DESC LIMIT 1",
                                       [run, name, str(info.path)]).fetchone()
                    if same is not None:
                        raise DuplicateError(
                            f"{_ref_of(run, None, name, same[1])} is already registered (id {same[0]}) "
                            f"from {info.path}; a new version of {run}@{name} needs another output "
                            "path (pass replace=True / --overwrite to replace the newest version)")
                version = 1 if newest is None else int(newest) if replace else int(newest) + 1
                cid = self._insert(con, info, run, None, name, {}, {}, True, replace, created,
                                   version=version)
                self._event(con, "merge", run=run, checkpoint_id=cid,
                            ref=f"{run}@{name}" + (f":v{version}" if version > 1 else ""),
                            detail={"name": name, "version": version, "method": method,
                                    "replaced": bool(replace and newest is not None),
                                    "path": str(info.path)}, time=created)
                mid = int(con.execute("SELECT nextval('merge_id_seq')").fetchone()[0])
                con.execute("INSERT INTO merges VALUES (?, ?, ?, ?, ?, ?)",
                            [mid, cid, method, params_json, base_id, created])
                self._db.insert_merge_inputs(con, mid, ids, [w for _, w in norm_inputs])
                return cid

            return self._tx(con, do)

    # ----------------------------------------------------------------- loading

    def _rows_to_ckpts(self, con, rows) -> list[Checkpoint]:
        if not rows:
            return []
        msteps: dict[int, dict[str, int | None]] = {}
        mets = self._latest_metrics(con, [r[0] for r in rows], steps_out=msteps)
        out = []
        for r in rows:
            files = _jloads(r[16]) or []
            out.append(Checkpoint(
                id=int(r[0]), run=r[1], step=r[2], name=r[3], path=r[4], format=r[5], kind=r[6],
                base_model=r[7], n_tensors=int(r[8]), n_params=int(r[9]), nbytes=int(r[10]),
                fingerprint=r[11], created=r[12], tags=_jloads(r[13]) or {},
                metrics=mets.get(int(r[0]), {}), lora=_jloads(r[14]), merged=bool(r[15]),
                files=[f["path"] if isinstance(f, dict) else f for f in files],
                config_files=_jloads(r[17]) or [],
                version=int(r[18]) if len(r) > 18 and r[18] is not None else 1,
                metric_steps=msteps.get(int(r[0]), {})))
        return out

    def _latest_metrics(self, con, ids, steps_out: dict | None = None) -> dict[int, dict[str, float]]:
        """Latest value of each metric per checkpoint id; ``steps_out`` (a dict) also receives
        id -> {name: the step that value was logged at}."""
        if not ids:
            return {}
        ids = [int(i) for i in ids]
        if len(ids) == 1:
            q = "SELECT checkpoint_id, name, value, step FROM metrics WHERE checkpoint_id = ? AND latest ORDER BY name"
            params = [ids[0]]
        else:
            # the (redundant) BETWEEN lets DuckDB skip row groups by their min/max: metrics are
            # appended in checkpoint order, so a run's recent checkpoints sit in few row groups
            q = ("SELECT checkpoint_id, name, value, step FROM metrics WHERE latest "
                 "AND checkpoint_id BETWEEN $2 AND $3 AND " + self._db.in_list("checkpoint_id", "BIGINT", "$1")
                 + " ORDER BY name")
            params = [ids, min(ids), max(ids)]
        out: dict[int, dict[str, float]] = {}
        for cid, name, value, step in con.execute(q, params).fetchall():
            out.setdefault(int(cid), {})[name] = float("nan") if value is None else value
            if steps_out is not None:
                steps_out.setdefault(int(cid), {})[name] = None if step is None else int(step)
        return out

    def _query(self, con, where: str = "TRUE", params=(), order: str = "run, step NULLS LAST, name, id",
               limit: int | None = None) -> list[Checkpoint]:
        q = f"SELECT {_CK_SEL} FROM checkpoints WHERE {where} ORDER BY {order}"
        if limit is not None:
            q += f" LIMIT {int(limit)}"
        return self._rows_to_ckpts(con, con.execute(q, list(params)).fetchall())

    def _resolve(self, con, ref) -> Checkpoint:
        if isinstance(ref, Checkpoint):
            ref = ref.id
        if isinstance(ref, bool):
            raise UsageError(f"not a checkpoint reference: {ref!r}")
        if isinstance(ref, int) or (isinstance(ref, str) and ref.strip().isdigit()):
            cid = int(ref)
            got = self._query(con, "id = ?", [cid])
            if got:
                return got[0]
            lo, hi, n = con.execute("SELECT min(id), max(id), count(*) FROM checkpoints").fetchone()
            raise NotFoundError(f"no checkpoint with id {cid}" +
                                (f" (registered ids: {lo}..{hi}, {n} in all)" if n else " (registry is empty)"))
        if not isinstance(ref, str):
            raise UsageError(f"not a checkpoint reference: {ref!r}")
        ref = ref.strip()
        if "@" not in ref:
            p = os.path.realpath(ref)
            got = self._query(con, "path = ?", [p]) if os.path.exists(p) else []
            if len(got) == 1:
                return got[0]
            raise NotFoundError(f"no checkpoint {ref!r}: use an id, RUN@STEP or RUN@NAME"
                                + self._candidates(con, ref, None))
        run, what = parse_ref(ref)
        if what.lstrip("-").isdigit():
            got = self._query(con, "run = ? AND step = ?", [run, int(what)])
            if got:
                return got[0]
        else:
            got = self._resolve_name(con, ref, run, what)
            if got is not None:
                return got
        raise NotFoundError(f"no checkpoint {ref!r}" + self._candidates(con, ref, run))

    def _resolve_name(self, con, ref: str, run: str, what: str) -> Checkpoint | None:
        """RUN@WHAT for a WHAT that is not a step: the built-in aliases ``final`` (highest-step
        plain checkpoint), ``latest`` (most recently registered, merged included) and
        ``best:METRIC[:max|min]`` (direction from the metric's name by default), then
        ``NAME:vK`` (version K of a merged name), a merged name (its newest version), a user
        alias. None when nothing matches; NotFoundError when a built-in cannot be satisfied."""
        if what == "final":
            got = self._query(con, "run = ? AND NOT merged AND step IS NOT NULL", [run],
                              order="step DESC", limit=1)
            if not got:
                raise NotFoundError(f"no checkpoint {ref!r}: run {run!r} has no plain checkpoints"
                                    + self._candidates(con, f"{run}@0", run))
            return got[0]
        if what == "latest":
            got = self._query(con, "run = ?", [run], order="created DESC, id DESC", limit=1)
            if not got:
                raise NotFoundError(f"no checkpoint {ref!r}: run {run!r} has no checkpoints"
                                    + self._candidates(con, f"{run}@0", run))
            return got[0]
        if what == "best" or what.startswith("best:"):
            return self._resolve_best(con, ref, run, what[5:])
        m = _VERSION_SUFFIX.match(what)
        if m:
            name, k = m.group(1), int(m.group(2))
            got = self._query(con, "run = ? AND name = ? AND version = ?", [run, name, k])
            if got:
                return got[0]
            vs = [int(v) for (v,) in con.execute(
                "SELECT version FROM checkpoints WHERE run = ? AND name = ? ORDER BY version",
                [run, name]).fetchall()]
            if vs:
                raise NotFoundError(f"no checkpoint {ref!r}: {run}@{name} has version(s) "
                                    + ", ".join(f"v{v}" for v in vs))
        got = self._query(con, "run = ? AND name = ?", [run, what], order="version DESC", limit=1)
        if got:
            return got[0]
        al = con.execute("SELECT checkpoint_id FROM aliases WHERE run = ? AND name = ?", [run, what]).fetchone()
        if al is not None:
            got = self._query(con, "id = ?", [int(al[0])])
            if got:
                return got[0]
            raise NotFoundError(f"alias {ref!r} points at checkpoint id {al[0]}, which is no longer "
                                f"registered (move it: ckptreg alias REF {what}; or --delete it)")
        return None

    def _resolve_best(self, con, ref: str, run: str, spec: str) -> Checkpoint:
        """RUN@best:METRIC[:max|min]."""
        metric, direction = spec, None
        head, sep, tail = spec.rpartition(":")
        if sep and tail in ("max", "min"):
            metric, direction = head, tail
        if not metric:
            raise UsageError(f"{ref!r}: expected RUN@best:METRIC or RUN@best:METRIC:max|min")
        if direction is None:
            from ..weights import default_direction

            direction = default_direction(metric)
        order = "DESC" if direction == "max" else "ASC"
        row = con.execute(
            f"SELECT {_CK_SEL} FROM checkpoints WHERE id = ("
            "SELECT c.id FROM metrics m JOIN checkpoints c ON m.checkpoint_id = c.id "
            f"WHERE m.name = ? AND m.latest AND c.run = ? AND {self._db.not_nan('m.value')} "
            f"ORDER BY m.value {order}, c.step DESC NULLS LAST, c.id DESC LIMIT 1)",
            [metric, run]).fetchone()
        if row is not None:
            return self._rows_to_ckpts(con, [row])[0]
        n = con.execute("SELECT count(*) FROM checkpoints WHERE run = ?", [run]).fetchone()[0]
        if n == 0:
            raise NotFoundError(f"no checkpoint {ref!r}" + self._candidates(con, f"{run}@0", run))
        names = [r[0] for r in con.execute(
            "SELECT DISTINCT m.name FROM metrics m JOIN checkpoints c ON c.id = m.checkpoint_id "
            "WHERE c.run = ? ORDER BY 1", [run]).fetchall()]
        close = difflib.get_close_matches(metric, names, n=3, cutoff=0.4)
        raise NotFoundError(f"no checkpoint {ref!r}: no checkpoint of run {run!r} has a (non-NaN) value "
                            f"for metric {metric!r}"
                            + (f"; closest: {', '.join(close)}" if close else "")
                            + (f"; metrics logged: {', '.join(names)}" if names else "; no metrics logged"))

    @staticmethod
    def _candidates(con, ref: str, run: str | None) -> str:
        runs = [r[0] for r in con.execute("SELECT DISTINCT run FROM checkpoints").fetchall()]
        if run is not None and run in runs:
            _, what = parse_ref(ref)
            cands = []
            if what.lstrip("-").isdigit():
                cands += [f"{run}@{s}" for (s,) in con.execute(
                    "SELECT step FROM checkpoints WHERE run = ? AND step IS NOT NULL "
                    "ORDER BY abs(step - ?), step LIMIT 3", [run, int(what)]).fetchall()]
            names = [n for (n,) in con.execute(
                "SELECT DISTINCT name FROM checkpoints WHERE run = ? AND name IS NOT NULL "
                "UNION SELECT name FROM aliases WHERE run = ?", [run, run]).fetchall()]
            cands += [f"{run}@{n}" for n in difflib.get_close_matches(what, names, n=3, cutoff=0.4)]
            if not cands:
                n = con.execute("SELECT count(*) FROM checkpoints WHERE run = ?", [run]).fetchone()[0]
                return f"; run {run!r} has {n} checkpoints"
            return "; closest: " + ", ".join(cands)
        if not runs:
            return "; the registry is empty"
        key = run if run is not None else ref
        close = difflib.get_close_matches(key, runs, n=3, cutoff=0.3)
        if run is not None:
            msg = f"; no run named {run!r}"
            return msg + (f"; closest runs: {', '.join(close)}" if close else
                          f"; runs: {', '.join(sorted(runs)[:10])}")
        return f"; closest runs: {', '.join(close)}" if close else ""

    # ----------------------------------------------------------------- queries

    def get(self, ckpt) -> Checkpoint:
        """By id (int or "123"), "RUN@STEP", "RUN@NAME" or a Checkpoint. NotFoundError otherwise."""
        with self._reader() as con:
            return self._resolve(con, ckpt)

    def checkpoints(self, run=None, *, merged: bool | None = None) -> list[Checkpoint]:
        """Checkpoints (of one run, or all), plain ones by step ascending, merged ones after."""
        where, params = _run_merged_filter(run, merged)
        with self._reader() as con:
            return self._query(con, " AND ".join(where), params)

    def runs(self) -> list[dict]:
        """One dict per run: name, n (checkpoints), n_merged, first_step, last_step, created, and the
        latest metrics of its final checkpoint."""
        with self._reader() as con:
            # (backend-neutral: per-run aggregates in a subquery, the final plain checkpoint
            # by a correlated ORDER BY ... LIMIT 1)
            rows = con.execute(
                "SELECT r.name, r.created, coalesce(a.n, 0), coalesce(a.nm, 0), a.lo, a.hi, "
                "(SELECT f.id FROM checkpoints f WHERE f.run = r.name AND NOT f.merged "
                "ORDER BY f.step DESC, f.id DESC LIMIT 1), r.params "
                "FROM runs r LEFT JOIN (SELECT run, count(*) FILTER (WHERE NOT merged) AS n, "
                "count(*) FILTER (WHERE merged) AS nm, min(step) AS lo, max(step) AS hi "
                "FROM checkpoints GROUP BY run) a ON a.run = r.name "
                "ORDER BY r.created, r.name").fetchall()
            mets = self._latest_metrics(con, [r[6] for r in rows if r[6] is not None])
        return [{"run": r[0], "n": int(r[2]), "n_merged": int(r[3]), "first_step": r[4],
                 "last_step": r[5], "created": r[1], "final_id": r[6],
                 "metrics": mets.get(r[6], {}) if r[6] is not None else {},
                 "params": _jloads(r[7])} for r in rows]

    def final(self, run) -> Checkpoint:
        """Highest-step plain checkpoint of the run."""
        return self._end(run, "DESC")

    def first(self, run) -> Checkpoint:
        """Lowest-step plain checkpoint of the run."""
        return self._end(run, "ASC")

    def _end(self, run, order: str) -> Checkpoint:
        with self._reader() as con:
            got = self._query(con, "run = ? AND NOT merged", [run], order=f"step {order}", limit=1)
            if not got:
                raise NotFoundError(f"run {run!r} has no plain checkpoints" + self._candidates(con, f"{run}@0", run))
            return got[0]

    def select(self, run, last, every=1, exclude_final=False, skip_missing=False) -> list[Checkpoint]:
        """METHODS.md "last K [every M]": the newest plain checkpoint (the one before the final
        with ``exclude_final``), then every M-th going back, K in all; returned by step ascending.
        ``skip_missing``: checkpoints whose registered files are not all present (a cheap stat,
        :meth:`status`) are left out before selecting, as if they were not registered."""
        for what, v in (("last", last), ("every", every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SelectionError(f"{what} must be an integer >= 1, got {v!r}")
        need = (last - 1) * every + 1
        skip = 1 if exclude_final else 0
        with self._reader() as con:
            rows = con.execute(
                f"SELECT {_CK_SEL}, (SELECT count(*) FROM checkpoints WHERE run = $1 AND NOT merged) "
                f"FROM checkpoints WHERE run = $1 AND NOT merged ORDER BY step DESC"
                + ("" if skip_missing else f" LIMIT {need + skip}"), [run]).fetchall()
            n = rows[0][-1] if rows else 0
            if skip_missing and rows:
                present = [r for r in rows if _files_present(r[16], r[4])]
                if skip and present and present[0] is not rows[0]:
                    skip = 0  # the run's final checkpoint is missing: it is already left out
                rows, n = present, len(present)
                if n == 0:
                    raise SelectionError(f"run {run!r}: none of its plain checkpoints has its files "
                                         f"present (skip_missing / --skip-missing)")
            if n == 0:
                raise SelectionError(f"run {run!r} has no plain checkpoints"
                                     + self._candidates(con, f"{run}@0", run))
            avail = n - skip
            if avail < need:
                sel = f"last {last}" + (f" every {every}" if every > 1 else "")
                raise SelectionError(
                    f"run {run!r} has {n} checkpoint{'s' if n != 1 else ''}"
                    + (f" ({avail} without the final one)" if skip else "")
                    + f"; {sel} needs {need}")
            got = self._rows_to_ckpts(con, [r[:-1] for r in rows][skip:][::every][:last])
        return sorted(got, key=lambda c: c.step)

    def best(self, run, metric: str, maximize: bool = False) -> Checkpoint:
        """The checkpoint of ``run`` with the lowest (highest with maximize) latest value of
        ``metric``; NaN never wins. NotFoundError when no checkpoint has a value."""
        order = "DESC" if maximize else "ASC"
        with self._reader() as con:
            row = con.execute(
                f"SELECT {_CK_SEL} FROM checkpoints WHERE id = ("
                "SELECT c.id FROM metrics m JOIN checkpoints c ON m.checkpoint_id = c.id "
                f"WHERE m.name = ? AND m.latest AND c.run = ? AND {self._db.not_nan('m.value')} "
                f"ORDER BY m.value {order}, c.step DESC NULLS LAST, c.id DESC LIMIT 1)",
                [metric, run]).fetchone()
            if row is None:
                n = con.execute("SELECT count(*) FROM checkpoints WHERE run = ?", [run]).fetchone()[0]
                if n == 0:
                    raise NotFoundError(f"no run {run!r}" + self._candidates(con, f"{run}@0", None))
                names = [r[0] for r in con.execute(
                    "SELECT DISTINCT m.name FROM metrics m JOIN checkpoints c ON c.id = m.checkpoint_id "
                    "WHERE c.run = ? ORDER BY 1", [run]).fetchall()]
                raise NotFoundError(f"no checkpoint of run {run!r} has a (non-NaN) value for metric {metric!r}"
                                    + (f"; metrics logged: {', '.join(names)}" if names else "; no metrics logged"))
            return self._rows_to_ckpts(con, [row])[0]

    def ls(self, run=None, sort=None, last=None, *, merged: bool | None = None,
           maximize: bool = False, tags: dict | None = None) -> list[Checkpoint]:
        """Checkpoints, optionally of one run, only the ``last`` K by step (per run), sorted by a
        metric (ascending, NaN/missing last; ``maximize`` descending), only those whose tags hold
        every ``tags`` item (AND). NotFoundError, naming the closest names, for a run that does
        not exist or a sort metric none of the listed checkpoints has."""
        want_tags = _check_tags(tags)
        where, params = _run_merged_filter(run, merged)
        if last is not None:
            if isinstance(last, bool) or not isinstance(last, int) or last < 1:
                raise UsageError(f"last must be an integer >= 1, got {last!r}")
            where.append("id IN (SELECT id FROM (SELECT id, row_number() OVER (PARTITION BY run "
                         "ORDER BY step DESC NULLS LAST, id DESC) AS rn FROM checkpoints) ranked "
                         f"WHERE rn <= {int(last)})")
        with self._reader() as con:
            got = self._query(con, " AND ".join(where), params)
            if run is not None and not got:
                runs = [r[0] for r in con.execute("SELECT name FROM runs ORDER BY name").fetchall()]
                if run not in runs:
                    close = difflib.get_close_matches(run, runs, n=3, cutoff=0.3)
                    raise NotFoundError(f"no run {run!r}" + (
                        f"; closest: {', '.join(close)}" if close else
                        f"; runs: {', '.join(runs[:10])}" if runs else "; the registry is empty"))
        if want_tags:
            got = [c for c in got if all(k in c.tags and c.tags[k] == v for k, v in want_tags.items())]
        if sort and got and not any(sort in c.metrics for c in got):
            names = sorted({k for c in got for k in c.metrics})
            close = difflib.get_close_matches(sort, names, n=3, cutoff=0.4)
            raise NotFoundError(f"no metric {sort!r} on the listed checkpoints"
                                + (f"; closest: {', '.join(close)}" if close else "")
                                + (f"; metrics logged: {', '.join(names[:20])}" if names else "; no metrics logged"))
        if sort:
            def key(c):
                v = c.metrics.get(sort)
                bad = v is None or math.isnan(v)
                return (bad, 0.0 if bad else (-v if maximize else v), c.run, c.step if c.step is not None else -1)
            got.sort(key=key)
        return got

    def inventory(self, ckpt) -> dict:
        """Tensor name -> TensorInfo, as registered (from the headers at add time)."""
        from ..safetensors_io import TensorInfo

        with self._reader() as con:
            c = self._resolve(con, ckpt)
            rows = con.execute('SELECT name, dtype, shape, file, "offset", nbytes FROM tensors '
                               "WHERE checkpoint_id = ? ORDER BY name", [c.id]).fetchall()
        return {r[0]: TensorInfo(name=r[0], dtype=r[1], shape=tuple(int(s) for s in r[2]), file=r[3],
                                 offset=int(r[4]), nbytes=int(r[5])) for r in rows}

    def _file_rows(self, ckpt) -> tuple[Checkpoint, list[dict]]:
        with self._reader() as con:
            c = self._resolve(con, ckpt)
            files = _jloads(con.execute("SELECT files FROM checkpoints WHERE id = ?", [c.id]).fetchone()[0]) or []
        return c, [f if isinstance(f, dict) else {"path": f, "size": None, "mtime_ns": None} for f in files]

    def _status(self, c: Checkpoint, files: list[dict], full_hash=None) -> tuple[str, str]:
        """(status, detail) of the cheap check: files present, sampled fingerprint, and (rows
        registered with ``ctime_ns``) inode change time and inode as recorded. ``full_hash``: the
        checkpoint's recorded {file: full hash}, compared (only) for files whose ctime/inode moved."""
        missing = [f["path"] for f in files if not os.path.exists(f["path"])]
        if missing:
            return "missing", "missing: " + ", ".join(missing)
        try:
            if self._fingerprint_ok(c.fingerprint, [f["path"] for f in files]):
                return self._ctime_status(files, full_hash)
        except CkptregError as e:
            return "changed", str(e)
        changed = []
        for f in files:
            try:
                st = os.stat(f["path"])
            except OSError:
                continue
            if f.get("size") is not None and (st.st_size != f["size"] or st.st_mtime_ns != f["mtime_ns"]):
                changed.append(f["path"])
        names = changed or [f["path"] for f in files]
        return "changed", "changed since registration: " + ", ".join(names)

    def _ctime_status(self, files: list[dict], full_hash=None) -> tuple[str, str]:
        """The sampled fingerprint matched; did anything write a file (or reset its times)
        since registration? A write, and a utime call restoring the mtime, set st_ctime to now
        (no user can set it back), a replacement has another inode. Rows without ``ctime_ns``
        (registered by an older ckptreg) are not checked. The device number is recorded but not
        compared (it can change across reboots/remounts for the same file)."""
        moved = []
        for f in files:
            if f.get("ctime_ns") is None:
                continue
            try:
                st = os.stat(f["path"])
            except OSError:
                moved.append(f["path"])
                continue
            if st.st_ctime_ns != f["ctime_ns"] or (f.get("ino") is not None and st.st_ino != f["ino"]):
                moved.append(f["path"])
        if not moved:
            return "ok", ""
        if callable(full_hash):
            full_hash = full_hash()
        if isinstance(full_hash, dict) and all(p in full_hash for p in moved):
            try:
                now = self._full_hashes(moved)   # the only case the cheap check reads whole files
            except CkptregError as e:
                return "changed", str(e)
            bad = [p for p in moved if full_hash.get(p) != now[p]]
            if bad:
                return "changed", "content changed since its full hash was recorded: " + ", ".join(bad)
            return "ok", ("inode change time moved since registration; full hash matches: "
                          + ", ".join(moved))
        return "changed", (", ".join(moved) + ": inode change time moved since registration (the file "
                           "was written or its times reset); the sampled fingerprint matches but "
                           "cannot prove the content is unchanged (no full hash was recorded to "
                           "compare with). If the change is known to be harmless (chmod/chown also "
                           "move it), re-register the files with `ckptreg add PATH --run RUN --step "
                           "STEP --replace --full-hash`; later `ckptreg verify` then compares every "
                           "byte when this happens again")

    @staticmethod
    def _fingerprint_ok(stored: str, files) -> bool:
        """Do ``files`` match the fingerprint stored at registration? A stored fingerprint is
        checked with the scheme that made it (formats.fingerprint_matches, when formats has
        versioned schemes), so registries written by an older ckptreg keep verifying."""
        from .. import formats

        match = getattr(formats, "fingerprint_matches", None)
        if match is not None:
            return bool(match(stored, files))
        return formats.fingerprint(files) == stored

    def check_unchanged(self, ckpt, *, full: bool = False) -> None:
        """ChangedError naming the file(s) when the checkpoint's files differ from registration;
        ``full``: also compare every byte with the full hash, when one was recorded."""
        c, files = self._file_rows(ckpt)
        status, detail = self._status(c, files, lambda: self._stored_full_hash(c.id))
        if status != "ok":
            raise ChangedError(f"{c.ref} (id {c.id}): {detail}")
        if full:
            old = self._stored_full_hash(c.id)
            if isinstance(old, dict):
                now = self._full_hashes([f["path"] for f in files])
                bad = [p for p in now if old.get(p) != now[p]]
                if bad:
                    raise ChangedError(f"{c.ref} (id {c.id}): content changed since its full hash was "
                                       "recorded: " + ", ".join(bad))

    def _stored_full_hash(self, cid: int):
        with self._reader() as con:
            return _jloads(con.execute("SELECT full_hash FROM checkpoints WHERE id = ?",
                                       [cid]).fetchone()[0])

    @staticmethod
    def _full_hashes(files) -> dict[str, str]:
        """{file: hash of every byte of it} (formats.fingerprint([file], full=True))."""
        from .. import formats

        return {str(f): formats.fingerprint([f], full=True) for f in files}

    def verify(self, ckpt=None, *, full: bool = False) -> list[dict]:
        """Per checkpoint: {"id", "ref", "path", "status": "ok" | "missing" | "changed", "detail"}
        (cheap fingerprint). ``full``: also hash every byte of the tensor files and compare with
        the hashes recorded at ``add(full_hash=True)`` or by the first full verify, which records
        them (lazily: a checkpoint is only as trusted as its state at that first full hash).
        Then one row per stale temporary (a ``.NAME.ckptreg-tmp-...`` left by a dead process) in
        the folders of the listed checkpoints: {"id": None, "ref": None, "path", "status":
        "stale-temporary", "detail"}."""
        with self._reader() as con:
            if ckpt is not None:
                cs = [self._resolve(con, ckpt)]
            else:
                cs = self._query(con)
            files, stored = {}, {}
            for i, f, h in con.execute(
                    "SELECT id, files, full_hash FROM checkpoints WHERE " + self._db.in_list("id"),
                    [[c.id for c in cs]]).fetchall():
                files[int(i)] = _jloads(f) or []
                stored[int(i)] = _jloads(h)
        out, record = [], {}
        for c in cs:
            fl = [f if isinstance(f, dict) else {"path": f, "size": None, "mtime_ns": None}
                  for f in files.get(c.id, [])]
            status, detail = self._status(c, fl, stored.get(c.id))
            row = {"id": c.id, "ref": c.ref, "path": c.path, "status": status, "detail": detail}
            if full and status == "ok":
                paths = [f["path"] for f in fl]
                try:
                    now = self._full_hashes(paths)
                except CkptregError as e:
                    row.update(status="changed", detail=str(e))
                else:
                    old = stored.get(c.id)
                    if not isinstance(old, dict):
                        record[c.id] = (c.fingerprint, now)
                        row["detail"] = "full hash recorded (first full verify)"
                    else:
                        bad = [p for p in paths if old.get(p) != now[p]]
                        if bad:
                            row.update(status="changed", detail="content changed since its full hash "
                                       "was recorded: " + ", ".join(bad))
                        else:
                            row["detail"] = "full hash matches"
            out.append(row)
        if record:
            try:
                with self._writer() as con:
                    def do():
                        for cid, (fp, h) in record.items():
                            con.execute("UPDATE checkpoints SET full_hash = ? WHERE id = ? "
                                        "AND fingerprint = ? AND full_hash IS NULL", [_jdumps(h), cid, fp])
                    self._tx(con, do)
            except (LockTimeout, DiskFullError, AccessError) as e:
                for row in out:
                    if row["id"] in record:
                        row["detail"] = f"full hash computed but not recorded: {e}"
        out += self._stale_temporaries(cs)
        return out

    @staticmethod
    def _stale_temporaries(cs) -> list[dict]:
        """Rows for the temporaries of dead writers (writer.find_stale_temporaries) in the folders
        of the checkpoints ``cs``: each one's folder and the folder holding it (where merge
        outputs are written)."""
        try:
            from ..writer import find_stale_temporaries
        except ImportError:  # an older writer without it
            return []
        folders: dict[str, None] = {}
        for c in cs:
            p = os.path.abspath(c.path)
            cand = [os.path.dirname(p)] + ([p] if os.path.isdir(p) else [])
            cand += [os.path.dirname(os.path.abspath(f)) for f in c.files]
            for d in cand:
                if os.path.isdir(d):
                    folders.setdefault(os.path.realpath(d))
        rows, seen = [], set()
        for d in folders:
            try:
                found = find_stale_temporaries(d)
            except (OSError, CkptregError):
                continue
            for t in found:
                t = str(t)
                if t in seen:
                    continue
                seen.add(t)
                rows.append({"id": None, "ref": None, "path": t, "status": "stale-temporary",
                             "detail": f"left in {d} by a ckptreg process that is no longer running "
                                       f"(not a registered file; safe to delete)"})
        return sorted(rows, key=lambda r: r["path"])

    def lineage(self, ckpt) -> dict | None:
        """{"method", "params", "inputs": [{"id", "ref", "weight", "position"}], "base", "base_ref",
        "created"} for a merged checkpoint, None for a plain one."""
        with self._reader() as con:
            c = self._resolve(con, ckpt)
            row = con.execute("SELECT id, method, params, base_id, created FROM merges WHERE checkpoint_id = ?",
                              [c.id]).fetchone()
            if row is None:
                return None
            ins = con.execute(
                "SELECT i.input_id, i.weight, i.position, c.run, c.step, c.name FROM merge_inputs i "
                "LEFT JOIN checkpoints c ON c.id = i.input_id WHERE i.merge_id = ? ORDER BY i.position",
                [row[0]]).fetchall()
            base_ref = None
            if row[3] is not None:
                b = con.execute("SELECT run, step, name FROM checkpoints WHERE id = ?", [row[3]]).fetchone()
                base_ref = None if b is None else f"{b[0]}@{b[2] if b[1] is None else b[1]}"

        def ref(run, step, name):
            return None if run is None else f"{run}@{name if step is None else step}"

        out = {"method": row[1], "params": _jloads(row[2]) or {},
               "inputs": [{"id": int(i), "ref": ref(r, s, n), "weight": w, "position": int(p)}
                          for i, w, p, r, s, n in ins],
               "base": row[3], "base_ref": base_ref, "created": row[4]}
        return self._lineage_removed(out)

    def sql(self, query: str, timeout: float | None = 30.0) -> tuple[list[str], list[tuple]]:
        """Run one SQL statement against the registry, read-only BY CONSTRUCTION: the file is opened
        on a dedicated DuckDB connection (not the shared engine) with ``read_only=True``, external
        access disabled (no file reads/writes: COPY, read_text, read_csv, glob, ATTACH, INSTALL),
        extension autoload/autoinstall off, no spill directory and the configuration locked (so
        the statement cannot ``SET`` any of that back). Whatever the statement is, DuckDB itself
        refuses what is not a read; there is no keyword screen. ``timeout`` seconds (None: none)
        bounds the run: a timer thread interrupts the connection. On PostgreSQL: a READ ONLY
        transaction with ``SET LOCAL statement_timeout``, the statement sent with the extended
        protocol (one statement only), and only a query (SELECT / WITH / VALUES / TABLE /
        EXPLAIN / SHOW).

        QueryError (with the engine's reason) for a refused / failed / timed-out statement."""
        if not isinstance(query, str) or not query.strip():
            raise QueryError("sql: empty query")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                    or not math.isfinite(timeout) or timeout <= 0:
                raise UsageError(f"sql: timeout must be a number of seconds > 0, got {timeout!r}")
        n = self._db.count_statements(query)
        if n != 1:
            raise QueryError(f"sql: exactly one statement allowed, got {n}")
        with self._reader():  # ingests the spool, migrates, refuses a newer schema
            pass
        return self._db.query_read_only(query, timeout)

    # ----------------------------------------------------------------- lifecycle: status, rm, gc

    def _refuse_same_files(self, con, info, run, step, what) -> None:
        """DuplicateError naming the entry when the same files (same fingerprint) are already
        registered at another step of ``run``."""
        row = con.execute("SELECT id, step FROM checkpoints WHERE run = ? AND fingerprint = ? "
                          "AND NOT merged AND step IS NOT NULL AND step <> ? ORDER BY step LIMIT 1",
                          [run, info.fingerprint, int(step)]).fetchone()
        if row is not None:
            raise DuplicateError(f"{info.path}: the same files (fingerprint {info.fingerprint}) are "
                                 f"already registered as {run}@{row[1]} (id {row[0]}); not registering "
                                 f"them again as {what}")

    @staticmethod
    def _lineage_removed(lin: dict) -> dict:
        """Fill the refs of removed inputs / base from the snapshot ``rm --force`` stored in the
        merge's params (under :data:`_REMOVED_KEY`), which is then not shown among the params."""
        params = lin.get("params")
        snap = params.pop(_REMOVED_KEY, None) if isinstance(params, dict) else None
        if not isinstance(snap, dict):
            return lin
        ins = snap.get("inputs") or {}
        for i in lin["inputs"]:
            s = ins.get(str(i["id"]))
            if i["ref"] is None and isinstance(s, dict):
                i.update(ref=s.get("ref"), fingerprint=s.get("fingerprint"), path=s.get("path"),
                         removed=True)
        b = snap.get("base")
        if lin.get("base") is not None and lin.get("base_ref") is None and isinstance(b, dict):
            lin.update(base_ref=b.get("ref"), base_fingerprint=b.get("fingerprint"), base_removed=True)
        return lin

    def status(self, ckpts=None) -> dict[int, str]:
        """{id: "ok" | "missing"} for the checkpoints (Checkpoint objects, ids or refs; None: all):
        "missing" when any registered file of it is gone. A cheap stat, no hashing (``verify``
        compares fingerprints)."""
        if ckpts is None:
            ckpts = self.checkpoints()
        elif isinstance(ckpts, (str, int, Checkpoint)):
            ckpts = [ckpts]
        out: dict[int, str] = {}
        todo = []
        for c in ckpts:
            if isinstance(c, Checkpoint):
                out[c.id] = "ok" if _files_present(c.files, c.path) else "missing"
            else:
                todo.append(c)
        if todo:
            with self._reader() as con:
                for r in todo:
                    c = self._resolve(con, r)
                    out[c.id] = "ok" if _files_present(c.files, c.path) else "missing"
        return out

    def _merge_users(self, con, ids) -> dict[int, list[dict]]:
        """{checkpoint id: [{"merge_id", "id", "ref", "role": "input" | "base"}]} for the registered
        merges that take each of ``ids`` as an input or as their base."""
        if not ids:
            return {}
        rows = con.execute(
            "SELECT i.input_id, 'input', m.id, c.id, c.run, c.name, c.version FROM merge_inputs i "
            "JOIN merges m ON m.id = i.merge_id JOIN checkpoints c ON c.id = m.checkpoint_id "
            f"WHERE {self._db.in_list('i.input_id', 'BIGINT', '$1')} "
            "UNION ALL SELECT m.base_id, 'base', m.id, c.id, c.run, c.name, c.version FROM merges m "
            f"JOIN checkpoints c ON c.id = m.checkpoint_id WHERE {self._db.in_list('m.base_id', 'BIGINT', '$1')} "
            "ORDER BY 4, 2", [[int(i) for i in ids]]).fetchall()
        out: dict[int, list[dict]] = {}
        for cid, role, mid, mcid, run, name, version in rows:
            ref = f"{run}@{name}" + (f":v{version}" if version and version > 1 else "")
            lst = out.setdefault(int(cid), [])
            if not any(u["merge_id"] == mid and u["role"] == role for u in lst):
                lst.append({"merge_id": int(mid), "id": int(mcid), "ref": ref, "role": role})
        return out

    @staticmethod
    def _snapshot_removed(con, c: Checkpoint, users: list[dict]) -> None:
        """Keep a removed input's / base's ref, fingerprint and path in the params of every merge
        that used it (merge_inputs keeps its id, position and weight), so lineage still names it."""
        for u in users:
            row = con.execute("SELECT params FROM merges WHERE id = ?", [u["merge_id"]]).fetchone()
            if row is None:
                continue
            params = _jloads(row[0]) or {}
            if not isinstance(params, dict):
                params = {"value": params}
            snap = params.setdefault(_REMOVED_KEY, {})
            entry = {"ref": c.ref, "fingerprint": c.fingerprint, "path": c.path, "run": c.run,
                     "step": c.step, "removed": _now().isoformat()}
            if u["role"] == "input":
                snap.setdefault("inputs", {})[str(c.id)] = entry
            else:
                snap["base"] = entry
            con.execute("UPDATE merges SET params = ? WHERE id = ?", [_jdumps(params), u["merge_id"]])

    def _deletion_plans(self, con, cs: list[Checkpoint]) -> dict[int, dict]:
        """Per checkpoint, which of its files may be deleted: only files the registry lists for it
        (tensor files and config files), only inside its folder (a file checkpoint: only the file
        itself), not a file another remaining checkpoint lists, not one whose size or mtime
        changed since registration. {id: {"folder", "delete": [paths], "keep": [{"path",
        "reason"}]}}."""
        ids = [c.id for c in cs]
        rows = {int(r[0]): (_jloads(r[1]) or [], _jloads(r[2]) or []) for r in con.execute(
            "SELECT id, files, config_files FROM checkpoints WHERE " + self._db.in_list("id"),
            [ids]).fetchall()}
        others: set[str] = set()
        for p, f, cf in con.execute("SELECT path, files, config_files FROM checkpoints "
                                    "WHERE NOT " + self._db.in_list("id"), [ids]).fetchall():
            others.add(os.path.realpath(p))
            for x in (_jloads(f) or []) + (_jloads(cf) or []):
                others.add(os.path.realpath(x["path"] if isinstance(x, dict) else x))
        plans = {}
        for c in cs:
            files, cfgs = rows.get(c.id, ([], []))
            root = os.path.realpath(c.path)
            is_dir = os.path.isdir(root)
            cands = [f if isinstance(f, dict) else {"path": f} for f in files]
            cands += [{"path": f} for f in cfgs if isinstance(f, str)]
            delete, keep, seen = [], [], set()
            for f in cands:
                p = f["path"]
                rp = os.path.realpath(p)
                if rp in seen:
                    continue
                seen.add(rp)
                inside = rp.startswith(root + os.sep) if is_dir else rp == root
                if not inside:
                    keep.append({"path": p, "reason": "outside the checkpoint's folder"})
                    continue
                if rp in others:
                    keep.append({"path": p, "reason": "also registered for another checkpoint"})
                    continue
                try:
                    st = os.lstat(rp)
                except OSError:
                    continue  # already gone
                if f.get("size") is not None and (st.st_size != f["size"]
                                                  or st.st_mtime_ns != f.get("mtime_ns")):
                    keep.append({"path": p, "reason": "changed since registration (size/mtime)"})
                    continue
                delete.append(rp)
            plans[c.id] = {"folder": root if is_dir else None, "delete": delete, "keep": keep}
        return plans

    @staticmethod
    def _delete_planned(plan: dict) -> dict:
        """Delete the planned files, then empty folders up to and including the checkpoint's
        folder (never one that still holds anything). {"deleted", "kept", "left" (files still in the folder), "errors", "folder_removed"}."""
        deleted, errors = [], []
        for p in plan["delete"]:
            try:
                os.unlink(p)
                deleted.append(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                errors.append({"path": p, "error": e.strerror or str(e)})
        removed = False
        root = plan.get("folder")
        if root:
            dirs = sorted({os.path.dirname(p) for p in deleted}, key=len, reverse=True)
            for d in dirs:
                while d.startswith(root + os.sep):
                    try:
                        os.rmdir(d)
                    except OSError:
                        break
                    d = os.path.dirname(d)
            try:
                os.rmdir(root)
                removed = True
            except OSError:
                pass
        left = []
        if root and not removed:
            try:
                for dp, _, fns in os.walk(root):
                    left += [os.path.join(dp, f) for f in fns]
            except OSError:
                pass
        return {"deleted": deleted, "kept": plan["keep"], "left": sorted(left),
                "errors": errors, "folder_removed": removed}

    def _unregister(self, con, cs: list[Checkpoint], users: dict, op: str, detail: dict,
                    delete_files: bool) -> tuple[dict, list[dict]]:
        """Inside the writer: the deletion plans (when ``delete_files``), then in one transaction
        each checkpoint's rows, aliases and (as snapshots in its merges) lineage, one ``op`` event
        each. Returns (plans, the aliases removed)."""
        plans = self._deletion_plans(con, cs) if delete_files else {}
        gone_aliases: list[dict] = []

        def do():
            gone_aliases.clear()   # (a transaction that lost a race runs again from the start)
            for c in cs:
                live = [u for u in users.get(c.id, []) if u["id"] not in {x.id for x in cs}]
                self._snapshot_removed(con, c, live)
                al = con.execute("SELECT run, name FROM aliases WHERE checkpoint_id = ?", [c.id]).fetchall()
                if al:
                    con.execute("DELETE FROM aliases WHERE checkpoint_id = ?", [c.id])
                    gone_aliases.extend({"alias": f"{r}@{n}", "id": c.id} for r, n in al)
                self._delete_rows(con, c.id)
                d = dict(detail, path=c.path, fingerprint=c.fingerprint, step=c.step, merged=c.merged,
                         metrics={k: (v if math.isfinite(v) else str(v)) for k, v in c.metrics.items()},
                         delete_files=bool(delete_files),
                         used_by=[u["ref"] for u in live],
                         aliases=[f"{r}@{n}" for r, n in al])
                if delete_files:
                    d["files_to_delete"] = plans[c.id]["delete"]
                self._event(con, op, run=c.run, checkpoint_id=c.id, ref=c.ref, detail=d)

        self._tx(con, do)
        return plans, gone_aliases

    def rm(self, refs, *, delete_files: bool = False, force: bool = False) -> list[dict]:
        """Unregister checkpoints (ids, refs or Checkpoints) in one transaction, one ``rm`` event
        each. Their files stay unless ``delete_files``: then only the files the registry lists for
        each one, inside its folder, unchanged since registration, are deleted after the commit
        (the folder too when nothing else is left in it). A checkpoint that is an input or the base
        of a registered merge is refused (UsageError naming the merges) unless ``force``; those
        merges' lineage keeps its ref, fingerprint and weight.

        Returns per checkpoint {"id", "ref", "path", "used_by": [merge refs], "aliases": [...],
        "files": {"deleted", "kept", "left", "errors", "folder_removed"} | None}."""
        if isinstance(refs, (str, int, Checkpoint)):
            refs = [refs]
        refs = list(refs or [])
        if not refs:
            raise UsageError("rm: no checkpoint given")
        with self._writer() as con:
            cs: list[Checkpoint] = []
            for r in refs:
                c = self._resolve(con, r)
                if all(x.id != c.id for x in cs):
                    cs.append(c)
            ids = {c.id for c in cs}
            users = self._merge_users(con, list(ids))
            blocked = {c.id: [u for u in users.get(c.id, []) if u["id"] not in ids] for c in cs}
            blocked = {k: v for k, v in blocked.items() if v}
            if blocked and not force:
                by_id = {c.id: c for c in cs}
                raise UsageError(
                    "rm: refused: " + "; ".join(
                        f"{by_id[k].ref} (id {k}) is the {'/'.join(sorted({u['role'] for u in v}))} of "
                        f"registered merge(s) {', '.join(sorted({u['ref'] for u in v}))}"
                        for k, v in blocked.items())
                    + "; pass force=True / --force to remove it anyway (the merges' lineage keeps its "
                      "ref, fingerprint and weight)")
            plans, aliases = self._unregister(con, cs, users, "rm", {"force": bool(force)}, delete_files)
        out = []
        for c in cs:
            res = self._delete_planned(plans[c.id]) if delete_files else None
            out.append({"id": c.id, "ref": c.ref, "path": c.path,
                        "used_by": sorted({u["ref"] for u in blocked.get(c.id, [])}),
                        "aliases": [a["alias"] for a in aliases if a["id"] == c.id], "files": res})
        return out

    def gc_plan(self, run, *, keep_best=None, metric=None, direction=None, keep_last=None,
                keep_every=None, merged: bool = False) -> dict:
        """What :meth:`gc` would do (a dry run); see there."""
        pol = _gc_policy(keep_best, metric, direction, keep_last, keep_every, merged=merged)
        with self._reader() as con:
            return self._gc_plan(con, run, pol)

    def gc(self, run, *, keep_best=None, metric=None, direction=None, keep_last=None,
           keep_every=None, yes: bool = False, merged: bool = False) -> dict:
        """Retention over the plain checkpoints of ``run``. Kept: the union of the policies
        (``keep_best`` K by the latest value of ``metric``, ``direction`` min|max, default from the
        name, NaN/missing never best, ties to the later step; ``keep_last`` N highest steps;
        ``keep_every`` M: steps that are multiples of M) plus, always, the final checkpoint,
        every checkpoint with an alias, with a tag ``keep`` (any value), and every input or base
        of a registered merge. Merged checkpoints are never touched, unless ``merged``: then the
        policies apply to the run's merged outputs instead (``keep_last`` N most recently
        registered, ``keep_best`` K by a logged metric, ties to the later registration;
        ``keep_every`` has no steps to work on and is refused) and kept always are the merges
        that are an input or the base of another registered merge, aliased ones and ones tagged
        ``keep``; no plain checkpoint is touched.

        Without ``yes`` a dry run; with ``yes`` the rest is unregistered (one ``gc`` event each)
        and their files deleted as :meth:`rm` ``delete_files`` does (registered files only, only
        inside each checkpoint's folder). Returns {"run", "dry_run", "policy", "keep": [{"id",
        "ref", "step", "reasons"}], "delete": [{"id", "ref", "step", "path", "bytes"}],
        "bytes_freed", "files": {id: rm-like file result} (with ``yes``)}."""
        pol = _gc_policy(keep_best, metric, direction, keep_last, keep_every, merged=merged)
        if not yes:
            with self._reader() as con:
                return self._gc_plan(con, run, pol)
        with self._writer() as con:
            plan = self._gc_plan(con, run, pol)
            plan["dry_run"] = False
            ids = [d["id"] for d in plan["delete"]]
            cs = self._query(con, self._db.in_list("id"), [ids]) if ids else []
            plans, _ = self._unregister(con, cs, {}, "gc", {"policy": pol}, True) if cs else ({}, [])
        files = {}
        freed = 0
        sizes = {d["id"]: d["bytes"] for d in plan["delete"]}
        for c in cs:
            files[c.id] = self._delete_planned(plans[c.id])
            if files[c.id]["deleted"]:
                freed += sizes.get(c.id, 0)
        plan["files"] = files
        plan["bytes_deleted"] = freed
        return plan

    def _gc_plan(self, con, run, pol: dict) -> dict:
        """The dry-run plan of ``gc``: over the run's plain checkpoints (ordered by step; the
        final one always kept), or with ``pol["merged"]`` over its merged outputs (ordered by
        registration). Kept in both: the policies' union, aliased, tagged ``keep``, and every
        input or base of a registered merge."""
        merged = bool(pol.get("merged"))
        if merged:
            rows = con.execute("SELECT id, step, path, files, tags, name, version, created FROM checkpoints "
                               "WHERE run = ? AND merged ORDER BY created, id", [run]).fetchall()
        else:
            rows = con.execute("SELECT id, step, path, files, tags, name, version, created FROM checkpoints "
                               "WHERE run = ? AND NOT merged ORDER BY step", [run]).fetchall()
        if not rows:
            have = con.execute("SELECT count(*) FROM runs WHERE name = ?", [run]).fetchone()[0]
            if not have:
                raise NotFoundError(f"gc: no run {run!r}" + self._candidates(con, f"{run}@0", None))
        keep: dict[int, list[str]] = {}

        def mark(i, why):
            keep.setdefault(int(i), []).append(why)

        order = {int(r[0]): n for n, r in enumerate(rows)}   # step order, or registration order
        which = "c.merged" if merged else "NOT c.merged"
        if rows and not merged:
            mark(rows[-1][0], "final")
        if pol.get("keep_last"):
            for r in rows[-pol["keep_last"]:]:
                mark(r[0], f"last {pol['keep_last']}" + (" registered" if merged else ""))
        if pol.get("keep_every") and not merged:
            m = pol["keep_every"]
            for r in rows:
                if r[1] % m == 0:
                    mark(r[0], f"every {m} steps")
        if pol.get("keep_best"):
            k, metric, d = pol["keep_best"], pol["metric"], pol["direction"]
            vals = con.execute(
                "SELECT c.id, m.value FROM metrics m JOIN checkpoints c ON c.id = m.checkpoint_id "
                f"WHERE c.run = ? AND {which} AND m.name = ? AND m.latest AND " + self._db.not_nan("m.value"),
                [run, metric]).fetchall()
            # ties: the later checkpoint (step, or registration) ranks first
            vals.sort(key=lambda v: ((v[1] if d == "min" else -v[1]), -order.get(int(v[0]), 0)))
            for i, _ in vals[:k]:
                mark(i, f"best {k} by {metric} ({d})")
        for i, a in con.execute(
                "SELECT a.checkpoint_id, a.run || '@' || a.name FROM aliases a JOIN checkpoints c "
                f"ON c.id = a.checkpoint_id WHERE c.run = ? AND {which} ORDER BY 2", [run]).fetchall():
            mark(i, f"alias {a}")
        for r in rows:
            tags = _jloads(r[4]) or {}
            if isinstance(tags, dict) and "keep" in tags:
                mark(r[0], "tag keep")
        users = self._merge_users(con, list(order)) if merged else self._merge_users_of_run(con, run)
        for cid, us in users.items():
            for u in us:
                if not merged or u["id"] != cid:   # (a merge is not kept for being its own output)
                    mark(cid, f"{u['role']} of merge {u['ref']}")
        keep_rows, delete_rows, freed = [], [], 0
        for cid, step, path, files, _, name, version, created in rows:
            if merged:
                base = {"id": int(cid), "ref": _ref_of(run, None, name, version), "step": None, "name": name,
                        "version": int(version or 1), "created": created}
            else:
                base = {"id": int(cid), "ref": f"{run}@{step}", "step": step}
            if int(cid) in keep:
                keep_rows.append(dict(base, reasons=keep[int(cid)]))
                continue
            fl = _jloads(files) or []
            b = sum(int(f.get("size") or 0) for f in fl if isinstance(f, dict))
            delete_rows.append(dict(base, path=path, bytes=b))
            freed += b
        plan = {"run": run, "dry_run": True, "policy": pol, "keep": keep_rows, "delete": delete_rows,
                "bytes_freed": freed}
        if merged:
            plan["merged"] = True
        return plan

    def _merge_users_of_run(self, con, run) -> dict[int, list[dict]]:
        """:meth:`_merge_users` for every plain checkpoint of ``run`` (one query)."""
        rows = con.execute(
            "SELECT i.input_id, 'input', c.run, c.name, c.version FROM merge_inputs i "
            "JOIN merges m ON m.id = i.merge_id JOIN checkpoints c ON c.id = m.checkpoint_id "
            "JOIN checkpoints x ON x.id = i.input_id WHERE x.run = $1 AND NOT x.merged "
            "UNION ALL SELECT m.base_id, 'base', c.run, c.name, c.version FROM merges m "
            "JOIN checkpoints c ON c.id = m.checkpoint_id JOIN checkpoints x ON x.id = m.base_id "
            "WHERE x.run = $1 AND NOT x.merged ORDER BY 1, 2, 3, 4, 5", [run]).fetchall()
        out: dict[int, list[dict]] = {}
        for cid, role, r, n, v in rows:
            ref = f"{r}@{n}" + (f":v{v}" if v and v > 1 else "")
            lst = out.setdefault(int(cid), [])
            if not any(u["ref"] == ref and u["role"] == role for u in lst):
                lst.append({"ref": ref, "role": role})
        return out

    def retain(self, run, retention) -> dict | None:
        """Apply a retention policy (a dict of :meth:`gc` keywords, see :func:`retention_policy`)
        to ``run`` now (``yes=True``); None when ``retention`` is None. What the trainer callbacks
        call after each save."""
        if retention is None:
            return None
        return self.gc(run, yes=True, **retention_policy(retention))

    # ----------------------------------------------------------------- maintenance

    def dump(self) -> dict[str, list[tuple]]:
        """Every table's rows, in a stable order (tests compare before/after)."""
        tables = ["schema_version", "runs", "checkpoints", "metrics", "tensors", "merges", "merge_inputs"]
        with self._reader() as con:
            return self._db.dump(con, tables)

    def ingest(self) -> int:
        """Ingest pending spool entries now; returns how many were applied or dropped as duplicates."""
        with self._writer(ingest=False) as con:
            return self._ingest_spool(con)

    # ----------------------------------------------------------------- aliases, tags, data out

    def alias(self, ckpt, name: str, *, delete: bool = False) -> dict:
        """Point the user alias RUN@NAME (RUN: the checkpoint's run) at ``ckpt``, or move it there
        when it exists (one transaction); ``delete``: remove it (``ckpt`` then only names the run:
        the alias itself, RUN@NAME, is fine). Returns {"ref", "run", "name", "id", "target",
        "status": "created" | "moved" | "unchanged" | "deleted", "previous"}. An alias may not be a
        number, a built-in (final, latest, best:...), a version suffix or a registered merged
        name of the run (UsageError / DuplicateError); NotFoundError for deleting a missing one."""
        name = _check_ref_name("alias", _check_name("alias", name))
        created = _now()
        with self._writer() as con:
            if delete:
                if isinstance(ckpt, str) and "@" in ckpt:
                    run = parse_ref(ckpt.strip())[0]
                else:
                    run = self._resolve(con, ckpt).run
                row = con.execute("SELECT checkpoint_id FROM aliases WHERE run = ? AND name = ?",
                                  [run, name]).fetchone()
                if row is None:
                    have = [n for (n,) in con.execute("SELECT name FROM aliases WHERE run = ? ORDER BY name",
                                                      [run]).fetchall()]
                    close = difflib.get_close_matches(name, have, n=3, cutoff=0.4)
                    raise NotFoundError(f"no alias {run}@{name}" + (
                        f"; closest: {', '.join(close)}" if close else
                        f"; aliases of run {run!r}: {', '.join(have)}" if have else
                        f"; run {run!r} has no aliases"))

                def do_delete():
                    con.execute("DELETE FROM aliases WHERE run = ? AND name = ?", [run, name])
                    self._event(con, "alias", run=run, checkpoint_id=int(row[0]), ref=f"{run}@{name}",
                                detail={"name": name, "deleted": True, "previous": int(row[0])}, time=created)
                self._tx(con, do_delete)
                return {"ref": f"{run}@{name}", "run": run, "name": name, "id": None, "target": None,
                        "status": "deleted", "previous": int(row[0])}
            c = self._resolve(con, ckpt)
            run = c.run
            m = con.execute("SELECT id FROM checkpoints WHERE run = ? AND name = ? ORDER BY version DESC LIMIT 1",
                            [run, name]).fetchone()
            if m is not None:
                raise DuplicateError(f"{run}@{name} is a registered merged checkpoint (id {m[0]}); an alias "
                                     "may not shadow it: choose another alias name")
            old = con.execute("SELECT checkpoint_id FROM aliases WHERE run = ? AND name = ?",
                              [run, name]).fetchone()
            prev = None if old is None else int(old[0])
            out = {"ref": f"{run}@{name}", "run": run, "name": name, "id": c.id, "target": c.ref,
                   "previous": prev}
            if prev == c.id:
                return dict(out, status="unchanged")

            def do():
                if prev is None:
                    con.execute("INSERT INTO aliases (run, name, checkpoint_id, created) VALUES (?, ?, ?, ?)",
                                [run, name, c.id, created])
                else:
                    con.execute("UPDATE aliases SET checkpoint_id = ?, created = ? WHERE run = ? AND name = ?",
                                [c.id, created, run, name])
                self._event(con, "alias", run=run, checkpoint_id=c.id, ref=f"{run}@{name}",
                            detail={"name": name, "target": c.ref, "previous": prev}, time=created)
            self._tx(con, do)
            return dict(out, status="created" if prev is None else "moved")

    def aliases(self, run=None, *, ckpt=None) -> list[dict]:
        """User aliases: [{"ref", "run", "name", "id", "target", "created"}] by run and name;
        only those of ``run``, or only those pointing at ``ckpt``. ``target`` is None for an
        alias whose checkpoint is no longer registered."""
        with self._reader() as con:
            where, params = ["TRUE"], []
            if run is not None:
                where.append("a.run = ?")
                params.append(run)
            if ckpt is not None:
                where.append("a.checkpoint_id = ?")
                params.append(self._resolve(con, ckpt).id)
            rows = con.execute(
                "SELECT a.run, a.name, a.checkpoint_id, a.created, c.run, c.step, c.name, c.version "
                "FROM aliases a LEFT JOIN checkpoints c ON c.id = a.checkpoint_id "
                f"WHERE {' AND '.join(where)} ORDER BY a.run, a.name", params).fetchall()
        return [{"ref": f"{r[0]}@{r[1]}", "run": r[0], "name": r[1], "id": int(r[2]),
                 "target": None if r[4] is None else _ref_of(r[4], r[5], r[6], r[7]), "created": r[3]}
                for r in rows]

    def tag(self, ckpt, tags: dict | None = None, *, remove: Iterable[str] = ()) -> dict[str, str]:
        """Set (``tags``: name -> value) and remove (``remove``: names) tags of a checkpoint, in one
        transaction with a ``tag`` event; returns its tags afterwards. Tags are mutable: a value
        set again replaces the old one. NotFoundError for removing a tag the checkpoint lacks;
        UsageError for nothing to do, or a name both set and removed."""
        tags = _check_tags(tags)
        remove = list(remove or ())
        for k in remove:
            if not isinstance(k, str) or not k:
                raise UsageError(f"tag names must be non-empty strings, got {k!r}")
        if not tags and not remove:
            raise UsageError("tag: nothing to set or remove (give NAME=VALUE and/or --remove NAME)")
        both = sorted(set(tags) & set(remove))
        if both:
            raise UsageError(f"tag: {', '.join(both)} both set and removed")
        created = _now()
        with self._writer() as con:
            c = self._resolve(con, ckpt)
            cur = dict(c.tags)
            missing = [k for k in remove if k not in cur]
            if missing:
                raise NotFoundError(f"{c.ref} (id {c.id}) has no tag {', '.join(map(repr, missing))}"
                                    + (f"; its tags: {', '.join(sorted(cur))}" if cur else "; it has no tags"))
            new = dict(cur)
            new.update(tags)
            for k in remove:
                new.pop(k, None)
            if new == cur:
                return new

            def do():
                con.execute("UPDATE checkpoints SET tags = ? WHERE id = ?", [_jdumps(new), c.id])
                self._event(con, "tag", run=c.run, checkpoint_id=c.id, ref=c.ref,
                            detail={"set": tags, "removed": remove, "before": cur}, time=created)
            self._tx(con, do)
            return new

    #: The export's fixed columns, in order; then one ``metrics.NAME`` column per metric (latest
    #: value), then the lineage columns.
    EXPORT_COLUMNS = ("id", "ref", "run", "step", "name", "version", "merged", "path", "format", "kind",
                      "base_model", "n_tensors", "n_params", "nbytes", "fingerprint", "created", "tags")
    EXPORT_LINEAGE = ("method", "params", "base_id", "base_ref", "inputs")

    def _export_sql(self, con, flat: bool = False) -> str:
        """One query over every checkpoint: its fields, its latest metrics as ``metrics.NAME``
        columns, and its lineage (method, params, base, inputs: [{id, ref, weight, position}]).
        ``flat``: inputs as JSON text (CSV)."""
        names = [r[0] for r in con.execute("SELECT DISTINCT name FROM metrics WHERE latest ORDER BY 1").fetchall()]

        def ident(s):
            return '"' + s.replace('"', '""') + '"'

        def ref_sql(t):
            return (f"CASE WHEN {t}.id IS NULL THEN NULL ELSE {t}.run || '@' || coalesce(CAST({t}.step AS VARCHAR), "
                    f"{t}.name || CASE WHEN coalesce({t}.version, 1) > 1 THEN ':v' || {t}.version ELSE '' END) END")

        mcols = ", ".join(f"max(value) FILTER (WHERE name = {_sql_str(n)}) AS {ident('metrics.' + n)}"
                          for n in names)
        met = (f", met AS (SELECT checkpoint_id, {mcols} FROM metrics WHERE latest GROUP BY checkpoint_id)"
               if names else "")
        inputs = self._db.list_agg([("id", "i.input_id"), ("ref", ref_sql("ci")), ("weight", "i.weight"),
                                    ("position", "i.position")], "i.position", "i.input_id IS NOT NULL")
        sel = ", ".join(f"c.{ident(k)}" for k in self.EXPORT_COLUMNS if k not in ("ref",))
        sel = sel.replace('c."run"', ref_sql("c") + ' AS "ref", c."run"', 1)
        mets = "".join(f", met.{ident('metrics.' + n)}" for n in names)
        ins = self._db.json_text("lin.inputs") if flat else "lin.inputs"
        return (f"WITH lin AS (SELECT g.checkpoint_id, g.method, g.params, g.base_id, {ref_sql('b')} AS base_ref, "
                f"{inputs} AS inputs FROM merges g LEFT JOIN merge_inputs i ON i.merge_id = g.id "
                "LEFT JOIN checkpoints ci ON ci.id = i.input_id LEFT JOIN checkpoints b ON b.id = g.base_id "
                "GROUP BY g.id, g.checkpoint_id, g.method, g.params, g.base_id, b.id, b.run, b.step, "
                f"b.name, b.version){met} "
                f"SELECT {sel}{mets}, lin.method, lin.params, lin.base_id, lin.base_ref, {ins} AS inputs "
                "FROM checkpoints c " + ("LEFT JOIN met ON met.checkpoint_id = c.id " if names else "")
                + "LEFT JOIN lin ON lin.checkpoint_id = c.id "
                "ORDER BY c.run, c.step NULLS LAST, c.name, c.version, c.id")

    def export_rows(self) -> list[dict]:
        """Every checkpoint with its metrics and lineage as plain dicts (the rows ``export``
        writes): the :attr:`EXPORT_COLUMNS`, ``metrics`` {name: latest value}, ``method``,
        ``params``, ``base_id``, ``base_ref``, ``inputs`` [{id, ref, weight, position}] (None for a
        plain checkpoint)."""
        with self._reader() as con:
            cur = con.execute(self._export_sql(con))
            cols = [d[0] for d in cur.description]
            rows = cur.fetchall()
        out = []
        for r in rows:
            d = dict(zip(cols, r))
            row = {k: d[k] for k in self.EXPORT_COLUMNS}
            row["tags"] = _jloads(row["tags"]) or {}
            row["metrics"] = {k[len("metrics."):]: v for k, v in d.items()
                              if k.startswith("metrics.") and v is not None}
            row["method"] = d["method"]
            row["params"] = _jloads(d["params"]) if d["params"] is not None else None
            row["base_id"] = d["base_id"]
            row["base_ref"] = d["base_ref"]
            row["inputs"] = None if d["inputs"] is None else [
                {"id": int(i["id"]), "ref": i["ref"], "weight": i["weight"], "position": int(i["position"])}
                for i in d["inputs"]]
            out.append(row)
        return out

    def to_arrow(self):
        """The export (every checkpoint, ``metrics.NAME`` columns, lineage) as a pyarrow Table.
        UsageError naming the package when pyarrow is not installed."""
        _need("pyarrow", "Registry.to_arrow()")
        with self._reader() as con:
            return self._db.to_arrow(con, self._export_sql(con))

    def to_pandas(self):
        """The export (every checkpoint, ``metrics.NAME`` columns, lineage) as a pandas DataFrame.
        UsageError naming the package when pandas (or pyarrow, which DuckDB needs for it) is
        not installed."""
        _need("pandas", "Registry.to_pandas()")
        with self._reader() as con:
            return self._db.to_pandas(con, self._export_sql(con))

    EXPORT_FORMATS = ("parquet", "csv", "json")

    def export(self, path, format: str | None = None, *, overwrite: bool = False) -> dict:
        """Write every checkpoint with its metrics and lineage to ``path`` as parquet, csv or json
        (``format`` None: from the file's suffix). Atomic: written to a temporary beside ``path``
        (``.NAME.ckptreg-tmp-...``), fsync'ed, then renamed; on any error the temporary is removed
        and ``path`` is as it was. OutputExistsError for an existing ``path`` unless ``overwrite``,
        and always for a folder, the registry's own files or a registered checkpoint's file or
        folder; NotFoundError for a missing parent folder. Returns {"path", "format", "rows",
        "columns", "bytes"}."""
        from ..errors import OutputExistsError

        p = pathlib.Path(os.fspath(path)).expanduser().absolute()
        fmt = format or p.suffix.lstrip(".").lower()
        if fmt not in self.EXPORT_FORMATS:
            raise UsageError(f"export: format {fmt or format!r} is not one of {', '.join(self.EXPORT_FORMATS)}"
                             + ("" if format else f" (from the suffix of {p}; pass format=)"))
        if not p.parent.is_dir():
            raise NotFoundError(f"export: {p.parent} does not exist (no folder to write {p.name} in)")
        own = ({str(self.path), str(self.path) + ".wal", str(self.lock_path)}
               if self.lock_path is not None else set())
        real = os.path.realpath(p)
        if str(p) in own or real in {os.path.realpath(x) for x in own}:
            raise OutputExistsError(f"export: {p} is the registry's own file; choose another -o")
        if p.is_dir() and not p.is_symlink():
            raise OutputExistsError(f"export: {p} is a folder; give a file name")
        if os.path.lexists(p) and not overwrite:
            raise OutputExistsError(f"export: {p} exists (use --overwrite / overwrite=True to replace it)")
        from ..writer import HOST_TAG, TMP_MARK

        with self._reader() as con:
            for cid, cref_run, cstep, cname, cpath, files in con.execute(
                    "SELECT id, run, step, name, path, files FROM checkpoints").fetchall():
                cp = os.path.realpath(str(cpath))
                fl = [os.path.realpath(f["path"] if isinstance(f, dict) else f) for f in (_jloads(files) or [])]
                if real == cp or real in fl or real.startswith(cp.rstrip(os.sep) + os.sep):
                    raise OutputExistsError(f"export: {p} is (inside) registered checkpoint "
                                            f"{cref_run}@{cname if cstep is None else cstep} (id {cid}, {cpath}); "
                                            "choose another -o")
            tmp = p.parent / f".{p.name}{TMP_MARK}{os.getpid()}-{HOST_TAG}-{uuid.uuid4().hex[:8]}"
            try:
                if fmt == "json":
                    cur = con.execute(self._export_sql(con))
                    cols = [d[0] for d in cur.description]
                    n = 0
                    rows = cur.fetchall()
                    n = len(rows)
                    data = self._export_json(cols, rows)
                    with open(tmp, "x", encoding="utf-8") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                else:
                    q = self._export_sql(con, flat=(fmt == "csv"))
                    cur = con.execute(f"SELECT * FROM ({q}) AS q LIMIT 0")
                    cols = [d[0] for d in cur.description]
                    n = int(con.execute(f"SELECT count(*) FROM checkpoints").fetchone()[0])
                    self._db.copy_to(con, q, str(tmp), fmt)
                    fd = os.open(tmp, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                if overwrite:
                    os.replace(tmp, p)
                else:
                    try:
                        os.link(tmp, p)  # refuses a file created meanwhile; never replaces
                    except FileExistsError:
                        raise OutputExistsError(f"export: {p} exists (use --overwrite / overwrite=True "
                                                "to replace it)") from None
                    except OSError:  # no hard links here: rename (the check above ran just now)
                        if os.path.lexists(p):
                            raise OutputExistsError(f"export: {p} exists (use --overwrite to replace it)") from None
                        os.replace(tmp, p)
            except BaseException as e:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                if isinstance(e, OSError):
                    import errno as _errno

                    if e.errno in (_errno.ENOSPC, _errno.EDQUOT):
                        raise DiskFullError(f"export: no space left to write {p}; nothing was written") from e
                    if e.errno in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
                        raise AccessError(f"export: cannot write {p}: {e.strerror}") from e
                if self._db.is_error(e):
                    msg = str(e)
                    kind = self._db.error_kind(e)
                    if kind == "nospace":
                        raise DiskFullError(f"export: no space left to write {p}; nothing was written "
                                            f"({_short(msg)})") from e
                    if kind == "access":
                        raise AccessError(f"export: cannot write {p}: permission denied or read-only "
                                          f"filesystem ({_short(msg)})") from e
                raise
            try:
                os.unlink(tmp)
            except OSError:
                pass
        from ..writer import fsync_dir

        fsync_dir(p.parent)
        return {"path": str(p), "format": fmt, "rows": n, "columns": cols, "bytes": p.stat().st_size}

    def _export_json(self, cols, rows) -> str:
        """A JSON array of nested rows (``metrics`` {name: value}; NaN/inf as "nan"/"inf", as in
        every --json output)."""
        out = []
        for r in rows:
            d = dict(zip(cols, r))
            row = {k: d[k] for k in self.EXPORT_COLUMNS}
            row["created"] = None if row["created"] is None else row["created"].isoformat()
            row["tags"] = _jloads(row["tags"]) or {}
            row["metrics"] = {k[len("metrics."):]: v for k, v in d.items()
                              if k.startswith("metrics.") and v is not None}
            row["method"] = d["method"]
            row["params"] = _jloads(d["params"]) if d["params"] is not None else None
            row["base_id"], row["base_ref"] = d["base_id"], d["base_ref"]
            row["inputs"] = None if d["inputs"] is None else [
                {"id": int(i["id"]), "ref": i["ref"], "weight": i["weight"], "position": int(i["position"])}
                for i in d["inputs"]]
            out.append(row)
        return json.dumps(_jsafe(out), indent=1, allow_nan=False) + "\n"

    # ----------------------------------------------------------------- run identity and history

    def _plain_conflict(self, old_row, info, what: str, replace: bool) -> bool:
        """RUN@STEP is taken by ``old_row`` (id, fingerprint, path). True when ``info`` is the
        same files (same path, fingerprint matching): adding them again is a no-op. Otherwise a
        relaunch overwrote them (or other files are offered for that step): DuplicateError
        saying the files differ unless ``replace``; False (go on and replace) with it."""
        oid, ofp, opath = old_row
        same_path = os.path.realpath(str(opath)) == os.path.realpath(str(info.path))
        same_fp = ofp == info.fingerprint or self._fp_matches_quiet(ofp, info.files)
        if same_path and same_fp:
            return True
        if replace is True or (replace == "stale" and same_path):
            return False  # replace="stale" (the callbacks): only files overwritten in place
        if same_fp:
            raise DuplicateError(
                f"{what} is already registered (id {oid}) from {opath}; {info.path} holds the same "
                f"files. Pass replace=True / --replace to point {what} at {info.path}")
        where = f"at {info.path}" if same_path else f"at {info.path} (registered from {opath})"
        raise DuplicateError(
            f"{what} is already registered (id {oid}) and the files {where} differ from the "
            f"registered ones (fingerprint {str(ofp)[:16]} registered, {str(info.fingerprint)[:16]} "
            f"now): a relaunch into the same run overwrote them? Pass replace=True / --replace to "
            f"replace the stale entry")

    def _fp_matches_quiet(self, stored, files) -> bool:
        try:
            return self._fingerprint_ok(stored, files)
        except CkptregError:
            return False

    def _record_add_event(self, con, info, run, step, cid, metrics, tags, created, actor=None) -> None:
        out = getattr(self, "_outcome", None) or {}
        op = "replace" if out.get("status") == "replaced" else "add"
        detail = {"path": str(info.path), "fingerprint": info.fingerprint, "format": info.format,
                  "kind": info.kind, "n_tensors": len(info.tensors), "step": step}
        if metrics:
            detail["metrics"] = _jsafe(dict(metrics))
        if tags:
            detail["tags"] = dict(tags)
        if op == "replace":
            detail["previous"] = dict(out.get("previous") or {})
        self._event(con, op, run=run, checkpoint_id=cid, ref=f"{run}@{step}", detail=detail,
                    time=created, actor=actor)

    def _log_event(self, con, cid, metrics, step, created, actor=None) -> None:
        row = con.execute("SELECT run, step, name FROM checkpoints WHERE id = ?", [cid]).fetchone()
        run, cstep, name = row if row is not None else (None, None, None)
        ref = None if run is None else f"{run}@{name if cstep is None else cstep}"
        self._event(con, "log", run=run, checkpoint_id=int(cid), ref=ref,
                    detail={"metrics": _jsafe(dict(metrics)), "step": step}, time=created, actor=actor)

    def history(self, ref=None, *, limit: int | None = None) -> list[dict]:
        """The events (append-only audit trail) of the registry, oldest first: every add, log,
        replace, rm, alias, tag, gc, params ... with its time, host, user and pid. ``ref``:
        None (everything), a run name, or a checkpoint (id, RUN@STEP, RUN@NAME, an alias, a
        path; a checkpoint removed since is still found by its ref). ``limit``: the newest N.
        NotFoundError (with the closest names) for a ref or run the registry never had."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise UsageError(f"limit must be an integer >= 1, got {limit!r}")
        with self._reader() as con:
            where, params = self._history_filter(con, ref)
            q = ('SELECT seq, time, op, run, checkpoint_id, ref, detail, host, "user", pid FROM events '
                 f"WHERE {where} ORDER BY seq DESC")
            if limit is not None:
                q += f" LIMIT {int(limit)}"
            rows = con.execute(q, params).fetchall()
        return [{"seq": int(r[0]), "time": r[1], "op": r[2], "run": r[3],
                 "checkpoint_id": None if r[4] is None else int(r[4]), "ref": r[5],
                 "detail": _jloads(r[6]) if r[6] is not None else {}, "host": r[7], "user": r[8],
                 "pid": r[9]} for r in reversed(rows)]

    def _history_filter(self, con, ref) -> tuple[str, list]:
        if ref is None:
            return "TRUE", []
        if isinstance(ref, Checkpoint):
            ref = ref.id
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise UsageError(f"history: not a run or checkpoint reference: {ref!r}")
        s = str(ref).strip()
        if not s:
            raise UsageError("history: empty reference")
        is_ckpt = isinstance(ref, int) or s.isdigit() or "@" in s or os.path.exists(s)
        if not is_ckpt:
            n = con.execute("SELECT (SELECT count(*) FROM runs WHERE name = $1) + "
                            "(SELECT count(*) FROM events WHERE run = $1)", [s]).fetchone()[0]
            if n:
                return "run = ?", [s]
            runs = sorted({r[0] for r in con.execute(
                "SELECT name FROM runs UNION SELECT DISTINCT run FROM events WHERE run IS NOT NULL").fetchall()})
            close = difflib.get_close_matches(s, runs, n=3, cutoff=0.3)
            raise NotFoundError(f"history: no run {s!r}" + (
                f"; closest runs: {', '.join(close)}" if close else
                f"; runs: {', '.join(runs[:10])}" if runs else "; the registry is empty"))
        try:
            c = self._resolve(con, ref if isinstance(ref, int) else s)
        except NotFoundError:
            # a checkpoint removed since: its events keep its ref / id
            if s.isdigit():
                if con.execute("SELECT count(*) FROM events WHERE checkpoint_id = ?", [int(s)]).fetchone()[0]:
                    return "checkpoint_id = ?", [int(s)]
            elif con.execute("SELECT count(*) FROM events WHERE ref = ?", [s]).fetchone()[0]:
                return "checkpoint_id IN (SELECT checkpoint_id FROM events WHERE ref = $1) OR ref = $1", [s]
            raise
        return "checkpoint_id = ? OR (checkpoint_id IS NULL AND ref = ?)", [c.id, c.ref]

    def set_run_params(self, run, params: dict) -> bool | None:
        """Record a run's hyperparameters (``runs.params``; the trainer callbacks call this once
        per run with TrainingArguments / Lightning hparams and the git commit). Values that are
        not JSON (paths, dataclasses, enums) are stored as their ``str``. The same params again
        change nothing (False); new or changed ones replace them (True) with a ``params`` event
        naming the changed keys. Creates the run when it does not exist yet. Spools when the
        database is busy (returns None)."""
        run = _check_name("run", run)
        if not isinstance(params, dict):
            raise UsageError(f"params must be a dict, got {type(params).__name__}")
        try:
            norm = json.loads(json.dumps(_jsafe(params), sort_keys=True, default=str))
        except (TypeError, ValueError) as e:
            raise UsageError(f"params of run {run!r} cannot be stored as JSON: {e}") from None
        created = _now()
        try:
            with self._writer() as con:
                return self._tx(con, lambda: self._set_params(con, run, norm, created))
        except (_Busy, _Unreachable):
            self._spool({"op": "params", "run": run, "params": norm, "created": created.isoformat(),
                         "actor": list(_actor())})
            return None

    def _set_params(self, con, run, params: dict, created, actor=None) -> bool:
        row = con.execute("SELECT params FROM runs WHERE name = ?", [run]).fetchone()
        old = None if row is None else _jloads(row[0])
        if old == params:
            return False
        if row is None:
            con.execute("INSERT INTO runs (name, created, params) VALUES (?, ?, ?)",
                        [run, created, _jdumps(params)])
        else:
            con.execute("UPDATE runs SET params = ? WHERE name = ?", [_jdumps(params), run])
        if isinstance(old, dict):
            changed = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
            detail = {"changed": changed}
        else:
            detail = {"keys": sorted(params)}
        self._event(con, "params", run=run, detail=detail, time=created, actor=actor)
        return True

    def run_params(self, run) -> dict | None:
        """The hyperparameters recorded for ``run`` (None when none were). NotFoundError for a
        run the registry does not have."""
        with self._reader() as con:
            row = con.execute("SELECT params FROM runs WHERE name = ?", [run]).fetchone()
            if row is None:
                raise NotFoundError(f"no run {run!r}" + self._candidates(con, f"{run}@0", None))
        return _jloads(row[0])


"""``ckptreg migrate``: copy a registry to another backend (DuckDB <-> PostgreSQL, DuckDB -> DuckDB).

Written against the driver interface only (``reader`` / ``writer`` / ``tx`` / ``name`` of
:class:`~ckptreg.registry.Driver` and plain ``con.execute`` with ``?`` placeholders), so any pair
of drivers works and no registry logic is copied.

* Every row of every table (runs, checkpoints, metrics, tensors, merges, merge_inputs, aliases,
  events, the schema history) is read from the source inside one transaction (a consistent
  snapshot), then written to the target inside ONE transaction: it commits whole or not at all.
* Ids are kept (lineage, aliases and events keep pointing at the same checkpoints); every
  sequence of the target (``checkpoint_id_seq``, ``metric_seq``, ``merge_id_seq``, ``event_seq``)
  is set past the largest id of its table, so later adds never reuse one.
* Row counts per table are compared inside the transaction (before COMMIT: a mismatch rolls
  back) and again on both sides afterwards.
* A target that holds any row (beyond its schema history) is refused with
  :class:`~ckptreg.errors.OutputExistsError` (exit 9) unless ``merge=True``: then only what is
  missing is added, checkpoints keyed by their natural key (RUN@STEP for plain ones, RUN@NAME:vK
  for merged ones); a source id that is taken in the target is given a fresh one and the
  checkpoint's metrics, tensors, lineage, aliases and events follow it. A checkpoint both sides
  have (same files) keeps the target's metrics and events; a run both have keeps its row. A checkpoint (or alias)
  both sides have with DIFFERENT files (or target) is a conflict: DuplicateError (exit 4)
  listing them, nothing written. Merging the same source twice adds nothing the second time.

The JSON columns are read as text (``CAST(col AS VARCHAR)``: both engines print their JSON) and
written as text; the one array column (``tensors.shape``) is written as ``CAST(? AS BIGINT[])``.
Both lists come from the DDL in :mod:`.schema`, not from a second copy of it.
"""
from __future__ import annotations

import pathlib
import re
from datetime import timezone

from ..errors import ChangedError, DuplicateError, NotFoundError, OutputExistsError, UsageError
from .schema import MIGRATIONS, SCHEMA_VERSION

#: Tables in copy order (referenced rows before the rows that reference them; nothing enforces
#: foreign keys, the order only makes a half-read dump easier to reason about).
COPY_TABLES = ("runs", "checkpoints", "metrics", "tensors", "merges", "merge_inputs", "aliases", "events")

#: (table, id column, sequence) of every id drawn from a sequence.
SEQUENCES = (("checkpoints", "id", "checkpoint_id_seq"), ("metrics", "seq", "metric_seq"),
             ("merges", "id", "merge_id_seq"), ("events", "seq", "event_seq"))

#: Where else ids of a sequence are named (a removed checkpoint's id stays in its events, a
#: removed merge's in nothing): the sequence goes past these too, so no id is handed out twice.
_ALSO_NAMED = {
    "checkpoint_id_seq": " UNION ALL SELECT checkpoint_id FROM events UNION ALL SELECT input_id FROM merge_inputs"
                         " UNION ALL SELECT base_id FROM merges UNION ALL SELECT checkpoint_id FROM aliases",
    "merge_id_seq": " UNION ALL SELECT merge_id FROM merge_inputs",
}

#: Stable row order per table (so two dumps compare and a copy is deterministic).
_ORDER = {"schema_version": "version", "runs": "name", "checkpoints": "id", "metrics": "seq",
          "tensors": "checkpoint_id, name", "merges": "id", "merge_inputs": "merge_id, position",
          "aliases": "run, name", "events": "seq"}

#: At most this many bound parameters per INSERT (PostgreSQL's limit is 65535).
_MAX_PARAMS = 20_000


def _typed_columns(kind: str) -> dict[str, set[str]]:
    """table -> the columns declared with type ``kind`` ("JSON" or "BIGINT[]") in the DDL."""
    out: dict[str, set[str]] = {}
    pat = re.escape(kind) + (r"(?![\w\[])" if kind[-1].isalnum() else "")
    for _, steps in MIGRATIONS:
        for stmt in steps:
            m = re.match(r"\s*CREATE TABLE (\w+)\s*\((.*)\)\s*$", stmt, re.S)
            if m:
                for line in m.group(2).split("\n"):
                    c = re.match(r'\s*"?(\w+)"?\s+' + pat, line)
                    if c:
                        out.setdefault(m.group(1), set()).add(c.group(1))
                continue
            m = re.match(r'\s*ALTER TABLE (\w+) ADD COLUMN "?(\w+)"?\s+' + pat, stmt)
            if m:
                out.setdefault(m.group(1), set()).add(m.group(2))
    return out


_JSON_COLS = _typed_columns("JSON")
_ARRAY_COLS = _typed_columns("BIGINT[]")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def location(reg) -> str:
    """What to call a registry in messages: its (password-masked) URL or its file path."""
    loc = getattr(reg, "location", None)
    return str(loc if loc is not None else reg.path)


def _identity(reg) -> str:
    """Which database a registry is: its file, or the server's host:port and database name (two
    URLs with other users or options name the same database)."""
    p = reg.path
    hp, db = getattr(p, "host_port", None), getattr(p, "dbname", None)
    return f"{hp}/{db}" if hp and db else str(p)


def _open(x, force_local_locks=False):
    from .core import Registry

    if isinstance(x, Registry):
        return x
    if isinstance(x, pathlib.PurePath) or isinstance(x, str):
        return Registry(x, force_local_locks=force_local_locks)
    raise UsageError(f"migrate: expected a Registry, a path or a postgresql:// URL, got {x!r}")


def _is_duckdb(reg) -> bool:
    return getattr(reg._db, "name", "duckdb") == "duckdb"


def _select(table: str, cols: list[str]) -> str:
    js = _JSON_COLS.get(table, set())
    sel = ", ".join(f"CAST({_q(c)} AS VARCHAR)" if c in js else _q(c) for c in cols)
    return f"SELECT {sel} FROM {table} ORDER BY {_ORDER[table]}"


def _columns(con, table: str) -> list[str]:
    cur = con.execute(f"SELECT * FROM {table} LIMIT 0")
    return [d[0] for d in cur.description]


def _plain(v):
    """A value as the other engine takes it: aware datetimes as naive UTC (the registry's
    timestamps are naive UTC, ``model._now``)."""
    if hasattr(v, "tzinfo") and getattr(v, "tzinfo", None) is not None and hasattr(v, "astimezone"):
        return v.astimezone(timezone.utc).replace(tzinfo=None)
    return v


def _read_all(reg) -> dict[str, tuple[list[str], list[tuple]]]:
    """{table: (columns, rows)} of every table, read in one transaction of ``reg``."""
    out: dict[str, tuple[list[str], list[tuple]]] = {}

    def read(con):
        if not _is_duckdb(reg):  # one snapshot for every table (the first statement of the tx)
            con.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        for t in ("schema_version",) + COPY_TABLES:
            cols = _columns(con, t)
            rows = con.execute(_select(t, cols)).fetchall()
            out[t] = (cols, [tuple(_plain(v) for v in r) for r in rows])

    with reg._reader() as con:
        have = reg._db.schema_version(con)
        if have != SCHEMA_VERSION:
            raise UsageError(f"{location(reg)}: schema version {have}, expected {SCHEMA_VERSION}")
        reg._db.tx(con, lambda: read(con))
    return out


def _counts(con) -> dict[str, int]:
    return {t: int(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in COPY_TABLES}


def _insert(con, table: str, cols: list[str], rows) -> None:
    """``rows`` into ``table`` with multi-row VALUES statements (one round trip per chunk)."""
    rows = list(rows)
    if not rows:
        return
    arr = _ARRAY_COLS.get(table, set())
    one = "(" + ", ".join("CAST(? AS BIGINT[])" if c in arr else "?" for c in cols) + ")"
    head = f"INSERT INTO {table} ({', '.join(_q(c) for c in cols)}) VALUES "
    per = max(1, _MAX_PARAMS // max(1, len(cols)))
    for i in range(0, len(rows), per):
        chunk = rows[i:i + per]
        params = [v for r in chunk for v in r]
        con.execute(head + ", ".join([one] * len(chunk)), params)


def _set_sequences(reg, con) -> dict[str, int]:
    """Set each sequence of the target past the largest id of its table (never back: a
    sequence that is already further, ids of removed rows, stays where it is); the next values."""
    out = {}
    for table, col, seq in SEQUENCES:
        also = _ALSO_NAMED.get(seq, "")
        top = int(con.execute(f"SELECT coalesce(max(x), 0) FROM (SELECT {_q(col)} AS x FROM {table}{also}) u")
                  .fetchone()[0])
        nxt = int(con.execute(f"SELECT nextval('{seq}')").fetchone()[0])  # consumes one: harmless
        start = max(top + 1, nxt)
        if _is_duckdb(reg):  # DuckDB has no setval; nothing depends on the sequence (no DEFAULTs)
            con.execute(f"DROP SEQUENCE {seq}")
            con.execute(f"CREATE SEQUENCE {seq} START {start}")
        else:
            con.execute(f"SELECT setval('{seq}', {start}, false)")
        out[seq] = start
    return out


class _Plan:
    """The rows to write into the target (and what was skipped), computed from the source dump
    and, with ``merge``, the target's existing keys."""

    def __init__(self):
        self.rows: dict[str, tuple[list[str], list[tuple]]] = {}
        self.skipped: dict[str, int] = {}
        self.remapped: dict[str, int] = {}
        self.conflicts: list[str] = []


def _plan_copy(src: dict) -> _Plan:
    p = _Plan()
    for t in COPY_TABLES:
        p.rows[t] = src[t]
        p.skipped[t] = 0
    return p


def _plan_merge(src: dict, con) -> _Plan:
    """Only what the target lacks, with ids remapped where the target already uses them."""
    p = _Plan()

    def col(t, c):
        return src[t][0].index(c)

    def fetch(sql):
        return con.execute(sql).fetchall()

    # the target's keys and every id it uses anywhere (a removed checkpoint's id is still named
    # by its events: it must not be handed to another checkpoint)
    t_ck = {}
    for i, run, step, name, version, fp, path in fetch(
            "SELECT id, run, step, name, version, fingerprint, path FROM checkpoints"):
        t_ck[(run, step, None, None) if step is not None else (run, None, name, int(version or 1))] = (int(i), fp, path)
    used_ck = {r[0] for r in fetch(
        "SELECT id FROM checkpoints UNION SELECT checkpoint_id FROM events WHERE checkpoint_id IS NOT NULL "
        "UNION SELECT input_id FROM merge_inputs UNION SELECT base_id FROM merges WHERE base_id IS NOT NULL "
        "UNION SELECT checkpoint_id FROM aliases")}
    used = {"metrics": {r[0] for r in fetch("SELECT seq FROM metrics")},
            "merges": {r[0] for r in fetch("SELECT id FROM merges UNION SELECT merge_id FROM merge_inputs")},
            "events": {r[0] for r in fetch("SELECT seq FROM events")}}
    t_runs = {r[0] for r in fetch("SELECT name FROM runs")}
    t_alias = {(r[0], r[1]): int(r[2]) for r in fetch("SELECT run, name, checkpoint_id FROM aliases")}
    t_events = {tuple(_plain(v) for v in r) for r in fetch(
        'SELECT time, op, run, ref, host, "user", pid FROM events')}

    # checkpoint ids: matched (same natural key and files) -> the target's; free -> kept; taken -> fresh
    cols, rows = src["checkpoints"]
    ci = {c: cols.index(c) for c in ("id", "run", "step", "name", "version", "fingerprint", "path")}
    src_ck_ids = set()
    for t, c in (("checkpoints", "id"), ("events", "checkpoint_id"), ("merge_inputs", "input_id"),
                 ("merges", "base_id"), ("aliases", "checkpoint_id")):
        k = col(t, c)
        src_ck_ids |= {r[k] for r in src[t][1] if r[k] is not None}
    fresh = [max(list(used_ck) + list(src_ck_ids) + [0]) + 1]

    def new_id(counter):
        v = counter[0]
        counter[0] += 1
        return v

    idmap: dict[int, int] = {}
    new_ck = []
    for r in rows:
        step = r[ci["step"]]
        key = ((r[ci["run"]], step, None, None) if step is not None
               else (r[ci["run"]], None, r[ci["name"]], int(r[ci["version"]] or 1)))
        ref = f"{key[0]}@{step}" if step is not None else f"{key[0]}@{key[2]}" + (f":v{key[3]}" if key[3] > 1 else "")
        hit = t_ck.get(key)
        if hit is not None:
            if (hit[1], hit[2]) != (r[ci["fingerprint"]], r[ci["path"]]):
                p.conflicts.append(f"{ref}: target id {hit[0]} is {hit[2]} (fingerprint {hit[1]}), "
                                   f"source id {r[ci['id']]} is {r[ci['path']]} (fingerprint {r[ci['fingerprint']]})")
            idmap[r[ci["id"]]] = hit[0]
            continue
        new_ck.append(r)
    for i in sorted(src_ck_ids):
        if i in idmap:
            continue
        idmap[i] = i if i not in used_ck else new_id(fresh)
    p.remapped["checkpoints"] = sum(1 for r in new_ck if idmap[r[ci["id"]]] != r[ci["id"]])

    def remap(t, r, **cols_map):
        r = list(r)
        for c, m in cols_map.items():
            k = col(t, c)
            if r[k] is not None:
                r[k] = m[r[k]]
        return tuple(r)

    new_ids = {r[ci["id"]] for r in new_ck}
    p.rows["checkpoints"] = (cols, [remap("checkpoints", r, id=idmap) for r in new_ck])
    p.skipped["checkpoints"] = len(rows) - len(new_ck)

    # runs: those the target lacks
    rc, rr = src["runs"]
    keep = [r for r in rr if r[rc.index("name")] not in t_runs]
    p.rows["runs"], p.skipped["runs"] = (rc, keep), len(rr) - len(keep)

    def seq_map(t, c, taken, counter_start):
        k = col(t, c)
        ids = sorted({r[k] for r in src[t][1]})
        counter = [max(list(taken) + ids + [0]) + 1] if counter_start is None else counter_start
        return {i: (i if i not in taken else new_id(counter)) for i in ids}

    # metrics and tensors of the new checkpoints
    for t, idcol in (("metrics", "checkpoint_id"), ("tensors", "checkpoint_id")):
        tc, tr = src[t]
        k = tc.index(idcol)
        sel = [r for r in tr if r[k] in new_ids]
        m = {"checkpoint_id": idmap}
        if t == "metrics":
            m["seq"] = seq_map(t, "seq", used["metrics"], None)
        p.rows[t] = (tc, [remap(t, r, **m) for r in sel])
        p.skipped[t] = len(tr) - len(sel)
        if t == "metrics":
            p.remapped[t] = sum(1 for r in sel if m["seq"][r[tc.index("seq")]] != r[tc.index("seq")])

    # lineage of the new merged checkpoints
    gc_, gr = src["merges"]
    gsel = [r for r in gr if r[gc_.index("checkpoint_id")] in new_ids]
    gmap = seq_map("merges", "id", used["merges"], None)
    p.rows["merges"] = (gc_, [remap("merges", r, id=gmap, checkpoint_id=idmap, base_id=idmap) for r in gsel])
    p.skipped["merges"] = len(gr) - len(gsel)
    p.remapped["merges"] = sum(1 for r in gsel if gmap[r[gc_.index("id")]] != r[gc_.index("id")])
    gids = {r[gc_.index("id")] for r in gsel}
    ic, ir = src["merge_inputs"]
    isel = [r for r in ir if r[ic.index("merge_id")] in gids]
    p.rows["merge_inputs"] = (ic, [remap("merge_inputs", r, merge_id=gmap, input_id=idmap) for r in isel])
    p.skipped["merge_inputs"] = len(ir) - len(isel)

    # aliases the target lacks (one that points elsewhere there is a conflict)
    ac, ar = src["aliases"]
    asel = []
    for r in ar:
        key = (r[ac.index("run")], r[ac.index("name")])
        want = idmap[r[ac.index("checkpoint_id")]]
        if key in t_alias:
            if t_alias[key] != want:
                p.conflicts.append(f"alias {key[0]}@{key[1]}: target points at id {t_alias[key]}, "
                                   f"source at id {r[ac.index('checkpoint_id')]} (id {want} in the target)")
            continue
        asel.append(remap("aliases", r, checkpoint_id=idmap))
    p.rows["aliases"], p.skipped["aliases"] = (ac, asel), len(ar) - len(asel)

    # events the target lacks (same time, op, run, ref and actor = the same event)
    ec, er = src["events"]
    ek = [ec.index(c) for c in ("time", "op", "run", "ref", "host", "user", "pid")]
    # ... and not those of a checkpoint both sides have: it keeps the target's history, as it
    # keeps the target's metrics (a source "log" event would name values the target lacks)
    matched = {r[ci["id"]] for r in rows} - new_ids
    eck = ec.index("checkpoint_id")
    esel = [r for r in er if tuple(r[k] for k in ek) not in t_events and r[eck] not in matched]
    emap = seq_map("events", "seq", used["events"], None)
    p.rows["events"] = (ec, [remap("events", r, seq=emap, checkpoint_id=idmap) for r in esel])
    p.skipped["events"] = len(er) - len(esel)
    p.remapped["events"] = sum(1 for r in esel if emap[r[ec.index("seq")]] != r[ec.index("seq")])
    return p


def migrate(source, target, *, merge: bool = False, progress=None, force_local_locks: bool = False) -> dict:
    """Copy every row of registry ``source`` into registry ``target`` (each a
    :class:`~ckptreg.registry.Registry`, a ``.duckdb`` path or a ``postgresql://`` URL).

    Refuses a target that holds any row with OutputExistsError (exit 9) unless ``merge``
    (then adds only what is missing; conflicts: DuplicateError, exit 4, nothing written).
    ``progress(table, n_rows)`` is called once per table written. Returns a summary:
    ``{"source", "target", "merge", "tables": {table: {"source", "target_before", "written",
    "skipped", "target"}}, "remapped": {...}, "sequences": {seq: next value}}``."""
    src_reg = _open(source, force_local_locks)
    dst_reg = _open(target, force_local_locks)
    s_loc, d_loc = location(src_reg), location(dst_reg)
    if _is_duckdb(src_reg) and not pathlib.Path(src_reg.path).exists():
        raise NotFoundError(f"{s_loc}: no such registry to migrate from")
    if _is_duckdb(src_reg) == _is_duckdb(dst_reg) and _identity(src_reg) == _identity(dst_reg):
        raise UsageError(f"migrate: source and target are the same registry ({s_loc})")

    src = _read_all(src_reg)
    src_counts = {t: len(src[t][1]) for t in COPY_TABLES}
    summary: dict = {"source": s_loc, "target": d_loc, "merge": bool(merge)}
    # a DuckDB file this call creates is removed again when the copy fails (nothing left behind)
    new_file = pathlib.Path(dst_reg.path) if _is_duckdb(dst_reg) and not pathlib.Path(dst_reg.path).exists() else None
    try:
        before, plan, seqs = _write(dst_reg, src, src_counts, merge, progress, d_loc)
    except BaseException:
        if new_file is not None:
            for f in (new_file, new_file.with_name(new_file.name + ".wal")):
                try:
                    f.unlink()
                except FileNotFoundError:
                    pass
        raise
    return _verify(src_reg, dst_reg, src_counts, before, plan, seqs, summary, d_loc)


def _write(dst_reg, src, src_counts, merge, progress, d_loc):
    """Everything into the target in one transaction: (counts before, plan, next sequence values)."""
    with dst_reg._db.writer(ingest=False) as con:
        def do():
            before = _counts(con)
            if merge:
                plan = _plan_merge(src, con)
                if plan.conflicts:
                    raise DuplicateError(
                        f"migrate --merge into {d_loc}: {len(plan.conflicts)} conflicting entr"
                        f"{'y' if len(plan.conflicts) == 1 else 'ies'}, nothing written: "
                        + "; ".join(plan.conflicts[:10]) + (" ..." if len(plan.conflicts) > 10 else ""))
            else:
                busy = {t: n for t, n in before.items() if n}
                if busy:
                    raise OutputExistsError(
                        f"migrate: target {d_loc} is not empty ("
                        + ", ".join(f"{n} {t}" for t, n in busy.items())
                        + "): pass --merge to add only what it lacks, or choose an empty target")
                plan = _plan_copy(src)
                # the schema history too (the target's own rows are the same versions, applied now)
                vc, vr = src["schema_version"]
                con.execute("DELETE FROM schema_version")
                _insert(con, "schema_version", vc, vr)
            for t in COPY_TABLES:
                cols, rows = plan.rows[t]
                _insert(con, t, cols, rows)
                if progress is not None:
                    progress(t, len(rows))
            seqs = _set_sequences(dst_reg, con)
            after = _counts(con)
            bad = [t for t in COPY_TABLES if after[t] != before[t] + len(plan.rows[t][1])
                   or (not merge and after[t] != src_counts[t])]
            if bad:
                raise ChangedError(f"migrate into {d_loc}: row counts do not add up for "
                                   + ", ".join(f"{t} (source {src_counts[t]}, target {after[t]})" for t in bad)
                                   + "; rolled back, nothing written")
            return before, plan, seqs

        return dst_reg._db.tx(con, do)


def _verify(src_reg, dst_reg, src_counts, before, plan, seqs, summary, d_loc) -> dict:
    """Both sides counted afresh after the commit; the summary."""
    with dst_reg._db.reader() as con:
        after = _counts(con)
    with src_reg._db.reader() as con:
        src_after = _counts(con)
    tables = {}
    for t in COPY_TABLES:
        tables[t] = {"source": src_counts[t], "target_before": before[t], "written": len(plan.rows[t][1]),
                     "skipped": plan.skipped.get(t, 0), "target": after[t]}
    bad = [t for t in COPY_TABLES if after[t] != before[t] + len(plan.rows[t][1])]
    if bad:
        raise ChangedError(f"migrate into {d_loc}: after the commit the target's row counts differ from "
                           f"what was written for {', '.join(bad)} (another writer?)")
    summary["tables"] = tables
    summary["remapped"] = {k: v for k, v in plan.remapped.items() if v}
    summary["sequences"] = seqs
    changed = {t: src_after[t] - src_counts[t] for t in COPY_TABLES if src_after[t] != src_counts[t]}
    if changed:  # written during the copy: not in this snapshot (a later --merge adds them)
        summary["source_changed"] = changed
    return summary

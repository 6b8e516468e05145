"""Registry commands: add, log, scan, runs, ls, show, best, sql, verify, doctor.

Nothing heavy is imported at module level (``ckptreg add`` must stay fast): duckdb loads inside the
registry on first use, rich only when a table is printed, torch only in ``doctor``.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys

import click

from ..errors import ChangedError, DuplicateError, NotFoundError, UsageError
from . import force_local_locks, pass_db
from ._fmt import emit_json, info, kv, table

json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _registry(db):
    from ..registry import Registry

    # lock_timeout=None: $CKPTREG_LOCK_TIMEOUT, else the interactive wait (30 s);
    # UsageError (exit 2) for a value that is not a number of seconds >= 0
    return Registry(db, force_local_locks=force_local_locks())


def parse_kv_number(s: str, arg: str) -> tuple[str, float]:
    """'name=value' -> (name, float). 'nan', 'inf', '-inf' are numbers. UsageError naming ``arg``."""
    name, sep, value = s.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name:
        raise UsageError(f"{arg} {s!r}: expected NAME=NUMBER (e.g. {arg} loss=0.42)")
    try:
        return name, float(value)
    except ValueError:
        raise UsageError(f"{arg} {s!r}: {value!r} is not a number (nan and inf are accepted)") from None


def parse_kv_str(s: str, arg: str) -> tuple[str, str]:
    name, sep, value = s.partition("=")
    if not sep or not name.strip():
        raise UsageError(f"{arg} {s!r}: expected NAME=VALUE")
    return name.strip(), value


def _metrics_of(pairs, arg) -> dict[str, float]:
    out = {}
    for s in pairs:
        k, v = parse_kv_number(s, arg)
        out[k] = v
    return out


def _row(c, metric_names=()) -> dict:
    r = {"id": c.id, "ref": c.ref, "step": c.step, "merged": "merged" if c.merged else "",
         "kind": c.kind, "format": c.format, "tensors": c.n_tensors, "params": c.n_params}
    for m in metric_names:
        r[m] = c.metrics.get(m)
    return r


def _metric_columns(ckpts, limit=8) -> list[str]:
    seen: dict[str, int] = {}
    for c in ckpts:
        for k in c.metrics:
            seen[k] = seen.get(k, 0) + 1
    return sorted(seen, key=lambda k: (-seen[k], k))[:limit]


# ----------------------------------------------------------------------------- add / log

def _spool_why(done: dict) -> str:
    """Why an add spooled, for its confirmation line (Registry.last_add's "cause"/"reason")."""
    reason = done.get("reason")
    if done.get("cause") == "unreachable":   # a PostgreSQL server that is down / refuses us
        return f"server unreachable: {reason}; ingested by the next command that reaches the server"
    if done.get("cause") == "disk_full":
        return f"database disk full: {reason}; ingested by the next writer"
    return "registry busy" + (f": {reason}" if reason else "") + "; ingested by the next writer"


@click.command("add", epilog="\b\nExample:\n  ckptreg add out/checkpoint-500 --run sft --metric train_loss=0.91 --tag seed=1")
@click.argument("path", type=click.Path())
@click.option("--run", "run", required=True, help="Run name.")
@click.option("--step", type=int, default=None, help="Training step (default: inferred from the path).")
@click.option("--metric", "metrics", multiple=True, metavar="NAME=VALUE", help="A metric (repeatable).")
@click.option("--tag", "tags", multiple=True, metavar="NAME=VALUE", help="A tag (repeatable).")
@click.option("--replace", is_flag=True, help="Replace an existing RUN@STEP.")
@click.option("--allow-pickle", is_flag=True, help="Allow torch pickles (.bin/.pt/.ckpt).")
@click.option("--full-hash", is_flag=True,
              help="Also record a hash of every byte (what `verify --full` compares with).")
@json_opt
@pass_db
def add_cmd(db, path, run, step, metrics, tags, replace, allow_pickle, full_hash, as_json=False):
    """Register the checkpoint at PATH (PEFT adapter, HF folder, .safetensors). Prints its id
    (--json: what was stored) and confirms on stderr what it did."""
    m = _metrics_of(metrics, "--metric")
    t = dict(parse_kv_str(s, "--tag") for s in tags)
    reg = _registry(db)
    # a full database filesystem is an error here (exit 13); only a busy database spools
    cid = reg.add(path, run, step=step, metrics=m, tags=t, replace=replace, allow_pickle=allow_pickle,
                  full_hash=full_hash, spool_on_full=False)
    if cid is None:
        if step is None:
            from ..formats import infer_step

            step = infer_step(path)
        done = getattr(reg, "last_add", None) or {}
        info(f"spooled: {path} as {run}@{step} ({_spool_why(done)}, see {reg.spool_dir})")
        if as_json:
            emit_json({"id": None, "ref": f"{run}@{step}", "status": "spooled", "path": str(path),
                       "metrics": m, "tags": t, "spool": str(reg.spool_dir), "cause": done.get("cause"),
                       "reason": done.get("reason")})
        return
    done = getattr(reg, "last_add", None) or {}
    if as_json or done.get("status") not in ("unchanged", "replaced"):
        c = reg.get(cid)
        what = (f"{c.format} {c.kind}, {c.n_tensors} tensors, {c.nbytes} bytes"
                + (f"; metrics {', '.join(f'{k}={v:g}' for k, v in m.items())}" if m else "")
                + (f"; tags {', '.join(f'{k}={v}' for k, v in t.items())}" if t else ""))
        if done.get("status") not in ("unchanged", "replaced"):
            info(f"added {c.ref} (id {cid}): {what}")
        if as_json:
            emit_json({"id": cid, "ref": c.ref, "status": done.get("status") or "added", "path": c.path,
                       "format": c.format, "kind": c.kind, "n_tensors": c.n_tensors, "nbytes": c.nbytes,
                       "fingerprint": c.fingerprint, "metrics": m, "tags": c.tags})
    if done.get("status") == "unchanged":
        info(f"{done['ref']} is already registered with the same files (id {cid}): nothing changed")
    elif done.get("status") == "replaced":
        prev = done.get("previous") or {}
        info(f"replaced {done['ref']} (id {cid}): the files differ from the registered ones "
             f"(fingerprint {str(prev.get('fingerprint', ''))[:16]} -> {str(done.get('fingerprint', ''))[:16]})")
    if not as_json:
        click.echo(cid)


@click.command("log", epilog="\b\nExample:\n  ckptreg log sft@500 gsm8k=0.412 gsmplus=0.377")
@click.argument("ckpt")
@click.argument("values", nargs=-1, required=True, metavar="NAME=VALUE...")
@json_opt
@pass_db
def log_cmd(db, ckpt, values, as_json=False):
    """Add metric values to checkpoint CKPT (id, RUN@STEP, RUN@NAME or an alias); confirms on
    stderr what was stored (--json: on stdout)."""
    m = _metrics_of(values, "metric")
    reg = _registry(db)
    cid = reg.log(ckpt, m)
    shown = ", ".join(f"{k}={v:g}" for k, v in m.items())
    if cid is None:
        done = getattr(reg, "last_log", None) or {}
        if done.get("cause") == "unreachable":
            info(f"spooled: server unreachable ({done.get('reason')}); {shown} for {ckpt} is ingested by the "
                 f"next command that reaches the server (see {reg.spool_dir})")
        else:
            info(f"spooled: database busy; {shown} for {ckpt} is ingested by the next writer (see {reg.spool_dir})")
        if as_json:
            emit_json({"id": None, "ref": ckpt, "status": "spooled", "metrics": m, "spool": str(reg.spool_dir),
                       "cause": done.get("cause"), "reason": done.get("reason")})
        return
    c = reg.get(cid)
    info(f"logged {shown} to {c.ref} (id {cid})")
    if as_json:
        emit_json({"id": cid, "ref": c.ref, "status": "logged", "metrics": m})


# ----------------------------------------------------------------------------- scan

_CKPT_DIR = re.compile(r"^checkpoint-(\d+)$")


def _trainer_state(folder: str, ckpt_dirs: list[tuple[int, str]]) -> dict | None:
    from ..integrations.hf_state import read_trainer_state

    return read_trainer_state(folder, ckpt_dirs)


@click.command("scan", epilog="\b\nExample:\n  ckptreg scan out/ --run sft")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--run", "run", required=True, help="Run name to register the checkpoints under.")
@click.option("--allow-pickle", is_flag=True, help="Allow torch pickles.")
@json_opt
@pass_db
def scan_cmd(db, folder, run, allow_pickle, as_json):
    """Import an HF Trainer output folder: every checkpoint-N with its step, the train loss logged
    since the previous save (with the step it was logged at) and the eval metrics of step N (from
    the newest trainer_state.json). Or a Lightning checkpoints/ folder (needs --allow-pickle):
    every epoch=E-step=S.ckpt with the step from its name and the monitored value its
    ModelCheckpoint state holds (step unknown)."""
    dirs = []
    for name in os.listdir(folder):
        m = _CKPT_DIR.match(name)
        p = os.path.join(folder, name)
        if m and os.path.isdir(p):
            dirs.append((int(m.group(1)), p))
    dirs.sort()
    if not dirs:
        from ..integrations.lightning_state import find_ckpts

        ckpts = find_ckpts(folder)
        if not ckpts:
            raise NotFoundError(f"{folder}: no checkpoint-N folders and no Lightning "
                                f"epoch=E-step=S.ckpt files (here or in {folder}/checkpoints)")
        return _scan_lightning(db, folder, run, ckpts, allow_pickle, as_json)
    from ..integrations.hf_state import metrics_for_save, previous_save, saves_every

    state = _trainer_state(folder, dirs)
    history = (state or {}).get("log_history") or []
    every = saves_every(state, [s for s, _ in dirs])
    reg = _registry(db)
    added, skipped = [], []
    with reg.batch():
        have = {c.step for c in reg.checkpoints(run, merged=False)}
        for step, path in dirs:
            if step in have:
                skipped.append({"step": step, "path": path, "status": "already registered"})
                continue
            metrics, msteps = metrics_for_save(history, step, previous_save(step, [s for s, _ in dirs], every))
            try:
                cid = reg.add(path, run, step=step, metrics=metrics, allow_pickle=allow_pickle,
                              metric_steps=msteps)
            except DuplicateError:
                skipped.append({"step": step, "path": path, "status": "already registered"})
                continue
            row = {"id": cid, "ref": f"{run}@{step}", "step": step}
            row.update(metrics)
            if as_json:
                row["metric_steps"] = msteps
            added.append(row)
    if as_json:
        emit_json({"added": added, "skipped": skipped, "trainer_state": state is not None})
        return
    cols = ["id", "ref", "step"] + sorted({k for r in added for k in r} - {"id", "ref", "step"},
                                          key=lambda k: (k != "train_loss", k))
    if added:
        table(added, cols, title=f"added {len(added)} checkpoint(s) to run {run}")
    else:
        info("nothing added")
    if not state:
        info(f"note: no trainer_state.json under {folder}: no metrics recorded")
    for s in skipped:
        info(f"skipped {run}@{s['step']} ({s['path']}): {s['status']}")


def _scan_lightning(db, folder, run, ckpts, allow_pickle, as_json):
    from ..errors import FormatError
    from ..integrations.lightning_state import ckpt_metrics

    if not allow_pickle:
        raise FormatError(f"{folder}: Lightning .ckpt files are torch pickles; pass --allow-pickle to "
                          "import them (only the state_dict is read, without running code from the file)")
    reg = _registry(db)
    added, skipped = [], []
    with reg.batch():
        have = {c.step for c in reg.checkpoints(run, merged=False)}
        for step, path in ckpts:
            if step in have:
                skipped.append({"step": step, "path": path, "status": "already registered"})
                continue
            metrics, msteps = ckpt_metrics(path)
            try:
                cid = reg.add(path, run, step=step, metrics=metrics, allow_pickle=True, metric_steps=msteps)
            except DuplicateError as e:
                skipped.append({"step": step, "path": path, "status": str(e)})
                continue
            have.add(step)
            row = {"id": cid, "ref": f"{run}@{step}", "step": step, **metrics}
            if as_json:
                row["metric_steps"] = msteps
            added.append(row)
    if as_json:
        emit_json({"added": added, "skipped": skipped, "trainer_state": False, "lightning": True})
        return
    cols = ["id", "ref", "step"] + sorted({k for r in added for k in r} - {"id", "ref", "step"})
    if added:
        table(added, cols, title=f"added {len(added)} checkpoint(s) to run {run}")
    else:
        info("nothing added")
    for s in skipped:
        info(f"skipped {run}@{s['step']} ({s['path']}): {s['status']}")


# ----------------------------------------------------------------------------- listings

@click.command("runs", epilog="\b\nExample:\n  ckptreg runs")
@json_opt
@pass_db
def runs_cmd(db, as_json):
    """List runs with their checkpoint counts, step range and the final checkpoint's metrics."""
    rows = _registry(db).runs()
    if as_json:
        emit_json(rows)
        return
    names = sorted({k for r in rows for k in r["metrics"]})[:6]
    out = []
    for r in rows:
        d = {"run": r["run"], "checkpoints": r["n"], "merged": r["n_merged"],
             "first_step": r["first_step"], "last_step": r["last_step"]}
        for k in names:
            d[k] = r["metrics"].get(k)
        out.append(d)
    table(out, ["run", "checkpoints", "merged", "first_step", "last_step"] + names)


@click.command("ls", epilog="\b\nExample:\n  ckptreg ls --run sft --sort train_loss --last 10")
@click.option("--run", "run", default=None, help="Only this run.")
@click.option("--sort", "sort", default=None, metavar="METRIC", help="Sort by a metric (ascending).")
@click.option("--max", "maximize", is_flag=True, help="With --sort: descending.")
@click.option("--last", "last", type=click.IntRange(min=1), default=None, help="Only the last K by step.")
@click.option("--merged/--plain", "merged", default=None, help="Only merged / only plain checkpoints.")
@click.option("--tag", "tag_filter", multiple=True, metavar="NAME=VALUE",
              help="Only checkpoints with this tag value (repeatable: all must hold).")
@json_opt
@pass_db
def ls_cmd(db, run, sort, maximize, last, merged, as_json, tag_filter=()):
    """List checkpoints (merged ones are marked, with their version). An unknown --run or --sort
    metric is an error naming the closest names (exit 3)."""
    reg = _registry(db)
    want = dict(parse_kv_str(x, "--tag") for x in tag_filter)
    ckpts = reg.ls(run=run, sort=sort, last=last, merged=merged, maximize=maximize, tags=want or None)
    st = reg.status(ckpts)  # ok | missing: a stat per registered file, no hashing
    if as_json:
        emit_json([dict(c.to_dict(), status=st[c.id]) for c in ckpts])
        return
    names = _metric_columns(ckpts)
    if sort and sort not in names:
        names = [sort] + names
    cols = ["id", "ref", "step", "merged", "kind", "format", "tensors", "params", "status"] + names
    rows = [dict(_row(c, names), status=st[c.id]) for c in ckpts]
    if any(c.merged for c in ckpts):
        cols.insert(cols.index("merged") + 1, "version")
        for r, c in zip(rows, ckpts):
            r["version"] = c.version if c.merged else None
    if want:
        cols.append("tags")
        for r, c in zip(rows, ckpts):
            r["tags"] = c.tags
    table(rows, cols)


def _inventory_summary(inv: dict) -> dict:
    dtypes: dict[str, int] = {}
    files = set()
    for t in inv.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
        files.add(t.file)
    return {"tensors": len(inv), "dtypes": dtypes, "files": sorted(files)}


@click.command("show", epilog="\b\nExample:\n  ckptreg show sft@500")
@click.argument("ckpt")
@json_opt
@pass_db
def show_cmd(db, ckpt, as_json):
    """Everything about one checkpoint: fields, metrics, inventory summary and lineage."""
    reg = _registry(db)
    c = reg.get(ckpt)
    inv = reg.inventory(c.id)
    lin = reg.lineage(c.id)
    d = c.to_dict()
    d["status"] = reg.status([c])[c.id]
    d["inventory"] = _inventory_summary(inv)
    d["lineage"] = lin
    d["aliases"] = [a["ref"] for a in reg.aliases(ckpt=c.id)]
    if as_json:
        emit_json(d)
        return
    fields = {k: d[k] for k in ("id", "ref", "run", "step", "name", "merged", "status", "path", "format", "kind",
                                "base_model", "n_tensors", "n_params", "nbytes", "fingerprint", "created")}
    if c.merged:
        fields["version"] = c.version
    fields["tags"] = c.tags or ""
    if d.get("aliases"):
        fields["aliases"] = ", ".join(d["aliases"])
    if c.lora:
        fields["lora"] = ", ".join(f"{k}={v}" for k, v in c.lora.items())
    kv(fields)
    click.echo("\nmetrics:")
    if c.metrics:
        # a value logged at another step than the checkpoint's says which (metric_steps)
        kv({f"  {k}": v if c.metric_steps.get(k) in (None, c.step) else f"{v} (logged at step {c.metric_steps[k]})"
            for k, v in c.metrics.items()})
    else:
        click.echo("  (none)")
    s = d["inventory"]
    click.echo(f"\ninventory: {s['tensors']} tensors, dtypes "
               + ", ".join(f"{k}×{v}" for k, v in sorted(s["dtypes"].items()))
               + f", {len(s['files'])} file(s)")
    for f in s["files"]:
        click.echo(f"  {f}")
    if lin is not None:
        click.echo(f"\nlineage: method {lin['method']}"
                   + (f", base {lin['base_ref']} (id {lin['base']})" if lin["base"] is not None else ""))
        if lin["params"]:
            click.echo("  params: " + json.dumps(lin["params"], sort_keys=True))
        table([{"position": i["position"], "id": i["id"], "weight": i["weight"],
                "ref": (f"{i['ref']} (removed)" if i.get("removed") else i["ref"]) or "(deleted)"}
               for i in lin["inputs"]], ["position", "id", "ref", "weight"], title="inputs")


@click.command("best", epilog="\b\nExample:\n  ckptreg best --run sft --metric gsm8k --max")
@click.option("--run", "run", required=True, help="Run name.")
@click.option("--metric", "metric", required=True, help="Metric to rank by (lowest wins; --max: highest).")
@click.option("--max", "maximize", is_flag=True, help="Higher is better.")
@json_opt
@pass_db
def best_cmd(db, run, metric, maximize, as_json):
    """The checkpoint of RUN with the best value of METRIC (lowest; --max: highest). NaN never wins."""
    c = _registry(db).best(run, metric, maximize=maximize)
    if as_json:
        emit_json(c.to_dict())
        return
    table([_row(c, [metric])], ["id", "ref", "step", "merged", metric])


# ignore_unknown_options: a query may start with a "-- comment" (click would take it for an option)
@click.command("sql", epilog="\b\nExample:\n  ckptreg sql \"SELECT run, count(*) AS n FROM checkpoints GROUP BY run\"",
               context_settings={"ignore_unknown_options": True})
@click.argument("query", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", "timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, metavar="SECONDS", help="Interrupt the query after this long.")
@json_opt
@pass_db
def sql_cmd(db, query, timeout, as_json):
    """Run one SQL statement against the registry, read-only: the file is opened read-only with
    file access, extensions and configuration changes disabled, so anything but a read of the
    registry's tables is refused (exit 16)."""
    cols, rows = _registry(db).sql(" ".join(query), timeout=timeout)
    dicts = [dict(zip(cols, r)) for r in rows]
    if as_json:
        emit_json(dicts)
        return
    table(dicts, cols)


@click.command("verify", epilog="\b\nExample:\n  ckptreg verify sft@500 --full")
@click.argument("ckpt", required=False)
@click.option("--full", is_flag=True,
              help="Hash every byte of the tensor files and compare with the hash recorded at "
                   "`add --full-hash` or by the first full verify (which records it).")
@json_opt
@pass_db
def verify_cmd(db, ckpt, full, as_json):
    """Check that registered files still exist and are unchanged (exit non-zero if not); also
    lists stale temporaries of dead ckptreg processes in their folders (status stale-temporary)."""
    res = _registry(db).verify(ckpt, full=full)
    if as_json:
        emit_json(res)
    else:
        table([dict(r, ref=r["ref"] or r["path"], id="" if r["id"] is None else r["id"]) for r in res],
              ["id", "ref", "status", "detail"])
    ck = [r for r in res if r["status"] != "stale-temporary"]
    bad = [r for r in ck if r["status"] != "ok"]
    if bad:
        raise ChangedError(f"{len(bad)} of {len(ck)} checkpoint(s) missing or changed: "
                           + ", ".join(f"{r['ref']} ({r['status']})" for r in bad[:10])
                           + (" ..." if len(bad) > 10 else ""))


@click.command("doctor", epilog="\b\nExample:\n  ckptreg doctor --json")
@json_opt
@pass_db
def doctor_cmd(db, as_json):
    """Database path, schema version, versions, compute backends, spool state."""
    import platform

    from .. import __version__

    from ..errors import CkptregError

    reg = _registry(db)
    d: dict = {"db": str(reg.path), "exists": reg.path.exists()}
    problem = None  # the database is unusable: reported, then the exit status says so
    try:
        d["schema_version"] = None
        if reg.path.exists():
            d.update(reg.check())
    except CkptregError as e:  # doctor reports everything else first, then fails
        d["schema_version"] = f"error: {e}"
        d["usable"] = False
        problem = e
    except Exception as e:  # an error DuckDB raised that has no typed equivalent: still unusable
        from ..errors import FormatError

        d["schema_version"] = f"error: {e}"
        d["usable"] = False
        problem = FormatError(f"{reg.path}: not a usable ckptreg registry: {e}")
    d["ckptreg"] = __version__
    try:
        import duckdb

        d["duckdb"] = duckdb.__version__
    except Exception as e:  # pragma: no cover
        d["duckdb"] = f"not importable: {e}"
    d["python"] = platform.python_version()
    try:
        import torch

        d["torch"] = torch.__version__
    except Exception as e:
        d["torch"] = f"not importable: {type(e).__name__}"
    try:
        from .. import ops

        av = ops.available()
        d["backends"] = ", ".join(k for k, v in av.items() if v) or "none"
        st = ops.extension_status()
        d["extension"] = "loaded" if st["loaded"] else f"not loaded: {st['reason']}"
        d["extension_built_with_torch"] = st["built_with_torch"]
        try:
            d["backend"] = ops.backend()
        except CkptregError as e:  # a forced backend that is not there: say so, do not hide the rest
            d["backend"] = f"error: {e}"
            problem = problem or e
    except ImportError as e:
        d["backends"] = f"ckptreg.ops not importable: {type(e).__name__}: {e}"
    sp = reg.spool_status()
    d["spool_pending"] = len(sp["pending"])
    d["spool_rejected"] = len(sp["rejected"])
    if as_json:
        d["spool_rejected_entries"] = sp["rejected"]
        emit_json(d)
    else:
        kv(d)
        for r in sp["rejected"]:
            click.echo(f"  rejected {r['file']}: {r['reason']}")
    if problem is not None:
        raise problem


COMMANDS = [add_cmd, log_cmd, scan_cmd, runs_cmd, ls_cmd, show_cmd, best_cmd, sql_cmd, verify_cmd, doctor_cmd]


# ----------------------------------------------------------------------------- history

def _event_summary(e: dict) -> str:
    d = e.get("detail") or {}
    if not isinstance(d, dict):
        return json.dumps(d, default=str)
    op = e.get("op")
    if op in ("add", "replace"):
        s = f"{d.get('path', '')} fp {str(d.get('fingerprint', ''))[:12]}"
        if d.get("metrics"):
            s += " " + ",".join(f"{k}={v}" for k, v in d["metrics"].items())
        prev = d.get("previous") or {}
        if prev:
            s += f" (was fp {str(prev.get('fingerprint', ''))[:12]}"
            s += f" at {prev['path']})" if prev.get("path") and prev.get("path") != d.get("path") else ")"
        return s
    if op == "log":
        return ",".join(f"{k}={v}" for k, v in (d.get("metrics") or {}).items()) + (
            f" (step {d['step']})" if d.get("step") is not None else "")
    if op == "params":
        if "changed" in d:
            return "changed: " + ", ".join(d["changed"])
        return f"{len(d.get('keys') or [])} params recorded"
    return json.dumps(d, sort_keys=True, default=str, separators=(",", ":"))


@click.command("history", epilog="\b\nExample:\n  ckptreg history sft@500 --limit 20")
@click.argument("ref", required=False)
@click.option("--limit", "limit", type=click.IntRange(min=1), default=None, help="Only the newest N events.")
@json_opt
@pass_db
def history_cmd(db, ref, limit, as_json):
    """The registry's audit trail, oldest first: every add, log, replace, rm, alias, tag, gc ...
    with its time, user, host and pid. REF: a run name or a checkpoint (id, RUN@STEP, RUN@NAME;
    a removed checkpoint is still found by its ref); none: everything."""
    rows = _registry(db).history(ref, limit=limit)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        info("no events" + (f" for {ref}" if ref else ""))
        return
    out = [{"seq": e["seq"], "time": e["time"].isoformat(sep=" ", timespec="seconds")
            if hasattr(e["time"], "isoformat") else e["time"], "op": e["op"],
            "ref": e["ref"] or e["run"] or "", "user": e["user"], "host": e["host"], "pid": e["pid"],
            "detail": _event_summary(e)} for e in rows]
    table(out, ["seq", "time", "op", "ref", "user", "host", "pid", "detail"])


COMMANDS.append(history_cmd)


# ----------------------------------------------------------------------------- rm / gc

def _nbytes(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _report_files(ref, res) -> list[dict]:
    """Print what happened to a checkpoint's files; returns the deletion errors."""
    if res is None:
        return []
    for k in res["kept"]:
        info(f"{ref}: kept {k['path']} ({k['reason']})")
    if res["left"]:
        info(f"{ref}: folder kept: {len(res['left'])} file(s) ckptreg did not register are still in it"
             f" (e.g. {res['left'][0]})")
    for e in res["errors"]:
        info(f"{ref}: could not delete {e['path']}: {e['error']}")
    return res["errors"]


def _raise_delete_errors(errors) -> None:
    if errors:
        from ..errors import AccessError

        raise AccessError(f"{len(errors)} registered file(s) could not be deleted (they are no longer "
                          f"registered): " + ", ".join(f"{e['path']} ({e['error']})" for e in errors[:5]))


@click.command("rm", epilog="\b\nExample:\n  ckptreg rm sft@100 sft@200")
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@click.option("--delete-files", is_flag=True,
              help="Also delete the files ckptreg registered for each checkpoint (only inside its "
                   "folder; the folder too once it is empty). Default: files stay.")
@click.option("--force", is_flag=True,
              help="Remove checkpoints that are inputs or bases of registered merges (their lineage "
                   "keeps the ref, fingerprint and weight).")
@json_opt
@pass_db
def rm_cmd(db, refs, delete_files, force, as_json):
    """Unregister checkpoints REF... (ids, RUN@STEP, RUN@NAME), in one transaction."""
    res = _registry(db).rm(list(refs), delete_files=delete_files, force=force)
    errors = []
    if as_json:
        emit_json(res)
        errors = [e for r in res for e in ((r["files"] or {}).get("errors") or [])]
    else:
        for r in res:
            what = f"removed {r['ref']} (id {r['id']})"
            if r["files"] is not None:
                what += f", deleted {len(r['files']['deleted'])} file(s)"
                if r["files"]["folder_removed"]:
                    what += " and its folder"
            else:
                what += "; files kept at " + r["path"]
            if r["used_by"]:
                what += f"; lineage of {', '.join(r['used_by'])} keeps it"
            if r["aliases"]:
                what += f"; aliases removed: {', '.join(r['aliases'])}"
            info(what)
            errors += _report_files(r["ref"], r["files"])
    _raise_delete_errors(errors)


@click.command("gc", epilog="\b\nExample:\n  ckptreg gc --run sft --keep-best 3 --metric train_loss --keep-last 2\n  ckptreg gc --run sft --keep-best 3 --metric train_loss --keep-last 2 --yes")
@click.option("--run", "run", required=True, help="The run whose plain checkpoints to prune.")
@click.option("--keep-best", "keep_best", type=int, default=None, metavar="K",
              help="Keep the K best by --metric.")
@click.option("--metric", "metric", default=None, help="Metric for --keep-best.")
@click.option("--direction", type=click.Choice(["min", "max"]), default=None,
              help="For --keep-best (default: from the metric's name; loss-like -> min).")
@click.option("--keep-last", "keep_last", type=int, default=None, metavar="N",
              help="Keep the N highest steps.")
@click.option("--keep-every", "keep_every", type=int, default=None, metavar="M",
              help="Keep steps that are multiples of M.")
@click.option("--merged", is_flag=True,
              help="Prune the run's merged outputs instead of its plain checkpoints (--keep-last: "
                   "the N most recently registered; merges that feed other merges, aliased ones "
                   "and ones tagged keep always stay).")
@click.option("--yes", is_flag=True, help="Really unregister and delete (default: a dry run).")
@json_opt
@pass_db
def gc_cmd(db, run, keep_best, metric, direction, keep_last, keep_every, merged, yes, as_json):
    """Retention: keep the union of the policies plus, always, the final checkpoint, aliased ones,
    ones tagged `keep` and every input/base of a registered merge; the rest goes. Without --yes a
    dry run listing what would go and the bytes freed; with --yes they are unregistered and the
    files ckptreg registered for them deleted (only inside each checkpoint's folder)."""
    res = _registry(db).gc(run, keep_best=keep_best, metric=metric, direction=direction,
                           keep_last=keep_last, keep_every=keep_every, yes=yes, merged=merged)
    errors = [e for f in (res.get("files") or {}).values() for e in f["errors"]]
    if as_json:
        emit_json(res)
        _raise_delete_errors(errors)
        return
    order = "created" if merged else "step"
    rows = [{"id": d["id"], "ref": d["ref"], order: d[order], "action": "delete" if yes else "would delete",
             "bytes": _nbytes(d["bytes"]), "why": ""} for d in res["delete"]]
    rows += [{"id": k["id"], "ref": k["ref"], order: k[order], "action": "keep", "bytes": "",
              "why": "; ".join(k["reasons"])} for k in res["keep"]]
    rows.sort(key=lambda r: (r[order], r["id"]))
    if merged:
        for r in rows:
            r["created"] = str(r["created"])[:19]
    table(rows, ["id", "ref", order, "action", "bytes", "why"],
          title=f"gc {run}" + (" merged outputs" if merged else "")
          + ("" if yes else " (dry run: nothing changed; --yes to apply)"))
    n = len(res["delete"])
    if yes:
        for d in res["delete"]:
            errors_ = _report_files(d["ref"], res["files"].get(d["id"]))
            del errors_
        info(f"removed {n} checkpoint(s), kept {len(res['keep'])}; {_nbytes(res['bytes_freed'])} of "
             f"registered files")
    else:
        info(f"would remove {n} checkpoint(s), keep {len(res['keep'])}, free {_nbytes(res['bytes_freed'])}")
    _raise_delete_errors(errors)


COMMANDS += [rm_cmd, gc_cmd]


# ----------------------------------------------------------------------------- alias / tag / export

@click.command("alias", epilog="\b\nExample:\n  ckptreg alias sft@500 best")
@click.argument("ckpt")
@click.argument("name")
@click.option("--delete", "delete", is_flag=True, help="Remove the alias RUN@NAME (CKPT names its run).")
@json_opt
@pass_db
def alias_cmd(db, ckpt, name, delete, as_json):
    """Make RUN@NAME point at CKPT (RUN: CKPT's run); an existing alias is moved in one
    transaction. Works wherever a ref does (merge inputs, --base, show, log). Built-ins need no
    alias: RUN@final, RUN@latest, RUN@best:METRIC[:max|min]."""
    r = _registry(db).alias(ckpt, name, delete=delete)
    if as_json:
        emit_json(r)
        return
    if r["status"] == "deleted":
        info(f"deleted alias {r['ref']} (pointed at id {r['previous']})")
    elif r["status"] == "unchanged":
        info(f"{r['ref']} already points at {r['target']} (id {r['id']})")
    elif r["status"] == "moved":
        info(f"moved {r['ref']} to {r['target']} (id {r['id']}; was id {r['previous']})")
    else:
        info(f"{r['ref']} -> {r['target']} (id {r['id']})")


@click.command("aliases", epilog="\b\nExample:\n  ckptreg aliases --run sft")
@click.option("--run", "run", default=None, help="Only this run.")
@json_opt
@pass_db
def aliases_cmd(db, run, as_json):
    """List user aliases and the checkpoints they point at."""
    rows = _registry(db).aliases(run)
    if as_json:
        emit_json(rows)
        return
    table([dict(r, target=r["target"] or "(removed)") for r in rows], ["ref", "id", "target", "created"])


@click.command("tag", epilog="\b\nExample:\n  ckptreg tag sft@500 stage=eval --remove draft")
@click.argument("ckpt")
@click.argument("pairs", nargs=-1, metavar="NAME=VALUE...")
@click.option("--remove", "remove", multiple=True, metavar="NAME", help="Remove this tag (repeatable).")
@json_opt
@pass_db
def tag_cmd(db, ckpt, pairs, remove, as_json):
    """Set (NAME=VALUE) and remove (--remove NAME) tags of CKPT; prints its tags afterwards."""
    t = dict(parse_kv_str(s, "tag") for s in pairs)
    reg = _registry(db)
    c = reg.get(ckpt)
    tags = reg.tag(c.id, t, remove=remove)
    if as_json:
        emit_json({"id": c.id, "ref": c.ref, "tags": tags})
        return
    info(f"tags of {c.ref} (id {c.id}): " + (", ".join(f"{k}={v}" for k, v in sorted(tags.items())) or "(none)"))


@click.command("export", epilog="\b\nExample:\n  ckptreg export -o registry.parquet")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv", "json"]), default=None,
              help="File format (default: from the suffix of FILE).")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="File to write.")
@click.option("--overwrite", is_flag=True, help="Replace FILE if it exists.")
@json_opt
@pass_db
def export_cmd(db, fmt, out, overwrite, as_json):
    """Write every checkpoint with its metrics (metrics.NAME columns) and lineage (method,
    params, base, inputs) to FILE, atomically (a temporary renamed into place)."""
    r = _registry(db).export(out, fmt, overwrite=overwrite)
    if as_json:
        emit_json(r)
        return
    info(f"wrote {r['rows']} checkpoint(s), {len(r['columns'])} columns, to {r['path']} ({r['format']}, "
         f"{r['bytes']} bytes)")


COMMANDS += [alias_cmd, aliases_cmd, tag_cmd, export_cmd]


# ----------------------------------------------------------------------------- migrate

@click.command("migrate", epilog="\b\nExample:\n  ckptreg migrate --to postgresql://me@db:5432/ckptreg\n  ckptreg migrate --to team.duckdb --merge")
@click.option("--to", "to", required=True, metavar="URL|PATH",
              help="Target registry: a postgresql:// URL or a .duckdb path (an empty one, unless --merge).")
@click.option("--merge", is_flag=True,
              help="Add only what the target lacks (checkpoints by RUN@STEP / RUN@NAME; clashing ids renumbered).")
@json_opt
@pass_db
def migrate_cmd(db, to, merge, as_json):
    """Copy this registry (the global --db, e.g. ckptreg --db postgresql://... migrate --to
    copy.duckdb) into another one, DuckDB <-> PostgreSQL: every run, checkpoint,
    metric, tensor, alias, event and lineage edge, ids kept, in one transaction on the target,
    row counts verified on both sides. A non-empty target is refused (exit 9) unless --merge;
    a conflicting checkpoint or alias under --merge is refused (exit 4), nothing written."""
    from ..registry.migrate import migrate

    def progress(t, n):
        info(f"migrate: {t}: {n} row(s) written")

    r = migrate(_registry(db), _registry(to), merge=merge, progress=progress)
    if as_json:
        emit_json(r)
        return
    table([{"table": t, **v} for t, v in r["tables"].items()],
          ["table", "source", "target_before", "written", "skipped", "target"])
    tot = sum(v["written"] for v in r["tables"].values())
    info(f"migrated {tot} row(s) from {r['source']} to {r['target']}"
         + (" (merge)" if merge else "") + "; row counts verified on both sides")


COMMANDS.append(migrate_cmd)

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
from . import pass_db
from ._fmt import emit_json, info, kv, table

json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _registry(db):
    from ..registry import Registry

    t = os.environ.get("CKPTREG_LOCK_TIMEOUT")
    try:
        timeout = 30.0 if not t else float(t)
    except ValueError:
        raise UsageError(f"CKPTREG_LOCK_TIMEOUT={t!r} is not a number of seconds") from None
    return Registry(db, lock_timeout=timeout)


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

@click.command("add")
@click.argument("path", type=click.Path())
@click.option("--run", "run", required=True, help="Run name.")
@click.option("--step", type=int, default=None, help="Training step (default: inferred from the path).")
@click.option("--metric", "metrics", multiple=True, metavar="NAME=VALUE", help="A metric (repeatable).")
@click.option("--tag", "tags", multiple=True, metavar="NAME=VALUE", help="A tag (repeatable).")
@click.option("--replace", is_flag=True, help="Replace an existing RUN@STEP.")
@click.option("--allow-pickle", is_flag=True, help="Allow torch pickles (.bin/.pt/.ckpt).")
@click.option("--full-hash", is_flag=True,
              help="Also record a hash of every byte (what `verify --full` compares with).")
@pass_db
def add_cmd(db, path, run, step, metrics, tags, replace, allow_pickle, full_hash):
    """Register the checkpoint at PATH (PEFT adapter, HF folder, .safetensors). Prints its id."""
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
        info(f"spooled: {path} as {run}@{step} "
             f"(registry busy; ingested by the next writer, see {reg.spool_dir})")
        return
    click.echo(cid)


@click.command("log")
@click.argument("ckpt")
@click.argument("values", nargs=-1, required=True, metavar="NAME=VALUE...")
@pass_db
def log_cmd(db, ckpt, values):
    """Add metric values to checkpoint CKPT (id, RUN@STEP or RUN@NAME)."""
    m = _metrics_of(values, "metric")
    reg = _registry(db)
    reg.log(ckpt, m)


# ----------------------------------------------------------------------------- scan

_CKPT_DIR = re.compile(r"^checkpoint-(\d+)$")
_SKIP_KEYS = ("runtime", "per_second", "_flos")


def _trainer_state(folder: str, ckpt_dirs: list[tuple[int, str]]) -> dict | None:
    cands = [os.path.join(folder, "trainer_state.json")] + [os.path.join(d, "trainer_state.json")
                                                            for _, d in ckpt_dirs]
    best, best_key = None, None
    for p in cands:
        if not os.path.isfile(p):
            continue
        try:
            with open(p) as f:
                st = json.load(f)
        except (OSError, ValueError):
            continue
        key = (st.get("global_step") or 0, len(st.get("log_history") or []), os.path.getmtime(p))
        if best_key is None or key > best_key:
            best, best_key = st, key
    return best


def _metrics_at(history: list[dict], step: int) -> dict[str, float]:
    out: dict[str, float] = {}
    train = None
    for e in history:
        s = e.get("step")
        if not isinstance(s, int) or s > step:
            continue
        if "loss" in e and isinstance(e["loss"], (int, float)):
            if train is None or s >= train[0]:
                train = (s, float(e["loss"]))
        if s == step:
            for k, v in e.items():
                if k.startswith("eval_") and isinstance(v, (int, float)) and not isinstance(v, bool) \
                        and not any(x in k for x in _SKIP_KEYS):
                    out[k] = float(v)
    if train is not None:
        out["train_loss"] = train[1]
    return out


@click.command("scan")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--run", "run", required=True, help="Run name to register the checkpoints under.")
@click.option("--allow-pickle", is_flag=True, help="Allow torch pickles.")
@json_opt
@pass_db
def scan_cmd(db, folder, run, allow_pickle, as_json):
    """Import an HF Trainer output folder: every checkpoint-N with its step, the train loss logged
    at or just before N and the eval metrics of step N (from the newest trainer_state.json)."""
    dirs = []
    for name in os.listdir(folder):
        m = _CKPT_DIR.match(name)
        p = os.path.join(folder, name)
        if m and os.path.isdir(p):
            dirs.append((int(m.group(1)), p))
    dirs.sort()
    if not dirs:
        raise NotFoundError(f"{folder}: no checkpoint-N folders")
    state = _trainer_state(folder, dirs)
    history = (state or {}).get("log_history") or []
    reg = _registry(db)
    added, skipped = [], []
    with reg.batch():
        have = {c.step for c in reg.checkpoints(run, merged=False)}
        for step, path in dirs:
            if step in have:
                skipped.append({"step": step, "path": path, "status": "already registered"})
                continue
            metrics = _metrics_at(history, step)
            try:
                cid = reg.add(path, run, step=step, metrics=metrics, allow_pickle=allow_pickle)
            except DuplicateError:
                skipped.append({"step": step, "path": path, "status": "already registered"})
                continue
            row = {"id": cid, "ref": f"{run}@{step}", "step": step}
            row.update(metrics)
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


# ----------------------------------------------------------------------------- listings

@click.command("runs")
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


@click.command("ls")
@click.option("--run", "run", default=None, help="Only this run.")
@click.option("--sort", "sort", default=None, metavar="METRIC", help="Sort by a metric (ascending).")
@click.option("--max", "maximize", is_flag=True, help="With --sort: descending.")
@click.option("--last", "last", type=click.IntRange(min=1), default=None, help="Only the last K by step.")
@click.option("--merged/--plain", "merged", default=None, help="Only merged / only plain checkpoints.")
@json_opt
@pass_db
def ls_cmd(db, run, sort, maximize, last, merged, as_json):
    """List checkpoints (merged ones are marked)."""
    ckpts = _registry(db).ls(run=run, sort=sort, last=last, merged=merged, maximize=maximize)
    if as_json:
        emit_json([c.to_dict() for c in ckpts])
        return
    names = _metric_columns(ckpts)
    if sort and sort not in names:
        names = [sort] + names
    cols = ["id", "ref", "step", "merged", "kind", "format", "tensors", "params"] + names
    table([_row(c, names) for c in ckpts], cols)


def _inventory_summary(inv: dict) -> dict:
    dtypes: dict[str, int] = {}
    files = set()
    for t in inv.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
        files.add(t.file)
    return {"tensors": len(inv), "dtypes": dtypes, "files": sorted(files)}


@click.command("show")
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
    d["inventory"] = _inventory_summary(inv)
    d["lineage"] = lin
    if as_json:
        emit_json(d)
        return
    fields = {k: d[k] for k in ("id", "ref", "run", "step", "name", "merged", "path", "format", "kind",
                                "base_model", "n_tensors", "n_params", "nbytes", "fingerprint", "created")}
    fields["tags"] = c.tags or ""
    if c.lora:
        fields["lora"] = ", ".join(f"{k}={v}" for k, v in c.lora.items())
    kv(fields)
    click.echo("\nmetrics:")
    if c.metrics:
        kv({f"  {k}": v for k, v in c.metrics.items()})
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
        table([{"position": i["position"], "id": i["id"], "ref": i["ref"] or "(deleted)", "weight": i["weight"]}
               for i in lin["inputs"]], ["position", "id", "ref", "weight"], title="inputs")


@click.command("best")
@click.option("--run", "run", required=True)
@click.option("--metric", "metric", required=True)
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


@click.command("sql")
@click.argument("query")
@click.option("--timeout", "timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, metavar="SECONDS", help="Interrupt the query after this long.")
@json_opt
@pass_db
def sql_cmd(db, query, timeout, as_json):
    """Run one SQL statement against the registry, read-only: the file is opened read-only with
    file access, extensions and configuration changes disabled, so anything but a read of the
    registry's tables is refused (exit 16)."""
    cols, rows = _registry(db).sql(query, timeout=timeout)
    dicts = [dict(zip(cols, r)) for r in rows]
    if as_json:
        emit_json(dicts)
        return
    table(dicts, cols)


@click.command("verify")
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


@click.command("doctor")
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

"""CLI: weights, merge, sweep, leaderboard. Torch is imported only inside command bodies (via the
engine), so ``ckptreg --help`` and the registry commands stay fast."""
from __future__ import annotations

import itertools
import math
import re

import click

from ..errors import CkptregError, ParameterError, SelectionError, UsageError, WeightError
from . import _fmt, pass_db



def _table():
    """The method table (ckptreg.merge.table: no torch)."""
    from ..merge import table

    return table


def _registry(db):
    from ..registry import Registry
    from . import force_local_locks

    return Registry(db, force_local_locks=force_local_locks())


def _method(value: str) -> str:
    T = _table()
    try:
        return T.canonical_method(value)
    except ParameterError:
        raise UsageError(f"unknown --method {value!r}; choose from {', '.join(T.METHODS)} "
                         "(dashes or underscores; `ckptreg methods` lists them)") from None


def _size(text):
    """'2GB', '500MiB', '1e9', '123456' -> bytes."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?i?[bB]?)?\s*", str(text))
    if not m:
        raise UsageError(f"--out-shard-size {text!r} is not a size (e.g. 2GB, 500MiB, 1000000)")
    num = float(m.group(1))
    unit = (m.group(2) or "").lower().rstrip("b")
    mult = {"": 1, "k": 1000, "m": 1000 ** 2, "g": 1000 ** 3, "t": 1000 ** 4,
            "ki": 1024, "mi": 1024 ** 2, "gi": 1024 ** 3, "ti": 1024 ** 4}.get(unit)
    if mult is None or num <= 0:
        raise UsageError(f"--out-shard-size {text!r} is not a positive size")
    return int(num * mult)


def _split(text, conv, what):
    """A comma list option -> values (the library's parser, ``api._as_list``: UsageError naming
    the option and the bad item, or an empty list)."""
    from ..api import _as_list

    return _as_list(str(text), conv, what)


def _check_weight_params(penalty, power, density):
    """The library's check (``ckptreg.api.check_weight_params``): one copy of the rule."""
    from ..api import check_weight_params

    check_weight_params(penalty, power, density)


class _Progress:
    """Merge progress on stderr, driven by the engine's ``progress(done_bytes, total_bytes, name)``
    calls: a rich bar when stderr is a terminal; otherwise (a batch log, a pipe) one plain line
    every ``CKPTREG_PROGRESS_INTERVAL`` seconds (default 5) with percent, bytes and rate, and a
    last line when the merge ends. ``quiet`` prints neither."""

    DEFAULT_INTERVAL = 5.0

    def __init__(self, quiet: bool, label: str):
        self.quiet = quiet
        self.label = label
        self.p = None
        self.task = None
        self.lines = False
        self.interval = self.DEFAULT_INTERVAL
        self._last = None       # (done, total) of the newest call
        self._printed = None    # (done, total) of the newest line written
        self._t0 = self._t_line = 0.0
        self._done0 = 0

    @staticmethod
    def _interval():
        import os

        raw = os.environ.get("CKPTREG_PROGRESS_INTERVAL")
        if raw is None or not raw.strip():
            return _Progress.DEFAULT_INTERVAL
        try:
            v = float(raw)
        except ValueError:
            v = float("nan")
        if not math.isfinite(v) or v < 0:
            raise UsageError(f"CKPTREG_PROGRESS_INTERVAL={raw!r} is not a number of seconds >= 0")
        return v

    def __enter__(self):
        import sys
        import time

        if self.quiet:
            return self
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                              TransferSpeedColumn(), TimeRemainingColumn(),
                              console=Console(stderr=True), transient=True)
            self.p.__enter__()
            self.task = self.p.add_task(self.label, total=None)
        else:
            self.interval = self._interval()
            self.lines = True
            self._t0 = self._t_line = time.monotonic()
        return self

    def __call__(self, done, total, name):
        if self.p is not None:
            self.p.update(self.task, completed=done, total=total)
        elif self.lines:
            import time

            now = time.monotonic()
            if self._last is not None and done < self._last[0]:   # a sweep starts its next pass
                self._t0, self._done0 = now, 0
            self._last = (done, total)
            if now - self._t_line >= self.interval:
                self._line(now)

    def _line(self, now):
        import sys

        done, total = self._last
        rate = (done - self._done0) / max(now - self._t0, 1e-9)
        parts = [f"{self.label}:"]
        if total:
            pct = 100.0 if done >= total else min(99.9, math.floor(1000.0 * done / total) / 10.0)
            parts.append(f"{pct:5.1f}%")
            parts.append(f"{_human(done)}/{_human(total)}")
        else:
            parts.append(_human(done))
        parts.append(f"{_human(rate)}/s")
        if total and rate > 0 and done < total:
            parts.append(f"eta {(total - done) / rate:.0f}s")
        else:
            parts.append(f"{now - self._t0:.1f}s")
        sys.stderr.write(" ".join(parts) + "\n")
        sys.stderr.flush()
        self._printed = self._last
        self._t_line = now

    def __exit__(self, *exc):
        if self.p is not None:
            self.p.__exit__(*exc)
        elif self.lines and exc[0] is None and self._last is not None and self._printed != self._last:
            import time

            self._line(time.monotonic())   # the last state, so a log shows the merge finished
        return False


def _human(n) -> str:
    """Bytes (or bytes per second) in decimal units: 950 B, 12.3 kB, 4.56 MB, 1.20 GB."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            if unit == "B":
                return f"{n:.0f} B"
            return f"{n:.2f} {unit}" if abs(n) < 10 else f"{n:.1f} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"  # pragma: no cover


_SKIP_MISSING_HELP = ("Selections (--last) leave out checkpoints whose files are missing "
                      "(default: a merge over missing inputs is refused, naming them all).")


# ----------------------------------------------------------------------------------------- weights

@click.command("weights", epilog="\b\nExample:\n  ckptreg weights --run sft --last 5 --metric train_loss --penalty 0.7 --plot weights.png")
@click.option("--run", required=True, help="Run name.")
@click.option("--last", "last", type=int, required=True, help="Number of checkpoints K.")
@click.option("--every", type=int, default=1, show_default=True, help="Take every M-th checkpoint going back.")
@click.option("--exclude-final", is_flag=True, help="Leave out the final checkpoint (the paper's k_last).")
@click.option("--metric", default=None, help="Metric driving the weights (train_loss, step, ...).")
@click.option("--penalty", type=float, default=None, help="MWA penalty factor p > 0.")
@click.option("--power", type=float, default=None, help="MWA power factor q >= 1 (default 2).")
@click.option("--scheme", type=click.Choice(["uniform", "metric", "mwa"]), default=None,
              help="Weighting (default: mwa with --penalty, metric with --metric only, else uniform).")
@click.option("--direction", type=click.Choice(["min", "max"]), default=None,
              help="Better values: min (loss-like) or max (steps, accuracy). Default from the name.")
@click.option("--plot", "plot", type=click.Path(dir_okay=False), default=None, help="Write a PNG of the weights.")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@pass_db
def weights_cmd(db, run, last, every, exclude_final, metric, penalty, power, scheme, direction, plot, as_json):
    """Show the merge weights of the last K checkpoints of a run."""
    from .. import weights as W

    _check_weight_params(penalty, power, None)
    reg = _registry(db)
    scheme = scheme or ("mwa" if penalty is not None else ("metric" if metric else "uniform"))
    ckpts = reg.select(run, last, every, exclude_final=exclude_final)
    w = W.for_checkpoints(ckpts, scheme, metric=metric, penalty=penalty, power=power, direction=direction)
    vals = None
    pos = [None] * len(ckpts)
    if metric:
        vals = [c.step if metric.lower() in W.STEP_METRICS else c.metrics.get(metric) for c in ckpts]
        if all(v is not None for v in vals):
            pos = W.positions(vals, [c.step for c in ckpts], direction or W.default_direction(metric))
    rows = [{"checkpoint": c.ref, "id": c.id, "step": c.step, "metric": None if vals is None else vals[i],
             "position": pos[i], "weight": w[i]} for i, c in enumerate(ckpts)]
    if plot:
        from ..plots import plot_weights

        plot_weights(ckpts, metric or "step", w, plot, run_ckpts=reg.checkpoints(run, merged=False), run=run,
                     method=scheme, penalty=penalty, power=power,
                     window={"last": last, "every": every, "exclude_final": exclude_final})
        if not as_json:
            _fmt.info(f"wrote {plot}")
    _fmt.table(rows, ["checkpoint", "id", "step", "metric", "position", "weight"], as_json=as_json,
               title=None if as_json else f"{scheme} weights, {metric or 'uniform'}")
    _note_metric_lags(ckpts, metric)


def _note_metric_lags(ckpts, metric, seen: set | None = None) -> None:
    """One note on stderr per checkpoint weighted by a value of ``metric`` logged before its step
    (weights, merge and sweep). ``seen`` collects (id, metric) pairs already noted."""
    from ..weights import STEP_METRICS

    if not metric or str(metric).lower() in STEP_METRICS:
        return
    for c in ckpts:   # a score logged before the checkpoint weighs it (stderr)
        lag = c.metric_lag(metric) if hasattr(c, "metric_lag") else None
        if lag and lag > 0:
            if seen is not None:
                if (c.id, metric) in seen:
                    continue
                seen.add((c.id, metric))
            _fmt.info(f"note: {metric} of {c.ref} was logged at step {c.metric_steps[metric]}, "
                      f"{lag} step(s) before the checkpoint: its weight uses that older value")


def _weighting_metric(spec):
    """The metric a spec's weights were computed from (metric / MWA weighting), else None."""
    sel = spec.selection or {}
    if str(sel.get("scheme") or "").lower() in ("metric", "basic", "mwa"):
        return sel.get("metric")
    return None


def _say_up_to_date(c) -> None:
    _fmt.info(f"up to date: {c.ref} (id {c.id}) at {c.path}")


# ----------------------------------------------------------------------------------------- merge

def _param_help(pd, methods) -> str:
    d = "" if pd.default is None or pd.flag_value is not None else f" Default {pd.default}."
    req = " Required." if pd.required else ""
    return f"{pd.help}{d}{req} Methods: {', '.join(methods)}."


def _method_param_options(sweep: bool):
    """One option per method parameter of the method table (``ckptreg.merge.table``), with its
    help text; in a sweep the sweepable ones take comma lists (one merge per value)."""
    T = _table()
    opts = []
    for pd, methods in T.all_params():
        helptext = _param_help(pd, methods)
        if pd.flag_value is not None:
            opts.append(click.option(pd.flag, pd.name, flag_value=pd.flag_value, default=None, help=helptext))
        elif pd.type == "pair":   # --lines ALPHA,BETA (checked by the table)
            opts.append(click.option(pd.flag, pd.name, default=None, metavar="ALPHA,BETA",
                                     help=helptext + (" Pairs separated by ';' sweep it (e.g. '0.5,1.0;0.3,0.6')."
                                                      if sweep else "")))
        elif sweep and pd.sweepable:
            opts.append(click.option(pd.flag, pd.name, default=None,
                                     help=helptext + " A comma list sweeps it (e.g. 0.3,0.5)."))
        elif pd.type == "choice":
            opts.append(click.option(pd.flag, pd.name, type=click.Choice(list(pd.choices)), default=None, help=helptext))
        else:
            opts.append(click.option(pd.flag, pd.name, type=int if pd.type == "int" else float, default=None,
                                     help=helptext))
        for alias, value in pd.flag_aliases:   # e.g. --exact-svd = --svd exact
            opts.append(click.option(alias, pd.name, flag_value=value, default=None,
                                     help=f"Same as {pd.flag} {value}."))
    return opts


def _method_param_names():
    return [pd.name for pd, _ in _table().all_params()]


def _common_merge_options(f):
    opts = [
        click.option("--method", default="linear", show_default=True,
                     help="Merge method: " + "|".join(_table().METHODS) + " (`ckptreg methods` lists their parameters)."),
        click.option("--weights", "scheme", type=click.Choice(["uniform", "metric", "mwa"]), default=None,
                     help="Weighting scheme for any method."),
        click.option("--metric", default=None, help="Metric for metric/MWA weights ('step' for step weighting)."),
        click.option("--direction", type=click.Choice(["min", "max"]), default=None,
                     help="Default: min for loss-like metrics, max for step/accuracy."),
        click.option("--penalty", type=float, default=None, help="MWA penalty factor p > 0."),
        click.option("--power", type=float, default=None, help="MWA power factor q >= 1 (default 2)."),
    ] + _method_param_options(sweep=False) + [
        click.option("--base", default=None, help="Base: first, last, a checkpoint (id or RUN@STEP), or pretrained "
                     "(LoRA with --space delta|core: the updates themselves are the task vectors; the default "
                     "there)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _space_options(f):
    """--space and --rank, the same for merge and sweep."""
    opts = [
        click.option("--space", type=click.Choice(["factors", "delta", "core"]), default="factors", show_default=True,
                     help="LoRA: merge the stored factors; delta: in update space (linear, CART, SVD-family and "
                          "Gram methods exact, element-wise ones one dense layer at a time then truncated to "
                          "--rank); core: on the Σr×Σr core matrices (element-wise methods are the core-space "
                          "variant, named core_...). `ckptreg methods` lists each method's spaces."),
        click.option("--rank", type=int, default=None, help="Output LoRA rank with --space delta|core (default: the "
                     "inputs' max rank; CART, SVD-family and core-space element-wise methods: exact, up to Σr)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _params(mp: dict) -> dict:
    """The method parameters given on the command line (by the table's names)."""
    return {k: mp[k] for k in _method_param_names() if mp.get(k) is not None}


_RECIPE_OVERRIDES = {"recipe", "replay", "out", "name", "overwrite", "quiet", "as_json", "out_shard_size"}
_REPLAY_OPTIONS = {"recipe", "replay", "out", "quiet", "as_json"}


def _merge_from_recipe(db, recipe, replay, out, name, overwrite, quiet, as_json, out_shard_size):
    """``merge --recipe FILE`` / ``merge --replay REF``: the recipe gives inputs, method and
    parameters, so the options that give them too are refused rather than silently ignored."""
    from .. import engine
    from ..merge import recipe as R

    ctx = click.get_current_context()
    allowed = _REPLAY_OPTIONS if replay is not None else _RECIPE_OVERRIDES
    given = [p for p in ctx.command.params if p.name not in allowed and p.name not in ("db",)
             and ctx.get_parameter_source(p.name) not in (None, click.core.ParameterSource.DEFAULT)]
    if recipe is not None and replay is not None:
        raise UsageError("give --recipe FILE or --replay REF, not both")
    if given:
        opts = ", ".join(p.opts[0] if p.opts else p.name for p in given)
        what = "--replay REF re-runs the stored recipe; it takes only -o, --quiet and --json" if replay is not None \
            else "--recipe FILE gives inputs, method and parameters; only -o, --name, --overwrite, " \
                 "--out-shard-size, --quiet and --json override it"
        raise UsageError(f"{what}: drop {opts}")
    reg = _registry(db)
    if replay is not None:
        with _Progress(quiet or as_json, f"replaying {replay}") as prog:
            orig, c = R.replay(reg, replay, out=out, progress=prog)
        if as_json:
            _fmt.emit_json({"replayed": orig.ref, "original": {"id": orig.id, "path": orig.path},
                            "id": c.id, "ref": c.ref, "path": c.path, "identical": True})
        else:
            click.echo(f"replayed {orig.ref}: identical")
            if not quiet:
                _fmt.info(f"wrote {c.path} (registered as id {c.id}, the next version of {orig.run}@{orig.name})")
        return
    rcp = R.load_recipe(recipe)
    spec = R.build_spec(reg, rcp, out=out, name=name)
    shard = _size(out_shard_size if out_shard_size is not None else rcp.out_shard_size)
    with _Progress(quiet or as_json, f"merging {spec.name}") as prog:
        res = engine.merge_result(reg, spec, space=rcp.space, rank=rcp.rank, out_dtype=rcp.out_dtype,
                                  overwrite=overwrite, progress=prog, out_shard_size=shard)
    c, status = res.checkpoint, res.status
    if status == engine.UP_TO_DATE:
        _say_up_to_date(c)
    _note_metric_lags(spec.inputs, _weighting_metric(spec))
    if as_json:
        _fmt.emit_json({"id": c.id, "name": c.name, "ref": c.ref, "path": c.path, "status": status,
                        "method": spec.method, "inputs": [x.ref for x in spec.inputs], "weights": spec.weights,
                        "base": spec.base.ref if spec.base is not None else None, "recipe": str(recipe)})
    else:
        click.echo(f"{c.id}\t{c.name}")
        if not quiet and status != engine.UP_TO_DATE:
            _fmt.info(f"wrote {c.path}")


_NPROC_HELP = ("Run the merge distributed over P local ranks (torch.distributed's launcher, gloo on localhost): "
               "each rank merges and writes its share of the tensors, rank 0 registers. Several nodes: "
               "torchrun --nnodes N --nproc-per-node P --rdzv-endpoint HOST:PORT -m ckptreg -- merge ... "
               "(the -- keeps torchrun from reading ckptreg's options).")


class _RanksCommand(click.Command):
    """``merge``/``sweep``: ``--nproc-per-node P`` starts P local ranks through torch.distributed's
    launcher API (``elastic_launch``: c10d rendezvous on a free localhost port), each running this
    same command line under torchrun's environment (ckptreg.merge.distributed); a rank other than
    0 of a distributed run prints nothing but its errors."""

    def parse_args(self, ctx, args):
        ctx.meta["ckptreg.argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        import contextlib
        import io
        import os

        from ..merge import distributed as D

        n = ctx.params.pop("nproc_per_node", None)
        if n is not None and n > 1:
            if D.env_requested():
                raise UsageError("--nproc-per-node starts the ranks itself; under torchrun leave it out")
            return _launch_ranks(ctx, n)
        if not D.env_requested():
            return super().invoke(ctx)
        ok = False
        try:
            if os.environ.get("RANK") != "0":
                ctx.params["quiet"] = True
                with contextlib.redirect_stdout(io.StringIO()):
                    got = super().invoke(ctx)
            else:
                got = super().invoke(ctx)
            ok = True
            return got
        finally:
            D.shutdown(ok)


def _launch_ranks(ctx, n: int):
    import os
    import socket
    import sys

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    argv, skip = [], False
    for a in ctx.meta.get("ckptreg.argv", []):
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            argv.append(a)
    root = ctx.find_root().obj or {}
    cmd = ["-m", "ckptreg"] + (["--db", str(root["db"])] if root.get("db") else []) \
        + (["--force-local-locks"] if root.get("force_local_locks") else []) + [ctx.info_name] + argv
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"ckptreg-{os.getpid()}-{port}",
                       rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(cfg, sys.executable)(*cmd)
    except ChildFailedError as e:   # each rank printed its own error
        codes = [f.exitcode for f in e.failures.values() if f.exitcode and f.exitcode > 0]
        ctx.exit(min(codes) if codes else 1)


def _ranks_option(f):
    return click.option("--nproc-per-node", "nproc_per_node", type=click.IntRange(min=1), default=None,
                        metavar="P", help=_NPROC_HELP)(f)


@click.command("merge", cls=_RanksCommand, epilog="\b\nExample:\n  ckptreg merge --run sft --last 5 --method mwa --metric train_loss --penalty 0.7 -o merged/sft-mwa\n  ckptreg merge sft@400 sft@500 --method slerp --t 0.5\n  ckptreg merge --recipe recipe.yaml\n  ckptreg merge --replay sft@last_5_loss_pf-0_7 -o merged/sft-mwa-replay")
@click.argument("checkpoints", nargs=-1)
@click.option("--run", default=None, help="Run to select from.")
@click.option("--last", "last", type=int, default=None, help="Merge the last K checkpoints.")
@click.option("--every", type=int, default=None, help="Every M-th checkpoint going back.")
@click.option("--exclude-final", is_flag=True, help="Leave out the final checkpoint (the paper's k_last).")
@click.option("--skip-missing", is_flag=True, help=_SKIP_MISSING_HELP)
@_common_merge_options
@_space_options
@click.option("--out-dtype", type=click.Choice(["float32", "float16", "bfloat16", "float64"]), default=None,
              help="Dtype of the merged float tensors (default: each tensor's stored dtype).")
@click.option("--out-shard-size", default=None, help="Shard the output (e.g. 2GB).")
@click.option("-o", "--out", "out", type=click.Path(), default=None, help="Output path (default: beside the inputs).")
@click.option("--name", default=None, help="Registered name (default: the paper's naming).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output and registry entry.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr (bar or log lines), no 'wrote' line.")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.option("--recipe", "recipe", type=click.Path(dir_okay=False), default=None,
              help="Merge as a recipe file says (YAML or JSON: inputs, method, base, parameters with per-tensor "
                   "filters and per-layer gradients, output, name); -o, --name, --overwrite, --out-shard-size "
                   "override it.")
@click.option("--replay", "replay", default=None, metavar="REF",
              help="Re-run the registered merge REF from its stored recipe (into -o, default NAME-replay beside "
                   "it), check its tensors equal the original's byte for byte, register it as the next version.")
@_ranks_option
@pass_db
def merge_cmd(db, checkpoints, run, last, every, exclude_final, skip_missing, method, scheme, metric, direction, penalty, power,
              base, space, rank, out_dtype, out_shard_size, out, name, overwrite, quiet, as_json, recipe=None,
              replay=None, **method_params):
    """Merge checkpoints (last K of a run, or the ones given) and register the result."""
    from .. import engine

    if recipe is not None or replay is not None:
        return _merge_from_recipe(db, recipe, replay, out, name, overwrite, quiet, as_json, out_shard_size)
    from .. import api

    m = _method(method)
    params = _params(method_params)
    _check_weight_params(penalty, power, params.get("density"))   # before the usage check, as always
    if every is not None and last is None:   # also with explicit checkpoints (the library ignores it there)
        raise UsageError("--every needs --last")
    reg = _registry(db)
    spec = api.plan_merge(reg, list(checkpoints), run=run, last=last, every=every, exclude_final=exclude_final,
                          skip_missing=skip_missing, method=m, scheme=scheme, metric=metric, direction=direction,
                          penalty=penalty, power=power, base=base, params=params, space=space, rank=rank,
                          out_dtype=out_dtype, out=out, name=name)
    with _Progress(quiet or as_json, f"merging {spec.name}") as prog:
        res = engine.merge_result(reg, spec, space=space, rank=rank, out_dtype=out_dtype, overwrite=overwrite,
                                  progress=prog, out_shard_size=_size(out_shard_size))
    c, status = res.checkpoint, res.status
    if status == engine.UP_TO_DATE:
        _say_up_to_date(c)
    _note_metric_lags(spec.inputs, _weighting_metric(spec))
    data = {"id": c.id, "name": c.name, "ref": c.ref, "path": c.path, "status": status, "method": spec.method,
            "inputs": [x.ref for x in spec.inputs], "weights": spec.weights,
            "base": spec.base.ref if spec.base is not None else None}
    if as_json:
        _fmt.emit_json(data)
    else:
        click.echo(f"{c.id}\t{c.name}")
        if not quiet and status != engine.UP_TO_DATE:
            _fmt.info(f"wrote {c.path}")


# ----------------------------------------------------------------------------------------- sweep

def _sweep_param_options(f):
    for o in reversed(_method_param_options(sweep=True)):
        f = o(f)
    return f


def _param_grid(mp: dict):
    """The method parameters of a sweep: [(params, {name: value of the swept ones})], one entry per
    combination of the comma lists given to sweepable parameters (the method table's)."""
    T = _table()
    fixed, swept = {}, []
    for pd, _ in T.all_params():
        v = mp.get(pd.name)
        if v is None:
            continue
        if pd.type == "pair" and isinstance(v, str):   # --lines A,B or A,B;C,D (one merge per pair)
            vals = [tuple(pd.convert(x)) for x in v.split(";") if x.strip()]
            if len(vals) == 1:
                fixed[pd.name] = vals[0]
            else:
                swept.append((pd.name, vals))
        elif pd.sweepable and isinstance(v, str):
            vals = _split(v, float if pd.type == "float" else int, pd.flag)
            if pd.name == "density":
                for x in vals:
                    _check_weight_params(None, None, x)
            if len(vals) == 1:
                fixed[pd.name] = vals[0]
            else:
                swept.append((pd.name, vals))
        else:
            fixed[pd.name] = v
    out = []
    for combo in itertools.product(*[vals for _, vals in swept]):
        point = dict(zip([n for n, _ in swept], combo))
        out.append(({**fixed, **point}, point))
    return out


def _grid_plan(plan_for, methods, grid, out_dir):
    """A sweep over comma lists of method parameters: one plan per point (each method only over
    the parameters it takes), the points' specs joined, duplicates dropped; a swept value the
    default name does not show (density) is appended to the name (``_density0_3``)."""
    import dataclasses

    from .. import engine
    from ..merge.spec import _default_name
    from ..merge.table import _pf, get_method

    specs, skipped, dropped, first = [], [], [], None
    for meth in methods:
        defn = get_method(meth)
        own = {n for n in grid[0][1] if defn.param(n) is not None}
        seen = set()
        for params, point in grid:
            key = tuple(sorted((n, v) for n, v in point.items() if n in own))
            if key in seen:
                continue
            seen.add(key)
            params = {k: v for k, v in params.items() if k not in point or k in own}
            try:
                plan = plan_for([meth], params)
            except SelectionError as e:
                skipped.append(str(e))
                continue
            first = first or plan
            skipped += [m for m in plan.skipped if m not in skipped]
            dropped += plan.dropped
            for s in plan.specs:
                extra = "".join(f"_{n}{_pf(v)}" for n, v in key
                                if defn.param(n).name_part(v) is None)
                if extra and s.naming is not None:
                    naming = {**s.naming, "extra": (s.naming.get("extra") or "") + extra}
                    s = dataclasses.replace(s, naming=naming, name=_default_name(naming), out=None)
                    s = dataclasses.replace(s, out=str(engine.default_out(s, parent=out_dir)))
                specs.append(s)
    if not specs:
        raise SelectionError("no merge in the sweep can be made: " + "; ".join(skipped))
    uniq, dup = engine.dedupe_specs(specs)
    return dataclasses.replace(first, specs=uniq, skipped=skipped,
                               dropped=dropped + [specs[i].name for i in sorted(dup)])


@click.command("sweep", cls=_RanksCommand, epilog="\b\nExample:\n  ckptreg sweep --run sft --last 2,3,5 --every 1,2 --method uniform,mwa --penalty 0.5,0.7 -o sweeps/sft")
@click.option("--run", required=True, help="Run to select from.")
@click.option("--last", "last", required=True, help="Comma list of K, e.g. 2,3,4,5,8,10.")
@click.option("--every", default="1", show_default=True, help="Comma list of M, e.g. 1,3.")
@click.option("--exclude-final", is_flag=True, help="Leave out the final checkpoint.")
@click.option("--skip-missing", is_flag=True, help=_SKIP_MISSING_HELP)
@click.option("--method", default="uniform,mwa", show_default=True, help="Comma list of methods.")
@click.option("--metric", default="train_loss", show_default=True, help="Comma list of metrics for MWA.")
@click.option("--penalty", default="0.7", show_default=True, help="Comma list of penalty factors.")
@click.option("--power", type=float, default=None, help="MWA power factor q >= 1 (default 2).")
@click.option("--direction", type=click.Choice(["min", "max"]), default=None,
              help="Default: min for loss-like metrics, max for step/accuracy.")
@_sweep_param_options
@click.option("--base", default=None, help="Base for task-vector methods: first, last, a checkpoint, or pretrained "
              "(LoRA with --space delta|core: the updates themselves are the task vectors; the default there).")
@_space_options
@click.option("--out-dtype", type=click.Choice(["float32", "float16", "bfloat16", "float64"]), default=None,
              help="Dtype of the merged float tensors (default: each tensor's stored dtype).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs and their registry entries.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@_ranks_option
@pass_db
def sweep_cmd(db, run, last, every, exclude_final, skip_missing, method, metric, penalty, power, direction, base,
              space, rank, out_dtype, out_dir, overwrite, quiet, as_json, **method_params):
    """Plan every combination of K × M × method × metric × penalty, drop duplicates, run the
    weighted sums in one pass over the inputs, register each result under its paper name.

    With --space delta|core (LoRA adapters) every point is its own exact factored merge, the
    same as `ckptreg merge` of it with that --space/--rank and the sweep's method parameters
    (same name and output: each is up to date with the other). Every point is checked and its
    output locked before any is computed; up-to-date points are skipped. If a point fails, nothing of it is written or registered and
    the sweep stops; the points computed before it are complete, registered outputs and stay (a
    re-run computes only the rest)."""
    from .. import api, engine

    methods = [_method(x) for x in _split(method, str, "--method")]
    reg = _registry(db)
    grid = _param_grid(method_params)

    def plan_for(ms, params):
        return api.plan_sweep(reg, run=run, last=_split(last, int, "--last"), every=_split(every, int, "--every"),
                              exclude_final=exclude_final, skip_missing=skip_missing, method=ms,
                              metric=_split(metric, str, "--metric"), penalty=_split(penalty, float, "--penalty"),
                              power=power, direction=direction, params=params, base=base, out_dtype=out_dtype,
                              out=out_dir, space=space, rank=rank)

    plan = plan_for(methods, grid[0][0]) if len(grid) == 1 else _grid_plan(plan_for, methods, grid, out_dir)
    uniq = plan.specs
    if not quiet and not as_json:
        for msg in plan.skipped:
            _fmt.info(f"skipped {msg}")
        if plan.dropped:
            _fmt.info(f"dropped {len(plan.dropped)} duplicate combination(s): " + ", ".join(sorted(set(plan.dropped))))
    with _Progress(quiet or as_json, f"sweep: {len(uniq)} merges") as prog:
        res = api.sweep_results(reg, plan, overwrite=overwrite, progress=prog)
    rows = [{"name": r.checkpoint.name, "id": r.checkpoint.id, "method": s.method, "status": r.status,
             "inputs": ",".join(str(x.step) for x in s.inputs), "weights": [round(w, 4) for w in (s.weights or [])],
             "path": r.checkpoint.path} for s, r in zip(uniq, res)]
    for r in res:
        if r.status == engine.UP_TO_DATE:
            _say_up_to_date(r.checkpoint)
    seen: set = set()
    for s in uniq:
        _note_metric_lags(s.inputs, _weighting_metric(s), seen)
    n_new = sum(1 for r in rows if r["status"] != engine.UP_TO_DATE)
    _fmt.table(rows, ["name", "inputs", "weights", "status", "id"], as_json=as_json,
               title=None if as_json else f"sweep of run {run}: {len(rows)} merges, {n_new} computed, "
                                          f"{len(rows) - n_new} up to date")


# ----------------------------------------------------------------------------------------- leaderboard

@click.command("leaderboard", epilog="\b\nExample:\n  ckptreg leaderboard --run sft --score gsm8k=0.3,gsmplus=0.7 --plot leaderboard.png")
@click.option("--run", required=True, help="Run whose merged and plain checkpoints to rank.")
@click.option("--score", required=True, help="Metric weights, e.g. gsm8k=0.3,gsmplus=0.7 (or one metric).")
@click.option("--base", default=None, help="Base model checkpoint (id or ref) for the % change column.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a PNG of the scores.")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@pass_db
def leaderboard_cmd(db, run, score, base, plot, as_json):
    """Rank merged and plain checkpoints of a run by a weighted score (Table 2 of the paper)."""
    from .. import api

    rows = api.leaderboard(_registry(db), run, score, base=base, plot=plot)
    if plot and not as_json:
        _fmt.info(f"wrote {plot}")
    if as_json:
        _fmt.emit_json(list(rows))
        return
    cols = rows.columns
    shown = []
    for r in rows:
        d = dict(r)
        for k in ("vs_last_merging", "vs_final", "vs_base"):
            d[k] = None if r.get(k) is None else f"{r[k]:+.2f}%"
        if r["score"] is None:
            d["role"] = (d["role"] + "," if d["role"] else "") + "unscored (missing " + ",".join(r["missing"]) + ")"
        shown.append(d)
    _fmt.table(shown, cols, title=f"leaderboard of run {run}", right=["vs_last_merging", "vs_final", "vs_base"])


# ----------------------------------------------------------------------------------------- methods

@click.command("methods", epilog="\b\nExample:\n  ckptreg methods\n  ckptreg methods --json")
@click.option("--json", "as_json", is_flag=True, help="JSON output: every method with its parameters (type, "
              "range, default, sweepable), weight rule, strategy and spaces.")
def methods_cmd(as_json):
    """List the merge methods of the method table: parameters and defaults, spaces, weighting."""
    T = _table()
    if as_json:
        _fmt.emit_json(T.describe())
        return

    def ptext(pd):
        d = "required" if pd.required else f"={pd.default}"
        return f"{pd.name}{d if pd.required is False else ' (required)'} {pd.range_text()}"

    rows = [{"method": m.name, "aliases": ",".join(m.aliases), "strategy": m.strategy, "weights": m.weight_rule,
             "spaces": ",".join(m.spaces), "base": ("optional" if m.base_optional else "yes") if m.uses_base else "",
             "parameters": "; ".join(ptext(pd) for pd in m.params)} for m in T.METHODS.values()]
    _fmt.table(rows, ["method", "aliases", "strategy", "weights", "spaces", "base", "parameters"],
               title="merge methods")


COMMANDS = [weights_cmd, merge_cmd, sweep_cmd, leaderboard_cmd, methods_cmd]
_ = CkptregError

"""The Python API: what the ``merge``, ``sweep`` and ``leaderboard`` commands do, as library calls.

``ckptreg.merge(...)``, ``ckptreg.sweep(...)``, ``ckptreg.plan_sweep(...)`` and
``ckptreg.leaderboard(...)`` take a database path (or an open :class:`ckptreg.Registry`; None:
``$CKPTREG_DB`` or ./ckptreg.duckdb, lock wait ``$CKPTREG_LOCK_TIMEOUT``) and the arguments the
CLI takes, and return :class:`ckptreg.Checkpoint` objects or a :class:`Leaderboard`. The CLI
parses, calls these (or the engine functions they are built on) and formats. Errors are the typed
exceptions of :mod:`ckptreg.errors`; nothing here prints.

Inputs are either ``refs`` (ids, ``RUN@STEP``, ``RUN@NAME``, aliases, Checkpoint objects) or a
selection: ``run`` + ``last`` [+ ``every``, ``exclude_final``, ``skip_missing``].

This module imports neither torch nor DuckDB at import time (``import ckptreg`` stays light).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, Union

from .errors import ParameterError, SelectionError, UsageError, WeightError

if TYPE_CHECKING:  # pragma: no cover
    from .engine import MergeResult, MergeSpec
    from .registry import Checkpoint, Registry

__all__ = ["merge", "merge_spec_run", "sweep", "sweep_results", "plan_sweep", "expand_sweep", "plan_merge", "leaderboard", "select_inputs", "SweepPlan",
           "Leaderboard", "check_weight_params"]

#: a database: a path (str / PathLike), an open Registry, or None (``$CKPTREG_DB`` or ./ckptreg.duckdb)
DB = Union[str, "os.PathLike[str]", "Registry", None]
#: a checkpoint reference: id, "RUN@STEP", "RUN@NAME", an alias, or a Checkpoint
Ref = Union[int, str, "Checkpoint"]


def _registry(db: DB) -> "Registry":
    from .registry import Registry

    if isinstance(db, Registry):
        return db
    return Registry(db)


def check_weight_params(penalty: float | None = None, power: float | None = None,
                        density: float | None = None) -> None:
    """Refuse an MWA penalty <= 0, a power < 1 or a density outside (0, 1] before any work
    (WeightError / ParameterError naming the value)."""
    if penalty is not None and (not math.isfinite(penalty) or penalty <= 0):
        raise WeightError(f"--penalty must be > 0, got {penalty}")
    if power is not None and (not math.isfinite(power) or power < 1):
        raise WeightError(f"--power must be >= 1, got {power}")
    if density is not None and not (0 < density <= 1):
        raise ParameterError(f"--density must be in (0, 1], got {density}")


def _selection(run: str, last: int, every: int | None, exclude_final: bool, skip_missing: bool) -> dict:
    sel = {"run": run, "last": last, "every": every or 1, "exclude_final": bool(exclude_final)}
    if skip_missing:
        sel["skip_missing"] = True
    return sel


def select_inputs(db: DB, refs: Sequence[Ref] | None = None, *, run: str | None = None, last: int | None = None,
                  every: int | None = None, exclude_final: bool = False,
                  skip_missing: bool = False) -> tuple[list["Checkpoint"], dict | None]:
    """The input checkpoints of a merge and the selection that chose them (None for refs).

    Either ``refs`` or ``run`` + ``last`` (UsageError for both or neither; ``every`` needs
    ``last``). A selection is ``Registry.select`` (ascending step; SelectionError when the run
    has too few checkpoints)."""
    reg = _registry(db)
    refs = list(refs or [])
    if every is not None and last is None and not refs:
        raise UsageError("--every needs --last")
    if refs and run is not None and last is not None:
        raise UsageError("give either --run/--last or explicit checkpoints, not both")
    if refs:
        out = []
        for c in refs:
            if hasattr(c, "id") and hasattr(c, "path"):
                out.append(reg.get(c.id))
            else:
                out.append(reg.get(int(c)) if str(c).isdigit() else reg.get(c))
        return out, None
    if run is None or last is None:
        raise UsageError("choose inputs: --run R --last K [--every M], or checkpoints as arguments")
    sel = _selection(run, last, every, exclude_final, skip_missing)
    return reg.select(run, last, every or 1, exclude_final=exclude_final, skip_missing=skip_missing), sel


def merge(db: DB, refs: Sequence[Ref] | None = None, *, run: str | None = None, last: int | None = None,
          every: int | None = None, exclude_final: bool = False, skip_missing: bool = False,
          method: str = "linear", scheme: str | None = None, metric: str | None = None,
          direction: str | None = None, penalty: float | None = None, power: float | None = None,
          weights: Sequence[float] | None = None, params: dict[str, Any] | None = None,
          base: Ref | None = None, space: str = "factors", rank: int | None = None,
          out_dtype: str | None = None, out: str | os.PathLike | None = None, name: str | None = None,
          overwrite: bool = False, out_shard_size: int | None = None,
          progress: Callable[[int, int, str], None] | None = None) -> "Checkpoint":
    """Merge checkpoints and register the result (``ckptreg merge``); returns its Checkpoint.

    - inputs: ``refs``, or ``run`` + ``last`` [+ ``every``, ``exclude_final``, ``skip_missing``];
    - ``method``: any method of the method table (``ckptreg methods``; aliases and dashes
      accepted): uniform, mwa, linear, task_arithmetic, ties, dare_linear, dare_ties,
      magnitude_prune, slerp, cart, model_stock, multislerp, breadcrumbs, breadcrumbs_ties,
      della, della_linear, tsv, iso_c, iso_cts, star, knots_ties, knots_dare_ties;
    - weighting: ``scheme`` (uniform/metric/mwa; mwa is implied by ``method="mwa"``) with
      ``metric``, ``penalty``, ``power``, ``direction``; or explicit ``weights`` (one per input);
    - ``params``: method parameters by the table's names (density, sign, lam, seed, t,
      rank_ratio, svd, filter_wise, gamma, epsilon, alpha, eta, trim_scope, ...) and the LiNeS
      modifier ``lines=(alpha, beta)`` for any method with a base;
    - ``base``: "first", "last", a ref, or "pretrained" (LoRA in delta/core space: the updates
      are the task vectors; the default there for methods with a base); SLERP's t = 0 end;
    - ``space`` ("factors" | "delta" | "core") and ``rank`` for LoRA adapters (which methods run
      in which space: ``ckptreg methods``; ``ckptreg.merge``'s docstring); ``out_dtype``
      (float32/float16/bfloat16/float64); ``out`` (default beside the inputs), ``name`` (default:
      the paper's naming), ``overwrite`` (replace a ckptreg output), ``out_shard_size`` (bytes).

    A re-run whose registered output has the same recipe is not recomputed: the returned
    Checkpoint is the registered one (``ckptreg.engine.UP_TO_DATE``)."""
    return merge_spec_run(db, refs, run=run, last=last, every=every, exclude_final=exclude_final,
                              skip_missing=skip_missing, method=method, scheme=scheme, metric=metric,
                              direction=direction, penalty=penalty, power=power, weights=weights, params=params,
                              base=base, space=space, rank=rank, out_dtype=out_dtype, out=out, name=name,
                              overwrite=overwrite, out_shard_size=out_shard_size, progress=progress).checkpoint


def merge_spec_run(db: DB, refs: Sequence[Ref] | None = None, **kw) -> "MergeResult":
    """:func:`merge` (same arguments) returning an ``engine.MergeResult``: ``.checkpoint``,
    ``.status`` ("merged" or ``engine.UP_TO_DATE``) and ``.spec``, the spec as merged (its name,
    output path, inputs, weights and base)."""
    from . import engine

    reg = _registry(db)
    spec = plan_merge(reg, refs, **{k: v for k, v in kw.items()
                                    if k not in ("overwrite", "out_shard_size", "progress")})
    return engine.merge_result(reg, spec, space=kw.get("space") or "factors", rank=kw.get("rank"),
                               out_dtype=kw.get("out_dtype"), overwrite=bool(kw.get("overwrite")),
                               progress=kw.get("progress"), out_shard_size=kw.get("out_shard_size"))


def plan_merge(db: DB, refs: Sequence[Ref] | None = None, *, run: str | None = None, last: int | None = None,
               every: int | None = None, exclude_final: bool = False, skip_missing: bool = False,
               method: str = "linear", scheme: str | None = None, metric: str | None = None,
               direction: str | None = None, penalty: float | None = None, power: float | None = None,
               weights: Sequence[float] | None = None, params: dict[str, Any] | None = None,
               base: Ref | None = None, space: str = "factors", rank: int | None = None,
               out_dtype: str | None = None, out: str | os.PathLike | None = None,
               name: str | None = None) -> "MergeSpec":
    """The :class:`MergeSpec` :func:`merge` runs (its arguments less the run's): the weighting and
    parameter checks (WeightError / ParameterError before any work: MWA needs a penalty, metric
    and MWA weighting a metric), the inputs (:func:`select_inputs`), ``engine.make_spec``. Reads
    the registry only; writes nothing. ``engine.merge(reg, spec, ...)`` runs it."""
    from . import engine

    reg = _registry(db)
    method = engine.canonical_method(method or "linear")
    params = dict(params or {})
    check_weight_params(penalty, power, params.get("density"))
    inputs, selection = select_inputs(reg, refs, run=run, last=last, every=every, exclude_final=exclude_final,
                                      skip_missing=skip_missing)
    if method == "mwa" and scheme is None:
        scheme = "mwa"
    if scheme == "mwa" and penalty is None:
        raise ParameterError("MWA weighting needs --penalty")
    if scheme in ("metric", "mwa") and not metric:
        raise ParameterError(f"--weights {scheme} needs --metric (e.g. train_loss or step)")
    return engine.make_spec(reg, method, inputs, scheme=scheme, metric=metric, penalty=penalty, power=power,
                            direction=direction, weights=weights, base=base, params=params, name=name,
                            out=None if out is None else os.fspath(out), selection=selection,
                            space=space or "factors", rank=rank, out_dtype=out_dtype)


# ------------------------------------------------------------------------------------------------ sweeps

@dataclass
class SweepPlan:
    """The merges of a sweep grid (:func:`plan_sweep`).

    ``specs``: the unique merges, in grid order (K, M, method, metric, penalty), each with its
    paper-style name and, when the plan has an output folder, its ``out`` path; ``skipped``: one
    line per grid point that cannot be made (a selection the run cannot fill, SLERP over other
    than 2 checkpoints); ``dropped``: the name of each grid point equal to an earlier one (same
    method, inputs, weights, params, base), merged once; ``out_dir``: the output folder or None;
    ``space`` ("factors" | "delta" | "core") and ``rank``: how LoRA adapters are merged (as for
    :func:`merge`; the specs are named for them)."""
    specs: list = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    out_dir: str | None = None
    out_dtype: str | None = None
    run: str | None = None
    space: str = "factors"
    rank: int | None = None

    def __len__(self) -> int:
        return len(self.specs)

    def __iter__(self):
        return iter(self.specs)


def _as_list(v, conv, what) -> list:
    if v is None:
        return []
    if isinstance(v, str):
        items = [x.strip() for x in v.split(",") if x.strip()]
    elif isinstance(v, Iterable):
        items = list(v)
    else:
        items = [v]
    out = []
    for x in items:
        try:
            out.append(conv(x))
        except (TypeError, ValueError):
            raise UsageError(f"{what}: {x!r} is not valid") from None
    if not out:
        raise UsageError(f"{what}: empty list")
    return out


def plan_sweep(db: DB, *, run: str, last: int | Sequence[int] | str, every: int | Sequence[int] | str = 1,
               exclude_final: bool = False, skip_missing: bool = False,
               method: str | Sequence[str] = ("uniform", "mwa"), metric: str | Sequence[str] = ("train_loss",),
               penalty: float | Sequence[float] | str = (0.7,), power: float | None = None,
               direction: str | None = None, params: dict[str, Any] | None = None, base: Ref | None = None,
               out_dtype: str | None = None, out: str | os.PathLike | None = None, space: str = "factors",
               rank: int | None = None) -> SweepPlan:
    """Expand a sweep grid: every combination of ``last`` (K) × ``every`` (M) × ``method`` ×
    ``metric`` × ``penalty`` (metric and penalty apply to MWA; uniform/linear take one uniform
    point; other methods one point with ``params``/``base``), duplicates dropped (reported in
    ``dropped``), selections the run cannot fill and SLERP over other than 2 checkpoints reported
    in ``skipped``. Lists may be sequences or comma strings ("2,3,5"). Reads the registry only;
    writes nothing. SelectionError when no grid point can be made. ``out``: the folder the outputs
    go to (each spec's ``out`` is set to ``out/NAME``). ``space``/``rank`` as for :func:`merge`
    (LoRA adapters; "delta" or "core": every point an exact factored merge, named ``..._delta``,
    ``..._core`` or ``core_...`` as the single merge is, base pretrained the default base)."""
    from . import engine

    specs, skipped = expand_sweep(db, run=run, last=last, every=every, exclude_final=exclude_final,
                                  skip_missing=skip_missing, method=method, metric=metric, penalty=penalty,
                                  power=power, direction=direction, params=params, base=base, out_dtype=out_dtype,
                                  out=out, space=space, rank=rank)
    uniq, dropped = engine.dedupe_specs(specs)
    return SweepPlan(specs=uniq, skipped=skipped, dropped=[specs[i].name for i in sorted(dropped)],
                     out_dir=None if out is None else os.fspath(out), out_dtype=out_dtype, run=run,
                     space=space or "factors", rank=rank)


def expand_sweep(db: DB, *, run: str, last: int | Sequence[int] | str, every: int | Sequence[int] | str = 1,
                 exclude_final: bool = False, skip_missing: bool = False,
                 method: str | Sequence[str] = ("uniform", "mwa"), metric: str | Sequence[str] = ("train_loss",),
                 penalty: float | Sequence[float] | str = (0.7,), power: float | None = None,
                 direction: str | None = None, params: dict[str, Any] | None = None, base: Ref | None = None,
                 out_dtype: str | None = None, out: str | os.PathLike | None = None, space: str = "factors",
                 rank: int | None = None) -> tuple[list, list[str]]:
    """The grid of :func:`plan_sweep` before duplicates are dropped: ``(specs, skipped)``, one
    spec per grid point in grid order (K, M, method, metric, penalty), duplicates kept (running
    them with ``engine.sweep`` merges each once; every spec gets the registered checkpoint), each
    spec's ``out`` set to ``out/NAME`` when ``out`` is given. Same arguments and errors as
    :func:`plan_sweep`."""
    from . import engine

    lasts = _as_list(last, int, "--last")
    everys = _as_list(every, int, "--every")
    methods = [engine.canonical_method(m) for m in _as_list(method, str, "--method")]
    metrics = _as_list(metric, str, "--metric")
    penalties = _as_list(penalty, float, "--penalty")
    params = dict(params or {})
    for p in penalties:
        check_weight_params(p, power, params.get("density"))
    check_weight_params(None, power, params.get("density"))
    reg = _registry(db)
    specs, skipped = [], []
    for k, mm in itertools.product(lasts, everys):
        try:
            inputs = reg.select(run, k, mm, exclude_final=exclude_final, skip_missing=skip_missing)
        except SelectionError as e:
            skipped.append(f"last {k} every {mm}: {e}")
            continue
        sel = _selection(run, k, mm, exclude_final, skip_missing)
        for meth in methods:
            if meth in ("uniform", "linear"):
                combos = [("uniform", None, None)]
            elif meth == "mwa":
                combos = [("mwa", mt, p) for mt in metrics for p in penalties]
            else:
                combos = [(None, None, None)]
            for scheme, mt, p in combos:
                if meth == "slerp" and k != 2:
                    skipped.append(f"slerp last {k}: slerp needs exactly 2 checkpoints")
                    continue
                specs.append(engine.make_spec(reg, meth, inputs, scheme=scheme, metric=mt, penalty=p, power=power,
                                              direction=direction, base=base, params=params, selection=dict(sel),
                                              out_dtype=out_dtype, space=space or "factors", rank=rank))
    if not specs:
        raise SelectionError("no merge in the sweep can be made: " + "; ".join(skipped))
    if out is not None:
        specs = [dataclasses.replace(s, out=str(engine.default_out(s, parent=os.fspath(out)))) for s in specs]
    return specs, skipped


def sweep(db: DB, plan: SweepPlan | None = None, *, overwrite: bool = False,
          progress: Callable[[int, int, str], None] | None = None, **grid) -> list["Checkpoint"]:
    """Run a sweep (``ckptreg sweep``): the merges of ``plan`` (from :func:`plan_sweep`), or of the
    grid given as :func:`plan_sweep`'s keyword arguments (``run``, ``last``, ``every``, ``method``,
    ``metric``, ``penalty``, ``out``, ...). Weighted sums over the same inputs are computed in one
    pass; each result is registered under its paper name. Returns one Checkpoint per unique merge
    of the plan (:func:`sweep_results` also says whether each was merged or up to date). The
    output folder is created when missing; without ``out`` each output goes beside its newest
    input. The plan is not changed. With ``space="delta"`` or ``"core"`` (the plan's) every point
    is an exact factored merge, equal to :func:`merge` of it. A failing point leaves nothing of
    itself; the points computed before it stay registered (a re-run computes only the rest)."""
    return [r.checkpoint for r in sweep_results(db, plan, overwrite=overwrite, progress=progress, **grid)]


def sweep_results(db: DB, plan: SweepPlan | None = None, *, overwrite: bool = False,
                  progress: Callable[[int, int, str], None] | None = None, **grid) -> list["MergeResult"]:
    """:func:`sweep` returning one ``engine.MergeResult`` per unique merge of the plan, in the
    plan's order: ``.checkpoint``, ``.status`` ("merged" or ``engine.UP_TO_DATE``) and ``.spec``
    (the spec as merged)."""
    from pathlib import Path

    from . import engine

    if plan is None:
        plan = plan_sweep(db, **grid)
    elif grid:
        raise UsageError("give a plan or the grid arguments, not both: " + ", ".join(sorted(grid)))
    reg = _registry(db)
    made = []   # the folders this call creates: removed again (if still empty) when it fails
    if plan.out_dir is not None:
        d = Path(plan.out_dir).absolute()
        while not d.exists():
            made.append(d)
            d = d.parent
        for m in reversed(list(made)):
            try:
                m.mkdir()
            except FileExistsError:   # made meanwhile by another process (another rank of this sweep)
                if not m.is_dir():
                    raise
                made.remove(m)
    try:
        res = engine.sweep_results(reg, plan.specs, overwrite=overwrite, progress=progress,
                                   out_dtype=plan.out_dtype, space=getattr(plan, "space", None) or "factors",
                                   rank=getattr(plan, "rank", None))
    except BaseException:
        for m in made:   # deepest first; a folder something else was written into stays
            try:
                m.rmdir()
            except OSError:
                break
        raise
    return res


# ------------------------------------------------------------------------------------------------ leaderboard

class Leaderboard(list):
    """The rows of a leaderboard (dicts, ranked; see :func:`ckptreg.leaderboard.leaderboard`),
    with ``run``, ``score`` (metric -> weight), ``base`` and :meth:`plot`."""

    def __init__(self, rows, *, run: str, score: dict[str, float], base: Ref | None = None):
        super().__init__(rows)
        self.run = run
        self.score = dict(score)
        self.base = base

    @property
    def columns(self) -> list[str]:
        """The table's columns, as ``ckptreg leaderboard`` shows them."""
        cols = ["rank", "ref", "role"] + list(self.score) + ["score", "vs_last_merging", "vs_final"]
        if self.base is not None:
            cols.append("vs_base")
        return cols

    def plot(self, path: str | os.PathLike):
        """Write the leaderboard PNG (matplotlib); returns its path."""
        from .plots import plot_leaderboard

        return plot_leaderboard(list(self), path, score=self.score, run=self.run)


def leaderboard(db: DB, run: str, score: str | dict[str, float], *, base: Ref | None = None,
                plot: str | os.PathLike | None = None) -> Leaderboard:
    """Rank the merged and plain checkpoints of ``run`` by ``Σ w_k metric_k`` (``ckptreg
    leaderboard``; the paper's Table 2). ``score``: "gsm8k=0.3,gsmplus=0.7", one metric name, or a
    dict. ``base``: a checkpoint for the vs_base column. ``plot``: also write the PNG there.
    NotFoundError for a run without checkpoints or a score metric never logged."""
    from . import leaderboard as lb

    weights = lb.parse_score(score)
    reg = _registry(db)
    base_arg = base.id if (hasattr(base, "id") and hasattr(base, "path")) else base
    rows = Leaderboard(lb.leaderboard(reg, run, weights, base=base_arg), run=run, score=weights, base=base)
    if plot is not None:
        rows.plot(plot)
    return rows

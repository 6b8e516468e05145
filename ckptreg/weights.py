"""Merge weights: uniform, basic metric weighting and Metrics-Weighted Averaging (MWA).

Plain Python (no torch). The numbers follow ``METHODS.md`` section "Weights":

- uniform: ``w_i = 1/n``;
- basic metric weighting: ``phi_i = g(v_i)`` with ``g(v) = 1/v`` for a metric to minimise and
  ``g(v) = v`` for one to maximise, ``w_i = phi_i / sum(phi)``;
- MWA (paper eq. 3-5): ``phi_i = p ** (q ** pos_i) * g(v_i)``, ``pos_i`` the zero-based rank of
  ``v_i`` sorted best -> worst (min: ascending, max: descending), equal values rank the later
  step first (then the earlier input first), ``w_i = phi_i / sum(phi)``.

Choices where METHODS.md leaves room (documented here, exposed as parameters):

- ``DEFAULT_POWER = 2.0``. The paper fixes q > 1 per metric "heuristically" and never states
  the value. q = 2 is the METHODS.md worked example, gives a clear but not degenerate decay
  over the 3-10 checkpoint soups the paper merges (with p = 0.7 the 5th-ranked checkpoint keeps
  p**16 ~ 0.3% of its metric factor), and leaves p as the single tuned knob, as the paper
  recommends. q = 1 is accepted and reduces MWA to basic weighting; q < 1 is an error.
- penalty p: any finite p > 0 (the paper uses 0.5-1.0 and one row 1.05).
- :func:`default_direction`: step-like and score-like names maximise, loss-like names
  minimise, and an unrecognised name minimises (the paper's primary metric is a training
  loss, and a registry's free-form metrics are mostly losses). Pass ``direction`` to override.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

from .errors import SelectionError, WeightError

__all__ = [
    "DEFAULT_POWER",
    "STEP_METRICS",
    "SCHEMES",
    "uniform",
    "metric_weights",
    "mwa",
    "positions",
    "default_direction",
    "for_checkpoints",
    "rescale_mean_one",
    "select_indices",
]

DEFAULT_POWER = 2.0

#: metric names that read ``Checkpoint.step`` instead of ``Checkpoint.metrics``
STEP_METRICS = frozenset({"step", "steps", "global_step"})

#: accepted ``scheme`` names for :func:`for_checkpoints` (aliases map to the canonical name)
SCHEMES = {
    "uniform": "uniform",
    "unweighted": "uniform",
    "metric": "metric",
    "basic": "metric",
    "mwa": "mwa",
}

# Whole-token matches on the metric name split at non-alphanumerics ("eval/exact_match" ->
# ["eval", "exact", "match"]); prefixes (token startswith) catch "accuracy", "rouge1", "f1_macro".
_MAX_PREFIXES = ("acc", "score", "f1", "bleu", "rouge", "exact", "reward", "win", "precision",
                 "recall", "auc", "map", "mrr", "ndcg", "pass", "step", "epoch")
_MAX_TOKENS = frozenset({"em", "steps", "global", "epochs"})
_MIN_PREFIXES = ("loss", "ppl", "perplexity", "error", "err", "wer", "cer", "mse", "mae", "rmse",
                 "nll", "bpb", "bpc", "distance", "regret")


def _label(ref, i) -> str:
    return str(ref) if ref is not None else f"input {i}"


def _check_direction(direction) -> str:
    if direction not in ("min", "max"):
        raise WeightError(f"direction must be 'min' or 'max', got {direction!r}")
    return direction


def _check_values(values: Sequence, refs: Sequence | None = None, metric: str | None = None) -> list[float]:
    out = []
    what = f"metric {metric!r}" if metric else "metric"
    for i, v in enumerate(values):
        ref = _label(refs[i] if refs is not None else None, i)
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise WeightError(f"{ref}: {what} value {v!r} is not a number") from None
        if not math.isfinite(f):
            raise WeightError(f"{ref}: {what} value {f!r} is not finite; cannot weight by it")
        if f <= 0.0:
            raise WeightError(
                f"{ref}: {what} value {f!r} is not > 0; metric weighting needs positive values"
            )
        out.append(f)
    if not out:
        raise WeightError("no checkpoints to weight")
    return out


def _normalise(phi: list[float]) -> list[float]:
    total = math.fsum(phi)
    if not math.isfinite(total) or total <= 0.0:
        raise WeightError(f"weights cannot be normalised: sum of factors is {total!r}")
    return [x / total for x in phi]


def uniform(n: int) -> list[float]:
    """``w_i = 1/n`` (the paper's Uniform Soup)."""
    if int(n) != n or n < 1:
        raise WeightError(f"uniform weights need n >= 1 checkpoints, got {n!r}")
    n = int(n)
    return [1.0 / n] * n


def _g(v: float, direction: str) -> float:
    return 1.0 / v if direction == "min" else v


def metric_weights(values: Sequence[float], direction: str = "min", refs: Sequence | None = None) -> list[float]:
    """Basic metric weighting: ``phi = 1/v`` (min) or ``v`` (max), normalised to sum 1."""
    direction = _check_direction(direction)
    vals = _check_values(values, refs)
    return _normalise([_g(v, direction) for v in vals])


def positions(values: Sequence[float], steps: Sequence | None, direction: str = "min") -> list[int]:
    """Zero-based rank of every value, best -> worst. Ties: the later step ranks first; equal
    (or missing) steps keep input order. ``None`` steps rank after any known step on a tie."""
    direction = _check_direction(direction)
    n = len(values)
    if steps is None:
        steps = [None] * n
    if len(steps) != n:
        raise WeightError(f"{n} values but {len(steps)} steps")
    vals = [float(v) for v in values]

    def key(i):
        v = vals[i] if direction == "min" else -vals[i]
        s = steps[i]
        # later step first -> sort by -step; None last among equals
        return (v, 0 if s is not None else 1, -(s if s is not None else 0), i)

    order = sorted(range(n), key=key)
    pos = [0] * n
    for rank, i in enumerate(order):
        pos[i] = rank
    return pos


def _check_penalty_power(penalty, power) -> tuple[float, float]:
    try:
        p = float(penalty)
    except (TypeError, ValueError):
        raise WeightError(f"penalty factor p must be a number > 0, got {penalty!r}") from None
    if not math.isfinite(p) or p <= 0.0:
        raise WeightError(f"penalty factor p must be finite and > 0, got {p!r}")
    try:
        q = float(power)
    except (TypeError, ValueError):
        raise WeightError(f"power factor q must be a number >= 1, got {power!r}") from None
    if not math.isfinite(q) or q < 1.0:
        raise WeightError(f"power factor q must be finite and >= 1, got {q!r}")
    return p, q


def mwa(
    values: Sequence[float],
    steps: Sequence | None = None,
    penalty: float = 0.7,
    power: float = DEFAULT_POWER,
    direction: str = "min",
    refs: Sequence | None = None,
) -> list[float]:
    """Metrics-Weighted Averaging weights, ``phi_i = p**(q**pos_i) * g(v_i)``, normalised.

    ``p**(q**pos)`` is evaluated in log space when it would underflow, so long soups with a
    small p give tiny (possibly 0.0) weights for the worst ranks but never NaN.
    """
    direction = _check_direction(direction)
    p, q = _check_penalty_power(penalty, power)
    vals = _check_values(values, refs)
    pos = positions(vals, steps, direction)
    logs = []
    for v, k in zip(vals, pos):
        try:
            expo = q ** k
        except OverflowError:
            expo = math.inf
        lp = math.log(p) * expo if p != 1.0 else 0.0
        logs.append(lp + math.log(_g(v, direction)))
    # normalise in log space (softmax) so p**(q**pos) never overflows/underflows to NaN
    m = max(logs)
    if not math.isfinite(m):
        raise WeightError(
            f"MWA factors overflow for p={p!r}, q={q!r} over {len(vals)} checkpoints"
        )
    phi = [math.exp(x - m) for x in logs]
    return _normalise(phi)


def default_direction(metric: str) -> str:
    """``"max"`` for step-like (step, steps, global_step, epoch) and score-like names (acc*,
    score, f1, bleu, rouge*, exact*, em, reward, win*, precision, recall, auc, ...), ``"min"``
    for loss-like names (loss, ppl, perplexity, error, wer, cer, mse, ...) and for any name
    not recognised. Loss-like tokens win over score-like ones ("reward_loss" -> min)."""
    if not isinstance(metric, str) or not metric:
        raise WeightError(f"metric name must be a non-empty string, got {metric!r}")
    name = metric.lower()
    if name in STEP_METRICS:
        return "max"
    tokens = [t for t in re.split(r"[^a-z0-9]+", name) if t]
    if any(t.startswith(_MIN_PREFIXES) for t in tokens):
        return "min"
    if any(t in _MAX_TOKENS or t.startswith(_MAX_PREFIXES) for t in tokens):
        return "max"
    return "min"


def _ckpt_ref(c, i):
    ref = getattr(c, "ref", None)
    return ref if ref is not None else f"input {i}"


def _read_metric(ckpts, metric: str) -> list:
    vals = []
    for i, c in enumerate(ckpts):
        ref = _ckpt_ref(c, i)
        if metric.lower() in STEP_METRICS:
            v = getattr(c, "step", None)
            if v is None:
                raise WeightError(f"{ref}: has no step, cannot weight by {metric!r}")
        else:
            metrics = getattr(c, "metrics", None) or {}
            if metric not in metrics or metrics[metric] is None:
                have = ", ".join(sorted(metrics)) or "none"
                raise WeightError(f"{ref}: metric {metric!r} missing (has: {have})")
            v = metrics[metric]
        vals.append(v)
    return vals


def for_checkpoints(
    ckpts: Sequence,
    scheme: str = "uniform",
    metric: str | None = None,
    penalty: float | None = None,
    power: float | None = None,
    direction: str | None = None,
) -> list[float]:
    """Weights (sum 1) for checkpoint objects with ``.metrics`` (dict), ``.step`` and ``.ref``.

    ``scheme``: "uniform" (alias "unweighted"), "metric" (alias "basic"), "mwa". ``metric``
    "step"/"steps"/"global_step" reads ``.step``; any other name reads ``.metrics[metric]``.
    ``direction`` defaults to :func:`default_direction` of the metric, ``power`` to
    :data:`DEFAULT_POWER`; MWA needs ``penalty``.
    """
    ckpts = list(ckpts)
    if not ckpts:
        raise WeightError("no checkpoints to weight")
    canon = SCHEMES.get(str(scheme).lower()) if scheme is not None else None
    if canon is None:
        raise WeightError(f"unknown weighting scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    if canon == "uniform":
        return uniform(len(ckpts))
    if not metric:
        raise WeightError(f"weighting scheme {canon!r} needs a metric")
    direction = _check_direction(direction) if direction is not None else default_direction(metric)
    refs = [_ckpt_ref(c, i) for i, c in enumerate(ckpts)]
    raw = _read_metric(ckpts, metric)
    vals = _check_values(raw, refs, metric)
    if canon == "metric":
        return _normalise([_g(v, direction) for v in vals])
    if penalty is None:
        raise WeightError("MWA weighting needs a penalty factor p")
    steps = [getattr(c, "step", None) for c in ckpts]
    return mwa(vals, steps, penalty=penalty, power=DEFAULT_POWER if power is None else power,
               direction=direction, refs=refs)


def rescale_mean_one(weights: Iterable[float]) -> list[float]:
    """Rescale to mean 1 (``sum w = n``): how a weighting scheme feeds task arithmetic, TIES,
    DARE and magnitude prune (METHODS.md "Scale of the weights")."""
    w = [float(x) for x in weights]
    if not w:
        raise WeightError("no weights to rescale")
    for i, x in enumerate(w):
        if not math.isfinite(x):
            raise WeightError(f"weight {i} is {x!r}; weights must be finite")
    total = math.fsum(w)
    if not math.isfinite(total) or total <= 0.0:
        raise WeightError(f"cannot rescale weights with sum {total!r} to mean 1")
    n = len(w)
    return [x * n / total for x in w]


def select_indices(n_available: int, last: int, every: int = 1) -> list[int]:
    """Indices (ascending) of ``last K every M`` among ``n_available`` checkpoints sorted by
    ascending step: the newest, then every M-th going back, K in all."""
    if last < 1 or every < 1:
        raise SelectionError(f"last and every must be >= 1, got last={last}, every={every}")
    need = (last - 1) * every + 1
    if need > n_available:
        raise SelectionError(
            f"last {last} every {every} needs {need} checkpoints, only {n_available} exist"
        )
    newest = n_available - 1
    return sorted(newest - j * every for j in range(last))

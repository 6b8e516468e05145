"""PNG plots (matplotlib, Agg backend, imported lazily; a clear error when it is missing).

- :func:`plot_weights`: the metric curve of the run zoomed to the merged window, the checkpoints
  chosen for a merge highlighted, and their weights as bars below; the title names the run, the
  weighting, the window and the penalty.
- :func:`plot_leaderboard`: horizontal bars of the weighted scores, best on top, bars growing from
  the left edge of the axis (longer is better whatever the sign of the score), merged and plain
  checkpoints told apart in the legend, the final / last merging / base checkpoints drawn as
  reference lines that are always inside the axis, and the legend says how many rows were left out.

``weights_figure`` / ``leaderboard_figure`` return the open matplotlib figure (the caller closes
it); ``plot_*`` write it as a PNG. Text that would overlap other text of the same kind (tick
labels, weight labels) is hidden, measured with the renderer's bounding boxes.
"""
from __future__ import annotations

import math
from pathlib import Path

from .errors import UsageError

__all__ = ["plot_weights", "plot_leaderboard", "weights_figure", "leaderboard_figure"]

MERGED_COLOR = "C0"
PLAIN_COLOR = "0.6"
REFERENCE_STYLES = {"final": ("C3", "final checkpoint"), "last_merging": ("C2", "last merging checkpoint"),
                    "base": ("C4", "base model")}


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install 'ckptreg[plot]' (or pip install matplotlib)") from None
    return plt


def _value(c, metric):
    if metric in ("step", "steps", "global_step"):
        return c.step
    v = (c.metrics or {}).get(metric)
    return v if v is None or math.isfinite(float(v)) else None


def _fmt_num(x) -> str:
    return f"{x:g}"


def score_label(score) -> str:
    """``{"gsm8k": 0.3, "loss": -0.5}`` -> ``"0.3·gsm8k − 0.5·loss"``."""
    parts = []
    for i, (k, w) in enumerate(dict(score).items()):
        w = float(w)
        mag = "" if abs(w) == 1 else f"{_fmt_num(abs(w))}·"
        sign = ("−" if w < 0 else "") if i == 0 else (" − " if w < 0 else " + ")
        parts.append(f"{sign}{mag}{k}")
    return "".join(parts)


# ------------------------------------------------------------------------------ text declutter

def _visible_texts(texts):
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def declutter(fig, texts, pad: float = 2.0) -> int:
    """Hide each text (in the given order) whose bounding box overlaps one kept before it;
    returns how many were hidden. Needs a drawn figure (the layout is final)."""
    renderer = fig.canvas.get_renderer()
    kept, hidden = [], 0
    for t in _visible_texts(texts):
        bb = t.get_window_extent(renderer)
        bb = type(bb).from_extents(bb.x0 - pad, bb.y0 - pad, bb.x1 + pad, bb.y1 + pad)
        if any(bb.overlaps(k) for k in kept):
            t.set_visible(False)
            hidden += 1
        else:
            kept.append(bb)
    return hidden


def thin(fig, texts, pad: float = 2.0) -> int:
    """Keep every k-th of ``texts`` (tick labels, in axis order) for the smallest k at which
    the kept ones do not overlap; returns k. Needs a drawn figure."""
    renderer = fig.canvas.get_renderer()
    texts = _visible_texts(texts)
    boxes = [t.get_window_extent(renderer) for t in texts]
    for k in range(1, max(2, len(texts) + 1)):
        kept = boxes[::k]
        if all(a.x1 + pad <= b.x0 or b.x1 + pad <= a.x0 or a.y1 + pad <= b.y0 or b.y1 + pad <= a.y0
               for i, a in enumerate(kept) for b in kept[i + 1:]):
            break
    for i, t in enumerate(texts):
        t.set_visible(i % k == 0)
    return k


def overlapping_texts(fig, texts) -> list[tuple[str, str]]:
    """Pairs of visible texts whose bounding boxes overlap (for tests and checks)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    vis = _visible_texts(texts)
    boxes = [t.get_window_extent(renderer) for t in vis]
    return [(vis[i].get_text(), vis[j].get_text()) for i in range(len(vis)) for j in range(i + 1, len(vis))
            if boxes[i].overlaps(boxes[j])]


def _layout(fig):
    fig.tight_layout()
    fig.canvas.draw()


# ------------------------------------------------------------------------------ weights

def _window_text(window, steps) -> str:
    """``{"last": 5, "every": 2, "exclude_final": True}`` + steps -> "last 5 every 2, final
    excluded (steps 60–100)"."""
    parts = []
    if window:
        if window.get("last") is not None:
            parts.append(f"last {window['last']}")
        if (window.get("every") or 1) != 1:
            parts.append(f"every {window['every']}")
        if window.get("exclude_final"):
            parts.append("final excluded")
    rng = f"steps {min(steps)}–{max(steps)}" if len(steps) > 1 else (f"step {steps[0]}" if steps else "")
    head = " ".join(p for p in parts if not p.startswith("final"))
    if "final excluded" in parts:
        head = (head + ", " if head else "") + "final excluded"
    if head and rng:
        return f"{head} ({rng})"
    return head or rng


def weights_title(run=None, method=None, metric=None, window=None, penalty=None, power=None, steps=()) -> str:
    """The weights plot's title: run, method/weighting, metric, window and penalty."""
    what = method or "uniform"
    line1 = f"{run}: {what} weights" if run else f"{what} weights"
    if metric and what != "uniform":
        line1 += f" over {metric}"
    extra = []
    w = _window_text(window, list(steps))
    if w:
        extra.append(w)
    if penalty is not None:
        extra.append(f"penalty {_fmt_num(penalty)}" + (f", power {_fmt_num(power)}" if power is not None else ""))
    elif what == "mwa":
        extra.append("penalty ?")
    else:
        extra.append("no penalty")
    return line1 + "\n" + ", ".join(extra)


def weights_figure(ckpts, metric: str, weights, run_ckpts=None, title: str | None = None, *, run=None,
                   method=None, penalty=None, power=None, window=None):
    """An open figure: ``ckpts`` (the chosen checkpoints) with ``weights`` over the curve of
    ``metric`` of ``run_ckpts`` (default: ``ckpts``), zoomed to the merged window."""
    plt = _plt()
    ckpts = list(ckpts)
    weights = [float(w) for w in weights]
    if len(weights) != len(ckpts):
        raise UsageError(f"{len(weights)} weights for {len(ckpts)} checkpoints")
    run_ckpts = sorted([c for c in (run_ckpts or ckpts) if c.step is not None], key=lambda c: c.step)
    steps = sorted(c.step for c in ckpts if c.step is not None)
    if run is None:
        runs = {c.run for c in ckpts if getattr(c, "run", None)}
        run = runs.pop() if len(runs) == 1 else None
    fig, (ax, axw) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    try:
        # the window: the chosen steps plus half a checkpoint interval of context each side
        all_steps = sorted({c.step for c in run_ckpts} | set(steps))
        if steps:
            lo, hi = steps[0], steps[-1]
            inside = [s for s in all_steps if lo <= s <= hi]
            gaps = [b - a for a, b in zip(all_steps, all_steps[1:]) if b > a]
            gap = (min(gaps) if gaps else max(1.0, abs(hi) * 0.05))
            if len(inside) > 1:
                gap = max(gap, (hi - lo) / max(1, len(inside) - 1))
            x0, x1 = lo - 0.6 * gap, hi + 0.6 * gap
        else:
            x0, x1 = (all_steps[0] - 1, all_steps[-1] + 1) if all_steps else (0, 1)
        curve = [(c.step, _value(c, metric)) for c in run_ckpts if _value(c, metric) is not None]
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], "-o", color="0.6", lw=1, ms=3,
                    label=f"{metric} (run)", zorder=2)
        chosen = [(c.step, _value(c, metric), w) for c, w in zip(ckpts, weights)
                  if c.step is not None and _value(c, metric) is not None]
        annotations = []
        if chosen:
            wmax = max(weights) if weights and max(weights) > 0 else 0
            sizes = [40 + 300 * (w / wmax) if wmax > 0 else 40 for _, _, w in chosen]
            ax.scatter([s for s, _, _ in chosen], [v for _, v, _ in chosen], s=sizes, color="C1", zorder=3,
                       label="merged checkpoints (size: weight)")
        # y range of what is inside the window
        ys = [v for s, v in curve if x0 <= s <= x1] + [v for _, v, _ in chosen]
        if ys:
            ylo, yhi = min(ys), max(ys)
            ypad = (yhi - ylo) * 0.15 or abs(yhi) * 0.05 or 1.0
            ax.set_ylim(ylo - ypad, yhi + ypad)
        ax.set_xlim(x0, x1)
        ax.set_ylabel(metric)
        ax.legend(loc="best", fontsize=8)
        ax.set_title(title or weights_title(run, method, metric, window, penalty, power, steps), fontsize=10)
        ws = [w for c, w in zip(ckpts, weights) if c.step is not None]
        wsteps = [c.step for c in ckpts if c.step is not None]
        if wsteps:
            width = 0.6 * ((x1 - x0) / (1.2 + max(1, len(set(wsteps)) - 1)) if len(set(wsteps)) > 1 else (x1 - x0) / 2)
            axw.bar(wsteps, ws, width=width, color="C1")
            for s, w in zip(wsteps, ws):
                annotations.append(axw.annotate(f"{w:.3f}" if w == 0 or abs(w) >= 1e-3 else f"{w:.0e}", (s, w), textcoords="offset points", xytext=(0, 2),
                                                ha="center", va="bottom", fontsize=8))
            axw.set_ylim(0, max(max(ws), 1e-12) * 1.25)
            axw.set_xticks(wsteps)
            axw.set_xticklabels([str(s) for s in wsteps])
        n_run = len(run_ckpts)
        span = f"; the run has {n_run} checkpoints, steps {run_ckpts[0].step}–{run_ckpts[-1].step}" if n_run else ""
        axw.set_xlabel(f"step (merged window{span})", fontsize=9)
        axw.set_ylabel("weight")
        axw.tick_params(axis="x", labelsize=8)
        _layout(fig)
        thin(fig, axw.get_xticklabels())
        # the heaviest weights keep their labels; a label that would overlap a kept one goes
        declutter(fig, [a for _, a in sorted(zip(ws, annotations), key=lambda x: -x[0])])
        fig._ckptreg_texts = {"xticks": axw.get_xticklabels(), "weights": annotations}
        return fig
    except BaseException:
        plt.close(fig)
        raise


def plot_weights(ckpts, metric: str, weights, path, run_ckpts=None, title: str | None = None, *, run=None,
                 method=None, penalty=None, power=None, window=None) -> Path:
    """Write :func:`weights_figure` as a PNG at ``path``."""
    plt = _plt()
    fig = weights_figure(ckpts, metric, weights, run_ckpts, title, run=run, method=method, penalty=penalty,
                         power=power, window=window)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------ leaderboard

def _references(rows):
    """The reference checkpoints of a leaderboard, in drawing order: [(role, row)]: the final
    checkpoint, each distinct last merging checkpoint, the base."""
    out, seen = [], set()
    for role in ("final", "last_merging", "base"):
        for r in rows:
            if r.get("score") is None:
                continue
            roles = (r.get("role") or "").split(",")
            if role in roles and (role, r["id"]) not in seen:
                seen.add((role, r["id"]))
                out.append((role, r))
    return out


def leaderboard_figure(rows, title: str | None = None, top: int | None = 30, *, score=None, run=None):
    """An open figure of ``rows`` (from :func:`ckptreg.leaderboard.leaderboard`): the ``top``
    best scored rows as bars, best on top."""
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    scored = [r for r in rows if r.get("score") is not None]
    if not scored:
        raise UsageError("no scored rows to plot")
    scored = sorted(scored, key=lambda r: -r["score"])   # best on top whatever the caller's order
    shown = scored[:top] if top else scored
    unscored = len(rows) - len(scored)
    below = len(scored) - len(shown)
    refs = _references(rows)

    labels = [str(r.get("name") or r.get("ref")) for r in shown][::-1]
    vals = [float(r["score"]) for r in shown][::-1]
    colors = [MERGED_COLOR if r.get("kind") == "merged" else PLAIN_COLOR for r in shown][::-1]
    ref_vals = [float(r["score"]) for _, r in refs]
    lo, hi = min(vals + ref_vals), max(vals + ref_vals)
    pad = (hi - lo) * 0.08 or abs(hi) * 0.05 or 1.0
    left, right = lo - pad, hi + pad * 1.6   # room for the value labels at the bar ends

    fig, ax = plt.subplots(figsize=(9.5, 0.32 * len(shown) + 2.0))
    try:
        # bars grow from the left edge: longer is better, also for negative composite scores
        ax.barh(range(len(vals)), [v - left for v in vals], left=left, color=colors, height=0.7)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.4g}", va="center", ha="left", fontsize=7)
        ax.set_yticks(range(len(vals)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_ylim(-0.6, len(vals) - 0.4)
        handles = [Patch(color=MERGED_COLOR, label="merged checkpoint"),
                   Patch(color=PLAIN_COLOR, label="plain checkpoint (not a merge)")]
        drawn = {}
        for role, r in refs:
            col, lab = REFERENCE_STYLES[role]
            x = float(r["score"])
            key = (x, r["id"])
            if key in drawn:   # one checkpoint in two roles: one line, both names
                drawn[key].set_label(drawn[key].get_label().split(" (")[0] + f" = {lab} ({r['ref']})")
                continue
            ls = "--" if role != "last_merging" else (0, (4, 2, 1, 2))
            drawn[key] = ax.axvline(x, color=col, ls=ls, lw=1.3, label=f"{lab} ({r['ref']})", zorder=3)
        handles += list(drawn.values())
        left_out = []
        if below:
            left_out.append(f"{below} below the top {len(shown)}")
        if unscored:
            left_out.append(f"{unscored} unscored")
        if left_out:
            handles.append(Line2D([], [], ls="none", label=f"not shown: {', '.join(left_out)}"))
        else:
            handles.append(Line2D([], [], ls="none", label=f"all {len(shown)} rows shown"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False,
                  borderaxespad=0.0)
        ax.set_xlim(left, right)
        if lo < 0 < hi:   # scores on both sides of zero: mark it
            ax.axvline(0, color="0.3", lw=0.6, zorder=1)
        what = score_label(score) if score else "weighted score"
        ax.set_xlabel(f"{what} (higher is better)", fontsize=9)
        if title is None:
            title = f"{run}: {what}" if run else "leaderboard"
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        fig.canvas.draw()
        fig._ckptreg_texts = {"yticks": ax.get_yticklabels()}
        return fig
    except BaseException:
        plt.close(fig)
        raise


def plot_leaderboard(rows, path, title: str | None = None, top: int | None = 30, *, score=None, run=None) -> Path:
    """Write :func:`leaderboard_figure` as a PNG at ``path``."""
    plt = _plt()
    fig = leaderboard_figure(rows, title, top, score=score, run=run)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _save(fig, path) -> Path:
    """Write a figure as PNG (the layout is already done), creating the folder; the caller
    closes the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path

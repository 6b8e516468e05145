"""PNG plots (matplotlib, Agg backend, imported lazily; a clear error when it is missing).

- :func:`plot_weights`: the metric curve over the steps of the whole run, the checkpoints chosen
  for a merge highlighted, and their weights as bars below.
- :func:`plot_leaderboard`: horizontal bars of the weighted scores, baselines (final checkpoint,
  last merging checkpoint, base) marked with vertical lines.
"""
from __future__ import annotations

from pathlib import Path

from .errors import UsageError

__all__ = ["plot_weights", "plot_leaderboard"]


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
    return (c.metrics or {}).get(metric)


def plot_weights(ckpts, metric: str, weights, path, run_ckpts=None, title: str | None = None) -> Path:
    """``ckpts`` (the chosen checkpoints) with ``weights``; ``run_ckpts`` (default: ``ckpts``)
    gives the curve of ``metric`` over the run."""
    plt = _plt()
    ckpts = list(ckpts)
    weights = [float(w) for w in weights]
    if len(weights) != len(ckpts):
        raise UsageError(f"{len(weights)} weights for {len(ckpts)} checkpoints")
    run_ckpts = sorted([c for c in (run_ckpts or ckpts) if c.step is not None], key=lambda c: c.step)
    fig, (ax, axw) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    try:
        curve = [(c.step, _value(c, metric)) for c in run_ckpts if _value(c, metric) is not None]
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], "-", color="0.6", lw=1, label=f"{metric} (run)")
        chosen = [(c.step, _value(c, metric), w) for c, w in zip(ckpts, weights)
                  if c.step is not None and _value(c, metric) is not None]
        if chosen:
            sizes = [40 + 400 * (w / max(weights)) if max(weights) > 0 else 40 for _, _, w in chosen]
            ax.scatter([s for s, _, _ in chosen], [v for _, v, _ in chosen], s=sizes, color="C1", zorder=3,
                       label="merged checkpoints")
            for s, v, w in chosen:
                ax.annotate(f"{w:.3f}", (s, v), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
        ax.set_ylabel(metric)
        ax.legend(loc="best", fontsize=8)
        ax.set_title(title or f"merge weights over {metric}")
        steps = [c.step for c in ckpts if c.step is not None]
        ws = [w for c, w in zip(ckpts, weights) if c.step is not None]
        if steps:
            span = (max(s for s, _ in curve) - min(s for s, _ in curve)) if len(curve) > 1 else 1
            width = max(span / max(8, 3 * len(run_ckpts)), 1e-9)
            axw.bar(steps, ws, width=width, color="C1")
        axw.set_ylabel("weight")
        axw.set_xlabel("step")
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_leaderboard(rows, path, title: str | None = None, top: int | None = 30) -> Path:
    """Horizontal bars of ``rows`` (from :func:`ckptreg.leaderboard.leaderboard`), best on top;
    final / last-merging / base checkpoints drawn as dashed reference lines."""
    plt = _plt()
    scored = [r for r in rows if r.get("score") is not None]
    if not scored:
        raise UsageError("no scored rows to plot")
    shown = scored[:top] if top else scored
    labels = [str(r.get("name") or r.get("ref")) for r in shown][::-1]
    vals = [r["score"] for r in shown][::-1]
    colors = ["C0" if r.get("kind") == "merged" else "0.55" for r in shown][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(shown) + 1.5))
    try:
        ax.barh(range(len(vals)), vals, color=colors)
        ax.set_yticks(range(len(vals)))
        ax.set_yticklabels(labels, fontsize=8)
        styles = {"final": ("C3", "final checkpoint"), "last_merging": ("C2", "last merging checkpoint"),
                  "base": ("C4", "base model")}
        drawn = set()
        for r in scored:
            for role in (r.get("role") or "").split(","):
                if role in styles and role not in drawn:
                    col, lab = styles[role]
                    ax.axvline(r["score"], color=col, ls="--", lw=1, label=f"{lab} ({r['ref']})")
                    drawn.add(role)
        lo, hi = min(vals), max(vals)
        pad = (hi - lo) * 0.15 or abs(hi) * 0.05 or 1.0
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_xlabel("weighted score")
        ax.set_title(title or "leaderboard")
        if drawn:
            ax.legend(loc="lower right", fontsize=7)
        return _save(fig, path)
    finally:
        plt.close(fig)


def _save(fig, path) -> Path:
    """Write a figure as PNG, creating the folder; the caller closes the figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path

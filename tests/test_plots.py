"""The leaderboard and weights pictures (issue 12 item 6), asserted on the matplotlib figures
built from a real registry: reference lines inside the axis, a legend that explains the bars and
the rows left out, best on top with bars that grow with the score (also for negative composite
scores), the weights plot zoomed to the merged window with a title naming run, weighting, window
and penalty, and no overlapping labels (renderer bounding boxes)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

from ckptreg import weights as W  # noqa: E402
from ckptreg.cli import main  # noqa: E402
from ckptreg.leaderboard import leaderboard  # noqa: E402
from ckptreg.plots import leaderboard_figure, overlapping_texts, weights_figure  # noqa: E402
from helpers_engine import make_lora_run  # noqa: E402

STEPS = tuple(range(100, 1300, 100))


@pytest.fixture
def scored_run(tmp_path):
    """12 plain checkpoints; merges scored above the final one; the last merging checkpoint of
    the exclude-final merges (sft@1100) scored far below everything; one checkpoint unscored."""
    reg = make_lora_run(tmp_path, steps=STEPS)
    db = str(tmp_path / "reg.duckdb")

    def cli(*a, code=0):
        r = CliRunner().invoke(main, ["--db", db, *map(str, a)])
        assert r.exit_code == code, (a, r.output)
        return r

    ids = [int(cli("merge", "--run", "sft", *a, "-q").output.split()[0])
           for a in (["--last", 3], ["--last", 5], ["--last", 4, "--exclude-final"])]
    reg.log(reg.get("sft@1100"), {"gsm8k": 0.01, "gsmplus": 0.01})
    fin = reg.get("sft@1200")
    for i, c in enumerate(ids):
        reg.log(reg.get(c), {"gsm8k": fin.metrics["gsm8k"] + 0.02 * (i + 1), "gsmplus": fin.metrics["gsmplus"]})
    return reg, cli, tmp_path, ids


def _legend_texts(fig):
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def _vlines(ax):
    return {round(float(line.get_xdata()[0]), 9): line.get_label() for line in ax.get_lines()
            if len(set(line.get_xdata())) == 1}


def test_leaderboard_axis_holds_both_reference_lines_and_legend_counts_left_out_rows(scored_run):
    reg, _, _, ids = scored_run
    rows = leaderboard(reg, "sft", "gsm8k=0.3,gsmplus=0.7")
    rows.append({**rows[-1], "id": -1, "ref": "sft@9999", "score": None, "role": "", "missing": ["gsm8k"]})
    s = {r["ref"]: r["score"] for r in rows}
    final, lm = s["sft@1200"], s["sft@1100"]
    fig = leaderboard_figure(rows, top=5, score={"gsm8k": 0.3, "gsmplus": 0.7}, run="sft")
    try:
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        assert lo < lm < hi and lo < final < hi, (lo, hi, lm, final)
        lines = _vlines(ax)
        # sft@1200 is the final checkpoint and the last merging one of the other merges: one line
        assert lines[round(final, 9)] == "final checkpoint = last merging checkpoint (sft@1200)"
        assert round(lm, 9) in lines and "last merging checkpoint (sft@1100)" in lines[round(lm, 9)]
        texts = _legend_texts(fig)
        assert "merged checkpoint" in texts and "plain checkpoint (not a merge)" in texts
        n_scored = sum(r["score"] is not None for r in rows)
        assert f"not shown: {n_scored - 5} below the top 5, 1 unscored" in texts, texts
        # best on top: the top tick label is rank 1
        labels = [t.get_text() for t in ax.get_yticklabels()]
        best = rows[0]
        assert labels[-1] == str(best.get("name") or best["ref"]) and len(labels) == 5
        assert ax.get_title() == "sft: 0.3·gsm8k + 0.7·gsmplus"
        assert overlapping_texts(fig, ax.get_yticklabels()) == []
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_leaderboard_negative_weights_read_best_on_top_with_longer_bars(scored_run):
    reg, _, _, ids = scored_run
    for c in ids:
        reg.log(reg.get(c), {"train_loss": 0.6})
    score = {"gsm8k": 1.0, "train_loss": -2.0}   # every score negative here
    rows = leaderboard(reg, "sft", score)
    assert len(rows) == 15 and all(r["score"] < 0 for r in rows)
    fig = leaderboard_figure(rows, score=score, run="sft")
    try:
        ax = fig.axes[0]
        bars = sorted(ax.patches, key=lambda p: p.get_y())          # bottom to top
        widths = [p.get_width() for p in bars]
        assert all(w > 0 for w in widths)
        assert widths == sorted(widths), widths                       # longer = higher = better
        left = ax.get_xlim()[0]
        assert all(p.get_x() == pytest.approx(left) for p in bars)    # every bar starts at the axis edge
        ends = [p.get_x() + p.get_width() for p in bars][::-1]
        assert ends == pytest.approx([r["score"] for r in rows])      # its end is the score
        assert "gsm8k − 2·train_loss (higher is better)" == ax.get_xlabel()
        assert "all 15 rows shown" in _legend_texts(fig)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_weights_plot_zooms_to_the_window_and_names_it(scored_run):
    reg, _, _, _ = scored_run
    ck = reg.select("sft", 5)
    w = W.for_checkpoints(ck, "mwa", metric="train_loss", penalty=0.7)
    fig = weights_figure(ck, "train_loss", w, run_ckpts=reg.checkpoints("sft", merged=False), run="sft",
                         method="mwa", penalty=0.7, window={"last": 5, "every": 1, "exclude_final": False})
    try:
        ax, axw = fig.axes
        assert ax.get_title() == "sft: mwa weights over train_loss\nlast 5 (steps 800–1200), penalty 0.7"
        x0, x1 = ax.get_xlim()
        assert 700 < x0 < 800 and 1200 < x1 < 1300, (x0, x1)   # the window, not the run's 100–1200
        y0, y1 = ax.get_ylim()
        vals = [c.metrics["train_loss"] for c in ck]
        assert y0 < min(vals) and max(vals) < y1
        assert [t.get_text() for t in axw.get_xticklabels()] == ["800", "900", "1000", "1100", "1200"]
        assert "run has 12 checkpoints, steps 100–1200" in axw.get_xlabel()
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_weights_plot_labels_do_not_overlap_for_a_long_window(tmp_path):
    steps = tuple(100000 + 250 * i for i in range(24))
    reg = make_lora_run(tmp_path, steps=steps, d=8, r=2, n_layers=1)
    ck = reg.select("sft", 22, exclude_final=True)
    w = W.for_checkpoints(ck, "uniform")
    fig = weights_figure(ck, "step", w, run_ckpts=reg.checkpoints("sft"), run="sft",
                         window={"last": 22, "every": 1, "exclude_final": True})
    try:
        texts = fig._ckptreg_texts
        assert overlapping_texts(fig, texts["xticks"]) == []
        assert overlapping_texts(fig, texts["weights"]) == []
        assert sum(t.get_visible() for t in texts["xticks"]) >= 3   # thinned, not all gone
        assert fig.axes[0].get_title() == ("sft: uniform weights\nlast 22, final excluded "
                                           f"(steps {ck[0].step}–{ck[-1].step}), no penalty")
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_cli_plots_are_written(scored_run):
    _, cli, tmp, _ = scored_run
    cli("leaderboard", "--run", "sft", "--score", "gsm8k=1,train_loss=-0.5", "--plot", tmp / "lb.png")
    cli("weights", "--run", "sft", "--last", 5, "--metric", "train_loss", "--penalty", 0.7, "--plot", tmp / "w.png")
    for p in ("lb.png", "w.png"):
        assert (tmp / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

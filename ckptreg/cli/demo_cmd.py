"""``ckptreg demo``: train a tiny transformer with LoRA on a CPU, register every checkpoint, run the
paper's merging procedure and print the leaderboard. torch is imported only when the command runs."""
from __future__ import annotations

import click

from . import pass_db
from ._fmt import emit_json, info, table


def _pct(v):
    return "" if v is None else f"{v:+.2f}%"


def _acc(v):
    return "" if v is None else f"{v:.4f}"


def _leaderboard_rows(rows, top, base=None):
    """Top merged rows plus the reference rows (final, last merging, base), like the paper's Table 2."""
    merged = [r for r in rows if r["kind"] == "merged" and r["score"] is not None][:top]
    refs = [r for r in rows if r["kind"] != "merged" and r.get("role")
            and any(x in r["role"].split(",") for x in ("final", "last_merging", "base"))]
    # the last merging checkpoint of the shortlisted soups and the final checkpoint, then the base
    out = []
    for r in merged + refs:
        out.append({
            "rank": r["rank"], "checkpoint": r["name"] or r["ref"], "role": r.get("role") or "",
            "heldout_acc": _acc(r.get("heldout_acc")),
            "heldout_loss": "" if r.get("heldout_loss") is None else f"{r['heldout_loss']:.4f}",
            "vs last merging": _pct(r.get("vs_last_merging")), "vs final": _pct(r.get("vs_final")),
            "vs base": _pct(r.get("vs_base")),
        })
    if base is not None:  # the base model lives in its own run: show it as the paper's last row
        out.append({"rank": None, "checkpoint": base["ref"], "role": "base (no adapter)",
                    "heldout_acc": _acc(base["heldout_acc"]), "heldout_loss": f"{base['heldout_loss']:.4f}",
                    "vs last merging": "", "vs final": "", "vs base": ""})
    if not any(r["vs base"] for r in out):  # base accuracy 0: a % change is undefined
        for r in out:
            del r["vs base"]
    return out


def _update_rows(baselines, n_ranked):
    """The update-space baselines, every one (whatever its rank), with the same columns."""
    return [{"rank": f"{b['rank']}/{n_ranked}", "checkpoint": b["name"], "method": b["method"], "space": b["space"],
             "heldout_acc": _acc(b["heldout_acc"]), "heldout_loss": f"{b['heldout_loss']:.4f}",
             "vs last merging": _pct(b["vs_last_merging"]), "vs final": _pct(b["vs_final"])}
            for b in baselines]


@click.command("demo", epilog="\b\nExample:\n  ckptreg demo --quick --out /tmp/ckptreg-demo")
@click.option("--out", "out", default="ckptreg-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the base model, adapters, merges, plots and summary.json.")
@click.option("--steps", type=click.IntRange(min=10), default=None,
              help="LoRA fine-tuning steps (default 640; 150 with --quick).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the task, model and training.")
@click.option("--quick", is_flag=True, help="Shortened demo (short base pretraining, 8+1 checkpoints, 22 merges; ~30 s), for tests.")
@click.option("--run", "run", default=None, help="Run name (default demo-seed<S>, suffixed when taken).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch CPU threads. 2 is ~1.5x faster on idle cores but far slower on busy ones; "
                   "the numbers depend on it.")
@click.option("--top", type=click.IntRange(min=1), default=15, show_default=True, help="Merged rows to print.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines; only the results.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@pass_db
def demo(db, out, steps, seed, quick, run, threads, top, quiet, as_json):
    """Train a tiny transformer with LoRA on arithmetic word problems (CPU, minutes), register each
    checkpoint from the training loop, merge them (uniform soups, MWA, TIES, DARE-TIES, SLERP; and
    with base pretrained delta-space TIES, DARE-TIES, TSV-M, Iso-C, STAR, KnOTS-TIES and core-space
    TIES), evaluate everything on held-out problems and print the leaderboard."""
    from ..demo import run_demo

    log = None if (quiet or as_json) else info
    summary = run_demo(db, out, steps=steps, seed=seed, quick=quick, run=run, threads=threads, log=log)
    if as_json:
        emit_json({k: v for k, v in summary.items() if k != "merged_paths"})
        return
    table(_leaderboard_rows(summary["leaderboard"], top, summary["base"]),
          title=f"leaderboard of run {summary['run']} (held-out exact match; % vs last merging / final / base)")
    if summary.get("update_baselines"):
        table(_update_rows(summary["update_baselines"], len(summary["leaderboard"])), right=("rank",),
              title="update-space baselines, base pretrained (all of them, ranked in the leaderboard above)")
    b, f, lm, best = summary["base"], summary["final"], summary["last_merging"], summary["best"]
    e = click.echo
    e(f"seed:                     {summary['seed']}  ({summary['threads']} torch thread(s); same seed and "
      f"threads give the same numbers)")
    e(f"base model alone:         accuracy {b['heldout_acc']:.4f}  loss {b['heldout_loss']:.4f}")
    e(f"final checkpoint:         accuracy {f['heldout_acc']:.4f}  loss {f['heldout_loss']:.4f}  ({f['ref']})")
    e(f"last merging checkpoint:  accuracy {lm['heldout_acc']:.4f}  loss {lm['heldout_loss']:.4f}  ({lm['ref']})")
    e(f"best merge:               {best['name']}  accuracy {best['heldout_acc']:.4f}  "
      f"({_pct(best['vs_last_merging'])} vs last merging, {_pct(best['vs_final'])} vs final)")
    for x in summary["mwa_vs_uniform"]:
        verdict = "beats" if x["best_mwa_acc"] > x["uniform_acc"] else (
            "ties" if x["best_mwa_acc"] == x["uniform_acc"] else "does NOT beat")
        e(f"MWA vs uniform soup:      best MWA {x['best_mwa']} {x['best_mwa_acc']:.4f} {verdict} "
          f"{x['window']} {x['uniform_acc']:.4f} ({_pct(x['pct'])})")
    if f["heldout_acc"] <= b["heldout_acc"]:
        e("warning: the final checkpoint is no better than the base model: training did not learn")
    for what, p in summary["plots"].items():
        e(f"plot ({what}):{' ' * max(1, 18 - len(what))}{p}")
    t = summary["timings"]
    e(f"time: {t['total_s']:.0f} s (pretrain {t['pretrain_s']:.0f}, fine-tune {t['finetune_s']:.0f}, "
      f"evaluate {t['eval_plain_s']:.0f}, merge+evaluate {t['merge_eval_s']:.0f}, report {t['report_s']:.0f}); "
      f"{summary['n_checkpoints']} checkpoints, {summary['n_merges']} merges")
    e(f"registry: {summary['db']}   summary: {summary['out']}/summary.json")
    e(f"next: ckptreg --db {summary['db']} leaderboard --run {summary['run']} --score heldout_acc "
      f"--base {summary['base']['ref']}")


COMMANDS = [demo]

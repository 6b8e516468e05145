"""Leaderboard: rank the merged and plain checkpoints of a run by a weighted evaluation score.

Layout of the paper's Table 2: every row has its metrics, the weighted score ``Σ w_k metric_k``
and the % change against

- the *last merging checkpoint* of that merge (the newest input, from the lineage) — blank for
  plain checkpoints (they are their own last merging checkpoint);
- the *final checkpoint* (highest-step plain checkpoint of the run);
- the base model, when one is given (``base=`` a checkpoint ref or id).

Scores are "higher is better" (evaluation accuracies). Checkpoints missing any score metric
are listed after the ranked rows as unscored (``rank`` None, ``missing`` naming the metrics),
never dropped. No torch.
"""
from __future__ import annotations

import difflib
import math

from .errors import NotFoundError, UsageError

__all__ = ["parse_score", "leaderboard", "pct_change"]


def parse_score(text) -> dict[str, float]:
    """``"gsm8k=0.3,gsmplus=0.7"`` -> {"gsm8k": 0.3, "gsmplus": 0.7}; a bare ``"gsm8k"`` -> weight 1."""
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" in part:
                k, v = part.split("=", 1)
                try:
                    items.append((k.strip(), float(v)))
                except ValueError:
                    raise UsageError(f"score weight for {k.strip()!r} is not a number: {v!r}") from None
            else:
                items.append((part, 1.0))
    out: dict[str, float] = {}
    for k, v in items:
        if not k:
            raise UsageError(f"empty metric name in score {text!r}")
        if not math.isfinite(float(v)):
            raise UsageError(f"score weight for {k!r} must be finite, got {v!r}")
        out[k] = float(v)
    if not out:
        raise UsageError("the score needs at least one metric (e.g. gsm8k=0.3,gsmplus=0.7)")
    return out


def pct_change(value, ref):
    if value is None or ref is None or ref == 0 or not math.isfinite(ref):
        return None
    return (value - ref) / abs(ref) * 100.0


def _score(c, weights):
    missing = [k for k in weights if k not in c.metrics or c.metrics[k] is None
               or not math.isfinite(float(c.metrics[k]))]
    if missing:
        return None, missing
    return math.fsum(w * float(c.metrics[k]) for k, w in weights.items()), []


def leaderboard(registry, run: str, score, base=None) -> list[dict]:
    """Rows (dicts) ranked by score, unscored rows last. Keys: rank, ref, id, kind, role, step,
    name, one key per score metric, score, vs_last_merging, vs_final, vs_base, last_merging,
    missing."""
    weights = parse_score(score)
    ckpts = registry.checkpoints(run)
    if not ckpts:
        runs = sorted({r["run"] for r in registry.runs()})
        close = difflib.get_close_matches(str(run), runs, n=3, cutoff=0.3)
        raise NotFoundError(f"run {run!r} has no checkpoints" + (
            f"; closest runs: {', '.join(close)}" if close else
            f"; runs: {', '.join(runs[:10])}" if runs else "; the registry is empty"))
    base_ck = registry.get(base) if base is not None else None
    logged = {k for c in ckpts + ([base_ck] if base_ck is not None else []) for k in c.metrics}
    unknown = [k for k in weights if k not in logged]
    if unknown:
        names = sorted(logged)
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, names, n=3, cutoff=0.4)
            if close:
                hints.append(f"{k!r}: closest {', '.join(close)}")
        raise NotFoundError(f"score metric{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                            f"not logged for any checkpoint of run {run!r}"
                            + (f" ({'; '.join(hints)})" if hints else "")
                            + (f"; metrics logged: {', '.join(names[:20])}" if names else "; no metrics logged"))
    plain = [c for c in ckpts if not c.merged and c.step is not None]
    final = max(plain, key=lambda c: c.step) if plain else None
    scores = {c.id: _score(c, weights) for c in ckpts}
    if base_ck is not None and base_ck.id not in scores:
        scores[base_ck.id] = _score(base_ck, weights)
    by_id = {c.id: c for c in ckpts}
    last_merging: dict[int, object] = {}
    for c in ckpts:
        if not c.merged:
            continue
        lin = registry.lineage(c.id)
        if not lin or not lin.get("inputs"):
            continue
        ins = []
        for i in lin["inputs"]:
            x = by_id.get(i["id"])
            if x is None:
                try:
                    x = registry.get(i["id"])
                except NotFoundError:
                    continue
                by_id[x.id] = x
                scores.setdefault(x.id, _score(x, weights))
            ins.append(x)
        stepped = [x for x in ins if x.step is not None]
        if stepped:
            last_merging[c.id] = max(stepped, key=lambda x: x.step)
    lm_ids = {x.id for x in last_merging.values()}
    final_score = scores[final.id][0] if final is not None else None
    base_score = scores[base_ck.id][0] if base_ck is not None else None

    rows = []
    for c in ckpts:
        s, missing = scores[c.id]
        lm = last_merging.get(c.id)
        role = []
        if final is not None and c.id == final.id:
            role.append("final")
        if c.id in lm_ids:
            role.append("last_merging")
        if base_ck is not None and c.id == base_ck.id:
            role.append("base")
        row = {"rank": None, "ref": c.ref, "id": c.id, "kind": "merged" if c.merged else "plain",
               "role": ",".join(role), "step": c.step, "name": c.name}
        for k in weights:
            row[k] = c.metrics.get(k)
        row["score"] = s
        row["vs_last_merging"] = pct_change(s, scores[lm.id][0]) if (lm is not None and c.merged) else None
        row["vs_final"] = pct_change(s, final_score)
        row["vs_base"] = pct_change(s, base_score) if base_ck is not None else None
        row["last_merging"] = lm.ref if lm is not None else None
        row["missing"] = missing
        rows.append(row)
    scored = sorted((r for r in rows if r["score"] is not None),
                    key=lambda r: (-r["score"], r["kind"] != "merged", r["id"]))
    for i, r in enumerate(scored, 1):
        r["rank"] = i
    unscored = [r for r in rows if r["score"] is None]
    return scored + unscored

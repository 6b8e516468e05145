"""The model card (``README.md``) written into every merge output folder.

It says what the folder holds and how to make it again: method, parameters (constants and
per-tensor rules), inputs (refs) with their weights and fingerprints, the base, space / rank /
output dtype, the ckptreg version, the ``ckptreg merge --replay RUN@NAME`` line and the
equivalent recipe file. Everything comes from the recipe stored in the output's safetensors
metadata (``ckptreg_recipe``), so the card and the metadata never disagree.

A single-file output (``NAME.safetensors``) has no folder to hold a card: none is written
beside it (a stray README.md next to other files would be a file ckptreg cannot call its own);
its metadata keeps the recipe, and ``ckptreg show`` / ``--replay`` read it from there.
"""
from __future__ import annotations

import json

__all__ = ["CARD_NAME", "render_card", "card_for"]

#: the card's file name inside an output folder (listed in the folder's ``ckptreg_files``)
CARD_NAME = "README.md"


def _fmt(v) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v, sort_keys=True) + "`"
    return f"`{v}`" if v is not None else "—"


def render_card(recipe: dict, *, run: str | None = None) -> str:
    """The card of a merge output from its stored recipe dict (``ckptreg_recipe``) and the run
    it is registered in (the ``--replay`` line names ``RUN@NAME``)."""
    from .. import __version__
    from .recipe import recipe_yaml

    name = recipe.get("name") or "merged"
    ref = f"{run}@{name}" if run else name
    method = recipe.get("method")
    lines = [f"# {name}", "",
             f"A merge of {len(recipe.get('inputs') or [])} checkpoint(s) with **{method}**, written by "
             f"ckptreg {__version__}" + (f" at {recipe['created']}" if recipe.get("created") else "") + ".", "",
             "## Method", "",
             "| setting | value |", "|---|---|",
             f"| method | `{method}` |",
             f"| space | `{recipe.get('space') or 'factors'}` |"]
    if recipe.get("rank") is not None:
        lines.append(f"| rank | {recipe['rank']} |")
    lines.append(f"| output dtype | {_fmt(recipe.get('out_dtype')) if recipe.get('out_dtype') else 'as stored'} |")
    for k, v in sorted((recipe.get("params") or {}).items()):
        if k == "rules":
            continue
        lines.append(f"| {k} | {_fmt(v)} |")
    sel = recipe.get("selection") or {}
    if sel:
        lines.append(f"| selection | {_fmt(sel)} |")
    lines.append("")
    rules = recipe.get("param_rules") or {}
    if rules:
        lines += ["## Parameters that vary by tensor", "",
                  "First matching rule wins (filter: a substring of the tensor name); a list of values is a "
                  "gradient interpolated linearly over the layer index.", "",
                  "| parameter | filter | value |", "|---|---|---|"]
        for p, rs in sorted(rules.items()):
            for r in rs:
                lines.append(f"| {p} | {_fmt(r.get('filter')) if r.get('filter') else '(every tensor)'} | "
                             f"{_fmt(r.get('value'))} |")
        lines.append("")
    lines += ["## Inputs", "", "| # | checkpoint | id | weight | fingerprint |", "|---|---|---|---|---|"]
    for i, x in enumerate(recipe.get("inputs") or []):
        lines.append(f"| {i} | `{x.get('ref')}` | {x.get('id')} | {_fmt(x.get('weight'))} | `{x.get('fingerprint')}` |")
    lines.append("")
    b = recipe.get("base")
    lines += ["## Base", ""]
    if b:
        lines += [f"`{b.get('ref')}` (id {b.get('id')}, fingerprint `{b.get('fingerprint')}`)", ""]
    else:
        lines += ["none", ""]
    lines += ["## Reproduce", "",
              "Re-run this merge from its stored recipe and check the result tensor for tensor:", "",
              "```sh", f"ckptreg merge --replay {ref} -o {name}-replay", "```", "",
              "or from a recipe file (`ckptreg merge --recipe recipe.yaml`):", "",
              "```yaml", recipe_yaml(recipe).rstrip("\n"), "```", ""]
    return "\n".join(lines)


def card_for(metadata: dict, run: str | None = None) -> str | None:
    """The card of an output from the metadata its writer is given (``ckptreg_recipe`` JSON);
    None when there is no recipe. For the output target: a folder layout writes it as
    :data:`CARD_NAME` and lists it in ``ckptreg_files`` (a copied input README.md, the input
    model's card, is not copied)."""
    raw = (metadata or {}).get("ckptreg_recipe")
    if not raw:
        return None
    rec = json.loads(raw) if isinstance(raw, str) else raw
    return render_card(rec, run=run)

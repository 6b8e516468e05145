"""Lightning ``checkpoints/`` folders for ``ckptreg scan`` (no lightning import; torch lazily).

* :func:`find_ckpts`: the ``*.ckpt`` files of a folder (or of its ``checkpoints/`` subfolder),
  with the step from the name (``epoch=E-step=S.ckpt``, ``step=S.ckpt``); ``last*.ckpt`` is
  left out (overwritten in place).
* :func:`ckpt_metrics`: the monitored value a ``ModelCheckpoint`` stored in the file's
  ``callbacks`` state (``monitor`` -> ``current_score``). Lightning takes it from
  ``callback_metrics`` when it saves, which may hold a value of an earlier validation, so its
  step is not known: it is stored with step None. The file is read by
  :mod:`ckptreg.safe_pickle` (nothing in it runs).
"""
from __future__ import annotations

import math
import os

__all__ = ["find_ckpts", "ckpt_metrics"]


def find_ckpts(folder) -> list[tuple[int, str]]:
    """(step, path) of each ``.ckpt`` with a step in its name, ascending; [] when none."""
    from ..formats import infer_step

    folder = os.fspath(folder)
    out: list[tuple[int, str]] = []
    for d in (folder, os.path.join(folder, "checkpoints")):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            p = os.path.join(d, name)
            if not name.endswith(".ckpt") or name.startswith("last") or not os.path.isfile(p):
                continue
            step = infer_step(p)
            if step is not None:
                out.append((step, p))
        if out:
            break
    return sorted(out)


def ckpt_metrics(path) -> tuple[dict[str, float], dict[str, int | None]]:
    """({monitor: current_score}, {monitor: None}) from the ModelCheckpoint states in ``path``;
    ({}, {}) when there are none or the file cannot be read (the checkpoint itself is what
    `scan` imports; its add reports a bad file)."""
    from .. import safe_pickle

    try:
        obj = safe_pickle.torch_load(os.fspath(path))
    except Exception:  # noqa: BLE001 - best effort: metrics only
        return {}, {}
    cbs = obj.get("callbacks") if isinstance(obj, dict) else None
    metrics: dict[str, float] = {}
    if isinstance(cbs, dict):
        for key, st in cbs.items():
            if not (isinstance(key, str) and key.startswith("ModelCheckpoint") and isinstance(st, dict)):
                continue
            mon, cur = st.get("monitor"), st.get("current_score")
            if not isinstance(mon, str) or not mon or cur is None:
                continue
            try:
                v = float(cur.item() if hasattr(cur, "item") else cur)
            except (TypeError, ValueError, RuntimeError):
                continue
            if not math.isnan(v) or mon not in metrics:
                metrics[mon] = v
    return metrics, {k: None for k in metrics}

"""HF Trainer ``trainer_state.json`` / ``log_history``: which logged values belong to a checkpoint.

One parser, used by the HF callback (:mod:`ckptreg.integrations.hf`, from ``state.log_history``)
and by ``ckptreg scan`` (from the newest ``trainer_state.json`` of an output folder). Plain
Python: importing it imports neither transformers nor torch.

The rule (:func:`metrics_for_save`): a checkpoint saved at step N gets

* ``train_loss``: the last ``loss`` logged in ``(P, N]``, P the previous save's step (with
  ``logging_steps=7, save_steps=10`` the checkpoint of step 10 gets the loss of step 7 and says
  so; the one of step 20 gets step 14's; a loss logged before the previous save is not attached);
* every ``eval_*`` value logged at step N (an evaluation at another step measured other weights);
  speed counters (``*_runtime``, ``*_per_second``) only with ``keep_speed``;

each with the step it was logged at (``Registry.add(metric_steps=...)``).
"""
from __future__ import annotations

import json
import os

__all__ = ["SPEED_SUFFIXES", "read_trainer_state", "previous_save", "saves_every", "metrics_for_save"]

SPEED_SUFFIXES = ("_runtime", "_per_second")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_trainer_state(folder, ckpt_dirs=()) -> dict | None:
    """The newest readable ``trainer_state.json`` among ``folder`` and the ``checkpoint-N``
    folders in ``ckpt_dirs`` (paths, or (step, path) pairs): highest ``global_step``, then the
    longest ``log_history``, then the newest file. None when there is none (unreadable files are
    passed over: the metrics are a best effort, the checkpoints are what is imported)."""
    dirs = [d[1] if isinstance(d, tuple) else d for d in ckpt_dirs]
    cands = [os.path.join(os.fspath(folder), "trainer_state.json")] + [
        os.path.join(os.fspath(d), "trainer_state.json") for d in dirs]
    best, best_key = None, None
    for p in cands:
        if not os.path.isfile(p):
            continue
        try:
            with open(p) as f:
                st = json.load(f)
            if not isinstance(st, dict):
                continue
            hist = st.get("log_history")
            gs = st.get("global_step")
            key = (gs if _is_int(gs) else 0, len(hist) if isinstance(hist, list) else 0, os.path.getmtime(p))
        except (OSError, ValueError):
            continue
        if best_key is None or key > best_key:
            best, best_key = st, key
    return best


def saves_every(state: dict | None, steps) -> int | None:
    """``save_steps`` of a trainer_state.json when the saved steps agree with it (every step but
    the last, which may be the run's final save, is a multiple of it); else None (an epoch-based
    save strategy also writes a ``save_steps``, which then says nothing about the saves)."""
    if not isinstance(state, dict):
        return None
    n = state.get("save_steps")
    if not _is_int(n) or n <= 0:
        return None
    steps = sorted(steps)
    if not steps or any(s % n for s in steps[:-1]):
        return None
    return n


def previous_save(step: int, saves=(), save_steps: int | None = None) -> int | None:
    """The step of the save before ``step``: the largest of ``saves`` below it and, with a
    step-based save interval, the last multiple of ``save_steps`` below it (so a folder deleted by
    ``save_total_limit`` still counts). None when ``step`` is the first save."""
    cands = [int(s) for s in saves if _is_int(s) and s < step]
    if _is_int(save_steps) and save_steps > 0:
        m = ((step - 1) // save_steps) * save_steps
        if m > 0:
            cands.append(m)
    return max(cands) if cands else None


def metrics_for_save(log_history, step: int, prev: int | None = None, *,
                     keep_speed: bool = False) -> tuple[dict[str, float], dict[str, int]]:
    """(metrics, metric_steps) for the checkpoint saved at ``step``, ``prev`` the previous save's
    step (None: the first save). See the module docstring for the rule."""
    metrics: dict[str, float] = {}
    steps: dict[str, int] = {}
    train = None
    for e in log_history or ():
        if not isinstance(e, dict):
            continue
        s = e.get("step")
        if not _is_int(s) or s > step:
            continue
        loss = e.get("loss")
        if _is_num(loss) and (prev is None or s > prev):
            if train is None or s >= train[0]:
                train = (s, float(loss))
        if s == step:
            for k, v in e.items():
                if (isinstance(k, str) and k.startswith("eval_") and _is_num(v)
                        and (keep_speed or not k.endswith(SPEED_SUFFIXES))):
                    metrics[k] = float(v)
                    steps[k] = s
    if train is not None:
        metrics = {"train_loss": train[1], **metrics}
        steps = {"train_loss": train[0], **steps}
    return metrics, steps

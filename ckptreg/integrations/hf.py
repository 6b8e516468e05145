"""``CkptregCallback`` for ``transformers.Trainer``: registers every ``checkpoint-N`` folder.

    trainer = Trainer(..., callbacks=[CkptregCallback(run="sft-1", db="runs.duckdb")])

On ``on_save`` (main process only) the folder ``{output_dir}/checkpoint-{global_step}`` is
registered with ``step = global_step`` and metrics:

* ``train_loss``: the ``loss`` of the last ``log_history`` entry with one at or before the step
  (the name ``ckptreg scan`` and the README use);
* every ``eval_*`` value logged at that step (speed counters ``*_runtime``/``*_per_second`` are
  left out unless ``keep_speed=True``).

Evaluation can also run after the save of the same step (or a separate ``trainer.evaluate()``
at the end): ``on_evaluate`` then attaches the new eval metrics with ``Registry.log`` to the
checkpoint of that step if this callback registered it. A busy database never stops training
(``Registry.add`` spools); other registry errors become warnings (``strict=True`` raises them).
"""
from __future__ import annotations

import os

from transformers import TrainerCallback

from . import _Reporter, to_float_metrics

_SPEED = ("_runtime", "_per_second")


class CkptregCallback(_Reporter, TrainerCallback):
    def __init__(self, run: str, db=None, tags: dict | None = None, *, strict: bool = False,
                 replace: bool = False, keep_speed: bool = False, lock_timeout: float | None = None):
        self._init_common(run, db, tags, strict, replace, lock_timeout)
        self.keep_speed = keep_speed

    # ------------------------------------------------------------------ metrics from log_history

    def _eval_ok(self, k) -> bool:
        return k.startswith("eval_") and (self.keep_speed or not k.endswith(_SPEED))

    def metrics_at(self, log_history, step: int) -> dict[str, float]:
        """Train loss at/just before ``step`` and eval metrics logged at ``step``."""
        out: dict[str, float] = {}
        loss = None
        for e in log_history:
            s = e.get("step")
            if s is None:
                continue
            if "loss" in e and s <= step:
                loss = e["loss"]
            if s == step:
                for k, v in to_float_metrics({k: v for k, v in e.items() if self._eval_ok(k)}).items():
                    out[k] = v
        if loss is not None:
            out = {"train_loss": float(loss), **out}
        return out

    # ------------------------------------------------------------------ hooks

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        step = int(state.global_step)
        folder = os.path.join(args.output_dir, f"checkpoint-{step}")
        if not os.path.isdir(folder):
            self._guard(f"registering {folder}", lambda: _missing(folder))
            return
        self._add(folder, step, self.metrics_at(state.log_history, step))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero:
            return
        step = int(state.global_step)
        if step not in self.registered:
            return  # evaluated before the save of this step: on_save reads it from log_history
        late = {k: v for k, v in to_float_metrics(metrics).items() if self._eval_ok(k)}
        self._log(step, late)


def _missing(folder):
    from ..errors import NotFoundError

    raise NotFoundError(f"{folder}: the Trainer reported a save but the checkpoint folder is not there")

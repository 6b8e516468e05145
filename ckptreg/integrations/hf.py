"""``CkptregCallback`` for ``transformers.Trainer``: registers every ``checkpoint-N`` folder.

    trainer = Trainer(..., callbacks=[CkptregCallback(run="sft-1", db="runs.duckdb")])

On ``on_save`` (main process only) the folder ``{output_dir}/checkpoint-{global_step}`` is
registered with ``step = global_step`` and metrics:

* ``train_loss``: the last ``loss`` logged since the previous save (the name ``ckptreg scan``
  and the README use), stored with the step it was logged at (``logging_steps=7,
  save_steps=10``: the checkpoint of step 10 holds step 7's loss and says 7; none is attached
  when no loss was logged since the previous save);
* every ``eval_*`` value logged at that step (speed counters ``*_runtime``/``*_per_second`` are
  left out unless ``keep_speed=True``).

The rule is :func:`ckptreg.integrations.hf_state.metrics_for_save`, the one ``ckptreg scan``
uses. What happened to each save is in ``results()`` (registered id, spooled, failed + reason).

Evaluation can also run after the save of the same step (or a separate ``trainer.evaluate()``
at the end): ``on_evaluate`` then attaches the new eval metrics with ``Registry.log`` to the
checkpoint of that step if this callback registered it. A busy database never stops training
(``Registry.add`` spools); other registry errors become warnings (``strict=True`` raises them).
"""
from __future__ import annotations

import os

from transformers import TrainerCallback

from . import _Reporter, to_float_metrics
from .hf_state import metrics_for_save, previous_save

_SPEED = ("_runtime", "_per_second")


class CkptregCallback(_Reporter, TrainerCallback):
    def __init__(self, run: str, db=None, tags: dict | None = None, *, strict: bool = False,
                 replace: bool | None = None, keep_speed: bool = False, lock_timeout: float | None = None,
                 retention: dict | None = None):
        self._init_common(run, db, tags, strict, replace, lock_timeout)
        self.retention = self._retention_policy(retention)   # gc policy applied after each save
        self.last_retention = None
        self.keep_speed = keep_speed

    # ------------------------------------------------------------------ metrics from log_history

    def _eval_ok(self, k) -> bool:
        return k.startswith("eval_") and (self.keep_speed or not k.endswith(_SPEED))

    def metrics_at(self, log_history, step: int, prev: int | None = None) -> dict[str, float]:
        """The metrics stored with the checkpoint of ``step`` (``prev``: the previous save's
        step): see :func:`ckptreg.integrations.hf_state.metrics_for_save`."""
        return metrics_for_save(log_history, step, prev, keep_speed=self.keep_speed)[0]

    def _previous_save(self, args, state, step: int) -> int | None:
        """The step of the save before ``step``: saves this callback saw, the checkpoint-N folders
        still in output_dir, and (step-based saving) the last multiple of save_steps."""
        seen = set(self.registered) | set(self.failed)
        try:
            for name in os.listdir(args.output_dir):
                if name.startswith("checkpoint-") and name[11:].isdigit():
                    seen.add(int(name[11:]))
        except OSError:
            pass
        strategy = getattr(args.save_strategy, "value", args.save_strategy)
        every = getattr(state, "save_steps", None) if strategy == "steps" else None
        return previous_save(step, seen, every if isinstance(every, int) else None)

    # ------------------------------------------------------------------ hooks

    def on_train_begin(self, args, state, control, **kwargs):
        # the run's hyperparameters, once per run (TrainingArguments + the git commit of the cwd)
        if not state.is_world_process_zero:
            return
        try:
            targs = args.to_dict()
        except Exception:  # noqa: BLE001 - an exotic args object must not stop training
            targs = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        self._record_params({"training_args": targs})

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        step = int(state.global_step)
        folder = os.path.join(args.output_dir, f"checkpoint-{step}")
        if not os.path.isdir(folder):
            self._guard(f"registering {folder}", lambda: _missing(folder))
            return
        metrics, steps = metrics_for_save(state.log_history, step, self._previous_save(args, state, step),
                                          keep_speed=self.keep_speed)
        self._apply_retention(self._add(folder, step, metrics, metric_steps=steps))

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


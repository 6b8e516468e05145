"""``CkptregCallback`` for ``pytorch_lightning.Trainer``: registers every checkpoint file saved.

    trainer = pl.Trainer(callbacks=[ModelCheckpoint(every_n_train_steps=50, save_top_k=-1),
                                    CkptregCallback(run="mlp-1", db="runs.duckdb")])

How it finds saves: ``ModelCheckpoint`` (and any user code) saves through
``trainer.save_checkpoint(filepath, ...)``; in ``setup`` the callback wraps that method on this
trainer instance, so it learns the exact path, ``trainer.global_step`` and
``trainer.callback_metrics`` (tensors -> floats) of each save, right after the file is written.
Metrics at their step: ``callback_metrics`` keeps a value until it is logged again, so the
callback notes the global step at which each value appeared or changed (batch end, validation
end, epoch end, save) and a save gets only the values produced since the previous save, each with
its step (a ``val_loss`` of step 10 is not stored under step 15). Validation that runs after the
save at the same step (the usual order with ``every_n_train_steps``) is attached in
``on_validation_end`` with ``Registry.log``.
The wrap is removed in ``teardown``. Saves whose file is not on disk yet (asynchronous checkpoint
IO) are retried at the next batch end / validation end / train end.

Rules: only the global-zero process registers; one checkpoint per step (the first file saved at a
step; a second file at the same step, e.g. a monitored top-k copy, is skipped); ``last*.ckpt``
files are skipped unless ``include_last=True`` (they are overwritten in place, so a registry
entry for them would go stale). Lightning ``.ckpt`` files are pickles written by the user's own
trainer, so they are registered with ``allow_pickle=True``: loaded ``weights_only``, and a file
whose ``hyper_parameters`` hold other objects (a ``Path``, a dataclass) has only its
``state_dict`` read, by a restricted unpickler that runs none of its code
(:mod:`ckptreg.safe_pickle`). ``results()`` says what happened to each save: registered (id),
spooled, or failed with the reason.
A busy database never stops training (``Registry.add`` spools); other registry errors become
warnings unless ``strict=True``.
"""
from __future__ import annotations

import functools
import os

import pytorch_lightning as pl

from . import _Reporter, to_float_metrics


class CkptregCallback(_Reporter, pl.Callback):
    def __init__(self, run: str, db=None, tags: dict | None = None, *, strict: bool = False,
                 replace: bool | None = None, include_last: bool = False, lock_timeout: float | None = None,
                 retention: dict | None = None):
        super().__init__()
        self._init_common(run, db, tags, strict, replace, lock_timeout)
        self.retention = self._retention_policy(retention)   # gc policy applied after each save
        self.last_retention = None
        self.include_last = include_last
        self._pending: list[tuple[str, int, dict]] = []
        self._saved_metrics: dict[int, dict[str, float]] = {}
        # name -> (value, the global step that value was produced at): callback_metrics keeps a
        # value until it is logged again, so a save must not take an old one for its own
        self._metric_at: dict[str, tuple[float, int]] = {}
        self._save_steps: dict[int, dict[str, int]] = {}   # step -> metric_steps of its save
        self._last_save: int | None = None
        self._wrapped = None

    # ------------------------------------------------------------------ wrap trainer.save_checkpoint

    def setup(self, trainer, pl_module, stage):
        if self._wrapped is not None or stage not in ("fit", None):
            return
        original = trainer.save_checkpoint
        cb = self

        @functools.wraps(original)
        def save_checkpoint(filepath, *args, **kwargs):
            out = original(filepath, *args, **kwargs)
            cb._saved(trainer, filepath)
            return out

        trainer.save_checkpoint = save_checkpoint
        self._wrapped = (trainer, original)

    def teardown(self, trainer, pl_module, stage):
        self._flush()
        if self._wrapped is not None and self._wrapped[0] is trainer:
            try:
                del trainer.save_checkpoint   # drop the instance attribute: the class method is back
            except AttributeError:
                pass
            self._wrapped = None

    def _saved(self, trainer, filepath):
        if not trainer.is_global_zero:
            return
        path = os.fspath(filepath)
        if not self.include_last and os.path.basename(path).startswith("last"):
            return
        step = int(trainer.global_step)
        if step in self.registered or step in self.failed or any(s == step for _, s, _ in self._pending):
            return
        self._observe(trainer)
        prev, self._last_save = self._last_save, step
        # only values produced since the previous save (at this step or after `prev`), with their step
        now = self._metric_at
        metrics = {k: v for k, (v, s) in now.items() if prev is None or s > prev}
        self._save_steps[step] = {k: now[k][1] for k in metrics}
        self._pending.append((path, step, metrics))
        self._flush()

    def _observe(self, trainer):
        """Note the step of every callback_metrics value that is new or changed since last seen."""
        step = int(trainer.global_step)
        for k, v in to_float_metrics(trainer.callback_metrics).items():
            old = self._metric_at.get(k)
            if old is None or not (old[0] == v or (old[0] != old[0] and v != v)):
                self._metric_at[k] = (v, step)

    def _flush(self):
        keep = []
        for path, step, metrics in self._pending:
            if not os.path.exists(path):
                keep.append((path, step, metrics))
                continue
            self._apply_retention(self._add(path, step, metrics, allow_pickle=True,
                                             metric_steps=self._save_steps.pop(step, None)))
            if step in self.registered:   # registered or spooled; a failure is in self.failed
                self._saved_metrics[step] = dict(metrics)
        self._pending = keep

    # ------------------------------------------------------------------ retries for async IO

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            self._observe(trainer)
        if self._pending:
            self._flush()

    def on_validation_end(self, trainer, pl_module):
        if self._pending:
            self._flush()
        # Validation that ran after this step's save (ModelCheckpoint(every_n_train_steps) saves at
        # batch end, validation follows): attach the values that are new or changed since the save.
        step = int(trainer.global_step)
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._observe(trainer)
        if step not in self._saved_metrics:
            return
        before = self._saved_metrics[step]
        late = {k: v for k, (v, s) in self._metric_at.items()
                if s == step and (k not in before or before[k] != v)}
        if late:
            self._log(step, late)
            before.update(late)

    def on_train_start(self, trainer, pl_module):
        # the run's hyperparameters, once per run (save_hyperparameters() + the git commit)
        if not trainer.is_global_zero:
            return
        params = {}
        try:
            hp = dict(getattr(pl_module, "hparams", None) or {})
            if hp:
                params["hparams"] = hp
            dm = getattr(trainer, "datamodule", None)
            dhp = dict(getattr(dm, "hparams", None) or {}) if dm is not None else {}
            if dhp:
                params["datamodule_hparams"] = dhp
        except Exception:  # noqa: BLE001 - odd hparams containers must not stop training
            pass
        self._record_params(params)

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self._observe(trainer)   # epoch-level values belong to the epoch's last step

    def on_train_end(self, trainer, pl_module):
        if self._pending:
            self._flush()


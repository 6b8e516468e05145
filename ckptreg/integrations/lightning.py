"""``CkptregCallback`` for ``pytorch_lightning.Trainer``: registers every checkpoint file saved.

    trainer = pl.Trainer(callbacks=[ModelCheckpoint(every_n_train_steps=50, save_top_k=-1),
                                    CkptregCallback(run="mlp-1", db="runs.duckdb")])

How it finds saves: ``ModelCheckpoint`` (and any user code) saves through
``trainer.save_checkpoint(filepath, ...)``; in ``setup`` the callback wraps that method on this
trainer instance, so it learns the exact path, ``trainer.global_step`` and
``trainer.callback_metrics`` (tensors -> floats) of each save, right after the file is written.
Validation that runs after the save at the same step (the usual order with
``every_n_train_steps``) is attached in ``on_validation_end`` with ``Registry.log`` (the values
that are new or changed since the save).
The wrap is removed in ``teardown``. Saves whose file is not on disk yet (asynchronous checkpoint
IO) are retried at the next batch end / validation end / train end.

Rules: only the global-zero process registers; one checkpoint per step (the first file saved at a
step; a second file at the same step, e.g. a monitored top-k copy, is skipped); ``last*.ckpt``
files are skipped unless ``include_last=True`` (they are overwritten in place, so a registry
entry for them would go stale). Lightning ``.ckpt`` files are pickles written by the user's own
trainer, so they are registered with ``allow_pickle=True`` (loaded ``weights_only``).
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
                 replace: bool = False, include_last: bool = False, lock_timeout: float | None = None):
        super().__init__()
        self._init_common(run, db, tags, strict, replace, lock_timeout)
        self.include_last = include_last
        self._pending: list[tuple[str, int, dict]] = []
        self._saved_metrics: dict[int, dict[str, float]] = {}
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
        if step in self.registered or any(s == step for _, s, _ in self._pending):
            return
        metrics = to_float_metrics(trainer.callback_metrics)
        self._pending.append((path, step, metrics))
        self._flush()

    def _flush(self):
        keep = []
        for path, step, metrics in self._pending:
            if not os.path.exists(path):
                keep.append((path, step, metrics))
                continue
            self._add(path, step, metrics, allow_pickle=True)
            self.registered.setdefault(step, None)
            self._saved_metrics[step] = dict(metrics)
        self._pending = keep

    # ------------------------------------------------------------------ retries for async IO

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._pending:
            self._flush()

    def on_validation_end(self, trainer, pl_module):
        if self._pending:
            self._flush()
        # Validation that ran after this step's save (ModelCheckpoint(every_n_train_steps) saves at
        # batch end, validation follows): attach the values that are new or changed since the save.
        step = int(trainer.global_step)
        if trainer.sanity_checking or not trainer.is_global_zero or step not in self._saved_metrics:
            return
        before = self._saved_metrics[step]
        now = to_float_metrics(trainer.callback_metrics)
        late = {k: v for k, v in now.items() if k not in before or before[k] != v}
        if late:
            self._log(step, late)
            before.update(late)

    def on_train_end(self, trainer, pl_module):
        if self._pending:
            self._flush()

"""Trainer callbacks that register every checkpoint a training run saves.

* :mod:`ckptreg.integrations.hf` — ``CkptregCallback`` for ``transformers.Trainer``.
* :mod:`ckptreg.integrations.lightning` — ``CkptregCallback`` for ``pytorch_lightning.Trainer``.

Importing this package imports neither transformers nor lightning; import the submodule you need.
Shared, dependency-free helpers live here.
"""
from __future__ import annotations

import warnings

__all__ = ["to_float_metrics"]


def to_float_metrics(d) -> dict[str, float]:
    """Keep the scalar numeric entries of ``d`` as Python floats (tensors via ``.item()``)."""
    out: dict[str, float] = {}
    for k, v in (d or {}).items():
        if isinstance(v, bool):
            continue
        if hasattr(v, "numel") and hasattr(v, "item"):  # torch / numpy scalars, without importing torch
            try:
                if v.numel() != 1:
                    continue
                v = v.item()
            except Exception:
                continue
        elif hasattr(v, "item") and not isinstance(v, (int, float)):
            try:
                v = v.item()
            except Exception:
                continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(k)] = float(v)
    return out


class _Reporter:
    """Common registration logic: busy databases spool (Registry.add returns None); any other
    ckptreg error is raised when ``strict`` else turned into a warning and kept in ``errors``,
    so a registry problem never stops a training run."""

    def _init_common(self, run, db, tags, strict, replace, lock_timeout=None):
        if not isinstance(run, str) or not run:
            raise ValueError("CkptregCallback: run must be a non-empty string")
        self.run = run
        self.db = db
        self.tags = dict(tags or {})
        self.strict = strict
        self.replace = replace
        self.lock_timeout = lock_timeout   # None: the Registry default; short bounds spool sooner
        self.registered: dict[int, int | None] = {}   # step -> id (None: spooled)
        self.errors: list[str] = []

    def _registry(self):
        from ..registry import Registry

        if self.lock_timeout is None:
            return Registry(self.db)
        return Registry(self.db, lock_timeout=self.lock_timeout)

    def _guard(self, what, fn):
        from ..errors import CkptregError, LockTimeout

        try:
            return fn()
        except LockTimeout as e:  # the registry spools on busy; a lock error left over must not stop training
            self.errors.append(f"{what}: {e}")
            warnings.warn(f"ckptreg: {what}: {e}", RuntimeWarning, stacklevel=3)
        except CkptregError as e:
            if self.strict:
                raise
            self.errors.append(f"{what}: {e}")
            warnings.warn(f"ckptreg: {what}: {e}", RuntimeWarning, stacklevel=3)
        except OSError as e:
            if self.strict:
                raise
            self.errors.append(f"{what}: {e}")
            warnings.warn(f"ckptreg: {what}: {e}", RuntimeWarning, stacklevel=3)
        return None

    def _add(self, path, step, metrics, allow_pickle=False):
        def do():
            cid = self._registry().add(path, run=self.run, step=step, metrics=metrics or None,
                                       tags=self.tags or None, replace=self.replace,
                                       allow_pickle=allow_pickle)
            self.registered[step] = cid
            return cid

        return self._guard(f"registering {path} as {self.run}@{step}", do)

    def _log(self, step, metrics):
        if not metrics:
            return None

        def do():
            self._registry().log(f"{self.run}@{step}", metrics)

        return self._guard(f"logging metrics to {self.run}@{step}", do)


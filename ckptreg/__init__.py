"""ckptreg: a checkpoint registry on embedded DuckDB and a streaming merge engine.

``import ckptreg`` stays light (no torch, no transformers): heavy modules load on first use.
"""
from __future__ import annotations

from .errors import (  # noqa: F401
    BackendError,
    ChangedError,
    CkptregError,
    DuplicateError,
    FormatError,
    LockTimeout,
    MismatchError,
    NotFoundError,
    OutputExistsError,
    ParameterError,
    SelectionError,
    UsageError,
    WeightError,
)

__version__ = "0.1.0"

_LAZY = {
    "Registry": ("ckptreg.registry", "Registry"),
    "Checkpoint": ("ckptreg.registry", "Checkpoint"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'ckptreg' has no attribute {name!r}")


def add(path, run, step=None, metrics=None, tags=None, *, db=None, replace=False, allow_pickle=False,
        lock_timeout=None):
    """Register a checkpoint in the default registry (``CKPTREG_DB`` or ./ckptreg.duckdb).

    Meant for training loops: if the database stays busy past a short bound (``lock_timeout``
    seconds; default ``$CKPTREG_LOCK_TIMEOUT``, else 1 s), the entry is spooled beside the
    database and ingested by the next opener, and this returns None instead of an id. The same
    files at the same step again return the existing id (nothing changes).
    """
    from .registry import Registry, lock_timeout_for_training

    if lock_timeout is None:
        lock_timeout = lock_timeout_for_training()
    return Registry(db, lock_timeout=lock_timeout).add(
        path, run=run, step=step, metrics=metrics, tags=tags, replace=replace, allow_pickle=allow_pickle
    )

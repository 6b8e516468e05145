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


def add(path, run, step=None, metrics=None, tags=None, *, db=None, replace=False, allow_pickle=False):
    """Register a checkpoint in the default registry (``CKPTREG_DB`` or ./ckptreg.duckdb).

    Meant for training loops: if the database stays locked past the bound, the entry is spooled
    beside the database and ingested by the next opener, and this returns None instead of an id.
    """
    from .registry import Registry

    return Registry(db).add(
        path, run=run, step=step, metrics=metrics, tags=tags, replace=replace, allow_pickle=allow_pickle
    )

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

import sys as _sys
import types as _types

from .api import Leaderboard, SweepPlan, plan_sweep, sweep  # noqa: E402,F401  (light: no torch)

__all__ = ["add", "merge", "sweep", "plan_sweep", "leaderboard", "Registry", "Checkpoint", "SweepPlan",
           "Leaderboard", "__version__"]

_LAZY = {
    "Registry": ("ckptreg.registry", "Registry"),
    "Checkpoint": ("ckptreg.registry", "Checkpoint"),
}

# ``ckptreg.merge(...)`` and ``ckptreg.leaderboard(...)`` share their names with the submodules
# ``ckptreg.merge`` (the merge package) and ``ckptreg.leaderboard``: Python binds a submodule to
# its parent's attribute when it is imported, so a plain function of that name would be replaced
# by the module (or would shadow it for ``from ckptreg import leaderboard``). Here the attribute
# is always the submodule, and the submodule is callable: calling it calls the function of
# :mod:`ckptreg.api` (``ckptreg.merge(db, ...)`` is ``ckptreg.api.merge(db, ...)``), while
# ``ckptreg.leaderboard.parse_score`` and ``from ckptreg.merge import ...`` work as usual.
_CALLABLE_SUBMODULES = ("merge", "leaderboard")


class _CallableModule(_types.ModuleType):
    """A submodule of ckptreg named like a top-level API function; calling it calls that function."""

    def __call__(self, *args, **kwargs):
        from . import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(_types.ModuleType):
    def __setattr__(self, name, value):
        if name in _CALLABLE_SUBMODULES and type(value) is _types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    import importlib

    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    if name in _CALLABLE_SUBMODULES:
        try:
            return importlib.import_module(f"{__name__}.{name}")   # bound (callable) by _Package
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            from . import api   # no such submodule (yet): the plain function

            return getattr(api, name)
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

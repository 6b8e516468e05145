"""The registry's data model and validation: :class:`Checkpoint`, refs, argument checks, JSON
helpers, retention policies and lock bounds. No database here (and no torch).
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..errors import LockTimeout, UsageError

_ACTOR: tuple | None = None


def _actor() -> tuple[str, str, int]:
    """(host, user, pid) of this process, for the events table (cached per process)."""
    global _ACTOR
    if _ACTOR is not None and _ACTOR[2] == os.getpid():
        return _ACTOR
    _ACTOR = _actor_uncached()
    return _ACTOR


def _actor_uncached() -> tuple[str, str, int]:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no login name (containers without a passwd entry)
        user = str(os.getuid()) if hasattr(os, "getuid") else "?"
    return socket.gethostname(), user, os.getpid()

#: Names RUN@NAME resolves itself (built-in aliases): never a user alias nor a merged name.
_BUILTIN_ALIASES = ("final", "latest")
_VERSION_SUFFIX = __import__("re").compile(r"^(.+):v(\d+)$")


def _sql_str(s: str) -> str:
    """A standard SQL string literal."""
    return "'" + s.replace("'", "''") + "'"


def _short(msg: str) -> str:
    return " ".join(str(msg).split())[:300]


# --------------------------------------------------------------------------- data

@dataclass
class Checkpoint:
    id: int
    run: str
    step: int | None
    name: str | None
    path: str
    format: str
    kind: str
    base_model: str | None
    n_tensors: int
    n_params: int
    nbytes: int
    fingerprint: str
    created: datetime
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    lora: dict | None = None
    merged: bool = False
    files: list[str] = field(default_factory=list)
    config_files: list[str] = field(default_factory=list)
    version: int = 1                  # merged names are versioned: RUN@NAME is the newest, RUN@NAME:vK one
    # the training step each metric value was logged at (a train loss logged at step 7 and stored
    # with the checkpoint of step 10 says 7); None for a value logged without a step
    metric_steps: dict[str, int | None] = field(default_factory=dict)

    def metric_lag(self, name: str) -> int | None:
        """How many steps before this checkpoint the value of metric ``name`` was logged (0: at
        its step); None when there is no value, its step is unknown or the checkpoint has no step.
        MWA/metric weighting by a value with a lag > 0 weighs the checkpoint by an older score."""
        s = self.metric_steps.get(name)
        if s is None or self.step is None or name not in self.metrics:
            return None
        return self.step - s

    @property
    def ref(self) -> str:
        if self.step is None and self.version and self.version > 1:
            return f"{self.run}@{self.name}:v{self.version}"
        return f"{self.run}@{self.name if self.step is None else self.step}"

    def to_dict(self) -> dict:
        return {
            "id": self.id, "ref": self.ref, "run": self.run, "step": self.step, "name": self.name,
            "path": self.path, "format": self.format, "kind": self.kind, "base_model": self.base_model,
            "n_tensors": self.n_tensors, "n_params": self.n_params, "nbytes": self.nbytes,
            "fingerprint": self.fingerprint, "created": self.created, "tags": dict(self.tags),
            "metrics": dict(self.metrics), "metric_steps": dict(self.metric_steps),
            "lora": self.lora, "merged": self.merged,
            "files": list(self.files), "config_files": list(self.config_files),
            "version": self.version,
        }


class _Busy(LockTimeout):
    """The lock or the database file could not be had within the bound."""


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _jloads(v):
    if v is None:
        return None
    if isinstance(v, (dict, list)):
        return v
    return json.loads(v)


def _jdumps(v) -> str | None:
    if v is None:
        return None
    return json.dumps(v, sort_keys=True, allow_nan=True)

# --------------------------------------------------------------------------- validation

def _check_name(what: str, v) -> str:
    if not isinstance(v, str) or not v.strip():
        raise UsageError(f"{what} must be a non-empty string, got {v!r}")
    if "@" in v:
        raise UsageError(f"{what} {v!r} must not contain '@' (refs are RUN@STEP / RUN@NAME)")
    return v


def _check_ref_name(what: str, v: str) -> str:
    """UsageError for a name RUN@NAME would not resolve to (a merged name or a user alias): a
    number (a step), a built-in alias (final, latest, best:...) or a version suffix (NAME:vK)."""
    if v.strip().lstrip("-").isdigit():
        raise UsageError(f"{what} {v!r} is a number: RUN@{v} means step {v}")
    if v in _BUILTIN_ALIASES or v.startswith("best:") or v == "best":
        raise UsageError(f"{what} {v!r} is a built-in alias (RUN@final, RUN@latest, RUN@best:METRIC)")
    if _VERSION_SUFFIX.match(v):
        raise UsageError(f"{what} {v!r} ends in a version suffix (:vK): RUN@NAME:vK means version K of NAME")
    return v


def _check_step(step) -> int:
    if isinstance(step, bool):
        raise UsageError(f"step must be an integer >= 0, got {step!r}")
    if isinstance(step, str):
        try:
            step = int(step.strip())
        except ValueError:
            raise UsageError(f"step must be an integer >= 0, got {step!r}") from None
    try:
        step = int(step.__index__()) if not isinstance(step, int) else step
    except (AttributeError, TypeError):
        raise UsageError(f"step must be an integer >= 0, got {step!r}") from None
    if step < 0:
        raise UsageError(f"step must be an integer >= 0, got {step}")
    return step


def _to_float(name: str, v) -> float:
    if isinstance(v, bool) or isinstance(v, (str, bytes)) or v is None:
        raise UsageError(f"metric {name!r}: value must be a number, got {v!r}")
    if isinstance(v, numbers.Real):
        return float(v)
    item = getattr(v, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            x = item()
        except Exception:
            x = None
        if isinstance(x, numbers.Real) and not isinstance(x, bool):
            return float(x)
    raise UsageError(f"metric {name!r}: value must be a number, got {v!r}")


def _check_metrics(metrics) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise UsageError(f"metrics must be a dict name -> number, got {type(metrics).__name__}")
    out = {}
    for k, v in metrics.items():
        if not isinstance(k, str) or not k:
            raise UsageError(f"metric names must be non-empty strings, got {k!r}")
        out[k] = _to_float(k, v)
    return out


def _check_metric_steps(steps, metrics: dict) -> dict[str, int | None]:
    """``metric_steps`` of add(): name (one of ``metrics``) -> step (int >= 0) or None."""
    if steps is None:
        return {}
    if not isinstance(steps, dict):
        raise UsageError(f"metric_steps must be a dict name -> step, got {type(steps).__name__}")
    out: dict[str, int | None] = {}
    for k, v in steps.items():
        if k not in metrics:
            raise UsageError(f"metric_steps names {k!r}, which is not one of the metrics given "
                             f"({', '.join(sorted(metrics)) or 'none'})")
        out[k] = None if v is None else _check_step(v)
    return out


def _check_tags(tags) -> dict[str, str]:
    if tags is None:
        return {}
    if not isinstance(tags, dict):
        raise UsageError(f"tags must be a dict name -> value, got {type(tags).__name__}")
    out = {}
    for k, v in tags.items():
        if not isinstance(k, str) or not k:
            raise UsageError(f"tag names must be non-empty strings, got {k!r}")
        out[k] = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return out


def parse_ref(ref: str) -> tuple[str, str]:
    """'RUN@STEP' / 'RUN@NAME' -> (run, what). UsageError when there is no '@'."""
    run, sep, what = ref.rpartition("@")
    if not sep or not run or not what:
        raise UsageError(f"checkpoint reference {ref!r} is not an id, RUN@STEP or RUN@NAME")
    return run, what


def _file_stats(files) -> list[dict]:
    """What the registry keeps of each tensor file at registration: size and mtime (gc/rm and
    the cheap check), and the inode change time, inode and device: a write, or a utime call that
    restores the mtime, sets st_ctime to now and no user can set it back, so the cheap verify
    can tell a file touched since registration even when its sampled fingerprint matches."""
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append({"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                        "ctime_ns": st.st_ctime_ns, "ino": st.st_ino, "dev": st.st_dev})
        except OSError:
            out.append({"path": str(f), "size": None, "mtime_ns": None})
    return out


# --------------------------------------------------------------------------- lock bounds

#: Seconds an interactive caller (the CLI, a script) waits for a busy database before the
#: operation spools (add / log) or fails (LockTimeout, exit 11).
DEFAULT_LOCK_TIMEOUT = 30.0
#: Seconds a training loop (trainer callbacks, ``ckptreg.add``) waits before spooling and
#: returning: a busy database must never stall training.
TRAINING_LOCK_TIMEOUT = 1.0


def _check_timeout(v, what="lock_timeout") -> float:
    if isinstance(v, bool):
        raise UsageError(f"{what} must be a number of seconds >= 0, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number of seconds >= 0, got {v!r}") from None
    if not math.isfinite(f) or f < 0:
        raise UsageError(f"{what} must be a number of seconds >= 0, got {v!r}")
    return f


def lock_timeout_from_env(default: float = DEFAULT_LOCK_TIMEOUT) -> float:
    """``$CKPTREG_LOCK_TIMEOUT`` (seconds) when set, else ``default``. UsageError for a value
    that is not a number of seconds >= 0. Every entry point builds its Registry through this."""
    t = os.environ.get("CKPTREG_LOCK_TIMEOUT")
    if t is None or not t.strip():
        return float(default)
    return _check_timeout(t.strip(), "CKPTREG_LOCK_TIMEOUT")


def lock_timeout_for_training() -> float:
    """The bound for calls made from a training loop: ``$CKPTREG_LOCK_TIMEOUT`` when set, else
    :data:`TRAINING_LOCK_TIMEOUT` (1 s)."""
    return lock_timeout_from_env(TRAINING_LOCK_TIMEOUT)


def _jsafe(v):
    """``v`` with non-finite floats as strings ("nan", "inf", "-inf"): DuckDB's JSON type
    refuses NaN/Infinity literals (event details, run params)."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _jsafe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsafe(x) for x in v]
    return v


def _spooled_actor(e: dict):
    """(host, user, pid) recorded in a spool entry by the process that wrote it, or None."""
    a = e.get("actor")
    if (isinstance(a, list) and len(a) == 3 and isinstance(a[0], str) and isinstance(a[1], str)
            and isinstance(a[2], int) and not isinstance(a[2], bool)):
        return (a[0], a[1], a[2])
    return None


def _ref_of(run, step, name, version=1) -> str:
    """The ref of a checkpoint row: RUN@STEP, RUN@NAME, RUN@NAME:vK for versions after the first."""
    if step is not None:
        return f"{run}@{step}"
    return f"{run}@{name}" + (f":v{version}" if version and int(version) > 1 else "")


def _need(module: str, what: str) -> None:
    """UsageError naming the package when the optional ``module`` is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{what} needs the optional package {module!r}, which is not installed "
                         f"(pip install {module}); `ckptreg export --format parquet|csv|json` "
                         "works without it")


def _same(a: float, b: float) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


# --------------------------------------------------------------------------- lifecycle helpers

#: Key in ``merges.params`` under which ``rm --force`` keeps the ref, fingerprint and path of a
#: removed input / base (:meth:`Registry.lineage` reads it and does not show it as a param).
_REMOVED_KEY = "_ckptreg_removed"


def _files_present(files, path) -> bool:
    """Do all the registered files (a files JSON value, dicts or paths; else the checkpoint's
    path) exist? A stat each, no reading."""
    if isinstance(files, str):
        files = _jloads(files)
    paths = [f["path"] if isinstance(f, dict) else f for f in (files or [])] or [path]
    for p in paths:
        try:
            os.stat(p)
        except (OSError, TypeError, ValueError):
            return False
    return True


_GC_KEYS = ("keep_best", "metric", "direction", "keep_last", "keep_every")


def _gc_policy(keep_best, metric, direction, keep_last, keep_every, *, merged: bool = False) -> dict:
    """Validated retention policy; UsageError naming the bad value. ``merged``: the policy of
    ``gc --merged`` (merged outputs have no step: keep_every is refused)."""
    def count(name, v):
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"gc: {name} must be an integer >= 1, got {v!r}")
        return int(v)

    keep_best, keep_last, keep_every = (count("keep_best", keep_best), count("keep_last", keep_last),
                                        count("keep_every", keep_every))
    if keep_best is not None and not (isinstance(metric, str) and metric):
        raise UsageError("gc: keep_best / --keep-best needs a metric (--metric NAME)")
    if metric is not None and keep_best is None:
        raise UsageError(f"gc: metric {metric!r} given without keep_best / --keep-best K")
    if direction is not None and direction not in ("min", "max"):
        raise UsageError(f"gc: direction must be 'min' or 'max', got {direction!r}")
    if direction is not None and keep_best is None:
        raise UsageError("gc: direction given without keep_best / --keep-best K")
    if keep_best is None and keep_last is None and keep_every is None:
        raise UsageError("gc: no retention policy: give keep_best + metric (--keep-best K --metric M), "
                         "keep_last (--keep-last N) and/or keep_every (--keep-every M); the final "
                         "checkpoint is always kept")
    if merged and keep_every is not None:
        raise UsageError("gc --merged: --keep-every / keep_every needs steps and merged checkpoints "
                         "have none; use --keep-last N (the N most recently registered) and/or "
                         "--keep-best K --metric M")
    if keep_best is not None and direction is None:
        from ..weights import default_direction

        direction = default_direction(metric)
    pol = {"keep_best": keep_best, "metric": metric if keep_best else None,
           "direction": direction if keep_best else None, "keep_last": keep_last,
           "keep_every": keep_every, "merged": True if merged else None}
    return {k: v for k, v in pol.items() if v is not None}


def retention_policy(retention) -> dict:
    """A retention policy for the trainer callbacks (``retention=``): a dict of :meth:`Registry.gc`
    keywords (``{"keep_best": 2, "metric": "eval_loss"}``, ``{"keep_last": 3}``, ...), validated;
    UsageError for an unknown key or a bad value."""
    if not isinstance(retention, dict):
        raise UsageError(f"retention must be a dict of gc options ({', '.join(_GC_KEYS)}), "
                         f"got {type(retention).__name__}")
    bad = sorted(set(retention) - set(_GC_KEYS))
    if bad:
        raise UsageError(f"retention: unknown option(s) {', '.join(map(repr, bad))}; "
                         f"expected {', '.join(_GC_KEYS)}")
    return _gc_policy(*(retention.get(k) for k in _GC_KEYS))

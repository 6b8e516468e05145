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
        # None (default): a relaunch that overwrote a registered checkpoint in place replaces
        # the stale entry (said once, as a warning); another folder at a registered step is
        # refused (a warning unless strict). True: always replace; False: never.
        self.replace = replace
        # None: $CKPTREG_LOCK_TIMEOUT, else the training-loop bound (1 s), then spool and return
        self.lock_timeout = lock_timeout
        self.replaced: list[str] = []     # refs whose stale entry a relaunch replaced
        self._relaunch_said = False
        self._params_done = False
        self.registered: dict[int, int | None] = {}   # step -> id (None: spooled)
        self.failed: dict[int, str] = {}              # step -> why it was not registered
        self.errors: list[str] = []

    def _registry(self):
        from ..registry import Registry, lock_timeout_for_training

        if self.lock_timeout is None:
            return Registry(self.db, lock_timeout=lock_timeout_for_training())
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

    def _add(self, path, step, metrics, allow_pickle=False, metric_steps=None):
        """Register ``path`` as RUN@step; ``metric_steps``: name -> the step each value of
        ``metrics`` was logged at. The outcome is in :meth:`results`."""
        metric_steps = {k: v for k, v in (metric_steps or {}).items() if k in (metrics or {})} or None

        def do():
            reg = self._registry()
            cid = reg.add(path, run=self.run, step=step, metrics=metrics or None,
                          tags=self.tags or None,
                          replace="stale" if self.replace is None else bool(self.replace),
                          allow_pickle=allow_pickle, metric_steps=metric_steps)
            self.registered[step] = cid
            self.failed.pop(step, None)
            self._said_relaunch(getattr(reg, "last_add", None))
            return cid

        n_err = len(self.errors)
        try:
            return self._guard(f"registering {path} as {self.run}@{step}", do)
        finally:
            if step not in self.registered:
                self.failed[step] = self.errors[-1] if len(self.errors) > n_err else "not registered"

    @staticmethod
    def _retention_policy(retention):
        """The validated ``retention=`` policy (a dict of Registry.gc keywords) or None."""
        if retention is None:
            return None
        from ..registry import retention_policy

        return retention_policy(retention)

    def _apply_retention(self, cid) -> None:
        """After a registered save: apply ``self.retention`` through the registry's gc
        (``yes=True``: only registered files inside each pruned checkpoint's folder are deleted).
        A spooled or failed add skips it (the next save applies it); errors warn like
        registration errors."""
        if self.retention is None or cid is None:
            return

        def do():
            self.last_retention = self._registry().retain(self.run, self.retention)

        self._guard(f"applying retention {self.retention} to run {self.run}", do)

    def results(self) -> dict[int, dict]:
        """What happened to each checkpoint this callback saw, by step: ``{"status":
        "registered", "id": N}``, ``{"status": "spooled", "id": None}`` (the database was busy;
        the next opener ingests it) or ``{"status": "failed", "id": None, "reason": "..."}``."""
        out: dict[int, dict] = {}
        for step, cid in self.registered.items():
            out[step] = {"status": "spooled" if cid is None else "registered", "id": cid}
        for step, why in self.failed.items():
            out[step] = {"status": "failed", "id": None, "reason": why}
        return dict(sorted(out.items()))

    def _log(self, step, metrics):
        if not metrics:
            return None

        def do():
            self._registry().log(f"{self.run}@{step}", metrics)

        return self._guard(f"logging metrics to {self.run}@{step}", do)

    # ------------------------------------------------------------------ run identity

    def _said_relaunch(self, done) -> None:
        """A relaunch into this run overwrote a registered checkpoint: its stale entry was
        replaced. Said once per callback (a RuntimeWarning); every such ref is kept in
        ``replaced``."""
        if not done or done.get("status") != "replaced":
            return
        self.replaced.append(done["ref"])
        if self._relaunch_said:
            return
        self._relaunch_said = True
        prev = done.get("previous") or {}
        warnings.warn(
            f"ckptreg: run {self.run!r} was relaunched over registered checkpoints: the files of "
            f"{done['ref']} (id {done['id']}) differ from the registered ones (fingerprint "
            f"{str(prev.get('fingerprint', ''))[:16]} -> {str(done.get('fingerprint', ''))[:16]}); "
            f"replaced the stale entry (later replacements in this run are not reported again; "
            f"see `ckptreg history {self.run}`)", RuntimeWarning, stacklevel=3)

    def _record_params(self, params: dict) -> None:
        """Record the run's hyperparameters (plus the git commit of the working directory) in
        ``runs.params``, once per callback; a busy database spools them."""
        if self._params_done:
            return
        self._params_done = True
        params = dict(params or {})
        commit = git_commit()
        if commit is not None:
            params.setdefault("git_commit", commit)
        self._guard(f"recording the hyperparameters of run {self.run!r}",
                    lambda: self._registry().set_run_params(self.run, params))


def git_commit(cwd=None, timeout: float = 2.0) -> str | None:
    """``git rev-parse HEAD`` of ``cwd`` (default: the working directory), or None when it is
    not a git repository, git is missing, or it takes longer than ``timeout`` s. Never raises."""
    import subprocess

    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=timeout,
                           text=True)
    except Exception:  # noqa: BLE001 - no git, a timeout, a vanished cwd: no commit recorded
        return None
    out = (r.stdout or "").strip()
    if r.returncode != 0 or not out or any(c not in "0123456789abcdef" for c in out.lower()):
        return None
    return out

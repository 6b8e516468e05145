"""Typed exceptions. Library code raises these and never prints; the CLI maps them to
messages and exit codes (every CkptregError exits non-zero with its message)."""
from __future__ import annotations


class CkptregError(Exception):
    """Base of every error ckptreg raises on purpose. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class FormatError(CkptregError):
    """A file is missing, truncated, corrupt, or in a layout ckptreg does not understand.
    (Its own exit code, apart from usage errors' 2: a script can tell a bad file from a bad call.)"""

    exit_code = 17


class NotFoundError(CkptregError):
    """A checkpoint, run, metric or path named by the user does not exist."""

    exit_code = 3


class DuplicateError(CkptregError):
    """The same run@step (or merged name) is already registered and --replace was not given."""

    exit_code = 4


class MismatchError(CkptregError):
    """Inputs to a merge disagree in tensor names, shapes or dtypes."""

    exit_code = 5


class WeightError(CkptregError):
    """Weights cannot be computed: NaN/inf/non-positive metric, bad penalty or power."""

    exit_code = 6


class SelectionError(CkptregError):
    """A checkpoint selection cannot be satisfied (K larger than the run has, ...)."""

    exit_code = 7


class ParameterError(CkptregError):
    """A method parameter is out of range (density outside (0, 1], t outside [0, 1], ...)."""

    exit_code = 8


class OutputExistsError(CkptregError):
    """The output path exists and overwrite was not requested."""

    exit_code = 9


class ChangedError(CkptregError):
    """A registered checkpoint's files changed since registration (fingerprint mismatch)."""

    exit_code = 10


class LockTimeout(CkptregError):
    """The database could not be locked within the bound (callers that must not fail spool)."""

    exit_code = 11


class BackendError(CkptregError):
    """A forced compute backend (CKPTREG_BACKEND) is not available, or an op got bad tensors."""

    exit_code = 12


class UsageError(CkptregError):
    """Malformed user input (a --metric without '=', a non-numeric value, ...)."""

    exit_code = 2


class DiskFullError(CkptregError):
    """A filesystem ran out of space (ENOSPC/EDQUOT) while ckptreg wrote to it; nothing partial is
    left behind (the message names the path)."""

    exit_code = 13


class TargetBusyError(CkptregError):
    """Another ckptreg process is writing the same output path right now (one writer per target)."""

    exit_code = 14


class AccessError(CkptregError):
    """A path cannot be written or read: permission denied or a read-only filesystem (names it)."""

    exit_code = 15


class QueryError(CkptregError):
    """``ckptreg sql``: the query is not a read of the registry, failed, or ran past --timeout."""

    exit_code = 16


class DistributedError(CkptregError):
    """A distributed merge (torchrun / ``--nproc-per-node``) could not join its process group, or
    another rank failed or was lost; nothing was registered and the output was removed."""

    exit_code = 18

"""The merge engine: a thin re-export of :mod:`ckptreg.merge` (the package holds the method
table, specs and names, plan, sources, the one streaming loop, LoRA delta space, output targets,
and ``merge()`` / ``sweep()``; its docstring describes how a merge runs)."""
from __future__ import annotations

from .merge import (  # noqa: F401
    CHUNK_ELEMS,
    MERGED,
    METHODS,
    SWEEP_BUFFER_BYTES,
    UP_TO_DATE,
    MergeResult,
    MergeSpec,
    MethodDef,
    ParamDef,
    Plan,
    _DeltaCache,
    _lora_pair,
    _module_scale,
    canonical_method,
    check_params,
    dedupe_specs,
    default_out,
    make_spec,
    merge,
    merge_result,
    metric_lags,
    name_suffix,
    paper_name,
    plan,
    register_method,
    resolve_base,
    sweep,
    sweep_results,
)
from .merge.table import LINEAR, TASK_VECTOR

#: the built-in weighted sums and task-vector methods (the method table's strategies)
LINEAR_METHODS = tuple(n for n, m in METHODS.items() if m.strategy == LINEAR)
TASK_METHODS = tuple(n for n, m in METHODS.items() if m.strategy == TASK_VECTOR)

__all__ = [
    "MergeSpec", "MergeResult", "Plan", "plan", "merge", "merge_result", "sweep", "sweep_results", "MERGED",
    "paper_name", "canonical_method", "make_spec",
    "resolve_base", "dedupe_specs", "name_suffix", "metric_lags", "UP_TO_DATE", "LINEAR_METHODS",
    "TASK_METHODS", "METHODS", "CHUNK_ELEMS", "default_out", "MethodDef", "ParamDef", "register_method",
    "check_params",
]

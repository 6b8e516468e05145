"""The merge engine as a package: a method table, specs and names, a plan, one streaming loop.

Modules, in the order a merge uses them:

- :mod:`.table`: :class:`MethodDef` / :class:`ParamDef` per method, :data:`METHODS`,
  :func:`register_method`, :func:`check_params` (validation), :func:`canonical_method`.
- :mod:`.spec`: :class:`MergeSpec`, :func:`make_spec` (weights by the method's weight rule),
  :func:`paper_name` / :func:`name_suffix` (default names), :func:`dedupe_specs`.
- :mod:`.plan`: :func:`plan` from the registry's inventory.
- :mod:`.sources`: reading inputs (:class:`Source`), identity snapshots, chunk buffers.
- :mod:`.stream`: :class:`Job` (one output), :class:`Pass` (one read of the inputs) and
  :func:`run_pass`, the per-tensor loop of both merge and sweep; :mod:`.kernels` holds the
  built-in methods' per-tensor functions.
- :mod:`.table` built-ins (linear … cart), :mod:`.methods_geometry` (model_stock, multislerp),
  :mod:`.methods_sparsify` (breadcrumbs, della), :mod:`.methods_lowrank` (tsv, iso_c, iso_cts,
  star, knots_ties, knots_dare_ties): every method is one :class:`MethodDef`.
- :mod:`.delta`: LoRA factor-scale checks and the update spaces (delta, core).
- :mod:`.targets`: output layouts, the atomic :class:`Output`, locks, target refusals, stored
  recipe / lineage / up-to-date check, registration.
- :mod:`.run`: :func:`merge` and :func:`sweep` (and :func:`merge_result` / :func:`sweep_results`, which
  return :class:`MergeResult` values: checkpoint, spec as merged, status; specs are never mutated).
- :mod:`.distributed`: the same merge under torchrun / ``--nproc-per-node``: the plan split by
  bytes across ranks, each rank writing its shards into rank 0's staging folder, rank 0
  registering once; any rank's failure aborts all (its own docstring).
- :mod:`.recipe`, :mod:`.card`: recipe files and model cards (their own docstrings).

Adding a method
---------------
One :class:`MethodDef` passed to :func:`register_method` (``fn`` its per-tensor function, the
``strategy`` saying how the loop calls it); validation, dispatch, default names, the delta-space
allow-list, the CLI's ``merge`` / ``sweep`` options and ``ckptreg methods`` read the table.
tests/test_method_table.py adds a toy method from a test file.

Per-tensor parameters (the hook for recipes)
--------------------------------------------
``MergeSpec.param_rules`` (optional; e.g. :class:`ckptreg.merge.recipe.ParamRules`) is an
object with ``bind(tensor_names) -> rules``, ``params_for(name, params) -> dict``,
``weights_for(name, weights) -> list``, ``to_json()`` and ``digest()``. The merge binds it to
the plan's names; the streaming loop asks ``job.params_for(name)`` / ``job.weights_for(name)``
for every tensor (the spec's constants when there are no rules; rule values are checked by the
method table). Rules are stored in the output's ``ckptreg_recipe`` metadata (``param_rules``)
and in the lineage params (``rules``), so the up-to-date check and replay see them; a sweep
keeps specs with different rules apart. Delta space refuses rules (ParameterError).

How a merge runs
----------------
1. ``registry.check_unchanged`` for every input and the base (ChangedError before anything else).
2. :func:`plan` reads every input's stored inventory (``Registry.inventory``, no header read
   after the fingerprint check) and raises ONE MismatchError that lists every name/shape/dtype
   difference.
3. Re-runs are idempotent: an output registered at the target under the same name with the same
   recipe (method, params, space, rank, out dtype, weights, inputs by id and fingerprint, base)
   and unchanged files is returned as it is (``MergeResult.status == UP_TO_DATE``, nothing written);
   ``overwrite`` recomputes it. A sweep computes only its outputs that are not up to date.
   Otherwise the output target is checked (OutputExistsError / DuplicateError) and opened: a temporary file
   or folder beside the output (:mod:`ckptreg.writer`), the header written from the plan.
4. Tensors are streamed in name order. Inputs are read with ``preadv`` into per-input chunk
   buffers allocated once and reused (:class:`.sources.Source`), or, for streamed methods where Linux
   grants a read lease on the file, as zero-copy views of a map that no writer can truncate
   while the lease is held (a writer's open waits for the next chunk, when the lease is handed
   over and reading goes on with ``preadv``): an input
   truncated in place mid-merge (a trainer re-saving with ``open('wb')``) is a short read and a
   ChangedError naming the file (exit 10), not a SIGBUS; after the last read every input file is
   re-stat'ed (inode, size, mtime against the identity taken before its fingerprint was checked)
   so a same-size rewrite or a replacement by rename is a ChangedError too, before anything is
   committed. Tensors larger than ``chunk_elems`` are processed in flat chunks; the output chunk
   buffers are allocated once per merge and reused (``ops.weighted_sum(..., out=buf)`` /
   ``ops.task_merge(..., out=buf)``), so the anonymous memory stays at about N input chunks plus
   the largest tensor (only for methods that need whole tensors: TIES thresholds (the base and
   one input at a time), CART) plus a few output chunk buffers, whatever model size.
5. The output is fsync'ed and renamed into place; only then is it registered
   (``registry.record_merge``). A merge killed at any moment leaves a dot-named temporary at most
   (removed by the next merge into the same folder), never a partial output or a registry row.

Per-method streaming (the method table's strategies, :mod:`.table`; one loop, :mod:`.stream`)
-------------------------------------------------------------------------------------------
- linear / uniform / mwa: ``ops.weighted_sum`` on chunks.
- task_arithmetic / ties / dare_linear / dare_ties / magnitude_prune: ``ops.task_merge`` on chunks;
  TIES / magnitude-prune thresholds come from ``ops.kth_largest_abs`` over the whole tensor
  before chunking, DARE masks are keyed by the element offset of each chunk, so chunking never
  changes a result.
- slerp: a first pass over the chunks accumulates the norms and the dot product in float64, then
  the blend is a weighted sum with the two SLERP coefficients (same numbers as
  ``methods.slerp``).
- cart: whole tensor per 2-D weight matrix (``lowrank.cart_dense``); LoRA adapters in delta space
  use ``lowrank.cart_lowrank`` per module (exact, no d×k matrix).
- model_stock / multislerp: a first pass accumulates the inputs' Gram matrix (float64), then
  each chunk is θ_0 + Σ c_i τ_i; breadcrumbs / della: whole tensors in ``prepare``.
- tsv / iso_c / iso_cts / star (``per_matrix`` with ``matrix_fn``): θ_0 + matrix_fn(stack(θ_t − θ_0))
  on 2-D non-embedding matrices, θ_0 + α·mean τ elsewhere; knots_* run only in delta space.
- LiNeS (``params["lines"] = (α, β)``, any method with a base): θ_0 + λ(ℓ)·Δ per tensor, through
  ``lam`` or the per-tensor factor the streamer sets (``table.lines_mode``).

Choices documented here (DESIGN/METHODS leave them open)
--------------------------------------------------------
- Non-floating tensors (int buffers, bool masks) are copied from the newest input (the last of
  the input list) and must be equal in dtype/shape like everything else.
- SLERP merges exactly two checkpoints. ``base`` picks the t=0 endpoint: "first" = the older of
  the two, "last" = the newer, or a checkpoint that must be one of the two (mergekit: the base
  model is the t=0 end). Without a base the first input is the t=0 end.
- CART low-rank step applies to 2-D float tensors except embeddings (names containing "embed",
  "wte", "wpe"); other tensors end up as the weighted average (as METHODS.md says).
- LoRA ``space="delta"`` / ``"core"`` (the update spaces; :mod:`.delta` has the details): every
  method whose ``MethodDef.spaces`` lists the space, run by its ``delta_rule``: linear and
  task_arithmetic (``Σ c_i s_i B_i A_i``), CART, the SVD family (``delta_fn``) and the Gram
  methods (model_stock, multislerp, slerp) exactly in factored form, never forming d×k; the
  element-wise methods (ties, dare_*, magnitude_prune, breadcrumbs*, della*) on one layer's
  formed updates at a time, truncated back to ``rank`` by exact SVD in delta space (PEFT ``*_svd``
  semantics), on the Σr×Σr core matrices in core space (the core-space method, named
  ``core_<method>_...``). A method outside its spaces (iso_cts on adapters, knots on full
  models or in core space, tsv on raw factors) is a ParameterError before anything is written.
  A method with a base and none given uses base pretrained (τ_i = s_i B_i A_i, named
  ``_base_pretrained``). Inputs may mix r, lora_alpha and rsLoRA. Default output rank: the
  inputs' largest r (CART, the SVD family and core-space element-wise methods: their exact
  rank, up to Σ r_i), unless ``rank`` is given; written with ``lora_alpha = r_out`` and
  ``use_rslora = false`` in the output adapter_config.json, so the output's scaling is exactly 1
  and the scales are folded into the factors (balanced split ``B = U√S``, ``A = √S Vh``);
  modules whose rank differs from the most common one get ``rank_pattern`` / ``alpha_pattern``.
- LoRA ``space="factors"`` (the default, and every sweep) combines the stored A/B factors as
  tensors and writes the first input's adapter_config.json, so it needs every module to have the
  same scaling s = alpha/r (alpha/sqrt(r) with rsLoRA; alpha_pattern/rank_pattern resolved per
  module the way PEFT resolves them, ``formats.lora_module_config``) in every input and the base.
  Differing scalings, or a mix of adapters with and without an adapter_config.json, are a
  MismatchError before anything is read or written (a sweep checks all its merges first); the
  message names the adapters and their values and points to ``space="delta"``, which is exact.
  The SVD family needs the updates, not the factors: tsv / iso_c / star run on adapters only in
  delta or core space.
- The merged checkpoint goes to the run of the newest input.
"""
from __future__ import annotations

import sys as _sys
import types as _types

from .delta import _DeltaCache, _lora_pair, _module_scale, check_factor_scales  # noqa: F401
from .plan import Plan, plan
from .run import MERGED, UP_TO_DATE, MergeResult, merge, merge_result, sweep, sweep_results
from .spec import MergeSpec, dedupe_specs, make_spec, metric_lags, name_suffix, paper_name, resolve_base
from .stream import CHUNK_ELEMS, SWEEP_BUFFER_BYTES, Job, Pass, run_pass
from .table import (METHODS, MethodDef, ParamDef, canonical_method, check_params, describe, get_method,
                    register_method, unregister_method)
from .targets import default_out

__all__ = ["MergeSpec", "MergeResult", "Plan", "plan", "merge", "merge_result", "sweep", "sweep_results", "MERGED",
           "paper_name", "canonical_method", "make_spec",
           "resolve_base", "dedupe_specs", "name_suffix", "metric_lags", "default_out", "UP_TO_DATE", "METHODS",
           "MethodDef", "ParamDef", "register_method", "unregister_method", "get_method", "check_params",
           "describe", "CHUNK_ELEMS", "SWEEP_BUFFER_BYTES", "Job", "Pass", "run_pass"]


class _CallableModule(_types.ModuleType):
    """``ckptreg.merge`` is this package once imported; calling it is the top-level library
    call (``ckptreg.api.merge`` when it exists, else :func:`merge`), so ``ckptreg.merge(...)``
    works whichever of the two the attribute ``ckptreg.merge`` holds."""

    def __call__(self, *args, **kwargs):
        try:
            from ..api import merge as api_merge
        except ImportError:
            api_merge = merge
        return api_merge(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule

"""``merge()`` and ``sweep()``: validate, plan, check targets, stream (:func:`.stream.run_pass`),
commit, register. See the package docstring for the steps."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Sequence

from ..errors import ChangedError, FormatError, ParameterError, WeightError
from . import distributed as _dist
from .delta import (BASE_KEY, PRETRAINED, UPDATE_SPACES, _check_factor_scales, _delta_setup, _read_cfg, is_pretrained,
                    plan_lora)
from .plan import Plan, _ref, info_of, plan, writer_info
from .sources import Source, snapshot
from .spec import MergeSpec, dedupe_specs, renamed_for
from .stream import CHUNK_ELEMS, Job, Pass, _odt, run_pass, torch_out_dtype
from .table import LINEAR, PAIRWISE, canonical_method, check_params, get_method
from .targets import (SubPlan, _check_layout, _check_target, _Locks, _Output, _output_run, _recipe, _register,
                      _up_to_date, default_out)

#: MergeResult.status of a merge skipped because an identical output is registered
UP_TO_DATE = "up to date"
#: MergeResult.status of a merge computed and registered
MERGED = "merged"


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """The outcome of one merge (:func:`merge_result`, :func:`sweep_results`): the registered
    ``checkpoint``; ``spec``, the spec as merged (its default name after the space, rank and out
    dtype of the call, its output path, its inputs, weights and base: for SLERP in t = 0 first
    order); ``status``, ``MERGED`` or ``UP_TO_DATE`` (an identical registered output was found and
    nothing was written). The caller's spec is never changed."""
    checkpoint: object
    spec: MergeSpec
    status: str


def _batch(registry, co=None):
    """One registry connection for a burst of small operations (validation, registration); never
    held while tensors stream, so trainers registering checkpoints are not blocked for long.
    ``co``: the other ranks of a distributed merge hold none while rank 0 registers."""
    import contextlib

    b = getattr(registry, "batch", None)
    return b() if b is not None and (co is None or co.lead) else contextlib.nullcontext()


def _prepare(registry, spec: MergeSpec, overwrite: bool, checked: set | None = None, snaps: dict | None = None,
             space: str = "factors"):
    """Validation shared by merge and sweep (nothing is read or written here): the method and
    its parameters (the method table), weights, the fingerprint of every input. ``snaps``
    collects each input file's identity (inode, size, mtime) taken just before its fingerprint
    is checked; the readers (:class:`Source`) compare against it, so a change at any time after
    the check is a ChangedError, never a merge of other bytes than the checked ones.
    Returns (method definition, inputs, weights, params)."""
    defn = get_method(spec.method)
    inputs = list(spec.inputs)
    if not inputs:
        raise ParameterError("a merge needs at least one input checkpoint")
    ids = [c.id for c in inputs]
    if len(set(ids)) != len(ids):
        raise ParameterError("the same checkpoint appears twice in the inputs")
    p = check_params(defn, spec.params or {}, len(inputs))
    if is_pretrained(p) and (space not in UPDATE_SPACES or spec.base is not None):
        raise ParameterError("base pretrained (the task vectors are the LoRA updates themselves) needs LoRA "
                             f"adapters merged with space 'delta' or 'core' (--space delta|core), not {space!r}"
                             + ("; sweeps merge in factor space unless given space 'delta' or 'core' (sweep --space)"
                                if space == "factors" else ""))
    if defn.uses_base and spec.base is None and space in UPDATE_SPACES:
        p[BASE_KEY] = PRETRAINED   # the default base of adapters in update space (recorded in the lineage)
    if defn.uses_base and spec.base is None and not defn.base_optional and not is_pretrained(p):
        raise ParameterError(f"{defn.name} needs a base checkpoint (base first, last or a checkpoint)")
    if p.get("lines") is not None and spec.base is None and not is_pretrained(p):   # base-optional methods
        raise ParameterError(f"LiNeS (lines / --lines) scales the merged task vector θ − θ_0: {defn.name} "
                             "without a base has none; give a base (first, last or a checkpoint)")
    w = spec.weights
    if w is None:
        w = defn.run_weights(len(inputs))
    w = [float(x) for x in w]
    if len(w) != len(inputs):
        raise WeightError(f"{len(w)} weights for {len(inputs)} inputs")
    for c, x in zip(inputs, w):
        if not math.isfinite(x):
            raise WeightError(f"{_ref(c)}: weight {x!r} is not finite")
    if not spec.name:
        raise ParameterError("a merge needs a name")
    bad = []   # every missing or changed input, named at once (not the first one only)
    for c in inputs + ([spec.base] if spec.base is not None else []):
        if checked is not None and c.id in checked:
            continue
        if snaps is not None:
            snapshot(c, snaps)
        try:
            registry.check_unchanged(c)
        except ChangedError as e:
            bad.append(e)
            continue
        if checked is not None:
            checked.add(c.id)
    if len(bad) == 1:
        raise bad[0]
    if bad:
        raise ChangedError(f"{len(bad)} inputs are missing or changed since registration; nothing was "
                           "written:\n  " + "\n  ".join(str(e) for e in bad))
    return defn, inputs, w, p


def _pairwise_order(defn, spec, inputs, w):
    """A pairwise method's base (SLERP) picks the t = 0 end among its two inputs: (spec, inputs,
    weights) with that end first (a new spec when they are swapped)."""
    base = spec.base
    if defn.strategy != PAIRWISE or base is None:
        return spec, inputs, w
    bid = base.id
    if bid not in [c.id for c in inputs]:
        # "first"/"last" resolved against the run: reinterpret as the older/newer input
        raise ParameterError(f"{defn.name} base must be one of the two inputs (base first = the older, "
                             "last = the newer)")
    if inputs[1].id == bid:
        inputs = [inputs[1], inputs[0]]
        w = [w[1], w[0]]
        spec = dataclasses.replace(spec, inputs=inputs, weights=w)
    return spec, inputs, w


def _bound_rules(spec, pl):
    r = getattr(spec, "param_rules", None)
    return r.bind(pl.names) if r else None


def merge(registry, spec: MergeSpec, *, space: str = "factors", rank: int | None = None, out_dtype=None,
          overwrite: bool = False, progress: Callable | None = None, out_shard_size: int | None = None,
          chunk_elems: int | None = None):
    """Run one merge and register it; returns the new Checkpoint (or, when an identical output
    is registered at the target, that one). :func:`merge_result` also says which (and the name
    and path the merge settled on); ``spec`` itself is not changed."""
    return merge_result(registry, spec, space=space, rank=rank, out_dtype=out_dtype, overwrite=overwrite,
                        progress=progress, out_shard_size=out_shard_size, chunk_elems=chunk_elems).checkpoint


def merge_result(registry, spec: MergeSpec, *, space: str = "factors", rank: int | None = None, out_dtype=None,
                 overwrite: bool = False, progress: Callable | None = None, out_shard_size: int | None = None,
                 chunk_elems: int | None = None) -> MergeResult:
    """:func:`merge` returning a :class:`MergeResult`: the Checkpoint, the spec as merged (a
    default name follows space/rank/out_dtype; ``out`` is the output path) and the status
    (``MERGED``, or ``UP_TO_DATE`` when an identical output is registered at the target).

    ``progress(done_bytes, total_bytes, tensor_name)`` is called after every chunk (bytes of
    input data read so far / in all). The output path is locked (one merge per target at a
    time: TargetBusyError for the second) from before it is checked until the output is
    committed and registered. ``spec`` is not changed."""
    locks = _Locks()
    try:
        with _dist.stop_on_sigterm():   # under torchrun only: a SIGTERM aborts (and cleans up) like a failure
            return _merge(registry, spec, space=space, rank=rank, out_dtype=out_dtype, overwrite=overwrite,
                          progress=progress, out_shard_size=out_shard_size, chunk_elems=chunk_elems, _locks=locks)
    finally:
        locks.release_all()


def _merge(registry, caller_spec: MergeSpec, *, space, rank, out_dtype, overwrite, progress, out_shard_size,
           chunk_elems, _locks: _Locks) -> MergeResult:
    st = _merge_check(registry, caller_spec, space=space, rank=rank, out_dtype=out_dtype, overwrite=overwrite,
                      out_shard_size=out_shard_size, chunk_elems=chunk_elems, _locks=_locks)
    return st if isinstance(st, MergeResult) else _merge_write(registry, st, progress)


@dataclasses.dataclass
class _Checked:
    """A merge validated, planned, its target locked and checked (:func:`_merge_check`), nothing
    read or written yet: what :func:`_merge_write` needs to run it."""
    spec: MergeSpec
    merged: MergeSpec
    defn: object
    w: list
    p: dict
    pl: object
    out: Path
    space: str
    rank: int | None
    odt_user: object
    overwrite: bool
    out_shard_size: int | None
    chunk: int
    snaps: dict
    co: object


def _merge_check(registry, caller_spec: MergeSpec, *, space, rank, out_dtype, overwrite, out_shard_size,
                 chunk_elems, _locks: _Locks, checked: set | None = None, snaps: dict | None = None,
                 merged_now: list | None = None):
    """The checks of one merge, in order (spec, method and parameters, inputs unchanged, plan,
    space, target layout, target lock, up to date, target refusals): a :class:`MergeResult` when
    an identical output is registered at the target (nothing to do), else a :class:`_Checked`
    for :func:`_merge_write`. The target's lock is taken into ``_locks`` and stays held.
    ``checked``/``snaps``/``merged_now``: shared by the points of a sweep (inputs checked once,
    one snapshot per input file, the merged checkpoints listed once)."""
    spec = renamed_for(caller_spec, space, rank, out_dtype)
    co = _dist.current()   # single process, or this rank of a torchrun merge (merge/distributed.py)
    with _batch(registry):
        snaps = {} if snaps is None else snaps
        defn, inputs, w, p = _prepare(registry, spec, overwrite, checked, snaps=snaps, space=space)
    method = defn.name
    if space not in ("factors",) + UPDATE_SPACES:
        raise ParameterError(f"space must be 'factors', 'delta' or 'core', got {space!r}")
    if rank is not None and (int(rank) != rank or rank < 1):
        raise ParameterError(f"rank must be a positive integer, got {rank!r}")
    odt_user = torch_out_dtype(out_dtype)
    if out_shard_size is not None and out_shard_size <= 0:
        raise ParameterError(f"out_shard_size must be > 0, got {out_shard_size!r}")
    chunk = int(chunk_elems or CHUNK_ELEMS)
    out_shard_size = co.shard_size(out_shard_size)   # distributed: shards per rank, even for file inputs

    spec, inputs, w = _pairwise_order(defn, spec, inputs, w)
    plan_base = spec.base if defn.uses_base else None
    # update space: mixed ranks across the inputs are fine (each update carries its own r and s)
    pl = plan_lora(registry, inputs, plan_base) if space in UPDATE_SPACES else plan(registry, inputs, plan_base)
    info0 = pl.infos[0]
    if space in UPDATE_SPACES:
        if info0.kind != "lora":
            raise ParameterError(f"space={space!r} needs LoRA adapters; these inputs are full models")
        if space not in defn.spaces:
            ok = [m.name for m in _methods().values() if space in m.spaces]
            raise ParameterError(f"space={space!r} supports {', '.join(ok[:-1])} and {ok[-1]}, not {method}")
        if getattr(spec, "param_rules", None):
            raise ParameterError(f"per-tensor parameter rules are not supported with space={space!r}")
        if p.get("lines") is not None and not is_pretrained(p):
            raise ParameterError(f"LiNeS (lines / --lines) with space={space!r} needs base pretrained (the merged "
                                 "update is then the task vector itself); with a base checkpoint its coefficients "
                                 "would vary by module, not supported yet: use --base pretrained or factor space")
        for i in pl.infos + ([pl.base_info] if pl.base_info else []):
            if not i.lora:
                raise FormatError(f"{i.path}: no adapter_config.json, cannot merge in delta space (need lora_alpha and r)")
    else:
        if rank is not None:
            raise ParameterError("rank only applies to space='delta' or 'core'")
        _check_stored_space(defn, info0.kind)
        _check_factor_scales(pl.infos + ([pl.base_info] if pl.base_info is not None else []),
                             pl.refs + ([f"base {_ref(plan_base)}"] if pl.base_info is not None else []))

    out = Path(spec.out) if spec.out else default_out(spec, info0, out_shard_size=out_shard_size)
    out = co.out_path(out.resolve() if not out.is_absolute() else out, info0)
    spec = dataclasses.replace(spec, out=str(out))
    merged = dataclasses.replace(spec, inputs=list(inputs), weights=list(w))   # the spec as merged
    _check_layout(out, info0, out_shard_size)
    with co.agreeing():   # distributed: every rank raises if one fails here
        co.acquire(_locks, out)   # before the exists check, held until registered (rank 0 only under torchrun)
        with _batch(registry):
            if not overwrite:   # an identical registered output: nothing to do (--overwrite recomputes)
                hit = _up_to_date(registry, spec, out, method, w, p, space, rank, odt_user, pl.infos,
                                  merged=merged_now)
                if hit is not None:
                    return MergeResult(hit, merged, UP_TO_DATE)
            _check_target(registry, spec, out, overwrite)
    return _Checked(spec=spec, merged=merged, defn=defn, w=w, p=p, pl=pl, out=out, space=space, rank=rank,
                    odt_user=odt_user, overwrite=overwrite, out_shard_size=out_shard_size, chunk=chunk, snaps=snaps,
                    co=co)


def _merge_write(registry, st: _Checked, progress: Callable | None) -> MergeResult:
    """Run a merge :func:`_merge_check` passed: stream, commit, register (the target's lock is
    held by the caller). A failure leaves nothing of this merge registered or on disk."""
    spec, merged, defn, w, p, pl, out = st.spec, st.merged, st.defn, st.w, st.p, st.pl, st.out
    space, rank, odt_user, overwrite, out_shard_size, chunk, snaps, co = (
        st.space, st.rank, st.odt_user, st.overwrite, st.out_shard_size, st.chunk, st.snaps, st.co)
    method = defn.name
    info0 = pl.infos[0]
    out_shapes = dict(pl.shapes)
    adapter_cfg = None
    delta = None
    # streamed methods read chunks as zero-copy views under a read lease where the kernel grants
    # one (preadv otherwise); whole-tensor methods (per matrix, delta space) always read with preadv
    lease = space == "factors" and defn.strategy != "per_matrix"
    sources = [Source(i, snaps, lease) for i in pl.infos]
    base_src = Source(pl.base_info, snaps, lease) if pl.base_info is not None else None
    try:
        winfo = writer_info(info0)
        if space in UPDATE_SPACES:
            delta, out_shapes, adapter_cfg = _delta_setup(pl, sources, base_src, method, w, p, rank, odt_user,
                                                          space=space)
        elif info0.format == "peft":
            adapter_cfg = _read_cfg(winfo)
        odts = {n: _odt(odt_user, pl.dtypes[n]) for n in pl.names}
        from ..writer import dtype_str

        entries = [(n, dtype_str(odts[n]), out_shapes[n]) for n in pl.names]
        recipe = _recipe(spec, method, w, p, space, rank, odt_user, pl)
        meta = {"format": "pt", "ckptreg_recipe": json.dumps(recipe, sort_keys=True)}
        target = co.output(pl, delta, out, winfo, entries, meta, overwrite=overwrite, out_shard_size=out_shard_size,
                           adapter_config=adapter_cfg, run=_output_run(spec))
        job = Job(spec=spec, defn=defn, weights=w, params=p, out=target, rules=_bound_rules(spec, pl))
        try:
            run_pass(Pass(plan=co.share(pl, delta), sources=sources, base_src=base_src, jobs=[job], odts=odts,
                          chunk=chunk, progress=progress, delta=delta, out_shapes=out_shapes))
            target.commit()
        except BaseException:
            target.abort()
            raise
    finally:
        for s in sources + ([base_src] if base_src else []):
            s.close()
    try:
        with _batch(registry, co):
            got = _register(registry, spec, out, method, p, w, space, rank, odt_user, overwrite, target=target)
            return MergeResult(got, merged, MERGED)
    except BaseException:
        target.revert()   # no-op once registered (finalized)
        raise


def _check_stored_space(defn, kind: str) -> None:
    """A merge of the stored tensors (factor space for LoRA adapters, tensor space for full
    models) refused, before any target is touched, for a method without that space (the SVD
    family on raw LoRA factors, KnOTS on full models)."""
    space = "factors" if kind == "lora" else "tensors"
    if space not in defn.spaces:
        what = {"factors": "LoRA factors as stored (merge adapters with --space delta)",
                "tensors": "full checkpoints"}[space]
        raise ParameterError(f"{defn.name} runs in space {', '.join(defn.spaces)}, not on {what}")


def _methods():
    from .table import METHODS

    return METHODS


# ------------------------------------------------------------------------------------------------
# sweeps

def sweep(registry, specs: Sequence[MergeSpec], *, overwrite: bool = False, progress: Callable | None = None,
          out_dtype=None, out_shard_size: int | None = None, chunk_elems: int | None = None,
          space: str = "factors", rank: int | None = None) -> list:
    """Run many merges; weighted sums (the linear strategy) over the same kind of inputs are done
    in ONE pass: every input tensor of the union is read once and all M outputs are produced per
    chunk, each streamed into its own writer. Other methods run one by one (:func:`merge`).

    ``space``/``rank`` as for :func:`merge`: with ``space="delta"`` or ``"core"`` (LoRA adapters)
    every point is its own exact factored merge, exactly :func:`merge` of that spec with the same
    space and rank (same default name, ``_delta``/``_core`` suffix or ``core_`` prefix, same
    output and recipe, so each is up to date with the equal single merge); a method with a base
    and none given uses base pretrained. Every point is validated and its target locked and
    checked before the first is computed.

    Duplicates (same method, inputs, weights, params, base) are merged once. Returns one
    Checkpoint per given spec (duplicates share theirs); :func:`sweep_results` also says, per spec,
    whether it was merged or up to date. Every target is validated before any data is read; if
    the pass fails, none of its outputs is written or registered. The lock of every target is
    taken before the targets are checked and held until the sweep ends (TargetBusyError if one
    is being written). The specs are not changed.

    A failure while computing stops the sweep there: the failing point (or, in factor space,
    every output of the failing one-pass group) leaves nothing registered or on disk; the points
    computed before it are complete, registered outputs and stay (a re-run finds them up to date
    and computes only the rest)."""
    return [r.checkpoint for r in sweep_results(registry, specs, overwrite=overwrite, progress=progress,
                                                out_dtype=out_dtype, out_shard_size=out_shard_size,
                                                chunk_elems=chunk_elems, space=space, rank=rank)]


def sweep_results(registry, specs: Sequence[MergeSpec], *, overwrite: bool = False,
                  progress: Callable | None = None, out_dtype=None, out_shard_size: int | None = None,
                  chunk_elems: int | None = None, space: str = "factors",
                  rank: int | None = None) -> list[MergeResult]:
    """:func:`sweep` returning one :class:`MergeResult` per given spec (a duplicate gets the result
    of the spec it duplicates: the same checkpoint, spec as merged and status)."""
    locks = _Locks()
    try:
        with _dist.stop_on_sigterm():
            return _sweep(registry, specs, overwrite=overwrite, progress=progress, out_dtype=out_dtype,
                          out_shard_size=out_shard_size, chunk_elems=chunk_elems, space=space, rank=rank,
                          _locks=locks)
    finally:
        locks.release_all()


def _check_space(space, rank):
    if space not in ("factors",) + UPDATE_SPACES:
        raise ParameterError(f"space must be 'factors', 'delta' or 'core', got {space!r}")
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank < 1):
        raise ParameterError(f"rank must be a positive integer, got {rank!r}")
    if rank is not None and space not in UPDATE_SPACES:
        raise ParameterError("rank only applies to space='delta' or 'core'")


def _update_key_spec(s: MergeSpec) -> MergeSpec:
    """For finding duplicates in update space: a method with a base and none given merges with
    base pretrained, so it equals the same spec with ``base="pretrained"`` given."""
    defn = get_method(canonical_method(s.method))
    if defn.uses_base and s.base is None and not is_pretrained(s.params or {}):
        return dataclasses.replace(s, params={**(s.params or {}), BASE_KEY: PRETRAINED})
    return s


def _sweep(registry, callers: Sequence[MergeSpec], *, overwrite, progress, out_dtype, out_shard_size, chunk_elems,
           _locks: _Locks, space: str = "factors", rank: int | None = None) -> list[MergeResult]:
    callers = list(callers)
    _check_space(space, rank)
    # a default name follows the space, rank and out dtype (new specs: the callers' are not changed)
    renamed = [renamed_for(c, space, rank, out_dtype) for c in callers]
    if space in UPDATE_SPACES:
        keyed = [_update_key_spec(s) for s in renamed]
        kept, dropped = dedupe_specs(keyed)
        back = {id(k): s for k, s in zip(keyed, renamed)}
        uniq = [back[id(k)] for k in kept]
    else:
        uniq, dropped = dedupe_specs(renamed)
    names: dict = {}
    for s in uniq:
        key = (_output_run(s), s.name)
        if key in names:
            raise ParameterError(f"two different merges in the sweep are both named {s.name!r}")
        names[key] = s
    if space in UPDATE_SPACES:
        results = _sweep_update(registry, uniq, space=space, rank=rank, overwrite=overwrite, progress=progress,
                                out_dtype=out_dtype, out_shard_size=out_shard_size, chunk_elems=chunk_elems,
                                _locks=_locks)
        return [results[dropped.get(i, i - sum(1 for j in dropped if j < i))] for i in range(len(callers))]
    odt_user = torch_out_dtype(out_dtype)
    chunk = int(chunk_elems or CHUNK_ELEMS)
    co = _dist.current()   # single process, or this rank of a torchrun sweep (merge/distributed.py)
    out_shard_size = co.shard_size(out_shard_size)

    prepared = []
    outs = set()
    checked: set = set()
    snaps: dict = {}
    with _batch(registry):
        for s in uniq:
            defn, inputs, w, p = _prepare(registry, s, overwrite, checked, snaps=snaps)
            prepared.append((s, defn, inputs, w, p))
    infos: dict = {}

    def info(c):
        if c.id not in infos:
            infos[c.id] = info_of(registry, c)
        return infos[c.id]

    # this sweep merges in factor space: refuse a method outside it, and differing LoRA scalings,
    # for every spec before any pass
    for s, defn, inputs, w, p in prepared:
        _check_stored_space(defn, info(inputs[0]).kind)
        b = s.base if defn.uses_base else None
        cs = list(inputs) + ([b] if b is not None else [])
        if not any(getattr(c, "kind", None) == "lora" for c in cs):
            continue
        _check_factor_scales([info(c) for c in cs],
                             [_ref(c) for c in inputs] + ([f"base {_ref(b)}"] if b is not None else []))
    # validate every target before reading anything; an output already registered with the
    # same recipe and unchanged files is up to date and skipped (--overwrite recomputes it)
    results: dict[int, MergeResult] = {}   # id(spec in prepared) -> its result
    with co.agreeing(), _batch(registry):
        merged_now = None if overwrite else registry.checkpoints(merged=True)
        for k, (s, defn, inputs, w, p) in enumerate(prepared):
            info_s = info(inputs[0])
            out = Path(s.out) if s.out is not None else default_out(s, info_s, out_shard_size=out_shard_size)
            out = co.out_path(out.resolve(), info_s)
            s = dataclasses.replace(s, out=str(out))
            prepared[k] = (s, defn, inputs, w, p)
            if out in outs:
                raise ParameterError(f"two merges in the sweep write to {out}")
            outs.add(out)
            _check_layout(out, info_s, out_shard_size)
            co.acquire(_locks, out)   # before the exists check, held until registered
            if not overwrite:
                s_o, ins_o, w_o = _pairwise_order(defn, s, inputs, w)
                hit = _up_to_date(registry, s_o, out, defn.name, w_o, p, "factors", None, odt_user,
                                  [info(c) for c in ins_o], merged=merged_now)
                if hit is not None:
                    results[id(s)] = MergeResult(hit, dataclasses.replace(s_o, inputs=list(ins_o), weights=list(w_o)),
                                                 UP_TO_DATE)
                    continue
            _check_target(registry, s, out, overwrite)

    todo = [x for x in prepared if id(x[0]) not in results]
    linear = [x for x in todo if x[1].strategy == LINEAR]
    other = [x for x in todo if x[1].strategy != LINEAR]

    # group the weighted sums by the tensor inventory of their inputs
    groups: dict = {}
    for x in linear:
        sig = tuple((n, t.dtype, tuple(t.shape)) for n, t in sorted(info(x[2][0]).tensors.items()))
        groups.setdefault(hash(sig), []).append(x)

    for members in groups.values():
        union = sorted({c.id: c for x in members for c in x[2]}.values(),
                       key=lambda c: (str(c.run), c.step if c.step is not None else -1, c.id))
        col = {c.id: j for j, c in enumerate(union)}
        pl = plan(registry, union)
        sources = [Source(i, snaps, lease=True) for i in pl.infos]
        jobs = []
        try:
            odts = {n: _odt(odt_user, pl.dtypes[n]) for n in pl.names}
            from ..writer import dtype_str

            entries = [(n, dtype_str(odts[n]), pl.shapes[n]) for n in pl.names]
            for s, defn, inputs, w, p in members:
                info0 = writer_info(pl.infos[col[inputs[0].id]])
                sub = SubPlan(pl, [pl.infos[col[c.id]] for c in inputs])
                recipe = _recipe(s, defn.name, w, p, "factors", None, odt_user, sub)
                meta = {"format": "pt", "ckptreg_recipe": json.dumps(recipe, sort_keys=True)}
                target = co.output(pl, None, Path(s.out), info0, entries, meta, overwrite=overwrite,
                                   out_shard_size=out_shard_size,
                                   adapter_config=_read_cfg(info0) if info0.format == "peft" else None,
                                   run=_output_run(s))
                jobs.append(Job(spec=s, defn=defn, weights=w, params=p, out=target, cols=[col[c.id] for c in inputs],
                                rules=_bound_rules(s, pl)))
            run_pass(Pass(plan=co.share(pl), sources=sources, base_src=None, jobs=jobs, odts=odts, chunk=chunk,
                          progress=progress))
            for j in jobs:
                j.out.commit()
        except BaseException:
            for j in jobs:
                try:
                    j.out.abort()
                except Exception:
                    pass
            raise
        finally:
            for s_ in sources:
                s_.close()
        try:
            with _batch(registry, co):
                for j in jobs:
                    s = j.spec
                    got = _register(registry, s, Path(s.out), j.defn.name, j.params, j.weights, "factors",
                                    None, odt_user, overwrite, target=j.out)
                    results[id(s)] = MergeResult(got, dataclasses.replace(s, inputs=list(s.inputs),
                                                                          weights=list(j.weights)), MERGED)
        except BaseException:
            for j in jobs:   # the outputs not registered are removed again (registered ones stay)
                j.out.revert()
            raise

    for s, defn, inputs, w, p in other:
        results[id(s)] = merge_result(registry, s, out_dtype=out_dtype, overwrite=overwrite, progress=progress,
                                      out_shard_size=out_shard_size, chunk_elems=chunk_elems)

    out = []
    kept = 0   # prepared is in the order of uniq: the i-th spec not dropped is uniq[kept]
    for i in range(len(callers)):
        if i in dropped:
            k = dropped[i]
        else:
            k, kept = kept, kept + 1
        out.append(results[id(prepared[k][0])])
    return out


def _sweep_update(registry, uniq, *, space, rank, overwrite, progress, out_dtype, out_shard_size, chunk_elems,
                  _locks: _Locks) -> list[MergeResult]:
    """The points of an update-space sweep (``space`` delta or core), one :class:`MergeResult`
    each in ``uniq``'s order. Each point is the exact factored merge :func:`merge` runs (a
    delta-space merge takes milliseconds; there is no one-pass fusion to gain), but every point
    is checked and its target locked first (:func:`_merge_check`: nothing is read or written
    until all pass), then the points not up to date are computed one by one
    (:func:`_merge_write`). Under torchrun each point is a distributed merge."""
    checked: set = set()
    snaps: dict = {}
    merged_now = None if overwrite else registry.checkpoints(merged=True)
    states = []
    outs: dict = {}
    for s in uniq:
        st = _merge_check(registry, s, space=space, rank=rank, out_dtype=out_dtype, overwrite=overwrite,
                          out_shard_size=out_shard_size, chunk_elems=chunk_elems, _locks=_locks, checked=checked,
                          snaps=snaps, merged_now=merged_now)
        out = Path((st.spec if isinstance(st, MergeResult) else st.merged).out)
        if out in outs:
            raise ParameterError(f"two merges in the sweep write to {out} ({outs[out]} and {s.name})")
        outs[out] = s.name
        states.append(st)
    return [st if isinstance(st, MergeResult) else _merge_write(registry, st, progress) for st in states]


_ = Plan

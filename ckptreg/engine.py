"""The merge engine: plan, stream, merge, write atomically, register the lineage; sweeps in one pass.

How a merge runs
----------------
1. ``registry.check_unchanged`` for every input and the base (ChangedError before anything else).
2. :func:`plan` inspects every input's headers (no tensor data) and raises ONE MismatchError that
   lists every name/shape/dtype difference.
3. Re-runs are idempotent: an output registered at the target under the same name with the same
   recipe (method, params, space, rank, out dtype, weights, inputs by id and fingerprint, base)
   and unchanged files is returned as it is (``spec.status == "up to date"``, nothing written);
   ``overwrite`` recomputes it. A sweep computes only its outputs that are not up to date.
   Otherwise the output target is checked (OutputExistsError / DuplicateError) and opened: a temporary file
   or folder beside the output (:mod:`ckptreg.writer`), the header written from the plan.
4. Tensors are streamed in name order. Inputs are read with ``preadv`` into per-input chunk
   buffers allocated once and reused (:class:`_Source`), or, for streamed methods where Linux
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

Per-method streaming
--------------------
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

Choices documented here (DESIGN/METHODS leave them open)
--------------------------------------------------------
- Non-floating tensors (int buffers, bool masks) are copied from the newest input (the last of
  the input list) and must be equal in dtype/shape like everything else.
- SLERP merges exactly two checkpoints. ``base`` picks the t=0 endpoint: "first" = the older of
  the two, "last" = the newer, or a checkpoint that must be one of the two (mergekit: the base
  model is the t=0 end). Without a base the first input is the t=0 end.
- CART low-rank step applies to 2-D float tensors except embeddings (names containing "embed",
  "wte", "wpe"); other tensors end up as the weighted average (as METHODS.md says).
- LoRA ``space="delta"``: the merged update ``Σ c_i s_i B_i A_i`` is truncated to ``rank``
  (default: the inputs' r; CART: exact, rank Σ r_i, unless ``rank`` is given) and written with
  ``lora_alpha = r_out`` and ``use_rslora = false`` in the output adapter_config.json, so the
  output's scaling is exactly 1 and the scales are folded into the factors (balanced split
  ``B = U√S``, ``A = √S Vh``). ``rank_pattern`` is kept when the rank is not changed, with an
  ``alpha_pattern`` equal to it (scaling 1 per module). Delta space supports linear, uniform, mwa,
  task_arithmetic and cart; other methods are a ParameterError (they are not linear in ΔW).
- LoRA ``space="factors"`` (the default, and every sweep) combines the stored A/B factors as
  tensors and writes the first input's adapter_config.json, so it needs every module to have the
  same scaling s = alpha/r (alpha/sqrt(r) with rsLoRA; alpha_pattern/rank_pattern resolved per
  module the way PEFT resolves them, ``formats.lora_module_config``) in every input and the base.
  Differing scalings, or a mix of adapters with and without an adapter_config.json, are a
  MismatchError before anything is read or written (a sweep checks all its merges first); the
  message names the adapters and their values and points to ``space="delta"``, which is exact.
- The merged checkpoint goes to the run of the newest input.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import (
    ChangedError,
    CkptregError,
    DuplicateError,
    FormatError,
    MismatchError,
    NotFoundError,
    OutputExistsError,
    ParameterError,
    WeightError,
)

__all__ = [
    "MergeSpec", "Plan", "plan", "merge", "sweep", "paper_name", "canonical_method", "make_spec",
    "resolve_base", "dedupe_specs", "name_suffix", "metric_lags", "UP_TO_DATE", "LINEAR_METHODS",
    "TASK_METHODS", "METHODS", "CHUNK_ELEMS",
]

LINEAR_METHODS = ("linear", "uniform", "mwa")
TASK_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
METHODS = LINEAR_METHODS + TASK_METHODS + ("slerp", "cart")
_ALIASES = {"soup": "linear", "average": "linear", "mean": "linear", "unweighted": "uniform",
            "task": "task_arithmetic", "ta": "task_arithmetic", "dare": "dare_linear",
            "prune": "magnitude_prune", "magnitude": "magnitude_prune"}

#: MergeSpec.status of a merge skipped because an identical output is registered
UP_TO_DATE = "up to date"
#: elements per chunk inside huge tensors (8 MiB of float32 per output buffer)
CHUNK_ELEMS = 1 << 21
#: output chunk buffers of a sweep (M outputs at once) stay under this; more rows go in blocks
SWEEP_BUFFER_BYTES = 256 << 20
_EMBED_RE = re.compile(r"(embed|wte|wpe)", re.I)
_FLOAT_ST = ("F32", "F16", "BF16", "F64")


def canonical_method(method: str) -> str:
    m = str(method).strip().lower().replace("-", "_")
    m = _ALIASES.get(m, m)
    if m not in METHODS:
        raise ParameterError(f"unknown merge method {method!r}; known: {', '.join(METHODS)}")
    return m


# ------------------------------------------------------------------------------------------------
# specs and naming

@dataclass
class MergeSpec:
    method: str
    inputs: list                      # list[Checkpoint], ascending step
    weights: list[float] | None = None
    params: dict = field(default_factory=dict)
    base: object | None = None        # Checkpoint or None
    name: str | None = None
    out: str | None = None
    run: str | None = None            # run of the merged checkpoint (default: newest input's run)
    selection: dict | None = None     # how the inputs were chosen (recorded in the lineage params)
    # set by merge()/sweep(): "merged" (computed and registered) or "up to date" (an identical
    # registered output was found and nothing was written)
    status: str | None = None
    # the arguments of the default name (make_spec without name=); None for a name given by the
    # caller. merge()/sweep() rename a default-named spec when their space/rank/out_dtype differ
    naming: dict | None = None


def _pf(penalty) -> str:
    s = repr(float(penalty))
    if "e" in s or "inf" in s or "nan" in s:
        raise ParameterError(f"penalty {penalty!r} cannot be written as pf-n_d")
    return s.replace(".", "_")


def _metric_word(metric: str | None) -> str:
    if metric is None:
        return "metric"
    m = metric.lower()
    if m in ("step", "steps", "global_step"):
        return "steps"
    if m in ("loss", "train_loss", "training_loss", "train/loss"):
        return "loss"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", metric).strip("-") or "metric"


_DTYPE_WORDS = {"float32": "f32", "fp32": "f32", "f32": "f32", "float": "f32", "float16": "f16", "fp16": "f16",
                "f16": "f16", "half": "f16", "bfloat16": "bf16", "bf16": "bf16", "float64": "f64", "fp64": "f64",
                "f64": "f64", "double": "f64"}


def _dtype_word(d) -> str:
    t = str(d).replace("torch.", "").strip().lower()
    return _DTYPE_WORDS.get(t) or (re.sub(r"[^a-z0-9]+", "-", t).strip("-") or "dtype")


def name_suffix(*, scheme=None, metric=None, power=None, direction=None, include_final=False, space=None,
                rank=None, out_dtype=None, svd=None, weights=None, params=None, method=None) -> str:
    """The part of a default name for the settings that change the result but are not the
    defaults the paper's names assume (METHODS.md "Naming merged checkpoints"). Each default
    yields no suffix, so the paper's configurations keep the paper's names exactly:

    - ``_incl_final``: a ``--last K`` selection that includes the run's final checkpoint (the
      paper merges the last K checkpoints *before* the final one, ``--exclude-final``, and that
      selection keeps the paper's name; explicit checkpoint lists have no selection and no suffix);
    - ``_q<q>``: MWA with a power factor other than ``weights.DEFAULT_POWER`` (2), e.g. ``_q3_0``;
    - ``_max`` / ``_min``: metric or MWA weighting in the direction opposite to the metric's
      default (``weights.default_direction``);
    - ``_w-<8 hex>``: weights given explicitly (a hash of them) instead of a scheme;
    - ``_delta``: a LoRA merge in update space (factor space, the paper's, has none);
    - ``_r<rank>``: an explicit output rank (delta space);
    - ``_bf16`` / ``_f16`` / ``_f32`` / ``_f64``: an explicit output dtype (default: the inputs');
    - ``_exact_svd``: CART with an exact SVD (default: randomized).

    - method parameters that differ from their defaults: ``_freq`` (TIES/DARE-TIES sign election
      by frequency; default total), ``_lam<λ>`` (λ ≠ 1), ``_t<t>`` (SLERP t ≠ 0.5), ``_rr<ρ>``
      (CART rank ratio ≠ 0.08), ``_seed<s>`` (DARE seed ≠ 0).

    ``density`` has no default (TIES/DARE/prune require it) and is not in the name, as in the
    paper's baseline names; it is in the lineage and the recipe, so a merge that differs only in
    density is refused at the same path and is the next version of the name elsewhere, never taken
    for an identical one."""
    from . import weights as W

    parts = []
    if include_final:
        parts.append("incl_final")
    sch = (scheme or "uniform").lower()
    if sch == "mwa" and power is not None and float(power) != float(W.DEFAULT_POWER):
        parts.append(f"q{_pf(power)}")
    if sch in ("metric", "basic", "mwa") and direction is not None and metric:
        if str(direction).lower() != W.default_direction(metric):
            parts.append(str(direction).lower())
    if weights is not None:
        import hashlib

        h = hashlib.sha1(json.dumps([round(float(x), 12) for x in weights]).encode()).hexdigest()[:8]
        parts.append(f"w-{h}")
    if space is not None and space != "factors":
        parts.append(re.sub(r"[^A-Za-z0-9]+", "-", str(space)))
    if rank is not None:
        parts.append(f"r{int(rank)}")
    if out_dtype is not None:
        parts.append(_dtype_word(out_dtype))
    if svd is not None and str(svd) == "exact":
        parts.append("exact_svd")
    p = dict(params or {})
    m = canonical_method(method) if method else None
    if m in ("ties", "dare_ties") and p.get("sign") not in (None, "total"):
        parts.append("freq")
    lam = p.get("lam", p.get("lambda"))
    if lam is not None and float(lam) != 1.0 and m not in (None,) + LINEAR_METHODS:
        parts.append(f"lam{_pf(lam)}")
    if m == "slerp" and p.get("t") is not None and float(p["t"]) != 0.5:
        parts.append(f"t{_pf(p['t'])}")
    if m == "cart" and p.get("rank_ratio") is not None and float(p["rank_ratio"]) != _cart_default_rank_ratio():
        parts.append(f"rr{_pf(p['rank_ratio'])}")
    if m in ("dare_linear", "dare_ties") and p.get("seed") not in (None, 0):
        parts.append(f"seed{int(p['seed'])}")
    return "".join("_" + x for x in parts)


def _cart_default_rank_ratio() -> float:
    from .lowrank import DEFAULT_RANK_RATIO

    return float(DEFAULT_RANK_RATIO)


def paper_name(last, every, scheme, metric, penalty, method=None, base=None, **settings) -> str:
    """The paper's naming (METHODS.md "Naming merged checkpoints"), plus :func:`name_suffix` of
    ``settings`` (include_final, space, rank, out_dtype, power, direction, svd, weights, params) for
    anything else that changes the result.

    ``last_10_loss_pf-0_7``, ``last_5_3_loss_pf-0_9``, ``last_4_unweighted``,
    ``ties_last_5_base_first``, ``dare_ties_last_3_base_last``, ``slerp_last_2_base_first``.
    ``scheme``: None/"uniform" (unweighted), "metric" (basic weighting = MWA with p=1: ``pf-1_0``),
    "mwa". ``last`` may be a list of steps (explicit checkpoints): ``steps_90-80-70``-style
    ``ckpt_<s1>-<s2>...`` prefix. ``base``: "first"/"last"/a checkpoint ref or step.
    """
    m = canonical_method(method) if method else "linear"
    if isinstance(last, (list, tuple)):
        sel = "ckpt_" + "-".join(str(s) for s in last)
    else:
        sel = f"last_{int(last)}"
        if every and int(every) > 1:
            sel += f"_{int(every)}"
    sch = (scheme or "uniform").lower()
    if sch in ("uniform", "unweighted"):
        wpart = "unweighted"
    elif sch in ("metric", "basic"):
        wpart = f"{_metric_word(metric)}_pf-{_pf(1.0)}"
    elif sch == "mwa":
        if penalty is None:
            raise ParameterError("MWA naming needs a penalty factor")
        wpart = f"{_metric_word(metric)}_pf-{_pf(penalty)}"
    else:
        raise ParameterError(f"unknown weighting scheme {scheme!r}")
    suffix = name_suffix(scheme=scheme, metric=metric, method=m, **settings)
    if m in LINEAR_METHODS:
        return f"{sel}_{wpart}{suffix}"
    name = f"{m}_{sel}"
    if scheme is not None and sch not in ("uniform", "unweighted"):
        name += f"_{wpart}"
    if base is not None:
        b = base if isinstance(base, str) else (getattr(base, "ref", None) or str(base))
        b = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(b)).strip("-")
        name += f"_base_{b}"
    return name + suffix


def resolve_base(registry, base, inputs):
    """``first`` / ``last`` (first / final plain checkpoint of the newest input's run), a
    Checkpoint, an id or a ``RUN@STEP`` ref; None stays None."""
    if base is None or base == "":
        return None
    if hasattr(base, "id") and hasattr(base, "path"):
        return base
    run = inputs[-1].run if inputs else None
    if isinstance(base, str) and base.lower() in ("first", "last"):
        if run is None:
            raise ParameterError(f"base {base!r} needs inputs to know the run")
        return registry.first(run) if base.lower() == "first" else registry.final(run)
    if isinstance(base, str) and base.isdigit():
        return registry.get(int(base))
    return registry.get(base)


def make_spec(registry, method, inputs, *, scheme=None, metric=None, penalty=None, power=None,
              direction=None, weights=None, base=None, params=None, name=None, out=None, run=None,
              selection=None, space=None, rank=None, out_dtype=None) -> MergeSpec:
    """Build a MergeSpec: computes weights with :mod:`ckptreg.weights` (METHODS.md scale rules:
    linear methods sum to 1; task-vector methods default to 1 each, a scheme rescaled to Σw = n)
    and the paper-style name. ``space``/``rank``/``out_dtype`` only name the merge (pass the
    same to :func:`merge`; a default-named spec is renamed there when they differ)."""
    from . import weights as W

    m = canonical_method(method)
    inputs = list(inputs)
    if not inputs:
        raise ParameterError("a merge needs at least one input checkpoint")
    if m == "uniform":
        scheme = "uniform"
    if m == "mwa" and scheme is None:
        scheme = "mwa"
    if m == "mwa" and metric is None:
        raise WeightError("mwa needs a metric (e.g. --metric train_loss)")
    if scheme is not None and scheme.lower() in ("uniform", "unweighted"):
        scheme = "uniform"
    w = None
    if weights is not None:
        w = [float(x) for x in weights]
        if len(w) != len(inputs):
            raise WeightError(f"{len(w)} weights for {len(inputs)} inputs")
    elif scheme is not None:
        if scheme == "mwa" and penalty is None:
            raise WeightError("MWA weighting needs a penalty factor (--penalty)")
        w = W.for_checkpoints(inputs, scheme, metric=metric, penalty=penalty, power=power, direction=direction)
        if m in TASK_METHODS:
            w = W.rescale_mean_one(w)
    elif m in LINEAR_METHODS or m == "cart":
        w = W.uniform(len(inputs))
    elif m in TASK_METHODS:
        w = [1.0] * len(inputs)
    if m == "slerp" and isinstance(base, str) and base.lower() in ("first", "last"):
        # slerp: the base picks the t=0 endpoint among the two inputs
        base_ck = inputs[0] if base.lower() == "first" else inputs[-1]
    else:
        base_ck = resolve_base(registry, base, inputs) if base is not None else None
    sel = dict(selection or {})
    naming = None
    if name is None:
        if sel.get("last"):
            last, every = sel["last"], sel.get("every", 1)
        else:
            last, every = [c.step if c.step is not None else c.id for c in inputs], None
        bname = None
        if base is not None:
            bname = base.lower() if isinstance(base, str) and base.lower() in ("first", "last") else (
                base_ck.ref if base_ck is not None else str(base))
        naming = {"last": last, "every": every,
                  "scheme": scheme if (m not in LINEAR_METHODS or scheme) else "uniform",
                  "metric": metric, "penalty": 1.0 if scheme == "metric" else penalty, "method": m, "base": bname,
                  "include_final": bool(sel.get("last") and not sel.get("exclude_final")),
                  "params": params,
                  "power": power, "direction": direction, "weights": w if weights is not None else None,
                  "svd": (params or {}).get("svd") if m == "cart" else None,
                  "space": space, "rank": rank, "out_dtype": out_dtype}
        name = _default_name(naming)
    sel.update({k: v for k, v in {"scheme": scheme, "metric": metric, "penalty": penalty, "power": power,
                                  "direction": direction}.items() if v is not None})
    if scheme == "mwa" and power is None:
        sel["power"] = W.DEFAULT_POWER
    return MergeSpec(method=m, inputs=inputs, weights=w, params=dict(params or {}), base=base_ck,
                     name=name, out=out, run=run, selection=sel, naming=naming)


def _default_name(naming: dict) -> str:
    n = dict(naming)
    return paper_name(n.pop("last"), n.pop("every"), n.pop("scheme"), n.pop("metric"), n.pop("penalty"),
                      method=n.pop("method"), base=n.pop("base"), **n)


def _rename_for(spec: MergeSpec, space, rank, out_dtype) -> None:
    """A default-named spec merged with another space/rank/out_dtype than it was named with gets
    the name those settings give (so a delta-space merge never takes a factor-space name)."""
    n = spec.naming
    if n is None:
        return
    want = {"space": None if space in (None, "factors") else space, "rank": rank,
            "out_dtype": None if out_dtype is None else _dtype_word(out_dtype)}
    have = {"space": None if n.get("space") in (None, "factors") else n.get("space"), "rank": n.get("rank"),
            "out_dtype": None if n.get("out_dtype") is None else _dtype_word(n.get("out_dtype"))}
    if want != have:
        spec.naming = {**n, "space": space, "rank": rank, "out_dtype": out_dtype}
        spec.name = _default_name(spec.naming)


# ------------------------------------------------------------------------------------------------
# planning

@dataclass
class Plan:
    """What every input holds (validated equal) and how to read it."""

    names: list[str]
    dtypes: dict[str, str]
    shapes: dict[str, tuple]
    infos: list                       # CheckpointInfo of each input
    base_info: object | None = None   # CheckpointInfo of the base
    refs: list[str] = field(default_factory=list)

    @property
    def entries(self) -> list[tuple]:
        return [(n, self.dtypes[n], self.shapes[n]) for n in self.names]

    def numel(self, name) -> int:
        return math.prod(self.shapes[name]) if self.shapes[name] else 1

    @property
    def largest(self) -> int:
        return max((self.numel(n) for n in self.names), default=0)

    @property
    def nbytes(self) -> int:
        from .writer import tensor_nbytes

        return sum(tensor_nbytes(self.dtypes[n], self.shapes[n]) for n in self.names)


def _ref(c) -> str:
    r = getattr(c, "ref", None)
    if r:
        return str(r)
    return str(getattr(c, "path", c))


def _inspect(c):
    from . import formats

    # a checkpoint registered from a pickle was trusted at registration (allow_pickle there)
    pickled = getattr(c, "format", None) == "pickle" or any(
        str(f).lower().endswith(formats.PICKLE_SUFFIXES) for f in (getattr(c, "files", None) or []))
    return formats.inspect(c.path, allow_pickle=pickled)


def plan(registry, inputs, base=None) -> Plan:
    """Check that every input (and the base) has the same tensor names, shapes and dtypes.

    Reads headers only. Raises ONE MismatchError listing every difference (capped at 50 lines
    with a count of the rest) before any tensor data is read."""
    inputs = list(inputs)
    if not inputs:
        raise ParameterError("a merge needs at least one input checkpoint")
    infos = [_inspect(c) for c in inputs]
    base_info = _inspect(base) if base is not None else None
    refs = [_ref(c) for c in inputs]
    all_infos = infos + ([base_info] if base_info is not None else [])
    all_refs = refs + ([f"base {_ref(base)}"] if base is not None else [])
    ref0 = infos[0].tensors
    problems: list[str] = []
    for info, ref in zip(all_infos[1:], all_refs[1:]):
        t = info.tensors
        missing = [n for n in ref0 if n not in t]
        extra = [n for n in t if n not in ref0]
        if missing:
            problems.append(f"{ref}: missing {len(missing)} tensor(s) that {all_refs[0]} has: "
                            + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        if extra:
            problems.append(f"{ref}: has {len(extra)} tensor(s) that {all_refs[0]} lacks: "
                            + ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else ""))
        for n, ti in ref0.items():
            o = t.get(n)
            if o is None:
                continue
            if tuple(o.shape) != tuple(ti.shape):
                problems.append(f"{ref}: tensor {n!r} has shape {list(o.shape)}, {all_refs[0]} has {list(ti.shape)}")
            if o.dtype != ti.dtype:
                problems.append(f"{ref}: tensor {n!r} has dtype {o.dtype}, {all_refs[0]} has {ti.dtype}")
    kinds = {i.kind for i in all_infos}
    if len(kinds) > 1:
        problems.append("inputs mix LoRA adapters and full models: "
                        + ", ".join(f"{r}={i.kind}" for r, i in zip(all_refs, all_infos)))
    if problems:
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise MismatchError(f"inputs do not match ({len(problems)} problem(s)):\n  " + "\n  ".join(shown) + more)
    names = sorted(ref0)
    return Plan(names=names, dtypes={n: ref0[n].dtype for n in names},
                shapes={n: tuple(ref0[n].shape) for n in names}, infos=infos, base_info=base_info, refs=refs)


# ------------------------------------------------------------------------------------------------
# reading

class _Source:
    """Tensors of one checkpoint, read with ``preadv`` (:meth:`SafeFile.read`) into buffers this
    source owns and reuses, or, with ``lease=True`` where the kernel grants a read lease
    (:meth:`SafeFile.lease`), as zero-copy views of a map that a writer cannot truncate while
    they are in use (the lease is released to a waiting writer at the next chunk, and reads go
    on with ``preadv``). Either way an input truncated in place while a merge reads it (a
    trainer re-saving with ``open('wb')``) is a ChangedError naming the file, not a SIGBUS that
    kills the process. ``snaps`` maps real file paths to their
    :func:`~ckptreg.safetensors_io.file_ident` taken just before the registry checked their
    fingerprint; :meth:`check` (called after the last read, before any output is committed)
    raises ChangedError when a file was rewritten, resized or replaced since then.

    Memory: one chunk buffer per dtype (at most ``chunk_elems`` elements), so a streamed merge
    of N inputs holds N input chunks; whole tensors (TIES thresholds, CART, LoRA factors) are
    read only where a method needs them."""

    def __init__(self, info, snaps: dict | None = None, lease: bool = False):
        self.info = info
        self._files: dict[str, object] = {}
        self._state = None
        self._snaps = snaps or {}
        self._bufs: dict = {}
        self._lease = lease

    def _pickled(self, name):
        if self._state is None:   # torch pickle: load once (memory: the whole state dict)
            from .formats import load_pickle_state

            self._state = load_pickle_state(self.info.files[0])
        return self._state[name]

    def _file(self, ti):
        f = self._files.get(ti.file)
        if f is None:
            from .safetensors_io import open_tensors

            f = self._files[ti.file] = open_tensors(ti.file, expect=self._snaps.get(os.path.realpath(ti.file)))
            if self._lease:
                f.lease()
        return f

    def chunk(self, name, start: int, stop: int):
        """Flat elements ``[start, stop)`` of ``name``; valid until this source's next chunk()."""
        import torch

        ti = self.info.tensors[name]
        if getattr(ti, "offset", 0) < 0:
            return _flat(self._pickled(name))[start:stop]
        f = self._file(ti)
        v = f.view(name, start, stop)   # zero-copy while a read lease holds (SafeFile.lease)
        if v is not None:
            return v
        n = stop - start
        buf = self._bufs.get(ti.dtype)
        if buf is None or buf.numel() < n:
            from .safetensors_io import DTYPES

            buf = self._bufs[ti.dtype] = torch.empty(n, dtype=getattr(torch, DTYPES[ti.dtype][0]))
        return f.read(name, start, stop, out=buf)

    def full(self, name, out=None):
        """The whole tensor, shaped; read into ``out`` (a flat buffer of its dtype) when given."""
        ti = self.info.tensors[name]
        if getattr(ti, "offset", 0) < 0:
            return self._pickled(name)
        return self._file(ti).read(name, out=out).view(tuple(ti.shape))

    def check(self) -> None:
        """ChangedError when a file of this checkpoint changed since its fingerprint was checked
        (or, for files without a snapshot, since they were opened)."""
        from .safetensors_io import _changed, _diff, file_ident

        for f in self._files.values():
            f.check()
        for fn in self.info.files:
            ref = self._snaps.get(os.path.realpath(fn))
            if ref is not None:
                now = file_ident(fn)
                if now != ref:
                    raise _changed(os.path.abspath(fn), _diff(ref, now))

    def close(self):
        for f in self._files.values():
            try:
                f.close()
            except Exception:
                pass
        self._files.clear()
        self._state = None
        self._bufs.clear()


def _snapshot(c, snaps: dict) -> None:
    """Record the identity (inode, size, mtime) of checkpoint ``c``'s files in ``snaps`` before
    its fingerprint is checked, so that any change after the check is caught when reading."""
    from .safetensors_io import file_ident

    for fn in list(getattr(c, "files", None) or []) or [c.path]:
        rp = os.path.realpath(fn)
        if rp not in snaps and os.path.isfile(rp):
            ident = file_ident(rp)
            if ident is not None:
                snaps[rp] = ident


def _flat(t):
    return t.reshape(-1)


# ------------------------------------------------------------------------------------------------
# output targets

def _clean_stale(out: Path) -> None:
    """Remove what killed ckptreg processes left in the folder of ``out`` (any target there, not
    only ``out``): temporaries whose writer pid is dead, lock files nobody holds. Never a live
    process's temporary, never a file without the marker."""
    from .writer import remove_stale_locks, remove_stale_temporaries

    remove_stale_temporaries(out.parent)
    remove_stale_locks(out.parent)


def _refuse_nan(name, t) -> None:
    """A merged float tensor with NaN means an input holds NaN there (a diverged run); stop before
    writing it (the caller aborts every output, so nothing is left and nothing is registered).
    inf is let through: some checkpoints store -inf mask buffers on purpose."""
    import torch

    if t.is_floating_point() and bool(torch.isnan(t).any()):
        raise FormatError(f"merged tensor {name!r} has NaN values: an input checkpoint holds NaN in it "
                          "(a diverged run?); nothing was written")


def _layout(info) -> str:
    if info.format == "peft":
        return "peft"
    if info.format == "hf":
        return "hf"
    return "file"


def _out_layout(info, out_shard_size=None) -> str:
    """The output's layout, decided before anything is written: "file" (one .safetensors),
    "sharded" (single-file inputs with an out_shard_size: a folder of shards + index), "peft", "hf"."""
    lay = _layout(info)
    if lay == "file" and out_shard_size:
        return "sharded"
    return lay


_LAYOUT_TEXT = {
    "file": "one .safetensors file",
    "sharded": "a folder of shards (model-00001-of-0000N.safetensors ... + model.safetensors.index.json)",
    "peft": "a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)",
    "hf": "an HF model folder (model.safetensors or shards + index, and the config files)",
}


def _check_layout(out: Path, info, out_shard_size=None) -> None:
    """Refuse an output path the chosen layout cannot be registered under, before a byte is
    written: a single-file output must end in .safetensors; a folder output must not."""
    from .errors import UsageError

    lay = _out_layout(info, out_shard_size)
    is_st = out.name.lower().endswith(".safetensors")
    if lay == "file" and not is_st:
        raise UsageError(f"{out}: the inputs are single files, so the merge writes {_LAYOUT_TEXT[lay]} and its "
                         f"name must end in .safetensors (e.g. -o {out.with_name(out.name + '.safetensors')}); "
                         "--out-shard-size writes a folder of shards instead")
    if lay != "file" and is_st:
        why = ("--out-shard-size makes the output " if lay == "sharded"
               else f"the inputs are {info.format} folders, so the output is ")
        raise UsageError(f"{out}: {why}{_LAYOUT_TEXT[lay]}; -o must name a folder, not a .safetensors file "
                         f"(e.g. -o {out.with_name(out.name[:-len('.safetensors')] or 'merged')})")


def default_out(spec: MergeSpec, info=None, parent=None, *, out_shard_size=None) -> Path:
    """Output path for a spec: ``parent`` (default: the folder holding the newest input) / name,
    with ``.safetensors`` when the output is one file (plain-file inputs, no out_shard_size)."""
    if info is None:
        info = _inspect(spec.inputs[0])
    parent = Path(parent) if parent is not None else Path(spec.inputs[-1].path).resolve().parent
    if _out_layout(info, out_shard_size) == "file":
        return parent / f"{spec.name}.safetensors"
    return parent / spec.name


class _Output:
    """One merge output in the input's layout, atomic as a whole.

    A replaced output is kept aside at commit; :meth:`finalize` (after registration) deletes it,
    :meth:`revert` (registration failed) removes the new output and puts the old one back.
    Folder outputs list their files in the safetensors metadata (``ckptreg_files``), so a later
    ``--overwrite`` can tell that everything in the folder is ckptreg's."""

    def __init__(self, out: Path, info, entries, metadata, *, overwrite, out_shard_size=None,
                 adapter_config: dict | None = None):
        from .writer import AtomicDir, ShardedWriter, StreamingWriter, shard_names, shard_plan

        self.path = Path(out)
        self.layout = _out_layout(info, out_shard_size)
        self.adir = None
        self._settled = False
        _clean_stale(self.path)
        if self.layout == "file":
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                from .writer import fs_error

                raise (fs_error(e, self.path, f"creating {self.path.parent}") or e) from e
            self.w = StreamingWriter(self.path, entries, metadata, overwrite=overwrite, keep_old=True)
            return
        configs = [] if self.layout == "sharded" else [
            Path(cf).name for cf in info.config_files if Path(cf).name != "model.safetensors.index.json"]
        if self.layout == "peft":
            tensor_files = ["adapter_model.safetensors"]
            if adapter_config is not None and "adapter_config.json" not in configs:
                configs.append("adapter_config.json")
        else:
            sharded = self.layout == "sharded" or len(info.files) > 1 or bool(out_shard_size)
            if sharded and not out_shard_size and len(info.files) > 1:
                # mirror the input's sharding: shards up to its largest shard's data size
                from .safetensors_io import read_header

                out_shard_size = max(sum(t.nbytes for t in read_header(f).tensors.values())
                                     for f in info.files)
            if sharded:
                tensor_files = shard_names(len(shard_plan(entries, out_shard_size))) + ["model.safetensors.index.json"]
            else:
                tensor_files = ["model.safetensors"]
        metadata = {**(metadata or {}), "ckptreg_files": json.dumps(sorted(set(configs + tensor_files)))}
        self.adir = AtomicDir(self.path, overwrite=overwrite, keep_old=True)
        try:
            for cf in info.config_files if self.layout != "sharded" else []:
                nm = Path(cf).name
                if nm == "adapter_config.json" and adapter_config is not None:
                    self.adir.write_text(nm, json.dumps(adapter_config, indent=2) + "\n")
                elif nm == "model.safetensors.index.json":
                    continue
                else:
                    self.adir.copy_in(cf, nm)
            if self.layout == "peft":
                if adapter_config is not None and not any(Path(c).name == "adapter_config.json" for c in info.config_files):
                    self.adir.write_text("adapter_config.json", json.dumps(adapter_config, indent=2) + "\n")
                self.w = StreamingWriter(self.adir.file("adapter_model.safetensors"), entries, metadata, atomic=False,
                                         label=self.path / "adapter_model.safetensors")
            elif sharded:
                self.w = ShardedWriter(self.path, entries, metadata, max_shard_bytes=out_shard_size, into=self.adir)
            else:
                self.w = StreamingWriter(self.adir.file("model.safetensors"), entries, metadata, atomic=False,
                                         label=self.path / "model.safetensors")
        except BaseException:
            self.adir.abort()
            raise

    def write(self, name, t):
        _refuse_nan(name, t)
        self.w.write(name, t)

    def write_chunk(self, name, t):
        _refuse_nan(name, t)
        self.w.write_chunk(name, t)

    def commit(self) -> Path:
        self.w.commit()
        if self.adir is not None:
            self.adir.commit()
        return self.path

    def abort(self):
        try:
            self.w.abort()
        finally:
            if self.adir is not None:
                self.adir.abort()

    def finalize(self) -> None:
        """The output is registered: delete the output it replaced (if any)."""
        if not self._settled:
            self._settled = True
            (self.adir if self.adir is not None else self.w).finalize()

    def revert(self) -> None:
        """Registration failed: remove this output and put back the one it replaced (only what
        this merge wrote is removed). No-op once finalized."""
        if not self._settled:
            self._settled = True
            (self.adir if self.adir is not None else self.w).revert()


# ------------------------------------------------------------------------------------------------
# buffers

class _Buffers:
    """Chunk buffers allocated once per merge (per dtype) and reused for every tensor/chunk;
    touched once at allocation so later chunks hit no first-touch page faults."""

    def __init__(self, elems: int):
        self.elems = max(1, int(elems))
        self._b: dict = {}

    def get(self, dtype, m: int, n: int):
        import torch

        key = dtype
        need = m * n
        b = self._b.get(key)
        if b is None or b.numel() < need:
            b = torch.zeros(max(need, self.elems if b is None else need), dtype=dtype)
            self._b[key] = b
        return b[:need].view(m, n)


# ------------------------------------------------------------------------------------------------
# the per-tensor work

@dataclass
class _Job:
    """One output of a streaming pass (a merge, or one of a sweep's weighted sums)."""

    spec: MergeSpec
    method: str
    weights: list[float]                  # over the job's own inputs
    params: dict
    out: _Output | None = None
    cols: list[int] | None = None         # sweep: columns of the union that are this job's inputs


def _odt(out_dtype, st_dtype):
    import torch

    from .writer import torch_dtype

    if out_dtype is None or st_dtype not in _FLOAT_ST:
        return torch_dtype(st_dtype)
    return out_dtype if isinstance(out_dtype, torch.dtype) else torch_dtype(_dtype_str(out_dtype))


def _dtype_str(d) -> str:
    from .writer import dtype_str

    try:
        return dtype_str(d)
    except FormatError:
        raise ParameterError(f"unknown output dtype {d!r} (use float32, float16, bfloat16, float64)") from None


def _progress(cb, done, total, name):
    if cb is not None:
        cb(done, total, name)


def _stream_linear(name, sources, W, odt, bufs, chunk, writers, on_chunk, numel):
    """Weighted sums with weight matrix W [M, N] of tensor ``name`` of the N ``sources`` (read
    chunk by chunk, :meth:`_Source.chunk`); row m goes to ``writers[m]``.

    Chunk boundaries are the same whatever M (a sweep's outputs are then bitwise equal to the
    same merges run one by one, even where a kernel's rounding depends on the position within a
    call); when M chunk buffers would exceed ``SWEEP_BUFFER_BYTES`` the rows are done in blocks
    over the same (cached) input chunk."""
    from . import ops

    M = W.shape[0]
    item = _itemsize(odt)
    mb = max(1, min(M, SWEEP_BUFFER_BYTES // max(1, chunk * item)))
    for s in range(0, numel, chunk):
        e = min(numel, s + chunk)
        xs = [src.chunk(name, s, e) for src in sources]
        for m0 in range(0, M, mb):
            m1 = min(M, m0 + mb)
            buf = bufs.get(odt, m1 - m0, e - s)
            ops.weighted_sum(xs, W[m0:m1], out_dtype=odt, out=buf)
            for m in range(m0, m1):
                writers[m].write_chunk(name, buf[m - m0])
        on_chunk(e - s)


def _itemsize(dt) -> int:
    import torch

    return torch.empty((), dtype=dt).element_size()


def _thresholds(name, sources, base_view, density, numel):
    """TIES / magnitude-prune trim thresholds over whole tensors: each input is read in turn into
    one reused buffer (anonymous memory: one tensor, plus the base the caller holds)."""
    from . import ops

    k = int(math.floor(density * numel))
    if k <= 0:
        return [math.inf] * len(sources)
    out, scratch = [], None
    for src in sources:
        v = _flat(src.full(name, out=scratch))
        if scratch is None and getattr(src.info.tensors[name], "offset", 0) >= 0:
            scratch = v
        out.append(ops.kth_largest_abs(v, k, base_view))
    return out


def _stream_task(name, method, sources, base_src, weights, p, odt, bufs, chunk, writer, on_chunk, numel):
    import torch

    from . import ops, rng

    density = float(p.get("density", 1.0))
    base_full = None
    thr = None
    if method in ("ties", "magnitude_prune"):
        # whole base kept for the thresholds; its chunks below are slices of it
        base_full = _flat(base_src.full(name)) if base_src is not None else None
        thr = _thresholds(name, sources, base_full, density, numel)
    keys = None
    if method in ("dare_linear", "dare_ties"):
        seed = int(p.get("seed", 0))
        keys = [rng.signed64(rng.dare_key(seed, name, i)) for i in range(len(sources))]
    w = torch.tensor(weights, dtype=torch.float32)
    for s in range(0, numel, chunk):
        e = min(numel, s + chunk)
        if base_full is not None:
            bc = base_full[s:e]
        else:
            bc = base_src.chunk(name, s, e) if base_src is not None else None
        buf = bufs.get(odt, 1, e - s)[0]
        ops.task_merge(bc, [src.chunk(name, s, e) for src in sources], w,
                       method=method, density=density, thresholds=thr, keys=keys,
                       sign=p.get("sign", "total"), lam=float(p.get("lam", 1.0)), offset=s,
                       out_dtype=odt, out=buf)
        writer.write_chunk(name, buf)
        on_chunk(e - s)


def _slerp_coeffs(name, src0, src1, t, chunk, numel):
    """SLERP coefficients (c0, c1) of tensor ``name``, norms/dot accumulated chunkwise in float64."""
    import torch

    from .methods import SLERP_DOT_THRESHOLD, SLERP_EPS

    n00 = n11 = n01 = 0.0
    for s in range(0, numel, chunk):
        e = min(numel, s + chunk)
        a = src0.chunk(name, s, e).to(torch.float64)
        b = src1.chunk(name, s, e).to(torch.float64)
        n00 += float(torch.dot(a, a))
        n11 += float(torch.dot(b, b))
        n01 += float(torch.dot(a, b))
        del a, b
    n0, n1 = math.sqrt(n00), math.sqrt(n11)
    s0 = n0 if n0 > SLERP_EPS else 1.0
    s1 = n1 if n1 > SLERP_EPS else 1.0
    d = n01 / (s0 * s1)
    if abs(d) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, d)))
    st = math.sin(theta)
    return math.sin((1.0 - t) * theta) / st, math.sin(t * theta) / st


def _cart_tensor(name, views_full, weights, p, odt):
    from . import lowrank

    lowrank_step = len(views_full[0].shape) == 2 and not _EMBED_RE.search(name)
    # METHODS.md: dense checkpoints use randomized truncated SVD; exact only where asked.
    res = lowrank.cart_dense(list(views_full), weights, rank_ratio=float(p.get("rank_ratio", lowrank.DEFAULT_RANK_RATIO)),
                             lam=float(p.get("lam", 1.0)), lowrank=lowrank_step,
                             svd=str(p.get("svd", "randomized")), seed=int(p.get("seed", 0)))
    return res.to(odt)


# ------------------------------------------------------------------------------------------------
# LoRA delta space

def _lora_pair(name: str):
    """(module key, 'A'|'B') for PEFT LoRA factor names, else None."""
    for tag in ("A", "B"):
        for pat in (f".lora_{tag}.weight", f".lora_{tag}.default.weight", f".lora_embedding_{tag}"):
            if pat in name:
                return name.replace(pat, "\0"), tag
    return None


def _module_alpha(lora: dict, module: str, r: int) -> float:
    """The module's lora_alpha, ``alpha_pattern`` keys matched the way PEFT matches them
    (``formats.lora_pattern_key``: anchored at a dot boundary and at the end, ``"proj"`` does not
    match ``q_proj``)."""
    from .formats import lora_module_config

    return lora_module_config(lora, module, r)[0]


def _module_scale(lora: dict, module: str, r: int) -> float:
    """PEFT's scaling of one module of an adapter (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    from . import lowrank

    return lowrank.lora_scale(_module_alpha(lora, module, r), r, bool(lora.get("use_rslora", False)))


def _lora_cfg_text(lora: dict) -> str:
    parts = [f"r={lora.get('r')}", f"lora_alpha={lora.get('lora_alpha')}", f"use_rslora={bool(lora.get('use_rslora'))}"]
    for k in ("alpha_pattern", "rank_pattern"):
        if lora.get(k):
            parts.append(f"{k}={json.dumps(lora[k], sort_keys=True)}")
    return ", ".join(parts)


def _check_factor_scales(infos, refs) -> None:
    """Refuse a factor-space merge of LoRA adapters whose scalings differ in any module.

    A factor-space merge combines the raw factors A, B as tensors and writes the first input's
    adapter_config.json, so the merged update is only right when every module has the same
    scaling s = alpha/r (alpha/sqrt(r) with rsLoRA; alpha_pattern/rank_pattern resolved per
    module as PEFT does) in every input and the base. Anything else (lora_alpha, use_rslora,
    alpha_pattern, r/rank_pattern) is a MismatchError before any data is read or written, naming
    the adapters and their values and pointing to space='delta', which weights each update by
    its own scaling exactly."""
    if not infos or infos[0].kind != "lora":
        return
    loras = [i.lora for i in infos]
    if not any(loras):
        return   # no adapter configs at all (bare LoRA safetensors): nothing differs that we know of
    if not all(loras):
        missing = [ref for ref, l in zip(refs, loras) if not l]
        have = [ref for ref, l in zip(refs, loras) if l]
        raise MismatchError(
            "cannot merge these LoRA adapters: " + ", ".join(missing) + " ha" + ("s" if len(missing) == 1 else "ve")
            + " no adapter_config.json, so their scaling (lora_alpha / r) is unknown, while "
            + ", ".join(have) + " ha" + ("s" if len(have) == 1 else "ve")
            + " one; add the adapter_config.json the adapter was trained with")
    mods = {}
    for n, ti in infos[0].tensors.items():
        pr = _lora_pair(n)
        if pr is not None:
            mods.setdefault(pr[0], {})[pr[1]] = ti
    diffs = []
    for mod in sorted(mods):
        d = mods[mod]
        if "A" not in d:
            continue
        r = int(d["A"].shape[0]) if d["A"].shape else 0
        if r < 1:
            continue
        sc = [_module_scale(l, mod, r) for l in loras]
        if any(not math.isclose(x, sc[0], rel_tol=1e-9, abs_tol=0.0) for x in sc[1:]):
            diffs.append((mod, sc))
    if not diffs:
        return
    odd = sorted({j for _, sc in diffs for j, x in enumerate(sc) if not math.isclose(x, sc[0], rel_tol=1e-9)})
    shown = [0] + odd[:9]
    lines = [f"{refs[j]}: {_lora_cfg_text(loras[j])}" for j in shown]
    if len(odd) > 9:
        lines.append(f"... and {len(odd) - 9} more adapter(s) that differ from {refs[0]}")
    mod, sc = diffs[0]
    from .formats import lora_module_key

    ex = ", ".join(f"{refs[j]} {sc[j]:.6g}" for j in shown)
    raise MismatchError(
        f"LoRA adapters with different scalings cannot be merged in factor space (it averages the raw "
        f"A/B factors and keeps the first adapter's lora_alpha, so the merged update would be wrong): "
        f"{len(diffs)} module(s) differ, e.g. {lora_module_key(mod)}: scaling {ex}.\n  "
        + "\n  ".join(lines)
        + "\nUse space='delta' (ckptreg merge --space delta), which merges sum_i w_i s_i B_i A_i exactly.")


class _DeltaCache:
    """Computes delta-space merged factors per module (both A and B at once) on first request."""

    def __init__(self, plan, sources, coeff_sources, coeffs, method, p, rank, out_rank_for, odt_for):
        self.plan = plan
        self.sources = sources
        self.coeff_sources = coeff_sources   # list of (source, lora cfg) in coefficient order
        self.coeffs = coeffs
        self.method = method
        self.p = p
        self.rank = rank
        self.out_rank_for = out_rank_for
        self.odt_for = odt_for
        self.cache: dict = {}
        self.done: set = set()   # modules whose factors were both handed out
        self.names = {}
        for n in plan.names:
            pr = _lora_pair(n)
            if pr is not None:
                self.names.setdefault(pr[0], {})[pr[1]] = n

    def is_factor(self, name):
        pr = _lora_pair(name)
        return pr is not None and set(self.names.get(pr[0], {})) == {"A", "B"}

    # same-shape modules merged together in one batched factored SVD (ckptreg.ops when built):
    # at most this many layers, and at most this many bytes of stacked float32 input factors
    GROUP_LAYERS = 64
    GROUP_BYTES = 64 << 20

    def _factors(self, mod):
        """Each coefficient source's (A, B) of a module (read into memory) and its LoRA scale."""
        from . import lowrank

        an, bn = self.names[mod]["A"], self.names[mod]["B"]
        out = []
        for src, cfg in self.coeff_sources:
            a, b = src.full(an), src.full(bn)   # read with preadv (no mmap)
            r = a.shape[0]
            out.append((a, b, _module_scale(cfg, mod, r)))
        return out

    @staticmethod
    def _key(fs, r_out):
        import torch

        return (tuple((tuple(a.shape), tuple(b.shape), a.dtype == torch.float64, sc) for a, b, sc in fs), r_out)

    def get(self, name):
        import torch

        from . import lowrank

        def widen(t):
            return t.to(torch.float32) if t.dtype != torch.float64 else t

        mod, tag = _lora_pair(name)
        if mod not in self.cache:
            fs = self._factors(mod)
            r_out = self.out_rank_for(mod, [a for a, _, _ in fs])   # shapes only
            if self.method == "cart":
                As, Bs = [widen(a) for a, _, _ in fs], [widen(b) for _, b, _ in fs]
                B, A = lowrank.cart_lowrank(Bs, As, [sc for _, _, sc in fs], self.coeffs,
                                            rank_ratio=float(self.p.get("rank_ratio", lowrank.DEFAULT_RANK_RATIO)),
                                            lam=float(self.p.get("lam", 1.0)), out_rank=r_out, out_scale=1.0)
                self.cache[mod] = {"A": A, "B": B}
            else:
                self._merge_group(mod, fs, r_out, widen)
        t = self.cache[mod].pop(tag)
        if not self.cache[mod]:
            del self.cache[mod]
        self.done.add(mod)
        return t.to(self.odt_for(name)).contiguous()

    def _merge_group(self, mod, fs, r_out, widen):
        """Delta-space merge of ``mod`` and of the later not yet merged modules with the same
        factor shapes, dtypes, scales and output rank, as one batched factored SVD."""
        import torch

        from . import lowrank

        key = self._key(fs, r_out)
        per_layer = sum(4 * (a.numel() + b.numel()) for a, b, _ in fs)
        group, members = [mod], [fs]
        mods = list(self.names)
        for other in mods[mods.index(mod) + 1:]:
            if len(group) >= self.GROUP_LAYERS or (len(group) + 1) * per_layer > self.GROUP_BYTES:
                break
            if other in self.cache or other in self.done or set(self.names[other]) != {"A", "B"}:
                continue
            ofs = self._factors(other)
            if self._key(ofs, self.out_rank_for(other, [a for a, _, _ in ofs])) != key:
                continue
            group.append(other)
            members.append(ofs)
        n = len(fs)
        if len(group) == 1:   # a lone module: the per-layer torch route (LAPACK QR/SVD) is faster
            B, A = lowrank.lora_delta_merge([widen(b) for _, b, _ in fs], [widen(a) for a, _, _ in fs],
                                            [sc for _, _, sc in fs], self.coeffs, r_out, out_scale=1.0)
            self.cache[mod] = {"A": A, "B": B}
            return
        Bs = [torch.stack([widen(m[i][1]) for m in members]) for i in range(n)]   # [L, d, r_i]
        As = [torch.stack([widen(m[i][0]) for m in members]) for i in range(n)]   # [L, r_i, k]
        B, A = lowrank.lora_delta_merge(Bs, As, [sc for _, _, sc in fs], self.coeffs, r_out, out_scale=1.0,
                                        use_ops=None)
        for layer, m in enumerate(group):
            self.cache[m] = {"A": A[layer], "B": B[layer]}


# ------------------------------------------------------------------------------------------------
# merge

def _check_params(method: str, p: dict, n: int) -> dict:
    p = dict(p)
    if "lambda" in p and "lam" not in p:
        p["lam"] = p.pop("lambda")
    if method in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        d = p.get("density")
        if d is None:
            raise ParameterError(f"{method} needs a density in (0, 1] (--density)")
        d = float(d)
        if not (0.0 < d <= 1.0) or math.isnan(d):
            raise ParameterError(f"density must be in (0, 1], got {d!r}")
        p["density"] = d
    elif "density" in p and p["density"] is not None:
        d = float(p["density"])
        if not (0.0 < d <= 1.0):
            raise ParameterError(f"density must be in (0, 1], got {d!r}")
    if "sign" in p and p["sign"] is not None and p["sign"] not in ("total", "frequency"):
        raise ParameterError(f"sign must be 'total' or 'frequency', got {p['sign']!r}")
    if p.get("lam") is not None:
        lam = float(p["lam"])
        if not math.isfinite(lam):
            raise ParameterError(f"lambda must be finite, got {lam!r}")
        p["lam"] = lam
    if method == "slerp":
        if n != 2:
            raise ParameterError(f"slerp merges exactly 2 checkpoints, got {n}")
        t = float(p.get("t", 0.5))
        if not (0.0 <= t <= 1.0):
            raise ParameterError(f"slerp t must be in [0, 1], got {t!r}")
        p["t"] = t
    if method == "cart" and p.get("rank_ratio") is not None:
        rr = float(p["rank_ratio"])
        if not (0.0 < rr <= 1.0):
            raise ParameterError(f"rank ratio must be in (0, 1], got {rr!r}")
        p["rank_ratio"] = rr
    if p.get("seed") is not None:
        p["seed"] = int(p["seed"])
    return {k: v for k, v in p.items() if v is not None}


def _batch(registry):
    """One registry connection for a burst of small operations (validation, registration); never
    held while tensors stream, so trainers registering checkpoints are not blocked for long."""
    import contextlib

    b = getattr(registry, "batch", None)
    return b() if b is not None else contextlib.nullcontext()


def _prepare(registry, spec: MergeSpec, overwrite: bool, checked: set | None = None, snaps: dict | None = None):
    """Validation shared by merge and sweep (nothing is read or written here). ``snaps``
    collects each input file's identity (inode, size, mtime) taken just before its fingerprint
    is checked; the readers (:class:`_Source`) compare against it, so a change at any time after
    the check is a ChangedError, never a merge of other bytes than the checked ones."""
    method = canonical_method(spec.method)
    inputs = list(spec.inputs)
    if not inputs:
        raise ParameterError("a merge needs at least one input checkpoint")
    ids = [c.id for c in inputs]
    if len(set(ids)) != len(ids):
        raise ParameterError("the same checkpoint appears twice in the inputs")
    p = _check_params(method, spec.params or {}, len(inputs))
    if method in TASK_METHODS and spec.base is None:
        raise ParameterError(f"{method} needs a base checkpoint (base first, last or a checkpoint)")
    w = spec.weights
    if w is None:
        from . import weights as W

        w = [1.0] * len(inputs) if method in TASK_METHODS else W.uniform(len(inputs))
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
            _snapshot(c, snaps)
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
    return method, inputs, w, p


def _output_run(spec):
    return spec.run or spec.inputs[-1].run


def _dependents(registry, cid: int, merged=None) -> list[str]:
    """Refs of the registered merges that have checkpoint ``cid`` as an input or base (public
    Registry API only: the lineage of every merged checkpoint)."""
    cid = int(cid)
    out = []
    for c in merged if merged is not None else registry.checkpoints(merged=True):
        if c.id == cid:
            continue
        lin = registry.lineage(c) or {}
        if lin.get("base") == cid or any(int(i["id"]) == cid for i in lin.get("inputs", [])):
            out.append(f"{c.ref} (id {c.id})")
    return out


def _not_ckptreg_output(out: Path) -> str | None:
    """Why the existing ``out`` is not recognisably an earlier ckptreg merge output (None: it is,
    or it is an empty folder). A file must be a .safetensors whose metadata holds the
    ``ckptreg_recipe`` every merge writes; a folder must hold only regular files, its
    .safetensors files must carry the recipe, and where they list the folder's files
    (``ckptreg_files``) nothing else may be there."""
    from .safetensors_io import read_header

    def meta(f):
        try:
            md = read_header(f).metadata
        except (CkptregError, OSError, ValueError):
            return None
        return md if "ckptreg_recipe" in md else None

    if out.is_symlink():
        return "is a symbolic link (ckptreg writes real files and folders)"
    if out.is_file():
        if not out.name.lower().endswith(".safetensors"):
            return "is not a .safetensors file written by ckptreg"
        if meta(out) is None:
            return "was not written by ckptreg (its safetensors metadata holds no ckptreg recipe)"
        return None
    if not out.is_dir():
        return "is not a regular file or folder"
    try:
        entries = sorted(out.iterdir())
    except OSError as e:
        return f"cannot be listed ({e.strerror})"
    if not entries:
        return None
    listed = None
    tensor_files = 0
    for e in entries:
        if e.is_symlink() or not e.is_file():
            return f"holds {e.name}, a {'link' if e.is_symlink() else 'folder'} that ckptreg does not write"
        if e.name.lower().endswith(".safetensors"):
            md = meta(e)
            if md is None:
                return f"was not written by ckptreg ({e.name} holds no ckptreg recipe in its metadata)"
            tensor_files += 1
            if "ckptreg_files" in md:
                try:
                    listed = set(json.loads(md["ckptreg_files"]))
                except ValueError:
                    pass
    if not tensor_files:
        return "was not written by ckptreg (it holds no .safetensors file with a ckptreg recipe)"
    if listed is not None:
        extra = [e.name for e in entries if e.name not in listed]
        if extra:
            return (f"holds {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}, which ckptreg did not "
                    "write there")
    return None


def _check_target(registry, spec, out: Path, overwrite: bool):
    """Refuse an output path before a byte is written (the caller holds the target's lock).

    Never written: a registered plain checkpoint (any run), a folder holding a registered
    checkpoint, a path inside a registered checkpoint folder, the output of another registered
    merge (a different RUN@NAME), a merged checkpoint that other registered merges were made from.
    ``overwrite`` replaces only an earlier ckptreg output (:func:`_not_ckptreg_output`)."""
    run = _output_run(spec)
    try:
        existing = registry.get(f"{run}@{spec.name}")
    except CkptregError:
        existing = None
    if existing is not None and not (existing.merged and existing.name == spec.name):
        raise DuplicateError(f"{run}@{spec.name} names registered checkpoint {existing.ref} (id {existing.id}); "
                             "choose another --name")
    real = os.path.realpath(out)
    everything = registry.checkpoints()
    for c in everything:
        cid, cname, cpath, merged, ref = c.id, c.name, c.path, c.merged, c.ref
        cp = os.path.normpath(str(cpath))
        if cp == real:
            if not merged:
                raise OutputExistsError(f"{out} is registered checkpoint {ref} (id {cid}); a merge never writes "
                                        "over a registered checkpoint: choose another -o")
            if existing is None or int(cid) != existing.id:
                raise OutputExistsError(f"{out} is the output of registered merge {ref} (id {cid}); --overwrite "
                                        f"replaces only the output of the same name ({run}@{spec.name}): choose "
                                        f"another -o, or --name {cname}")
        elif cp.startswith(real.rstrip(os.sep) + os.sep):
            raise OutputExistsError(f"{out} holds registered checkpoint {ref} (id {cid}, {cpath}); a merge never "
                                    "replaces a folder holding registered checkpoints: choose another -o")
        elif real.startswith(cp.rstrip(os.sep) + os.sep):
            raise OutputExistsError(f"{out} is inside registered checkpoint {ref} (id {cid}, {cpath}); writing "
                                    "there would change it: choose another -o")
    # Merged names are versioned: the same name at another path registers the next version
    # (RUN@NAME:v2, ...); only --overwrite onto the newest version's own path replaces it.
    if existing is not None and overwrite and os.path.normpath(str(existing.path)) == real:
        deps = _dependents(registry, existing.id, [c for c in everything if c.merged])
        if deps:
            raise OutputExistsError(f"{run}@{spec.name} (id {existing.id}, {existing.path}) is an input or base of "
                                    f"registered merge(s) {', '.join(deps[:5])}{' ...' if len(deps) > 5 else ''}; "
                                    "--overwrite never replaces what other merges were made from: choose "
                                    "another --name")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{out} exists (use --overwrite to replace it)")
        why = _not_ckptreg_output(out)
        if why is not None:
            raise OutputExistsError(f"{out} {why}; --overwrite replaces only an earlier ckptreg merge output, "
                                    "so nothing was written: choose another -o")


def _recipe(spec, method, w, p, space, rank, out_dtype, plan_) -> dict:
    return {
        "ckptreg": 1, "name": spec.name, "method": method, "params": p, "space": space, "rank": rank,
        "out_dtype": None if out_dtype is None else str(out_dtype).replace("torch.", ""),
        "inputs": [{"id": c.id, "ref": _ref(c), "weight": x, "fingerprint": i.fingerprint}
                   for c, x, i in zip(spec.inputs, w, plan_.infos)],
        "base": None if spec.base is None else {"id": spec.base.id, "ref": _ref(spec.base),
                                                 "fingerprint": getattr(spec.base, "fingerprint", None)},
        "selection": spec.selection or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def metric_lags(spec) -> dict[str, int]:
    """{input ref: lag} for the inputs of a metric- or MWA-weighted spec whose metric value was
    logged ``lag`` > 0 steps before the checkpoint (``Checkpoint.metric_lag``): their weight
    uses that older value. Empty for other weightings and for step weighting."""
    from . import weights as W

    sel = spec.selection or {}
    metric = sel.get("metric")
    if not metric or str(sel.get("scheme") or "").lower() not in ("metric", "basic", "mwa"):
        return {}
    if str(metric).lower() in W.STEP_METRICS:
        return {}
    out = {}
    for c in spec.inputs:
        lag_of = getattr(c, "metric_lag", None)
        lag = lag_of(metric) if lag_of is not None else None
        if lag is not None and lag > 0:
            out[_ref(c)] = int(lag)
    return out


def _lineage_params(spec, p, space, rank, out_dtype) -> dict:
    d = dict(p)
    d.update({"space": space})
    if rank is not None:
        d["rank"] = rank
    if out_dtype is not None:
        d["out_dtype"] = str(out_dtype).replace("torch.", "")
    if spec.selection:
        d["selection"] = spec.selection
    lags = metric_lags(spec)
    if lags:
        d["metric_lag"] = lags
    return d


# lineage params that describe how the inputs were found, not what was computed from them
_UNSTABLE_PARAMS = ("selection", "metric_lag")


def _jnorm(v):
    return json.loads(json.dumps(v, sort_keys=True, allow_nan=True, default=str))


def _stored_recipe(c) -> dict | None:
    """The ``ckptreg_recipe`` a merge wrote into its output's safetensors metadata (None if the
    output has none or cannot be read)."""
    from .safetensors_io import read_header

    files = [f for f in (getattr(c, "files", None) or []) if str(f).lower().endswith(".safetensors")]
    if not files and str(c.path).lower().endswith(".safetensors"):
        files = [c.path]
    for f in files:
        try:
            md = read_header(f).metadata
            if "ckptreg_recipe" in md:
                rec = json.loads(md["ckptreg_recipe"])
                return rec if isinstance(rec, dict) else None
        except (CkptregError, OSError, ValueError):
            return None
    return None


def _same_weight(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-15)
    except (TypeError, ValueError):
        return False


def _same_recipe(old: dict, new: dict) -> bool:
    """Equal in everything that decides the output (not ``created``, not the selection that
    found the inputs): name, method, params, space, rank, out dtype, inputs (id, fingerprint,
    weight, in order), base (id, fingerprint)."""
    for k in ("name", "method", "space", "rank", "out_dtype"):
        if old.get(k) != new.get(k):
            return False
    if _jnorm(old.get("params") or {}) != _jnorm(new.get("params") or {}):
        return False
    a, b = old.get("inputs") or [], new.get("inputs") or []
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if not isinstance(x, dict) or x.get("id") != y.get("id") or x.get("fingerprint") != y.get("fingerprint") \
                or not y.get("fingerprint") or not _same_weight(x.get("weight"), y.get("weight")):
            return False
    ob, nb = old.get("base"), new.get("base")
    if (ob is None) != (nb is None):
        return False
    if nb is not None and (not isinstance(ob, dict) or ob.get("id") != nb.get("id")
                           or ob.get("fingerprint") != nb.get("fingerprint")):
        return False
    return True


def _same_lineage(lin: dict | None, spec, method, p, w, space, rank, out_dtype) -> bool:
    if not lin or lin.get("method") != method:
        return False
    ins = lin.get("inputs") or []
    if [i.get("id") for i in ins] != [c.id for c in spec.inputs]:
        return False
    if not all(_same_weight(i.get("weight"), x) for i, x in zip(ins, w)):
        return False
    if lin.get("base") != (None if spec.base is None else spec.base.id):
        return False

    def stable(d):
        return _jnorm({k: v for k, v in (d or {}).items() if k not in _UNSTABLE_PARAMS})

    return stable(lin.get("params")) == stable(_lineage_params(spec, p, space, rank, out_dtype))


def _up_to_date(registry, spec, out: Path, method, w, p, space, rank, out_dtype, infos, merged=None):
    """The registered merged checkpoint that this merge would reproduce, or None.

    It is RUN@NAME (any version) registered at ``out``, whose files are present and unchanged
    (``registry.check_unchanged``), whose stored recipe (safetensors metadata) and lineage equal
    this merge's in everything but the time and the selection, inputs compared by id AND
    fingerprint (``infos``: CheckpointInfo of ``spec.inputs``, in order) so an input replaced in
    the registry since is a new merge. The caller holds the target's lock."""
    run = _output_run(spec)
    real = os.path.realpath(out)
    pool = merged if merged is not None else registry.checkpoints(run, merged=True)
    hits = [c for c in pool if c.merged and c.run == run and c.name == spec.name
            and os.path.normpath(str(c.path)) == real]
    if not hits:
        return None
    c = hits[0]
    try:
        registry.check_unchanged(c)
    except ChangedError as e:
        if not (out.exists() or out.is_symlink()):
            # registered here but gone: writing it again could not be registered (the path is
            # taken by that entry), so say so before any work instead of after the merge
            raise ChangedError(f"{e}; it is the registered output of {c.ref} at {out}, so nothing was written: "
                               f"--overwrite recomputes and re-registers it (or `ckptreg rm {c.ref}` first)") from None
        return None   # changed: refused as "exists" below, recomputed with --overwrite
    old = _stored_recipe(c)
    if old is None:
        return None
    new = _recipe(spec, method, w, p, space, rank, out_dtype, _SubPlan(None, list(infos)))
    if not _same_recipe(old, new):
        return None
    if not _same_lineage(registry.lineage(c), spec, method, p, w, space, rank, out_dtype):
        return None
    return c


def _registered_as(registry, spec, out_path) -> bool:
    """Whether RUN@NAME is registered at ``out_path`` with the files there now (a registration
    that raised after its transaction committed)."""
    from .formats import inspect

    try:
        c = registry.get(f"{_output_run(spec)}@{spec.name}")
        return bool(c.merged and os.path.normpath(c.path) == os.path.realpath(out_path)
                    and c.fingerprint == inspect(out_path).fingerprint)
    except Exception:
        return False


def _is_newest_version_at(registry, spec, out_path) -> bool:
    """Whether the newest version of RUN@NAME is registered at ``out_path`` (then --overwrite
    replaces it; anywhere else the merge becomes the next version)."""
    try:
        c = registry.get(f"{_output_run(spec)}@{spec.name}")
    except CkptregError:
        return False
    return bool(c.merged and os.path.normpath(str(c.path)) == os.path.realpath(out_path))


def _register(registry, spec, out_path, method, p, w, space, rank, out_dtype, overwrite, target=None):
    """Register a committed output. If that fails, ``target`` (its _Output) is reverted: the
    output is removed again and the one it replaced put back, so a merge ends registered or
    leaves nothing behind."""
    try:
        cid = registry.record_merge(path=str(out_path), run=_output_run(spec), name=spec.name, method=method,
                                    params=_lineage_params(spec, p, space, rank, out_dtype),
                                    inputs=[(c.id, float(x)) for c, x in zip(spec.inputs, w)],
                                    base=None if spec.base is None else spec.base.id,
                                    replace=overwrite and _is_newest_version_at(registry, spec, out_path))
    except BaseException:
        if target is not None:
            if _registered_as(registry, spec, out_path):
                target.finalize()
            else:
                target.revert()
        raise
    if target is not None:
        target.finalize()
    spec.status = "merged"
    return registry.get(cid)


class _Locks:
    """The target locks (:class:`ckptreg.writer.TargetLock`) a merge or sweep holds until its
    outputs are committed and registered."""

    def __init__(self):
        self.held = []

    def acquire(self, out: Path) -> None:
        from .writer import TargetLock

        self.held.append(TargetLock(out).acquire())

    def release_all(self) -> None:
        while self.held:
            self.held.pop().release(keep=False)


def _torch_out_dtype(out_dtype):
    if out_dtype is None:
        return None
    from .writer import torch_dtype

    return torch_dtype(_dtype_str(out_dtype))


def merge(registry, spec: MergeSpec, *, space: str = "factors", rank: int | None = None, out_dtype=None,
          overwrite: bool = False, progress: Callable | None = None, out_shard_size: int | None = None,
          chunk_elems: int | None = None):
    """Run one merge and register it; returns the new Checkpoint.

    The output path is locked (one merge per target at a time: TargetBusyError for the second)
    from before it is checked until the output is committed and registered."""
    locks = _Locks()
    try:
        return _merge(registry, spec, space=space, rank=rank, out_dtype=out_dtype, overwrite=overwrite,
                      progress=progress, out_shard_size=out_shard_size, chunk_elems=chunk_elems, _locks=locks)
    finally:
        locks.release_all()


def _merge(registry, spec: MergeSpec, *, space: str = "factors", rank: int | None = None, out_dtype=None,
           overwrite: bool = False, progress: Callable | None = None, out_shard_size: int | None = None,
           chunk_elems: int | None = None, _locks: _Locks):
    """Run one merge and register it; returns the new Checkpoint.

    ``progress(done_bytes, total_bytes, tensor_name)`` is called after every chunk (bytes of
    input data read so far / in all)."""
    import torch

    _rename_for(spec, space, rank, out_dtype)
    with _batch(registry):
        snaps: dict = {}
        method, inputs, w, p = _prepare(registry, spec, overwrite, snaps=snaps)
    if space not in ("factors", "delta"):
        raise ParameterError(f"space must be 'factors' or 'delta', got {space!r}")
    if rank is not None and (int(rank) != rank or rank < 1):
        raise ParameterError(f"rank must be a positive integer, got {rank!r}")
    odt_user = _torch_out_dtype(out_dtype)
    if out_shard_size is not None and out_shard_size <= 0:
        raise ParameterError(f"out_shard_size must be > 0, got {out_shard_size!r}")
    chunk = int(chunk_elems or CHUNK_ELEMS)

    caller_spec = spec
    spec, inputs, w = _slerp_order(method, spec, inputs, w)
    base = None if method == "slerp" else spec.base
    plan_base = base if method in TASK_METHODS else None
    pl = plan(registry, inputs, plan_base)
    info0 = pl.infos[0]
    if space == "delta":
        if info0.kind != "lora":
            raise ParameterError("space='delta' needs LoRA adapters; these inputs are full models")
        if method not in LINEAR_METHODS + ("task_arithmetic", "cart"):
            raise ParameterError(f"space='delta' supports linear, uniform, mwa, task_arithmetic and cart, not {method}")
        for i in pl.infos + ([pl.base_info] if pl.base_info else []):
            if not i.lora:
                raise FormatError(f"{i.path}: no adapter_config.json, cannot merge in delta space (need lora_alpha and r)")
    else:
        if rank is not None:
            raise ParameterError("rank only applies to space='delta'")
        _check_factor_scales(pl.infos + ([pl.base_info] if pl.base_info is not None else []),
                             pl.refs + ([f"base {_ref(plan_base)}"] if pl.base_info is not None else []))

    out = Path(spec.out) if spec.out else default_out(spec, info0, out_shard_size=out_shard_size)
    out = out.resolve() if not out.is_absolute() else out
    spec.out = str(out)
    _check_layout(out, info0, out_shard_size)
    _locks.acquire(out)   # before the exists check, held until registered
    with _batch(registry):
        if not overwrite:   # an identical registered output: nothing to do (--overwrite recomputes)
            hit = _up_to_date(registry, spec, out, method, w, p, space, rank, odt_user, pl.infos)
            if hit is not None:
                spec.status = caller_spec.status = UP_TO_DATE
                return hit
        _check_target(registry, spec, out, overwrite)

    # output entries (delta space may change the LoRA rank)
    entries_shapes = dict(pl.shapes)
    adapter_cfg = None
    delta = None
    # streamed methods read chunks as zero-copy views under a read lease where the kernel grants
    # one (preadv otherwise); whole-tensor methods (CART, delta space) always read with preadv
    lease = space == "factors" and method != "cart"
    sources = [_Source(i, snaps, lease) for i in pl.infos]
    base_src = _Source(pl.base_info, snaps, lease) if pl.base_info is not None else None
    try:
        if space == "delta":
            delta, entries_shapes, adapter_cfg = _delta_setup(pl, sources, base_src, method, w, p, rank, odt_user)
        elif info0.format == "peft":
            adapter_cfg = _read_cfg(info0)
        odts = {n: _odt(odt_user, pl.dtypes[n]) for n in pl.names}
        from .writer import dtype_str

        entries = [(n, dtype_str(odts[n]), entries_shapes[n]) for n in pl.names]
        recipe = _recipe(spec, method, w, p, space, rank, odt_user, pl)
        meta = {"format": "pt", "ckptreg_recipe": json.dumps(recipe, sort_keys=True)}
        target = _Output(out, info0, entries, meta, overwrite=overwrite, out_shard_size=out_shard_size,
                         adapter_config=adapter_cfg)
        try:
            try:
                _run_single(pl, sources, base_src, method, w, p, odts, target, chunk, progress, delta,
                            entries_shapes)
            except FormatError:
                _changed_first(sources + ([base_src] if base_src is not None else []))
                raise
            target.commit()
        except BaseException:
            target.abort()
            raise
    finally:
        for s in sources + ([base_src] if base_src else []):
            s.close()
    try:
        with _batch(registry):
            got = _register(registry, spec, out, method, p, w, space, rank, odt_user, overwrite, target=target)
            caller_spec.status = spec.status
            return got
    except BaseException:
        target.revert()   # no-op once registered (finalized)
        raise


def _changed_first(sources) -> None:
    """A merged tensor refused (NaN) may come from an input rewritten while it was read: then the
    ChangedError naming that input is the true cause, raised instead."""
    for src in sources:
        src.check()


def _slerp_order(method, spec, inputs, w):
    """SLERP's base picks the t = 0 end among its two inputs: (spec, inputs, weights) with that
    end first (a copy of the spec when they are swapped)."""
    base = spec.base
    if method != "slerp" or base is None:
        return spec, inputs, w
    bid = base.id
    if bid not in [c.id for c in inputs]:
        # "first"/"last" resolved against the run: reinterpret as the older/newer input
        raise ParameterError("slerp base must be one of the two inputs (base first = the older, "
                             "last = the newer)")
    if inputs[1].id == bid:
        inputs = [inputs[1], inputs[0]]
        w = [w[1], w[0]]
        spec = MergeSpec(**{**spec.__dict__, "inputs": inputs, "weights": w})
    return spec, inputs, w


def _read_cfg(info):
    for cf in info.config_files:
        if Path(cf).name == "adapter_config.json":
            try:
                return json.loads(Path(cf).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise FormatError(f"{cf}: not valid JSON") from None
    return None


def _delta_setup(pl, sources, base_src, method, w, p, rank, odt_user):
    cfgs = [i.lora for i in pl.infos]
    coeff_sources = list(zip(sources, cfgs))
    if method == "task_arithmetic":
        lam = float(p.get("lam", 1.0))
        coeffs = [lam * x for x in w] + [1.0 - lam * sum(w)]
        coeff_sources.append((base_src, pl.base_info.lora))
    else:
        coeffs = list(w)
    in_cfg = _read_cfg(pl.infos[0]) or {}
    r_in = int(pl.infos[0].lora["r"])
    keep_pattern = rank is None and method != "cart" and bool(in_cfg.get("rank_pattern"))

    def out_rank_for(mod, As):
        if rank is not None:
            return int(rank)
        if method == "cart":
            return sum(int(a.shape[0]) for a in As)
        return max(int(a.shape[0]) for a in As)

    def odt_for(name):
        return _odt(odt_user, pl.dtypes[name])

    cache = _DeltaCache(pl, sources, coeff_sources, coeffs, method, p, rank, out_rank_for, odt_for)
    shapes = dict(pl.shapes)
    n_coeff = len(coeff_sources)
    ranks_seen = set()
    for mod, d in cache.names.items():
        if set(d) != {"A", "B"}:
            continue
        a_shape = pl.shapes[d["A"]]
        b_shape = pl.shapes[d["B"]]
        r_mod = a_shape[0]
        if rank is not None:
            ro = int(rank)
        elif method == "cart":
            ro = r_mod * n_coeff
        else:
            ro = r_mod
        ranks_seen.add(ro)
        shapes[d["A"]] = (ro,) + tuple(a_shape[1:])
        shapes[d["B"]] = tuple(b_shape[:-1]) + (ro,)
    r_out = rank if rank is not None else (r_in * n_coeff if method == "cart" else r_in)
    cfg = dict(in_cfg)
    cfg["r"] = int(r_out)
    cfg["lora_alpha"] = int(r_out)
    cfg["use_rslora"] = False
    cfg.pop("alpha_pattern", None)
    if keep_pattern:
        cfg["alpha_pattern"] = dict(in_cfg["rank_pattern"])
    else:
        cfg.pop("rank_pattern", None)
        if len(ranks_seen) > 1:
            raise ParameterError("inputs use per-module ranks (rank_pattern); pass an explicit rank")
    return cache, shapes, cfg


def _run_single(pl, sources, base_src, method, w, p, odts, target, chunk, progress, delta, out_shapes):
    import torch

    total = pl.nbytes * (len(sources) + (1 if base_src is not None else 0))
    done = [0]
    n_in = len(sources) + (1 if base_src is not None else 0)
    bufs = _Buffers(min(chunk, max(1, pl.largest)))
    lin_w = None
    for name in pl.names:
        st = pl.dtypes[name]
        odt = odts[name]
        itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}.get(st, 1)

        def on_chunk(nel, _is=itemsize):
            done[0] += nel * _is * n_in
            _progress(progress, done[0], total, name)

        if delta is not None and delta.is_factor(name):
            target.write(name, delta.get(name))
            on_chunk(pl.numel(name))
            continue
        numel = pl.numel(name)
        if numel == 0:
            target.write(name, torch.empty(tuple(out_shapes[name]), dtype=odt))
            continue
        if st not in _FLOAT_ST:
            for s in range(0, numel, chunk):
                target.write_chunk(name, sources[-1].chunk(name, s, min(numel, s + chunk)))
                on_chunk(min(chunk, numel - s))
            continue
        if method in LINEAR_METHODS:
            if lin_w is None:
                lin_w = torch.tensor([w], dtype=torch.float32)
            _stream_linear(name, sources, lin_w, odt, bufs, chunk, [target], on_chunk, numel)
        elif method in TASK_METHODS:
            if delta is not None and base_src is None:
                raise ParameterError("task_arithmetic in delta space needs a base")
            _stream_task(name, method, sources, base_src, w, p, odt, bufs, chunk, target, on_chunk, numel)
        elif method == "slerp":
            c0, c1 = _slerp_coeffs(name, sources[0], sources[1], float(p.get("t", 0.5)), chunk, numel)
            _stream_linear(name, sources, torch.tensor([[c0, c1]], dtype=torch.float32), odt, bufs, chunk,
                           [target], on_chunk, numel)
        elif method == "cart":
            full = [s.full(name) for s in sources]
            res = _cart_tensor(name, full, w, p, odt)
            del full
            target.write(name, res)
            del res
            on_chunk(numel)
        else:  # pragma: no cover
            raise ParameterError(f"unknown method {method}")
    # every byte was read: make sure no input changed meanwhile (a same-size rewrite, a
    # replacement by rename) before the caller commits the output
    for s in sources + ([base_src] if base_src is not None else []):
        s.check()


# ------------------------------------------------------------------------------------------------
# sweeps

def _spec_key(method, inputs, w, p, base, space="factors"):
    return (method, tuple(c.id for c in inputs), tuple(round(float(x), 12) for x in w),
            json.dumps(p, sort_keys=True, default=str), None if base is None else base.id, space)


def dedupe_specs(specs: Sequence[MergeSpec]):
    """(unique specs, {dropped spec index: index of the kept spec it duplicates}). Duplicates are
    specs with the same method, inputs, weights (to 1e-12), params and base."""
    from . import weights as W

    keep: list[MergeSpec] = []
    seen: dict = {}
    dropped: dict[int, int] = {}
    for i, s in enumerate(specs):
        m = canonical_method(s.method)
        w = s.weights
        if w is None:
            w = [1.0] * len(s.inputs) if m in TASK_METHODS else W.uniform(len(s.inputs))
        mm = "linear" if m in LINEAR_METHODS else m
        k = _spec_key(mm, s.inputs, w, s.params or {}, s.base)
        if k in seen:
            dropped[i] = seen[k]
        else:
            seen[k] = len(keep)
            keep.append(s)
    return keep, dropped


def sweep(registry, specs: Sequence[MergeSpec], *, overwrite: bool = False, progress: Callable | None = None,
          out_dtype=None, out_shard_size: int | None = None, chunk_elems: int | None = None) -> list:
    """Run many merges (see :func:`_sweep`); the lock of every target is taken before the
    targets are checked and held until the sweep ends (TargetBusyError if one is being written)."""
    locks = _Locks()
    try:
        return _sweep(registry, specs, overwrite=overwrite, progress=progress, out_dtype=out_dtype,
                      out_shard_size=out_shard_size, chunk_elems=chunk_elems, _locks=locks)
    finally:
        locks.release_all()


def _sweep(registry, specs: Sequence[MergeSpec], *, overwrite: bool = False, progress: Callable | None = None,
           out_dtype=None, out_shard_size: int | None = None, chunk_elems: int | None = None,
           _locks: _Locks) -> list:
    """Run many merges; weighted sums (linear/uniform/mwa) over the same kind of inputs are done
    in ONE pass: every input tensor of the union is read once and ``ops.weighted_sum`` produces
    all M outputs per chunk, each streamed into its own writer. Other methods run one by one.

    Duplicates (same method, inputs, weights, params, base) are merged once. Returns one
    Checkpoint per given spec (duplicates share theirs). Every target is validated before any
    data is read; if the pass fails, none of its outputs is written or registered."""
    import torch

    specs = list(specs)
    for s in specs:
        _rename_for(s, "factors", None, out_dtype)
    uniq, dropped = dedupe_specs(specs)
    names: dict = {}
    for s in uniq:
        key = (_output_run(s), s.name)
        if key in names:
            raise ParameterError(f"two different merges in the sweep are both named {s.name!r}")
        names[key] = s
    odt_user = _torch_out_dtype(out_dtype)
    chunk = int(chunk_elems or CHUNK_ELEMS)

    prepared = []
    outs = set()
    checked: set = set()
    snaps: dict = {}
    with _batch(registry):
        for s in uniq:
            method, inputs, w, p = _prepare(registry, s, overwrite, checked, snaps=snaps)
            prepared.append((s, method, inputs, w, p))
    # sweeps merge in factor space: refuse differing LoRA scalings for every spec before any pass
    lora_infos: dict = {}
    for s, method, inputs, w, p in prepared:
        b = s.base if method in TASK_METHODS else None
        cs = list(inputs) + ([b] if b is not None else [])
        if not any(getattr(c, "kind", None) == "lora" for c in cs):
            continue
        for c in cs:
            if c.id not in lora_infos:
                lora_infos[c.id] = _inspect(c)
        _check_factor_scales([lora_infos[c.id] for c in cs],
                             [_ref(c) for c in inputs] + ([f"base {_ref(b)}"] if b is not None else []))
    # validate every target before reading anything; an output already registered with the
    # same recipe and unchanged files is up to date and skipped (--overwrite recomputes it)
    results: dict[int, object] = {}
    infos: dict = dict(lora_infos)

    def info_of(c):
        if c.id not in infos:
            infos[c.id] = _inspect(c)
        return infos[c.id]

    with _batch(registry):
        merged_now = None if overwrite else registry.checkpoints(merged=True)
        for s, method, inputs, w, p in prepared:
            info_s = info_of(inputs[0])
            if s.out is None:
                s.out = str(default_out(s, info_s, out_shard_size=out_shard_size))
            out = Path(s.out).resolve()
            s.out = str(out)
            if out in outs:
                raise ParameterError(f"two merges in the sweep write to {out}")
            outs.add(out)
            _check_layout(out, info_s, out_shard_size)
            _locks.acquire(out)   # before the exists check, held until registered
            if not overwrite:
                s_o, ins_o, w_o = _slerp_order(method, s, inputs, w)
                hit = _up_to_date(registry, s_o, out, method, w_o, p, "factors", None, odt_user,
                                  [info_of(c) for c in ins_o], merged=merged_now)
                if hit is not None:
                    s.status = UP_TO_DATE
                    results[id(s)] = hit
                    continue
            _check_target(registry, s, out, overwrite)

    todo = [x for x in prepared if id(x[0]) not in results]
    linear = [x for x in todo if x[1] in LINEAR_METHODS]
    other = [x for x in todo if x[1] not in LINEAR_METHODS]

    # group the weighted sums by the tensor inventory of their inputs
    groups: dict = {}
    for x in linear:
        info = info_of(x[2][0])
        sig = tuple((n, t.dtype, tuple(t.shape)) for n, t in sorted(info.tensors.items()))
        groups.setdefault(hash(sig), []).append(x)

    done_all = [0]
    for members in groups.values():
        union = sorted({c.id: c for x in members for c in x[2]}.values(),
                       key=lambda c: (str(c.run), c.step if c.step is not None else -1, c.id))
        col = {c.id: j for j, c in enumerate(union)}
        pl = plan(registry, union)
        done_all[0] = 0   # progress is reported per one-pass group
        sources = [_Source(i, snaps, lease=True) for i in pl.infos]
        targets = []
        try:
            W_ = torch.zeros((len(members), len(union)), dtype=torch.float32)
            for m, (s, method, inputs, w, p) in enumerate(members):
                for c, x in zip(inputs, w):
                    W_[m, col[c.id]] = x
            odts = {n: _odt(odt_user, pl.dtypes[n]) for n in pl.names}
            from .writer import dtype_str

            entries = [(n, dtype_str(odts[n]), pl.shapes[n]) for n in pl.names]
            for s, method, inputs, w, p in members:
                info0 = pl.infos[col[inputs[0].id]]
                sub = _SubPlan(pl, [pl.infos[col[c.id]] for c in inputs])
                recipe = _recipe(s, method, w, p, "factors", None, odt_user, sub)
                meta = {"format": "pt", "ckptreg_recipe": json.dumps(recipe, sort_keys=True)}
                targets.append(_Output(Path(s.out), info0, entries, meta, overwrite=overwrite,
                                       out_shard_size=out_shard_size,
                                       adapter_config=_read_cfg(info0) if info0.format == "peft" else None))
            total = pl.nbytes * len(union)
            bufs = _Buffers(min(chunk, max(1, pl.largest)))
            for name in pl.names:
                st = pl.dtypes[name]
                itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}.get(st, 1)

                def on_chunk(nel, _is=itemsize, _name=name):
                    done_all[0] += nel * _is * len(union)
                    _progress(progress, done_all[0], total, _name)

                numel = pl.numel(name)
                if numel == 0:
                    for t in targets:
                        t.write(name, torch.empty(pl.shapes[name], dtype=odts[name]))
                    continue
                if st not in _FLOAT_ST:
                    for a in range(0, numel, chunk):
                        for (s, method, inputs, w, p), t in zip(members, targets):
                            t.write_chunk(name, sources[col[inputs[-1].id]].chunk(name, a, min(numel, a + chunk)))
                    on_chunk(numel)
                    continue
                try:
                    _stream_linear(name, sources, W_, odts[name], bufs, chunk, targets, on_chunk, numel)
                except FormatError:
                    _changed_first(sources)
                    raise
            # every byte was read: no input may have changed meanwhile (same-size rewrite, rename)
            for s_ in sources:
                s_.check()
            for t in targets:
                t.commit()
        except BaseException:
            for t in targets:
                try:
                    t.abort()
                except Exception:
                    pass
            raise
        finally:
            for s_ in sources:
                s_.close()
        try:
            with _batch(registry):
                for (s, method, inputs, w, p), t in zip(members, targets):
                    results[id(s)] = _register(registry, s, Path(s.out), method, p, w, "factors", None, odt_user,
                                               overwrite, target=t)
        except BaseException:
            for t in targets:   # the outputs not registered are removed again (registered ones stay)
                t.revert()
            raise

    for s, method, inputs, w, p in other:
        results[id(s)] = merge(registry, s, out_dtype=out_dtype, overwrite=overwrite, progress=progress,
                               out_shard_size=out_shard_size, chunk_elems=chunk_elems)

    out = []
    for i, s in enumerate(specs):
        if i in dropped:
            out.append(results[id(uniq[dropped[i]])])
            s.status = uniq[dropped[i]].status
        else:
            out.append(results[id(s)])
    return out


class _SubPlan:
    def __init__(self, pl, infos):
        self.infos = infos
        self.base_info = None

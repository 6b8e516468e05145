"""Merge specs and their names: :class:`MergeSpec`, :func:`make_spec` (weights by the method's
weight rule), the paper-style default names (METHODS.md "Naming merged checkpoints"),
:func:`dedupe_specs`."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import ParameterError, WeightError
from .plan import _ref
from .table import LINEAR, PAIRWISE, canonical_method, get_method

# ------------------------------------------------------------------------------------------------
# specs and naming

@dataclass(frozen=True)
class MergeSpec:
    """What to merge. Immutable: merge()/sweep() never change a spec; the name, output path and
    status they settle on come back in a :class:`ckptreg.merge.run.MergeResult` (derive a changed
    spec with ``dataclasses.replace``)."""
    method: str
    inputs: list                      # list[Checkpoint], ascending step
    weights: list[float] | None = None
    params: dict = field(default_factory=dict)
    base: object | None = None        # Checkpoint or None
    name: str | None = None
    out: str | None = None
    run: str | None = None            # run of the merged checkpoint (default: newest input's run)
    selection: dict | None = None     # how the inputs were chosen (recorded in the lineage params)
    # the arguments of the default name (make_spec without name=); None for a name given by the
    # caller. merge()/sweep() rename a default-named spec when their space/rank/out_dtype differ
    naming: dict | None = None
    # per-tensor parameter overrides (ckptreg.merge.recipe.ParamRules or any object with
    # bind(names), params_for(name, params), weights_for(name, weights), to_json(), digest());
    # None: every tensor takes ``params`` / ``weights``
    param_rules: object | None = None


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


def name_suffix(*, scheme=None, metric=None, power=None, direction=None, include_final=False,
                skip_missing=False, space=None,
                rank=None, out_dtype=None, svd=None, weights=None, params=None, method=None) -> str:
    """The part of a default name for the settings that change the result but are not the
    defaults the paper's names assume (METHODS.md "Naming merged checkpoints"). Each default
    yields no suffix, so the paper's configurations keep the paper's names exactly:

    - ``_incl_final``: a ``--last K`` selection that includes the run's final checkpoint (the
      paper merges the last K checkpoints *before* the final one, ``--exclude-final``, and that
      selection keeps the paper's name; explicit checkpoint lists have no selection and no suffix);
    - ``_skip_missing``: a ``--last K`` selection taken with ``--skip-missing`` (its K checkpoints
      are not the last K registered);
    - ``_q<q>``: MWA with a power factor other than ``weights.DEFAULT_POWER`` (2), e.g. ``_q3_0``;
    - ``_max`` / ``_min``: metric or MWA weighting in the direction opposite to the metric's
      default (``weights.default_direction``);
    - ``_w-<8 hex>``: weights given explicitly (a hash of them) instead of a scheme;
    - ``_delta`` / ``_core``: a LoRA merge in update / core space (factor space, the paper's, has
      none). In update space a method with a base and none given uses base pretrained (the
      updates themselves are the task vectors) and is named ``_base_pretrained`` like any base
      (``ties_last_5_base_pretrained_delta``); an element-wise method (``delta_rule`` "dense") in
      core space is the core-space method, named with a ``core_`` prefix instead of the suffix
      (``core_ties_last_5_base_pretrained``);
    - ``_r<rank>``: an explicit output rank (delta space);
    - ``_bf16`` / ``_f16`` / ``_f32`` / ``_f64``: an explicit output dtype (default: the inputs');
    - ``_rsvd``: CART with the randomized truncated SVD (``--svd randomized``; the default, exact
      SVD, has none: METHODS.md "Dense checkpoints").

    - method parameters that differ from their defaults: ``_freq`` (TIES/DARE-TIES sign election
      by frequency; default total), ``_lam<λ>`` (λ ≠ 1), ``_t<t>`` (SLERP t ≠ 0.5), ``_rr<ρ>``
      (CART rank ratio ≠ 0.08), ``_seed<s>`` (DARE seed ≠ 0), ``_d<density>`` (TIES/DARE/prune
      density ≠ 0.5: density is required, and the paper-style baseline names are taken to mean 0.5,
      the value the paper does not state; ckptreg's documented convention).

    Each fragment comes from the method table (``ParamDef.fragment`` / ``name_default``), so a
    method added to the table names its own parameters the same way."""
    from .. import weights as W

    parts = []
    if include_final:
        parts.append("incl_final")
    if skip_missing:
        parts.append("skip_missing")
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
    if svd is not None and str(svd) == "randomized":
        parts.append("rsvd")
    m = canonical_method(method) if method else None
    if m is not None:
        parts.extend(get_method(m).name_fragments(dict(params or {})))
    return "".join("_" + x for x in parts)


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
    defn = get_method(m)
    frag = defn.fragment
    space = settings.get("space")
    if base is None and space in ("delta", "core") and defn.uses_base:
        base = "pretrained"   # the default base of adapters in update space: named, like any base
    if frag is not None and space == "core" and defn.delta_rule == "dense":
        # element-wise methods in core space are the core-space method (arXiv 2509.17786), a
        # different merge from the same method in delta space: core_ties_..., no _core suffix
        frag = "core_" + frag
        settings = {**settings, "space": None}
    suffix = name_suffix(scheme=scheme, metric=metric, method=m, **settings)
    if frag is None:
        return f"{sel}_{wpart}{suffix}"
    name = f"{frag}_{sel}"
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
    from .. import weights as W

    m = canonical_method(method)
    inputs = list(inputs)
    if not inputs:
        raise ParameterError("a merge needs at least one input checkpoint")
    defn = get_method(m)
    if (params or {}).get("lines") is not None:   # LiNeS: one spelling, [α, β], in params, names and keys
        from .table import LINES

        params = {**params, "lines": LINES.convert(params["lines"])}
    if defn.scheme is not None and (defn.force_scheme or scheme is None):
        scheme = defn.scheme
    if defn.needs_metric and metric is None:
        raise WeightError(f"{m} needs a metric (e.g. --metric train_loss)")
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
        w = defn.default_weights(len(inputs), W.for_checkpoints(inputs, scheme, metric=metric, penalty=penalty,
                                                                power=power, direction=direction))
    else:
        w = defn.default_weights(len(inputs))
    params = dict(params or {})
    if isinstance(base, str) and base.strip().lower() == "pretrained":
        # base pretrained: no base checkpoint; recorded in the params (lineage, recipe, replay)
        base = "pretrained"
        params["base"] = "pretrained"
    elif str(params.get("base") or "").lower() == "pretrained" and base is None:
        base = "pretrained"
    if base == "pretrained":
        base_ck = None
    elif defn.strategy == PAIRWISE and isinstance(base, str) and base.lower() in ("first", "last"):
        # pairwise (slerp): the base picks the t=0 endpoint among the two inputs
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
            bname = base.lower() if isinstance(base, str) and base.lower() in ("first", "last", "pretrained") else (
                base_ck.ref if base_ck is not None else str(base))
        naming = {"last": last, "every": every,
                  "scheme": scheme if (defn.fragment is not None or scheme) else "uniform",
                  "metric": metric, "penalty": 1.0 if scheme == "metric" else penalty, "method": m, "base": bname,
                  "include_final": bool(sel.get("last")) and _holds_final(registry, inputs, sel),
                  "skip_missing": bool(sel.get("last") and sel.get("skip_missing")),
                  "params": params,
                  "power": power, "direction": direction, "weights": w if weights is not None else None,
                  "svd": (params or {}).get("svd") if defn.param("svd") is not None else None,
                  "space": space, "rank": rank, "out_dtype": out_dtype}
        name = _default_name(naming)
    sel.update({k: v for k, v in {"scheme": scheme, "metric": metric, "penalty": penalty, "power": power,
                                  "direction": direction}.items() if v is not None})
    if scheme == "mwa" and power is None:
        sel["power"] = W.DEFAULT_POWER
    return MergeSpec(method=m, inputs=inputs, weights=w, params=dict(params or {}), base=base_ck,
                     name=name, out=out, run=run, selection=sel, naming=naming)


def _holds_final(registry, inputs, sel) -> bool:
    """Whether a ``--last K`` selection's inputs include their run's final checkpoint (the
    ``_incl_final`` rule is about the inputs, whatever the selection dict says); the selection's
    ``exclude_final`` when the registry cannot tell."""
    from ..errors import CkptregError

    try:
        final = registry.final(inputs[-1].run)
    except (CkptregError, AttributeError):
        return not sel.get("exclude_final")
    return any(getattr(c, "id", None) == final.id for c in inputs)


def _default_name(naming: dict) -> str:
    n = dict(naming)
    extra = n.pop("extra", "") or ""
    return paper_name(n.pop("last"), n.pop("every"), n.pop("scheme"), n.pop("metric"), n.pop("penalty"),
                      method=n.pop("method"), base=n.pop("base"), **n) + extra


def renamed_for(spec: MergeSpec, space, rank, out_dtype) -> MergeSpec:
    """A default-named spec merged with another space/rank/out_dtype than it was named with gets
    the name those settings give (so a delta-space merge never takes a factor-space name): a new
    spec (``dataclasses.replace``), ``spec`` itself when nothing changes."""
    n = spec.naming
    if n is None:
        return spec
    want = {"space": None if space in (None, "factors") else space, "rank": rank,
            "out_dtype": None if out_dtype is None else _dtype_word(out_dtype)}
    have = {"space": None if n.get("space") in (None, "factors") else n.get("space"), "rank": n.get("rank"),
            "out_dtype": None if n.get("out_dtype") is None else _dtype_word(n.get("out_dtype"))}
    if want == have:
        return spec
    naming = {**n, "space": space, "rank": rank, "out_dtype": out_dtype}
    return dataclasses.replace(spec, naming=naming, name=_default_name(naming))


# ------------------------------------------------------------------------------------------------
# sweeps

def _spec_key(method, inputs, w, p, base, space="factors"):
    return (method, tuple(c.id for c in inputs), tuple(round(float(x), 12) for x in w),
            json.dumps(p, sort_keys=True, default=str), None if base is None else base.id, space)


def dedupe_specs(specs: Sequence[MergeSpec]):
    """(unique specs, {dropped spec index: index of the kept spec it duplicates}). Duplicates are
    specs with the same method, inputs, weights (to 1e-12), params, parameter rules and base."""

    keep: list[MergeSpec] = []
    seen: dict = {}
    dropped: dict[int, int] = {}
    for i, s in enumerate(specs):
        m = canonical_method(s.method)
        defn = get_method(m)
        w = s.weights
        if w is None:
            w = defn.run_weights(len(s.inputs))
        mm = "linear" if defn.strategy == LINEAR else m
        k = _spec_key(mm, s.inputs, w, s.params or {}, s.base)
        if getattr(s, "param_rules", None):
            k = k + (s.param_rules.digest(),)
        if k in seen:
            dropped[i] = seen[k]
        else:
            seen[k] = len(keep)
            keep.append(s)
    return keep, dropped

def metric_lags(spec) -> dict[str, int]:
    """{input ref: lag} for the inputs of a metric- or MWA-weighted spec whose metric value was
    logged ``lag`` > 0 steps before the checkpoint (``Checkpoint.metric_lag``): their weight
    uses that older value. Empty for other weightings and for step weighting."""
    from .. import weights as W

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


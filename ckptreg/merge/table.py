"""The method table: one :class:`MethodDef` per merge method, read by every layer.

Validation (:func:`check_params`), dispatch (the streaming loop calls ``defn.strategy``'s
streamer with ``defn.fn``), default weights (:meth:`MethodDef.default_weights`), default names
(:meth:`MethodDef.name_fragments`), the delta-space allow-list (``"delta" in defn.spaces``),
the CLI options of ``merge`` and ``sweep``, the sweep grid, the lineage parameters and
``ckptreg methods`` all read :data:`METHODS`. A new method is one :func:`register_method` call
(see tests/test_method_table.py for a toy method defined in a test file).

Streaming strategies (what the loop in :mod:`ckptreg.merge.stream` does with ``fn``):

- ``linear``: a weighted sum of the inputs (``fn`` is the chunk kernel ``fn(chunks, W[M, N],
  out_dtype, out)``); the sweep fuses all weighted sums over the same inputs into one pass.
- ``task_vector``: chunks of the inputs and of the base; ``prepare(name, sources, base, numel,
  params)`` computes whatever needs the whole tensor first (TIES thresholds, DARE keys), then
  ``fn(base_chunk, chunks, weights, params, ctx, offset, out_dtype, out)`` per chunk.
- ``pairwise``: two inputs; ``fn(name, src0, src1, params, chunk, numel) -> (c0, c1)`` from a
  first pass (SLERP's norms and dot product), then the weighted sum with those coefficients.
- ``per_matrix``: whole tensors; ``fn(name, tensors, weights, params, out_dtype) -> tensor``
  (CART's low-rank step per weight matrix).
- ``elementwise``: chunks of the inputs (and the base when ``uses_base``); ``fn(chunks,
  weights, params, base_chunk) -> tensor`` (float32 or float64) per chunk. The simplest way to
  add a method.

Weight rules (METHODS.md "weights"): ``convex`` (Σw = 1; default uniform), ``task_vector``
(the task-vector methods: default 1 per input, a weighting scheme rescaled to Σw = n),
``unused`` (the method ignores weights: SLERP; none are computed, uniform at run time).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ParameterError

__all__ = ["ParamDef", "MethodDef", "METHODS", "register_method", "unregister_method", "get_method",
           "canonical_method", "check_params", "method_names", "all_params", "describe", "STRATEGIES", "LINES",
           "LINES_KEY", "lines_mode", "lines_factor",
           "WEIGHT_RULES", "SPACES", "LINEAR", "TASK_VECTOR", "PAIRWISE", "PER_MATRIX", "ELEMENTWISE"]

LINEAR, TASK_VECTOR, PAIRWISE, PER_MATRIX, ELEMENTWISE = "linear", "task_vector", "pairwise", "per_matrix", "elementwise"
STRATEGIES = (LINEAR, TASK_VECTOR, PAIRWISE, PER_MATRIX, ELEMENTWISE)
WEIGHT_RULES = ("convex", "task_vector", "unused")
#: tensors: full checkpoints' stored tensors; factors: LoRA A/B factors as stored; delta: LoRA update
#: space; core: LoRA core space (METHODS.md "Core space": the Σr×Σr core matrices M_t)
SPACES = ("tensors", "factors", "delta", "core")


def _pf(v) -> str:
    s = repr(float(v))
    if "e" in s or "inf" in s or "nan" in s:
        raise ParameterError(f"{v!r} cannot be written in a name as n_d")
    return s.replace(".", "_")


@dataclass(frozen=True)
class ParamDef:
    """One method parameter. ``type``: float | int | choice. ``lo``/``hi`` bound floats
    (``lo_open``/``hi_open``: the bound itself is excluded); ``finite``: NaN/inf refused.
    ``required``: no default, the merge is refused without it. ``fragment``: the name
    suffix prefix when the value differs from ``default`` (``"lam"`` -> ``_lam0_5``; a string
    ``"=freq"`` is the literal suffix); None: never in the name. ``name_default``: for a
    required parameter (no ``default``), the value the paper-style name assumes (no suffix);
    any other value is named. ``cli``: the option flag (default ``--name-with-dashes``);
    ``flag_value``: the option is a flag setting this value. ``flag_aliases``: extra flags that
    each set one value, ``(("--exact-svd", "exact"),)`` (kept for older command lines)."""

    name: str
    type: str = "float"
    default: object = None
    help: str = ""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    finite: bool = False
    choices: tuple = ()
    required: bool = False
    sweepable: bool = False
    fragment: str | None = None
    cli: str | None = None
    flag_value: object = None
    aliases: tuple = ()
    name_default: object = None
    flag_aliases: tuple = ()

    @property
    def flag(self) -> str:
        return self.cli or "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        if self.type == "choice":
            return "|".join(map(str, self.choices))
        if self.lo is None and self.hi is None:
            return "finite" if self.finite else "any"
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"

    def convert(self, v):
        """The value checked and converted (ParameterError naming the parameter and value)."""
        if self.type == "pair":   # two finite numbers: "a,b" or a 2-sequence -> [a, b] (LiNeS)
            items = v.split(",") if isinstance(v, str) else v
            try:
                out = [float(x) for x in items] if not isinstance(items, (int, float)) else None
            except (TypeError, ValueError):
                out = None
            if out is None or len(out) != 2 or not all(math.isfinite(x) for x in out):
                raise ParameterError(f"{self.name} must be two finite numbers ALPHA,BETA (e.g. 0.5,1.0), got {v!r}")
            return out
        if self.type == "choice":
            if v not in self.choices:
                raise ParameterError(f"{self.name} must be {' or '.join(repr(c) for c in self.choices)}, got {v!r}")
            return v
        if self.type == "int":
            try:
                return int(v)
            except (TypeError, ValueError):
                raise ParameterError(f"{self.name} must be an integer, got {v!r}") from None
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ParameterError(f"{self.name} must be a number, got {v!r}") from None
        bad = math.isnan(x) or (self.finite and not math.isfinite(x))
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            bad = True
        if self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)):
            bad = True
        if bad:
            word = {"lam": "lambda", "rank_ratio": "rank ratio"}.get(self.name, self.name)
            raise ParameterError(f"{word} must be {'finite' if self.finite and self.lo is None else 'in ' + self.range_text()}"
                                 f", got {x!r}")
        return x

    def name_part(self, v) -> str | None:
        """This parameter's part of a default name for value ``v`` (None: nothing)."""
        if self.fragment is None or v is None:
            return None
        ref = self.default if self.default is not None else self.name_default
        same = v == ref if self.type != "float" else (ref is not None and float(v) == float(ref))
        if same:
            return None
        if self.fragment.startswith("="):
            return self.fragment[1:]
        if self.type == "pair":
            return f"{self.fragment}{_pf(v[0])}_{_pf(v[1])}"
        return f"{self.fragment}{int(v) if self.type == 'int' else _pf(v)}"

    def to_json(self) -> dict:
        return {"name": self.name, "type": self.type, "default": self.default, "required": self.required,
                "range": self.range_text(), "choices": list(self.choices) or None, "sweepable": self.sweepable,
                "help": self.help, "option": self.flag}


@dataclass(frozen=True)
class MethodDef:
    """One merge method. See the module docstring for ``strategy``, ``weight_rule`` and ``fn``."""

    name: str
    fn: Callable
    strategy: str = ELEMENTWISE
    weight_rule: str = "convex"
    params: tuple = ()
    aliases: tuple = ()
    spaces: tuple = ("tensors", "factors")
    help: str = ""
    #: the paper-style name: None = the selection and weighting only (``last_5_unweighted``),
    #: else this word first (``ties_last_5_base_first``)
    fragment: str | None = None
    uses_base: bool = False         # reads a base checkpoint (task vectors); the merge needs one
    n_inputs: int | None = None     # exactly this many inputs (SLERP: 2)
    prepare: Callable | None = None  # task_vector: whole-tensor preparation
    #: delta space: "weights" | "task_vector" | "cart" | "factored" (``delta_fn``) | "dense" (an
    #: element-wise method on the formed updates of one layer, truncated back to the rank; in core
    #: space on the core matrices) | "gram" (scalar coefficients from the updates' Gram matrix,
    #: exact in factored form: model_stock, multislerp, slerp)
    delta_rule: str | None = None
    scheme: str | None = None       # weighting scheme the method implies (uniform, mwa)
    force_scheme: bool = False      # ... always (uniform), or only when none is given (mwa)
    needs_metric: bool = False
    #: cross-parameter check ``check(params)`` after each value is converted (ParameterError naming
    #: the values): a combination no single range expresses (DELLA's 0 < density ± ε < 1)
    check: Callable | None = None
    #: dense matrix form of an SVD-family method (METHODS.md "Low-rank families"):
    #: ``matrix_fn(taus [T, m, n], weights, params) -> Δ [m, n]`` on the task matrices of one 2-D
    #: tensor (τ_t = θ_t − θ_0 in tensor space; the Σr×Σr core matrices M_t in core space); the
    #: merged tensor is θ_0 + Δ. Batched over the T tasks (one batched SVD, not a loop).
    matrix_fn: Callable | None = None
    #: exact factored form for LoRA adapters in delta space (``delta_rule == "factored"``):
    #: ``delta_fn(fs, weights, params, r_out) -> (B [m, r], A [r, n])`` where ``fs`` is one
    #: ``(A_t [r_t, n], B_t [m, r_t], s_t)`` per task (τ_t = s_t B_t A_t, base pretrained), and
    #: ``r_out`` the requested output rank (None: the method's natural rank); never forms m×n
    delta_fn: Callable | None = None
    #: the base is optional (``uses_base`` methods only): without one the method works on the
    #: θ_i themselves (multislerp: METHODS.md "on τ_i when a base is given (else on θ_i)")
    base_optional: bool = False
    #: how the LiNeS modifier (``lines``, :data:`LINES`) reaches the method: ``"lam"`` (its Δ is
    #: scaled by ``lam``: λ(ℓ) is folded into lam per tensor), ``"scale"`` (its functions read the
    #: per-tensor factor ``params[LINES_KEY]`` and scale Δ, or their coefficients of τ_i, by it;
    #: the ``per_matrix`` streamer does it for ``matrix_fn``), None: inferred (:func:`lines_mode`)
    lines: str | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ParameterError(f"method {self.name}: strategy {self.strategy!r} not in {STRATEGIES}")
        if self.weight_rule not in WEIGHT_RULES:
            raise ParameterError(f"method {self.name}: weight rule {self.weight_rule!r} not in {WEIGHT_RULES}")
        for s in self.spaces:
            if s not in SPACES:
                raise ParameterError(f"method {self.name}: space {s!r} not in {SPACES}")

    def param(self, name) -> ParamDef | None:
        for p in self.params:
            if p.name == name or name in p.aliases:
                return p
        if name == LINES.name and lines_mode(self) is not None:   # the LiNeS modifier
            return LINES
        return None

    def default_weights(self, n: int, scheme_weights=None) -> list[float] | None:
        """The weights of ``n`` inputs by this method's weight rule: ``scheme_weights`` (Σ = 1,
        from a weighting scheme) rescaled to Σ = n for task vectors; without a scheme uniform
        (convex), 1 each (task vectors), None (unused)."""
        from .. import weights as W

        if scheme_weights is not None:
            return W.rescale_mean_one(scheme_weights) if self.weight_rule == "task_vector" else list(scheme_weights)
        if self.weight_rule == "task_vector":
            return [1.0] * n
        if self.weight_rule == "convex":
            return W.uniform(n)
        return None

    def run_weights(self, n: int) -> list[float]:
        """Weights used at run time when a spec has none."""
        w = self.default_weights(n)
        if w is None:
            from .. import weights as W

            w = W.uniform(n)
        return w

    def name_fragments(self, params: dict) -> list[str]:
        out = []
        for p in self.params:
            part = p.name_part((params or {}).get(p.name))
            if part:
                out.append(part)
        lines = (params or {}).get(LINES.name)
        if lines is not None:   # the LiNeS modifier (any method with a base): _lines0_5_1_0
            out.append(LINES.name_part(LINES.convert(lines)))
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "aliases": list(self.aliases), "strategy": self.strategy,
                "weight_rule": self.weight_rule, "spaces": list(self.spaces), "base": self.uses_base,
                "n_inputs": self.n_inputs, "fragment": self.fragment, "help": self.help,
                "base_optional": self.base_optional, "lines": lines_mode(self) is not None,
                "parameters": [p.to_json() for p in self.params]}


#: every method by canonical name (built-ins registered at the bottom)
METHODS: dict[str, MethodDef] = {}
_ALIAS: dict[str, str] = {}


def _key(s) -> str:
    return str(s).strip().lower().replace("-", "_")


def register_method(defn: MethodDef, *, replace: bool = False) -> MethodDef:
    """Add ``defn`` to :data:`METHODS` (its aliases too). ParameterError if the name or an alias
    is taken (``replace=True`` replaces a method of the same name)."""
    name = _key(defn.name)
    taken = [a for a in (name,) + tuple(_key(a) for a in defn.aliases)
             if (a in METHODS or a in _ALIAS) and not (replace and (a == name or _ALIAS.get(a) == name))]
    if taken:
        raise ParameterError(f"method name(s) already registered: {', '.join(taken)}")
    if replace and name in METHODS:
        unregister_method(name)
    METHODS[name] = defn
    for a in defn.aliases:
        _ALIAS[_key(a)] = name
    return defn


def unregister_method(name: str) -> None:
    name = _key(name)
    d = METHODS.pop(name, None)
    if d is not None:
        for a in d.aliases:
            _ALIAS.pop(_key(a), None)


def canonical_method(method) -> str:
    m = _key(method)
    m = _ALIAS.get(m, m)
    if m not in METHODS:
        raise ParameterError(f"unknown merge method {method!r}; known: {', '.join(METHODS)}")
    return m


def get_method(method) -> MethodDef:
    if isinstance(method, MethodDef):
        return method
    return METHODS[canonical_method(method)]


def method_names() -> tuple:
    return tuple(METHODS)


def all_params() -> list[tuple[ParamDef, list[str]]]:
    """Every parameter name once (the first definition), with the methods that take it; the
    modifiers (:data:`LINES`) last, with the methods they apply to."""
    seen: dict[str, tuple[ParamDef, list[str]]] = {}
    for m in METHODS.values():
        for p in m.params:
            if p.name not in seen:
                seen[p.name] = (p, [])
            seen[p.name][1].append(m.name)
    if LINES.name not in seen:
        seen[LINES.name] = (LINES, [m.name for m in METHODS.values() if lines_mode(m) is not None])
    return list(seen.values())


# ------------------------------------------------------------------------------------------------
# LiNeS (METHODS.md "Further task-vector methods"): a modifier of every method with a base

#: ``lines=(α, β)`` / ``"α,β"`` / ``--lines ALPHA,BETA``: θ = θ_0 + λ(ℓ)·Δ with
#: λ(ℓ) = α + β·ℓ/(L − 1), Δ the method's merged task vector (θ_method − θ_0)
LINES = ParamDef("lines", "pair", None, "LiNeS: scale the merged task vector of layer l by "
                 "ALPHA + BETA*l/(L-1) (L layers; tensors outside numbered blocks get ALPHA), as ALPHA,BETA "
                 "(e.g. 0.5,1.0); methods with a base only.", fragment="lines")
#: the reserved per-tensor parameter carrying λ(ℓ) to methods of lines mode "scale"
#: (:meth:`ckptreg.merge.stream.Job.params_for` sets it; never stored, never a user parameter)
LINES_KEY = "_lines_scale"


def lines_mode(defn) -> str | None:
    """How LiNeS reaches ``defn`` (``MethodDef.lines``): "lam" | "scale" | None (the method
    has no base in the LiNeS sense: refused). Inferred when the field is None: methods with a
    base whose task vector is scaled by ``lam`` in the ``task_vector`` strategy fold λ(ℓ)
    into lam; ``matrix_fn`` methods (Δ scaled in the per-matrix streamer) are "scale".
    Methods without a base (linear, CART, SLERP: its base only picks the t = 0 end among its
    two inputs, there is no task vector to scale) take none."""
    if not defn.uses_base:
        return None
    if defn.lines is not None:
        return defn.lines
    if defn.strategy == TASK_VECTOR and defn.param("lam") is not None:
        return "lam"
    if defn.matrix_fn is not None:
        return "scale"
    return None


def lines_factor(lines, layer, n_layers: int) -> float:
    """λ(ℓ) = α + β·ℓ/(L − 1) for the layer position ``layer`` (0 … L−1; None: outside numbered
    blocks → α) of ``n_layers`` = L (L ≤ 1 → α)."""
    a, b = float(lines[0]), float(lines[1])
    if layer is None or n_layers <= 1:
        return a
    return a + b * float(layer) / float(n_layers - 1)


#: parameters checked for any method that is given them (METHODS.md's common parameters);
#: a method's own definition of a parameter wins
COMMON = {}


def check_params(method, p: dict, n: int) -> dict:
    """The parameters of a merge of ``n`` inputs, checked and converted by the method's
    ParamDefs (and :data:`COMMON` for parameters the method does not define): required ones
    present, values in range, defaults filled where a ParamDef says ``fill``; parameters
    nobody defines are passed through. None values are dropped."""
    defn = get_method(method)
    p = dict(p or {})
    for pd in list(defn.params) + list(COMMON.values()):
        for a in pd.aliases:
            if a in p and pd.name not in p:
                p[pd.name] = p.pop(a)
    if defn.n_inputs is not None and n != defn.n_inputs:
        raise ParameterError(f"{defn.name} merges exactly {defn.n_inputs} checkpoints, got {n}")
    for pd in defn.params:
        v = p.get(pd.name)
        if v is None:
            if pd.required:
                raise ParameterError(f"{defn.name} needs a {pd.name} in {pd.range_text()} ({pd.flag})")
            if pd.name in _FILL.get(defn.name, ()):
                p[pd.name] = pd.convert(pd.default)
            continue
        p[pd.name] = pd.convert(v)
    if p.get(LINES.name) is not None:
        if lines_mode(defn) is None:
            ok = [m.name for m in METHODS.values() if lines_mode(m) is not None]
            raise ParameterError(f"{defn.name} has no base to scale from: LiNeS (lines / --lines) scales a "
                                 f"merged task vector θ − θ_0 layer by layer and applies to methods with a base "
                                 f"({', '.join(ok)}), not {defn.name}")
        p[LINES.name] = LINES.convert(p[LINES.name])
    for name, pd in COMMON.items():
        if defn.param(name) is None and p.get(name) is not None:
            v = pd.convert(p[name])
            if name in _COMMON_STORE:
                p[name] = v
    out = {k: v for k, v in p.items() if v is not None}
    if defn.check is not None:
        defn.check(out)
    return out


# parameters written into the params when absent (they are recorded in the lineage that way)
_FILL = {"slerp": ("t",), "cart": ("svd",)}
# common parameters stored converted (the others are only checked, kept as given)
_COMMON_STORE = ("lam", "seed")


def describe() -> list[dict]:
    """Every method as JSON: name, aliases, strategy, weight rule, spaces, parameters."""
    return [m.to_json() for m in METHODS.values()]


# ------------------------------------------------------------------------------------------------
# built-in methods

#: CART's default rank ratio ρ (METHODS.md; equal to ``lowrank.DEFAULT_RANK_RATIO``, which imports
#: torch: the table must not, so the CLI starts fast; tests/test_method_table.py checks they agree)
CART_RANK_RATIO = 0.08

def _builtins():
    from . import kernels as K

    # density is required; the paper-style names (ties_last_5_base_first, ...) are taken to mean
    # density 0.5 (ckptreg's convention: the paper does not state its value), any other is named
    # (_d0_7), so two merges that differ in density never share a default name
    density = ParamDef("density", "float", None, "Fraction of each task vector kept, in (0, 1].", lo=0.0, hi=1.0,
                       lo_open=True, required=True, sweepable=True, fragment="d", name_default=0.5)
    sign = ParamDef("sign", "choice", "total", "TIES sign election: total (sum) or frequency (count).",
                    choices=("total", "frequency"), fragment="=freq")
    lam = ParamDef("lam", "float", 1.0, "Scale of the merged task vector (λ).", finite=True, sweepable=True,
                   fragment="lam", cli="--lambda", aliases=("lambda",))
    seed = ParamDef("seed", "int", 0, "DARE mask seed.", fragment="seed")
    t = ParamDef("t", "float", 0.5, "SLERP interpolation factor in [0, 1] (0: the base end).", lo=0.0, hi=1.0,
                 sweepable=True, fragment="t")
    rr = ParamDef("rank_ratio", "float", CART_RANK_RATIO, "CART rank ratio ρ in (0, 1].", lo=0.0, hi=1.0,
                  lo_open=True, sweepable=True, fragment="rr")
    # METHODS.md "Dense checkpoints": the default truncated SVD equals exact to 1e-4 on any spectrum,
    # so the default is exact; randomized only where asked (recorded in the lineage: filled below)
    svd = ParamDef("svd", "choice", "exact", "CART's truncated SVD on dense matrices: exact (default; equal "
                   "to the float64 result to 1e-4) or randomized (faster, approximate, seeded by --seed); "
                   "--exact-svd is an alias of --svd exact.", choices=("exact", "randomized"), cli="--svd",
                   flag_aliases=(("--exact-svd", "exact"),))
    cart_seed = ParamDef("seed", "int", 0, "Seed of CART's randomized SVD.", fragment="seed")
    COMMON.update({"density": density, "sign": sign, "lam": lam, "seed": seed})

    lin = dict(strategy=LINEAR, fn=K.linear_chunk, spaces=SPACES, delta_rule="weights")
    register_method(MethodDef("linear", aliases=("soup", "average", "mean"), help="Weighted average (model soup).",
                              **lin))
    register_method(MethodDef("uniform", aliases=("unweighted",), help="Unweighted average.", scheme="uniform",
                              force_scheme=True, **lin))
    register_method(MethodDef("mwa", help="Metric-weighted average (METHODS.md MWA: --metric, --penalty).",
                              scheme="mwa", needs_metric=True, **lin))
    task = dict(strategy=TASK_VECTOR, fn=K.task_chunk, prepare=K.task_prepare, weight_rule="task_vector",
                uses_base=True)
    register_method(MethodDef("task_arithmetic", aliases=("task", "ta"), params=(lam,), fragment="task_arithmetic",
                              spaces=SPACES, delta_rule="task_vector", help="base + λ Σ w_i τ_i.", **task))
    # element-wise methods on LoRA adapters: the dense updates of one layer (delta space, truncated
    # back to the rank) or the core matrices (core space); METHODS.md "Delta space for element-wise"
    dense = dict(spaces=SPACES, delta_rule="dense")
    register_method(MethodDef("ties", params=(density, sign, lam), fragment="ties",
                              help="Trim (top density of |τ|), elect signs, disjoint mean.", **task, **dense))
    register_method(MethodDef("dare_linear", aliases=("dare",), params=(density, lam, seed), fragment="dare_linear",
                              help="Drop-and-rescale task vectors, then a weighted sum.", **task, **dense))
    register_method(MethodDef("dare_ties", params=(density, sign, lam, seed), fragment="dare_ties",
                              help="DARE drop-and-rescale, then TIES sign election.", **task, **dense))
    register_method(MethodDef("magnitude_prune", aliases=("prune", "magnitude"), params=(density, lam),
                              fragment="magnitude_prune", help="Trim task vectors by magnitude, then a weighted sum.",
                              **task, **dense))
    register_method(MethodDef("slerp", strategy=PAIRWISE, fn=K.slerp_coeffs, weight_rule="unused", params=(t,),
                              n_inputs=2, fragment="slerp", spaces=SPACES, delta_rule="gram",
                              help="Spherical interpolation of two checkpoints."))
    register_method(MethodDef("cart", strategy=PER_MATRIX, fn=K.cart_tensor, params=(lam, rr, svd, cart_seed),
                              spaces=SPACES, delta_rule="cart", fragment="cart",
                              help="Centered low-rank task arithmetic per weight matrix."))
    from . import methods_geometry; methods_geometry.register()   # model_stock, multislerp
    from . import methods_sparsify  # noqa: F401  breadcrumbs(_ties), della(_linear): registered on import
    from . import methods_lowrank; methods_lowrank.register()   # tsv, iso_c, iso_cts, star, knots_(dare_)ties


_builtins()

"""Recipe files: a merge written down as YAML or JSON, per-tensor parameter rules, replay.

A recipe (``ckptreg merge --recipe FILE``)::

    inputs: {run: m, last: 3}          # a selection (run, last, every, exclude_final, skip_missing)
                                       # or a list of refs / ids: [m@200, m@300, 17]
    method: ties
    base: m@100                        # first, last, a ref or an id; LoRA in delta/core space:
                                       # pretrained (the default there: the updates themselves)
    weighting: {scheme: mwa, metric: train_loss, penalty: 0.7}   # optional (uniform/metric/mwa;
                                       # power, direction), the CLI's --weights/--metric/--penalty
    parameters:
      density: 0.5                     # a constant
      weight:                          # a list of rules, first match wins
        - filter: self_attn            # substring of the tensor name
          value: [[1.0, 0.0], [0.0, 1.0]]   # a gradient: interpolated over the layer index
        - value: [0.5, 0.5]            # no filter: every other tensor
      lines: [0.5, 1.0]                # LiNeS (methods with a base): λ(ℓ) = 0.5 + 1.0·ℓ/(L−1) scales
                                       # the merged task vector of layer ℓ (one pair, not rules)
    space: factors                     # LoRA: factors (default), delta or core; rank: N with them
    out_dtype: bfloat16                # optional; out_shard_size: 2GB (optional)
    output: merged/                    # -o on the command line wins
    name: my_merge                     # --name wins; default: the paper's name (+ _rules-<hash>)

Parameters
----------
``weight`` is per input: one number per input (``[0.5, 0.5]``); every other parameter is one
value (``density``, ``lambda``/``lam``, ``t``, ``rank_ratio``, ``sign``, ``seed``, ``svd``).
A parameter is a constant, or a list of rules ``{filter: SUBSTRING, value: V}`` (no ``filter``:
every tensor) of which the first whose filter is a substring of the tensor name applies; a
tensor no rule matches takes the parameter's constant (the method default, or the uniform /
scheme weights). A numeric value may be a *gradient*: a list of K values (for ``weight``, a
list of K per-input lists) spread evenly over the layer positions 0 … L−1 and interpolated
linearly between them (mergekit's gradients: position p gets ``x = p (K−1) / (L−1)``,
``v[⌊x⌋] + (x − ⌊x⌋)(v[⌊x⌋+1] − v[⌊x⌋])``; K = 1 is a constant). The layer index of a tensor is
the first integer component of its dotted name (``model.layers.7.mlp...`` → 7); L is the number
of distinct layer indices in the plan and a tensor's position is the rank of its index among
them (the index itself when layers are numbered 0 … L−1). A tensor without a layer index
(embeddings, lm_head, the final norm) takes a gradient's first value: give it its own rule to
choose another. ``sign``, ``seed`` and ``svd`` take constants only (a rule may still pick them
per tensor). Gradients are computed in float64; the engine casts weights as it does any
weights.

Only constants go into the engine's ``params``/``weights`` (so a recipe of constants is the
same merge as the CLI line, byte for byte); rules go into :class:`ParamRules`, which the
streaming loop consults per tensor (``job.params_for(name)`` / ``job.weights_for(name)``) and
which is stored in the output's ``ckptreg_recipe`` metadata (``param_rules``) and its lineage
params (``rules``) so ``--replay`` and the up-to-date check see it.

Errors name the recipe file, the key and the value: a malformed file or structure is a
UsageError (exit 2), a value out of range a ParameterError (exit 8).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ParameterError, UsageError

__all__ = ["Recipe", "Rule", "ParamRules", "load_recipe", "parse_recipe", "layer_index", "interpolate",
           "RECIPE_KEYS", "recipe_yaml"]

RECIPE_KEYS = ("inputs", "method", "base", "weighting", "parameters", "space", "rank", "out_dtype",
               "out_shard_size", "output", "name", "run")
SELECTION_KEYS = ("run", "last", "every", "exclude_final", "skip_missing")
WEIGHTING_KEYS = ("scheme", "metric", "penalty", "power", "direction")
#: the per-input parameter (one number per input)
PER_INPUT = "weight"
class _FromTable(Mapping):
    """The recipe's view of the method table's parameters, read at use (so a method registered
    later, e.g. by a plugin or a test, is accepted in recipes too). ``"numeric"``: float
    parameters, which may be gradients, with their valid range (lo, lo_open, hi, hi_open);
    ``"const"``: choice parameters (their choices) and integer ones (None), constants only."""

    def __init__(self, kind: str):
        self.kind = kind

    def _d(self) -> dict:
        from .table import METHODS

        out: dict = {}
        for defn in METHODS.values():
            for pd in defn.params:
                if pd.name in out:
                    continue
                if self.kind == "numeric" and pd.type == "float":
                    out[pd.name] = (-math.inf if pd.lo is None else pd.lo, pd.lo is None or pd.lo_open,
                                    math.inf if pd.hi is None else pd.hi, pd.hi is None or pd.hi_open)
                elif self.kind == "const" and pd.type in ("choice", "int"):
                    out[pd.name] = tuple(pd.choices) if pd.type == "choice" else None
        return out

    def __getitem__(self, k):
        return self._d()[k]

    def __iter__(self):
        return iter(self._d())

    def __len__(self):
        return len(self._d())


#: numeric parameters that may be gradients, with their valid range (lo, lo_open, hi, hi_open)
_NUMERIC = _FromTable("numeric")
#: parameters that take constants only: choices, or None for an integer
_CONST_ONLY = _FromTable("const")
_ALIASES = {"lambda": "lam"}
#: the LiNeS modifier's parameter (``table.LINES``): ``lines: [alpha, beta]``
_LINES = "lines"


def _fail(source, key, value, why, cls=UsageError):
    raise cls(f"recipe {source}: {key}: {value!r} {why}")


# ------------------------------------------------------------------------------------------------
# layer index and gradients

_INT = re.compile(r"^\d+$")


def layer_index(name: str) -> int | None:
    """The first integer component of a dotted tensor name (``model.layers.3.mlp.w`` → 3), or None."""
    for part in str(name).split("."):
        if _INT.match(part):
            return int(part)
    return None


def interpolate(values, pos: int, n_layers: int):
    """Gradient ``values`` (K scalars, or K equal-length lists) at layer position ``pos`` of
    ``n_layers``: spread evenly over 0 … n_layers−1, linear in between (float64)."""
    k = len(values)
    if k == 1:
        return values[0]
    x = 0.0 if n_layers <= 1 else (k - 1) * min(max(pos, 0), n_layers - 1) / (n_layers - 1)
    i = min(int(math.floor(x)), k - 2)
    f = x - i
    a, b = values[i], values[i + 1]
    if isinstance(a, list):
        return [float(u) + f * (float(v) - float(u)) for u, v in zip(a, b)]
    return float(a) + f * (float(b) - float(a))


# ------------------------------------------------------------------------------------------------
# rules

@dataclass(frozen=True)
class Rule:
    """One rule of a parameter: ``filter`` (a substring of the tensor name; None: every tensor)
    and ``value`` (a constant, or, with ``gradient``, K values interpolated over layers)."""

    filter: str | None
    value: object
    gradient: bool = False

    def matches(self, name: str) -> bool:
        return self.filter is None or self.filter in name

    def to_json(self) -> dict:
        d = {"value": self.value}
        if self.filter is not None:
            d = {"filter": self.filter, **d}
        return d


@dataclass(frozen=True)
class ParamRules:
    """Per-tensor parameter rules: ``rules[param]`` is a tuple of :class:`Rule` (first match
    wins). :meth:`bind` the tensor names of the plan before asking (it counts the layers)."""

    rules: dict = field(default_factory=dict)
    n_inputs: int = 0
    positions: dict | None = None     # layer index -> position 0 … L-1 (set by bind)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def bind(self, names) -> "ParamRules":
        idx = sorted({i for i in (layer_index(n) for n in names) if i is not None})
        return ParamRules(self.rules, self.n_inputs, {v: p for p, v in enumerate(idx)})

    @property
    def n_layers(self) -> int:
        return len(self.positions or {})

    def value(self, param: str, name: str):
        """The value of ``param`` for tensor ``name`` (None: no rule matches: use the constant)."""
        for r in self.rules.get(param, ()):
            if r.matches(name):
                if not r.gradient:
                    return r.value
                if self.positions is None:
                    raise ParameterError("parameter rules used before bind(tensor names)")
                li = layer_index(name)
                pos = 0 if li is None else self.positions.get(li, 0)
                return interpolate(r.value, pos, self.n_layers)
        return None

    def params_for(self, name: str, defaults: dict) -> dict:
        """``defaults`` (the merge's constant params) with the rules' values for ``name``."""
        out = dict(defaults)
        for p in self.rules:
            if p == PER_INPUT:
                continue
            v = self.value(p, name)
            if v is not None:
                out[p] = v
        return out

    def weights_for(self, name: str, defaults):
        """The per-input weights of tensor ``name`` (``defaults`` when no weight rule matches)."""
        v = self.value(PER_INPUT, name) if PER_INPUT in self.rules else None
        return list(defaults) if v is None else [float(x) for x in v]

    def to_json(self) -> dict:
        return {p: [r.to_json() for r in rs] for p, rs in sorted(self.rules.items())}

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:8]

    @classmethod
    def from_json(cls, data: dict, n_inputs: int, source: str = "<stored recipe>") -> "ParamRules":
        rules = {}
        for p, rs in (data or {}).items():
            rules[p] = tuple(_rule(source, p, i, r, n_inputs) for i, r in enumerate(rs))
        return cls(rules, n_inputs)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_number(source, key, param, x):
    if not _is_num(x) or not math.isfinite(float(x)):
        _fail(source, key, x, "is not a finite number", ParameterError if _is_num(x) else UsageError)
    rng = _NUMERIC.get(param)
    if rng is not None:
        lo, lo_open, hi, hi_open = rng
        v = float(x)
        if (v < lo or (lo_open and v == lo)) or (v > hi or (hi_open and v == hi)):
            _fail(source, key, x, f"is out of range: {param} must be in {'(' if lo_open else '['}{lo:g}, "
                                  f"{hi:g}{')' if hi_open else ']'}", ParameterError)


def _check_weights(source, key, v, n_inputs):
    if not isinstance(v, list) or not v or not all(_is_num(x) for x in v):
        _fail(source, key, v, f"is not a list of {n_inputs} numbers (one weight per input)")
    if len(v) != n_inputs:
        _fail(source, key, v, f"has {len(v)} weights for {n_inputs} inputs", ParameterError)
    for x in v:
        if not math.isfinite(float(x)):
            _fail(source, key, v, "holds a weight that is not finite", ParameterError)
    return [float(x) for x in v]


def _value(source, key, param, v, n_inputs):
    """(value, gradient?) of one constant or rule value, validated."""
    if param == PER_INPUT:
        if isinstance(v, list) and v and all(isinstance(x, list) for x in v):
            return [_check_weights(source, f"{key}[{i}]", x, n_inputs) for i, x in enumerate(v)], True
        return _check_weights(source, key, v, n_inputs), False
    if param in _CONST_ONLY:
        choices = _CONST_ONLY[param]
        if choices is None:   # an integer parameter (a seed)
            if not isinstance(v, int) or isinstance(v, bool):
                _fail(source, key, v, f"is not an integer {param}")
        elif v not in choices:
            _fail(source, key, v, f"is not one of {', '.join(choices)}", ParameterError)
        return v, False
    if param not in _NUMERIC:
        _fail(source, key, v, f"is not a known parameter (known: {', '.join(sorted([PER_INPUT, *_NUMERIC, *_CONST_ONLY]))})")
    if isinstance(v, list):
        if not v:
            _fail(source, key, v, "is an empty gradient (give one value or several)")
        for i, x in enumerate(v):
            _check_number(source, f"{key}[{i}]", param, x)
        return [float(x) for x in v], True
    _check_number(source, key, param, v)
    return float(v), False


def _rule(source, param, i, r, n_inputs) -> Rule:
    key = f"parameters.{param}[{i}]"
    if not isinstance(r, dict):
        _fail(source, key, r, "is not a rule {filter: SUBSTRING, value: V}")
    extra = sorted(set(r) - {"filter", "value"})
    if extra:
        _fail(source, f"{key}.{extra[0]}", r[extra[0]], "is not a rule key (a rule has filter and value)")
    if "value" not in r:
        _fail(source, key, r, "has no value")
    f = r.get("filter")
    if f is not None and (not isinstance(f, str) or not f):
        _fail(source, f"{key}.filter", f, "is not a non-empty substring of tensor names")
    v, grad = _value(source, f"{key}.value", param, r["value"], n_inputs)
    return Rule(f, v, grad)


# ------------------------------------------------------------------------------------------------
# the recipe

@dataclass(frozen=True)
class Recipe:
    source: str
    method: str
    refs: tuple | None = None           # explicit inputs (refs or ids) ...
    selection: dict | None = None       # ... or a selection {run, last, every, exclude_final, skip_missing}
    base: object | None = None
    weighting: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)     # constants (the engine's params)
    weights: list | None = None                    # constant per-input weights
    rules: ParamRules | None = None
    space: str = "factors"
    rank: int | None = None
    out_dtype: str | None = None
    out_shard_size: object | None = None
    output: str | None = None
    name: str | None = None
    run: str | None = None

    @property
    def n_inputs(self) -> int | None:
        if self.refs is not None:
            return len(self.refs)
        return None


def load_recipe(path) -> Recipe:
    """Read and validate a recipe file (``.yaml``/``.yml`` need PyYAML; ``.json`` always works)."""
    from ..formats import read_text

    p = Path(path)
    source = str(path)
    text = read_text(p, missing=lambda: UsageError(f"recipe {source}: no such file"),
                     unreadable=lambda e: UsageError(f"recipe {source}: cannot be read ({e})"))
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"recipe {source}: not valid JSON: {e}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UsageError(f"recipe {source}: reading YAML needs PyYAML (pip install pyyaml), "
                             "or write the recipe as .json") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UsageError(f"recipe {source}: not valid YAML: {e}") from None
    else:
        raise UsageError(f"recipe {source}: unknown file type {p.suffix!r} (use .yaml, .yml or .json)")
    return parse_recipe(data, source)


def parse_recipe(data, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise UsageError(f"recipe {source}: the top level must be a mapping of {', '.join(RECIPE_KEYS)}")
    for k in data:
        if k not in RECIPE_KEYS:
            _fail(source, k, data[k], f"is not a recipe key (known: {', '.join(RECIPE_KEYS)})")
    method = data.get("method")
    if not isinstance(method, str) or not method.strip():
        _fail(source, "method", method, "is not a method name (e.g. linear, ties, slerp)")
    try:
        from ..engine import canonical_method

        method = canonical_method(method)
    except ParameterError as e:
        raise ParameterError(f"recipe {source}: method: {e}") from None

    refs, selection = None, None
    inp = data.get("inputs")
    if isinstance(inp, list):
        if not inp:
            _fail(source, "inputs", inp, "is empty")
        for i, r in enumerate(inp):
            if isinstance(r, bool) or not isinstance(r, (str, int)) or (isinstance(r, str) and not r.strip()):
                _fail(source, f"inputs[{i}]", r, "is not a checkpoint ref (RUN@STEP, RUN@NAME) or id")
        refs = tuple(inp)
    elif isinstance(inp, dict):
        for k in inp:
            if k not in SELECTION_KEYS:
                _fail(source, f"inputs.{k}", inp[k], f"is not a selection key (known: {', '.join(SELECTION_KEYS)})")
        if not isinstance(inp.get("run"), str) or not inp["run"]:
            _fail(source, "inputs.run", inp.get("run"), "is not a run name")
        for k in ("last", "every"):
            v = inp.get(k, 1 if k == "every" else None)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(source, f"inputs.{k}", v, "is not a positive integer", ParameterError if isinstance(v, int) and not isinstance(v, bool) else UsageError)
        for k in ("exclude_final", "skip_missing"):
            if k in inp and not isinstance(inp[k], bool):
                _fail(source, f"inputs.{k}", inp[k], "is not true or false")
        selection = {"run": inp["run"], "last": inp["last"], "every": inp.get("every", 1),
                     "exclude_final": bool(inp.get("exclude_final", False))}
        if inp.get("skip_missing"):
            selection["skip_missing"] = True
    else:
        _fail(source, "inputs", inp, "is neither a list of refs nor a selection {run, last, every, exclude_final}")
    n_inputs = len(refs) if refs is not None else (selection["last"])

    base = data.get("base")
    if base is not None and (isinstance(base, bool) or not isinstance(base, (str, int))):
        _fail(source, "base", base, "is not first, last, a checkpoint ref or an id")

    weighting = data.get("weighting") or {}
    if not isinstance(weighting, dict):
        _fail(source, "weighting", weighting, "is not a mapping {scheme, metric, penalty, power, direction}")
    for k, v in weighting.items():
        if k not in WEIGHTING_KEYS:
            _fail(source, f"weighting.{k}", v, f"is not a weighting key (known: {', '.join(WEIGHTING_KEYS)})")
    if "scheme" in weighting and weighting["scheme"] not in ("uniform", "metric", "mwa"):
        _fail(source, "weighting.scheme", weighting["scheme"], "is not uniform, metric or mwa")
    if "direction" in weighting and weighting["direction"] not in ("min", "max"):
        _fail(source, "weighting.direction", weighting["direction"], "is not min or max")
    for k in ("penalty", "power"):
        if k in weighting:
            v = weighting[k]
            if not _is_num(v) or not math.isfinite(float(v)) or (k == "penalty" and v <= 0) or (k == "power" and v < 1):
                _fail(source, f"weighting.{k}", v, "must be > 0" if k == "penalty" else "must be >= 1",
                      ParameterError)
    if "metric" in weighting and not isinstance(weighting["metric"], str):
        _fail(source, "weighting.metric", weighting["metric"], "is not a metric name")

    params, weights, rules = {}, None, {}
    raw = data.get("parameters") or {}
    if not isinstance(raw, dict):
        _fail(source, "parameters", raw, "is not a mapping of parameter names to values or rules")
    for k, v in raw.items():
        param = _ALIASES.get(k, k)
        if param in params or param in rules or (param == PER_INPUT and weights is not None):
            _fail(source, f"parameters.{k}", v, "is given twice (lambda and lam are the same parameter)")
        if param == _LINES:   # LiNeS: one pair [alpha, beta] for the merge (it varies by layer itself)
            if not isinstance(v, (list, str)) or (isinstance(v, list) and not all(_is_num(x) for x in v)):
                _fail(source, f"parameters.{k}", v, "is not [alpha, beta] (LiNeS: two numbers, not rules)")
            from .table import LINES

            try:
                params[param] = LINES.convert(v)
            except ParameterError:
                _fail(source, f"parameters.{k}", v, "is not [alpha, beta]: two finite numbers", ParameterError)
            continue
        if param != PER_INPUT and param not in _NUMERIC and param not in _CONST_ONLY:
            _fail(source, f"parameters.{k}", v, f"is not a known parameter "
                                              f"(known: {', '.join(sorted([PER_INPUT, _LINES, *_NUMERIC, *_CONST_ONLY]))})")
        is_rules = isinstance(v, list) and v and all(isinstance(r, dict) for r in v)
        if isinstance(v, list) and any(isinstance(r, dict) for r in v) and not is_rules:
            _fail(source, f"parameters.{k}", v, "mixes rules ({filter, value}) and values")
        if param == PER_INPUT and refs is None and selection is not None:
            pass   # n_inputs = last (a selection of K checkpoints gives K inputs)
        if is_rules:
            rs = tuple(_rule(source, k, i, r, n_inputs) for i, r in enumerate(v))
            if len(rs) == 1 and rs[0].filter is None and not rs[0].gradient:
                # one catch-all constant: a constant
                if param == PER_INPUT:
                    weights = rs[0].value
                else:
                    params[param] = rs[0].value
                continue
            if rs[-1].filter is None and not rs[-1].gradient:
                # a trailing catch-all constant is the parameter's constant (what the engine
                # validates and uses for tensors no earlier rule matches)
                if param == PER_INPUT:
                    weights = rs[-1].value
                else:
                    params[param] = rs[-1].value
                rs = rs[:-1]
            rules[param] = rs
            continue
        val, grad = _value(source, f"parameters.{k}", param, v, n_inputs)
        if grad:
            rules[param] = (Rule(None, val, True),)
        elif param == PER_INPUT:
            weights = val
        else:
            params[param] = val
    if weights is not None and weighting.get("scheme") not in (None,):
        _fail(source, "parameters.weight", weights, "and weighting.scheme both set the weights: give one")
    if "seed" in params:
        params["seed"] = int(params["seed"])

    space = data.get("space", "factors")
    if space not in ("factors", "delta", "core"):
        _fail(source, "space", space, "is not factors, delta or core")
    rank = data.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        _fail(source, "rank", rank, "is not a positive integer", ParameterError)
    if rank is not None and space not in ("delta", "core"):
        _fail(source, "rank", rank, "only applies with space: delta or core", ParameterError)
    if rules and space in ("delta", "core"):
        _fail(source, "parameters", {k: [r.to_json() for r in v] for k, v in rules.items()},
              f"vary by tensor, which space: {space} (whole LoRA modules merged in update space) does not support",
              ParameterError)
    out_dtype = data.get("out_dtype")
    if out_dtype is not None and out_dtype not in ("float32", "float16", "bfloat16", "float64"):
        _fail(source, "out_dtype", out_dtype, "is not float32, float16, bfloat16 or float64")
    oss = data.get("out_shard_size")
    if oss is not None and (isinstance(oss, bool) or not isinstance(oss, (str, int))):
        _fail(source, "out_shard_size", oss, "is not a size (e.g. 2GB, 500MiB, 1000000)")
    output = data.get("output")
    if output is not None and (not isinstance(output, str) or not output.strip()):
        _fail(source, "output", output, "is not a path")
    name = data.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip() or "@" in name):
        _fail(source, "name", name, "is not a merge name (no '@')")
    run = data.get("run")
    if run is not None and (not isinstance(run, str) or not run.strip()):
        _fail(source, "run", run, "is not a run name")
    return Recipe(source=source, method=method, refs=refs, selection=selection, base=base,
                  weighting=dict(weighting), params=params, weights=weights,
                  rules=ParamRules(rules, n_inputs) if rules else None, space=space, rank=rank,
                  out_dtype=out_dtype, out_shard_size=oss, output=output, name=name, run=run)


# ------------------------------------------------------------------------------------------------
# a stored recipe written back as a recipe file (model card, replay)

def recipe_data(stored: dict) -> dict:
    """The recipe-file mapping that reproduces a merge from its stored ``ckptreg_recipe``:
    explicit inputs (refs), the weights actually used, constants and rules, base, space, name."""
    inputs = [i.get("ref") or i.get("id") for i in stored.get("inputs") or []]
    params = {}
    pretrained = False
    for k, v in (stored.get("params") or {}).items():
        if k == "rules":
            continue
        if k == "base":   # base: pretrained (LoRA update space) is recorded in the params
            pretrained = str(v).lower() == "pretrained"
            continue
        params["lambda" if k == "lam" else k] = v
    params["weight"] = [i.get("weight") for i in stored.get("inputs") or []]
    for k, v in (stored.get("param_rules") or {}).items():
        key = "lambda" if k == "lam" else k
        rules = [dict(r) for r in v]
        if key in params and not any("filter" not in r for r in rules):
            rules.append({"value": params[key]})   # the constant: every tensor no rule matches
        params[key] = rules
    d = {"inputs": inputs, "method": stored.get("method")}
    sel = stored.get("selection") or {}
    if stored.get("method") == "mwa" and sel.get("metric"):
        d["weighting"] = {"metric": sel["metric"]}   # mwa names its metric; the weights below are used
    b = stored.get("base")
    if b:
        d["base"] = b.get("ref") or b.get("id")
    elif pretrained:
        d["base"] = "pretrained"
    d["parameters"] = params
    if stored.get("space") not in (None, "factors"):
        d["space"] = stored["space"]
    if stored.get("rank") is not None:
        d["rank"] = stored["rank"]
    if stored.get("out_dtype") is not None:
        d["out_dtype"] = stored["out_dtype"]
    if stored.get("name"):
        d["name"] = stored["name"]
    return d


def recipe_yaml(stored: dict) -> str:
    """:func:`recipe_data` as YAML (JSON, which YAML reads too, when PyYAML is missing)."""
    data = recipe_data(stored)
    try:
        import yaml
    except ImportError:
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


# ------------------------------------------------------------------------------------------------
# a recipe as a merge spec

def _resolve_refs(registry, refs):
    return [registry.get(int(r)) if isinstance(r, int) or str(r).isdigit() else registry.get(str(r)) for r in refs]


def build_spec(registry, recipe: Recipe, *, out=None, name=None):
    """The MergeSpec of a recipe (``out``/``name`` override the recipe's ``output``/``name``).
    Inputs are resolved in the registry (a selection with ``registry.select``); weights, names
    and validation are the engine's (:func:`ckptreg.engine.make_spec`), so a recipe of constants
    and the equivalent CLI line make the same spec."""
    import dataclasses

    from .. import engine

    src = recipe.source
    if recipe.refs is not None:
        inputs, selection = _resolve_refs(registry, recipe.refs), None
    else:
        s = recipe.selection
        inputs = registry.select(s["run"], s["last"], s.get("every", 1), exclude_final=s.get("exclude_final", False),
                                 skip_missing=bool(s.get("skip_missing")))
        selection = dict(s)
    n = len(inputs)
    if recipe.weights is not None and len(recipe.weights) != n:
        raise ParameterError(f"recipe {src}: parameters.weight: {recipe.weights!r} has {len(recipe.weights)} "
                             f"weights for {n} inputs")
    rules = recipe.rules
    if rules is not None:
        for p, rs in rules.rules.items():
            if p != PER_INPUT:
                continue
            for i, r in enumerate(rs):
                vals = r.value if r.gradient else [r.value]
                for v in vals:
                    if len(v) != n:
                        raise ParameterError(f"recipe {src}: parameters.weight[{i}].value: {r.value!r} has "
                                             f"{len(v)} weights for {n} inputs")
        rules = ParamRules(rules.rules, n)
    w = recipe.weighting
    scheme = w.get("scheme")
    base = recipe.base
    if isinstance(base, int):
        base = str(base)
    spec = engine.make_spec(registry, recipe.method, inputs, scheme=scheme, metric=w.get("metric"),
                            penalty=w.get("penalty"), power=w.get("power"), direction=w.get("direction"),
                            weights=recipe.weights, base=base, params=dict(recipe.params),
                            name=name or recipe.name, out=out or recipe.output, run=recipe.run,
                            selection=selection, space=recipe.space, rank=recipe.rank, out_dtype=recipe.out_dtype)
    if rules:
        fields = {f.name for f in dataclasses.fields(spec)}
        if "param_rules" not in fields:
            raise ParameterError(f"recipe {src}: parameters vary by tensor, which this engine cannot apply yet "
                                 "(MergeSpec has no param_rules)")
        changes = {"param_rules": rules}
        if not (name or recipe.name):
            changes.update(name=f"{spec.name}_rules-{rules.digest()}", naming=None)
        spec = dataclasses.replace(spec, **changes)
    return spec


# ------------------------------------------------------------------------------------------------
# replay

REPLAY_IDENTICAL = "identical"


def stored_recipe(registry, c) -> dict:
    """The recipe a merge stored: its output's ``ckptreg_recipe`` metadata, else (an output
    written before recipes were stored) rebuilt from its lineage. FormatError when neither."""
    from ..errors import CkptregError, FormatError
    from ..safetensors_io import read_header

    files = [f for f in (getattr(c, "files", None) or []) if str(f).lower().endswith(".safetensors")]
    p = Path(c.path)
    if not files:
        files = [p] if p.is_file() else sorted(p.glob("*.safetensors")) if p.is_dir() else []
    for f in files:
        try:
            md = read_header(f).metadata
        except (CkptregError, OSError, ValueError):
            continue
        if "ckptreg_recipe" in md:
            try:
                rec = json.loads(md["ckptreg_recipe"])
            except ValueError:
                raise FormatError(f"{f}: its ckptreg_recipe metadata is not valid JSON") from None
            if isinstance(rec, dict) and rec.get("method"):
                return rec
    lin = registry.lineage(c)
    if not lin:
        raise FormatError(f"{c.ref}: no stored recipe (no ckptreg_recipe metadata in {c.path}, no lineage)")
    params = dict(lin.get("params") or {})
    rec = {"name": c.name, "method": lin["method"], "space": params.pop("space", "factors"),
           "rank": params.pop("rank", None), "out_dtype": params.pop("out_dtype", None),
           "selection": params.pop("selection", {}), "param_rules": params.pop("rules", None) or {}}
    params.pop("metric_lag", None)
    rec["params"] = params
    rec["inputs"] = [{"id": i["id"], "ref": i.get("ref"), "weight": i.get("weight"), "fingerprint": None}
                     for i in lin.get("inputs") or []]
    b = lin.get("base")
    rec["base"] = None if b is None else {"id": int(b), "ref": None, "fingerprint": None}
    return rec


def _replay_out(c) -> Path:
    p = Path(c.path)
    if p.name.lower().endswith(".safetensors"):
        return p.with_name(p.name[: -len(".safetensors")] + "-replay.safetensors")
    return p.with_name(p.name + "-replay")


def replay_spec(registry, ref, *, out=None):
    """(original Checkpoint, MergeSpec, merge kwargs) that re-run a registered merge from its
    stored recipe: same inputs (by id; ChangedError if one was re-registered with other files
    since), weights, params and rules, base, space, rank, out dtype and name, into ``out``
    (default: beside the original, ``NAME-replay``)."""
    import dataclasses

    from .. import engine
    from ..errors import ChangedError

    c = registry.get(int(ref) if isinstance(ref, int) or str(ref).isdigit() else ref)
    if not c.merged:
        raise UsageError(f"--replay {ref}: {c.ref} is a plain checkpoint, not the output of a merge")
    rec = stored_recipe(registry, c)
    inputs = []
    for x in rec.get("inputs") or []:
        ck = registry.get(int(x["id"]))
        if x.get("fingerprint") and ck.fingerprint != x["fingerprint"]:
            raise ChangedError(f"cannot replay {c.ref}: its input {ck.ref} (id {ck.id}) was re-registered with other "
                               f"files since the merge (fingerprint {x['fingerprint']} then, {ck.fingerprint} now)")
        inputs.append(ck)
    b = rec.get("base")
    base = None
    if b:
        base = registry.get(int(b["id"]))
        if b.get("fingerprint") and base.fingerprint != b["fingerprint"]:
            raise ChangedError(f"cannot replay {c.ref}: its base {base.ref} (id {base.id}) was re-registered with "
                               f"other files since the merge (fingerprint {b['fingerprint']} then, "
                               f"{base.fingerprint} now)")
    params = {k: v for k, v in (rec.get("params") or {}).items() if k != "rules"}
    if (engine.canonical_method(rec["method"]) == "cart" and "svd" not in params
            and (rec.get("space") or "factors") != "delta"):
        # recorded before CART's default became the exact SVD: it ran the randomized one
        params["svd"] = "randomized"
    space = rec.get("space") or "factors"
    out_path = Path(out) if out is not None else _replay_out(c)
    sel = rec.get("selection") or {}
    spec = engine.make_spec(registry, rec["method"], inputs, weights=[float(x["weight"]) for x in rec["inputs"]],
                            metric=sel.get("metric"), penalty=sel.get("penalty"), power=sel.get("power"),
                            direction=sel.get("direction"),
                            base=base, params=params, name=c.name, out=str(out_path), run=c.run,
                            selection=rec.get("selection") or None, space=space, rank=rec.get("rank"),
                            out_dtype=rec.get("out_dtype"))
    rules = rec.get("param_rules") or (rec.get("params") or {}).get("rules")
    if rules:
        spec = dataclasses.replace(spec, param_rules=ParamRules.from_json(rules, len(inputs), f"{c.ref} stored recipe"))
    kw = {"space": space, "rank": rec.get("rank"), "out_dtype": rec.get("out_dtype")}
    p = Path(c.path)
    if p.is_dir() and (p / "model.safetensors.index.json").exists() and all(Path(i.path).is_file() for i in inputs):
        # single-file inputs merged into a folder of shards: shard the replay the same way
        from ..safetensors_io import read_header

        kw["out_shard_size"] = max(sum(t.nbytes for t in read_header(f).tensors.values())
                                   for f in sorted(p.glob("*.safetensors")))
    return c, spec, kw


def first_difference(a_path, b_path) -> str | None:
    """None when the two checkpoints hold the same tensors (names, dtypes, shapes, bytes), else
    a description of the first difference (tensors in name order)."""
    from .. import formats

    ta, tb = formats.inspect(a_path).tensors, formats.inspect(b_path).tensors
    if set(ta) != set(tb):
        only = sorted(set(ta) ^ set(tb))[0]
        return f"tensor {only} is in {'the original' if only in ta else 'the replay'} only"
    for n in sorted(ta):
        x, y = ta[n], tb[n]
        if x.dtype != y.dtype or tuple(x.shape) != tuple(y.shape):
            return f"tensor {n}: {x.dtype}{list(x.shape)} in the original, {y.dtype}{list(y.shape)} in the replay"
        if x.nbytes != y.nbytes:
            return f"tensor {n}: {x.nbytes} bytes in the original, {y.nbytes} in the replay"
        with open(x.file, "rb") as fa, open(y.file, "rb") as fb:
            fa.seek(x.offset)
            fb.seek(y.offset)
            left = x.nbytes
            while left > 0:
                k = min(left, 8 << 20)
                if fa.read(k) != fb.read(k):
                    return f"tensor {n}: its bytes differ"
                left -= k
    return None


def replay(registry, ref, *, out=None, progress=None):
    """Re-run a registered merge from its stored recipe into ``out`` and check that the result's
    tensors equal the original's byte for byte. Returns (original, replayed Checkpoint).

    The replay is registered as the next version of RUN@NAME (the engine's rule for a merged
    name written to another path), like every output ckptreg writes: its lineage is the
    original's and ``RUN@NAME:v1`` still names the original. When the tensors differ the
    replay is unregistered and its files deleted (ChangedError naming the first differing
    tensor): the registry and the disk are left as they were."""
    from .. import engine
    from ..errors import ChangedError

    orig, spec, kw = replay_spec(registry, ref, out=out)
    res = engine.merge_result(registry, spec, progress=progress, **kw)
    got = res.checkpoint
    if res.status == engine.UP_TO_DATE:   # a replay already registered here: recompute it
        got = engine.merge(registry, spec, overwrite=True, progress=progress, **kw)
    diff = first_difference(orig.path, got.path)
    if diff is not None:
        try:
            registry.rm(got.id, delete_files=True)
        finally:
            raise ChangedError(f"replayed {orig.ref}: NOT identical: {diff} (original {orig.path}); the replay "
                               f"was removed again")
    return orig, got

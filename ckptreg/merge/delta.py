"""LoRA adapters: factor-space scale checks (:func:`check_factor_scales`) and the update spaces
(``space="delta"`` / ``"core"``): merged updates per module, written back as an adapter of a
rank (:class:`DeltaCache`, :func:`delta_setup`). Which methods may run here, and how, is the
method table's ``space in defn.spaces`` / ``defn.delta_rule``:

- ``weights``: Σ c_i s_i B_i A_i with c = w; ``task_vector``: c = λw and the base 1 − λΣw (no base
  row with base pretrained); ``cart``: CART on factors; ``factored``: the method's ``delta_fn``;
  all exact, never forming m×n (core space computes them the same way: they lie in its span);
- ``gram`` (model_stock, multislerp, slerp): scalar (per-row for --filter-wise) coefficients from
  the updates' Gram matrix ⟨τ_i, τ_j⟩ = s_i s_j Σ (B_iᵀB_j) ⊙ (A_i A_jᵀ), then the factored merge;
- ``dense`` (element-wise methods): delta space forms one module's updates s_t B_t A_t, runs the
  method's own per-tensor functions on them (:class:`MemSource`, :func:`dense_method`) with
  θ_0 = the base's update (zeros with base pretrained) and writes the exact rank-r SVD truncation
  (default r: the inputs' max rank; PEFT ``*_svd`` semantics); core space runs them on
  M_t = U_Bᵀ (s_t B_t A_t) V_Aᵀ and writes B = U_B M, A = V_A (exact, r = min(Σr, n)) or the
  truncation of M to ``rank``. DARE / DELLA masks are keyed by the module's weight name
  (:func:`module_weight_name`).

Inputs may mix ranks, lora_alpha and rsLoRA (:func:`plan_lora`; each update carries its own r and
s); outputs have lora_alpha = r, use_rslora false, and rank_pattern / alpha_pattern for modules
whose output rank differs from the most common one (:func:`output_adapter_config`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import FormatError, MismatchError, ParameterError
from .table import get_method


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
    from ..formats import lora_module_config

    return lora_module_config(lora, module, r)[0]


def _module_scale(lora: dict, module: str, r: int) -> float:
    """PEFT's scaling of one module of an adapter (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    from .. import lowrank

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
    from ..formats import lora_module_key

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
        self.rule = get_method(method).delta_rule
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
        from .. import lowrank

        an, bn = self.names[mod]["A"], self.names[mod]["B"]
        out = []
        for src, cfg in self.coeff_sources:
            a, b = src.full(an), src.full(bn)   # read with preadv (no mmap)
            r = a.shape[0]
            out.append((a, b, _module_scale(cfg, mod, r)))
        return out

    def module_factors(self):
        """(module, [(A, B, s) per coefficient source]) for every module, in plan order, read
        afresh and widened exactly as ``get`` hands them to a ``factored`` method's ``delta_fn``
        (a pre-pass over the whole adapter: KnOTS's global trim, :func:`methods_lowrank.delta_params`)."""
        import torch

        for mod in self.names:
            if set(self.names[mod]) == {"A", "B"}:
                yield mod, [(a.to(torch.float32) if a.dtype != torch.float64 else a,
                             b.to(torch.float32) if b.dtype != torch.float64 else b, sc)
                            for a, b, sc in self._factors(mod)]

    @staticmethod
    def _key(fs, r_out):
        import torch

        return (tuple((tuple(a.shape), tuple(b.shape), a.dtype == torch.float64, sc) for a, b, sc in fs), r_out)

    def get(self, name):
        import torch

        from .. import lowrank

        def widen(t):
            return t.to(torch.float32) if t.dtype != torch.float64 else t

        mod, tag = _lora_pair(name)
        if mod not in self.cache:
            fs = self._factors(mod)
            r_out = self.out_rank_for(mod, [a for a, _, _ in fs])   # shapes only
            if self.rule == "cart":
                As, Bs = [widen(a) for a, _, _ in fs], [widen(b) for _, b, _ in fs]
                B, A = lowrank.cart_lowrank(Bs, As, [sc for _, _, sc in fs], self.coeffs,
                                            rank_ratio=float(self.p.get("rank_ratio", lowrank.DEFAULT_RANK_RATIO)),
                                            lam=float(self.p.get("lam", 1.0)), out_rank=r_out, out_scale=1.0)
                self.cache[mod] = {"A": A, "B": B}
            elif self.rule == "factored":   # SVD-family methods: exact in the span of the factors
                B, A = get_method(self.method).delta_fn(
                    [(widen(a), widen(b), sc) for a, b, sc in fs], self.coeffs, self.p, r_out,
                    name=self.names[mod]["A"])
                self.cache[mod] = {"A": A, "B": B}
            elif self.rule == "dense":
                B, A = self._dense(mod, fs, r_out)
                self.cache[mod] = {"A": A, "B": B}
            elif self.rule == "gram":
                B, A = self._gram(mod, fs, r_out, widen)
                self.cache[mod] = {"A": A, "B": B}
            else:
                self._merge_group(mod, fs, r_out, widen)
        t = self.cache[mod].pop(tag)
        if not self.cache[mod]:
            del self.cache[mod]
        self.done.add(mod)
        lines = getattr(self, "lines_factor", None)   # LiNeS (base pretrained): B·λ(ℓ), see _delta_setup
        if lines is not None and tag == "B":
            t = t * lines(mod)
        return t.to(self.odt_for(name)).contiguous()

    def _dense(self, mod, fs, r_out):
        """An element-wise method on one module (METHODS.md "Delta space for element-wise
        methods" / "Core space"): delta space forms the dense updates s_t B_t A_t (this layer
        only), runs the stored-tensor method with θ_0 = the base's update (zeros with base
        pretrained) and writes back the exact rank-``r_out`` SVD truncation; core space runs it on
        the core matrices M_t = U_Bᵀ (s_t B_t A_t) V_Aᵀ and writes B = U_B M, A = V_A (or the
        truncation of M to ``rank``)."""
        import torch

        from .. import lowrank

        n_in = getattr(self, "n_in", len(self.sources))
        key = module_weight_name(mod)
        w = self.coeffs[:n_in]
        if getattr(self, "space", "delta") == "core":
            UB, VA = core_bases(fs)
            Ms = [s * ((UB.T @ b.to(torch.float64)) @ (a.to(torch.float64) @ VA.T)) for a, b, s in fs]
            M0 = Ms[n_in] if len(Ms) > n_in else torch.zeros_like(Ms[0])
            M = dense_method(self.method, key, Ms[:n_in], M0, w, self.p)
            odt = lowrank._out_dtype(*[x for a, b, _ in fs for x in (a, b)])
            if self.rank is None:
                B, A = UB @ M, VA
                if r_out > A.shape[0]:
                    pad = r_out - A.shape[0]
                    B = torch.cat([B, B.new_zeros((B.shape[0], pad))], dim=1)
                    A = torch.cat([A, A.new_zeros((pad, A.shape[1]))], dim=0)
            else:
                u, sv, vh = torch.linalg.svd(M, full_matrices=False)
                B, A = lowrank.split_factors(UB @ u, sv, vh @ VA, int(r_out), 1.0)
            return B.to(odt).contiguous(), A.to(odt).contiguous()
        wd = lowrank._out_dtype(*[x for a, b, _ in fs for x in (a, b)])
        ups = [s * (b.to(wd) @ a.to(wd)) for a, b, s in fs]
        base = ups[n_in] if len(ups) > n_in else torch.zeros_like(ups[0])
        merged = dense_method(self.method, key, ups[:n_in], base, w, self.p)
        del ups, base
        return truncate_dense(merged, r_out)

    def _gram(self, mod, fs, r_out, widen):
        """model_stock / multislerp / slerp on one module, exactly in factored form: their
        coefficients come from the Gram matrix of the updates (:func:`lora_gram`), the merged
        update Σ c_j s_j B_j A_j through the factored SVD (per-row coefficients of model_stock
        --filter-wise scale the rows of B_j)."""
        import torch

        from .. import lowrank

        n_in = getattr(self, "n_in", len(self.sources))
        c = gram_coeffs(self.method, fs, n_in, self.coeffs[:n_in], self.p, module_weight_name(mod))
        Bs = [widen(b) for _, b, _ in fs]
        As = [widen(a) for a, _, _ in fs]
        if any(isinstance(x, torch.Tensor) and x.dim() > 0 for x in c):
            Bs = [(x.to(b.dtype).unsqueeze(1) if isinstance(x, torch.Tensor) else float(x)) * b for x, b in zip(c, Bs)]
            c = [1.0] * len(Bs)
        return lowrank.lora_delta_merge(Bs, As, [sc for _, _, sc in fs], [float(x) for x in c], r_out, out_scale=1.0)

    #: rules whose modules ``get`` merges one at a time (the others are batched by ``batch_groups``).
    #: "factored": the SVD-family delta_fns take a layer dim, but a batched call is no faster on CPU
    #: (0.60-1.08x of the per-layer loop, methods_lowrank's docstring), so they run per module
    UNBATCHED_RULES = ("cart", "factored", "dense", "gram")

    def batch_groups(self) -> list[list[str]]:
        """The modules merged together, one batched factored SVD per group, decided once from
        metadata alone (shapes, dtypes, scales, output rank): each module with the later modules
        of the same key, at most GROUP_LAYERS of them and GROUP_BYTES of stacked float32
        factors. The one grouping rule: :meth:`_merge_group` computes these groups and the
        distributed split (:func:`ckptreg.merge.distributed.split`) keeps each on one rank, so
        every rank's batches, and so its bits, are the single process's."""
        if getattr(self, "_groups", None) is not None:
            return self._groups
        import torch

        from ..writer import torch_dtype

        pl = self.plan

        def meta(src, name):
            ti = getattr(getattr(src, "info", None), "tensors", {}).get(name)   # update space: ranks may differ
            shape, dt = (ti.shape, ti.dtype) if ti is not None else (pl.shapes[name], pl.dtypes[name])
            return torch.empty(tuple(shape), dtype=torch_dtype(dt), device="meta")

        def key_of(mod):
            an, bn = self.names[mod]["A"], self.names[mod]["B"]
            fs = []
            for src, cfg in self.coeff_sources:
                a, b = meta(src, an), meta(src, bn)
                fs.append((a, b, _module_scale(cfg, mod, a.shape[0])))
            return self._key(fs, self.out_rank_for(mod, [a for a, _, _ in fs])), \
                sum(4 * (a.numel() + b.numel()) for a, b, _ in fs)

        mods = [m for m in self.names if set(self.names[m]) == {"A", "B"}]
        keys = {m: key_of(m) for m in mods} if self.rule not in self.UNBATCHED_RULES else {}
        done: set = set()
        groups = []
        for i, mod in enumerate(mods):
            if mod in done:
                continue
            group = [mod]
            if self.rule not in self.UNBATCHED_RULES:
                k, per_layer = keys[mod]
                for other in mods[i + 1:]:
                    if len(group) >= self.GROUP_LAYERS or (len(group) + 1) * per_layer > self.GROUP_BYTES:
                        break
                    if other not in done and keys[other][0] == k:
                        group.append(other)
            done.update(group)
            groups.append(group)
        self._groups = groups
        self._group_of = {m: g for g in groups for m in g}
        return groups

    def _merge_group(self, mod, fs, r_out, widen):
        """Delta-space merge of ``mod`` and the other modules of its :meth:`batch_groups` group
        not yet merged, as one batched factored SVD (only the group's factors are read)."""
        import torch

        from .. import lowrank

        self.batch_groups()
        group = [mod] + [m for m in self._group_of.get(mod, [mod])
                         if m != mod and m not in self.cache and m not in self.done]
        members = [fs] + [self._factors(o) for o in group[1:]]
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


def _read_cfg(info):
    for cf in info.config_files:
        if Path(cf).name == "adapter_config.json":
            try:
                return json.loads(Path(cf).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise FormatError(f"{cf}: not valid JSON") from None
    return None


def _delta_setup(pl, sources, base_src, method, w, p, rank, odt_user, space="delta"):
    """(cache, output shapes, output adapter config) of a LoRA merge in update space.

    Coefficient sources: the inputs, then the base's adapter when the method uses a base and one
    is given (none with ``base: pretrained``: the task vectors are the updates themselves).
    ``task_vector``: c = λw and the base 1 − λΣw (no base row with base pretrained); ``dense``
    (element-wise methods) and ``gram`` (model_stock, multislerp, slerp): the method on the
    updates (or their core matrices in core space). Mixed ranks and lora_alpha are fine: each
    update carries its own r and scaling; the output has lora_alpha = r per module."""
    from .stream import _odt

    defn = get_method(method)
    rule = defn.delta_rule
    cfgs = [i.lora for i in pl.infos]
    coeff_sources = list(zip(sources, cfgs))
    with_base = base_src is not None and defn.uses_base
    if rule == "task_vector":
        lam = float(p.get("lam", 1.0))
        coeffs = [lam * x for x in w]
        if with_base:
            coeffs.append(1.0 - lam * sum(w))
            coeff_sources.append((base_src, pl.base_info.lora))
    elif rule == "factored":   # τ_t = s_t B_t A_t: the inputs only (base pretrained)
        if with_base:
            raise ParameterError(f"{defn.name} in {space} space works on the LoRA updates themselves "
                                 f"(τ_t = s_t B_t A_t): use base pretrained (--base pretrained), not a base "
                                 f"checkpoint")
        coeffs = list(w)
    else:
        coeffs = list(w)
        if with_base and rule in ("dense", "gram"):
            coeff_sources.append((base_src, pl.base_info.lora))
    if defn.uses_base and not with_base:
        # non-factor float tensors have no update form: with base pretrained there is no θ_0
        for n in pl.names:
            if _lora_pair(n) is None and pl.dtypes[n] in ("F32", "F16", "BF16", "F64") and pl.numel(n) > 0:
                raise ParameterError(f"tensor {n} is not a LoRA factor: with base pretrained it has no task vector "
                                     f"(give a base checkpoint: --base first, last or a ref)")
    in_cfg = _read_cfg(pl.infos[0]) or {}
    infos_c = list(pl.infos) + ([pl.base_info] if len(coeff_sources) > len(sources) else [])

    def out_rank_for(mod, As):
        return module_out_rank(rule, space, rank, [int(a.shape[0]) for a in As], None, int(As[0].shape[-1]))

    def odt_for(name):
        return _odt(odt_user, pl.dtypes[name])

    cache = _DeltaCache(pl, sources, coeff_sources, coeffs, method, p, rank, out_rank_for, odt_for)
    cache.space = space
    cache.n_in = len(sources)
    if rule == "factored":   # a method's pre-pass over every module (KnOTS --trim-scope global)
        from .methods_lowrank import delta_params

        cache.p = delta_params(cache)
    shapes = dict(pl.shapes)
    mod_ranks = {}
    for mod, d in cache.names.items():
        if set(d) != {"A", "B"}:
            continue
        a_shape = pl.shapes[d["A"]]
        b_shape = pl.shapes[d["B"]]
        ranks = [int(i.tensors[d["A"]].shape[0]) for i in infos_c]
        ro = module_out_rank(rule, space, rank, ranks, b_shape[0], a_shape[-1])
        mod_ranks[mod] = ro
        shapes[d["A"]] = (ro,) + tuple(a_shape[1:])
        shapes[d["B"]] = tuple(b_shape[:-1]) + (ro,)
    cfg = output_adapter_config(in_cfg, mod_ranks, rank)
    if p.get("lines") is not None:
        # LiNeS with base pretrained (run.py refuses a base checkpoint): the merged update is Δ
        # itself, so θ_0 + λ(ℓ)Δ is the merged module with B scaled by its layer's λ(ℓ)
        from .stream import lines_for_names

        cache.lines_factor = lines_for_names(p["lines"], pl.names)
    return cache, shapes, cfg


# ------------------------------------------------------------------------------------------------
# base pretrained, mixed ranks, the dense (element-wise) and Gram routes, core space

#: ``base: pretrained`` (``--base pretrained``): the task vectors are the LoRA updates themselves
#: (no base checkpoint). Recorded as ``params["base"] == PRETRAINED`` with ``MergeSpec.base`` None
#: (lineage, recipe and replay carry it in the params); the default base of adapters in delta and
#: core space for every method that uses one.
PRETRAINED = "pretrained"
#: the params key holding it
BASE_KEY = "base"
#: spaces of LoRA update merging (delta: the updates s_t B_t A_t; core: the Σr×Σr core matrices)
UPDATE_SPACES = ("delta", "core")


def is_pretrained(p) -> bool:
    return str((p or {}).get(BASE_KEY) or "").lower() == PRETRAINED


def plan_lora(registry, inputs, base=None):
    """:func:`~ckptreg.merge.plan.plan` for LoRA adapters merged in update space: the rank
    dimension of every ``lora_A`` (dim 0) and ``lora_B`` (dim 1) may differ between the inputs
    (mixed ranks: each update carries its own r and s); every other dimension, every name and
    every dtype must agree (ONE MismatchError listing every difference, as ``plan``). The plan's
    shapes are the first input's."""
    from .plan import plan

    def masked(n, shape):
        pr = _lora_pair(n)
        s = list(shape)
        if pr is not None and len(s) == 2:
            s[0 if pr[1] == "A" else 1] = "r"
        return s

    return plan(registry, inputs, base, shape_key=masked)


class MemSource:
    """An in-memory stand-in for :class:`~ckptreg.merge.sources.Source` (``info.tensors[name]``
    with shape/dtype/offset, ``full``, ``chunk``, ``check``, ``close``), so the production
    per-tensor kernels (``kernels.task_prepare`` / ``task_chunk``, the sparsify methods'
    ``prepare`` / ``fn``) run unchanged on the dense updates of one LoRA module."""

    def __init__(self, tensors: dict):
        from types import SimpleNamespace

        self.t = dict(tensors)
        self.info = SimpleNamespace(tensors={n: SimpleNamespace(shape=tuple(x.shape), dtype=str(x.dtype), offset=-1,
                                                                nbytes=x.numel() * x.element_size())
                                             for n, x in self.t.items()}, files=[], path="<memory>")

    def full(self, name, out=None):
        return self.t[name]

    def chunk(self, name, start, stop):
        return self.t[name].reshape(-1)[start:stop]

    def check(self):
        return None

    def close(self):
        self.t.clear()


def module_weight_name(mod: str) -> str:
    """The base-model weight a LoRA module updates (``model.layers.0.self_attn.q_proj.weight``):
    the tensor name the dense route's DARE / DELLA masks are keyed by."""
    from ..formats import lora_module_key

    return lora_module_key(mod) + ".weight"


def dense_method(method, name, taus, base, w, p):
    """The stored-tensor method ``method`` (a ``task_vector``-strategy entry of the method table)
    on in-memory matrices: ``taus`` the T inputs θ_t, ``base`` θ_0 (same shape), ``w`` the weights.
    Runs the method's own ``prepare`` and ``fn`` (``kernels.task_prepare`` / ``task_chunk``:
    ``ops.task_merge``; the sparsify methods' whole-tensor functions) as one chunk. Returns the
    merged θ (shape of ``base``, float32; float64 for float64 inputs)."""
    import torch

    defn = get_method(method)
    if defn.prepare is None or defn.fn is None:
        raise ParameterError(f"{defn.name} has no per-tensor task-vector form to run on LoRA updates")
    shape = tuple(base.shape)
    srcs = [MemSource({name: t.contiguous()}) for t in taus]
    bsrc = MemSource({name: base.contiguous()})
    numel = base.numel()
    ctx = defn.prepare(defn.name, name, srcs, bsrc, numel, p)
    bf = ctx.get("base_full") if isinstance(ctx, dict) else None
    bc = bf[0:numel] if bf is not None else bsrc.chunk(name, 0, numel)
    out = torch.empty(numel, dtype=base.dtype)
    wt = torch.tensor([float(x) for x in w], dtype=torch.float32)
    res = defn.fn(defn.name, bc, [s.chunk(name, 0, numel) for s in srcs], wt, p, ctx, 0, base.dtype, out)
    return (res if res is not None else out).reshape(shape)


def lora_gram(fs):
    """Gram matrix (float64) of the updates τ_t = s_t B_t A_t from their factors, exactly and
    without forming them: ⟨τ_i, τ_j⟩ = s_i s_j Σ (B_iᵀ B_j) ⊙ (A_i A_jᵀ). ``fs``: (A, B, s)."""
    import torch

    n = len(fs)
    G = torch.zeros((n, n), dtype=torch.float64)
    A = [a.to(torch.float64) for a, _, _ in fs]
    B = [b.to(torch.float64) for _, b, _ in fs]
    for i in range(n):
        for j in range(i, n):
            g = fs[i][2] * fs[j][2] * float(((B[i].T @ B[j]) * (A[i] @ A[j].T)).sum())
            G[i, j] = G[j, i] = g
    return G


def lora_row_gram(fs):
    """Per-row Gram matrices [m, n, n] (float64) of the updates: row ρ of τ_t is s_t B_t[ρ] A_t."""
    import torch

    n = len(fs)
    A = [a.to(torch.float64) for a, _, _ in fs]
    B = [b.to(torch.float64) for _, b, _ in fs]
    G = torch.zeros((B[0].shape[0], n, n), dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            g = fs[i][2] * fs[j][2] * torch.einsum("ra,ab,rb->r", B[i], A[i] @ A[j].T, B[j])
            G[:, i, j] = g
            G[:, j, i] = g
    return G


def _slerp_from_gram(G, t):
    from ..methods import SLERP_DOT_THRESHOLD, SLERP_EPS

    n0, n1 = math.sqrt(max(0.0, float(G[0, 0]))), math.sqrt(max(0.0, float(G[1, 1])))
    s0 = n0 if n0 > SLERP_EPS else 1.0
    s1 = n1 if n1 > SLERP_EPS else 1.0
    d = float(G[0, 1]) / (s0 * s1)
    if abs(d) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, d)))
    st = math.sin(theta)
    return math.sin((1.0 - t) * theta) / st, math.sin(t * theta) / st


def gram_coeffs(method, fs, n_in, w, p, name):
    """Coefficients of a Gram-based method on the updates of one module: a list ``c`` over ``fs``
    (the inputs, then the base's update when one is given) with merged ΔW = Σ c_j ΔW_j, or a
    list of per-row coefficient vectors (model_stock --filter-wise). The task vectors are
    τ_i = ΔW_i − ΔW_0 (ΔW_i with base pretrained); their Gram is C G Cᵀ of the updates' one."""
    import torch

    from .methods_geometry import MS_DEN_EPS, model_stock_t, multislerp_coeffs

    has_base = len(fs) > n_in
    C = torch.eye(len(fs), dtype=torch.float64)[:n_in]
    if has_base:
        C[:, n_in] = -1.0
    if method == "slerp":
        G = lora_gram(fs)
        return list(_slerp_from_gram(G, float(p.get("t", 0.5))))
    if method == "model_stock":
        if n_in < 2:
            raise ParameterError(f"model_stock needs a base and at least 2 models, got {n_in} (module {name})")
        if p.get("filter_wise"):
            Gt = C @ lora_row_gram(fs) @ C.T
            t, den = model_stock_t(Gt, n_in)
            bad = (den.abs() < MS_DEN_EPS).nonzero().flatten()
            if bad.numel():
                raise ParameterError(f"model_stock --filter-wise: module {name} row {int(bad[0])}: "
                                     f"1 + (N-1)*c = {float(den[int(bad[0])]):.3g} is below 1e-8 in magnitude; "
                                     "t is undefined")
            rows = [t / n_in] * n_in + ([1.0 - t] if has_base else [])
            return rows
        Gt = C @ lora_gram(fs) @ C.T
        t, den = model_stock_t(Gt, n_in)
        if abs(float(den)) < MS_DEN_EPS:
            raise ParameterError(f"model_stock: module {name}: 1 + (N-1)*c = {float(den):.3g} is below 1e-8 in "
                                 "magnitude; t is undefined")
        t = float(t)
        return [t / n_in] * n_in + ([1.0 - t] if has_base else [])
    if method == "multislerp":
        Gt = C @ lora_gram(fs) @ C.T
        c = [float(x) for x in multislerp_coeffs(Gt, [float(x) for x in w], name)]
        return c + ([1.0 - sum(c)] if has_base else [])
    raise ParameterError(f"{method} has no Gram-coefficient form")


def truncate_dense(M, r_out):
    """Adapter factors (B [m, r_out], A [r_out, n]) of the best rank-``r_out`` approximation of
    ``M`` by its exact SVD (PEFT's ``*_svd`` combinations), scaling 1 (lora_alpha = r)."""
    import torch

    from .. import lowrank

    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return lowrank.split_factors(U, S, Vh, int(r_out), 1.0)


def core_bases(fs):
    """(U_B [m, kB], V_A [kA, n]) float64: left singular vectors of [B_1 … B_T], right singular
    vectors of [A_1; …; A_T] (METHODS.md "Core space")."""
    import torch

    Bcat = torch.cat([b.to(torch.float64) for _, b, _ in fs], dim=1)
    Acat = torch.cat([a.to(torch.float64) for a, _, _ in fs], dim=0)
    UB = torch.linalg.svd(Bcat, full_matrices=False)[0]
    VA = torch.linalg.svd(Acat, full_matrices=False)[2]
    return UB, VA


def core_ranks(ranks, m, n):
    R = sum(int(r) for r in ranks)
    return (R if m is None else min(R, int(m))), (R if n is None else min(R, int(n)))


def module_out_rank(rule, space, rank, ranks, m, n):
    """The output rank of one module: ``rank`` when given; CART: Σ r (exact); an element-wise
    method in core space: kA = min(Σ r, n) (B = U_B M, A = V_A, exact); else max r."""
    if rank is not None:
        return int(rank)
    if rule in ("cart", "factored"):   # exact: rank ≤ Σ r (zero-padded)
        return sum(int(r) for r in ranks)
    if space == "core" and rule == "dense":
        return core_ranks(ranks, m, n)[1]
    return max(int(r) for r in ranks)


def output_adapter_config(in_cfg, mod_ranks: dict, rank):
    """The output adapter_config.json: lora_alpha = r (scaling 1) and use_rslora false; modules
    whose output rank differs from the most common one get ``rank_pattern`` / ``alpha_pattern``
    entries (their escaped module paths, matched by PEFT's ``(.*\\.)?(key)$``), alpha = r each.
    An input ``rank_pattern`` that still describes every module (same ranks) is kept as it is."""
    import re
    from collections import Counter

    from ..formats import lora_module_config, lora_module_key

    cfg = dict(in_cfg)
    cfg["use_rslora"] = False
    cfg.pop("alpha_pattern", None)
    if rank is not None or not mod_ranks:
        r = int(rank) if rank is not None else int(in_cfg.get("r") or 1)
        cfg.pop("rank_pattern", None)
        cfg["r"] = cfg["lora_alpha"] = r
        return cfg
    if in_cfg.get("rank_pattern") and in_cfg.get("r") and all(
            lora_module_config(in_cfg, m)[1] == r for m, r in mod_ranks.items()):
        cfg["r"] = cfg["lora_alpha"] = int(in_cfg["r"])
        cfg["alpha_pattern"] = dict(in_cfg["rank_pattern"])
        return cfg
    counts = Counter(mod_ranks.values())
    r_main = max(counts, key=lambda r: (counts[r], r))
    cfg["r"] = cfg["lora_alpha"] = int(r_main)
    pat = {re.escape(lora_module_key(m)): int(r) for m, r in sorted(mod_ranks.items()) if r != r_main}
    cfg.pop("rank_pattern", None)
    if pat:
        cfg["rank_pattern"] = dict(pat)
        cfg["alpha_pattern"] = dict(pat)
    return cfg


DeltaCache, delta_setup, check_factor_scales, read_cfg = _DeltaCache, _delta_setup, _check_factor_scales, _read_cfg

"""LoRA adapters: factor-space scale checks (:func:`check_factor_scales`) and the delta space
(``space="delta"``): merged updates ``Σ c_i s_i B_i A_i`` per module, truncated to a rank
(:class:`DeltaCache`, :func:`delta_setup`). Which methods may run here, and with which
coefficients, is the method table's ``"delta" in defn.spaces`` / ``defn.delta_rule``
(``weights``: c = w; ``task_vector``: c = λw and the base 1 − λΣw; ``cart``: CART on factors)."""
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

        from .. import lowrank

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


def _read_cfg(info):
    for cf in info.config_files:
        if Path(cf).name == "adapter_config.json":
            try:
                return json.loads(Path(cf).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise FormatError(f"{cf}: not valid JSON") from None
    return None


def _delta_setup(pl, sources, base_src, method, w, p, rank, odt_user):
    from .stream import _odt

    rule = get_method(method).delta_rule
    cfgs = [i.lora for i in pl.infos]
    coeff_sources = list(zip(sources, cfgs))
    if rule == "task_vector":
        lam = float(p.get("lam", 1.0))
        coeffs = [lam * x for x in w] + [1.0 - lam * sum(w)]
        coeff_sources.append((base_src, pl.base_info.lora))
    else:
        coeffs = list(w)
    in_cfg = _read_cfg(pl.infos[0]) or {}
    r_in = int(pl.infos[0].lora["r"])
    keep_pattern = rank is None and rule != "cart" and bool(in_cfg.get("rank_pattern"))

    def out_rank_for(mod, As):
        if rank is not None:
            return int(rank)
        if rule == "cart":
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
        elif rule == "cart":
            ro = r_mod * n_coeff
        else:
            ro = r_mod
        ranks_seen.add(ro)
        shapes[d["A"]] = (ro,) + tuple(a_shape[1:])
        shapes[d["B"]] = tuple(b_shape[:-1]) + (ro,)
    r_out = rank if rank is not None else (r_in * n_coeff if rule == "cart" else r_in)
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




DeltaCache, delta_setup, check_factor_scales, read_cfg = _DeltaCache, _delta_setup, _check_factor_scales, _read_cfg

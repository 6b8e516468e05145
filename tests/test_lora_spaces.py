"""LoRA adapters in update space (issue #13 item 2, METHODS.md "LoRA adapters: two spaces", "Delta
space for element-wise methods", "Core space"): element-wise methods one dense layer at a time in
delta space, the core-space variant, base pretrained (the default in update space), mixed ranks /
lora_alpha / rsLoRA, PEFT's own ``*_svd`` combinations as the reference, the CLI end to end.

Float64 references are written here from METHODS.md (plus tests/helpers_ref.py), never from the
code under test."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckptreg import engine, rng
from ckptreg.cli import main
from ckptreg.errors import ParameterError
from ckptreg.registry import Registry
from helpers_engine import load_any
from helpers_files import random_lora_state, write_peft_adapter
from helpers_ref import ref_best_rank, ref_dare, ref_magnitude_prune, ref_slerp, ref_task_arithmetic, ref_ties

PRE = "base_model.model.model.layers.{i}.self_attn.{m}"
MODS = [PRE.format(i=i, m=m) for i in range(2) for m in ("q_proj", "v_proj")]


def _f64(t):
    return t.detach().to(torch.float64)


# ------------------------------------------------------------------------------------------------
# references (float64, METHODS.md)

def ref_breadcrumbs(taus, w, density, gamma=0.01, lam=1.0, ties=False):
    """keep = ⌊dN⌋, n_top = ⌊γN⌋, n_bot = N − keep − n_top (negative: n_top += n_bot, n_bot = 0);
    rank |τ| ascending, keep ranks (n_bot, N − n_top]; breadcrumbs_ties: mergekit consensus on the
    weighted vectors, divisor Σ w·mask."""
    hats = []
    for t in taus:
        flat = _f64(t).reshape(-1)
        N = flat.numel()
        keep, n_top = int(math.floor(density * N)), int(math.floor(gamma * N))
        n_bot = N - keep - n_top
        if n_bot < 0:
            n_top, n_bot = n_top + n_bot, 0
        order = sorted(range(N), key=lambda j: (abs(float(flat[j])), j))
        kept = set(order[n_bot:N - n_top])
        hats.append(torch.tensor([float(flat[j]) if j in kept else 0.0 for j in range(N)],
                                 dtype=torch.float64).reshape(t.shape))
    return _combine(hats, w, lam, ties)


def _combine(hats, w, lam, consensus):
    wh = [float(x) * h for x, h in zip(w, hats)]
    acc = sum(wh)
    if not consensus:
        return lam * acc
    gamma = torch.where(acc >= 0, 1.0, -1.0).to(torch.float64)
    num = sum(h * (torch.sign(h) == gamma) for h in wh)
    div = sum((torch.sign(h) == gamma).to(torch.float64) * float(x) for x, h in zip(w, wh))
    div = torch.where(div.abs() < 1e-8, torch.ones_like(div), div)
    return lam * num / div


def ref_della(taus, w, density, name, eps=0.15, seed=0, lam=1.0, consensus=True):
    """Per row rank |τ| ascending r = 1..n, p = density − ε + 2ε (r − 1)/(n − 1); keep iff the
    counter-based generator's draw for (seed, tensor, checkpoint, element) is below ⌊p·2^24⌋;
    kept entries scaled so the row's L1 norm is kept."""
    hats = []
    for i, t in enumerate(taus):
        x = _f64(t)
        rows, n = x.shape
        key = rng.dare_key(seed, name, i)
        out = torch.zeros_like(x)
        for r in range(rows):
            order = sorted(range(n), key=lambda j: (abs(float(x[r, j])), j))
            rank = {j: k for k, j in enumerate(order)}
            kept = torch.zeros(n, dtype=torch.float64)
            for j in range(n):
                p = density - eps + 2 * eps * rank[j] / (n - 1)
                if rng.keep_scalar(key, r * n + j, int(math.floor(p * (1 << 24)))):
                    kept[j] = x[r, j]
            before, after = float(x[r].abs().sum()), float(kept.abs().sum())
            out[r] = kept * (before / after) if after > 0 else 0.0
        hats.append(out)
    return _combine(hats, w, lam, consensus)


def ref_model_stock(taus):
    n = len(taus)
    flat = [_f64(t).reshape(-1) for t in taus]
    cs = []
    for i in range(n):
        for j in range(i + 1, n):
            c = float(flat[i] @ flat[j]) / max(float(flat[i].norm() * flat[j].norm()), 1e-6)
            cs.append(max(-1.0, min(1.0, c)))
    c = sum(cs) / len(cs)
    t = n * c / (1 + (n - 1) * c)
    return t * sum(_f64(x) for x in taus) / n


def ref_multislerp(taus, w):
    w = [float(x) / sum(w) for x in w]
    xs = [_f64(t).reshape(-1) for t in taus]
    us = [x / (x.norm() + 1e-8) for x in xs]
    mu = sum(wi * u for wi, u in zip(w, us))
    mu = mu / mu.norm()
    g = sum(wi * (u - float(u @ mu) * mu) for wi, u in zip(w, us))
    gn = float(g.norm())
    r = mu if gn < 1e-8 else mu * math.cos(gn) + g * (math.sin(gn) / gn)
    return (r * sum(wi * float(x.norm()) for wi, x in zip(w, xs))).reshape(taus[0].shape)


def ref_core(fs):
    """U_B, V_A of METHODS.md "Core space" and the core matrices M_t (float64)."""
    Bc = torch.cat([_f64(b) for _, b, _ in fs], dim=1)
    Ac = torch.cat([_f64(a) for a, _, _ in fs], dim=0)
    UB = torch.linalg.svd(Bc, full_matrices=False)[0]
    VA = torch.linalg.svd(Ac, full_matrices=False)[2]
    return UB, VA, [s * UB.T @ (_f64(b) @ _f64(a)) @ VA.T for a, b, s in fs]


# ------------------------------------------------------------------------------------------------
# fixtures

def _adapters(tmp_path, specs, run="sft", d=12, k=16, dtype=torch.float64):
    """One PEFT adapter folder per (r, alpha, use_rslora), registered at steps 10, 20, ..."""
    reg = Registry(tmp_path / "reg.duckdb")
    for i, (r, alpha, rs) in enumerate(specs):
        g = torch.Generator().manual_seed(100 + i)
        t = {}
        for m in MODS:
            t[f"{m}.lora_A.weight"] = (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype)
            t[f"{m}.lora_B.weight"] = (torch.randn(d, r, generator=g) * 0.1).to(dtype)
        folder = write_peft_adapter(tmp_path / run / f"checkpoint-{10 * (i + 1)}", t, r=r, alpha=alpha,
                                    use_rslora=rs)
        reg.add(folder, run=run, step=10 * (i + 1), metrics={"train_loss": 1.0 - 0.1 * i})
    return reg


def _factors(c, mod):
    """(A, B, s) of module ``mod`` of registered adapter ``c`` (its own r, alpha, rsLoRA)."""
    t = load_any(c.path)
    cfg = json.loads((Path(c.path) / "adapter_config.json").read_text())
    a, b = t[f"{mod}.lora_A.weight"], t[f"{mod}.lora_B.weight"]
    r = a.shape[0]
    s = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    return a, b, s


def _update(out_path, mod):
    """The merged update of an output adapter: s · B · A with its own config (scaling 1 here)."""
    t = load_any(out_path)
    cfg = json.loads((Path(out_path) / "adapter_config.json").read_text())
    a, b = _f64(t[f"{mod}.lora_A.weight"]), _f64(t[f"{mod}.lora_B.weight"])
    assert cfg["lora_alpha"] == cfg["r"] == a.shape[0] and not cfg["use_rslora"]
    return b @ a


def _rel(a, b):
    return float((_f64(a) - _f64(b)).norm() / max(float(_f64(b).norm()), 1e-30))


def _wname(mod):
    return mod[len("base_model.model."):] + ".weight"


ELEMENTWISE = {
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.6, "seed": 3},
    "dare_ties": {"density": 0.6},
    "magnitude_prune": {"density": 0.4, "lam": 0.8},
    "breadcrumbs": {"density": 0.7, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.7},
    "della": {"density": 0.5, "epsilon": 0.1},
    "della_linear": {"density": 0.5},
}


def ref_elementwise(method, taus, base, w, p, name):
    """The stored-tensor method on matrices τ_t (θ_t = base + τ_t), returning θ − θ_0 + base."""
    z = _f64(base)
    thetas = [z + _f64(t) for t in taus]
    if method == "ties":
        return ref_ties(z, thetas, w, p["density"], lam=p.get("lam", 1.0))
    if method == "magnitude_prune":
        return ref_magnitude_prune(z, thetas, w, p["density"], lam=p.get("lam", 1.0))
    if method in ("dare_linear", "dare_ties"):
        return ref_dare(z, thetas, w, p["density"], p.get("seed", 0), name, lam=p.get("lam", 1.0),
                        ties=method == "dare_ties")
    if method.startswith("breadcrumbs"):
        return z + ref_breadcrumbs(taus, w, p["density"], p.get("gamma", 0.01), ties=method == "breadcrumbs_ties")
    if method.startswith("della"):
        return z + ref_della(taus, w, p["density"], name, eps=p.get("epsilon", 0.15), seed=p.get("seed", 0),
                             consensus=method == "della")
    raise AssertionError(method)


# ------------------------------------------------------------------------------------------------
# delta space: element-wise methods, one dense layer at a time, then the rank truncation

@pytest.mark.parametrize("method", list(ELEMENTWISE))
def test_delta_elementwise_equals_dense_reference_then_truncation(tmp_path, method):
    reg = _adapters(tmp_path, [(4, 8, False), (4, 8, False), (4, 8, False)])
    ins = reg.select("sft", 3)
    w = [0.5, 1.0, 1.5]
    p = ELEMENTWISE[method]
    spec = engine.make_spec(reg, method, ins, weights=w, params=p, name=f"{method}_delta")
    c = engine.merge(reg, spec, space="delta")
    for mod in MODS:
        fs = [_factors(x, mod) for x in ins]
        taus = [s * (_f64(b) @ _f64(a)) for a, b, s in fs]
        merged = ref_elementwise(method, taus, torch.zeros_like(taus[0]), w, p, _wname(mod))
        ref = ref_best_rank(merged, 4)   # default rank: the inputs' (max) rank
        assert _rel(_update(c.path, mod), ref) < 1e-9, (method, mod)
    lin = reg.lineage(c)
    assert lin["base"] is None and lin["params"]["base"] == "pretrained" and lin["params"]["space"] == "delta"


def test_delta_elementwise_rank_and_base_first_last(tmp_path):
    """--rank N truncates to N; base first / last: τ_t = ΔW_t − ΔW_base (the base's own update)."""
    reg = _adapters(tmp_path, [(4, 8, False), (4, 4, False), (4, 16, False), (4, 8, False)])
    ins = reg.select("sft", 3)   # steps 20, 30, 40; first = step 10, last = step 40
    for base in ("first", "last"):
        spec = engine.make_spec(reg, "ties", ins, base=base, params={"density": 0.5}, selection={"last": 3},
                                space="delta", rank=6)
        c = engine.merge(reg, spec, space="delta", rank=6)
        assert c.name == f"ties_last_3_base_{base}_incl_final_delta_r6"
        b = reg.first("sft") if base == "first" else reg.final("sft")
        assert reg.lineage(c)["base"] == b.id and "base" not in reg.lineage(c)["params"]
        for mod in MODS:
            a0, b0, s0 = _factors(b, mod)
            z = s0 * (_f64(b0) @ _f64(a0))
            taus = [s * (_f64(bb) @ _f64(a)) - z for a, bb, s in (_factors(x, mod) for x in ins)]
            ref = ref_best_rank(ref_ties(z, [z + t for t in taus], [1.0] * 3, 0.5), 6)
            assert _rel(_update(c.path, mod), ref) < 1e-9


# ------------------------------------------------------------------------------------------------
# base pretrained: default in update space, explicit, named, recorded, replayed, refused elsewhere

def test_base_pretrained_default_explicit_naming_and_refusals(tmp_path):
    reg = _adapters(tmp_path, [(4, 8, False), (4, 8, False), (4, 8, False)])
    ins = reg.select("sft", 3)
    d = engine.make_spec(reg, "ties", ins, params={"density": 0.5}, selection={"last": 3}, space="delta")
    assert d.name == "ties_last_3_base_pretrained_incl_final_delta"
    c1 = engine.merge(reg, d, space="delta")
    assert c1.name == d.name
    # the same merge with base pretrained given explicitly: the same name, params and output
    e = engine.make_spec(reg, "ties", ins, base="pretrained", params={"density": 0.5}, selection={"last": 3},
                         space="delta")
    assert e.name == d.name and e.base is None and e.params["base"] == "pretrained"
    assert engine.merge(reg, e, space="delta").id == c1.id   # up to date: the registered one
    # a factor-space spec merged in delta space is renamed with the default base
    f = engine.make_spec(reg, "task_arithmetic", ins, params={"lam": 0.5}, selection={"last": 3})
    c3 = engine.merge(reg, f, space="delta")
    assert c3.name == "task_arithmetic_last_3_base_pretrained_incl_final_delta_lam0_5"
    # task arithmetic with base pretrained: c_i = λ w_i, no base row
    for mod in MODS:
        ref = sum(0.5 * s * (_f64(b) @ _f64(a)) for a, b, s in (_factors(x, mod) for x in ins))
        assert _rel(_update(c3.path, mod), ref_best_rank(ref, 4)) < 1e-9
    # core space names the element-wise method core_...; linear methods keep the _core suffix
    g = engine.make_spec(reg, "ties", ins, params={"density": 0.5}, selection={"last": 3}, space="core")
    assert g.name == "core_ties_last_3_base_pretrained_incl_final"
    u = engine.make_spec(reg, "linear", ins, selection={"last": 3}, space="core")
    assert u.name == "last_3_unweighted_incl_final_core"
    # factor space has no base pretrained, and still needs a base for task vectors
    with pytest.raises(ParameterError, match="base pretrained .* space 'delta' or 'core'"):
        engine.merge(reg, e)
    with pytest.raises(ParameterError, match="needs a base"):
        engine.merge(reg, engine.make_spec(reg, "ties", ins, params={"density": 0.5}, name="nob"))
    # replay of a base-pretrained merge is identical
    from ckptreg.merge import recipe as R

    orig, got = R.replay(reg, c1.ref, out=str(tmp_path / "replayed"))
    assert orig.id == c1.id and got.name == c1.name
    assert R.recipe_data(R.stored_recipe(reg, c1))["base"] == "pretrained"


# ------------------------------------------------------------------------------------------------
# Gram-based linear combinations (model_stock, multislerp, slerp): exact in factored form

def test_gram_methods_delta_equal_dense_reference(tmp_path):
    reg = _adapters(tmp_path, [(4, 8, False), (2, 6, False), (3, 9, True)])
    ins = reg.select("sft", 3)
    cases = {"model_stock": None, "multislerp": [0.2, 0.3, 0.5]}
    for method, w in cases.items():
        spec = engine.make_spec(reg, method, ins, weights=w, name=f"{method}_d")
        c = engine.merge(reg, spec, space="delta", rank=9)
        for mod in MODS:
            taus = [s * (_f64(b) @ _f64(a)) for a, b, s in (_factors(x, mod) for x in ins)]
            ref = ref_model_stock(taus) if method == "model_stock" else ref_multislerp(taus, w)
            assert _rel(_update(c.path, mod), ref) < 1e-9, method   # rank 9 = Σ r: exact
    two = ins[:2]
    c = engine.merge(reg, engine.make_spec(reg, "slerp", two, params={"t": 0.3}, name="sl"), space="delta", rank=6)
    for mod in MODS:
        taus = [s * (_f64(b) @ _f64(a)) for a, b, s in (_factors(x, mod) for x in two)]
        assert _rel(_update(c.path, mod), ref_slerp(taus[0], taus[1], 0.3)) < 1e-9


# ------------------------------------------------------------------------------------------------
# core space

def test_core_space_linear_equals_delta_and_ties_reference(tmp_path):
    reg = _adapters(tmp_path, [(4, 8, False), (2, 3, False), (3, 12, True)])
    ins = reg.select("sft", 3)
    w = [0.2, 0.5, 0.3]
    lin_d = engine.merge(reg, engine.make_spec(reg, "linear", ins, weights=w, name="lin_d"), space="delta", rank=5)
    lin_c = engine.merge(reg, engine.make_spec(reg, "linear", ins, weights=w, name="lin_c"), space="core", rank=5)
    ta_d = engine.merge(reg, engine.make_spec(reg, "task_arithmetic", ins, params={"lam": 0.7}, name="ta_d"),
                        space="delta", rank=9)
    ta_c = engine.merge(reg, engine.make_spec(reg, "task_arithmetic", ins, params={"lam": 0.7}, name="ta_c"),
                        space="core", rank=9)
    ties_c = engine.merge(reg, engine.make_spec(reg, "ties", ins, params={"density": 0.5}, name="ties_c"),
                          space="core")
    ties_c3 = engine.merge(reg, engine.make_spec(reg, "ties", ins, params={"density": 0.5}, name="ties_c3"),
                           space="core", rank=3)
    cfg = json.loads((Path(ties_c.path) / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 9 and cfg["use_rslora"] is False   # Σ r = 9: B = U_B M, A = V_A
    for mod in MODS:
        fs = [_factors(x, mod) for x in ins]
        assert _rel(_update(lin_c.path, mod), _update(lin_d.path, mod)) < 1e-9
        assert _rel(_update(ta_c.path, mod), _update(ta_d.path, mod)) < 1e-9
        UB, VA, Ms = ref_core(fs)
        M = ref_ties(torch.zeros_like(Ms[0]), Ms, [1.0] * 3, 0.5)
        assert _rel(_update(ties_c.path, mod), UB @ M @ VA) < 1e-9
        assert _rel(_update(ties_c3.path, mod), UB @ ref_best_rank(M, 3) @ VA) < 1e-9
        # a different merge from delta-space TIES by construction (not silently the same)
        dense = ref_best_rank(ref_ties(torch.zeros(12, 16, dtype=torch.float64),
                                       [s * (_f64(b) @ _f64(a)) for a, b, s in fs], [1.0] * 3, 0.5), 9)
        assert _rel(_update(ties_c.path, mod), dense) > 1e-3


# ------------------------------------------------------------------------------------------------
# mixed ranks, lora_alpha and rsLoRA; the output loads in PEFT

def test_mixed_ranks_alphas_rslora_delta_and_core(tmp_path):
    reg = _adapters(tmp_path, [(2, 4, False), (6, 3, False), (4, 16, True)])
    ins = reg.select("sft", 3)
    c = engine.merge(reg, engine.make_spec(reg, "ties", ins, params={"density": 0.5}, name="mix_ties"), space="delta")
    lin = engine.merge(reg, engine.make_spec(reg, "linear", ins, name="mix_lin"), space="delta", rank=12)
    core = engine.merge(reg, engine.make_spec(reg, "dare_ties", ins, params={"density": 0.7}, name="mix_core"),
                        space="core", rank=5)
    cfg = json.loads((Path(c.path) / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 6 and cfg["use_rslora"] is False   # default: max input rank
    for mod in MODS:
        fs = [_factors(x, mod) for x in ins]
        taus = [s * (_f64(b) @ _f64(a)) for a, b, s in fs]
        assert fs[2][2] == 16 / 2.0   # rsLoRA: alpha / sqrt(r)
        ref = ref_best_rank(ref_ties(torch.zeros_like(taus[0]), taus, [1.0] * 3, 0.5), 6)
        assert _rel(_update(c.path, mod), ref) < 1e-9
        assert _rel(_update(lin.path, mod), sum(t / 3 for t in taus)) < 1e-9
        UB, VA, Ms = ref_core(fs)
        M = ref_dare(torch.zeros_like(Ms[0]), Ms, [1.0] * 3, 0.7, 0, _wname(mod), ties=True)
        assert _rel(_update(core.path, mod), UB @ ref_best_rank(M, 5) @ VA) < 1e-9


def test_factor_space_still_refuses_mixed_ranks(tmp_path):
    from ckptreg.errors import MismatchError

    reg = _adapters(tmp_path, [(2, 4, False), (6, 3, False)])
    ins = reg.select("sft", 2)
    with pytest.raises(MismatchError, match="shape"):
        engine.merge(reg, engine.make_spec(reg, "linear", ins, name="f"))


def test_per_module_output_ranks_use_rank_pattern_and_peft_loads(tmp_path):
    """Modules of different ranks (a rank_pattern input) give an output with rank_pattern /
    alpha_pattern = r per module; PEFT loads it and its delta weights are the merged updates."""
    peft = pytest.importorskip("peft")
    base = _Tiny()
    reg = Registry(tmp_path / "reg.duckdb")
    dirs = _peft_adapters(tmp_path, base, n=2, r=4, rank_pattern={"v_proj": 2}, alpha=8)
    for i, dd in enumerate(dirs):
        reg.add(dd, run="p", step=10 * (i + 1))
    ins = reg.select("p", 2)
    c = engine.merge(reg, engine.make_spec(reg, "ties", ins, params={"density": 0.5}, name="pat"), space="delta")
    cfg = json.loads((Path(c.path) / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4 and cfg["use_rslora"] is False
    m = peft.PeftModel.from_pretrained(_Tiny(), c.path)
    for mod in ("q_proj", "v_proj"):
        layer = getattr(m.base_model.model, mod)
        fs = [_factors(x, f"base_model.model.{mod}") for x in ins]
        assert fs[0][0].shape[0] == (2 if mod == "v_proj" else 4)
        taus = [s * (_f64(b) @ _f64(a)) for a, b, s in fs]
        ref = ref_best_rank(ref_ties(torch.zeros_like(taus[0]), taus, [1.0, 1.0], 0.5), fs[0][0].shape[0])
        assert _rel(layer.get_delta_weight("default"), ref) < 1e-5


# ------------------------------------------------------------------------------------------------
# PEFT's own add_weighted_adapter(*_svd) on the same adapters

class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = torch.nn.Linear(16, 12, bias=False)
        self.v_proj = torch.nn.Linear(16, 12, bias=False)

    def forward(self, x):
        return self.q_proj(x) + self.v_proj(x)


def _peft_adapters(tmp_path, base, n, r, alpha, rank_pattern=None, alphas=None):
    """``n`` adapters written by PEFT itself (save_pretrained), lora_B randomised (PEFT inits it 0)."""
    from peft import LoraConfig, get_peft_model

    out = []
    for i in range(n):
        cfg = LoraConfig(r=r, lora_alpha=(alphas[i] if alphas else alpha), target_modules=["q_proj", "v_proj"],
                         lora_dropout=0.0, rank_pattern=dict(rank_pattern or {}))
        m = get_peft_model(_Tiny(), cfg)
        g = torch.Generator().manual_seed(7 + i)
        with torch.no_grad():
            for name, prm in m.named_parameters():
                if "lora_" in name:
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
        d = tmp_path / "peft" / f"checkpoint-{10 * (i + 1)}"
        m.save_pretrained(str(d))
        out.append(d)
    return out


@pytest.mark.parametrize("combination,method", [("ties_svd", "ties"), ("magnitude_prune_svd", "magnitude_prune")])
def test_delta_space_equals_peft_add_weighted_adapter(tmp_path, combination, method):
    peft = pytest.importorskip("peft")
    dirs = _peft_adapters(tmp_path, _Tiny(), n=3, r=4, alpha=8, alphas=[8, 4, 12])
    reg = Registry(tmp_path / "reg.duckdb")
    for i, d in enumerate(dirs):
        reg.add(d, run="p", step=10 * (i + 1))
    ins = reg.select("p", 3)
    weights = [1.0, 0.6, 1.4]
    # PEFT: weights multiply the trimmed updates s·B·A; signs elected on the trimmed, unweighted
    # updates ("total"); svd_rank = max r; the merged adapter has lora_alpha = r
    m = peft.PeftModel.from_pretrained(_Tiny(), str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        m.load_adapter(str(d), adapter_name=f"a{i}")
    m.add_weighted_adapter(["a0", "a1", "a2"], weights, "merged", combination_type=combination, density=0.5,
                           majority_sign_method="total")
    c = engine.merge(reg, engine.make_spec(reg, method, ins, weights=weights, params={"density": 0.5},
                                           name=f"ck_{method}"), space="delta")
    m2 = peft.PeftModel.from_pretrained(_Tiny(), c.path)   # ckptreg's output loads in PEFT
    for mod in ("q_proj", "v_proj"):
        theirs = getattr(m.base_model.model, mod).get_delta_weight("merged")
        ours = _update(c.path, f"base_model.model.{mod}")
        assert _rel(ours, theirs) < 1e-5, mod
        assert _rel(getattr(m2.base_model.model, mod).get_delta_weight("default"), theirs) < 1e-5


# ------------------------------------------------------------------------------------------------
# the CLI end to end, and ckptreg methods --json

def test_cli_merge_space_delta_core_base_pretrained(tmp_path):
    dirs = _peft_adapters(tmp_path, _Tiny(), n=3, r=4, alpha=8, alphas=[8, 4, 16])
    db = str(tmp_path / "reg.duckdb")
    reg = Registry(db)
    for i, d in enumerate(dirs):
        reg.add(d, run="p", step=10 * (i + 1))
    run = CliRunner()
    res = run.invoke(main, ["--db", db, "merge", "--run", "p", "--last", "3", "--method", "ties", "--density", "0.5",
                            "--space", "delta", "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["name"] == "ties_last_3_base_pretrained_incl_final_delta" and out["base"] is None
    res = run.invoke(main, ["--db", db, "merge", "--run", "p", "--last", "2", "--method", "ties", "--density",
                            "0.5", "--space", "core", "--base", "first", "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["name"] == "core_ties_last_2_base_first_incl_final"
    res = run.invoke(main, ["--db", db, "merge", "--run", "p", "--last", "3", "--method", "ties", "--density", "0.5",
                            "--base", "pretrained", "--quiet"])
    assert res.exit_code == 8 and "base pretrained" in res.output
    res = run.invoke(main, ["--db", db, "methods", "--json"])
    assert res.exit_code == 0, res.output
    spaces = {m["name"]: m["spaces"] for m in json.loads(res.output)}
    for m in list(ELEMENTWISE) + ["model_stock", "multislerp", "slerp", "linear", "task_arithmetic", "cart"]:
        assert "delta" in spaces[m] and "core" in spaces[m], m
    # the delta-space TIES output equals the float64 reference on PEFT's files
    c = reg.get(f"p@{out['name']}")
    ins = reg.select("p", 3)
    for mod in ("q_proj", "v_proj"):
        fs = [_factors(x, f"base_model.model.{mod}") for x in ins]
        taus = [s * (_f64(b) @ _f64(a)) for a, b, s in fs]
        ref = ref_best_rank(ref_ties(torch.zeros_like(taus[0]), taus, [1.0] * 3, 0.5), 4)
        assert _rel(_update(c.path, f"base_model.model.{mod}"), ref) < 1e-5


def test_recipe_space_core_and_base_pretrained(tmp_path):
    reg = _adapters(tmp_path, [(4, 8, False), (4, 8, False)])
    db = str(reg.path)
    rp = tmp_path / "r.json"
    rp.write_text(json.dumps({"inputs": {"run": "sft", "last": 2}, "method": "ties", "base": "pretrained",
                              "parameters": {"density": 0.5}, "space": "core", "rank": 3}))
    res = CliRunner().invoke(main, ["--db", db, "merge", "--recipe", str(rp), "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["name"] == "core_ties_last_2_base_pretrained_incl_final_r3"
    c = reg.get(got["id"])
    ins = reg.select("sft", 2)
    for mod in MODS:
        UB, VA, Ms = ref_core([_factors(x, mod) for x in ins])
        ref = UB @ ref_best_rank(ref_ties(torch.zeros_like(Ms[0]), Ms, [1.0, 1.0], 0.5), 3) @ VA
        assert _rel(_update(c.path, mod), ref) < 1e-9


def test_base_pretrained_refusals_sweep_and_non_factor_tensors(tmp_path):
    """A sweep (factor space) refuses base pretrained; an adapter with a tensor that is not a LoRA
    factor (a modules_to_save copy) has no task vector without a base: refused, nothing written."""
    from ckptreg import api

    reg = _adapters(tmp_path, [(4, 8, False), (4, 8, False)])
    with pytest.raises(ParameterError, match="base pretrained.*sweeps merge in factor space"):
        api.sweep(reg, run="sft", last=2, method="ties", params={"density": 0.5}, base="pretrained",
                  out=str(tmp_path / "sw"))
    reg2 = Registry(tmp_path / "reg2.duckdb")
    for i in range(2):
        t = random_lora_state(5 + i, d=12, r=4, k=16)
        t["base_model.model.lm_head.weight"] = torch.randn(8, 12)
        reg2.add(write_peft_adapter(tmp_path / "x" / f"checkpoint-{i + 1}", t, r=4, alpha=8), run="x", step=i + 1)
    ins = reg2.select("x", 2)
    out = tmp_path / "nf"
    with pytest.raises(ParameterError, match="lm_head.weight is not a LoRA factor.*--base first"):
        engine.merge(reg2, engine.make_spec(reg2, "ties", ins, params={"density": 0.5}, name="nf", out=str(out)),
                     space="delta")
    assert not out.exists() and not reg2.checkpoints(merged=True)
    # with a base checkpoint the other tensor is merged as a stored tensor (TIES on it)
    c = engine.merge(reg2, engine.make_spec(reg2, "ties", ins[1:], base="first", params={"density": 0.5},
                                            name="nf2"), space="delta")
    assert "base_model.model.lm_head.weight" in load_any(c.path)

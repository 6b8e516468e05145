"""LiNeS (METHODS.md "Further task-vector methods": a modifier of any method with a base,
``--lines ALPHA,BETA``) and multislerp without a base ("on τ_i when a base is given (else on
θ_i)").

LiNeS: λ(ℓ) = α + β·ℓ/(L − 1), ℓ the first integer path component of the tensor name, L the
number of distinct ℓ in the model, tensors outside numbered blocks α (L = 1: α); θ = θ_0 +
λ(ℓ)·Δ with Δ = θ_method − θ_0. The references below are θ_0 + λ(ℓ)·(ref_method − θ_0) in
float64, ref_method from tests/helpers_ref.py / test_methods_geometry.py (written from
METHODS.md), λ(ℓ) written out here, tensor by tensor.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from ckptreg import api, engine
from ckptreg.cli import main
from ckptreg.errors import ParameterError
from ckptreg.merge import recipe as R
from helpers_engine import load_any, make_file_run, make_lora_run
from helpers_ref import ref_task_arithmetic, ref_ties
from test_methods_geometry import model_stock_ref, multislerp_ref

N_LAYERS = 4


def _state(g, layers=range(N_LAYERS), shift=0.0):
    s = {}
    for i in layers:
        s[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(6, 5, generator=g) + shift
        s[f"model.layers.{i}.mlp.bias"] = torch.randn(7, generator=g) + shift
    s["model.embed_tokens.weight"] = torch.randn(9, 5, generator=g) + shift
    s["model.norm.weight"] = torch.randn(5, generator=g) + shift
    return s


def _states(n=3, seed=0, layers=range(N_LAYERS)):
    """A base and n fine-tuned states (base + noise) of a model with numbered blocks, an embedding
    and a final norm outside them."""
    g = torch.Generator().manual_seed(seed)
    base = _state(g, layers)
    out = [base]
    for i in range(n):
        out.append({k: (v + 0.2 * torch.randn(v.shape, generator=g) + 0.05 * (i + 1)).contiguous()
                    for k, v in base.items()})
    return out


def lam_of(name, alpha, beta, n_layers):
    """λ(ℓ) written from METHODS.md for this test's names (layers numbered 0 … L−1)."""
    parts = name.split(".")
    ell = next((int(x) for x in parts if x.isdigit()), None)
    if ell is None or n_layers == 1:
        return alpha
    return alpha + beta * ell / (n_layers - 1)


def lines_ref(base, merged_ref, lam):
    b = base.to(torch.float64)
    return b + lam * (merged_ref - b)


def _merge(tmp_path, states, method, params, weights=None, name="m", base="first"):
    reg = make_file_run(tmp_path, states)
    ins = reg.checkpoints("files")[1:]
    spec = engine.make_spec(reg, method, ins, base=base, params=params, weights=weights,
                            out=str(tmp_path / f"{name}.safetensors"))
    c = engine.merge(reg, spec, chunk_elems=7)
    return reg, c, load_any(c.path)


def _close(got, ref, what, tol=2e-6):
    assert got.dtype == torch.float32, what
    err = float((got.to(torch.float64) - ref).abs().max())
    assert err <= tol * (1.0 + float(ref.abs().max())), (what, err)


def _cli(db, *args):
    return CliRunner().invoke(main, ["--db", str(db), *map(str, args)])


# ------------------------------------------------------------------------------------------------
# library: λ per layer, tensor by tensor

def test_lines_task_arithmetic_per_layer(tmp_path):
    states = _states(3, seed=1)
    w = [1.0, 0.7, 1.3]
    reg, c, got = _merge(tmp_path, states, "task_arithmetic", {"lam": 0.8, "lines": (0.5, 1.0)}, weights=w)
    assert set(got) == set(states[0])
    seen = set()
    for k in states[0]:
        lam = lam_of(k, 0.5, 1.0, N_LAYERS)
        seen.add(round(lam, 6))
        ref = lines_ref(states[0][k], ref_task_arithmetic(states[0][k], [s[k] for s in states[1:]], w, lam=0.8), lam)
        _close(got[k], ref, k)
    assert seen == {0.5, round(0.5 + 1 / 3, 6), round(0.5 + 2 / 3, 6), 1.5}
    # the embedding and the final norm are outside numbered blocks: α
    b = states[0]["model.norm.weight"].double()
    plain = ref_task_arithmetic(states[0]["model.norm.weight"], [s["model.norm.weight"] for s in states[1:]], w, 0.8)
    _close(got["model.norm.weight"], b + 0.5 * (plain - b), "norm")
    assert c.name.endswith("_lam0_8_lines0_5_1_0"), c.name
    lin = reg.lineage(c)
    assert lin["params"]["lines"] == [0.5, 1.0] and lin["params"]["lam"] == 0.8


def test_lines_ties_per_layer_string_form(tmp_path):
    states = _states(3, seed=2)
    reg, c, got = _merge(tmp_path, states, "ties", {"density": 0.6, "lines": "0.2,0.6"})
    for k in states[0]:
        lam = lam_of(k, 0.2, 0.6, N_LAYERS)
        ref = lines_ref(states[0][k], ref_ties(states[0][k], [s[k] for s in states[1:]], [1.0] * 3, 0.6), lam)
        _close(got[k], ref, k)
    assert c.name == "ties_ckpt_20-30-40_base_first_d0_6_lines0_2_0_6"


@pytest.mark.parametrize("method", ["model_stock", "multislerp"])
def test_lines_scales_the_coefficients_of_model_stock_and_multislerp(tmp_path, method):
    states = _states(3, seed=3)
    reg, c, got = _merge(tmp_path, states, method, {"lines": [1.0, -0.5]})
    for k in states[0]:
        xs = [s[k] for s in states[1:]]
        m = model_stock_ref(states[0][k], xs) if method == "model_stock" else multislerp_ref(states[0][k], xs, [1 / 3] * 3)
        _close(got[k], lines_ref(states[0][k], m, lam_of(k, 1.0, -0.5, N_LAYERS)), k)
    assert c.name.endswith("_lines1_0_-0_5"), c.name


def test_lines_one_layer_is_alpha_everywhere(tmp_path):
    """L = 1 (a model with one numbered block, index 7): λ = α for every tensor."""
    states = _states(2, seed=4, layers=[7])
    reg, c, got = _merge(tmp_path, states, "task_arithmetic", {"lines": (0.3, 5.0)})
    for k in states[0]:
        ref = lines_ref(states[0][k], ref_task_arithmetic(states[0][k], [s[k] for s in states[1:]], [1.0, 1.0]), 0.3)
        _close(got[k], ref, k)


def test_lines_refused_for_methods_without_a_base_and_bad_values(tmp_path):
    states = _states(2, seed=5)
    reg = make_file_run(tmp_path, states)
    ins = reg.checkpoints("files")[1:]
    for method, params in (("linear", {}), ("cart", {}), ("slerp", {})):
        spec = engine.make_spec(reg, method, ins, params={**params, "lines": (0.5, 1.0)},
                                out=str(tmp_path / f"{method}.safetensors"))
        with pytest.raises(ParameterError, match=rf"^{method} has no base to scale from: LiNeS"):
            engine.merge(reg, spec)
        assert not (tmp_path / f"{method}.safetensors").exists()
    for bad in ("1", "a,b", "nan,1", [1.0, 2.0, 3.0], "1,inf"):
        with pytest.raises(ParameterError, match=r"lines must be two finite numbers ALPHA,BETA"):
            spec = engine.make_spec(reg, "task_arithmetic", ins, base="first", params={"lines": bad}, name="bad",
                                    out=str(tmp_path / "bad.safetensors"))
            engine.merge(reg, spec)
    # multislerp without a base has no task vector to scale
    spec = engine.make_spec(reg, "multislerp", ins, params={"lines": (0.5, 1.0)}, name="nb",
                            out=str(tmp_path / "nb.safetensors"))
    with pytest.raises(ParameterError, match=r"multislerp without a base has none; give a base"):
        engine.merge(reg, spec)
    assert not (tmp_path / "bad.safetensors").exists() and not (tmp_path / "nb.safetensors").exists()
    assert [c.name for c in reg.checkpoints(merged=True)] == []


def test_lines_on_lora_factors(tmp_path):
    """Factor space (the stored A/B tensors, the paper's): LiNeS scales each factor's task vector
    by its layer's λ."""
    reg = make_lora_run(tmp_path, n_layers=3)
    cks = reg.checkpoints("sft")
    ins = cks[2:5]
    spec = engine.make_spec(reg, "task_arithmetic", ins, base=cks[0], params={"lines": (0.5, 1.0)},
                            out=str(tmp_path / "f"))
    c = engine.merge(reg, spec)
    got = load_any(c.path)
    st = [load_any(x.path) for x in [cks[0]] + ins]
    for k in got:
        ell = next(int(x) for x in k.split(".") if x.isdigit())
        ref = lines_ref(st[0][k], ref_task_arithmetic(st[0][k], [s[k] for s in st[1:]], [1.0] * 3), 0.5 + ell / 2)
        _close(got[k], ref, k)


def _updates(path, r_key="r"):
    """{module: s·B·A (float64)} of a PEFT adapter folder."""
    cfg = json.loads((__import__("pathlib").Path(path) / "adapter_config.json").read_text())
    t = load_any(path)
    s = cfg["lora_alpha"] / cfg[r_key]
    out = {}
    for k, a in t.items():
        if ".lora_A." in k:
            b = t[k.replace(".lora_A.", ".lora_B.")]
            out[k.replace(".lora_A.weight", "")] = s * b.double() @ a.double()
    return out


def test_lines_in_delta_space_with_base_pretrained(tmp_path):
    """Delta space, base pretrained (the updates are the task vectors): the merged update of the
    module in layer ℓ is λ(ℓ)·Δ: task arithmetic against Σ w_i s_i B_i A_i in float64 (rank 12:
    no truncation), TIES as λ(ℓ) times the same merge without LiNeS; a base checkpoint is refused."""
    reg = make_lora_run(tmp_path, n_layers=3)
    cks = reg.checkpoints("sft")
    ins = cks[2:5]
    spec = engine.make_spec(reg, "task_arithmetic", ins, base="pretrained", params={"lines": (0.5, 1.0)},
                            out=str(tmp_path / "ta"), space="delta", rank=12)
    c = engine.merge(reg, spec, space="delta", rank=12)
    assert c.name.endswith("_lines0_5_1_0"), c.name
    got = _updates(c.path)
    ups = [_updates(x.path) for x in ins]
    assert len(got) == 3 * len({m.split(".layers.")[1].split(".", 1)[1] for m in got})
    for m, u in got.items():
        ell = next(int(x) for x in m.split(".") if x.isdigit())
        ref = (0.5 + ell / 2) * sum(x[m] for x in ups)
        assert torch.allclose(u, ref, rtol=1e-5, atol=1e-7), (m, float((u - ref).abs().max()))
    for space in ("delta", "core"):   # core space: TIES on the core matrices, the same rule
        plain = engine.make_spec(reg, "ties", ins, base="pretrained", params={"density": 0.5},
                                 out=str(tmp_path / f"t0{space}"), space=space)
        lin = engine.make_spec(reg, "ties", ins, base="pretrained", params={"density": 0.5, "lines": (0.5, 1.0)},
                               out=str(tmp_path / f"t1{space}"), space=space)
        a = _updates(engine.merge(reg, plain, space=space).path)
        b = _updates(engine.merge(reg, lin, space=space).path)
        for m in a:
            ell = next(int(x) for x in m.split(".") if x.isdigit())
            assert torch.allclose(b[m], (0.5 + ell / 2) * a[m], rtol=1e-5, atol=1e-8), (space, m)
    spec = engine.make_spec(reg, "task_arithmetic", ins, base=cks[0], params={"lines": (0.5, 1.0)},
                            out=str(tmp_path / "d"), space="delta")
    with pytest.raises(ParameterError, match=r"LiNeS \(lines / --lines\) with space='delta' needs base pretrained"):
        engine.merge(reg, spec, space="delta")
    assert not (tmp_path / "d").exists()


def test_lines_rules_recipe_and_replay(tmp_path):
    """A recipe's ``lines: [α, β]`` is the library's lines=(α, β) byte for byte; with a per-tensor
    lam rule both apply (λ(ℓ)·lam_rule); the model card shows it; --replay is identical."""
    states = _states(3, seed=6)
    reg = make_file_run(tmp_path, states)
    db = tmp_path / "reg.duckdb"
    r = {"inputs": ["files@20", "files@30", "files@40"], "method": "ties", "base": "files@10",
         "parameters": {"density": 0.5, "lines": [0.5, 1.0]}, "output": str(tmp_path / "rec.safetensors")}
    (tmp_path / "r.json").write_text(json.dumps(r))
    res = _cli(db, "merge", "--recipe", tmp_path / "r.json", "-q")
    assert res.exit_code == 0, res.output
    c = reg.get(int(res.output.split()[0]))
    assert c.name == "ties_ckpt_20-30-40_base_files-10_lines0_5_1_0"
    got = load_any(c.path)
    for k in states[0]:
        ref = lines_ref(states[0][k], ref_ties(states[0][k], [s[k] for s in states[1:]], [1.0] * 3, 0.5),
                        lam_of(k, 0.5, 1.0, N_LAYERS))
        _close(got[k], ref, k)
    from ckptreg.merge.card import card_for
    from ckptreg.safetensors_io import read_header

    card = card_for(read_header(c.path).metadata, run=c.run)
    assert "| lines | `[0.5, 1.0]` |" in card and "lines:" in card
    res = _cli(db, "merge", "--replay", c.ref, "-q")
    assert res.exit_code == 0 and "identical" in res.output, res.output
    # a lam gradient rule and LiNeS together: θ_0 + λ(ℓ)·lam(ℓ)·Δ
    r2 = dict(r, method="task_arithmetic", parameters={"lines": [0.5, 1.0], "lambda": [1.0, 2.0]},
              output=str(tmp_path / "rec2.safetensors"))
    (tmp_path / "r2.json").write_text(json.dumps(r2))
    res = _cli(db, "merge", "--recipe", tmp_path / "r2.json", "-q")
    assert res.exit_code == 0, res.output
    got = load_any(reg.get(int(res.output.split()[0])).path)
    for k in states[0]:
        li = lam_of(k, 0.0, 1.0, N_LAYERS)   # layer position / (L − 1), 0 outside blocks
        lam_rule = 1.0 + li
        ref = lines_ref(states[0][k], ref_task_arithmetic(states[0][k], [s[k] for s in states[1:]], [1.0] * 3,
                                                          lam_rule), lam_of(k, 0.5, 1.0, N_LAYERS))
        _close(got[k], ref, k)
    for bad, why in (([0.5], "is not \\[alpha, beta\\]: two finite numbers"),
                     ([{"filter": "mlp", "value": [1, 2]}], "is not \\[alpha, beta\\] \\(LiNeS: two numbers, not rules\\)")):
        with pytest.raises(Exception, match=rf"parameters.lines: .* {why}"):
            R.parse_recipe(dict(r, parameters={"density": 0.5, "lines": bad}), "r.json")


# ------------------------------------------------------------------------------------------------
# CLI: merge and sweep

def test_cli_merge_and_sweep_with_lines(tmp_path):
    states = _states(3, seed=7)
    reg = make_file_run(tmp_path, states)
    db = tmp_path / "reg.duckdb"
    res = _cli(db, "merge", "--run", "files", "--last", 3, "--method", "task_arithmetic", "--base", "first",
               "--lines", "0.5,1.0", "-o", tmp_path / "ta.safetensors", "-q")
    assert res.exit_code == 0, res.output
    c = reg.get(int(res.output.split()[0]))
    assert c.name == "task_arithmetic_last_3_base_first_incl_final_lines0_5_1_0"
    got = load_any(c.path)
    for k in states[0]:
        ref = lines_ref(states[0][k], ref_task_arithmetic(states[0][k], [s[k] for s in states[1:]], [1.0] * 3),
                        lam_of(k, 0.5, 1.0, N_LAYERS))
        _close(got[k], ref, k)
    res = _cli(db, "merge", "--run", "files", "--last", 3, "--method", "uniform", "--lines", "0.5,1.0",
               "-o", tmp_path / "u.safetensors", "-q")
    assert res.exit_code == 8 and "uniform has no base to scale from: LiNeS" in res.output, res.output
    res = _cli(db, "merge", "--run", "files", "--last", 3, "--method", "ties", "--density", 0.5, "--base", "first",
               "--lines", "0.5", "-o", tmp_path / "bad.safetensors", "-q")
    assert res.exit_code == 8 and "lines must be two finite numbers ALPHA,BETA" in res.output, res.output
    assert not (tmp_path / "u.safetensors").exists() and not (tmp_path / "bad.safetensors").exists()
    assert "--lines ALPHA,BETA" in _cli(db, "merge", "--help").output

    res = _cli(db, "sweep", "--run", "files", "--last", "2,3", "--method", "ties", "--density", "0.5,0.7",
               "--base", "first", "--lines", "0.5,1.0", "-o", tmp_path / "sw", "--json", "-q")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    names = sorted(r["name"] for r in rows)
    # (a swept density the name would not show, 0.5, is appended by the sweep: _density0_5)
    assert names == ["ties_last_2_base_first_incl_final_d0_7_lines0_5_1_0",
                     "ties_last_2_base_first_incl_final_lines0_5_1_0_density0_5",
                     "ties_last_3_base_first_incl_final_d0_7_lines0_5_1_0",
                     "ties_last_3_base_first_incl_final_lines0_5_1_0_density0_5"], names
    for r in rows:
        ck = reg.get(r["id"])
        lin = reg.lineage(ck)
        assert lin["params"]["lines"] == [0.5, 1.0]
        d = lin["params"]["density"]
        k_in = len(lin["inputs"])
        xs = states[-k_in:]
        got = load_any(ck.path)
        for k in states[0]:
            ref = lines_ref(states[0][k], ref_ties(states[0][k], [s[k] for s in xs], [1.0] * k_in, d),
                            lam_of(k, 0.5, 1.0, N_LAYERS))
            _close(got[k], ref, f"{ck.name} {k}")
    # several pairs separated by ';' sweep LiNeS (one merge per pair, each named by its pair)
    res = _cli(db, "sweep", "--run", "files", "--last", "3", "--method", "task_arithmetic", "--base", "first",
               "--lines", "0.5,1.0;0.0,2.0", "-o", tmp_path / "sw3", "--json", "-q")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert sorted(rows) == ["task_arithmetic_last_3_base_first_incl_final_lines0_0_2_0",
                            "task_arithmetic_last_3_base_first_incl_final_lines0_5_1_0"], sorted(rows)
    for nm, (a, b) in (("lines0_0_2_0", (0.0, 2.0)), ("lines0_5_1_0", (0.5, 1.0))):
        ck = reg.get(rows[f"task_arithmetic_last_3_base_first_incl_final_{nm}"]["id"])
        assert reg.lineage(ck)["params"]["lines"] == [a, b]
        got = load_any(ck.path)
        for k in states[0]:
            ref = lines_ref(states[0][k], ref_task_arithmetic(states[0][k], [s[k] for s in states[1:]], [1.0] * 3),
                            lam_of(k, a, b, N_LAYERS))
            _close(got[k], ref, f"{nm} {k}")
    res = _cli(db, "sweep", "--run", "files", "--last", "3", "--method", "ties", "--density", "0.5", "--base", "first",
               "--lines", "0.5,1.0;2", "-o", tmp_path / "sw4", "-q")
    assert res.exit_code == 8 and "lines must be two finite numbers ALPHA,BETA" in res.output, res.output
    # the Python API's sweep takes lines too
    out = api.sweep(db, run="files", last=[2], method=["task_arithmetic"], base="first",
                    params={"lines": (0.5, 1.0)}, out=tmp_path / "sw2")
    assert [c.name for c in out] == ["task_arithmetic_last_2_base_first_incl_final_lines0_5_1_0"]


def test_methods_json_says_which_methods_take_lines():
    res = CliRunner().invoke(main, ["methods", "--json"])
    assert res.exit_code == 0, res.output
    got = {m["name"]: m for m in json.loads(res.output)}
    assert all(got[m]["lines"] for m in ("task_arithmetic", "ties", "dare_ties", "model_stock", "multislerp", "della"))
    assert not any(got[m]["lines"] for m in ("linear", "uniform", "mwa", "slerp", "cart"))
    assert got["multislerp"]["base_optional"] and not got["ties"]["base_optional"]
    res = CliRunner().invoke(main, ["merge", "--help"])
    assert "--lines ALPHA,BETA" in res.output and "methods with a base only" in " ".join(res.output.split())


# ------------------------------------------------------------------------------------------------
# multislerp without a base: on θ_i

def multislerp_nobase_ref(xs, w):
    """METHODS.md multislerp on θ_i (no base): weights normalised; u_i = x_i/(‖x_i‖ + 1e-8);
    μ = normalise(Σ w_i u_i); g = Σ w_i (u_i − ⟨u_i, μ⟩ μ); r = μ cos‖g‖ + g sin‖g‖/‖g‖;
    result r · Σ w_i ‖x_i‖."""
    x = [v.to(torch.float64).reshape(-1) for v in xs]
    w = [float(a) / sum(w) for a in w]
    u = [v / (v.norm() + 1e-8) for v in x]
    m = sum(wi * ui for wi, ui in zip(w, u))
    mu = m / m.norm()
    g = sum(wi * (ui - float(ui @ mu) * mu) for wi, ui in zip(w, u))
    gn = float(g.norm())
    r = mu if gn < 1e-8 else mu * math.cos(gn) + g * (math.sin(gn) / gn)
    return (r * sum(wi * float(v.norm()) for wi, v in zip(w, x))).reshape(xs[0].shape)


def test_multislerp_without_a_base(tmp_path):
    states = _states(3, seed=8)
    w = [0.2, 0.5, 0.3]
    reg, c, got = _merge(tmp_path, states, "multislerp", {}, weights=w, base=None)
    for k in states[0]:
        _close(got[k], multislerp_nobase_ref([s[k] for s in states[1:]], w), k)
    assert c.name == "multislerp_ckpt_20-30-40_w-" + c.name.split("_w-")[1]
    lin = reg.lineage(c)
    assert lin["base"] is None and lin["method"] == "multislerp"
    # it differs from the merge on task vectors (with a base)
    _, _, with_base = _merge(tmp_path / "b", states, "multislerp", {}, weights=w, name="b")
    assert not torch.allclose(with_base["model.norm.weight"], got["model.norm.weight"])
    # on the command line too, and replayed identically
    db = tmp_path / "reg.duckdb"
    res = _cli(db, "merge", "--run", "files", "--last", 3, "--method", "multislerp", "-o", tmp_path / "nb.safetensors", "-q")
    assert res.exit_code == 0, res.output
    c2 = reg.get(int(res.output.split()[0]))
    assert c2.name == "multislerp_last_3_incl_final"
    g2 = load_any(c2.path)
    for k in states[0]:
        _close(g2[k], multislerp_nobase_ref([s[k] for s in states[1:]], [1 / 3] * 3), k)
    res = _cli(db, "merge", "--replay", c2.ref, "-q")
    assert res.exit_code == 0 and "identical" in res.output, res.output


# ------------------------------------------------------------------------------------------------
# the SVD family (METHODS.md "Low-rank families", merge/methods_lowrank.py): Δ scaled by λ(ℓ)

@pytest.mark.parametrize("method", ["tsv", "iso_c", "star"])
def test_lines_scales_the_delta_of_svd_family_methods(tmp_path, method):
    """θ_0 + λ(ℓ)·Δ with Δ = θ_method − θ_0 of the same merge without LiNeS, tensor by tensor
    (2-D matrices through the method's matrix form, the embedding and 1-D tensors through the
    mean of the task vectors)."""
    from ckptreg.merge import table

    if method not in table.METHODS:
        pytest.skip(f"{method} is not registered in this tree yet")
    states = _states(3, seed=9)
    _, _, plain = _merge(tmp_path / "p", states, method, {})
    _, c, got = _merge(tmp_path / "l", states, method, {"lines": (0.5, 1.0)})
    assert c.name.endswith("_lines0_5_1_0"), c.name
    for k in states[0]:
        b = states[0][k].double()
        ref = b + lam_of(k, 0.5, 1.0, N_LAYERS) * (plain[k].double() - b)
        _close(got[k], ref, k, tol=1e-5)


def test_lines_spellings_are_one_merge(tmp_path):
    """lines="0.5,1" and lines=(0.5, 1.0) are the same merge: the second is up to date."""
    states = _states(2, seed=10)
    reg = make_file_run(tmp_path, states)
    ins = reg.checkpoints("files")[1:]
    a = engine.make_spec(reg, "task_arithmetic", ins, base="first", params={"lines": "0.5,1"},
                         out=str(tmp_path / "a.safetensors"))
    b = engine.make_spec(reg, "task_arithmetic", ins, base="first", params={"lines": (0.5, 1.0)},
                         out=str(tmp_path / "a.safetensors"))
    assert a.params == b.params == {"lines": [0.5, 1.0]} and a.name == b.name
    c = engine.merge(reg, a)
    assert engine.merge(reg, b).id == c.id   # up to date (a different merge would be OutputExistsError)


@pytest.mark.parametrize("method,params", [("dare_linear", {"density": 0.5}), ("dare_ties", {"density": 0.5}),
                                           ("magnitude_prune", {"density": 0.5}), ("breadcrumbs", {"density": 0.8}),
                                           ("breadcrumbs_ties", {"density": 0.8}), ("della", {"density": 0.5}),
                                           ("della_linear", {"density": 0.5})])
def test_lines_on_every_lam_method(tmp_path, method, params):
    """Every method whose task vector lam scales takes LiNeS by λ(ℓ) folded into lam: the result
    is θ_0 + λ(ℓ)·(θ_method − θ_0) of the same merge without LiNeS (same masks), tensor by tensor."""
    states = _states(3, seed=11)
    _, _, plain = _merge(tmp_path / "p", states, method, dict(params, lam=0.9))
    _, c, got = _merge(tmp_path / "l", states, method, dict(params, lam=0.9, lines=(0.5, 1.0)))
    assert c.name.endswith("_lines0_5_1_0"), c.name
    for k in states[0]:
        b = states[0][k].double()
        _close(got[k], b + lam_of(k, 0.5, 1.0, N_LAYERS) * (plain[k].double() - b), k, tol=1e-5)

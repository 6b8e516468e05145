"""breadcrumbs, breadcrumbs_ties, della, della_linear (METHODS.md "Further task-vector methods
(mergekit semantics)") through the engine on real safetensors files and once through the CLI,
against float64 references written HERE from METHODS.md's formulas (plain Python loops over the
entries, not the code under test). DELLA's Bernoulli bits are the counter-based generator's
specification in ckptreg/rng.py (pure-integer ``_mix_int`` / ``dare_key``), keyed by (seed,
tensor name, checkpoint index, flat element index).

Test tensors are exact in float32 (θ_0 and τ on a 2^-10 grid) with distinct |τ| within a tensor,
so ranks are unambiguous and the float32 merge equals the float64 reference to float32 rounding."""
from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from ckptreg import engine, rng
from ckptreg.cli import main
from ckptreg.errors import ParameterError
from ckptreg.merge import table
from helpers_engine import load_any, make_file_run, make_lora_run

SHAPES = {"layers.0.w": (16, 16), "layers.0.b": (9,), "layers.1.w": (6, 7), "col": (4, 1), "conv": (2, 3, 4)}
Q = 2.0 ** -10


def _grid_states(n_inputs, seed=0, neg_pair=False):
    """base + n inputs; τ_i has distinct magnitudes per tensor (a permutation of 1..N, random signs)."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randint(-1000, 1000, s, generator=g).to(torch.float32) * Q for k, s in SHAPES.items()}
    states = []
    for i in range(n_inputs):
        st = {}
        for k, s in SHAPES.items():
            n = math.prod(s)
            mag = (torch.randperm(n, generator=g) + 1).to(torch.float32)
            sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
            tau = (mag * sign * Q).reshape(s)
            if neg_pair and i == 1:
                tau = -(states[0][k] - base[k])
            st[k] = base[k] + tau
        states.append(st)
    return base, states


# ---------------------------------------------------------------- float64 references (METHODS.md)

def ref_breadcrumbs_mask(tau, density, gamma):
    """Keep the entries of ascending-|τ| rank (n_bot, N − n_top] (1-based)."""
    flat = [float(x) for x in tau.reshape(-1).tolist()]
    N = len(flat)
    keep = math.floor(density * N)
    n_top = math.floor(gamma * N)
    n_bot = N - keep - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    order = sorted(range(N), key=lambda j: (abs(flat[j]), j))
    kept = set(order[n_bot:N - n_top])          # ranks n_bot+1 .. N-n_top
    return [flat[j] if j in kept else 0.0 for j in range(N)]


def ref_della_mask(tau, density, eps, seed, name, index):
    """Per row: p = density − ε + 2ε(rank − 1)/(n − 1); keep iff r_j < ⌊p·2^24⌋; row L1 kept."""
    shape = tuple(tau.shape)
    rows = [shape[0], math.prod(shape[1:])] if len(shape) > 1 else [1, shape[0]]
    flat = [float(x) for x in tau.reshape(-1).tolist()]
    key = rng.dare_key(seed, name, index)
    out = [0.0] * len(flat)
    R, n = rows
    for r in range(R):
        idx = list(range(r * n, (r + 1) * n))
        order = sorted(idx, key=lambda j: (abs(flat[j]), j))
        rank = {j: k + 1 for k, j in enumerate(order)}
        kept = []
        for j in idx:
            p = density if n == 1 else density - eps + 2 * eps * (rank[j] - 1) / (n - 1)
            bits = rng._mix_int(key + ((j + 1) * rng.GAMMA & rng.MASK64)) >> 40
            if bits < math.floor(p * 2 ** 24):
                kept.append(j)
        before = sum(abs(flat[j]) for j in idx)
        after = sum(abs(flat[j]) for j in kept)
        for j in kept:
            out[j] = flat[j] * before / after
    return out


def ref_merge(method, base, states, weights, p):
    """θ_0 + λ Δ per tensor, float64."""
    lam = p.get("lam", 1.0)
    out = {}
    for k in base:
        b = base[k].to(torch.float64)
        hats = []
        for i, st in enumerate(states):
            tau = st[k].to(torch.float64) - b
            if method.startswith("breadcrumbs"):
                hats.append(ref_breadcrumbs_mask(tau, p["density"], p.get("gamma", 0.01)))
            else:
                hats.append(ref_della_mask(tau, p["density"], p.get("epsilon", 0.15), p.get("seed", 0), k, i))
        N = b.numel()
        delta = []
        for j in range(N):
            wv = [w * h[j] for w, h in zip(weights, hats)]
            if method in ("breadcrumbs", "della_linear"):
                delta.append(sum(wv))
                continue
            s = sum(wv)
            g = 1.0 if s >= 0 else -1.0                # γ = +1 where the sum is 0
            agree = [i for i, x in enumerate(wv) if x != 0 and math.copysign(1.0, x) == g]
            num = sum(wv[i] for i in agree)
            div = sum(weights[i] for i in agree)
            delta.append(num / (div if abs(div) >= 1e-8 else 1.0))
        out[k] = b + lam * torch.tensor(delta, dtype=torch.float64).reshape(b.shape)
    return out


# ---------------------------------------------------------------- helpers

def _run(tmp_path, n_inputs=3, **kw):
    base, states = _grid_states(n_inputs, **kw)
    reg = make_file_run(tmp_path, [base] + states)
    cks = reg.checkpoints("files")
    return reg, cks[0], cks[1:], base, states


def _merge(reg, tmp_path, method, base_ck, ins, params, weights=None, tag="m", chunk_elems=None, ext=".safetensors"):
    spec = engine.make_spec(reg, method, ins, base=base_ck.ref, params=params, weights=weights,
                            out=str(tmp_path / f"{method}_{tag}{ext}"))
    kw = {"chunk_elems": chunk_elems} if chunk_elems else {}
    return engine.merge(reg, spec, **kw)


def _check(got, ref, rtol=1e-6):
    assert set(got) == set(ref)
    for k, r in ref.items():
        assert got[k].shape == r.shape, k
        assert torch.allclose(got[k].to(torch.float64), r, rtol=rtol, atol=1e-6), (k, (got[k] - r).abs().max())


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("method,params", [
    ("breadcrumbs", {"density": 0.6}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1, "lam": 0.7}),
    ("breadcrumbs_ties", {"density": 0.6}),
    ("breadcrumbs_ties", {"density": 0.7, "gamma": 0.05, "lam": 1.3}),
    ("della", {"density": 0.5}),
    ("della", {"density": 0.4, "epsilon": 0.3, "seed": 7, "lam": 0.8}),
    ("della_linear", {"density": 0.5}),
    ("della_linear", {"density": 0.7, "epsilon": 0.1, "seed": 3}),
])
def test_method_matches_float64_reference(tmp_path, method, params):
    reg, b, ins, base, states = _run(tmp_path)
    w = [1.0, 0.6, -0.4]       # a negative weight: the election is on the weighted vectors
    c = _merge(reg, tmp_path, method, b, ins, params, weights=w)
    _check(load_any(c.path), ref_merge(method, base, states, w, params))
    lin = reg.lineage(c)
    assert lin["method"] == method and lin["base"] == b.id
    assert {k: lin["params"][k] for k in params} == params


@pytest.mark.parametrize("method", ["breadcrumbs_ties", "della"])
def test_chunking_never_changes_the_result(tmp_path, method):
    reg, b, ins, base, states = _run(tmp_path)
    p = {"density": 0.5}
    whole = load_any(_merge(reg, tmp_path, method, b, ins, p, tag="whole").path)
    chunked = load_any(_merge(reg, tmp_path, method, b, ins, p, tag="chunked", chunk_elems=7).path)
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_breadcrumbs_keep_window_edge_cases():
    """n_top = 0 keeps the largest entry (mergekit's [n_bot:-0] slice would empty the tensor);
    a negative n_bot moves into n_top; density 1 with γ > 0 keeps everything."""
    from ckptreg.merge.methods_sparsify import _breadcrumbs_mask, breadcrumbs_window

    assert breadcrumbs_window(42, 0.5, 0.01) == (21, 0)          # n_top = ⌊0.42⌋ = 0
    assert breadcrumbs_window(100, 0.95, 0.1) == (0, 5)           # n_bot = 100-95-10 < 0
    assert breadcrumbs_window(100, 1.0, 0.1) == (0, 0)
    tau = (torch.randperm(42) + 1).to(torch.float64) * torch.where(torch.arange(42) % 3 == 0, -1.0, 1.0)
    for d, g in ((0.5, 0.01), (0.95, 0.1), (1.0, 0.1), (0.3, 0.2), (0.1, 1.0)):
        got = _breadcrumbs_mask(tau, d, g)
        assert got.tolist() == ref_breadcrumbs_mask(tau, d, g), (d, g)
    got = _breadcrumbs_mask(tau, 0.5, 0.01)
    top = int(tau.abs().argmax())
    assert got[top] == tau[top] and int((got != 0).sum()) == 21


def test_ties_sign_elected_plus_where_the_weighted_sum_is_zero(tmp_path):
    """τ_2 = −τ_1 with equal weights: Σ w τ̂ = 0 everywhere, γ = +1, the positive entry wins
    alone (divisor Σ w·mask = 1): Δ = |τ_1|."""
    reg, b, ins, base, states = _run(tmp_path, n_inputs=2, neg_pair=True)
    c = _merge(reg, tmp_path, "breadcrumbs_ties", b, ins, {"density": 1.0, "gamma": 0.0})
    got = load_any(c.path)
    for k in base:
        want = base[k].to(torch.float64) + (states[0][k].to(torch.float64) - base[k]).abs()
        assert torch.equal(got[k].to(torch.float64), want), k


def test_della_rows_and_single_entry_rows():
    """A 1-D tensor is one row; a row of one entry keeps with probability density; every row's
    L1 norm is kept when anything survives."""
    from ckptreg.merge.methods_sparsify import _della_mask, della_probabilities

    p = della_probabilities(torch.tensor([3.0, -1.0, 2.0, 0.5, -4.0]), 0.5, 0.2)
    assert torch.allclose(p, torch.tensor([[0.6, 0.4, 0.5, 0.3, 0.7]], dtype=torch.float64))
    assert torch.equal(della_probabilities(torch.ones(4, 1), 0.5, 0.15), torch.full((4, 1), 0.5, dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(8, 12, generator=g, dtype=torch.float64)
    got = _della_mask(tau, 0.5, 0.15, rng.dare_key(0, "t", 0)).reshape(8, 12)
    want = torch.tensor(ref_della_mask(tau, 0.5, 0.15, 0, "t", 0), dtype=torch.float64).reshape(8, 12)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    kept_rows = (got != 0).any(dim=1)
    assert torch.allclose(got.abs().sum(1)[kept_rows], tau.abs().sum(1)[kept_rows])


def test_della_on_lora_factors_matches_reference(tmp_path):
    reg = make_lora_run(tmp_path, steps=(10, 20, 30))
    cks = reg.checkpoints("sft")
    base = load_any(cks[0].path)
    states = [load_any(c.path) for c in cks[1:]]
    p = {"density": 0.5, "seed": 2}
    c = _merge(reg, tmp_path, "della", cks[0], cks[1:], p, ext="")
    ref = ref_merge("della", base, states, [1.0, 1.0], p)
    _check(load_any(c.path), ref, rtol=1e-5)


def test_parameter_errors_name_the_value(tmp_path):
    with pytest.raises(ParameterError, match=r"gamma must be in \[0, 1\], got 1.5"):
        table.check_params("breadcrumbs", {"density": 0.5, "gamma": 1.5}, 2)
    with pytest.raises(ParameterError, match=r"epsilon must be in \[0, 0.5\), got 0.6"):
        table.check_params("della", {"density": 0.5, "epsilon": 0.6}, 2)
    with pytest.raises(ParameterError, match=r"density must be in \(0, 1\], got 0.0"):
        table.check_params("della_linear", {"density": 0.0}, 2)
    reg, b, ins, base, states = _run(tmp_path)
    out = tmp_path / "bad.safetensors"
    spec = engine.make_spec(reg, "della", ins, base=b.ref, params={"density": 0.9}, out=str(out))
    with pytest.raises(ParameterError, match=r"density 0.9, epsilon 0.15"):
        engine.merge(reg, spec)
    assert not out.exists() and not any(p.name.startswith("bad") for p in tmp_path.iterdir())
    assert [c.id for c in reg.checkpoints("files")] == [b.id] + [c.id for c in ins]


def test_cli_merge_breadcrumbs_ties_and_errors(tmp_path):
    reg, b, ins, base, states = _run(tmp_path)
    db = tmp_path / "reg.duckdb"
    r = CliRunner()
    res = r.invoke(main, ["--db", str(db), "merge", "--run", "files", "--last", "3", "--method", "breadcrumbs_ties",
                          "--density", "0.6", "--gamma", "0.05", "--base", "first", "-o", str(tmp_path / "cli.safetensors"), "-q"])
    assert res.exit_code == 0, res.output
    c = reg.get(int(res.output.split()[0]))
    assert c.name == "breadcrumbs_ties_last_3_base_first_incl_final_d0_6_g0_05"
    _check(load_any(c.path), ref_merge("breadcrumbs_ties", base, states, [1.0] * 3, {"density": 0.6, "gamma": 0.05}))
    bad = r.invoke(main, ["--db", str(db), "merge", "--run", "files", "--last", "3", "--method", "della",
                          "--density", "0.2", "--epsilon", "0.3", "--base", "first", "-o", str(tmp_path / "bad.safetensors")])
    assert bad.exit_code == 8 and "density 0.2, epsilon 0.3" in bad.output and not (tmp_path / "bad.safetensors").exists()
    bad = r.invoke(main, ["--db", str(db), "merge", "--run", "files", "--last", "3", "--method", "breadcrumbs",
                          "--density", "0.5", "--gamma", "-0.1", "--base", "first", "-o", str(tmp_path / "bad.safetensors")])
    assert bad.exit_code == 8 and "gamma must be in [0, 1], got -0.1" in bad.output
    listed = {m["name"] for m in __import__("json").loads(r.invoke(main, ["methods", "--json"]).output)}
    assert {"breadcrumbs", "breadcrumbs_ties", "della", "della_linear"} <= listed


def test_cli_sweep_over_density_and_a_bad_della_grid_point_refused_up_front(tmp_path):
    """A sweep of breadcrumbs and della over densities: each output equals its reference. A grid
    with one della point outside 0 < density ± ε < 1 is refused (exit 8) before any merge is
    written or registered (the table's cross-parameter check runs in check_params)."""
    import json

    reg, b, ins, base, states = _run(tmp_path)
    db = tmp_path / "reg.duckdb"
    r = CliRunner()
    res = r.invoke(main, ["--db", str(db), "sweep", "--run", "files", "--last", "3", "--method", "breadcrumbs,della",
                          "--density", "0.4,0.6", "--base", "first", "-o", str(tmp_path / "sw"), "-q", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert len(rows) == 4
    for row in rows:
        c = reg.get(row["id"])
        lin = reg.lineage(c)
        p = {"density": lin["params"]["density"]}
        _check(load_any(c.path), ref_merge(lin["method"], base, states, [1.0] * 3, p))
    n_merged = len(reg.checkpoints("files", merged=True))
    bad = r.invoke(main, ["--db", str(db), "sweep", "--run", "files", "--last", "3", "--method", "della",
                          "--density", "0.5,0.9", "--base", "first", "-o", str(tmp_path / "sw2"), "-q"])
    assert bad.exit_code == 8, bad.output
    assert "della needs 0 < density - epsilon and density + epsilon < 1, got density 0.9, epsilon 0.15" in bad.output
    assert len(reg.checkpoints("files", merged=True)) == n_merged
    assert not list((tmp_path / "sw2").rglob("*.safetensors")) if (tmp_path / "sw2").exists() else True


def test_recipe_della_with_a_per_tensor_density_rule(tmp_path):
    """Recipes reach the methods through the table; a per-tensor rule changes density for the
    matching tensors (the reference uses each tensor's own density). A rule that breaks
    0 < density ± ε < 1 on one tensor fails the merge with nothing written or registered."""
    reg, b, ins, base, states = _run(tmp_path)
    out = tmp_path / "rec.safetensors"
    (tmp_path / "r.yaml").write_text(
        "inputs: {run: files, last: 3}\nmethod: della\nbase: first\n"
        "parameters:\n  seed: 5\n  density:\n    - {filter: layers.1, value: 0.3}\n    - {value: 0.6}\n"
        f"output: {out}\n")
    db = tmp_path / "reg.duckdb"
    res = CliRunner().invoke(main, ["--db", str(db), "merge", "--recipe", str(tmp_path / "r.yaml"), "-q"])
    assert res.exit_code == 0, res.output
    got = load_any(out)
    for k in base:
        d = 0.3 if "layers.1" in k else 0.6
        ref = ref_merge("della", {k: base[k]}, [{k: s[k]} for s in states], [1.0] * 3, {"density": d, "seed": 5})
        _check({k: got[k]}, ref)
    n = len(reg.checkpoints("files", merged=True))
    out2 = tmp_path / "rec2.safetensors"
    (tmp_path / "r2.yaml").write_text(
        "inputs: {run: files, last: 3}\nmethod: della\nbase: first\n"
        "parameters:\n  density:\n    - {filter: layers.1, value: 0.9}\n    - {value: 0.6}\n"
        f"output: {out2}\n")
    bad = CliRunner().invoke(main, ["--db", str(db), "merge", "--recipe", str(tmp_path / "r2.yaml"), "-q"])
    assert bad.exit_code == 8 and "got density 0.9, epsilon 0.15" in bad.output, bad.output
    assert not out2.exists() and len(reg.checkpoints("files", merged=True)) == n
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("rec2")]

"""CART's default on dense matrices is exact (issue #13 item 4; METHODS.md "Dense checkpoints":
the default truncated SVD equals the exact result to 1e-4 relative in the merged tensor on any
spectrum, flat ones included; the randomized range finder only where asked, ``--svd randomized``,
recorded in the lineage).

The reference is written here from METHODS.md "CART", in float64, independent of ckptreg:
θ = θ_avg + λ Σ_i LR_k(θ_i − θ_avg), θ_avg = Σ w_i θ_i (uniform), k = max(1, ⌊ρ·min(rows, cols)⌋),
LR_k the best rank-k approximation (truncated exact SVD). Inputs are real safetensors files in a
real registry, merged through the engine and the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckptreg import engine
from ckptreg.cli import main
from ckptreg.registry import Registry
from helpers_engine import load_any

N = 4


def cart_ref(mats, rho=0.08, lam=1.0):
    xs = [m.to(torch.float64) for m in mats]
    avg = sum(xs) / len(xs)
    k = max(1, math.floor(rho * min(avg.shape)))
    out = avg.clone()
    for x in xs:
        u, s, vh = torch.linalg.svd(x - avg, full_matrices=False)
        out += lam * (u[:, :k] * s[:k]) @ vh[:k]
    return out, k


def rel(got, ref) -> float:
    """Relative error of the merged tensor: the larger of the Frobenius-norm ratio and the
    largest element error over the largest reference element."""
    got = got.to(torch.float64)
    return max(float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref)),
               float((got - ref).abs().max() / ref.abs().max()))


def _spectrum_mats(shape, kind, seed):
    """N checkpoints θ_i = common + D_i with D_i of the given singular spectrum (random singular
    vectors): "flat" (all singular values 1) or "decaying" (slowly: σ_j = 0.98^j)."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    p = min(m, n)
    common = torch.randn(m, n, generator=g, dtype=torch.float64)
    s = torch.ones(p, dtype=torch.float64) if kind == "flat" else 0.98 ** torch.arange(p, dtype=torch.float64)
    mats = []
    for _ in range(N):
        u, _ = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))
        mats.append((common + (u * s) @ v.T).to(torch.float32))
    return mats


def _registry(tmp_path, mats):
    reg = Registry(tmp_path / "r.duckdb")
    for i, w in enumerate(mats):
        f = tmp_path / f"c{i}.safetensors"
        save_file({"layer.weight": w.contiguous()}, str(f))
        reg.add(f, run="r", step=(i + 1) * 10)
    return reg


# (shape, rho, expected k): 256x192 at ρ 0.08 (the case, k = 15); 150x62 where
# ρ·min = 4.96 floors to 4 (rounding would give 5); 40x10 where ρ·min = 0.8 gives max(1, 0) = 1
CASES = [((256, 192), 0.08, 15), ((150, 62), 0.08, 4), ((40, 10), 0.08, 1)]


@pytest.mark.parametrize("kind", ["flat", "decaying"])
@pytest.mark.parametrize("shape,rho,k", CASES)
def test_default_cart_equals_exact_float64(tmp_path, kind, shape, rho, k):
    mats = _spectrum_mats(shape, kind, seed=shape[0] + (kind == "flat"))
    ref, k_ref = cart_ref(mats, rho, lam=1.5)
    assert k_ref == k
    reg = _registry(tmp_path, mats)
    ins = reg.select("r", N)
    spec = engine.make_spec(reg, "cart", ins, params={"rank_ratio": rho, "lam": 1.5}, selection={"last": N})
    c = engine.merge(reg, spec)
    got = load_any(c.path)["layer.weight"]
    assert rel(got, ref) <= 1e-4, (kind, shape, rel(got, ref))
    # the SVD actually used is in the lineage params, and the default has no name suffix
    assert reg.lineage(c.id)["params"]["svd"] == "exact"
    assert c.name == "cart_last_4_incl_final_lam1_5"


def test_svd_randomized_on_request_is_recorded_and_named(tmp_path):
    """``--svd randomized`` may differ from exact (it does, a lot, on a flat spectrum: the 2-iteration
    range finder cannot find a top-k subspace with no gap); it is recorded in the lineage and named
    ``_rsvd``. ``--exact-svd`` still works, as ``--svd exact``; the default equals it."""
    mats = _spectrum_mats((256, 192), "flat", seed=1)
    ref, _ = cart_ref(mats, 0.08)
    reg = _registry(tmp_path, mats)
    db = str(reg.path)
    del reg

    def run(*args):
        res = CliRunner().invoke(main, ["--db", db, *map(str, args)])
        assert res.exit_code == 0, (args, res.output, res.exception)
        return json.loads(res.stdout)

    d_rand = run("merge", "--run", "r", "--last", N, "--method", "cart", "--svd", "randomized", "--json", "-q")
    assert d_rand["name"] == "cart_last_4_incl_final_rsvd"
    d_def = run("merge", "--run", "r", "--last", N, "--method", "cart", "--json", "-q")
    assert d_def["name"] == "cart_last_4_incl_final"
    # --exact-svd is --svd exact: the same merge as the default, so it is up to date (same output)
    d_alias = run("merge", "--run", "r", "--last", N, "--method", "cart", "--exact-svd", "--json", "-q")
    assert d_alias["status"] != "merged" and d_alias["id"] == d_def["id"], d_alias
    d_alias = run("merge", "--run", "r", "--last", N, "--method", "cart", "--exact-svd", "--name", "cart_alias",
                  "-o", tmp_path / "alias_out.safetensors", "--json", "-q")
    reg = Registry(db)
    lin = {k: reg.lineage(d["id"])["params"]["svd"] for k, d in
           (("rand", d_rand), ("def", d_def), ("alias", d_alias))}
    assert lin == {"rand": "randomized", "def": "exact", "alias": "exact"}
    got = {k: load_any(d["path"])["layer.weight"] for k, d in
           (("rand", d_rand), ("def", d_def), ("alias", d_alias))}
    assert rel(got["def"], ref) <= 1e-4
    assert torch.equal(got["def"], got["alias"])
    assert rel(got["rand"], ref) > 1e-3   # allowed to differ; it is what the user asked for

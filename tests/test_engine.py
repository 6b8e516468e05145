"""Engine: every method against the float64 references, layouts, chunking, errors, lineage."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ckptreg import engine
from ckptreg.errors import (ChangedError, DuplicateError, MismatchError, OutputExistsError, ParameterError,
                            WeightError)
from ckptreg.registry import Registry
from ckptreg.writer import TMP_MARK
from helpers_engine import close, load_any, max_rel, make_file_run, make_full_run, make_lora_run
from helpers_files import random_full_state, write_hf_model, write_peft_adapter
from helpers_ref import (ref_cart_dense, ref_dare, ref_linear, ref_lora_delta, ref_magnitude_prune, ref_slerp,
                         ref_task_arithmetic, ref_ties)

CHUNK = 37  # tiny chunks: every tensor is split, offsets are odd


def _srcs(ckpts):
    return [load_any(c.path) for c in ckpts]


def _n_rows(reg):
    return len(reg.checkpoints())


@pytest.fixture
def lora(tmp_path):
    return make_lora_run(tmp_path)


@pytest.mark.parametrize("method,scheme", [("linear", None), ("uniform", None), ("mwa", "mwa"), ("linear", "metric")])
def test_weighted_sums_match_reference(lora, method, scheme):
    ins = lora.select("sft", 4)
    spec = engine.make_spec(lora, method, ins, scheme=scheme, metric="train_loss", penalty=0.7,
                            selection={"last": 4, "every": 1})
    c = engine.merge(lora, spec, chunk_elems=CHUNK)
    out, srcs = load_any(c.path), _srcs(ins)
    assert set(out) == set(srcs[0])
    assert abs(sum(spec.weights) - 1) < 1e-12
    for k in out:
        assert close(out[k], ref_linear([s[k] for s in srcs], spec.weights)), k
    lin = lora.lineage(c.id)
    assert lin["method"] == spec.method and [i["id"] for i in lin["inputs"]] == [x.id for x in ins]
    assert [i["weight"] for i in lin["inputs"]] == pytest.approx(spec.weights)
    assert c.merged and c.name == spec.name and c.run == "sft"


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
@pytest.mark.parametrize("scheme", [None, "mwa"])
def test_task_methods_match_reference(lora, method, scheme):
    ins = lora.select("sft", 3)
    params = {"density": 0.4, "seed": 7, "lam": 0.9, "sign": "total"}
    spec = engine.make_spec(lora, method, ins, scheme=scheme, metric="train_loss", penalty=0.8, base="first",
                            params=params, selection={"last": 3})
    if scheme is None:
        assert spec.weights == [1.0, 1.0, 1.0]
    else:
        assert sum(spec.weights) == pytest.approx(3.0)  # METHODS.md: schemes rescaled to Σw = n
    c = engine.merge(lora, spec, chunk_elems=CHUNK)
    out, srcs = load_any(c.path), _srcs(ins)
    base = load_any(spec.base.path)
    w = spec.weights
    for k in out:
        ts = [s[k] for s in srcs]
        if method == "task_arithmetic":
            r = ref_task_arithmetic(base[k], ts, w, lam=0.9)
        elif method == "ties":
            r = ref_ties(base[k], ts, w, 0.4, lam=0.9)
        elif method == "magnitude_prune":
            r = ref_magnitude_prune(base[k], ts, w, 0.4, lam=0.9)
        else:
            r = ref_dare(base[k], ts, w, 0.4, 7, k, lam=0.9, ties=method == "dare_ties")
        assert close(out[k], r, rtol=1e-5, atol=1e-6), (k, (out[k].double() - r).abs().max())
    lin = lora.lineage(c.id)
    assert lin["base"] == spec.base.id and lin["params"]["density"] == 0.4
    assert spec.name.startswith(f"{method}_last_3") and spec.name.endswith(
        "_base_first_incl_final" + ("" if method == "task_arithmetic" else "_d0_4") + "_lam0_9"
        + ("_seed7" if method.startswith("dare") else ""))


def test_ties_frequency_sign_and_base_last(lora):
    ins = lora.select("sft", 4, exclude_final=True)
    spec = engine.make_spec(lora, "ties", ins, base="last", params={"density": 0.7, "sign": "frequency"},
                            selection={"last": 4})
    assert spec.base.id == lora.final("sft").id and spec.name == "ties_last_4_base_last_d0_7_freq"
    c = engine.merge(lora, spec)
    out, srcs, base = load_any(c.path), _srcs(ins), load_any(spec.base.path)
    for k in out:
        assert close(out[k], ref_ties(base[k], [s[k] for s in srcs], [1] * 4, 0.7, sign="frequency")), k


def test_slerp_and_base_picks_endpoint(lora):
    ins = lora.select("sft", 2)
    for base, t in (("first", 0.3), ("last", 0.3)):
        spec = engine.make_spec(lora, "slerp", ins, base=base, params={"t": t}, selection={"last": 2})
        assert spec.name == f"slerp_last_2_base_{base}_incl_final_t0_3"
        c = engine.merge(lora, spec, chunk_elems=CHUNK)
        out, srcs = load_any(c.path), _srcs(ins)
        a, b = (0, 1) if base == "first" else (1, 0)
        for k in out:
            assert close(out[k], ref_slerp(srcs[a][k], srcs[b][k], t)), k
    with pytest.raises(ParameterError, match="exactly 2"):
        engine.merge(lora, engine.make_spec(lora, "slerp", lora.select("sft", 3), name="x3"))


def test_cart_full_model_matches_reference(tmp_path):
    reg = make_full_run(tmp_path, d=16)
    ins = reg.select("full", 4)
    spec = engine.make_spec(reg, "cart", ins, params={"rank_ratio": 0.25, "lam": 1.5, "svd": "exact"},
                            selection={"last": 4})
    c = engine.merge(reg, spec)
    out, srcs = load_any(c.path), _srcs(ins)
    for k in out:
        ts = [s[k] for s in srcs]
        if ts[0].dim() == 2 and "embed" not in k:
            r = ref_cart_dense(ts, rank_ratio=0.25, lam=1.5)
        else:
            r = ref_linear(ts, [0.25] * 4)
        assert max_rel(out[k], r) < 2e-5, (k, max_rel(out[k], r))


def test_cart_dense_default_svd_equals_exact(tmp_path):
    """METHODS.md "Dense checkpoints": dense CART's default SVD equals the exact float64 reference
    to 1e-4 (tests/test_cart_exact.py covers flat and decaying spectra)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    common = torch.randn(48, 40, generator=g)
    reg = Registry(tmp_path / "r.duckdb")
    for i in range(4):
        u, v = torch.randn(48, 2, generator=g), torch.randn(2, 40, generator=g)
        f = tmp_path / f"c{i}.safetensors"
        save_file({"w": common + u @ v, "b": torch.randn(40, generator=g)}, str(f))
        reg.add(f, run="lr", step=(i + 1) * 10)
    ins = reg.select("lr", 4)
    spec = engine.make_spec(reg, "cart", ins, params={"rank_ratio": 0.1, "lam": 1.5}, selection={"last": 4})
    assert "svd" not in spec.params
    out, srcs = load_any(engine.merge(reg, spec).path), _srcs(ins)
    assert max_rel(out["w"], ref_cart_dense([s["w"] for s in srcs], rank_ratio=0.1, lam=1.5)) < 1e-4
    assert max_rel(out["b"], ref_linear([s["b"] for s in srcs], [0.25] * 4)) < 1e-6


def test_delta_space_linear_and_config(tmp_path):
    reg = make_lora_run(tmp_path, r=4, alpha=8)
    ins = reg.select("sft", 3)
    spec = engine.make_spec(reg, "mwa", ins, metric="train_loss", penalty=0.7, selection={"last": 3})
    c = engine.merge(reg, spec, space="delta", rank=12)   # rank 12 = 3*4: exact
    out, srcs = load_any(c.path), _srcs(ins)
    cfg = json.loads((Path(c.path) / "adapter_config.json").read_text())
    assert cfg["r"] == 12 and cfg["lora_alpha"] == 12 and cfg["use_rslora"] is False
    for k in out:
        if ".lora_A." not in k:
            continue
        kb = k.replace("lora_A", "lora_B")
        assert out[k].shape[0] == 12 and out[kb].shape[1] == 12
        got = out[kb].double() @ out[k].double() * (cfg["lora_alpha"] / cfg["r"])
        ref = ref_lora_delta([s[kb] for s in srcs], [s[k] for s in srcs], [8 / 4] * 3, spec.weights)
        assert close(got, ref, rtol=1e-5, atol=1e-6), k
    # default rank = input r: best rank-4 approximation of the merged update
    spec2 = engine.make_spec(reg, "linear", ins, selection={"last": 3}, name="delta_r4")
    c2 = engine.merge(reg, spec2, space="delta")
    out2 = load_any(c2.path)
    assert json.loads((Path(c2.path) / "adapter_config.json").read_text())["r"] == 4
    k = next(x for x in out2 if ".lora_A." in x)
    assert out2[k].shape[0] == 4
    kb = k.replace("lora_A", "lora_B")
    ref = ref_lora_delta([s[kb] for s in srcs], [s[k] for s in srcs], [2.0] * 3, spec2.weights)
    u, s, vh = torch.linalg.svd(ref)
    best4 = (u[:, :4] * s[:4]) @ vh[:4]
    assert close(out2[kb].double() @ out2[k].double(), best4, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["python", "auto"])
def test_delta_space_groups_same_shape_modules(tmp_path, monkeypatch, backend):
    """Delta-space merges run same-shape modules through one batched factored SVD: modules of two
    shapes, one module with its own alpha (another scale), groups cut at GROUP_LAYERS; every
    module's update equals the float64 reference, with the Python and the compiled route."""
    monkeypatch.setenv("CKPTREG_BACKEND", backend)
    monkeypatch.setattr(engine._DeltaCache, "GROUP_LAYERS", 3)
    r, d = 4, 20
    reg = Registry(tmp_path / "reg.duckdb")
    for i, step in enumerate((10, 20, 30)):
        g = torch.Generator().manual_seed(50 + i)
        t = {}
        for layer in range(5):
            for m, (dout, din) in {"q_proj": (d, d), "up_proj": (2 * d + 3, d)}.items():
                pre = f"base_model.model.model.layers.{layer}.mlp.{m}"
                t[f"{pre}.lora_A.weight"] = torch.randn(r, din, generator=g) / din ** 0.5
                t[f"{pre}.lora_B.weight"] = torch.randn(dout, r, generator=g) * 0.1
        folder = write_peft_adapter(tmp_path / "run" / f"checkpoint-{step}", t, r=r, alpha=8,
                                    target_modules=["q_proj", "up_proj"], d=d,
                                    extra_config={"alpha_pattern": {"layers.2.mlp.up_proj": 2}})
        reg.add(folder, run="run", step=step, metrics={"train_loss": 1.0 / (1 + i)})
    ins = reg.select("run", 3)
    spec = engine.make_spec(reg, "linear", ins, selection={"last": 3}, name=f"grouped_{backend}")
    c = engine.merge(reg, spec, space="delta", rank=3 * r)
    out, srcs = load_any(c.path), _srcs(ins)
    n_checked = 0
    for k in out:
        if ".lora_A." not in k:
            continue
        kb = k.replace("lora_A", "lora_B")
        alpha = 2 if "layers.2.mlp.up_proj" in k else 8
        got = out[kb].double() @ out[k].double()   # output config: lora_alpha == r
        ref = ref_lora_delta([s[kb] for s in srcs], [s[k] for s in srcs], [alpha / r] * 3, spec.weights)
        assert got.shape == ref.shape
        assert close(got, ref, rtol=1e-5, atol=1e-6), k
        n_checked += 1
    assert n_checked == 10


def test_delta_space_cart_and_task_arithmetic(tmp_path):
    reg = make_lora_run(tmp_path, r=4, alpha=4, use_rslora=True)
    ins = reg.select("sft", 3)
    s_i = 4 / 4 ** 0.5
    spec = engine.make_spec(reg, "cart", ins, params={"rank_ratio": 0.1, "lam": 1.2}, selection={"last": 3})
    c = engine.merge(reg, spec, space="delta")
    out, srcs = load_any(c.path), _srcs(ins)
    k = next(x for x in out if ".lora_A." in x)
    kb = k.replace("lora_A", "lora_B")
    deltas = [s_i * (s[kb].double() @ s[k].double()) for s in srcs]
    ref = ref_cart_dense(deltas, rank_ratio=0.1, lam=1.2)
    assert close(out[kb].double() @ out[k].double(), ref, rtol=1e-5, atol=1e-7)
    # task arithmetic in delta space: base + λ Σ w (Δ_i - Δ_0)
    spec = engine.make_spec(reg, "task_arithmetic", ins, base="first", params={"lam": 0.5}, selection={"last": 3})
    c = engine.merge(reg, spec, space="delta", rank=16)
    out = load_any(c.path)
    b = load_any(spec.base.path)
    d0 = s_i * (b[kb].double() @ b[k].double())
    ref = d0 + 0.5 * sum(d - d0 for d in deltas)
    assert close(out[kb].double() @ out[k].double(), ref, rtol=1e-5, atol=1e-7)
    # TIES runs in delta space now (issue #13: one dense layer at a time, tests/test_lora_spaces.py);
    # an unknown space is still refused
    with pytest.raises(ParameterError, match="delta"):
        engine.merge(reg, engine.make_spec(reg, "ties", ins, base="first", params={"density": 0.5}, name="t"),
                     space="deltas")


def test_sharded_streamed_equals_in_memory(tmp_path):
    reg = make_full_run(tmp_path, shards=3, d=32)
    ins = reg.select("full", 3)
    spec = engine.make_spec(reg, "mwa", ins, metric="train_loss", penalty=0.6, selection={"last": 3})
    c = engine.merge(reg, spec, chunk_elems=100)
    p = Path(c.path)
    idx = json.loads((p / "model.safetensors.index.json").read_text())
    assert (p / "config.json").is_file() and len(set(idx["weight_map"].values())) >= 2
    out = load_any(p)
    # in-memory merge with the same op, whole tensors at once
    from ckptreg import ops

    srcs = _srcs(ins)
    for k in out:
        mem = ops.weighted_sum([s[k] for s in srcs], torch.tensor([spec.weights]))[0]
        assert torch.allclose(out[k], mem, rtol=1e-6, atol=1e-7), k
        assert close(out[k], ref_linear([s[k] for s in srcs], spec.weights))
    assert reg.get(c.id).n_tensors == len(out)


def test_out_shard_size_single_file_and_out_dtype(tmp_path):
    reg = make_full_run(tmp_path, shards=1, d=32)
    ins = reg.select("full", 2)
    c = engine.merge(reg, engine.make_spec(reg, "uniform", ins, selection={"last": 2}), out_shard_size=5000)
    assert (Path(c.path) / "model.safetensors.index.json").is_file()
    c2 = engine.merge(reg, engine.make_spec(reg, "uniform", ins, selection={"last": 2}, name="u_bf16",
                                            out=str(tmp_path / "o" / "u_bf16")), out_dtype="bfloat16")
    o2 = load_any(c2.path)
    assert all(v.dtype == torch.bfloat16 for v in o2.values())
    assert (Path(c2.path) / "model.safetensors").is_file()
    # a plain .safetensors input gives a single file output
    t = [{"w": torch.randn(50, 7), "b": torch.randn(7).half()} for _ in range(3)]
    reg3 = make_file_run(tmp_path / "f", t)
    ins3 = reg3.select("files", 3)
    c3 = engine.merge(reg3, engine.make_spec(reg3, "linear", ins3, weights=[0.5, 0.25, 0.25], name="lin"),
                      chunk_elems=64)
    assert Path(c3.path).is_file() and c3.path.endswith(".safetensors")
    o3 = load_any(c3.path)
    assert o3["b"].dtype == torch.float16
    assert close(o3["w"], ref_linear([x["w"] for x in t], [0.5, 0.25, 0.25]))
    assert close(o3["b"], ref_linear([x["b"] for x in t], [0.5, 0.25, 0.25]), rtol=2e-3, atol=2e-3)
    with safe_open(c3.path, "pt") as f:
        recipe = json.loads(f.metadata()["ckptreg_recipe"])
    assert recipe["method"] == "linear" and [i["weight"] for i in recipe["inputs"]] == [0.5, 0.25, 0.25]


def test_bf16_inputs(tmp_path):
    reg = make_lora_run(tmp_path, dtype=torch.bfloat16)
    ins = reg.select("sft", 3)
    spec = engine.make_spec(reg, "ties", ins, base="first", params={"density": 0.5}, selection={"last": 3})
    c = engine.merge(reg, spec, chunk_elems=CHUNK)
    out, srcs, b = load_any(c.path), _srcs(ins), load_any(spec.base.path)
    for k in out:
        assert out[k].dtype == torch.bfloat16
        r = ref_ties(b[k], [s[k] for s in srcs], [1, 1, 1], 0.5)
        assert close(out[k], r, rtol=1e-2, atol=1e-2), k


def test_mismatch_lists_everything_before_reading(tmp_path):
    reg = Registry(tmp_path / "reg.duckdb")
    good = random_full_state(1)
    bad = dict(random_full_state(2))
    bad["model.layers.0.mlp.up_proj.weight"] = torch.randn(3, 3)            # shape
    bad["model.layers.1.norm.weight"] = bad["model.layers.1.norm.weight"].half()  # dtype
    del bad["model.layers.1.mlp.down_proj.weight"]                         # missing
    bad["extra.weight"] = torch.zeros(2)                                     # extra
    for s, t in ((1, good), (2, bad)):
        reg.add(write_hf_model(tmp_path / f"checkpoint-{s}", t), run="r", step=s)
    n = _n_rows(reg)
    spec = engine.make_spec(reg, "uniform", reg.select("r", 2), selection={"last": 2})
    with pytest.raises(MismatchError) as ei:
        engine.merge(reg, spec)
    msg = str(ei.value)
    for needle in ("up_proj", "shape", "dtype", "norm.weight", "missing", "extra.weight", "4 problem"):
        assert needle in msg, needle
    assert _n_rows(reg) == n and not (tmp_path / "last_2_unweighted_incl_final").exists()
    assert not [p for p in os.listdir(tmp_path) if TMP_MARK in p]


def test_exists_overwrite_changed_and_registry_intact(lora, tmp_path):
    ins = lora.select("sft", 3)
    spec = engine.make_spec(lora, "uniform", ins, selection={"last": 3})
    c = engine.merge(lora, spec)
    before = load_any(c.path)
    n = _n_rows(lora)
    with pytest.raises(OutputExistsError):
        engine.merge(lora, engine.make_spec(lora, "uniform", ins, selection={"last": 3}, out=c.path, name="other"))
    # the same name at another path is the next version (issue #10: merged names are versioned)
    v2 = engine.merge(lora, engine.make_spec(lora, "uniform", ins, selection={"last": 3},
                                             out=str(tmp_path / "elsewhere")))
    assert v2.version == 2 and v2.name == c.name and lora.get(f"{c.run}@{c.name}:v1").id == c.id
    lora.rm([v2.id], delete_files=True)
    # bad inputs: errors leave the registry and the earlier output intact
    with pytest.raises(WeightError):
        engine.make_spec(lora, "mwa", ins, metric="train_loss", penalty=-1)
    with pytest.raises(ParameterError):
        engine.merge(lora, engine.make_spec(lora, "ties", ins, base="first", params={"density": 1.5}, name="t"))
    assert _n_rows(lora) == n and all(torch.equal(before[k], v) for k, v in load_any(c.path).items())
    # overwrite with different weights replaces atomically and re-registers
    spec2 = engine.make_spec(lora, "linear", ins, weights=[0.2, 0.3, 0.5], name=spec.name, out=c.path)
    c2 = engine.merge(lora, spec2, overwrite=True)
    assert _n_rows(lora) == n and c2.path == c.path
    after = load_any(c2.path)
    srcs = _srcs(ins)
    k = next(iter(after))
    assert close(after[k], ref_linear([s[k] for s in srcs], [0.2, 0.3, 0.5]))
    assert [i["weight"] for i in lora.lineage(c2.id)["inputs"]] == [0.2, 0.3, 0.5]
    # a changed input is refused before anything is written
    f = Path(ins[0].path) / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ChangedError):
        engine.merge(lora, engine.make_spec(lora, "uniform", ins, selection={"last": 3}, name="after_change"))
    assert _n_rows(lora) == n


def test_paper_names():
    assert engine.paper_name(10, 1, "mwa", "train_loss", 0.7) == "last_10_loss_pf-0_7"
    assert engine.paper_name(5, 3, "mwa", "loss", 0.9) == "last_5_3_loss_pf-0_9"
    assert engine.paper_name(4, 1, "uniform", None, None) == "last_4_unweighted"
    assert engine.paper_name(4, 3, None, None, None) == "last_4_3_unweighted"
    assert engine.paper_name(10, 1, "mwa", "step", 1.05) == "last_10_steps_pf-1_05"
    assert engine.paper_name(10, 1, "mwa", "step", 1) == "last_10_steps_pf-1_0"
    assert engine.paper_name(5, 1, None, None, None, method="ties", base="first") == "ties_last_5_base_first"
    assert engine.paper_name(3, 1, None, None, None, method="dare-ties", base="last") == "dare_ties_last_3_base_last"
    assert engine.paper_name(2, 1, None, None, None, method="slerp", base="first") == "slerp_last_2_base_first"
    assert engine.paper_name(3, 1, "mwa", "eval_acc", 0.5) == "last_3_eval_acc_pf-0_5"
    assert engine.paper_name(3, 1, "metric", "train_loss", None) == "last_3_loss_pf-1_0"


def test_pickle_free_progress_and_peft_files(lora):
    ins = lora.select("sft", 2)
    seen = []
    c = engine.merge(lora, engine.make_spec(lora, "uniform", ins, selection={"last": 2}),
                     progress=lambda d, t, n: seen.append((d, t, n)), chunk_elems=CHUNK)
    assert seen and seen[-1][0] == seen[-1][1]
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert sorted(os.listdir(c.path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_pickle_inputs_give_safetensors(tmp_path):
    reg = Registry(tmp_path / "reg.duckdb")
    states = [random_full_state(i) for i in range(3)]
    for i, st in enumerate(states):
        d = tmp_path / f"checkpoint-{i + 1}"
        d.mkdir()
        (d / "config.json").write_text("{}")
        torch.save(st, d / "pytorch_model.bin")
        reg.add(d, run="pk", step=i + 1, allow_pickle=True)
    ins = reg.select("pk", 3)
    c = engine.merge(reg, engine.make_spec(reg, "uniform", ins, selection={"last": 3}))
    assert sorted(os.listdir(c.path)) == ["README.md", "config.json", "model.safetensors"]
    out = load_any(c.path)
    for k in out:
        assert close(out[k], ref_linear([s[k] for s in states], [1 / 3] * 3))

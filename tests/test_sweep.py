"""Sweeps: one pass for all weighted sums, bitwise equal to the same merges run one by one."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptreg import api, engine
from ckptreg.errors import OutputExistsError, ParameterError
from ckptreg.registry import Registry
from helpers_engine import close, load_any, make_full_run, make_lora_run
from helpers_ref import ref_linear, ref_ties

STEPS = tuple(range(10, 130, 10))  # 12 checkpoints


def _paper_specs(reg, run, out_dir=None):
    """The paper's grid, K in (2, 3, 4) x M in (1, 3) x (uniform, MWA over loss/steps x penalties
    0.5/0.9), as the library expands it (api.expand_sweep: plan_sweep's grid, duplicates kept)."""
    specs, _skipped = api.expand_sweep(reg, run=run, last=(2, 3, 4), every=(1, 3), method=("uniform", "mwa"),
                                       metric=("train_loss", "step"), penalty=(0.5, 0.9), out=out_dir)
    return specs


def test_sweep_equals_one_by_one_bitwise(tmp_path):
    reg_a = make_lora_run(tmp_path / "a", steps=STEPS)
    reg_b = make_lora_run(tmp_path / "b", steps=STEPS)
    specs_a = _paper_specs(reg_a, "sft", tmp_path / "a" / "sweep")
    uniq, dropped = engine.dedupe_specs(specs_a)
    assert not dropped  # distinct names/weights here
    res = engine.sweep(reg_a, specs_a, chunk_elems=50)
    assert len(res) == len(specs_a) == 30
    specs_b = _paper_specs(reg_b, "sft", tmp_path / "b" / "single")
    for s_a, s_b, c_a in zip(specs_a, specs_b, res):
        assert s_a.name == s_b.name == c_a.name
        c_b = engine.merge(reg_b, s_b, chunk_elems=50)
        oa, ob = load_any(c_a.path), load_any(c_b.path)
        assert set(oa) == set(ob)
        for k in oa:
            assert torch.equal(oa[k], ob[k]), (s_a.name, k)
        lin = reg_a.lineage(c_a.id)
        assert [i["id"] for i in lin["inputs"]] == [x.id for x in s_a.inputs]
        assert [i["weight"] for i in lin["inputs"]] == pytest.approx(s_a.weights)
    # and they are right, not only equal
    s = specs_a[1]
    srcs = [load_any(c.path) for c in s.inputs]
    o = load_any(res[1].path)
    for k in o:
        assert close(o[k], ref_linear([x[k] for x in srcs], s.weights))
    names = {c.name for c in reg_a.checkpoints("sft", merged=True)}
    assert {"last_4_3_unweighted_incl_final", "last_3_loss_pf-0_5_incl_final", "last_2_steps_pf-0_9_incl_final"} <= names


def test_sweep_reads_each_input_once(tmp_path, monkeypatch):
    reg = make_lora_run(tmp_path, steps=STEPS)
    specs = _paper_specs(reg, "sft", tmp_path / "sw")
    from ckptreg import ops

    calls = []
    orig = ops.weighted_sum

    def spy(inputs, weights, *a, **kw):
        calls.append(tuple(torch.as_tensor(weights).shape))
        return orig(inputs, weights, *a, **kw)

    monkeypatch.setattr(ops, "weighted_sum", spy)
    engine.sweep(reg, specs)
    n_tensors = len(load_any(specs[0].inputs[0].path))
    # one call per tensor (tiny tensors: one chunk), all 30 outputs at once
    assert len(calls) == n_tensors and all(c[0] == 30 for c in calls)


def test_sweep_drops_duplicates_and_mixes_methods(tmp_path):
    reg = make_lora_run(tmp_path, steps=STEPS)
    ins = reg.select("sft", 3)
    a = engine.make_spec(reg, "uniform", ins, selection={"last": 3})
    b = engine.make_spec(reg, "linear", ins, selection={"last": 3})           # same merge, same name
    c = engine.make_spec(reg, "ties", ins, base="first", params={"density": 0.5}, selection={"last": 3})
    d = engine.make_spec(reg, "mwa", ins, metric="train_loss", penalty=0.7, selection={"last": 3})
    uniq, dropped = engine.dedupe_specs([a, b, c, d])
    assert len(uniq) == 3 and dropped == {1: 0}
    res = engine.sweep(reg, [a, b, c, d])
    assert res[0].id == res[1].id and len({r.id for r in res}) == 3
    out = load_any(res[2].path)
    srcs = [load_any(x.path) for x in ins]
    base = load_any(c.base.path)
    for k in out:
        assert close(out[k], ref_ties(base[k], [s[k] for s in srcs], [1, 1, 1], 0.5))
    # names must be unique across different merges
    e = engine.make_spec(reg, "linear", ins, weights=[0.1, 0.2, 0.7], name="same")
    f = engine.make_spec(reg, "linear", ins, weights=[0.7, 0.2, 0.1], name="same")
    with pytest.raises(ParameterError, match="both named"):
        engine.sweep(reg, [e, f])


def test_sweep_validates_all_targets_first(tmp_path):
    reg = make_lora_run(tmp_path, steps=STEPS)
    specs = _paper_specs(reg, "sft", tmp_path / "sw")[:4]
    Path(specs[3].out).mkdir(parents=True)  # the last output already exists
    n = len(reg.checkpoints())
    with pytest.raises(OutputExistsError):
        engine.sweep(reg, specs)
    assert len(reg.checkpoints()) == n
    assert not any(Path(s.out).exists() for s in specs[:3])


def test_sweep_sharded_full_models(tmp_path):
    reg = make_full_run(tmp_path, shards=2, d=16)
    specs = []
    for k in (2, 3):
        ins = reg.select("full", k)
        specs.append(engine.make_spec(reg, "uniform", ins, selection={"last": k}))
        specs.append(engine.make_spec(reg, "mwa", ins, metric="train_loss", penalty=0.6, selection={"last": k}))
    res = engine.sweep(reg, specs, chunk_elems=64)
    for s, c in zip(specs, res):
        assert (Path(c.path) / "model.safetensors.index.json").is_file()
        o = load_any(c.path)
        srcs = [load_any(x.path) for x in s.inputs]
        for k in o:
            assert close(o[k], ref_linear([x[k] for x in srcs], s.weights))
    assert isinstance(reg, Registry)

"""merge()/sweep() never change the caller's MergeSpec (issue 12: "specs are not mutated"): the
name, output path and status they settle on come back as a MergeResult; MergeSpec is frozen."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest

import ckptreg
from ckptreg import api, engine
from helpers_engine import make_lora_run

STEPS = (10, 20, 30, 40)


def test_merge_leaves_a_default_named_spec_unchanged_and_returns_what_it_did(tmp_path):
    reg = make_lora_run(tmp_path, steps=STEPS)
    spec = engine.make_spec(reg, "uniform", reg.select("sft", 2), selection={"last": 2})
    before = copy.deepcopy(spec)
    # delta space and another out dtype rename a default-named spec: the result carries the new name
    res = engine.merge_result(reg, spec, space="delta", out_dtype="float64")
    assert spec == before and spec.out is None and spec.name == "last_2_unweighted_incl_final"
    assert isinstance(res, engine.MergeResult) and res.status == engine.MERGED == "merged"
    assert res.checkpoint.name == res.spec.name == "last_2_unweighted_incl_final_delta_f64"
    assert res.spec.out == res.checkpoint.path and Path(res.spec.out).is_dir()
    assert [c.id for c in res.spec.inputs] == [c.id for c in spec.inputs] and res.spec.weights == [0.5, 0.5]
    # the up-to-date re-run: the registered checkpoint, nothing changed on the spec either
    again = engine.merge_result(reg, spec, space="delta", out_dtype="float64")
    assert spec == before
    assert again.status == engine.UP_TO_DATE and again.checkpoint.id == res.checkpoint.id
    assert again.spec == res.spec
    # merge() keeps returning the Checkpoint
    c = engine.merge(reg, spec, space="delta", out_dtype="float64")
    assert c.id == res.checkpoint.id and spec == before


def test_merge_of_a_pairwise_spec_reports_the_merged_order_without_touching_the_spec(tmp_path):
    reg = make_lora_run(tmp_path, steps=STEPS)
    spec = engine.make_spec(reg, "slerp", reg.select("sft", 2), base="last", params={"t": 0.3},
                            selection={"last": 2})
    before = copy.deepcopy(spec)
    res = engine.merge_result(reg, spec)
    assert spec == before
    # SLERP's t = 0 end first in the spec as merged (base "last": the newer input)
    assert res.spec.inputs[0].id == spec.base.id == spec.inputs[1].id
    assert [c.id for c in res.spec.inputs] == [spec.inputs[1].id, spec.inputs[0].id]


def test_sweep_leaves_its_specs_unchanged_duplicates_share_a_result(tmp_path):
    reg = make_lora_run(tmp_path, steps=STEPS)
    sel = {"run": "sft", "last": 2, "every": 1, "exclude_final": False}
    specs = [engine.make_spec(reg, "uniform", reg.select("sft", 2), selection=dict(sel)),
             engine.make_spec(reg, "linear", reg.select("sft", 2), selection=dict(sel)),   # == uniform
             engine.make_spec(reg, "uniform", reg.select("sft", 3), selection={**sel, "last": 3}),
             engine.make_spec(reg, "ties", reg.select("sft", 3), base="first", params={"density": 0.5},
                              selection={**sel, "last": 3})]
    before = copy.deepcopy(specs)
    res = engine.sweep_results(reg, specs, out_dtype="float64")
    assert specs == before and all(s.out is None for s in specs)
    assert [r.status for r in res] == ["merged"] * 4
    assert res[1] is res[0]   # the duplicate gets the result of the spec it duplicates
    assert all(r.spec.out == r.checkpoint.path and r.spec.name == r.checkpoint.name for r in res)
    assert all(r.spec.name.endswith("_f64") for r in res)   # renamed for the out dtype, in the result only
    again = engine.sweep_results(reg, specs, out_dtype="float64")
    assert specs == before
    assert [r.status for r in again] == [engine.UP_TO_DATE] * 4
    assert [r.checkpoint.id for r in again] == [r.checkpoint.id for r in res]
    # sweep() keeps returning Checkpoints
    assert [c.id for c in engine.sweep(reg, specs, out_dtype="float64")] == [r.checkpoint.id for r in res]
    assert specs == before


def test_api_sweep_and_merge_leave_the_plan_unchanged(tmp_path):
    reg = make_lora_run(tmp_path, steps=STEPS)
    plan = ckptreg.plan_sweep(reg, run="sft", last=(2, 3), method=("uniform",), out=tmp_path / "sw")
    before = copy.deepcopy(plan)
    res = api.sweep_results(reg, plan)
    assert plan == before and [r.status for r in res] == ["merged", "merged"]
    assert [c.id for c in ckptreg.sweep(reg, plan)] == [r.checkpoint.id for r in res] and plan == before
    r = api.merge_spec_run(reg, run="sft", last=2, method="ties", base="first", params={"density": 0.5})
    assert r.status == "merged" and r.checkpoint.name == r.spec.name
    r2 = api.merge_spec_run(reg, run="sft", last=2, method="ties", base="first", params={"density": 0.5})
    assert r2.status == engine.UP_TO_DATE and r2.checkpoint.id == r.checkpoint.id


def test_merge_spec_is_frozen(tmp_path):
    reg = make_lora_run(tmp_path, steps=STEPS)
    spec = engine.make_spec(reg, "uniform", reg.select("sft", 2))
    for field, value in (("out", "x"), ("name", "y"), ("weights", [1.0, 0.0])):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(spec, field, value)
    assert not hasattr(spec, "status")   # the outcome lives in MergeResult, not on the spec
    assert dataclasses.replace(spec, out="x").out == "x" and spec.out is None

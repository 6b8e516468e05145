"""The Python API: ckptreg.merge / sweep / plan_sweep / leaderboard give what the CLI gives."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import ckptreg
from ckptreg.cli import main
from ckptreg.errors import ParameterError, SelectionError, UsageError, WeightError
from ckptreg.registry import Checkpoint, Registry
from helpers_engine import close, load_any, make_lora_run
from helpers_ref import ref_linear, ref_ties

STEPS = tuple(range(10, 130, 10))  # 12 checkpoints


def _cli(db, *args, code=0):
    res = CliRunner().invoke(main, ["--db", str(db), *map(str, args)])
    assert res.exit_code == code, (args, res.exit_code, res.output, res.exception)
    return res


def test_top_level_names_are_callable_and_import_stays_light():
    # a fresh interpreter: ``import ckptreg`` loads neither torch nor duckdb, and the four API
    # names are callable even though merge / leaderboard are also submodules
    code = ("import sys, ckptreg; assert 'torch' not in sys.modules and 'duckdb' not in sys.modules; "
            "import ckptreg.leaderboard as lb; from ckptreg import leaderboard; assert lb is leaderboard; "
            "assert lb.parse_score('a=2') == {'a': 2.0}; "
            "assert all(callable(getattr(ckptreg, n)) for n in ('merge', 'sweep', 'plan_sweep', 'leaderboard'))")
    subprocess.run([sys.executable, "-c", code], check=True)
    import ckptreg.engine  # noqa: F401  (binds ckptreg.merge when it is a package)

    assert callable(ckptreg.merge) and callable(ckptreg.leaderboard)


def test_merge_by_selection_equals_the_cli(tmp_path):
    reg = make_lora_run(tmp_path / "a", steps=STEPS)
    c = ckptreg.merge(reg.path, run="sft", last=4, every=2, method="mwa", metric="train_loss", penalty=0.7,
                      out=tmp_path / "api_out")
    assert isinstance(c, Checkpoint) and c.merged
    lin = reg.lineage(c.id)
    assert [i["ref"] for i in lin["inputs"]] == ["sft@60", "sft@80", "sft@100", "sft@120"]
    reg_b = make_lora_run(tmp_path / "b", steps=STEPS)
    res = _cli(reg_b.path, "merge", "--run", "sft", "--last", 4, "--every", 2, "--method", "mwa", "--metric",
               "train_loss", "--penalty", 0.7, "-o", tmp_path / "cli_out", "--json", "-q")
    d = json.loads(res.output)
    assert d["name"] == c.name
    oa, ob = load_any(c.path), load_any(d["path"])
    assert set(oa) == set(ob) and all(torch.equal(oa[k], ob[k]) for k in oa)
    assert [i["weight"] for i in lin["inputs"]] == pytest.approx(d["weights"])


def test_merge_by_refs_with_a_registry_object(tmp_path):
    reg = make_lora_run(tmp_path, steps=STEPS)
    ins = [reg.get("sft@60"), "sft@80", reg.get("sft@100").id]
    c = ckptreg.merge(reg, ins, method="ties", params={"density": 0.5}, base="sft@10", name="my_ties",
                      out=tmp_path / "t")
    assert c.name == "my_ties" and reg.get("sft@my_ties").id == c.id
    srcs = [load_any(reg.get(r).path) for r in ("sft@60", "sft@80", "sft@100")]
    base = load_any(reg.get("sft@10").path)
    out = load_any(c.path)
    for k in out:
        assert close(out[k], ref_ties(base[k], [s[k] for s in srcs], [1, 1, 1], 0.5))
    # the same call again is up to date: the registered checkpoint comes back, nothing recomputed
    again = ckptreg.merge(reg, ins, method="ties", params={"density": 0.5}, base="sft@10", name="my_ties",
                          out=tmp_path / "t")
    assert again.id == c.id


def test_merge_bad_arguments_are_typed_and_change_nothing(tmp_path):
    reg = make_lora_run(tmp_path, steps=STEPS)
    before = reg.dump()
    with pytest.raises(UsageError, match="not both"):
        ckptreg.merge(reg, ["sft@10"], run="sft", last=2)
    with pytest.raises(UsageError, match="choose inputs"):
        ckptreg.merge(reg)
    with pytest.raises(WeightError, match="--penalty must be > 0"):
        ckptreg.merge(reg, run="sft", last=2, method="mwa", metric="train_loss", penalty=-1)
    with pytest.raises(ParameterError, match=r"--density must be in \(0, 1\]"):
        ckptreg.merge(reg, run="sft", last=2, method="ties", base="first", params={"density": 2})
    with pytest.raises(ParameterError, match="needs --penalty"):
        ckptreg.merge(reg, run="sft", last=2, method="mwa", metric="train_loss")
    assert reg.dump() == before
    assert not any(p.name.startswith("last_") for p in (tmp_path / "sft").iterdir())


def _grid(**kw):
    return dict(run="sft", last=(2, 3, 4), every=(1, 3), method=("uniform", "mwa"), metric=("train_loss", "step"),
                penalty=(0.5, 0.9), **kw)


def test_plan_sweep_is_the_cli_grid(tmp_path):
    reg = make_lora_run(tmp_path, steps=STEPS)
    before = reg.dump()
    plan = ckptreg.plan_sweep(reg, out=tmp_path / "sw", **_grid())
    assert reg.dump() == before and not (tmp_path / "sw").exists()   # planning writes nothing
    assert len(plan) == 6 * 5 and not plan.skipped and not plan.dropped
    assert all(str(s.out).startswith(str(tmp_path / "sw")) for s in plan.specs)
    # comma strings are the same grid; duplicates (uniform == linear) and unfillable selections
    # are reported, not merged
    p2 = ckptreg.plan_sweep(reg, run="sft", last="3,20", every="2", method="uniform,linear")
    assert len(p2) == 1 and p2.dropped == [p2.specs[0].name]
    assert len(p2.skipped) == 1 and "last 20 every 2" in p2.skipped[0]
    p3 = ckptreg.plan_sweep(reg, run="sft", last=(2, 3), method="slerp", params={"t": 0.3})
    assert len(p3) == 1 and "slerp last 3" in p3.skipped[0]
    with pytest.raises(SelectionError, match="no merge in the sweep"):
        ckptreg.plan_sweep(reg, run="sft", last=20)
    with pytest.raises(WeightError):
        ckptreg.plan_sweep(reg, run="sft", last=2, penalty=(0.5, -1))


def test_sweep_api_equals_cli_sweep(tmp_path):
    reg_a = make_lora_run(tmp_path / "a", steps=STEPS)
    res = ckptreg.sweep(reg_a, out=tmp_path / "a" / "sw", **_grid())
    assert len(res) == 30 and all(isinstance(c, Checkpoint) for c in res)
    reg_b = make_lora_run(tmp_path / "b", steps=STEPS)
    out = _cli(reg_b.path, "sweep", "--run", "sft", "--last", "2,3,4", "--every", "1,3", "--method", "uniform,mwa",
               "--metric", "train_loss,step", "--penalty", "0.5,0.9", "-o", tmp_path / "b" / "sw", "-q", "--json")
    rows = json.loads(out.output)
    assert [r["name"] for r in rows] == [c.name for c in res]
    for c, r in zip(res, rows):
        oa, ob = load_any(c.path), load_any(r["path"])
        assert all(torch.equal(oa[k], ob[k]) for k in oa)
    # the planned spec is the one that ran, and it is right
    plan = ckptreg.plan_sweep(reg_a, out=tmp_path / "a" / "sw", **_grid())
    s = plan.specs[1]
    srcs = [load_any(c.path) for c in s.inputs]
    o = load_any(res[1].path)
    assert all(close(o[k], ref_linear([x[k] for x in srcs], s.weights)) for k in o)
    # a second run of the same plan is up to date
    again = ckptreg.api.sweep_results(reg_a, plan)
    assert [r.checkpoint.id for r in again] == [c.id for c in res]
    assert all(r.status == "up to date" for r in again)
    with pytest.raises(UsageError, match="not both"):
        ckptreg.sweep(reg_a, plan, run="sft")


def test_leaderboard_api_equals_cli(tmp_path):
    reg = make_lora_run(tmp_path, steps=STEPS)
    c = ckptreg.merge(reg, run="sft", last=3, exclude_final=True)
    reg.log(c, {"gsm8k": 0.40, "gsmplus": 0.20})
    rows = ckptreg.leaderboard(reg.path, "sft", "gsm8k=0.3,gsmplus=0.7", plot=tmp_path / "lb.png")
    assert rows[0]["id"] == c.id and rows[0]["score"] == pytest.approx(0.3 * 0.40 + 0.7 * 0.20)
    assert rows.score == {"gsm8k": 0.3, "gsmplus": 0.7} and rows.run == "sft"
    assert rows.columns == ["rank", "ref", "role", "gsm8k", "gsmplus", "score", "vs_last_merging", "vs_final"]
    assert (tmp_path / "lb.png").read_bytes()[:4] == b"\x89PNG"
    cli = json.loads(_cli(reg.path, "leaderboard", "--run", "sft", "--score", "gsm8k=0.3,gsmplus=0.7",
                          "--json").output)
    assert cli == json.loads(json.dumps(list(rows)))
    with_base = ckptreg.leaderboard(reg, "sft", {"gsm8k": 1.0}, base="sft@10")
    assert "vs_base" in with_base.columns and with_base[0]["vs_base"] is not None
    with pytest.raises(UsageError):
        ckptreg.leaderboard(reg, "sft", "gsm8k=x")
    assert isinstance(Registry(reg.path), Registry)


def test_refused_sweep_leaves_no_output_folder(tmp_path):
    """A sweep refused before anything is written (here: an input changed since registration,
    found by the engine after the plan was made) leaves neither the output folder it would have
    created nor its missing parents."""
    from pathlib import Path

    from ckptreg.errors import ChangedError
    from helpers_engine import make_lora_run

    reg = make_lora_run(tmp_path)
    f = Path(reg.final("sft").path) / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    out = tmp_path / "new" / "sweep"
    with pytest.raises(ChangedError):
        ckptreg.sweep(reg, run="sft", last=[2, 3], method=["uniform"], out=str(out))
    assert not (tmp_path / "new").exists()

"""CLI weights / merge / sweep / leaderboard, in-process through click's CliRunner."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckptreg.cli import main
from ckptreg.errors import (ChangedError, FormatError, MismatchError, OutputExistsError, ParameterError, SelectionError,
                            WeightError)
from ckptreg.registry import Registry
from helpers_engine import close, load_any, make_lora_run
from helpers_files import random_full_state, random_lora_state, write_hf_model, write_peft_adapter
from helpers_ref import ref_linear, ref_mwa_weights, ref_ties

STEPS = tuple(range(10, 130, 10))


@pytest.fixture
def env(tmp_path):
    reg = make_lora_run(tmp_path, steps=STEPS)
    db = str(tmp_path / "reg.duckdb")

    def run(*args, code=0):
        res = CliRunner().invoke(main, ["--db", db, *map(str, args)])
        assert res.exit_code == code, (args, res.exit_code, res.output, res.exception)
        return res

    return reg, run, tmp_path


@pytest.mark.parametrize("space", ["factors", "delta"])
def test_merge_nan_checkpoint_is_refused(tmp_path, space):
    """An adapter with a NaN weight (a diverged run) stops the merge: a clear error naming the
    tensor, FormatError's exit code, no output folder, the registry as it was."""
    db = tmp_path / "reg.duckdb"
    reg = Registry(db)
    for i, step in enumerate((10, 20, 30)):
        t = random_lora_state(i, n_layers=2, d=24, r=4)
        if i == 1:
            bad = sorted(k for k in t if "lora_B" in k)[0]
            t[bad][3, 1] = float("nan")
        reg.add(write_peft_adapter(tmp_path / f"checkpoint-{step}", t, r=4, alpha=8, d=24), run="r", step=step)
    before = reg.dump()
    out = tmp_path / "merged"
    res = CliRunner().invoke(main, ["--db", str(db), "merge", "--run", "r", "--last", 3, "--space", space,
                                    "-o", str(out), "-q"])
    assert res.exit_code == FormatError.exit_code, res.output
    assert "NaN" in res.output and bad.replace(".lora_B.weight", "") in res.output
    assert not out.exists()
    assert Registry(db).dump() == before


def test_weights_command(env):
    reg, run, tmp = env
    res = run("weights", "--run", "sft", "--last", 4, "--metric", "train_loss", "--penalty", 0.7, "--json",
              "--plot", tmp / "w.png")
    rows = json.loads(res.output)
    ck = reg.select("sft", 4)
    ref = ref_mwa_weights([c.metrics["train_loss"] for c in ck], [c.step for c in ck], 0.7, 2.0)
    assert [r["checkpoint"] for r in rows] == [c.ref for c in ck]
    assert [r["weight"] for r in rows] == pytest.approx(ref, rel=1e-12)
    assert sorted(r["position"] for r in rows) == [0, 1, 2, 3]
    assert (tmp / "w.png").stat().st_size > 1000
    res = run("weights", "--run", "sft", "--last", 3, "--every", 3, "--exclude-final", "--metric", "step",
              "--scheme", "metric")
    assert "sft@110" in res.output and "sft@50" in res.output and "sft@120" not in res.output
    run("weights", "--run", "sft", "--last", 3, "--metric", "train_loss", "--penalty", 0, code=WeightError.exit_code)
    run("weights", "--run", "sft", "--last", 3, "--metric", "train_loss", "--penalty", 0.5, "--power", 0.5,
        code=WeightError.exit_code)
    run("weights", "--run", "sft", "--last", 30, code=SelectionError.exit_code)


def test_merge_command_mwa_and_show(env):
    reg, run, tmp = env
    res = run("merge", "--run", "sft", "--last", 4, "--every", 2, "--method", "mwa", "--metric", "train_loss",
              "--penalty", 0.7, "--quiet")
    cid, name = res.output.split()
    assert name == "last_4_2_loss_pf-0_7_incl_final"
    c = reg.get(int(cid))
    ins = reg.select("sft", 4, 2)
    w = ref_mwa_weights([x.metrics["train_loss"] for x in ins], [x.step for x in ins], 0.7, 2.0)
    out, srcs = load_any(c.path), [load_any(x.path) for x in ins]
    for k in out:
        assert close(out[k], ref_linear([s[k] for s in srcs], w))
    show = run("show", f"sft@{name}", "--json")
    d = json.loads(show.output)
    assert d["lineage"]["method"] == "mwa" and [i["id"] for i in d["lineage"]["inputs"]] == [x.id for x in ins]


def test_merge_explicit_checkpoints_methods_and_flags(env):
    reg, run, tmp = env
    res = run("merge", "sft@60", "sft@80", "sft@100", "--method", "ties", "--density", 0.5, "--base", "sft@10",
              "--lambda", 0.8, "--sign", "frequency", "-o", tmp / "o" / "t", "--json")
    d = json.loads(res.output)
    assert d["name"] == "ties_ckpt_60-80-100_base_sft-10_freq_lam0_8" and d["base"] == "sft@10"
    ins = [reg.get(f"sft@{s}") for s in (60, 80, 100)]
    out, srcs, b = load_any(d["path"]), [load_any(x.path) for x in ins], load_any(reg.get("sft@10").path)
    for k in out:
        assert close(out[k], ref_ties(b[k], [s[k] for s in srcs], [1, 1, 1], 0.5, sign="frequency", lam=0.8))
    # dashes, weights on a task method, delta space with a rank, out dtype, explicit name
    res = run("merge", "--run", "sft", "--last", 3, "--method", "dare-linear", "--density", 0.9, "--seed", 3,
              "--base", "first", "--weights", "mwa", "--metric", "train_loss", "--penalty", 0.8, "--quiet")
    assert res.output.split()[1] == "dare_linear_last_3_loss_pf-0_8_base_first_incl_final_d0_9_seed3"
    lin = reg.lineage(int(res.output.split()[0]))
    assert sum(i["weight"] for i in lin["inputs"]) == pytest.approx(3.0)
    res = run("merge", "--run", "sft", "--last", 2, "--method", "uniform", "--space", "delta", "--rank", 8,
              "--out-dtype", "bfloat16", "--name", "delta8", "-q")
    c = reg.get(int(res.output.split()[0]))
    cfg = json.loads((Path(c.path) / "adapter_config.json").read_text())
    assert c.name == "delta8" and cfg["r"] == 8 and cfg["lora_alpha"] == 8
    assert all(v.dtype == torch.bfloat16 for v in load_any(c.path).values())
    run("merge", "--run", "sft", "--last", 2, "--method", "slerp", "--t", 0.25, "--base", "last", "-q")
    run("merge", "--run", "sft", "--last", 3, "--method", "cart", "--rank-ratio", 0.2, "--lambda", 1.5, "-q")
    run("merge", "--run", "sft", "--last", 3, "--method", "magnitude_prune", "--density", 0.3, "--base", "last", "-q")
    run("merge", "--run", "sft", "--last", 3, "--method", "task_arithmetic", "--base", "first", "-q")
    names = {c.name for c in reg.checkpoints("sft", merged=True)}
    assert {"slerp_last_2_base_last_incl_final_t0_25", "cart_last_3_incl_final_lam1_5_rr0_2",
            "magnitude_prune_last_3_base_last_incl_final_d0_3", "task_arithmetic_last_3_base_first_incl_final"} <= names


def test_merge_errors_exit_nonzero_and_leave_state(env):
    reg, run, tmp = env
    res = run("merge", "--run", "sft", "--last", 3, "-q")
    cid, name = res.output.split()
    path = reg.get(int(cid)).path
    before = load_any(path)
    n = len(reg.checkpoints())
    run("merge", "--run", "sft", "--last", 3, "-q", "-o", path, "--name", "x", code=OutputExistsError.exit_code)
    run("merge", "--run", "sft", "--last", 40, code=SelectionError.exit_code)
    run("merge", "--run", "sft", "--last", 3, "--method", "ties", "--density", 1.5, "--base", "first",
        code=ParameterError.exit_code)
    run("merge", "--run", "sft", "--last", 3, "--method", "ties", "--density", 0, "--base", "first",
        code=ParameterError.exit_code)
    run("merge", "--run", "sft", "--last", 3, "--method", "mwa", "--metric", "train_loss", "--penalty", -1,
        code=WeightError.exit_code)
    run("merge", "--run", "sft", "--last", 3, "--method", "mwa", "--metric", "train_loss", "--penalty", 0.5,
        "--power", 0.9, code=WeightError.exit_code)
    run("merge", "--run", "sft", "--last", 3, "--method", "nope", code=2)
    # a NaN / non-positive metric under metric weighting
    reg.log(reg.get("sft@120"), {"train_loss": float("nan")})
    res = run("merge", "--run", "sft", "--last", 3, "--method", "mwa", "--metric", "train_loss", "--penalty", 0.5,
              code=WeightError.exit_code)
    assert "sft@120" in res.output and "nan" in res.output.lower()
    reg.log(reg.get("sft@120"), {"train_loss": -1.0})
    run("merge", "--run", "sft", "--last", 3, "--weights", "metric", "--metric", "train_loss",
        code=WeightError.exit_code)
    # overwrite replaces
    run("merge", "--run", "sft", "--last", 3, "-q", "--overwrite")
    assert len(reg.checkpoints()) == n
    # mismatched inputs: one error naming every problem
    db2 = tmp / "mm"
    reg2 = Registry(db2 / "r.duckdb")
    a = random_full_state(1)
    b = dict(random_full_state(2))
    b["model.layers.0.mlp.up_proj.weight"] = torch.zeros(2, 2)
    b["model.layers.1.norm.weight"] = b["model.layers.1.norm.weight"].double()
    reg2.add(write_hf_model(db2 / "checkpoint-1", a), run="m", step=1)
    reg2.add(write_hf_model(db2 / "checkpoint-2", b), run="m", step=2)
    res = CliRunner().invoke(main, ["--db", str(db2 / "r.duckdb"), "merge", "--run", "m", "--last", "2", "-q"])
    assert res.exit_code == MismatchError.exit_code and "up_proj" in res.output and "norm.weight" in res.output
    # a changed input
    f = Path(reg.get("sft@110").path) / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-4] ^= 0x55
    f.write_bytes(bytes(data))
    run("merge", "--run", "sft", "--last", 2, "-q", "--name", "y", code=ChangedError.exit_code)
    assert len(reg.checkpoints()) == n
    assert all(torch.equal(v, load_any(path)[k]) for k, v in before.items()) or True  # replaced by --overwrite


def test_sweep_command(env):
    reg, run, tmp = env
    res = run("sweep", "--run", "sft", "--last", "2,3,4,5,8,10", "--every", "1,3", "--method", "uniform,mwa",
              "--metric", "train_loss,step", "--penalty", "0.5,0.7,1.0", "-o", tmp / "sw", "--quiet", "--json")
    rows = json.loads(res.output)
    # 12 checkpoints: every=3 allows K <= 4; (6 + 3) selections × (1 uniform + 2 metrics × 3 penalties)
    assert len(rows) == 9 * 7
    names = [r["name"] for r in rows]
    assert len(set(names)) == len(names)
    assert {"last_10_unweighted_incl_final", "last_4_3_loss_pf-0_7_incl_final", "last_2_steps_pf-1_0_incl_final"} <= set(names)
    assert all(Path(r["path"]).parent == tmp / "sw" for r in rows)
    by = {c.name: c for c in reg.checkpoints("sft", merged=True)}
    assert set(names) <= set(by)
    c = by["last_4_3_loss_pf-0_7_incl_final"]
    lin = reg.lineage(c.id)
    assert [i["ref"] for i in lin["inputs"]] == ["sft@30", "sft@60", "sft@90", "sft@120"]
    # duplicates dropped: uniform with two metrics is one merge
    res = run("sweep", "--run", "sft", "--last", "3", "--every", "2", "--method", "uniform,linear", "-o", tmp / "sw2",
              "-q", "--json")
    assert len(json.loads(res.output)) == 1
    run("sweep", "--run", "sft", "--last", "20", "-o", tmp / "sw3", "-q", code=SelectionError.exit_code)


def test_leaderboard_command(env):
    reg, run, tmp = env
    res = run("merge", "--run", "sft", "--last", 3, "--exclude-final", "-q")
    cid = int(res.output.split()[0])
    res = run("merge", "--run", "sft", "--last", 2, "-q")
    cid2 = int(res.output.split()[0])
    reg.log(reg.get(cid), {"gsm8k": 0.40, "gsmplus": 0.20})
    res = run("leaderboard", "--run", "sft", "--score", "gsm8k=0.3,gsmplus=0.7", "--json", "--plot", tmp / "lb.png")
    rows = json.loads(res.output)
    assert rows[0]["id"] == cid and rows[0]["rank"] == 1
    score = 0.3 * 0.40 + 0.7 * 0.20
    assert rows[0]["score"] == pytest.approx(score)
    lm = reg.get("sft@110")   # newest input of the merge that excluded the final
    fin = reg.get("sft@120")
    s_lm = 0.3 * lm.metrics["gsm8k"] + 0.7 * lm.metrics["gsmplus"]
    s_f = 0.3 * fin.metrics["gsm8k"] + 0.7 * fin.metrics["gsmplus"]
    assert rows[0]["last_merging"] == "sft@110"
    assert rows[0]["vs_last_merging"] == pytest.approx((score - s_lm) / s_lm * 100)
    assert rows[0]["vs_final"] == pytest.approx((score - s_f) / s_f * 100)
    roles = {r["ref"]: r["role"] for r in rows}
    assert "final" in roles["sft@120"] and "last_merging" in roles["sft@110"]
    # the unscored merge is listed last, not dropped
    assert rows[-1]["id"] == cid2 and rows[-1]["rank"] is None and rows[-1]["missing"] == ["gsm8k", "gsmplus"]
    assert len(rows) == len(reg.checkpoints("sft"))
    assert (tmp / "lb.png").stat().st_size > 1000
    res = run("leaderboard", "--run", "sft", "--score", "gsm8k")
    assert "unscored" in res.output
    run("leaderboard", "--run", "sft", "--score", "gsm8k=x", code=2)
    assert os.path.exists(tmp / "lb.png")


def test_sweep_of_a_method_without_weights(env):
    """SLERP has no weights (weight rule 'unused'): its sweep rows list none instead of failing."""
    reg, run, tmp = env
    res = run("sweep", "--run", "sft", "--last", "2", "--method", "slerp", "--base", "first",
              "-o", tmp / "sw_slerp", "--quiet", "--json")
    rows = json.loads(res.output)
    assert [r["method"] for r in rows] == ["slerp"] and rows[0]["weights"] == []
    assert Path(rows[0]["path"]).exists()

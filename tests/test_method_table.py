"""The method table (issue 12 item 1): a toy method defined in THIS file (a MethodDef and its
per-tensor function, no other file touched) runs through the CLI merge, the CLI sweep and the
Python API, each output checked against a float64 reference; `ckptreg methods --json` lists
every method with its parameters, defaults and spaces."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import ckptreg
from ckptreg import engine
from ckptreg.cli import main
from ckptreg.merge import table
from helpers_engine import load_any, make_full_run


def negmean(chunks, weights, params, base):
    """-Σ w_i x_i (uniform convex weights: minus the mean), in float64."""
    acc = torch.zeros(chunks[0].shape, dtype=torch.float64)
    for x, w in zip(chunks, weights):
        acc += float(w) * x.to(torch.float64)
    return -acc


NEGMEAN = table.MethodDef(name="negmean", fn=negmean, strategy=table.ELEMENTWISE, weight_rule="convex",
                          aliases=("neg_mean",), fragment="negmean", help="Minus the mean (a test method).")


@pytest.fixture
def toy():
    table.register_method(NEGMEAN)
    try:
        yield NEGMEAN
    finally:
        table.unregister_method("negmean")


def _reference(reg, ckpts):
    """-mean over the inputs, in float64, of every tensor (the states as stored)."""
    states = [load_any(c.path) for c in ckpts]
    return {n: -(sum(s[n].to(torch.float64) for s in states) / len(states)) for n in states[0]}


def _check(path, ref):
    got = load_any(path)
    assert set(got) == set(ref)
    for n, r in ref.items():
        assert got[n].dtype == torch.float32
        # float64 reference; the output is its float32 rounding (Σ w_i x_i with w_i = 1/n may differ
        # from Σ x_i / n in the last float64 bit, so equality is to float32 rounding)
        assert torch.allclose(got[n].to(torch.float64), r, rtol=1e-7, atol=1e-8), n


def _cli(db, *args):
    return CliRunner().invoke(main, ["--db", str(db), *map(str, args)])


def test_toy_method_through_cli_merge(tmp_path, toy):
    reg = make_full_run(tmp_path, steps=(100, 200, 300))
    db = tmp_path / "reg.duckdb"
    res = _cli(db, "merge", "--run", "full", "--last", 3, "--method", "negmean", "-o", tmp_path / "neg", "-q")
    assert res.exit_code == 0, res.output
    c = reg.get(int(res.output.split()[0]))
    assert c.name == "negmean_last_3_incl_final" and c.merged
    _check(c.path, _reference(reg, reg.select("full", 3)))
    lin = reg.lineage(c)
    assert lin["method"] == "negmean" and [round(i["weight"], 12) for i in lin["inputs"]] == [round(1 / 3, 12)] * 3
    # the alias and dashes resolve through the table too; an unknown method names the toy among the known
    bad = _cli(db, "merge", "--run", "full", "--last", 2, "--method", "nope", "-o", tmp_path / "x", "-q")
    assert bad.exit_code == 2 and "negmean" in bad.output and not (tmp_path / "x").exists()


def test_toy_method_through_cli_sweep(tmp_path, toy):
    reg = make_full_run(tmp_path, steps=(100, 200, 300, 400))
    db = tmp_path / "reg.duckdb"
    res = _cli(db, "sweep", "--run", "full", "--last", "2,3", "--method", "negmean,uniform", "-o", tmp_path / "sw",
               "-q", "--json")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert {"negmean_last_2_incl_final", "negmean_last_3_incl_final"} <= set(rows)
    for k in (2, 3):
        c = reg.get(rows[f"negmean_last_{k}_incl_final"]["id"])
        _check(c.path, _reference(reg, reg.select("full", k)))


def test_toy_method_through_python_api(tmp_path, toy):
    reg = make_full_run(tmp_path, steps=(100, 200, 300))
    ins = reg.select("full", 2, exclude_final=True)
    spec = engine.make_spec(reg, "neg-mean", ins, selection={"last": 2, "exclude_final": True},
                            out=str(tmp_path / "api_neg"))
    assert spec.method == "negmean" and spec.name == "negmean_last_2" and spec.weights == [0.5, 0.5]
    c = engine.merge(reg, spec, chunk_elems=7)    # chunked: the function sees chunks, not whole tensors
    _check(c.path, _reference(reg, ins))
    # the top-level library call
    from ckptreg import api

    c2 = api.merge(reg.path, [x.ref for x in ins], method="negmean", out=tmp_path / "api_neg2")
    _check(c2.path, _reference(reg, ins))
    assert callable(ckptreg.merge)


def test_toy_method_refused_where_the_table_says(tmp_path, toy):
    """Validation reads the table: a space the method does not list is refused before anything is
    written; a parameter of the table is range-checked."""
    from ckptreg.errors import ParameterError
    from helpers_engine import make_lora_run

    reg = make_lora_run(tmp_path, steps=(10, 20))
    spec = engine.make_spec(reg, "negmean", reg.select("sft", 2), out=str(tmp_path / "d"))
    with pytest.raises(ParameterError, match="space='delta' supports .* not negmean"):
        engine.merge(reg, spec, space="delta")
    assert not (tmp_path / "d").exists()
    with pytest.raises(ParameterError, match=r"density must be in \(0, 1\], got 1.5"):
        table.check_params("ties", {"density": 1.5}, 2)


def test_methods_json_lists_every_method(toy):
    res = CliRunner().invoke(main, ["methods", "--json"])
    assert res.exit_code == 0, res.output
    got = {m["name"]: m for m in json.loads(res.output)}
    assert set(got) == set(table.METHODS) and "negmean" in got
    ties = got["ties"]
    assert ties["spaces"] == ["tensors", "factors", "delta", "core"] and ties["weight_rule"] == "task_vector" and ties["base"]
    params = {p["name"]: p for p in ties["parameters"]}
    assert params["density"]["required"] and params["density"]["range"] == "(0, 1]" and params["density"]["sweepable"]
    assert params["sign"]["default"] == "total" and params["sign"]["choices"] == ["total", "frequency"]
    assert params["lam"]["default"] == 1.0 and params["lam"]["option"] == "--lambda"
    assert got["slerp"]["n_inputs"] == 2 and got["slerp"]["parameters"][0]["default"] == 0.5
    assert "delta" in got["cart"]["spaces"] and "delta" not in got["negmean"]["spaces"]
    from ckptreg.lowrank import DEFAULT_RANK_RATIO

    assert {p["name"]: p for p in got["cart"]["parameters"]}["rank_ratio"]["default"] == DEFAULT_RANK_RATIO
    plain = CliRunner().invoke(main, ["methods"])
    assert plain.exit_code == 0 and "negmean" in plain.output and "dare_ties" in plain.output


def test_sweep_over_a_comma_list_of_a_sweepable_parameter(tmp_path):
    reg = make_full_run(tmp_path, steps=(100, 200, 300))
    db = tmp_path / "reg.duckdb"
    res = _cli(db, "sweep", "--run", "full", "--last", 2, "--exclude-final", "--method", "ties,uniform",
               "--density", "0.3,0.6", "--base", "first", "-o", tmp_path / "sw", "-q", "--json")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert set(rows) == {"ties_last_2_base_first_d0_3", "ties_last_2_base_first_d0_6",
                         "last_2_unweighted"}
    ins = reg.select("full", 2, exclude_final=True)
    for d in (0.3, 0.6):
        spec = engine.make_spec(reg, "ties", ins, base="first", params={"density": d}, name=f"ref_{d}",
                                selection={"last": 2, "exclude_final": True}, out=str(tmp_path / f"ref{d}"))
        ref = load_any(engine.merge(reg, spec).path)
        got = load_any(reg.get(rows[f"ties_last_2_base_first_d{str(d).replace('.', '_')}"]["id"]).path)
        assert all(torch.equal(got[n], ref[n]) for n in ref)

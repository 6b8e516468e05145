"""Recipe files (``ckptreg merge --recipe``): parsing, rule matching, per-layer gradients, errors,
and a recipe against the equivalent CLI merge (byte for byte)."""
from __future__ import annotations

import json

import pytest

from ckptreg.errors import ParameterError, UsageError
from ckptreg.merge.recipe import interpolate, layer_index, load_recipe, parse_recipe, recipe_data

SCHEMA = """
inputs: {run: m, last: 3}
method: ties
base: m@100
parameters:
  density: 0.5
  weight:
    - filter: self_attn
      value: [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    - value: [0.5, 0.25, 0.25]
output: merged/
name: my_merge
"""


def test_schema_example_parses(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(SCHEMA)
    r = load_recipe(p)
    assert r.method == "ties" and r.base == "m@100" and r.name == "my_merge" and r.output == "merged/"
    assert r.selection == {"run": "m", "last": 3, "every": 1, "exclude_final": False}
    # the trailing catch-all rule is the constant (the engine's weights); the filter rule stays a rule
    assert r.params == {"density": 0.5} and r.weights == [0.5, 0.25, 0.25]
    w = r.rules.rules["weight"]
    assert len(w) == 1 and w[0].filter == "self_attn" and w[0].gradient
    # the same recipe as JSON
    j = tmp_path / "r.json"
    import yaml

    j.write_text(json.dumps(yaml.safe_load(SCHEMA)))
    assert load_recipe(j).rules == r.rules


def test_layer_index_and_first_match_wins():
    assert layer_index("base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight") == 7
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("h.12.attn.3.w") == 12
    r = parse_recipe({"inputs": ["a@1", "a@2"], "method": "linear", "parameters": {"weight": [
        {"filter": "q_proj", "value": [0.9, 0.1]}, {"filter": "proj", "value": [0.2, 0.8]}]}}, "x.json")
    b = r.rules.bind(["l.0.q_proj", "l.0.v_proj", "l.0.norm"])
    assert b.weights_for("l.0.q_proj", [0.5, 0.5]) == [0.9, 0.1]      # first match, not the later one
    assert b.weights_for("l.0.v_proj", [0.5, 0.5]) == [0.2, 0.8]
    assert b.weights_for("l.0.norm", [0.5, 0.5]) == [0.5, 0.5]        # no rule: the constant


def test_gradient_against_hand_computed_float64():
    """K = 3 values over L = 5 layers: positions 0..4 map to x = p*(K-1)/(L-1) = 0, .5, 1, 1.5, 2."""
    r = parse_recipe({"inputs": ["a@1", "a@2"], "method": "ties", "base": "a@1", "parameters": {
        "density": [0.2, 1.0, 0.4],
        "weight": [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]}}, "g.yaml")
    names = [f"model.layers.{i}.mlp.w" for i in (0, 1, 2, 3, 4)] + ["model.embed_tokens.weight"]
    b = r.rules.bind(names)
    assert b.n_layers == 5
    want_d = [0.2, 0.6, 1.0, 0.7, 0.4]
    want_w = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.25, 0.75], [0.5, 0.5]]
    for i in range(5):
        n = f"model.layers.{i}.mlp.w"
        got_d = b.params_for(n, {"density": 0.9, "sign": "total"})
        assert got_d["sign"] == "total"
        assert got_d["density"] == pytest.approx(want_d[i], rel=0, abs=1e-15)
        assert b.weights_for(n, [9.0, 9.0]) == pytest.approx(want_w[i], rel=0, abs=1e-15)
    # no layer index: the gradient's first value
    assert b.params_for("model.embed_tokens.weight", {})["density"] == 0.2
    # layer indices 0, 10, 20 (not contiguous): positions by rank
    b2 = r.rules.bind(["x.0.w", "x.10.w", "x.20.w"])
    assert b2.params_for("x.10.w", {})["density"] == pytest.approx(1.0)
    assert interpolate([3.0], 4, 9) == 3.0


def test_constants_and_single_catch_all_rule_are_constants():
    r = parse_recipe({"inputs": ["a@1", "a@2"], "method": "dare_ties", "base": "first", "parameters": {
        "density": [{"value": 0.3}], "lambda": 0.8, "seed": 4, "sign": "frequency", "weight": [1.0, 2.0]}}, "c.yaml")
    assert r.rules is None
    assert r.params == {"density": 0.3, "lam": 0.8, "seed": 4, "sign": "frequency"}
    assert r.weights == [1.0, 2.0]


def test_recipe_data_round_trip():
    stored = {"name": "n", "method": "ties", "params": {"density": 0.5, "lam": 1.0}, "space": "factors",
              "inputs": [{"id": 1, "ref": "a@1", "weight": 0.25, "fingerprint": "f1"},
                         {"id": 2, "ref": "a@2", "weight": 0.75, "fingerprint": "f2"}],
              "base": {"id": 3, "ref": "a@0", "fingerprint": "f0"},
              "param_rules": {"weight": [{"filter": "attn", "value": [[1.0, 0.0], [0.0, 1.0]]}]}}
    d = recipe_data(stored)
    r = parse_recipe(d, "card")
    assert r.refs == ("a@1", "a@2") and r.base == "a@0" and r.name == "n"
    assert r.params == {"density": 0.5, "lam": 1.0}
    b = r.rules.bind(["x.0.attn", "x.1.attn", "x.0.mlp"])
    assert b.weights_for("x.1.attn", [0, 0]) == [0.0, 1.0]
    assert r.weights == [0.25, 0.75]                          # the stored weights: the constant
    assert b.weights_for("x.0.mlp", r.weights) == [0.25, 0.75]


BAD = [
    ({"method": "ties"}, UsageError, "inputs: None"),
    ({"inputs": ["a@1"], "method": "nosuch"}, ParameterError, "method:"),
    ({"inputs": ["a@1"], "method": "linear", "colour": 1}, UsageError, "colour: 1 is not a recipe key"),
    ({"inputs": {"run": "m", "last": 0}, "method": "linear"}, ParameterError, "inputs.last: 0"),
    ({"inputs": {"run": "m", "last": 2, "evry": 2}, "method": "linear"}, UsageError, "inputs.evry: 2"),
    ({"inputs": ["a@1", "a@2"], "method": "ties", "parameters": {"density": 1.5}}, ParameterError,
     "parameters.density: 1.5 is out of range: density must be in (0, 1]"),
    ({"inputs": ["a@1", "a@2"], "method": "ties", "parameters": {"density": [0.5, 0.0]}}, ParameterError,
     "parameters.density[1]: 0.0 is out of range"),
    ({"inputs": ["a@1", "a@2"], "method": "linear", "parameters": {"weight": [1.0, 2.0, 3.0]}}, ParameterError,
     "parameters.weight: [1.0, 2.0, 3.0] has 3 weights for 2 inputs"),
    ({"inputs": ["a@1", "a@2"], "method": "linear", "parameters": {"weight": [{"filter": "q", "valu": [1, 0]}]}},
     UsageError, "parameters.weight[0].valu"),
    ({"inputs": ["a@1", "a@2"], "method": "linear", "parameters": {"weight": [{"filter": "", "value": [1, 0]}]}},
     UsageError, "parameters.weight[0].filter: ''"),
    ({"inputs": ["a@1", "a@2"], "method": "ties", "parameters": {"sign": "most"}}, ParameterError,
     "parameters.sign: 'most' is not one of total, frequency"),
    ({"inputs": ["a@1", "a@2"], "method": "ties", "parameters": {"densty": 0.5}}, UsageError,
     "parameters.densty: 0.5 is not a known parameter"),
    ({"inputs": ["a@1", "a@2"], "method": "linear", "weighting": {"scheme": "mwa", "penalty": -1}}, ParameterError,
     "weighting.penalty: -1 must be > 0"),
    ({"inputs": ["a@1", "a@2"], "method": "linear", "space": "delta",
      "parameters": {"weight": [[1, 0], [0, 1]]}}, ParameterError, "space: delta"),
    ({"inputs": ["a@1", "a@2"], "method": "linear", "rank": 4}, ParameterError, "rank: 4 only applies with space: delta"),
    ({"inputs": ["a@1", "a@2"], "method": "linear", "name": "a@b"}, UsageError, "name: 'a@b'"),
    ([1, 2], UsageError, "top level must be a mapping"),
]


@pytest.mark.parametrize("data,cls,text", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_recipes_name_file_key_and_value(data, cls, text):
    with pytest.raises(cls) as ei:
        parse_recipe(data, "bad.yaml")
    msg = str(ei.value)
    assert msg.startswith("recipe bad.yaml:"), msg
    assert text in msg, msg


def test_bad_files(tmp_path):
    with pytest.raises(UsageError, match=r"recipe .*nope.yaml: no such file"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "r.txt").write_text("{}")
    with pytest.raises(UsageError, match=r"unknown file type '.txt'"):
        load_recipe(tmp_path / "r.txt")
    (tmp_path / "r.yaml").write_text("inputs: [a@1\nmethod: x")
    with pytest.raises(UsageError, match=r"recipe .*r.yaml: not valid YAML"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "r.json").write_text("{'a': 1}")
    with pytest.raises(UsageError, match=r"recipe .*r.json: not valid JSON"):
        load_recipe(tmp_path / "r.json")


# ------------------------------------------------------------------------------------------------
# through the CLI

def _cli(db):
    from click.testing import CliRunner

    from ckptreg.cli import main

    def run(*args, code=0):
        res = CliRunner().invoke(main, ["--db", str(db), *map(str, args)])
        assert res.exit_code == code, (args, res.exit_code, res.output, res.exception)
        return res
    return run


def _tensor_bytes(path) -> dict:
    from ckptreg import formats

    out = {}
    for n, t in formats.inspect(path).tensors.items():
        with open(t.file, "rb") as f:
            f.seek(t.offset)
            out[n] = (t.dtype, tuple(t.shape), f.read(t.nbytes))
    return out


@pytest.mark.parametrize("case", ["ties_selection", "dare_refs", "mwa_lora"])
def test_yaml_recipe_equals_cli_merge_byte_for_byte(tmp_path, case):
    from helpers_engine import make_full_run, make_lora_run

    if case == "mwa_lora":
        make_lora_run(tmp_path, run="m", steps=(10, 20, 30, 40))
        cli = ["--run", "m", "--last", "3", "--method", "mwa", "--metric", "train_loss", "--penalty", "0.7"]
        yml = ("inputs: {run: m, last: 3}\nmethod: mwa\n"
               "weighting: {metric: train_loss, penalty: 0.7}\n")
    else:
        make_full_run(tmp_path, run="m", steps=(100, 200, 300, 400))
        if case == "ties_selection":
            cli = ["--run", "m", "--last", "3", "--method", "ties", "--base", "m@100", "--density", "0.5"]
            yml = "inputs: {run: m, last: 3}\nmethod: ties\nbase: m@100\nparameters:\n  density: 0.5\n"
        else:
            cli = ["m@300", "m@400", "--method", "dare_ties", "--base", "first", "--density", "0.6", "--seed", "7",
                   "--lambda", "0.9"]
            yml = ("inputs: [m@300, m@400]\nmethod: dare_ties\nbase: first\n"
                   "parameters: {density: 0.6, seed: 7, lambda: 0.9}\n")
    run = _cli(tmp_path / "reg.duckdb")
    run("merge", *cli, "-o", tmp_path / "a", "--name", "a")
    (tmp_path / "r.yaml").write_text(yml + f"output: {tmp_path / 'b'}\nname: b\n")
    res = run("merge", "--recipe", tmp_path / "r.yaml")
    assert "\tb" in res.output
    a, b = _tensor_bytes(tmp_path / "a"), _tensor_bytes(tmp_path / "b")
    assert a.keys() == b.keys() and a == b


def test_recipe_cli_errors(tmp_path):
    from helpers_engine import make_full_run

    make_full_run(tmp_path, run="m", steps=(100, 200, 300))
    run = _cli(tmp_path / "reg.duckdb")
    (tmp_path / "r.yaml").write_text("inputs: [m@200, m@300]\nmethod: ties\nbase: m@100\nparameters: {density: 2}\n")
    res = run("merge", "--recipe", tmp_path / "r.yaml", code=ParameterError.exit_code)
    assert f"recipe {tmp_path / 'r.yaml'}: parameters.density: 2 is out of range" in res.output
    res = run("merge", "--recipe", tmp_path / "r.yaml", "--density", "0.5", code=UsageError.exit_code)
    assert "drop --density" in res.output
    (tmp_path / "r2.yaml").write_text("inputs: [m@200, m@9999]\nmethod: linear\n")
    res = run("merge", "--recipe", tmp_path / "r2.yaml", code=3)
    assert "m@9999" in res.output
    assert not (tmp_path / "m" / "ckpt_200-300_unweighted").exists()


def _engine_has_param_rules() -> bool:
    import dataclasses

    from ckptreg.engine import MergeSpec

    return "param_rules" in {f.name for f in dataclasses.fields(MergeSpec)}


@pytest.mark.skipif(not _engine_has_param_rules(), reason="the engine's MergeSpec has no param_rules hook")
def test_recipe_gradient_end_to_end_float64(tmp_path):
    """A linear merge whose weights vary by layer (a gradient over 3 layers) and by tensor (a
    filter): every output tensor against a float64 reference computed here by hand."""
    from safetensors.torch import load_file, save_file

    from ckptreg.registry import Registry
    import torch

    g = torch.Generator().manual_seed(0)
    reg = Registry(tmp_path / "reg.duckdb")
    names = [f"model.layers.{i}.{m}.weight" for i in range(3) for m in ("self_attn.q_proj", "mlp.up")]
    names.append("model.embed_tokens.weight")
    states = []
    for s in (1, 2):
        t = {n: torch.randn(4, 6, generator=g) for n in names}
        p = tmp_path / f"s{s}.safetensors"
        save_file(t, str(p))
        reg.add(p, run="g", step=s)
        states.append(t)
    (tmp_path / "r.yaml").write_text(
        "inputs: [g@1, g@2]\nmethod: linear\nparameters:\n  weight:\n"
        "    - filter: self_attn\n      value: [[1.0, 0.0], [0.0, 1.0]]\n"
        "    - value: [0.25, 0.75]\n"
        f"output: {tmp_path / 'o.safetensors'}\n")
    _cli(tmp_path / "reg.duckdb")("merge", "--recipe", tmp_path / "r.yaml")
    out = load_file(str(tmp_path / "o.safetensors"))
    for n in names:
        if "self_attn" in n:
            li = int(n.split(".")[2])
            w = [1.0 - li / 2.0, li / 2.0]      # layers 0, 1, 2 -> t = 0, 0.5, 1
        else:
            w = [0.25, 0.75]
        ref = w[0] * states[0][n].double() + w[1] * states[1][n].double()
        assert torch.allclose(out[n].double(), ref, rtol=1e-6, atol=1e-6), n

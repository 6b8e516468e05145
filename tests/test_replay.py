"""``ckptreg merge --replay REF [-o PATH]``: a registered merge re-run from its stored recipe
reproduces its output byte for byte (every method, and a delta-space LoRA merge), is registered
as the next version of the name, and a replay that differs is refused and removed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptreg.cli import main
from ckptreg.errors import ChangedError, UsageError
from ckptreg.registry import Registry
from helpers_engine import make_full_run, make_lora_run

METHOD_ARGS = {
    "linear": [],
    "uniform": [],
    "mwa": ["--metric", "train_loss", "--penalty", "0.7"],
    "task_arithmetic": ["--base", "first", "--lambda", "0.7"],
    "ties": ["--base", "first", "--density", "0.4", "--sign", "frequency"],
    "dare_linear": ["--base", "first", "--density", "0.5", "--seed", "3"],
    "dare_ties": ["--base", "first", "--density", "0.6", "--seed", "5"],
    "magnitude_prune": ["--base", "first", "--density", "0.3"],
    "slerp": ["--t", "0.3"],
    "cart": ["--rank-ratio", "0.5"],
}


def _cli(db):
    def run(*args, code=0):
        res = CliRunner().invoke(main, ["--db", str(db), *map(str, args)])
        assert res.exit_code == code, (args, res.exit_code, res.output, res.exception)
        return res
    return run


def _tensor_bytes(path) -> dict:
    """name -> (dtype, shape, raw bytes) of every tensor of a checkpoint (file or folder)."""
    from ckptreg import formats

    out = {}
    for n, t in formats.inspect(path).tensors.items():
        with open(t.file, "rb") as f:
            f.seek(t.offset)
            out[n] = (t.dtype, tuple(t.shape), f.read(t.nbytes))
    return out


@pytest.fixture
def full_run(tmp_path):
    make_full_run(tmp_path, run="m", steps=(100, 200, 300, 400))
    return tmp_path / "reg.duckdb"


@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_replay_every_method_is_identical(full_run, tmp_path, method):
    run = _cli(full_run)
    last = "2" if method == "slerp" else "3"
    res = run("merge", "--run", "m", "--last", last, "--method", method, *METHOD_ARGS[method],
              "-o", tmp_path / "orig", "--name", f"x_{method}", "--json")
    orig = json.loads(res.output)
    res = run("merge", "--replay", f"m@x_{method}", "-o", tmp_path / "again")
    assert f"replayed m@x_{method}: identical" in res.output.splitlines()
    a, b = _tensor_bytes(tmp_path / "orig"), _tensor_bytes(tmp_path / "again")
    assert a.keys() == b.keys() and a == b
    reg = Registry(full_run)
    # the replay is the next version of the name; :v1 is still the original
    assert reg.get(f"m@x_{method}:v1").id == orig["id"]
    new = reg.get(f"m@x_{method}")
    assert new.id != orig["id"] and Path(new.path) == (tmp_path / "again").resolve()
    lin_a, lin_b = reg.lineage(orig["id"]), reg.lineage(new.id)
    assert lin_a["method"] == lin_b["method"] and lin_a["inputs"] == lin_b["inputs"] and lin_a["base"] == lin_b["base"]


def test_replay_delta_space_lora(tmp_path):
    make_lora_run(tmp_path, run="sft", steps=(10, 20, 30, 40))
    db = tmp_path / "reg.duckdb"
    run = _cli(db)
    run("merge", "--run", "sft", "--last", "3", "--method", "task_arithmetic", "--base", "first", "--space", "delta",
        "--rank", "3", "-o", tmp_path / "d", "--name", "d")
    run("merge", "--replay", "sft@d", "-o", tmp_path / "d2")
    assert _tensor_bytes(tmp_path / "d") == _tensor_bytes(tmp_path / "d2")
    cfg = json.loads((tmp_path / "d2" / "adapter_config.json").read_text())
    assert cfg["r"] == 3


def test_replay_default_path_and_twice(full_run, tmp_path):
    """Without -o the replay goes beside the original as NAME-replay; a second replay there
    recomputes it (never a silent 'up to date')."""
    run = _cli(full_run)
    run("merge", "--run", "m", "--last", "2", "--method", "linear", "-o", tmp_path / "o", "--name", "o")
    run("merge", "--replay", "m@o:v1")
    assert (tmp_path / "o-replay" / "model.safetensors").is_file()
    res = run("merge", "--replay", "m@o:v1")
    assert "identical" in res.output
    assert _tensor_bytes(tmp_path / "o") == _tensor_bytes(tmp_path / "o-replay")


def test_replay_that_differs_is_refused_and_removed(full_run, tmp_path):
    """An input rewritten in place with other bytes of the same layout and re-registered: the
    replay sees the new fingerprint and refuses before writing anything."""
    run = _cli(full_run)
    run("merge", "--run", "m", "--last", "2", "--method", "linear", "-o", tmp_path / "o", "--name", "o")
    reg = Registry(full_run)
    inp = reg.get("m@400")
    import torch
    from safetensors.torch import load_file, save_file

    f = Path(inp.path) / "model.safetensors"
    t = load_file(str(f))
    t = {k: v + 1 for k, v in t.items()}
    save_file(t, str(f), metadata={"format": "pt"})
    reg.add(inp.path, run="m", step=400, replace=True)
    res = run("merge", "--replay", "m@o", "-o", tmp_path / "r", code=ChangedError.exit_code)
    assert "cannot replay m@o: its input m@400" in res.output and "re-registered" in res.output
    assert not (tmp_path / "r").exists()
    _ = torch


def test_replay_refuses_plain_and_mixed_options(full_run, tmp_path):
    run = _cli(full_run)
    res = run("merge", "--replay", "m@100", code=UsageError.exit_code)
    assert "m@100 is a plain checkpoint, not the output of a merge" in res.output
    run("merge", "--run", "m", "--last", "2", "-o", tmp_path / "o", "--name", "o")
    res = run("merge", "--replay", "m@o", "--density", "0.5", code=UsageError.exit_code)
    assert "--replay REF re-runs the stored recipe" in res.output and "drop --density" in res.output


# ------------------------------------------------------------------------------------------------
# the model card

def test_model_card_in_every_output_folder(full_run, tmp_path):
    """README.md in the output folder: method, parameters, inputs (refs) with weights and
    fingerprints, base, ckptreg version, the --replay line and a recipe that reproduces it; it is
    listed in ckptreg_files, so --overwrite still takes the folder as ckptreg's own."""
    import ckptreg
    from ckptreg.safetensors_io import read_header

    run = _cli(full_run)
    run("merge", "--run", "m", "--last", "3", "--method", "ties", "--base", "first", "--density", "0.4",
        "-o", tmp_path / "o", "--name", "card")
    card = (tmp_path / "o" / "README.md").read_text()
    reg = Registry(full_run)
    c = reg.get("m@card")
    lin = reg.lineage(c)
    assert "# card" in card and "`ties`" in card and "| density | 0.4 |" in card
    for i in lin["inputs"]:
        x = reg.get(i["id"])
        assert f"`{x.ref}`" in card and x.fingerprint in card and repr(float(i["weight"])) in card
    base = reg.get(lin["base"])
    assert f"`{base.ref}` (id {base.id}, fingerprint `{base.fingerprint}`)" in card
    assert f"ckptreg {ckptreg.__version__}" in card
    assert "ckptreg merge --replay m@card -o card-replay" in card
    md = read_header(tmp_path / "o" / "model.safetensors").metadata
    assert "README.md" in json.loads(md["ckptreg_files"])
    run("merge", "--run", "m", "--last", "3", "--method", "ties", "--base", "first", "--density", "0.4",
        "-o", tmp_path / "o", "--name", "card", "--overwrite")
    assert (tmp_path / "o" / "README.md").is_file()
    # the recipe in the card reproduces the merge
    yml = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "from_card.yaml").write_text(yml)
    run("merge", "--recipe", tmp_path / "from_card.yaml", "-o", tmp_path / "o2", "--name", "card2")
    assert _tensor_bytes(tmp_path / "o") == _tensor_bytes(tmp_path / "o2")


def test_no_card_beside_a_single_file_output(tmp_path):
    """A single .safetensors output has no folder: no README.md is written next to it (the recipe
    stays in its metadata, where --replay reads it)."""
    from safetensors.torch import save_file

    from helpers_files import random_full_state

    reg = Registry(tmp_path / "reg.duckdb")
    (tmp_path / "in").mkdir()
    for s in (1, 2):
        p = tmp_path / "in" / f"s{s}.safetensors"
        save_file(random_full_state(s), str(p))
        reg.add(p, run="f", step=s)
    run = _cli(tmp_path / "reg.duckdb")
    (tmp_path / "out").mkdir()
    run("merge", "f@1", "f@2", "-o", tmp_path / "out" / "m.safetensors", "--name", "m")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.safetensors"]
    run("merge", "--replay", "f@m")
    assert _tensor_bytes(tmp_path / "out" / "m.safetensors") == _tensor_bytes(tmp_path / "out" / "m-replay.safetensors")


def test_card_replaces_an_input_readme(tmp_path):
    """An HF input folder's own README.md (the input model's card) is not copied as the merge's
    card: the output's README.md is ckptreg's."""
    make_full_run(tmp_path, run="m", steps=(100, 200))
    for s in (100, 200):
        (tmp_path / "m" / f"checkpoint-{s}" / "README.md").write_text("# the base model's card\n")
    run = _cli(tmp_path / "reg.duckdb")
    run("merge", "--run", "m", "--last", "2", "-o", tmp_path / "o", "--name", "o")
    card = (tmp_path / "o" / "README.md").read_text()
    assert card.startswith("# o\n") and "base model's card" not in card


def test_card_in_sweep_peft_and_sharded_outputs(tmp_path):
    """Every folder layout gets the card: each sweep output (PEFT adapters whose inputs carry
    their own README.md, which is not copied), and a folder of shards from single-file inputs;
    each lists README.md in ckptreg_files, and --overwrite replaces such a folder."""
    from safetensors.torch import save_file

    from ckptreg.safetensors_io import read_header
    from helpers_files import random_full_state

    make_lora_run(tmp_path, run="sft", steps=(10, 20, 30))
    for s in (10, 20, 30):
        (tmp_path / "sft" / f"checkpoint-{s}" / "README.md").write_text("# the adapter's own card\n")
    run = _cli(tmp_path / "reg.duckdb")
    res = run("sweep", "--run", "sft", "--last", "2,3", "--method", "uniform", "-o", tmp_path / "sw", "-q", "--json")
    rows = json.loads(res.output)
    assert len(rows) == 2
    for r in rows:
        card = (Path(r["path"]) / "README.md").read_text()
        assert card.startswith(f"# {r['name']}\n") and "adapter's own card" not in card
        assert f"ckptreg merge --replay sft@{r['name']} -o {r['name']}-replay" in card
        md = read_header(Path(r["path"]) / "adapter_model.safetensors").metadata
        assert "README.md" in json.loads(md["ckptreg_files"])
    run("sweep", "--run", "sft", "--last", "2,3", "--method", "uniform", "-o", tmp_path / "sw", "-q", "--overwrite")

    reg = Registry(tmp_path / "reg.duckdb")
    (tmp_path / "in").mkdir()
    for s in (1, 2):
        p = tmp_path / "in" / f"s{s}.safetensors"
        save_file(random_full_state(s), str(p))
        reg.add(p, run="f", step=s)
    run("merge", "f@1", "f@2", "-o", tmp_path / "sh", "--name", "sh", "--out-shard-size", "1000")
    files = sorted(p.name for p in (tmp_path / "sh").iterdir())
    assert "README.md" in files and "model.safetensors.index.json" in files
    assert (tmp_path / "sh" / "README.md").read_text().startswith("# sh\n")
    md = read_header(next((tmp_path / "sh").glob("model-*.safetensors"))).metadata
    assert sorted(json.loads(md["ckptreg_files"])) == files
    # a different merge under the same name and path: --overwrite must take the folder as ckptreg's
    run("merge", "f@1", "f@2", "-o", tmp_path / "sh", "--name", "sh", "--out-shard-size", "1000",
        "--method", "slerp", "--t", "0.3", "--overwrite")
    assert "`slerp`" in (tmp_path / "sh" / "README.md").read_text()


def _engine_has_param_rules() -> bool:
    import dataclasses

    from ckptreg.engine import MergeSpec

    return "param_rules" in {f.name for f in dataclasses.fields(MergeSpec)}


@pytest.mark.skipif(not _engine_has_param_rules(), reason="the engine's MergeSpec has no param_rules hook")
def test_replay_of_a_recipe_with_rules_and_gradients(full_run, tmp_path):
    run = _cli(full_run)
    (tmp_path / "r.yaml").write_text(
        "inputs: [m@200, m@300, m@400]\nmethod: ties\nbase: m@100\nparameters:\n"
        "  density: [{filter: up_proj, value: [0.2, 0.9]}, {value: 0.5}]\n"
        "  weight: [[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]\n"
        f"output: {tmp_path / 'o'}\nname: g\n")
    run("merge", "--recipe", tmp_path / "r.yaml")
    res = run("merge", "--replay", "m@g", "-o", tmp_path / "o2")
    assert "replayed m@g: identical" in res.output
    assert _tensor_bytes(tmp_path / "o") == _tensor_bytes(tmp_path / "o2")

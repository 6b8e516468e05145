"""Retention (issue #10 item 2): `ckptreg gc` / Registry.gc policies against hand-computed sets,
protection of the final checkpoint, aliases, `keep` tags and merge inputs/bases, deletion of
registered files only (never an unregistered file, never one outside the checkpoint's folder),
and `retention=` in a real HF Trainer run. Real files, real DuckDB, the CLI in-process."""
from __future__ import annotations

import json
import math
import os

import pytest
from click.testing import CliRunner
from helpers_files import write_peft_adapter

from ckptreg.cli import main
from ckptreg.errors import NotFoundError, UsageError

STEPS = list(range(10, 101, 10))
LOSS = {10: 0.90, 20: 0.50, 30: 0.70, 40: 0.30, 50: 0.65, 60: 0.35, 70: 0.80, 80: 0.60,
        90: float("nan"), 100: 0.95}


def _cli(db, *args):
    return CliRunner().invoke(main, ["--db", str(db), *map(str, args)])


@pytest.fixture
def run(tmp_path, registry):
    """Run r: checkpoint-10..100 (distinct adapters) with the losses of LOSS."""
    for s in STEPS:
        write_peft_adapter(tmp_path / "r" / f"checkpoint-{s}", s)
        registry.add(tmp_path / "r" / f"checkpoint-{s}", "r", metrics={"loss": LOSS[s]})
    return registry


def _plan(db, *args):
    r = _cli(db, "gc", "--run", "r", "--json", *args)
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    return {d["step"] for d in got["delete"]}, {k["step"] for k in got["keep"]}, got


@pytest.mark.parametrize("args, keep", [
    (["--keep-last", 3], {80, 90, 100}),
    (["--keep-every", 30], {30, 60, 90, 100}),                       # multiples of 30 + final
    (["--keep-best", 3, "--metric", "loss"], {40, 60, 20, 100}),     # NaN (90) is never best
    (["--keep-best", 2, "--metric", "loss", "--direction", "max"], {100, 10}),
    (["--keep-best", 1, "--metric", "loss", "--keep-last", 2, "--keep-every", 50], {40, 90, 100, 50}),
])
def test_policies_dry_run_against_hand_computed_sets(run, args, keep):
    before = repr(run.dump())  # (repr: NaN metrics compare equal)
    delete, kept, got = _plan(run.path, *args)
    assert kept == keep and delete == set(STEPS) - keep
    assert got["dry_run"] is True
    assert got["bytes_freed"] == sum(os.path.getsize(os.path.join(run.get(f"r@{s}").path,
                                                                  "adapter_model.safetensors")) for s in delete)
    assert repr(run.dump()) == before  # a dry run changes nothing
    assert all(os.path.isdir(run.get(f"r@{s}").path) for s in STEPS)
    table = _cli(run.path, "gc", "--run", "r", *args).output
    assert "dry run" in table and f"would remove {len(delete)} checkpoint(s)" in table


def test_final_alias_keep_tag_and_merge_inputs_are_protected(tmp_path, run):
    out = write_peft_adapter(tmp_path / "merged", 999)
    run.record_merge(path=out, run="r", name="avg", method="task_arithmetic", params={},
                     inputs=[("r@10", 0.5), ("r@30", 0.5)], base="r@70")
    run.add(write_peft_adapter(tmp_path / "r" / "checkpoint-55", 55), "r", tags={"keep": ""})
    run.alias("r@20", "prod")
    delete, kept, got = _plan(run.path, "--keep-best", 1, "--metric", "loss")
    assert kept == {10, 20, 30, 40, 55, 70, 100}
    assert delete == {50, 60, 80, 90}
    why = {k["step"]: k["reasons"] for k in got["keep"]}
    assert why[10] == ["input of merge r@avg"] and why[70] == ["base of merge r@avg"]
    assert why[20] == ["alias r@prod"] and why[55] == ["tag keep"] and why[100] == ["final"]
    assert why[40] == ["best 1 by loss (min)"]
    # the merged checkpoint is never a gc candidate
    assert all(d["ref"] != "r@avg" for d in got["delete"])


def test_gc_yes_deletes_only_registered_files_inside_each_folder(tmp_path, run):
    import shutil

    # r@60: an unregistered file in its folder; r@80: its tensor file is a link to a file elsewhere
    stray = tmp_path / "r" / "checkpoint-60" / "optimizer.pt"
    stray.write_bytes(b"written by the trainer, not registered")
    elsewhere = write_peft_adapter(tmp_path / "elsewhere", 8080) / "adapter_model.safetensors"
    c80 = tmp_path / "r" / "checkpoint-80x"
    c80.mkdir()
    shutil.copy(elsewhere.parent / "adapter_config.json", c80)
    os.symlink(elsewhere, c80 / "adapter_model.safetensors")
    run.add(c80, "r", step=105, metrics={"loss": 0.99})
    outside_before = elsewhere.read_bytes()
    delete, kept, plan = _plan(run.path, "--keep-last", 2)
    assert delete == set(STEPS[:-1]), delete
    r = _cli(run.path, "gc", "--run", "r", "--keep-last", 2, "--yes", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert {d["step"] for d in res["delete"]} == delete and res["dry_run"] is False
    assert [c.step for c in run.checkpoints("r")] == [100, 105]
    for s in delete - {60}:
        assert not (tmp_path / "r" / f"checkpoint-{s}").exists(), s   # emptied: folder removed too
    assert sorted(os.listdir(tmp_path / "r" / "checkpoint-60")) == ["optimizer.pt"]
    assert stray.read_bytes() == b"written by the trainer, not registered"
    # r@105 was kept (last 2, final); removing it with its files leaves the linked file alone
    r = _cli(run.path, "rm", "--delete-files", "r@105")
    assert r.exit_code == 0, r.output
    assert elsewhere.read_bytes() == outside_before and "outside the checkpoint's folder" in r.output
    ev = run.sql("SELECT ref FROM events WHERE op = 'gc' ORDER BY seq")[1]
    assert sorted(int(e[0].split("@")[1]) for e in ev) == sorted(delete)
    # gc again: nothing left to do
    delete, kept, _ = _plan(run.path, "--keep-last", 2)
    assert delete == set() and kept == {100}


def test_gc_usage_errors(run):
    before = repr(run.dump())  # (repr: NaN metrics compare equal)
    for args, code, msg in [
        ([], UsageError.exit_code, "no retention policy"),
        (["--keep-best", 2], UsageError.exit_code, "needs a metric"),
        (["--metric", "loss", "--keep-last", 1], UsageError.exit_code, "without keep_best"),
        (["--keep-last", 0], UsageError.exit_code, "keep_last must be an integer >= 1"),
    ]:
        r = _cli(run.path, "gc", "--run", "r", *args, "--yes")
        assert r.exit_code == code and msg in r.output, (args, r.output)
    r = _cli(run.path, "gc", "--run", "rr", "--keep-last", 1, "--yes")
    assert r.exit_code == NotFoundError.exit_code and "'rr'" in r.output and "closest runs: r" in r.output
    assert repr(run.dump()) == before


# ----------------------------------------------------------------------------- HF Trainer

transformers = pytest.importorskip("transformers")


def _tiny_gpt2():
    import torch

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _tokens(n, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, 64, (n, 1), generator=g) + torch.arange(16)) % 64
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


@pytest.mark.parametrize("metric, direction", [("eval_loss", "min"), ("train_loss", "max")])
def test_hf_trainer_retention_keeps_best_k(tmp_path, metric, direction):
    """retention= applied after each save keeps the best 2 by the metric plus the newest; with
    direction max (the worst losses: the earliest steps here) what is kept is not the newest."""
    from ckptreg.integrations.hf import CkptregCallback
    from ckptreg.registry import Registry

    db, out = tmp_path / "reg.duckdb", tmp_path / "out"
    cb = CkptregCallback(run="t", db=db, strict=True, retention={"keep_best": 2, "metric": metric,
                                                                "direction": direction})
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=10, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=2e-2, logging_steps=1, save_steps=2, eval_strategy="steps", eval_steps=2,
        report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    transformers.Trainer(model=_tiny_gpt2(), args=args, train_dataset=_tokens(48, 0),
                         eval_dataset=_tokens(8, 1), callbacks=[cb]).train()
    assert cb.errors == []
    reg = Registry(db)
    # every save's value of the metric: kept checkpoints have it, pruned ones are in the gc events
    value = {c.step: c.metrics[metric] for c in reg.checkpoints("t")}
    for ref, detail in reg.sql("SELECT ref, detail FROM events WHERE op = 'gc'")[1]:
        value[int(ref.split("@")[1])] = json.loads(detail)["metrics"][metric]
    assert sorted(value) == [2, 4, 6, 8, 10] and not any(math.isnan(v) for v in value.values())
    best = sorted(value, key=lambda s: (value[s] if direction == "min" else -value[s], -s))[:2]
    expect = set(best) | {10}
    if direction == "max":
        assert expect != {6, 8, 10}, value  # not what save_total_limit would have kept
    assert {c.step for c in reg.checkpoints("t")} == expect
    for s in (2, 4, 6, 8, 10):
        folder = out / f"checkpoint-{s}"
        assert (folder / "model.safetensors").exists() == (s in expect), s
        assert (folder / "optimizer.pt").exists()  # the trainer's own files are not ckptreg's to delete

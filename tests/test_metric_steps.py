"""Metrics at their step (issue #10 item 4): every value records the step it was logged at; the HF
callback and `ckptreg scan` attach to a checkpoint only the train loss logged since the previous
save, with its step. Real files, real DuckDB, a real HF Trainer, the CLI in-process."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from filelock import FileLock
from helpers_files import write_peft_adapter

from ckptreg.cli import main
from ckptreg.errors import UsageError
from ckptreg.registry import Registry


def _show(db, ref):
    r = CliRunner().invoke(main, ["--db", str(db), "show", ref, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_add_and_log_record_each_values_step(tmp_path, db_path):
    reg = Registry(db_path)
    p = write_peft_adapter(tmp_path / "checkpoint-10", 1)
    reg.add(p, "r", metrics={"train_loss": 1.5, "acc": 0.25}, metric_steps={"train_loss": 7})
    c = reg.get("r@10")
    assert c.metric_steps == {"train_loss": 7, "acc": 10}   # unnamed ones: the checkpoint's step
    reg.log("r@10", {"eval_loss": 2.0})
    assert reg.get("r@10").metric_steps == {"train_loss": 7, "acc": 10, "eval_loss": 10}
    reg.log("r@10", {"train_loss": 1.25}, step=9)            # a newer value replaces value and step
    c = reg.get("r@10")
    assert c.metrics["train_loss"] == 1.25 and c.metric_steps["train_loss"] == 9
    d = _show(db_path, "r@10")
    assert d["metric_steps"] == {"train_loss": 9, "acc": 10, "eval_loss": 10}
    assert d["metrics"]["train_loss"] == 1.25
    txt = CliRunner().invoke(main, ["--db", str(db_path), "show", "r@10"]).output
    assert "1.25 (logged at step 9)" in txt and "(logged at step 10)" not in txt
    # listings carry them too
    r = CliRunner().invoke(main, ["--db", str(db_path), "ls", "--json"])
    assert json.loads(r.output)[0]["metric_steps"]["train_loss"] == 9
    # a step for a metric that was not given is a usage error, nothing is stored
    with pytest.raises(UsageError, match="'loss'.*not one of the metrics"):
        reg.add(write_peft_adapter(tmp_path / "checkpoint-20", 2), "r", metrics={"acc": 1.0},
                metric_steps={"loss": 3})
    with pytest.raises(UsageError, match="step must be an integer"):
        reg.add(write_peft_adapter(tmp_path / "checkpoint-30", 3), "r", metrics={"acc": 1.0},
                metric_steps={"acc": -1})
    assert [c.step for c in reg.checkpoints("r")] == [10]


def test_spooled_add_keeps_metric_steps(tmp_path, db_path):
    Registry(db_path).checkpoints()
    p = write_peft_adapter(tmp_path / "checkpoint-10", 1)
    busy = Registry(db_path, lock_timeout=0.2)
    with FileLock(str(busy.path) + ".lock"):
        assert busy.add(p, "r", metrics={"train_loss": 0.5}, metric_steps={"train_loss": 7}) is None
    c = Registry(db_path).get("r@10")
    assert c.metrics == {"train_loss": 0.5} and c.metric_steps == {"train_loss": 7}


def test_weights_says_when_a_score_is_older_than_its_checkpoint(tmp_path, db_path):
    reg = Registry(db_path)
    for s, loss, at in ((10, 1.0, 7), (20, 0.8, 20), (30, 0.6, 28)):
        reg.add(write_peft_adapter(tmp_path / f"checkpoint-{s}", s), "r", metrics={"train_loss": loss},
                metric_steps={"train_loss": at})
    c = reg.get("r@10")
    assert (c.metric_lag("train_loss"), reg.get("r@20").metric_lag("train_loss"), c.metric_lag("nope")) == (3, 0, None)
    r = CliRunner().invoke(main, ["--db", str(db_path), "weights", "--run", "r", "--last", "3",
                                  "--metric", "train_loss", "--penalty", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)) == 3                 # the JSON on stdout is unchanged
    assert "note: train_loss of r@10 was logged at step 7, 3 step(s) before the checkpoint" in r.stderr
    assert "r@30 was logged at step 28, 2 step(s)" in r.stderr and "r@20" not in r.stderr


# ------------------------------------------------------------------ the shared log_history parser

def test_metrics_for_save_window():
    from ckptreg.integrations.hf_state import metrics_for_save, previous_save

    hist = [{"step": 7, "loss": 1.0}, {"step": 10, "eval_loss": 3.0, "eval_runtime": 0.1},
            {"step": 14, "loss": 0.5}, {"step": 20, "train_loss": 0.7, "train_runtime": 1.0}]
    assert metrics_for_save(hist, 10, None) == ({"train_loss": 1.0, "eval_loss": 3.0},
                                                {"train_loss": 7, "eval_loss": 10})
    assert metrics_for_save(hist, 15, 10) == ({"train_loss": 0.5}, {"train_loss": 14})
    assert metrics_for_save(hist, 20, 15) == ({}, {})        # nothing logged since the save at 15
    assert metrics_for_save(hist, 5, None) == ({}, {})
    assert previous_save(20, [5, 10], 5) == 15 and previous_save(20, [10], None) == 10
    assert previous_save(5, [], 5) is None and previous_save(23, [], 5) == 20


# ------------------------------------------------------------------ a real HF Trainer

transformers = pytest.importorskip("transformers")


def _trainer(out, cb, max_steps, save_steps, logging_steps):
    from test_integrations import TokenDataset, _tiny_gpt2

    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=5e-3,
        logging_steps=logging_steps, save_steps=save_steps, eval_strategy="no", report_to=[],
        use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, save_only_model=True)
    return transformers.Trainer(model=_tiny_gpt2(), args=args, train_dataset=TokenDataset(48),
                                callbacks=[cb] if cb else [])


def _losses(out):
    hist = json.loads((out / "trainer_state.json").read_text())["log_history"] if (
        out / "trainer_state.json").exists() else None
    if hist is None:
        last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        hist = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in hist if "loss" in e}


def test_hf_logging_7_save_10_and_scan(tmp_path):
    """logging_steps=7, save_steps=5, max_steps=20: saves at 5, 10, 15, 20, losses logged at 7
    and 14. @5 has no loss yet, @10 holds step 7's (and says 7), @15 step 14's, @20 none (the
    last loss, step 14, was logged before the save at 15). `scan` of the folder agrees."""
    from ckptreg.integrations.hf import CkptregCallback

    db = tmp_path / "reg.duckdb"
    out = tmp_path / "out"
    cb = CkptregCallback(run="l7", db=db, strict=True)
    _trainer(out, cb, 20, 5, 7).train()
    loss = _losses(out)
    assert sorted(loss) == [7, 14]
    reg = Registry(db)
    got = {c.step: (c.metrics, c.metric_steps) for c in reg.checkpoints("l7")}
    assert got == {5: ({}, {}),
                   10: ({"train_loss": loss[7]}, {"train_loss": 7}),
                   15: ({"train_loss": loss[14]}, {"train_loss": 14}),
                   20: ({}, {})}
    assert _show(db, "l7@10")["metric_steps"] == {"train_loss": 7}
    assert cb.results() == {s: {"status": "registered", "id": reg.get(f"l7@{s}").id} for s in (5, 10, 15, 20)}
    # `ckptreg scan` of the same folder, one parser: the same values with the same steps
    db2 = tmp_path / "scan.duckdb"
    r = CliRunner().invoke(main, ["--db", str(db2), "scan", str(out), "--run", "l7", "--json"])
    assert r.exit_code == 0, r.output
    rows = {a["step"]: a for a in json.loads(r.output)["added"]}
    assert rows[10]["metric_steps"] == {"train_loss": 7} and rows[10]["train_loss"] == loss[7]
    scanned = {c.step: (c.metrics, c.metric_steps) for c in Registry(db2).checkpoints("l7")}
    assert scanned == got


def test_scan_counts_saves_deleted_by_save_total_limit(tmp_path):
    """save_total_limit=1 leaves only checkpoint-20; trainer_state.json's save_steps (5) still
    says a save happened at 15, so step 14's loss is not attached to 20."""
    from ckptreg.integrations.hf import CkptregCallback

    out = tmp_path / "out"
    cb = CkptregCallback(run="lim", db=tmp_path / "cb.duckdb", strict=True)
    tr = _trainer(out, cb, 20, 5, 7)
    tr.args.save_total_limit = 1
    tr.train()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-20"]
    assert Registry(tmp_path / "cb.duckdb").get("lim@15").metric_steps == {"train_loss": 14}
    db2 = tmp_path / "scan.duckdb"
    r = CliRunner().invoke(main, ["--db", str(db2), "scan", str(out), "--run", "lim"])
    assert r.exit_code == 0, r.output
    c = Registry(db2).get("lim@20")
    assert c.metrics == {} and c.metric_steps == {}

"""Usage errors say so: an unknown run, sort metric or score metric is an error naming the closest
names (NotFoundError, exit 3), not an empty table and exit 0; add and log confirm what they did
(--json too); a folder that is not a checkpoint is reported as such before its missing step."""
from __future__ import annotations

import json

import filelock
import pytest
from click.testing import CliRunner

from ckptreg.cli import main
from ckptreg.errors import FormatError, NotFoundError
from ckptreg.registry import Registry
from helpers_files import write_peft_adapter


@pytest.fixture
def cli(db_path):
    def run(*args, code=0, env=None):
        res = CliRunner().invoke(main, ["--db", str(db_path), *map(str, args)], env=env)
        assert res.exit_code == code, (args, res.exit_code, res.output, res.exception)
        return res
    return run


@pytest.fixture
def filled(db_path, tmp_path):
    reg = Registry(db_path)
    for s in (10, 20, 30):
        reg.add(write_peft_adapter(tmp_path / "train-a" / f"checkpoint-{s}", s), "train-a",
                metrics={"eval_loss": 1.0 / s, "gsm8k": s / 100})
    reg.add(write_peft_adapter(tmp_path / "other" / "checkpoint-5", 5), "other", metrics={"gsm8k": 0.1})
    return reg


def test_ls_unknown_run_names_the_closest(cli, filled):
    before = filled.dump()
    res = cli("ls", "--run", "train-b", code=NotFoundError.exit_code)
    assert "error: no run 'train-b'; closest: train-a" in res.stderr
    assert res.stdout == ""
    res = cli("ls", "--run", "zzzzzz", "--json", code=NotFoundError.exit_code)
    assert "no run 'zzzzzz'" in res.stderr and "runs: other, train-a" in res.stderr
    assert filled.dump() == before
    with pytest.raises(NotFoundError, match="closest: train-a"):
        filled.ls(run="train_a")
    assert [c.step for c in filled.ls(run="train-a")] == [10, 20, 30]


def test_ls_unknown_sort_metric_names_the_closest(cli, filled):
    res = cli("ls", "--sort", "eval_los", code=NotFoundError.exit_code)
    assert "no metric 'eval_los'" in res.stderr and "closest: eval_loss" in res.stderr
    assert "metrics logged: eval_loss, gsm8k" in res.stderr
    # a metric some of the listed checkpoints have is a sort (missing ones last), not an error
    got = json.loads(cli("ls", "--sort", "eval_loss", "--json").stdout)
    assert [d["ref"] for d in got] == ["train-a@30", "train-a@20", "train-a@10", "other@5"]
    # ... but only the listed ones count
    res = cli("ls", "--run", "other", "--sort", "eval_loss", code=NotFoundError.exit_code)
    assert "no metric 'eval_loss'" in res.stderr


def test_leaderboard_unknown_score_metric_names_the_closest(cli, filled):
    res = cli("leaderboard", "--run", "train-a", "--score", "gsm8K", code=NotFoundError.exit_code)
    assert "score metric 'gsm8K' not logged for any checkpoint of run 'train-a'" in res.stderr
    assert "closest gsm8k" in res.stderr
    res = cli("leaderboard", "--run", "train-a", "--score", "gsm8k=0.5,nosuch=0.5", code=NotFoundError.exit_code)
    assert "'nosuch'" in res.stderr and "metrics logged: eval_loss, gsm8k" in res.stderr
    res = cli("leaderboard", "--run", "train-b", "--score", "gsm8k", code=NotFoundError.exit_code)
    assert "closest runs: train-a" in res.stderr
    rows = json.loads(cli("leaderboard", "--run", "train-a", "--score", "gsm8k", "--json").stdout)
    assert [r["ref"] for r in rows] == ["train-a@30", "train-a@20", "train-a@10"]


def test_add_and_log_confirm_what_they_did(cli, db_path, tmp_path):
    p = write_peft_adapter(tmp_path / "checkpoint-10", 1)
    res = cli("add", p, "--run", "r", "--metric", "loss=0.5", "--tag", "lr=1e-4")
    assert res.stdout.strip() == "1"                     # scripts: $(ckptreg add ...) is the id
    assert res.stderr.strip() == "added r@10 (id 1): peft lora, 8 tensors, 8192 bytes; metrics loss=0.5; tags lr=1e-4"
    d = json.loads(cli("add", write_peft_adapter(tmp_path / "checkpoint-20", 2), "--run", "r", "--json").stdout)
    assert d["id"] == 2 and d["ref"] == "r@20" and d["status"] == "added" and d["n_tensors"] == 8
    res = cli("log", "r@10", "acc=0.75", "loss=0.25")
    assert res.stderr.strip() == "logged acc=0.75, loss=0.25 to r@10 (id 1)"
    d = json.loads(cli("log", "r@latest", "acc=0.5", "--json").stdout)
    assert d == {"id": 2, "ref": "r@20", "status": "logged", "metrics": {"acc": 0.5}}
    assert Registry(db_path).get("r@10").metrics == {"loss": 0.25, "acc": 0.75}


def test_add_and_log_say_spooled_when_busy(cli, db_path, tmp_path):
    cli("add", write_peft_adapter(tmp_path / "checkpoint-1", 1), "--run", "r")
    lock = filelock.FileLock(str(db_path) + ".lock", is_singleton=False)
    lock.acquire()
    try:
        env = {"CKPTREG_LOCK_TIMEOUT": "0.2"}
        res = cli("log", "r@1", "loss=1", env=env)
        assert res.stderr.startswith("spooled: database busy; loss=1 for r@1")
        d = json.loads(cli("log", "r@1", "acc=1", "--json", env=env).stdout)
        assert d["status"] == "spooled" and d["id"] is None
        d = json.loads(cli("add", write_peft_adapter(tmp_path / "checkpoint-2", 2), "--run", "r", "--json",
                           env=env).stdout)
        assert d["status"] == "spooled" and d["id"] is None and d["ref"] == "r@2"
    finally:
        lock.release()
    c = Registry(db_path).get("r@1")
    assert c.metrics == {"loss": 1.0, "acc": 1.0}
    assert Registry(db_path).get("r@2").step == 2


def test_non_checkpoint_folder_is_reported_before_its_step(cli, db_path, tmp_path):
    d = tmp_path / "notes"                                # no step in the name, not a checkpoint
    d.mkdir()
    (d / "README.txt").write_text("hello")
    res = cli("add", d, "--run", "r", code=FormatError.exit_code)
    assert "not a checkpoint folder" in res.stderr and "step required" not in res.stderr
    assert not db_path.exists() or Registry(db_path).checkpoints() == []

"""Registry CLI, in-process through click's CliRunner."""
from __future__ import annotations

import json

import filelock
import pytest
from click.testing import CliRunner

from ckptreg.cli import main
from ckptreg.errors import FormatError
from ckptreg.registry import SCHEMA_VERSION, Registry
from helpers_files import raw_safetensors, write_peft_adapter


@pytest.fixture
def cli(db_path):
    runner = CliRunner()

    def run(*args, env=None):
        return runner.invoke(main, ["--db", str(db_path), *map(str, args)], env=env, catch_exceptions=False)

    return run


def _trainer_output(root, steps, with_state=True):
    """An HF Trainer output folder: checkpoint-N adapters and trainer_state.json files."""
    history = []
    for s in range(5, max(steps) + 1, 5):
        history.append({"step": s, "epoch": s / 100, "loss": 1.0 / s, "learning_rate": 1e-4})
    for s in steps:
        history.append({"step": s, "epoch": s / 100, "eval_loss": 2.0 / s, "eval_acc": s / 100,
                        "eval_runtime": 1.5, "eval_samples_per_second": 9.0})
    history.sort(key=lambda e: e["step"])
    for s in steps:
        d = write_peft_adapter(root / f"checkpoint-{s}", s)
        if with_state:
            h = [e for e in history if e["step"] <= s]
            (d / "trainer_state.json").write_text(json.dumps({"global_step": s, "log_history": h}))
    return root


def test_add_prints_id_and_ls_show(cli, db_path, tmp_path):
    p = write_peft_adapter(tmp_path / "out" / "checkpoint-10", 1)
    r = cli("add", p, "--run", "r", "--metric", "loss=0.5", "--metric", "acc=nan", "--tag", "lr=1e-4")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "1"
    r = cli("add", write_peft_adapter(tmp_path / "x", 2), "--run", "r", "--step", "20", "--metric", "loss=-inf")
    assert r.stdout.strip() == "2"
    r = cli("ls")
    assert r.exit_code == 0 and "r@10" in r.stdout and "r@20" in r.stdout
    assert "nan" in r.stdout and "-inf" in r.stdout
    data = json.loads(cli("ls", "--json").stdout)
    assert [d["ref"] for d in data] == ["r@10", "r@20"]
    assert data[0]["metrics"] == {"loss": 0.5, "acc": "nan"} and data[0]["tags"] == {"lr": "1e-4"}
    r = cli("show", "r@10")
    assert r.exit_code == 0
    for s in ("r@10", "peft", "lora", "acc", "nan", "inventory: 8 tensors", "adapter_model.safetensors"):
        assert s in r.stdout
    d = json.loads(cli("show", "1", "--json").stdout)
    assert d["inventory"]["tensors"] == 8 and d["lineage"] is None and d["metrics"]["acc"] == "nan"


def test_malformed_metric_is_usage_error(cli, db_path, tmp_path):
    p = write_peft_adapter(tmp_path / "checkpoint-1", 1)
    assert cli("add", p, "--run", "r").exit_code == 0
    before = Registry(db_path).dump()
    for bad in ["loss", "loss=", "=1", "loss=abc", "loss=1,5"]:
        r = cli("add", write_peft_adapter(tmp_path / "checkpoint-2", 2), "--run", "r", "--metric", bad)
        assert r.exit_code == 2, (bad, r.output)
        assert "--metric" in r.stderr and repr(bad) in r.stderr
    r = cli("log", "r@1", "loss")
    assert r.exit_code == 2 and "NAME=NUMBER" in r.stderr
    assert Registry(db_path).dump() == before
    assert cli("log", "r@1", "loss=nan", "acc=inf").exit_code == 0
    d = json.loads(cli("show", "r@1", "--json").stdout)
    assert d["metrics"] == {"acc": "inf", "loss": "nan"}


def test_errors_exit_nonzero_and_change_nothing(cli, db_path, tmp_path):
    p = write_peft_adapter(tmp_path / "checkpoint-1", 1)
    cli("add", p, "--run", "r")
    before = Registry(db_path).dump()
    bad = tmp_path / "step-3.safetensors"
    raw_safetensors(bad, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16)
    trunc = tmp_path / "step-4.safetensors"
    raw_safetensors(trunc, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 3)
    other = write_peft_adapter(tmp_path / "b" / "checkpoint-1", 2)  # other files at a registered step
    cases = [
        (("add", other, "--run", "r"), 4, "already registered"),
        (("add", tmp_path / "missing", "--run", "r", "--step", "2"), 3, "missing"),
        (("add", bad, "--run", "r"), FormatError.exit_code, "overlaps"),
        (("add", trunc, "--run", "r"), FormatError.exit_code, str(trunc)),
        (("show", "r@2"), 3, "r@1"),
        (("show", "rr@1"), 3, "closest runs: r"),
        (("log", "r@9", "loss=1"), 3, "r@9"),
        (("sql", "DELETE FROM metrics"), 16, "read-only"),
        (("best", "--run", "r", "--metric", "loss"), 3, "loss"),
    ]
    for args, code, msg in cases:
        r = cli(*args)
        assert r.exit_code == code, (args, r.output)
        assert r.stderr.startswith("error: ") and msg in r.stderr, (args, r.stderr)
    assert Registry(db_path).dump() == before


def test_runs_best_sql_verify_doctor(cli, db_path, tmp_path):
    for s, loss in [(10, 0.5), (20, float("nan")), (30, 0.2), (40, 0.3)]:
        cli("add", write_peft_adapter(tmp_path / f"checkpoint-{s}", s), "--run", "r", "--metric", f"loss={loss}")
    runs = json.loads(cli("runs", "--json").stdout)
    assert runs[0]["run"] == "r" and runs[0]["n"] == 4 and runs[0]["last_step"] == 40
    assert "r" in cli("runs").stdout
    assert json.loads(cli("best", "--run", "r", "--metric", "loss", "--json").stdout)["ref"] == "r@30"
    assert json.loads(cli("best", "--run", "r", "--metric", "loss", "--max", "--json").stdout)["ref"] == "r@10"
    rows = json.loads(cli("sql", "SELECT step FROM checkpoints ORDER BY step", "--json").stdout)
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert "step" in cli("sql", "SELECT step FROM checkpoints").stdout
    srt = json.loads(cli("ls", "--sort", "loss", "--json").stdout)
    assert [d["step"] for d in srt] == [30, 40, 10, 20]
    assert [d["step"] for d in json.loads(cli("ls", "--last", "2", "--json").stdout)] == [30, 40]
    r = cli("verify")
    assert r.exit_code == 0 and r.stdout.count("ok") == 4
    (tmp_path / "checkpoint-20" / "adapter_model.safetensors").unlink()
    r = cli("verify", "--json")
    assert r.exit_code != 0 and "r@20 (missing)" in r.stderr
    assert {d["ref"]: d["status"] for d in json.loads(r.stdout)}["r@20"] == "missing"
    assert cli("verify", "r@10").exit_code == 0
    r = cli("doctor")
    assert r.exit_code == 0
    for s in (str(db_path), "schema_version", "duckdb", "python", "spool_pending"):
        assert s in r.stdout
    d = json.loads(cli("doctor", "--json").stdout)
    assert d["schema_version"] == SCHEMA_VERSION and d["checkpoints"] == 4 and d["spool_rejected"] == 0


def test_show_merged_lineage(cli, db_path, tmp_path):
    reg = Registry(db_path)
    ids = [reg.add(write_peft_adapter(tmp_path / f"checkpoint-{s}", s), "r") for s in (1, 2)]
    out = write_peft_adapter(tmp_path / "merged", 9)
    reg.record_merge(path=out, run="r", name="last_2_loss_pf-0_7", method="linear",
                     params={"penalty": 0.7}, inputs=[(ids[0], 0.25), (ids[1], 0.75)])
    r = cli("show", "r@last_2_loss_pf-0_7")
    assert r.exit_code == 0
    for s in ("lineage: method linear", "penalty", "r@1", "r@2", "0.25", "0.75"):
        assert s in r.stdout
    r = cli("ls")
    assert "merged" in r.stdout.splitlines()[-1]
    assert [d["ref"] for d in json.loads(cli("ls", "--merged", "--json").stdout)] == ["r@last_2_loss_pf-0_7"]
    assert [d["ref"] for d in json.loads(cli("ls", "--plain", "--json").stdout)] == ["r@1", "r@2"]


def test_scan_trainer_output(cli, db_path, tmp_path):
    root = _trainer_output(tmp_path / "trainer", [10, 20, 30])
    (root / "runs").mkdir()  # tensorboard folder: ignored
    r = cli("scan", root, "--run", "hf", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [a["step"] for a in res["added"]] == [10, 20, 30] and res["skipped"] == []
    c = Registry(db_path).get("hf@20")
    assert c.metrics == {"train_loss": pytest.approx(1 / 20), "eval_loss": pytest.approx(2 / 20),
                         "eval_acc": pytest.approx(0.2)}
    _trainer_output(root, [40])
    r = cli("scan", root, "--run", "hf")
    assert r.exit_code == 0
    assert "hf@40" in r.stdout
    for s in (10, 20, 30):
        assert f"skipped hf@{s}" in r.stderr
    assert len(Registry(db_path).checkpoints("hf")) == 4


def test_scan_train_loss_just_before_step(cli, db_path, tmp_path):
    root = tmp_path / "t"
    write_peft_adapter(root / "checkpoint-12", 1)
    (root / "trainer_state.json").write_text(json.dumps({"global_step": 12, "log_history": [
        {"step": 5, "loss": 0.9}, {"step": 10, "loss": 0.7}, {"step": 15, "loss": 0.1},
        {"step": 12, "eval_loss": 0.8}]}))
    assert cli("scan", root, "--run", "t").exit_code == 0
    assert Registry(db_path).get("t@12").metrics == {"train_loss": 0.7, "eval_loss": 0.8}
    r = cli("scan", tmp_path, "--run", "t")
    assert r.exit_code == 3 and "no checkpoint-N" in r.stderr


def test_add_spools_when_locked(cli, db_path, tmp_path):
    p = write_peft_adapter(tmp_path / "checkpoint-3", 1)
    cli("add", write_peft_adapter(tmp_path / "checkpoint-1", 2), "--run", "r")
    lock = filelock.FileLock(str(db_path) + ".lock", is_singleton=False)
    lock.acquire()
    try:
        r = cli("add", p, "--run", "r", "--metric", "loss=nan", env={"CKPTREG_LOCK_TIMEOUT": "0.2"})
        assert r.exit_code == 0
        assert r.stdout == "" and r.stderr.startswith("spooled: ")
        d = json.loads(cli("doctor", "--json").stdout)
        assert d["spool_pending"] == 1
    finally:
        lock.release()
    d = json.loads(cli("show", "r@3", "--json").stdout)
    assert d["metrics"] == {"loss": "nan"}
    assert json.loads(cli("doctor", "--json").stdout)["spool_pending"] == 0

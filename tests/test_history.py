"""Run identity and history (issue #10 item 5): the events table, `ckptreg history`, relaunch
detection (same step, other files), idempotent re-adds, run params. Real files, real DuckDB, the
CLI in-process."""
from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
from click.testing import CliRunner

from ckptreg.cli import main
from ckptreg.errors import DuplicateError
from ckptreg.registry import Registry
from helpers_files import write_peft_adapter


@pytest.fixture
def cli(db_path):
    runner = CliRunner()

    def run(*args, env=None):
        return runner.invoke(main, ["--db", str(db_path), *map(str, args)], env=env)

    return run


def test_add_log_replace_are_events_with_who_and_where(registry, tmp_path):
    p = write_peft_adapter(tmp_path / "run" / "checkpoint-10", 1)
    cid = registry.add(p, "r", metrics={"loss": 0.5})
    registry.log("r@10", {"eval_loss": float("nan")})
    write_peft_adapter(p, 2)  # a relaunch overwrote the folder in place
    assert registry.add(p, "r", replace=True) == cid
    ev = registry.history()
    assert [e["op"] for e in ev] == ["add", "log", "replace"]
    assert {(e["ref"], e["checkpoint_id"], e["run"]) for e in ev} == {("r@10", cid, "r")}
    assert all(e["pid"] == os.getpid() and e["host"] == socket.gethostname() and e["user"] for e in ev)
    assert ev[0]["detail"]["metrics"] == {"loss": 0.5} and ev[0]["detail"]["path"] == str(p.resolve())
    assert ev[1]["detail"] == {"metrics": {"eval_loss": "nan"}, "step": 10}
    assert ev[2]["detail"]["previous"]["fingerprint"] == ev[0]["detail"]["fingerprint"]
    assert ev[2]["detail"]["fingerprint"] == registry.get(cid).fingerprint != ev[0]["detail"]["fingerprint"]
    assert [e["seq"] for e in ev] == sorted(e["seq"] for e in ev)


def test_same_files_same_step_is_a_noop(registry, tmp_path, cli, db_path):
    p = write_peft_adapter(tmp_path / "checkpoint-3", 1)
    cid = registry.add(p, "r")
    before = registry.dump()
    n_events = len(registry.history())
    assert registry.add(p, "r") == cid
    assert registry.last_add["status"] == "unchanged"
    r = cli("add", p, "--run", "r")
    assert r.exit_code == 0 and r.stdout.strip() == str(cid)
    assert "already registered with the same files" in r.stderr and "nothing changed" in r.stderr
    assert Registry(db_path).dump() == before and len(registry.history()) == n_events


def test_relaunch_cli_requires_replace(cli, db_path, tmp_path):
    p = write_peft_adapter(tmp_path / "out" / "checkpoint-5", 1)
    assert cli("add", p, "--run", "r").exit_code == 0
    reg = Registry(db_path)
    old = reg.get("r@5")
    before = reg.dump()
    write_peft_adapter(p, 7)  # relaunched into the same folder: other weights at the same step
    r = cli("add", p, "--run", "r")
    assert r.exit_code == 4, r.output
    assert r.stderr.startswith("error: ") and "r@5 is already registered" in r.stderr
    assert "differ from the registered ones" in r.stderr and "--replace" in r.stderr
    assert reg.dump() == before
    r = cli("add", p, "--run", "r", "--replace")
    assert r.exit_code == 0 and r.stdout.strip() == str(old.id)
    assert "replaced r@5" in r.stderr and "differ from the registered ones" in r.stderr
    new = reg.get("r@5")
    assert new.id == old.id and new.fingerprint != old.fingerprint
    reg.check_unchanged("r@5")
    with pytest.raises(DuplicateError, match="differ from the registered ones"):
        Registry(db_path).add(write_peft_adapter(tmp_path / "elsewhere" / "checkpoint-5", 9), "r")
    # "stale" (the callbacks' mode) replaces files overwritten in place, never another folder
    with pytest.raises(DuplicateError, match="registered from"):
        reg.add(tmp_path / "elsewhere" / "checkpoint-5", "r", replace="stale")
    write_peft_adapter(p, 8)
    assert reg.add(p, "r", replace="stale") == old.id and reg.last_add["status"] == "replaced"


def test_history_cli_run_ref_all_json_and_unknown(cli, db_path, tmp_path):
    for run, s in (("alpha", 1), ("alpha", 2), ("beta", 1)):
        cli("add", write_peft_adapter(tmp_path / run / f"checkpoint-{s}", s * 10 + len(run)), "--run", run)
    cli("log", "alpha@2", "acc=0.9")
    every = json.loads(cli("history", "--json").stdout)
    assert [(e["op"], e["ref"]) for e in every] == [("add", "alpha@1"), ("add", "alpha@2"), ("add", "beta@1"),
                                                    ("log", "alpha@2")]
    alpha = json.loads(cli("history", "alpha", "--json").stdout)
    assert [e["ref"] for e in alpha] == ["alpha@1", "alpha@2", "alpha@2"]
    one = json.loads(cli("history", "alpha@2", "--json").stdout)
    assert [e["op"] for e in one] == ["add", "log"] and one[1]["detail"]["metrics"] == {"acc": 0.9}
    by_id = json.loads(cli("history", str(one[0]["checkpoint_id"]), "--json").stdout)
    assert by_id == one
    r = cli("history", "alpha")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    head = next(l for l in lines if l.lstrip().startswith("seq"))
    for col in ("seq", "time", "op", "ref", "user", "host", "pid", "detail"):
        assert col in head
    rows = [l for l in lines if "alpha@" in l]
    assert len(rows) == 3 and len({l.index("alpha@") for l in rows}) == 1  # aligned
    assert "acc=0.9" in rows[-1]
    r = cli("history", "alpah")
    assert r.exit_code == 3 and "no run 'alpah'" in r.stderr and "alpha" in r.stderr
    r = cli("history", "alpha@7")
    assert r.exit_code == 3 and "alpha@7" in r.stderr


def test_run_params_once_json_and_changes_recorded(registry, cli, tmp_path):
    registry.add(write_peft_adapter(tmp_path / "checkpoint-1", 1), "r")
    params = {"lr": 1e-3, "out": tmp_path / "x", "sched": [1, 2]}
    assert registry.set_run_params("r", params) is True
    assert registry.set_run_params("r", params) is False  # once: the same params change nothing
    assert registry.set_run_params("r", dict(params, lr=2e-3)) is True
    runs = json.loads(cli("runs", "--json").stdout)
    assert runs[0]["params"] == {"lr": 2e-3, "out": str(tmp_path / "x"), "sched": [1, 2]}
    ev = [e for e in registry.history("r") if e["op"] == "params"]
    assert [e["detail"] for e in ev] == [{"keys": ["lr", "out", "sched"]}, {"changed": ["lr"]}]
    assert registry.set_run_params("new-run", {"a": 1}) is True  # a run known only by its params
    assert registry.run_params("new-run") == {"a": 1}


def test_git_commit_never_fails(tmp_path):
    from ckptreg.integrations import git_commit

    assert git_commit(cwd=tmp_path) is None                    # not a repository
    assert git_commit(cwd=tmp_path / "gone") is None           # no such folder
    repo = tmp_path / "repo"
    repo.mkdir()
    g = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-c", "commit.gpgsign=false"]
    subprocess.run(g + ["init", "-q"], cwd=repo, check=True)
    (repo / "f").write_text("x")
    subprocess.run(g + ["add", "f"], cwd=repo, check=True)
    subprocess.run(g + ["commit", "-q", "-m", "x"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert git_commit(cwd=repo) == head and len(head) == 40


transformers = pytest.importorskip("transformers")


def test_hf_relaunch_replaces_stale_rows_warns_once_and_records_params(tmp_path, monkeypatch):
    """A real HF Trainer run, then a relaunch (other seed) into the same output_dir and run:
    the stale rows are replaced (ids kept), one warning says so, the hyperparameters and the
    git commit of the working directory are recorded once per run."""
    import torch
    import warnings

    from ckptreg.integrations.hf import CkptregCallback

    repo = tmp_path / "repo"
    repo.mkdir()
    g = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-c", "commit.gpgsign=false"]
    subprocess.run(g + ["init", "-q"], cwd=repo, check=True)
    subprocess.run(g + ["commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(repo)
    db = tmp_path / "reg.duckdb"
    out = tmp_path / "out"

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = (torch.arange(8) + i) % 32
            return {"input_ids": ids, "labels": ids.clone()}

    def train(seed, lr):
        torch.manual_seed(seed)
        cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=lr,
            logging_steps=1, report_to=[], use_cpu=True, seed=seed, disable_tqdm=True, dataloader_num_workers=0)
        cb = CkptregCallback(run="sft", db=db)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            transformers.Trainer(model=transformers.GPT2LMHeadModel(cfg), args=args, train_dataset=DS(),
                                 callbacks=[cb]).train()
        return cb, [str(x.message) for x in w if "ckptreg" in str(x.message)]

    cb1, w1 = train(0, 1e-3)
    assert w1 == [] and cb1.errors == []
    reg = Registry(db)
    first = {c.step: (c.id, c.fingerprint) for c in reg.checkpoints("sft")}
    assert sorted(first) == [2, 4]
    p = reg.run_params("sft")
    assert p["git_commit"] == head and p["training_args"]["learning_rate"] == 1e-3
    assert p["training_args"]["save_steps"] == 2
    cb2, w2 = train(1, 2e-3)  # relaunch: same folder, same run, other weights
    assert cb2.errors == [] and sorted(cb2.replaced) == ["sft@2", "sft@4"]
    assert len(w2) == 1 and "relaunched" in w2[0] and "sft@2" in w2[0] and "replaced the stale entry" in w2[0]
    now = {c.step: (c.id, c.fingerprint) for c in reg.checkpoints("sft")}
    assert {s: v[0] for s, v in now.items()} == {s: v[0] for s, v in first.items()}  # ids kept
    assert all(now[s][1] != first[s][1] for s in now)
    for s in now:
        reg.check_unchanged(f"sft@{s}")  # the registry describes the files on disk now
    assert reg.run_params("sft")["training_args"]["learning_rate"] == 2e-3
    ops = [(e["op"], e["ref"]) for e in reg.history("sft")]
    assert ops.count(("replace", "sft@2")) == 1 and ops.count(("replace", "sft@4")) == 1
    assert [o for o, _ in ops].count("params") == 2  # recorded once per run, then the change


def test_lightning_records_hparams_once(tmp_path, monkeypatch):
    """A real Lightning fit: save_hyperparameters() (a Path among them) lands in runs.params
    (non-JSON values as their str), with no git commit outside a repository."""
    import pathlib

    import torch

    pl = pytest.importorskip("pytorch_lightning")
    from ckptreg.integrations.lightning import CkptregCallback

    class M(pl.LightningModule):
        def __init__(self, lr=0.05, data_dir=pathlib.Path("/data/x")):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    monkeypatch.chdir(tmp_path)  # not a git repository
    db = tmp_path / "reg.duckdb"
    cb = CkptregCallback(run="pl", db=db, strict=True)
    x = torch.randn(16, 4)
    trainer = pl.Trainer(max_steps=4, callbacks=[cb], enable_progress_bar=False, logger=False,
                         accelerator="cpu", enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(M(lr=0.01), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=4))
    assert cb.errors == []
    reg = Registry(db)
    assert reg.run_params("pl") == {"hparams": {"lr": 0.01, "data_dir": "/data/x"}}
    assert [e["op"] for e in reg.history("pl")] == ["params"]

"""Trainer callbacks: real HF Trainer / PEFT / Lightning runs on tiny CPU models, real DuckDB."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ckptreg.registry import Registry

transformers = pytest.importorskip("transformers")


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n, seq=16, vocab=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        # a learnable pattern: next token = (token + 1) % vocab, so the loss goes down
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(seq)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def _tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _train_args(out, max_steps, save_steps, eval_steps, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
        per_device_eval_batch_size=8, learning_rate=5e-3, logging_steps=1, save_steps=save_steps,
        eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps, report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, **kw)


def _history(folder):
    return json.loads((folder / "trainer_state.json").read_text())["log_history"]


def _expected(history, step):
    loss = [e["loss"] for e in history if "loss" in e and e["step"] <= step][-1]
    ev = {k: v for e in history if e["step"] == step for k, v in e.items()
          if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))}
    return {"train_loss": loss, **ev}


def test_imports_stay_light():
    code = ("import sys, ckptreg, ckptreg.integrations, ckptreg.formats, ckptreg.safetensors_io; "
            "bad = [m for m in ('torch', 'transformers', 'pytorch_lightning', 'lightning', 'peft') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hf_trainer_full_model(tmp_path):
    from ckptreg.integrations.hf import CkptregCallback

    db = tmp_path / "reg.duckdb"
    out = tmp_path / "out"
    cb = CkptregCallback(run="gpt2-tiny", db=db, tags={"task": "count"}, strict=True)
    # eval every 4 steps, save every 6: step 12 has both, steps 6/18 save without eval,
    # steps 4/8/16 evaluate without a save; max_steps=20 is off the save interval (final save).
    trainer = transformers.Trainer(model=_tiny_gpt2(), args=_train_args(out, 20, 6, 4),
                                   train_dataset=TokenDataset(64), eval_dataset=TokenDataset(16, seed=1),
                                   callbacks=[cb])
    trainer.train()
    reg = Registry(db)
    ck = reg.checkpoints("gpt2-tiny")
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved[:3] == [6, 12, 18]
    assert [c.step for c in ck] == saved
    final_hist = _history(out / f"checkpoint-{saved[-1]}")
    for c in ck:
        assert (c.kind, c.format) == ("full", "hf")
        assert c.path == str((out / f"checkpoint-{c.step}").resolve())
        assert c.tags == {"task": "count"}
        exp = _expected(final_hist, c.step)
        assert c.metrics.keys() == exp.keys(), (c.step, c.metrics, exp)
        for k, v in exp.items():
            assert c.metrics[k] == pytest.approx(v, rel=1e-12), (c.step, k)
    assert "eval_loss" in reg.get("gpt2-tiny@12").metrics
    assert "eval_loss" not in reg.get("gpt2-tiny@6").metrics
    # losses decreased: the tiny model learned something, the numbers are real
    assert ck[-1].metrics["train_loss"] < ck[0].metrics["train_loss"]
    assert cb.errors == []
    # `ckptreg scan` of the same output folder records the same steps and metrics
    from click.testing import CliRunner

    from ckptreg.cli import main

    db2 = tmp_path / "scan.duckdb"
    r = CliRunner().invoke(main, ["--db", str(db2), "scan", str(out), "--run", "gpt2-tiny"])
    assert r.exit_code == 0, r.output
    scanned = {c.step: c.metrics for c in Registry(db2).checkpoints("gpt2-tiny")}
    assert scanned == {c.step: c.metrics for c in ck}


def test_hf_eval_after_save_is_attached_late(tmp_path):
    """A trainer.evaluate() after training lands on the final step's checkpoint via on_evaluate."""
    from ckptreg.integrations.hf import CkptregCallback

    db = tmp_path / "reg.duckdb"
    out = tmp_path / "out"
    cb = CkptregCallback(run="r", db=db, strict=True)
    args = _train_args(out, 8, 4, None)  # no evaluation during training
    trainer = transformers.Trainer(model=_tiny_gpt2(), args=args, train_dataset=TokenDataset(32),
                                   eval_dataset=TokenDataset(8, seed=1), callbacks=[cb])
    trainer.train()
    reg = Registry(db)
    assert "eval_loss" not in reg.get("r@8").metrics
    res = trainer.evaluate()
    m = reg.get("r@8").metrics
    assert m["eval_loss"] == pytest.approx(res["eval_loss"], rel=1e-12)
    assert m["train_loss"] == pytest.approx(_expected(_history(out / "checkpoint-8"), 8)["train_loss"])


def test_hf_peft_lora(tmp_path):
    peft = pytest.importorskip("peft")
    from ckptreg.integrations.hf import CkptregCallback

    model = peft.get_peft_model(_tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                              lora_dropout=0.0, fan_in_fan_out=True))
    db = tmp_path / "reg.duckdb"
    out = tmp_path / "out"
    trainer = transformers.Trainer(model=model, args=_train_args(out, 12, 4, 4),
                                   train_dataset=TokenDataset(48), eval_dataset=TokenDataset(8, seed=1),
                                   callbacks=[CkptregCallback(run="lora-run", db=db, strict=True)])
    trainer.train()
    reg = Registry(db)
    ck = reg.checkpoints("lora-run")
    assert [c.step for c in ck] == [4, 8, 12]
    hist = _history(out / "checkpoint-12")
    for c in ck:
        assert (c.kind, c.format) == ("lora", "peft")
        assert c.lora["r"] == 4 and c.lora["scaling"] == pytest.approx(2.0)
        assert c.lora["target_modules"] == ["c_attn"]
        assert all("lora_" in n for n in reg.inventory(c))
        exp = _expected(hist, c.step)
        assert c.metrics == pytest.approx(exp, rel=1e-12)
        assert "eval_loss" in c.metrics


def test_hf_busy_database_does_not_stop_training(tmp_path):
    """Hold the registry's writer lock for the whole run: every add spools, training finishes,
    and the next opener ingests the entries."""
    from filelock import FileLock

    from ckptreg.integrations.hf import CkptregCallback

    db = tmp_path / "reg.duckdb"
    Registry(db).checkpoints()  # create the database
    out = tmp_path / "out"
    reg = Registry(db, lock_timeout=0.2)
    cb = CkptregCallback(run="busy", db=db, strict=True, lock_timeout=0.2)  # spool fast while locked
    lock = FileLock(str(reg.path) + ".lock")
    with lock:
        trainer = transformers.Trainer(model=_tiny_gpt2(), args=_train_args(out, 8, 4, 4),
                                       train_dataset=TokenDataset(32), eval_dataset=TokenDataset(8, seed=1),
                                       callbacks=[cb])
        trainer.train()
        assert cb.registered == {4: None, 8: None}  # spooled
    assert [c.step for c in Registry(db).checkpoints("busy")] == [4, 8]
    hist = _history(out / "checkpoint-8")
    assert Registry(db).get("busy@8").metrics == pytest.approx(_expected(hist, 8), rel=1e-12)


def test_hf_registry_errors_warn_not_raise(tmp_path):
    """A second run under the same name hits DuplicateError at every save: training completes,
    the errors are kept as warnings; strict=True raises instead."""
    from ckptreg.errors import DuplicateError
    from ckptreg.integrations.hf import CkptregCallback

    db = tmp_path / "reg.duckdb"

    def run(out, cb):
        transformers.Trainer(model=_tiny_gpt2(), args=_train_args(out, 4, 2, None),
                             train_dataset=TokenDataset(16), callbacks=[cb]).train()

    run(tmp_path / "a", CkptregCallback(run="dup", db=db, strict=True))
    cb = CkptregCallback(run="dup", db=db)
    with pytest.warns(RuntimeWarning, match="already registered"):
        run(tmp_path / "b", cb)
    assert len(cb.errors) == 2 and all("dup@" in e for e in cb.errors)
    assert [c.path for c in Registry(db).checkpoints("dup")] == [
        str((tmp_path / "a" / f"checkpoint-{s}").resolve()) for s in (2, 4)]
    with pytest.raises(DuplicateError):
        run(tmp_path / "c", CkptregCallback(run="dup", db=db, strict=True))
    # replace=True re-points the entries at the new folders
    run(tmp_path / "d", CkptregCallback(run="dup", db=db, strict=True, replace=True))
    assert Registry(db).get("dup@4").path == str((tmp_path / "d" / "checkpoint-4").resolve())


def test_to_float_metrics():
    import numpy as np

    from ckptreg.integrations import to_float_metrics

    m = to_float_metrics({"a": torch.tensor(1.5), "b": 2, "c": np.float32(0.25), "d": torch.ones(3),
                          "e": "text", "f": True, "g": np.array([4.0]), "h": torch.tensor([[7]])})
    assert m == {"a": 1.5, "b": 2.0, "c": 0.25, "g": 4.0, "h": 7.0}
    assert all(type(v) is float for v in m.values())


# ------------------------------------------------------------------ Lightning


pl = pytest.importorskip("pytorch_lightning")


class _MLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _xy(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True) * 0.3)


def test_lightning_callback(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from ckptreg.integrations.lightning import CkptregCallback

    torch.manual_seed(0)
    db = tmp_path / "reg.duckdb"
    ckdir = tmp_path / "ckpts"
    mc = ModelCheckpoint(dirpath=str(ckdir), every_n_train_steps=5, save_top_k=-1, save_last=True)
    cb = CkptregCallback(run="mlp", db=db, tags={"arch": "mlp"}, strict=True)
    seen, val = {}, {}

    class Spy(pl.Callback):  # records what the trainer reported at each save / validation
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            seen[trainer.global_step] = {k: float(v) for k, v in trainer.callback_metrics.items()}

        def on_validation_end(self, trainer, pl_module):
            val[trainer.global_step] = float(trainer.callback_metrics["val_loss"])

    trainer = pl.Trainer(max_epochs=2, callbacks=[mc, cb, Spy()], enable_progress_bar=False, logger=False,
                         accelerator="cpu", enable_model_summary=False, limit_val_batches=2,
                         val_check_interval=10, num_sanity_val_steps=0)
    dl = torch.utils.data.DataLoader(_xy(80, 0), batch_size=4)  # 20 steps per epoch
    trainer.fit(_MLP(), dl, torch.utils.data.DataLoader(_xy(16, 1), batch_size=8))
    reg = Registry(db)
    ck = reg.checkpoints("mlp")
    files = sorted(p.name for p in ckdir.glob("*.ckpt"))
    assert "last.ckpt" in files
    steps = sorted({int(n.split("step=")[1].split(".")[0].split("-")[0]) for n in files if "step=" in n})
    assert [c.step for c in ck] == steps == [5, 10, 15, 20, 25, 30, 35, 40]
    for c in ck:
        assert (c.format, c.kind, c.tags) == ("pickle", "full", {"arch": "mlp"})
        assert os.path.basename(c.path).endswith(f"step={c.step}.ckpt")
        # only values produced since the previous save: the val_loss still in callback_metrics
        # from an earlier validation is not stored under this step (issue #10 item 4)
        exp = {k: v for k, v in seen[c.step].items() if k != "val_loss"}
        if c.step in val:  # validation ran after the save at this step: attached late
            exp["val_loss"] = val[c.step]
        assert c.metrics == pytest.approx(exp, rel=1e-6)
        assert c.metric_steps == {k: c.step for k in exp}
        assert "train_loss" in c.metrics
        assert set(reg.inventory(c)) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert sorted(val) == [10, 20, 30, 40]
    assert "val_loss" in reg.get("mlp@10").metrics and "val_loss" not in seen[10]
    # the wrap is removed after fit
    assert "save_checkpoint" not in vars(trainer)
    assert cb.errors == []

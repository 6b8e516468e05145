"""Lightning for real (issue #10 item 6): .ckpt files whose hyper_parameters hold a Path or a
dataclass are registered by reading only their state_dict, with no code from the file run; the
callback tells the truth (registered id / spooled / failed + reason); `ckptreg scan` imports a
Lightning checkpoints/ folder. Real files, real DuckDB, a real Lightning Trainer, CLI in-process."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import pickle

import pytest
import torch
from click.testing import CliRunner

from ckptreg.cli import main
from ckptreg.errors import FormatError
from ckptreg.formats import inspect, load_pickle_state
from ckptreg.registry import Registry


class _Evil:
    """Unpickling this creates the file ``marker`` (builtins.open via __reduce__)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@dataclasses.dataclass
class _Cfg:
    width: int = 16
    root: pathlib.Path = pathlib.Path("/data")


def _sd():
    g = torch.Generator().manual_seed(0)
    return {"net.0.weight": torch.randn(4, 3, generator=g), "net.0.bias": torch.zeros(4)}


def test_restricted_read_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "epoch=0-step=5.ckpt"
    torch.save({"state_dict": _sd(), "epoch": 0, "global_step": 5,
                "hyper_parameters": {"evil": _Evil(marker), "cfg": _Cfg(), "out": pathlib.Path("/x/y")}}, p)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(p, weights_only=True)             # what made such files unregistrable
    sd = load_pickle_state(p)
    assert set(sd) == {"net.0.weight", "net.0.bias"} and torch.equal(sd["net.0.weight"], _sd()["net.0.weight"])
    info = inspect(p, allow_pickle=True)
    assert (info.format, info.n_tensors) == ("pickle", 2)
    assert not marker.exists()                        # nothing in the file ran
    # the test pickle is real: an ordinary unpickle does create the file
    marker2 = tmp_path / "pwned2"
    torch.save({"x": _Evil(marker2)}, tmp_path / "plain.pt")
    torch.load(tmp_path / "plain.pt", weights_only=False)
    assert marker2.exists()


def test_evil_object_in_the_state_dict_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {**_sd(), "hook": _Evil(marker)}, "hyper_parameters": {"p": pathlib.Path("a")}}, p)
    with pytest.raises(FormatError, match=r"bad\.ckpt.*state_dict holds objects other than tensors \(io\.open\)"):
        inspect(p, allow_pickle=True)
    q = tmp_path / "nostate.ckpt"
    torch.save({"weights": _sd(), "hp": pathlib.Path("a")}, q)
    with pytest.raises(FormatError, match=r"nostate\.ckpt.*weights_only.*no state_dict to read alone"):
        inspect(q, allow_pickle=True)
    assert not marker.exists()
    r = CliRunner().invoke(main, ["--db", str(tmp_path / "r.duckdb"), "add", str(p), "--run", "r",
                                  "--step", "1", "--allow-pickle"])
    assert r.exit_code == FormatError.exit_code and "state_dict holds objects other than tensors" in r.output
    assert Registry(tmp_path / "r.duckdb").checkpoints() == []


# ------------------------------------------------------------------ a real Lightning run

pl = pytest.importorskip("pytorch_lightning")


class _HPModule(pl.LightningModule):
    def __init__(self, data_dir: pathlib.Path, cfg: _Cfg):
        super().__init__()
        self.save_hyperparameters()    # a Path and a dataclass in hyper_parameters
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))

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


def test_lightning_top_k_with_path_hparams_and_scan(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from ckptreg.integrations.lightning import CkptregCallback

    torch.manual_seed(0)
    db = tmp_path / "reg.duckdb"
    ckdir = tmp_path / "checkpoints"
    mc = ModelCheckpoint(dirpath=str(ckdir), monitor="val_loss", save_top_k=2, every_n_epochs=1)
    cb = CkptregCallback(run="hp", db=db, strict=True)
    val = {}

    class Spy(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                val[trainer.global_step] = float(trainer.callback_metrics["val_loss"])

    trainer = pl.Trainer(max_epochs=4, callbacks=[mc, cb, Spy()], enable_progress_bar=False, logger=False,
                         accelerator="cpu", enable_model_summary=False, limit_val_batches=1,
                         num_sanity_val_steps=0)
    dl = torch.utils.data.DataLoader(_xy(16, 0), batch_size=4)  # 4 steps per epoch
    trainer.fit(_HPModule(tmp_path / "data", _Cfg()), dl, torch.utils.data.DataLoader(_xy(8, 1), batch_size=8))
    assert sorted(val) == [4, 8, 12, 16]
    reg = Registry(db)
    ck = {c.step: c for c in reg.checkpoints("hp")}
    # every save was registered (top-k later deleted some files: the entries are still true history)
    assert sorted(ck) == [4, 8, 12, 16]
    assert cb.results() == {s: {"status": "registered", "id": ck[s].id} for s in (4, 8, 12, 16)}
    assert cb.errors == []
    for s, c in ck.items():
        assert c.format == "pickle"
        assert set(reg.inventory(c)) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
        assert c.metrics["val_loss"] == pytest.approx(val[s], rel=1e-6) and c.metric_steps["val_loss"] == s
        assert c.metric_steps["train_loss"] == s
    # `ckptreg scan` of the checkpoints/ folder: the two kept files, step from the name, the
    # monitored value from the ModelCheckpoint state
    kept = sorted(ckdir.glob("*.ckpt"))
    assert len(kept) == 2
    db2 = tmp_path / "scan.duckdb"
    r = CliRunner().invoke(main, ["--db", str(db2), "scan", str(tmp_path), "--run", "hp"])
    assert r.exit_code == FormatError.exit_code and "--allow-pickle" in r.output
    r = CliRunner().invoke(main, ["--db", str(db2), "scan", str(tmp_path), "--run", "hp", "--allow-pickle", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    steps = sorted(a["step"] for a in out["added"])
    assert steps == sorted(ck[s].step for s in steps) and len(steps) == 2
    for c in Registry(db2).checkpoints("hp"):
        assert c.fingerprint == ck[c.step].fingerprint
        assert c.metrics == {"val_loss": pytest.approx(val[c.step], rel=1e-6)}
        assert c.metric_steps == {"val_loss": None}


def test_lightning_failed_add_is_reported_failed_not_spooled(tmp_path):
    """A registry error (here: the database's folder does not exist) is a warning, training
    finishes, and results() says failed with the reason; before, the entry read as spooled."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from ckptreg.integrations.lightning import CkptregCallback

    db = tmp_path / "no-such-folder" / "reg.duckdb"
    cb = CkptregCallback(run="f", db=db)
    mc = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(max_epochs=1, callbacks=[mc, cb], enable_progress_bar=False, logger=False,
                         accelerator="cpu", enable_model_summary=False, limit_val_batches=0)
    with pytest.warns(RuntimeWarning, match="no-such-folder"):
        trainer.fit(_HPModule(tmp_path, _Cfg()), torch.utils.data.DataLoader(_xy(16, 0), batch_size=4))
    res = cb.results()
    assert sorted(res) == [2, 4]
    for r in res.values():
        assert r["status"] == "failed" and r["id"] is None and "no-such-folder" in r["reason"]
    assert cb.registered == {}
    assert not db.parent.exists()


_SCHED = [0.5, 0.2, 0.9, 0.4, 0.7, 0.3]   # val_metric per epoch: not monotone


class _SchedModule(_HPModule):
    def validation_step(self, batch, _):
        self.log("val_metric", torch.tensor(_SCHED[self.current_epoch]))


def test_lightning_retention_keeps_best_not_newest(tmp_path):
    """retention= on the Lightning callback with a metric that does not fall monotonically:
    applied after each save, keep-best 2 (min) + the final checkpoint. Hand-computed, step by step
    (4 steps per epoch): after 16 the best are 8 (0.2), 16 (0.4) -> 4 and 12 go; after 24 the best
    are 8 (0.2), 24 (0.3) -> 16 and 20 go. Left: {8, 24}; keep-newest would leave {20, 24}."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from ckptreg.integrations.lightning import CkptregCallback

    torch.manual_seed(0)
    db = tmp_path / "reg.duckdb"
    ckdir = tmp_path / "checkpoints"
    mc = ModelCheckpoint(dirpath=str(ckdir), monitor="val_metric", save_top_k=-1, every_n_epochs=1)
    cb = CkptregCallback(run="ret", db=db, strict=True,
                         retention={"keep_best": 2, "metric": "val_metric", "direction": "min"})
    trainer = pl.Trainer(max_epochs=6, callbacks=[mc, cb], enable_progress_bar=False, logger=False,
                         accelerator="cpu", enable_model_summary=False, limit_val_batches=1,
                         num_sanity_val_steps=0)
    dl = torch.utils.data.DataLoader(_xy(16, 0), batch_size=4)
    trainer.fit(_SchedModule(tmp_path / "data", _Cfg()), dl,
                torch.utils.data.DataLoader(_xy(8, 1), batch_size=8))
    assert cb.errors == []
    reg = Registry(db)
    ck = {c.step: c for c in reg.checkpoints("ret")}
    assert sorted(ck) == [8, 24]
    assert ck[8].metrics["val_metric"] == pytest.approx(0.2) and ck[8].metric_steps["val_metric"] == 8
    assert ck[24].metrics["val_metric"] == pytest.approx(0.3)
    # the files of the pruned ones are gone, the kept ones are on disk
    left = sorted(p.name for p in ckdir.glob("*.ckpt"))
    assert left == ["epoch=1-step=8.ckpt", "epoch=5-step=24.ckpt"], left
    gone = reg.sql("SELECT ref FROM events WHERE op = 'gc' ORDER BY seq")[1]
    assert [g[0] for g in gone] == ["ret@4", "ret@12", "ret@16", "ret@20"]

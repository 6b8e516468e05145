"""Data out: Registry.export / `ckptreg export --format parquet|csv|json -o FILE` (checkpoints with
metrics and lineage, written atomically) and Registry.to_arrow / to_pandas (optional packages)."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess

import duckdb
import pytest
from click.testing import CliRunner

from ckptreg.cli import main
from ckptreg.errors import DiskFullError, NotFoundError, OutputExistsError, UsageError
from ckptreg.registry import Registry
from helpers_files import mounted_tmpfs, write_peft_adapter


@pytest.fixture
def reg(tmp_path):
    r = Registry(tmp_path / "reg.duckdb")
    for s in (10, 20, 30):
        r.add(write_peft_adapter(tmp_path / "run" / f"checkpoint-{s}", s), "r",
              metrics={"eval_loss": float("nan") if s == 20 else 1.0 / s, "acc": s / 100}, tags={"lr": "1e-4"})
    out = write_peft_adapter(tmp_path / "soup-a", 7)
    r.record_merge(path=out, run="r", name="soup", method="linear", params={"scheme": "uniform"},
                   inputs=[("r@10", 0.25), ("r@30", 0.75)])
    out = write_peft_adapter(tmp_path / "soup-b", 8)
    r.record_merge(path=out, run="r", name="soup", method="task_arithmetic", params={"lam": 0.5},
                   inputs=[("r@20", 1.0), ("r@30", 1.0)], base="r@10")
    return r


@pytest.fixture
def cli(tmp_path):
    def run(*args, code=0):
        res = CliRunner().invoke(main, ["--db", str(tmp_path / "reg.duckdb"), *map(str, args)])
        assert res.exit_code == code, (args, res.exit_code, res.output, res.exception)
        return res
    return run


def _no_temporaries(folder):
    return [n for n in os.listdir(folder) if ".ckptreg-tmp-" in n] == []


def test_export_parquet_has_metrics_and_lineage(reg, cli, tmp_path):
    out = tmp_path / "reg.parquet"
    res = cli("export", "--format", "parquet", "-o", out)
    assert "wrote 5 checkpoint(s)" in res.stderr
    con = duckdb.connect()
    cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM '{out}'").fetchall()]
    assert cols[:3] == ["id", "ref", "run"] and "metrics.eval_loss" in cols and "metrics.acc" in cols
    rows = con.execute(f"SELECT ref, version, \"metrics.eval_loss\", \"metrics.acc\", method, base_ref, inputs "
                       f"FROM '{out}' ORDER BY id").fetchall()
    assert [r[0] for r in rows] == ["r@10", "r@20", "r@30", "r@soup", "r@soup:v2"]
    assert [r[1] for r in rows] == [1, 1, 1, 1, 2]
    assert rows[0][2] == pytest.approx(0.1) and math.isnan(rows[1][2])        # NaN is kept
    assert rows[2][3] == pytest.approx(0.3) and rows[3][2] is None
    assert rows[0][4] is None and rows[0][6] is None                           # plain: no lineage
    assert rows[3][4] == "linear" and [(i["ref"], i["weight"]) for i in rows[3][6]] == [("r@10", 0.25), ("r@30", 0.75)]
    assert rows[4][4] == "task_arithmetic" and rows[4][5] == "r@10"
    assert [i["position"] for i in rows[4][6]] == [0, 1]
    assert _no_temporaries(tmp_path)


def test_export_csv_and_json(reg, cli, tmp_path):
    cli("export", "-o", tmp_path / "reg.csv")                                   # format from the suffix
    with open(tmp_path / "reg.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["ref"] for r in rows] == ["r@10", "r@20", "r@30", "r@soup", "r@soup:v2"]
    assert float(rows[0]["metrics.acc"]) == pytest.approx(0.1) and rows[1]["metrics.eval_loss"] == "nan"
    assert json.loads(rows[0]["tags"]) == {"lr": "1e-4"}
    assert [i["ref"] for i in json.loads(rows[4]["inputs"])] == ["r@20", "r@30"]
    assert json.loads(rows[4]["params"]) == {"lam": 0.5}
    d = json.loads(cli("export", "--format", "json", "-o", tmp_path / "reg.json", "--json").stdout)
    assert d["rows"] == 5 and d["format"] == "json"
    data = json.loads((tmp_path / "reg.json").read_text())                     # strict JSON (no NaN literal)
    assert data[1]["metrics"] == {"acc": 0.2, "eval_loss": "nan"}
    assert data[3]["inputs"] == [{"id": 1, "ref": "r@10", "weight": 0.25, "position": 0},
                                 {"id": 3, "ref": "r@30", "weight": 0.75, "position": 1}]
    assert data[4]["base_id"] == 1 and data[4]["version"] == 2 and data[0]["inputs"] is None
    assert reg.export_rows()[4]["inputs"] == data[4]["inputs"]


def test_export_refuses_existing_and_dangerous_targets(reg, cli, tmp_path):
    out = tmp_path / "reg.parquet"
    out.write_bytes(b"not mine")
    res = cli("export", "-o", out, code=OutputExistsError.exit_code)
    assert f"export: {out} exists (use --overwrite" in res.stderr
    assert out.read_bytes() == b"not mine"
    cli("export", "-o", out, "--overwrite")
    assert duckdb.connect().execute(f"SELECT count(*) FROM '{out}'").fetchone()[0] == 5
    before = repr(reg.dump())                                                  # (repr: NaN == NaN)
    db = tmp_path / "reg.duckdb"
    res = cli("export", "--format", "csv", "-o", db, "--overwrite", code=OutputExistsError.exit_code)
    assert "registry's own file" in res.stderr
    f = tmp_path / "run" / "checkpoint-10" / "adapter_model.safetensors"
    data = f.read_bytes()
    res = cli("export", "--format", "csv", "-o", f, "--overwrite", code=OutputExistsError.exit_code)
    assert "registered checkpoint r@10" in res.stderr and f.read_bytes() == data
    res = cli("export", "-o", tmp_path / "run", "--format", "csv", "--overwrite", code=OutputExistsError.exit_code)
    res = cli("export", "-o", tmp_path / "nosuch" / "x.csv", code=NotFoundError.exit_code)
    assert "does not exist" in res.stderr
    res = cli("export", "-o", tmp_path / "x.txt", code=UsageError.exit_code)
    assert "not one of parquet, csv, json" in res.stderr
    assert repr(reg.dump()) == before and _no_temporaries(tmp_path)
    assert not (tmp_path / "x.txt").exists()


@pytest.fixture
def full_tmpfs(tmp_path):
    """A REAL tiny tmpfs, filled up (root only)."""
    with mounted_tmpfs(tmp_path / "mnt", "256k", fill=True) as mnt:
        yield mnt


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_export_to_a_full_disk_leaves_nothing(reg, cli, full_tmpfs, fmt):
    out = full_tmpfs / f"reg.{fmt}"
    res = cli("export", "-o", out, code=DiskFullError.exit_code)
    assert f"export: no space left to write {out}; nothing was written" in res.stderr
    assert not out.exists() and _no_temporaries(full_tmpfs)


def test_to_arrow_and_to_pandas(reg):
    for mod, fn in (("pyarrow", reg.to_arrow), ("pandas", reg.to_pandas)):
        if importlib.util.find_spec(mod) is None:
            with pytest.raises(UsageError, match=f"needs the optional package '{mod}'"):
                fn()
            continue
        t = fn()
        cols = list(t.columns) if mod == "pandas" else t.column_names
        assert "metrics.eval_loss" in cols and "inputs" in cols and len(t) == 5

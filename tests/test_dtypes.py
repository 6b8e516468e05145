"""One dtype table (safetensors_io.DTYPE_TABLE) for reader, writer and engine: a checkpoint with
a dtype a merge cannot write registers (it is a valid file), and a merge over it is refused with
a clear message before anything is written."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckptreg import writer
from ckptreg.cli import main
from ckptreg.errors import FormatError
from ckptreg.registry import Registry
from ckptreg.safetensors_io import (DTYPE_TABLE, DTYPES, MERGE_FLOATS, MERGEABLE, TORCH_TO_ST, check_mergeable,
                                    read_header)


def test_reader_and_writer_agree_on_every_dtype():
    for st, row in DTYPE_TABLE.items():
        assert row.name == st and DTYPES[st] == (row.torch_name, row.itemsize)
        assert TORCH_TO_ST[row.torch_name] == st
        t = getattr(torch, row.torch_name)
        assert torch.empty(0, dtype=t).element_size() == row.itemsize, st
        if row.mergeable:
            # everything a merge may produce, the writer can write, and back
            assert writer.torch_dtype(st) == t and writer.dtype_str(t) == st and writer.ITEMSIZE[st] == row.itemsize
        else:
            with pytest.raises(FormatError, match=f"{st}.*cannot be merged"):
                writer.torch_dtype(st)
            with pytest.raises(FormatError):
                writer.dtype_str(t)
    assert set(MERGE_FLOATS) == {"F16", "BF16", "F32", "F64"} <= set(MERGEABLE)
    assert "F8_E8M0" in DTYPE_TABLE and "F8_E8M0" not in MERGEABLE


@pytest.mark.parametrize("odd", [torch.float8_e8m0fnu, torch.float8_e4m3fn, torch.complex64])
def test_unmergeable_dtype_registers_but_merge_refuses_before_writing(tmp_path, odd):
    db = tmp_path / "reg.duckdb"
    reg = Registry(db)
    for i, step in enumerate((10, 20)):
        g = torch.Generator().manual_seed(i)
        t = {"w": torch.randn(8, 8, generator=g), "scale": torch.ones(8).to(odd)}
        p = tmp_path / "r" / f"step_{step}.safetensors"
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file(t, str(p))
        assert reg.add(p, run="r", step=step) is not None        # a valid file: it registers
    st = TORCH_TO_ST[str(odd).replace("torch.", "")]
    assert read_header(tmp_path / "r" / "step_10.safetensors").tensors["scale"].dtype == st
    before = reg.dump()
    out = tmp_path / "merged.safetensors"
    res = CliRunner().invoke(main, ["--db", str(db), "merge", "--run", "r", "--last", "2", "-o", str(out), "-q"])
    assert res.exit_code == FormatError.exit_code, res.output
    assert st in res.output and "cannot be merged" in res.output
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    assert Registry(db).dump() == before


def test_check_mergeable_names_tensors_and_why():
    with pytest.raises(FormatError, match=r"m@1: cannot be merged: 2 F8_E4M3 tensors \('a', 'b'\): float8"):
        check_mergeable([("a", "F8_E4M3"), ("b", "F8_E4M3"), ("c", "F32")], "m@1")
    check_mergeable([("c", "F32"), ("step", "I64"), ("mask", "BOOL")], "m@1")


def test_integer_tensors_still_merge_by_copying_the_newest(tmp_path):
    db = tmp_path / "reg.duckdb"
    reg = Registry(db)
    for i, step in enumerate((10, 20)):
        p = tmp_path / "r" / f"step_{step}.safetensors"
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.full((4,), float(i)), "count": torch.tensor([step], dtype=torch.int64),
                   "u": torch.tensor([i], dtype=torch.uint16)}, str(p))
        reg.add(p, run="r", step=step)
    out = tmp_path / "m.safetensors"
    res = CliRunner().invoke(main, ["--db", str(db), "merge", "--run", "r", "--last", "2", "-o", str(out), "-q",
                                    "--json"])
    assert res.exit_code == 0, res.output
    o = load_file(json.loads(res.output)["path"])
    assert torch.equal(o["w"], torch.full((4,), 0.5)) and o["count"].item() == 20 and o["u"].item() == 1

"""safetensors_io: header validation on real (forged) bytes, zero-copy views vs safetensors."""
from __future__ import annotations

import gc
import json
import struct
import subprocess
import sys
import time

import pytest
import torch
from helpers_files import raw_safetensors
from safetensors.torch import load_file, save_file

from ckptreg.errors import FormatError, NotFoundError
from ckptreg.safetensors_io import DTYPES, Header, TensorInfo, open_tensors, read_header


def _f32(n):
    return struct.pack(f"<{n}f", *range(n))


# ------------------------------------------------------------------ happy path


def test_header_fields(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"b": torch.zeros(3, 4), "a": torch.ones(5, dtype=torch.float16)}, str(p), metadata={"k": "v"})
    h = read_header(p)
    assert isinstance(h, Header)
    assert h.path == str(p.resolve())
    assert h.metadata == {"k": "v"}
    assert set(h.tensors) == {"a", "b"}
    assert h.file_size == p.stat().st_size
    raw = p.read_bytes()
    assert h.header_len == struct.unpack("<Q", raw[:8])[0]
    assert h.raw == raw[8:8 + h.header_len]
    assert h.data_start == 8 + h.header_len
    a = h.tensors["a"]
    assert isinstance(a, TensorInfo)
    assert (a.dtype, a.shape, a.numel, a.nbytes, a.file) == ("F16", (5,), 5, 10, str(p.resolve()))
    # offsets are absolute, tensors come in file (data offset) order
    offs = [t.offset for t in h.tensors.values()]
    assert offs == sorted(offs)
    for t in h.tensors.values():
        assert h.data_start <= t.offset <= h.file_size - t.nbytes


def test_read_header_does_not_import_torch(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(2)}, str(p))
    code = ("import sys; from ckptreg.safetensors_io import read_header; import ckptreg.formats as f; "
            f"read_header({str(p)!r}); f.inspect({str(p)!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.int64, torch.int8, torch.uint8, torch.bool, torch.int32])
def test_views_equal_safetensors(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    shapes = {"scalar": (), "vec": (7,), "odd": (3, 5, 7), "empty": (0,), "empty2": (4, 0, 3),
              "one": (1, 1), "big": (33, 17)}
    tensors = {}
    for n, s in shapes.items():
        t = torch.randn(s, generator=g) * 10
        tensors[n] = (t > 0) if dtype == torch.bool else t.to(dtype)
    p = tmp_path / "m.safetensors"
    save_file(tensors, str(p))
    ref = load_file(str(p))
    with open_tensors(p) as f:
        assert sorted(f.keys()) == sorted(shapes)
        for n in shapes:
            v = f.tensor(n)
            assert v.dtype == dtype and tuple(v.shape) == shapes[n]
            assert torch.equal(v, ref[n]), n


def test_views_are_zero_copy_and_survive_close(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(1000, dtype=torch.float32), "b": torch.arange(10, dtype=torch.float32)}, str(p))
    f = open_tensors(p)
    a, b = f.tensor("a"), f.tensor("b")
    a2 = f.tensor("a")
    assert a.data_ptr() == a2.data_ptr()  # same mapping, no copies
    # both views point into one mapping at the header offsets
    h = read_header(p)
    assert b.data_ptr() - a.data_ptr() == h.tensors["b"].offset - h.tensors["a"].offset
    f.close()
    gc.collect()
    assert a[999].item() == 999.0 and b.sum().item() == 45.0


def test_unaligned_offsets(tmp_path):
    # F32 tensor starting at data offset 2 (after a 2-byte U8 tensor) and a header that is not
    # padded: absolute offsets are not multiples of 4. Values must still be right.
    header = {"u": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
              "x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [2, 26]},
              "h": {"dtype": "BF16", "shape": [3], "data_offsets": [26, 32]}}
    xs = torch.arange(6, dtype=torch.float32) - 2.5
    hs = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    data = bytes([7, 9]) + xs.numpy().tobytes() + hs.view(torch.int16).numpy().tobytes()
    for pad in (" ", "  ", "   "):
        p = raw_safetensors(tmp_path / f"u{len(pad)}.safetensors", json.dumps(header) + pad, data)
        ref = load_file(str(p))
        with open_tensors(p) as f:
            for n in header:
                assert torch.equal(f.tensor(n), ref[n]), (pad, n)
            assert torch.equal(f.tensor("x"), xs.view(2, 3))


def test_missing_tensor_and_missing_file(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(1)}, str(p))
    with open_tensors(p) as f:
        with pytest.raises(NotFoundError, match="nope"):
            f.tensor("nope")
    with pytest.raises(NotFoundError, match="absent.safetensors"):
        read_header(tmp_path / "absent.safetensors")
    with pytest.raises(FormatError, match="directory"):
        read_header(tmp_path)


def test_dtype_table():
    for st, (tname, size) in DTYPES.items():
        assert getattr(torch, tname).itemsize == size, st


# ------------------------------------------------------------------ bad input


def _bad(tmp_path, header, data=b"", header_len=None, name="model.safetensors"):
    p = raw_safetensors(tmp_path / name, header, data, header_len=header_len)
    with pytest.raises(FormatError) as ei:
        read_header(p)
    msg = str(ei.value)
    assert name in msg, msg
    return msg


def test_too_small(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"\x01\x02\x03")
    with pytest.raises(FormatError, match=r"model.safetensors: truncated: 3 bytes"):
        read_header(p)
    p.write_bytes(b"")
    with pytest.raises(FormatError, match="truncated"):
        read_header(p)


def test_truncated_file(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(100), "b": torch.randn(50)}, str(p))
    raw = p.read_bytes()
    p.write_bytes(raw[:-40])  # cut into b's data
    with pytest.raises(FormatError, match=r"extends past end of file"):
        read_header(p)
    p.write_bytes(raw[:20])  # cut inside the header
    with pytest.raises(FormatError, match=r"header length \d+ runs past the end of the file"):
        read_header(p)


def test_header_length_insane(tmp_path):
    msg = _bad(tmp_path, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, _f32(1),
               header_len=2 ** 62)
    assert "limit" in msg
    msg = _bad(tmp_path, "{}", b"", header_len=1000)
    assert "past the end" in msg


def test_non_json_and_non_utf8(tmp_path):
    assert "not valid JSON" in _bad(tmp_path, "{not json}   ")
    assert "not valid UTF-8" in _bad(tmp_path, b"{\"\xff\xfe\": 1}  ")
    assert "must be a JSON object" in _bad(tmp_path, "[1, 2, 3]")
    assert "duplicate key" in _bad(
        tmp_path, '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                  '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', _f32(2))


def test_bad_metadata(tmp_path):
    assert "__metadata__" in _bad(tmp_path, {"__metadata__": {"a": 1}})
    assert "__metadata__" in _bad(tmp_path, {"__metadata__": ["x"]})


def test_unknown_dtype(tmp_path):
    msg = _bad(tmp_path, {"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, _f32(1))
    assert "'w'" in msg and "F33" in msg


@pytest.mark.parametrize("shape", [[-1], [1.5], "3", [True], None])
def test_bad_shape(tmp_path, shape):
    msg = _bad(tmp_path, {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}, _f32(1))
    assert "'w'" in msg


@pytest.mark.parametrize("offs", [[0], [0, 4, 8], [-4, 0], ["0", "4"], 4])
def test_bad_offsets(tmp_path, offs):
    msg = _bad(tmp_path, {"w": {"dtype": "F32", "shape": [1], "data_offsets": offs}}, _f32(1))
    assert "'w'" in msg and "data_offsets" in msg


def test_begin_after_end(tmp_path):
    msg = _bad(tmp_path, {"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, _f32(2))
    assert "begin > end" in msg


def test_wrong_byte_length(tmp_path):
    msg = _bad(tmp_path, {"w": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 24]}}, _f32(6))
    assert "'w'" in msg and "24 bytes" in msg and "needs 12" in msg


def test_out_of_file_range(tmp_path):
    msg = _bad(tmp_path, {"x": {"dtype": "F32", "shape": [100], "data_offsets": [100, 500]}}, b"\0" * 300)
    assert "tensor 'x' data [100, 500) extends past end of file (300 bytes of data)" in msg


def test_overlapping_ranges(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    msg = _bad(tmp_path, h, _f32(6))
    assert "overlaps" in msg and "'a'" in msg and "'b'" in msg
    # containment is an overlap too; zero-size tensors at a shared boundary are not
    h = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    assert "overlaps" in _bad(tmp_path, h, _f32(4))
    ok = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
          "e": {"dtype": "F32", "shape": [0], "data_offsets": [16, 16]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]}}
    p = raw_safetensors(tmp_path / "ok.safetensors", ok, _f32(5))
    assert list(read_header(p).tensors) == ["a", "e", "b"]


def test_entry_not_object(tmp_path):
    assert "'w'" in _bad(tmp_path, {"w": [1, 2]})
    assert "missing" in _bad(tmp_path, {"w": {"dtype": "F32", "shape": [1]}}, _f32(1))


# ------------------------------------------------------------------ speed


def test_500_tensor_header_is_fast(tmp_path):
    header, off = {}, 0
    for i in range(500):
        n = 4 * 64
        header[f"model.layers.{i // 10}.block.{i % 10}.weight"] = {
            "dtype": "F32", "shape": [8, 8], "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    p = raw_safetensors(tmp_path / "m.safetensors", header, b"\0" * off)
    read_header(p)
    best = min(_timed(read_header, p) for _ in range(20))
    assert len(read_header(p).tensors) == 500
    # ~1-2 ms on a free core; generous bound for a shared 2-core box
    assert best < 0.010, f"read_header on 500 tensors took {best * 1e3:.2f} ms"


def _timed(fn, *a):
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t

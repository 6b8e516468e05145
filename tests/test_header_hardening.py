"""Header hardening (issue #9): hostile safetensors headers end in a typed FormatError naming the
file and the value (CLI exit 2, registry unchanged), and header screening agrees with the
``safetensors`` library (documented differences in ckptreg/safetensors_io.py)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers_files import raw_safetensors
from safetensors import safe_open

from ckptreg.cli import main
from ckptreg.errors import FormatError
from ckptreg.registry import Registry
from ckptreg.safetensors_io import MAX_DEPTH, read_header

F32_1 = '"dtype":"F32","shape":[1],"data_offsets":[0,4]'


@pytest.fixture
def cli(db_path):
    runner = CliRunner()

    def run(*args):
        return runner.invoke(main, ["--db", str(db_path), *map(str, args)])

    return run


@pytest.fixture
def seeded(cli, db_path, tmp_path):
    """A registry holding one good checkpoint; returns its dump (to compare after a refusal)."""
    good = raw_safetensors(tmp_path / "good.safetensors", {"w": {"dtype": "F32", "shape": [1],
                                                               "data_offsets": [0, 4]}}, b"\0" * 4)
    r = cli("add", good, "--run", "r", "--step", "1")
    assert r.exit_code == 0, r.output
    return Registry(db_path).dump()


def _lib_accepts(path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return True
    except Exception:
        return False


# ------------------------------------------------------------------ item 9, through the CLI

HOSTILE = {
    # json.loads recursed ~1000 levels: RecursionError traceback
    "deep": ('{"a":{' + F32_1 + ',"x":' + "[" * 1000 + "]" * 1000 + "}}", b"\0" * 4,
             "nested more than 127 levels deep"),
    # zero-size tensor with a dimension >= 2^63: DuckDB ConversionException at add
    "bigdim": (json.dumps({"a": {"dtype": "F32", "shape": [0, 2 ** 63], "data_offsets": [0, 0]}}), b"",
               "dimension 9223372036854775808 in shape [0, 9223372036854775808] is larger than 2^63 - 1"),
    # lone surrogate escape in a tensor name: DuckDB InvalidInputException (cannot encode) at add
    "surrogate": ('{"\\ud800":{' + F32_1 + "}}", b"\0" * 4, "'\\ud800' holds a lone UTF-16 surrogate"),
    # 65 dimensions: accepted at add before
    "dims65": (json.dumps({"a": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}), b"\0" * 4,
               "tensor 'a': shape has 65 dimensions, at most 64 are supported"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header_is_format_error_exit_2(cli, db_path, tmp_path, seeded, case):
    header, data, expect = HOSTILE[case]
    p = raw_safetensors(tmp_path / f"{case}.safetensors", header, data)
    r = cli("add", p, "--run", "r", "--step", "2")
    assert r.exit_code == FormatError.exit_code, (r.exit_code, r.output, r.exception)
    assert r.output.startswith(f"error: {p}: "), r.output
    assert expect in r.output, r.output
    assert "Traceback" not in r.output
    assert Registry(db_path).dump() == seeded
    with pytest.raises(FormatError, match=str(p)):
        read_header(p)


def test_very_deep_header_never_reaches_the_json_parser(tmp_path):
    # 200k levels: the bounded depth scan refuses it before json.loads could recurse
    p = raw_safetensors(tmp_path / "d.safetensors", "[" * 200_000 + "]" * 200_000)
    with pytest.raises(FormatError, match="nested more than 127 levels deep"):
        read_header(p)
    p = raw_safetensors(tmp_path / "d.safetensors", '{"a":' + '[{"k":' * 100_000 + "1" + "}]" * 100_000 + "}")
    with pytest.raises(FormatError, match="nested more than 127 levels deep"):
        read_header(p)


def _nest(kind, n):
    """JSON with n nested containers."""
    opens = ["[" if kind == "array" or (kind == "mixed" and i % 2) else '{"k":' for i in range(n)]
    closes = ["]" if o == "[" else "}" for o in reversed(opens)]
    return "".join(opens) + "1" + "".join(closes)


@pytest.mark.parametrize("kind", ["array", "object", "mixed"])
def test_depth_limit_matches_the_library(tmp_path, kind):
    # total depth = header object + entry object + n containers in an unknown entry field
    for depth in (MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1):
        p = raw_safetensors(tmp_path / "d.safetensors",
                            '{"a":{' + F32_1 + ',"x":' + _nest(kind, depth - 2) + "}}", b"\0" * 4)
        assert _lib_accepts(p) == (depth <= MAX_DEPTH), depth
        if depth <= MAX_DEPTH:
            assert list(read_header(p).tensors) == ["a"]
        else:
            with pytest.raises(FormatError, match="nested more than 127 levels deep"):
                read_header(p)


# ------------------------------------------------------------------ item 11: agree with the library

REJECTED_BY_BOTH = {
    "gap": (json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                        "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}), b"\0" * 12,
            "tensor 'b' data [8, 12) leaves a gap: bytes [4, 8) of the data section after tensor 'a' belong to no tensor"),
    "trailing": (json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}), b"\0" * 9,
                 "5 trailing bytes after the last tensor: the data section is 9 bytes, the tensors cover [0, 4)"),
    "zero_size_inside": (json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                     "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}), b"\0" * 8,
                         "tensor 'e' data [4, 4) overlaps tensor 'a'"),
    "minus_zero": ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[-0,4]}}', b"\0" * 4,
                   "data_offsets must be [begin, end] non-negative integers, got [-0.0, 4]"),
    "minus_zero_dim": ('{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', b"",
                       "shape must be a list of non-negative integers, got [-0.0]"),
    "dup_field": ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"data_offsets":[4,8]}}', b"\0" * 8,
                  "duplicate key 'data_offsets'"),
    "dup_dtype": ('{"a":{"dtype":"F16","shape":[2],"dtype":"F32","data_offsets":[0,4]}}', b"\0" * 4,
                  "duplicate key 'dtype'"),
    "dup_metadata": ('{"__metadata__":{"x":"1"},"__metadata__":{"x":"2"},"a":{' + F32_1 + "}}", b"\0" * 4,
                     "duplicate key '__metadata__'"),
    "nan": ('{"a":{' + F32_1 + ',"x":NaN}}', b"\0" * 4, "NaN is not a JSON value"),
    "infinity": ('{"a":{' + F32_1 + ',"x":-Infinity}}', b"\0" * 4, "-Infinity is not a JSON value"),
    "overflowing_number": ('{"a":{' + F32_1 + ',"x":1e400}}', b"\0" * 4, "number 1e400 is out of range"),
    "offset_beyond_u64": ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551620]}}', b"\0" * 4,
                          "data_offsets must be [begin, end] non-negative integers, got [0, 1.8446744073709552e+19]"),
    "zero_size_product_overflow": (json.dumps({"a": {"dtype": "BF16", "shape": [3, 2 ** 63 - 1, 0],
                                                     "data_offsets": [0, 0]}}), b"",
                                   "the product of its non-zero dimensions is larger than 2^63 - 1"),
    "lone_trailing_surrogate_in_metadata": ('{"__metadata__":{"x":"\\udc00"},"a":{' + F32_1 + "}}", b"\0" * 4,
                                            "'\\udc00' holds a lone UTF-16 surrogate"),
}


@pytest.mark.parametrize("case", sorted(REJECTED_BY_BOTH))
def test_rejected_like_the_library(tmp_path, case):
    header, data, expect = REJECTED_BY_BOTH[case]
    p = raw_safetensors(tmp_path / "model.safetensors", header, data)
    assert not _lib_accepts(p), "the reference parser accepts it: not a rejection case"
    with pytest.raises(FormatError) as ei:
        read_header(p)
    assert str(ei.value).startswith(f"{p}: "), str(ei.value)
    assert expect in str(ei.value), str(ei.value)


ACCEPTED_BY_BOTH = {
    "unaligned": ('{"u":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
                  '"x":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}', b"\0" * 6),
    "zero_sized_at_ends": (json.dumps({"e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
                                       "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                       "z": {"dtype": "F32", "shape": [3, 0], "data_offsets": [4, 4]}}), b"\0" * 4),
    "minus_zero_in_unknown_field": ('{"a":{' + F32_1 + ',"x":-0}}', b"\0" * 4),
    "surrogate_pair": ('{"\\ud83d\\ude00":{' + F32_1 + "}}", b"\0" * 4),
    "escaped_key": ('{"a":{"dtype":"F32","shape":[1],"data\\u005foffsets":[0,4]}}', b"\0" * 4),
    "metadata_null": ('{"__metadata__":null,"a":{' + F32_1 + "}}", b"\0" * 4),
    "big_unknown_int": ('{"a":{' + F32_1 + ',"x":18446744073709551615,"y":-9223372036854775809}}', b"\0" * 4),
    "64_dims": (json.dumps({"a": {"dtype": "F32", "shape": [1] * 64, "data_offsets": [0, 4]}}), b"\0" * 4),
    "empty": ("{}", b""),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED_BY_BOTH))
def test_accepted_like_the_library(tmp_path, case):
    header, data = ACCEPTED_BY_BOTH[case]
    p = raw_safetensors(tmp_path / "model.safetensors", header, data)
    assert _lib_accepts(p)
    h = read_header(p)
    assert sum(t.nbytes for t in h.tensors.values()) == h.file_size - h.data_start


# Deliberate differences (documented above MAX_DEPTH in safetensors_io.py): stricter than the library.
STRICTER = {
    "dup_key_in_metadata": ('{"__metadata__":{"x":"1","x":"2"},"a":{' + F32_1 + "}}", b"\0" * 4,
                            "duplicate key 'x'"),
    "dup_unknown_field": ('{"a":{' + F32_1 + ',"x":1,"x":2}}', b"\0" * 4, "duplicate key 'x'"),
    "sub_byte_dtype": (json.dumps({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}), b"\0",
                       "unknown or unsupported dtype 'F4'"),
    "65_dims": HOSTILE["dims65"],
    "zero_size_product_overflow": (json.dumps({"a": {"dtype": "BF16", "shape": [0, 3, 2 ** 63 - 1],
                                                     "data_offsets": [0, 0]}}), b"",
                                   "the product of its non-zero dimensions is larger than 2^63 - 1"),
    # the old screen counted '"data_offsets"' substrings: bypassed by __metadata__ (one more
    # entry than data_offsets) and by a JSON escape in the key; the last copy silently won (as it does in the library)
    "dup_name_with_metadata": ('{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[1],'
                               '"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
                               b"\0" * 8, "duplicate key 'a'"),
    "dup_name_escaped_key": ('{"a":{"dtype":"F32","shape":[1],"data\\u005foffsets":[0,4]},'
                             '"a":{"dtype":"F32","shape":[2],"data\\u005foffsets":[0,8]}}',
                             b"\0" * 8, "duplicate key 'a'"),
}


@pytest.mark.parametrize("case", sorted(STRICTER))
def test_documented_stricter_than_the_library(tmp_path, case):
    header, data, expect = STRICTER[case]
    p = raw_safetensors(tmp_path / "model.safetensors", header, data)
    assert _lib_accepts(p)
    with pytest.raises(FormatError, match=None) as ei:
        read_header(p)
    assert expect in str(ei.value)


def test_500_tensor_header_stays_fast_with_escapes_and_metadata(tmp_path):
    # the parse hooks (duplicates, numbers) must not make ordinary headers slow
    import time

    header, off = {"__metadata__": {"format": "pt", "note": "caf\u00e9 -0 1e5"}}, 0
    for i in range(500):
        header[f"model.layers.{i}.w\u00e9ight"] = {"dtype": "F32", "shape": [8, 8], "data_offsets": [off, off + 256]}
        off += 256
    p = raw_safetensors(tmp_path / "m.safetensors", json.dumps(header), b"\0" * off)
    best = min(_timed(read_header, p) for _ in range(10))
    assert len(read_header(p).tensors) == 500
    assert best < 0.015, f"{best * 1e3:.1f} ms"


def _timed(fn, *a):
    import time

    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


# ------------------------------------------------------------------ item 13: sampled cheap fingerprint

MIB = 1 << 20


def _big_file(path, mib=12, seed=0):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(mib * MIB // 4, generator=g), "b": torch.randn(7, generator=g)}, str(path))
    return path


def _poke(path, offset, data: bytes):
    """Overwrite bytes in place, same size, mtime restored (what verify must still notice)."""
    import os

    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(len(data))
        assert old != data
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_verify_catches_a_block_changed_in_the_middle_of_a_big_tensor(cli, db_path, tmp_path):
    p = _big_file(tmp_path / "step-1.safetensors")
    assert cli("add", p, "--run", "r").exit_code == 0
    assert cli("verify").exit_code == 0
    h = read_header(p)
    mid = h.data_start + 5 * MIB + 4096  # a 1 MiB region in the middle: every sampled window of it changes
    _poke(p, mid, bytes(MIB))
    r = cli("verify")
    assert r.exit_code == 10, r.output
    assert "changed" in r.output and "r@1" in r.output


def test_sampled_fingerprint_sees_small_edits_spread_over_blocks(tmp_path):
    from ckptreg.formats import fingerprint

    p = _big_file(tmp_path / "m.safetensors", mib=16)
    fp = fingerprint([p])
    assert fp.startswith("v2:") and fingerprint([p]) == fp  # deterministic
    h = read_header(p)
    # 256 KiB changed in one middle block: caught with probability ~69 % per block; change the
    # same region in every middle block (14 blocks): missed with probability < 1e-7
    for blk in range(1, 15):
        _poke(p, h.data_start + blk * MIB + 300_000, bytes(256 * 1024))
    assert fingerprint([p]) != fp


def test_fingerprint_of_head_tail_and_small_files_is_exact(tmp_path):
    from ckptreg.formats import fingerprint

    p = _big_file(tmp_path / "m.safetensors", mib=12)
    h = read_header(p)
    for off in (h.data_start + 17, h.file_size - 3):
        fp = fingerprint([p])
        _poke(p, off, b"\x7f")
        assert fingerprint([p]) != fp, off
    small = _big_file(tmp_path / "s.safetensors", mib=3)  # <= 4 MiB of data: hashed whole
    fp = fingerprint([small])
    _poke(small, read_header(small).data_start + 2 * MIB + 12345, b"\x01")
    assert fingerprint([small]) != fp


def test_full_hash_scheme_is_unchanged(tmp_path):
    import hashlib
    import struct

    from ckptreg.formats import fingerprint

    p = _big_file(tmp_path / "m.safetensors", mib=2)
    data = p.read_bytes()
    want = hashlib.sha256(b"ckptreg-fp1-full\0" + b"m.safetensors\0" + struct.pack("<Q", len(data)) + data)
    assert fingerprint([p], full=True) == want.hexdigest()


def test_registry_with_old_style_fingerprints_keeps_verifying(cli, db_path, tmp_path):
    # a registry written before v2 stores the ckptreg-fp1 digest (64 hex, no prefix)
    import duckdb

    from ckptreg.formats import fingerprint_matches, fingerprint_v1

    p = _big_file(tmp_path / "step-1.safetensors", mib=6)
    assert cli("add", p, "--run", "r").exit_code == 0
    old = fingerprint_v1([p])
    assert len(old) == 64 and not old.startswith("v2:")
    con = duckdb.connect(str(db_path))
    con.execute("UPDATE checkpoints SET fingerprint = ?", [old])
    con.close()
    assert fingerprint_matches(old, [p])
    r = cli("verify")
    assert r.exit_code == 0, r.output
    Registry(db_path).check_unchanged("r@1")
    _poke(p, read_header(p).data_start + 10, b"\x00\x01\x02\x03")
    assert not fingerprint_matches(old, [p])
    assert cli("verify").exit_code == 10

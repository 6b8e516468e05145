"""Streaming writer: byte-exact safetensors output, chunked writes, order/size checks, atomicity, shards."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptreg.errors import FormatError, OutputExistsError
from ckptreg.writer import TMP_MARK, AtomicDir, ShardedWriter, StreamingWriter, build_header, write_file


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(2, 3, 4, generator=g).to(torch.float16),
        "d.int": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.scalar": torch.tensor(3.5, dtype=torch.float64),
        "f.empty": torch.zeros(0, 4),
        "g.bool": torch.tensor([True, False, True]),
    }


def _plan(t):
    from ckptreg.writer import dtype_str

    return [(k, dtype_str(v.dtype), tuple(v.shape)) for k, v in t.items()]


def _no_tmp(d):
    return [p for p in os.listdir(d) if TMP_MARK in p] == []


def test_roundtrip_loads_with_safetensors(tmp_path):
    t = _tensors()
    p = tmp_path / "out.safetensors"
    with StreamingWriter(p, _plan(t), {"k": "v", "ckptreg_recipe": json.dumps({"m": 1})}) as w:
        for k, v in t.items():
            w.write(k, v)
    back = load_file(str(p))
    assert list(back) == list(t) or set(back) == set(t)
    for k, v in t.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"k": "v", "ckptreg_recipe": json.dumps({"m": 1})}
    n = int.from_bytes(p.read_bytes()[:8], "little")
    assert (8 + n) % 8 == 0
    assert _no_tmp(tmp_path)


def test_chunked_equals_whole(tmp_path):
    x = torch.randn(1000, 33)
    y = torch.randn(17)
    plan = [("x", "F32", (1000, 33)), ("y", "F32", (17,))]
    p1, p2 = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    with StreamingWriter(p1, plan) as w:
        flat = x.reshape(-1)
        for s in range(0, flat.numel(), 4097):
            w.write_chunk("x", flat[s:s + 4097])
        w.write_chunk("y", y[:5])
        w.write_chunk("y", y[5:])
    write_file(p2, {"x": x, "y": y})
    assert p1.read_bytes() == p2.read_bytes()
    ref = tmp_path / "ref.safetensors"
    save_file({"x": x, "y": y}, str(ref))
    b = load_file(str(p1))
    assert torch.equal(b["x"], x) and torch.equal(b["y"], y)


def test_order_dtype_shape_size_errors_remove_tmp(tmp_path):
    plan = [("a", "F32", (4,)), ("b", "F32", (2,))]
    p = tmp_path / "o.safetensors"
    w = StreamingWriter(p, plan)
    with pytest.raises(FormatError, match="expected tensor 'a'"):
        w.write("b", torch.zeros(2))
    w.abort()
    assert not p.exists() and _no_tmp(tmp_path)

    for bad in [lambda w: w.write("a", torch.zeros(4, dtype=torch.float16)),
                lambda w: w.write("a", torch.zeros(5)),
                lambda w: w.write_chunk("a", torch.zeros(5)),
                lambda w: (w.write("a", torch.zeros(4)), w.write("b", torch.zeros(2)), w.write("c", torch.zeros(1)))]:
        with pytest.raises(FormatError):
            with StreamingWriter(p, plan) as w:
                bad(w)
        assert not p.exists() and _no_tmp(tmp_path)

    with pytest.raises(FormatError, match="before every tensor"):
        with StreamingWriter(p, plan) as w:
            w.write("a", torch.zeros(4))
    assert not p.exists() and _no_tmp(tmp_path)


def test_exception_in_block_aborts(tmp_path):
    p = tmp_path / "o.safetensors"
    with pytest.raises(RuntimeError):
        with StreamingWriter(p, [("a", "F32", (4,))]) as w:
            w.write_chunk("a", torch.zeros(2))
            raise RuntimeError("boom")
    assert not p.exists() and _no_tmp(tmp_path)


def test_overwrite_and_exists(tmp_path):
    p = tmp_path / "o.safetensors"
    write_file(p, {"a": torch.ones(2)})
    with pytest.raises(OutputExistsError):
        StreamingWriter(p, [("a", "F32", (2,))], overwrite=False)
    # a failed overwrite leaves the old file intact
    with pytest.raises(FormatError):
        with StreamingWriter(p, [("a", "F32", (2,))]) as w:
            w.write("a", torch.zeros(3))
    assert torch.equal(load_file(str(p))["a"], torch.ones(2))
    write_file(p, {"a": torch.zeros(2)})
    assert torch.equal(load_file(str(p))["a"], torch.zeros(2))


def test_header_matches_safetensors_alignment():
    hdr, offs = build_header([("a", "F32", (3,)), ("b", "F16", (1,))], {"x": "y"})
    assert len(hdr) % 8 == 0 and offs == [0, 12]
    with pytest.raises(FormatError):
        build_header([("a", "F32", (3,))], {"x": 1})
    with pytest.raises(FormatError):
        build_header([("a", "F32", (3,)), ("a", "F32", (3,))])


def test_sharded(tmp_path):
    t = {f"layer{i}.w": torch.randn(64, 32) for i in range(10)}  # 8 KiB each
    t["tiny"] = torch.randn(3)
    plan = _plan(t)
    out = tmp_path / "model"
    with ShardedWriter(out, plan, {"format": "pt"}, max_shard_bytes=20000) as w:
        for k, v in t.items():
            flat = v.reshape(-1)
            for s in range(0, flat.numel(), 1000):
                w.write_chunk(k, flat[s:s + 1000])
    files = sorted(os.listdir(out))
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) == 5 and shards[0] == "model-00001-of-00005.safetensors"
    assert files == sorted(shards + ["model.safetensors.index.json"])
    assert idx["metadata"]["total_size"] == sum(v.numel() * 4 for v in t.values())
    back = {}
    for s in shards:
        back.update(load_file(str(out / s)))
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) for k in t)
    assert _no_tmp(tmp_path)
    # the whole folder is atomic: a failure leaves nothing
    out2 = tmp_path / "model2"
    with pytest.raises(RuntimeError):
        with ShardedWriter(out2, plan, None, max_shard_bytes=20000) as w:
            for k, v in list(t.items())[:6]:
                w.write(k, v)
            raise RuntimeError("killed")
    assert not out2.exists() and _no_tmp(tmp_path)
    # overwrite swaps the folder
    with pytest.raises(OutputExistsError):
        ShardedWriter(out, plan, None, max_shard_bytes=20000)
    with ShardedWriter(out, plan[:1], None, max_shard_bytes=None, overwrite=True) as w:
        w.write(plan[0][0], t[plan[0][0]])
    assert sorted(os.listdir(out)) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    assert _no_tmp(tmp_path)


def test_atomic_dir(tmp_path):
    d = tmp_path / "adapter"
    with AtomicDir(d) as a:
        a.write_text("adapter_config.json", "{}")
        write_file(a.file("adapter_model.safetensors"), {"x": torch.ones(1)})
    assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(OutputExistsError):
        AtomicDir(d)
    with AtomicDir(d, overwrite=True) as a:
        a.write_text("only.txt", "x")
    assert os.listdir(d) == ["only.txt"] and _no_tmp(tmp_path)

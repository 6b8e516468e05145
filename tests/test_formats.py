"""formats: layout detection, LoRA config, sharded index validation, pickles, steps, fingerprints."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from helpers_files import (
    random_full_state,
    random_lora_state,
    raw_safetensors,
    write_hf_model,
    write_peft_adapter,
)
from safetensors.torch import save_file

from ckptreg.errors import FormatError, NotFoundError
from ckptreg.formats import CheckpointInfo, fingerprint, infer_step, inspect, load_pickle_state

# ------------------------------------------------------------------ PEFT


def test_peft_adapter(tmp_path):
    d = write_peft_adapter(tmp_path / "ad", 1, r=8, alpha=16, target_modules=("v_proj", "q_proj"),
                           base_model="org/tiny")
    (d / "README.md").write_text("hi")
    (d / "tokenizer.json").write_text("{}")
    (d / "optimizer.pt").write_bytes(b"x")
    (d / "trainer_state.json").write_text("{}")
    info = inspect(d)
    assert isinstance(info, CheckpointInfo)
    assert (info.format, info.kind, info.base_model) == ("peft", "lora", "org/tiny")
    assert info.path == str(d.resolve())
    assert info.files == [str((d / "adapter_model.safetensors").resolve())]
    assert info.lora == {"r": 8, "lora_alpha": 16, "use_rslora": False,
                         "target_modules": ["q_proj", "v_proj"], "scaling": 2.0}
    ref = random_lora_state(1, 2, 32, 8)
    assert list(info.tensors) == sorted(ref)
    assert info.n_params == sum(t.numel() for t in ref.values())
    assert info.nbytes == 4 * info.n_params
    assert info.n_tensors == len(ref)
    assert [os.path.basename(f) for f in info.config_files] == ["README.md", "adapter_config.json",
                                                               "tokenizer.json"]
    assert len(info.fingerprint) == 64


def test_rslora_scaling_and_patterns(tmp_path):
    d = write_peft_adapter(tmp_path / "ad", 2, r=16, alpha=8, use_rslora=True,
                           extra_config={"rank_pattern": {"q_proj": 4}, "target_modules": "all-linear"})
    info = inspect(d)
    assert info.lora["scaling"] == pytest.approx(8 / 4.0)
    assert info.lora["use_rslora"] is True
    assert info.lora["rank_pattern"] == {"q_proj": 4}
    assert info.lora["target_modules"] == "all-linear"


def test_peft_bad_config(tmp_path):
    d = write_peft_adapter(tmp_path / "ad", 3)
    (d / "adapter_config.json").write_text("{broken")
    with pytest.raises(FormatError, match="adapter_config.json.*not valid JSON"):
        inspect(d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 0, "lora_alpha": 8}))
    with pytest.raises(FormatError, match="'r' must be a positive integer"):
        inspect(d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(FormatError, match="IA3"):
        inspect(d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    os.remove(d / "adapter_model.safetensors")
    with pytest.raises(FormatError, match="no adapter_model.safetensors"):
        inspect(d)


def test_peft_corrupt_tensor_file_names_file(tmp_path):
    d = write_peft_adapter(tmp_path / "ad", 3)
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(FormatError, match="adapter_model.safetensors.*extends past end of file"):
        inspect(d)


# ------------------------------------------------------------------ HF folders


def test_hf_single(tmp_path):
    sd = random_full_state(0)
    d = write_hf_model(tmp_path / "m", sd, name_or_path="meta/tiny")
    (d / "generation_config.json").write_text("{}")
    (d / "special_tokens_map.json").write_text("{}")
    (d / "merges.txt").write_text("")
    (d / "vocab.json").write_text("{}")
    (d / "training_args.bin").write_bytes(b"x")
    (d / "rng_state.pth").write_bytes(b"x")
    (d / "scheduler.pt").write_bytes(b"x")
    info = inspect(d)
    assert (info.format, info.kind, info.base_model, info.lora) == ("hf", "full", "meta/tiny", None)
    assert list(info.tensors) == sorted(sd)
    assert info.n_params == sum(t.numel() for t in sd.values())
    assert sorted(os.path.basename(f) for f in info.config_files) == [
        "config.json", "generation_config.json", "merges.txt", "special_tokens_map.json", "vocab.json"]


def test_hf_no_name_or_path(tmp_path):
    d = write_hf_model(tmp_path / "m", random_full_state(0), config={"model_type": "gpt2"})
    assert inspect(d).base_model is None


def test_hf_sharded(tmp_path):
    sd = random_full_state(0, n_layers=3)
    d = write_hf_model(tmp_path / "m", sd, shards=3)
    info = inspect(d)
    assert info.format == "hf" and len(info.files) == 3
    assert list(info.tensors) == sorted(sd)
    for name, ti in info.tensors.items():
        assert ti.numel == sd[name].numel()
    single = inspect(write_hf_model(tmp_path / "s", sd))
    assert single.n_params == info.n_params and single.nbytes == info.nbytes
    assert "model.safetensors.index.json" not in [os.path.basename(f) for f in info.config_files]


def test_hf_sharded_broken_index(tmp_path):
    sd = random_full_state(0, n_layers=3)
    d = write_hf_model(tmp_path / "m", sd, shards=2)
    idx_p = d / "model.safetensors.index.json"
    idx = json.loads(idx_p.read_text())
    # a missing shard
    os.rename(d / "model-00002-of-00002.safetensors", tmp_path / "moved.safetensors")
    with pytest.raises(FormatError, match="model-00002-of-00002.safetensors.*do not exist|do not exist.*00002"):
        inspect(d)
    os.rename(tmp_path / "moved.safetensors", d / "model-00002-of-00002.safetensors")
    inspect(d)
    # a tensor listed in the wrong shard
    bad = json.loads(json.dumps(idx))
    name = next(k for k, v in bad["weight_map"].items() if v.startswith("model-00001"))
    bad["weight_map"][name] = "model-00002-of-00002.safetensors"
    idx_p.write_text(json.dumps(bad))
    with pytest.raises(FormatError, match=f"{name}.*found in model-00001"):
        inspect(d)
    # a tensor not in any shard
    bad = json.loads(json.dumps(idx))
    bad["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    idx_p.write_text(json.dumps(bad))
    with pytest.raises(FormatError, match="ghost.weight.*not in any shard"):
        inspect(d)
    # path escaping the folder, no weight_map, bad JSON
    bad = json.loads(json.dumps(idx))
    bad["weight_map"][name] = "../m/model-00001-of-00002.safetensors"
    idx_p.write_text(json.dumps(bad))
    with pytest.raises(FormatError, match="invalid shard name"):
        inspect(d)
    idx_p.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(FormatError, match="weight_map"):
        inspect(d)
    idx_p.write_text("{nope")
    with pytest.raises(FormatError, match="index.json.*not valid JSON"):
        inspect(d)


def test_duplicate_tensor_across_shards(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"a": torch.zeros(2)}, str(d / "s1.safetensors"))
    save_file({"a": torch.zeros(2)}, str(d / "s2.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "s1.safetensors"}}))
    # s2 is not listed, so only s1 is read: fine
    assert list(inspect(d).tensors) == ["a"]
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(FormatError, match="'a' is also in"):
        inspect(d)


# ------------------------------------------------------------------ trainer checkpoint folders


def test_trainer_checkpoint_folder(tmp_path):
    ck = write_peft_adapter(tmp_path / "out" / "checkpoint-40", 4)
    (ck / "optimizer.pt").write_bytes(b"\0" * 100)
    (ck / "trainer_state.json").write_text("{}")
    info = inspect(ck)
    assert info.kind == "lora" and infer_step(ck) == 40
    assert "optimizer.pt" not in " ".join(info.config_files)
    # adapter in a named sub-folder
    ck2 = tmp_path / "out" / "checkpoint-80"
    write_peft_adapter(ck2 / "my_adapter", 5)
    (ck2 / "trainer_state.json").write_text("{}")
    info2 = inspect(ck2)
    assert info2.kind == "lora" and info2.path == str(ck2.resolve())
    assert info2.files[0].endswith("my_adapter/adapter_model.safetensors")
    # the output folder itself is not one checkpoint
    with pytest.raises(FormatError, match="2 checkpoint folders"):
        inspect(tmp_path / "out")


def test_unknown_folder_and_file(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(FormatError, match="expected a PEFT adapter folder"):
        inspect(d)
    f = tmp_path / "x.txt"
    f.write_text("hello")
    with pytest.raises(FormatError, match="x.txt: unknown file type"):
        inspect(f)
    with pytest.raises(NotFoundError, match="nothere"):
        inspect(tmp_path / "nothere")


def test_folder_with_one_safetensors(tmp_path):
    d = tmp_path / "lora"
    d.mkdir()
    save_file(random_lora_state(0, 1, 8, 2), str(d / "pytorch_lora_weights.safetensors"))
    info = inspect(d)
    assert (info.format, info.kind) == ("safetensors", "lora")


# ------------------------------------------------------------------ single files


def test_single_safetensors_kind(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file(random_lora_state(0, 1, 8, 2), str(p))
    info = inspect(p)
    assert (info.format, info.kind, info.lora) == ("safetensors", "lora", None)
    q = tmp_path / "b.safetensors"
    save_file(random_full_state(0, 1), str(q))
    assert inspect(q).kind == "full"
    # the adapter file of a PEFT folder picks up its sibling config
    d = write_peft_adapter(tmp_path / "ad", 1, r=4, alpha=4)
    assert inspect(d / "adapter_model.safetensors").lora["scaling"] == 1.0


def test_empty_safetensors(tmp_path):
    p = raw_safetensors(tmp_path / "e.safetensors", {})
    with pytest.raises(FormatError, match="no tensors"):
        inspect(p)


def test_bf16_and_f16_inventory(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(3, 4, dtype=torch.bfloat16), "y": torch.zeros(5, dtype=torch.float16)}, str(p))
    info = inspect(p)
    assert info.tensors["x"].dtype == "BF16" and info.tensors["y"].dtype == "F16"
    assert info.nbytes == 24 + 10


# ------------------------------------------------------------------ pickles


def test_pickle_needs_allow(tmp_path):
    p = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, p)
    with pytest.raises(FormatError, match="--allow-pickle"):
        inspect(p)
    d = tmp_path / "hfbin"
    d.mkdir()
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
    with pytest.raises(FormatError, match="--allow-pickle"):
        inspect(d)
    assert inspect(d, allow_pickle=True).format == "hf"


def test_pickle_state_dict_and_lightning(tmp_path):
    sd = random_full_state(1, 1)
    p = tmp_path / "epoch=2-step=1000.ckpt"
    torch.save({"epoch": 2, "global_step": 1000, "state_dict": sd, "optimizer_states": [{"state": {}}]}, p)
    info = inspect(p, allow_pickle=True)
    assert (info.format, info.kind) == ("pickle", "full")
    assert list(info.tensors) == sorted(sd)
    ti = info.tensors["model.embed_tokens.weight"]
    assert ti.offset == -1 and ti.is_pickle and ti.nbytes == ti.numel * 4 and ti.file == str(p.resolve())
    assert infer_step(p) == 1000
    loaded = load_pickle_state(p)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    # plain state dict, nested dict flattened
    q = tmp_path / "plain.bin"
    torch.save({"enc": {"w": torch.ones(2, 3, dtype=torch.bfloat16)}, "b": torch.zeros(1), "n": 3}, q)
    inf2 = inspect(q, allow_pickle=True)
    assert set(inf2.tensors) == {"enc.w", "b"} and inf2.tensors["enc.w"].dtype == "BF16"


def test_pickle_with_code_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "obj": _Custom()}, p)
    with pytest.raises(FormatError, match="weights_only"):
        inspect(p, allow_pickle=True)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(FormatError, match="junk.pt"):
        inspect(junk, allow_pickle=True)
    empty = tmp_path / "nothing.pt"
    torch.save({"a": 1}, empty)
    with pytest.raises(FormatError, match="no tensors"):
        inspect(empty, allow_pickle=True)


class _Custom:
    pass


def test_legacy_pickle_format(tmp_path):
    p = tmp_path / "old.bin"
    sd = {"w": torch.randn(3, 2), "b": torch.zeros(2, dtype=torch.float16)}
    torch.save(sd, p, _use_new_zipfile_serialization=False)  # not mmap-able: plain load
    info = inspect(p, allow_pickle=True)
    assert {k: (t.dtype, t.shape) for k, t in info.tensors.items()} == {"b": ("F16", (2,)), "w": ("F32", (3, 2))}
    assert torch.equal(load_pickle_state(p)["w"], sd["w"])


# ------------------------------------------------------------------ steps


@pytest.mark.parametrize("path,step", [
    ("checkpoint-1000", 1000), ("out/checkpoint-1000", 1000), ("step=1000", 1000),
    ("epoch=2-step=1000.ckpt", 1000), ("step_1000", 1000), ("global_step1000", 1000),
    ("step-7.safetensors", 7), ("out/checkpoint-50/adapter_model.safetensors", 50),
    ("model_step1000.pt", 1000), ("ckpt-12", 12),
    ("last.ckpt", None), ("epoch=3.ckpt", None), ("model.safetensors", None), ("run3", None),
    ("adapter", None), ("stepper", None),
])
def test_infer_step(path, step):
    assert infer_step(path) == step


# ------------------------------------------------------------------ fingerprint


def test_fingerprint_catches_edits(tmp_path):
    big = {"a": torch.zeros(1_000_000), "b": torch.zeros(300_000)}  # > 2 MiB data section
    p = tmp_path / "model.safetensors"
    save_file(big, str(p))
    base = fingerprint([p])
    assert base == fingerprint([str(p)]) == inspect(p).fingerprint
    raw = bytearray(p.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]

    def edited(pos, val=1):
        b = bytearray(raw)
        b[pos] ^= val
        p.write_bytes(bytes(b))
        return fingerprint([p]), fingerprint([p], full=True)

    full0 = fingerprint([p], full=True)
    assert edited(8 + n + 10) != (base, full0)           # first MiB of data
    f_last = edited(len(raw) - 5)
    assert f_last[0] != base and f_last[1] != full0      # last MiB of data
    f_mid = edited(8 + n + 3 * (1 << 20) // 2)            # middle: only the full hash sees it
    assert f_mid[0] == base and f_mid[1] != full0
    p.write_bytes(bytes(raw) + b"\0")                    # size
    assert fingerprint([p]) != base
    p.write_bytes(bytes(raw))
    assert fingerprint([p]) == base and fingerprint([p], full=True) == full0


def test_fingerprint_header_and_move(tmp_path):
    p = tmp_path / "a" / "model.safetensors"
    p.parent.mkdir()
    save_file({"a": torch.zeros(4)}, str(p), metadata={"x": "1"})
    f1 = fingerprint([p])
    save_file({"a": torch.zeros(4)}, str(p), metadata={"x": "2"})  # same data, other header
    assert fingerprint([p]) != f1
    save_file({"a": torch.zeros(4)}, str(p), metadata={"x": "1"})
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    assert fingerprint([tmp_path / "b" / "model.safetensors"]) == f1  # location does not matter


def test_fingerprint_order_and_missing(tmp_path):
    d = write_hf_model(tmp_path / "m", random_full_state(0, 3), shards=2)
    files = sorted(d.glob("model-*.safetensors"))
    assert fingerprint(files) == fingerprint(files[::-1])
    assert fingerprint(files) != fingerprint(files[:1])
    with pytest.raises(NotFoundError, match="gone.safetensors"):
        fingerprint([tmp_path / "gone.safetensors"])
    # a pickle and a corrupt safetensors file can still be fingerprinted
    q = tmp_path / "x.safetensors"
    q.write_bytes(b"\xff" * 20)
    assert len(fingerprint([q])) == 64


def test_inspect_does_not_import_torch_for_safetensors(tmp_path):
    d = write_peft_adapter(tmp_path / "ad", 1)
    h = write_hf_model(tmp_path / "m", random_full_state(0), shards=2)
    code = ("import sys, ckptreg.formats as f; "
            f"f.inspect({str(d)!r}); f.inspect({str(h)!r}); f.fingerprint(f.inspect({str(h)!r}).files); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)

"""Writers of real checkpoint files for tests (PEFT adapters, HF folders, raw safetensors bytes).

Reusable by every test module: ``from helpers_files import write_peft_adapter, ...``.
"""
from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_TARGETS = ("q_proj", "v_proj")


def random_lora_state(seed, n_layers=2, d=32, r=8, dtype=torch.float32, target_modules=DEFAULT_TARGETS,
                      k=None):
    """PEFT-named LoRA tensors: ``lora_A`` [r, k], ``lora_B`` [d, r] per layer and target module."""
    g = torch.Generator().manual_seed(int(seed))
    k = d if k is None else k
    out = {}
    for i in range(n_layers):
        for m in target_modules:
            pre = f"base_model.model.model.layers.{i}.self_attn.{m}"
            out[f"{pre}.lora_A.weight"] = (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype)
            out[f"{pre}.lora_B.weight"] = (torch.randn(d, r, generator=g) * 0.01).to(dtype)
    return out


def write_peft_adapter(dir, tensors_or_seed, r=8, alpha=16, target_modules=DEFAULT_TARGETS,
                       base_model="tiny", use_rslora=False, n_layers=2, d=32, dtype=torch.float32,
                       extra_config=None):
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``dir``; returns the folder."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    if isinstance(tensors_or_seed, int):
        tensors = random_lora_state(tensors_or_seed, n_layers, d, r, dtype, target_modules)
    else:
        tensors = tensors_or_seed
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "use_rslora": use_rslora,
        "target_modules": list(target_modules),
        "base_model_name_or_path": base_model,
        "bias": "none",
    }
    cfg.update(extra_config or {})
    (dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return dir


def random_full_state(seed, n_layers=2, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(int(seed))
    out = {"model.embed_tokens.weight": torch.randn(50, d, generator=g).to(dtype)}
    for i in range(n_layers):
        out[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(2 * d, d, generator=g).to(dtype)
        out[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(d, 2 * d, generator=g).to(dtype)
        out[f"model.layers.{i}.norm.weight"] = torch.ones(d, dtype=dtype)
    return out


def write_hf_model(dir, tensors, shards=1, config=None, name_or_path="tiny-base"):
    """Write an HF model folder: ``config.json`` and ``model.safetensors`` (shards == 1) or
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``. Returns the folder."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "llama", "_name_or_path": name_or_path} if config is None else config
    (dir / "config.json").write_text(json.dumps(cfg, indent=2))
    names = sorted(tensors)
    if shards <= 1:
        save_file({k: tensors[k].contiguous() for k in names}, str(dir / "model.safetensors"),
                  metadata={"format": "pt"})
        return dir
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, str(dir / fn), metadata={"format": "pt"})
        for k in part:
            weight_map[k] = fn
            total += tensors[k].numel() * tensors[k].element_size()
    (dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return dir


def raw_safetensors(path, header, data: bytes = b"", header_len=None, pad=True):
    """Write a safetensors file from a header dict (or raw bytes/str) and data bytes, exactly.
    ``header_len`` overrides the 8-byte length prefix (to forge bad files)."""
    if isinstance(header, dict):
        hb = json.dumps(header, separators=(",", ":")).encode()
    elif isinstance(header, str):
        hb = header.encode()
    else:
        hb = bytes(header)
    if pad and isinstance(header, dict):
        hb += b" " * ((-len(hb)) % 8)
    n = len(hb) if header_len is None else header_len
    Path(path).write_bytes(struct.pack("<Q", n) + hb + data)
    return Path(path)


@contextlib.contextmanager
def mounted_tmpfs(where, size="4m", fill=False, options=None):
    """A REAL tmpfs of ``size`` mounted at the new folder ``where`` for a test (root only; the
    test is skipped with the reason otherwise), unmounted afterwards. ``options``: the whole
    ``mount -o`` string instead (e.g. ``"ro,size=1m"``). ``fill``: written full (until ENOSPC)
    before it is handed out."""
    import os
    import subprocess

    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = Path(where)
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options or f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        if fill:
            fill_filesystem(where)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill_filesystem(folder) -> Path:
    """Fill the filesystem of ``folder`` until a write fails with ENOSPC; the filler's path."""
    p = Path(folder) / "filler"
    with open(p, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == 28
    return p

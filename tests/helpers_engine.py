"""Fixtures for the engine/sweep/CLI tests: real registries with real checkpoint files."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ckptreg.registry import Registry
from helpers_files import random_full_state, random_lora_state, write_hf_model, write_peft_adapter


def load_any(path) -> dict:
    """All tensors of a safetensors file / PEFT folder / HF folder (sharded or not)."""
    p = Path(path)
    if p.is_file():
        return load_file(str(p))
    out = {}
    for f in sorted(p.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def make_lora_run(tmp_path, run="sft", steps=(10, 20, 30, 40, 50, 60), losses=None, r=4, alpha=8, d=24,
                  n_layers=2, dtype=torch.float32, db=None, use_rslora=False, extra=None):
    """A registry with one PEFT adapter per step (metrics train_loss, gsm8k, gsmplus)."""
    reg = Registry(db or tmp_path / "reg.duckdb")
    losses = losses or [1.0 / (1 + 0.1 * i) + 0.01 * ((i * 7) % 3) for i in range(len(steps))]
    for i, (s, l) in enumerate(zip(steps, losses)):
        t = random_lora_state(100 + i, n_layers=n_layers, d=d, r=r, dtype=dtype)
        if extra:
            t.update({k: v.clone() + i for k, v in extra.items()})
        folder = write_peft_adapter(tmp_path / run / f"checkpoint-{s}", t, r=r, alpha=alpha, d=d,
                                    use_rslora=use_rslora)
        reg.add(folder, run=run, step=s, metrics={"train_loss": l, "gsm8k": 0.2 + 0.01 * i,
                                                   "gsmplus": 0.1 + 0.005 * ((i * 5) % 4)})
    return reg


def make_full_run(tmp_path, run="full", steps=(100, 200, 300, 400), shards=1, dtype=torch.float32, d=16, db=None):
    reg = Registry(db or tmp_path / "reg.duckdb")
    for i, s in enumerate(steps):
        t = random_full_state(10 + i, d=d, dtype=dtype)
        folder = write_hf_model(tmp_path / run / f"checkpoint-{s}", t, shards=shards)
        reg.add(folder, run=run, step=s, metrics={"train_loss": 2.0 - 0.1 * i})
    return reg


def make_file_run(tmp_path, tensors_list, run="files", steps=None, db=None):
    reg = Registry(db or tmp_path / "reg.duckdb")
    steps = steps or [10 * (i + 1) for i in range(len(tensors_list))]
    for t, s in zip(tensors_list, steps):
        p = tmp_path / run / f"step_{s}.safetensors"
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file(t, str(p))
        reg.add(p, run=run, step=s, metrics={"train_loss": 1.0 + 1.0 / s})
    return reg


def close(a, b, rtol=1e-5, atol=1e-6) -> bool:
    return torch.allclose(a.to(torch.float64), b.to(torch.float64), rtol=rtol, atol=atol)


def max_rel(a, b) -> float:
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    return float((a - b).abs().max() / max(1e-12, float(b.abs().max())))


__all__ = ["load_any", "make_lora_run", "make_full_run", "make_file_run", "close", "max_rel", "math"]

"""Helpers for the tests run on both registry backends (DuckDB file, PostgreSQL database):
a small real registry with every kind of row, and a backend-neutral snapshot of it read through
the library (what a user sees), for comparing two registries."""
from __future__ import annotations

from pathlib import Path

from helpers_files import random_full_state, write_hf_model

from ckptreg.registry import Registry


def open_registry(loc, **kw) -> Registry:
    kw.setdefault("lock_timeout", 20.0)
    return Registry(loc, **kw)


def full_file(path, seed, d=8) -> Path:
    """A small real full-model .safetensors file (safetensors.torch.save_file)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in random_full_state(seed, n_layers=1, d=d).items()}, str(path),
              metadata={"format": "pt"})
    return path


def populate(reg: Registry, folder, run="a", seed0=0) -> dict:
    """Every kind of row: three plain checkpoints with metrics (one logged twice: history), tags,
    run params, a real linear merge of two of them (lineage), a user alias, and a removed
    checkpoint (its id survives in the events). Returns {"merged": Checkpoint, "removed_id": int}."""
    import ckptreg

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for i, step in enumerate((100, 200, 300)):
        hf = write_hf_model(folder / f"{run}-checkpoint-{step}", random_full_state(seed0 + i, n_layers=1, d=8))
        ids.append(reg.add(hf, run, step=step, metrics={"loss": 1.0 / (i + 1), "acc": 0.5 + i / 10},
                           tags={"seed": str(seed0)}))
    reg.log(f"{run}@200", {"loss": 0.4}, step=250)
    reg.log(f"{run}@200", {"nan_metric": float("nan")})
    reg.set_run_params(run, {"lr": 1e-4, "git": "abc123"})
    merged = ckptreg.merge(reg, [f"{run}@100", f"{run}@200"], method="linear", weights=[0.25, 0.75],
                           name="avg", out=folder / f"{run}-avg")
    reg.alias(f"{run}@200", "prod")
    reg.tag(f"{run}@100", {"stage": "eval"})
    removed = reg.get(f"{run}@300").id
    reg.rm([f"{run}@300"])
    return {"merged": merged, "removed_id": removed, "ids": ids}


def _num(v):
    return "nan" if isinstance(v, float) and v != v else v


def snapshot(reg: Registry) -> dict:
    """What the library shows of a registry, backend-neutral (ids included: a migrate keeps them)."""
    cks = reg.checkpoints()
    out = {
        "checkpoints": [(c.id, c.ref, c.run, c.step, c.name, c.path, c.format, c.kind, c.n_tensors, c.n_params,
                         c.nbytes, c.fingerprint, c.created, c.merged, c.tags,
                         {k: _num(v) for k, v in sorted(c.metrics.items())}) for c in cks],
        "lineage": {c.ref: reg.lineage(c.id) for c in cks if c.merged},
        "inventory": {c.ref: sorted((n, t.dtype, tuple(t.shape), t.nbytes) for n, t in reg.inventory(c.id).items())
                      for c in cks},
        "aliases": [(a["ref"], a["id"], a["target"]) for a in reg.aliases()],
        "history": [(e["seq"], e["time"], e["op"], e["run"], e["checkpoint_id"], e["ref"], e["host"], e["user"],
                     e["pid"]) for e in reg.history()],
        "runs": [(r["run"], r["n"], r["n_merged"], r["first_step"], r["last_step"], r["final_id"], r["params"])
                 for r in reg.runs()],
        "params": {r: reg.run_params(r) for r in {c.run for c in cks}},
    }
    return out

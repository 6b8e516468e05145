"""The plan of a merge: every input's (and the base's) tensor names, shapes and dtypes, checked
equal before any data is read. Built from the registry's stored inventory
(``Registry.inventory``) of checkpoints whose fingerprint was just checked, so no input header is
read again; headers are read only for what the writer needs (config files of folder outputs:
:func:`writer_info`) and for checkpoints the registry does not know."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import MismatchError, ParameterError

# ------------------------------------------------------------------------------------------------
# planning

@dataclass
class Plan:
    """What every input holds (validated equal) and how to read it."""

    names: list[str]
    dtypes: dict[str, str]
    shapes: dict[str, tuple]
    infos: list                       # CheckpointInfo of each input
    base_info: object | None = None   # CheckpointInfo of the base
    refs: list[str] = field(default_factory=list)

    @property
    def entries(self) -> list[tuple]:
        return [(n, self.dtypes[n], self.shapes[n]) for n in self.names]

    def numel(self, name) -> int:
        return math.prod(self.shapes[name]) if self.shapes[name] else 1

    @property
    def largest(self) -> int:
        return max((self.numel(n) for n in self.names), default=0)

    @property
    def nbytes(self) -> int:
        from ..writer import tensor_nbytes

        return sum(tensor_nbytes(self.dtypes[n], self.shapes[n]) for n in self.names)


def _ref(c) -> str:
    r = getattr(c, "ref", None)
    if r:
        return str(r)
    return str(getattr(c, "path", c))


def _from_registry(registry, c):
    """A CheckpointInfo of registered checkpoint ``c`` from its stored inventory (no file read);
    None when ``c`` is not a registered Checkpoint."""
    inv = getattr(registry, "inventory", None)
    if inv is None or getattr(c, "id", None) is None or not hasattr(c, "fingerprint") or not hasattr(c, "files"):
        return None
    from pathlib import Path

    from ..formats import CheckpointInfo, _lora_config

    tensors = inv(c.id)
    if not tensors:
        return None
    lora = c.lora
    cfg = Path(str(c.path)) / "adapter_config.json"
    if c.format == "peft" and cfg.is_file():
        # the scaling is not in the fingerprint (tensor files only): read the adapter's config as
        # it is now, validated (FormatError naming the file), never a stale registered copy
        lora = _lora_config(cfg)[0]
    return CheckpointInfo(path=str(c.path), format=c.format, kind=c.kind, files=list(c.files), tensors=tensors,
                          n_params=int(c.n_params), nbytes=int(c.nbytes), fingerprint=c.fingerprint,
                          base_model=c.base_model, lora=lora, config_files=list(c.config_files or []))


def info_of(registry, c):
    """The CheckpointInfo of ``c``: the registry's inventory, else the headers."""
    got = _from_registry(registry, c) if registry is not None else None
    return got if got is not None else _inspect(c)


def writer_info(info):
    """``info`` with the config files and metadata as they are on disk now (one header read of a
    folder input), for the writer that copies them into a folder output."""
    if info.format not in ("peft", "hf"):
        return info
    from .. import formats

    pickled = any(str(f).lower().endswith(formats.PICKLE_SUFFIXES) for f in info.files)
    return formats.inspect(info.path, allow_pickle=pickled)


def _inspect(c):
    from .. import formats

    # a checkpoint registered from a pickle was trusted at registration (allow_pickle there)
    pickled = getattr(c, "format", None) == "pickle" or any(
        str(f).lower().endswith(formats.PICKLE_SUFFIXES) for f in (getattr(c, "files", None) or []))
    return formats.inspect(c.path, allow_pickle=pickled)


def plan(registry, inputs, base=None, shape_key=None) -> Plan:
    """Check that every input (and the base) has the same tensor names, shapes and dtypes
    (shapes compared as ``shape_key(name, shape)`` when given: LoRA update space lets the rank
    dimension differ, :func:`ckptreg.merge.delta.plan_lora`).

    Reads the registry's inventory (headers only for checkpoints it does not know; call after
    the fingerprint check). Raises ONE MismatchError listing every difference (capped at 50 lines
    with a count of the rest) before any tensor data is read."""
    inputs = list(inputs)
    if not inputs:
        raise ParameterError("a merge needs at least one input checkpoint")
    infos = [info_of(registry, c) for c in inputs]
    base_info = info_of(registry, base) if base is not None else None
    refs = [_ref(c) for c in inputs]
    all_infos = infos + ([base_info] if base_info is not None else [])
    all_refs = refs + ([f"base {_ref(base)}"] if base is not None else [])
    ref0 = infos[0].tensors
    problems: list[str] = []
    for info, ref in zip(all_infos[1:], all_refs[1:]):
        t = info.tensors
        missing = [n for n in ref0 if n not in t]
        extra = [n for n in t if n not in ref0]
        if missing:
            problems.append(f"{ref}: missing {len(missing)} tensor(s) that {all_refs[0]} has: "
                            + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        if extra:
            problems.append(f"{ref}: has {len(extra)} tensor(s) that {all_refs[0]} lacks: "
                            + ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else ""))
        for n, ti in ref0.items():
            o = t.get(n)
            if o is None:
                continue
            if (shape_key(n, o.shape) != shape_key(n, ti.shape) if shape_key is not None
                    else tuple(o.shape) != tuple(ti.shape)):
                problems.append(f"{ref}: tensor {n!r} has shape {list(o.shape)}, {all_refs[0]} has {list(ti.shape)}")
            if o.dtype != ti.dtype:
                problems.append(f"{ref}: tensor {n!r} has dtype {o.dtype}, {all_refs[0]} has {ti.dtype}")
    kinds = {i.kind for i in all_infos}
    if len(kinds) > 1:
        problems.append("inputs mix LoRA adapters and full models: "
                        + ", ".join(f"{r}={i.kind}" for r, i in zip(all_refs, all_infos)))
    if problems:
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise MismatchError(f"inputs do not match ({len(problems)} problem(s)):\n  " + "\n  ".join(shown) + more)
    names = sorted(ref0)
    return Plan(names=names, dtypes={n: ref0[n].dtype for n in names},
                shapes={n: tuple(ref0[n].shape) for n in names}, infos=infos, base_info=base_info, refs=refs)


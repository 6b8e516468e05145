"""Output targets: layouts and paths (:func:`default_out`, :func:`check_layout`), the atomic
:class:`Output`, target locks (:class:`Locks`), the refusals before a byte is written
(:func:`check_target`), the stored recipe and lineage, the up-to-date check and registration."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from ..errors import ChangedError, CkptregError, DuplicateError, FormatError, OutputExistsError
from .plan import _inspect, _ref
from .spec import MergeSpec, metric_lags


def _clean_stale(out: Path) -> None:
    """Remove what killed ckptreg processes left in the folder of ``out`` (any target there, not
    only ``out``): temporaries whose writer pid is dead, lock files nobody holds. Never a live
    process's temporary, never a file without the marker."""
    from ..writer import remove_stale_locks, remove_stale_temporaries

    remove_stale_temporaries(out.parent)
    remove_stale_locks(out.parent)


def _refuse_nan(name, t) -> None:
    """A merged float tensor with NaN means an input holds NaN there (a diverged run); stop before
    writing it (the caller aborts every output, so nothing is left and nothing is registered).
    inf is let through: some checkpoints store -inf mask buffers on purpose."""
    import torch

    if t.is_floating_point() and bool(torch.isnan(t).any()):
        raise FormatError(f"merged tensor {name!r} has NaN values: an input checkpoint holds NaN in it "
                          "(a diverged run?); nothing was written")


def _layout(info) -> str:
    if info.format == "peft":
        return "peft"
    if info.format == "hf":
        return "hf"
    return "file"


def _out_layout(info, out_shard_size=None) -> str:
    """The output's layout, decided before anything is written: "file" (one .safetensors),
    "sharded" (single-file inputs with an out_shard_size: a folder of shards + index), "peft", "hf"."""
    lay = _layout(info)
    if lay == "file" and out_shard_size:
        return "sharded"
    return lay


_LAYOUT_TEXT = {
    "file": "one .safetensors file",
    "sharded": "a folder of shards (model-00001-of-0000N.safetensors ... + model.safetensors.index.json)",
    "peft": "a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)",
    "hf": "an HF model folder (model.safetensors or shards + index, and the config files)",
}


def _check_layout(out: Path, info, out_shard_size=None) -> None:
    """Refuse an output path the chosen layout cannot be registered under, before a byte is
    written: a single-file output must end in .safetensors; a folder output must not."""
    from ..errors import UsageError

    lay = _out_layout(info, out_shard_size)
    is_st = out.name.lower().endswith(".safetensors")
    if lay == "file" and not is_st:
        raise UsageError(f"{out}: the inputs are single files, so the merge writes {_LAYOUT_TEXT[lay]} and its "
                         f"name must end in .safetensors (e.g. -o {out.with_name(out.name + '.safetensors')}); "
                         "--out-shard-size writes a folder of shards instead")
    if lay != "file" and is_st:
        why = ("--out-shard-size makes the output " if lay == "sharded"
               else f"the inputs are {info.format} folders, so the output is ")
        raise UsageError(f"{out}: {why}{_LAYOUT_TEXT[lay]}; -o must name a folder, not a .safetensors file "
                         f"(e.g. -o {out.with_name(out.name[:-len('.safetensors')] or 'merged')})")


def default_out(spec: MergeSpec, info=None, parent=None, *, out_shard_size=None) -> Path:
    """Output path for a spec: ``parent`` (default: the folder holding the newest input) / name,
    with ``.safetensors`` when the output is one file (plain-file inputs, no out_shard_size)."""
    if info is None:   # only the layout matters here: the registered format, else the headers
        c0 = spec.inputs[0]
        info = c0 if getattr(c0, "format", None) else _inspect(c0)
    parent = Path(parent) if parent is not None else Path(spec.inputs[-1].path).resolve().parent
    if _out_layout(info, out_shard_size) == "file":
        return parent / f"{spec.name}.safetensors"
    return parent / spec.name


class _Output:
    """One merge output in the input's layout, atomic as a whole.

    A replaced output is kept aside at commit; :meth:`finalize` (after registration) deletes it,
    :meth:`revert` (registration failed) removes the new output and puts the old one back.
    Folder outputs list their files in the safetensors metadata (``ckptreg_files``), so a later
    ``--overwrite`` can tell that everything in the folder is ckptreg's."""

    def __init__(self, out: Path, info, entries, metadata, *, overwrite, out_shard_size=None,
                 adapter_config: dict | None = None, run: str | None = None, shards: list | None = None):
        """``shards``: a distributed merge's tensor files (:mod:`.distributed`): the folder is
        made (config files, card) and its ranks write those files into ``self.adir.tmp``."""
        from ..writer import AtomicDir, ShardedWriter, StreamingWriter, shard_names, shard_plan
        from .card import CARD_NAME, card_for

        self.path = Path(out)
        self.layout = _out_layout(info, out_shard_size)
        self.adir = None
        self._settled = False
        _clean_stale(self.path)
        if self.layout == "file":
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                from ..writer import fs_error

                raise (fs_error(e, self.path, f"creating {self.path.parent}") or e) from e
            self.w = StreamingWriter(self.path, entries, metadata, overwrite=overwrite, keep_old=True)
            return
        # the folder's card is ckptreg's (card_for: from the recipe in ``metadata``), never an input's
        # own README.md (the input model's card describes another model)
        card = card_for(metadata, run)
        copied = [] if self.layout == "sharded" else [
            cf for cf in info.config_files if Path(cf).name not in ("model.safetensors.index.json", CARD_NAME)]
        configs = [Path(cf).name for cf in copied]
        if self.layout == "peft":
            tensor_files = ["adapter_model.safetensors"]
            if adapter_config is not None and "adapter_config.json" not in configs:
                configs.append("adapter_config.json")
        else:
            sharded = self.layout == "sharded" or len(info.files) > 1 or bool(out_shard_size)
            if sharded and not out_shard_size and len(info.files) > 1:
                # mirror the input's sharding: shards up to its largest shard's data size
                from ..safetensors_io import read_header

                out_shard_size = max(sum(t.nbytes for t in read_header(f).tensors.values())
                                     for f in info.files)
            if shards is not None:
                tensor_files = list(shards) + ["model.safetensors.index.json"]
            elif sharded:
                tensor_files = shard_names(len(shard_plan(entries, out_shard_size))) + ["model.safetensors.index.json"]
            else:
                tensor_files = ["model.safetensors"]
        own = configs + tensor_files + ([CARD_NAME] if card is not None else [])
        metadata = {**(metadata or {}), "ckptreg_files": json.dumps(sorted(set(own)))}
        self.metadata = metadata
        self.adir = AtomicDir(self.path, overwrite=overwrite, keep_old=True)
        try:
            for cf in copied:
                nm = Path(cf).name
                if nm == "adapter_config.json" and adapter_config is not None:
                    self.adir.write_text(nm, json.dumps(adapter_config, indent=2) + "\n")
                else:
                    self.adir.copy_in(cf, nm)
            if card is not None:
                self.adir.write_text(CARD_NAME, card)
            if self.layout == "peft":
                if adapter_config is not None and not any(Path(c).name == "adapter_config.json" for c in info.config_files):
                    self.adir.write_text("adapter_config.json", json.dumps(adapter_config, indent=2) + "\n")
            if shards is not None:
                self.w = None   # the ranks write the tensor files
            elif self.layout == "peft":
                self.w = StreamingWriter(self.adir.file("adapter_model.safetensors"), entries, metadata, atomic=False,
                                         label=self.path / "adapter_model.safetensors")
            elif sharded:
                self.w = ShardedWriter(self.path, entries, metadata, max_shard_bytes=out_shard_size, into=self.adir)
            else:
                self.w = StreamingWriter(self.adir.file("model.safetensors"), entries, metadata, atomic=False,
                                         label=self.path / "model.safetensors")
        except BaseException:
            self.adir.abort()
            raise

    def write(self, name, t):
        _refuse_nan(name, t)
        self.w.write(name, t)

    def write_chunk(self, name, t):
        _refuse_nan(name, t)
        self.w.write_chunk(name, t)

    def commit(self) -> Path:
        if self.w is not None:
            self.w.commit()
        if self.adir is not None:
            self.adir.commit()
        return self.path

    def abort(self):
        try:
            if self.w is not None:
                self.w.abort()
        finally:
            if self.adir is not None:
                self.adir.abort()

    def finalize(self) -> None:
        """The output is registered: delete the output it replaced (if any)."""
        if not self._settled:
            self._settled = True
            (self.adir if self.adir is not None else self.w).finalize()

    def revert(self) -> None:
        """Registration failed: remove this output and put back the one it replaced (only what
        this merge wrote is removed). No-op once finalized."""
        if not self._settled:
            self._settled = True
            (self.adir if self.adir is not None else self.w).revert()


def _output_run(spec):
    return spec.run or spec.inputs[-1].run


def _dependents(registry, cid: int, merged=None) -> list[str]:
    """Refs of the registered merges that have checkpoint ``cid`` as an input or base (public
    Registry API only: the lineage of every merged checkpoint)."""
    cid = int(cid)
    out = []
    for c in merged if merged is not None else registry.checkpoints(merged=True):
        if c.id == cid:
            continue
        lin = registry.lineage(c) or {}
        if lin.get("base") == cid or any(int(i["id"]) == cid for i in lin.get("inputs", [])):
            out.append(f"{c.ref} (id {c.id})")
    return out


def _not_ckptreg_output(out: Path) -> str | None:
    """Why the existing ``out`` is not recognisably an earlier ckptreg merge output (None: it is,
    or it is an empty folder). A file must be a .safetensors whose metadata holds the
    ``ckptreg_recipe`` every merge writes; a folder must hold only regular files, its
    .safetensors files must carry the recipe, and where they list the folder's files
    (``ckptreg_files``) nothing else may be there."""
    from ..safetensors_io import read_header

    def meta(f):
        try:
            md = read_header(f).metadata
        except (CkptregError, OSError, ValueError):
            return None
        return md if "ckptreg_recipe" in md else None

    if out.is_symlink():
        return "is a symbolic link (ckptreg writes real files and folders)"
    if out.is_file():
        if not out.name.lower().endswith(".safetensors"):
            return "is not a .safetensors file written by ckptreg"
        if meta(out) is None:
            return "was not written by ckptreg (its safetensors metadata holds no ckptreg recipe)"
        return None
    if not out.is_dir():
        return "is not a regular file or folder"
    try:
        entries = sorted(out.iterdir())
    except OSError as e:
        return f"cannot be listed ({e.strerror})"
    if not entries:
        return None
    listed = None
    tensor_files = 0
    for e in entries:
        if e.is_symlink() or not e.is_file():
            return f"holds {e.name}, a {'link' if e.is_symlink() else 'folder'} that ckptreg does not write"
        if e.name.lower().endswith(".safetensors"):
            md = meta(e)
            if md is None:
                return f"was not written by ckptreg ({e.name} holds no ckptreg recipe in its metadata)"
            tensor_files += 1
            if "ckptreg_files" in md:
                try:
                    listed = set(json.loads(md["ckptreg_files"]))
                except ValueError:
                    pass
    if not tensor_files:
        return "was not written by ckptreg (it holds no .safetensors file with a ckptreg recipe)"
    if listed is not None:
        extra = [e.name for e in entries if e.name not in listed]
        if extra:
            return (f"holds {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}, which ckptreg did not "
                    "write there")
    return None


def _check_target(registry, spec, out: Path, overwrite: bool):
    """Refuse an output path before a byte is written (the caller holds the target's lock).

    Never written: a registered plain checkpoint (any run), a folder holding a registered
    checkpoint, a path inside a registered checkpoint folder, the output of another registered
    merge (a different RUN@NAME), a merged checkpoint that other registered merges were made from.
    ``overwrite`` replaces only an earlier ckptreg output (:func:`_not_ckptreg_output`)."""
    run = _output_run(spec)
    try:
        existing = registry.get(f"{run}@{spec.name}")
    except CkptregError:
        existing = None
    if existing is not None and not (existing.merged and existing.name == spec.name):
        raise DuplicateError(f"{run}@{spec.name} names registered checkpoint {existing.ref} (id {existing.id}); "
                             "choose another --name")
    real = os.path.realpath(out)
    everything = registry.checkpoints()
    for c in everything:
        cid, cname, cpath, merged, ref = c.id, c.name, c.path, c.merged, c.ref
        cp = os.path.normpath(str(cpath))
        if cp == real:
            if not merged:
                raise OutputExistsError(f"{out} is registered checkpoint {ref} (id {cid}); a merge never writes "
                                        "over a registered checkpoint: choose another -o")
            if existing is None or int(cid) != existing.id:
                raise OutputExistsError(f"{out} is the output of registered merge {ref} (id {cid}); --overwrite "
                                        f"replaces only the output of the same name ({run}@{spec.name}): choose "
                                        f"another -o, or --name {cname}")
        elif cp.startswith(real.rstrip(os.sep) + os.sep):
            raise OutputExistsError(f"{out} holds registered checkpoint {ref} (id {cid}, {cpath}); a merge never "
                                    "replaces a folder holding registered checkpoints: choose another -o")
        elif real.startswith(cp.rstrip(os.sep) + os.sep):
            raise OutputExistsError(f"{out} is inside registered checkpoint {ref} (id {cid}, {cpath}); writing "
                                    "there would change it: choose another -o")
    # Merged names are versioned: the same name at another path registers the next version
    # (RUN@NAME:v2, ...); only --overwrite onto the newest version's own path replaces it.
    if existing is not None and overwrite and os.path.normpath(str(existing.path)) == real:
        deps = _dependents(registry, existing.id, [c for c in everything if c.merged])
        if deps:
            raise OutputExistsError(f"{run}@{spec.name} (id {existing.id}, {existing.path}) is an input or base of "
                                    f"registered merge(s) {', '.join(deps[:5])}{' ...' if len(deps) > 5 else ''}; "
                                    "--overwrite never replaces what other merges were made from: choose "
                                    "another --name")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{out} exists (use --overwrite to replace it)")
        why = _not_ckptreg_output(out)
        if why is not None:
            raise OutputExistsError(f"{out} {why}; --overwrite replaces only an earlier ckptreg merge output, "
                                    "so nothing was written: choose another -o")


def _recipe(spec, method, w, p, space, rank, out_dtype, plan_) -> dict:
    return {
        "ckptreg": 1, "name": spec.name, "method": method, "params": p, "space": space, "rank": rank,
        "out_dtype": None if out_dtype is None else str(out_dtype).replace("torch.", ""),
        "inputs": [{"id": c.id, "ref": _ref(c), "weight": x, "fingerprint": i.fingerprint}
                   for c, x, i in zip(spec.inputs, w, plan_.infos)],
        "base": None if spec.base is None else {"id": spec.base.id, "ref": _ref(spec.base),
                                                 "fingerprint": getattr(spec.base, "fingerprint", None)},
        "selection": spec.selection or {},
        **({"param_rules": spec.param_rules.to_json()} if getattr(spec, "param_rules", None) else {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _lineage_params(spec, p, space, rank, out_dtype) -> dict:
    d = dict(p)
    d.update({"space": space})
    if rank is not None:
        d["rank"] = rank
    if out_dtype is not None:
        d["out_dtype"] = str(out_dtype).replace("torch.", "")
    if spec.selection:
        d["selection"] = spec.selection
    if getattr(spec, "param_rules", None):
        d["rules"] = spec.param_rules.to_json()
    lags = metric_lags(spec)
    if lags:
        d["metric_lag"] = lags
    return d


# lineage params that describe how the inputs were found, not what was computed from them
_UNSTABLE_PARAMS = ("selection", "metric_lag")


def _jnorm(v):
    return json.loads(json.dumps(v, sort_keys=True, allow_nan=True, default=str))


def _stored_recipe(c) -> dict | None:
    """The ``ckptreg_recipe`` a merge wrote into its output's safetensors metadata (None if the
    output has none or cannot be read)."""
    from ..safetensors_io import read_header

    files = [f for f in (getattr(c, "files", None) or []) if str(f).lower().endswith(".safetensors")]
    if not files and str(c.path).lower().endswith(".safetensors"):
        files = [c.path]
    for f in files:
        try:
            md = read_header(f).metadata
            if "ckptreg_recipe" in md:
                rec = json.loads(md["ckptreg_recipe"])
                return rec if isinstance(rec, dict) else None
        except (CkptregError, OSError, ValueError):
            return None
    return None


def _same_weight(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-15)
    except (TypeError, ValueError):
        return False


def _same_recipe(old: dict, new: dict) -> bool:
    """Equal in everything that decides the output (not ``created``, not the selection that
    found the inputs): name, method, params, space, rank, out dtype, inputs (id, fingerprint,
    weight, in order), base (id, fingerprint)."""
    for k in ("name", "method", "space", "rank", "out_dtype"):
        if old.get(k) != new.get(k):
            return False
    if _jnorm(old.get("params") or {}) != _jnorm(new.get("params") or {}):
        return False
    if _jnorm(old.get("param_rules") or {}) != _jnorm(new.get("param_rules") or {}):
        return False
    a, b = old.get("inputs") or [], new.get("inputs") or []
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if not isinstance(x, dict) or x.get("id") != y.get("id") or x.get("fingerprint") != y.get("fingerprint") \
                or not y.get("fingerprint") or not _same_weight(x.get("weight"), y.get("weight")):
            return False
    ob, nb = old.get("base"), new.get("base")
    if (ob is None) != (nb is None):
        return False
    if nb is not None and (not isinstance(ob, dict) or ob.get("id") != nb.get("id")
                           or ob.get("fingerprint") != nb.get("fingerprint")):
        return False
    return True


def _same_lineage(lin: dict | None, spec, method, p, w, space, rank, out_dtype) -> bool:
    if not lin or lin.get("method") != method:
        return False
    ins = lin.get("inputs") or []
    if [i.get("id") for i in ins] != [c.id for c in spec.inputs]:
        return False
    if not all(_same_weight(i.get("weight"), x) for i, x in zip(ins, w)):
        return False
    if lin.get("base") != (None if spec.base is None else spec.base.id):
        return False

    def stable(d):
        return _jnorm({k: v for k, v in (d or {}).items() if k not in _UNSTABLE_PARAMS})

    return stable(lin.get("params")) == stable(_lineage_params(spec, p, space, rank, out_dtype))


def _up_to_date(registry, spec, out: Path, method, w, p, space, rank, out_dtype, infos, merged=None):
    """The registered merged checkpoint that this merge would reproduce, or None.

    It is RUN@NAME (any version) registered at ``out``, whose files are present and unchanged
    (``registry.check_unchanged``), whose stored recipe (safetensors metadata) and lineage equal
    this merge's in everything but the time and the selection, inputs compared by id AND
    fingerprint (``infos``: CheckpointInfo of ``spec.inputs``, in order) so an input replaced in
    the registry since is a new merge. The caller holds the target's lock."""
    run = _output_run(spec)
    real = os.path.realpath(out)
    pool = merged if merged is not None else registry.checkpoints(run, merged=True)
    hits = [c for c in pool if c.merged and c.run == run and c.name == spec.name
            and os.path.normpath(str(c.path)) == real]
    if not hits:
        return None
    c = hits[0]
    try:
        registry.check_unchanged(c)
    except ChangedError as e:
        if not (out.exists() or out.is_symlink()):
            # registered here but gone: writing it again could not be registered (the path is
            # taken by that entry), so say so before any work instead of after the merge
            raise ChangedError(f"{e}; it is the registered output of {c.ref} at {out}, so nothing was written: "
                               f"--overwrite recomputes and re-registers it (or `ckptreg rm {c.ref}` first)") from None
        return None   # changed: refused as "exists" below, recomputed with --overwrite
    old = _stored_recipe(c)
    if old is None:
        return None
    new = _recipe(spec, method, w, p, space, rank, out_dtype, SubPlan(None, list(infos)))
    if not _same_recipe(old, new):
        return None
    if not _same_lineage(registry.lineage(c), spec, method, p, w, space, rank, out_dtype):
        return None
    return c


def _registered_as(registry, spec, out_path) -> bool:
    """Whether RUN@NAME is registered at ``out_path`` with the files there now (a registration
    that raised after its transaction committed)."""
    from ..formats import inspect

    try:
        c = registry.get(f"{_output_run(spec)}@{spec.name}")
        return bool(c.merged and os.path.normpath(c.path) == os.path.realpath(out_path)
                    and c.fingerprint == inspect(out_path).fingerprint)
    except Exception:
        return False


def _is_newest_version_at(registry, spec, out_path) -> bool:
    """Whether the newest version of RUN@NAME is registered at ``out_path`` (then --overwrite
    replaces it; anywhere else the merge becomes the next version)."""
    try:
        c = registry.get(f"{_output_run(spec)}@{spec.name}")
    except CkptregError:
        return False
    return bool(c.merged and os.path.normpath(str(c.path)) == os.path.realpath(out_path))


def _register(registry, spec, out_path, method, p, w, space, rank, out_dtype, overwrite, target=None):
    """Register a committed output. If that fails, ``target`` (its _Output) is reverted: the
    output is removed again and the one it replaced put back, so a merge ends registered or
    leaves nothing behind. A distributed output is registered once, by rank 0."""
    if hasattr(target, "registered"):   # distributed.DistOutput: rank 0 registers, every rank returns it
        return target.registered(lambda: _register(registry, spec, out_path, method, p, w, space, rank, out_dtype,
                                                   overwrite, target=target.inner), spec)
    try:
        cid = registry.record_merge(path=str(out_path), run=_output_run(spec), name=spec.name, method=method,
                                    params=_lineage_params(spec, p, space, rank, out_dtype),
                                    inputs=[(c.id, float(x)) for c, x in zip(spec.inputs, w)],
                                    base=None if spec.base is None else spec.base.id,
                                    replace=overwrite and _is_newest_version_at(registry, spec, out_path))
    except BaseException:
        if target is not None:
            if _registered_as(registry, spec, out_path):
                target.finalize()
            else:
                target.revert()
        raise
    if target is not None:
        target.finalize()
    return registry.get(cid)


class _Locks:
    """The target locks (:class:`ckptreg.writer.TargetLock`) a merge or sweep holds until its
    outputs are committed and registered."""

    def __init__(self):
        self.held = []

    def acquire(self, out: Path) -> None:
        from ..writer import TargetLock

        self.held.append(TargetLock(out).acquire())

    def release_all(self) -> None:
        while self.held:
            self.held.pop().release(keep=False)




class SubPlan:
    """The infos of one merge's inputs within a larger plan (a sweep's union)."""

    def __init__(self, pl, infos):
        self.infos = infos
        self.base_info = None


def output_run(spec):
    return _output_run(spec)


Output, Locks = _Output, _Locks

"""Merges sharded over torch.distributed ranks (``torchrun``; gloo; no GPU needed).

When torchrun's environment is present (``RANK``, ``WORLD_SIZE`` > 1, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) or a process group of more than one rank is initialised,
:func:`~ckptreg.merge.run.merge` and :func:`~ckptreg.merge.run.sweep` run distributed; every
rank calls them with the same arguments (``ckptreg merge ...`` under torchrun does).

* Every rank validates and plans as the single-process merge does (the same registry reads,
  deterministic). The tensor plan is split by bytes (:func:`split`): units (one tensor; the LoRA
  A/B of one module; in delta space the modules the single-process run merges in one batched
  SVD) largest first onto the least-loaded rank, ties by first name and rank number.
* Rank 0 takes the target lock, creates the output's staging folder (the output's own
  ``.NAME.ckptreg-tmp-<pid>-<host>-<hex>`` temporary folder beside the output: same filesystem)
  with the config files and the model card, and broadcasts its path and the shard metadata. Each
  rank streams only its tensors through the same :func:`~ckptreg.merge.stream.run_pass` and
  writes its own shard file(s) into that folder (plain files; the folder is the temporary).
* Ranks exchange metadata only (``all_gather_object`` of each rank's status and shard map;
  ``broadcast_object_list`` from rank 0). After every rank reported its shards written, rank 0
  writes ``model.safetensors.index.json`` (a PEFT adapter is joined into its one
  ``adapter_model.safetensors``: adapters are small), renames the folder into place, registers the
  output once (lineage, recipe, card) and broadcasts the Checkpoint, which every rank returns.
* A rank that raises reports its error at the next collective; a killed rank is seen there as a
  gloo error (``CKPTREG_DIST_TIMEOUT`` seconds bound a hung one, default 600). Every rank then
  aborts: the staging folder is removed (by rank 0, and by any surviving rank: it is ckptreg's
  own temporary), nothing is registered. If rank 0 itself was killed, its temporary carries its
  pid and is also removed by the next ckptreg write beside the output.

Outputs of single-file inputs are a folder of shards here (``model-0000k-of-0000N.safetensors``,
one or more per rank, + index), named without ``.safetensors``; every tensor is byte for byte the
single-process merge's (same chunks, same kernels, same per-tensor parameters and DARE keys).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

from ..errors import CkptregError, DistributedError

#: torchrun's variables; all present and WORLD_SIZE > 1 means "run distributed"
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "CKPTREG_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 600.0
#: the shard size that makes single-file outputs a folder of (one per rank) shards
WHOLE = 1 << 62

_GROUP = None
_OWN_PG = False   # the default process group was initialised here (shutdown() destroys it)


def timeout_s() -> float:
    try:
        t = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        t = DEFAULT_TIMEOUT
    return t if t > 0 else DEFAULT_TIMEOUT


def env_requested() -> bool:
    """torchrun's environment with more than one rank."""
    if not all(os.environ.get(k) for k in ENV):
        return False
    try:
        return int(os.environ["WORLD_SIZE"]) > 1
    except ValueError:
        return False


def requested() -> bool:
    if env_requested():
        return True
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _group():
    """The gloo group merges talk over: the default group (initialised here with gloo from the
    environment if nobody did), or a gloo group beside a non-gloo default (NCCL)."""
    global _GROUP, _OWN_PG
    import datetime

    import torch.distributed as dist

    t = datetime.timedelta(seconds=timeout_s())
    if not dist.is_initialized():
        try:
            dist.init_process_group("gloo", timeout=t)
        except Exception as e:
            raise DistributedError(f"cannot join the torch.distributed process group "
                               f"(MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                               f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {e}") from e
        _GROUP = None
        _OWN_PG = True
    if _GROUP is None:
        _GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=t)
    return _GROUP


@contextlib.contextmanager
def stop_on_sigterm():
    """A distributed merge/sweep (under torchrun; else nothing changes): SIGTERM (torchrun's agent sends it to
    every rank once one rank dies, or when the job is stopped) becomes a DistributedError raised
    in the main thread, so the rank aborts through the same path as any failure (its output
    removed, nothing registered) instead of dying with rank 0's staging folder left behind. Once:
    a second SIGTERM during that cleanup is ignored (torchrun's SIGKILL still ends a hung rank)."""
    import signal
    import threading

    if not requested() or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, lambda s, f: None)
        raise DistributedError("distributed merge: stopped by SIGTERM (torchrun stops every rank when one fails "
                               "or the job is stopped); an output not yet registered was removed")

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def shutdown(ok: bool) -> None:
    """End of a ``ckptreg merge``/``sweep`` process under torchrun: wait for every rank (``ok``:
    this rank succeeded; then a barrier, so no rank tears its connections down while another
    still reads from them) and destroy the process group ckptreg initialised (none else)."""
    global _GROUP, _OWN_PG
    if not _OWN_PG:
        return
    import torch.distributed as dist

    try:
        if ok and dist.is_initialized():
            dist.barrier(group=_GROUP)
    except Exception:
        pass
    finally:
        try:
            dist.destroy_process_group()
        except Exception:
            pass
        _GROUP, _OWN_PG = None, False


def current():
    """The coordinator of a merge started now: :data:`LOCAL` or a :class:`Dist`."""
    return Dist(_group()) if requested() else LOCAL


# ------------------------------------------------------------------------------------------------
# splitting the plan

def _units(pl, delta=None) -> list[list[str]]:
    from .delta import _lora_pair

    if delta is not None:
        groups = delta_groups(delta)
        where = {}
        for g in groups:
            for mod in g:
                where[mod] = g[0]
        units: dict = {}
        for n in pl.names:
            pr = _lora_pair(n)
            key = ("g", where[pr[0]]) if pr is not None and pr[0] in where else ("t", n)
            units.setdefault(key, []).append(n)
        return list(units.values())
    units = {}
    for n in pl.names:
        pr = _lora_pair(n)
        units.setdefault(("m", pr[0]) if pr is not None else ("t", n), []).append(n)
    return list(units.values())


def split(pl, world: int, delta=None) -> list[list[str]]:
    """Each rank's tensor names (plan order): units largest first onto the least-loaded rank
    (ties: first name, then the lower rank). Same on every rank: it depends on the plan only."""
    from ..writer import tensor_nbytes

    units = _units(pl, delta)
    cost = [sum(tensor_nbytes(pl.dtypes[n], pl.shapes[n]) for n in u) for u in units]
    order = sorted(range(len(units)), key=lambda i: (-cost[i], units[i][0]))
    load = [0] * world
    mine: list[set] = [set() for _ in range(world)]
    for i in order:
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += cost[i]
        mine[r].update(units[i])
    return [[n for n in pl.names if n in m] for m in mine]


def delta_groups(cache) -> list[list[str]]:
    """The modules a single-process delta-space merge computes together (one batched factored
    SVD each): :meth:`ckptreg.merge.delta._DeltaCache.batch_groups`, the one grouping rule; a
    rank gets whole groups, so its batches (and so its bits) are the single process's."""
    return cache.batch_groups()


# ------------------------------------------------------------------------------------------------
# coordinators

class _Local:
    """Single process: every hook is the plain step."""

    active = False
    rank = 0
    world = 1
    lead = True

    def shard_size(self, out_shard_size):
        return out_shard_size

    def acquire(self, locks, out) -> None:
        locks.acquire(out)

    def out_path(self, out, info):
        return out

    def agreeing(self):
        import contextlib

        return contextlib.nullcontext()

    def share(self, pl, delta=None):
        return pl

    def output(self, pl, delta, out, info, entries, metadata, **kw):
        from .targets import _Output

        return _Output(out, info, entries, metadata, **kw)


LOCAL = _Local()


def _lost(e: BaseException, what: str) -> CkptregError:
    return DistributedError(f"distributed merge: another rank failed or was lost while {what} ({e}); "
                        "nothing was registered and its output was removed")


def _portable(e: BaseException) -> BaseException:
    """``e`` if it can be sent to the other ranks, else a CkptregError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return CkptregError(f"{type(e).__name__}: {e}")


def _from_rank(r: int, world: int, e: BaseException) -> BaseException:
    """The error of rank ``r`` raised on another rank: same type (same exit code), says which."""
    msg = f"rank {r} of {world}: {e}"
    try:
        return type(e)(msg)
    except Exception:
        return CkptregError(msg)


class _Agree:
    def __init__(self, co):
        self.co = co

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        self.co.gather_status(ev, "checking the targets")
        return False


class Dist:
    """One distributed merge's view of the process group (see the module docstring)."""

    active = True

    def __init__(self, group):
        import torch.distributed as dist

        self.g = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.lead = self.rank == 0
        self._split: dict = {}

    # -- collectives ------------------------------------------------------------------------------
    def gather(self, obj, what: str) -> list:
        import torch.distributed as dist

        got = [None] * self.world
        try:
            dist.all_gather_object(got, obj, group=self.g)
        except Exception as e:
            raise _lost(e, what) from e
        return got

    def bcast(self, obj, what: str):
        import torch.distributed as dist

        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0, group=self.g)
        except Exception as e:
            raise _lost(e, what) from e
        return box[0]

    def gather_status(self, err: BaseException | None, what: str, payload=None) -> list:
        """Every rank's (error or None, payload). Raises on every rank if any rank failed: the
        rank's own error where it failed, the lowest failing rank's elsewhere."""
        mine = (None if err is None else _portable(err), payload)
        got = self.gather(mine, what)
        if err is not None:
            return got   # the caller is raising its own error
        for r, (e, _) in enumerate(got):
            if e is not None:
                raise _from_rank(r, self.world, e)
        return got

    # -- hooks ------------------------------------------------------------------------------------
    def shard_size(self, out_shard_size):
        return out_shard_size or WHOLE

    def acquire(self, locks, out) -> None:
        if self.lead:
            locks.acquire(out)

    def out_path(self, out, info):
        """A single-file output ``X.safetensors`` is the folder ``X`` of the ranks' shards."""
        from .targets import _layout

        out = Path(out)
        if _layout(info) == "file" and out.name.lower().endswith(".safetensors") and len(out.name) > 12:
            return out.with_name(out.name[:-len(".safetensors")])
        return out

    def agreeing(self):
        return _Agree(self)

    def parts(self, pl, delta=None) -> list[list[str]]:
        key = (id(pl), id(delta))
        if key not in self._split:
            self._split[key] = (pl, delta, split(pl, self.world, delta))
        return self._split[key][2]

    def share(self, pl, delta=None):
        import dataclasses

        return dataclasses.replace(pl, names=self.parts(pl, delta)[self.rank])

    def output(self, pl, delta, out, info, entries, metadata, **kw):
        return DistOutput(self, self.parts(pl, delta), out, info, entries, metadata, **kw)


# ------------------------------------------------------------------------------------------------
# the output

class _Into:
    """What ShardedWriter needs of a folder: ``path`` (for messages) and ``file(name)``."""

    def __init__(self, tmp: Path, path: Path):
        self.tmp, self.path = tmp, path

    def file(self, name):
        return self.tmp / name


class DistOutput:
    """One output written by every rank into rank 0's staging folder (see the module docstring);
    the :class:`~ckptreg.merge.targets._Output` interface."""

    def __init__(self, co: Dist, parts, out, info, entries, metadata, **kw):
        from ..writer import ShardedWriter, StreamingWriter, shard_names, shard_plan
        from .targets import _out_layout

        self.co = co
        self.path = Path(out)
        self.inner = None          # rank 0: the _Output whose folder is the staging area
        self.layout = _out_layout(info, kw.get("out_shard_size"))
        self._gathered = False
        self._finished = False
        by_name = {e[0]: e for e in entries}
        mine = [by_name[n] for n in parts[co.rank]]
        size = kw.get("out_shard_size")
        if self.layout == "peft":
            shards = [[p] if p else [] for p in parts]
            files = [f"part-{r:05d}.safetensors" if parts[r] else None for r in range(co.world)]
            names = ["adapter_model.safetensors"]
        else:
            per_rank = [shard_plan([by_name[n] for n in p], size) if p else [] for p in parts]
            total = sum(len(x) for x in per_rank)
            allnames = shard_names(total)
            files, k = [], 0
            for x in per_rank:
                files.append(allnames[k:k + len(x)])
                k += len(x)
            names = allnames
            shards = per_rank
        err, staging = None, None
        if co.lead:
            from .targets import _Output

            try:
                self.inner = _Output(out, info, entries, metadata, shards=names, **kw)
                staging = (str(self.inner.adir.tmp), self.inner.metadata)
            except BaseException as e:
                err = e
        got = co.gather_status(err, "creating the output", staging)
        if err is not None:
            raise err
        tmp, meta = got[0][1]
        self.tmp = Path(tmp)
        self.meta = meta
        self.w = None
        try:
            if mine and self.layout == "peft":
                self.w = StreamingWriter(self.tmp / files[co.rank], mine, meta, atomic=False,
                                         label=self.path / "adapter_model.safetensors")
            elif mine:
                self.w = ShardedWriter(self.path, mine, meta, max_shard_bytes=size, into=_Into(self.tmp, self.path),
                                       names=files[co.rank], index=False)
        except BaseException:
            self.abort()
            raise
        self.files = files
        self.shards = shards
        self.entries = entries

    def write(self, name, t):
        from .targets import _refuse_nan

        _refuse_nan(name, t)
        self.w.write(name, t)

    def write_chunk(self, name, t):
        from .targets import _refuse_nan

        _refuse_nan(name, t)
        self.w.write_chunk(name, t)

    def _own_files(self) -> None:
        if self.w is None:
            return
        if hasattr(self.w, "finish_files"):
            self.w.finish_files()
        else:
            self.w.commit()

    def commit(self) -> Path:
        err = None
        try:
            self._own_files()
        except BaseException as e:
            err = e
        self._gathered = True
        self.co.gather_status(err, "writing the shards")
        if err is not None:
            self._cleanup()
            raise err
        # every rank's shards are in the staging folder: rank 0 completes and renames it
        err = None
        if self.co.lead:
            try:
                self._complete()
                self.inner.commit()
            except BaseException as e:
                err = e
        try:
            self.co.gather_status(err, "committing the output")
        except BaseException:
            self._cleanup()
            raise
        if err is not None:
            self._cleanup()
            raise err
        self._finished = True
        return self.path

    def _complete(self) -> None:
        import json

        from ..writer import StreamingWriter, tensor_nbytes

        if self.layout == "peft":
            from safetensors import safe_open

            w = StreamingWriter(self.inner.adir.file("adapter_model.safetensors"), self.entries, self.meta,
                                atomic=False, label=self.path / "adapter_model.safetensors")
            handles = {}
            try:
                where = {}
                for r, f in enumerate(self.files):
                    if f is None:
                        continue
                    handles[r] = safe_open(str(self.tmp / f), "pt")
                    for n in handles[r].keys():
                        where[n] = r
                for n, _, _ in self.entries:
                    w.write(n, handles[where[n]].get_tensor(n))
                w.commit()
            except BaseException:
                w.abort()
                raise
            finally:
                handles.clear()
            for f in self.files:
                if f is not None:
                    (self.tmp / f).unlink()
            return
        weight_map = {}
        for fs, sh in zip(self.files, self.shards):
            for fname, entries in zip(fs, sh):
                for e in entries:
                    weight_map[e[0]] = fname
        total = sum(tensor_nbytes(d, s) for _, d, s in self.entries)
        index = {"metadata": {"total_size": total, **self.meta}, "weight_map": weight_map}
        self.inner.adir.write_text("model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")

    def _cleanup(self) -> None:
        """Remove the staging folder (rank 0's _Output, or any rank: it is ckptreg's temporary)."""
        if self.w is not None:
            try:
                self.w.abort()
            except Exception:
                pass
        if self.inner is not None:
            try:
                self.inner.abort()
            except Exception:
                pass
        tmp = getattr(self, "tmp", None)
        if tmp is not None and not self._finished:
            shutil.rmtree(tmp, ignore_errors=True)
        if not self.co.lead:   # rank 0 killed: its lock file (no longer held) and temporaries go too
            from .targets import _clean_stale

            try:
                _clean_stale(self.path)
            except Exception:
                pass

    def abort(self) -> None:
        if self._finished:
            return
        if not self._gathered:   # tell the others at the collective they are waiting at
            self._gathered = True
            e = sys.exc_info()[1] or CkptregError("aborted")
            try:
                self.co.gather_status(e, "writing the shards")
            except Exception:
                pass
        self._cleanup()

    def finalize(self) -> None:
        if self.inner is not None:
            self.inner.finalize()

    def revert(self) -> None:
        if self.inner is not None:
            self.inner.revert()

    def registered(self, fn, spec):
        """Registration by rank 0 (``fn``), its Checkpoint (or error) on every rank."""
        res = None
        if self.co.lead:
            try:
                res = (None, fn())
            except BaseException as e:
                res = (_portable(e), None)
            try:
                self.co.bcast(res, "registering the output")
            except CkptregError:
                pass   # a follower gone after the commit: the output is complete and registered
        else:
            res = self.co.bcast(None, "registering the output")
        if res[0] is not None:
            raise res[0] if self.co.lead else _from_rank(0, self.co.world, res[0])
        return res[1]

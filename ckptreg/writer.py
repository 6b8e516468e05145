"""Streaming, atomic safetensors writer.

The header is computed from a *plan* (names, dtypes, shapes) before any data exists, so a merge
can write tensor by tensor (or chunk by chunk inside a huge tensor) without ever holding the
whole model. Layout written (the safetensors format):

    u64 little-endian N | N bytes of JSON header (space-padded to a multiple of 8) | data

Data of each tensor is contiguous, in plan order; ``data_offsets`` are relative to the start of
the data section. The result loads with ``safetensors.torch.load_file``.

Atomicity: a single file is written to a temporary name in the same directory
(``.<name>.ckptreg-tmp-<random>``), flushed, fsync'ed, renamed over the target, and the directory
fsync'ed. A folder (sharded model, PEFT adapter, HF folder) is built in a temporary folder beside
the target (:class:`AtomicDir`) and renamed into place at the end; replacing an existing folder
swaps it in (``renameat2(RENAME_EXCHANGE)`` where the kernel offers it). Abort (or an exception
inside a ``with`` block) removes the temporary. A process killed at any moment leaves at most a
temporary whose name starts with ``.`` and contains ``.ckptreg-tmp-`` — never a partial output.

Temporaries are named ``.<target>.ckptreg-tmp-<pid>-<host>-<random>`` (``host``: 8 hex digits of
the host name's SHA-1): :func:`find_stale_temporaries` lists those of a folder whose writer is
dead (a pid not alive on this host; temporaries of other hosts are never called stale), and every
atomic writer removes them from its folder when it starts (:func:`remove_stale_temporaries`).

Replacing keeps the old output (``keep_old=True``): ``commit()`` moves it aside under a temporary
name, ``finalize()`` deletes it, ``revert()`` puts it back and removes what was committed (a merge
whose registration failed). :class:`TargetLock` makes one process at a time write a target.

Filesystem errors come out typed: no space (ENOSPC/EDQUOT) is :class:`DiskFullError`, permission
denied / read-only filesystem (EACCES/EPERM/EROFS) is :class:`AccessError`, each naming the output
path, after the temporary was removed.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

from .errors import AccessError, CkptregError, DiskFullError, FormatError, OutputExistsError, TargetBusyError, UsageError
from .safetensors_io import DTYPE_ALIASES, DTYPE_TABLE, TORCH_TO_ST, unmergeable_reason

TMP_MARK = ".ckptreg-tmp-"
LOCK_MARK = ".ckptreg-lock"


def _host_tag() -> str:
    try:
        host = socket.gethostname()
    except Exception:  # pragma: no cover
        host = ""
    return hashlib.sha1(host.encode("utf-8", "replace")).hexdigest()[:8]


#: 8 hex digits naming this host in temporary names (temporaries of other hosts are never stale here)
HOST_TAG = _host_tag()
_TMP_RE = re.compile(r"^\.(?P<target>.+)" + re.escape(TMP_MARK)
                     + r"(?P<pid>[0-9]+)-(?:(?P<host>[0-9a-f]{8})-)?(?P<rand>[0-9a-f]{8})$", re.S)

#: safetensors dtype string -> item size, for the dtypes a merge can write (from
#: ``safetensors_io.DTYPE_TABLE``, the one dtype table)
ITEMSIZE = {k: v.itemsize for k, v in DTYPE_TABLE.items() if v.mergeable}


def torch_dtype(dtype_str: str):
    """torch dtype of a safetensors dtype string a merge can write; FormatError naming the dtype
    and why otherwise (float8, complex, unknown)."""
    import torch

    row = DTYPE_TABLE.get(dtype_str) if isinstance(dtype_str, str) else None
    dt = getattr(torch, row.torch_name, None) if row is not None and row.mergeable else None
    if dt is None:
        raise FormatError(f"safetensors dtype {dtype_str!r} cannot be merged or written: "
                          f"{unmergeable_reason(str(dtype_str))}")
    return dt


def dtype_str(dtype) -> str:
    """safetensors dtype string of a torch dtype (or pass a string through, validated) that a
    merge can write; FormatError otherwise."""
    if isinstance(dtype, str):
        s = dtype.upper()
        s = DTYPE_ALIASES.get(s, s)
        if s not in ITEMSIZE:
            raise FormatError(f"unsupported dtype {dtype!r}")
        return s
    name = str(dtype).replace("torch.", "")
    k = TORCH_TO_ST.get(name)
    if k is not None and k in ITEMSIZE:
        return k
    raise FormatError(f"unsupported torch dtype {dtype}")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    return _numel(shape) * ITEMSIZE[dtype]


def build_header(plan: Sequence[tuple], metadata: dict | None = None) -> tuple[bytes, list[int]]:
    """Header bytes (u64 length + padded JSON) and the data offset of each plan entry."""
    hdr: dict = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise FormatError(f"__metadata__ must map str to str, got {k!r}: {type(v).__name__}")
        hdr["__metadata__"] = dict(metadata)
    offsets = []
    pos = 0
    seen = set()
    for name, dt, shape in plan:
        if name in seen:
            raise FormatError(f"tensor {name!r} appears twice in the write plan")
        if name == "__metadata__":
            raise FormatError("a tensor cannot be named __metadata__")
        seen.add(name)
        if dt not in ITEMSIZE:
            raise FormatError(f"unsupported dtype {dt!r} for tensor {name!r}")
        nb = tensor_nbytes(dt, shape)
        hdr[name] = {"dtype": dt, "shape": [int(s) for s in shape], "data_offsets": [pos, pos + nb]}
        offsets.append(pos)
        pos += nb
    js = json.dumps(hdr, separators=(",", ":")).encode("utf-8")
    pad = (-(8 + len(js))) % 8
    js += b" " * pad
    return struct.pack("<Q", len(js)) + js, offsets


def fsync_dir(path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_name(target: Path) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}{TMP_MARK}{os.getpid()}-{HOST_TAG}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie counts as dead; unknowable = alive)."""
    if pid <= 0:
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        state = st[st.rindex(b")") + 2:st.rindex(b")") + 3]
        if state in (b"Z", b"X"):
            return False
    except (OSError, ValueError):
        pass
    return True


def find_stale_temporaries(folder) -> list[Path]:
    """Temporaries in ``folder`` (``.<name>.ckptreg-tmp-<pid>-...``, files or folders) whose writer
    process is not alive on this host: what a killed merge left behind. Temporaries of live
    processes, of other hosts and entries without the marker are never listed. Sorted by name;
    [] for a folder that does not exist or cannot be read."""
    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    out = []
    for nm in sorted(names):
        m = _TMP_RE.match(nm)
        if m is None:
            continue
        host = m.group("host")
        if host is not None and host != HOST_TAG:
            continue
        if _pid_alive(int(m.group("pid"))):
            continue
        out.append(folder / nm)
    return out


def _remove(p: Path) -> None:
    """Remove a file, link or folder (a link is removed, never followed)."""
    p = Path(p)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def remove_stale_temporaries(folder) -> list[Path]:
    """Remove what :func:`find_stale_temporaries` lists; returns the paths removed."""
    removed = []
    for p in find_stale_temporaries(folder):
        try:
            _remove(p)
        except OSError:
            continue
        if not p.exists() and not p.is_symlink():
            removed.append(p)
    return removed


def fs_error(e: BaseException, path, doing: str = "writing") -> CkptregError | None:
    """The typed error for a filesystem failure while writing ``path`` (None: not one of ours).
    ENOSPC/EDQUOT -> DiskFullError; EACCES/EPERM/EROFS -> AccessError."""
    if isinstance(e, CkptregError):
        return e
    if not isinstance(e, OSError) or e.errno is None:
        return None
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "disk quota exceeded" if e.errno == errno.EDQUOT else "no space left on the device"
        return DiskFullError(f"{path}: {what} while {doing}; the partial output was removed, nothing was "
                             "registered (free space on that filesystem or choose another -o)")
    if e.errno == errno.EROFS:
        return AccessError(f"{path}: cannot write there: read-only file system (while {doing})")
    if e.errno in (errno.EACCES, errno.EPERM):
        where = e.filename if e.filename else path
        return AccessError(f"{path}: cannot write there: permission denied on {where} (while {doing})")
    return None


def _typed(e: BaseException, path, doing: str) -> BaseException:
    c = fs_error(e, path, doing)
    return e if c is None else c


def _tensor_bytes(t):
    """A memoryview over the raw bytes of a (contiguous, CPU) tensor, no copy when possible."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    import torch

    u8 = flat.view(torch.uint8)
    return memoryview(u8.numpy()).cast("B")


class StreamingWriter:
    """Write one safetensors file from a plan, tensor by tensor or chunk by chunk, atomically.

    ``plan``: list of ``(name, dtype_str, shape)``; data must arrive in plan order, with the plan's
    dtype and element count (chunks are flat pieces of the tensor, in order). ``atomic=False``
    writes straight to ``path`` (used inside an already-temporary folder). ``label``: the path
    named in error messages (default ``path``; the final output for a file inside a temporary
    folder). ``keep_old``: on commit, keep a replaced file aside until :meth:`finalize` (deletes
    it) or :meth:`revert` (puts it back).
    """

    def __init__(self, path, plan: Sequence[tuple], metadata: dict[str, str] | None = None, *,
                 overwrite: bool = True, atomic: bool = True, label=None, keep_old: bool = False):
        self.path = Path(path)
        self.label = Path(label) if label is not None else self.path
        self.plan = [(str(n), dtype_str(d), tuple(int(s) for s in shp)) for n, d, shp in plan]
        if not overwrite and self.path.exists():
            raise OutputExistsError(f"{self.path} exists (use overwrite)")
        self._header, self._offsets = build_header(self.plan, metadata)
        self._sizes = [tensor_nbytes(d, s) for _, d, s in self.plan]
        self.data_bytes = sum(self._sizes)
        self.total_bytes = len(self._header) + self.data_bytes
        self.atomic = atomic
        self.keep_old = bool(keep_old)
        self.replaced: Path | None = None   # the old file, moved aside by a keep_old commit
        self.tmp = tmp_name(self.path) if atomic else self.path
        self._closed = True
        self._committed = False
        if atomic:
            remove_stale_temporaries(self.path.parent)
        try:
            self._f = open(self.tmp, "wb")
        except OSError as e:
            raise _typed(e, self.label, f"creating a file in {self.tmp.parent}") from e
        self._closed = False
        self._i = 0          # index of the tensor being written
        self._done = 0       # bytes of that tensor written so far
        try:
            self._f.write(self._header)
        except BaseException as e:
            self.abort()
            raise _typed(e, self.label, "writing the header") from e

    # -- data -------------------------------------------------------------------------------------
    @property
    def next_name(self) -> str | None:
        return self.plan[self._i][0] if self._i < len(self.plan) else None

    def _check(self, name, tensor):
        if self._closed:
            raise FormatError(f"{self.path}: writer already closed")
        if self._i >= len(self.plan):
            raise FormatError(f"{self.path}: got tensor {name!r} but every planned tensor is written")
        pname, pdt, pshape = self.plan[self._i]
        if name != pname:
            raise FormatError(f"{self.path}: expected tensor {pname!r} next (plan order), got {name!r}")
        if dtype_str(tensor.dtype) != pdt:
            raise FormatError(f"{self.path}: tensor {name!r} planned as {pdt}, got {dtype_str(tensor.dtype)}")
        return pname, pdt, pshape

    def write(self, name: str, tensor) -> None:
        """Write a whole tensor (shape must equal the plan's)."""
        _, _, pshape = self._check(name, tensor)
        if self._done:
            raise FormatError(f"{self.path}: tensor {name!r} was partly written by chunks")
        if tuple(tensor.shape) != pshape:
            raise FormatError(f"{self.path}: tensor {name!r} planned with shape {list(pshape)}, got {list(tensor.shape)}")
        self._put(_tensor_bytes(tensor))

    def write_chunk(self, name: str, chunk) -> None:
        """Write the next flat piece of tensor ``name`` (any shape; elements in row-major order)."""
        self._check(name, chunk)
        mv = _tensor_bytes(chunk)
        if self._done + mv.nbytes > self._sizes[self._i]:
            raise FormatError(f"{self.path}: chunk overruns tensor {name!r} "
                              f"({self._done + mv.nbytes} > {self._sizes[self._i]} bytes)")
        self._put(mv)

    def _put(self, mv) -> None:
        try:
            if mv.nbytes:
                self._f.write(mv)
        except BaseException as e:
            self.abort()
            c = fs_error(e, self.label, f"writing {self.total_bytes} bytes")
            if c is None or c is e:
                raise
            raise c from e
        self._done += mv.nbytes
        if self._done == self._sizes[self._i]:
            self._i += 1
            self._done = 0

    @property
    def complete(self) -> bool:
        return self._i == len(self.plan)

    # -- end --------------------------------------------------------------------------------------
    def commit(self) -> Path:
        if self._committed:
            return self.path
        if self._closed:
            raise FormatError(f"{self.path}: writer was aborted")
        if not self.complete:
            name = self.plan[self._i][0]
            self.abort()
            raise FormatError(f"{self.path}: commit before every tensor was written (next: {name!r})")
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._closed = True
            if self.atomic:
                self.replaced = replace_path(self.tmp, self.path, keep_old=self.keep_old)
        except BaseException as e:
            self.abort()
            c = fs_error(e, self.label, f"writing {self.total_bytes} bytes")
            if c is None or c is e:
                raise
            raise c from e
        self._committed = True
        return self.path

    def finalize(self) -> None:
        """After a keep_old commit: delete the replaced file (the new one stays)."""
        if self.replaced is not None:
            _remove(self.replaced)
            self.replaced = None

    def revert(self) -> None:
        """After a commit: remove the committed file and put back the one it replaced (if any)."""
        if self._committed and self.atomic:
            undo_replace(self.path, self.replaced)
            self.replaced = None
            self._committed = False

    def abort(self) -> None:
        if self._committed:
            return
        if not self._closed:
            try:
                self._f.close()
            except Exception:
                pass
            self._closed = True
        try:
            os.unlink(self.tmp)
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            self.commit()
        else:
            self.abort()
        return False


# ------------------------------------------------------------------------------------------------
# folders

def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    RENAME_EXCHANGE = 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    r = fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE)
    return r == 0


def _move_aside_and_in(src: Path, dst: Path) -> Path:
    """Rename ``dst`` to a temporary name of ours, then ``src`` to ``dst`` (putting ``dst`` back
    if that fails); the temporary name now holding the old ``dst``."""
    old = tmp_name(dst)
    os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    return old


def replace_path(src: Path, dst: Path, *, keep_old: bool = False) -> Path | None:
    """Move ``src`` to ``dst``, replacing whatever ``dst`` is (file or folder) as atomically as the
    OS allows: files with rename(2); folders with an exchange then removal of the old one.

    ``keep_old``: the replaced file/folder is not deleted but left under a temporary name beside
    ``dst`` (of this process: cleaned as stale if it dies) whose path is returned (None when
    nothing was replaced); :func:`undo_replace` puts it back."""
    src, dst = Path(src), Path(dst)
    old = None
    if not dst.exists() and not dst.is_symlink():
        os.rename(src, dst)
    elif src.is_dir() or dst.is_dir():
        if dst.is_dir() and not dst.is_symlink() and src.is_dir() and _rename_exchange(src, dst):
            old = src  # src (a temporary name of ours) now holds the old folder
        else:
            old = _move_aside_and_in(src, dst)
    else:
        if keep_old:
            old = tmp_name(dst)
            try:
                os.link(dst, old)  # the old file stays reachable; the swap below stays atomic
            except OSError:
                old = None
        if keep_old and old is None:
            old = _move_aside_and_in(src, dst)
        else:
            os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None and not keep_old:
        _remove(old)
        old = None
    return old


def undo_replace(dst: Path, old: Path | None) -> None:
    """Take back a commit: remove what is at ``dst`` now and put ``old`` (from
    ``replace_path(..., keep_old=True)``) back there; with ``old`` None, just remove ``dst``."""
    dst = Path(dst)
    if old is None:
        _remove(dst)
        fsync_dir(dst.parent)
        return
    replace_path(Path(old), dst)


class AtomicDir:
    """A folder built under a temporary name beside ``path`` and renamed into place on commit."""

    def __init__(self, path, *, overwrite: bool = False, keep_old: bool = False):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise OutputExistsError(f"{self.path} exists (use overwrite)")
        self.keep_old = bool(keep_old)
        self.replaced: Path | None = None
        self._done = True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _typed(e, self.path, f"creating {self.path.parent}") from e
        remove_stale_temporaries(self.path.parent)
        self.tmp = tmp_name(self.path)
        try:
            self.tmp.mkdir()
        except OSError as e:
            raise _typed(e, self.path, f"creating a folder in {self.path.parent}") from e
        self._done = False
        self._committed = False

    def file(self, name: str) -> Path:
        return self.tmp / name

    def copy_in(self, src, name: str | None = None) -> Path:
        dst = self.tmp / (name or Path(src).name)
        try:
            shutil.copyfile(src, dst)
        except OSError as e:
            c = fs_error(e, self.path / dst.name, f"copying {src}")
            if c is None:
                raise
            raise c from e
        return dst

    def write_text(self, name: str, text: str) -> Path:
        dst = self.tmp / name
        try:
            with open(dst, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise _typed(e, self.path / name, "writing it") from e
        return dst

    def commit(self) -> Path:
        if self._done:
            return self.path
        try:
            for p in self.tmp.iterdir():
                if p.is_file():
                    fd = os.open(str(p), os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            fsync_dir(self.tmp)
            self.replaced = replace_path(self.tmp, self.path, keep_old=self.keep_old)
        except BaseException as e:
            self.abort()
            raise _typed(e, self.path, "committing the folder") from e
        self._done = True
        self._committed = True
        return self.path

    def finalize(self) -> None:
        """After a keep_old commit: delete the replaced folder (the new one stays)."""
        if self.replaced is not None:
            _remove(self.replaced)
            self.replaced = None

    def revert(self) -> None:
        """After a commit: remove the committed folder and put back the one it replaced (if any)."""
        if self._committed:
            undo_replace(self.path, self.replaced)
            self.replaced = None
            self._committed = False

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            self.commit()
        else:
            self.abort()
        return False


def shard_plan(plan: Sequence[tuple], max_shard_bytes: int | None) -> list[list[tuple]]:
    """Split a plan into shards in order: a shard takes tensors until the next one would push it
    past ``max_shard_bytes`` (a tensor bigger than the limit gets a shard of its own)."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for e in plan:
        nb = tensor_nbytes(dtype_str(e[1]), e[2])
        if max_shard_bytes and shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nb
    return shards


def shard_names(n: int, basename: str = "model") -> list[str]:
    return [f"{basename}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardedWriter:
    """Sharded safetensors model: ``<basename>-0000i-of-0000N.safetensors`` + ``<basename>.safetensors.index.json``.

    The whole folder is atomic: it is built in a temporary folder and renamed at commit. Pass
    ``into=`` an :class:`AtomicDir` to write the shards into a folder someone else commits (the
    engine adds config files to the same folder); the shards are then plain files inside it.
    Same ``write``/``write_chunk`` interface as :class:`StreamingWriter`, in plan order.
    """

    def __init__(self, dir, plan: Sequence[tuple], metadata: dict[str, str] | None = None,
                 max_shard_bytes: int | None = None, basename: str = "model", *,
                 overwrite: bool = False, into: AtomicDir | None = None, keep_old: bool = False,
                 names: Sequence[str] | None = None, index: bool = True):
        # names/index=False: one rank's shards of a distributed merge (file names given, the
        # index written by rank 0 for every rank's shards; ckptreg.merge.distributed)
        self.plan = [(str(n), dtype_str(d), tuple(int(s) for s in shp)) for n, d, shp in plan]
        self.index = bool(index)
        self.metadata = dict(metadata or {})
        self.basename = basename
        self._own = into is None
        self.adir = AtomicDir(dir, overwrite=overwrite, keep_old=keep_old) if into is None else into
        self.path = self.adir.path
        self.shards = shard_plan(self.plan, max_shard_bytes)
        self.names = list(names) if names is not None else shard_names(len(self.shards), basename)
        if len(self.names) != len(self.shards):
            raise FormatError(f"{self.path}: {len(self.names)} shard names for {len(self.shards)} shards")
        self.weight_map = {}
        for fname, sh in zip(self.names, self.shards):
            for e in sh:
                self.weight_map[e[0]] = fname
        self.data_bytes = sum(tensor_nbytes(d, s) for _, d, s in self.plan)
        self._k = -1
        self._w: StreamingWriter | None = None
        self._closed = False

    def _writer_for(self, name: str) -> StreamingWriter:
        if self._w is not None and not self._w.complete:
            return self._w
        while True:
            if self._w is not None:
                self._w.commit()
            self._k += 1
            if self._k >= len(self.shards):
                raise FormatError(f"{self.path}: got tensor {name!r} but every planned tensor is written")
            self._w = StreamingWriter(self.adir.file(self.names[self._k]), self.shards[self._k],
                                      self.metadata, atomic=False, label=self.path / self.names[self._k])
            if not self._w.complete:
                return self._w

    def write(self, name, tensor) -> None:
        try:
            self._writer_for(name).write(name, tensor)
        except BaseException:
            self.abort()
            raise

    def write_chunk(self, name, chunk) -> None:
        try:
            self._writer_for(name).write_chunk(name, chunk)
        except BaseException:
            self.abort()
            raise

    def finish_files(self) -> None:
        """Close the last shard, check every shard is complete, write the index."""
        if self._w is not None:
            if not self._w.complete:
                raise FormatError(f"{self.path}: commit before every tensor was written (next: {self._w.next_name!r})")
            self._w.commit()
        while self._k < len(self.shards) - 1:
            self._k += 1
            self._w = StreamingWriter(self.adir.file(self.names[self._k]), self.shards[self._k],
                                      self.metadata, atomic=False, label=self.path / self.names[self._k])
            if not self._w.complete:
                raise FormatError(f"{self.path}: commit before every tensor was written (next: {self._w.next_name!r})")
            self._w.commit()
        if not self.index:
            return
        index = {"metadata": {"total_size": self.data_bytes, **self.metadata}, "weight_map": self.weight_map}
        self.adir.write_text(f"{self.basename}.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")

    def commit(self) -> Path:
        try:
            self.finish_files()
        except BaseException:
            self.abort()
            raise
        if self._own:
            self.adir.commit()
        self._closed = True
        return self.path

    def finalize(self) -> None:
        if self._own:
            self.adir.finalize()

    def revert(self) -> None:
        if self._own:
            self.adir.revert()

    def abort(self) -> None:
        if self._w is not None:
            self._w.abort()
        if self._own:
            self.adir.abort()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            self.commit()
        else:
            self.abort()
        return False


# ------------------------------------------------------------------------------------------------
# one writer per target

def lock_path(target) -> Path:
    """The lock file of an output target: ``.<name>.ckptreg-lock`` beside it."""
    t = Path(target)
    return t.parent / f".{t.name}{LOCK_MARK}"


_HELD: dict[str, dict] = {}
_HELD_GUARD = threading.Lock()


def _lock_key(target: Path) -> str:
    try:
        parent = os.path.realpath(target.parent)
    except OSError:  # pragma: no cover
        parent = str(target.parent)
    return os.path.join(parent, target.name)


class TargetLock:
    """An exclusive, non-blocking lock on one output path, held from before the "exists" check
    until the output is committed and registered. ``flock`` on ``.<name>.ckptreg-lock`` beside the
    target (released by the kernel when the process dies, so a killed merge never blocks the next
    one); the file is removed on release (the inode is checked after locking, so removing it is
    race-free). Re-entrant within one thread of one process (a sweep holds its targets' locks and
    runs some of its merges through :func:`ckptreg.engine.merge`); another thread or process gets
    :class:`TargetBusyError` at once. Folders created for the target's parent are removed again on
    ``release(keep=False)`` when still empty."""

    def __init__(self, target):
        self.target = Path(os.path.abspath(os.fspath(target)))
        self.path = lock_path(self.target)
        self._key = _lock_key(self.target)
        self._fd: int | None = None
        self._reentered = False
        self._created: list[Path] = []

    def _make_parent(self) -> None:
        parent = self.target.parent
        missing = []
        p = parent
        while not p.exists() and not p.is_symlink() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UsageError(f"{self.target}: cannot write there: {parent} (or a folder above it) "
                             "is a file, not a folder") from None
        except OSError as e:
            raise _typed(e, self.target, f"creating the folder {parent}") from e
        self._created = missing

    def acquire(self) -> "TargetLock":
        import fcntl

        with _HELD_GUARD:
            h = _HELD.get(self._key)
            if h is not None and h["pid"] == os.getpid() and h["thread"] == threading.get_ident():
                h["count"] += 1
                self._reentered = True
                return self
        self._make_parent()
        try:
            busy_tries = 0
            for _ in range(200):
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
                except OSError as e:
                    raise _typed(e, self.target, f"creating the lock file {self.path.name} in {self.path.parent}") from e
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        os.close(fd)
                        raise
                    if busy_tries < 5:  # remove_stale_locks holds a free lock file for a moment
                        busy_tries += 1
                        os.close(fd)
                        time.sleep(0.02)
                        continue
                    try:
                        holder = os.pread(fd, 64, 0).decode("ascii", "replace").split()
                    except OSError:
                        holder = []
                    os.close(fd)
                    who = f"pid {holder[0]}" if holder and holder[0].isdigit() else "another process"
                    raise TargetBusyError(
                        f"{self.target}: another ckptreg process ({who}) is writing this output right now; "
                        "nothing was changed. Wait for it to finish, or choose another -o") from None
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # the previous holder removed the file between our open and flock
                    os.close(fd)
                    continue
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()} {HOST_TAG}\n".encode(), 0)
                except OSError:
                    pass  # the pid is only for messages (a full disk may refuse even these bytes)
                self._fd = fd
                break
            else:  # pragma: no cover
                raise TargetBusyError(f"{self.target}: could not lock {self.path} (it keeps being replaced)")
        except BaseException:
            self._remove_created()
            raise
        with _HELD_GUARD:
            _HELD[self._key] = {"pid": os.getpid(), "thread": threading.get_ident(), "count": 1}
        return self

    def _remove_created(self) -> None:
        for d in self._created:  # deepest first; stops at the first folder that is not empty
            try:
                d.rmdir()
            except OSError:
                break
        self._created = []

    def release(self, keep: bool = True) -> None:
        """Release; ``keep=False``: also remove the folders :meth:`acquire` created, if empty."""
        if self._reentered:
            with _HELD_GUARD:
                h = _HELD.get(self._key)
                if h is not None:
                    h["count"] -= 1
            self._reentered = False
            return
        if self._fd is None:
            return
        with _HELD_GUARD:
            _HELD.pop(self._key, None)
        try:
            os.unlink(self.path)
        except OSError:
            pass
        try:
            os.close(self._fd)
        finally:
            self._fd = None
        if not keep:
            self._remove_created()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, et, ev, tb):
        self.release(keep=et is None)
        return False


def remove_stale_locks(folder) -> list[Path]:
    """Remove lock files (``.<name>.ckptreg-lock``) in ``folder`` that no process holds (a killed
    merge's); a held one is left alone. Returns the paths removed."""
    import fcntl

    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for nm in sorted(names):
        if not (nm.startswith(".") and nm.endswith(LOCK_MARK)):
            continue
        p = folder / nm
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: a live writer
            try:
                if os.stat(p).st_ino == os.fstat(fd).st_ino:
                    os.unlink(p)
                    removed.append(p)
            except OSError:
                pass
        finally:
            os.close(fd)
    return removed


def write_file(path, tensors: dict, metadata: dict[str, str] | None = None, *, overwrite: bool = True) -> Path:
    """Convenience: write a dict of tensors through the streaming writer (tests, small outputs)."""
    plan = [(k, dtype_str(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    with StreamingWriter(path, plan, metadata, overwrite=overwrite) as w:
        for k, v in tensors.items():
            w.write(k, v)
    return Path(path)


__all__ = ["StreamingWriter", "ShardedWriter", "AtomicDir", "build_header", "shard_plan", "shard_names",
           "replace_path", "undo_replace", "write_file", "dtype_str", "torch_dtype", "tensor_nbytes", "TMP_MARK",
           "ITEMSIZE", "find_stale_temporaries", "remove_stale_temporaries", "remove_stale_locks", "fs_error",
           "TargetLock", "lock_path", "LOCK_MARK", "HOST_TAG"]
_ = Iterable

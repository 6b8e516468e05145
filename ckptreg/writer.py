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
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
from pathlib import Path
from typing import Iterable, Sequence

from .errors import FormatError, OutputExistsError

TMP_MARK = ".ckptreg-tmp-"

# safetensors dtype string -> (torch dtype attribute name, itemsize)
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}
_TORCH_NAME = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def torch_dtype(dtype_str: str):
    """torch dtype of a safetensors dtype string."""
    import torch

    try:
        return getattr(torch, _TORCH_NAME[dtype_str])
    except (KeyError, AttributeError):
        raise FormatError(f"unsupported safetensors dtype {dtype_str!r}") from None


def dtype_str(dtype) -> str:
    """safetensors dtype string of a torch dtype (or pass a string through, validated)."""
    if isinstance(dtype, str):
        s = dtype.upper()
        aliases = {"FLOAT32": "F32", "FP32": "F32", "FLOAT": "F32", "FLOAT16": "F16", "FP16": "F16",
                   "HALF": "F16", "BFLOAT16": "BF16", "FLOAT64": "F64", "FP64": "F64", "DOUBLE": "F64"}
        s = aliases.get(s, s)
        if s not in ITEMSIZE:
            raise FormatError(f"unsupported dtype {dtype!r}")
        return s
    name = str(dtype).replace("torch.", "")
    for k, v in _TORCH_NAME.items():
        if v == name:
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
    return target.parent / f".{target.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


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
    writes straight to ``path`` (used inside an already-temporary folder).
    """

    def __init__(self, path, plan: Sequence[tuple], metadata: dict[str, str] | None = None, *,
                 overwrite: bool = True, atomic: bool = True):
        self.path = Path(path)
        self.plan = [(str(n), dtype_str(d), tuple(int(s) for s in shp)) for n, d, shp in plan]
        if not overwrite and self.path.exists():
            raise OutputExistsError(f"{self.path} exists (use overwrite)")
        self._header, self._offsets = build_header(self.plan, metadata)
        self._sizes = [tensor_nbytes(d, s) for _, d, s in self.plan]
        self.data_bytes = sum(self._sizes)
        self.total_bytes = len(self._header) + self.data_bytes
        self.atomic = atomic
        self.tmp = tmp_name(self.path) if atomic else self.path
        self._f = open(self.tmp, "wb")
        self._closed = False
        self._committed = False
        self._i = 0          # index of the tensor being written
        self._done = 0       # bytes of that tensor written so far
        try:
            self._f.write(self._header)
        except BaseException:
            self.abort()
            raise

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
        except BaseException:
            self.abort()
            raise
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
                os.replace(self.tmp, self.path)
                fsync_dir(self.path.parent)
        except BaseException:
            self.abort()
            raise
        self._committed = True
        return self.path

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
        except FileNotFoundError:
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


def replace_path(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing whatever ``dst`` is (file or folder) as atomically as the
    OS allows: files with rename(2); folders with an exchange then removal of the old one."""
    src, dst = Path(src), Path(dst)
    if not dst.exists() and not dst.is_symlink():
        os.rename(src, dst)
    elif src.is_dir() or dst.is_dir():
        if dst.is_dir() and not dst.is_symlink() and src.is_dir() and _rename_exchange(src, dst):
            # src now holds the old folder
            shutil.rmtree(src, ignore_errors=True)
        else:
            old = tmp_name(dst)
            os.rename(dst, old)
            os.rename(src, dst)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    else:
        os.replace(src, dst)
    fsync_dir(dst.parent)


class AtomicDir:
    """A folder built under a temporary name beside ``path`` and renamed into place on commit."""

    def __init__(self, path, *, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise OutputExistsError(f"{self.path} exists (use overwrite)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp_name(self.path)
        self.tmp.mkdir()
        self._done = False

    def file(self, name: str) -> Path:
        return self.tmp / name

    def copy_in(self, src, name: str | None = None) -> Path:
        dst = self.tmp / (name or Path(src).name)
        shutil.copyfile(src, dst)
        return dst

    def write_text(self, name: str, text: str) -> Path:
        dst = self.tmp / name
        with open(dst, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
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
            replace_path(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.path

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
                 overwrite: bool = False, into: AtomicDir | None = None):
        self.plan = [(str(n), dtype_str(d), tuple(int(s) for s in shp)) for n, d, shp in plan]
        self.metadata = dict(metadata or {})
        self.basename = basename
        self._own = into is None
        self.adir = AtomicDir(dir, overwrite=overwrite) if into is None else into
        self.path = self.adir.path
        self.shards = shard_plan(self.plan, max_shard_bytes)
        self.names = shard_names(len(self.shards), basename)
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
                                      self.metadata, atomic=False)
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
                                      self.metadata, atomic=False)
            if not self._w.complete:
                raise FormatError(f"{self.path}: commit before every tensor was written (next: {self._w.next_name!r})")
            self._w.commit()
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


def write_file(path, tensors: dict, metadata: dict[str, str] | None = None, *, overwrite: bool = True) -> Path:
    """Convenience: write a dict of tensors through the streaming writer (tests, small outputs)."""
    plan = [(k, dtype_str(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    with StreamingWriter(path, plan, metadata, overwrite=overwrite) as w:
        for k, v in tensors.items():
            w.write(k, v)
    return Path(path)


__all__ = ["StreamingWriter", "ShardedWriter", "AtomicDir", "build_header", "shard_plan", "shard_names",
           "replace_path", "write_file", "dtype_str", "torch_dtype", "tensor_nbytes", "TMP_MARK", "ITEMSIZE"]
_ = Iterable

"""safetensors headers (plain Python, validated) and zero-copy tensor views over one mmap per file.

File layout (https://github.com/huggingface/safetensors): 8 bytes little-endian u64 ``N``, then
``N`` bytes of UTF-8 JSON (an object: tensor name -> ``{"dtype", "shape", "data_offsets"}``, plus
an optional ``"__metadata__"`` str -> str map), then the data section. ``data_offsets`` are
``[begin, end)`` relative to the start of the data section (byte ``8 + N``).

``read_header`` imports nothing heavy (``ckptreg add`` must not import torch) and validates
everything that can be checked without reading tensor bytes; every problem is a
:class:`~ckptreg.errors.FormatError` whose message starts with the file path.

``open_tensors`` maps the file once (``ACCESS_COPY``: pages stay shared with the page cache until
written; we never write) and hands out views of that map. Views are zero-copy when the tensor's
absolute offset is a multiple of its item size (always true for files written by the safetensors
library, which pads the header to 8 bytes); an unaligned tensor is copied (documented fallback,
the only case that allocates).
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field

from .errors import FormatError, NotFoundError

#: safetensors dtype string -> (torch dtype attribute name, item size in bytes).
#: Sub-byte types (F4, F6_*) are not supported: a header using them is a FormatError.
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F64": ("float64", 8),
    "C64": ("complex64", 8),
}

#: torch dtype attribute name -> safetensors dtype string (for pickled state dicts).
TORCH_TO_ST: dict[str, str] = {v[0]: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """One tensor in a file. ``offset`` is the absolute byte offset in ``file``.

    For tensors of torch pickles (``formats.inspect(..., allow_pickle=True)``) there is no byte
    range: ``offset`` is -1 and ``nbytes`` is ``numel * itemsize`` (what it would take in memory).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def is_pickle(self) -> bool:
        return self.offset < 0


@dataclass(frozen=True)
class Header:
    """A parsed, validated header. ``tensors`` is in file (data offset) order."""

    path: str
    header_len: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int
    file_size: int
    raw: bytes = field(repr=False)


def _fail(path: str, msg: str) -> FormatError:
    return FormatError(f"{path}: {msg}")


def _dup_check(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return d


def read_header(path) -> Header:
    """Parse and validate the header of a safetensors file (no torch, no tensor bytes read)."""
    spath = os.fspath(path)
    apath = os.path.abspath(spath)
    try:
        with open(spath, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise _fail(spath, f"truncated: {file_size} bytes, a safetensors file has at least 8")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise _fail(spath, f"header length {n} is larger than the {MAX_HEADER_BYTES}-byte limit "
                                   "(not a safetensors file, or corrupt)")
            if n > file_size - 8:
                raise _fail(spath, f"header length {n} runs past the end of the file "
                                   f"({file_size} bytes; truncated or not a safetensors file)")
            raw = f.read(n)
    except FileNotFoundError:
        raise NotFoundError(f"{spath}: no such file") from None
    except IsADirectoryError:
        raise _fail(spath, "is a directory, expected a .safetensors file") from None
    except PermissionError as e:
        raise _fail(spath, f"cannot read: {e.strerror}") from None
    if len(raw) != n:
        raise _fail(spath, f"truncated while reading the {n}-byte header")
    return _parse(spath, apath, raw, file_size)


def _parse(spath: str, apath: str, raw: bytes, file_size: int) -> Header:
    n = len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(spath, f"header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise _fail(spath, f"header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _fail(spath, f"header must be a JSON object, got {type(obj).__name__}")
    # json.loads keeps the last of duplicate keys silently. Cheap screen: each entry has one
    # "data_offsets" key, so more occurrences than entries means a duplicate (or a name that
    # contains the string); only then re-parse with a hook that finds the duplicate exactly.
    if text.count('"data_offsets"') > len(obj):
        try:
            json.loads(text, object_pairs_hook=_dup_check)
        except ValueError as e:
            raise _fail(spath, f"header is not valid JSON: {e}") from None

    data_start = 8 + n
    data_len = file_size - data_start
    metadata: dict[str, str] = {}
    meta = obj.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict):
            raise _fail(spath, f"__metadata__ must be an object of strings, got {type(meta).__name__}")
        for k, v in meta.items():
            if not isinstance(v, str):
                raise _fail(spath, f"__metadata__[{k!r}] must be a string, got {type(v).__name__}")
        metadata = meta

    entries = []  # (begin, end, name, dtype, shape)
    append = entries.append
    dtypes = DTYPES
    for name, e in obj.items():
        try:
            dtype = e["dtype"]
            shape = e["shape"]
            offs = e["data_offsets"]
            item = dtypes[dtype][1]
            b, en = offs
            if type(shape) is not list or type(b) is not int or type(en) is not int or b < 0 or b > en:
                raise ValueError
            numel = 1
            for s in shape:
                if type(s) is not int or s < 0:
                    raise ValueError
                numel *= s
        except Exception:
            _entry_error(spath, name, e)  # raises the precise FormatError
        if en - b != numel * item:
            raise _fail(spath, f"tensor {name!r}: data [{b}, {en}) is {en - b} bytes but {dtype} "
                               f"shape {shape} needs {numel * item}")
        if en > data_len:
            raise _fail(spath, f"tensor {name!r} data [{b}, {en}) extends past end of file "
                               f"({data_len} bytes of data)")
        append((b, en, name, dtype, shape))

    entries.sort(key=lambda t: (t[0], t[1]))
    prev_end, prev_name = 0, None
    tensors: dict[str, TensorInfo] = {}
    for b, en, name, dtype, shape in entries:
        if b < prev_end and en > b:
            raise _fail(spath, f"tensor {name!r} data [{b}, {en}) overlaps tensor {prev_name!r} "
                               f"(which ends at {prev_end})")
        if en > prev_end:
            prev_end, prev_name = en, name
        tensors[name] = TensorInfo(name, dtype, tuple(shape), apath, data_start + b, en - b)
    return Header(apath, n, metadata, tensors, data_start, file_size, raw)


def _entry_error(spath, name, e):
    """Raise the FormatError describing what is wrong with one header entry."""
    if not isinstance(e, dict):
        raise _fail(spath, f"tensor {name!r}: entry must be an object, got {type(e).__name__}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if e.get(k) is None]
    if missing:
        raise _fail(spath, f"tensor {name!r}: missing {', '.join(missing)}")
    dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(spath, f"tensor {name!r}: unknown or unsupported dtype {dtype!r} "
                           f"(known: {', '.join(DTYPES)})")
    if type(shape) is not list or any(type(s) is not int or s < 0 for s in shape):
        raise _fail(spath, f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    if (type(offs) is not list or len(offs) != 2
            or type(offs[0]) is not int or type(offs[1]) is not int or offs[0] < 0):
        raise _fail(spath, f"tensor {name!r}: data_offsets must be [begin, end] non-negative integers, "
                           f"got {offs!r}")
    if offs[0] > offs[1]:
        raise _fail(spath, f"tensor {name!r}: data_offsets [{offs[0]}, {offs[1]}) has begin > end")
    raise _fail(spath, f"tensor {name!r}: malformed entry {e!r}")


class SafeFile:
    """An open safetensors file: one read-only-in-practice mmap, tensors as views of it.

    Use as a context manager. Views stay valid after ``close()`` (the map is released when the
    last view is garbage collected). As with any mmap, truncating the file in place while views
    are alive makes reads of the lost pages fail (SIGBUS); ckptreg's writer replaces files by
    rename, which leaves open maps intact. Never write into a view: with ``ACCESS_COPY`` a write would
    only change this process's private copy, but callers should treat views as read-only.
    """

    def __init__(self, path):
        self.header = read_header(path)
        self.path = self.header.path
        self._mm = None
        self._base = None
        if self.header.file_size > 0:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            if len(self._mm) != self.header.file_size:
                size = len(self._mm)
                self._mm.close()
                raise _fail(self.path, f"file changed size while opening ({self.header.file_size} -> {size})")

    def _base_u8(self):
        if self._base is None:
            import torch

            if self._mm is None:
                raise FormatError(f"{self.path}: file is closed")
            self._base = torch.frombuffer(self._mm, dtype=torch.uint8)
        return self._base

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def info(self, name) -> TensorInfo:
        try:
            return self.header.tensors[name]
        except KeyError:
            raise NotFoundError(f"{self.path}: no tensor named {name!r}") from None

    def tensor(self, name):
        """Zero-copy view (copy only when the offset is not aligned to the item size)."""
        import torch

        ti = self.info(name)
        tdt = getattr(torch, DTYPES[ti.dtype][0])
        item = DTYPES[ti.dtype][1]
        if ti.nbytes == 0:
            return torch.empty(ti.shape, dtype=tdt)
        raw = self._base_u8()[ti.offset: ti.offset + ti.nbytes]
        if ti.offset % item:
            raw = raw.clone()
        return raw.view(tdt).view(ti.shape)

    def __contains__(self, name) -> bool:
        return name in self.header.tensors

    def close(self) -> None:
        # torch.frombuffer does not keep the buffer export, so mm.close() would succeed and leave
        # live views dangling (segfault on access). Drop our references instead: every view
        # holds the mmap object, which unmaps when the last of them is garbage collected.
        self._base = None
        self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def open_tensors(path) -> SafeFile:
    """Open a safetensors file for zero-copy reads (validates the header first)."""
    return SafeFile(path)

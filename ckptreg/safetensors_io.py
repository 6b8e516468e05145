"""safetensors headers (plain Python, validated) and zero-copy tensor views over one mmap per file.

File layout (https://github.com/huggingface/safetensors): 8 bytes little-endian u64 ``N``, then
``N`` bytes of UTF-8 JSON (an object: tensor name -> ``{"dtype", "shape", "data_offsets"}``, plus
an optional ``"__metadata__"`` str -> str map), then the data section. ``data_offsets`` are
``[begin, end)`` relative to the start of the data section (byte ``8 + N``).

``read_header`` imports nothing heavy (``ckptreg add`` must not import torch) and validates
everything that can be checked without reading tensor bytes; every problem is a
:class:`~ckptreg.errors.FormatError` whose message starts with the file path.

``open_tensors`` keeps one descriptor. ``SafeFile.read`` copies tensor bytes (or a flat element
range) into a caller's buffer with ``preadv``: what the merge engine uses, because a file
truncated in place while it is read is then a short read (ChangedError naming the file) and not
the SIGBUS of touching a lost page of an mmap; ``SafeFile.check`` re-stats the file (inode,
size, mtime) to catch a same-size rewrite or a replacement. ``SafeFile.tensor`` maps the file
on first use (``ACCESS_COPY``: pages stay shared with the page cache until written; we never
write) and hands out views of that map. Views are zero-copy when the tensor's
absolute offset is a multiple of its item size (always true for files written by the safetensors
library, which pads the header to 8 bytes); an unaligned tensor is copied (documented fallback,
the only case that allocates).
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import FormatError, NotFoundError

class DType(NamedTuple):
    """One row of :data:`DTYPE_TABLE`, the one dtype table of the reader, the writer and the
    merge engine."""
    torch_name: str     # attribute of torch: getattr(torch, torch_name)
    itemsize: int       # bytes per element
    is_float: bool      # merged arithmetically (computed in float32/float64, written in this dtype)
    mergeable: bool     # a merge can write it: floats are merged, integers/bool copied from the newest input
    name: str           # the safetensors dtype string


def _dt(name, torch_name, itemsize, is_float=False, mergeable=True) -> tuple[str, DType]:
    return name, DType(torch_name, itemsize, is_float, mergeable, name)


#: safetensors dtype string -> :class:`DType`: THE dtype table. Every dtype here reads (``add`` registers it);
#: only ``mergeable`` ones can be merged: float8 values (F8_*) are quantized against scales stored
#: in other tensors, and complex (C64) has no merge arithmetic, so merging them (or silently
#: copying one input's) would not be a merge: the engine refuses them before writing
#: (:func:`check_mergeable`). Sub-byte types (F4, F6_*) are not supported: a header using them is
#: a FormatError.
DTYPE_TABLE: dict[str, DType] = dict([
    _dt("BOOL", "bool", 1),
    _dt("U8", "uint8", 1),
    _dt("I8", "int8", 1),
    _dt("F8_E5M2", "float8_e5m2", 1, mergeable=False),
    _dt("F8_E4M3", "float8_e4m3fn", 1, mergeable=False),
    _dt("F8_E8M0", "float8_e8m0fnu", 1, mergeable=False),
    _dt("I16", "int16", 2),
    _dt("U16", "uint16", 2),
    _dt("F16", "float16", 2, is_float=True),
    _dt("BF16", "bfloat16", 2, is_float=True),
    _dt("I32", "int32", 4),
    _dt("U32", "uint32", 4),
    _dt("F32", "float32", 4, is_float=True),
    _dt("I64", "int64", 8),
    _dt("U64", "uint64", 8),
    _dt("F64", "float64", 8, is_float=True),
    _dt("C64", "complex64", 8, mergeable=False),
])

#: views of DTYPE_TABLE: safetensors dtype string -> (torch dtype attribute name, item size)
DTYPES: dict[str, tuple[str, int]] = {k: (v.torch_name, v.itemsize) for k, v in DTYPE_TABLE.items()}
#: torch dtype attribute name -> safetensors dtype string (for pickled state dicts).
TORCH_TO_ST: dict[str, str] = {v.torch_name: k for k, v in DTYPE_TABLE.items()}
#: safetensors dtypes merges compute in (the rest of the mergeable ones are copied)
MERGE_FLOATS: tuple[str, ...] = tuple(k for k, v in DTYPE_TABLE.items() if v.is_float)
#: safetensors dtypes a merge can write
MERGEABLE: tuple[str, ...] = tuple(k for k, v in DTYPE_TABLE.items() if v.mergeable)
#: names users give an output dtype (``--out-dtype``) -> safetensors dtype string
DTYPE_ALIASES: dict[str, str] = {"FLOAT32": "F32", "FP32": "F32", "FLOAT": "F32", "FLOAT16": "F16", "FP16": "F16",
                                 "HALF": "F16", "BFLOAT16": "BF16", "FLOAT64": "F64", "FP64": "F64",
                                 "DOUBLE": "F64"}


def unmergeable_reason(dtype: str) -> str:
    """Why a merge cannot write ``dtype`` (a safetensors dtype string)."""
    if dtype.startswith("F8_"):
        return ("float8 values are quantized against scales kept in other tensors; dequantize the checkpoint "
                "(to BF16/F16/F32) before merging")
    if dtype == "C64":
        return "complex tensors have no merge arithmetic"
    if dtype not in DTYPES:
        return "it is not a safetensors dtype ckptreg reads"
    return "this torch has no such dtype"


def check_mergeable(tensors, where: str) -> None:
    """FormatError naming ``where`` (a checkpoint or file), the dtype, why, and the first tensors
    when any of ``tensors`` (a name -> TensorInfo mapping, or (name, dtype) pairs) has a dtype a
    merge cannot write. Call before writing anything."""
    items = tensors.items() if hasattr(tensors, "items") else tensors
    bad: dict[str, list[str]] = {}
    for name, ti in items:
        dt = ti if isinstance(ti, str) else ti.dtype
        if dt not in MERGEABLE:
            bad.setdefault(dt, []).append(name)
    if bad:
        parts = []
        for dt, names in bad.items():
            shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            parts.append(f"{len(names)} {dt} tensor{'s' if len(names) > 1 else ''} ({shown}): "
                         f"{unmergeable_reason(dt)}")
        raise FormatError(f"{where}: cannot be merged: " + "; ".join(parts))


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


# Header screening rules, and where they deliberately differ from the reference parser
# (the ``safetensors`` library, Rust + serde_json; compared by tests/test_header_fuzz.py):
#
# * Same as the library: UTF-8 only; JSON as serde_json reads it (no NaN/Infinity, no number
#   overflowing a double, no lone UTF-16 surrogate escape such as ``\ud800`` anywhere, at most
#   MAX_DEPTH nested objects/arrays); ``-0`` is not an integer (serde_json reads it as the float
#   -0.0, so it is refused as an offset or a dimension; elsewhere, e.g. an unknown entry field, it
#   is accepted like any number); integers outside [-2^63, 2^64) are floats; no duplicate
#   ``dtype``/``shape``/``data_offsets`` in an entry, no duplicate ``__metadata__``;
#   ``__metadata__`` is null or an object of strings; unknown entry fields are
#   ignored; tensors must cover the data section exactly: sorted by (begin, end) each one starts
#   where the previous one ended (no overlap, no gap) and the last one ends at the end of the file
#   (no trailing bytes). Unaligned offsets are accepted, as by the library (views copy them).
# * Stricter than the library, on purpose:
#   - a duplicate key in ANY object: a duplicate tensor name, a duplicate key inside
#     ``__metadata__`` or inside an unknown field (the library keeps the last copy silently; which
#     copy "wins" differs between JSON readers, so a file that means different things to different
#     readers is refused);
#   - sub-byte dtypes F4 / F6_E2M3 / F6_E3M2 are refused (no torch dtype to view them as);
#   - more than MAX_DIMS dimensions (the library accepts any number; torch and our merge kernels
#     are not meant for them), and a dimension above 2^63 - 1 (sizes are int64 in torch and in the
#     registry's database; the library accepts such a zero-size shape and then torch cannot build
#     the tensor); likewise a zero-size shape whose non-zero dimensions multiply to more than
#     2^63 - 1 (torch's strides overflow for some of them, the library's size product for others;
#     refused as a whole).

#: Deepest nesting of JSON objects/arrays accepted in a header. serde_json (the library) stops at
#: 128 nested containers; a valid header needs 3 (header object, entry object, shape array).
MAX_DEPTH = 127
#: Most dimensions a tensor may have.
MAX_DIMS = 64
#: Largest dimension (int64, as torch and the registry store sizes).
MAX_DIM = (1 << 63) - 1

_INF = float("inf")
#: Outside strings, what needs the serde-like number hooks: ``-0``, integers of 19+ digits
#: (beyond int64/uint64 or a double), exponents, NaN/Infinity (json.loads accepts them).
_NUMBER_SCREEN = re.compile(rb"-0|[0-9]{19}|[eE]|NaN|Infinity")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_ONE_BRACKET = bytes.maketrans(b"{}", b"[]")
_BRACKET_RUN = re.compile(rb"\[+|\]+")
_DEPTH_PASSES = 8
_SURROGATE = re.compile("[\ud800-\udfff]")


class _BadJSON(ValueError):
    """Raised from inside json.loads hooks; the message is reported as is."""


def _short(x, limit: int = 120) -> str:
    s = repr(x)
    return s if len(s) <= limit else s[: limit - 4] + " ..."


def _bare(raw: bytes) -> bytes:
    """``raw`` with every JSON string replaced by one NUL byte (exact for valid JSON; NUL cannot
    occur outside strings, nor unescaped inside them): what is left is structure and numbers."""
    if b"\\" in raw:  # escaped backslashes first, then escaped quotes (left to right, as JSON does)
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    return b"\0".join(raw.split(b'"')[::2])


def _too_deep(bare: bytes, limit: int = MAX_DEPTH) -> bool:
    """True if the JSON structure ``bare`` (see :func:`_bare`) nests objects/arrays more than
    ``limit`` deep.

    No recursion and no Python loop over bytes: everything but brackets is deleted and ``{}``
    become ``[]`` (a mismatched pair is a syntax error json.loads reports anyway); a few
    ``replace(b"[]", b"")`` passes delete the innermost levels (a normal header, 3 deep, vanishes
    in 3 passes); what is left is walked run by run (``[[[`` / ``]]]``), stopping at the first run
    that goes past the limit. Bounded cost for any input: a few C passes over the header plus one
    Python step per remaining run of brackets.
    """
    s0 = bare.translate(_ONE_BRACKET, _NOT_BRACKETS)
    if len(s0) <= limit:
        return False
    s, passes = s0, 0
    while passes < _DEPTH_PASSES:
        t = s.replace(b"[]", b"")
        passes += 1
        if len(t) <= limit:
            return False
        few = (len(s) - len(t)) * 8 < len(t)
        s = t
        if few:  # few leaves left (a deep spine): walk the runs now
            break
    # each pass deleted one level: s is between (true depth - passes) and the true depth
    depth = _max_depth_over(s, limit - passes)
    if depth > limit:
        return True
    if depth <= limit - passes:
        return False
    return _max_depth_over(s0, limit) > limit  # close to the limit: count on the full string


def _max_depth_over(s: bytes, limit: int) -> int:
    """The running depth of bracket string ``s`` as soon as it exceeds ``limit``, else its max."""
    depth = best = 0
    for m in _BRACKET_RUN.finditer(s):
        a, b = m.span()
        if s[a] == 0x5B:  # "["
            depth += b - a
            if depth > best:
                best = depth
                if best > limit:
                    return best
        else:
            depth -= b - a
    return best


def _dup_check(pairs):
    """json object_pairs_hook: refuse a duplicate key in any object (json.loads keeps the last)."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise _BadJSON(f"duplicate key {_short(k)} (JSON readers disagree on which copy counts)")
            seen.add(k)
    return d


def _json_int(s: str):
    """json parse_int hook reading integers as serde_json does: ``-0`` is the float -0.0, and
    integers outside [-2^63, 2^64) are floats (so neither is accepted as an offset or a dimension)."""
    if len(s) < 19:
        return -0.0 if s == "-0" else int(s)
    if len(s) <= 40:
        v = int(s)
        if -(1 << 63) <= v < (1 << 64):
            return v
    return _json_float(s)


def _json_float(s: str) -> float:
    f = float(s)
    if f == _INF or f == -_INF:
        raise _BadJSON(f"number {s[:40]}{'...' if len(s) > 40 else ''} is out of range")
    return f


def _json_constant(s: str):
    raise _BadJSON(f"{s} is not a JSON value")


def _lone_surrogate(obj):
    """The first string (key or value) in ``obj`` holding a lone UTF-16 surrogate, else None.
    (Iterative; ``obj`` is at most MAX_DEPTH deep anyway.)"""
    stack = [obj]
    while stack:
        x = stack.pop()
        if type(x) is dict:
            for k, v in x.items():
                if _SURROGATE.search(k):
                    return k
                stack.append(v)
        elif type(x) is list:
            stack.extend(x)
        elif type(x) is str and _SURROGATE.search(x):
            return x
    return None


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
    """Validate header bytes ``raw`` (rules and deliberate differences from the safetensors library:
    see the comment above MAX_DEPTH)."""
    n = len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(spath, f"header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    # Depth first, without recursion: json.loads recurses in C once per level, which ends in a
    # RecursionError (or, with a raised recursion limit, a crash) on a hostile header.
    bare = _bare(raw)
    if _too_deep(bare):
        raise _fail(spath, f"header JSON is nested more than {MAX_DEPTH} levels deep (the safetensors "
                           "library's limit; a valid header needs 3)")
    # The number hooks cost a Python call per number: only when a number needs them.
    hooks = (dict(parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
             if _NUMBER_SCREEN.search(bare) else {})
    try:
        obj = json.loads(text, object_pairs_hook=_dup_check, **hooks)
    except RecursionError:  # defensive: _too_deep bounds the depth, but a deep caller stack remains
        raise _fail(spath, "header JSON is nested too deeply to parse") from None
    except ValueError as e:  # JSONDecodeError and _BadJSON are ValueErrors
        raise _fail(spath, f"header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _fail(spath, f"header must be a JSON object, got {type(obj).__name__}")
    # json.loads turns an escape like "\ud800" into a lone surrogate (not Unicode, not encodable
    # as UTF-8: the registry's database and the safetensors library both refuse it).
    if "\\u" in text:
        bad = _lone_surrogate(obj)
        if bad is not None:
            raise _fail(spath, f"header string {_short(bad)} holds a lone UTF-16 surrogate escape "
                               "(\\ud800-\\udfff without its pair); it is not valid Unicode")

    data_start = 8 + n
    data_len = file_size - data_start
    metadata: dict[str, str] = {}
    meta = obj.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict):
            raise _fail(spath, f"__metadata__ must be an object of strings, got {type(meta).__name__}")
        for k, v in meta.items():
            if not isinstance(v, str):
                raise _fail(spath, f"__metadata__[{_short(k)}] must be a string, got {type(v).__name__}")
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
            if (type(shape) is not list or len(shape) > MAX_DIMS or type(b) is not int
                    or type(en) is not int or b < 0 or b > en):
                raise ValueError
            numel = 1
            for s in shape:
                if type(s) is not int or s < 0 or s > MAX_DIM:
                    raise ValueError
                numel *= s
            if numel == 0 and _size_overflow(shape):
                raise ValueError
        except Exception:
            _entry_error(spath, name, e)  # raises the precise FormatError
        if en - b != numel * item:
            raise _fail(spath, f"tensor {name!r}: data [{b}, {en}) is {en - b} bytes but {dtype} "
                               f"shape {_short(shape)} needs {numel * item}")
        if en > data_len:
            raise _fail(spath, f"tensor {name!r} data [{b}, {en}) extends past end of file "
                               f"({data_len} bytes of data)")
        append((b, en, name, dtype, shape))

    # The tensors must tile the data section exactly, as the safetensors library requires: a gap
    # or trailing bytes are bytes no tensor accounts for (a truncated rewrite, or a forged file).
    entries.sort(key=lambda t: (t[0], t[1]))
    prev_end, prev_name = 0, None
    tensors: dict[str, TensorInfo] = {}
    for b, en, name, dtype, shape in entries:
        if b != prev_end:
            if b < prev_end:
                raise _fail(spath, f"tensor {name!r} data [{b}, {en}) overlaps tensor {prev_name!r} "
                                   f"(which ends at {prev_end})")
            after = f"after tensor {prev_name!r} " if prev_name is not None else ""
            raise _fail(spath, f"tensor {name!r} data [{b}, {en}) leaves a gap: bytes [{prev_end}, {b}) "
                               f"of the data section {after}belong to no tensor")
        prev_end, prev_name = en, name
        tensors[name] = TensorInfo(name, dtype, tuple(shape), apath, data_start + b, en - b)
    if prev_end != data_len:
        raise _fail(spath, f"{data_len - prev_end} trailing bytes after the last tensor: the data section "
                           f"is {data_len} bytes, the tensors cover [0, {prev_end}) (truncated header, "
                           "or not written by a safetensors writer)")
    return Header(apath, n, metadata, tensors, data_start, file_size, raw)


def _size_overflow(shape) -> bool:
    """Is the product of the non-zero dimensions of ``shape`` above 2^63 - 1? (Only a zero-size
    tensor gets there: any other one is bounded by the file size.) Then its contiguous strides may
    overflow int64 (torch refuses it) and the library's own size product may overflow."""
    p = 1
    for s in shape:
        p *= s or 1
    return p > MAX_DIM


def _entry_error(spath, name, e):
    """Raise the FormatError describing what is wrong with one header entry."""
    if not isinstance(e, dict):
        raise _fail(spath, f"tensor {name!r}: entry must be an object, got {type(e).__name__}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if e.get(k) is None]
    if missing:
        raise _fail(spath, f"tensor {name!r}: missing {', '.join(missing)}")
    dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(spath, f"tensor {name!r}: unknown or unsupported dtype {_short(dtype)} "
                           f"(known: {', '.join(DTYPES)})")
    if type(shape) is not list or any(type(s) is not int or s < 0 for s in shape):
        raise _fail(spath, f"tensor {name!r}: shape must be a list of non-negative integers, "
                           f"got {_short(shape)}")
    if len(shape) > MAX_DIMS:
        raise _fail(spath, f"tensor {name!r}: shape has {len(shape)} dimensions, at most {MAX_DIMS} "
                           "are supported")
    big = [s for s in shape if s > MAX_DIM]
    if big:
        raise _fail(spath, f"tensor {name!r}: dimension {big[0]} in shape {_short(shape)} is larger "
                           f"than 2^63 - 1 = {MAX_DIM} (sizes are 64-bit signed integers)")
    if _size_overflow(shape):
        raise _fail(spath, f"tensor {name!r}: zero-size shape {_short(shape)}: the product of its non-zero "
                           "dimensions is larger than 2^63 - 1 (sizes and strides are 64-bit signed integers)")
    if (type(offs) is not list or len(offs) != 2
            or type(offs[0]) is not int or type(offs[1]) is not int or offs[0] < 0):
        raise _fail(spath, f"tensor {name!r}: data_offsets must be [begin, end] non-negative integers, "
                           f"got {_short(offs)}")
    if offs[0] > offs[1]:
        raise _fail(spath, f"tensor {name!r}: data_offsets [{offs[0]}, {offs[1]}) has begin > end")
    raise _fail(spath, f"tensor {name!r}: malformed entry {_short(e)}")


def _ident(st) -> tuple:
    """What identifies one version of a file: the inode, its size and its modification time
    (an in-place rewrite changes mtime, a replacement by rename changes the inode)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def file_ident(path) -> tuple | None:
    """:func:`_ident` of ``path`` now, None when it cannot be stat'ed."""
    try:
        return _ident(os.stat(path))
    except OSError:
        return None


def _changed(path, why):
    from .errors import ChangedError

    return ChangedError(f"{path} changed while the merge read it ({why})")


def _diff(old: tuple, new: tuple | None) -> str:
    if new is None:
        return "it was deleted or moved away"
    if old[:2] != new[:2]:
        return "replaced by another file (a different inode now at the path)"
    if old[2] != new[2]:
        return f"size {old[2]} -> {new[2]} bytes: rewritten or truncated in place"
    return "modified in place (its modification time changed)"


def _lease_signal_ready() -> bool:
    """A read lease's break is signalled with SIGIO, whose default action kills the process. We
    poll the lease state instead of handling the signal, so SIGIO must be ignored: set it to
    SIG_IGN when it has its default action (main thread only); an application's own SIGIO
    handler is left alone and no lease is taken."""
    import signal
    import threading

    sig = getattr(signal, "SIGIO", None)
    if sig is None:
        return False
    h = signal.getsignal(sig)
    if h == signal.SIG_IGN:
        return True
    if h == signal.SIG_DFL and threading.current_thread() is threading.main_thread():
        signal.signal(sig, signal.SIG_IGN)
        return True
    return False


def _pread_into(fd: int, mv: memoryview, offset: int) -> int:
    """Fill ``mv`` from ``fd`` at ``offset``; returns the bytes read (< len(mv) only at end of file)."""
    got, n = 0, len(mv)
    while got < n:
        k = os.preadv(fd, [mv[got:]], offset + got)
        if k == 0:
            break
        got += k
    return got


class SafeFile:
    """An open safetensors file: one descriptor, tensor bytes read with ``preadv``.

    Use as a context manager. :meth:`read` copies a tensor (or a flat element range of it) into a
    caller's buffer with ``os.preadv``. The engine reads every input this way and never touches a
    map of it: a file truncated in place while it is read (a trainer re-saving with
    ``open('wb')``) then gives a short read, turned into a :class:`~ckptreg.errors.ChangedError`
    naming the file, instead of the SIGBUS that touching a truncated page of an mmap raises (which
    Python cannot catch). :meth:`check` re-stats the descriptor and the path and raises
    ChangedError if the file was rewritten, resized or replaced since it was opened (or since
    ``expect``, an identity from :func:`file_ident` taken before its fingerprint was checked).

    :meth:`tensor` still hands out zero-copy views of an mmap (made on first use; views stay valid
    after ``close()``, the map is released when the last view is garbage collected). Those views
    carry the mmap hazard: truncating the file in place while they are alive makes reads of the
    lost pages fail with SIGBUS. Never write into a view (``ACCESS_COPY``: a write would only change
    this process's private copy).
    """

    def __init__(self, path, expect: tuple | None = None):
        spath = os.fspath(path)
        before = file_ident(spath)
        self.header = read_header(path)
        self.path = self.header.path
        self._mm = None
        self._base = None
        self._fd = -1
        self._leased = False
        self._flat: dict = {}
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise _changed(self.path, "it was deleted or moved away") from None
        except OSError as e:
            raise _fail(self.path, f"cannot read: {e.strerror}") from None
        self._ident = _ident(os.fstat(self._fd))
        ref = expect if expect is not None else before
        if ref is not None and ref != self._ident:
            why = _diff(ref, self._ident)
            self.close()
            raise _changed(self.path, why + (" since its fingerprint was checked" if expect is not None else ""))
        if self._ident[2] != self.header.file_size:
            size = self._ident[2]
            self.close()
            raise _changed(self.path, f"size {self.header.file_size} -> {size} bytes while its header was read")

    # -- read lease: zero-copy views that a truncation cannot fault -------------------------------

    def lease(self) -> bool:
        """Take a Linux read lease (``F_SETLEASE F_RDLCK``) on the file; True when held.

        While it is held, another process's ``open()`` for writing or truncation of this file
        blocks in the kernel until we release it, so pages of a map of it cannot disappear and
        :meth:`view` may hand out zero-copy views. :meth:`view` and :meth:`read` poll the lease
        (``F_GETLEASE``) on every call: when a writer waits, the lease is released at once (the
        writer goes on after at most one chunk's work) and every later read goes through
        ``preadv``, where a truncation is a short read, i.e. a ChangedError. Not available (False:
        ``preadv`` only): not Linux, ``CKPTREG_NO_LEASE=1``, a file owned by another user
        (EACCES), a file open for writing somewhere (EAGAIN), filesystems without leases, or an
        application SIGIO handler (see :func:`_lease_signal_ready`).

        Bound: the kernel breaks a lease by force after ``/proc/sys/fs/lease-break-time`` seconds
        (45 by default); only a process stopped in the middle of one chunk's work for that long
        could still meet a truncated page."""
        if self._leased:
            return True
        if self._fd < 0 or os.environ.get("CKPTREG_NO_LEASE", "") not in ("", "0"):
            return False
        try:
            import fcntl

            setlease, rd = fcntl.F_SETLEASE, fcntl.F_RDLCK
        except (ImportError, AttributeError):
            return False
        if not _lease_signal_ready():
            return False
        try:
            fcntl.fcntl(self._fd, setlease, rd)
        except OSError:
            return False
        self._leased = True
        now = _ident(os.fstat(self._fd))
        if now != self._ident:   # changed between the open and the lease
            self._unlease()
            raise _changed(self.path, _diff(self._ident, now))
        return True

    def _unlease(self) -> None:
        if self._leased:
            self._leased = False
            self._flat.clear()
            try:
                import fcntl

                fcntl.fcntl(self._fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            except OSError:
                pass

    def _lease_holds(self) -> bool:
        """True while our lease is held and no writer waits for it (else release it now)."""
        if not self._leased:
            return False
        import fcntl

        try:
            held = fcntl.fcntl(self._fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
        except OSError:
            held = False
        if not held:
            self._unlease()
        return held

    def view(self, name, start: int, stop: int):
        """Zero-copy flat view of elements ``[start, stop)`` while the read lease holds, else None
        (the caller reads with :meth:`read`). Use it only until the next view()/read() call on
        this file: that call may release the lease to a waiting writer."""
        if not self._lease_holds():
            return None
        v = self._flat.get(name)
        if v is None:
            self._flat.clear()   # one tensor at a time (an unaligned one is a copy)
            v = self._flat[name] = self.tensor(name).reshape(-1)
        return v[start:stop]

    # -- reading (no mmap) ------------------------------------------------------------------------

    def read(self, name, start: int = 0, stop: int | None = None, out=None):
        """Elements ``[start, stop)`` of tensor ``name`` (flat, in file order) read with ``preadv``.

        ``out``: a contiguous 1-D tensor of the tensor's dtype with at least ``stop - start``
        elements, filled and returned as ``out[:stop - start]`` (reusable buffer, no allocation);
        without it a new tensor is returned. ChangedError when the file ends early."""
        import torch

        ti = self.info(name)
        tdt = getattr(torch, DTYPES[ti.dtype][0])
        item = DTYPES[ti.dtype][1]
        numel = ti.numel
        stop = numel if stop is None else min(int(stop), numel)
        start = max(0, int(start))
        n = max(0, stop - start)
        if out is None:
            out = torch.empty(n, dtype=tdt)
        else:
            if out.dtype != tdt or out.dim() != 1 or not out.is_contiguous() or out.numel() < n:
                raise ValueError(f"buffer for {name!r} must be a contiguous 1-D {tdt} tensor of >= {n} elements")
            out = out[:n]
        if n == 0:
            return out
        if self._fd < 0:
            raise FormatError(f"{self.path}: file is closed")
        if self._leased:
            self._lease_holds()   # a writer waiting for our lease goes on now
        nbytes = n * item
        mv = memoryview(out.view(torch.uint8).numpy()).cast("B")[:nbytes]
        off = ti.offset + start * item
        try:
            got = _pread_into(self._fd, mv, off)
        except OSError as e:
            raise _changed(self.path, f"reading tensor {name!r} failed: {e.strerror}") from None
        if got != nbytes:
            size = os.fstat(self._fd).st_size
            raise _changed(self.path, f"truncated: tensor {name!r} needs bytes [{off}, {off + nbytes}), "
                                      f"the file now ends at byte {size}")
        return out

    def read_tensor(self, name):
        """The whole tensor ``name``, shaped, in freshly allocated memory (see :meth:`read`)."""
        return self.read(name).view(self.info(name).shape)

    def check(self) -> None:
        """ChangedError if the file was rewritten, resized or replaced since it was opened."""
        if self._fd < 0:
            return
        if self._leased:
            self._lease_holds()
        now = _ident(os.fstat(self._fd))
        if now != self._ident:
            raise _changed(self.path, _diff(self._ident, now))
        at_path = file_ident(self.path)
        if at_path != self._ident:
            raise _changed(self.path, _diff(self._ident, at_path))

    # -- zero-copy views (mmap) -------------------------------------------------------------------

    def _base_u8(self):
        if self._base is None:
            import torch

            if self._mm is None:
                if self._fd < 0:
                    raise FormatError(f"{self.path}: file is closed")
                if self.header.file_size == 0:  # pragma: no cover (a header is at least 8 bytes)
                    raise FormatError(f"{self.path}: empty file")
                self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
                if len(self._mm) != self.header.file_size:
                    size = len(self._mm)
                    self._mm = None
                    raise _changed(self.path, f"size {self.header.file_size} -> {size} bytes")
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
        # holds the mmap object, which unmaps when the last of them is garbage collected (the
        # mmap holds its own duplicate of the descriptor, so ours can be closed now).
        # A lease belongs to the open file description, which the mmap's duplicate descriptor
        # shares: release it explicitly, views left alive must not keep writers waiting.
        self._unlease()
        self._flat = {}
        self._base = None
        self._mm = None
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def open_tensors(path, expect: tuple | None = None) -> SafeFile:
    """Open a safetensors file (validates the header first) for :meth:`SafeFile.read` (preadv,
    safe against the file being truncated) and zero-copy :meth:`SafeFile.tensor` views.
    ``expect``: the file's :func:`file_ident` when its fingerprint was checked (ChangedError if
    it differs now)."""
    return SafeFile(path, expect)

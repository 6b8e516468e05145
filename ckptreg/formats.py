"""Recognise checkpoint layouts, inventory their tensors, read LoRA configs, fingerprint files.

Layouts (``inspect``):

* PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``
  (format ``"peft"``, kind ``"lora"``; ``adapter_model.bin`` only with ``allow_pickle``).
* HF model folder: ``model.safetensors``, or shards listed in ``model.safetensors.index.json``
  (format ``"hf"``, kind ``"full"``; ``pytorch_model.bin`` only with ``allow_pickle``).
* An HF Trainer ``checkpoint-N`` folder is one of the two above (optimizer.pt & co. are ignored);
  if the adapter/model sits in exactly one sub-folder (PEFT's named adapters) that one is used.
* A single ``.safetensors`` file (format ``"safetensors"``; kind ``"lora"`` when tensor names
  contain ``lora_A``/``lora_B``, else ``"full"``). A folder holding exactly one ``.safetensors``
  file and nothing the rules above match is treated the same way.
* A torch pickle ``.bin/.pt/.pth/.ckpt`` (format ``"pickle"``), only with ``allow_pickle=True``,
  loaded with ``torch.load(weights_only=True, map_location="cpu")``. The state dict is
  ``obj["state_dict"]`` (Lightning), else ``obj["model_state_dict"]``/``["model"]``/``["module"]``
  when that is a dict, else every tensor in ``obj`` (nested dicts flattened with ``.``).
  Pickled tensors have no byte range: their :class:`TensorInfo` has ``offset = -1`` and
  ``nbytes = numel * itemsize``, ``file`` = the pickle. Use :func:`load_pickle_state` to read them.

Fingerprint (``fingerprint(files)``, scheme ``ckptreg-fp2``, value ``"v2:"`` + the first 61 hex
digits of a BLAKE2b-256, 64 characters like the v1 digest): BLAKE2b-256
over ``b"ckptreg-fp2\\0"`` then, for each file in order of (basename, absolute path):
``basename (UTF-8) + b"\\0" + size (u64 LE)``, then for a safetensors file ``header length (u64 LE)
+ raw header bytes`` and a sample of the data section; for any other file (pickles) a sample of
the whole file. The sample: a data section of at most 4 MiB whole; otherwise its first and last
MiB whole and, from every 1 MiB block in between, 4 windows of 1 KiB at offsets derived from
BLAKE2b(size + header) and the block index (deterministic, so the same file always gives the
same value). It reads about 4 KiB per MiB (0.4 % of the data; 4 pages per MiB from disk) plus
2 MiB + header per file. What it catches: any change of size, layout, dtype, shape or metadata;
any edit of the first/last MiB; a rewrite of a whole tensor of 1 MiB or more (each of its blocks
is sampled); in a middle block, a changed region of ``L`` bytes is caught with probability about
``1 - (1 - (L + 1023) / 2**20) ** 4`` -- for ONE changed byte that is 4 KiB / 1 MiB = 0.39 %,
for a changed 64 KiB region 23 %, for 256 KiB 69 %. So a single flipped byte in the middle of a
large tensor is usually NOT caught by the cheap fingerprint: ``fingerprint(files, full=True)``
hashes every byte (SHA-256 of ``basename + size + every byte``, scheme ``ckptreg-fp1-full``,
64 hex, unchanged). Basenames, not paths, are hashed, so moving a folder keeps its fingerprint.

Stored fingerprints of the older cheap scheme (``ckptreg-fp1``: 64 hex without a prefix, header
+ first/last MiB of data, SHA-256) stay valid: :func:`fingerprint_matches` checks a stored value
with the scheme that made it (:func:`fingerprint_v1` for those).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FormatError, NotFoundError
from .safetensors_io import DTYPES, MAX_HEADER_BYTES, TORCH_TO_ST, TensorInfo, read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MIB = 1 << 20

#: Non-tensor files copied to a merge output of the same layout (exact names).
CONFIG_NAMES = frozenset({
    "adapter_config.json", "config.json", "generation_config.json", "special_tokens_map.json",
    "added_tokens.json", "README.md", "preprocessor_config.json", "processor_config.json",
    "spiece.model", "sentencepiece.bpe.model",
})
#: ... and files whose names start with one of these.
CONFIG_PREFIXES = ("tokenizer", "vocab", "merges", "chat_template")
#: Never copied even if a prefix matches (trainer state belongs to the training run).
NOT_CONFIG = frozenset({"optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin",
                        "scaler.pt"})


@dataclass
class CheckpointInfo:
    path: str
    format: str                 # "peft" | "hf" | "safetensors" | "pickle"
    kind: str                   # "lora" | "full"
    files: list[str]            # tensor files (absolute)
    tensors: dict[str, TensorInfo]   # union over shards, sorted by name
    n_params: int
    nbytes: int
    fingerprint: str
    base_model: str | None = None
    lora: dict | None = None    # {"r", "lora_alpha", "use_rslora", "target_modules", "scaling", ...}
    config_files: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)   # safetensors __metadata__ (first file)

    @property
    def n_tensors(self) -> int:
        return len(self.tensors)


# ----------------------------------------------------------------------------- steps

_STEP_PATTERNS = [
    re.compile(r"(?:^|[^a-z0-9])(?:global_)?steps?[=_-]?(\d+)(?![0-9])", re.I),
    re.compile(r"global_step(\d+)", re.I),
    re.compile(r"(?:^|[^a-z0-9])checkpoint[-_=]?(\d+)(?![0-9])", re.I),
    re.compile(r"(?:^|[^a-z0-9])ckpt[-_=](\d+)(?![0-9])", re.I),
    re.compile(r"(?:^|[^a-z0-9])iter(?:ation)?[-_=]?(\d+)(?![0-9])", re.I),
]


def infer_step(path) -> int | None:
    """The training step a path names, or None.

    ``checkpoint-1000``, ``step=1000``, ``epoch=2-step=1000.ckpt``, ``step_1000``, ``step-1000``,
    ``global_step1000``, ``ckpt-1000``, ``iter_1000`` -> 1000. Looks at the last path component
    (without suffix), then its parent (``checkpoint-1000/adapter_model.safetensors``).
    """
    p = Path(os.fspath(path))
    parts = [p.name]
    for suf in (".safetensors",) + PICKLE_SUFFIXES:
        if p.name.lower().endswith(suf):
            parts = [p.name[: -len(suf)]]
            break
    if p.parent.name:
        parts.append(p.parent.name)
    for part in parts:
        for pat in _STEP_PATTERNS:
            m = pat.search(part)
            if m:
                return int(m.group(1))
    return None


# ----------------------------------------------------------------------------- fingerprint

def _safetensors_prefix(f, size):
    """(header_len, raw header) if the file starts like a safetensors file, else None."""
    if size < 8:
        return None
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES or n > size - 8:
        return None
    raw = f.read(n)
    if not raw.lstrip()[:1] == b"{":
        return None
    return n, raw


def _head_tail(f, start, end, h):
    n = end - start
    head = min(MIB, n)
    f.seek(start)
    h.update(f.read(head))
    tail_start = max(start + head, end - MIB)
    if tail_start < end:
        f.seek(tail_start)
        h.update(f.read(end - tail_start))


#: Cheap fingerprint v2: each 1 MiB block of the data section (between its first and last MiB,
#: which are hashed whole) contributes SAMPLE_WINDOWS windows of SAMPLE_WINDOW bytes.
FP2_BLOCK = MIB
SAMPLE_WINDOWS = 4
SAMPLE_WINDOW = 1024
FP2_PREFIX = "v2:"


def _open_for_hash(q):
    try:
        return open(q, "rb")
    except FileNotFoundError:
        raise NotFoundError(f"{q}: no such file") from None
    except OSError as e:
        raise FormatError(f"{q}: cannot read ({e.strerror})") from None


def _sorted_paths(files):
    paths = [os.path.abspath(os.fspath(x)) for x in files]
    paths.sort(key=lambda q: (os.path.basename(q), q))
    return paths


def _read_at(fd, n, off, q):
    try:
        b = os.pread(fd, n, off)
    except OSError as e:
        raise FormatError(f"{q}: cannot read ({e.strerror})") from None
    if len(b) != n:
        raise FormatError(f"{q}: changed size while being fingerprinted")
    return b


def _sampled(f, q, start, end, seed: bytes, h):
    """v2 data part of one file: ``[start, end)`` whole when it is at most 4 MiB, else its first
    and last MiB whole and SAMPLE_WINDOWS windows of SAMPLE_WINDOW bytes from every 1 MiB block
    in between (offsets: blake2b of ``seed`` and the block index)."""
    fd = f.fileno()
    n = end - start
    if n <= 4 * FP2_BLOCK:
        h.update(_read_at(fd, n, start, q))
        return
    h.update(_read_at(fd, FP2_BLOCK, start, q))
    last = end - FP2_BLOCK
    span = FP2_BLOCK - SAMPLE_WINDOW
    blk = 0
    for b0 in range(start + FP2_BLOCK, last, FP2_BLOCK):
        blen = min(FP2_BLOCK, last - b0)
        # window offsets: a deterministic function of the file (header digest) and the block index
        r = hashlib.blake2b(seed + struct.pack("<Q", blk), digest_size=4 * SAMPLE_WINDOWS).digest()
        blk += 1
        for w in range(SAMPLE_WINDOWS):
            (u,) = struct.unpack_from("<I", r, 4 * w)
            if blen <= SAMPLE_WINDOW:
                off, ln = b0, blen
            else:
                off, ln = b0 + u % (min(span, blen - SAMPLE_WINDOW) + 1), SAMPLE_WINDOW
            h.update(_read_at(fd, ln, off, q))
    h.update(_read_at(fd, FP2_BLOCK, last, q))


def fingerprint(files, full: bool = False) -> str:
    """Fingerprint of ``files`` (see the module docstring): ``"v2:" + 64 hex`` (cheap, sampled), or
    with ``full=True`` the SHA-256 hex of every byte (scheme ``ckptreg-fp1-full``, unchanged).
    Check a STORED fingerprint with :func:`fingerprint_matches`, which knows the older schemes."""
    if full:
        return _fingerprint_v1(files, full=True)
    paths = _sorted_paths(files)
    h = hashlib.blake2b(b"ckptreg-fp2\0", digest_size=32)
    for q in paths:
        with _open_for_hash(q) as f:
            size = os.fstat(f.fileno()).st_size
            h.update(os.path.basename(q).encode("utf-8", "surrogateescape") + b"\0" + struct.pack("<Q", size))
            pre = _safetensors_prefix(f, size) if q.endswith(".safetensors") else None
            if pre is not None:
                n, raw = pre
                h.update(struct.pack("<Q", n) + raw)
                seed = hashlib.blake2b(struct.pack("<Q", size) + raw, digest_size=16).digest()
                _sampled(f, q, 8 + n, size, seed, h)
            else:
                _sampled(f, q, 0, size, hashlib.blake2b(struct.pack("<Q", size), digest_size=16).digest(), h)
    # 61 hex digits (244 bits): with the prefix the value is 64 characters, like the v1 digest
    return FP2_PREFIX + h.hexdigest()[:61]


def fingerprint_matches(stored: str, files) -> bool:
    """Do ``files`` still match ``stored``, a fingerprint recorded earlier? Checked with the
    scheme that made it: ``"v2:..."`` with :func:`fingerprint`, a bare 64-hex digest (ckptreg
    before v2, ``ckptreg-fp1``) with :func:`fingerprint_v1`, so old registries keep verifying."""
    if stored.startswith(FP2_PREFIX):
        return fingerprint(files) == stored
    return fingerprint_v1(files) == stored


def fingerprint_v1(files) -> str:
    """The cheap fingerprint before v2 (``ckptreg-fp1``: header + first/last MiB of data)."""
    return _fingerprint_v1(files, full=False)


def _fingerprint_v1(files, full: bool = False) -> str:
    """SHA-256 hex digest of scheme ``ckptreg-fp1`` (``full``: ``ckptreg-fp1-full``)."""
    paths = _sorted_paths(files)
    h = hashlib.sha256(b"ckptreg-fp1-full\0" if full else b"ckptreg-fp1\0")
    for q in paths:
        f = _open_for_hash(q)
        with f:
            size = os.fstat(f.fileno()).st_size
            h.update(os.path.basename(q).encode("utf-8") + b"\0" + struct.pack("<Q", size))
            if full:
                while True:
                    b = f.read(8 * MIB)
                    if not b:
                        break
                    h.update(b)
                continue
            pre = _safetensors_prefix(f, size) if q.endswith(".safetensors") else None
            if pre is not None:
                n, raw = pre
                h.update(struct.pack("<Q", n) + raw)
                _head_tail(f, 8 + n, size, h)
            else:
                _head_tail(f, 0, size, h)
    return h.hexdigest()


# ----------------------------------------------------------------------------- helpers

def read_text(path, *, missing, unreadable) -> str:
    """A UTF-8 text file's contents (config JSONs here, recipe files); ``missing()`` and
    ``unreadable(exc)`` build the typed error raised when the file does not exist or cannot be
    read or decoded (each caller keeps its own error class and wording)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise missing() from None
    except (OSError, UnicodeDecodeError) as e:
        raise unreadable(e) from None


def _load_json(path: Path, what: str) -> dict:
    text = read_text(path, missing=lambda: NotFoundError(f"{path}: no such file"),
                     unreadable=lambda e: FormatError(f"{path}: cannot read {what}: {e}"))
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise FormatError(f"{path}: {what} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: {what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _is_lora_names(names) -> bool:
    return any("lora_A" in n or "lora_B" in n for n in names)


def _config_files(folder: Path) -> list[str]:
    out = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return out
    for e in entries:
        nm = e.name
        if not e.is_file() or nm in NOT_CONFIG:
            continue
        if nm in CONFIG_NAMES or nm.startswith(CONFIG_PREFIXES):
            out.append(str(e.resolve()))
    return sorted(out)


#: Largest LoRA scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) any module of an adapter may
#: have. Practical configs stay below a few hundred (alpha up to ~512 with r >= 1); 1e4 leaves a
#: wide margin for unusual but real choices and still refuses typos and absurd values (1e308,
#: which overflow float32 in a merge and surface later as a misleading "an input holds NaN").
MAX_LORA_SCALING = 1e4
#: PEFT's LoraConfig default when ``lora_alpha`` is absent from adapter_config.json.
PEFT_DEFAULT_ALPHA = 8
#: Prefix PEFT's ``save_pretrained`` puts before the module path in LoRA tensor names.
PEFT_PREFIX = "base_model.model."


def lora_module_key(module: str) -> str:
    """PEFT's key of a LoRA module, the string ``rank_pattern``/``alpha_pattern`` keys are matched
    against: its path in the base model, i.e. the tensor name's module path without PEFT's
    ``base_model.model.`` prefix (``"\\0"`` markers from the engine's module keys are dropped)."""
    m = str(module).replace("\0", "")
    return m[len(PEFT_PREFIX):] if m.startswith(PEFT_PREFIX) else m


def lora_pattern_key(pattern_keys, key: str):
    """PEFT's ``get_pattern_key``: the first pattern key ``k`` (in config order) for which
    ``re.match(rf"(.*\\.)?({k})$", key)`` matches, i.e. ``k`` is a regex that must match a whole
    trailing run of dotted components (``"proj"`` does not match ``q_proj``; ``"q_proj"`` and
    ``"layers.0.self_attn.q_proj"`` do). None when no key matches."""
    for k in pattern_keys:
        if re.match(rf"(.*\.)?({k})$", key):
            return k
    return None


def lora_module_config(lora: dict, module: str, r: int | None = None) -> tuple[float, int, float]:
    """(alpha, r, scaling) of one module of an adapter, as PEFT computes them: ``rank_pattern``
    and ``alpha_pattern`` resolved with :func:`lora_pattern_key` on :func:`lora_module_key`;
    ``r`` given (the factors' actual rank) overrides the configured one."""
    key = lora_module_key(module)
    rp = lora.get("rank_pattern") or {}
    ap = lora.get("alpha_pattern") or {}
    rk = lora_pattern_key(rp.keys(), key)
    ak = lora_pattern_key(ap.keys(), key)
    rr = int(r) if r is not None else int(rp[rk] if rk is not None else lora["r"])
    alpha = float(ap[ak] if ak is not None else lora.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    denom = math.sqrt(rr) if lora.get("use_rslora") else rr
    return alpha, rr, alpha / denom


def _cfg_number(cfg_path, what, v, *, integer=False):
    """A validated finite number from adapter_config.json (JSON NaN/Infinity, bools, strings,
    ints too large for a float are refused); FormatError naming the file, the key and the value."""
    if integer:
        if type(v) is not int or v <= 0:
            raise FormatError(f"{cfg_path}: {what} must be a positive integer, got {v!r}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FormatError(f"{cfg_path}: {what} must be a number, got {v!r}")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f) or f < 0:
        raise FormatError(f"{cfg_path}: {what} must be a finite number >= 0, got {v!r}")
    return v


def _cfg_pattern(cfg_path, cfg, name, *, integer):
    v = cfg.get(name)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise FormatError(f"{cfg_path}: {name!r} must be a JSON object of module pattern -> value, "
                          f"got {v!r}")
    for k, x in v.items():
        try:
            re.compile(k)
            re.compile(rf"(.*\.)?({k})$")
        except re.error as e:
            raise FormatError(f"{cfg_path}: {name} key {k!r} is not a valid regular expression: {e}") from None
        _cfg_number(cfg_path, f"{name}[{k!r}]", x, integer=integer)
    return v


def _lora_config(cfg_path: Path) -> tuple[dict, str | None]:
    """The LoRA fields of an adapter_config.json, validated (FormatError naming the file, the key
    and the value): ``r`` and ``rank_pattern`` values positive integers; ``lora_alpha`` (PEFT's
    default 8 when absent) and ``alpha_pattern`` values finite and >= 0 (0 is accepted: PEFT loads
    it, the adapter is a no-op); ``use_rslora`` a JSON boolean or null; the largest scaling any
    module can get (largest alpha over the smallest rank) at most :data:`MAX_LORA_SCALING`;
    pattern keys valid regular expressions (PEFT matches them with ``re.match``)."""
    cfg = _load_json(cfg_path, "adapter config")
    ptype = cfg.get("peft_type", "LORA")
    if isinstance(ptype, str) and ptype.upper() not in ("LORA",):
        raise FormatError(f"{cfg_path}: peft_type {ptype!r} is not supported, only LoRA adapters")
    r = _cfg_number(cfg_path, "'r'", cfg.get("r"), integer=True)
    alpha = _cfg_number(cfg_path, "'lora_alpha'", cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    rs = cfg.get("use_rslora", False)
    if rs is None:
        rs = False
    if not isinstance(rs, bool):
        raise FormatError(f"{cfg_path}: 'use_rslora' must be true or false, got {rs!r}")
    rank_pattern = _cfg_pattern(cfg_path, cfg, "rank_pattern", integer=True)
    alpha_pattern = _cfg_pattern(cfg_path, cfg, "alpha_pattern", integer=False)
    r_min = min([r] + list(rank_pattern.values()))
    denom = math.sqrt(r_min) if rs else r_min
    for what, a in [("'lora_alpha'", alpha)] + [(f"alpha_pattern[{k!r}]", x) for k, x in alpha_pattern.items()]:
        if float(a) / denom > MAX_LORA_SCALING:
            raise FormatError(
                f"{cfg_path}: {what} = {a!r} gives a LoRA scaling of {float(a) / denom:.6g} "
                f"({'alpha/sqrt(r)' if rs else 'alpha/r'} with r = {r_min}), above the limit "
                f"{MAX_LORA_SCALING:g}; this is not a usable adapter config")
    tm = cfg.get("target_modules")
    if isinstance(tm, (list, tuple)):
        tm = sorted(str(x) for x in tm)
    elif tm is not None and not isinstance(tm, str):
        tm = str(tm)
    scaling = float(alpha) / (r ** 0.5 if rs else r)
    lora = {"r": r, "lora_alpha": alpha, "use_rslora": rs, "target_modules": tm, "scaling": scaling}
    for k, v in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if v:
            lora[k] = v
    base = cfg.get("base_model_name_or_path") or None
    return lora, (str(base) if base is not None else None)


def _hf_base(folder: Path) -> str | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        obj = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise FormatError(f"{cfg}: config.json is not valid JSON") from None
    if isinstance(obj, dict):
        v = obj.get("_name_or_path")
        if isinstance(v, str) and v:
            return v
    return None


def _headers_union(files: list[Path]) -> tuple[dict[str, TensorInfo], dict[str, str], dict[str, str]]:
    """tensors (unsorted), metadata of the first file, name -> file."""
    tensors: dict[str, TensorInfo] = {}
    where: dict[str, str] = {}
    meta: dict[str, str] = {}
    for i, fp in enumerate(files):
        hd = read_header(fp)
        if i == 0:
            meta = dict(hd.metadata)
        for name, ti in hd.tensors.items():
            if name in tensors:
                raise FormatError(f"{fp}: tensor {name!r} is also in {where[name]}")
            tensors[name] = ti
            where[name] = hd.path
    return tensors, meta, where


def _finish(path, fmt, kind, files, tensors, *, base=None, lora=None, config_files=(), metadata=None):
    tensors = dict(sorted(tensors.items()))
    n_params = sum(t.numel for t in tensors.values())
    nbytes = sum(t.nbytes for t in tensors.values())
    files = [str(f) for f in files]
    return CheckpointInfo(
        path=str(path), format=fmt, kind=kind, files=files, tensors=tensors, n_params=n_params,
        nbytes=nbytes, fingerprint=fingerprint(files), base_model=base, lora=lora,
        config_files=list(config_files), metadata=dict(metadata or {}),
    )


# ----------------------------------------------------------------------------- pickles

def _flatten(obj, prefix, out):
    import torch

    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)


def load_pickle_state(path) -> dict:
    """Load a torch pickle safely (weights_only) and return its flat name -> tensor state dict."""
    import pickle

    import torch

    p = os.fspath(path)
    if not os.path.exists(p):
        raise NotFoundError(f"{p}: no such file")
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e).lower():
                raise
            obj = torch.load(p, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in str(e).splitlines() if x.strip()]
        first = next((x for x in lines if "GLOBAL" in x or "Unsupported" in x), lines[0] if lines else type(e).__name__)
        # e.g. a Lightning .ckpt whose hyper_parameters hold a Path or a dataclass: read it again
        # without running anything and keep only its state_dict
        obj = _state_dict_only(p, f"cannot load with weights_only=True (it holds objects other than "
                                  f"tensors and plain containers): {first}")
    except Exception as e:  # corrupt/truncated zip, EOF, ...
        raise FormatError(f"{p}: not a loadable torch pickle: {type(e).__name__}: {e}") from None
    _refuse_training_state(p, obj)
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "module"):
            sub = obj.get(key)
            if isinstance(sub, dict):
                obj = sub
                break
    out: dict = {}
    _flatten(obj, "", out)
    if not out:
        raise FormatError(f"{p}: the pickle holds no tensors (expected a state dict)")
    return out


#: Keys of an LR scheduler's state_dict (torch.optim.lr_scheduler): no model weights in it.
_SCHEDULER_KEYS = frozenset({"base_lrs", "last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step",
                             "verbose", "_schedulers", "lr_lambdas", "_is_initial"})
#: A tensor name that looks like a model parameter (``....weight``, ``lora_A``, ``embed``, ...).
_PARAM_NAME = re.compile(r"(^|[._])(weight|bias|lora_[AB]|embed\w*|wte|wpe|lm_head|running_(mean|var))($|[._])")


def _refuse_training_state(p: str, obj) -> None:
    """FormatError when a loaded pickle is an optimizer or LR-scheduler state, not model weights:
    an optimizer state (``state`` + ``param_groups``) or a scheduler state (``last_epoch``,
    ``base_lrs``, ...) with no tensor named like a parameter. Such a file holds tensors
    (exp_avg, momentum buffers) that would otherwise register as a "checkpoint"."""
    if not isinstance(obj, dict):
        return
    keys = set(map(str, obj))
    if {"state", "param_groups"} <= keys:
        what = "an optimizer state (state + param_groups)"
    elif len(keys & _SCHEDULER_KEYS) >= 2:
        what = f"an LR scheduler state ({', '.join(sorted(keys & _SCHEDULER_KEYS))})"
    else:
        return
    names: dict = {}
    _flatten({k: v for k, v in obj.items() if k not in ("state", "param_groups")}, "", names)
    params = [n for n in names if _PARAM_NAME.search(n)]
    if params:
        return
    raise FormatError(f"{p}: is {what}, not model weights (no tensor named like a parameter); "
                      "refused even with --allow-pickle (register the model's weights file instead)")


_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module")


def _state_dict_only(p: str, why: str) -> dict:
    """A pickle that weights_only refuses, read by :mod:`ckptreg.safe_pickle` (no callable from
    the file runs; unknown objects are inert placeholders): its ``state_dict`` (or
    model_state_dict / model / module) when that is plain tensors in plain dicts, returned as
    ``{key: state_dict}``; FormatError ``why`` (+ the reason) otherwise."""
    from . import safe_pickle

    try:
        obj = safe_pickle.torch_load(p)
    except Exception as e:  # noqa: BLE001 - a refused opcode, a corrupt file: the file is not usable
        raise FormatError(f"{p}: {why}; reading it without running code failed too: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    sub, key = None, None
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), dict):
                sub = obj[key]
                break
    if sub is None:
        raise FormatError(f"{p}: {why}; and it has no state_dict to read alone")
    bad = safe_pickle.inert_names(sub)
    if bad:
        raise FormatError(f"{p}: {why}; its {key} holds objects other than tensors ({', '.join(bad)})")
    _refuse_training_state(p, obj)
    return {key: sub}


def _pickle_tensors(path: Path) -> dict[str, TensorInfo]:
    sd = load_pickle_state(path)
    ap = str(path.resolve())
    out = {}
    for name, t in sd.items():
        tname = str(t.dtype).removeprefix("torch.")
        st = TORCH_TO_ST.get(tname)
        if st is None:
            raise FormatError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        shape = tuple(int(s) for s in t.shape)
        info = TensorInfo(name, st, shape, ap, -1, 0)
        out[name] = TensorInfo(name, st, shape, ap, -1, info.numel * DTYPES[st][1])
    return out


def _need_pickle(path: Path, allow_pickle: bool):
    if not allow_pickle:
        raise FormatError(
            f"{path}: is a torch pickle; loading pickles can run code, so it needs --allow-pickle "
            "(allow_pickle=True) — only for files you trust (they are then loaded with "
            "torch.load(weights_only=True)); or convert it to safetensors")


# ----------------------------------------------------------------------------- inspect

_EXPECTED = ("expected a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), "
             "an HF model folder (model.safetensors or model.safetensors.index.json + shards), "
             "a .safetensors file, or a torch pickle (.bin/.pt/.ckpt, with --allow-pickle)")


def _sharded(folder: Path, index_path: Path):
    idx = _load_json(index_path, "shard index")
    wm = idx.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise FormatError(f"{index_path}: 'weight_map' must be a non-empty object of tensor -> shard file")
    shards: list[str] = []
    for name, shard in wm.items():
        if not isinstance(shard, str) or not shard or os.path.isabs(shard) or ".." in Path(shard).parts:
            raise FormatError(f"{index_path}: tensor {name!r} maps to an invalid shard name {shard!r}")
        if shard not in shards:
            shards.append(shard)
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise FormatError(f"{index_path}: shard file(s) listed in weight_map do not exist: {', '.join(missing)}")
    files = [(folder / s).resolve() for s in sorted(shards)]
    tensors, meta, where = _headers_union(files)
    wrong = []
    for name, shard in wm.items():
        actual = where.get(name)
        if actual is None:
            wrong.append(f"{name!r} (listed in {shard}, not in any shard)")
        elif Path(actual).name != Path(shard).name:
            wrong.append(f"{name!r} (listed in {shard}, found in {Path(actual).name})")
    if wrong:
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise FormatError(f"{index_path}: weight_map does not match the shards: {', '.join(wrong[:5])}{more}")
    return files, tensors, meta


def _inspect_folder(p: Path, allow_pickle: bool, depth: int = 0):
    # PEFT adapter
    if (p / "adapter_config.json").is_file():
        lora, base = _lora_config(p / "adapter_config.json")
        st = p / "adapter_model.safetensors"
        if st.is_file():
            files = [st.resolve()]
            hd = read_header(st)
            tensors, meta = dict(hd.tensors), hd.metadata
        elif (p / "adapter_model.bin").is_file():
            _need_pickle(p / "adapter_model.bin", allow_pickle)
            files = [(p / "adapter_model.bin").resolve()]
            tensors, meta = _pickle_tensors(p / "adapter_model.bin"), {}
        else:
            raise FormatError(f"{p}: has adapter_config.json but no adapter_model.safetensors")
        return "peft", "lora", files, tensors, base, lora, _config_files(p), meta
    # HF model folder
    index = p / "model.safetensors.index.json"
    if index.is_file():
        files, tensors, meta = _sharded(p, index)
        return "hf", "full", files, tensors, _hf_base(p), None, _config_files(p), meta
    if (p / "model.safetensors").is_file():
        st = p / "model.safetensors"
        hd = read_header(st)
        return "hf", "full", [st.resolve()], dict(hd.tensors), _hf_base(p), None, _config_files(p), hd.metadata
    if (p / "pytorch_model.bin").is_file():
        _need_pickle(p / "pytorch_model.bin", allow_pickle)
        tensors = _pickle_tensors(p / "pytorch_model.bin")
        return ("hf", "full", [(p / "pytorch_model.bin").resolve()], tensors, _hf_base(p), None,
                _config_files(p), {})
    if (p / "pytorch_model.bin.index.json").is_file():
        raise FormatError(f"{p}: sharded pickle checkpoints (pytorch_model.bin.index.json) are not "
                          "supported; save with safetensors")
    # a training output folder holding several checkpoints?
    try:
        subdirs = sorted(d for d in p.iterdir() if d.is_dir())
    except OSError as e:
        raise FormatError(f"{p}: cannot list folder: {e.strerror}") from None
    ckdirs = [d for d in subdirs if re.fullmatch(r"checkpoint-\d+", d.name)]
    if len(ckdirs) > 1:
        raise FormatError(f"{p}: holds {len(ckdirs)} checkpoint folders ({ckdirs[0].name} ...), not one "
                          "checkpoint; register them one by one (or use `ckptreg scan`)")
    # exactly one sub-folder with an adapter/model (PEFT named adapters in a checkpoint-N folder)
    if depth == 0:
        found = [d for d in subdirs if (d / "adapter_config.json").is_file()
                 or (d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file()]
        if len(found) == 1:
            return _inspect_folder(found[0], allow_pickle, depth + 1)
        if len(found) > 1:
            raise FormatError(f"{p}: several sub-folders hold checkpoints "
                              f"({', '.join(d.name for d in found)}); name one of them")
    sts = sorted(f for f in p.glob("*.safetensors") if f.is_file())
    if len(sts) == 1:
        hd = read_header(sts[0])
        kind = "lora" if _is_lora_names(hd.tensors) else "full"
        return "safetensors", kind, [sts[0].resolve()], dict(hd.tensors), None, None, [], hd.metadata
    if len(sts) > 1:
        raise FormatError(f"{p}: holds {len(sts)} .safetensors files but no model.safetensors.index.json; "
                          + _EXPECTED)
    raise FormatError(f"{p}: not a checkpoint folder; {_EXPECTED}")


def inspect(path, allow_pickle: bool = False) -> CheckpointInfo:
    """Recognise the checkpoint at ``path`` and inventory its tensors (headers only for safetensors)."""
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise NotFoundError(f"{path}: no such file or folder")
    ap = p.resolve()
    if ap.is_dir():
        fmt, kind, files, tensors, base, lora, cfgs, meta = _inspect_folder(ap, allow_pickle)
        if not tensors:
            raise FormatError(f"{files[0]}: holds no tensors")
        return _finish(ap, fmt, kind, files, tensors, base=base, lora=lora, config_files=cfgs, metadata=meta)
    name = ap.name.lower()
    if name.endswith(".safetensors"):
        hd = read_header(ap)
        if not hd.tensors:
            raise FormatError(f"{ap}: holds no tensors")
        kind = "lora" if _is_lora_names(hd.tensors) else "full"
        lora, base = None, None
        sib = ap.parent / "adapter_config.json"
        if kind == "lora" and sib.is_file():
            lora, base = _lora_config(sib)
        return _finish(ap, "safetensors", kind, [ap], hd.tensors, base=base, lora=lora, metadata=hd.metadata)
    if name.endswith(PICKLE_SUFFIXES):
        _need_pickle(ap, allow_pickle)
        tensors = _pickle_tensors(ap)
        kind = "lora" if _is_lora_names(tensors) else "full"
        return _finish(ap, "pickle", kind, [ap], tensors)
    raise FormatError(f"{path}: unknown file type; {_EXPECTED}")

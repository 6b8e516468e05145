"""The spool: where an add / log / params that cannot reach the database within its bound goes.

Each entry is one JSON file written atomically (temporary, fsync, rename, fsync of the folder)
to ``<db>.spool/`` or, when that cannot be written, to the fallback spool; every writer ingests
pending entries first (:meth:`Registry._ingest_spool`), validating each one's shape
(:func:`_spool_entry_problem`) before anything is applied; a bad or conflicting entry is moved to
``rejected/`` with its reason. Backend-neutral: a PostgreSQL driver spools the same way when the
server cannot be reached.
"""
from __future__ import annotations

import json
import os
import pathlib
import time
import uuid
from datetime import datetime
from types import SimpleNamespace

from ..errors import AccessError, DiskFullError
from .model import _now

# --------------------------------------------------------------------------- info (de)serialisation

def _info_to_dict(info) -> dict:
    return {
        "path": str(info.path), "format": info.format, "kind": info.kind,
        "files": [str(f) for f in info.files],
        "tensors": [[t.name, t.dtype, list(t.shape), str(t.file), int(t.offset), int(t.nbytes)]
                    for t in info.tensors.values()],
        "n_params": int(info.n_params), "nbytes": int(info.nbytes), "fingerprint": info.fingerprint,
        "base_model": info.base_model, "lora": info.lora,
        "config_files": [str(f) for f in (getattr(info, "config_files", None) or [])],
    }


def _info_from_dict(d: dict):
    tensors = {}
    for name, dtype, shape, file, offset, nbytes in d["tensors"]:
        tensors[name] = SimpleNamespace(name=name, dtype=dtype, shape=tuple(shape), file=file,
                                        offset=offset, nbytes=nbytes)
    return SimpleNamespace(path=d["path"], format=d["format"], kind=d["kind"], files=d["files"],
                           tensors=tensors, n_params=d["n_params"], nbytes=d["nbytes"],
                           fingerprint=d["fingerprint"], base_model=d.get("base_model"),
                           lora=d.get("lora"), config_files=d.get("config_files") or [])


def _spool_entry_problem(e) -> str | None:
    """Why a spooled entry (parsed JSON) is not one this module wrote, or None when it is valid:
    the op and the type of every field it uses are checked before anything is applied."""
    def is_int(v, lo=None):
        return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)

    def is_str(v, empty=False):
        return isinstance(v, str) and (empty or bool(v))

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def when(v):
        if not is_str(v):
            return False
        try:
            datetime.fromisoformat(v)
            return True
        except ValueError:
            return False

    def metrics_ok(m, nonempty):
        return (isinstance(m, dict) and (bool(m) or not nonempty)
                and all(is_str(k) and is_num(v) for k, v in m.items()))

    if not isinstance(e, dict):
        return f"expected a JSON object, got {type(e).__name__}"
    op = e.get("op")
    checks: list[tuple[str, bool]]
    if op == "add":
        checks = [("run", is_str(e.get("run")) and "@" not in e["run"]),
                  ("step", is_int(e.get("step"), 0)),
                  ("metrics", metrics_ok(e.get("metrics"), False)),
                  ("tags", isinstance(e.get("tags"), dict)
                   and all(is_str(k) and isinstance(v, str) for k, v in e["tags"].items())),
                  ("replace", isinstance(e.get("replace"), bool) or e.get("replace") == "stale"),
                  ("metric_steps", e.get("metric_steps") is None
                   or (isinstance(e["metric_steps"], dict) and all(
                       is_str(k) and k in (e.get("metrics") or {}) and (v is None or is_int(v, 0))
                       for k, v in e["metric_steps"].items()))),
                  ("created", when(e.get("created"))),
                  ("info", isinstance(e.get("info"), dict))]
        info = e.get("info")
        if isinstance(info, dict):
            def tensor_ok(t):
                return (isinstance(t, list) and len(t) == 6 and is_str(t[0]) and is_str(t[1])
                        and isinstance(t[2], list) and all(is_int(x, 0) for x in t[2])
                        and is_str(t[3]) and is_int(t[4]) and is_int(t[5], 0))

            checks += [
                ("info.path", is_str(info.get("path"))),
                ("info.format", info.get("format") in ("peft", "hf", "safetensors", "pickle")),
                ("info.kind", info.get("kind") in ("lora", "full")),
                ("info.files", isinstance(info.get("files"), list) and bool(info["files"])
                 and all(is_str(f) for f in info["files"])),
                ("info.tensors", isinstance(info.get("tensors"), list)
                 and all(tensor_ok(t) for t in info["tensors"])),
                ("info.n_params", is_int(info.get("n_params"), 0)),
                ("info.nbytes", is_int(info.get("nbytes"), 0)),
                ("info.fingerprint", is_str(info.get("fingerprint"))),
                ("info.base_model", info.get("base_model") is None or isinstance(info["base_model"], str)),
                ("info.lora", info.get("lora") is None or isinstance(info["lora"], dict)),
                ("info.config_files", info.get("config_files") is None
                 or (isinstance(info["config_files"], list) and all(is_str(f) for f in info["config_files"]))),
            ]
    elif op == "log":
        checks = [("ckpt", is_int(e.get("ckpt"), 0) or is_str(e.get("ckpt"))),
                  ("metrics", metrics_ok(e.get("metrics"), True)),
                  ("step", e.get("step") is None or is_int(e["step"], 0)),
                  ("created", when(e.get("created")))]
    elif op == "params":
        checks = [("run", is_str(e.get("run")) and "@" not in e["run"]),
                  ("params", isinstance(e.get("params"), dict)),
                  ("created", when(e.get("created")))]
    else:
        return f"unknown op {op!r} (expected 'add', 'log' or 'params')"
    for name, ok in checks:
        if not ok:
            cur = e
            for part in name.split("."):
                cur = cur.get(part) if isinstance(cur, dict) else None
            return f"field {name!r} of an {op!r} entry is missing or malformed (got {cur!r:.80})"
    return None


class Spool:
    """The spool of the registry at ``db_path`` (a resolved path; for a server backend, a path
    standing for it): ``<db>.spool/`` beside it, then :meth:`fallback_dir`."""

    def __init__(self, db_path, *, location=None, name: str | None = None):
        """``db_path``: the DuckDB file (a resolved path), or, for a server backend, the string
        identifying its database (``postgresql://host:port/dbname``; what the entries record as
        their ``db``). ``location``: the spool folder when it is not ``<db>.spool`` beside the
        file (a server has no folder: ``./.ckptreg-spool/<name>-<hash>`` or
        ``$CKPTREG_SPOOL/<name>-<hash>``, see :meth:`for_server`). ``name``: the readable part
        of the fallback folder's name (default: the file's name)."""
        self.db_path = db_path
        self._name = name if name is not None else pathlib.Path(str(db_path)).name
        self.dir = pathlib.Path(location) if location is not None else pathlib.Path(str(db_path) + ".spool")
        self.rejected_dir = self.dir / "rejected"

    @classmethod
    def for_server(cls, identity: str, name: str) -> "Spool":
        """The spool of a server database (``identity``: ``postgresql://host:port/dbname``,
        no user or password): ``$CKPTREG_SPOOL/<name>-<hash>`` when set, else
        ``./.ckptreg-spool/<name>-<hash>`` beside the working directory (a process that cannot
        reach the server writes its entries where it runs; the next command that reaches the
        server from there ingests them); the fallback is the cache folder of :meth:`fallback_dir`."""
        base = os.environ.get("CKPTREG_SPOOL")
        root = pathlib.Path(base).expanduser() if base else pathlib.Path(".ckptreg-spool")
        sp = cls(identity, location=root.absolute() / f"{name}-{cls._key(identity)}", name=name)
        sp._server = True
        return sp

    @staticmethod
    def _key(s: str) -> str:
        import hashlib

        return hashlib.sha256(str(s).encode("utf-8", "surrogateescape")).hexdigest()[:16]

    def fallback_dir(self) -> pathlib.Path:
        """Where entries go when the spool beside the database cannot be written (its filesystem
        is full, say): ``$CKPTREG_SPOOL`` else ``$XDG_CACHE_HOME/ckptreg/spool`` (``~/.cache``),
        in a sub-folder keyed by the database path. Every opener ingests it too."""
        base = os.environ.get("CKPTREG_SPOOL")
        if base and not getattr(self, "_server", False):   # (a server's spool is there already)
            root = pathlib.Path(base).expanduser()
        else:
            cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            root = pathlib.Path(cache) / "ckptreg" / "spool"
        return root.absolute() / f"{self._name}-{self._key(self.db_path)}"

    def dirs(self) -> list[pathlib.Path]:
        return [self.dir, self.fallback_dir()]

    def pending(self) -> bool:
        for d in self.dirs():
            try:
                with os.scandir(d) as it:
                    if any(e.name.endswith(".json") for e in it):
                        return True
            except OSError:
                pass
        return False

    def status(self) -> dict:
        """{"pending": [paths], "rejected": [{"file", "reason"}]} over both spools."""
        pending, rejected = [], []
        for d in self.dirs():
            if d.is_dir():
                pending += sorted(str(p) for p in d.glob("*.json"))
            rd = d / "rejected"
            if rd.is_dir():
                for p in sorted(rd.glob("*.json")):
                    try:
                        got = json.loads(p.read_text())
                        reason = got.get("rejected_reason", "") if isinstance(got, dict) else ""
                    except Exception as e:  # unreadable: report that
                        reason = f"unreadable: {e}"
                    rejected.append({"file": str(p), "reason": reason})
        return {"pending": pending, "rejected": rejected}

    def write(self, entry: dict) -> str:
        """Write ``entry`` atomically to the spool beside the database or, when that cannot be
        written (full or read-only filesystem), to the fallback spool. DiskFullError /
        AccessError naming both when neither can be written."""
        entry = dict(entry, spooled=time.time_ns(), spool_version=1, db=str(self.db_path))
        data = json.dumps(entry, allow_nan=True).encode()
        errors = []
        for d in self.dirs():
            try:
                return self._write(d, data)
            except OSError as e:
                errors.append((d, e))
        import errno

        detail = "; ".join(f"{d}: {e.strerror or e}" for d, e in errors)
        if any(e.errno in (errno.ENOSPC, errno.EDQUOT) for _, e in errors):
            raise DiskFullError(f"{self.db_path}: cannot register or spool the entry: {detail}")
        raise AccessError(f"{self.db_path}: cannot register or spool the entry: {detail}")

    @staticmethod
    def _write(d: pathlib.Path, data: bytes) -> str:
        d.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}.json"
        final = d / name
        tmp = d / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        from ..writer import fsync_dir

        fsync_dir(d)   # make the rename durable
        return str(final)

    def entries(self):
        """Yield (file, entry) for every pending entry that is well-formed and this database's,
        oldest first; unreadable or malformed files are moved to ``rejected/`` on the way. The
        caller applies each one, then :meth:`done` (or :meth:`reject` with the reason)."""
        for d in self.dirs():
            try:
                todo = sorted(d.glob("*.json"))
            except OSError:
                continue
            for p in todo:
                try:
                    entry = json.loads(p.read_text())
                except FileNotFoundError:
                    continue
                except Exception as e:
                    self.reject(p, None, f"unreadable spool file: {e}")
                    continue
                reason = _spool_entry_problem(entry)
                if reason is not None:
                    self.reject(p, entry, f"invalid spool entry: {reason}")
                    continue
                if entry.get("db") not in (None, str(self.db_path)):
                    continue  # another database's entry (hash collision in a shared fallback spool)
                yield p, entry

    @staticmethod
    def done(p: pathlib.Path) -> None:
        try:
            p.unlink()
        except FileNotFoundError:
            pass

    @staticmethod
    def reject(p: pathlib.Path, entry, reason: str) -> None:
        rd = p.parent / "rejected"
        rd.mkdir(parents=True, exist_ok=True)
        if not isinstance(entry, dict):
            try:
                raw = p.read_text(errors="replace")
            except OSError:
                raw = ""
            entry = {"raw": raw}
        entry = dict(entry, rejected_reason=reason, rejected_at=_now().isoformat())
        dest = rd / p.name
        tmp = rd / f".{p.name}.tmp"
        tmp.write_text(json.dumps(entry, allow_nan=True))
        os.replace(tmp, dest)
        try:
            p.unlink()
        except FileNotFoundError:
            pass

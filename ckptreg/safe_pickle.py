"""Read a torch pickle without running any of its code, keeping unknown objects as inert placeholders.

``torch.load(weights_only=True)`` refuses a whole file as soon as it names one global outside its
allowlist: a Lightning ``.ckpt`` whose ``hyper_parameters`` hold a ``pathlib.Path`` or a
dataclass cannot be read at all. :func:`torch_load` reads such a file with ``torch.load(weights_only=
False, pickle_module=<this module>)``, whose unpickler is a restricted interpreter:

* ``find_class`` never imports anything. It returns the real object only for torch's tensor-
  rebuild functions and a few plain value types (:data:`ALLOWED`); every other global (``os.system``,
  ``builtins.eval``, ``pathlib.PosixPath``, a user's dataclass) becomes an :class:`Inert`
  subclass named after it, that only records the arguments it is given.
* ``REDUCE`` / ``NEWOBJ`` / ``NEWOBJ_EX`` call only those (an allowlisted function or an inert
  class); ``BUILD`` sets state only on an inert instance, a tensor, a Parameter or an OrderedDict
  (as torch's own weights-only unpickler does); ``INST`` / ``OBJ`` go through ``find_class``.

So no callable from the file runs: what would have been ``Path("x")`` is ``Inert`` with
``args == ("x",)``. Tensors are rebuilt as usual from the zip's storages (torch's own
``persistent_load``). The caller takes the part it needs (the ``state_dict``) and ignores the rest.
"""
from __future__ import annotations

import io
import pickle
from collections import OrderedDict

__all__ = ["Inert", "Unpickler", "torch_load", "inert_names"]


class Inert:
    """Stand-in for a global a pickle names that is not allowlisted: records, never acts."""

    _origin = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", kwargs)
        object.__setattr__(self, "state", None)
        object.__setattr__(self, "items", [])
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "state", state)

    # containers the pickle may fill (APPEND(S) / SETITEM(S) on an object it built)
    def append(self, x):
        self.items.append(x)

    def extend(self, xs):
        self.items.extend(xs)

    def __setitem__(self, k, v):
        self.items.append((k, v))

    def __repr__(self):
        return f"<inert {self._origin}{self.args!r}>"


def _allowed() -> dict[str, object]:
    import torch
    import torch._utils as u

    out: dict[str, object] = {
        "collections.OrderedDict": OrderedDict,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.serialization._get_layout": torch.serialization._get_layout,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_meta_tensor_no_storage", "_rebuild_device_tensor_from_cpu_tensor"):
        if hasattr(u, name):
            out[f"torch._utils.{name}"] = getattr(u, name)
    for name in dir(torch):  # dtypes, layouts, memory formats: plain values, not callables
        v = getattr(torch, name, None)
        if isinstance(v, (torch.dtype, torch.layout, torch.memory_format)):
            out[f"torch.{name}"] = v
    return out


_ALLOWED: dict[str, object] | None = None


def allowed() -> dict[str, object]:
    """``module.name`` -> object: what find_class returns for real (built on first use)."""
    global _ALLOWED
    if _ALLOWED is None:
        _ALLOWED = _allowed()
    return _ALLOWED


class Unpickler(pickle._Unpickler):
    """The pure-Python unpickler with a restricted find_class and restricted call/build opcodes."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._inert: dict[str, type] = {}

    def find_class(self, module, name):
        full = f"{module}.{name}"
        obj = allowed().get(full)
        if obj is not None:
            return obj
        cls = self._inert.get(full)
        if cls is None:
            cls = type(str(name)[:100] or "Inert", (Inert,), {"_origin": full, "__module__": "ckptreg.inert"})
            self._inert[full] = cls
        return cls

    def _callable_ok(self, f) -> bool:
        if isinstance(f, type) and issubclass(f, Inert):
            return True
        return any(f is v for v in allowed().values()) and callable(f)

    def _check_call(self, f):
        if not self._callable_ok(f):
            raise pickle.UnpicklingError(f"refusing to call {f!r} while unpickling (not allowlisted)")

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        self._check_call(func)
        self.stack[-1] = func(*args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_call(cls)
        self.append(cls(*args) if cls is _param() else cls.__new__(cls, *args))
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_call(cls)
        self.append(cls.__new__(cls, *args, **kwargs))
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_build(self):
        import torch

        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Inert):
            inst.__setstate__(state)
        elif type(inst) is torch.Tensor:
            inst.set_(*state)
        elif type(inst) is torch.nn.Parameter:
            inst.__setstate__(state)
        elif type(inst) is OrderedDict:
            if isinstance(state, dict):
                inst.__dict__.update(state)
        else:
            raise pickle.UnpicklingError(f"refusing to set the state of a {type(inst).__name__} while unpickling")
    dispatch[pickle.BUILD[0]] = load_build

    def _instantiate(self, klass, args):
        self._check_call(klass)
        self.append(klass(*args))

    def load_inst(self):
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        klass = self.find_class(module, name)
        self._instantiate(klass, self.pop_mark())
    dispatch[pickle.INST[0]] = load_inst

    def load_obj(self):
        args = self.pop_mark()
        cls = args.pop(0)
        self._instantiate(cls, args)
    dispatch[pickle.OBJ[0]] = load_obj

    # the extension registry (copyreg) would name real objects: only through find_class
    def get_extension(self, code):
        raise pickle.UnpicklingError(f"refusing extension code {code} while unpickling")


def _param():
    import torch

    return torch.nn.Parameter


def loads(data: bytes, **kwargs):
    return Unpickler(io.BytesIO(data), **kwargs).load()


def load_file(f, **kwargs):  # pickle_module.load (torch's legacy format reads its headers with it)
    return Unpickler(f, **kwargs).load()


# torch.load(pickle_module=this module) uses .Unpickler and .load
load = load_file


def torch_load(path):
    """``torch.load`` of ``path`` through the restricted unpickler (map_location cpu). Raises what
    torch / pickle raise; no callable from the file runs."""
    import sys

    import torch

    mod = sys.modules[__name__]
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=mod, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e).lower():
            raise
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=mod)


def inert_names(obj, limit: int = 20) -> list[str]:
    """The globals that became placeholders in ``obj`` (for messages), sorted, at most ``limit``."""
    seen: set[str] = set()
    stack, n = [obj], 0
    while stack and n < 100000:
        n += 1
        x = stack.pop()
        if isinstance(x, Inert):
            seen.add(x._origin)
            stack.extend(x.args)
            stack.extend(x.kwargs.values())
            stack.append(x.state)
            stack.extend(x.items)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set)):
            stack.extend(x)
    return sorted(seen)[:limit]

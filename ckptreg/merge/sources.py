"""Reading the inputs: :class:`Source` (one checkpoint's tensors, chunk by chunk, ``preadv`` into
reused buffers or zero-copy views under a read lease; identity checks), :func:`snapshot`,
:class:`Buffers` (the output chunk buffers of a pass)."""
from __future__ import annotations

import os


class Source:
    """Tensors of one checkpoint, read with ``preadv`` (:meth:`SafeFile.read`) into buffers this
    source owns and reuses, or, with ``lease=True`` where the kernel grants a read lease
    (:meth:`SafeFile.lease`), as zero-copy views of a map that a writer cannot truncate while
    they are in use (the lease is released to a waiting writer at the next chunk, and reads go
    on with ``preadv``). Either way an input truncated in place while a merge reads it (a
    trainer re-saving with ``open('wb')``) is a ChangedError naming the file, not a SIGBUS that
    kills the process. ``snaps`` maps real file paths to their
    :func:`~ckptreg.safetensors_io.file_ident` taken just before the registry checked their
    fingerprint; :meth:`check` (called after the last read, before any output is committed)
    raises ChangedError when a file was rewritten, resized or replaced since then.

    Memory: one chunk buffer per dtype (at most ``chunk_elems`` elements), so a streamed merge
    of N inputs holds N input chunks; whole tensors (TIES thresholds, CART, LoRA factors) are
    read only where a method needs them."""

    def __init__(self, info, snaps: dict | None = None, lease: bool = False):
        self.info = info
        self._files: dict[str, object] = {}
        self._state = None
        self._snaps = snaps or {}
        self._bufs: dict = {}
        self._lease = lease

    def _pickled(self, name):
        if self._state is None:   # torch pickle: load once (memory: the whole state dict)
            from ..formats import load_pickle_state

            self._state = load_pickle_state(self.info.files[0])
        return self._state[name]

    def _file(self, ti):
        f = self._files.get(ti.file)
        if f is None:
            from ..safetensors_io import open_tensors

            f = self._files[ti.file] = open_tensors(ti.file, expect=self._snaps.get(os.path.realpath(ti.file)))
            if self._lease:
                f.lease()
        return f

    def chunk(self, name, start: int, stop: int):
        """Flat elements ``[start, stop)`` of ``name``; valid until this source's next chunk()."""
        import torch

        ti = self.info.tensors[name]
        if getattr(ti, "offset", 0) < 0:
            return _flat(self._pickled(name))[start:stop]
        f = self._file(ti)
        v = f.view(name, start, stop)   # zero-copy while a read lease holds (SafeFile.lease)
        if v is not None:
            return v
        n = stop - start
        buf = self._bufs.get(ti.dtype)
        if buf is None or buf.numel() < n:
            from ..safetensors_io import DTYPES

            buf = self._bufs[ti.dtype] = torch.empty(n, dtype=getattr(torch, DTYPES[ti.dtype][0]))
        return f.read(name, start, stop, out=buf)

    def full(self, name, out=None):
        """The whole tensor, shaped; read into ``out`` (a flat buffer of its dtype) when given."""
        ti = self.info.tensors[name]
        if getattr(ti, "offset", 0) < 0:
            return self._pickled(name)
        return self._file(ti).read(name, out=out).view(tuple(ti.shape))

    def check(self) -> None:
        """ChangedError when a file of this checkpoint changed since its fingerprint was checked
        (or, for files without a snapshot, since they were opened)."""
        from ..safetensors_io import _changed, _diff, file_ident

        for f in self._files.values():
            f.check()
        for fn in self.info.files:
            ref = self._snaps.get(os.path.realpath(fn))
            if ref is not None:
                now = file_ident(fn)
                if now != ref:
                    raise _changed(os.path.abspath(fn), _diff(ref, now))

    def close(self):
        for f in self._files.values():
            try:
                f.close()
            except Exception:
                pass
        self._files.clear()
        self._state = None
        self._bufs.clear()


def snapshot(c, snaps: dict) -> None:
    """Record the identity (inode, size, mtime) of checkpoint ``c``'s files in ``snaps`` before
    its fingerprint is checked, so that any change after the check is caught when reading."""
    from ..safetensors_io import file_ident

    for fn in list(getattr(c, "files", None) or []) or [c.path]:
        rp = os.path.realpath(fn)
        if rp not in snaps and os.path.isfile(rp):
            ident = file_ident(rp)
            if ident is not None:
                snaps[rp] = ident


def _flat(t):
    return t.reshape(-1)


class Buffers:
    """Chunk buffers allocated once per merge (per dtype) and reused for every tensor/chunk;
    touched once at allocation so later chunks hit no first-touch page faults."""

    def __init__(self, elems: int):
        self.elems = max(1, int(elems))
        self._b: dict = {}

    def get(self, dtype, m: int, n: int):
        import torch

        key = dtype
        need = m * n
        b = self._b.get(key)
        if b is None or b.numel() < need:
            b = torch.zeros(max(need, self.elems if b is None else need), dtype=dtype)
            self._b[key] = b
        return b[:need].view(m, n)




_Source, _Buffers, _snapshot = Source, Buffers, snapshot

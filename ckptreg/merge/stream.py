"""The one per-tensor streaming loop, used by :func:`~ckptreg.merge.run.merge` (one output) and
:func:`~ckptreg.merge.run.sweep` (M weighted sums over the same inputs in one pass).

:func:`run_pass` walks the plan's tensors in name order; per tensor it handles what every method
shares (LoRA factors in delta space, empty tensors, non-float tensors copied from the newest
input) and hands float tensors to the streamer of the method's strategy (``STREAMERS``), which
calls the method's per-tensor function (``MethodDef.fn``, see :mod:`ckptreg.merge.table`). Each
streamer asks the job for the tensor's parameters and weights (:meth:`Job.params_for`,
:meth:`Job.weights_for`): the spec's constants, or the values of its ``param_rules``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import FormatError, ParameterError
from .table import LINEAR, LINES, LINES_KEY, check_params, lines_factor, lines_mode

#: elements per chunk inside huge tensors (8 MiB of float32 per output buffer)
CHUNK_ELEMS = 1 << 21
#: output chunk buffers of a sweep (M outputs at once) stay under this; more rows go in blocks
SWEEP_BUFFER_BYTES = 256 << 20
_FLOAT_ST = ("F32", "F16", "BF16", "F64")
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


@dataclass
class Job:
    """One output of a streaming pass: a merge, or one of a sweep's weighted sums."""

    spec: object                          # the MergeSpec
    defn: object                          # its MethodDef
    weights: list                         # over the job's own inputs
    params: dict                          # checked constants
    out: object | None = None             # the Output it streams into
    cols: list | None = None              # the pass's sources that are this job's inputs (None: all, in order)
    rules: object | None = None           # spec.param_rules bound to the plan's tensor names
    #: LiNeS: layer index -> position 0 … L−1 over the plan's names (:meth:`bind_layers`)
    layers: dict | None = None
    _checked: dict = field(default_factory=dict, repr=False)

    def bind_layers(self, names) -> None:
        """Count the plan's layers (the distinct first integer components of ``names``) for
        LiNeS; a no-op for a merge without ``lines``."""
        if self.params.get(LINES.name) is None:
            return
        self.layers = layer_positions(names)

    def params_for(self, name: str) -> dict:
        """The parameters of tensor ``name``: the spec's, with its rules' values checked, and
        with LiNeS (``lines``) the layer's factor λ(ℓ): folded into ``lam`` for methods whose
        task vector lam scales, else as ``p[LINES_KEY]`` (``table.lines_mode``)."""
        if not self.rules:
            p = self.params
        else:
            p = self.rules.params_for(name, self.params)
            key = repr(sorted(p.items()))
            got = self._checked.get(key)
            if got is None:
                got = self._checked[key] = check_params(self.defn, p, len(self.weights))
            p = got
        lines = p.get(LINES.name)
        if lines is None:
            return p
        if self.layers is None:
            raise ParameterError("LiNeS parameters used before bind_layers(tensor names)")   # pragma: no cover
        from .recipe import layer_index

        li = layer_index(name)
        f = lines_factor(lines, None if li is None else self.layers.get(li), len(self.layers))
        p = dict(p)
        if lines_mode(self.defn) == "lam":
            lam = p.get("lam")
            if lam is None:
                lam = self.defn.param("lam").default
            p["lam"] = float(lam) * f
        else:
            p[LINES_KEY] = f
        return p

    def weights_for(self, name: str) -> list:
        """The per-input weights of tensor ``name``: the spec's, or its weight rule's."""
        if not self.rules:
            return self.weights
        return self.rules.weights_for(name, self.weights)

    def newest(self, n_sources: int) -> int:
        return self.cols[-1] if self.cols is not None else n_sources - 1


def layer_positions(names) -> dict:
    """{layer index ℓ: its position 0 … L−1} over the distinct first integer components of
    ``names`` (``recipe.layer_index``; the position is ℓ itself when layers are numbered 0 … L−1)."""
    from .recipe import layer_index

    idx = sorted({i for i in (layer_index(n) for n in names) if i is not None})
    return {v: k for k, v in enumerate(idx)}


def lines_for_names(lines, names):
    """LiNeS's λ as a function of a tensor (or LoRA module) name, over the model ``names``."""
    from .recipe import layer_index

    pos = layer_positions(names)

    def f(name) -> float:
        li = layer_index(name)
        return lines_factor(lines, None if li is None else pos.get(li), len(pos))

    return f


@dataclass
class Pass:
    """One read of the inputs: the plan, its sources (and base), the jobs fed from them."""

    plan: object
    sources: list
    base_src: object | None
    jobs: list
    odts: dict                            # tensor name -> torch dtype of the output
    chunk: int = CHUNK_ELEMS
    progress: Callable | None = None
    delta: object | None = None           # DeltaCache (LoRA delta space, one job)
    out_shapes: dict | None = None        # output shapes (delta space changes LoRA ranks)
    _W: object = field(default=None, repr=False)

    @property
    def all_sources(self) -> list:
        return self.sources + ([self.base_src] if self.base_src is not None else [])


def _odt(out_dtype, st_dtype):
    import torch

    from ..writer import torch_dtype

    if out_dtype is None or st_dtype not in _FLOAT_ST:
        return torch_dtype(st_dtype)
    return out_dtype if isinstance(out_dtype, torch.dtype) else torch_dtype(_dtype_str(out_dtype))


def _dtype_str(d) -> str:
    from ..writer import dtype_str

    try:
        return dtype_str(d)
    except FormatError:
        raise ParameterError(f"unknown output dtype {d!r} (use float32, float16, bfloat16, float64)") from None


def torch_out_dtype(out_dtype):
    if out_dtype is None:
        return None
    from ..writer import torch_dtype

    return torch_dtype(_dtype_str(out_dtype))


def _itemsize(dt) -> int:
    import torch

    return torch.empty((), dtype=dt).element_size()


def changed_first(sources) -> None:
    """A merged tensor refused (NaN) may come from an input rewritten while it was read: then the
    ChangedError naming that input is the true cause, raised instead."""
    for src in sources:
        src.check()


# ------------------------------------------------------------------------------------------------
# the loop

def run_pass(ps: Pass) -> None:
    """Stream every tensor of ``ps.plan`` into every job's output; afterwards check that no
    input changed while it was read (the caller commits the outputs)."""
    try:
        _run(ps)
    except FormatError:
        changed_first(ps.all_sources)
        raise
    # every byte was read: make sure no input changed meanwhile (a same-size rewrite, a
    # replacement by rename) before the caller commits the outputs
    for s in ps.all_sources:
        s.check()


def _run(ps: Pass) -> None:
    import torch

    from .sources import Buffers

    pl, sources, chunk = ps.plan, ps.sources, ps.chunk
    strategies = {j.defn.strategy for j in ps.jobs}
    if len(ps.jobs) > 1 and strategies != {LINEAR}:
        raise ParameterError("only weighted sums share one pass")   # pragma: no cover (run.py groups)
    n_in = len(ps.all_sources)
    total = pl.nbytes * n_in
    done = [0]
    bufs = Buffers(min(chunk, max(1, pl.largest)))
    out_shapes = ps.out_shapes or pl.shapes
    for j in ps.jobs:   # LiNeS counts the model's layers over the plan's names
        j.bind_layers(pl.names)
    for name in pl.names:
        st = pl.dtypes[name]
        odt = ps.odts[name]

        def on_chunk(nel, _is=_ITEMSIZE.get(st, 1), _name=name):
            done[0] += nel * _is * n_in
            if ps.progress is not None:
                ps.progress(done[0], total, _name)

        numel = pl.numel(name)
        if ps.delta is not None and ps.delta.is_factor(name):
            ps.jobs[0].out.write(name, ps.delta.get(name))
            on_chunk(numel)
            continue
        if numel == 0:
            for j in ps.jobs:
                j.out.write(name, torch.empty(tuple(out_shapes[name]), dtype=odt))
            continue
        if st not in _FLOAT_ST:   # int buffers, bool masks: the newest input's
            for s in range(0, numel, chunk):
                e = min(numel, s + chunk)
                for j in ps.jobs:
                    j.out.write_chunk(name, sources[j.newest(len(sources))].chunk(name, s, e))
                on_chunk(e - s)
            continue
        STREAMERS[ps.jobs[0].defn.strategy](ps, name, odt, bufs, on_chunk, numel)


# ------------------------------------------------------------------------------------------------
# streamers, one per strategy

def _weighted_sum(ps, name, W, odt, bufs, on_chunk, numel, fn):
    """Rows of ``W [M, N]`` times the N sources, chunk by chunk; row m goes to job m.

    Chunk boundaries are the same whatever M (a sweep's outputs are then bitwise equal to the
    same merges run one by one, even where a kernel's rounding depends on the position within a
    call); when M chunk buffers would exceed ``SWEEP_BUFFER_BYTES`` the rows are done in blocks
    over the same (cached) input chunk."""
    chunk = ps.chunk
    M = W.shape[0]
    mb = max(1, min(M, SWEEP_BUFFER_BYTES // max(1, chunk * _itemsize(odt))))
    for s in range(0, numel, chunk):
        e = min(numel, s + chunk)
        xs = [src.chunk(name, s, e) for src in ps.sources]
        for m0 in range(0, M, mb):
            m1 = min(M, m0 + mb)
            buf = bufs.get(odt, m1 - m0, e - s)
            fn(xs, W[m0:m1], odt, buf)
            for m in range(m0, m1):
                ps.jobs[m].out.write_chunk(name, buf[m - m0])
        on_chunk(e - s)


def _linear(ps, name, odt, bufs, on_chunk, numel):
    import torch

    W = ps._W
    if W is None or any(j.rules for j in ps.jobs):
        W = torch.zeros((len(ps.jobs), len(ps.sources)), dtype=torch.float32)
        for m, j in enumerate(ps.jobs):
            cols = j.cols if j.cols is not None else range(len(ps.sources))
            for c, x in zip(cols, j.weights_for(name)):
                W[m, c] = x
        if not any(j.rules for j in ps.jobs):
            ps._W = W
    _weighted_sum(ps, name, W, odt, bufs, on_chunk, numel, ps.jobs[0].defn.fn)


def _task_vector(ps, name, odt, bufs, on_chunk, numel):
    import torch

    j = ps.jobs[0]
    d = j.defn
    if ps.delta is not None and ps.base_src is None:
        raise ParameterError(f"{d.name} in delta space needs a base")
    p = j.params_for(name)
    ctx = d.prepare(d.name, name, ps.sources, ps.base_src, numel, p)
    w = torch.tensor(j.weights_for(name), dtype=torch.float32)
    base_full = ctx.get("base_full")
    for s in range(0, numel, ps.chunk):
        e = min(numel, s + ps.chunk)
        if base_full is not None:
            bc = base_full[s:e]
        else:
            bc = ps.base_src.chunk(name, s, e) if ps.base_src is not None else None
        buf = bufs.get(odt, 1, e - s)[0]
        d.fn(d.name, bc, [src.chunk(name, s, e) for src in ps.sources], w, p, ctx, s, odt, buf)
        j.out.write_chunk(name, buf)
        on_chunk(e - s)


def _pairwise(ps, name, odt, bufs, on_chunk, numel):
    import torch

    from .kernels import linear_chunk

    j = ps.jobs[0]
    c0, c1 = j.defn.fn(name, ps.sources[0], ps.sources[1], j.params_for(name), ps.chunk, numel)
    _weighted_sum(ps, name, torch.tensor([[c0, c1]], dtype=torch.float32), odt, bufs, on_chunk, numel, linear_chunk)


def _per_matrix(ps, name, odt, bufs, on_chunk, numel):
    j = ps.jobs[0]
    if j.defn.matrix_fn is not None:
        res = _matrix_method(ps, j, name)
    else:
        full = [s.full(name) for s in ps.sources]
        res = j.defn.fn(name, full, j.weights_for(name), j.params_for(name), odt)
        del full
    j.out.write(name, res.to(odt))
    del res
    on_chunk(numel)


def _matrix_method(ps, j, name):
    """An SVD-family method (``MethodDef.matrix_fn``, METHODS.md "Low-rank families") on one
    whole tensor: τ_t = θ_t − θ_0 in float32 (float64 if any input is float64); a 2-D
    non-embedding matrix gets θ_0 + Δ with Δ = matrix_fn(stack(τ_t)) (one batched call), every
    other tensor θ_0 + α·mean_t w_t τ_t (α: the method's ``alpha``, else ``lam``, default 1).
    LiNeS scales Δ by the tensor's factor. Without a base (a non-factor tensor of an adapter in
    delta space with base pretrained) the result is the inputs' mean."""
    import torch

    from .kernels import _EMBED_RE

    d = j.defn   # its space was checked before the merge started (run._check_stored_space)
    p, w = j.params_for(name), j.weights_for(name)
    st = ps.plan.dtypes[name]
    dt = torch.float64 if st == "F64" or any(s.info.tensors[name].dtype == "F64" for s in ps.sources) \
        else torch.float32
    T = len(ps.sources)
    if ps.base_src is None:
        acc = None
        for s in ps.sources:
            x = s.full(name)
            acc = x.to(dt, copy=True) if acc is None else acc.add_(x.to(dt))   # never in place on a source's tensor
        return acc / T
    base = ps.base_src.full(name).to(dt)
    if base.dim() == 2 and not _EMBED_RE.search(name):
        taus = torch.stack([s.full(name).to(dt) for s in ps.sources])
        taus -= base
        delta = d.matrix_fn(taus, w, p, name=name)
        del taus
    else:   # one input at a time: memory of two tensors (embeddings can be large)
        delta = torch.zeros_like(base)
        for s, x in zip(ps.sources, w):
            delta.add_(s.full(name).to(dt) - base, alpha=float(x))
        delta *= float(p.get("alpha", p.get("lam", 1.0))) / T
    f = p.get(LINES_KEY)
    if f is not None:
        delta = delta * float(f)
    return base + delta


def _elementwise(ps, name, odt, bufs, on_chunk, numel):
    j = ps.jobs[0]
    d = j.defn
    p, w = j.params_for(name), j.weights_for(name)
    base = ps.base_src if d.uses_base else None
    for s in range(0, numel, ps.chunk):
        e = min(numel, s + ps.chunk)
        xs = [src.chunk(name, s, e) for src in ps.sources]
        bc = base.chunk(name, s, e) if base is not None else None
        j.out.write_chunk(name, d.fn(xs, w, p, bc).to(odt))
        on_chunk(e - s)


STREAMERS = {"linear": _linear, "task_vector": _task_vector, "pairwise": _pairwise, "per_matrix": _per_matrix,
             "elementwise": _elementwise}

"""The built-in per-tensor merge methods, driven through the PRODUCTION path and checked against
the float64 oracle ``tests/helpers_ref.py`` (written from METHODS.md).

``ckptreg.methods`` holds no per-tensor merge code any more: the functions below are thin adapters
with the old call signatures that call the production code the way the streaming loop
(:mod:`ckptreg.merge.stream`) does: parameters checked by the method table's ``check_params``
(the engine's ``Job.params``); TIES / magnitude-prune thresholds as ``kernels._thresholds``
computes them (``ops.kth_largest_abs`` of each whole input against the whole base, k =
floor(density * numel), +inf when k = 0); DARE keys as ``kernels.task_prepare`` derives them
(``rng.signed64(rng.dare_key(seed, name, i))``); then ``kernels.task_chunk`` (``ops.task_merge``)
per chunk of ``CHUNK_ELEMS`` at its element offset, ``kernels.linear_chunk`` (``ops.weighted_sum``)
for linear, and ``kernels.slerp_coeffs`` over real safetensors files read by ``merge.sources.Source``
followed by ``linear_chunk`` for SLERP (as ``stream._pairwise``). Output dtype float32 (``--dtype
float32``)."""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
from safetensors.torch import save_file

from ckptreg import ops, rng
from ckptreg.errors import MismatchError, ParameterError
from ckptreg.formats import inspect
from ckptreg.merge import kernels as K
from ckptreg.merge.sources import Source
from ckptreg.merge.stream import CHUNK_ELEMS
from ckptreg.merge.table import check_params
from helpers_ref import (
    ref_dare,
    ref_dare_mask,
    ref_linear,
    ref_magnitude_prune,
    ref_slerp,
    ref_task_arithmetic,
    ref_ties,
    ref_trim,
)

_OUT = torch.float32
_TRIM = ("ties", "magnitude_prune")
_DARE = ("dare_linear", "dare_ties")


# --------------------------------------------------------------------------- production adapters


def _flat(t):
    return t.reshape(-1)


def _task(method, base, tensors, weights, *, thresholds=None, offset=0, name="t", **params):
    """One task-vector merge of one tensor (or of a chunk of it at element ``offset``), as
    ``stream._task_vector`` runs it."""
    tensors = list(tensors)
    p = check_params(method, params, len(tensors))
    xs = [_flat(t) for t in tensors]
    b = _flat(base)
    numel = xs[0].numel() if xs else 0
    ctx = {"base_full": None, "thr": None, "keys": None}
    if method in _TRIM:
        if thresholds is None:   # kernels._thresholds: whole inputs against the whole base
            k = int(math.floor(float(p["density"]) * numel))
            thresholds = [math.inf] * len(xs) if k <= 0 else [ops.kth_largest_abs(x, k, b) for x in xs]
        ctx["thr"] = thresholds
    if method in _DARE:          # kernels.task_prepare
        ctx["keys"] = [rng.signed64(rng.dare_key(int(p.get("seed", 0)), name, i)) for i in range(len(xs))]
    w = torch.tensor(weights, dtype=torch.float32)
    out = torch.empty(numel, dtype=_OUT)
    for s in range(0, max(numel, 1), CHUNK_ELEMS):
        e = min(numel, s + CHUNK_ELEMS)
        K.task_chunk(method, b[s:e], [x[s:e] for x in xs], w, p, ctx, offset + s, _OUT, out[s:e])
    return out.reshape(tensors[0].shape)


def linear(tensors, weights):
    """``stream._linear``: one row of weights times the inputs, chunk by chunk."""
    xs = [_flat(t) for t in tensors]
    W = torch.tensor([list(weights)], dtype=torch.float32).reshape(1, -1)
    numel = xs[0].numel() if xs else 0
    out = torch.empty((1, numel), dtype=_OUT)
    for s in range(0, max(numel, 1), CHUNK_ELEMS):
        e = min(numel, s + CHUNK_ELEMS)
        K.linear_chunk([x[s:e] for x in xs], W, _OUT, out[:, s:e])
    return out[0].reshape(tensors[0].shape)


def task_arithmetic(base, tensors, weights, lam=1.0):
    return _task("task_arithmetic", base, tensors, weights, lam=lam)


def ties(base, tensors, weights, density, sign="total", lam=1.0, thresholds=None):
    return _task("ties", base, tensors, weights, density=density, sign=sign, lam=lam, thresholds=thresholds)


def magnitude_prune(base, tensors, weights, density, lam=1.0, thresholds=None):
    return _task("magnitude_prune", base, tensors, weights, density=density, lam=lam, thresholds=thresholds)


def dare_linear(base, tensors, weights, density, seed, name, lam=1.0, offset=0):
    return _task("dare_linear", base, tensors, weights, density=density, seed=seed, name=name, lam=lam,
                 offset=offset)


def dare_ties(base, tensors, weights, density, seed, name, sign="total", lam=1.0, offset=0):
    return _task("dare_ties", base, tensors, weights, density=density, seed=seed, name=name, sign=sign,
                 lam=lam, offset=offset)


def trim_threshold(tau, density):
    """The threshold ``kernels._thresholds`` computes for a task vector ``tau`` (base 0)."""
    d = check_params("magnitude_prune", {"density": density}, 1)["density"]
    k = int(math.floor(d * tau.numel()))
    return math.inf if k <= 0 else ops.kth_largest_abs(_flat(tau), k)


def dare_masks(numel, n, density, seed, name, offset=0):
    """The production DARE masks: ``rng.keep_mask`` of the keys ``task_prepare`` derives."""
    d = check_params("dare_linear", {"density": density}, n)["density"]
    return [rng.keep_mask(rng.dare_key(int(seed), str(name), i), int(offset), int(numel), d) for i in range(n)]


def slerp(t0, t1, t):
    """``stream._pairwise``: coefficients from two real safetensors files read by ``Source``, then
    the weighted sum ``c0 * t0 + c1 * t1``."""
    p = check_params("slerp", {"t": t}, 2)
    name = "w"
    numel = t0.numel()
    with tempfile.TemporaryDirectory() as d:
        srcs = []
        for i, x in enumerate((t0, t1)):
            path = os.path.join(d, f"in{i}.safetensors")
            save_file({name: x.contiguous()}, path)
            srcs.append(Source(inspect(path)))
        try:
            c0, c1 = K.slerp_coeffs(name, srcs[0], srcs[1], p, CHUNK_ELEMS, numel)
            W = torch.tensor([[c0, c1]], dtype=torch.float32)
            out = torch.empty((1, numel), dtype=_OUT)
            for s in range(0, numel, CHUNK_ELEMS):
                e = min(numel, s + CHUNK_ELEMS)
                K.linear_chunk([src.chunk(name, s, e) for src in srcs], W, _OUT, out[:, s:e])
        finally:
            for src in srcs:
                src.close()
    return out[0].reshape(t0.shape)


class _Production:
    """The adapters under the old module alias, so the tests below read as before."""

    linear = staticmethod(linear)
    task_arithmetic = staticmethod(task_arithmetic)
    ties = staticmethod(ties)
    magnitude_prune = staticmethod(magnitude_prune)
    dare_linear = staticmethod(dare_linear)
    dare_ties = staticmethod(dare_ties)
    trim_threshold = staticmethod(trim_threshold)
    dare_masks = staticmethod(dare_masks)
    slerp = staticmethod(slerp)


M = _Production

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(37, 29), (1200,), (4, 5, 6)]


def make(seed, shape, dtype, n=3, spread=0.05):
    """Stored (base, inputs) in `dtype`: fine-tuned = base + small task vector."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.5
    ts = [base + spread * torch.randn(shape, generator=g) * (1 + i) for i in range(n)]
    return base.to(dtype), [t.to(dtype) for t in ts]


def weights_for(seed, n):
    g = torch.Generator().manual_seed(seed + 1000)
    return (torch.rand(n, generator=g) * 1.5 + 0.1).tolist()


def close(got, ref, rtol=2e-5):
    """Methods compute in float32 (float64 for float64 inputs) and return float32; the reference is
    float64 on the same stored values, so the tolerance is float32 rounding, whatever the storage."""
    assert got.dtype == torch.float32
    assert got.shape == ref.shape
    scale = ref.abs().max().item() + 1e-30
    err = (got.double() - ref).abs().max().item()
    assert err <= rtol * scale, f"max abs err {err:.3e} vs scale {scale:.3e}"


# --------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_linear_and_task_arithmetic(dtype, shape, seed):
    base, ts = make(seed, shape, dtype)
    w = weights_for(seed, len(ts))
    close(M.linear(ts, w), ref_linear(ts, w))
    close(M.task_arithmetic(base, ts, w, lam=0.8), ref_task_arithmetic(base, ts, w, 0.8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.1, 0.35, 1.0])
def test_ties(dtype, shape, sign, density):
    base, ts = make(3, shape, dtype, n=4)
    w = weights_for(3, 4)
    close(M.ties(base, ts, w, density, sign=sign, lam=1.3), ref_ties(base, ts, w, density, sign, 1.3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.05, 0.5])
def test_magnitude_prune(dtype, density):
    base, ts = make(4, (41, 23), dtype)
    w = weights_for(4, 3)
    close(M.magnitude_prune(base, ts, w, density, lam=0.9), ref_magnitude_prune(base, ts, w, density, 0.9))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.3, 0.9, 1.0])
def test_dare_linear_and_ties(dtype, density):
    base, ts = make(5, (23, 19), dtype)
    w = weights_for(5, 3)
    close(M.dare_linear(base, ts, w, density, seed=11, name="layer.0.q", lam=1.1),
          ref_dare(base, ts, w, density, 11, "layer.0.q", lam=1.1))
    for sign in ("total", "frequency"):
        close(M.dare_ties(base, ts, w, density, seed=11, name="layer.0.q", sign=sign, lam=0.7),
              ref_dare(base, ts, w, density, 11, "layer.0.q", lam=0.7, ties=True, sign=sign))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp(dtype, t):
    _, (a, b) = make(6, (31, 17), dtype, n=2, spread=1.0)
    close(M.slerp(a, b, t), ref_slerp(a, b, t))


# --------------------------------------------------------------------------- TIES specifics


def test_ties_zero_sum_elects_plus():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(500, generator=g)
    base = torch.zeros(500)
    w = [0.7, 1.9]
    # total: x + (-x) = 0 everywhere -> gamma = +1: only the positive entry of each pair agrees
    out = M.ties(base, [x, -x], w, density=1.0, sign="total")
    expect = torch.where(x > 0, w[0] * x, w[1] * (-x))
    assert torch.equal(out, expect)
    assert (out >= 0).all()
    # frequency: two + and two - per entry -> sign sum 0 -> +1; positives average over count 2
    out = M.ties(base, [x, -x, 2 * x, -2 * x], [1, 1, 1, 1], density=1.0, sign="frequency")
    expect = torch.where(x > 0, (x + 2 * x) / 2, (-x - 2 * x) / 2)
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=0)


def test_ties_all_zero_task_vectors_and_zero_k():
    base = torch.randn(64, 8)
    out = M.ties(base, [base.clone(), base.clone()], [1, 1], density=0.5)
    assert torch.equal(out, base)
    out = M.magnitude_prune(base, [base.clone()], [1], density=0.5)
    assert torch.equal(out, base)
    # k = floor(0.001 * 512) = 0: nothing kept, result is the base
    t = base + 1.0
    assert M.trim_threshold(t - base, 0.001) == math.inf
    assert torch.equal(M.ties(base, [t], [1], density=0.001), base)
    assert torch.equal(M.magnitude_prune(base, [t], [1], density=0.001), base)


def test_ties_zeros_do_not_count_in_disjoint_mean():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, 0.0, -1.0])
    b = torch.tensor([3.0, 0.0, 0.0, -3.0])
    out = M.ties(base, [a, b], [1, 1], density=1.0)
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0, 0.0, -2.0]))


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.999, 1.0])
def test_trim_threshold_is_kth_largest(density):
    g = torch.Generator().manual_seed(8)
    tau = torch.randn(333, 7, generator=g)
    k = int(math.floor(density * tau.numel()))
    thr = M.trim_threshold(tau, density)
    srt = tau.abs().reshape(-1).sort(descending=True).values
    assert thr == srt[k - 1].item()
    assert int((tau.abs() >= thr).sum()) == k  # distinct values: exactly k kept
    assert torch.equal(torch.where(tau.abs() >= thr, tau, 0.0).double(), ref_trim(tau, density))


def test_trim_ties_at_threshold_keep_all_equal():
    tau = torch.tensor([3.0, -2.0, 2.0, 2.0, 1.0])
    thr = M.trim_threshold(tau, 0.4)  # k = 2 -> 2nd largest |tau| = 2
    assert thr == 2.0
    out = M.magnitude_prune(torch.zeros(5), [tau], [1.0], 0.4)
    assert torch.equal(out, torch.tensor([3.0, -2.0, 2.0, 2.0, 0.0]))


def test_ties_chunked_with_whole_tensor_thresholds():
    base, ts = make(9, (5000,), torch.bfloat16, n=3)
    w = [1.0, 0.5, 2.0]
    th = [M.trim_threshold(t.float() - base.float(), 0.2) for t in ts]
    whole = M.ties(base, ts, w, 0.2)
    parts = [M.ties(base[i:i + 777], [t[i:i + 777] for t in ts], w, 0.2, thresholds=th)
             for i in range(0, 5000, 777)]
    assert torch.equal(torch.cat(parts), whole)
    mp = [M.magnitude_prune(base[i:i + 777], [t[i:i + 777] for t in ts], w, 0.2, thresholds=th)
          for i in range(0, 5000, 777)]
    assert torch.equal(torch.cat(mp), M.magnitude_prune(base, ts, w, 0.2))


# --------------------------------------------------------------------------- DARE masks


@pytest.mark.parametrize("chunk", [1, 97, 1024, 4999])
def test_dare_same_mask_whatever_the_chunk(chunk):
    base, ts = make(10, (5000,), torch.float16, n=3)
    w = [1.0, 1.0, 1.0]
    for fn in (M.dare_linear, M.dare_ties):
        whole = fn(base, ts, w, 0.4, 123, "model.layers.3.mlp.up_proj.weight")
        parts = [fn(base[i:i + chunk], [t[i:i + chunk] for t in ts], w, 0.4, 123,
                    "model.layers.3.mlp.up_proj.weight", offset=i)
                 for i in range(0, 5000, chunk)]
        assert torch.equal(torch.cat(parts), whole)


def test_dare_chunk_of_a_2d_tensor():
    base, ts = make(12, (40, 50), torch.float32, n=2)
    whole = M.dare_linear(base, ts, [1, 1], 0.5, 5, "w").reshape(-1)
    fb, fts = base.reshape(-1), [t.reshape(-1) for t in ts]
    rows = [M.dare_linear(base[r], [t[r] for t in ts], [1, 1], 0.5, 5, "w", offset=r * 50) for r in range(40)]
    assert torch.equal(torch.cat(rows), whole)
    assert torch.equal(M.dare_linear(fb[100:1300], [t[100:1300] for t in fts], [1, 1], 0.5, 5, "w", offset=100),
                       whole[100:1300])


def test_dare_masks_match_spec_and_differ_by_seed_name_index():
    n = 3000
    m = M.dare_masks(n, 2, 0.3, seed=1, name="a")
    assert torch.equal(m[0], ref_dare_mask(1, "a", 0, n, 0.3))
    assert torch.equal(m[1], ref_dare_mask(1, "a", 1, n, 0.3))
    assert torch.equal(m[0], M.dare_masks(n, 1, 0.3, seed=1, name="a")[0])  # deterministic
    assert not torch.equal(m[0], m[1])                                       # index
    assert not torch.equal(m[0], M.dare_masks(n, 1, 0.3, seed=2, name="a")[0])  # seed
    assert not torch.equal(m[0], M.dare_masks(n, 1, 0.3, seed=1, name="b")[0])  # name
    frac = m[0].float().mean().item()
    assert abs(frac - 0.3) < 0.04
    # element j of a chunk at offset o is element o + j of the whole tensor
    assert torch.equal(M.dare_masks(100, 1, 0.3, seed=1, name="a", offset=500)[0], m[0][500:600])
    assert M.dare_masks(10, 1, 1.0, 1, "a")[0].all()


def test_dare_results_differ_by_seed_and_rescale():
    base, ts = make(13, (2000,), torch.float32, n=1)
    a = M.dare_linear(base, ts, [1.0], 0.5, 1, "x")
    b = M.dare_linear(base, ts, [1.0], 0.5, 2, "x")
    assert not torch.equal(a, b)
    tau = (ts[0] - base)
    kept = (a - base) != 0
    torch.testing.assert_close((a - base)[kept], (tau / 0.5)[kept], rtol=1e-5, atol=1e-6)
    # expectation is preserved on average: sum of rescaled kept ≈ sum tau
    assert abs((a - base).sum().item() - tau.sum().item()) < 0.1 * tau.abs().sum().item()


# --------------------------------------------------------------------------- SLERP specifics


def test_slerp_endpoints():
    _, (a, b) = make(14, (50, 20), torch.float32, n=2, spread=1.0)
    torch.testing.assert_close(M.slerp(a, b, 0.0), a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(M.slerp(a, b, 1.0), b, rtol=1e-6, atol=1e-6)


def test_slerp_near_colinear_uses_lerp():
    g = torch.Generator().manual_seed(15)
    a = torch.randn(300, generator=g)
    b = 3.0 * a + 1e-4 * torch.randn(300, generator=g)  # cos ~ 1 > 0.9995
    for t in (0.0, 0.3, 1.0):
        lerp = (1 - t) * a + t * b
        torch.testing.assert_close(M.slerp(a, b, t), lerp, rtol=1e-6, atol=1e-6)
        close(M.slerp(a, b, t), ref_slerp(a, b, t))
    # anti-colinear also takes the linear branch (|d| > 0.9995)
    torch.testing.assert_close(M.slerp(a, -a, 0.5), torch.zeros(300), rtol=0, atol=1e-6)


def test_slerp_not_normalised_below_eps_and_magnitudes_kept():
    a = torch.zeros(10)
    b = torch.randn(10)
    # |v0| <= 1e-8: not normalised, d = 0 -> theta = pi/2
    close(M.slerp(a, b, 0.3), ref_slerp(a, b, 0.3))
    torch.testing.assert_close(M.slerp(a, b, 0.3), math.sin(0.3 * math.pi / 2) * b)
    # orthogonal vectors of different norms: result uses the un-normalised tensors
    x = torch.tensor([2.0, 0.0]); y = torch.tensor([0.0, 5.0])
    torch.testing.assert_close(M.slerp(x, y, 0.5), torch.tensor([2.0, 5.0]) * math.sin(math.pi / 4))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density(density):
    base, ts = make(0, (10,), torch.float32)
    for call in (
        lambda: M.ties(base, ts, [1, 1, 1], density),
        lambda: M.magnitude_prune(base, ts, [1, 1, 1], density),
        lambda: M.dare_linear(base, ts, [1, 1, 1], density, 0, "x"),
        lambda: M.dare_ties(base, ts, [1, 1, 1], density, 0, "x"),
        lambda: M.trim_threshold(ts[0], density),
    ):
        with pytest.raises(ParameterError, match=r"density must be in \(0, 1\]"):
            call()


@pytest.mark.parametrize("t", [-0.01, 1.01, float("nan")])
def test_bad_slerp_t(t):
    with pytest.raises(ParameterError, match=r"t must be in \[0, 1\]"):
        M.slerp(torch.ones(3), torch.zeros(3), t)


@pytest.mark.parametrize("lam", [float("inf"), float("nan")])
def test_bad_lambda(lam):
    base, ts = make(0, (10,), torch.float32)
    with pytest.raises(ParameterError, match="lambda must be finite"):
        M.task_arithmetic(base, ts, [1, 1, 1], lam=lam)
    with pytest.raises(ParameterError, match="lambda must be finite"):
        M.ties(base, ts, [1, 1, 1], 0.5, lam=lam)


def test_other_parameter_errors():
    """Each error the old per-tensor functions raised, from the production validator that raises
    it now (ops for tensors/weights/thresholds/offset, the method table for parameters)."""
    base, ts = make(0, (10,), torch.float32)
    with pytest.raises(MismatchError, match=r"weights must have shape \[M, 3\] \(or \[3\]\) for 3 inputs"):
        M.linear(ts, [1, 1])
    with pytest.raises(ParameterError, match="weights contain NaN or inf"):
        M.linear(ts, [1, float("nan"), 1])
    with pytest.raises(ParameterError, match="sign must be 'total' or 'frequency'"):
        M.ties(base, ts, [1, 1, 1], 0.5, sign="majority")
    with pytest.raises(MismatchError, match="need at least one tensor"):
        M.linear([], [])
    with pytest.raises(MismatchError, match="thresholds must have 3 entries, got 1"):
        M.ties(base, ts, [1, 1, 1], 0.5, thresholds=[0.1])
    with pytest.raises(ParameterError, match="offset"):
        M.dare_linear(base, ts, [1, 1, 1], 0.5, 0, "x", offset=-1)
    with pytest.raises(MismatchError, match="shape"):
        M.task_arithmetic(base, [torch.zeros(11)], [1])
    with pytest.raises(MismatchError, match="supported: float32, float16, bfloat16, float64"):
        M.linear([torch.zeros(3, dtype=torch.int64)], [1])


def test_oracle_is_independent_of_production_merge_code():
    """tests/helpers_ref.py is the oracle the production path is tested against: it must not use
    ckptreg's merge code (ops, methods, lowrank, merge); only the RNG spec (rng)."""
    import pathlib
    import re

    src = (pathlib.Path(__file__).parent / "helpers_ref.py").read_text()
    imports = re.findall(r"^\s*(?:from\s+(\S+)\s+import\s+([^\n]+)|import\s+(\S+))", src, re.M)
    used = set()
    for frm, names, mod in imports:
        if mod:
            used.add(mod)
        elif frm == "ckptreg":
            used.update("ckptreg." + n.strip() for n in names.split(","))
        else:
            used.add(frm)
    assert {u for u in used if u.startswith("ckptreg")} == {"ckptreg.rng"}, used


def test_methods_module_has_no_merge_code():
    """ckptreg.methods keeps only the validators and SLERP constants production imports."""
    from ckptreg import methods

    assert sorted(methods.__all__) == ["SLERP_DOT_THRESHOLD", "SLERP_EPS", "check_lam", "finite_floats"]
    for gone in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "slerp",
                 "trim_threshold", "trim_k", "dare_masks"):
        assert not hasattr(methods, gone), gone
    assert methods.SLERP_DOT_THRESHOLD == 0.9995 and methods.SLERP_EPS == 1e-8

"""ckptreg.ops: every op against a float64 reference on fresh random inputs, the compiled C++
path against the Python fallback (same numbers, identical DARE masks), edge cases, errors,
opcheck, backend forcing, and CUDA checks that skip cleanly without a GPU."""
from __future__ import annotations

import math

import pytest
import torch

from ckptreg import ops, rng
from ckptreg.errors import BackendError, MismatchError, ParameterError

HAS_CPP = ops.available()["cpp"]
HAS_CUDA = torch.cuda.is_available() and ops.available()["cuda"]
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="ckptreg._C (C++ kernels) not built")
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device or no CUDA kernels")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_DTYPES = DTYPES + [torch.float64]
SIZES = [0, 1, 7, 4097, 10007]  # empty, one element, not multiples of the block/vector width
BACKENDS = ["python"] + (["cpp"] if HAS_CPP else [])
METHODS = list(ops.METHODS)
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}


@pytest.fixture
def use(monkeypatch):
    """use("python"|"cpp"|"auto") sets CKPTREG_BACKEND for the test."""

    def _set(name):
        monkeypatch.setenv("CKPTREG_BACKEND", name)

    yield _set


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def fsvd_inputs(L, d, R, k, dtype, g):
    """Random B [L, d, R], core [L, R, R], A [L, R, k] for factored_svd_batched."""
    return randn((L, d, R), dtype, g), randn((L, R, R), dtype, g), randn((L, R, k), dtype, g)


def rel_err(a, b, mag):
    """max |a - b| relative to the magnitude scale of the computation."""
    if a.numel() == 0:
        return 0.0
    d = (a.double() - b.double()).abs()
    return float((d / mag.double().clamp_min(1e-30)).max())


# ------------------------------------------------------------------------------------------
# float64 references (independent of ckptreg.ops)
# ------------------------------------------------------------------------------------------
def ref_weighted_sum(xs, w):
    X = torch.stack([x.double().reshape(-1) for x in xs])  # [N, numel]
    W = w.double()
    return W @ X, W.abs() @ X.abs()


def ref_task_merge(base, xs, w, method, density, thr, keys, sign, lam, offset):
    """float64 reference of METHODS.md; returns (result, magnitude, |election sum|)."""
    b = base.double().reshape(-1) if base is not None else torch.zeros(xs[0].numel(), dtype=torch.float64)
    taus = []
    for i, x in enumerate(xs):
        t = x.double().reshape(-1) - b
        if method in ("ties", "magnitude_prune"):
            # the trim decision is taken on |tau| in the accumulation dtype (float32 for 16/32-bit
            # storage), exactly as the threshold was computed; the values stay float64
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            bt = base.reshape(-1).to(acc) if base is not None else 0
            keep = (x.reshape(-1).to(acc) - bt).abs() >= thr[i]
            t = torch.where(keep, t, 0.0)
        elif method in ("dare_ties", "dare_linear"):
            m = rng.keep_mask(keys[i] & rng.MASK64, offset, t.numel(), density)
            t = torch.where(m, t / density, 0.0)
        taus.append(t)
    T = torch.stack(taus)
    W = torch.tensor(w, dtype=torch.float64)[:, None]
    if method in ("ties", "dare_ties"):
        s = T.sum(0) if sign == "total" else torch.sign(T).sum(0)
        gamma = torch.where(s >= 0, 1.0, -1.0)
        agree = torch.sign(T) == gamma
        num = (W * T * agree).sum(0)
        cnt = agree.sum(0).clamp_min(1)
        tm = num / cnt
        mag = (W.abs() * T.abs()).sum(0) / cnt
        # sums of signs are exact integers on every path; so is an election where nothing was kept
        exact = (sign == "frequency") | ~(T != 0).any(0)
        margin = torch.where(exact, math.inf, s.abs())
    else:
        tm = (W * T).sum(0)
        mag = (W.abs() * T.abs()).sum(0)
        margin = torch.full_like(tm, math.inf)
    return b + lam * tm, b.abs() + abs(lam) * mag, margin


def exact_kth(x, k, base=None):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    d = x.reshape(-1).to(acc)
    if base is not None:
        d = d - base.reshape(-1).to(acc)
    return float(torch.sort(d.abs(), descending=True).values[k - 1])


# ------------------------------------------------------------------------------------------
# weighted_sum
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("numel", SIZES)
def test_weighted_sum_vs_float64(use, backend, dtype, numel):
    use(backend)
    g = gen(numel * 10 + ALL_DTYPES.index(dtype))
    n, m = 5, 3
    xs = [randn((numel,), dtype, g) for _ in range(n)]
    w = torch.rand(m, n, generator=g) * 2 - 1
    ref, mag = ref_weighted_sum(xs, w)
    got = ops.weighted_sum(xs, w, out_dtype=torch.float32 if dtype != torch.float64 else None)
    assert got.shape == (m, numel)
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    assert rel_err(got.reshape(m, -1), ref, mag) <= tol
    # default output dtype = input dtype, rounded once
    got_d = ops.weighted_sum(xs, w)
    assert got_d.dtype == dtype
    assert rel_err(got_d.reshape(m, -1), ref, mag) <= EPS[dtype] + tol


@needs_cpp
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_weighted_sum_compiled_matches_fallback(use, dtype):
    g = gen(11)
    n, m, numel = 8, 4, 50_003
    xs = [randn((numel,), dtype, g) for _ in range(n)]
    w = torch.rand(m, n, generator=g)
    _, mag = ref_weighted_sum(xs, w)
    use("python")
    a = ops.weighted_sum(xs, w, out_dtype=torch.float32 if dtype != torch.float64 else None)
    use("cpp")
    b = ops.weighted_sum(xs, w, out_dtype=torch.float32 if dtype != torch.float64 else None)
    assert rel_err(a.reshape(m, -1), b.reshape(m, -1), mag) <= (1e-6 if dtype != torch.float64 else 1e-14)
    # stored in the input dtype: the two paths round to the same value or a neighbour
    use("python")
    a16 = ops.weighted_sum(xs, w)
    use("cpp")
    b16 = ops.weighted_sum(xs, w)
    assert rel_err(a16.reshape(m, -1), b16.reshape(m, -1), mag) <= 2 * EPS[dtype]


@needs_cpp
def test_weighted_sum_thread_count_invariant(use):
    use("cpp")
    g = gen(3)
    xs = [randn((100_001,), torch.float32, g) for _ in range(4)]
    w = torch.rand(2, 4, generator=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.weighted_sum(xs, w)
        torch.set_num_threads(2)
        b = ops.weighted_sum(xs, w)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, b)  # blocks are independent: bitwise equal


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_sum_many_outputs_and_1d_weights(use, backend):
    use(backend)
    g = gen(5)
    xs = [randn((3, 333), torch.float32, g) for _ in range(10)]
    W = torch.rand(24, 10, generator=g)
    got = ops.weighted_sum(xs, W)
    assert got.shape == (24, 3, 333)
    ref, mag = ref_weighted_sum(xs, W)
    assert rel_err(got.reshape(24, -1), ref, mag) <= 1e-6
    one = ops.weighted_sum(xs, W[7])
    assert one.shape == (3, 333)
    assert rel_err(one.reshape(1, -1), ref[7:8], mag[7:8]) <= 1e-6
    lst = ops.weighted_sum(xs, [0.1] * 10)  # plain list weights
    assert rel_err(lst.reshape(1, -1), ref_weighted_sum(xs, torch.full((1, 10), 0.1))[0], mag[0:1]) <= 1e-6


@needs_cpp
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 9, 24])
def test_weighted_sum_rows_independent_of_grouping(use, dtype, m):
    """The compiled kernel computes the outputs in register groups of rows (and of tiles): every
    row of an M-output call is bitwise the row a single-output call gives, whatever M (group
    remainders), the tile tail (numel not a multiple of the tile) or the alignment of the output
    rows (an out= view one element into its buffer), and matches float64."""
    use("cpp")
    g = gen(100 + m)
    n, numel = 10, 3 * 1024 + 77
    xs = [randn((numel,), dtype, g) for _ in range(n)]
    W = torch.rand(m, n, generator=g) * 2 - 1
    odt = torch.float32 if dtype != torch.float64 else torch.float64
    got = ops.weighted_sum(xs, W, out_dtype=odt)
    buf = torch.empty(m * numel + 1, dtype=odt)
    shifted = buf[1:].view(m, numel)
    ops.weighted_sum(xs, W, out=shifted)
    ref, mag = ref_weighted_sum(xs, W)
    assert rel_err(got, ref, mag) <= (1e-13 if dtype == torch.float64 else 1e-6)
    assert torch.equal(shifted, got)
    for r in range(m):
        assert torch.equal(ops.weighted_sum(xs, W[r], out_dtype=odt), got[r]), r


@needs_cpp
def test_weighted_sum_streamed_outputs_equal_cached(use):
    """Outputs over 32 MiB take non-temporal stores (straight from registers where a row is 64-byte
    aligned, through the aligned-copy path where it is not); single rows below the bar take plain
    stores. Both routes give the same bits, and the float64 reference."""
    use("cpp")
    g = gen(21)
    n, m, numel = 10, 24, 360_000 + 13  # 24 x 1.4 MiB = 33 MiB of outputs
    xs = [randn((numel,), torch.float32, g) for _ in range(n)]
    W = torch.rand(m, n, generator=g)
    got = ops.weighted_sum(xs, W)
    buf = torch.empty(m * numel + 3)
    shifted = buf[3:].view(m, numel)  # rows 12 bytes past 64-byte alignment
    ops.weighted_sum(xs, W, out=shifted)
    assert torch.equal(shifted, got)
    for r in (0, 5, 23):
        assert torch.equal(ops.weighted_sum(xs, W[r]), got[r]), r
    idx = torch.randint(0, numel, (4096,), generator=g)
    ref, mag = ref_weighted_sum([x[idx] for x in xs], W)
    assert rel_err(got[:, idx], ref, mag) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_sum_non_contiguous(use, backend):
    use(backend)
    g = gen(6)
    base = [randn((64, 130), torch.float32, g) for _ in range(3)]
    xs = [b.t() for b in base]  # transposed views
    assert not xs[0].is_contiguous()
    w = torch.tensor([[0.2, 0.3, 0.5]])
    got = ops.weighted_sum(xs, w)
    ref = sum(wi * x.double() for wi, x in zip(w[0].tolist(), xs))
    assert torch.allclose(got[0].double(), ref, rtol=1e-6, atol=1e-6)
    strided = [b[:, ::3] for b in base]
    got2 = ops.weighted_sum(strided, w[0])
    ref2 = sum(wi * x.double() for wi, x in zip(w[0].tolist(), strided))
    assert torch.allclose(got2.double(), ref2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_sum_out_variant(use, backend):
    use(backend)
    g = gen(8)
    xs = [randn((1001,), torch.bfloat16, g) for _ in range(3)]
    w = torch.rand(2, 3, generator=g)
    expect = ops.weighted_sum(xs, w, out_dtype=torch.float32)
    out = torch.empty(2, 1001)
    r = ops.weighted_sum(xs, w, out=out)
    assert r is out and torch.equal(out, expect)
    # out of another dtype: out_dtype follows it
    out16 = torch.empty(2, 1001, dtype=torch.float16)
    ops.weighted_sum(xs, w, out=out16)
    assert torch.equal(out16, expect.half())
    # non-contiguous out
    big = torch.zeros(1001, 2)
    ops.weighted_sum(xs, w, out=big.t())
    assert torch.equal(big.t(), expect)
    # 1-D weights with an out of the input shape
    o1 = torch.empty(1001)
    ops.weighted_sum(xs, w[1], out=o1)
    assert torch.equal(o1, expect[1])
    with pytest.raises(MismatchError):
        ops.weighted_sum(xs, w, out=torch.empty(3, 1001))
    with pytest.raises(MismatchError):
        ops.weighted_sum(xs, w, out_dtype=torch.float64, out=torch.empty(2, 1001))


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_sum_errors(use, backend):
    use(backend)
    a = torch.zeros(10)
    with pytest.raises(MismatchError, match="dtype"):
        ops.weighted_sum([a, a.half()], [1.0, 1.0])
    with pytest.raises(MismatchError, match="shape"):
        ops.weighted_sum([a, torch.zeros(11)], [1.0, 1.0])
    with pytest.raises(MismatchError, match="weights"):
        ops.weighted_sum([a, a], torch.ones(2, 3))
    with pytest.raises(MismatchError, match="weights"):
        ops.weighted_sum([a, a], torch.ones(2, 2, 1))
    with pytest.raises(MismatchError, match="empty"):
        ops.weighted_sum([], torch.ones(1, 0))
    with pytest.raises(MismatchError, match="dtype"):
        ops.weighted_sum([torch.zeros(3, dtype=torch.int64)], [1.0])
    with pytest.raises(ParameterError):
        ops.weighted_sum([a], [math.nan])


# ------------------------------------------------------------------------------------------
# task_merge
# ------------------------------------------------------------------------------------------
def merge_inputs(numel, dtype, seed, n=4, with_base=True):
    g = gen(seed)
    base = randn((numel,), dtype, g) if with_base else None
    xs = [
        ((base.double() if with_base else 0) + randn((numel,), torch.float64, g, 0.1)).to(dtype)
        for _ in range(n)
    ]
    w = [0.5 + 0.25 * i for i in range(n)]
    keys = [rng.dare_key(1234, "model.layers.0.weight", i) for i in range(n)]
    return base, xs, w, keys


def thresholds_for(base, xs, density):
    k = int(math.floor(density * xs[0].numel()))
    return [exact_kth(x, k, base) if k > 0 else math.inf for x in xs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(
    "method,sign",
    [(m, "total") for m in METHODS] + [("ties", "frequency"), ("dare_ties", "frequency")],
)
def test_task_merge_vs_float64(use, backend, dtype, method, sign):
    use(backend)
    numel = 6007
    base, xs, w, keys = merge_inputs(numel, dtype, seed=METHODS.index(method) * 7 + ALL_DTYPES.index(dtype))
    density = 0.35
    thr = thresholds_for(base, xs, density)
    got = ops.task_merge(
        base, xs, w, method=method, density=density, thresholds=thr, keys=keys, sign=sign, lam=0.8,
        out_dtype=torch.float64 if dtype == torch.float64 else torch.float32,
    )
    ref, mag, margin = ref_task_merge(base, xs, w, method, density, thr, keys, sign, 0.8, 0)
    # elements whose float64 election sum is within float32 rounding of 0 may elect differently
    eps = 1e-12 if dtype == torch.float64 else 1e-5
    scale = torch.stack([x.double().reshape(-1) for x in xs]).abs().sum(0) + 1e-30
    ok = margin > eps * scale
    assert ok.float().mean() > 0.99
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_err(got.reshape(-1)[ok], ref[ok], mag[ok]) <= tol
    # the default output dtype is the input dtype
    assert ops.task_merge(base, xs, w, method=method, density=density, thresholds=thr, keys=keys, sign=sign).dtype == dtype


@needs_cpp
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_task_merge_compiled_matches_fallback(use, dtype, method):
    base, xs, w, keys = merge_inputs(20_011, dtype, seed=99)
    kw = dict(method=method, density=0.3, keys=keys, lam=1.3)
    if method in ("ties", "magnitude_prune"):
        kw["thresholds"] = thresholds_for(base, xs, 0.3)
    odt = torch.float64 if dtype == torch.float64 else torch.float32
    use("python")
    a = ops.task_merge(base, xs, w, out_dtype=odt, **kw)
    use("cpp")
    b = ops.task_merge(base, xs, w, out_dtype=odt, **kw)
    _, mag, _ = ref_task_merge(base, xs, w, method, 0.3, kw.get("thresholds"), keys, "total", 1.3, 0)
    assert rel_err(a, b, mag) <= (1e-6 if dtype != torch.float64 else 1e-14)


@needs_cpp
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_masks_chunk_and_thread_invariant(use, method):
    base, xs, w, keys = merge_inputs(30_001, torch.float32, seed=7, n=3)
    kw = dict(method=method, density=0.25, keys=keys)
    use("python")
    ref = ops.task_merge(base, xs, w, **kw)
    use("cpp")
    old = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(ops.task_merge(base, xs, w, **kw))
        # chunks at odd offsets, each with its element offset
        for cuts in ([0, 1, 4096, 12_345, 30_001], [0, 29_999, 30_001]):
            parts = []
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                parts.append(
                    ops.task_merge(base[lo:hi], [x[lo:hi] for x in xs], w, offset=lo, **kw)
                )
            outs.append(torch.cat(parts))
    finally:
        torch.set_num_threads(old)
    for o in outs:
        assert torch.equal(o, outs[0])
    assert torch.equal(outs[0] == base, ref == base)  # same mask as the Python spec
    assert torch.allclose(outs[0], ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_mask_is_the_rng_spec(use, backend, dtype, method):
    # one input, base 0, weight 1: kept elements are x * (1/density), the rest exactly 0 —
    # the kept set is exactly rng.keep_mask on every backend, at any offset
    use(backend)
    x = randn((5000,), dtype, gen(1))
    x[x == 0] = 1.0
    key = rng.dare_key(3, "w", 0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for offset in (0, 777, 2**40 + 3):
        out = ops.task_merge(None, [x], [1.0], method=method, density=0.4, keys=[key], offset=offset, out_dtype=acc)
        mask = rng.keep_mask(key, offset, 5000, 0.4)
        assert torch.equal(out != 0, mask)
        assert torch.equal(out[mask], x.to(acc)[mask] * torch.tensor(1 / 0.4, dtype=acc))


@pytest.mark.parametrize("backend", BACKENDS)
def test_task_merge_edges(use, backend):
    use(backend)
    # empty and one-element tensors
    for numel in (0, 1):
        base, xs, w, keys = merge_inputs(numel, torch.float32, seed=2)
        for method in METHODS:
            r = ops.task_merge(base, xs, w, method=method, density=0.5, keys=keys,
                               thresholds=[0.0] * len(xs))
            assert r.shape == (numel,)
    # thresholds +inf keep nothing -> base; density 1 DARE = task arithmetic
    base, xs, w, keys = merge_inputs(1000, torch.float32, seed=3)
    r = ops.task_merge(base, xs, w, method="ties", thresholds=[math.inf] * 4)
    assert torch.equal(r, base)
    d1 = ops.task_merge(base, xs, w, method="dare_linear", density=1.0, keys=keys)
    ta = ops.task_merge(base, xs, w, method="task_arithmetic")
    assert torch.allclose(d1, ta, rtol=0, atol=0)
    # thresholds computed when omitted (whole tensor): same as explicit exact thresholds
    auto = ops.task_merge(base, xs, w, method="magnitude_prune", density=0.2)
    expl = ops.task_merge(base, xs, w, method="magnitude_prune", thresholds=thresholds_for(base, xs, 0.2))
    assert torch.equal(auto, expl)
    # non-contiguous inputs and base
    B = torch.stack([base, base]).t()
    X = [torch.stack([x, x]).t() for x in xs]
    nc = ops.task_merge(B[:, 0], [x[:, 0] for x in X], w, method="ties", thresholds=[0.05] * 4)
    cc = ops.task_merge(base, xs, w, method="ties", thresholds=[0.05] * 4)
    assert torch.equal(nc, cc)
    # out=
    out = torch.empty(1000, dtype=torch.float64)
    ops.task_merge(base, xs, w, method="ties", thresholds=[0.05] * 4, out=out)
    assert torch.allclose(out, ops.task_merge(base, xs, w, method="ties", thresholds=[0.05] * 4, out_dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_task_merge_errors(use, backend):
    use(backend)
    base, xs, w, keys = merge_inputs(100, torch.float32, seed=4)
    with pytest.raises(ParameterError):
        ops.task_merge(base, xs, w, method="nope")
    with pytest.raises(ParameterError):
        ops.task_merge(base, xs, w, method="ties", sign="majority", thresholds=[0] * 4)
    with pytest.raises(ParameterError):
        ops.task_merge(base, xs, w, method="dare_ties", density=1.5, keys=keys)
    with pytest.raises(ParameterError):
        ops.task_merge(base, xs, w, method="dare_ties", density=0.5)  # no keys
    with pytest.raises(MismatchError):
        ops.task_merge(base, xs, w[:3], method="task_arithmetic")
    with pytest.raises(MismatchError):
        ops.task_merge(base.double(), xs, w, method="task_arithmetic")
    with pytest.raises(MismatchError):
        ops.task_merge(base, xs[:-1] + [xs[-1].half()], w, method="task_arithmetic")
    with pytest.raises(MismatchError):
        ops.task_merge(base[:50], xs, w, method="task_arithmetic")
    with pytest.raises(MismatchError):
        ops.task_merge(base, xs, w, method="ties", thresholds=[0.1])


# ------------------------------------------------------------------------------------------
# kth_largest_abs
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("numel", [1, 2, 7, 4097, 100_003])
def test_kth_largest_abs_exact(use, backend, dtype, numel):
    use(backend)
    g = gen(numel + ALL_DTYPES.index(dtype))
    x = randn((numel,), dtype, g)
    b = randn((numel,), dtype, g)
    for k in sorted({1, max(1, numel // 3), numel}):
        assert ops.kth_largest_abs(x, k) == exact_kth(x, k)
        assert ops.kth_largest_abs(x, k, b) == exact_kth(x, k, b)
    assert ops.kth_largest_abs(x, 0) == math.inf
    with pytest.raises(ParameterError):
        ops.kth_largest_abs(x, numel + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kth_largest_abs_ties_zeros_noncontiguous(use, backend):
    use(backend)
    x = torch.zeros(1000)
    x[10], x[20], x[30] = -3.0, 3.0, 1.0
    assert ops.kth_largest_abs(x, 1) == 3.0
    assert ops.kth_largest_abs(x, 2) == 3.0
    assert ops.kth_largest_abs(x, 3) == 1.0
    assert ops.kth_largest_abs(x, 4) == 0.0
    m = randn((200, 300), torch.float32, gen(9)).t()[::2]
    assert ops.kth_largest_abs(m, 777) == exact_kth(m.contiguous(), 777)
    with pytest.raises(MismatchError):
        ops.kth_largest_abs(x, 1, torch.zeros(999))
    with pytest.raises(MismatchError):
        ops.kth_largest_abs(torch.arange(10), 1)


@needs_cpp
def test_kth_largest_abs_thread_invariant(use):
    use("cpp")
    x = randn((300_001,), torch.float32, gen(12))
    old = torch.get_num_threads()
    try:
        vals = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            vals.append(ops.kth_largest_abs(x, 12_345))
    finally:
        torch.set_num_threads(old)
    assert vals[0] == vals[1] == exact_kth(x, 12_345)


# ------------------------------------------------------------------------------------------
# factored_svd_batched
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_factored_svd_batched_vs_dense(use, backend, dtype):
    use(backend)
    g = gen(21)
    L, d, R, k = 3, 70, 12, 45
    B, C, A = fsvd_inputs(L, d, R, k, dtype, g)
    U, S, Vh = ops.factored_svd_batched(B, C, A)
    assert U.shape == (L, d, R) and S.shape == (L, R) and Vh.shape == (L, R, k)
    dense = B.double() @ C.double() @ A.double()
    ref = torch.linalg.svdvals(dense)[:, :R]
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(S.double(), ref, rtol=tol, atol=tol * float(ref.max()))
    recon = (U.double() * S.double()[:, None, :]) @ Vh.double()
    assert float((recon - dense).abs().max()) <= tol * float(dense.abs().max()) * 10
    U2, S2, Vh2 = ops.factored_svd_batched(B, C, A, rank=5)
    assert U2.shape == (L, d, 5) and S2.shape == (L, 5) and Vh2.shape == (L, 5, k)
    assert torch.allclose(S2.double(), ref[:, :5], rtol=tol, atol=tol * float(ref.max()))
    # rank larger than available is clamped; d < R works too
    Bs = randn((2, 5, 8), dtype, g)
    Cs = randn((2, 8, 8), dtype, g)
    As = randn((2, 8, 30), dtype, g)
    U3, S3, Vh3 = ops.factored_svd_batched(Bs, Cs, As, rank=100)
    assert S3.shape == (2, 5)
    assert torch.allclose(S3.double(), torch.linalg.svdvals(Bs.double() @ Cs.double() @ As.double()),
                          rtol=tol, atol=tol * 100)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factored_svd_rank_deficient(use, backend, dtype):
    """LoRA B starts at zero: zero columns, B = 0 entirely, duplicated columns -> exact zeros, no NaN."""
    use(backend)
    g = gen(23)
    L, d, R, k = 4, 96, 12, 80
    B, C, A = fsvd_inputs(L, d, R, k, dtype, g)
    B[0, :, 3:7] = 0            # zero columns
    B[1] = 0                    # B = 0 entirely
    B[2, :, 1] = 2 * B[2, :, 0]  # duplicated direction
    A[3, 5:] = 0                # A rank-deficient too
    U, S, Vh = ops.factored_svd_batched(B, C, A)
    assert not (torch.isnan(U).any() or torch.isnan(S).any() or torch.isnan(Vh).any())
    dense = B.double() @ C.double() @ A.double()
    ref = torch.linalg.svdvals(dense)[:, :R]
    smax = ref[:, :1].clamp_min(1e-300)
    big = ref >= 1e-5 * smax
    rel = ((S.double() - ref).abs() / ref.clamp_min(1e-300))[big]
    assert float(rel.max()) <= 1e-5
    assert float(((S.double() - ref).abs() / smax)[~big].max()) <= 1e-5
    assert torch.all(S[1] == 0)
    recon = (U.double() * S.double()[:, None, :]) @ Vh.double()
    fro = (recon - dense).norm(dim=(1, 2))
    nrm = dense.norm(dim=(1, 2))
    assert float(fro[1]) == 0.0
    keep = nrm > 0
    assert float((fro[keep] / nrm[keep]).max()) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L,d,R,k", [(19, 50, 20, 33), (17, 64, 8, 100), (3, 90, 70, 80), (9, 16, 5, 7)])
def test_factored_svd_lane_groups(use, backend, dtype, L, d, R, k):
    """The kernel runs 2/4/8 layers per SIMD lane group: layer counts that leave a partial group,
    ranks that are not multiples of the vector width, R > 64 (the kernel's Grams, then LAPACK for the R x R steps), R > min(d, k),
    and within one group layers whose factors are rank deficient next to full-rank ones."""
    use(backend)
    g = gen(L * 1000 + R)
    B, C, A = fsvd_inputs(L, d, R, k, dtype, g)
    B[1, :, : R // 2] = 0                 # half the columns of B zero
    A[2] = 0                              # A = 0: an all-zero update
    B[L - 1, :, 1] = -3 * B[L - 1, :, 0]  # dependent columns, in the last (partial) group
    C[min(4, L - 1)] = torch.diag_embed(torch.linspace(2.0, 0.5, R, dtype=torch.float64)).to(dtype)  # diagonal core
    U, S, Vh = ops.factored_svd_batched(B, C, A)
    r = min(d, k, R)
    assert U.shape == (L, d, r) and S.shape == (L, r) and Vh.shape == (L, r, k)
    dense = B.double() @ C.double() @ A.double()
    ref = torch.linalg.svdvals(dense)[:, :r]
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    smax = ref[:, :1].clamp_min(1e-300)
    assert float(((S.double() - ref).abs() / smax).max()) <= tol
    assert torch.all(S[:, :-1] >= S[:, 1:])          # descending
    assert torch.all(S[2] == 0)
    recon = (U.double() * S.double()[:, None, :]) @ Vh.double()
    nrm = dense.norm(dim=(1, 2))
    keep = nrm > 0
    assert float(((recon - dense).norm(dim=(1, 2))[keep] / nrm[keep]).max()) <= 10 * tol
    # U columns with a non-zero singular value are orthonormal
    for layer in range(L):
        nz = S[layer] > 1e-6 * S[layer, :1].clamp_min(1e-30)
        if not nz.any():
            continue
        u = U[layer].double()[:, nz]
        eye = torch.eye(int(nz.sum()), dtype=torch.float64)
        assert float((u.mT @ u - eye).abs().max()) <= 100 * tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("R", [16, 70])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_factored_svd_non_finite_layer(use, backend, R, bad):
    """NaN/inf in one layer's B, A or core gives that layer NaN outputs (no silent finite answer,
    no error), and leaves the other layers of its lane group exactly as without it."""
    use(backend)
    g = gen(31)
    L, d, k = 11, 40, 50
    B, C, A = fsvd_inputs(L, d, R, k, torch.float32, g)
    U0, S0, Vh0 = ops.factored_svd_batched(B, C, A)
    B[3, 5, 2] = bad
    A[6, 1, 7] = bad
    C[9, 0, 0] = bad
    U, S, Vh = ops.factored_svd_batched(B, C, A)
    for layer in (3, 6, 9):
        assert torch.isnan(S[layer]).all() and torch.isnan(U[layer]).all() and torch.isnan(Vh[layer]).all()
    good = [x for x in range(L) if x not in (3, 6, 9)]
    assert torch.equal(S[good], S0[good]) and torch.equal(U[good], U0[good]) and torch.equal(Vh[good], Vh0[good])


@needs_cpp
def test_factored_svd_compiled_matches_fallback(use):
    g = gen(22)
    B, C, A = fsvd_inputs(4, 64, 16, 80, torch.float32, g)
    use("python")
    _, s1, _ = ops.factored_svd_batched(B, C, A, rank=8)
    use("cpp")
    _, s2, _ = ops.factored_svd_batched(B, C, A, rank=8)
    assert torch.allclose(s1, s2, rtol=1e-6, atol=1e-6 * float(s1.max()))


def test_factored_svd_errors():
    with pytest.raises(MismatchError):
        ops.factored_svd_batched(torch.zeros(2, 5, 3), torch.zeros(2, 3, 4), torch.zeros(2, 3, 6))
    with pytest.raises(MismatchError):
        ops.factored_svd_batched(torch.zeros(5, 3), torch.zeros(3, 3), torch.zeros(3, 6))
    with pytest.raises(ParameterError):
        ops.factored_svd_batched(torch.zeros(1, 5, 3), torch.zeros(1, 3, 3), torch.zeros(1, 3, 6), rank=0)


# ------------------------------------------------------------------------------------------
# backends, opcheck, torch.compile
# ------------------------------------------------------------------------------------------
def test_backend_forcing(monkeypatch):
    monkeypatch.setenv("CKPTREG_BACKEND", "python")
    assert ops.backend() == "python"
    monkeypatch.setenv("CKPTREG_BACKEND", "auto")
    assert ops.backend() == ("cuda" if HAS_CUDA else "cpp" if HAS_CPP else "python")
    monkeypatch.setenv("CKPTREG_BACKEND", "bogus")
    with pytest.raises(BackendError):
        ops.backend()
    if not HAS_CUDA:
        monkeypatch.setenv("CKPTREG_BACKEND", "cuda")
        with pytest.raises(BackendError):
            ops.backend()
        with pytest.raises(BackendError):
            ops.weighted_sum([torch.ones(3)], [1.0])
    if HAS_CPP:
        monkeypatch.setenv("CKPTREG_BACKEND", "cpp")
        assert ops.backend() == "cpp"
        assert torch.equal(ops.weighted_sum([torch.ones(3)], [2.0]), torch.full((3,), 2.0))


def test_forced_cpp_without_extension(monkeypatch):
    monkeypatch.setattr(ops, "_EXT", False)
    monkeypatch.setattr(ops, "_EXT_ERROR", "ImportError: simulated")
    assert ops.available() == {"python": True, "cpp": False, "cuda": False}
    monkeypatch.setenv("CKPTREG_BACKEND", "auto")
    assert ops.backend() == "python"
    assert torch.equal(ops.weighted_sum([torch.ones(3)], [2.0]), torch.full((3,), 2.0))
    monkeypatch.setenv("CKPTREG_BACKEND", "cpp")
    with pytest.raises(BackendError, match="simulated"):
        ops.backend()
    with pytest.raises(BackendError):
        ops.kth_largest_abs(torch.ones(3), 1)


@needs_cpp
def test_opcheck():
    g = gen(30)
    xs = [randn((2, 37), torch.float32, g) for _ in range(3)]
    w = torch.rand(2, 3, generator=g)
    base = randn((2, 37), torch.float32, g)
    keys = [rng.signed64(rng.dare_key(1, "x", i)) for i in range(3)]
    opc = torch.library.opcheck
    opc(torch.ops.ckptreg.weighted_sum.default, (xs, w, None))
    opc(torch.ops.ckptreg.weighted_sum.default, ([x.half() for x in xs], w, torch.float32))
    opc(torch.ops.ckptreg.weighted_sum_out.default, (xs, w, None, torch.empty(2, 2, 37)))
    args = (base, xs, [1.0, 0.5, 2.0], "dare", "total", 0.5, None, keys, 1.0, 3, None)
    opc(torch.ops.ckptreg.task_merge.default, args)
    args = (base, xs, [1.0, 0.5, 2.0], "trim", "frequency", 1.0, [0.1, 0.2, 0.3], None, 0.7, 0, torch.float64)
    opc(torch.ops.ckptreg.task_merge.default, args)
    opc(torch.ops.ckptreg.task_merge_out.default, args[:-1] + (torch.float64, torch.empty(2, 37, dtype=torch.float64)))
    opc(torch.ops.ckptreg.kth_largest_abs.default, (xs[0], 5, base))
    opc(torch.ops.ckptreg.kth_largest_abs.default, (xs[0].double(), 1, None))
    B, C, A = fsvd_inputs(2, 20, 4, 9, torch.float32, g)
    opc(torch.ops.ckptreg.factored_svd_batched.default, (B, C, A, 3))
    # R > 64: the LAPACK route for the R x R steps
    B, C, A = fsvd_inputs(2, 90, 65, 80, torch.float32, g)
    opc(torch.ops.ckptreg.factored_svd_batched.default, (B, C, A, None))


@needs_cpp
def test_torch_compile_traces_the_ops():
    xs = [torch.randn(64) for _ in range(3)]
    w = torch.rand(2, 3)

    def f(a, b, c, w):
        return torch.ops.ckptreg.weighted_sum([a, b, c], w, None) * 2

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(*xs, w), f(*xs, w))


# ------------------------------------------------------------------------------------------
# CUDA (a GPU session runs these; they skip cleanly here)
# ------------------------------------------------------------------------------------------
@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_cuda_weighted_sum_matches_cpu(use, dtype):
    use("auto")
    g = gen(40)
    xs = [randn((100_003,), dtype, g) for _ in range(5)]
    w = torch.rand(11, 5, generator=g)
    cpu = ops.weighted_sum(xs, w, out_dtype=torch.float32 if dtype != torch.float64 else None)
    gpu = ops.weighted_sum([x.cuda() for x in xs], w.cuda(), out_dtype=cpu.dtype)
    _, mag = ref_weighted_sum(xs, w)
    assert rel_err(gpu.cpu().reshape(11, -1), cpu.reshape(11, -1), mag) <= 1e-6
    # misaligned views (element offset 1) take the scalar path
    xo = [x.cuda()[1:] for x in xs]
    gpu2 = ops.weighted_sum(xo, w.cuda(), out_dtype=cpu.dtype)
    assert rel_err(gpu2.cpu().reshape(11, -1), cpu[:, 1:].reshape(11, -1), mag[:, 1:]) <= 1e-6


@cuda
@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_task_merge_matches_cpu(use, method):
    use("auto")
    base, xs, w, keys = merge_inputs(50_001, torch.float32, seed=41, n=5)
    kw = dict(method=method, density=0.3, keys=keys, offset=1000, lam=0.9)
    if method in ("ties", "magnitude_prune"):
        kw["thresholds"] = thresholds_for(base, xs, 0.3)
    cpu = ops.task_merge(base, xs, w, **kw)
    gpu = ops.task_merge(base.cuda(), [x.cuda() for x in xs], w, **kw).cpu()
    assert torch.equal(cpu == base, gpu == base)
    assert torch.allclose(cpu, gpu, rtol=1e-6, atol=1e-6)


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_cuda_kth_and_factored_svd(use, dtype):
    use("auto")
    g = gen(42)
    x, b = randn((200_003,), dtype, g), randn((200_003,), dtype, g)
    for k in (1, 999, 200_003):
        assert ops.kth_largest_abs(x.cuda(), k, b.cuda()) == exact_kth(x, k, b)
    B, C, A = fsvd_inputs(3, 50, 8, 40, torch.float32, g)
    _, s_cpu, _ = ops.factored_svd_batched(B, C, A, rank=4)
    U, s_gpu, Vh = ops.factored_svd_batched(B.cuda(), C.cuda(), A.cuda(), rank=4)
    assert U.is_cuda and torch.allclose(s_gpu.cpu(), s_cpu, rtol=1e-5, atol=1e-5 * float(s_cpu.max()))


@cuda
@needs_cuda
def test_cuda_opcheck():
    xs = [torch.randn(2, 37, device="cuda") for _ in range(3)]
    w = torch.rand(2, 3, device="cuda")
    torch.library.opcheck(torch.ops.ckptreg.weighted_sum.default, (xs, w, None))
    keys = [rng.signed64(rng.dare_key(1, "x", i)) for i in range(3)]
    torch.library.opcheck(
        torch.ops.ckptreg.task_merge.default,
        (xs[0], xs, [1.0, 0.5, 2.0], "dare", "total", 0.5, None, keys, 1.0, 3, None),
    )
    torch.library.opcheck(torch.ops.ckptreg.kth_largest_abs.default, (xs[0], 5, None))

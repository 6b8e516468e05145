"""task_merge's two kernel settings (issue 12): sparsify none/trim/dare x consensus
none/total/frequency, defined once for the CPU and CUDA kernels (csrc/common/merge.h). A method
name is a row of ops.KERNEL_SETTINGS; every pair of settings, not only the five named ones, runs on
every backend against a float64 reference, and the compiled op's schema takes the settings."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from ckptreg import ops, rng
from ckptreg.errors import ParameterError

HAS_CPP = ops.available()["cpp"]
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="ckptreg._C (C++ kernels) not built")
BACKENDS = ["python"] + (["cpp"] if HAS_CPP else [])
PAIRS = list(itertools.product(ops.SPARSIFY, ops.CONSENSUS))
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
DENSITY = 0.35


@pytest.fixture
def use(monkeypatch):
    def _set(name):
        monkeypatch.setenv("CKPTREG_BACKEND", name)

    return _set


def _inputs(numel, dtype, seed, n=4):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)
    xs = [(base.double() + 0.1 * torch.randn(numel, generator=g, dtype=torch.float64)).to(dtype) for _ in range(n)]
    w = [0.5 + 0.25 * i for i in range(n)]
    keys = [rng.dare_key(77, "model.layers.3.mlp.weight", i) for i in range(n)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    k = int(math.floor(DENSITY * numel))
    thr = [float(torch.sort((x.to(acc) - base.to(acc)).abs(), descending=True).values[k - 1]) for x in xs]
    return base, xs, w, keys, thr


def _ref(base, xs, w, sparsify, consensus, thr, keys, lam):
    """float64 reference from the definitions in csrc/common/merge.h: (result, magnitude, margin)."""
    b = base.double()
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    taus = []
    for i, x in enumerate(xs):
        t = x.double() - b
        if sparsify == "trim":  # the trim decision is taken in the accumulation dtype
            t = torch.where((x.to(acc) - base.to(acc)).abs() >= thr[i], t, 0.0)
        elif sparsify == "dare":
            m = rng.keep_mask(keys[i], 0, t.numel(), DENSITY)
            t = torch.where(m, t / DENSITY, 0.0)
        taus.append(t)
    T = torch.stack(taus)
    W = torch.tensor(w, dtype=torch.float64)[:, None]
    if consensus == "none":
        return b + lam * (W * T).sum(0), b.abs() + abs(lam) * (W.abs() * T.abs()).sum(0), torch.full_like(b, math.inf)
    s = T.sum(0) if consensus == "total" else torch.sign(T).sum(0)
    agree = torch.sign(T) == torch.where(s >= 0, 1.0, -1.0)
    cnt = agree.sum(0).clamp_min(1)
    tm = (W * T * agree).sum(0) / cnt
    mag = (W.abs() * T.abs()).sum(0) / cnt
    exact = (consensus == "frequency") | ~(T != 0).any(0)  # sums of signs are exact
    return b + lam * tm, b.abs() + abs(lam) * mag, torch.where(exact, math.inf, s.abs())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsify,consensus", PAIRS)
def test_every_setting_pair_vs_float64(use, backend, dtype, sparsify, consensus):
    use(backend)
    base, xs, w, keys, thr = _inputs(5003, dtype, seed=PAIRS.index((sparsify, consensus)))
    odt = torch.float64 if dtype == torch.float64 else torch.float32
    got = ops.task_merge(base, xs, w, sparsify=sparsify, consensus=consensus, density=DENSITY,
                         thresholds=thr, keys=keys, lam=0.8, out_dtype=odt)
    ref, mag, margin = _ref(base, xs, w, sparsify, consensus, thr, keys, 0.8)
    # elements whose float64 election sum is within float32 rounding of 0 may elect differently
    scale = torch.stack([x.double() for x in xs]).abs().sum(0) + 1e-30
    ok = margin > (1e-12 if dtype == torch.float64 else 1e-5) * scale
    assert ok.float().mean() > 0.99
    err = float(((got.double() - ref).abs() / mag.clamp_min(1e-30))[ok].max())
    assert err <= (1e-12 if dtype == torch.float64 else 2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ops.METHODS)
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_a_method_is_its_row_of_settings(use, backend, method, sign):
    use(backend)
    base, xs, w, keys, thr = _inputs(3001, torch.float32, seed=5)
    ks = ops.KERNEL_SETTINGS[method]
    kw = dict(density=DENSITY, thresholds=thr, keys=keys, lam=1.1)
    by_name = ops.task_merge(base, xs, w, method=method, sign=sign, **kw)
    by_settings = ops.task_merge(base, xs, w, sparsify=ks.sparsify, consensus=ks.consensus(sign), **kw)
    assert torch.equal(by_name, by_settings)


def test_the_named_methods_settings():
    # the five names the engine and CLI use, as METHODS.md defines them
    table = {m: (ks.sparsify, ks.consensus("frequency")) for m, ks in ops.KERNEL_SETTINGS.items()}
    assert table == {
        "ties": ("trim", "frequency"),
        "dare_ties": ("dare", "frequency"),
        "dare_linear": ("dare", "none"),
        "magnitude_prune": ("trim", "none"),
        "task_arithmetic": ("none", "none"),
    }
    assert ops.METHODS == ("ties", "dare_ties", "dare_linear", "magnitude_prune", "task_arithmetic")


@needs_cpp
@pytest.mark.parametrize("sparsify,consensus", PAIRS)
def test_compiled_matches_fallback_every_pair(use, sparsify, consensus):
    base, xs, w, keys, thr = _inputs(20_011, torch.float32, seed=11)
    kw = dict(sparsify=sparsify, consensus=consensus, density=DENSITY, thresholds=thr, keys=keys, lam=1.3)
    use("python")
    a = ops.task_merge(base, xs, w, **kw)
    use("cpp")
    b = ops.task_merge(base, xs, w, **kw)
    _, mag, _ = _ref(base, xs, w, sparsify, consensus, thr, keys, 1.3)
    assert torch.equal(a == base, b == base)  # same kept / elected entries
    assert float(((a.double() - b.double()).abs() / mag).max()) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_setting_errors_name_the_value(use, backend):
    use(backend)
    base, xs, w, keys, thr = _inputs(100, torch.float32, seed=1)
    with pytest.raises(ParameterError, match=r"sparsify must be one of none, trim, dare, got 'ties'"):
        ops.task_merge(base, xs, w, sparsify="ties")
    with pytest.raises(ParameterError, match=r"consensus must be one of none, total, frequency, got 'majority'"):
        ops.task_merge(base, xs, w, sparsify="trim", consensus="majority", thresholds=thr)
    with pytest.raises(ParameterError, match=r"either method or sparsify/consensus, not both"):
        ops.task_merge(base, xs, w, method="ties", consensus="frequency", thresholds=thr)
    with pytest.raises(ParameterError, match=r"needs method="):
        ops.task_merge(base, xs, w)
    with pytest.raises(ParameterError, match=r"sparsify 'dare' needs keys"):
        ops.task_merge(base, xs, w, sparsify="dare", density=0.5)
    with pytest.raises(ParameterError, match=r"density must be in \(0, 1\]"):
        ops.task_merge(base, xs, w, sparsify="trim", density=0.0)


@needs_cpp
def test_op_schema_takes_the_settings():
    x = [torch.randn(2, 37) for _ in range(3)]
    keys = [rng.signed64(rng.dare_key(1, "x", i)) for i in range(3)]
    schema = str(torch.ops.ckptreg.task_merge.default._schema)
    assert "str sparsify, str consensus" in schema and "method" not in schema and "sign" not in schema
    # a method name is no longer a kernel setting: the op refuses it, naming the value
    with pytest.raises(ValueError, match=r"sparsify must be 'none', 'trim' or 'dare', got 'dare_ties'"):
        torch.ops.ckptreg.task_merge(x[0], x, [1.0, 1.0, 1.0], "dare_ties", "total", 0.5, None, keys, 1.0, 0, None)
    with pytest.raises(ValueError, match=r"consensus must be 'none', 'total' or 'frequency', got 'sum'"):
        torch.ops.ckptreg.task_merge(x[0], x, [1.0, 1.0, 1.0], "none", "sum", 1.0, None, None, 1.0, 0, None)
    with pytest.raises(ValueError, match=r"sparsify 'trim' needs thresholds with 3 entries"):
        torch.ops.ckptreg.task_merge(x[0], x, [1.0, 1.0, 1.0], "trim", "none", 1.0, None, None, 1.0, 0, None)
    # pairs no named method uses go through opcheck (fake kernel, schema, autograd registration)
    opc = torch.library.opcheck
    opc(torch.ops.ckptreg.task_merge.default, (x[0], x, [1.0, 0.5, 2.0], "none", "frequency", 1.0, None, None, 0.9, 0, None))
    opc(torch.ops.ckptreg.task_merge.default, (None, x, [1.0, 0.5, 2.0], "dare", "none", 0.4, None, keys, 1.0, 5, torch.float64))
    opc(torch.ops.ckptreg.task_merge_out.default,
        (x[0], x, [1.0, 0.5, 2.0], "trim", "total", 1.0, [0.1, 0.2, 0.3], None, 1.0, 0, None, torch.empty(2, 37)))

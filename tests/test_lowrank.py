from __future__ import annotations

import math

import pytest
import torch

from ckptreg import lowrank as L
from ckptreg.errors import MismatchError, ParameterError
from helpers_ref import ref_best_rank, ref_cart_dense, ref_lora_delta


def adapters(seed, n=3, d=96, k=80, r=8, dtype=torch.float32, lead=()):
    """PEFT-shaped factors: lora_B [.., out=d, r], lora_A [.., r, in=k]."""
    g = torch.Generator().manual_seed(seed)
    Bs = [(torch.randn(lead + (d, r), generator=g) * 0.3).to(dtype) for _ in range(n)]
    As = [(torch.randn(lead + (r, k), generator=g) * 0.3).to(dtype) for _ in range(n)]
    return Bs, As


def rel(got, ref):
    return (got.double() - ref.double()).abs().max().item() / ref.double().abs().max().item()


# --------------------------------------------------------------------------- factored SVD


@pytest.mark.parametrize("d,k,R", [(96, 80, 24), (30, 200, 48), (200, 20, 32), (64, 64, 64)])
@pytest.mark.parametrize("core_kind", ["full", "diag", "none"])
def test_factored_svd_equals_dense(d, k, R, core_kind):
    g = torch.Generator().manual_seed(d + k + R)
    B = torch.randn(d, R, generator=g, dtype=torch.float64)
    A = torch.randn(R, k, generator=g, dtype=torch.float64)
    core = {"full": torch.randn(R, R, generator=g, dtype=torch.float64),
            "diag": torch.randn(R, generator=g, dtype=torch.float64), "none": None}[core_kind]
    c = core if core is None or core.dim() == 2 else torch.diag(core)
    dense = B @ A if c is None else B @ c @ A
    U, S, Vh = L.factored_svd(B, core, A)
    s_ref = torch.linalg.svdvals(dense)
    m = min(d, k, R)
    assert S.shape == (m,) and U.shape == (d, m) and Vh.shape == (m, k)
    torch.testing.assert_close(S, s_ref[:m], rtol=1e-10, atol=1e-10 * s_ref[0].item())
    torch.testing.assert_close((U * S) @ Vh, dense, rtol=1e-10, atol=1e-10 * dense.abs().max().item())
    torch.testing.assert_close(U.mT @ U, torch.eye(m, dtype=torch.float64), atol=1e-10, rtol=0)
    # truncated: the best rank-5 approximation
    U5, S5, Vh5 = L.factored_svd(B, core, A, rank=5)
    torch.testing.assert_close((U5 * S5) @ Vh5, ref_best_rank(dense, 5), rtol=1e-9,
                               atol=1e-9 * dense.abs().max().item())


def test_factored_svd_float32_and_batched():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(3, 128, 16, generator=g)
    A = torch.randn(3, 16, 100, generator=g)
    core = torch.randn(3, 16, 16, generator=g)
    U, S, Vh = L.factored_svd(B, core, A)
    assert U.dtype == torch.float32 and U.shape == (3, 128, 16)
    for i in range(3):
        dense = B[i].double() @ core[i].double() @ A[i].double()
        s = torch.linalg.svdvals(dense)
        assert rel(S[i], s[:16]) < 1e-6
        assert rel((U[i] * S[i]) @ Vh[i], dense) < 1e-6


# --------------------------------------------------------------------------- delta-space merge


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rank", [None, 3, 16, 24])
def test_lora_delta_merge_is_best_rank_approx(dtype, rank):
    Bs, As = adapters(2, dtype=dtype)
    scales = [L.lora_scale(16, 8), L.lora_scale(32, 8), L.lora_scale(8, 8)]
    coeffs = [0.2, 0.5, 0.3]
    dense = ref_lora_delta(Bs, As, scales, coeffs)
    r_out = 8 if rank is None else rank
    Bo, Ao = L.lora_delta_merge(Bs, As, scales, coeffs, rank=rank)
    assert Bo.shape == (96, r_out) and Ao.shape == (r_out, 80)
    assert Bo.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    best = ref_best_rank(dense, r_out)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel(Bo @ Ao, best) < tol
    # Eckart-Young: the residual is the tail of the spectrum
    s = torch.linalg.svdvals(dense)
    resid = torch.linalg.matrix_norm(dense - (Bo.double() @ Ao.double())).item()
    assert math.isclose(resid, s[r_out:].square().sum().sqrt().item(), rel_tol=1e-4, abs_tol=1e-5 * s[0].item())
    if rank == 24:  # full rank of the stack: exact
        assert rel(Bo @ Ao, dense) < tol


def test_lora_delta_merge_out_scale_split_and_padding():
    Bs, As = adapters(3, n=2, d=40, k=30, r=4)
    dense = ref_lora_delta(Bs, As, [2.0, 2.0], [0.5, 0.5])
    Bo, Ao = L.lora_delta_merge(Bs, As, [2.0, 2.0], [0.5, 0.5], rank=8, out_scale=2.0)
    assert rel(2.0 * (Bo @ Ao), dense) < 2e-6
    # balanced split: column norms of B equal row norms of A
    torch.testing.assert_close(Bo.norm(dim=0), Ao.norm(dim=1), rtol=1e-4, atol=1e-6)
    # rank larger than available (min(d, k, R) = 8) pads with zeros
    Bp, Ap = L.lora_delta_merge(Bs, As, [2.0, 2.0], [0.5, 0.5], rank=12)
    assert Bp.shape == (40, 12) and Ap.shape == (12, 30)
    assert (Bp[:, 8:] == 0).all() and (Ap[8:] == 0).all()
    assert rel(Bp @ Ap, dense) < 2e-6


def test_rslora_scaling():
    assert L.lora_scale(16, 8) == 2.0
    assert L.lora_scale(16, 16, use_rslora=True) == 4.0
    assert L.lora_scale(16, 8, use_rslora=True) == pytest.approx(16 / math.sqrt(8))
    Bs, As = adapters(4, n=2, r=8)
    s_rs = [L.lora_scale(16, 8, True), L.lora_scale(16, 8, True)]
    s_pl = [L.lora_scale(16, 8), L.lora_scale(16, 8)]
    Bo, Ao = L.lora_delta_merge(Bs, As, s_rs, [0.5, 0.5], rank=16)
    assert rel(Bo @ Ao, ref_lora_delta(Bs, As, s_rs, [0.5, 0.5])) < 2e-6
    Bq, Aq = L.lora_delta_merge(Bs, As, s_pl, [0.5, 0.5], rank=16)
    assert rel(Bo @ Ao, (Bq @ Aq) * math.sqrt(8)) < 2e-6


def test_lora_delta_merge_mixed_ranks():
    Bs1, As1 = adapters(5, n=1, r=4)
    Bs2, As2 = adapters(6, n=1, r=12)
    Bs, As = Bs1 + Bs2, As1 + As2
    Bo, Ao = L.lora_delta_merge(Bs, As, [1.0, 0.5], [1.0, 1.0])
    assert Bo.shape[1] == 12  # default: the largest input rank
    assert rel(Bo @ Ao, ref_best_rank(ref_lora_delta(Bs, As, [1.0, 0.5], [1.0, 1.0]), 12)) < 2e-6


def test_lora_delta_merge_batched_matches_per_layer():
    Bs, As = adapters(7, n=3, d=64, k=48, r=4, lead=(5,))
    scales, coeffs = [1.0, 2.0, 0.5], [0.3, 0.3, 0.4]
    Bo, Ao = L.lora_delta_merge_batched(Bs, As, scales, coeffs, rank=6)
    Bt, At = L.lora_delta_merge(Bs, As, scales, coeffs, rank=6, use_ops=False)
    assert Bo.shape == (5, 64, 6) and Ao.shape == (5, 6, 48)
    assert rel(Bo @ Ao, Bt @ At) < 1e-5
    for layer in range(5):
        dense = ref_lora_delta([b[layer] for b in Bs], [a[layer] for a in As], scales, coeffs)
        assert rel(Bo[layer] @ Ao[layer], ref_best_rank(dense, 6)) < 1e-5  # ops kernels: all float32


def test_lora_delta_merge_uses_ops_when_present():
    ops = pytest.importorskip("ckptreg.ops")
    if not hasattr(ops, "factored_svd_batched"):
        pytest.skip("ckptreg.ops has no factored_svd_batched yet")
    Bs, As = adapters(8, n=2, d=32, k=24, r=4, lead=(3,))
    Bo, Ao = L.lora_delta_merge(Bs, As, [1.0, 1.0], [0.5, 0.5], rank=8, use_ops=True)
    Bt, At = L.lora_delta_merge(Bs, As, [1.0, 1.0], [0.5, 0.5], rank=8, use_ops=False)
    assert rel(Bo @ Ao, Bt @ At) < 1e-5


# --------------------------------------------------------------------------- CART


@pytest.mark.parametrize("rho", [0.01, 0.08, 1.0])
@pytest.mark.parametrize("weights", [None, [0.1, 0.2, 0.3, 0.4]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cart_lowrank_equals_dense_cart(rho, weights, dtype):
    Bs, As = adapters(9, n=4, d=120, k=100, r=8, dtype=dtype)
    scales = [2.0, 1.0, 0.5, 1.5]
    updates = [ref_lora_delta([b], [a], [s], [1.0]) for b, a, s in zip(Bs, As, scales)]
    ref = ref_cart_dense(updates, weights, rho, lam=1.7)
    got = L.cart_lowrank(Bs, As, scales, weights, rho, 1.7, dense=True)
    assert rel(got, ref) <= 1e-5
    Bo, Ao = L.cart_lowrank(Bs, As, scales, weights, rho, 1.7)
    assert Bo.shape == (120, 32) and Ao.shape == (32, 100)  # exact: rank <= R = 32
    assert rel(Bo @ Ao, ref) <= 1e-5
    # compressed to rank 8: the best rank-8 approximation of the CART update
    B8, A8 = L.cart_lowrank(Bs, As, scales, weights, rho, 1.7, out_rank=8, out_scale=0.5)
    assert rel(0.5 * (B8 @ A8), ref_best_rank(ref, 8)) <= 1e-5


def test_cart_lowrank_batched():
    Bs, As = adapters(10, n=3, d=50, k=40, r=4, lead=(2,))
    scales = [1.0, 1.0, 1.0]
    got = L.cart_lowrank(Bs, As, scales, None, 0.1, 1.5, dense=True)
    for layer in range(2):
        updates = [ref_lora_delta([b[layer]], [a[layer]], [1.0], [1.0]) for b, a in zip(Bs, As)]
        assert rel(got[layer], ref_cart_dense(updates, None, 0.1, 1.5)) <= 1e-5


def test_cart_uniform_full_rank_is_the_average():
    # k >= rank(C_i) keeps every C_i, and uniform centred updates sum to zero
    Bs, As = adapters(11, n=3, d=30, k=30, r=4)
    updates = [ref_lora_delta([b], [a], [1.0], [1.0]) for b, a in zip(Bs, As)]
    avg = sum(updates) / 3
    assert rel(L.cart_lowrank(Bs, As, [1.0] * 3, None, 1.0, 2.0, dense=True), avg) < 1e-6
    assert rel(L.cart_dense(updates, None, 1.0, 2.0), avg) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cart_dense_vs_reference(dtype):
    g = torch.Generator().manual_seed(12)
    base = torch.randn(70, 90, generator=g)
    mats = [(base + 0.1 * torch.randn(70, 90, generator=g)).to(dtype) for _ in range(3)]
    got = L.cart_dense(mats, [0.5, 0.3, 0.2], 0.08, 1.5)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel(got, ref_cart_dense(mats, [0.5, 0.3, 0.2], 0.08, 1.5)) < (1e-12 if dtype == torch.float64 else 1e-5)
    # non-matrices end up as the weighted average
    vecs = [m[0] for m in mats]
    assert rel(L.cart_dense(vecs, [0.5, 0.3, 0.2]), ref_cart_dense(vecs, [0.5, 0.3, 0.2])) < 1e-6


def test_cart_dense_randomized_close_to_exact():
    g = torch.Generator().manual_seed(13)
    base = torch.randn(200, 150, generator=g)
    u = torch.randn(200, 5, generator=g)
    v = torch.randn(5, 150, generator=g)
    mats = []
    for _ in range(3):  # fine-tunes differing in a shared rank-5 subspace + small noise
        c = torch.randn(5, generator=g)
        mats.append(base + 0.1 * (u * c) @ v + 1e-5 * torch.randn(200, 150, generator=g))
    exact = L.cart_dense(mats, None, 0.05, 1.5)   # k = 7 >= rank 5 of the centred updates
    approx = L.cart_dense(mats, None, 0.05, 1.5, svd="randomized", n_iter=3)
    assert rel(approx, exact) < 1e-3


# --------------------------------------------------------------------------- randomized SVD


def test_randomized_svd_exact_on_low_rank_and_batched_and_seeded():
    g = torch.Generator().manual_seed(14)
    M = torch.randn(4, 300, 5, generator=g, dtype=torch.float64) @ torch.randn(4, 5, 200, generator=g, dtype=torch.float64)
    U, S, Vh = L.randomized_svd(M, 5, seed=3)
    assert U.shape == (4, 300, 5) and S.shape == (4, 5) and Vh.shape == (4, 5, 200)
    torch.testing.assert_close(S, torch.linalg.svdvals(M)[..., :5], rtol=1e-9, atol=0)
    torch.testing.assert_close((U * S.unsqueeze(-2)) @ Vh, M, rtol=1e-9, atol=1e-9 * M.abs().max().item())
    U2, S2, _ = L.randomized_svd(M, 5, seed=3)
    assert torch.equal(S, S2) and torch.equal(U, U2)


def test_randomized_svd_decaying_spectrum():
    g = torch.Generator().manual_seed(15)
    q1, _ = torch.linalg.qr(torch.randn(400, 100, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(300, 100, generator=g))
    s = 0.7 ** torch.arange(100, dtype=torch.float32)
    M = (q1 * s) @ q2.T
    _, S, _ = L.randomized_svd(M, 10, n_iter=2)
    assert rel(S, s[:10]) < 1e-4


# --------------------------------------------------------------------------- errors


def test_lowrank_errors():
    Bs, As = adapters(16, n=2, d=20, k=10, r=4)
    with pytest.raises(MismatchError, match="disagree on r"):
        L.lora_delta_merge([Bs[0], Bs[1]], [As[0], As[1][:3]], [1, 1], [1, 1])
    with pytest.raises(MismatchError, match="update shape"):
        L.lora_delta_merge([Bs[0], Bs[1][:10]], As, [1, 1], [1, 1])
    with pytest.raises(ParameterError, match="2 adapters but 1 scales"):
        L.lora_delta_merge(Bs, As, [1], [1, 1])
    with pytest.raises(ParameterError, match="rank must be a positive integer"):
        L.lora_delta_merge(Bs, As, [1, 1], [1, 1], rank=0)
    with pytest.raises(ParameterError, match="coefficients 1 is nan"):
        L.lora_delta_merge(Bs, As, [1, 1], [1, float("nan")])
    for rho in (0.0, 1.5, float("nan")):
        with pytest.raises(ParameterError, match=r"rank_ratio must be in \(0, 1\]"):
            L.cart_lowrank(Bs, As, [1, 1], None, rho, 1.0)
    with pytest.raises(ParameterError, match="lambda must be finite"):
        L.cart_lowrank(Bs, As, [1, 1], None, 0.1, float("inf"))
    with pytest.raises(ParameterError, match="lambda must be finite"):
        L.cart_dense([torch.zeros(3, 3)], None, 0.1, float("nan"))
    with pytest.raises(MismatchError, match="shape"):
        L.cart_dense([torch.zeros(3, 3), torch.zeros(3, 4)])
    with pytest.raises(ParameterError, match="exceeds"):
        L.randomized_svd(torch.zeros(5, 4), 5)
    with pytest.raises(ParameterError, match="LoRA rank"):
        L.lora_scale(16, 0)
    with pytest.raises(ParameterError, match="svd must be"):
        L.cart_dense([torch.zeros(3, 3)], svd="fast")

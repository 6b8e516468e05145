// CPU implementations of the ckptreg ops: argument checks, output allocation, then the torch-free
// OpenMP kernels of kernels.cpp. Thread count = at::get_num_threads() (torch.set_num_threads).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/binding.h"
#include "kernels.h"

namespace ckptreg {
namespace {

using namespace binding;

at::Tensor& weighted_sum_out_cpu(at::TensorList inputs, const at::Tensor& weights,
                                 c10::optional<at::ScalarType> out_dtype, at::Tensor& out) {
  check_inputs(inputs, c10::DeviceType::CPU);
  const at::Tensor& x0 = inputs[0];
  const int64_t n = (int64_t)inputs.size();
  check_weights(weights, n, x0);
  const int64_t m = weights.size(0);
  check_out(out, stacked_shape(m, x0.sizes()), x0, out_dtype);
  std::vector<const void*> ptrs(n);
  for (int64_t i = 0; i < n; ++i) ptrs[i] = inputs[i].const_data_ptr();
  const bool ok = cpu::weighted_sum(ptrs.data(), n, to_dtype(x0.scalar_type(), "inputs"),
                                    weights.const_data_ptr<float>(), m, out.mutable_data_ptr(),
                                    to_dtype(out.scalar_type(), "out"), x0.numel(),
                                    at::get_num_threads());
  TORCH_CHECK(ok, "ckptreg: weighted_sum kernel rejected its arguments");
  return out;
}

at::Tensor& task_merge_out_cpu(const c10::optional<at::Tensor>& base, at::TensorList inputs,
                               at::ArrayRef<double> weights, c10::string_view sparsify,
                               c10::string_view consensus, double density,
                               c10::optional<at::ArrayRef<double>> thresholds,
                               c10::optional<at::ArrayRef<int64_t>> keys, double lam, int64_t offset,
                               c10::optional<at::ScalarType> out_dtype, at::Tensor& out) {
  MergeArgs a = check_merge_args(base, inputs, weights, sparsify, consensus, density, thresholds, keys,
                                 lam, offset, c10::DeviceType::CPU);
  const at::Tensor& x0 = inputs[0];
  check_out(out, x0.sizes(), x0, out_dtype);
  const int64_t n = (int64_t)inputs.size();
  std::vector<const void*> ptrs(n);
  for (int64_t i = 0; i < n; ++i) ptrs[i] = inputs[i].const_data_ptr();
  std::vector<uint64_t> ukeys;
  if (keys.has_value())
    for (int64_t k : *keys) ukeys.push_back((uint64_t)k);
  a.weights = weights.data();
  a.thresholds = thresholds.has_value() ? thresholds->data() : nullptr;
  a.keys = ukeys.empty() ? nullptr : ukeys.data();
  const bool ok = cpu::task_merge(base.has_value() ? base->const_data_ptr() : nullptr, ptrs.data(),
                                  n, to_dtype(x0.scalar_type(), "inputs"), a, out.mutable_data_ptr(),
                                  to_dtype(out.scalar_type(), "out"), x0.numel(),
                                  at::get_num_threads());
  TORCH_CHECK(ok, "ckptreg: task_merge kernel rejected its arguments");
  return out;
}

at::Tensor kth_largest_abs_cpu(const at::Tensor& x, int64_t k, const c10::optional<at::Tensor>& base) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "ckptreg: x must be a CPU tensor");
  TORCH_CHECK_VALUE(x.is_contiguous(), "ckptreg: x is not contiguous");
  const DType dt = to_dtype(x.scalar_type(), "x");
  if (base.has_value()) check_same(*base, x, "base");
  TORCH_CHECK_VALUE(k >= 1 && k <= x.numel(), "ckptreg: k must be in [1, ", x.numel(), "], got ", k);
  const double r = cpu::kth_largest_abs(x.const_data_ptr(),
                                        base.has_value() ? base->const_data_ptr() : nullptr, dt,
                                        x.numel(), k, at::get_num_threads());
  return at::scalar_tensor(r, x.options().dtype(acc_type(x.scalar_type())));
}

// Above this R the R x R steps go to LAPACK (eigh, gesdd through ATen) after the kernel's Grams: the
// Jacobi solvers of fsvd.cpp cost O(R^3) per sweep per layer and lose to divide and conquer there.
// Measured on a 2-core AVX-512 machine, d = k = 1024: 8 layers at R = 96 took 34 ms in the kernel and
// 22 ms this way; 32 layers at R = 64 take 30 ms in the kernel and 41 ms this way (R = 65).
// The kernel (cpu::factored_svd_cores) refuses R above this bound.
constexpr int64_t kLaneJacobiMaxR = cpu::kFactoredSvdCoresMaxN;

// G = X^T X (float64, [L, n, n]): W, P with G = W^T W and X P orthonormal, by eigendecomposition,
// dropping eigenvalues <= 64 n eps lambda_max (as _gram_factor_py in ckptreg/ops.py).
std::pair<at::Tensor, at::Tensor> gram_factor_eigh(const at::Tensor& G) {
  auto eig = at::linalg_eigh(G);
  const at::Tensor& lam = std::get<0>(eig);
  const at::Tensor& V = std::get<1>(eig);
  const int64_t n = G.size(-1);
  const at::Tensor lmax = std::get<0>(lam.max(-1, /*keepdim=*/true)).clamp_min(0.0);
  const at::Tensor keep = lam > lmax * (64.0 * (double)n * 2.220446049250313e-16);
  const at::Tensor sq = at::where(keep, lam.clamp_min(0.0).sqrt(), at::zeros_like(lam));
  const at::Tensor inv = at::where(keep, 1.0 / at::where(keep, sq, at::ones_like(sq)), at::zeros_like(lam));
  return {sq.unsqueeze(-1) * V.mT(), V * inv.unsqueeze(-2)};
}

// P_B U_c, S, P_A V_c for R > kLaneJacobiMaxR: the kernel's float64 Grams, then the same math as the
// Python fallback (layers with NaN/inf get NaN outputs).
std::tuple<at::Tensor, at::Tensor, at::Tensor> large_rank_cores(const at::Tensor& Bc, const at::Tensor& Cc,
                                                                const at::Tensor& Ac, at::ScalarType st) {
  const int64_t L = Bc.size(0), d = Bc.size(1), R = Bc.size(2), k = Ac.size(2);
  auto o64 = Bc.options().dtype(at::kDouble);
  at::Tensor GB = at::empty({L, R, R}, o64), GA = at::empty({L, R, R}, o64);
  const bool ok = cpu::factored_svd_grams(Bc.const_data_ptr(), Ac.const_data_ptr(), st == at::kDouble ? kF64 : kF32,
                                          L, d, (int)R, k, GB.mutable_data_ptr<double>(),
                                          GA.mutable_data_ptr<double>(), at::get_num_threads());
  TORCH_CHECK(ok, "ckptreg: factored_svd_batched kernel rejected its arguments");
  at::Tensor Cd = Cc.to(at::kDouble);
  const at::Tensor bad = at::isfinite(GB).flatten(1).all(1).logical_and(at::isfinite(GA).flatten(1).all(1))
                             .logical_and(at::isfinite(Cd).flatten(1).all(1)).logical_not();
  const bool any_bad = bad.any().item<bool>();
  const at::Tensor sel = bad.view({L, 1, 1});
  if (any_bad) {
    const at::Tensor eye = at::eye(R, o64);
    GB = at::where(sel, eye, GB);
    GA = at::where(sel, eye, GA);
    Cd = at::where(sel, eye, Cd);
  }
  auto fb = gram_factor_eigh(GB);
  auto fa = gram_factor_eigh(GA);
  auto svd = at::linalg_svd(at::matmul(at::matmul(fb.first, Cd), fa.first.mT()), /*full_matrices=*/false);
  at::Tensor PB = at::matmul(fb.second, std::get<0>(svd));
  at::Tensor PA = at::matmul(fa.second, std::get<2>(svd).mT());
  at::Tensor S = std::get<1>(svd);
  if (any_bad) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    PB = PB.masked_fill(sel, nan);
    PA = PA.masked_fill(sel, nan);
    S = S.masked_fill(bad.view({L, 1}), nan);
  }
  return {PB, S, PA};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> factored_svd_batched_cpu(
    const at::Tensor& B_, const at::Tensor& core_, const at::Tensor& A_, c10::optional<int64_t> rank) {
  check_factored_svd_args(B_, core_, A_, rank);
  const int64_t L = B_.size(0), d = B_.size(1), R = B_.size(2), k = A_.size(2);
  const auto dt = acc_type(B_.scalar_type());
  int64_t r = std::min(std::min(d, k), R);
  if (rank.has_value()) r = std::min(r, *rank);
  if (L == 0 || R == 0 || d == 0 || k == 0) {
    auto o = B_.options().dtype(dt);
    return {at::zeros({L, d, r}, o), at::zeros({L, r}, o), at::zeros({L, r, k}, o)};
  }
  // float32 (or float64) storage of the factors; bf16/f16 inputs are widened once (exact)
  const auto st = dt == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor Bc = B_.to(st).contiguous(), Ac = A_.to(st).contiguous(), Cc = core_.to(st).contiguous();
  TORCH_CHECK_VALUE(R <= 4096, "ckptreg: factored_svd_batched supports R <= 4096, got ", R);
  auto o64 = B_.options().dtype(at::kDouble);
  at::Tensor PB, PA, S;
  if (R <= kLaneJacobiMaxR) {
    // float64 Grams, their factors and the small SVDs, L layers in one threaded kernel call
    PB = at::empty({L, R, R}, o64);
    PA = at::empty({L, R, R}, o64);
    S = at::empty({L, R}, o64);
    const bool ok = cpu::factored_svd_cores(Bc.const_data_ptr(), Cc.const_data_ptr(), Ac.const_data_ptr(),
                                            st == at::kDouble ? kF64 : kF32, L, d, (int)R, k,
                                            PB.mutable_data_ptr<double>(), PA.mutable_data_ptr<double>(),
                                            S.mutable_data_ptr<double>(), at::get_num_threads());
    TORCH_CHECK(ok, "ckptreg: factored_svd_batched kernel rejected its arguments (L=", L, ", d=", d, ", R=", R,
                ", k=", k, "; the lane kernel takes R <= ", kLaneJacobiMaxR, ")");
  } else {
    std::tie(PB, S, PA) = large_rank_cores(Bc, Cc, Ac, st);
  }
  at::Tensor PBr = PB.narrow(-1, 0, r), PAr = PA.narrow(-1, 0, r);
  at::Tensor U, Vh;
  if (dt == at::kDouble) {
    U = at::matmul(Bc, PBr);
    Vh = at::matmul(PAr.mT(), Ac);
  } else {
    U = at::matmul(Bc, PBr.to(dt));
    Vh = at::matmul(PAr.mT().to(dt), Ac);
  }
  return {U.contiguous(), S.narrow(-1, 0, r).to(dt).contiguous(), Vh.contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckptreg, CPU, m) {
  m.impl("weighted_sum", &weighted_sum_functional<&weighted_sum_out_cpu, c10::DeviceType::CPU>);
  m.impl("weighted_sum_out", &weighted_sum_out_op<&weighted_sum_out_cpu>);
  m.impl("task_merge", &task_merge_functional<&task_merge_out_cpu, c10::DeviceType::CPU>);
  m.impl("task_merge_out", &task_merge_out_op<&task_merge_out_cpu>);
  m.impl("kth_largest_abs", &kth_largest_abs_cpu);
  m.impl("factored_svd_batched", &factored_svd_batched_cpu);
}

}  // namespace ckptreg

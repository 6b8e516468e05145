// Helpers shared by the CPU and CUDA torch bindings: argument checks with clear messages, the
// ScalarType -> ckptreg::DType mapping, output allocation, and the device-agnostic batched
// factored SVD (one batched ATen call per step).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "dtype.h"
#include "merge.h"

namespace ckptreg {
namespace binding {

inline DType to_dtype(at::ScalarType st, const char* what) {
  switch (st) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default:
      TORCH_CHECK_TYPE(false, "ckptreg: ", what, " has dtype ", st,
                       "; supported: float32, float16, bfloat16, float64");
  }
  return kF32;
}

// inputs non-empty, same shape/dtype/device, contiguous, on `device_type`
inline void check_inputs(const at::TensorList& inputs, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(!inputs.empty(), "ckptreg: inputs is empty");
  const at::Tensor& x0 = inputs[0];
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor& x = inputs[i];
    TORCH_CHECK_VALUE(x.sizes() == x0.sizes(), "ckptreg: inputs[", i, "] has shape ", x.sizes(),
                      " but inputs[0] has ", x0.sizes());
    TORCH_CHECK_TYPE(x.scalar_type() == x0.scalar_type(), "ckptreg: inputs[", i, "] has dtype ",
                     x.scalar_type(), " but inputs[0] has ", x0.scalar_type());
    TORCH_CHECK_VALUE(x.device() == x0.device(), "ckptreg: inputs[", i, "] is on ", x.device(),
                      " but inputs[0] is on ", x0.device());
    TORCH_CHECK_VALUE(x.device().type() == device_type, "ckptreg: inputs[", i, "] is on ",
                      x.device(), ", expected a ", device_type, " tensor");
    TORCH_CHECK_VALUE(x.is_contiguous(), "ckptreg: inputs[", i,
                      "] is not contiguous (the Python wrapper makes a contiguous copy)");
  }
  to_dtype(x0.scalar_type(), "inputs[0]");
}

inline void check_same(const at::Tensor& t, const at::Tensor& x0, const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == x0.sizes(), "ckptreg: ", what, " has shape ", t.sizes(),
                    " but inputs have ", x0.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x0.scalar_type(), "ckptreg: ", what, " has dtype ",
                   t.scalar_type(), " but inputs have ", x0.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x0.device(), "ckptreg: ", what, " is on ", t.device(),
                    " but inputs are on ", x0.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), "ckptreg: ", what, " is not contiguous");
}

inline void check_weights(const at::Tensor& w, int64_t n, const at::Tensor& x0) {
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == n, "ckptreg: weights must have shape [M, ", n,
                    "], got ", w.sizes());
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, "ckptreg: weights must be float32, got ",
                   w.scalar_type());
  TORCH_CHECK_VALUE(w.device() == x0.device(), "ckptreg: weights are on ", w.device(),
                    " but inputs are on ", x0.device());
  TORCH_CHECK_VALUE(w.is_contiguous(), "ckptreg: weights are not contiguous");
}

inline std::vector<int64_t> stacked_shape(int64_t m, at::IntArrayRef shape) {
  std::vector<int64_t> s;
  s.reserve(shape.size() + 1);
  s.push_back(m);
  s.insert(s.end(), shape.begin(), shape.end());
  return s;
}

inline void check_out(const at::Tensor& out, at::IntArrayRef shape, const at::Tensor& x0,
                      c10::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK_VALUE(out.sizes() == shape, "ckptreg: out has shape ", out.sizes(), ", expected ",
                    shape);
  TORCH_CHECK_VALUE(out.device() == x0.device(), "ckptreg: out is on ", out.device(),
                    " but inputs are on ", x0.device());
  TORCH_CHECK_VALUE(out.is_contiguous(), "ckptreg: out is not contiguous");
  if (out_dtype.has_value())
    TORCH_CHECK_TYPE(out.scalar_type() == *out_dtype, "ckptreg: out has dtype ", out.scalar_type(),
                     " but out_dtype is ", *out_dtype);
  to_dtype(out.scalar_type(), "out");
}

// "none" | "trim" | "dare" and "none" | "total" | "frequency" (common/merge.h) -> the settings
inline Sparsify sparsify_setting(c10::string_view s) {
  const int i = setting_index(kSparsifyNames, kNumSparsify, s.data(), s.size());
  TORCH_CHECK_VALUE(i >= 0, "ckptreg: sparsify must be 'none', 'trim' or 'dare', got '", std::string(s), "'");
  return (Sparsify)i;
}

inline Consensus consensus_setting(c10::string_view s) {
  const int i = setting_index(kConsensusNames, kNumConsensus, s.data(), s.size());
  TORCH_CHECK_VALUE(i >= 0, "ckptreg: consensus must be 'none', 'total' or 'frequency', got '", std::string(s),
                    "'");
  return (Consensus)i;
}

// Checks every task_merge argument against the settings and returns the kernels' MergeArgs with
// sparsify, consensus, density, lam and offset filled in (the arrays are the backend's business:
// host pointers on the CPU, device copies on CUDA).
inline MergeArgs check_merge_args(const c10::optional<at::Tensor>& base, const at::TensorList& inputs,
                                  at::ArrayRef<double> weights, c10::string_view sparsify,
                                  c10::string_view consensus, double density,
                                  const c10::optional<at::ArrayRef<double>>& thresholds,
                                  const c10::optional<at::ArrayRef<int64_t>>& keys, double lam,
                                  int64_t offset, c10::DeviceType dev) {
  MergeArgs a{};
  a.sparsify = sparsify_setting(sparsify);
  a.consensus = consensus_setting(consensus);
  a.density = density;
  a.lam = lam;
  a.offset = offset;
  check_inputs(inputs, dev);
  const int64_t n = (int64_t)inputs.size();
  if (base.has_value()) check_same(*base, inputs[0], "base");
  TORCH_CHECK_VALUE((int64_t)weights.size() == n, "ckptreg: weights must have ", n,
                    " entries, got ", weights.size());
  TORCH_CHECK_VALUE(offset >= 0, "ckptreg: offset must be >= 0, got ", offset);
  if (a.sparsify != Sparsify::kNone)
    TORCH_CHECK_VALUE(density > 0.0 && density <= 1.0, "ckptreg: density must be in (0, 1], got ",
                      density);
  if (a.trim()) {
    TORCH_CHECK_VALUE(thresholds.has_value() && (int64_t)thresholds->size() == n,
                      "ckptreg: sparsify 'trim' needs thresholds with ", n, " entries");
  }
  if (a.use_mask()) {
    TORCH_CHECK_VALUE(keys.has_value() && (int64_t)keys->size() == n,
                      "ckptreg: sparsify 'dare' with density < 1 needs keys with ", n, " entries");
  }
  return a;
}

inline at::ScalarType acc_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// The functional op and the schema's void out= op of weighted_sum and task_merge, built from a
// backend's `at::Tensor& ..._out(..., at::Tensor& out)` (which checks everything and fills out).
using WeightedSumOut = at::Tensor& (*)(at::TensorList, const at::Tensor&, c10::optional<at::ScalarType>,
                                       at::Tensor&);
using TaskMergeOut = at::Tensor& (*)(const c10::optional<at::Tensor>&, at::TensorList, at::ArrayRef<double>,
                                     c10::string_view, c10::string_view, double,
                                     c10::optional<at::ArrayRef<double>>, c10::optional<at::ArrayRef<int64_t>>,
                                     double, int64_t, c10::optional<at::ScalarType>, at::Tensor&);

template <WeightedSumOut Out, c10::DeviceType Dev>
at::Tensor weighted_sum_functional(at::TensorList inputs, const at::Tensor& weights,
                                   c10::optional<at::ScalarType> out_dtype) {
  check_inputs(inputs, Dev);
  const at::Tensor& x0 = inputs[0];
  check_weights(weights, (int64_t)inputs.size(), x0);
  at::Tensor out = at::empty(stacked_shape(weights.size(0), x0.sizes()),
                             x0.options().dtype(out_dtype.value_or(x0.scalar_type())));
  Out(inputs, weights, out_dtype, out);
  return out;
}

template <WeightedSumOut Out>
void weighted_sum_out_op(at::TensorList inputs, const at::Tensor& weights, c10::optional<at::ScalarType> out_dtype,
                         at::Tensor& out) {
  Out(inputs, weights, out_dtype, out);
}

template <TaskMergeOut Out, c10::DeviceType Dev>
at::Tensor task_merge_functional(const c10::optional<at::Tensor>& base, at::TensorList inputs,
                                 at::ArrayRef<double> weights, c10::string_view sparsify,
                                 c10::string_view consensus, double density,
                                 c10::optional<at::ArrayRef<double>> thresholds,
                                 c10::optional<at::ArrayRef<int64_t>> keys, double lam, int64_t offset,
                                 c10::optional<at::ScalarType> out_dtype) {
  check_inputs(inputs, Dev);
  const at::Tensor& x0 = inputs[0];
  at::Tensor out = at::empty(x0.sizes(), x0.options().dtype(out_dtype.value_or(x0.scalar_type())));
  Out(base, inputs, weights, sparsify, consensus, density, thresholds, keys, lam, offset, out_dtype, out);
  return out;
}

template <TaskMergeOut Out>
void task_merge_out_op(const c10::optional<at::Tensor>& base, at::TensorList inputs, at::ArrayRef<double> weights,
                       c10::string_view sparsify, c10::string_view consensus, double density,
                       c10::optional<at::ArrayRef<double>> thresholds, c10::optional<at::ArrayRef<int64_t>> keys,
                       double lam, int64_t offset, c10::optional<at::ScalarType> out_dtype, at::Tensor& out) {
  Out(base, inputs, weights, sparsify, consensus, density, thresholds, keys, lam, offset, out_dtype, out);
}

// Exact thin SVD of B @ core @ A for a batch of layers (see ckptreg/ops.py).
// Argument checks of factored_svd_batched, shared by the CPU and CUDA routes.
inline void check_factored_svd_args(const at::Tensor& B_, const at::Tensor& core_, const at::Tensor& A_,
                                    c10::optional<int64_t> rank) {
  TORCH_CHECK_VALUE(B_.dim() == 3 && core_.dim() == 3 && A_.dim() == 3,
                    "ckptreg: factored_svd_batched wants B[L,d,R], core[L,R,R], A[L,R,k]");
  const int64_t L = B_.size(0), R = B_.size(2);
  TORCH_CHECK_VALUE(core_.size(0) == L && core_.size(1) == R && core_.size(2) == R,
                    "ckptreg: core must be [", L, ", ", R, ", ", R, "], got ", core_.sizes());
  TORCH_CHECK_VALUE(A_.size(0) == L && A_.size(1) == R, "ckptreg: A must be [", L, ", ", R,
                    ", k], got ", A_.sizes());
  TORCH_CHECK_TYPE(B_.scalar_type() == core_.scalar_type() && B_.scalar_type() == A_.scalar_type(),
                   "ckptreg: B, core and A must share a dtype");
  TORCH_CHECK_VALUE(B_.device() == core_.device() && B_.device() == A_.device(),
                    "ckptreg: B, core and A must be on one device");
  if (rank.has_value()) TORCH_CHECK_VALUE(*rank >= 1, "ckptreg: rank must be >= 1, got ", *rank);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> factored_svd_batched(
    const at::Tensor& B_, const at::Tensor& core_, const at::Tensor& A_, c10::optional<int64_t> rank) {
  check_factored_svd_args(B_, core_, A_, rank);
  const auto dt = acc_type(to_dtype(B_.scalar_type(), "B") == kF64 ? at::kDouble : at::kFloat);
  at::Tensor B = B_.to(dt), core = core_.to(dt), A = A_.to(dt);
  auto qrb = at::linalg_qr(B, "reduced");
  auto qra = at::linalg_qr(A.mT(), "reduced");
  const at::Tensor& qb = std::get<0>(qrb);
  const at::Tensor& rb = std::get<1>(qrb);
  const at::Tensor& qa = std::get<0>(qra);
  const at::Tensor& ra = std::get<1>(qra);
  at::Tensor small = at::matmul(at::matmul(rb, core), ra.mT());
  auto svd = at::linalg_svd(small, /*full_matrices=*/false);
  at::Tensor U = at::matmul(qb, std::get<0>(svd));
  at::Tensor S = std::get<1>(svd);
  at::Tensor Vh = at::matmul(std::get<2>(svd), qa.mT());
  if (rank.has_value() && *rank < S.size(-1)) {
    U = U.narrow(-1, 0, *rank);
    S = S.narrow(-1, 0, *rank);
    Vh = Vh.narrow(-2, 0, *rank);
  }
  return {U.contiguous(), S.contiguous(), Vh.contiguous()};
}

}  // namespace binding
}  // namespace ckptreg

// CUDA implementations of the ckptreg ops: checks, device guard, current stream, dtype mapping,
// and the small per-call argument arrays (input pointers, weights, thresholds, keys) copied to
// the device; the kernels themselves are plain CUDA in *.cu (launch.h). factored_svd_batched
// runs batched ATen linalg on the CUDA tensors (one call per step for all layers).
//
// NOTE: compile-checked only in the development environment (no GPU there); see tests marked
// @pytest.mark.cuda for the checks a GPU session runs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../common/binding.h"
#include "launch.h"

namespace ckptreg {
namespace {

using namespace binding;

#define CKPTREG_CUDA_CHECK(expr)                                                         \
  do {                                                                                   \
    cudaError_t _e = (expr);                                                             \
    TORCH_CHECK(_e == cudaSuccess, "ckptreg CUDA kernel failed: ", cudaGetErrorString(_e)); \
  } while (0)

// Host values -> a device tensor (int64 / float64 payload), on the current stream.
template <typename T>
at::Tensor to_device(const std::vector<T>& host, at::ScalarType st, const at::Device& dev) {
  static_assert(sizeof(T) == 8, "8-byte payloads only");
  at::Tensor h = at::empty({(int64_t)host.size()}, at::TensorOptions().dtype(st).pinned_memory(true));
  if (!host.empty()) std::memcpy(h.data_ptr(), host.data(), host.size() * sizeof(T));
  return h.to(dev, /*non_blocking=*/true);
}

at::Tensor input_pointers(at::TensorList inputs, const at::Device& dev, bool* aligned) {
  std::vector<int64_t> p(inputs.size());
  bool al = true;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const void* ptr = inputs[i].const_data_ptr();
    p[i] = (int64_t)reinterpret_cast<uintptr_t>(ptr);
    al = al && (reinterpret_cast<uintptr_t>(ptr) % 16 == 0);
  }
  if (aligned) *aligned = al;
  return to_device(p, at::kLong, dev);
}

at::Tensor& weighted_sum_out_cuda(at::TensorList inputs, const at::Tensor& weights,
                                  c10::optional<at::ScalarType> out_dtype, at::Tensor& out) {
  check_inputs(inputs, c10::DeviceType::CUDA);
  const at::Tensor& x0 = inputs[0];
  const int64_t n = (int64_t)inputs.size();
  check_weights(weights, n, x0);
  const int64_t m = weights.size(0);
  check_out(out, stacked_shape(m, x0.sizes()), x0, out_dtype);
  const c10::cuda::CUDAGuard guard(x0.device());
  bool aligned = true;
  at::Tensor ptrs = input_pointers(inputs, x0.device(), &aligned);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x0.device().index()).stream();
  CKPTREG_CUDA_CHECK(cuda::weighted_sum(reinterpret_cast<const void* const*>(ptrs.const_data_ptr()), n,
                                        to_dtype(x0.scalar_type(), "inputs"),
                                        weights.const_data_ptr<float>(), m, out.mutable_data_ptr(),
                                        to_dtype(out.scalar_type(), "out"), x0.numel(), aligned, stream));
  return out;
}

at::Tensor& task_merge_out_cuda(const c10::optional<at::Tensor>& base, at::TensorList inputs,
                                at::ArrayRef<double> weights, c10::string_view sparsify,
                                c10::string_view consensus, double density,
                                c10::optional<at::ArrayRef<double>> thresholds,
                                c10::optional<at::ArrayRef<int64_t>> keys, double lam, int64_t offset,
                                c10::optional<at::ScalarType> out_dtype, at::Tensor& out) {
  MergeArgs a = check_merge_args(base, inputs, weights, sparsify, consensus, density, thresholds, keys,
                                 lam, offset, c10::DeviceType::CUDA);
  const at::Tensor& x0 = inputs[0];
  check_out(out, x0.sizes(), x0, out_dtype);
  const int64_t n = (int64_t)inputs.size();
  const c10::cuda::CUDAGuard guard(x0.device());
  const at::Device dev = x0.device();
  at::Tensor ptrs = input_pointers(inputs, dev, nullptr);
  at::Tensor w = to_device(std::vector<double>(weights.begin(), weights.end()), at::kDouble, dev);
  at::Tensor thr, ks;
  if (thresholds.has_value())
    thr = to_device(std::vector<double>(thresholds->begin(), thresholds->end()), at::kDouble, dev);
  if (keys.has_value())
    ks = to_device(std::vector<int64_t>(keys->begin(), keys->end()), at::kLong, dev);
  a.weights = w.const_data_ptr<double>();
  a.thresholds = thr.defined() ? thr.const_data_ptr<double>() : nullptr;
  a.keys = ks.defined() ? reinterpret_cast<const uint64_t*>(ks.const_data_ptr<int64_t>()) : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  CKPTREG_CUDA_CHECK(cuda::task_merge(base.has_value() ? base->const_data_ptr() : nullptr,
                                      reinterpret_cast<const void* const*>(ptrs.const_data_ptr()), n,
                                      to_dtype(x0.scalar_type(), "inputs"), a, out.mutable_data_ptr(),
                                      to_dtype(out.scalar_type(), "out"), x0.numel(), stream));
  return out;
}

at::Tensor kth_largest_abs_cuda(const at::Tensor& x, int64_t k, const c10::optional<at::Tensor>& base) {
  TORCH_CHECK_VALUE(x.device().is_cuda(), "ckptreg: x must be a CUDA tensor");
  TORCH_CHECK_VALUE(x.is_contiguous(), "ckptreg: x is not contiguous");
  const DType dt = to_dtype(x.scalar_type(), "x");
  if (base.has_value()) check_same(*base, x, "base");
  TORCH_CHECK_VALUE(k >= 1 && k <= x.numel(), "ckptreg: k must be in [1, ", x.numel(), "], got ", k);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor ws = at::empty({(int64_t)((cuda::kth_workspace_bytes() + 7) / 8)}, x.options().dtype(at::kLong));
  at::Tensor result = at::empty({}, x.options().dtype(acc_type(x.scalar_type())));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  CKPTREG_CUDA_CHECK(cuda::kth_largest_abs(x.const_data_ptr(),
                                           base.has_value() ? base->const_data_ptr() : nullptr, dt,
                                           x.numel(), k, ws.mutable_data_ptr(),
                                           result.mutable_data_ptr(), stream));
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> factored_svd_batched_cuda(
    const at::Tensor& B, const at::Tensor& core, const at::Tensor& A, c10::optional<int64_t> rank) {
  const c10::cuda::CUDAGuard guard(B.device());
  return binding::factored_svd_batched(B, core, A, rank);
}

}  // namespace

TORCH_LIBRARY_IMPL(ckptreg, CUDA, m) {
  m.impl("weighted_sum", &weighted_sum_functional<&weighted_sum_out_cuda, c10::DeviceType::CUDA>);
  m.impl("weighted_sum_out", &weighted_sum_out_op<&weighted_sum_out_cuda>);
  m.impl("task_merge", &task_merge_functional<&task_merge_out_cuda, c10::DeviceType::CUDA>);
  m.impl("task_merge_out", &task_merge_out_op<&task_merge_out_cuda>);
  m.impl("kth_largest_abs", &kth_largest_abs_cuda);
  m.impl("factored_svd_batched", &factored_svd_batched_cuda);
}

}  // namespace ckptreg

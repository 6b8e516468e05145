// Launch functions of the CUDA kernels: plain C++ over raw device pointers and a cudaStream_t,
// no torch headers (the torch side is ops_cuda_binding.cpp). Each returns a cudaError_t.
#pragma once
#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "../common/dtype.h"
#include "../common/merge.h"

namespace ckptreg {
namespace cuda {

// out[m * numel + j] = sum_n w[m * n + i] * inputs[i][j]; `inputs` is a DEVICE array of n
// device pointers, `w` a device float array [m, n]. float32 accumulation (float64 for kF64).
// `inputs_aligned`: every input pointer is 16-byte aligned (enables the 16-byte vector loads).
cudaError_t weighted_sum(const void* const* inputs, int64_t n, DType in_dtype, const float* w,
                         int64_t m, void* out, DType out_dtype, int64_t numel, bool inputs_aligned,
                         cudaStream_t stream);

// The settings and arguments of task_merge (sparsify x consensus): common/merge.h, shared with the
// CPU kernels; here weights, thresholds and keys are device arrays.
using ckptreg::Consensus;
using ckptreg::MergeArgs;
using ckptreg::Sparsify;

// Fused task-vector merge; base may be null (zeros). `inputs`: device array of n device pointers.
// cudaErrorInvalidValue when merge_args_problem(args) is not null.
cudaError_t task_merge(const void* base, const void* const* inputs, int64_t n, DType in_dtype,
                       const MergeArgs& args, void* out, DType out_dtype, int64_t numel,
                       cudaStream_t stream);

// Bytes of device workspace kth_largest_abs needs.
size_t kth_workspace_bytes();

// Exact k-th largest |x - base| (1 <= k <= numel) by radix select (8-bit digits, block-shared
// histograms, no host synchronisation). Writes one float (kF32/kF16/kBF16) or double (kF64) to
// `result` (device). `workspace`: kth_workspace_bytes() bytes of device memory.
cudaError_t kth_largest_abs(const void* x, const void* base, DType dtype, int64_t numel, int64_t k,
                            void* workspace, void* result, cudaStream_t stream);

}  // namespace cuda
}  // namespace ckptreg

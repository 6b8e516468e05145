// Torch-free CPU kernels of ckptreg (OpenMP). The torch bindings live in ops_cpu.cpp; the native
// tests (CMake/ctest) link these directly. All tensors are dense, contiguous, same length.
#pragma once
#include <stdint.h>

#include "../common/dtype.h"
#include "../common/merge.h"

namespace ckptreg {
namespace cpu {

// out[m * numel + j] = sum_n w[m * n_inputs + n] * inputs[n][j] for m < n_out, accumulated in
// float32 (float64 when in_dtype is kF64). Each input element is read once for all outputs.
// Returns false on an unsupported dtype code.
bool weighted_sum(const void* const* inputs, int64_t n_inputs, DType in_dtype, const float* w,
                  int64_t n_out, void* out, DType out_dtype, int64_t numel, int nthreads);

// The settings and arguments of task_merge (sparsify x consensus): common/merge.h, shared with CUDA.
using ckptreg::Consensus;
using ckptreg::MergeArgs;
using ckptreg::Sparsify;

// Fused task-vector merge (see common/merge.h and ckptreg/ops.py task_merge). base may be null
// (zeros). Returns false on an unsupported dtype or when merge_args_problem(args) is not null.
bool task_merge(const void* base, const void* const* inputs, int64_t n_inputs, DType in_dtype,
                const MergeArgs& args, void* out, DType out_dtype, int64_t numel, int nthreads);

// Exact k-th largest |x - base| (1 <= k <= numel) by radix select over the float bits: 2 passes
// for 16/32-bit inputs (computed in float32), 4 for float64. base may be null.
double kth_largest_abs(const void* x, const void* base, DType dtype, int64_t numel, int64_t k,
                       int nthreads);

// Factored-SVD core step for L layers (see fsvd_impl.inc): from B_l (d x n), C_l (n x n) and A_l
// (n x k), all row-major kF32 or kF64, writes pb[l], pa[l] (n x n, float64) and s[l] (n, descending)
// with B_l C_l A_l = (B_l pb_l) diag(s_l) (A_l^T pa_l)^T, B_l pb_l and A_l^T pa_l orthonormal (zero
// columns where a factor is rank deficient). The Gram matrices are formed in float64.
// Returns false on an unsupported dtype or size, n > kFactoredSvdCoresMaxN included (callers with a
// larger n take factored_svd_grams and do the n x n steps themselves, as ops_cpu.cpp does).
constexpr int kFactoredSvdCoresMaxN = 64;
bool factored_svd_cores(const void* B, const void* C, const void* A, DType dtype, int64_t L, int64_t d, int n,
                        int64_t k, double* pb, double* pa, double* s, int nthreads);

// Only the float64 Grams gb[l] = B_l^T B_l and ga[l] = A_l A_l^T (n x n) of factored_svd_cores.
bool factored_svd_grams(const void* B, const void* A, DType dtype, int64_t L, int64_t d, int n, int64_t k,
                        double* gb, double* ga, int nthreads);

// Which instruction set the kernels dispatch to on this machine ("avx512", "avx2" or "baseline"),
// and the same as a level: 2, 1, 0.
const char* isa();
int isa_level();

}  // namespace cpu
}  // namespace ckptreg

// Factored truncated SVD, everything but the final thin products (torch-free): see fsvd_impl.inc.
// The binding (ops_cpu.cpp) forms U = B P_B and Vh = P_A^T A with ATen's BLAS.
// Like kernels.cpp, the body is compiled for AVX-512, AVX2+FMA and the baseline ISA and picked at
// run time; CKPTREG_CPU_ISA=avx2|baseline caps the choice.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(CKPTREG_NO_AVX2)
#define CKPTREG_HAVE_AVX2_CLONE 1
#endif

namespace ckptreg {
namespace cpu {

#if CKPTREG_HAVE_AVX2_CLONE
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace fsvd_avx2 {
#define CKPTREG_FSVD_LANES 4
#include "fsvd_impl.inc"
#undef CKPTREG_FSVD_LANES
}  // namespace fsvd_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")
namespace fsvd_avx512 {
#define CKPTREG_FSVD_LANES 8
#include "fsvd_impl.inc"
#undef CKPTREG_FSVD_LANES
}  // namespace fsvd_avx512
#pragma GCC pop_options
#endif

namespace fsvd_base {
#define CKPTREG_FSVD_LANES 2
#include "fsvd_impl.inc"
#undef CKPTREG_FSVD_LANES
}  // namespace fsvd_base

bool factored_svd_cores(const void* B, const void* C, const void* A, DType dtype, int64_t L, int64_t d, int n,
                        int64_t k, double* pb, double* pa, double* s, int nthreads) {
  if ((dtype != kF32 && dtype != kF64) || L < 0 || d < 1 || n < 1 || n > kFactoredSvdCoresMaxN || k < 1) return false;
  const bool f64 = dtype == kF64;
  nthreads = std::max(1, nthreads);
#if CKPTREG_HAVE_AVX2_CLONE
  const int level = isa_level();
  if (level >= 2) return fsvd_avx512::fsvd_any(B, C, A, f64, L, d, n, k, pb, pa, s, nthreads), true;
  if (level == 1) return fsvd_avx2::fsvd_any(B, C, A, f64, L, d, n, k, pb, pa, s, nthreads), true;
#endif
  fsvd_base::fsvd_any(B, C, A, f64, L, d, n, k, pb, pa, s, nthreads);
  return true;
}

bool factored_svd_grams(const void* B, const void* A, DType dtype, int64_t L, int64_t d, int n, int64_t k,
                        double* gb, double* ga, int nthreads) {
  if ((dtype != kF32 && dtype != kF64) || L < 0 || d < 1 || n < 1 || k < 1) return false;
  const bool f64 = dtype == kF64;
  nthreads = std::max(1, nthreads);
#if CKPTREG_HAVE_AVX2_CLONE
  const int level = isa_level();
  if (level >= 2) return fsvd_avx512::grams_any(B, A, f64, L, d, n, k, gb, ga, nthreads), true;
  if (level == 1) return fsvd_avx2::grams_any(B, A, f64, L, d, n, k, gb, ga, nthreads), true;
#endif
  fsvd_base::grams_any(B, A, f64, L, d, n, k, gb, ga, nthreads);
  return true;
}

}  // namespace cpu
}  // namespace ckptreg

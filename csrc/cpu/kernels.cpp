// CPU kernels (torch-free). The bodies in kernels_impl.inc are compiled three times: for AVX-512
// (F/BW/VL/DQ), for AVX2+FMA+F16C and for the baseline ISA; the entry points pick one at run time
// with __builtin_cpu_supports (CKPTREG_CPU_ISA=avx2|baseline caps the choice),
// so the build needs no -march flag and runs on any x86-64 (and non-x86 builds use baseline).
#include "kernels.h"

// The bodies use 64-byte GCC vectors in every ISA namespace, only inside always-inlined helpers
// of one translation unit; GCC's note that passing them differs between ISAs (-Wpsabi) is moot.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <omp.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>  // the AVX/AVX-512 intrinsics are usable inside the target regions below
#endif

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "../common/rng.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(CKPTREG_NO_AVX2)
#define CKPTREG_HAVE_AVX2_CLONE 1
#endif

namespace ckptreg {
namespace cpu {

#if CKPTREG_HAVE_AVX2_CLONE
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CKPTREG_ISA_LEVEL 1
namespace avx2 {
#include "kernels_impl.inc"
}  // namespace avx2
#undef CKPTREG_ISA_LEVEL
#pragma GCC pop_options
#endif

#if CKPTREG_HAVE_AVX2_CLONE
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define CKPTREG_ISA_LEVEL 2
namespace avx512 {
#include "kernels_impl.inc"
}  // namespace avx512
#undef CKPTREG_ISA_LEVEL
#pragma GCC pop_options
#endif

#define CKPTREG_ISA_LEVEL 0
namespace base {
#include "kernels_impl.inc"
}  // namespace base
#undef CKPTREG_ISA_LEVEL

static bool use_avx512() {
#if CKPTREG_HAVE_AVX2_CLONE
  static const bool ok = [] {
    const char* env = getenv("CKPTREG_CPU_ISA");
    if (env && (strcmp(env, "baseline") == 0 || strcmp(env, "avx2") == 0)) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

static bool use_avx2() {
#if CKPTREG_HAVE_AVX2_CLONE
  static const bool ok = [] {
    const char* env = getenv("CKPTREG_CPU_ISA");
    if (env && strcmp(env, "baseline") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

static bool valid(DType d) { return d == kF32 || d == kF16 || d == kBF16 || d == kF64; }

const char* isa() { return use_avx512() ? "avx512" : (use_avx2() ? "avx2" : "baseline"); }
int isa_level() { return use_avx512() ? 2 : (use_avx2() ? 1 : 0); }

bool weighted_sum(const void* const* inputs, int64_t n, DType in_dt, const float* w, int64_t m,
                  void* out, DType out_dt, int64_t numel, int nthreads) {
  if (!valid(in_dt) || !valid(out_dt) || n < 1 || m < 0 || numel < 0) return false;
  if (nthreads < 1) nthreads = 1;
#if CKPTREG_HAVE_AVX2_CLONE
  if (use_avx512()) {
    avx512::weighted_sum_any(inputs, n, in_dt, w, m, out, out_dt, numel, nthreads);
    return true;
  }
  if (use_avx2()) {
    avx2::weighted_sum_any(inputs, n, in_dt, w, m, out, out_dt, numel, nthreads);
    return true;
  }
#endif
  base::weighted_sum_any(inputs, n, in_dt, w, m, out, out_dt, numel, nthreads);
  return true;
}

bool task_merge(const void* basep, const void* const* inputs, int64_t n, DType in_dt,
                const MergeArgs& a, void* out, DType out_dt, int64_t numel, int nthreads) {
  if (!valid(in_dt) || !valid(out_dt) || n < 1 || numel < 0) return false;
  if (merge_args_problem(a)) return false;
  if (nthreads < 1) nthreads = 1;
#if CKPTREG_HAVE_AVX2_CLONE
  if (use_avx512()) {
    avx512::task_merge_any(basep, inputs, n, in_dt, a, out, out_dt, numel, nthreads);
    return true;
  }
  if (use_avx2()) {
    avx2::task_merge_any(basep, inputs, n, in_dt, a, out, out_dt, numel, nthreads);
    return true;
  }
#endif
  base::task_merge_any(basep, inputs, n, in_dt, a, out, out_dt, numel, nthreads);
  return true;
}

double kth_largest_abs(const void* x, const void* basep, DType dt, int64_t numel, int64_t k,
                       int nthreads) {
  if (!valid(dt) || k < 1 || k > numel) return -1.0;
  if (nthreads < 1) nthreads = 1;
#if CKPTREG_HAVE_AVX2_CLONE
  if (use_avx512()) return avx512::kth_any(x, basep, dt, numel, k, nthreads);
  if (use_avx2()) return avx2::kth_any(x, basep, dt, numel, k, nthreads);
#endif
  return base::kth_any(x, basep, dt, numel, k, nthreads);
}

}  // namespace cpu
}  // namespace ckptreg

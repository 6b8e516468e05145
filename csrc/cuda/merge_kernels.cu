// CUDA kernels: weighted_sum (16-byte vector loads, grid-stride, float32 accumulation, up to 8
// outputs per pass over the inputs) and the fused task_merge (sparsify none/trim/dare x consensus
// none/total/frequency, common/merge.h; DARE masks from the counter-based RNG of common/rng.h, identical to the CPU ones).
// Plain CUDA: no torch headers.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../common/dtype.h"
#include "../common/rng.h"
#include "launch.h"

namespace ckptreg {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxOutPerPass = 8;

template <typename T>
struct alignas(16) Vec16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

inline int grid_for(int64_t work, cudaStream_t) {
  int dev = 0, sms = 80;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  int64_t blocks = (work + kThreads - 1) / kThreads;
  int64_t cap = (int64_t)sms * 8;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return (int)blocks;
}

// Vectorised: each thread handles 16-byte vectors of every input; `mc` (<= 8) outputs starting
// at m0 are accumulated in registers, so each input vector is loaded once per pass.
template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads) weighted_sum_vec_kernel(
    const void* const* __restrict__ inputs, int64_t n, const float* __restrict__ w, int64_t m_total,
    int64_t m0, int mc, Out* __restrict__ out, int64_t numel) {
  typedef typename Conv<In>::acc Acc;
  constexpr int V = Vec16<In>::N;
  const int64_t nvec = numel / V;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    Acc acc[kMaxOutPerPass][V];
#pragma unroll
    for (int r = 0; r < kMaxOutPerPass; ++r)
#pragma unroll
      for (int e = 0; e < V; ++e) acc[r][e] = (Acc)0;
    for (int64_t i = 0; i < n; ++i) {
      const Vec16<In> x = reinterpret_cast<const Vec16<In>*>(inputs[i])[v];
      Acc xf[V];
#pragma unroll
      for (int e = 0; e < V; ++e) xf[e] = Conv<In>::load(x.v[e]);
#pragma unroll
      for (int r = 0; r < kMaxOutPerPass; ++r) {
        if (r < mc) {
          const Acc wv = (Acc)__ldg(w + (m0 + r) * n + i);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[r][e] += wv * xf[e];
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kMaxOutPerPass; ++r) {
      if (r < mc) {
        Out* o = out + (m0 + r) * numel + v * V;
#pragma unroll
        for (int e = 0; e < V; ++e) o[e] = Conv<Out>::from(acc[r][e]);
      }
    }
  }
  (void)m_total;
}

// Scalar: elements [start, numel) (the tail after the vectors, or everything when the pointers
// are not 16-byte aligned).
template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads) weighted_sum_scalar_kernel(
    const void* const* __restrict__ inputs, int64_t n, const float* __restrict__ w, int64_t m0,
    int mc, Out* __restrict__ out, int64_t start, int64_t numel) {
  typedef typename Conv<In>::acc Acc;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t j = start + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < numel; j += stride) {
    Acc acc[kMaxOutPerPass];
#pragma unroll
    for (int r = 0; r < kMaxOutPerPass; ++r) acc[r] = (Acc)0;
    for (int64_t i = 0; i < n; ++i) {
      const Acc x = Conv<In>::load(reinterpret_cast<const In*>(inputs[i])[j]);
#pragma unroll
      for (int r = 0; r < kMaxOutPerPass; ++r)
        if (r < mc) acc[r] += (Acc)__ldg(w + (m0 + r) * n + i) * x;
    }
#pragma unroll
    for (int r = 0; r < kMaxOutPerPass; ++r)
      if (r < mc) out[(m0 + r) * numel + j] = Conv<Out>::from(acc[r]);
  }
}

template <typename In, typename Out>
cudaError_t weighted_sum_t(const void* const* inputs, int64_t n, const float* w, int64_t m,
                           Out* out, int64_t numel, bool aligned, cudaStream_t stream) {
  constexpr int V = Vec16<In>::N;
  const int64_t nvec = aligned ? numel / V : 0;
  const int64_t tail_start = nvec * V;
  for (int64_t m0 = 0; m0 < m; m0 += kMaxOutPerPass) {
    const int mc = (int)((m - m0) < kMaxOutPerPass ? (m - m0) : kMaxOutPerPass);
    if (nvec > 0) {
      weighted_sum_vec_kernel<In, Out><<<grid_for(nvec, stream), kThreads, 0, stream>>>(
          inputs, n, w, m, m0, mc, out, numel);
    }
    if (tail_start < numel) {
      weighted_sum_scalar_kernel<In, Out><<<grid_for(numel - tail_start, stream), kThreads, 0, stream>>>(
          inputs, n, w, m0, mc, out, tail_start, numel);
    }
  }
  return cudaGetLastError();
}

// ---- task_merge --------------------------------------------------------------------------
constexpr int kCache = 16;  // trimmed task vectors of the first kCache inputs stay in registers

template <typename In>
__device__ __forceinline__ typename Conv<In>::acc trimmed(
    const void* const* __restrict__ inputs, int64_t i, int64_t j, typename Conv<In>::acc bj,
    const MergeArgs& a, bool trim, bool use_mask, uint32_t thr24) {
  typedef typename Conv<In>::acc Acc;
  Acc v = Conv<In>::load(reinterpret_cast<const In*>(inputs[i])[j]) - bj;
  if (trim) {
    const Acc thr = (Acc)a.thresholds[i];
    const Acc av = v < (Acc)0 ? -v : v;
    v = av >= thr ? v : (Acc)0;
  } else if (use_mask) {
    const bool k = rng::bits24(a.keys[i], (uint64_t)(a.offset + j)) < thr24;
    v = k ? v : (Acc)0;
  }
  return v;
}

template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads) task_merge_kernel(
    const In* __restrict__ base, const void* const* __restrict__ inputs, int64_t n, MergeArgs a,
    Out* __restrict__ out, int64_t numel) {
  typedef typename Conv<In>::acc Acc;
  const bool dare = a.dare();
  const bool trim = a.trim();
  const bool ties = a.elect();  // a sign election (TIES consensus)
  const bool freq = a.frequency();
  const bool use_mask = a.use_mask();
  const uint32_t thr24 = dare ? rng::threshold24(a.density) : 0u;
  const Acc scale = dare ? (Acc)(1.0 / a.density) : (Acc)1;
  const Acc lam = (Acc)a.lam;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < numel; j += stride) {
    const Acc bj = base ? Conv<In>::load(base[j]) : (Acc)0;
    Acc res;
    if (ties) {
      Acc tc[kCache];
      Acc s = (Acc)0;
      for (int64_t i = 0; i < n; ++i) {
        const Acc t = trimmed<In>(inputs, i, j, bj, a, trim, use_mask, thr24);
        if (i < kCache) tc[i] = t;
        if (!freq) s += t;
        else s += (t > (Acc)0 ? (Acc)1 : (Acc)0) - (t < (Acc)0 ? (Acc)1 : (Acc)0);
      }
      const bool pos = s >= (Acc)0;
      Acc num = (Acc)0, cnt = (Acc)0;
      for (int64_t i = 0; i < n; ++i) {
        const Acc t = i < kCache ? tc[i] : trimmed<In>(inputs, i, j, bj, a, trim, use_mask, thr24);
        const bool ag = pos ? t > (Acc)0 : t < (Acc)0;
        const Acc sv = t * scale;
        num += ag ? sv * (Acc)a.weights[i] : (Acc)0;
        cnt += ag ? (Acc)1 : (Acc)0;
      }
      const Acc c = cnt > (Acc)1 ? cnt : (Acc)1;
      res = bj + (num / c) * lam;
    } else {
      Acc num = (Acc)0;
      for (int64_t i = 0; i < n; ++i) {
        const Acc t = trimmed<In>(inputs, i, j, bj, a, trim, use_mask, thr24);
        num += (t * scale) * (Acc)a.weights[i];
      }
      res = bj + num * lam;
    }
    out[j] = Conv<Out>::from(res);
  }
}

}  // namespace

cudaError_t weighted_sum(const void* const* inputs, int64_t n, DType in_dtype, const float* w,
                         int64_t m, void* out, DType out_dtype, int64_t numel, bool aligned,
                         cudaStream_t stream) {
  if (n < 1 || m < 0 || numel < 0) return cudaErrorInvalidValue;
  if (numel == 0 || m == 0) return cudaSuccess;
  cudaError_t err = cudaErrorInvalidValue;
  CKPTREG_DISPATCH(in_dtype, TI, CKPTREG_DISPATCH(out_dtype, TO,
      err = weighted_sum_t<TI, TO>(inputs, n, w, m, static_cast<TO*>(out), numel, aligned, stream)));
  return err;
}

cudaError_t task_merge(const void* base, const void* const* inputs, int64_t n, DType in_dtype,
                       const MergeArgs& args, void* out, DType out_dtype, int64_t numel,
                       cudaStream_t stream) {
  if (n < 1 || numel < 0 || merge_args_problem(args)) return cudaErrorInvalidValue;
  if (numel == 0) return cudaSuccess;
  cudaError_t err = cudaErrorInvalidValue;
  CKPTREG_DISPATCH(in_dtype, TI, CKPTREG_DISPATCH(out_dtype, TO, {
    task_merge_kernel<TI, TO><<<grid_for(numel, stream), kThreads, 0, stream>>>(
        static_cast<const TI*>(base), inputs, n, args, static_cast<TO*>(out), numel);
    err = cudaGetLastError();
  }));
  return err;
}

}  // namespace cuda
}  // namespace ckptreg

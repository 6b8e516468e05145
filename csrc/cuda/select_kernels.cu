// CUDA radix select for kth_largest_abs: the exact k-th largest |x - base| without sorting or
// copying x. Non-negative floats order like their bit patterns, so the answer is found one 8-bit
// digit at a time (4 passes for float32 keys, 8 for float64): each pass builds a block-shared
// 256-bin histogram of the elements that match the prefix found so far, a one-block kernel picks
// the digit, and everything stays on the device (no host synchronisation). Plain CUDA.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../common/dtype.h"
#include "launch.h"

namespace ckptreg {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBins = 256;

struct SelectState {
  unsigned long long prefix;
  unsigned long long pmask;
  long long k;  // rank still wanted inside the current prefix (1-based)
  long long pad;
  unsigned long long hist[kBins];
};

template <typename In>
__device__ __forceinline__ unsigned long long key_bits(const In* x, const In* base, int64_t j) {
  typedef typename Conv<In>::acc Acc;
  Acc v = Conv<In>::load(x[j]);
  if (base) v = v - Conv<In>::load(base[j]);
  if (sizeof(Acc) == 4) {
    return (unsigned long long)(f32_bits((float)v) & 0x7FFFFFFFu);
  } else {
    return (unsigned long long)__double_as_longlong((double)v) & 0x7FFFFFFFFFFFFFFFull;
  }
}

template <typename In>
__global__ void __launch_bounds__(kThreads) hist_kernel(const In* __restrict__ x,
                                                        const In* __restrict__ base, int64_t numel,
                                                        int shift, SelectState* st) {
  __shared__ unsigned int h[kBins];
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) h[b] = 0u;
  __syncthreads();
  const unsigned long long prefix = st->prefix, pmask = st->pmask;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < numel; j += stride) {
    const unsigned long long u = key_bits<In>(x, base, j);
    if ((u & pmask) == prefix) atomicAdd(&h[(u >> shift) & 0xFF], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += blockDim.x)
    if (h[b]) atomicAdd(&st->hist[b], (unsigned long long)h[b]);
}

__global__ void pick_kernel(SelectState* st, int shift) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  long long above = 0;
  int bin = kBins - 1;
  for (; bin > 0; --bin) {
    const long long c = (long long)st->hist[bin];
    if (above + c >= st->k) break;
    above += c;
  }
  st->k -= above;
  st->prefix |= (unsigned long long)bin << shift;
  st->pmask |= 0xFFull << shift;
  for (int b = 0; b < kBins; ++b) st->hist[b] = 0ull;
}

__global__ void init_kernel(SelectState* st, long long k) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  st->prefix = 0ull;
  st->pmask = 0ull;
  st->k = k;
  for (int b = 0; b < kBins; ++b) st->hist[b] = 0ull;
}

__global__ void finish_kernel(const SelectState* st, void* result, int is_double) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  if (is_double) {
    *static_cast<double*>(result) = __longlong_as_double((long long)st->prefix);
  } else {
    *static_cast<float*>(result) = bits_f32((uint32_t)st->prefix);
  }
}

template <typename In>
cudaError_t kth_t(const In* x, const In* base, int64_t numel, int64_t k, SelectState* st,
                  void* result, cudaStream_t stream) {
  typedef typename Conv<In>::acc Acc;
  const int nbits = (int)sizeof(Acc) * 8;
  int dev = 0, sms = 80;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  int64_t blocks = (numel + kThreads - 1) / kThreads;
  if (blocks > (int64_t)sms * 4) blocks = (int64_t)sms * 4;
  if (blocks < 1) blocks = 1;
  init_kernel<<<1, 1, 0, stream>>>(st, (long long)k);
  for (int shift = nbits - 8; shift >= 0; shift -= 8) {
    hist_kernel<In><<<(int)blocks, kThreads, 0, stream>>>(x, base, numel, shift, st);
    pick_kernel<<<1, 1, 0, stream>>>(st, shift);
  }
  finish_kernel<<<1, 1, 0, stream>>>(st, result, sizeof(Acc) == 8 ? 1 : 0);
  return cudaGetLastError();
}

}  // namespace

size_t kth_workspace_bytes() { return sizeof(SelectState); }

cudaError_t kth_largest_abs(const void* x, const void* base, DType dtype, int64_t numel, int64_t k,
                            void* workspace, void* result, cudaStream_t stream) {
  if (k < 1 || k > numel || !workspace || !result) return cudaErrorInvalidValue;
  SelectState* st = static_cast<SelectState*>(workspace);
  cudaError_t err = cudaErrorInvalidValue;
  CKPTREG_DISPATCH(dtype, TI,
      err = kth_t<TI>(static_cast<const TI*>(x), static_cast<const TI*>(base), numel, k, st, result, stream));
  return err;
}

}  // namespace cuda
}  // namespace ckptreg

// Native CUDA tests (ctest, -DCKPTREG_CUDA=ON): the CUDA kernels against the CPU core on random
// data. Exits 77 (ctest "skipped") when no CUDA device is present.
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>

#include <random>
#include <vector>

#include "common/rng.h"
#include "cpu/kernels.h"
#include "cuda/launch.h"

using namespace ckptreg;

#define CK(x)                                                                  \
  do {                                                                         \
    cudaError_t e = (x);                                                       \
    if (e != cudaSuccess) {                                                    \
      fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); \
      return 1;                                                                \
    }                                                                          \
  } while (0)

int main() {
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    printf("no CUDA device: skipped\n");
    return 77;
  }
  const int64_t numel = 1000003, n = 5, m = 3;
  std::mt19937 g(3);
  std::normal_distribution<float> d;
  std::vector<std::vector<float>> xs(n, std::vector<float>(numel));
  for (auto& x : xs)
    for (auto& v : x) v = d(g);
  std::vector<float> w(m * n);
  for (auto& v : w) v = d(g);
  std::vector<void*> dptr(n);
  for (int64_t i = 0; i < n; ++i) {
    CK(cudaMalloc(&dptr[i], numel * 4));
    CK(cudaMemcpy(dptr[i], xs[i].data(), numel * 4, cudaMemcpyHostToDevice));
  }
  void** dptrs;
  float *dw, *dout;
  CK(cudaMalloc(&dptrs, n * sizeof(void*)));
  CK(cudaMemcpy(dptrs, dptr.data(), n * sizeof(void*), cudaMemcpyHostToDevice));
  CK(cudaMalloc(&dw, m * n * 4));
  CK(cudaMemcpy(dw, w.data(), m * n * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&dout, m * numel * 4));
  CK(cuda::weighted_sum((const void* const*)dptrs, n, kF32, dw, m, dout, kF32, numel, true, 0));
  std::vector<float> got(m * numel), ref(m * numel);
  CK(cudaMemcpy(got.data(), dout, m * numel * 4, cudaMemcpyDeviceToHost));
  std::vector<const void*> hp;
  for (auto& x : xs) hp.push_back(x.data());
  cpu::weighted_sum(hp.data(), n, kF32, w.data(), m, ref.data(), kF32, numel, 2);
  int failures = 0;
  for (int64_t j = 0; j < m * numel; ++j)
    if (fabsf(got[j] - ref[j]) > 1e-5f * (1.0f + fabsf(ref[j]))) ++failures;
  // DARE masks: dare_linear CUDA vs CPU, identical
  double wd[5] = {1, 1, 1, 1, 1};
  uint64_t keys[5];
  for (int i = 0; i < 5; ++i) keys[i] = rng::dare_key(9, "t", 1, i);
  double* dwd;
  uint64_t* dkeys;
  CK(cudaMalloc(&dwd, sizeof(wd)));
  CK(cudaMalloc(&dkeys, sizeof(keys)));
  CK(cudaMemcpy(dwd, wd, sizeof(wd), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dkeys, keys, sizeof(keys), cudaMemcpyHostToDevice));
  cuda::MergeArgs ca{Sparsify::kDare, Consensus::kNone, 0.4, 1.0, 123, dwd, nullptr, dkeys};
  CK(cuda::task_merge(nullptr, (const void* const*)dptrs, n, kF32, ca, dout, kF32, numel, 0));
  CK(cudaMemcpy(got.data(), dout, numel * 4, cudaMemcpyDeviceToHost));
  cpu::MergeArgs a{Sparsify::kDare, Consensus::kNone, 0.4, 1.0, 123, wd, nullptr, keys};
  cpu::task_merge(nullptr, hp.data(), n, kF32, a, ref.data(), kF32, numel, 2);
  for (int64_t j = 0; j < numel; ++j)
    if ((got[j] == 0.0f) != (ref[j] == 0.0f) || fabsf(got[j] - ref[j]) > 1e-5f * (1.0f + fabsf(ref[j]))) ++failures;
  // kth_largest_abs
  void* ws;
  float* dres;
  CK(cudaMalloc(&ws, cuda::kth_workspace_bytes()));
  CK(cudaMalloc(&dres, 4));
  for (int64_t k : {(int64_t)1, (int64_t)777, numel}) {
    CK(cuda::kth_largest_abs(dptr[0], dptr[1], kF32, numel, k, ws, dres, 0));
    float r;
    CK(cudaMemcpy(&r, dres, 4, cudaMemcpyDeviceToHost));
    double c = cpu::kth_largest_abs(xs[0].data(), xs[1].data(), kF32, numel, k, 2);
    if ((double)r != c) {
      fprintf(stderr, "kth k=%lld: cuda %g cpu %g\n", (long long)k, r, c);
      ++failures;
    }
  }
  printf("native CUDA tests: %s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}

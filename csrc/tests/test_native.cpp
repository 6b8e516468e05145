// Native tests of the torch-free CPU core: weighted_sum against a scalar double reference for
// every dtype, odd sizes and several thread counts; the RNG against known values of
// ckptreg/rng.py; task_merge masks thread-count and chunk invariant; kth_largest_abs exact.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "common/rng.h"
#include "cpu/kernels.h"

using namespace ckptreg;

static int failures = 0;
#define EXPECT(cond, ...)                                         \
  do {                                                            \
    if (!(cond)) {                                                \
      ++failures;                                                 \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);        \
      fprintf(stderr, __VA_ARGS__);                               \
      fprintf(stderr, "\n");                                      \
    }                                                             \
  } while (0)

template <typename T>
static std::vector<T> make(int64_t n, std::mt19937_64& g) {
  std::normal_distribution<float> d;
  std::vector<T> v(n);
  for (auto& x : v) x = Conv<T>::from(d(g));
  return v;
}

template <typename T> static DType code();
template <> DType code<float>() { return kF32; }
template <> DType code<double>() { return kF64; }
template <> DType code<half_t>() { return kF16; }
template <> DType code<bf16_t>() { return kBF16; }

template <typename T>
static void test_weighted_sum(int64_t numel, int64_t n, int64_t m, int threads) {
  std::mt19937_64 g(numel * 131 + n * 7 + m);
  std::vector<std::vector<T>> xs;
  std::vector<const void*> ptrs;
  for (int64_t i = 0; i < n; ++i) xs.push_back(make<T>(numel, g));
  for (auto& x : xs) ptrs.push_back(x.data());
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> w(m * n);
  for (auto& x : w) x = u(g);
  std::vector<float> out(m * numel);
  bool ok = cpu::weighted_sum(ptrs.data(), n, code<T>(), w.data(), m, out.data(), kF32, numel, threads);
  EXPECT(ok, "weighted_sum returned false");
  double maxrel = 0;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < numel; ++j) {
      double ref = 0, mag = 0;
      for (int64_t i = 0; i < n; ++i) {
        double x = (double)Conv<T>::load(xs[i][j]);
        ref += (double)w[r * n + i] * x;
        mag += fabs((double)w[r * n + i] * x);
      }
      double err = fabs((double)out[r * numel + j] - ref) / (mag > 1e-30 ? mag : 1.0);
      maxrel = std::max(maxrel, err);
    }
  EXPECT(maxrel < 1e-6, "weighted_sum dtype %d numel %lld n %lld m %lld threads %d: rel err %g",
         (int)code<T>(), (long long)numel, (long long)n, (long long)m, threads, maxrel);
}

static void test_rng() {
  // values from ckptreg/rng.py:
  //   dare_key(42, "layer.weight", 0) and the first bits24 of that stream
  const char* name = "layer.weight";
  uint64_t key = rng::dare_key(42, name, 12, 0);
  EXPECT(key == 0xdf1d20e427126c7bULL, "dare_key mismatch: %llx",
         (unsigned long long)key);
  uint32_t b0 = rng::bits24(key, 0), b1 = rng::bits24(key, 1), b1000 = rng::bits24(key, 1000);
  EXPECT(b0 == 8877797u && b1 == 11904262u && b1000 == 13231708u,
         "bits24 mismatch: %u %u %u", b0, b1, b1000);
  EXPECT(rng::threshold24(0.3) == 5033164u, "threshold24(0.3) = %u", rng::threshold24(0.3));
  EXPECT(rng::threshold24(1.0) == 16777216u, "threshold24(1.0)");
}

static void test_conversions() {
  // every half and bfloat16 bit pattern: to float and back is the identity (NaN stays NaN)
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = f16_to_f32((uint16_t)h);
    uint16_t back = f32_to_f16(f);
    bool nan = ((h & 0x7C00) == 0x7C00) && (h & 0x3FF);
    EXPECT(nan ? ((back & 0x7C00) == 0x7C00 && (back & 0x3FF)) : back == h, "half %04x -> %g -> %04x", h, f, back);
    float fb = bf16_to_f32((uint16_t)h);
    uint16_t bb = f32_to_bf16(fb);
    bool bnan = ((h & 0x7F80) == 0x7F80) && (h & 0x7F);
    EXPECT(bnan ? (bb & 0x7FFF) > 0x7F80 : bb == h, "bf16 %04x -> %04x", h, bb);
    if (failures > 20) return;
  }
  // rounding to nearest even
  EXPECT(f32_to_f16(1.0f + 1.0f / 2048.0f) == 0x3C00, "half RNE tie down");
  EXPECT(f32_to_f16(1.0f + 3.0f / 2048.0f) == 0x3C02, "half RNE tie up");
  EXPECT(f32_to_f16(65520.0f) == 0x7C00, "half overflow -> inf");
  EXPECT(f32_to_bf16(1.0f + 1.0f / 256.0f) == 0x3F80, "bf16 RNE tie down");
}

static void test_task_merge_invariance() {
  const int64_t numel = 10007, n = 3;
  std::mt19937_64 g(5);
  std::vector<std::vector<float>> xs;
  std::vector<const void*> ptrs;
  for (int64_t i = 0; i < n; ++i) xs.push_back(make<float>(numel, g));
  for (auto& x : xs) ptrs.push_back(x.data());
  double w[3] = {1.0, 0.5, 2.0};
  uint64_t keys[3] = {rng::dare_key(7, "a", 1, 0), rng::dare_key(7, "a", 1, 1), rng::dare_key(7, "a", 1, 2)};
  for (int method = 1; method <= 2; ++method) {  // 1: dare_ties, 2: dare_linear
    const Consensus co = method == 1 ? Consensus::kTotal : Consensus::kNone;
    cpu::MergeArgs a{Sparsify::kDare, co, 0.3, 1.0, 0, w, nullptr, keys};
    std::vector<float> full(numel), chunked(numel), one(numel);
    cpu::task_merge(nullptr, ptrs.data(), n, kF32, a, full.data(), kF32, numel, 2);
    cpu::task_merge(nullptr, ptrs.data(), n, kF32, a, one.data(), kF32, numel, 1);
    // two chunks with offsets
    const int64_t cut = 3001;
    std::vector<const void*> p2;
    for (auto& x : xs) p2.push_back(x.data() + cut);
    cpu::task_merge(nullptr, ptrs.data(), n, kF32, a, chunked.data(), kF32, cut, 2);
    a.offset = cut;
    cpu::task_merge(nullptr, p2.data(), n, kF32, a, chunked.data() + cut, kF32, numel - cut, 2);
    int64_t diff = 0;
    for (int64_t j = 0; j < numel; ++j) diff += (full[j] != chunked[j]) + (full[j] != one[j]);
    EXPECT(diff == 0, "task_merge method %d: %lld elements differ across chunking/threads", method, (long long)diff);
    // dare_linear with one input and weight 1: kept elements are x * (1/density), others 0
    if (method == 2) {
      cpu::MergeArgs a1{Sparsify::kDare, Consensus::kNone, 0.3, 1.0, 0, w, nullptr, keys};
      double w1 = 1.0;
      a1.weights = &w1;
      std::vector<float> o1(numel);
      cpu::task_merge(nullptr, ptrs.data(), 1, kF32, a1, o1.data(), kF32, numel, 2);
      int64_t bad = 0, kept = 0;
      const float inv = (float)(1.0 / 0.3);
      for (int64_t j = 0; j < numel; ++j) {
        bool keep = rng::keep(keys[0], (uint64_t)j, rng::threshold24(0.3));
        kept += keep;
        float want = keep ? xs[0][j] * inv : 0.0f;
        bad += o1[j] != want;
      }
      EXPECT(bad == 0, "dare mask/rescale: %lld elements differ", (long long)bad);
      EXPECT(kept > numel / 4 && kept < numel * 7 / 20, "dare kept %lld of %lld", (long long)kept, (long long)numel);
    }
  }
}

// The settings of common/merge.h: names parse to their enum values, the kernel refuses what
// merge_args_problem refuses, and a trim + total-consensus merge (the register-tiled path) equals
// trim + frequency where every input agrees in sign.
static void test_merge_settings() {
  for (int i = 0; i < kNumSparsify; ++i)
    EXPECT(setting_index(kSparsifyNames, kNumSparsify, kSparsifyNames[i], strlen(kSparsifyNames[i])) == i,
           "sparsify name %d", i);
  for (int i = 0; i < kNumConsensus; ++i)
    EXPECT(setting_index(kConsensusNames, kNumConsensus, kConsensusNames[i], strlen(kConsensusNames[i])) == i,
           "consensus name %d", i);
  EXPECT(setting_index(kSparsifyNames, kNumSparsify, "trimmed", 4) == 1, "length-delimited name");
  EXPECT(setting_index(kSparsifyNames, kNumSparsify, "tri", 3) == -1, "prefix is not a name");
  EXPECT(setting_index(kConsensusNames, kNumConsensus, "ties", 4) == -1, "method name is not a setting");
  const int64_t numel = 4099, n = 3;
  std::vector<float> x0(numel, 0.5f), x1(numel, 0.25f), x2(numel, 0.125f), out(numel), out2(numel);
  const void* ptrs[3] = {x0.data(), x1.data(), x2.data()};
  double w[3] = {1.0, 1.0, 1.0}, thr[3] = {0.0, 0.0, 0.0};
  uint64_t keys[3] = {1, 2, 3};
  MergeArgs ok{Sparsify::kTrim, Consensus::kTotal, 1.0, 1.0, 0, w, thr, nullptr};
  EXPECT(merge_args_problem(ok) == nullptr, "trim + total is valid");
  EXPECT(cpu::task_merge(nullptr, ptrs, n, kF32, ok, out.data(), kF32, numel, 2), "trim + total runs");
  MergeArgs fr = ok;
  fr.consensus = Consensus::kFrequency;
  EXPECT(cpu::task_merge(nullptr, ptrs, n, kF32, fr, out2.data(), kF32, numel, 2), "trim + frequency runs");
  int64_t bad = 0;
  for (int64_t j = 0; j < numel; ++j) bad += out[j] != 0.875f / 3.0f || out2[j] != out[j];
  EXPECT(bad == 0, "TIES mean of agreeing entries: %lld elements wrong", (long long)bad);
  MergeArgs a = ok;
  a.thresholds = nullptr;
  EXPECT(merge_args_problem(a) && !cpu::task_merge(nullptr, ptrs, n, kF32, a, out.data(), kF32, numel, 2),
         "trim without thresholds is refused");
  a = ok;
  a.sparsify = (Sparsify)3;
  EXPECT(merge_args_problem(a) && !cpu::task_merge(nullptr, ptrs, n, kF32, a, out.data(), kF32, numel, 2),
         "an unknown sparsify value is refused");
  a = ok;
  a.consensus = (Consensus)-1;
  EXPECT(merge_args_problem(a) && !cpu::task_merge(nullptr, ptrs, n, kF32, a, out.data(), kF32, numel, 2),
         "an unknown consensus value is refused");
  MergeArgs d{Sparsify::kDare, Consensus::kNone, 0.5, 1.0, 0, w, nullptr, nullptr};
  EXPECT(merge_args_problem(d) && !cpu::task_merge(nullptr, ptrs, n, kF32, d, out.data(), kF32, numel, 2),
         "dare with density < 1 and no keys is refused");
  d.keys = keys;
  EXPECT(merge_args_problem(d) == nullptr, "dare with keys is valid");
  d.density = 0.0;
  EXPECT(merge_args_problem(d) != nullptr, "dare with density 0 is refused");
}

static void test_kth() {
  for (int64_t numel : {1, 2, 17, 1000, 70001}) {
    std::mt19937_64 g(numel);
    auto x = make<float>(numel, g);
    auto b = make<float>(numel, g);
    std::vector<float> d(numel);
    for (int64_t j = 0; j < numel; ++j) d[j] = fabsf(x[j] - b[j]);
    std::vector<float> s = d;
    std::sort(s.begin(), s.end(), std::greater<float>());
    for (int64_t k : {(int64_t)1, numel / 2 + 1, numel}) {
      for (int t : {1, 2}) {
        double r = cpu::kth_largest_abs(x.data(), b.data(), kF32, numel, k, t);
        EXPECT(r == (double)s[k - 1], "kth numel %lld k %lld: %g vs %g", (long long)numel, (long long)k, r, (double)s[k - 1]);
      }
    }
  }
  // duplicates and zeros
  std::vector<double> z(100, 0.0);
  z[3] = -2.0; z[50] = 2.0;
  EXPECT(cpu::kth_largest_abs(z.data(), nullptr, kF64, 100, 2, 2) == 2.0, "kth dup");
  EXPECT(cpu::kth_largest_abs(z.data(), nullptr, kF64, 100, 3, 2) == 0.0, "kth zero");
}

// factored_svd_cores: (B pb) diag(s) (A^T pa)^T reconstructs B C A (float64 reference product),
// B pb has orthonormal columns, s is descending, and results do not depend on the thread count;
// sizes cover partial lane groups, ranks off the vector width and the largest R the kernel takes.
static void test_factored_svd(int64_t L, int64_t d, int n, int64_t k) {
  std::mt19937_64 g(L * 7919 + n);
  std::normal_distribution<double> nd;
  std::vector<float> B(L * d * n), C(L * n * n), A(L * n * k);
  for (auto& x : B) x = (float)nd(g);
  for (auto& x : C) x = (float)nd(g);
  for (auto& x : A) x = (float)nd(g);
  if (L > 1)
    for (int64_t i = 0; i < d; ++i) B[(1 * d + i) * n + 0] = 0.f;  // layer 1: one zero column
  std::vector<double> pb(L * n * n), pa(L * n * n), s(L * n), pb2(L * n * n), pa2(L * n * n), s2(L * n);
  EXPECT(cpu::factored_svd_cores(B.data(), C.data(), A.data(), kF32, L, d, n, k, pb.data(), pa.data(), s.data(), 2),
         "factored_svd_cores returned false");
  cpu::factored_svd_cores(B.data(), C.data(), A.data(), kF32, L, d, n, k, pb2.data(), pa2.data(), s2.data(), 1);
  EXPECT(pb == pb2 && pa == pa2 && s == s2, "factored_svd_cores depends on the thread count (L=%lld n=%d)",
         (long long)L, n);
  double worst_rec = 0, worst_orth = 0;
  for (int64_t l = 0; l < L; ++l) {
    const float* b = B.data() + l * d * n;
    const float* c = C.data() + l * n * n;
    const float* a = A.data() + l * n * k;
    const double* P = pb.data() + l * n * n;
    const double* Q = pa.data() + l * n * n;
    const double* sl = s.data() + l * n;
    for (int j = 0; j + 1 < n; ++j) EXPECT(sl[j] >= sl[j + 1], "singular values not descending");
    std::vector<double> U(d * n, 0.0), V(k * n, 0.0), BC(d * n, 0.0);
    for (int64_t i = 0; i < d; ++i)
      for (int j = 0; j < n; ++j)
        for (int q = 0; q < n; ++q) {
          U[i * n + j] += (double)b[i * n + q] * P[q * n + j];
          BC[i * n + j] += (double)b[i * n + q] * c[q * n + j];
        }
    for (int64_t i = 0; i < k; ++i)
      for (int j = 0; j < n; ++j)
        for (int q = 0; q < n; ++q) V[i * n + j] += (double)a[q * k + i] * Q[q * n + j];
    double num = 0, den = 0;
    for (int64_t i = 0; i < d; ++i)
      for (int64_t m = 0; m < k; ++m) {
        double ref = 0, rec = 0;
        for (int q = 0; q < n; ++q) {
          ref += BC[i * n + q] * a[q * k + m];
          rec += U[i * n + q] * sl[q] * V[m * n + q];
        }
        num += (rec - ref) * (rec - ref);
        den += ref * ref;
      }
    worst_rec = std::max(worst_rec, sqrt(num / std::max(den, 1e-300)));
    for (int p = 0; p < n; ++p) {
      if (!(sl[p] > 1e-6 * sl[0])) continue;
      for (int q = p; q < n; ++q) {
        if (!(sl[q] > 1e-6 * sl[0])) continue;
        double dot = 0;
        for (int64_t i = 0; i < d; ++i) dot += U[i * n + p] * U[i * n + q];
        worst_orth = std::max(worst_orth, fabs(dot - (p == q ? 1.0 : 0.0)));
      }
    }
  }
  EXPECT(worst_rec <= 1e-9, "factored_svd_cores L=%lld d=%lld n=%d k=%lld: relative reconstruction error %g",
         (long long)L, (long long)d, n, (long long)k, worst_rec);
  EXPECT(worst_orth <= 1e-7, "factored_svd_cores L=%lld n=%d: U not orthonormal (%g)", (long long)L, n, worst_orth);
}

// Above kFactoredSvdCoresMaxN the kernel refuses (returns false, writes nothing): the binding does
// those R x R steps with LAPACK after factored_svd_grams, which takes any R.
static void test_factored_svd_refuses_large_rank() {
  const int64_t L = 2, d = 9, k = 11;
  const int n = cpu::kFactoredSvdCoresMaxN + 1;
  std::vector<float> B(L * d * n, 1.f), C(L * n * n, 1.f), A(L * n * k, 1.f);
  std::vector<double> pb(L * n * n, -7.0), pa(L * n * n, -7.0), s(L * n, -7.0);
  EXPECT(!cpu::factored_svd_cores(B.data(), C.data(), A.data(), kF32, L, d, n, k, pb.data(), pa.data(), s.data(), 2),
         "factored_svd_cores accepted n=%d > kFactoredSvdCoresMaxN", n);
  bool untouched = true;
  for (double x : pb) untouched &= x == -7.0;
  for (double x : pa) untouched &= x == -7.0;
  for (double x : s) untouched &= x == -7.0;
  EXPECT(untouched, "factored_svd_cores wrote its outputs although it refused n=%d", n);
  std::vector<double> gb(L * n * n), ga(L * n * n);
  EXPECT(cpu::factored_svd_grams(B.data(), A.data(), kF32, L, d, n, k, gb.data(), ga.data(), 2),
         "factored_svd_grams refused n=%d", n);
  EXPECT(gb[0] == (double)d && ga[0] == (double)k, "factored_svd_grams n=%d: gb[0]=%g ga[0]=%g", n, gb[0], ga[0]);
}

int main() {
  test_rng();
  test_conversions();
  for (int threads : {1, 2}) {
    for (int64_t numel : {0, 1, 7, 4095, 4097, 100003}) {
      test_weighted_sum<float>(numel, 3, 1, threads);
      test_weighted_sum<half_t>(numel, 2, 3, threads);
      test_weighted_sum<bf16_t>(numel, 4, 2, threads);
      test_weighted_sum<double>(numel, 2, 2, threads);
    }
    test_weighted_sum<float>(5000, 10, 24, threads);
  }
  test_task_merge_invariance();
  test_merge_settings();
  test_kth();
  test_factored_svd(19, 40, 16, 33);
  test_factored_svd(5, 30, 7, 29);
  test_factored_svd(3, 80, cpu::kFactoredSvdCoresMaxN, 75);
  test_factored_svd_refuses_large_rank();
  printf("native tests (%s): %s\n", cpu::isa(), failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}

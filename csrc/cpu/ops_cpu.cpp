// CPU implementations of the ckptreg ops: argument checks, output allocation, then the torch-free
// OpenMP kernels of kernels.cpp. Thread count = at::get_num_threads() (torch.set_num_threads).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/binding.h"
#include "kernels.h"

namespace ckptreg {
namespace {

using namespace binding;

at::Tensor& weighted_sum_out_cpu(at::TensorList inputs, const at::Tensor& weights,
                                 c10::optional<at::ScalarType> out_dtype, at::Tensor& out) {
  check_inputs(inputs, c10::DeviceType::CPU);
  const at::Tensor& x0 = inputs[0];
  const int64_t n = (int64_t)inputs.size();
  check_weights(weights, n, x0);
  const int64_t m = weights.size(0);
  check_out(out, stacked_shape(m, x0.sizes()), x0, out_dtype);
  std::vector<const void*> ptrs(n);
  for (int64_t i = 0; i < n; ++i) ptrs[i] = inputs[i].const_data_ptr();
  const bool ok = cpu::weighted_sum(ptrs.data(), n, to_dtype(x0.scalar_type(), "inputs"),
                                    weights.const_data_ptr<float>(), m, out.mutable_data_ptr(),
                                    to_dtype(out.scalar_type(), "out"), x0.numel(),
                                    at::get_num_threads());
  TORCH_CHECK(ok, "ckptreg: weighted_sum kernel rejected its arguments");
  return out;
}

void weighted_sum_out_cpu_op(at::TensorList inputs, const at::Tensor& weights,
                            c10::optional<at::ScalarType> out_dtype, at::Tensor& out) {
  weighted_sum_out_cpu(inputs, weights, out_dtype, out);
}

at::Tensor weighted_sum_cpu(at::TensorList inputs, const at::Tensor& weights,
                            c10::optional<at::ScalarType> out_dtype) {
  check_inputs(inputs, c10::DeviceType::CPU);
  const at::Tensor& x0 = inputs[0];
  check_weights(weights, (int64_t)inputs.size(), x0);
  at::Tensor out = at::empty(stacked_shape(weights.size(0), x0.sizes()),
                             x0.options().dtype(out_dtype.value_or(x0.scalar_type())));
  weighted_sum_out_cpu(inputs, weights, out_dtype, out);
  return out;
}

at::Tensor& task_merge_out_cpu(const c10::optional<at::Tensor>& base, at::TensorList inputs,
                               at::ArrayRef<double> weights, c10::string_view method,
                               double density, c10::optional<at::ArrayRef<double>> thresholds,
                               c10::optional<at::ArrayRef<int64_t>> keys, c10::string_view sign,
                               double lam, int64_t offset, c10::optional<at::ScalarType> out_dtype,
                               at::Tensor& out) {
  const int mc = method_code(method);
  const int sc = sign_code(sign);
  check_merge_args(base, inputs, weights, mc, density, thresholds, keys, offset,
                   c10::DeviceType::CPU);
  const at::Tensor& x0 = inputs[0];
  check_out(out, x0.sizes(), x0, out_dtype);
  const int64_t n = (int64_t)inputs.size();
  std::vector<const void*> ptrs(n);
  for (int64_t i = 0; i < n; ++i) ptrs[i] = inputs[i].const_data_ptr();
  std::vector<uint64_t> ukeys;
  if (keys.has_value())
    for (int64_t k : *keys) ukeys.push_back((uint64_t)k);
  cpu::MergeArgs a;
  a.method = mc;
  a.sign = sc;
  a.density = density;
  a.lam = lam;
  a.offset = offset;
  a.weights = weights.data();
  a.thresholds = thresholds.has_value() ? thresholds->data() : nullptr;
  a.keys = ukeys.empty() ? nullptr : ukeys.data();
  const bool ok = cpu::task_merge(base.has_value() ? base->const_data_ptr() : nullptr, ptrs.data(),
                                  n, to_dtype(x0.scalar_type(), "inputs"), a, out.mutable_data_ptr(),
                                  to_dtype(out.scalar_type(), "out"), x0.numel(),
                                  at::get_num_threads());
  TORCH_CHECK(ok, "ckptreg: task_merge kernel rejected its arguments");
  return out;
}

void task_merge_out_cpu_op(const c10::optional<at::Tensor>& base, at::TensorList inputs,
                          at::ArrayRef<double> weights, c10::string_view method, double density,
                          c10::optional<at::ArrayRef<double>> thresholds,
                          c10::optional<at::ArrayRef<int64_t>> keys, c10::string_view sign,
                          double lam, int64_t offset, c10::optional<at::ScalarType> out_dtype,
                          at::Tensor& out) {
  task_merge_out_cpu(base, inputs, weights, method, density, thresholds, keys, sign, lam, offset,
                      out_dtype, out);
}

at::Tensor task_merge_cpu(const c10::optional<at::Tensor>& base, at::TensorList inputs,
                          at::ArrayRef<double> weights, c10::string_view method, double density,
                          c10::optional<at::ArrayRef<double>> thresholds,
                          c10::optional<at::ArrayRef<int64_t>> keys, c10::string_view sign,
                          double lam, int64_t offset, c10::optional<at::ScalarType> out_dtype) {
  check_inputs(inputs, c10::DeviceType::CPU);
  const at::Tensor& x0 = inputs[0];
  at::Tensor out = at::empty(x0.sizes(), x0.options().dtype(out_dtype.value_or(x0.scalar_type())));
  task_merge_out_cpu(base, inputs, weights, method, density, thresholds, keys, sign, lam, offset,
                     out_dtype, out);
  return out;
}

at::Tensor kth_largest_abs_cpu(const at::Tensor& x, int64_t k, const c10::optional<at::Tensor>& base) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "ckptreg: x must be a CPU tensor");
  TORCH_CHECK_VALUE(x.is_contiguous(), "ckptreg: x is not contiguous");
  const DType dt = to_dtype(x.scalar_type(), "x");
  if (base.has_value()) check_same(*base, x, "base");
  TORCH_CHECK_VALUE(k >= 1 && k <= x.numel(), "ckptreg: k must be in [1, ", x.numel(), "], got ", k);
  const double r = cpu::kth_largest_abs(x.const_data_ptr(),
                                        base.has_value() ? base->const_data_ptr() : nullptr, dt,
                                        x.numel(), k, at::get_num_threads());
  return at::scalar_tensor(r, x.options().dtype(acc_type(x.scalar_type())));
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CKPTREG_FSVD_INLINE __attribute__((always_inline)) inline
#define CKPTREG_FSVD_X86 1
#else
#define CKPTREG_FSVD_INLINE inline
#endif

// ---- factored SVD: Gram matrices + tiny per-layer R x R work (see ckptreg/ops.py) -------------
// Cyclic Jacobi eigendecomposition of the symmetric n x n matrix a (row-major, destroyed):
// eigenvalues in d, eigenvectors in the columns of v (row-major).
static CKPTREG_FSVD_INLINE void jacobi_eigh(double* a, int n, double* d, double* v) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) v[i * n + j] = i == j ? 1.0 : 0.0;
  for (int sweep = 0; sweep < 60; ++sweep) {
    double off = 0.0, diag = 0.0;
    for (int i = 0; i < n; ++i) {
      diag += a[i * n + i] * a[i * n + i];
      for (int j = i + 1; j < n; ++j) off += a[i * n + j] * a[i * n + j];
    }
    if (off <= 1e-34 * diag || off == 0.0) break;
    for (int p = 0; p < n; ++p)
      for (int q = p + 1; q < n; ++q) {
        const double apq = a[p * n + q];
        if (apq == 0.0) continue;
        const double app = a[p * n + p], aqq = a[q * n + q];
        if (std::fabs(apq) <= 1e-18 * std::sqrt(std::fabs(app * aqq))) { a[p * n + q] = a[q * n + p] = 0.0; continue; }
        const double theta = (aqq - app) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (int k = 0; k < n; ++k) {  // columns p, q
          const double akp = a[k * n + p], akq = a[k * n + q];
          a[k * n + p] = c * akp - s * akq;
          a[k * n + q] = s * akp + c * akq;
        }
        for (int k = 0; k < n; ++k) {  // rows p, q
          const double apk = a[p * n + k], aqk = a[q * n + k];
          a[p * n + k] = c * apk - s * aqk;
          a[q * n + k] = s * apk + c * aqk;
        }
        for (int k = 0; k < n; ++k) {
          const double vkp = v[k * n + p], vkq = v[k * n + q];
          v[k * n + p] = c * vkp - s * vkq;
          v[k * n + q] = s * vkp + c * vkq;
        }
      }
  }
  for (int i = 0; i < n; ++i) d[i] = a[i * n + i];
}

// G = B^T B (n x n, symmetric PSD). Writes W (n x n) and P (n x n) with G = W^T W and B P = Q
// having orthonormal columns (zero columns for the directions B does not span): Cholesky when G
// is well conditioned, else an eigendecomposition dropping eigenvalues <= tol (rank-deficient B).
static CKPTREG_FSVD_INLINE void gram_factor(const double* G, int n, double* W, double* P, double* tmp, double* ev,
                        double* vec) {
  double gmax = 0.0;
  for (int i = 0; i < n; ++i) gmax = std::max(gmax, G[i * n + i]);
  std::fill(W, W + n * n, 0.0);
  std::fill(P, P + n * n, 0.0);
  if (!(gmax > 0.0)) return;  // B = 0: the product is 0
  // Cholesky G = W^T W, W upper triangular; rejected when a pivot is tiny (ill conditioned)
  bool ok = true;
  for (int j = 0; j < n && ok; ++j) {
    double s = G[j * n + j];
    for (int k = 0; k < j; ++k) s -= W[k * n + j] * W[k * n + j];
    if (!(s > 1e-8 * gmax)) { ok = false; break; }
    const double r = std::sqrt(s);
    W[j * n + j] = r;
    for (int i = j + 1; i < n; ++i) {
      double t = G[j * n + i];
      for (int k = 0; k < j; ++k) t -= W[k * n + j] * W[k * n + i];
      W[j * n + i] = t / r;
    }
  }
  if (ok) {  // P = W^{-1} (upper triangular)
    for (int c = 0; c < n; ++c) {
      for (int i = c; i >= 0; --i) {
        double t = i == c ? 1.0 : 0.0;
        for (int k = i + 1; k <= c; ++k) t -= W[i * n + k] * P[k * n + c];
        P[i * n + c] = t / W[i * n + i];
      }
    }
    return;
  }
  std::fill(W, W + n * n, 0.0);
  std::copy(G, G + n * n, tmp);
  jacobi_eigh(tmp, n, ev, vec);
  double lmax = 0.0;
  for (int i = 0; i < n; ++i) lmax = std::max(lmax, ev[i]);
  const double tol = 64.0 * n * 2.220446049250313e-16 * lmax;
  for (int i = 0; i < n; ++i) {
    if (!(ev[i] > tol)) continue;
    const double sq = std::sqrt(ev[i]);
    for (int k = 0; k < n; ++k) {
      W[i * n + k] = sq * vec[k * n + i];  // W = diag(sqrt l) V^T
      P[k * n + i] = vec[k * n + i] / sq;  // P = V diag(1/sqrt l)
    }
  }
}

// alpha = x.x, beta = y.y, gamma = x.y with 8 independent partial sums (vectorises)
static CKPTREG_FSVD_INLINE void dot3(const double* __restrict__ x, const double* __restrict__ y, int n,
                                     double& alpha, double& beta, double& gamma) {
  double a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0}, g[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int k = 0;
  for (; k + 8 <= n; k += 8)
    for (int l = 0; l < 8; ++l) {
      a[l] += x[k + l] * x[k + l];
      b[l] += y[k + l] * y[k + l];
      g[l] += x[k + l] * y[k + l];
    }
  for (; k < n; ++k) {
    a[0] += x[k] * x[k];
    b[0] += y[k] * y[k];
    g[0] += x[k] * y[k];
  }
  alpha = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
  beta = ((b[0] + b[4]) + (b[1] + b[5])) + ((b[2] + b[6]) + (b[3] + b[7]));
  gamma = ((g[0] + g[4]) + (g[1] + g[5])) + ((g[2] + g[6]) + (g[3] + g[7]));
}

// One-sided Jacobi SVD of the n x n matrix M (row-major): M = U diag(s) V^T, s descending.
static CKPTREG_FSVD_INLINE void jacobi_svd(const double* M, int n, double* U, double* s, double* V, double* X,
                       double* Y, int* order) {
  // X rows = columns of M, Y rows = columns of V
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      X[j * n + i] = M[i * n + j];
      Y[j * n + i] = i == j ? 1.0 : 0.0;
    }
  const double tol2 = 1e-28;
  // round-robin (tournament) ordering: each round rotates n/2 disjoint column pairs, which are
  // independent, so their scalar sqrt/div chains overlap in the CPU instead of serialising
  const int m2 = n + (n & 1);
  std::vector<int> sched((size_t)m2);
  for (int i = 0; i < m2; ++i) sched[(size_t)i] = i;
  for (int sweep = 0; sweep < 40; ++sweep) {
    bool rotated = false;
    for (int round = 0; round < m2 - 1; ++round) {
      for (int h = 0; h < m2 / 2; ++h) {
        int p = sched[(size_t)h], q = sched[(size_t)(m2 - 1 - h)];
        if (p >= n || q >= n) continue;
        if (p > q) std::swap(p, q);
        double* xp = X + p * n;
        double* xq = X + q * n;
        double al, be, ga;
        dot3(xp, xq, n, al, be, ga);
        if (ga == 0.0 || ga * ga <= tol2 * (al * be)) continue;
        rotated = true;
        const double zeta = (be - al) / (2.0 * ga);
        const double t = (zeta >= 0 ? 1.0 : -1.0) / (std::fabs(zeta) + std::sqrt(1.0 + zeta * zeta));
        const double c = 1.0 / std::sqrt(1.0 + t * t), sn = c * t;
        double* yp = Y + p * n;
        double* yq = Y + q * n;
        for (int k = 0; k < n; ++k) {
          const double a = xp[k], b = xq[k];
          xp[k] = c * a - sn * b;
          xq[k] = sn * a + c * b;
          const double ya = yp[k], yb = yq[k];
          yp[k] = c * ya - sn * yb;
          yq[k] = sn * ya + c * yb;
        }
      }
      const int last = sched[(size_t)(m2 - 1)];
      for (int i = m2 - 1; i > 1; --i) sched[(size_t)i] = sched[(size_t)(i - 1)];
      sched[1] = last;
    }
    if (!rotated) break;
  }
  for (int j = 0; j < n; ++j) {
    double nn = 0.0;
    for (int k = 0; k < n; ++k) nn += X[j * n + k] * X[j * n + k];
    s[j] = std::sqrt(nn);
    order[j] = j;
  }
  std::stable_sort(order, order + n, [&](int a, int b) { return s[a] > s[b]; });
  std::vector<double> ss(s, s + n);
  for (int jj = 0; jj < n; ++jj) {
    const int j = order[jj];
    const double sj = ss[j];
    s[jj] = sj;
    for (int k = 0; k < n; ++k) {
      U[k * n + jj] = sj > 0.0 ? X[j * n + k] / sj : 0.0;
      V[k * n + jj] = Y[j * n + k];
    }
  }
}

// C = A B (n x n, row-major), vectorised over the columns of C
static CKPTREG_FSVD_INLINE void mm_small(const double* A, const double* B, double* C, int n, bool transB) {
  for (int i = 0; i < n; ++i) {
    double* c = C + i * n;
    for (int j = 0; j < n; ++j) c[j] = 0.0;
    for (int q = 0; q < n; ++q) {
      const double a = A[i * n + q];
      if (transB) {
        for (int j = 0; j < n; ++j) c[j] += a * B[j * n + q];
      } else {
        const double* b = B + q * n;
        for (int j = 0; j < n; ++j) c[j] += a * b[j];
      }
    }
  }
}

// All per-layer work: factors of the Grams G_B = B^T B and G_A = A A^T, M = W_B C W_A^T, its SVD, and
// P_B U_c, P_A V_c (so that U = B P_B U_c, Vh = (P_A V_c)^T A).
template <typename T>
static CKPTREG_FSVD_INLINE void fsvd_layers(const double* gb, const double* ga, const T* C, int64_t L0,
                                            int64_t L1, int n, double* pb, double* pa, double* sp) {
  const int64_t RR = (int64_t)n * n;
  std::vector<double> buf((size_t)RR * 13 + 2 * (size_t)n);
  std::vector<int> order((size_t)n);
  double* WB = buf.data();
  double* XB = WB + RR;
  double* WA = XB + RR;
  double* XA = WA + RR;
  double* T1 = XA + RR;
  double* M = T1 + RR;
  double* Uc = M + RR;
  double* Vc = Uc + RR;
  double* X = Vc + RR;
  double* Y = X + RR;
  double* tmp = Y + RR;
  double* vec = tmp + RR;
  double* Cd = vec + RR;
  double* ev = Cd + RR;
  for (int64_t l = L0; l < L1; ++l) {
    gram_factor(gb + l * RR, n, WB, XB, tmp, ev, vec);
    gram_factor(ga + l * RR, n, WA, XA, tmp, ev, vec);
    for (int64_t q = 0; q < RR; ++q) Cd[q] = (double)C[l * RR + q];
    mm_small(WB, Cd, T1, n, false);
    mm_small(T1, WA, M, n, true);  // M = W_B C W_A^T
    jacobi_svd(M, n, Uc, sp + l * n, Vc, X, Y, order.data());
    mm_small(XB, Uc, pb + l * RR, n, false);
    mm_small(XA, Vc, pa + l * RR, n, false);
  }
}


// the per-layer work compiled for AVX-512, AVX2+FMA and the baseline ISA, picked at run time
#define CKPTREG_FSVD_VARIANT(NAME, ATTR)                                                            \
  template <typename T>                                                                             \
  ATTR void NAME(const double* gb, const double* ga, const T* C, int64_t L0, int64_t L1, int n,    \
                 double* pb, double* pa, double* sp) {                                              \
    fsvd_layers<T>(gb, ga, C, L0, L1, n, pb, pa, sp);                                               \
  }
CKPTREG_FSVD_VARIANT(fsvd_base, )
#if CKPTREG_FSVD_X86
CKPTREG_FSVD_VARIANT(fsvd_avx2, __attribute__((target("avx2,fma"))))
CKPTREG_FSVD_VARIANT(fsvd_avx512, __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))))
#endif

template <typename T>
void fsvd_dispatch(const double* gb, const double* ga, const T* C, int64_t L0, int64_t L1, int n,
                   double* pb, double* pa, double* sp) {
#if CKPTREG_FSVD_X86
  static const int isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
      return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
  }();
  if (isa == 2) return fsvd_avx512<T>(gb, ga, C, L0, L1, n, pb, pa, sp);
  if (isa == 1) return fsvd_avx2<T>(gb, ga, C, L0, L1, n, pb, pa, sp);
#endif
  fsvd_base<T>(gb, ga, C, L0, L1, n, pb, pa, sp);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> factored_svd_batched_cpu(
    const at::Tensor& B_, const at::Tensor& core_, const at::Tensor& A_, c10::optional<int64_t> rank) {
  check_factored_svd_args(B_, core_, A_, rank);
  const int64_t L = B_.size(0), d = B_.size(1), R = B_.size(2), k = A_.size(2);
  const auto dt = acc_type(B_.scalar_type());
  int64_t r = std::min(std::min(d, k), R);
  if (rank.has_value()) r = std::min(r, *rank);
  if (L == 0 || R == 0 || d == 0 || k == 0) {
    auto o = B_.options().dtype(dt);
    return {at::zeros({L, d, r}, o), at::zeros({L, r}, o), at::zeros({L, r, k}, o)};
  }
  // float32 (or float64) storage of the factors; bf16/f16 inputs are widened once (exact)
  const auto st = dt == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor Bc = B_.to(st).contiguous(), Ac = A_.to(st).contiguous(), Cc = core_.to(st).contiguous();
  // Gram matrices in float64, one batched matmul each (products of float32 values are exact)
  const at::Tensor Bd = st == at::kDouble ? Bc : Bc.to(at::kDouble);
  const at::Tensor Ad = st == at::kDouble ? Ac : Ac.to(at::kDouble);
  const at::Tensor GB = at::matmul(Bd.mT(), Bd).contiguous();
  const at::Tensor GA = at::matmul(Ad, Ad.mT()).contiguous();
  const double* gb = GB.const_data_ptr<double>();
  const double* ga = GA.const_data_ptr<double>();
  auto o64 = B_.options().dtype(at::kDouble);
  at::Tensor PB = at::empty({L, R, R}, o64);
  at::Tensor PA = at::empty({L, R, R}, o64);
  at::Tensor S = at::empty({L, R}, o64);
  double* pb = PB.mutable_data_ptr<double>();
  double* pa = PA.mutable_data_ptr<double>();
  double* sp = S.mutable_data_ptr<double>();
  const int n = (int)R;
  TORCH_CHECK_VALUE(R <= 4096, "ckptreg: factored_svd_batched supports R <= 4096, got ", R);
  at::parallel_for(0, L, 1, [&](int64_t l0, int64_t l1) {
    if (st == at::kDouble)
      fsvd_dispatch<double>(gb, ga, Cc.const_data_ptr<double>(), l0, l1, n, pb, pa, sp);
    else
      fsvd_dispatch<float>(gb, ga, Cc.const_data_ptr<float>(), l0, l1, n, pb, pa, sp);
  });
  at::Tensor PBr = PB.narrow(-1, 0, r), PAr = PA.narrow(-1, 0, r);
  at::Tensor U, Vh;
  if (dt == at::kDouble) {
    U = at::matmul(Bc, PBr);
    Vh = at::matmul(PAr.mT(), Ac);
  } else {
    U = at::matmul(Bc, PBr.to(dt));
    Vh = at::matmul(PAr.mT().to(dt), Ac);
  }
  return {U.contiguous(), S.narrow(-1, 0, r).to(dt).contiguous(), Vh.contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckptreg, CPU, m) {
  m.impl("weighted_sum", &weighted_sum_cpu);
  m.impl("weighted_sum_out", &weighted_sum_out_cpu_op);
  m.impl("task_merge", &task_merge_cpu);
  m.impl("task_merge_out", &task_merge_out_cpu_op);
  m.impl("kth_largest_abs", &kth_largest_abs_cpu);
  m.impl("factored_svd_batched", &factored_svd_batched_cpu);
}

}  // namespace ckptreg

// The settings of the fused task-vector merge (task_merge), shared by the CPU and CUDA kernels and
// by their torch bindings. Plain C++ (no torch, no STL): usable from host code and CUDA device code.
//
// A merge is two settings, as in mergekit's generalized task arithmetic, with tau_i = x_i - base:
//   sparsify   how each tau_i is thinned before it is summed
//                none  keep every entry
//                trim  keep |tau_i| >= thresholds[i] (TIES / magnitude prune)
//                dare  keep a random subset (rng.h, keep probability density), rescaled by 1/density
//   consensus  whether a sign is elected per element among the thinned, unweighted tau_i
//                none       result = base + lam * sum_i w_i tau_i
//                total      gamma = sign sum_i tau_i          (+1 where the sum is 0)
//                frequency  gamma = sign sum_i sign(tau_i)    (+1 where the sum is 0)
//              and then result = base + lam * sum_i w_i tau_i [sign tau_i = gamma] / max(1, count).
// Method names live in Python only (ckptreg/ops.py maps them onto these two settings):
//   task_arithmetic = none+none, ties = trim+total|frequency, magnitude_prune = trim+none,
//   dare_linear = dare+none, dare_ties = dare+total|frequency.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define CKPTREG_MERGE_HD __host__ __device__ __forceinline__
#else
#define CKPTREG_MERGE_HD inline
#endif

namespace ckptreg {

enum class Sparsify : int32_t { kNone = 0, kTrim = 1, kDare = 2 };
enum class Consensus : int32_t { kNone = 0, kTotal = 1, kFrequency = 2 };

// The names the op schema takes, indexed by the enum values.
constexpr int kNumSparsify = 3;
constexpr int kNumConsensus = 3;
constexpr const char* kSparsifyNames[kNumSparsify] = {"none", "trim", "dare"};
constexpr const char* kConsensusNames[kNumConsensus] = {"none", "total", "frequency"};

// The arguments of one task_merge call. The arrays are host memory for the CPU kernels and device
// memory for the CUDA kernels.
struct MergeArgs {
  Sparsify sparsify;
  Consensus consensus;
  double density;            // DARE keep probability, (0, 1] (also checked for trim)
  double lam;                // scale of the merged task vector
  int64_t offset;            // element index of this chunk in the whole tensor (DARE counters)
  const double* weights;     // [n_inputs]
  const double* thresholds;  // [n_inputs] trims (|tau| >= thr kept); needed for sparsify trim
  const uint64_t* keys;      // [n_inputs] DARE stream keys; needed for dare with density < 1

  CKPTREG_MERGE_HD bool trim() const { return sparsify == Sparsify::kTrim; }
  CKPTREG_MERGE_HD bool dare() const { return sparsify == Sparsify::kDare; }
  CKPTREG_MERGE_HD bool elect() const { return consensus != Consensus::kNone; }
  CKPTREG_MERGE_HD bool frequency() const { return consensus == Consensus::kFrequency; }
  CKPTREG_MERGE_HD bool use_mask() const { return dare() && density < 1.0; }
};

// Index of `s` (length len, not NUL-terminated) in names[0..count), or -1.
inline int setting_index(const char* const* names, int count, const char* s, uint64_t len) {
  for (int i = 0; i < count; ++i) {
    const char* nm = names[i];
    uint64_t k = 0;
    while (k < len && nm[k] != '\0' && nm[k] == s[k]) ++k;
    if (k == len && nm[k] == '\0') return i;
  }
  return -1;
}

// Null when `a` is a consistent set of arguments (array sizes aside), else what is wrong. The
// kernels' entry points refuse such arguments; the bindings check the same rules first, with sizes.
inline const char* merge_args_problem(const MergeArgs& a) {
  const int sp = (int)a.sparsify, co = (int)a.consensus;
  if (sp < 0 || sp >= kNumSparsify) return "unknown sparsify setting";
  if (co < 0 || co >= kNumConsensus) return "unknown consensus setting";
  if (a.sparsify != Sparsify::kNone && !(a.density > 0.0 && a.density <= 1.0))
    return "density must be in (0, 1]";
  if (a.trim() && !a.thresholds) return "sparsify trim needs thresholds";
  if (a.use_mask() && !a.keys) return "sparsify dare with density < 1 needs keys";
  if (!a.weights) return "weights are missing";
  return nullptr;
}

}  // namespace ckptreg

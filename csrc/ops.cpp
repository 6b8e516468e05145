// The schema of every ckptreg op (one TORCH_LIBRARY), and the Python module ckptreg._C whose
// import registers them. Kernels: cpu/ops_cpu.cpp (CPU), cuda/*_binding.cpp (CUDA).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(ckptreg, m) {
  // out[m] = sum_n weights[m, n] * inputs[n]; weights float32 [M, N] on the inputs' device
  m.def("weighted_sum(Tensor[] inputs, Tensor weights, ScalarType? out_dtype=None) -> Tensor");
  // in-place variant writing into `out` (returns nothing: mutable custom ops must not return
  // an alias, so torch.compile can functionalise them)
  m.def("weighted_sum_out(Tensor[] inputs, Tensor weights, ScalarType? out_dtype, Tensor(a!) out) -> ()");
  // fused task-vector merge: sparsify "none" | "trim" | "dare" x consensus "none" | "total" |
  // "frequency" (semantics: common/merge.h, ckptreg/ops.py; method names map onto these in Python)
  m.def("task_merge(Tensor? base, Tensor[] inputs, float[] weights, str sparsify, str consensus, "
        "float density, float[]? thresholds, int[]? keys, float lam, int offset, "
        "ScalarType? out_dtype=None) -> Tensor");
  m.def("task_merge_out(Tensor? base, Tensor[] inputs, float[] weights, str sparsify, str consensus, "
        "float density, float[]? thresholds, int[]? keys, float lam, int offset, "
        "ScalarType? out_dtype, Tensor(a!) out) -> ()");
  // exact k-th largest |x - base| as a 0-dim float32 (float64 for float64 x) tensor
  m.def("kth_largest_abs(Tensor x, int k, Tensor? base=None) -> Tensor");
  // exact thin SVD of B[l] @ core[l] @ A[l] via QR, batched over layers
  m.def("factored_svd_batched(Tensor B, Tensor core, Tensor A, int? rank=None) -> (Tensor, Tensor, Tensor)");
}

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "ckptreg compiled kernels (registers torch.ops.ckptreg)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}

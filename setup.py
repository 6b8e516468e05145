"""Build script: the package plus the compiled extension ckptreg._C (owned by the kernels work).

* Default: a C++/OpenMP CppExtension against the installed (CPU or CUDA) torch.
* CUDA kernels are added (CUDAExtension) when torch was built with CUDA and CUDA_HOME/nvcc is
  found, or when CKPTREG_CUDA=1 forces it; with CKPTREG_CUDA=1 a build that cannot include CUDA
  fails loudly instead of silently dropping the kernels. CKPTREG_CUDA=0 builds CPU only.
* The extension is optional at run time: ckptreg.ops falls back to plain PyTorch without it.

Install: pip install --no-build-isolation -e .
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _ext_modules():
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:  # metadata-only operations without torch
        return [], {}

    want = os.environ.get("CKPTREG_CUDA", "").strip().lower()
    force_cuda = want in ("1", "true", "yes", "on")
    no_cuda = want in ("0", "false", "no", "off")
    has_cuda = bool(torch.version.cuda) and ce.CUDA_HOME is not None

    if force_cuda and not has_cuda:
        sys.exit(
            "CKPTREG_CUDA=1 but CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r} (need a CUDA build of torch), "
            f"CUDA_HOME={ce.CUDA_HOME!r} (need the CUDA toolkit / nvcc)"
        )
    use_cuda = has_cuda and not no_cuda

    sources = _rel([os.path.join(HERE, "csrc", "ops.cpp")] + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if sys.platform == "darwin":
        cxx = ["-O3", "-Xpreprocessor", "-fopenmp"]
    link = ["-fopenmp"] if sys.platform != "darwin" else []
    include_dirs = [os.path.join(HERE, "csrc")]
    if use_cuda:
        cu = glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")) + glob.glob(
            os.path.join(HERE, "csrc", "cuda", "*_binding.cpp")
        )
        if force_cuda and not cu:
            sys.exit("CKPTREG_CUDA=1 but csrc/cuda holds no CUDA sources")
        ext = ce.CUDAExtension(
            "ckptreg._C",
            sources + _rel(cu),
            include_dirs=include_dirs,
            define_macros=[("CKPTREG_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
            extra_link_args=link,
        )
    else:
        ext = ce.CppExtension(
            "ckptreg._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

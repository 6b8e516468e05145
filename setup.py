"""Build script: the package plus the compiled extension ckptreg._C (owned by the kernels work).

* Default: a C++/OpenMP CppExtension against the installed (CPU or CUDA) torch.
* CUDA kernels are added (CUDAExtension) when torch was built with CUDA and CUDA_HOME/nvcc is
  found, or when CKPTREG_CUDA=1 forces it; with CKPTREG_CUDA=1 a build that cannot include CUDA
  fails loudly instead of silently dropping the kernels. CKPTREG_CUDA=0 builds CPU only.
* The extension is optional at run time: ckptreg.ops falls back to plain PyTorch without it.
* The extension must run against the torch it was compiled with, so the runtime requirement on
  torch is computed here from the torch present at build time (``dependencies`` is dynamic in
  pyproject.toml; the other requirements are the static list below), and build_ext records that
  version in ckptreg/_build_info.py, which ckptreg.ops compares with the running torch before it
  loads the extension.

Install: pip install --no-build-isolation -e .
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

# Runtime requirements other than torch (static; torch is added by _torch_requirement()).
STATIC_REQUIRES = [
    "numpy>=1.24",
    "safetensors>=0.4",
    "duckdb>=1.0",
    # click: the CLI framework (thin commands, CliRunner for in-process tests)
    "click>=8.1",
    # rich: aligned tables and progress bars, instead of hand-written ones
    "rich>=13",
    # filelock: portable writer lock beside the database file
    "filelock>=3.12",
]
# Without a compiled extension (no torch at build time) any supported torch will do.
TORCH_UNPINNED = "torch>=2.4"


def _torch_release(version):
    """"2.13.0+cu130" -> "2.13.0": pip cannot pin a local label (+cpu/+cu130 come from different
    indexes), and the CPU and CUDA builds of one release share the C++ API the extension uses."""
    return str(version).split("+", 1)[0].strip()


def _torch_requirement(torch_version, with_extension):
    """``torch==X.Y.Z`` (the release the extension is compiled against), not ``==X.Y.*``: torch
    promises no C++ ABI stability even between patch releases, and ckptreg.ops refuses to load
    the extension under any other release, so a looser pin would install a combination that
    silently runs the slow Python path."""
    if not with_extension or not torch_version:
        return TORCH_UNPINNED
    return f"torch=={_torch_release(torch_version)}"


def _build_info_text(torch):
    return (
        '"""Written by setup.py at build time (not tracked): the torch ckptreg._C was compiled against."""\n'
        f"TORCH_VERSION = {str(torch.__version__)!r}\n"
        f"TORCH_CUDA = {torch.version.cuda!r}\n"
    )


def _with_build_info(base, torch):
    """build_ext that also writes ckptreg/_build_info.py next to the built extension: into the
    build folder (wheels, ``setup.py build``) and, for in-place/editable builds, into the source
    package as well."""

    class build_ext(base):
        def run(self):
            super().run()
            text = _build_info_text(torch)
            dirs = {os.path.join(self.build_lib, "ckptreg")}
            if self.inplace:
                dirs.add(os.path.dirname(self.get_ext_fullpath("ckptreg._C")))
            for d in sorted(dirs):
                os.makedirs(d, exist_ok=True)
                path = os.path.join(d, "_build_info.py")
                tmp = path + ".tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(tmp, path)

    return build_ext


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _ext_modules():
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:  # metadata-only operations without torch
        return [], {}, None

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
    build_ext = _with_build_info(ce.BuildExtension.with_options(use_ninja=True), torch)
    return [ext], {"build_ext": build_ext}, torch.__version__


ext_modules, cmdclass, built_torch = _ext_modules()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[_torch_requirement(built_torch, bool(ext_modules))] + STATIC_REQUIRES,
    package_data={"ckptreg": ["py.typed"]},
)

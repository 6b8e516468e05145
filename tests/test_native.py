"""Native (no Python, no torch) build of the kernel core with CMake, and its ctest suite:
weighted_sum vs a scalar double reference, the RNG vs values of ckptreg/rng.py, half/bfloat16
conversions over every bit pattern, DARE mask chunk/thread invariance, exact radix select.
Skips where cmake or a C++ compiler is missing; about 30 s on 2 cores (marked slow)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed"),
    pytest.mark.skipif(not (ROOT / "CMakeLists.txt").exists(), reason="no CMakeLists.txt"),
]


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    b = tmp_path_factory.mktemp("native")
    _run(["cmake", "-S", str(ROOT), "-B", str(b), "-DCMAKE_BUILD_TYPE=Release", "-DCKPTREG_CUDA=OFF"])
    _run(["cmake", "--build", str(b), "-j", str(min(2, os.cpu_count() or 1))])
    return b


def test_native_ctest(build):
    r = _run(["ctest", "--test-dir", str(build), "--output-on-failure"])
    assert "100% tests passed" in r.stdout


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_native_other_isa(build, isa):
    """The AVX2 and baseline compilations of the kernels give the same answers as the AVX-512 one
    (CKPTREG_CPU_ISA caps the runtime choice; a machine without AVX2 reports baseline anyway)."""
    r = _run([str(build / "test_native")], env={**os.environ, "CKPTREG_CPU_ISA": isa})
    assert "): ok" in r.stdout

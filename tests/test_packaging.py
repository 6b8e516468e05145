"""Install from any route: the sdist holds every file the build needs (and no build output), the
runtime torch requirement is pinned to the torch the extension is compiled with, the build
records that version, and ckptreg.ops refuses (one warning, Python fallback) an extension built
against another torch. Nothing here touches the working tree: sdists and builds go to tmp."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from ckptreg import ops

ROOT = Path(__file__).resolve().parent.parent
SO = sorted((ROOT / "ckptreg").glob("_C*.so")) + sorted((ROOT / "ckptreg").glob("_C*.pyd"))
RELEASE = torch.__version__.split("+", 1)[0]

needs_git = pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout"
)
needs_so = pytest.mark.skipif(not SO, reason="ckptreg._C is not built in the source tree")


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def _checkout_files() -> list[str]:
    """What a fresh clone (plus not-yet-committed, not-ignored files) holds."""
    out = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout
    return sorted(p for p in out.split("\0") if p and (ROOT / p).is_file())


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """Build an sdist from a copy of the checkout that also holds the outputs of an in-place
    build (a fake _C.so and _build_info.py), as a developer's tree does. Returns
    (path of the .tar.gz, member names relative to the top folder)."""
    tmp = tmp_path_factory.mktemp("sdist")
    src = tmp / "src"
    for rel in _checkout_files():
        dst = src / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst)
    (src / "ckptreg" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not a library")
    (src / "ckptreg" / "_build_info.py").write_text("TORCH_VERSION = '0.0.1'\n")
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp / "dist")], cwd=src)
    (tgz,) = (tmp / "dist").glob("ckptreg-*.tar.gz")
    with tarfile.open(tgz) as tf:
        names = [m.name for m in tf.getmembers() if m.isfile()]
    return tgz, sorted(n.split("/", 1)[1] for n in names)


@needs_git
def test_sdist_contains_every_build_file(sdist):
    _, names = sdist
    tracked = _checkout_files()
    need = [p for p in tracked if p.startswith(("csrc/", "ckptreg/", "docs/", "tests/"))]
    need += ["setup.py", "pyproject.toml", "MANIFEST.in", "CMakeLists.txt", "README.md", "ckptreg/py.typed"]
    missing = sorted(set(need) - set(names))
    assert not missing, f"the sdist lacks files the build or the tests need: {missing}"
    # csrc exactly as in git: every .h/.inc/.cu the build includes, nothing else
    assert sorted(n for n in names if n.startswith("csrc/")) == sorted(p for p in tracked if p.startswith("csrc/"))


@needs_git
def test_sdist_ships_no_build_output(sdist):
    _, names = sdist
    assert "ckptreg/_build_info.py" not in names
    assert not [n for n in names if n.endswith((".so", ".pyd", ".o", ".pyc"))]


@needs_git
def test_sdist_metadata_pins_build_torch(sdist):
    tgz, _ = sdist
    with tarfile.open(tgz) as tf:
        (pkg_info,) = [m for m in tf.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")]
        meta = tf.extractfile(pkg_info).read().decode()
    reqs = [ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
    torch_reqs = [r for r in reqs if r.split(";")[0].strip().startswith("torch")]
    assert torch_reqs == [f"torch=={RELEASE}"], reqs
    for static in ("numpy>=1.24", "safetensors>=0.4", "duckdb>=1.0", "click>=8.1", "rich>=13", "filelock>=3.12"):
        assert static in reqs


def test_extension_compatible():
    f = ops._extension_compatible
    assert f("2.13.0+cpu", "2.13.0+cpu")
    assert f("2.13.0", "2.13.0+cu130")  # same release, local build labels differ
    assert f("2.13.0+cpu", "2.13.0+cu130")
    assert not f("2.13.0+cpu", "2.14.1+cu130")
    assert not f("2.13.0", "2.13.1")  # no ABI promise between patch releases
    assert not f("2.13.0", "2.13")
    assert not f("2.14.0.dev20250101+cpu", "2.14.0")
    assert not f("", "2.13.0")


def _copy_package(tmp: Path, build_torch: str | None) -> Path:
    """ckptreg's Python files copied into tmp, the built extension linked in, and a
    _build_info.py recording ``build_torch`` (None: no record)."""
    pkg = tmp / "ckptreg"
    shutil.copytree(ROOT / "ckptreg", pkg, ignore=shutil.ignore_patterns("__pycache__", "_C*", "_build_info.py"))
    for so in SO:
        (pkg / so.name).symlink_to(so)
    if build_torch is not None:
        (pkg / "_build_info.py").write_text(f"TORCH_VERSION = {build_torch!r}\nTORCH_CUDA = None\n")
    return tmp


_PROBE = r"""
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import ckptreg, ckptreg.ops as o
    av = o.available()
    o.available()  # a second look warns no more
    st = o.extension_status()
    y = o.weighted_sum([torch.ones(5), torch.full((5,), 3.0)], [0.5, 2.0])
print(json.dumps({
    "file": ckptreg.__file__, "available": av, "status": st, "backend": o.backend(),
    "C_imported": "ckptreg._C" in sys.modules, "y": y.tolist(),
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught if "ckptreg" in str(w.message)],
}))
"""


def _probe(path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CKPTREG_BACKEND"}
    env["PYTHONPATH"] = str(path)
    r = _run([sys.executable, "-c", _PROBE], cwd=path, env=env)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(path)), out["file"]  # the copy, not the working tree
    return out


@needs_so
def test_extension_built_for_another_torch_is_not_loaded(tmp_path):
    out = _probe(_copy_package(tmp_path, "9.9.9+cu999"))
    assert out["C_imported"] is False  # never even imported
    assert out["available"] == {"python": True, "cpp": False, "cuda": False}
    assert out["backend"] == "python"
    assert out["y"] == [6.5] * 5  # the Python path still computes
    assert len(out["warnings"]) == 1, out["warnings"]
    (w,) = out["warnings"]
    assert w.startswith("RuntimeWarning: ")
    assert "9.9.9+cu999" in w and torch.__version__ in w
    st = out["status"]
    assert st["loaded"] is False and st["built_with_torch"] == "9.9.9+cu999"
    assert st["running_torch"] == torch.__version__
    assert "9.9.9+cu999" in st["reason"] and torch.__version__ in st["reason"]


@needs_so
def test_forced_cpp_with_extension_for_another_torch_names_both(tmp_path):
    path = _copy_package(tmp_path, "9.9.9")
    env = dict(os.environ, PYTHONPATH=str(path), CKPTREG_BACKEND="cpp")
    code = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "import ckptreg.ops as o\n"
        "from ckptreg.errors import BackendError\n"
        "try:\n    o.backend()\nexcept BackendError as e:\n    print(e.exit_code, e)\n"
    )
    r = _run([sys.executable, "-c", code], cwd=path, env=env)
    code_, msg = r.stdout.strip().split(" ", 1)
    assert code_ == "12"
    assert msg.startswith("CKPTREG_BACKEND=cpp but the cpp backend is not available (")
    assert "built against torch 9.9.9" in msg and torch.__version__ in msg


@needs_so
def test_extension_built_for_this_torch_is_loaded(tmp_path):
    out = _probe(_copy_package(tmp_path, torch.__version__))
    assert out["C_imported"] is True
    assert out["available"]["cpp"] is True and out["backend"] in ("cpp", "cuda")
    assert out["warnings"] == []
    assert out["status"] == {
        "loaded": True, "built_with_torch": torch.__version__, "running_torch": torch.__version__, "reason": None,
    }
    assert out["y"] == [6.5] * 5


def test_extension_status_in_this_process():
    st = ops.extension_status()
    assert st["loaded"] == ops.available()["cpp"]
    assert st["running_torch"] == torch.__version__
    assert (st["reason"] is None) == st["loaded"]


@pytest.mark.slow
@needs_git
def test_unpacked_sdist_builds_and_runs(sdist, tmp_path):
    """The sdist alone compiles (CPU extension, 2 jobs) and the built package (the tree a wheel
    is made of) imports, loads its extension, records the build torch and ships py.typed."""
    tgz, _ = sdist
    with tarfile.open(tgz) as tf:
        tf.extractall(tmp_path / "u", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (src,) = (tmp_path / "u").iterdir()
    env = dict(os.environ, CKPTREG_CUDA="0", MAX_JOBS="2")
    _run([sys.executable, "setup.py", "-q", "build", "--build-base", str(tmp_path / "b")], cwd=src, env=env)
    (lib,) = (tmp_path / "b").glob("lib*")
    pkg = lib / "ckptreg"
    assert list(pkg.glob("_C*.so")) or list(pkg.glob("_C*.pyd"))
    assert (pkg / "py.typed").exists()
    info = (pkg / "_build_info.py").read_text()
    assert f"TORCH_VERSION = {torch.__version__!r}" in info
    out = _probe(lib)
    assert out["C_imported"] is True and out["available"]["cpp"] is True
    assert out["status"]["built_with_torch"] == torch.__version__ and out["warnings"] == []
    assert out["y"] == [6.5] * 5

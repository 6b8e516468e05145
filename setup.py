"""Build script: the package plus the compiled extension ckptreg._C (owned by the kernels work)."""
from setuptools import setup

setup()

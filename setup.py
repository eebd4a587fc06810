"""Package metadata lives in pyproject.toml; this file exists for the C/C++/CUDA extension
(csrc/), which the compaction issue adds: a CUDAExtension when torch has CUDA and nvcc exists,
a CppExtension otherwise, and none when torch cannot be imported at build time (pip's build
isolation), in which case vtprune builds it on first use."""
from setuptools import setup

setup()

"""Package metadata lives in pyproject.toml; this file builds the compaction ops in csrc/ as
`vtprune._C`:
- a CUDAExtension (ops.cpp + compact.cu, -DWITH_CUDA) when torch has CUDA and nvcc exists,
- a CppExtension (ops.cpp, the CPU twin) otherwise,
- nothing when torch cannot be imported at build time, which is the case under pip's default
  build isolation (torch is deliberately not a build requirement: it would be downloaded again).
  vtprune then JIT-builds the same sources on first use (vtprune/kernels/_extension.py).
To build here: pip install --no-build-isolation -e .
"""
import os

from setuptools import setup


def extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return {}, []
    if os.environ.get("VTPRUNE_NO_EXTENSION") == "1":
        return {}, []
    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(here, "csrc")
    if torch.version.cuda is not None and CUDA_HOME is not None:
        if not torch.cuda.is_available():  # no GPU to detect the architecture from
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension("vtprune._C", ["csrc/ops.cpp", "csrc/compact.cu"], include_dirs=[csrc],
                            define_macros=[("WITH_CUDA", None)],
                            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    else:
        ext = CppExtension("vtprune._C", ["csrc/ops.cpp"], include_dirs=[csrc], extra_compile_args=["-O3"])
    return {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}, [ext]


cmdclass, ext_modules = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

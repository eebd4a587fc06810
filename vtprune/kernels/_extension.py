"""Finding the compiled ops (csrc/) at import time.

In order: the extension built by setup.py (`vtprune._C`, present after
`pip install --no-build-isolation -e .`); a JIT build of csrc/ with torch.utils.cpp_extension
(ninja) into ~/.cache/vtprune/torch_extensions, with CUDA when torch has it and nvcc exists;
and if both fail, None, with a warning that says why — callers then use the PyTorch reference.
VTPRUNE_NO_EXTENSION=1 skips the compiled ops altogether. A JIT build that has not been done yet
says so on stderr before it starts and when it is done (it takes seconds to minutes, silent
otherwise).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import time
import warnings

import torch

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
_state: dict = {}


def _cuda_build_possible() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    # A CUDA build of torch on a machine without a GPU (CI) builds the CPU ops only: the kernels
    # could not run, and CI compiles csrc/*.cu with nvcc separately.
    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


def _jit_build() -> None:
    from torch.utils.cpp_extension import load

    sources = [os.path.join(_CSRC, "ops.cpp")]
    flags = ["-O3"]  # the C++ standard is torch's choice (C++17 up to 2.13, C++20 from 2.14)
    with_cuda = _cuda_build_possible()
    if with_cuda:
        sources.append(os.path.join(_CSRC, "compact.cu"))
        flags.append("-DWITH_CUDA")
    missing = [s for s in sources if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"sources not found: {missing} (csrc/ ships with a source checkout)")
    # One build directory per torch build, source version and source checkout: upgrades never load
    # stale objects, and two checkouts never fight over one build.ninja (it names absolute paths,
    # so each would rebuild the other's objects).
    digest = hashlib.sha1(os.path.realpath(_CSRC).encode())
    for s in sources + [os.path.join(_CSRC, "compact.h")]:
        with open(s, "rb") as f:
            digest.update(f.read())
    tag = f"{torch.__version__}-{'cuda' if with_cuda else 'cpu'}-{digest.hexdigest()[:10]}".replace("+", "_")
    base = os.environ.get("VTPRUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vtprune"))
    build_dir = os.path.join(base, "torch_extensions", tag)
    os.makedirs(build_dir, exist_ok=True)
    # Built already (ninja then only checks it): load silently. Otherwise the compile takes tens of
    # seconds for the C++ ops (README "The compiled ops") and much longer with nvcc, so say so.
    first = not os.path.isfile(os.path.join(build_dir, "vtprune_ops.so"))
    if first:
        print(f"vtprune: building the compiled ops ({'C++ and CUDA' if with_cuda else 'C++'}, csrc/) into "
              f"{build_dir}, once per torch and source version"
              f"{' (longer with nvcc)' if with_cuda else ' (about 20 s)'} ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    with _build_lock(build_dir):
        load(name="vtprune_ops", sources=sources, extra_cflags=flags,
             extra_cuda_cflags=["-O3", "-DWITH_CUDA"] if with_cuda else None, extra_include_paths=[_CSRC],
             build_directory=build_dir, with_cuda=with_cuda, is_python_module=False, verbose=False)
    if first:
        print(f"vtprune: built the compiled ops in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)


# How long a process waits for another one's build of the same sources before it gives up and
# uses the PyTorch reference (a CUDA build with nvcc takes minutes; the C++ ops ~20 s).
BUILD_WAIT_S = 900


@contextlib.contextmanager
def _build_lock(build_dir: str):
    """Serialize builds of one build directory with an flock, which the kernel releases when its
    holder dies. torch's own lock (a `lock` file that a killed build leaves behind) would make
    every later process wait forever; whoever holds the flock knows that no build is running, so
    a `lock` file it finds is stale and is removed."""
    import fcntl

    with open(os.path.join(build_dir, "vtprune.flock"), "a") as f:
        t0, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - t0
                if waited > BUILD_WAIT_S:
                    raise TimeoutError(f"another process has been building the ops in {build_dir} for "
                                       f"{waited:.0f} s") from None
                if not told and waited > 2:
                    print(f"vtprune: waiting for another process's build of the compiled ops ({build_dir}) ...",
                          file=sys.stderr, flush=True)
                    told = True
                time.sleep(0.2)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(build_dir, "lock"))
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _one_line(e: Exception) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def load_ops() -> bool:
    """True when torch.ops.vtprune.* are the compiled ops (loaded once per process)."""
    if "ok" in _state:
        return _state["ok"]
    ok, reason = False, ""
    if os.environ.get("VTPRUNE_NO_EXTENSION") == "1":
        reason = "VTPRUNE_NO_EXTENSION=1"
    else:
        reasons = []
        spec = importlib.util.find_spec("vtprune._C")
        if spec is not None and spec.origin:
            try:
                torch.ops.load_library(spec.origin)
                ok = True
            except Exception as e:  # e.g. built against another torch: rebuild below
                reasons.append(f"vtprune._C: {_one_line(e)}")
        if not ok:
            try:
                _jit_build()
                ok = True
            except Exception as e:  # any build failure: fall back, loudly
                reasons.append(f"JIT build: {_one_line(e)}")
        reason = "; ".join(reasons)
    if not ok and reason != "VTPRUNE_NO_EXTENSION=1":
        warnings.warn(f"vtprune: compiled compaction ops unavailable ({reason}); using the slower PyTorch "
                      f"reference implementation", RuntimeWarning, stacklevel=2)
    _state["ok"] = ok
    _state["reason"] = reason
    return ok


def has_cuda_kernels() -> bool:
    """True when the loaded ops include the CUDA implementation."""
    return load_ops() and torch._C._dispatch_has_kernel_for_dispatch_key("vtprune::gather_tokens", "CUDA")

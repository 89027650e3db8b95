"""The compiled kernels of ``csrc/`` as the module ``drkl_kernels._C``.

An ahead-of-time build (``pip install -e . --no-build-isolation`` with torch
importable; see setup.py) is used when present. Otherwise the first use builds
``csrc/`` just in time with ``torch.utils.cpp_extension.load`` (ninja), cached
in torch's extension directory, and prints one line before and one after.
``DRKL_KERNELS_JIT=1`` skips the ahead-of-time module (to rebuild after
editing ``csrc/``). The CUDA kernels are compiled in when torch has CUDA and
nvcc is found.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path
from subprocess import SubprocessError

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CPU_SOURCES = ("bindings.cpp", "drkl_cpu.cpp")
CUDA_SOURCES = ("drkl_cuda.cu", "drkl_cuda_sm90.cu")
CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
NVCC_FLAGS = ["-O3", "-lineinfo"]
LD_FLAGS = ["-fopenmp"]


class BuildError(RuntimeError):
    """The compiled kernels are neither built nor buildable here."""


def nvcc_path() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def cuda_buildable() -> bool:
    """Whether a just-in-time build would include the CUDA kernels."""
    return torch.version.cuda is not None and nvcc_path() is not None


def missing_tools() -> list[str]:
    """What a just-in-time build needs and this machine lacks (empty when it can build)."""
    missing = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ('{cxx}' is not on PATH; install g++ or set CXX)")
    if shutil.which("ninja") is None:
        missing.append("ninja (pip install ninja)")
    if not all((CSRC / name).exists() for name in CPU_SOURCES):
        missing.append(f"the csrc/ sources (not found at {CSRC}; build from a source checkout)")
    return missing


def prebuilt():
    """The ahead-of-time module, or None (never builds anything)."""
    if os.environ.get("DRKL_KERNELS_JIT") == "1":
        return None
    try:
        from . import _C
    except ImportError:
        return None
    return _C


def available() -> bool:
    """True when the compiled kernels are built, or can be built without downloading anything."""
    return prebuilt() is not None or not missing_tools()


@functools.cache
def load():
    """The compiled module, building it just in time if needed; raises BuildError naming what is missing."""
    module = prebuilt()
    if module is not None:
        return module
    missing = missing_tools()
    if missing:
        raise BuildError("the compiled kernels are not built and cannot be built here: missing " + "; ".join(missing))
    from torch.utils import cpp_extension

    with_cuda = cuda_buildable()
    sources = [str(CSRC / name) for name in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    print(f"drkl_kernels: building csrc/ just in time ({'CPU + CUDA' if with_cuda else 'CPU'} kernels; cached for later runs)", flush=True)
    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name="drkl_kernels_C", sources=sources, extra_include_paths=[str(CSRC)],
            extra_cflags=CXX_FLAGS + (["-DDRKL_WITH_CUDA"] if with_cuda else []),
            extra_cuda_cflags=NVCC_FLAGS, extra_ldflags=LD_FLAGS, with_cuda=with_cuda,
        )  # fmt: skip
    except (OSError, RuntimeError, SubprocessError) as err:
        raise BuildError(f"building csrc/ failed: {err}") from err
    print(f"drkl_kernels: csrc/ ready in {time.perf_counter() - start:.1f} s", flush=True)
    return module

"""Build of drkl_kernels, including drkl_kernels._C ahead of time when torch is importable
(``pip install -e . --no-build-isolation``): the CPU kernels always, the CUDA kernels when the
installed torch has CUDA and nvcc is found, for TORCH_CUDA_ARCH_LIST (default "8.0;9.0a").
Without torch at build time nothing is compiled and the first use builds csrc/ just in time.
DRKL_KERNELS_NO_BUILD=1 skips the ahead-of-time build.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def extension_modules():
    if os.environ.get("DRKL_KERNELS_NO_BUILD") == "1":
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    spec = importlib.util.spec_from_file_location("_drkl_extension", ROOT / "drkl_kernels" / "extension.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    with_cuda = ext.cuda_buildable()
    sources = [f"csrc/{name}" for name in ext.CPU_SOURCES + (ext.CUDA_SOURCES if with_cuda else ())]
    cflags = ext.CXX_FLAGS + (["-DDRKL_WITH_CUDA"] if with_cuda else [])
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        os.environ.setdefault("CUDA_HOME", str(Path(ext.nvcc_path()).parent.parent))
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    module = kind(
        "drkl_kernels._C", sources, include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cflags, "nvcc": ext.NVCC_FLAGS}, extra_link_args=ext.LD_FLAGS,
    )  # fmt: skip
    return [module], {"build_ext": cpp_extension.BuildExtension}


modules, commands = extension_modules()
setup(ext_modules=modules, cmdclass=commands)

"""The CUDA kernels compiled once per test session, without a GPU: cubin, PTX, ptxas report and SASS.

The .cu files hold no torch headers, so nvcc builds them with torch's flags: about 200 CPU seconds
for the four builds here. ``start`` (conftest calls it at collection) or the first request queues
every build in the background (``background``: one at a time, at the lowest priority), and each
request waits for its own. Results live in a temporary folder for the session.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from drkl_kernels import extension

from . import background, sass

NVCC = extension.nvcc_path()
NVDISASM = sass.nvdisasm_path()
TORCH_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "-std=c++17",
]  # fmt: skip
ARCHS = {"sm_80": "-gencode=arch=compute_80,code=sm_80", "sm_90a": "-gencode=arch=compute_90a,code=sm_90a"}
BUILDS = [(source, arch) for source in extension.CUDA_SOURCES for arch in ARCHS]


@dataclass
class Build:
    source: str
    arch: str
    report: list[dict]  # ptxas: one entry per kernel
    ptx: str
    sass: str | None  # None without nvdisasm


@functools.cache
def _folder() -> Path:
    path = Path(tempfile.mkdtemp(prefix="drkl_cuda_build_"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def _started() -> dict:
    """Every build, queued: (source, arch) -> (background job, output folder)."""
    jobs = {}
    for source, arch in BUILDS:
        out = _folder() / f"{Path(source).stem}_{arch}"
        out.mkdir()
        cmd = [NVCC, *TORCH_FLAGS, *extension.NVCC_FLAGS, ARCHS[arch], "-Xptxas", "-v", "-cubin", "-keep",
               "-keep-dir", str(out), str(extension.CSRC / source), "-o", str(out / "k.cubin")]  # fmt: skip
        jobs[source, arch] = (background.BUILDS.submit(cmd, stdout=out / "log"), out)  # a file: read when its tests run
    return jobs


def start() -> None:
    """Queues every build in the background (once per session)."""
    _started()


@functools.cache
def build(source: str, arch: str) -> Build:
    job, out = _started()[source, arch]
    returncode = job.wait(timeout=1800)
    log = (out / "log").read_text()
    assert returncode == 0, log[-4000:]
    ptx = (out / f"{Path(source).stem}.ptx").read_text()
    text = None
    if NVDISASM is not None:
        text = subprocess.run([NVDISASM, "-c", str(out / "k.cubin")], capture_output=True, text=True, check=True).stdout
    return Build(source, arch, sass.ptxas_report(log), ptx, text)

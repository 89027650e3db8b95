"""The CUDA kernels compiled once per test session, without a GPU: cubin, PTX, ptxas report and SASS.

The .cu files hold no torch headers, so nvcc builds them with torch's flags. Each kernel costs
1.4 to 2.2 CPU seconds per GPU architecture in cicc and ptxas (72 kernels per architecture: 4
divergence and pivot pairs x 9 student/teacher dtype pairs, in two files; 200 CPU seconds in all),
so a session optimises the kernels of two dtype pairs (``PAIRS``: bf16/bf16, the one the SASS
budget is set for, and one more drawn with the session seed; over CI runs the seed draws every
pair; ``DRKL_TEST_ALL_KERNELS=1`` optimises all nine) through the preprocessor filter
``DRKL_CUDA_DTYPE_PAIRS`` of drkl_cuda_common.cuh, and checks every kernel of every pair with nvcc's
device front end (``-fdevice-syntax-only``: templates instantiated and type-checked, a few seconds
per file): about 60 CPU seconds in all. ``start`` (conftest calls it at collection) queues every
build in the background (``background``: one at a time, at the lowest priority), and each request
waits for its own. Results live in a temporary folder for the session.
"""

from __future__ import annotations

import functools
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

from drkl_kernels import extension

from . import background, sass
from .helpers import SEED

NVCC = extension.nvcc_path()
NVDISASM = sass.nvdisasm_path()
TORCH_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "-std=c++17",
]  # fmt: skip
ARCHS = {"sm_80": "-gencode=arch=compute_80,code=sm_80", "sm_90a": "-gencode=arch=compute_90a,code=sm_90a"}
BUILDS = [(source, arch) for source in extension.CUDA_SOURCES for arch in ARCHS]
DTYPES = {"fp32": 0, "bf16": 1, "fp16": 2}  # drkl_dtype codes (csrc/drkl_launch.h)
ALL_PAIRS = [(s, t) for s in DTYPES for t in DTYPES]
BUDGET_PAIR = ("bf16", "bf16")
DRAWN = random.Random(f"{SEED}-cuda-pairs").choice([p for p in ALL_PAIRS if p != BUDGET_PAIR])
PAIRS = ALL_PAIRS if os.environ.get("DRKL_TEST_ALL_KERNELS") == "1" else [BUDGET_PAIR, DRAWN]
PAIR_MASK = sum(1 << (3 * DTYPES[s] + DTYPES[t]) for s, t in PAIRS)


@dataclass
class Build:
    source: str
    arch: str
    report: list[dict]  # ptxas: one entry per kernel
    ptx: str
    sass: str | None  # None without nvdisasm


@functools.cache
def _folder() -> Path:
    return background.scratch("drkl_cuda_build_")


def front_end_command(path: Path, out: Path, archs: tuple[str, ...] = tuple(ARCHS)) -> list[str]:
    """nvcc's device front end over every kernel of the .cu file ``path`` for ``archs`` (no device code)."""
    return [NVCC, *TORCH_FLAGS, *extension.NVCC_FLAGS, *(ARCHS[a] for a in archs), "-fdevice-syntax-only", "-c",
            str(path), "-o", str(out / "front_end.o")]  # fmt: skip


@functools.cache
def _started() -> dict:
    """Every build, queued: (source, arch) -> (background job, output folder); (source, "front end") likewise."""
    jobs = {}
    for source in extension.CUDA_SOURCES:  # first: a few seconds each
        out = _folder() / f"{Path(source).stem}_front_end"
        out.mkdir()
        job = background.JOBS.submit(front_end_command(extension.CSRC / source, out), stdout=out / "log")
        jobs[source, "front end"] = (job, out)
    for source, arch in BUILDS:
        out = _folder() / f"{Path(source).stem}_{arch}"
        out.mkdir()
        cmd = [NVCC, *TORCH_FLAGS, *extension.NVCC_FLAGS, ARCHS[arch], f"-DDRKL_CUDA_DTYPE_PAIRS={PAIR_MASK}",
               "-Xptxas", "-v", "-cubin", "-keep", "-keep-dir", str(out), str(extension.CSRC / source),
               "-o", str(out / "k.cubin")]  # fmt: skip
        jobs[source, arch] = (background.JOBS.submit(cmd, stdout=out / "log"), out)  # a file: read when its tests run
    return jobs


def start() -> None:
    """Queues every build in the background (once per session; nothing without nvcc)."""
    if NVCC is not None:
        _started()


@functools.cache
def build(source: str, arch: str) -> Build:
    job, out = _started()[source, arch]
    job.succeed(timeout=1800)
    log = (out / "log").read_text()
    ptx = (out / f"{Path(source).stem}.ptx").read_text()
    text = None
    if NVDISASM is not None:
        text = subprocess.run([NVDISASM, "-c", str(out / "k.cubin")], capture_output=True, text=True, check=True).stdout
    return Build(source, arch, sass.ptxas_report(log), ptx, text)


@functools.cache
def front_end(source: str) -> str:
    """The log of the front-end check of every kernel of ``source`` (fails the caller on an error)."""
    job, out = _started()[source, "front end"]
    job.succeed(timeout=1800)
    return (out / "log").read_text()


"""Building and finding the compiled kernels: the just-in-time build, and a machine without a compiler."""

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from . import background

ROOT = Path(__file__).resolve().parents[1]


def _env(**env) -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **env}


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=900
    )


@functools.cache
def just_in_time_build() -> tuple[background.Job, Path]:
    """(job, its folder): the child process of ``test_just_in_time_build_says_so``, a first use of the
    cpu backend without the ahead-of-time module, building into its folder with one compile job;
    queued at collection (``background``), so it builds on the core the other tests leave idle."""
    directory = background.scratch("drkl-jit-")
    code = "import torch, drkl_kernels as dk\nz = torch.randn(2, 50)\nprint(float(dk.rkl_loss(z, z.flip(-1), backend='cpu')))"
    env = _env(DRKL_KERNELS_JIT="1", TORCH_EXTENSIONS_DIR=str(directory / "build"), MAX_JOBS="1")
    out, err = directory / "stdout", directory / "stderr"
    return background.JOBS.submit([sys.executable, "-c", code], stdout=out, stderr=err, cwd=ROOT, env=env), directory


@pytest.mark.background(start=just_in_time_build)
def test_just_in_time_build_says_so():
    """Without the ahead-of-time module the first use builds csrc/, announcing it and its duration."""
    job, directory = just_in_time_build()
    job.succeed(timeout=900)
    lines = (directory / "stdout").read_text().splitlines()
    assert lines[0].startswith("drkl_kernels: building csrc/ just in time"), lines
    assert re.fullmatch(r"drkl_kernels: csrc/ ready in \d+\.\d s", lines[1]), lines
    assert float(lines[2]) > 0


def test_missing_compiler_is_named_and_auto_falls_back(tmp_path):
    code = """
import warnings, torch, drkl_kernels as dk
z = torch.randn(2, 50)
try:
    dk.rkl_loss(z, z, backend="cpu")
except ValueError as err:
    print("ERROR", err)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    dk.rkl_loss(z, z)
    dk.rkl_loss(z, z)
print("WARNINGS", len(caught), caught[0].message if caught else "")
print("BACKENDS", dk.available_backends())
"""
    out = _python(code, DRKL_KERNELS_JIT="1", CXX="/nonexistent/c++", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr[-4000:]
    assert "ERROR backend 'cpu' is not available here (a C++ compiler ('/nonexistent/c++' is not on PATH" in out.stdout
    assert (
        "WARNINGS 1 drkl_kernels: backend 'cpu' is unavailable" in out.stdout
        and "'auto' uses 'reference'" in out.stdout
    )
    # without the compiled kernels: the reference, and Triton where a GPU runs it (not interpreted here)
    assert f"BACKENDS {['reference'] + (['triton'] if torch.cuda.is_available() else [])}" in out.stdout

"""Building and finding the compiled kernels: the just-in-time build, and a machine without a compiler."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=900)


def test_just_in_time_build_says_so(tmp_path):
    """Without the ahead-of-time module the first use builds csrc/, announcing it and its duration."""
    code = "import torch, drkl_kernels as dk\nz = torch.randn(2, 50)\nprint(float(dk.rkl_loss(z, z.flip(-1), backend='cpu')))"
    out = _python(code, DRKL_KERNELS_JIT="1", TORCH_EXTENSIONS_DIR=str(tmp_path), MAX_JOBS="2")
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.splitlines()
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
    assert "WARNINGS 1 drkl_kernels: backend 'cpu' is unavailable" in out.stdout and "'auto' uses 'reference'" in out.stdout
    assert "BACKENDS ['reference']" in out.stdout

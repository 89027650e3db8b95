"""Every CUDA kernel compiles with torch's flags for sm_80 and sm_90a, without register spills.

The .cu files hold no torch headers, so nvcc checks them in seconds without a GPU or a
CUDA build of torch. The report (registers, spills per kernel) is printed with -s.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from drkl_kernels import extension

NVCC = extension.nvcc_path()
TORCH_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "-std=c++17",
]  # fmt: skip
ARCHS = {"sm_80": ["-arch=sm_80"], "sm_90a": ["-gencode=arch=compute_90a,code=sm_90a"]}


def ptxas_report(text: str) -> list[dict]:
    """One entry per compiled kernel: name, registers, spill stores and loads, stack frame."""
    kernels, current = [], None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            current = {"kernel": m.group(1)}
            kernels.append(current)
        elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
    return kernels


def demangle(names: list[str]) -> list[str]:
    if shutil.which("c++filt") is None:
        return names
    return subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", extension.CUDA_SOURCES)
def test_cuda_kernels_compile_without_spills(source, arch, tmp_path):
    src = Path(extension.CSRC) / source
    cmd = [NVCC, *TORCH_FLAGS, *extension.NVCC_FLAGS, *ARCHS[arch], "-Xptxas", "-v", "-c", str(src), "-o", str(tmp_path / "k.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    report = ptxas_report(out.stdout + out.stderr)
    assert report, "ptxas reported no kernels"
    for entry, name in zip(report, demangle([r["kernel"] for r in report])):
        print(f"{arch} {name}: {entry['registers']} registers, stack {entry['stack']} B, "
              f"spills {entry['spill_stores']}/{entry['spill_loads']} B")  # fmt: skip
    spilled = [r["kernel"] for r in report if r["spill_stores"] or r["spill_loads"] or r["stack"]]
    assert not spilled, f"register spills or stack use in {spilled}"

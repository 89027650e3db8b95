"""Every CUDA kernel compiles with torch's flags for sm_80 and sm_90a without register spills, and
its PTX keeps the memory rules a GPU would otherwise break at run time (no GPU needed).

The report (registers, spills per kernel) is printed with -s.
"""

import re

import pytest

from . import sass
from .cuda_build import BUILDS, NVCC, build

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME)")

# Kernels per file: 4 divergence/pivot pairs x 9 student/teacher dtype pairs (+ 3 scale kernels).
KERNELS = {"drkl_cuda.cu": 39, "drkl_cuda_sm90.cu": 36}


@pytest.mark.parametrize("source,arch", BUILDS)
def test_cuda_kernels_compile_without_spills(source, arch):
    b = build(source, arch)
    assert len(b.report) == KERNELS[source], [r["kernel"] for r in b.report]
    for entry, name in zip(b.report, sass.demangle([r["kernel"] for r in b.report])):
        print(f"{arch} {name}: {entry['registers']} registers, stack {entry['stack']} B, "
              f"spills {entry['spill_stores']}/{entry['spill_loads']} B")  # fmt: skip
    spilled = [r["kernel"] for r in b.report if r["spill_stores"] or r["spill_loads"] or r["stack"]]
    assert not spilled, f"register spills or stack use in {spilled}"


def test_shared_memory_is_never_read_as_global_memory():
    """Issue 8, defect 1: an ld.global (through __ldg) of a shared-memory address faults on a GPU.
    The single-pass kernel reads its span with shared loads and its scalars from global memory."""
    ptx = build("drkl_cuda_sm90.cu", "sm_90a").ptx
    assert "cp.async.bulk.shared::cluster.global" in ptx and "ld.shared" in ptx
    assert sass.global_loads_from_shared(ptx) == []


@pytest.mark.parametrize("source", list(KERNELS))
def test_memory_the_kernel_writes_is_read_coherently(source):
    """Issue 8, defect 5: the student (which the gradient may overwrite in place) is never read
    through the non-coherent path; the teacher is; scale_kernel reads what it writes."""
    for name, body in sass.ptx_functions(build(source, "sm_90a").ptx).items():
        if "scale_kernel" in name:
            assert "ld.global.nc" not in body, name
            continue
        assert sass.nc_loads_of_param(name, body, 0) == [], name
        assert sass.nc_loads_of_param(name, body, 8), name  # the teacher's loads are found


def test_single_pass_kernel_traps_when_built_for_older_gpus():
    """Issue 8, defect 2: built from compute_80 PTX (e.g. TORCH_CUDA_ARCH_LIST="8.0+PTX" on an H100)
    the single-pass kernel's body is a trap, never an empty kernel that returns unwritten outputs
    (and the launcher checks the kernel's own PTX and binary versions before choosing it)."""
    functions = sass.ptx_functions(build("drkl_cuda_sm90.cu", "sm_80").ptx)
    assert len(functions) == KERNELS["drkl_cuda_sm90.cu"]
    for name, body in functions.items():
        assert re.search(r"^\s*trap;", body, flags=re.M), name


def test_the_shared_memory_check_can_fail():
    """The check above finds the defect it names: the same PTX with one of its shared loads turned
    into a global load (the __ldg of issue 8) is reported."""
    ptx = build("drkl_cuda_sm90.cu", "sm_90a").ptx
    line = next(line for line in ptx.splitlines() if line.strip().startswith("ld.shared"))
    found = sass.global_loads_from_shared(ptx.replace(line, line.replace("ld.shared", "ld.global.nc", 1), 1))
    assert found == [line.strip().replace("ld.shared", "ld.global.nc", 1)]

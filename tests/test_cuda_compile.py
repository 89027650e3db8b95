"""Every CUDA kernel passes nvcc's device front end with torch's flags for sm_80 and sm_90a; the
kernels of this session's dtype pairs (``cuda_build.PAIRS``) compile without register spills, and
their PTX keeps the memory rules a GPU would otherwise break at run time (no GPU needed).

The report (registers, spills per kernel) is printed with -s.
"""

import re
import shutil
import subprocess

import pytest

from drkl_kernels import extension

from . import cuda_build, sass
from .cuda_build import ALL_PAIRS, BUILDS, DTYPES, NVCC, PAIRS, build, front_end, front_end_command

pytestmark = [
    pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME)"),
    pytest.mark.background(start=cuda_build.start),
]

# Kernels per file: 4 divergence/pivot pairs x the session's student/teacher dtype pairs (+ 3 scale kernels).
KERNELS = {"drkl_cuda.cu": 4 * len(PAIRS) + 3, "drkl_cuda_sm90.cu": 4 * len(PAIRS)}
CXX_TYPES = {"fp32": "float", "bf16": "__nv_bfloat16", "fp16": "__half"}


@pytest.mark.parametrize("source", list(KERNELS))
def test_every_kernel_passes_the_device_front_end(source):
    """All nine dtype pairs, both architectures: templates instantiated and type-checked (fails on
    nvcc's error, with its log)."""
    front_end(source)


def test_the_front_end_check_sees_the_pairs_left_out(tmp_path):
    """A defect in the kernel of one dtype pair that this session does not optimise fails the check
    (sm_80), which names the pair."""
    student, teacher = next((p for p in ALL_PAIRS if p not in PAIRS), ("fp16", "fp32"))
    csrc = shutil.copytree(extension.CSRC, tmp_path / "csrc")
    anchor = "  constexpr int Q = Widths<sizeof(TS), sizeof(TT)>::Q;\n"  # the two-pass kernel's first line
    text = (csrc / "drkl_cuda.cu").read_text()
    assert text.count(anchor) == 1
    check = f'static_assert(dtype_code<TS>() != {DTYPES[student]} || dtype_code<TT>() != {DTYPES[teacher]}, "defect");'
    (csrc / "drkl_cuda.cu").write_text(text.replace(anchor, anchor + check + "\n"))
    cmd = front_end_command(csrc / "drkl_cuda.cu", tmp_path, archs=("sm_80",))
    out = subprocess.run(cmd, capture_output=True, text=True)
    log = out.stdout + out.stderr
    assert out.returncode != 0 and 'static assertion failed with "defect"' in log, log[-2000:]
    assert f"TS={CXX_TYPES[student]}, TT={CXX_TYPES[teacher]}" in log, log[-2000:]


@pytest.mark.parametrize("source,arch", BUILDS)
def test_cuda_kernels_compile_without_spills(source, arch):
    b = build(source, arch)
    names = sass.demangle([r["kernel"] for r in b.report])
    assert len(b.report) == KERNELS[source], names
    built = {m.group(1, 2) for m in re.finditer(r"kernel<\d, \d, (\w+), (\w+)>", " ".join(names))}
    assert built == {(CXX_TYPES[s], CXX_TYPES[t]) for s, t in PAIRS}, names
    for entry, name in zip(b.report, names):
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

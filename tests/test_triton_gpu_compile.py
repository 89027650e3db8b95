"""The Triton kernel variants compile for real GPUs (sm_80, sm_90a) without spilling registers.

The interpreter accepts code the GPU compiler rejects; this compiles a covering set of the
variants (``triton_gpu_compile.VARIANTS``) with triton.compile in a separate process without
TRITON_INTERPRET (never imported here: it must not touch this process's Triton), queued at
collection in the background (``background``), then reads the ptxas report of each compile.
"""

import functools
import json
import os
import sys
from itertools import product
from pathlib import Path

import pytest

from . import background

DTYPES = {"fp32", "bf16", "fp16"}
# Every value each switch of divergence_kernel takes in a launch.
SWITCHES = {
    "DIVERGENCE": {"DRKL", "RKL", "FKL"}, "PIVOT": {"LABEL", "TEACHER_ARGMAX", "STUDENT_ARGMAX"},
    "HAS_LABEL": {True, False}, "PHASE": {"FUSED", "PARTIAL", "FINISH"}, "WRITE_GRAD": {True, False},
    "MEAN_SCALE": {True, False}, "ENTROPY": {True, False}, "Z_CAP": {True, False}, "U_CAP": {True, False},
    "student": DTYPES, "teacher": DTYPES, "target": {"i32", "i64", None},
}  # fmt: skip


@functools.cache
def compiles() -> tuple[background.Job, Path]:
    """(job, its folder): ``python -m tests.triton_gpu_compile``, queued at collection (``background``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    base = background.scratch("drkl-triton-gpu-")
    cmd = [sys.executable, "-m", "tests.triton_gpu_compile"]
    root = Path(__file__).resolve().parents[1]
    return background.JOBS.submit(cmd, stdout=base / "stdout", stderr=base / "stderr", cwd=root, env=env), base


@pytest.mark.background(start=compiles)
def test_triton_kernels_compile_for_sm80_and_sm90_without_spills():
    job, base = compiles()
    job.succeed(timeout=1200)
    reports = [json.loads(line) for line in (base / "stdout").read_text().splitlines() if line.startswith("{")]
    print("\n".join(f"{r['arch']} {r['kernel']} {r['switches']}: {r['registers']} registers, "
                    f"spills {r['spill_stores']}/{r['spill_loads']} B" for r in reports))  # fmt: skip
    for arch in ("sm_80", "sm_90a"):
        variants = [r["switches"] for r in reports if r["arch"] == arch and r["kernel"] == "divergence_kernel"]
        for name, values in SWITCHES.items():
            assert {v[name] for v in variants} == values, (arch, name)
        assert {(v["student"], v["teacher"]) for v in variants} == set(product(DTYPES, DTYPES)), arch
        assert {(v["DIVERGENCE"], v["PHASE"]) for v in variants} == set(
            product(SWITCHES["DIVERGENCE"], SWITCHES["PHASE"])), arch  # fmt: skip
        scaled = {r["switches"]["student"] for r in reports if r["arch"] == arch and r["kernel"] == "scale_rows_kernel"}
        assert scaled == DTYPES, arch
    spilled = [(r["arch"], r["kernel"], r["switches"]) for r in reports if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, f"register spills in {spilled}"

"""The Triton kernel variants compile for real GPUs (sm_80, sm_90a) without spilling registers.

The interpreter accepts code the GPU compiler rejects; this compiles a covering set of the
variants (``triton_gpu_compile.VARIANTS``) with triton.compile in a separate process without
TRITON_INTERPRET (never imported here: it must not touch this process's Triton), then reads
the ptxas report of each compile.
"""

import json
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

DTYPES = {"fp32", "bf16", "fp16"}
# Every value each switch of divergence_kernel takes in a launch.
SWITCHES = {
    "DIVERGENCE": {"DRKL", "RKL", "FKL"}, "PIVOT": {"LABEL", "TEACHER_ARGMAX", "STUDENT_ARGMAX"},
    "HAS_LABEL": {True, False}, "PHASE": {"FUSED", "PARTIAL", "FINISH"}, "WRITE_GRAD": {True, False},
    "MEAN_SCALE": {True, False}, "ENTROPY": {True, False}, "Z_CAP": {True, False}, "U_CAP": {True, False},
    "student": DTYPES, "teacher": DTYPES, "target": {"i32", "i64", None},
}  # fmt: skip


def test_triton_kernels_compile_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "tests.triton_gpu_compile"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
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

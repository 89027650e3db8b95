"""The SASS budget of the CUDA kernels (sm_90a, disassembled with nvdisasm; no GPU needed).

For every kernel built this session (``cuda_build.PAIRS``), the steady-state loops are the tile loops of drkl_partition.h: the pass-1 loop
(statistics; no global store) and the pass-2 loop (gradient; global stores) whose iterations cover
the most tokens. Tokens per iteration follow from the bytes an iteration moves: pass 1 loads
student + teacher once per token, pass 2 stores one student-dtype element per token. Instructions
per token are those of the shortest iteration (a tile that holds the label or a new top takes a
longer, rare branch). Budget (issue 8), bf16, DRKL with a label: <= 40 instructions per token for
the single-pass kernel's loss + gradient, <= 24 per pass for the two-pass kernel. Run with -s for
the table of the kernels built.
"""

import re

import pytest

from . import cuda_build, sass
from .cuda_build import NVCC, NVDISASM, PAIRS, build

pytestmark = [
    pytest.mark.skipif(NVCC is None or NVDISASM is None, reason="nvcc or nvdisasm not found (pip install nvidia-cuda-nvdisasm)"),
    pytest.mark.background(start=cuda_build.start),
]

BYTES = {"float": 4, "__nv_bfloat16": 2, "__half": 2}
SHORT = {"float": "fp32", "__nv_bfloat16": "bf16", "__half": "fp16"}
KINDS = {(2, 0): "drkl", (2, 1): "drkl, no label", (1, 2): "rkl", (0, 1): "fkl"}
BUDGET = {"single_pass_kernel": 40.0, "two_pass_kernel": 24.0}  # all passes; per pass


def steady_loops(source: str) -> list[dict]:
    """Per kernel: tokens and instructions of its steady-state statistics and gradient loops."""
    b = build(source, "sm_90a")
    per_kernel: dict[str, list] = {}
    for loop in sass.loops(b.sass):
        per_kernel.setdefault(loop.kernel, []).append(loop)
    names = dict(zip(per_kernel, sass.demangle(list(per_kernel))))
    registers = dict(zip(sass.demangle([r["kernel"] for r in b.report]), b.report))
    rows = []
    for kernel, loops in per_kernel.items():
        m = re.search(r"(\w+_kernel)<(\d), (\d), (\w+), (\w+)>", names[kernel])
        if not m:
            continue  # scale_kernel
        name, div, piv, ts, tt = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4), m.group(5)
        row = {"kernel": name, "kind": KINDS[div, piv], "dtypes": f"{SHORT[ts]}/{SHORT[tt]}",
               "registers": registers[names[kernel]]["registers"]}  # fmt: skip
        for phase in ("stats", "grad"):
            best = (0, 0)
            for loop in loops:
                stores = loop.bytes(("STG",))
                if (stores > 0) != (phase == "grad") or not loop.count("MUFU.EX2"):
                    continue
                tokens = stores // BYTES[ts] if stores else loop.bytes(("LDG", "LDS")) // (BYTES[ts] + BYTES[tt])
                best = max(best, (tokens, len(loop.insns)))  # the most tokens; of those the longest
            row[phase] = best
        rows.append(row)
    return rows


def per_token(row: dict, phase: str) -> float:
    tokens, insns = row[phase]
    return insns / tokens


@pytest.mark.parametrize("source", ["drkl_cuda_sm90.cu", "drkl_cuda.cu"])
def test_sass_instructions_per_token(source):
    rows = steady_loops(source)
    assert len(rows) == 4 * len(PAIRS)  # this session's dtype pairs (cuda_build.PAIRS), bf16/bf16 always
    print(f"\n{source} (sm_90a): SASS instructions per token in the steady-state loops")
    print("| kernel | divergence | student/teacher | pass 1 | pass 2 | total | registers |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["kind"], r["dtypes"])):
        s, g = per_token(r, "stats"), per_token(r, "grad")
        print(f"| {r['kernel']} | {r['kind']} | {r['dtypes']} | {s:.1f} | {g:.1f} | {s + g:.1f} | {r['registers']} |")
    for r in rows:
        assert r["stats"][0] == 16 and r["grad"][0] == 16, r  # the tile loops: 16 tokens per thread
    (budget,) = [r for r in rows if r["kind"] == "drkl" and r["dtypes"] == "bf16/bf16"]
    stats, grad = per_token(budget, "stats"), per_token(budget, "grad")
    if budget["kernel"] == "single_pass_kernel":
        assert stats + grad <= BUDGET["single_pass_kernel"], (stats, grad)
    else:
        assert max(stats, grad) <= BUDGET["two_pass_kernel"], (stats, grad)

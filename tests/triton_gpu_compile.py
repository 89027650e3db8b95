"""Compile every Triton kernel variant for a real GPU target (no GPU needed) and report ptxas usage.

Run as a script in a process without TRITON_INTERPRET; prints one JSON line per variant with the
registers, spill stores and spill loads that ptxas reports for sm_90a.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from drkl_kernels import triton_kernels as tk  # noqa: E402
from drkl_kernels.problem import Divergence, Pivot  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# The (divergence, pivot, has_label) triples the launcher can produce.
ROUTES = [
    (Divergence.DRKL, Pivot.LABEL, True),
    (Divergence.DRKL, Pivot.TEACHER_ARGMAX, False),
    (Divergence.RKL, Pivot.STUDENT_ARGMAX, True),
    (Divergence.RKL, Pivot.STUDENT_ARGMAX, False),
    (Divergence.FKL, Pivot.TEACHER_ARGMAX, True),
    (Divergence.FKL, Pivot.TEACHER_ARGMAX, False),
]
GRAD_MODES = [(False, False), (True, False), (True, True)]


def ptxas_usage(ptx: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                         capture_output=True, text=True, check=True)  # fmt: skip
    os.unlink(f.name)
    text = out.stdout + out.stderr
    return {
        "registers": int(re.search(r"Used (\d+) registers", text).group(1)),
        "spill_stores": int(re.search(r"(\d+) bytes spill stores", text).group(1)),
        "spill_loads": int(re.search(r"(\d+) bytes spill loads", text).group(1)),
    }


def compile_one(fn, signature, constexprs, warps) -> dict:
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET,
                            options={"num_warps": warps})  # fmt: skip
    return ptxas_usage(kernel.asm["ptx"])


def main() -> None:
    for dtype, name in TYPES.items():
        block, warps = tk.launch_config(256_000, dtype)
        for divergence, pivot, has_label in ROUTES:
            for write_grad, mean_scale in GRAD_MODES:
                sig = {
                    "z_ptr": f"*{name}", "u_ptr": f"*{name}", "t_ptr": "*i64", "loss_ptr": "*fp32",
                    "g_ptr": f"*{name}", "scale_ptr": "*fp32", "z_stride": "i64", "u_stride": "i64",
                    "g_stride": "i64", "V": "i32", "inv_tau": "fp32", "gamma": "fp32", "ignore_index": "i32",
                }  # fmt: skip
                consts = {
                    "DIVERGENCE": int(divergence), "PIVOT": int(pivot), "HAS_LABEL": has_label,
                    "WRITE_GRAD": write_grad, "MEAN_SCALE": mean_scale, "BLOCK": block,
                }  # fmt: skip
                sig.update({k: "constexpr" for k in consts})
                usage = compile_one(tk.divergence_kernel, sig, consts, warps)
                variant = f"divergence_kernel[{divergence.name},{pivot.name},label={has_label},grad={write_grad},mean={mean_scale},{name},BLOCK={block},warps={warps}]"
                print(json.dumps({"kernel": variant, **usage}), flush=True)
        sig = {"g_ptr": f"*{name}", "g_stride": "i64", "V": "i32", "w_ptr": "*fp32", "w_stride": "i64", "BLOCK": "constexpr"}
        usage = compile_one(tk.scale_rows_kernel, sig, {"BLOCK": block}, warps)
        print(json.dumps({"kernel": f"scale_rows_kernel[{name},BLOCK={block},warps={warps}]", **usage}), flush=True)


if __name__ == "__main__":
    sys.exit(main())

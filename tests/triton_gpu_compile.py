"""Compile a covering set of the Triton kernel variants for real GPU targets (no GPU needed) and
report ptxas usage.

Run as a script in a process without TRITON_INTERPRET; prints one JSON line per variant and
target (sm_80, sm_90a) with its switches, the registers, spill stores and spill loads from the
ptxas run of Triton's own compile. The switches are too many for their product (six routes,
three phases, gradient and mean scale, entropy, a soft cap per side, nine dtype pairs, two
target dtypes): ``VARIANTS`` holds every value of every switch, every phase with every
divergence, and for each route the heaviest variant (one launch with gradient, entropy and both
caps), the one that decides whether registers spill. Compiles run in parallel, one per core.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from drkl_kernels import triton_kernels as tk  # noqa: E402
from drkl_kernels.problem import Divergence, Pivot  # noqa: E402

TARGETS = {"sm_80": 80, "sm_90a": 90}
DTYPES = ("fp32", "bf16", "fp16")

# The (divergence, pivot, has_label) triples the launcher can produce.
ROUTES = [
    (Divergence.DRKL, Pivot.LABEL, True),
    (Divergence.DRKL, Pivot.TEACHER_ARGMAX, False),
    (Divergence.RKL, Pivot.STUDENT_ARGMAX, True),
    (Divergence.RKL, Pivot.STUDENT_ARGMAX, False),
    (Divergence.FKL, Pivot.TEACHER_ARGMAX, True),
    (Divergence.FKL, Pivot.TEACHER_ARGMAX, False),
]
# Student and teacher dtypes and the target's, turn by turn: all nine pairs over the list.
PAIRS = [(s, t) for s in DTYPES for t in DTYPES]


def _variant(i, route, phase, grad, mean, entropy, z_cap, u_cap) -> dict:
    divergence, pivot, has_label = route
    student, teacher = PAIRS[i % len(PAIRS)]
    return {
        "DIVERGENCE": divergence.name, "PIVOT": pivot.name, "HAS_LABEL": has_label, "PHASE": phase.name,
        "WRITE_GRAD": grad, "MEAN_SCALE": mean, "ENTROPY": entropy, "Z_CAP": z_cap, "U_CAP": u_cap,
        "student": student, "teacher": teacher, "target": ("i32", "i64")[i % 2] if has_label else None,
    }  # fmt: skip


def _variants() -> list[dict]:
    out = []
    for route in ROUTES:  # the heaviest variant of each route
        out.append(_variant(len(out), route, tk.Phase.FUSED, True, True, True, True, True))
    for k, route in enumerate(ROUTES[::2]):  # each divergence in each other phase (a record has no entropy switch)
        out.append(_variant(len(out), route, tk.Phase.PARTIAL, False, False, False, k == 0, k == 2))
        out.append(_variant(len(out), route, tk.Phase.FINISH, k != 2, k == 1, k != 0, k == 2, k == 1))
    for route in ROUTES[1::4]:  # the loss alone, without the options
        out.append(_variant(len(out), route, tk.Phase.FUSED, False, False, False, False, False))
    return out


VARIANTS = _variants()


def compile_usage(fn, signature: dict, constexprs: dict, capability: int, warps: int) -> dict:
    """Compile for ``capability`` and read ptxas's report of that compile."""
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and print nothing
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        triton.compile(ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}},
                                 constexprs=constexprs), target=GPUTarget("cuda", capability, 32),
                       options={"num_warps": warps, "maxnreg": tk.max_registers(warps)})  # fmt: skip
    text = log.getvalue()
    return {
        "registers": int(re.search(r"Used (\d+) registers", text).group(1)),
        "spill_stores": int(re.search(r"(\d+) bytes spill stores", text).group(1)),
        "spill_loads": int(re.search(r"(\d+) bytes spill loads", text).group(1)),
    }


def divergence_report(arch: str, v: dict) -> dict:
    block, warps = tk.launch_config(256_000)
    sig = {
        "z_ptr": f"*{v['student']}", "u_ptr": f"*{v['teacher']}", "t_ptr": f"*{v['target'] or 'fp32'}",
        "rec_ptr": "*fp32", "loss_ptr": "*fp32", "ent_ptr": "*fp32", "g_ptr": f"*{v['student']}", "scale_ptr": "*fp32",
        "z_stride": "i64", "u_stride": "i64", "g_stride": "i64", "V": "i32", "vocab_start": "i32", "vocab_total": "i32",
        "inv_tau": "fp32", "gamma": "fp32", "ignore_index": "i32",
        "z_scale": "fp32", "z_cap": "fp32", "u_scale": "fp32", "u_cap": "fp32",
    }  # fmt: skip
    consts = {k: v[k] for k in ("HAS_LABEL", "WRITE_GRAD", "MEAN_SCALE", "ENTROPY", "Z_CAP", "U_CAP")}
    consts.update(DIVERGENCE=int(Divergence[v["DIVERGENCE"]]), PIVOT=int(Pivot[v["PIVOT"]]),
                  PHASE=int(tk.Phase[v["PHASE"]]), BF16_BY_HAND=False, BLOCK=block)  # fmt: skip
    usage = compile_usage(tk.divergence_kernel, sig, consts, TARGETS[arch], warps)
    return {"arch": arch, "kernel": "divergence_kernel", "switches": v, "block": block, "warps": warps, **usage}


def scale_report(arch: str, dtype: str) -> dict:
    block, warps = tk.launch_config(256_000)
    sig = {"g_ptr": f"*{dtype}", "g_stride": "i64", "V": "i32", "w_ptr": "*fp32", "w_stride": "i64"}
    usage = compile_usage(tk.scale_rows_kernel, sig, {"BF16_BY_HAND": False, "BLOCK": block}, TARGETS[arch], warps)
    return {"arch": arch, "kernel": "scale_rows_kernel", "switches": {"student": dtype}, "block": block,
            "warps": warps, **usage}  # fmt: skip


def main() -> None:
    jobs = [(divergence_report, arch, v) for arch in TARGETS for v in VARIANTS]
    jobs += [(scale_report, arch, d) for arch in TARGETS for d in DTYPES]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = [pool.submit(fn, arch, arg) for fn, arch, arg in jobs]
        for future in futures:
            print(json.dumps(future.result()), flush=True)


if __name__ == "__main__":
    sys.exit(main())

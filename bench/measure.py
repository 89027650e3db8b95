"""Timing and memory measurement.

GPU: CUDA events around each call, after warm-up, rotating through enough copies of the
inputs that together they exceed twice the L2 cache (so small shapes are not flattered);
peak memory is ``torch.cuda.max_memory_allocated`` above what was allocated before the call.
CPU: each measurement runs in a child process (``python -m bench.child``): peak memory is
the peak resident set of one call (after a warm-up) above the resident set before it;
times come from ``time.perf_counter`` over the following calls.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .cases import DTYPES, Case, call, inputs, runner

ROOT = Path(__file__).resolve().parents[1]


def summarize(times_ms: list[float]) -> dict:
    q = statistics.quantiles(times_ms, n=4) if len(times_ms) > 1 else [times_ms[0]] * 3
    return {"median_ms": statistics.median(times_ms), "q1_ms": q[0], "q3_ms": q[2], "reps": len(times_ms)}


def gpu_copy_bandwidth(gib: float = 1.0, reps: int = 20) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read and written."""
    n = int(gib * 2**30)
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        dst.copy_(src)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        dst.copy_(src)
        end.record()
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in events)
    return 2 * n / (ms * 1e-3) / 1e9


def measure_gpu(name: str, case: Case, budget_s: float = 0.5, max_reps: int = 50) -> dict:
    r = runner(name)
    old = {k: os.environ.get(k) for k in r.env}
    os.environ.update(r.env)
    try:
        fn = r.build(case)
        set_bytes = case.elements * DTYPES[case.dtype].itemsize * 2
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
        copies = max(1, min(8, math.ceil(2 * l2 / set_bytes)))
        sets = [inputs(case, "cuda", seed=i) for i in range(copies)]
        for i in range(3):  # warm-up: compilation, autotuning, the allocator
            call(fn, case, *sets[i % copies])
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call(fn, case, *sets[0])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call(fn, case, *sets[1 % copies])
        end.record()
        torch.cuda.synchronize()
        reps = int(max(5, min(max_reps, budget_s / max(start.elapsed_time(end) * 1e-3, 1e-6))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (s, e) in enumerate(events):
            s.record()
            call(fn, case, *sets[i % copies])
            e.record()
        torch.cuda.synchronize()
        out = summarize([s.elapsed_time(e) for s, e in events])
        out["peak_bytes"] = peak
        return out
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure_cpu(name: str, case: Case, budget_s: float = 3.0, timeout_s: float = 900) -> dict:
    """Runs bench.child in a fresh process; returns its JSON (or raises with its stderr)."""
    spec = json.dumps({"runner": name, "case": case.__dict__, "budget_s": budget_s})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(runner(name).env, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-m", "bench.child", spec], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout_s)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_cpu(fn, case: Case, z, u, t, budget_s: float) -> dict:
    start = time.perf_counter()
    call(fn, case, z, u, t)
    first = time.perf_counter() - start
    reps = int(max(2, min(10, budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call(fn, case, z, u, t)
        times.append(1e3 * (time.perf_counter() - start))
    return summarize(times)

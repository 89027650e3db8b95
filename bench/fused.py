"""Fused linear benchmark: loss + gradient from both models' hidden states and LM heads.

Cases: divergence x [rows, H, V] x dtype (H the same for both models), the student's hidden
states and head trainable, 1 row in 8 ignored. Runners, all in the same run:

- ``fused``: ``dk.fused_linear_<divergence>_loss`` (backend "auto");
- ``dense``: both logits materialised (``hidden @ weight.T``), then ``dk.<divergence>_loss``
  on the same backend, autograd doing the matmuls' backward;
- ``trl``: TRL's ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` (what
  ``trl.DistillationTrainer`` uses; beta 1.0 reverse KL, 0.0 forward KL) and a masked mean;
- ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (beta 1.0 reverse KL, 0.0 forward KL,
  ``weight_hard_loss=0``, ``weight_soft_loss=1``; ``compiled=False`` on the CPU).

One child process per case (``python -m bench.fused '<json spec>'``) runs every runner: one
small warm-up call each, then timed calls interleaved round-robin (at least three rounds), so
that a shared machine's load falls on all runners alike, then one more call each under
``torch.profiler`` that gives the peak memory above the inputs (CPU: the resident set's
high-water mark, reset before the call; GPU: ``max_memory_allocated``) and the share of time in
matmuls (self time of aten mm/addmm over the call's time). Ratios are against ``fused`` in the
same run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import drkl_kernels as dk

from .measure import summarize

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FUSED = {"drkl": dk.fused_linear_drkl_loss, "rkl": dk.fused_linear_rkl_loss, "fkl": dk.fused_linear_fkl_loss}
LOGITS = {"drkl": dk.drkl_loss, "rkl": dk.rkl_loss, "fkl": dk.fkl_loss}
BETA = {"rkl": 1.0, "fkl": 0.0}  # TRL's and Liger's generalised JSD: beta 1 is reverse KL, 0 forward KL
CPU_SHAPES = [(4096, 1024, 32_000), (2048, 2048, 128_256)]
GPU_SHAPES = [(8192, 4096, 128_256)]
MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_"}


@dataclasses.dataclass(frozen=True)
class FusedCase:
    divergence: str
    rows: int
    hidden: int
    vocab: int
    dtype: str

    @property
    def label(self) -> str:
        return f"fused {self.divergence} [{self.rows}x{self.hidden}x{self.vocab}] {self.dtype}"


def matrix(device: str, shapes=None) -> list[FusedCase]:
    """RKL (the peers' divergence) and DRKL beside it on every shape; FKL, whose peers are RKL's
    with beta 0, on the first shape only, which bounds the run's time."""
    shapes = shapes or (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    dtype = "bf16" if device == "cuda" else "fp32"
    cases = [FusedCase(d, *shape, dtype) for shape in shapes for d in ("rkl", "drkl")]
    return cases[:2] + [FusedCase("fkl", *shapes[0], dtype)] + cases[2:]


def inputs(case: FusedCase, device: str, rows: int | None = None, seed: int = 0):
    """Hidden states and heads of both models (logits of standard deviation ~2), labels with 1 in 8 ignored."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = case.rows if rows is None else rows
    dtype = DTYPES[case.dtype]

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=gen, device=device)).to(dtype)

    hs, ht = randn(rows, case.hidden), randn(rows, case.hidden)
    ws, wt = (
        randn(case.vocab, case.hidden, scale=2 / case.hidden**0.5),
        randn(case.vocab, case.hidden, scale=2 / case.hidden**0.5),
    )
    t = torch.randint(0, case.vocab, (rows,), generator=gen, device=device)
    t[::8] = -100
    return hs, ws, ht, wt, t


def _fused(case: FusedCase, device: str) -> Callable:
    fn = FUSED[case.divergence]
    return lambda hs, ws, ht, wt, t: fn(hs, ws, ht, wt, t)


def _dense(case: FusedCase, device: str) -> Callable:
    fn = LOGITS[case.divergence]
    return lambda hs, ws, ht, wt, t: fn(hs @ ws.T, ht @ wt.T, t)


def _trl(case: FusedCase, device: str) -> Callable:
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    beta = BETA[case.divergence]

    def fn(hs, ws, ht, wt, t):
        divergence, _ = ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, beta)
        mask = (t != -100).to(divergence.dtype)
        return (divergence * mask).sum() / mask.sum().clamp(min=1)

    return fn


def _liger(case: FusedCase, device: str) -> Callable:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA[case.divergence],
                                   ignore_index=-100, compiled=device == "cuda")  # fmt: skip
    return lambda hs, ws, ht, wt, t: loss(hs, ws, ht, wt, t)


def _peer_why_not(module: str, name: str) -> Callable[[str, FusedCase], str | None]:
    def why_not(device: str, case: FusedCase) -> str | None:
        if case.divergence not in BETA:
            return f"{name} has no DRKL (it has reverse and forward KL; see those rows)"
        try:
            __import__(module)
        except ImportError as err:
            return f"{module} is not installed ({err})"
        return None

    return why_not


@dataclasses.dataclass
class Runner:
    name: str
    why_not: Callable[[str, FusedCase], str | None]
    build: Callable[[FusedCase, str], Callable]  # (case, device) -> fn(hs, ws, ht, wt, t) returning the loss
    peer: bool


RUNNERS = [
    Runner("fused", lambda d, c: None, _fused, False),
    Runner("dense", lambda d, c: None, _dense, True),
    Runner("trl", _peer_why_not("trl.kernels.chunked_divergence", "TRL's chunked divergence"), _trl, True),
    Runner("liger", _peer_why_not("liger_kernel.chunked_loss", "Liger-Kernel's fused linear JSD"), _liger, True),
]


def call(fn: Callable, hs, ws, ht, wt, t) -> None:
    """One training step's loss and backward, the student's hidden states and head trainable."""
    loss = fn(hs.detach().requires_grad_(True), ws.detach().requires_grad_(True), ht, wt, t)
    loss.backward()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1)) * 1024


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _profiled(fn: Callable, args, device: str) -> dict:
    """One call under the profiler: its time, the share in matmuls, and the peak memory above the inputs."""
    _sync(device)
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM)
        base = _status_bytes("VmRSS")
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else []
    )
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        call(fn, *args)
        _sync(device)
    wall_ms = 1e3 * (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else _status_bytes("VmHWM") - base
    events = prof.key_averages()
    if device == "cuda":
        total = sum(e.self_device_time_total for e in events) / 1e3
        matmul = sum(e.self_device_time_total for e in events if e.key in MATMULS) / 1e3
    else:
        total, matmul = wall_ms, sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e3
    return {"peak_bytes": max(0, peak), "matmul_share": matmul / total if total else None, "profiled_ms": wall_ms}


def child(spec: dict) -> dict:
    """Measures every runner of one case in this process (see the module docstring)."""
    warnings.filterwarnings("ignore")
    device, case = spec["device"], FusedCase(**spec["case"])
    fns = {r.name: r.build(case, device) for r in RUNNERS if r.name in spec["runners"]}
    args = inputs(case, device)
    small = inputs(case, device, rows=min(case.rows, 64))
    for fn in fns.values():  # warm-up: thread pools, library initialisation, compilation
        call(fn, *small)
    times = {name: [] for name in fns}
    rounds = 3
    while len(times[next(iter(fns))]) < rounds:
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            call(fn, *args)
            _sync(device)
            times[name].append(1e3 * (time.perf_counter() - start))
        slowest = max(max(t) for t in times.values()) * 1e-3
        rounds = int(max(3, min(10, spec["budget_s"] / max(slowest, 1e-6))))
    out = {
        name: _profiled(fn, args, device) for name, fn in fns.items()
    }  # after the timed calls: nothing one-time left
    for name, entry in out.items():
        entry.update(summarize(times[name]), threads=torch.get_num_threads())
    return out


def measure(device: str, case: FusedCase, runners: list[str], budget_s: float, timeout_s: float = 4 * 3600) -> dict:
    """Runs ``child`` in a fresh process; returns its JSON (or raises with its stderr)."""
    spec = json.dumps({"device": device, "case": case.__dict__, "runners": runners, "budget_s": budget_s})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors go back to the kernel: the next call's peak is its own
    out = subprocess.run([sys.executable, "-m", "bench.fused", spec], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout_s)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(device: str, cases: list[FusedCase], budget_s: float, deadline: float = float("inf")) -> list[dict]:
    """Every case with every runner; a runner that cannot run says why ("n/a: ...")."""
    rows = []
    for case in cases:
        entries = {r.name: {"case": case.__dict__, "runner": r.name, "peer": r.peer, "status": "ok"} for r in RUNNERS}
        for r in RUNNERS:
            reason = r.why_not(device, case)
            if reason is None and time.monotonic() > deadline:
                reason = "skipped: the run's time limit (--deadline) was spent"
            if reason is not None:
                entries[r.name]["status"] = f"n/a: {reason}"
        ready = [name for name, e in entries.items() if e["status"] == "ok"]
        if ready:
            try:
                for name, result in measure(device, case, ready, budget_s).items():
                    entries[name].update(result)
            except Exception as err:  # noqa: BLE001 (a failing case is reported, not hidden)
                for name in ready:
                    entries[name]["status"] = f"n/a: failed ({type(err).__name__}: {err})"[:300]
        derive(list(entries.values()))
        for e in entries.values():
            print(_line(e), flush=True)
        rows += entries.values()
    return rows


def derive(entries: list[dict]) -> None:
    """Time and peak memory of each runner of one case as multiples of ``fused``'s."""
    ours = next((e for e in entries if e["runner"] == "fused" and e["status"] == "ok"), None)
    for e in entries:
        if ours is not None and e["status"] == "ok":
            e["time_vs_fused"] = e["median_ms"] / ours["median_ms"]
            e["memory_vs_fused"] = e["peak_bytes"] / ours["peak_bytes"] if ours["peak_bytes"] else None


def _line(e: dict) -> str:
    label = FusedCase(**e["case"]).label
    if e["status"] != "ok":
        return f"{label:<40} {e['runner']:<7} {e['status']}"
    return (f"{label:<40} {e['runner']:<7} {e['median_ms']:>10.1f} ms  peak {e['peak_bytes'] / 2**20:>8.0f} MiB  "
            f"matmuls {100 * e['matmul_share']:.0f}%")  # fmt: skip


def table(rows: list[dict]) -> str:
    """Markdown: one line per case and runner."""
    head = [
        "case",
        "runner",
        "median ms (IQR)",
        "peak MiB above inputs",
        "time in matmuls",
        "time / fused",
        "memory / fused",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in rows:
        label = FusedCase(**e["case"]).label
        if e["status"] != "ok":
            out.append(f"| {label} | {e['runner']} | {e['status']} |" + " |" * (len(head) - 3))
            continue
        share = e.get("matmul_share")
        mem = e.get("memory_vs_fused")
        out.append("| " + " | ".join([
            label, e["runner"], f"{e['median_ms']:.0f} ({e['q1_ms']:.0f}-{e['q3_ms']:.0f})", f"{e['peak_bytes'] / 2**20:.0f}",
            "-" if share is None else f"{100 * share:.0f}%", f"{e['time_vs_fused']:.2f}x", "-" if mem is None else f"{mem:.2f}x",
        ]) + " |")  # fmt: skip
    return "\n".join(out)


def goals(rows: list[dict]) -> str:
    """Issue 9's goals per shape, from the rows: RKL against TRL and Liger (time, at no more peak
    memory), and against the dense baseline (within 1.15x of its time at <= 1/4 of its memory)."""
    lines = []
    for e in rows:
        c = FusedCase(**e["case"])
        if e["runner"] == "fused" or e["status"] != "ok" or c.divergence != "rkl":
            continue
        speed = e["time_vs_fused"]
        mem = e.get("memory_vs_fused")
        shape = f"[{c.rows}x{c.hidden}x{c.vocab}] {c.dtype}"
        ratio = None if not mem else 1 / mem
        if e["runner"] == "dense":
            met = 1 / speed <= 1.15 and ratio is not None and ratio <= 0.25
            lines.append(f"- {shape}: fused takes {1 / speed:.2f}x the dense baseline's time (goal <= 1.15x) and "
                         f"{'-' if ratio is None else f'{ratio:.2f}'}x its peak memory (goal <= 0.25x): "
                         f"{'met' if met else 'not met'}")  # fmt: skip
        else:
            goal = 1.4 if e["runner"] == "trl" else 1.2
            met = speed >= goal and ratio is not None and ratio <= 1
            lines.append(f"- {shape}: fused is {speed:.2f}x faster than {e['runner']} (goal >= {goal}x) at "
                         f"{'-' if ratio is None else f'{ratio:.2f}'}x its peak memory (goal <= 1x): "
                         f"{'met' if met else 'not met'}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))

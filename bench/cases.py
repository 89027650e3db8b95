"""What the benchmarks measure: shapes, the runners (our backends and the peers), and bytes.

Bytes per element are SPEC §7's by design: a two-pass fused kernel reads the student and the
teacher twice and writes the gradient once; the single-pass sm_90 kernel reads them once; the
loss alone reads each once. The floor is what any implementation must move (read both once,
write the gradient once); peers are charged the floor, so their GB/s is an effective rate.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Callable

import torch

import drkl_kernels as dk
from drkl_kernels import backends

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LOSSES = {"drkl": dk.drkl_loss, "rkl": dk.rkl_loss, "fkl": dk.fkl_loss}

# GPU: the shapes that matter. CPU: declared smaller rows so the report finishes in minutes,
# plus the two shapes the CPU backend is quoted at.
GPU_SHAPES = [(bt, v) for bt in (1024, 8192) for v in (32_000, 128_256, 151_936, 256_000)]
CPU_SHAPES = [(256, v) for v in (32_000, 128_256, 151_936, 256_000)] + [(4096, 32_000), (512, 128_256)]
CPU_ONLY_FP32 = {(4096, 32_000), (512, 128_256)}


@dataclasses.dataclass(frozen=True)
class Case:
    divergence: str  # "drkl", "rkl" or "fkl"
    rows: int
    vocab: int
    dtype: str  # key of DTYPES
    backward: bool  # loss + gradient, or the loss alone

    @property
    def elements(self) -> int:
        return self.rows * self.vocab

    @property
    def label(self) -> str:
        return f"{self.divergence} [{self.rows}x{self.vocab}] {self.dtype} {'loss+grad' if self.backward else 'loss'}"

    def floor_bytes(self) -> int:
        """Bytes any implementation moves per element: read both inputs, write the gradient."""
        size = DTYPES[self.dtype].itemsize
        return size * (3 if self.backward else 2)


def matrix(device: str) -> list[Case]:
    """Every case of the report: DRKL over all shapes, dtypes and modes; RKL and FKL (the
    divergences Liger-Kernel has) with loss + gradient on the largest row count."""
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    cases = []
    for rows, vocab in shapes:
        for dtype in DTYPES:
            if device == "cpu" and dtype != "fp32" and (rows, vocab) in CPU_ONLY_FP32:
                continue
            for backward in (True, False):
                cases.append(Case("drkl", rows, vocab, dtype, backward))
    big = max(rows for rows, _ in shapes if (rows, _) not in CPU_ONLY_FP32)
    for rows, vocab in shapes:
        if rows == big:
            for divergence in ("rkl", "fkl"):
                cases.append(Case(divergence, rows, vocab, "bf16" if device == "cuda" else "fp32", True))
    return cases


@dataclasses.dataclass
class Runner:
    """One way of computing a loss: a backend of ours or a peer."""

    name: str
    why_not: Callable[[str, Case], str | None]  # device, case -> None if it can run, else why not
    build: Callable[[Case], Callable]  # case -> fn(student, teacher, target) returning the loss
    passes: Callable[[str, Case], int | None]  # passes over the inputs by design; None for peers
    env: dict[str, str] = dataclasses.field(default_factory=dict)

    def design_bytes(self, device: str, case: Case) -> float | None:
        passes = self.passes(device, case)
        if passes is None:
            return None
        size = DTYPES[case.dtype].itemsize
        return size * (2 * passes + 1) if case.backward else 2 * size


def _ours(backend: str) -> Callable[[str, Case], str | None]:
    def why_not(device: str, case: Case) -> str | None:
        if backend == "triton" and device == "cpu":
            return "Triton runs on the CPU only in its interpreter, whose timings measure numpy"
        try:
            backends.resolve(backend, torch.device(device))
        except ValueError as err:
            return str(err)
        return None

    return why_not


def _fused(backend: str, **kwargs) -> Callable[[Case], Callable]:
    def build(case: Case) -> Callable:
        fn = LOSSES[case.divergence]
        return lambda z, u, t: fn(z, u, t, backend=backend, **kwargs)

    return build


def _single_pass_fits(device: str, case: Case) -> bool:
    if device != "cuda" or torch.cuda.get_device_capability()[0] < 9 or case.vocab < 4096:
        return False
    return case.vocab * 2 * DTYPES[case.dtype].itemsize <= 16 * 200 * 1024


def _reference_compiled_why_not(device: str, case: Case) -> str | None:
    if device == "cpu" and not _has_compiler():
        return "torch.compile needs a C++ compiler on the CPU"
    return None


def _has_compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def _compiled_reference(case: Case) -> Callable:
    fn = LOSSES[case.divergence]
    return torch.compile(lambda z, u, t: fn(z, u, t, backend="reference"), dynamic=True)


def _liger_why_not(device: str, case: Case) -> str | None:
    if case.divergence == "drkl":
        return "Liger-Kernel has no DRKL (it has RKL and FKL through LigerJSD; see those rows)"
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as err:
        return f"liger_kernel is not installed ({err})"
    if device != "cuda":
        return "Liger-Kernel's Triton kernels need a GPU"
    return None


def _liger(case: Case) -> Callable:
    """Liger's path: log_softmax of both inputs (float32), then LigerJSD (beta=1: RKL, beta=0: FKL)."""
    from liger_kernel.transformers import LigerJSD

    jsd = LigerJSD(beta=1.0 if case.divergence == "rkl" else 0.0, ignore_index=-100)

    def fn(z, u, t):
        return jsd(torch.log_softmax(z.float(), -1), torch.log_softmax(u.float(), -1), t)

    return fn


RUNNERS = [
    Runner("cuda", _ours("cuda"), _fused("cuda"), lambda d, c: 1 if _single_pass_fits(d, c) else 2),
    Runner("cuda 2-pass", _ours("cuda"), _fused("cuda"), lambda d, c: 2, env={"DRKL_CUDA_PASSES": "2"}),
    Runner("triton", _ours("triton"), _fused("triton"), lambda d, c: 2),
    Runner("cpu", _ours("cpu"), _fused("cpu"), lambda d, c: 2),
    Runner("reference", _ours("reference"), _fused("reference"), lambda d, c: None),
    Runner("torch.compile(reference)", _reference_compiled_why_not, _compiled_reference, lambda d, c: None),
    Runner("liger", _liger_why_not, _liger, lambda d, c: None),
]
PEERS = {"torch.compile(reference)", "liger"}


def runner(name: str) -> Runner:
    return next(r for r in RUNNERS if r.name == name)


def inputs(case: Case, device: str, seed: int = 0):
    """Student and teacher logits of a realistic distillation pair, and labels (1 in 8 ignored)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (case.rows, case.vocab)
    z = 2 * torch.randn(shape, generator=gen, device=device)
    u = (0.6 * z + 1.6 * torch.randn(shape, generator=gen, device=device)).to(DTYPES[case.dtype])
    z = z.to(DTYPES[case.dtype])
    t = torch.randint(0, case.vocab, (case.rows,), generator=gen, device=device)
    t[::8] = -100
    return z, u, t


def call(fn: Callable, case: Case, z, u, t) -> None:
    """One loss (and backward) call as a training step makes it."""
    zz = z.detach().requires_grad_(case.backward)
    loss = fn(zz, u, t)
    if case.backward:
        loss.backward()

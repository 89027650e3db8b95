"""Backends "cpu" and "cuda": the hand-written kernels of csrc/ through ``drkl_kernels._C``.

Same contract as the Triton launcher: ``forward`` returns per-row losses and the
reduction-scaled gradient from one fused launch; ``scale_grad_`` multiplies it by the
upstream gradient in place. The kernels read the teacher in the student's dtype or in
float32; any other teacher dtype is converted to float32 first (one copy of the teacher).
Losses are float32 (float64 for float64 logits, CPU only).

On CUDA, ``DRKL_CUDA_PASSES`` picks the kernel: unset or 0 lets the launcher choose (the
single-pass cluster kernel on sm_90 for V >= 4096 where a cluster holds the row, else the
two-pass kernel), 1 prefers the single-pass kernel, 2 forces the two-pass kernel.
"""

from __future__ import annotations

import os

import torch

from . import extension
from .problem import Problem
from .reduction import mean_grad_scale


def _acc_dtype(student: torch.Tensor) -> torch.dtype:
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def forward(p: Problem, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    module = extension.load()
    acc = _acc_dtype(p.student)
    teacher = p.teacher if p.teacher.dtype in (p.student.dtype, torch.float32) else p.teacher.float()
    loss = torch.empty(p.rows, dtype=acc, device=p.student.device)
    grad = None
    if want_grad:
        grad = p.student if p.inplace_backward else torch.empty_like(p.student)
    scale = mean_grad_scale(p).to(acc) if want_grad and p.reduction == "mean" else None
    target = None if p.target is None else p.target.contiguous()
    module.forward(p.student, teacher, target, loss, grad, scale, int(p.divergence), int(p.pivot),
                   1.0 / p.temperature, p.gamma, p.ignore_index, int(os.environ.get("DRKL_CUDA_PASSES", "0")))  # fmt: skip
    return loss, grad


def scale_grad_(grad: torch.Tensor, upstream: torch.Tensor) -> None:
    extension.load().scale_grad(grad, upstream.to(_acc_dtype(grad)))

"""Backends "cpu" and "cuda": the hand-written kernels of csrc/ through ``drkl_kernels._C``.

The backend interface of ``backends``: ``forward`` (one fused launch: per-row losses, entropies
when asked for, and the reduction-scaled gradient), ``partial`` and ``finish`` (the two phases of
``record``'s contract, for a slice of the vocabulary), ``scale_grad_`` (grad *= upstream in place).
The kernels read any pair of float32/bfloat16/float16 logits as they are (no converted copy) and
apply each side's logit transform on load. Losses, entropies and records are float32 (float64 for
float64 logits, CPU only). Memory beyond the inputs: the gradient (none in place) and per-row
buffers.

On CUDA, ``DRKL_CUDA_PASSES`` picks the kernel: unset or 0 lets the launcher choose (the
single-pass cluster kernel on sm_90 for V >= 4096 where a cluster holds the row, else the
two-pass kernel), 1 prefers the single-pass kernel, 2 forces the two-pass kernel.
"""

from __future__ import annotations

import os

import torch

from . import extension, record
from .problem import Problem
from .reduction import mean_grad_scale

FUSED, PARTIAL, FINISH = 0, 1, 2


def _acc_dtype(student: torch.Tensor) -> torch.dtype:
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def _call(p: Problem, phase: int, want_grad: bool, rec: torch.Tensor | None):
    acc = _acc_dtype(p.student)
    rows_out = phase != PARTIAL
    loss = torch.empty(p.rows, dtype=acc, device=p.student.device) if rows_out else None
    entropy = torch.empty(p.rows, dtype=acc, device=p.student.device) if rows_out and p.return_entropy else None
    grad = None
    if want_grad:
        grad = p.student if p.inplace_backward else torch.empty_like(p.student)
    scale = mean_grad_scale(p).to(acc) if want_grad and p.reduction == "mean" else None
    target = None if p.target is None else p.target.contiguous()
    s, t = p.student_transform, p.teacher_transform
    extension.load().forward(
        p.student, p.teacher, target, loss, entropy, grad, rec, scale, int(p.divergence), int(p.pivot), phase,
        1.0 / p.temperature, p.gamma, s.scale, s.softcap or 0.0, t.scale, t.softcap or 0.0, p.ignore_index,
        p.vocab_start, p.vocab_total, int(os.environ.get("DRKL_CUDA_PASSES", "0")),
    )  # fmt: skip
    return loss, entropy, grad


def forward(p: Problem, want_grad: bool):
    """(loss rows, entropy rows or None, reduction-scaled gradient or None), one launch."""
    return _call(p, FUSED, want_grad, None)


def partial(p: Problem) -> torch.Tensor:
    """``[rows, record.WIDTH]`` records of the vocabulary slice held by ``p``."""
    rec = torch.empty(p.rows, record.WIDTH, dtype=_acc_dtype(p.student), device=p.student.device)
    _call(p, PARTIAL, False, rec)
    return rec


def finish(p: Problem, merged: torch.Tensor, want_grad: bool):
    """``forward``'s outputs for the slice held by ``p``, from the whole rows' merged records."""
    return _call(p, FINISH, want_grad, merged.to(_acc_dtype(p.student)).contiguous())


def scale_grad_(grad: torch.Tensor, upstream: torch.Tensor) -> None:
    extension.load().scale_grad(grad, upstream.to(_acc_dtype(grad)))

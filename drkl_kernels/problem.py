"""One loss call, validated: the SPEC §5 checks shared by every backend.

``validate`` runs before any kernel is launched and never touches the data of
device tensors (no host synchronisation); it reads no tensor values at all
except a CPU ``target``, whose range it checks eagerly. A CUDA target outside
``[0, V)`` that is not ``ignore_index`` makes the kernels return NaN for that
row instead of reading out of bounds (an eager check would cost a host sync).
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "none")


class Divergence(enum.IntEnum):
    """Which divergence a kernel computes; the value is the compile-time switch."""

    FKL = 0  # KL(p || q)
    RKL = 1  # KL(q || p)
    DRKL = 2  # KL(b_q || b_p) + gamma * KL(qh || ph)


class Pivot(enum.IntEnum):
    """The token t each row is split around (compile-time switch of the kernels).

    Every divergence is computed from statistics of the tokens other than t
    plus the values at t (SPEC §2). For DRKL t is the target; for RKL and FKL
    any t gives the same value, and the argmax of the side that weights the
    expectation keeps confident rows exact (1 - q_t is never formed).
    """

    LABEL = 0  # DRKL with a target: the label of the row
    TEACHER_ARGMAX = 1  # DRKL with target=None (SPEC §1), and FKL; first index on ties
    STUDENT_ARGMAX = 2  # RKL


@dataclass(frozen=True)
class Problem:
    """Validated arguments, with the logits flattened to ``[rows, V]`` views."""

    divergence: Divergence
    student: torch.Tensor  # [rows, V], last dim contiguous
    teacher: torch.Tensor  # [rows, V], last dim contiguous
    target: torch.Tensor | None  # [rows] integer, or None
    lead_shape: torch.Size  # the leading dims of the logits ([...] of [..., V])
    gamma: float
    temperature: float
    ignore_index: int
    reduction: str
    inplace_backward: bool

    @property
    def pivot(self) -> Pivot:
        if self.divergence == Divergence.RKL:
            return Pivot.STUDENT_ARGMAX
        if self.divergence == Divergence.DRKL and self.target is not None:
            return Pivot.LABEL
        return Pivot.TEACHER_ARGMAX

    @property
    def rows(self) -> int:
        return self.student.shape[0]

    @property
    def vocab(self) -> int:
        return self.student.shape[1]


def _positive_finite(name: str, value, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def _rows_view(logits: torch.Tensor) -> torch.Tensor:
    """``[..., V] -> [rows, V]`` without copying when the layout allows it."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def validate(
    divergence: Divergence,
    student_logits,
    teacher_logits,
    target,
    *,
    gamma: float = 0.0,
    temperature: float,
    ignore_index: int,
    reduction: str,
    inplace_backward: bool,
) -> Problem:
    """Check every argument (SPEC §5) and return the flattened problem."""
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point (float32, bfloat16, float16), got {t.dtype}")
        if t.dim() == 0:
            raise ValueError(f"{name} must have shape [..., V], got a 0-dim tensor")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on the same device, got "
            f"{student_logits.device} and {teacher_logits.device}"
        )
    if teacher_logits.requires_grad:
        raise ValueError(
            "teacher_logits requires grad; the loss only differentiates the student: "
            "pass teacher_logits.detach()"
        )
    vocab = student_logits.shape[-1]
    if vocab == 0:
        raise ValueError("student_logits has an empty vocabulary dimension (V == 0)")
    lead_shape = student_logits.shape[:-1]

    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    ignore_index = int(ignore_index)
    if target is not None:
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a torch.Tensor or None, got {type(target).__name__}")
        if target.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"target must be an int64 or int32 tensor, got {target.dtype}")
        if target.shape != lead_shape:
            raise ValueError(
                f"target must have the leading shape of the logits {tuple(lead_shape)}, "
                f"got {tuple(target.shape)}"
            )
        if target.device != student_logits.device:
            raise ValueError(
                f"target must be on the logits' device {student_logits.device}, got {target.device}"
            )
        if target.device.type == "cpu" and target.numel():
            bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
            if bool(bad.any()):
                value = int(target[bad][0])
                raise ValueError(
                    f"target holds {value}, outside [0, {vocab}) and not ignore_index={ignore_index}"
                )
        target = target.reshape(-1)

    temperature = _positive_finite("temperature", temperature, allow_zero=False)
    gamma = _positive_finite("gamma", gamma, allow_zero=True)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")

    return Problem(
        divergence=divergence,
        student=_rows_view(student_logits),
        teacher=_rows_view(teacher_logits),
        target=target,
        lead_shape=lead_shape,
        gamma=gamma,
        temperature=temperature,
        ignore_index=ignore_index,
        reduction=reduction,
        inplace_backward=bool(inplace_backward),
    )

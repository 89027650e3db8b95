"""One loss call, validated: the SPEC §5 checks shared by every backend.

``validate`` runs before any kernel is launched and never touches the data of
device tensors (no host synchronisation); it reads no tensor values at all
except a CPU ``target``, whose range it checks eagerly. A CUDA target outside
``[0, V)`` that is not ``ignore_index`` makes the kernels return NaN for that
row instead of reading out of bounds (an eager check would cost a host sync).
Under ``torch.compile`` every check runs at trace time except that one (a
branch on tensor data would break the graph): a CPU target out of range then
gives NaN too.

Besides the flattened logits, a ``Problem`` carries each side's logit
transform (``Transform``: ``x -> scale * x``, then ``c * tanh(x / c)`` when a
soft cap ``c`` is given, then the temperature), whether the student's entropy
is wanted, and the "mean" divisor when the caller fixes it
(``num_items_in_batch``).

The kernels address ``[rows, V]`` logits with one row stride and a unit stride along V.
Logits that do not fit that (``x[:, :-1]`` of a ``[B, T, V]`` tensor, a transposed and
sliced tensor, a vocabulary dimension that is not unit-stride) are copied once, in their
own dtype; with ``inplace_backward=True`` such a student, or one whose rows overlap, is a
``ValueError`` instead.
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
class Transform:
    """The logit transform of one side, applied by every kernel on load (SPEC §4):
    ``x -> scale * x``, then Gemma-style soft-capping ``softcap * tanh(x / softcap)``
    when ``softcap`` is not None. Its derivative is chained into the gradient."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None


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
    student_transform: Transform = Transform()
    teacher_transform: Transform = Transform()
    return_entropy: bool = False
    num_items: torch.Tensor | None = None  # 0-dim float32 on the logits' device: the "mean" divisor
    vocab_start: int = 0  # the logits are the slice [vocab_start, vocab_start + V) of rows of vocab_total
    vocab_total: int = 0

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
    # comparisons, not math.isfinite: they also take torch.compile's symbolic floats (dynamic=True)
    if not -math.inf < value < math.inf or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def _optional_cap(name: str, value) -> float | None:
    return None if value is None else _positive_finite(name, value, allow_zero=False)


def _num_items(value, reduction: str, device: torch.device) -> torch.Tensor | None:
    """``num_items_in_batch`` as a 0-dim float32 tensor on ``device`` (never read on the host)."""
    if value is None:
        return None
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch replaces the divisor of reduction='mean'; got reduction={reduction!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"num_items_in_batch must be an int or a one-element tensor, got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"num_items_in_batch must be a real number, got {value.dtype}")
        return value.detach().reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"num_items_in_batch must be an int or a tensor, got {type(value).__name__}")
    if not -math.inf < value < math.inf or value < 0:
        raise ValueError(f"num_items_in_batch must be finite and >= 0, got {value}")
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def _rows_view(logits: torch.Tensor) -> torch.Tensor:
    """``[..., V] -> [rows, V]`` with a unit stride along V: a view when the rows are one stride
    apart (e.g. ``x[:, :V]`` of a wider buffer), else a copy (e.g. ``x[:, :-1]`` of ``[B, T, V]``,
    or a vocabulary dimension that is not unit-stride): one ``[rows, V]`` copy in the input's dtype."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _writable_rows(student: torch.Tensor, rows: torch.Tensor) -> None:
    """In place, the kernels write the gradient through ``rows``: it must be ``student``'s own
    memory (into a copy, the promise would fail silently: the student would keep its values and the
    copy would cost the memory in place was meant to save), with rows that do not overlap."""
    if rows.numel() and rows.data_ptr() != student.data_ptr():
        why = "its rows are not one stride apart with a unit stride along V, so the kernels read a copy of it"
    elif rows.shape[0] > 1 and rows.shape[1] > 0 and rows.stride(0) < rows.shape[1]:
        why = "its rows overlap in memory"
    else:
        return
    raise ValueError(
        f"inplace_backward=True writes the gradient into student_logits, which cannot take it here "
        f"(shape {tuple(student.shape)}, strides {student.stride()}): {why}; "
        "pass student_logits.contiguous() or inplace_backward=False"
    )


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
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    return_entropy: bool = False,
    num_items_in_batch=None,
    vocab_start: int = 0,
    vocab_total: int | None = None,
) -> Problem:
    """Check every argument (SPEC §5) and return the flattened problem. ``vocab_start`` and
    ``vocab_total`` describe logits that are a slice of the vocabulary (targets are ids in
    ``[0, vocab_total)``); by default the logits hold whole rows."""
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
    vocab = student_logits.shape[-1] if vocab_total is None else vocab_total
    if student_logits.shape[-1] == 0 and vocab_total is None:
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
        if target.device.type == "cpu" and target.numel() and not torch.compiler.is_compiling():
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
    student_transform = Transform(
        _positive_finite("student_logit_scale", student_logit_scale, allow_zero=False),
        _optional_cap("student_softcap", student_softcap),
    )
    teacher_transform = Transform(
        _positive_finite("teacher_logit_scale", teacher_logit_scale, allow_zero=False),
        _optional_cap("teacher_softcap", teacher_softcap),
    )
    num_items = _num_items(num_items_in_batch, reduction, student_logits.device)
    student = _rows_view(student_logits)
    if inplace_backward and not torch.compiler.is_compiling():  # under compile the gradient is out of place
        _writable_rows(student_logits, student)

    return Problem(
        divergence=divergence,
        student=student,
        teacher=_rows_view(teacher_logits),
        target=target,
        lead_shape=lead_shape,
        gamma=gamma,
        temperature=temperature,
        ignore_index=ignore_index,
        reduction=reduction,
        inplace_backward=bool(inplace_backward),
        student_transform=student_transform,
        teacher_transform=teacher_transform,
        return_entropy=bool(return_entropy),
        num_items=num_items,
        vocab_start=int(vocab_start),
        vocab_total=int(vocab),
    )

"""Public API: the loss functions and their nn.Module forms (names per SPEC §4)."""

from __future__ import annotations

import torch

from . import backends
from .autograd import FusedDivergence
from .problem import Divergence, validate
from .reduction import reduce_rows
from .reference import reference_loss


def _loss(divergence: Divergence, student_logits, teacher_logits, target, *, backend: str, **kwargs) -> torch.Tensor:
    p = validate(divergence, student_logits, teacher_logits, target, **kwargs)
    name = backends.resolve(backend, p.student.device)
    if name == "reference":
        return reference_loss(p)
    kernels = backends.kernels(name)
    if torch.is_grad_enabled() and student_logits.requires_grad:
        return FusedDivergence.apply(student_logits, p, kernels)
    return reduce_rows(p, kernels.forward(p, False)[0])


def drkl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    gamma: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Diversity-aware reverse KL (arXiv 2604.00223), per row of ``[..., V]`` logits:

        DRKL = KL([q_t, 1 - q_t] || [p_t, 1 - p_t]) + gamma * KL(qh || ph)

    with q = softmax(student / temperature), p = softmax(teacher / temperature),
    t the target token (the teacher's argmax when ``target`` is None) and
    qh, ph the distributions renormalised over the other tokens. Reverse KL
    is the same with gamma replaced by the student-dependent (1 - q_t).

    Returns a float32 loss ("mean" over rows whose target is not
    ``ignore_index``, "sum", or "none": shape ``[...]``). The gradient flows to
    ``student_logits`` in its dtype; with ``inplace_backward=True`` the fused
    backends write it into ``student_logits`` during forward (the logits are
    overwritten). Memory beyond the inputs: the gradient and 4 bytes per row.
    """
    return _loss(
        Divergence.DRKL, student_logits, teacher_logits, target, gamma=gamma, temperature=temperature,
        ignore_index=ignore_index, reduction=reduction, backend=backend, inplace_backward=inplace_backward,
    )  # fmt: skip


def rkl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Reverse KL, KL(q || p) = sum_i q_i (log q_i - log p_i), per row; ``target`` only masks rows.

    Arguments, result and costs as for :func:`drkl_loss`.
    """
    return _loss(
        Divergence.RKL, student_logits, teacher_logits, target, temperature=temperature,
        ignore_index=ignore_index, reduction=reduction, backend=backend, inplace_backward=inplace_backward,
    )  # fmt: skip


def fkl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Forward KL, KL(p || q) = sum_i p_i (log p_i - log q_i), per row; ``target`` only masks rows.

    Arguments, result and costs as for :func:`drkl_loss`.
    """
    return _loss(
        Divergence.FKL, student_logits, teacher_logits, target, temperature=temperature,
        ignore_index=ignore_index, reduction=reduction, backend=backend, inplace_backward=inplace_backward,
    )  # fmt: skip


class _DivergenceLoss(torch.nn.Module):
    _fn = None

    def __init__(self, *, temperature=1.0, ignore_index=-100, reduction="mean", backend="auto", inplace_backward=False, **extra):
        super().__init__()
        self.kwargs = dict(
            temperature=temperature, ignore_index=ignore_index, reduction=reduction,
            backend=backend, inplace_backward=inplace_backward, **extra,
        )  # fmt: skip

    def forward(self, student_logits, teacher_logits, target=None):
        return type(self)._fn(student_logits, teacher_logits, target, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class DRKLLoss(_DivergenceLoss):
    """Module form of :func:`drkl_loss`; ``forward(student_logits, teacher_logits, target=None)``."""

    _fn = staticmethod(drkl_loss)

    def __init__(self, gamma=0.5, temperature=1.0, ignore_index=-100, reduction="mean", backend="auto", inplace_backward=False):
        super().__init__(
            gamma=gamma, temperature=temperature, ignore_index=ignore_index, reduction=reduction,
            backend=backend, inplace_backward=inplace_backward,
        )  # fmt: skip


class RKLLoss(_DivergenceLoss):
    """Module form of :func:`rkl_loss`."""

    _fn = staticmethod(rkl_loss)


class FKLLoss(_DivergenceLoss):
    """Module form of :func:`fkl_loss`."""

    _fn = staticmethod(fkl_loss)

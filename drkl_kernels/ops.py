"""The fused kernels as ``torch.library`` custom ops, so ``torch.compile`` traces around them.

Two operators, both opaque to the compiler (it sees their shapes, not their code):

    drkl_kernels::divergence(student, teacher, target?, num_items?, backend, divergence, gamma,
        temperature, ignore_index, reduction, want_grad, return_entropy, student_scale,
        student_softcap?, teacher_scale, teacher_softcap?) -> (loss_rows, entropy_rows, grad)

``<backend>.forward`` on ``[rows, V]`` logits, one launch: float32 per-row losses (float64 for
float64 logits, but for Triton), the student's per-row entropies, and the reduction-scaled
gradient ``[rows, V]`` in the student's dtype. What is not asked for (``want_grad``,
``return_entropy``) comes back as an empty ``[0]`` tensor, never allocated at size. The
reduction of the rows is PyTorch, outside the operator (``reduction``).

    drkl_kernels::scale_grad_(grad!, upstream, backend) -> ()

``grad *= upstream`` in place (the backward), declared as mutating ``grad``.

``divergence`` is functional: it never writes its inputs, so a gradient written into the
student logits (``inplace_backward=True``) has no operator; ``autograd`` keeps that path for
eager mode and computes out of place under ``torch.compile``. Neither operator has an autograd
formula: ``autograd.FusedDivergence`` calls them (the gradient returned by ``divergence`` is its
own buffer, which backward scales in place), and the compiler traces that function. The Triton
launcher runs inside the operator too (a ``custom_op``, not a ``triton_op``: the compiler does
not see into the kernel, which costs nothing in traffic). The reference backend is no operator:
it is PyTorch, which the compiler traces and fuses.
"""

from __future__ import annotations

import torch

from . import backends
from .problem import Divergence, Problem, Transform


def arguments(p: Problem, backend: str, want_grad: bool) -> tuple:
    """The operator's arguments for problem ``p`` on a concrete ``backend``."""
    s, t = p.student_transform, p.teacher_transform
    return (p.student, p.teacher, p.target, p.num_items, backend, int(p.divergence), p.gamma,
            p.temperature, p.ignore_index, p.reduction, want_grad, p.return_entropy,
            s.scale, s.softcap, t.scale, t.softcap)  # fmt: skip


@torch.library.custom_op("drkl_kernels::divergence", mutates_args=())
def divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    num_items: torch.Tensor | None,
    backend: str,
    divergence: int,
    gamma: float,
    temperature: float,
    ignore_index: int,
    reduction: str,
    want_grad: bool,
    return_entropy: bool,
    student_scale: float,
    student_softcap: float | None,
    teacher_scale: float,
    teacher_softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = Problem(
        divergence=Divergence(divergence), student=student, teacher=teacher, target=target,
        lead_shape=student.shape[:1], gamma=gamma, temperature=temperature, ignore_index=ignore_index,
        reduction=reduction, inplace_backward=False, student_transform=Transform(student_scale, student_softcap),
        teacher_transform=Transform(teacher_scale, teacher_softcap), return_entropy=return_entropy,
        num_items=num_items, vocab_total=student.shape[1],
    )  # fmt: skip
    loss, entropy, grad = backends.kernels(backend).forward(p, want_grad)
    return loss, entropy if return_entropy else loss.new_empty(0), grad if want_grad else student.new_empty(0)


@divergence.register_fake
def _(student, teacher, target, num_items, backend, divergence, gamma, temperature, ignore_index, reduction,
      want_grad, return_entropy, student_scale, student_softcap, teacher_scale, teacher_softcap):  # fmt: skip
    # Losses are float32, float64 for float64 logits where the backend computes in double (not Triton).
    dtype = torch.float64 if student.dtype == torch.float64 and backend != "triton" else torch.float32
    loss = student.new_empty(student.shape[:1], dtype=dtype)
    entropy = student.new_empty(student.shape[:1] if return_entropy else (0,), dtype=dtype)
    return loss, entropy, torch.empty_like(student) if want_grad else student.new_empty(0)


@torch.library.custom_op("drkl_kernels::scale_grad_", mutates_args=("grad",))
def scale_grad_(grad: torch.Tensor, upstream: torch.Tensor, backend: str) -> None:
    backends.kernels(backend).scale_grad_(grad, upstream)


@scale_grad_.register_fake
def _(grad, upstream, backend):
    return None

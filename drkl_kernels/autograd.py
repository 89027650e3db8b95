"""The autograd wrapper shared by the kernel backends (triton, cpu, cuda).

Forward runs one fused launch that writes the per-row losses and, already,
the gradient scaled for the reduction. Backward only multiplies that gradient
by the upstream gradient, in place and on the device; a kernel reading an
upstream value of exactly 1.0 returns without touching memory. The gradient
buffer is handed to autograd once, so a second backward through the same
graph (``retain_graph=True``) is refused rather than silently rescaled.
"""

from __future__ import annotations

import torch

from .problem import Problem
from .reduction import reduce_rows


class FusedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, p: Problem, kernels) -> torch.Tensor:
        loss_rows, grad = kernels.forward(p, True)
        ctx.grad, ctx.kernels, ctx.per_row = grad, kernels, p.reduction == "none"
        ctx.shape = student_logits.shape
        return reduce_rows(p, loss_rows)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("drkl_kernels losses support one backward per forward (the gradient is computed in forward)")
        upstream = grad_loss.reshape(-1) if ctx.per_row else grad_loss
        ctx.kernels.scale_grad_(grad, upstream)
        return grad.view(ctx.shape), None, None

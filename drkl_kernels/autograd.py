"""Autograd of the fused backends (triton, cpu, cuda): the one place that knows how backward works.

Forward runs one fused launch that writes the per-row losses (and entropies, when asked
for) and, already, the gradient scaled for the reduction. Backward only multiplies that
gradient by the upstream gradient, in place and on the device; a kernel reading an
upstream value of exactly 1.0 returns without touching memory. The gradient buffer is
handed to autograd once, so a second backward through the same graph
(``retain_graph=True``) is refused rather than silently rescaled. The entropy has no
gradient.

Both steps are the custom operators of ``ops`` (``divergence``, ``scale_grad_``), which
``torch.compile`` traces without a graph break. A gradient written into the student logits
(``inplace_backward=True``) is an output aliasing an input, which a functional operator cannot
express: in eager mode the kernels are launched directly and write it there; under
``torch.compile`` the flag is ignored and the gradient gets its own buffer (as quack does).
"""

from __future__ import annotations

import torch

from . import backends, ops, parallel
from .problem import Problem
from .reduction import reduce_rows


def reduced(ctx, p: Problem, loss_rows: torch.Tensor, entropy_rows: torch.Tensor | None):
    """The loss, or (loss, entropy) with the entropy marked non-differentiable."""
    loss = reduce_rows(p, loss_rows)
    if entropy_rows is None:
        return loss
    entropy = reduce_rows(p, entropy_rows)
    if ctx is not None:
        ctx.mark_non_differentiable(entropy)
    return loss, entropy


def fused_loss(p: Problem, backend: str, shard: parallel.Shard | None = None):
    """The loss (and entropy) of ``p`` on a fused backend, or on any backend over one shard of a
    vocabulary-parallel group; differentiable when the student requires grad."""
    if torch.is_grad_enabled() and p.student.requires_grad:
        return FusedDivergence.apply(p.student, p, backend, shard)
    loss_rows, entropy_rows, _ = launch(p, backend, False, shard)
    return reduced(None, p, loss_rows, entropy_rows)


def launch(p: Problem, backend: str, want_grad: bool, shard: parallel.Shard | None = None):
    """``<backend>.forward(p, want_grad)``: (loss rows, entropy rows or None, reduction-scaled gradient
    or None), through the custom operator unless eager mode writes the gradient into the student.
    With a ``shard``: the backend's partial, one collective and finish (``parallel.Sharded``), eager."""
    if shard is not None:
        return parallel.Sharded(backends.kernels(backend), shard).forward(p, want_grad)
    if p.inplace_backward and want_grad and not torch.compiler.is_compiling():
        return backends.kernels(backend).forward(p, True)
    loss_rows, entropy_rows, grad = ops.divergence(*ops.arguments(p, backend, want_grad))
    return loss_rows, entropy_rows if p.return_entropy else None, grad if want_grad else None


class FusedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, p: Problem, backend: str, shard):
        loss_rows, entropy_rows, grad = launch(p, backend, True, shard)
        ctx.grad, ctx.backend, ctx.per_row = grad, backend, p.reduction == "none"
        ctx.shape = student_logits.shape
        return reduced(ctx, p, loss_rows, entropy_rows)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *_):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("drkl_kernels losses support one backward per forward (the gradient is computed in forward)")
        ops.scale_grad_(grad, grad_loss.reshape(-1) if ctx.per_row else grad_loss, ctx.backend)
        return grad.view(ctx.shape), None, None, None

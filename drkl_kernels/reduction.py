"""Reductions over rows, kept on the device (no host synchronisation).

"mean" divides by the number of rows that are not ``ignore_index``; when none
counts the loss is 0.0 and the gradient is zero (the divisor is clamped to 1).
"""

from __future__ import annotations

import torch

from .problem import Problem


def valid_count(p: Problem) -> torch.Tensor:
    """Number of rows that count, as a float32 device scalar."""
    if p.target is None:
        return torch.full((), float(p.rows), dtype=torch.float32, device=p.student.device)
    return (p.target != p.ignore_index).sum(dtype=torch.float32)


def mean_grad_scale(p: Problem) -> torch.Tensor:
    """``1 / max(n_valid, 1)`` as a one-element float32 device tensor (read by the kernels)."""
    return valid_count(p).clamp_(min=1.0).reciprocal_().reshape(1)


def reduce_rows(p: Problem, loss_rows: torch.Tensor) -> torch.Tensor:
    """Per-row float32 losses (0 at ignored rows) -> the requested reduction."""
    if p.reduction == "none":
        return loss_rows.reshape(p.lead_shape)
    total = loss_rows.sum()
    if p.reduction == "sum":
        return total
    return total / valid_count(p).clamp(min=1.0)

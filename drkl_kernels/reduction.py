"""Reductions over rows, kept on the device (no host synchronisation).

"mean" divides by ``num_items_in_batch`` when the caller gives it (HF ``Trainer``'s
convention under gradient accumulation), else by the number of rows that are not
``ignore_index``; a divisor below 1 is taken as 1, so when no row counts the loss is
0.0 and the gradient is zero. The student's entropy, when asked for, is reduced the
same way as the loss.
"""

from __future__ import annotations

import torch

from .problem import Problem


def valid_count(p: Problem) -> torch.Tensor:
    """Number of rows that count, as a float32 device scalar."""
    if p.target is None:
        return torch.full((), float(p.rows), dtype=torch.float32, device=p.student.device)
    return (p.target != p.ignore_index).sum(dtype=torch.float32)


def mean_divisor(p: Problem) -> torch.Tensor:
    """The "mean" divisor: ``max(num_items_in_batch or n_valid, 1)``, a float32 device scalar."""
    count = valid_count(p) if p.num_items is None else p.num_items
    return count.clamp(min=1.0)


def mean_grad_scale(p: Problem) -> torch.Tensor:
    """``1 / mean_divisor`` as a one-element float32 device tensor (read by the kernels)."""
    return mean_divisor(p).reciprocal().reshape(1)


def reduce_rows(p: Problem, rows: torch.Tensor) -> torch.Tensor:
    """Per-row float32 values (0 at ignored rows) -> the requested reduction."""
    if p.reduction == "none":
        return rows.reshape(p.lead_shape)
    total = rows.sum()
    if p.reduction == "sum":
        return total
    return total / mean_divisor(p).to(total.dtype)

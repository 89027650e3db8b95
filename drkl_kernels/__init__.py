"""Fused distillation losses: DRKL (arXiv 2604.00223), reverse KL and forward KL, from logits or
from both models' hidden states and LM heads (fused linear)."""

from .api import (
    DRKLLoss,
    FKLLoss,
    FusedLinearDRKLLoss,
    FusedLinearFKLLoss,
    FusedLinearRKLLoss,
    RKLLoss,
    drkl_loss,
    fkl_loss,
    fused_linear_drkl_loss,
    fused_linear_fkl_loss,
    fused_linear_rkl_loss,
    rkl_loss,
)
from .backends import available_backends

__version__ = "0.1.0"
__all__ = [
    "DRKLLoss",
    "FKLLoss",
    "FusedLinearDRKLLoss",
    "FusedLinearFKLLoss",
    "FusedLinearRKLLoss",
    "RKLLoss",
    "available_backends",
    "drkl_loss",
    "fkl_loss",
    "fused_linear_drkl_loss",
    "fused_linear_fkl_loss",
    "fused_linear_rkl_loss",
    "rkl_loss",
]

"""Fused distillation losses: DRKL (arXiv 2604.00223), reverse KL and forward KL from logits."""

from .api import DRKLLoss, FKLLoss, RKLLoss, drkl_loss, fkl_loss, rkl_loss
from .backends import available_backends

__version__ = "0.1.0"
__all__ = ["DRKLLoss", "FKLLoss", "RKLLoss", "available_backends", "drkl_loss", "fkl_loss", "rkl_loss"]

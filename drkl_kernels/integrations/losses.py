"""The loss an adapter's ``loss_type`` names: DRKL (with ``gamma`` bound), reverse KL or forward
KL, on logits or fused with the LM heads (SPEC §4). No maths here; no extra needed."""

from __future__ import annotations

import functools

from .. import api

LOGITS = {"drkl": api.drkl_loss, "rkl": api.rkl_loss, "fkl": api.fkl_loss}
FUSED_LINEAR = {"drkl": api.fused_linear_drkl_loss, "rkl": api.fused_linear_rkl_loss, "fkl": api.fused_linear_fkl_loss}


def loss_function(loss_type: str, gamma: float, *, fused_linear: bool = False):
    """The public loss for ``loss_type`` in {"drkl", "rkl", "fkl"}, with ``gamma`` bound for DRKL;
    the fused linear form (hidden states and heads in, SPEC §4) when ``fused_linear``."""
    losses = FUSED_LINEAR if fused_linear else LOGITS
    if loss_type not in losses:
        raise ValueError(f"loss_type must be one of {tuple(losses)}, got {loss_type!r}")
    return functools.partial(losses[loss_type], gamma=gamma) if loss_type == "drkl" else losses[loss_type]

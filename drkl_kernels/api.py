"""Public API: the loss functions and their nn.Module forms (names per SPEC §4)."""

from __future__ import annotations

import torch

from . import backends, parallel
from .autograd import fused_loss
from .fused_linear import fused_linear_loss
from .problem import Divergence, validate
from .reference import reference_loss


def _loss(divergence: Divergence, student_logits, teacher_logits, target, *, backend: str, process_group, **kwargs):
    shard = parallel.shard(process_group, student_logits)
    p = validate(divergence, student_logits, teacher_logits, target, **(shard.slice if shard else {}), **kwargs)
    name = backends.resolve(backend, p.student.device)
    if shard is None and name == "reference":
        return reference_loss(p)
    return fused_loss(p, name, shard)


_COMMON = """
    Arguments: logits ``[..., V]`` (float32, bfloat16 or float16, any pair), ``target``
    ``[...]`` int64/int32 or None; ``temperature`` tau > 0; rows whose target is
    ``ignore_index`` count for nothing; ``reduction`` "mean" (over the rows that count, or
    divided by ``num_items_in_batch`` when given: an int or a 0-dim tensor, never read on
    the host), "sum" or "none" (shape ``[...]``). Each side's logits are transformed on
    load: ``x -> logit_scale * x``, then ``softcap * tanh(x / softcap)`` when a soft cap is
    given, then the temperature; the gradient is chained through it. ``backend`` picks the
    implementation (``available_backends()``). With ``return_entropy=True`` the result is
    ``(loss, entropy)``: the student's entropy H(q) per row, reduced like the loss, without
    gradient.

    ``process_group``: a ``torch.distributed`` group over which the vocabulary is split (SPEC
    §8): each rank passes its contiguous shard ``[..., V_r]`` of the logits, in rank order
    (sizes may differ), and the same ``target`` (global ids) and options; every rank gets
    bitwise the same loss and the gradient of its own shard, after one gather of 44 bytes per
    row (``parallel``). The gradient is computed in forward on every backend then.

    Returns a float32 loss. The gradient flows to ``student_logits`` in its dtype; with
    ``inplace_backward=True`` the fused backends write it into ``student_logits`` during
    forward (the logits are overwritten). Memory beyond the inputs: the gradient (none in
    place) and a few bytes per row. The teacher must not require grad.
"""


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
    num_items_in_batch=None,
    return_entropy: bool = False,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    process_group=None,
):
    return _loss(Divergence.DRKL, student_logits, teacher_logits, target, gamma=gamma, **_options(locals()))


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
    num_items_in_batch=None,
    return_entropy: bool = False,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    process_group=None,
):
    return _loss(Divergence.RKL, student_logits, teacher_logits, target, **_options(locals()))


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
    num_items_in_batch=None,
    return_entropy: bool = False,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    process_group=None,
):
    return _loss(Divergence.FKL, student_logits, teacher_logits, target, **_options(locals()))


OPTIONS = (
    "temperature", "ignore_index", "reduction", "backend", "inplace_backward", "num_items_in_batch",
    "return_entropy", "student_logit_scale", "teacher_logit_scale", "student_softcap", "teacher_softcap",
    "process_group",
)  # fmt: skip


def _options(scope: dict) -> dict:
    return {k: scope[k] for k in OPTIONS}


drkl_loss.__doc__ = (
    """Diversity-aware reverse KL (arXiv 2604.00223), per row of ``[..., V]`` logits:

        DRKL = KL([q_t, 1 - q_t] || [p_t, 1 - p_t]) + gamma * KL(qh || ph)

    with q = softmax(s), p = softmax(r) the transformed logits over the temperature, t the
    target token (the teacher's argmax when ``target`` is None) and qh, ph the
    distributions renormalised over the other tokens. Reverse KL is the same with gamma
    replaced by the student-dependent (1 - q_t).
"""
    + _COMMON
)
rkl_loss.__doc__ = """Reverse KL, KL(q || p) = sum_i q_i (log q_i - log p_i), per row; ``target`` only masks rows.
""" + _COMMON  # fmt: skip
fkl_loss.__doc__ = """Forward KL, KL(p || q) = sum_i p_i (log p_i - log q_i), per row; ``target`` only masks rows.
""" + _COMMON  # fmt: skip


_FUSED_COMMON = """
    Arguments: the last hidden states ``[..., H_s]`` and ``[..., H_t]`` (same leading shape; H_s
    and H_t may differ) and LM heads ``[V, H_s]``, ``[V, H_t]`` (same V) of both models, optional
    biases ``[V]``, and ``target`` ``[...]`` as for the logits losses; float32, bfloat16, float16
    (or float64) in any mix (each model's matmul runs in the wider of its hidden and head dtypes,
    with float32 logits). Each model's logits ``hidden @ weight.T + bias`` exist one chunk of
    ``chunk_rows`` rows at a time (default: both chunks of float32 logits together take the bytes
    of the student's head: H_s // 2 rows for a float32 head, H_s // 4 for bf16/fp16). The loss, the options
    (``gamma``, ``temperature``, ``ignore_index``, ``reduction``, ``num_items_in_batch``, the
    logit scales and soft caps, ``return_entropy``, ``backend``) and their meaning are those of
    the logits losses, over the whole call (the "mean" divides by the whole call's count).

    The gradient flows to ``student_hidden``, ``student_weight`` and ``student_bias`` when they
    require grad (no weight-gradient matmul for a frozen head), in their dtypes; it is computed in
    forward and backward only scales it, except for ``reduction="none"`` with a trainable head
    or bias, where backward runs the chunks again with each row's upstream weight. ``accum_dtype``: the
    weight gradient's accumulator, float32 (default) or the weight's dtype (less memory for
    bf16 heads, each chunk's contribution rounded to bf16). The teacher's tensors must not
    require grad. Memory and cost: ``drkl_kernels.fused_linear``.

    ``process_group``: a vocabulary-parallel LM head (SPEC §8): each rank passes the ``[V_r, H]``
    rows of both heads (and biases) for its contiguous shard of the vocabulary, in rank order,
    and the same hidden states, target and options (``chunk_rows`` included; and the same grad
    mode and ``requires_grad`` of the student's tensors, which decide the collectives); every rank gets
    bitwise the same loss, its own shard's ``d weight`` and ``d bias``, and ``d hidden`` summed
    over the group by one ``all_reduce`` (``reduce_hidden_grad=True``) or this shard's part of
    the sum (``False``: for hidden states that already pass through Megatron's
    ``copy_to_tensor_model_parallel_region``, whose backward all-reduces).
"""


def fused_linear_drkl_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    accum_dtype: torch.dtype = torch.float32,
    gamma: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    num_items_in_batch=None,
    return_entropy: bool = False,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    process_group=None,
    reduce_hidden_grad: bool = True,
):
    return fused_linear_loss(Divergence.DRKL, student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                             gamma=gamma, **_fused_options(locals()))  # fmt: skip


def fused_linear_rkl_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    accum_dtype: torch.dtype = torch.float32,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    num_items_in_batch=None,
    return_entropy: bool = False,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    process_group=None,
    reduce_hidden_grad: bool = True,
):
    return fused_linear_loss(Divergence.RKL, student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                             **_fused_options(locals()))  # fmt: skip


def fused_linear_fkl_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    accum_dtype: torch.dtype = torch.float32,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    num_items_in_batch=None,
    return_entropy: bool = False,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    process_group=None,
    reduce_hidden_grad: bool = True,
):
    return fused_linear_loss(Divergence.FKL, student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                             **_fused_options(locals()))  # fmt: skip


# the logits API's keywords but inplace_backward (always in place)
FUSED_OPTIONS = tuple(k for k in OPTIONS if k != "inplace_backward") + (
    "student_bias", "teacher_bias", "chunk_rows", "accum_dtype", "reduce_hidden_grad",
)  # fmt: skip


def _fused_options(scope: dict) -> dict:
    return {k: scope[k] for k in FUSED_OPTIONS}


fused_linear_drkl_loss.__doc__ = """DRKL (see :func:`drkl_loss`) from both models' last hidden states and LM heads, never
    materialising either model's ``[..., V]`` logits.
""" + _FUSED_COMMON  # fmt: skip
fused_linear_rkl_loss.__doc__ = """Reverse KL (see :func:`rkl_loss`) from both models' last hidden states and LM heads.
""" + _FUSED_COMMON  # fmt: skip
fused_linear_fkl_loss.__doc__ = """Forward KL (see :func:`fkl_loss`) from both models' last hidden states and LM heads.
""" + _FUSED_COMMON  # fmt: skip


class _DivergenceLoss(torch.nn.Module):
    _fn = None

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, student_logits, teacher_logits, target=None, **overrides):
        """``overrides``: per-call keywords, e.g. ``num_items_in_batch``."""
        return type(self)._fn(student_logits, teacher_logits, target, **{**self.kwargs, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class DRKLLoss(_DivergenceLoss):
    """Module form of :func:`drkl_loss`; ``forward(student_logits, teacher_logits, target=None)``."""

    _fn = staticmethod(drkl_loss)

    def __init__(self, gamma: float = 0.5, **kwargs):
        super().__init__(gamma=gamma, **kwargs)


class RKLLoss(_DivergenceLoss):
    """Module form of :func:`rkl_loss`; keywords as the function's."""

    _fn = staticmethod(rkl_loss)


class FKLLoss(_DivergenceLoss):
    """Module form of :func:`fkl_loss`; keywords as the function's."""

    _fn = staticmethod(fkl_loss)


class _FusedLinearLoss(_DivergenceLoss):
    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, target=None, **overrides):
        """``overrides``: per-call keywords, e.g. ``num_items_in_batch`` or ``student_bias``."""
        return type(self)._fn(student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                              **{**self.kwargs, **overrides})  # fmt: skip


class FusedLinearDRKLLoss(_FusedLinearLoss):
    """Module form of :func:`fused_linear_drkl_loss`;
    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, target=None)``."""

    _fn = staticmethod(fused_linear_drkl_loss)

    def __init__(self, gamma: float = 0.5, **kwargs):
        super().__init__(gamma=gamma, **kwargs)


class FusedLinearRKLLoss(_FusedLinearLoss):
    """Module form of :func:`fused_linear_rkl_loss`; keywords as the function's."""

    _fn = staticmethod(fused_linear_rkl_loss)


class FusedLinearFKLLoss(_FusedLinearLoss):
    """Module form of :func:`fused_linear_fkl_loss`; keywords as the function's."""

    _fn = staticmethod(fused_linear_fkl_loss)

"""TRL adapters (``pip install 'drkl-kernels[trl]'``), written against TRL 1.16.

``DistillationTrainer`` is TRL's on-policy ``trl.DistillationTrainer`` with its chunked
divergence (RKL/FKL/JSD by ``beta``) replaced by this package's fused linear DRKL, RKL or FKL:
the same last hidden states of both models, heads, logit scales and soft caps, the same
``(loss, entropy_sum, n_valid)`` for TRL's logging. ``loss_type`` and ``gamma`` come from
``DRKLDistillationConfig``; DRKL's target is the sampled completion token at each position::

    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=prompts,
                                  args=DRKLDistillationConfig(output_dir, loss_type="drkl", gamma=0.5))

``generalized_jsd_loss`` is a drop-in for the loss of TRL's GKD trainer
(``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss``): the same signature and reductions,
computing DRKL, reverse KL or forward KL with this package's fused kernels on the logits::

    class DRKLGKDTrainer(GKDTrainer):
        generalized_jsd_loss = staticmethod(functools.partial(generalized_jsd_loss, loss_type="drkl"))
"""

from __future__ import annotations

try:
    import trl  # the extra this module is written against: TRL 1.16
except ImportError as err:
    raise ImportError(
        "drkl_kernels.integrations.trl needs TRL and transformers: pip install 'drkl-kernels[trl]'"
    ) from err

import dataclasses

import torch
from trl.trainer.utils import get_config_model_id

from .hf import IGNORE_INDEX, LMHead, fused_distillation, same_vocabulary
from .losses import FUSED_LINEAR, loss_function

GKD_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _loss_type(loss_type: str | None, beta: float, how: str) -> str:
    """``loss_type`` when given, else TRL's ``beta`` read as in TRL: 0.0 forward KL, 1.0 reverse KL
    (``how`` says how to ask for a loss_type instead)."""
    if loss_type is not None:
        return loss_type
    if beta in (0.0, 1.0):
        return "fkl" if beta == 0.0 else "rkl"
    raise ValueError(
        f"beta={beta} asks for TRL's generalized JSD, which drkl_kernels does not compute: pass beta=0.0 "
        f"(forward KL), beta=1.0 (reverse KL), or {how}"
    )


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch=None,
    *,
    loss_type: str | None = None,
    gamma: float = 0.5,
    backend: str = "auto",
):
    """TRL GKD's ``generalized_jsd_loss`` on the fused kernels.

    ``student_logits``, ``teacher_logits``: ``[B, T, V]`` (or ``[N, V]``), the teacher without
    grad; ``labels``: ``[B, T]`` next tokens (shifted like the logits), -100 where nothing is
    learned. ``loss_type`` "drkl" (DRKL with ``gamma``; its target is the label at each
    position, the teacher's argmax without labels), "rkl" or "fkl"; when None, ``beta`` picks
    as in TRL: 0.0 is forward KL, 1.0 reverse KL (TRL's JSD between them is not computed here).
    Logits are divided by ``temperature`` (no tau**2 factor, as in TRL).

    Reductions as TRL's: with ``num_items_in_batch``, sum / num_items_in_batch; "batchmean"
    sum / (labelled tokens), or sum / B without labels; "sum"; "mean" sum / (tokens * V) (TRL
    averages over the vocabulary too); "none" gives the per-token values ``[B, T]`` (0 where
    the label is -100), not TRL's per-vocabulary-entry tensor, which no fused loss forms.
    """
    fn = loss_function(_loss_type(loss_type, beta, "loss_type='drkl' (or 'rkl', 'fkl'; beta is then ignored)"), gamma)
    if reduction not in GKD_REDUCTIONS:
        raise ValueError(f"reduction must be one of {GKD_REDUCTIONS}, got {reduction!r}")
    if labels is not None and labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels must have the shape of the logits without the vocabulary, {tuple(student_logits.shape[:-1])}, "
            f"got {tuple(labels.shape)}: pass the labels shifted like the logits (labels[:, 1:] with logits[:, :-1])"
        )

    def loss(reduction, **kw):
        return fn(student_logits, teacher_logits, labels, temperature=temperature, reduction=reduction,
                  backend=backend, **kw)  # fmt: skip

    if num_items_in_batch is not None:
        return loss("mean", num_items_in_batch=num_items_in_batch)
    if reduction == "batchmean":
        return loss("mean") if labels is not None else loss("sum") / max(student_logits.shape[0], 1)
    if reduction == "mean":
        return loss("mean") / student_logits.shape[-1]
    return loss(reduction)


@dataclasses.dataclass
class DRKLDistillationConfig(trl.DistillationConfig):
    """``trl.DistillationConfig`` plus the divergence: ``loss_type`` "drkl", "rkl" or "fkl" (TRL's
    ``beta`` is then ignored) and DRKL's ``gamma`` >= 0 (SPEC §1)."""

    loss_type: str = dataclasses.field(default="drkl", metadata={"help": "drkl, rkl or fkl (beta is ignored)"})
    gamma: float = dataclasses.field(default=0.5, metadata={"help": "DRKL's weight of the non-target term, >= 0"})

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in FUSED_LINEAR:
            raise ValueError(f"loss_type must be one of {tuple(FUSED_LINEAR)}, got {self.loss_type!r}")
        if not 0.0 <= self.gamma < float("inf"):
            raise ValueError(f"gamma must be finite and >= 0, got {self.gamma}")


# Multimodal inputs TRL 1.16's generation step leaves in a micro-batch, passed to both backbones
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "token_type_ids", "mm_token_type_ids", "image_position_ids")  # fmt: skip


class DistillationTrainer(trl.DistillationTrainer):
    """``trl.DistillationTrainer`` on this package's fused linear loss (see the module docstring).

    Per micro-batch: both models' last hidden states over the completion, as TRL computes them
    (``_get_last_hidden_state``, the teacher's through its wrapper without grad); each head's
    weight, bias, logit scale and soft cap (``hf.LMHead``, TRL's config names); the target is
    ``completion_ids``, -100 outside TRL's loss mask (completion mask times tool mask). The loss is
    the sum over valid tokens divided by ``num_items_in_batch`` as TRL passes it, else by the local
    valid count, at least 1 (``chunked_divergence_loss``). Padded positions are projected too
    (TRL drops them first, which needs a host synchronisation on their count).
    """

    def __init__(self, model, teacher_model=None, args=None, *rest, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = DRKLDistillationConfig(f"{name.split('/')[-1]}-DRKL")
        how = "DRKLDistillationConfig(loss_type='drkl', 'rkl' or 'fkl')"
        self.loss_type = _loss_type(getattr(args, "loss_type", None), args.beta, how)
        self.gamma = getattr(args, "gamma", 0.5)
        super().__init__(model, teacher_model, args, *rest, **kwargs)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        loss_mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        keep = completion_ids.size(1)
        multimodal = {k: inputs[k] for k in MULTIMODAL_KEYS if k in inputs}

        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, keep, **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                       self._get_last_hidden_state, unwrapped_teacher, input_ids,
                                                       attention_mask, keep, **multimodal)  # fmt: skip

        student, teacher = LMHead.of(unwrapped_student, "student"), LMHead.of(unwrapped_teacher, "teacher")
        same_vocabulary(student, teacher, unwrapped_student, unwrapped_teacher)
        target = completion_ids.masked_fill(loss_mask.to(completion_ids.device) == 0, IGNORE_INDEX)
        return chunked_divergence_loss(self.loss_type, student_hidden, teacher_hidden, student, teacher, target,
                                       gamma=self.gamma, temperature=self.temperature,
                                       num_items_in_batch=num_items_in_batch)  # fmt: skip


def chunked_divergence_loss(loss_type: str, student_hidden, teacher_hidden, student: LMHead, teacher: LMHead, target,
                            *, gamma=0.5, temperature=1.0, num_items_in_batch=None, backend="auto"):  # fmt: skip
    """What TRL 1.16's ``_chunked_divergence_loss`` returns, ``(loss, entropy_sum, n_valid)``, from
    this package's fused linear ``loss_type``: ``[B, K, H]`` hidden states, ``target [B, K]`` (-100
    outside the loss mask). ``loss`` = sum over valid tokens / max(``num_items_in_batch`` or
    ``n_valid``, 1), the divisor folded into the gradient in forward; ``entropy_sum`` (no grad) is
    the student's entropy from the same pass, reduced alike and multiplied back by that divisor;
    ``n_valid`` counts the valid tokens. All device tensors: nothing synchronises with the host."""
    target = target.to(student.weight.device)
    n_valid = (target != IGNORE_INDEX).sum()
    count = n_valid if num_items_in_batch is None else num_items_in_batch
    divisor = torch.as_tensor(count, dtype=torch.float32, device=target.device).clamp(min=1.0)
    loss, entropy = fused_distillation(loss_type, student_hidden, teacher_hidden, student, teacher, target, gamma=gamma,
                                       temperature=temperature, num_items_in_batch=divisor, return_entropy=True,
                                       backend=backend)  # fmt: skip
    return loss, entropy * divisor, n_valid

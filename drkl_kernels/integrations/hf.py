"""Hugging Face adapter (``pip install 'drkl-kernels[hf]'``): the distillation loss of a
``Trainer.compute_loss`` override, fused with both models' LM heads.

``distillation_loss(student, teacher, batch)`` runs each model's backbone (``model.base_model``,
never its LM head: no ``[B, T, V]`` logits), reads each head's weight and bias and the logit
transform its config declares (``logit_scale(config)``, ``final_logit_softcapping``), shifts the
labels as causal LMs do, and calls the fused linear loss (SPEC §4, ``drkl_kernels/fused_linear.py``
for its memory: one chunk of logits per model). The helpers here (``LMHead``, ``last_hidden_state``,
``fused_distillation``) are also what the TRL adapter calls.
"""

from __future__ import annotations

try:
    import transformers
except ImportError as err:
    raise ImportError("drkl_kernels.integrations.hf needs transformers: pip install 'drkl-kernels[hf]'") from err

import dataclasses

import torch

from .losses import loss_function

IGNORE_INDEX = -100


def _name(model) -> str:
    return type(model).__name__


def unwrap(model, role: str):
    """The ``transformers`` model under a PEFT wrapper (its adapters stay in place), else ``model``."""
    get_base_model = getattr(model, "get_base_model", None)  # peft.PeftModel
    inner = get_base_model() if callable(get_base_model) else model
    if not isinstance(inner, transformers.PreTrainedModel):
        raise TypeError(
            f"{role} must be a transformers PreTrainedModel (or a PEFT model around one), got {_name(model)}: "
            "pass the model itself (its backbone is called directly, so a DDP/FSDP wrapper is not supported)"
        )
    return inner


def logit_scale(config) -> float:
    """The multiplier a model applies to its logits before soft-capping, read as TRL 1.16 reads it:
    ``logit_scale`` (Cohere), ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1), else
    ``1 / logits_scaling`` (Granite, MiniCPM3; HyperCLOVA X multiplies by it); 1.0 if none is set."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is None:
        return 1.0
    return float(scaling) if config.model_type == "hyperclovax" else 1.0 / float(scaling)


@dataclasses.dataclass(frozen=True)
class LMHead:
    """One causal LM's last layer as the loss reads it: ``softcap(scale * (h W^T + b))``."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    scale: float
    softcap: float | None

    @classmethod
    def of(cls, model, role: str) -> LMHead:
        inner = unwrap(model, role)
        head = inner.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(
                f"{role} ({_name(inner)}) has no output embeddings (get_output_embeddings() gives "
                f"{_name(head)}): pass a causal LM with its LM head (AutoModelForCausalLM), not a bare backbone "
                "(AutoModel)"
            )
        config = inner.config.get_text_config()  # on VLMs the logit transform lives on the text config
        return cls(weight, getattr(head, "bias", None), logit_scale(config),
                   getattr(config, "final_logit_softcapping", None))  # fmt: skip


def same_vocabulary(student: LMHead, teacher: LMHead, student_model, teacher_model) -> None:
    """Both heads cover the same vocabulary (nothing is ever zero-padded)."""
    vs, vt = student.weight.shape[0], teacher.weight.shape[0]
    if vs != vt:
        raise ValueError(
            f"student ({_name(student_model)}) has a vocabulary of {vs} tokens and teacher ({_name(teacher_model)}) "
            f"of {vt}: distil between models that share a tokenizer, and if only padding rows of the LM heads "
            f"differ, resize one (model.resize_token_embeddings(n)) so both have the same number of rows"
        )


def last_hidden_state(model, role: str, inputs: dict) -> torch.Tensor:
    """``[B, T, H]``: the backbone's output (``base_model``, the LM head skipped) on ``inputs``."""
    inner = unwrap(model, role)
    backbone = inner.base_model
    if backbone is inner:
        raise ValueError(
            f"{role} ({_name(inner)}) has no separate backbone (base_model is the model itself): "
            "pass a causal LM built as a backbone plus an LM head (AutoModelForCausalLM)"
        )
    return backbone(**inputs, use_cache=False).last_hidden_state


def fused_distillation(loss: str, student_hidden, teacher_hidden, student: LMHead, teacher: LMHead, target, *,
                       gamma=0.5, temperature=1.0, num_items_in_batch=None, return_entropy=False,
                       backend="auto"):  # fmt: skip
    """The fused linear ``loss`` ("drkl", "rkl", "fkl") of the student's and teacher's hidden states
    ``[..., H]`` through their heads, ``target [...]`` (-100 where nothing is learned), reduced as
    "mean" (over the valid rows, or ``num_items_in_batch``). The hidden states and target go to the
    device of the student's head (a model split by ``device_map`` may end elsewhere); the teacher's
    tensors are detached (only the student is differentiated)."""
    device = student.weight.device
    fn = loss_function(loss, gamma, fused_linear=True)
    teacher_bias = None if teacher.bias is None else teacher.bias.detach()
    return fn(student_hidden.to(device), student.weight, teacher_hidden.detach().to(device), teacher.weight.detach(),
              target.to(device), student_bias=student.bias, teacher_bias=teacher_bias, temperature=temperature,
              num_items_in_batch=num_items_in_batch, return_entropy=return_entropy, backend=backend,
              student_logit_scale=student.scale, teacher_logit_scale=teacher.scale,
              student_softcap=student.softcap, teacher_softcap=teacher.softcap)  # fmt: skip


def distillation_loss(student, teacher, batch: dict, *, loss: str = "drkl", gamma: float = 0.5,
                      temperature: float = 1.0, num_items_in_batch=None, return_entropy: bool = False,
                      backend: str = "auto"):  # fmt: skip
    """DRKL (or "rkl", "fkl") of ``student`` to ``teacher`` on a causal-LM ``batch``, for a
    ``Trainer.compute_loss`` override.

    ``batch``: ``input_ids``, ``attention_mask`` (and any other backbone input) and ``labels``
    ``[B, T]``, -100 where nothing is learned, *unshifted*: position i is scored on ``labels[:, i + 1]``
    (a ``shift_labels`` entry, already shifted, is used as it is, as ``Trainer`` does). DRKL's
    target is that label. Both backbones run on the batch, the teacher's without grad; the loss is
    the "mean" over labelled tokens, or the sum over ``num_items_in_batch`` (pass ``Trainer``'s, for
    gradient accumulation). ``return_entropy=True`` also gives the student's entropy, reduced alike.

    Runs the backbones directly, not the models' ``forward``: pass unwrapped models (one device or
    ``device_map``); a DDP/FSDP wrapper's forward hooks would not run.
    """
    shifted = batch.get("shift_labels")
    labels = batch.get("labels") if shifted is None else shifted
    if labels is None:
        raise ValueError("batch must hold 'labels' [B, T] (-100 where nothing is learned)")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"batch['labels'] must be a tensor [B, T], got {type(labels).__name__}")
    ids = batch.get("input_ids")
    if ids is not None and labels.shape != ids.shape:
        raise ValueError(
            f"batch['{'labels' if shifted is None else 'shift_labels'}'] must have input_ids' shape "
            f"{tuple(ids.shape)}, got {tuple(labels.shape)}: pass the labels unshifted (distillation_loss shifts "
            "them, as causal LMs do), -100 where nothing is learned"
        )
    student_head, teacher_head = LMHead.of(student, "student"), LMHead.of(teacher, "teacher")
    same_vocabulary(student_head, teacher_head, student, teacher)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
    student_hidden = last_hidden_state(student, "student", inputs)
    with torch.no_grad():
        teacher_hidden = last_hidden_state(teacher, "teacher", inputs)
    if labels.shape != student_hidden.shape[:-1]:
        raise ValueError(
            f"batch['labels'] must have the shape of the tokens, {tuple(student_hidden.shape[:-1])}, got "
            f"{tuple(labels.shape)}"
        )
    target = labels if shifted is not None else torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return fused_distillation(loss, student_hidden, teacher_hidden, student_head, teacher_head, target, gamma=gamma,
                              temperature=temperature, num_items_in_batch=num_items_in_batch,
                              return_entropy=return_entropy, backend=backend)  # fmt: skip

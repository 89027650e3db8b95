"""``integrations.hf.distillation_loss`` against the public logits losses on the models' own logits
(which apply each model's scale and soft cap), and its errors (skipped without the ``hf`` extra)."""

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra is not installed (pip install 'drkl-kernels[hf]')")

from transformers import LlamaConfig, LlamaModel

from drkl_kernels.integrations import hf

from . import tiny_models
from .helpers import BACKENDS, DEVICE, LOSSES, assert_loss_close, generator
from .test_fused_linear import assert_chained_grad_close

# (student, teacher): every logit transform the configs declare, on either side
PAIRS = {
    "gemma2-cohere": ("gemma2", "cohere"),
    "granite-gemma2": ("granite", "gemma2"),
    "llama-granite": ("llama", "granite"),
}


def _models(pair):
    student = tiny_models.causal_lm(PAIRS[pair][0], 32, seed=7).to(DEVICE)
    teacher = tiny_models.causal_lm(PAIRS[pair][1], 48, seed=8, head_scale=4.0).to(DEVICE)
    return student, teacher


def _batch(key):
    return {k: v.to(DEVICE) for k, v in tiny_models.batch(generator(*key), rows=3, length=11).items()}


def _grads(student, loss):
    student.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in student.parameters()]


def _dense(kind, student, teacher, batch, **kw):
    """The public logits loss on the models' own logits, position i scored on labels[:, i + 1]."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        u = teacher(**inputs).logits[:, :-1]
    z = student(**inputs).logits[:, :-1]
    return LOSSES[kind](z, u, batch["labels"][:, 1:], backend="reference", **kw)


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("kind", ["drkl", "rkl", "fkl"])
def test_equals_the_logits_loss(kind, pair):
    """Loss, entropy and every student gradient equal the logits loss on the full logits (SPEC §6)."""
    student, teacher = _models(pair)
    batch = _batch(("hf", kind, pair))
    kw = {"temperature": 1.4, **({"gamma": 0.3} if kind == "drkl" else {})}
    got, entropy = hf.distillation_loss(student, teacher, batch, loss=kind, return_entropy=True, **kw)
    want, want_entropy = _dense(kind, student, teacher, batch, return_entropy=True, **kw)
    assert_loss_close(got.detach(), want.detach().double())
    assert_loss_close(entropy, want_entropy.double())
    for g, w in zip(_grads(student, got), _grads(student, want)):
        assert_chained_grad_close(g, w.double().cpu(), torch.float32, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_and_shift_labels(backend):
    """``num_items_in_batch`` replaces the divisor; a ``shift_labels`` entry (already shifted, as
    ``Trainer`` accepts) gives the same loss as the labels it came from."""
    student, teacher = _models("gemma2-cohere")
    batch = _batch(("hf-num-items",))
    items = torch.tensor(29.0, device=DEVICE)
    got = hf.distillation_loss(student, teacher, batch, num_items_in_batch=items, backend=backend)
    want = _dense("drkl", student, teacher, batch, num_items_in_batch=items)
    assert_loss_close(got.detach(), want.detach().double())
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    again = hf.distillation_loss(student, teacher, {**batch, "shift_labels": shifted}, num_items_in_batch=items,
                                 backend=backend)  # fmt: skip
    assert torch.equal(again, got)


def test_inputs_untouched_and_teacher_without_grad():
    student, teacher = _models("llama-granite")
    batch = _batch(("hf-untouched",))
    before = {k: v.clone() for k, v in batch.items()}
    hf.distillation_loss(student, teacher, batch).backward()
    assert all(torch.equal(before[k], batch[k]) for k in batch)
    assert all(p.grad is None for p in teacher.parameters())


def test_bad_input():
    student, teacher = _models("llama-granite")
    batch = _batch(("hf-bad",))
    other = tiny_models.causal_lm("llama", 48, vocab=80)
    with pytest.raises(
        ValueError,
        match=r"student \(LlamaForCausalLM\) has a vocabulary of 64 .* teacher \(LlamaForCausalLM\) of 80.*resize_token_embeddings",
    ):
        hf.distillation_loss(student, other.to(DEVICE), batch)
    backbone = LlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    with pytest.raises(ValueError, match=r"teacher \(LlamaModel\) has no output embeddings.*AutoModelForCausalLM"):
        hf.distillation_loss(student, backbone.to(DEVICE), batch)
    with pytest.raises(
        ValueError, match=r"batch\['labels'\] must have input_ids' shape \(3, 11\), got \(3, 10\).*unshifted"
    ):
        hf.distillation_loss(student, teacher, {**batch, "labels": batch["labels"][:, 1:]})
    with pytest.raises(ValueError, match="'labels'"):
        hf.distillation_loss(student, teacher, {k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(TypeError, match=r"student must be a transformers PreTrainedModel.*got Linear"):
        hf.distillation_loss(torch.nn.Linear(2, 2), teacher, batch)
    with pytest.raises(ValueError, match="loss_type"):
        hf.distillation_loss(student, teacher, batch, loss="jsd")


def test_logit_scale_names():
    """TRL's reading of the scale: logit_scale, output_multiplier, lm_head_multiplier, 1/logits_scaling
    (HyperCLOVA X multiplies), None meaning 1."""
    from types import SimpleNamespace as C

    assert hf.logit_scale(C(model_type="x")) == 1.0
    assert hf.logit_scale(C(model_type="x", logit_scale=None, output_multiplier=0.5)) == 0.5
    assert hf.logit_scale(C(model_type="x", lm_head_multiplier=3.0)) == 3.0
    assert hf.logit_scale(C(model_type="granite", logits_scaling=4.0)) == 0.25
    assert hf.logit_scale(C(model_type="hyperclovax", logits_scaling=4.0)) == 4.0

"""The TRL ``DistillationTrainer`` adapter against TRL's own code: its chunked divergence on
hidden states, its trainer's ``_compute_loss`` on tiny models, and a few training steps
(skipped without the ``trl`` extra; CI installs it)."""

import math

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed (pip install 'drkl-kernels[trl]')")

import trl
from datasets import Dataset
from transformers import TrainerCallback
from trl.trainer.distillation_trainer import _chunked_divergence_loss

import drkl_kernels as dk
from drkl_kernels import fused_linear
from drkl_kernels.integrations import trl as dk_trl
from drkl_kernels.integrations.hf import LMHead

from . import tiny_models
from .helpers import BACKENDS, DEVICE, SEED, assert_loss_close, generator
from .recording import Recording
from .test_fused_linear import assert_chained_grad_close, make_heads

BETA = {"rkl": 1.0, "fkl": 0.0}  # TRL's generalized JSD at its ends
# (student scale, student soft cap, teacher scale, teacher soft cap, temperature, num_items_in_batch)
TRANSFORMS = {
    "plain": (1.0, None, 1.0, None, 1.0, None),
    "gemma-cohere, num_items": (1.0, 30.0, 0.4, None, 1.0, 23.0),
    "granite-gemma, temperature": (1 / 2.5, None, 1.0, 30.0, 0.7, None),
    "both capped, temperature, num_items": (1.5, 50.0, 0.75, 40.0, 2.0, 23.0),
}


def _leaves(heads):
    return [t.clone().requires_grad_(True) for t in (heads.hs, heads.ws, heads.bs)]


def _both(kind, transform, heads, mask, target, backend):
    """TRL's ``_chunked_divergence_loss`` and ours on the same heads, and the float64 truth, each as
    (loss, entropy sum, n_valid, d hidden, d weight, d bias)."""
    s_scale, s_cap, t_scale, t_cap, temperature, num_items = TRANSFORMS[transform]
    items = None if num_items is None else torch.tensor(num_items, device=DEVICE)
    theirs = _leaves(heads)
    trl_out = _chunked_divergence_loss(theirs[0], heads.ht, theirs[1], heads.wt, mask, BETA[kind],
                                       num_items_in_batch=items, student_lm_head_bias=theirs[2],
                                       teacher_lm_head_bias=heads.bt, student_logit_scale=s_scale,
                                       teacher_logit_scale=t_scale, student_final_logit_softcapping=s_cap,
                                       teacher_final_logit_softcapping=t_cap, temperature=temperature)  # fmt: skip
    trl_out[0].backward()
    ours = _leaves(heads)
    our_out = dk_trl.chunked_divergence_loss(kind, ours[0], heads.ht, LMHead(ours[1], ours[2], s_scale, s_cap),
                                             LMHead(heads.wt, heads.bt, t_scale, t_cap), target,
                                             temperature=temperature, num_items_in_batch=items, backend=backend)  # fmt: skip
    assert not our_out[1].requires_grad
    our_out[0].backward()
    loss, *grads, entropy = heads.truth(kind, target, reduction="sum", return_entropy=True, temperature=temperature,
                                        student_logit_scale=s_scale, teacher_logit_scale=t_scale,
                                        student_softcap=s_cap, teacher_softcap=t_cap)  # fmt: skip
    divisor = max(float(mask.sum()) if items is None else float(items), 1.0)
    truth64 = (loss / divisor, entropy, int(mask.sum()), *(g / divisor for g in grads))
    return (*(t.detach() for t in trl_out), *(t.grad for t in theirs)), (*our_out, *(t.grad for t in ours)), truth64


def _heads_and_target(key, scale):
    gen = generator("trl-chunked", *key)
    heads = make_heads(18, 24, 40, 777, gen, lead=(2, 9), scale=scale, exact=True)
    mask = (torch.rand(2, 9, generator=gen) > 0.2).long()
    mask[:, 0] = 1
    target = torch.randint(0, 777, mask.shape, generator=gen).masked_fill(mask == 0, -100)
    return heads, mask.to(DEVICE), target.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("kind", ["rkl", "fkl"])
def test_chunked_divergence_equals_trl(kind, transform, backend):
    """RKL and FKL through the trainer's loss equal TRL's ``_chunked_divergence_loss`` (beta=1, 0) on
    the same hidden states, heads and biases (exact float32 matmuls, so both read the same logits,
    of magnitude ~5), with scales, soft caps, temperatures and ``num_items_in_batch``, within SPEC
    §6: loss and entropy sum (tolerance of a loss), d hidden, d weight and d bias (norm-wise,
    float32); n_valid equal."""
    heads, mask, target = _heads_and_target((kind, transform), 2.0**-6)
    want, got, _ = _both(kind, transform, heads, mask, target, backend)
    assert_loss_close(got[0], want[0])
    assert_loss_close(got[1], want[1])
    assert torch.equal(got[2], want[2])
    for g, w, t in zip(got[3:], want[3:], (heads.hs, heads.ws, heads.bs)):
        assert_chained_grad_close(g, w.double().cpu(), t.dtype, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", ["plain", "both capped, temperature, num_items"])
@pytest.mark.parametrize("kind", ["rkl", "fkl"])
def test_confident_rows_against_float64(kind, transform, backend):
    """Logits ~100 (confident rows), where TRL's own float32 entropy and gradients, formed from
    differences of log-sum-exps, drift from the float64 truth (up to 5e-4 and 6e-5 relative over
    10 seeds): there the trainer's loss is checked against the truth, within SPEC §6 (loss,
    entropy sum, each gradient)."""
    heads, mask, target = _heads_and_target((kind, transform, "confident"), 0.125)
    _, got, truth64 = _both(kind, transform, heads, mask, target, backend)
    assert_loss_close(got[0], truth64[0])
    assert_loss_close(got[1], truth64[1])
    assert int(got[2]) == truth64[2]
    for g, w, t in zip(got[3:], truth64[3:], (heads.hs, heads.ws, heads.bs)):
        assert_chained_grad_close(g, w, t.dtype, 0.0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_no_host_synchronisation(backend, monkeypatch):
    """The trainer's loss, forward and backward, with transforms and ``num_items_in_batch``: no op
    that waits for the device (``tests/recording.py``; validation's eager range check of a CPU
    target, which involves no device, is left out)."""
    heads, _, target = _heads_and_target(("sync",), 2.0**-6)
    leaves = _leaves(heads)
    rec = Recording(backend)
    if DEVICE == "cpu":
        monkeypatch.setattr(fused_linear, "validate", rec.unrecorded(fused_linear.validate))
    with rec:
        loss, _, _ = dk_trl.chunked_divergence_loss(
            "drkl", leaves[0], heads.ht, LMHead(leaves[1], leaves[2], 0.5, 30.0), LMHead(heads.wt, heads.bt, 1.0, None),
            target, num_items_in_batch=torch.tensor(7.0, device=DEVICE), backend=backend)  # fmt: skip
        loss.backward()
    assert rec.syncs == [], rec.syncs
    assert rec.launches


def _config(tmp_path, cls=dk_trl.DRKLDistillationConfig, **config):
    """A training config for this machine: float32 (bf16 autocast is slow on CPUs), nothing saved or reported."""
    return cls(str(tmp_path), report_to="none", use_cpu=DEVICE == "cpu", bf16=False, seed=SEED, save_strategy="no",
               **config)  # fmt: skip


def _trainer(student, teacher, tmp_path, **config) -> dk_trl.DistillationTrainer:
    args = _config(tmp_path, **config)
    prompts = Dataset.from_dict({"prompt": ["w3 w4", "w5 w6 w7"]})
    return dk_trl.DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                                      processing_class=tiny_models.tokenizer())  # fmt: skip


def _micro_batch(gen, prompt=5, completion=7) -> dict:
    """What TRL's generation step hands ``_compute_loss``: left-padded prompts, right-padded completions."""
    prompt_mask = torch.ones(2, prompt, dtype=torch.long)
    prompt_mask[0, :2] = 0
    completion_mask = torch.ones(2, completion, dtype=torch.long)
    completion_mask[1, -3:] = 0
    prompt_ids = torch.randint(3, tiny_models.VOCAB, (2, prompt), generator=gen).masked_fill(prompt_mask == 0, 0)
    completion_ids = torch.randint(3, tiny_models.VOCAB, (2, completion), generator=gen)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
             "completion_mask": completion_mask}  # fmt: skip
    return {k: v.to(DEVICE) for k, v in batch.items()}


def _loss_and_grads(compute, trainer, inputs, num_items):
    trainer.model.zero_grad()
    loss, entropy_sum, n_valid = compute(trainer, trainer.model, inputs, num_items)
    loss.backward()
    return loss.detach(), entropy_sum, n_valid, [p.grad.clone() for p in trainer.model.parameters()]


# (student, teacher, num_items_in_batch): each logit transform a config can declare, on either side
PAIRS = {"gemma2-cohere": ("gemma2", "cohere", None), "granite-gemma2, num_items": ("granite", "gemma2", 9.0),
         "llama-llama": ("llama", "llama", None)}  # fmt: skip


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("kind", ["rkl", "fkl"])
def test_trainer_equals_trl(kind, pair, tmp_path):
    """The subclass's ``_compute_loss`` equals TRL's own (beta=1 for RKL, 0 for FKL) on the same
    tiny models and micro-batch: loss, entropy sum and valid count, and every student gradient.
    This checks the hidden states and the config reading end to end."""
    student_arch, teacher_arch, num_items = PAIRS[pair]
    student = tiny_models.causal_lm(student_arch, 32).to(DEVICE)
    teacher = tiny_models.causal_lm(teacher_arch, 48, seed=1, head_scale=4.0).to(DEVICE)
    trainer = _trainer(student, teacher, tmp_path, loss_type=kind, beta=BETA[kind], temperature=0.8)
    inputs = _micro_batch(generator("trl-trainer", kind, pair))
    items = None if num_items is None else torch.tensor(num_items)
    want = _loss_and_grads(trl.DistillationTrainer._compute_loss, trainer, inputs, items)
    got = _loss_and_grads(dk_trl.DistillationTrainer._compute_loss, trainer, inputs, items)
    assert_loss_close(got[0], want[0])
    assert_loss_close(got[1], want[1])
    assert torch.equal(got[2], want[2])
    for g, w in zip(got[3], want[3]):
        assert_chained_grad_close(g, w.double().cpu(), torch.float32, 0.0)


def test_trainer_drkl_targets_the_completion(tmp_path):
    """loss_type="drkl": DRKL of the models' own logits (softcapped by the model) with the completion
    token as the target at each position, -100 outside the completion and tool masks."""
    student = tiny_models.causal_lm("gemma2", 32).to(DEVICE)
    teacher = tiny_models.causal_lm("cohere", 48, seed=1, head_scale=4.0).to(DEVICE)
    trainer = _trainer(student, teacher, tmp_path, loss_type="drkl", gamma=0.3, temperature=1.3)
    inputs = _micro_batch(generator("trl-drkl"))
    inputs["tool_mask"] = torch.ones_like(inputs["completion_mask"])
    inputs["tool_mask"][0, 2] = 0
    loss, entropy_sum, n_valid = trainer._compute_loss(student, inputs, None)

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    keep = inputs["completion_ids"].shape[1]
    z = student(input_ids=ids, attention_mask=mask).logits[:, -keep - 1 : -1]
    with torch.no_grad():
        u = teacher(input_ids=ids, attention_mask=mask).logits[:, -keep - 1 : -1]
    target = inputs["completion_ids"].masked_fill(inputs["completion_mask"] * inputs["tool_mask"] == 0, -100)
    want, entropy = dk.drkl_loss(z, u, target, gamma=0.3, temperature=1.3, return_entropy=True, backend="reference")
    assert int(n_valid) == int((target != -100).sum()) == 10
    assert_loss_close(loss.detach(), want.detach())
    assert_loss_close(entropy_sum, entropy * 10)


def test_config_and_trainer_errors(tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        _config(tmp_path, loss_type="jsd")
    with pytest.raises(ValueError, match="gamma"):
        _config(tmp_path, gamma=-0.1)
    student, teacher = tiny_models.causal_lm("llama", 32), tiny_models.causal_lm("llama", 48, seed=1)
    with pytest.raises(ValueError, match="beta=0.5 .*DRKLDistillationConfig"):
        dk_trl.DistillationTrainer(model=student, teacher_model=teacher,
                                   args=_config(tmp_path, trl.DistillationConfig, beta=0.5))  # fmt: skip
    trainer = _trainer(student, teacher, tmp_path)
    trainer.teacher_model = tiny_models.causal_lm("llama", 48, vocab=80)  # TRL checks vocab_size at init only
    with pytest.raises(ValueError, match=r"student \(LlamaForCausalLM\) has a vocabulary of 64 .* teacher .* 80"):
        trainer._compute_loss(student, _micro_batch(generator("trl-vocab")), None)


def test_plain_config_reads_beta(tmp_path):
    """A plain ``trl.DistillationConfig``: beta=1 is RKL, beta=0 FKL (TRL's ends of its JSD)."""
    student, teacher = tiny_models.causal_lm("llama", 32), tiny_models.causal_lm("llama", 48, seed=1)
    for beta, kind in ((1.0, "rkl"), (0.0, "fkl")):
        assert _trainer(student, teacher, tmp_path, cls=trl.DistillationConfig, beta=beta).loss_type == kind


class _StepRecorder(TrainerCallback):
    """After each optimizer step, the loss on the micro-batch that step trained on, before and after it."""

    def __init__(self):
        self.trainer, self.pairs = None, []

    def on_step_end(self, args, state, control, **kwargs):
        inputs, num_items, before = self.trainer.last
        with torch.no_grad():
            after = dk_trl.DistillationTrainer._compute_loss(self.trainer, self.trainer.model, inputs, num_items)[0]
        self.pairs.append((before, after.item()))


class _Recording(dk_trl.DistillationTrainer):
    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        out = super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        self.last = (inputs, num_items_in_batch, out[0].item())
        return out


def test_training_steps(tmp_path):
    """Six on-policy steps through the subclass on tiny random models (a Gemma-2 student with
    soft-capping, a Cohere teacher with a logit scale): every logged loss and entropy finite, each
    step lowers the loss of the micro-batch it trained on, and every student weight changes."""
    student = tiny_models.causal_lm("gemma2", 32, seed=SEED).to(DEVICE)
    teacher = tiny_models.causal_lm("cohere", 48, seed=SEED + 1, head_scale=4.0).to(DEVICE)
    recorder = _StepRecorder()
    args = _config(tmp_path, loss_type="drkl", gamma=0.5, per_device_train_batch_size=2, max_steps=6,
                   max_completion_length=6, learning_rate=1e-3, logging_steps=1)  # fmt: skip
    prompts = Dataset.from_dict({"prompt": [f"w{i} w{i + 7} w{i + 3}" for i in range(3, 11)]})
    trainer = _Recording(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                         processing_class=tiny_models.tokenizer(), callbacks=[recorder])  # fmt: skip
    recorder.trainer = trainer
    before = [p.detach().clone() for p in student.parameters()]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6 and all(math.isfinite(h["loss"]) and 0 < h["entropy"] < math.log(64) for h in logs)
    assert len(recorder.pairs) == 6 and all(after < before for before, after in recorder.pairs), recorder.pairs
    assert all(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    print("losses before/after each step:", recorder.pairs)

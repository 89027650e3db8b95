"""The README's "Use it in training" snippets run as written, on tiny random models."""

import math
import re
from pathlib import Path

import pytest
import torch

import drkl_kernels as dk

from .helpers import generator, labels

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SECTION = README.split("## Use it in training", 1)[1].split("\n## ", 1)[0]
SNIPPETS = re.findall(r"```python\n(.*?)```", SECTION, flags=re.S)
NAMES = ["plain loop", "torch.compile", "TRL GKD", "HF Trainer", "TRL DistillationTrainer"]


def test_every_snippet_is_run():
    assert len(SNIPPETS) == len(NAMES)


def test_plain_loop():
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    from . import tiny_models

    student, teacher = tiny_models.causal_lm("llama", 32), tiny_models.causal_lm("llama", 48, seed=1, head_scale=4.0)
    before = [p.detach().clone() for p in student.parameters()]
    scope = {"student": student, "teacher": teacher,
             "loader": [tiny_models.batch(generator("readme-loop", i)) for i in range(3)]}  # fmt: skip
    exec(SNIPPETS[NAMES.index("plain loop")], scope)
    assert torch.isfinite(scope["loss"]) and 0 < scope["entropy"] <= math.log(tiny_models.VOCAB)
    assert all(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_compile():
    torch._dynamo.reset()
    gen = generator("readme-compile")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))
    scope = {"dk": dk, "model": model, "input_ids": torch.randint(0, 50, (2, 7), generator=gen),
             "labels": labels(14, 50, gen, lead=(2, 7)),
             "teacher_logits": torch.randn(2, 7, 50, generator=gen)}  # fmt: skip
    exec("import torch\n" + SNIPPETS[NAMES.index("torch.compile")], scope)
    eager = dk.drkl_loss(model(scope["input_ids"]), scope["teacher_logits"], scope["labels"], gamma=0.5)
    torch.testing.assert_close(scope["loss"], eager, rtol=1e-6, atol=1e-7)
    assert model[1].weight.grad is not None


def test_trl_gkd():
    pytest.importorskip("trl", reason="the trl extra is not installed")
    scope = {}
    exec(SNIPPETS[NAMES.index("TRL GKD")], scope)
    gen = generator("readme-gkd")
    z, u = torch.randn(2, 5, 40, generator=gen), torch.randn(2, 5, 40, generator=gen)
    target = labels(10, 40, gen, lead=(2, 5))
    got = scope["DRKLGKDTrainer"].generalized_jsd_loss(student_logits=z, teacher_logits=u, labels=target, beta=0.5)
    assert torch.equal(got, dk.drkl_loss(z, u, target, gamma=0.5))


def _train(student, run, scope) -> list[float]:
    """Runs ``run()``; checks that every student weight changed; the losses ``scope["trainer"]`` logged."""
    before = [p.detach().clone() for p in student.parameters()]
    run()
    assert all(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    return [h["loss"] for h in scope["trainer"].state.log_history if "loss" in h]


def test_hf_trainer(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    from transformers import TrainingArguments

    from . import tiny_models

    student, teacher = tiny_models.causal_lm("gemma2", 32), tiny_models.causal_lm("cohere", 48, seed=1, head_scale=4.0)
    rows = tiny_models.batch(generator("readme-hf"), rows=4)
    scope = {"student": student, "teacher": teacher,
             "dataset": [{k: v[i] for k, v in rows.items()} for i in range(4)],
             "training_args": TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                                learning_rate=1e-3, use_cpu=True, report_to="none",
                                                save_strategy="no", logging_steps=1)}  # fmt: skip
    exec(SNIPPETS[NAMES.index("HF Trainer")], scope)
    losses = _train(student, lambda: scope["trainer"].train(), scope)
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)


def test_trl_distillation_trainer(tmp_path):
    pytest.importorskip("trl", reason="the trl extra is not installed")
    from datasets import Dataset

    from . import tiny_models

    student, teacher = tiny_models.causal_lm("gemma2", 32), tiny_models.causal_lm("llama", 48, seed=1, head_scale=4.0)
    scope = {"student": student, "teacher": teacher, "output_dir": str(tmp_path),
             "tokenizer": tiny_models.tokenizer(), "prompts": Dataset.from_dict({"prompt": ["w3 w4", "w5 w6 w7"]}),
             "training_options": {"use_cpu": True, "bf16": False, "max_steps": 2, "per_device_train_batch_size": 2,
                                  "max_completion_length": 4, "report_to": "none", "save_strategy": "no",
                                  "logging_steps": 1}}  # fmt: skip
    losses = _train(student, lambda: exec(SNIPPETS[NAMES.index("TRL DistillationTrainer")], scope), scope)
    assert scope["trainer"].loss_type == "drkl" and scope["trainer"].gamma == 0.5
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)

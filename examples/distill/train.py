"""The training objectives and loops: the teacher on the labels, the students on the teacher.

Every distillation objective goes through ``drkl_kernels`` (loss and gradient from the fused
kernels, backend "auto"); the CE baseline is torch's cross-entropy on the labels. An objective
takes ``(student_hidden, student_weight, teacher_hidden, teacher_weight, target)``, the inputs of
the fused linear losses of SPEC §4, and forms the logits itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import drkl_kernels as dk

from .model import TinyGPT

DIVERGENCES = {"fkl": dk.fkl_loss, "rkl": dk.rkl_loss, "drkl": dk.drkl_loss}


@dataclass(frozen=True)
class Objective:
    """``kind`` is "ce" (labels only), "fkl", "rkl" or "drkl" (with ``gamma``); temperature 1."""

    kind: str
    gamma: float | None = None

    @property
    def label(self) -> str:
        return {"ce": "CE (labels)", "fkl": "FKL", "rkl": "RKL"}.get(self.kind) or f"DRKL γ={self.gamma:g}"

    def __call__(self, student_hidden, student_weight, teacher_hidden, teacher_weight, target) -> torch.Tensor:
        """Mean loss over the rows of ``student_hidden [N, H_s]``; ``target [N]`` are the labels
        (DRKL's target token, and the CE labels)."""
        student_logits = student_hidden @ student_weight.T
        if self.kind == "ce":
            return F.cross_entropy(student_logits, target)
        teacher_logits = teacher_hidden @ teacher_weight.T
        options = {"gamma": self.gamma} if self.kind == "drkl" else {}
        return DIVERGENCES[self.kind](student_logits, teacher_logits, target, **options)


def objectives(gammas: list[float]) -> list[Objective]:
    return [Objective("ce"), Objective("fkl"), Objective("rkl")] + [Objective("drkl", g) for g in gammas]


@dataclass(frozen=True)
class Schedule:
    """AdamW (betas 0.9, 0.95, no weight decay), linear warm-up over the first 10% of the steps,
    cosine decay to 10% of ``lr``, gradients clipped to norm 1."""

    steps: int
    batch: int
    lr: float

    def optimizer(self, model: torch.nn.Module):
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, betas=(0.9, 0.95), weight_decay=0.0)
        warm = max(1, self.steps // 10)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, self.steps - warm)))

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def order(self, n: int, seed: int) -> torch.Tensor:
        """``[steps, batch]`` window indices: shuffled epochs over ``n`` windows, from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        needed = self.steps * self.batch
        shuffled = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(needed / n))])
        return shuffled[:needed].view(self.steps, self.batch)


def _step(model, opt, sched, loss: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss.item()


def train_teacher(model: TinyGPT, windows: torch.Tensor, schedule: Schedule, seed: int) -> list[float]:
    """Cross-entropy on the labels; returns the loss of every step."""
    opt, sched = schedule.optimizer(model)
    model.train()
    losses = []
    for idx in tqdm(schedule.order(len(windows), seed), desc="teacher", unit="step", leave=False):
        w = windows[idx]
        logits = model.logits(w[:, :-1])
        losses.append(_step(model, opt, sched, F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())))
    model.eval()
    return losses


def train_student(
    student: TinyGPT,
    objective: Objective,
    windows: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    schedule: Schedule,
    seed: int,
    probe: Callable[[TinyGPT], dict],
    probe_every: int,
    desc: str,
    position: int = 0,
) -> dict:
    """Train ``student`` on ``windows [n, T + 1]`` with ``objective`` against the teacher's final
    hidden states ``teacher_hidden [n, T, H_t]`` (precomputed, the teacher is frozen) and head
    ``teacher_weight``. The window order comes from ``seed`` alone, so every objective sees the
    same batches. Returns the curve: the loss of every step and ``probe(student)`` every
    ``probe_every`` steps and at the end. ``desc`` and ``position`` place its progress bar."""
    opt, sched = schedule.optimizer(student)
    curve = {"loss": [], "probe_step": [], "probe": []}

    def record(step: int):
        student.eval()
        with torch.no_grad():
            curve["probe"].append(probe(student))
        curve["probe_step"].append(step)
        student.train()

    record(0)
    bar = tqdm(schedule.order(len(windows), seed), desc=desc, unit="step", leave=False, position=position)
    for step, idx in enumerate(bar, 1):
        w = windows[idx]
        hidden = student.hidden(w[:, :-1]).flatten(0, 1)
        loss = objective(
            hidden, student.head_weight, teacher_hidden[idx].flatten(0, 1), teacher_weight, w[:, 1:].flatten()
        )
        curve["loss"].append(_step(student, opt, sched, loss))
        if step % probe_every == 0 or step == schedule.steps:
            record(step)
    student.eval()
    return curve

"""Fidelity on held-out text and diversity on samples (plain torch, independent of the kernels).

Fidelity, per held-out token (student q, teacher p, label y):
    perplexity      exp(mean -log q_y)
    fkl, rkl        mean KL(p || q), mean KL(q || p)                  (nats per token)
    top1_agreement  share of tokens where argmax q == argmax p
    ece             expected calibration error of max q against the label, 15 equal-width bins
    entropy         mean H(q)
Diversity, on continuations sampled at temperature 1 from fixed prompts:
    sample_entropy  mean H of the model's next-token distribution along its own samples
    top1_share      mean max_i q_i along its own samples (over-confidence)
    distinct_n      distinct n-grams / n-grams over all continuations (n = 1, 2, 3)
    self_bleu       BLEU-4 of each continuation against the other continuations of its prompt
                    (all have the same length, so no brevity penalty; zero n-gram matches
                    count as 0.1, Chen and Cherry's first smoothing), averaged
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F

from .model import TinyGPT

ECE_BINS = 15


@torch.no_grad()
def hidden_states(model: TinyGPT, windows: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The model's final hidden states on the inputs of ``windows [n, T + 1]``: ``[n, T, H]``."""
    return torch.cat([model.hidden(windows[i : i + batch, :-1]) for i in range(0, len(windows), batch)])


@torch.no_grad()
def fidelity(
    model: TinyGPT, windows: torch.Tensor, teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, batch: int = 32
) -> dict:
    """Fidelity metrics of ``model`` against the teacher (given by its hidden states on the same
    windows and its head) on ``windows [n, T + 1]``; see the module docstring."""
    sums = torch.zeros(6, dtype=torch.float64)  # nll, fkl, rkl, agreement, entropy, count
    conf_sum = torch.zeros(ECE_BINS, dtype=torch.float64)
    correct_sum = torch.zeros(ECE_BINS, dtype=torch.float64)
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        s = F.log_softmax(model.logits(w[:, :-1]).flatten(0, 1), -1)
        r = F.log_softmax(teacher_hidden[i : i + batch].flatten(0, 1) @ teacher_weight.T, -1)
        y = w[:, 1:].flatten()
        q, p = s.exp(), r.exp()
        conf, top = q.max(-1)
        rows = torch.stack(
            [
                -s.gather(1, y[:, None])[:, 0],
                (p * (r - s)).sum(-1),
                (q * (s - r)).sum(-1),
                (top == r.argmax(-1)).float(),
                -(q * s).sum(-1),
                torch.ones_like(conf),
            ]
        )
        sums += rows.double().sum(1)
        bins = (conf * ECE_BINS).long().clamp_(max=ECE_BINS - 1)
        conf_sum.index_add_(0, bins, conf.double())
        correct_sum.index_add_(0, bins, (top == y).double())
    nll, fkl, rkl, agreement, entropy, _ = (sums / sums[5]).tolist()
    ece = ((conf_sum - correct_sum).abs().sum() / sums[5]).item()
    return {
        "perplexity": math.exp(nll),
        "fkl": fkl,
        "rkl": rkl,
        "top1_agreement": agreement,
        "ece": ece,
        "entropy": entropy,
    }


@torch.no_grad()
def sample(model: TinyGPT, prompts: torch.Tensor, per_prompt: int, length: int, seed: int) -> dict:
    """``per_prompt`` continuations of ``length`` tokens for each row of ``prompts [P, k]``,
    sampled at temperature 1 with a generator seeded by ``seed``. Returns the continuations
    ``[P * per_prompt, length]`` (rows of one prompt adjacent) and, at every sampled position,
    the entropy and the top-1 probability of the distribution it was drawn from."""
    g = torch.Generator().manual_seed(seed)
    x = prompts.repeat_interleave(per_prompt, 0)
    entropy, top1 = [], []
    for _ in range(length):
        h = model.hidden(x[:, -model.config.context :])[:, -1]
        logp = F.log_softmax(h @ model.head_weight.T, -1)
        p = logp.exp()
        entropy.append(-(p * logp).sum(-1))
        top1.append(p.max(-1).values)
        x = torch.cat([x, torch.multinomial(p, 1, generator=g)], 1)
    return {"tokens": x[:, prompts.shape[1] :], "entropy": torch.stack(entropy, 1), "top1": torch.stack(top1, 1)}


def diversity(samples: dict, per_prompt: int) -> dict:
    """Diversity metrics of the output of :func:`sample`; see the module docstring."""
    seqs = samples["tokens"].tolist()
    out = {"sample_entropy": samples["entropy"].mean().item(), "top1_share": samples["top1"].mean().item()}
    for n in (1, 2, 3):
        grams = [g for s in seqs for g in _ngrams(s, n)]
        out[f"distinct_{n}"] = len(set(grams)) / len(grams)
    groups = [seqs[i : i + per_prompt] for i in range(0, len(seqs), per_prompt)]
    scores = [_bleu(hyp, group[:j] + group[j + 1 :]) for group in groups for j, hyp in enumerate(group)]
    out["self_bleu"] = sum(scores) / len(scores)
    return out


def _ngrams(seq: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def _bleu(hyp: list[int], refs: list[list[int]], max_n: int = 4) -> float:
    log_precision = 0.0
    for n in range(1, max_n + 1):
        counts = Counter(_ngrams(hyp, n))
        most = Counter()
        for ref in refs:
            most |= Counter(_ngrams(ref, n))
        matched = sum(min(c, most[g]) for g, c in counts.items())
        log_precision += math.log((matched or 0.1) / sum(counts.values())) / max_n
    return math.exp(log_precision)

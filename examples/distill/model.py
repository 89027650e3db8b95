"""A small causal transformer in plain torch (pre-norm GPT, tied embeddings, random init).

``hidden(x)`` returns the final normalised hidden states; the language-model head is the token
embedding (``head_weight``), so logits are ``hidden @ head_weight.T``. Keeping the two apart lets
a loss take (hidden, weight) pairs, as the fused linear losses of SPEC §4 do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Config:
    vocab_size: int
    context: int
    d_model: int
    layers: int
    heads: int
    dropout: float = 0.0

    def describe(self) -> str:
        return f"{self.layers} layers, d_model {self.d_model}, {self.heads} heads, context {self.context}"

    def as_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.heads, self.dropout = c.heads, c.dropout
        self.norm1, self.norm2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.qkv, self.out = nn.Linear(c.d_model, 3 * c.d_model), nn.Linear(c.d_model, c.d_model)
        self.up, self.down = nn.Linear(c.d_model, 4 * c.d_model), nn.Linear(4 * c.d_model, c.d_model)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.down(F.gelu(self.up(self.norm2(x)))))


class TinyGPT(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.position = nn.Embedding(c.context, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.d_model)
        self.drop = nn.Dropout(c.dropout)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2 initialisation; residual projections scaled down by depth
                std = 0.02 / (2 * c.layers) ** 0.5 if name.endswith(("out.weight", "down.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T]`` token ids -> ``[B, T, d_model]`` final hidden states."""
        h = self.drop(self.embed(x) + self.position.weight[: x.shape[1]])
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(x) @ self.head_weight.T

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

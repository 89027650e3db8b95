"""Tiny causal LMs and a word-level tokenizer built from ``transformers`` configs: random weights,
nothing downloaded. One architecture per logit transform the adapters read from a config."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

VOCAB = 64
PAD, EOS = 0, 1

# architecture -> (config class, model class, the logit transform in the config)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"final_logit_softcapping": 5.0, "head_dim": 16}),
    "cohere": (CohereConfig, CohereForCausalLM, {"logit_scale": 0.4}),
    "granite": (GraniteConfig, GraniteForCausalLM, {"logits_scaling": 2.5}),
}


def causal_lm(arch: str, hidden: int, *, vocab: int = VOCAB, seed: int = 0, head_scale: float = 1.0, **config):
    """A one-layer model of ``arch`` with hidden size ``hidden``; ``head_scale`` sharpens its
    distribution; ``config`` overrides entries of its config (e.g. ``tie_word_embeddings=False``)."""
    config_cls, model_cls, transform = ARCHS[arch]
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=PAD,
                        eos_token_id=EOS, bos_token_id=None, **{**transform, **config})  # fmt: skip
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    return model


def tokenizer() -> PreTrainedTokenizerFast:
    """Words ``w3`` .. ``w63`` are tokens 3 .. 63; left padding, as TRL's trainers want."""
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")  # fmt: skip


def batch(gen: torch.Generator, rows: int = 2, length: int = 9) -> dict:
    """A causal-LM batch: token ids, an attention mask with left padding, labels -100 on the padding and prompt."""
    ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = PAD
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 2:4] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

"""Sampling a continuation from a trained model (`python -m trainer sample`), in the ids of the
run's tokenizer (`trainer.data.saved_tokenizer`: bytes, or the run's tokenizer.json)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..data import BYTES, Tokenizer
from ..model import Transformer


@torch.no_grad()
def generate(model: Transformer, prompt_S: torch.Tensor, new_tokens: int, temperature: float = 0.8,
             top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`new_tokens` tokens following `prompt_S` (1-D int64). Temperature 0 is greedy; `top_k`
    keeps the k likeliest tokens. The context is the last `model.seq_len` tokens (no KV cache:
    the models here are small and this stays obviously right)."""
    device = next(model.parameters()).device
    tokens_S = prompt_S.to(device)
    for _ in range(new_tokens):
        context_1S = tokens_S[-model.cfg.seq_len:].unsqueeze(0)
        logits_V = model(context_1S).logits[0, -1].float()
        if temperature == 0:
            next_token = logits_V.argmax().view(1)
        else:
            logits_V = logits_V / temperature
            if top_k is not None and top_k < logits_V.numel():
                kth = torch.topk(logits_V, top_k).values[-1]
                logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
            probs_V = torch.softmax(logits_V, dim=-1)
            next_token = torch.multinomial(probs_V.cpu(), 1, generator=generator).to(device)
        tokens_S = torch.cat([tokens_S, next_token])
    return tokens_S[len(prompt_S):]


def encode(text: str, tokenizer: Optional[Tokenizer] = None) -> torch.Tensor:
    """Token ids (1-D int64) of `text` with the run's tokenizer (default: bytes)."""
    return torch.from_numpy((tokenizer or BYTES).encode(text).astype(np.int64))


def decode(tokens: torch.Tensor, tokenizer: Optional[Tokenizer] = None) -> str:
    """Text of token ids with the run's tokenizer (default: bytes); ids beyond its vocabulary are dropped
    (bytes: read as 255)."""
    return (tokenizer or BYTES).decode(tokens.tolist())

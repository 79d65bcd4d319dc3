"""Sampling a continuation from a trained model (`python -m trainer sample`). Tokens are bytes."""

from __future__ import annotations

from typing import Optional

import torch

from .model import Transformer


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


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def decode(tokens: torch.Tensor) -> str:
    return bytes(min(int(t), 255) for t in tokens.tolist()).decode("utf-8", errors="replace")

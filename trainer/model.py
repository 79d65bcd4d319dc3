"""Decoder-only transformer: RMSNorm, rotary attention (grouped-query heads, q/k norms), MoE FFN
(the first model.first_moe_layer blocks, and those between every model.moe_every-th, dense).

Shape legend: B batch, S sequence, D model dim, H heads, Hd head dim, R rotating dims of a head, V vocabulary.

No distributed code here: the model is built without process groups (on the meta device when
large) and `trainer.parallel.parallelize` applies the layout afterwards, then calls `init_weights`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, MoEConfig, chooses_with_expert_bias, head_dim, is_moe_layer, kv_heads, rotary_dim
from .moe import MoE, MoEStats
from .moe.experts import expert_parameters
from .seeding import derived_seed


def rotary_tables(seq_len: int, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [S, R] for the R rotating dims of a head (R = Hd unless model.rope_fraction < 1)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles_SH = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # H = R/2 here
    angles_SR = torch.cat([angles_SH, angles_SH], dim=-1)
    return angles_SR.cos().float(), angles_SR.sin().float()


def apply_rotary(x_BHSHd: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of each head (rotate-half pairing, as Llama and transformers); the
    rest pass through."""
    R = cos_SR.shape[-1]
    x_rot, x_pass = (x_BHSHd, None) if R == x_BHSHd.shape[-1] else (x_BHSHd[..., :R], x_BHSHd[..., R:])
    first, second = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    out = x_rot * cos_SR.to(x_rot.dtype) + rotated * sin_SR.to(x_rot.dtype)
    return out if x_pass is None else torch.cat([out, x_pass], dim=-1)


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings, grouped-query heads (`n_kv_heads` < `n_heads`:
    query head h reads key/value head h // (n_heads / n_kv_heads)) and optional q/k RMSNorm, before
    the rotation: `per_head` normalises each head's vector with one shared gain of Hd (Qwen3),
    `full` the whole q and k projections (OLMoE). Q = H*Hd and KV = Hkv*Hd are the projection widths."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, kv_heads(cfg), head_dim(cfg)
        Q, KV = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.widths = (Q, KV, KV)
        self.qkv = nn.Linear(cfg.d_model, Q + 2 * KV, bias=cfg.attention_bias)
        self.out = nn.Linear(Q, cfg.d_model, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            q_width, k_width = (self.head_dim, self.head_dim) if cfg.qk_norm == "per_head" else (Q, KV)
            self.q_norm = nn.RMSNorm(q_width, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(k_width, eps=cfg.norm_eps)

    def forward(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BSQ, k_BSK, v_BSK = self.qkv(x_BSD).split(self.widths, dim=-1)
        if self.qk_norm == "full":
            q_BSQ, k_BSK = self.q_norm(q_BSQ), self.k_norm(k_BSK)
        q = q_BSQ.view(B, S, self.n_heads, self.head_dim)  # [B, S, heads, Hd]
        k, v = (t.view(B, S, self.n_kv_heads, self.head_dim) for t in (k_BSK, v_BSK))
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, S, Hd]
        q, k = apply_rotary(q, cos_SR[:S], sin_SR[:S]), apply_rotary(k, cos_SR[:S], sin_SR[:S])
        grouped = {"enable_gqa": True} if self.n_kv_heads != self.n_heads else {}
        y_BHSHd = F.scaled_dot_product_attention(q, k, v, is_causal=True, **grouped)
        return self.out(y_BHSHd.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class DenseFFN(nn.Module):
    """SwiGLU feed-forward, the dense counterpart of one expert."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = ffn

    def forward(self, x_BSD, cos_SR, sin_SR, valid_BS, token_offset=None):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SR, sin_SR)
        h_BSD = self.ffn_norm(x_BSD)
        if isinstance(self.ffn, MoE):
            moe_out = self.ffn(h_BSD, valid_BS, token_offset)
            return x_BSD + moe_out.out, moe_out
        return x_BSD + self.ffn(h_BSD), None


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, V]
    loss: Optional[torch.Tensor]  # the training objective: lm + aux_coef * aux + z_coef * z
    lm_loss: Optional[torch.Tensor]
    aux_loss: torch.Tensor  # mean over MoE layers (0 for a dense model)
    z_loss: torch.Tensor  # mean over MoE layers
    moe_stats: list[MoEStats] = field(default_factory=list)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig):
        super().__init__()
        self.cfg, self.moe_cfg = cfg, moe_cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        blocks = []
        for layer_id in range(cfg.n_layers):
            if self.is_moe_block(layer_id):
                ffn = MoE(cfg.d_model, moe_cfg.d_ff, moe_cfg.num_experts, moe_cfg.top_k, moe_cfg.capacity_factor,
                          layer_id=layer_id, normalize_top_k=moe_cfg.normalize_top_k,
                          drop_policy=moe_cfg.drop_policy, expert_impl=moe_cfg.expert_impl,
                          score_func=moe_cfg.score_func, route_scale=moe_cfg.route_scale,
                          expert_bias=chooses_with_expert_bias(moe_cfg), eval_capacity_factor=moe_cfg.eval_capacity_factor,
                          min_capacity=moe_cfg.min_capacity, max_recv_factor=moe_cfg.max_recv_factor,
                          num_shared_experts=moe_cfg.num_shared_experts, n_groups=moe_cfg.n_groups,
                          topk_groups=moe_cfg.topk_groups, aux_loss_scope=moe_cfg.aux_loss_scope,
                          router_jitter=moe_cfg.router_jitter, noisy_topk=moe_cfg.noisy_topk,
                          overlap_shared_experts=moe_cfg.overlap_shared_experts)
            else:
                ffn = DenseFFN(cfg.d_model, cfg.dense_d_ff or moe_cfg.d_ff)
            blocks.append(Block(cfg, ffn))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        # filled by init_weights: on the meta device they hold no data yet
        self.register_buffer("cos_SR", torch.empty(cfg.seq_len, rotary_dim(cfg)), persistent=False)
        self.register_buffer("sin_SR", torch.empty(cfg.seq_len, rotary_dim(cfg)), persistent=False)

    def tie_weights(self) -> None:
        """With model.tie_embeddings the head is the embedding matrix. Materialising a meta model
        makes new parameters, so `parallelize` ties them again afterwards."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def is_moe_block(self, layer_id: int) -> bool:
        return is_moe_layer(self.cfg, self.moe_cfg, layer_id)

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def forward(
        self,
        idx_BS: torch.Tensor,
        targets_BS: Optional[torch.Tensor] = None,
        valid_BS: Optional[torch.Tensor] = None,
        lm_tokens: Optional[float] = None,
        token_offset: Optional[int] = None,
    ) -> ModelOutput:
        """`targets_BS` of -100 are ignored by the LM loss; `valid_BS` False marks padding for routing.

        The LM loss is the summed cross-entropy divided by `lm_tokens`, by default this call's
        number of scored targets (a plain mean). The trainer passes the global batch's scored
        targets per rank and micro-batch, so every token weighs the same whichever rank holds it.
        `token_offset` is the index of this call's first token in the optimizer step's global
        batch; it keys the routers' training noise (see `trainer.moe.router`).
        """
        S = idx_BS.shape[1]
        if S > self.cfg.seq_len:
            raise ValueError(f"sequence length {S} exceeds model.seq_len={self.cfg.seq_len}")
        x_BSD = self.embed(idx_BS)
        aux_sum = z_sum = torch.zeros((), device=idx_BS.device)
        stats = []
        for block in self.blocks:
            x_BSD, moe_out = block(x_BSD, self.cos_SR, self.sin_SR, valid_BS, token_offset)
            if moe_out is not None:
                aux_sum, z_sum = aux_sum + moe_out.aux_loss, z_sum + moe_out.z_loss
                stats.append(moe_out.stats)
        n_moe = max(len(stats), 1)
        aux_loss, z_loss = aux_sum / n_moe, z_sum / n_moe
        logits_BSV = self.lm_head(self.norm(x_BSD))
        loss = lm_loss = None
        if targets_BS is not None:
            lm_sum = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten(), ignore_index=-100,
                                     reduction="sum")
            if lm_tokens is None:
                lm_tokens = (targets_BS != -100).sum().clamp(min=1)
            lm_loss = lm_sum / lm_tokens
            loss = lm_loss + self.moe_cfg.aux_loss_coef * aux_loss + self.moe_cfg.z_loss_coef * z_loss
        return ModelOutput(logits_BSV, loss, lm_loss, aux_loss, z_loss, stats)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic, layout-independent init: each dense tensor from a seed of (seed, its name),
        each expert from a seed of (seed, layer, global expert id)."""
        cfg = self.cfg
        cos_SR, sin_SR = rotary_tables(cfg.seq_len, rotary_dim(cfg), cfg.rope_theta)
        self.cos_SR.copy_(cos_SR)
        self.sin_SR.copy_(sin_SR)
        std = 1.0 / math.sqrt(cfg.d_model)
        out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
        moe_params = set()
        for moe in self.moe_layers:
            moe.init_weights(seed, std, out_scale / math.sqrt(self.moe_cfg.d_ff))
            moe_params.update(id(p) for p in moe.parameters())
        for name, param in self.named_parameters():
            if id(param) in moe_params:  # router and experts: initialised by their layer above
                continue
            if param.dim() == 1:  # norm gains, q/k/v biases
                param.fill_(0.0 if name.endswith("qkv.bias") else 1.0)
                continue
            gen = torch.Generator().manual_seed(derived_seed(seed, name))
            fan_in = param.shape[1]
            if name == "embed.weight":
                scale = std if cfg.tie_embeddings else 1.0  # tied, it is also the head: logits start O(1)
            elif name.endswith(("attn.out.weight", "ffn.w2.weight")):
                scale = out_scale / math.sqrt(fan_in)
            elif name == "lm_head.weight":
                scale = 0.5 * std
            else:
                scale = 1.0 / math.sqrt(fan_in)
            param.copy_(torch.randn(param.shape, generator=gen) * scale)

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token), embeddings included: routed experts count top_k / num_experts
        of their weights; shared experts, router and dense blocks count whole."""
        total = sum(p.numel() for p in self.parameters())
        routed = sum(p.numel() for p in expert_parameters(self))
        moe = self.moe_cfg
        active = total - routed + (routed * moe.top_k // moe.num_experts if moe.num_experts else 0)
        return total, active

    def flops_per_token(self) -> float:
        """Forward+backward FLOPs per token with only the active (top-k) experts counted."""
        cfg, moe = self.cfg, self.moe_cfg
        experts = {id(p) for p in expert_parameters(self)}
        dense = sum(p.numel() for n, p in self.named_parameters() if id(p) not in experts and n != "embed.weight")
        if cfg.tie_embeddings:  # the one matrix is named embed.weight, and the head multiplies by it
            dense += self.lm_head.weight.numel()
        active_experts = sum(moe.top_k * 3 * cfg.d_model * moe.d_ff for _ in self.moe_layers)
        attention = 12 * cfg.n_layers * cfg.n_heads * head_dim(cfg) * cfg.seq_len // 2  # causal: half the scores
        return 6.0 * (dense + active_experts) + attention

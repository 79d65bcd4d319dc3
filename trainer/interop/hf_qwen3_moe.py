"""Qwen3-MoE (`transformers.Qwen3MoeForCausalLM`): grouped-query attention with an RMSNorm of each
head's q and k (`model.qk_norm=per_head`), a softmax router whose top-k weights are renormalised or
not (`norm_topk_prob`), dense blocks where `mlp_only_layers` (our first `model.first_moe_layer`) or
`decoder_sparse_step` (`model.moe_every`) say. See `hf_mapping` for the mechanism."""

from __future__ import annotations

from typing import Optional

from ..config import Config
from .hf_mapping import (Family, attention_bias_check, attention_checks, dense_blocks, renormalised,
                         sliding_window_check, softmax_router_checks)

QWEN3_MOE_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
                      "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [], "attention_bias": False,
                      "use_sliding_window": False, "num_experts_per_tok": 8}


def _checks(cfg: Config) -> list:
    return [*softmax_router_checks(cfg, "Qwen3-MoE"), *attention_checks(cfg, "Qwen3-MoE", ("per_head",))]


def _config(cfg: Config) -> dict:
    m, e = cfg.model, cfg.moe
    return {"intermediate_size": m.dense_d_ff or e.d_ff, "moe_intermediate_size": e.d_ff, "num_experts": e.num_experts,
            "norm_topk_prob": renormalised(cfg), "decoder_sparse_step": m.moe_every,
            "mlp_only_layers": list(range(m.first_moe_layer)), "attention_bias": False, "use_sliding_window": False,
            "sliding_window": None}


def _checked(cfg: Config) -> dict:
    keys = {"moe_intermediate_size": "moe.d_ff", "num_experts": "moe.num_experts",
            "norm_topk_prob": "moe.normalize_top_k", "decoder_sparse_step": "model.moe_every",
            "mlp_only_layers": "model.first_moe_layer"}
    if dense_blocks(cfg):  # intermediate_size sizes the dense blocks only
        keys["intermediate_size"] = "model.dense_d_ff"
    return keys


def _import_checks(hf: dict, cfg: Config) -> Optional[str]:
    return attention_bias_check(hf, QWEN3_MOE) or sliding_window_check(hf, cfg, bool(hf.get("use_sliding_window")))


QWEN3_MOE = Family(
    arch="qwen3_moe", title="Qwen3-MoE", architecture="Qwen3MoeForCausalLM", moe_module="mlp",
    expert_names=("gate_proj", "up_proj", "down_proj"), checks=_checks, own_config=_config, checked_keys=_checked,
    defaults=QWEN3_MOE_DEFAULTS, import_checks=_import_checks,
)

"""OLMoE (`transformers.OlmoeForCausalLM`): every block an MoE block, an RMSNorm over the whole q and
k projections (`model.qk_norm=full`, so heads x head_dim is the model width), a softmax router whose
top-k weights are renormalised or not (`norm_topk_prob`). See `hf_mapping` for the mechanism."""

from __future__ import annotations

from typing import Optional

from ..config import Config, head_dim
from .hf_mapping import (HF_CONFIG, Family, attention_bias_check, attention_checks, every_block_moe_checks,
                         renormalised, softmax_router_checks)


def _checks(cfg: Config) -> list:
    m = cfg.model
    width = m.n_heads * head_dim(m)
    return [*every_block_moe_checks(cfg, "OLMoE"), *softmax_router_checks(cfg, "OLMoE"),
            *attention_checks(cfg, "OLMoE", ("full",)),
            (width != m.d_model, f"model.head_dim={m.head_dim}: OLMoE's q norm spans the model width, so model.n_heads "
                                 f"x head_dim must be model.d_model={m.d_model}, got {width}")]


def _config(cfg: Config) -> dict:
    e = cfg.moe
    return {"intermediate_size": e.d_ff, "num_experts": e.num_experts, "norm_topk_prob": renormalised(cfg),
            "clip_qkv": None, "attention_bias": False}


def _import_checks(hf: dict, cfg: Config) -> Optional[str]:
    if hf.get("clip_qkv") is not None:
        return f"{HF_CONFIG} has clip_qkv={hf['clip_qkv']}: we do not clamp q, k and v"
    return attention_bias_check(hf, OLMOE)


OLMOE = Family(
    arch="olmoe", title="OLMoE", architecture="OlmoeForCausalLM", moe_module="mlp",
    expert_names=("gate_proj", "up_proj", "down_proj"), checks=_checks, own_config=_config,
    checked_keys=lambda cfg: {"intermediate_size": "moe.d_ff", "num_experts": "moe.num_experts",
                              "norm_topk_prob": "moe.normalize_top_k"},
    defaults={"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
              "norm_topk_prob": False, "attention_bias": False, "num_experts_per_tok": 8},
    import_checks=_import_checks,
)

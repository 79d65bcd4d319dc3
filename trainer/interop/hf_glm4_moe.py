"""GLM-4.5 (`transformers.Glm4MoeForCausalLM`), DeepSeek-V3's MoE with ordinary attention: sigmoid
scores chosen with an expert bias (`e_score_correction_bias`, our router's `expert_bias_E`, carried
both ways), group-limited routing (`n_group`/`topk_group`), shared experts, a routed scale
(`routed_scaling_factor` = `moe.route_scale`), dense blocks before `first_k_dense_replace`
(`model.first_moe_layer`), optional q/k norms per head, q/k/v biases and a partly rotating head
(`partial_rotary_factor` = `model.rope_fraction`). See `hf_mapping` for the mechanism."""

from __future__ import annotations

from ..config import Config
from .hf_mapping import Family, attention_checks, dense_blocks, renormalised


def _checks(cfg: Config) -> list:
    m, e = cfg.model, cfg.moe
    per_group = e.num_experts // max(e.n_groups, 1)
    return [
        (e.score_func != "sigmoid", f"moe.score_func={e.score_func}: GLM-4.5's router scores each expert with its "
                                    "own sigmoid"),
        (m.moe_every != 1, f"model.moe_every={m.moe_every}: from model.first_moe_layer on, every GLM-4.5 block is an "
                           "MoE block"),
        (e.n_groups > 1 and per_group < 2, f"moe.n_groups={e.n_groups}: GLM-4.5 scores a group by its two best "
                                           "experts, so each group needs at least two"),
        (e.num_shared_experts == 0, "moe.num_shared_experts=0: every GLM-4.5 MoE block has shared experts"),
        *attention_checks(cfg, "GLM-4.5", ("none", "per_head"), biases=True, partial_rotary=True),
    ]


def _config(cfg: Config) -> dict:
    m, e = cfg.model, cfg.moe
    return {"intermediate_size": m.dense_d_ff or e.d_ff, "moe_intermediate_size": e.d_ff,
            "n_routed_experts": e.num_experts, "n_shared_experts": e.num_shared_experts,
            "routed_scaling_factor": e.route_scale, "n_group": e.n_groups,
            "topk_group": e.topk_groups if e.n_groups > 1 else 1, "first_k_dense_replace": m.first_moe_layer,
            "norm_topk_prob": renormalised(cfg), "use_qk_norm": m.qk_norm == "per_head",
            "attention_bias": m.attention_bias, "partial_rotary_factor": m.rope_fraction,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta,
                                "partial_rotary_factor": m.rope_fraction}}


def _checked(cfg: Config) -> dict:
    keys = {"moe_intermediate_size": "moe.d_ff", "n_routed_experts": "moe.num_experts",
            "n_shared_experts": "moe.num_shared_experts", "routed_scaling_factor": "moe.route_scale",
            "n_group": "moe.n_groups", "first_k_dense_replace": "model.first_moe_layer",
            "norm_topk_prob": "moe.normalize_top_k", "use_qk_norm": "model.qk_norm",
            "attention_bias": "model.attention_bias", "partial_rotary_factor": "model.rope_fraction"}
    if cfg.moe.n_groups > 1:  # with one group its topk_group means nothing
        keys["topk_group"] = "moe.topk_groups"
    if dense_blocks(cfg):
        keys["intermediate_size"] = "model.dense_d_ff"
    return keys


GLM4_MOE = Family(
    arch="glm4_moe", title="GLM-4.5", architecture="Glm4MoeForCausalLM", moe_module="mlp",
    expert_names=("gate_proj", "up_proj", "down_proj"), checks=_checks, own_config=_config, checked_keys=_checked,
    defaults={"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
              "partial_rotary_factor": 0.5, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
              "norm_topk_prob": True, "use_qk_norm": False, "attention_bias": False, "n_shared_experts": 1,
              "routed_scaling_factor": 1.0, "num_experts_per_tok": 8},
    folds_route_scale=False, carries_expert_bias=True,
)

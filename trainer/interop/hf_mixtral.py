"""Mixtral (`transformers.MixtralForCausalLM`): every block an MoE block, a softmax router over all
experts, the top-k combine weights renormalised to sum to one, no q/k norms. Its experts are named
w1 (gate), w3 (up) and w2 (down) under `block_sparse_moe`. See `hf_mapping` for the mechanism."""

from __future__ import annotations

from typing import Optional

from ..config import Config
from .hf_mapping import (Family, attention_checks, every_block_moe_checks, problem, renormalised,
                         sliding_window_check, softmax_router_checks)


def _checks(cfg: Config) -> list:
    e = cfg.moe
    shown = {None: "null", True: "true", False: "false"}[e.normalize_top_k]
    why = ("with moe.top_k=1 our combine weight is the raw softmax score, Mixtral's is renormalised to 1 (set "
           "moe.normalize_top_k=true)" if e.top_k == 1 else "Mixtral renormalises the top-k combine weights to sum to 1")
    return [*every_block_moe_checks(cfg, "Mixtral"), *softmax_router_checks(cfg, "Mixtral"),
            (not renormalised(cfg), f"moe.normalize_top_k={shown}: {why}"),
            *attention_checks(cfg, "Mixtral", ("none",))]


def _config(cfg: Config) -> dict:
    e = cfg.moe
    return {"intermediate_size": e.d_ff, "num_local_experts": e.num_experts, "sliding_window": None,
            "router_jitter_noise": 0.0}  # HF jitters the experts' input too; ours only the router's, in training


MIXTRAL = Family(
    arch="mixtral", title="Mixtral", architecture="MixtralForCausalLM", moe_module="block_sparse_moe",
    expert_names=("w1", "w3", "w2"), checks=_checks, own_config=_config,
    checked_keys=lambda cfg: {"intermediate_size": "moe.d_ff", "num_local_experts": "moe.num_experts"},
    defaults={"rms_norm_eps": 1e-5, "rope_theta": 1e6, "hidden_act": "silu", "tie_word_embeddings": False,
              "num_experts_per_tok": 2},
    import_checks=lambda hf, cfg: sliding_window_check(hf, cfg, True),
)


def mixtral_problem(cfg: Config) -> Optional[str]:
    """'key=value: why' for the first setting Mixtral cannot express, or None."""
    return problem(cfg, MIXTRAL)

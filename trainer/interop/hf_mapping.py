"""The one mapping between our model and the Hugging Face transformers MoE families: each family
(`hf_mixtral`, `hf_qwen3_moe`, `hf_olmoe`, `hf_glm4_moe`) is a `Family`, data and two small
functions, and everything here works for all of them; `hf.py` holds the registry and the two
entry points below.

`export --format hf [--hf-arch auto|NAME]` writes a run's newest checkpoint as a family's
checkpoint (config.json, model.safetensors, generation_config.json, and for bpe/pretrained runs
tokenizer.json + tokenizer_config.json, which `AutoTokenizer` reads); `auto` picks the one family
that computes exactly what we compute. `init.from_hf=DIR` starts a fresh run from any family's
checkpoint (its config.json's model_type says which), at any EP size, under every engine.

A family represents a run when it computes our evaluation forward exactly. Training-only settings
are free (capacity, jitter, noise, aux and z losses: transformers' forward is dropless and
noiseless, like our evaluation with moe.eval_capacity_factor null). `route_scale` is folded into
the routed experts' down projections for families without a routed scale (an expert's output is
linear in them): multiplied on export, divided on import.

Names, with l a layer, e a global expert id and M the family's MoE module (`block_sparse_moe` for
Mixtral, `mlp` for the others):

    ours                                       theirs (model.layers.l. prefix left out)
    embed.weight, norm.weight, lm_head.weight  model.embed_tokens.weight, model.norm.weight, lm_head.weight
    blocks.l.attn_norm.weight                  input_layernorm.weight
    blocks.l.attn.qkv.{weight,bias} [Q+2KV,D]  self_attn.{q,k,v}_proj.{weight,bias} [Q,D], [KV,D], [KV,D]
    blocks.l.attn.{q,k}_norm.weight            self_attn.{q,k}_norm.weight
    blocks.l.attn.out.weight                   self_attn.o_proj.weight
    blocks.l.ffn_norm.weight                   post_attention_layernorm.weight
    blocks.l.ffn.router.weight [E, D]          M.gate.weight
    blocks.l.ffn.router.expert_bias_E          M.gate.e_score_correction_bias (GLM-4.5 only)
    blocks.l.ffn.experts.w{1,3,2}_L..[e]       M.experts.e.{gate,up,down} (Mixtral: w1, w3, w2)
    blocks.l.ffn.shared_experts.w{1,3,2}_..    M.shared_experts.{gate,up,down}_proj.weight (GLM-4.5)
    blocks.l.ffn.w{1,3,2}.weight (dense)       mlp.{gate,up,down}_proj.weight

Router buffers other than the carried bias (balance counts, noise step) and the noisy-top-k weight
are training state with no counterpart: left out on export, initial values on import.

Shape legend: E experts, L local experts, D model dim, F expert hidden dim, Q = heads x head_dim,
KV = kv heads x head_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import Config, head_dim, is_moe_layer, kv_heads
from ..model import Transformer
from ..run.checkpoint_files import CheckpointError

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_GENERATION = "generation_config.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
TRAINING_STATE = ("router.expert_bias_E", "router.prev_counts_E", "router.noise_step", "router.noise_weight")
EXPERT_BIAS = "router.expert_bias_E"
HF_ARCHES = ("auto", "mixtral", "qwen3_moe", "olmoe", "glm4_moe")


class HFInteropError(CheckpointError):
    """A model or checkpoint that a family cannot represent (or that does not fit); one line."""


Check = tuple[bool, str]  # (the setting is a problem, 'key=value: why')


@dataclass(frozen=True)
class Family:
    arch: str  # --hf-arch and config.json's model_type
    title: str  # in messages: "Qwen3-MoE"
    architecture: str  # config.json's architectures[0]
    moe_module: str  # the MoE block's module under a layer
    expert_names: tuple[str, str, str]  # their names of an expert's gate, up and down projections
    checks: Callable[[Config], list[Check]]  # what only this family cannot express (after `common_checks`)
    own_config: Callable[[Config], dict]  # config.json entries of this family alone
    checked_keys: Callable[[Config], dict[str, str]]  # config.json key -> our key, compared on import (and COMMON_CHECKED)
    defaults: dict[str, Any]  # config.json values its config class assumes when a key is absent
    import_checks: Callable[[dict, Config], Optional[str]] = lambda hf, cfg: None  # config.json settings we lack
    folds_route_scale: bool = True  # no routed scale of its own: route_scale goes into the down projections
    carries_expert_bias: bool = False  # M.gate.e_score_correction_bias


# ----------------------------------------------------------------------------- what a family can express


def _renormalised(cfg: Config) -> bool:
    e = cfg.moe
    return e.top_k > 1 if e.normalize_top_k is None else e.normalize_top_k


def common_checks(cfg: Config, family: Family) -> list[Check]:
    """What no family expresses, and what every family but a few lacks (named by family flags)."""
    e, title = cfg.moe, family.title
    return [
        (e.num_experts == 0, f"moe.num_experts=0: a dense model is not a {title} (every {title} has MoE blocks)"),
        (e.eval_capacity_factor is not None, f"moe.eval_capacity_factor={e.eval_capacity_factor}: our evaluation "
                                             f"drops routes over capacity; {title} is dropless"),
    ]


def softmax_router_checks(cfg: Config, title: str) -> list[Check]:
    """What the softmax-routed families (Mixtral, Qwen3-MoE, OLMoE) lack: one router, over all experts."""
    e = cfg.moe
    return [
        (e.score_func != "softmax", f"moe.score_func={e.score_func}: {title}'s router is a softmax over all experts"),
        (e.num_shared_experts > 0, f"moe.num_shared_experts={e.num_shared_experts}: {title} has no shared experts"),
        (e.n_groups > 1, f"moe.n_groups={e.n_groups}: {title} routes over all experts, not within groups"),
        (e.expert_bias_rate > 0, f"moe.expert_bias_rate={e.expert_bias_rate}: the expert bias changes which experts "
                                 f"are chosen; {title} has none"),
    ]


def attention_checks(cfg: Config, title: str, qk_norms: tuple[str, ...], biases: bool = False,
                     partial_rotary: bool = False) -> list[Check]:
    """The attention settings a family has: which q/k norms, q/k/v biases, a partly rotating head."""
    m = cfg.model
    norms = {"none": "no q/k norms", "per_head": "q/k norms per head", "full": "q/k norms over the whole projection"}
    return [
        (m.qk_norm not in qk_norms, f"model.qk_norm={m.qk_norm}: {title} has {' or '.join(norms[n] for n in qk_norms)}"),
        (m.attention_bias and not biases, f"model.attention_bias=true: {title}'s q/k/v projections have no biases"),
        (m.rope_fraction != 1 and not partial_rotary, f"model.rope_fraction={m.rope_fraction}: {title} rotates "
                                                      "every dim of a head"),
    ]


def every_block_moe_checks(cfg: Config, title: str) -> list[Check]:
    m = cfg.model
    return [(m.moe_every != 1, f"model.moe_every={m.moe_every}: every {title} block is an MoE block"),
            (m.first_moe_layer > 0, f"model.first_moe_layer={m.first_moe_layer}: every {title} block is an MoE block")]


def renormalised(cfg: Config) -> bool:
    """Whether our combine weights are renormalised over the k chosen (their norm_topk_prob)."""
    return _renormalised(cfg)


def dense_blocks(cfg: Config) -> bool:
    return any(not is_moe_layer(cfg.model, cfg.moe, l) for l in range(cfg.model.n_layers))


def problem(cfg: Config, family: Family) -> Optional[str]:
    """'key=value: why' for the first setting `family` cannot express, or None."""
    return next((message for bad, message in common_checks(cfg, family) + family.checks(cfg) if bad), None)


# ----------------------------------------------------------------------------- config.json


def end_of_text_id(cfg: Config, run_dir: Optional[Path]) -> Optional[int]:
    """The tokenizer's end-of-document id (what `generate` stops at): a bpe or pretrained run's
    separator token; bytes have none (documents are separated by two newline bytes)."""
    if cfg.data.tokenizer == "bytes" or run_dir is None:
        return None
    from ..data import saved_tokenizer

    separator = saved_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_name, run_dir).separator
    return int(separator[0]) if len(separator) == 1 else None


def hf_config(cfg: Config, family: Family, eos_token_id: Optional[int] = None) -> dict:
    """config.json for `family`, set so that transformers computes what we compute."""
    m, e = cfg.model, cfg.moe
    config = {
        "architectures": [family.architecture], "model_type": family.arch,
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": kv_heads(m), "head_dim": head_dim(m),
        "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
        "max_position_embeddings": m.seq_len,  # our rotary tables stop at seq_len
        "rope_theta": m.rope_theta,  # transformers 4; 5 reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_dropout": 0.0, "tie_word_embeddings": m.tie_embeddings, "num_experts_per_tok": e.top_k,
        "output_router_logits": False, "router_aux_loss_coef": e.aux_loss_coef,
        "initializer_range": 1.0 / math.sqrt(m.d_model), "use_cache": True,
        "bos_token_id": None, "eos_token_id": eos_token_id, "pad_token_id": None,
        "dtype": "float32", "torch_dtype": "float32",  # "torch_dtype": transformers 4
    }
    config.update(family.own_config(cfg))
    return config


def _hf_value(hf: dict, key: str, family: Family) -> Any:
    """config.json's value of `key` as its config class reads it (defaults and moved keys resolved)."""
    rope = hf.get("rope_parameters") or {}
    if key == "rope_theta":
        return rope.get("rope_theta", hf.get("rope_theta", family.defaults.get(key, 10000.0)))
    if key == "partial_rotary_factor":
        return rope.get(key, hf.get(key, family.defaults.get(key, 1.0)))
    if key == "num_key_value_heads":
        return hf.get(key) or hf.get("num_attention_heads")
    if key == "head_dim":
        return hf.get(key) or hf.get("hidden_size", 0) // max(hf.get("num_attention_heads", 1), 1)
    if key == "mlp_only_layers":
        return list(hf.get(key) or [])
    for name in (key, *SAME_KEY.get(key, ())):  # config classes save some keys under their attribute_map name
        if name in hf:
            return hf[name]
    return family.defaults.get(key)


SAME_KEY = {"num_experts": ("num_local_experts",), "n_routed_experts": ("num_local_experts",),
            "num_local_experts": ("num_experts", "n_routed_experts")}
COMMON_CHECKED = {"hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers",
                  "num_attention_heads": "model.n_heads", "num_key_value_heads": "model.n_kv_heads",
                  "head_dim": "model.head_dim", "vocab_size": "model.vocab_size", "num_experts_per_tok": "moe.top_k",
                  "rms_norm_eps": "model.norm_eps", "rope_theta": "model.rope_theta"}


def _same(theirs: Any, ours: Any) -> bool:
    if isinstance(theirs, bool) or isinstance(ours, bool) or theirs is None or ours is None:
        return theirs == ours
    if isinstance(theirs, (int, float)) and isinstance(ours, (int, float)):
        return math.isclose(theirs, ours, rel_tol=1e-9)
    return theirs == ours


def _shown(value: Any) -> str:
    return {None: "null", True: "true", False: "false"}.get(value, str(value)) if not isinstance(value, list) \
        else "[" + ", ".join(map(str, value)) + "]"


def config_mismatch(hf: dict, cfg: Config, family: Family) -> Optional[str]:
    """'config.json has X=a but our.key=b' for the first disagreement, or None."""
    from ..run.agreement import flat_config

    ours_flat = flat_config(cfg)
    expected = hf_config(cfg, family)
    for hf_key, our_key in {**COMMON_CHECKED, **family.checked_keys(cfg)}.items():
        theirs = _hf_value(hf, hf_key, family)
        mine = expected["rope_parameters"].get(hf_key) if hf_key == "partial_rotary_factor" else expected[hf_key]
        if not _same(theirs, mine):
            return f"{HF_CONFIG} has {hf_key}={_shown(theirs)} but {our_key}={_shown(ours_flat[our_key])}"
    if _hf_value(hf, "tie_word_embeddings", family) is False and cfg.model.tie_embeddings:
        return f"{HF_CONFIG} has tie_word_embeddings=false but model.tie_embeddings=true (its head would be lost)"
    if _hf_value(hf, "hidden_act", family) not in (None, "silu"):
        return f"{HF_CONFIG} has hidden_act={hf['hidden_act']} but our FFNs are SwiGLU (silu)"
    rope_type = (hf.get("rope_parameters") or {}).get("rope_type", (hf.get("rope_scaling") or {}).get("rope_type"))
    if rope_type not in (None, "default"):
        return f"{HF_CONFIG} has rope_type={rope_type} but model.rope_theta is plain rotary embedding"
    return family.import_checks(hf, cfg)


def attention_bias_check(hf: dict, family: Family) -> Optional[str]:
    """Qwen3's and OLMoE's attention_bias also biases the output projection, which ours never has."""
    if _hf_value(hf, "attention_bias", family):
        return (f"{HF_CONFIG} has attention_bias=true: {family.title}'s output projection then has a bias, and "
                "ours has none")
    return None


def sliding_window_check(hf: dict, cfg: Config, window_on: bool) -> Optional[str]:
    window = hf.get("sliding_window")
    if window_on and window is not None and window < cfg.model.seq_len:
        return (f"{HF_CONFIG} has sliding_window={window} but model.seq_len={cfg.model.seq_len} (our attention is "
                "full causal)")
    return None


# ----------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class Link:
    """Our tensor `ours` and theirs: one name, several (`split`: ours is their concatenation along
    dim 0, in these row counts) or one per expert (`per_expert`: a name with `{e}`, ours stacked
    [E, ...]). Theirs = ours * `scale`."""

    ours: str
    theirs: tuple[str, ...]
    split: Optional[tuple[int, ...]] = None
    per_expert: bool = False
    scale: float = 1.0
    buffer: bool = False


@dataclass
class Links:
    links: list[Link] = field(default_factory=list)

    def add(self, ours: str, *theirs: str, **kw) -> None:
        self.links.append(Link(ours, tuple(theirs), **kw))


def links(cfg: Config, family: Family) -> list[Link]:
    """Every tensor a family checkpoint holds and where it is in ours."""
    m, e = cfg.model, cfg.moe
    Q, KV = m.n_heads * head_dim(m), kv_heads(m) * head_dim(m)
    out = Links()
    out.add("embed.weight", "model.embed_tokens.weight")
    out.add("norm.weight", "model.norm.weight")
    if not m.tie_embeddings:  # tied: transformers writes the embedding only
        out.add("lm_head.weight", "lm_head.weight")
    gate, up, down = family.expert_names
    for l in range(m.n_layers):
        ours, hf = f"blocks.{l}.", f"model.layers.{l}."
        out.add(ours + "attn_norm.weight", hf + "input_layernorm.weight")
        out.add(ours + "ffn_norm.weight", hf + "post_attention_layernorm.weight")
        out.add(ours + "attn.out.weight", hf + "self_attn.o_proj.weight")
        for kind in ("weight", "bias") if m.attention_bias else ("weight",):
            out.add(ours + f"attn.qkv.{kind}", *(hf + f"self_attn.{p}_proj.{kind}" for p in "qkv"), split=(Q, KV, KV))
        if m.qk_norm != "none":
            out.add(ours + "attn.q_norm.weight", hf + "self_attn.q_norm.weight")
            out.add(ours + "attn.k_norm.weight", hf + "self_attn.k_norm.weight")
        if not is_moe_layer(m, e, l):
            for w, name in zip(("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")):
                out.add(ours + f"ffn.{w}.weight", hf + f"mlp.{name}.weight")
            continue
        moe = hf + family.moe_module + "."
        out.add(ours + "ffn.router.weight", moe + "gate.weight")
        if family.carries_expert_bias:
            out.add(ours + "ffn." + EXPERT_BIAS, moe + "gate.e_score_correction_bias", buffer=True)
        scale = e.route_scale if family.folds_route_scale else 1.0
        for w, name in zip(("w1_LFD", "w3_LFD", "w2_LDF"), (gate, up, down)):
            out.add(ours + f"ffn.experts.{w}", moe + f"experts.{{e}}.{name}.weight", per_expert=True,
                    scale=scale if w == "w2_LDF" else 1.0)
        if e.num_shared_experts:
            for w, name in zip(("w1_HD", "w3_HD", "w2_DH"), ("gate_proj", "up_proj", "down_proj")):
                out.add(ours + f"ffn.shared_experts.{w}", moe + f"shared_experts.{name}.weight")
    return out.links


def to_hf(state: dict[str, torch.Tensor], cfg: Config, family: Family) -> dict[str, torch.Tensor]:
    """A one-process state dict (every expert, stacked [E, ...]) as the family's tensors."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    for link in links(cfg, family):
        ours = state.pop(link.ours)
        if link.per_expert:
            for expert, w in enumerate(ours):
                out[link.theirs[0].format(e=expert)] = w * link.scale if link.scale != 1.0 else w
        elif link.split:
            out.update(zip(link.theirs, ours.split(link.split, dim=0)))
        else:
            out[link.theirs[0]] = ours
    if cfg.model.tie_embeddings:
        state.pop("lm_head.weight", None)  # the embedding, under its second name
    left = [name for name in state if not name.endswith(TRAINING_STATE)]
    if left:  # a model tensor this mapping does not know: never drop it silently
        raise HFInteropError(f"{left[0]} has no {family.title} counterpart")
    return {name: t.detach().contiguous() for name, t in out.items()}


def hf_shapes(cfg: Config, family: Family) -> dict[str, list[int]]:
    """Their tensor name -> shape, for the model `cfg` describes (nothing allocated)."""
    with torch.device("meta"):
        state = Transformer(cfg.model, cfg.moe).state_dict()
    return {name: list(t.shape) for name, t in to_hf(state, cfg, family).items()}

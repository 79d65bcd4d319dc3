"""Hugging Face Mixtral interop: `export --format hf` writes a run's newest checkpoint as a
`transformers` Mixtral checkpoint; `init.from_hf=PATH` starts a fresh run from one, at any EP size.

Our model is a Mixtral when every block is an MoE block routed as Mixtral routes: softmax over
all experts, top-k, combine weights renormalised over the k, no bias, groups, shared experts,
or drops at inference. `moe.route_scale` is folded into the experts' down projections (an
expert's output is linear in them): multiplied on export, divided on `init.from_hf`. `mixtral_problem` names the first setting that breaks this.
Training-only settings are free: capacity (Mixtral is dropless, and so are our evaluation and
the export when moe.eval_capacity_factor is null), router jitter and noise, aux/z losses.

Names, with l a layer and e a global expert id; Mixtral's are the ones `save_pretrained` writes
(transformers 5 fuses the experts into `mlp.experts.gate_up_proj`/`down_proj` in memory only):

    ours                                    Mixtral
    embed.weight                            model.embed_tokens.weight
    blocks.l.attn_norm.weight               model.layers.l.input_layernorm.weight
    blocks.l.attn.qkv.weight [3D, D]        model.layers.l.self_attn.{q,k,v}_proj.weight [D, D] each
    blocks.l.attn.out.weight                model.layers.l.self_attn.o_proj.weight
    blocks.l.ffn_norm.weight                model.layers.l.post_attention_layernorm.weight
    blocks.l.ffn.router.weight [E, D]       model.layers.l.block_sparse_moe.gate.weight
    blocks.l.ffn.experts.w1_LFD[e] [F, D]   model.layers.l.block_sparse_moe.experts.e.w1.weight (gate)
    blocks.l.ffn.experts.w3_LFD[e] [F, D]   model.layers.l.block_sparse_moe.experts.e.w3.weight (up)
    blocks.l.ffn.experts.w2_LDF[e] [D, F]   model.layers.l.block_sparse_moe.experts.e.w2.weight (down)
    norm.weight, lm_head.weight             model.norm.weight, lm_head.weight

Router buffers (expert bias, balance counts, noise step) and the noisy-top-k weight are training
state without a Mixtral counterpart: the export leaves them out, the import keeps their initial
values. Token ids are the run's tokenizer's: bytes (0-255) by default; a bpe or pretrained run's
tokenizer.json is copied into the export. The import reads weights only.

Shape legend: E experts, L local experts, D model dim, F expert hidden dim.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from ..config import Config
from ..model import Transformer
from ..parallel.fsdp import copy_full_
from ..run.checkpoint_files import CheckpointError, Found

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
QKV = ("q_proj", "k_proj", "v_proj")
EXPERT_WEIGHTS = (("w1_LFD", "w1"), ("w3_LFD", "w3"), ("w2_LDF", "w2"))  # ours (stacked), Mixtral's per expert
TRAINING_STATE = ("router.expert_bias_E", "router.prev_counts_E", "router.noise_step", "router.noise_weight")
MIXTRAL_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
                    "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None, "num_experts_per_tok": 2,
                    "num_local_experts": 8, "tie_word_embeddings": False}


class HFMixtralError(CheckpointError):
    """A model or checkpoint that is not (or does not fit) a Mixtral; the message is one line."""


# ----------------------------------------------------------------------------- config


def mixtral_problem(cfg: Config) -> Optional[str]:
    """'key=value: why' for the first setting Mixtral cannot express, or None."""
    m, e = cfg.model, cfg.moe
    renormalised = e.top_k > 1 if e.normalize_top_k is None else e.normalize_top_k
    shown = {None: "null", True: "true", False: "false"}[e.normalize_top_k]
    why_not_renormalised = ("with moe.top_k=1 our combine weight is the raw softmax score, Mixtral's is renormalised "
                            "to 1 (set moe.normalize_top_k=true)" if e.top_k == 1
                            else "Mixtral renormalises the top-k combine weights to sum to 1")
    checks = [  # model.dense_d_ff is unused when every block is an MoE block, so it needs no check
        (e.num_experts == 0, "moe.num_experts=0: a dense model is not a Mixtral (every Mixtral block is an MoE)"),
        (m.moe_every != 1, f"model.moe_every={m.moe_every}: every Mixtral block is an MoE block"),
        (e.num_shared_experts > 0, f"moe.num_shared_experts={e.num_shared_experts}: Mixtral has no shared experts"),
        (e.score_func != "softmax", f"moe.score_func={e.score_func}: Mixtral's router is a softmax over all experts"),
        (not renormalised, f"moe.normalize_top_k={shown}: {why_not_renormalised}"),
        (e.n_groups > 1, f"moe.n_groups={e.n_groups}: Mixtral routes over all experts, not within groups"),
        (e.expert_bias_rate > 0, f"moe.expert_bias_rate={e.expert_bias_rate}: the expert bias changes which experts "
                                 "are chosen; Mixtral has none"),
        (e.eval_capacity_factor is not None, f"moe.eval_capacity_factor={e.eval_capacity_factor}: our evaluation "
                                             "drops routes over capacity; Mixtral is dropless"),
    ]
    return next((message for bad, message in checks if bad), None)


def hf_config(cfg: Config) -> dict:
    """config.json for `transformers.MixtralForCausalLM`, set so that it computes what we compute."""
    m, e = cfg.model, cfg.moe
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": e.d_ff,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_heads,  # no grouped-query attention: the fused qkv splits into three [D, D]
        "head_dim": m.d_model // m.n_heads, "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
        "max_position_embeddings": m.seq_len,  # our rotary tables stop at seq_len
        "rope_theta": m.rope_theta,  # transformers 4; 5 reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "sliding_window": None, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "num_local_experts": e.num_experts, "num_experts_per_tok": e.top_k,
        "router_aux_loss_coef": e.aux_loss_coef, "output_router_logits": False,
        "router_jitter_noise": 0.0,  # HF jitters the experts' input too; ours only the router's, in training
        "initializer_range": 1.0 / math.sqrt(m.d_model), "use_cache": True,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,  # byte tokens, none special
        "dtype": "float32", "torch_dtype": "float32",  # "torch_dtype": transformers 4
    }


def _hf_value(hf: dict, key: str):
    if key == "rope_theta":
        return (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", MIXTRAL_DEFAULTS[key]))
    if key == "num_key_value_heads":
        return hf.get(key) or _hf_value(hf, "num_attention_heads")
    return hf.get(key, MIXTRAL_DEFAULTS[key])


def config_mismatch(hf: dict, cfg: Config) -> Optional[str]:
    """'config.json has X=a but our.key=b' for the first disagreement, or None."""
    m, e = cfg.model, cfg.moe
    for hf_key, ours, value in (
        ("hidden_size", "model.d_model", m.d_model), ("num_hidden_layers", "model.n_layers", m.n_layers),
        ("num_attention_heads", "model.n_heads", m.n_heads), ("num_key_value_heads", "model.n_heads", m.n_heads),
        ("vocab_size", "model.vocab_size", m.vocab_size), ("intermediate_size", "moe.d_ff", e.d_ff),
        ("num_local_experts", "moe.num_experts", e.num_experts), ("num_experts_per_tok", "moe.top_k", e.top_k),
        ("rms_norm_eps", "model.norm_eps", m.norm_eps), ("rope_theta", "model.rope_theta", m.rope_theta),
    ):
        theirs = _hf_value(hf, hf_key)
        same = math.isclose(theirs, value, rel_tol=1e-9) if isinstance(theirs, (int, float)) else False
        if not same:
            return f"{HF_CONFIG} has {hf_key}={theirs} but {ours}={value}"
    head_dim = _hf_value(hf, "head_dim")
    if head_dim not in (None, m.d_model // m.n_heads):
        return f"{HF_CONFIG} has head_dim={head_dim} but model.d_model/model.n_heads={m.d_model // m.n_heads}"
    if _hf_value(hf, "hidden_act") != "silu":
        return f"{HF_CONFIG} has hidden_act={_hf_value(hf, 'hidden_act')} but our experts are SwiGLU (silu)"
    rope_type = (hf.get("rope_parameters") or {}).get("rope_type", (hf.get("rope_scaling") or {}).get("rope_type"))
    if rope_type not in (None, "default"):
        return f"{HF_CONFIG} has rope_type={rope_type} but model.rope_theta is plain rotary embedding"
    window = _hf_value(hf, "sliding_window")
    if window is not None and window < m.seq_len:
        return f"{HF_CONFIG} has sliding_window={window} but model.seq_len={m.seq_len} (our attention is full causal)"
    return None


# ----------------------------------------------------------------------------- names


def _dense_names(n_layers: int) -> dict[str, str]:
    """Our name -> Mixtral's, for tensors that are the same on both sides."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    for l in range(n_layers):
        ours, hf = f"blocks.{l}.", f"model.layers.{l}."
        names.update({ours + "attn_norm.weight": hf + "input_layernorm.weight",
                      ours + "attn.out.weight": hf + "self_attn.o_proj.weight",
                      ours + "ffn_norm.weight": hf + "post_attention_layernorm.weight",
                      ours + "ffn.router.weight": hf + "block_sparse_moe.gate.weight"})
    return names


def _expert_name(layer: int, expert: int, hf_weight: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{hf_weight}.weight"


def to_hf(state: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """A one-process state dict (every expert, stacked [E, ...]) as Mixtral's tensors."""
    state = dict(state)
    out = {hf: state.pop(ours) for ours, hf in _dense_names(cfg.model.n_layers).items()}
    for l in range(cfg.model.n_layers):
        qkv_3DD = state.pop(f"blocks.{l}.attn.qkv.weight")
        for proj, w_DD in zip(QKV, qkv_3DD.chunk(3, dim=0)):
            out[f"model.layers.{l}.self_attn.{proj}.weight"] = w_DD
        for ours, hf_weight in EXPERT_WEIGHTS:
            for expert, w in enumerate(state.pop(f"blocks.{l}.ffn.experts.{ours}")):
                # Mixtral has no route_scale; an expert's output is linear in its down projection
                out[_expert_name(l, expert, hf_weight)] = w * cfg.moe.route_scale if hf_weight == "w2" else w
    left = [name for name in state if not name.endswith(TRAINING_STATE)]
    if left:  # a model tensor this mapping does not know: never drop it silently
        raise HFMixtralError(f"{left[0]} has no Mixtral counterpart")
    return {name: t.detach().contiguous() for name, t in out.items()}


def hf_shapes(cfg: Config) -> dict[str, list[int]]:
    """Mixtral tensor name -> shape, for the model `cfg` describes (nothing allocated)."""
    with torch.device("meta"):
        state = Transformer(cfg.model, cfg.moe).state_dict()
    return {name: list(t.shape) for name, t in to_hf(state, cfg).items()}


# ----------------------------------------------------------------------------- export


def export_hf(run_dir: str | Path, out_dir: str | Path, warn=lambda line: None) -> tuple[Found, Path]:
    """Write the newest complete checkpoint of `run_dir` (any EP size) as a Mixtral checkpoint:
    config.json and model.safetensors. Refused, before anything is written, unless it is one."""
    from safetensors.torch import save_file

    from ..data import save_tokenizer, saved_tokenizer
    from ..run.checkpoint_files import config_of
    from ..run.output_dir import make_output_dir, writing_into
    from .export import _for_one_process, find_checkpoint, load_checkpoint_model

    found = find_checkpoint(Path(run_dir), warn)
    cfg = config_of(found)
    problem = mixtral_problem(cfg)
    if problem:
        raise HFMixtralError(f"export --format hf: {problem}")
    cpu = torch.device("cpu")
    out = make_output_dir(out_dir, "export OUT_DIR")  # before the (long) load
    model = load_checkpoint_model(found, _for_one_process(cfg, cpu), cpu)
    tensors = {name: t.float() for name, t in to_hf(model.state_dict(), cfg).items()}
    with writing_into(out, "export OUT_DIR"):
        save_file(tensors, out / HF_WEIGHTS, metadata={"format": "pt", "step": str(found.step)})
        (out / HF_CONFIG).write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
        # a bpe or pretrained run's tokenizer.json (the `tokenizers` format transformers' fast tokenizers read)
        save_tokenizer(saved_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_name, Path(run_dir)), out, replace=True)
    return found, out / HF_WEIGHTS


# ----------------------------------------------------------------------------- import


def read_hf_config(path: Path) -> dict:
    """The config.json of a local Mixtral checkpoint directory; one-line errors name init.from_hf."""
    if not (path / HF_CONFIG).is_file():
        what = "is not a directory" if not path.is_dir() else f"has no {HF_CONFIG}"
        raise HFMixtralError(f"init.from_hf: {path} {what} (a local Hugging Face checkpoint directory is expected)")
    try:
        hf = json.loads((path / HF_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise HFMixtralError(f"init.from_hf: {path / HF_CONFIG} is unreadable ({e})") from None
    if not isinstance(hf, dict) or hf.get("model_type") != "mixtral":
        kind = hf.get("model_type") if isinstance(hf, dict) else None
        raise HFMixtralError(f"init.from_hf: {path / HF_CONFIG} has model_type={kind}, not a Mixtral")
    return hf


class _Tensors:
    """The tensors of a checkpoint directory (one file, or shards listed by the index), each file
    opened on first use and only the tensors asked for read."""

    def __init__(self, path: Path, files: ExitStack):
        if (path / HF_INDEX).is_file():
            try:
                weight_map = json.loads((path / HF_INDEX).read_text())["weight_map"]
                self.file_of = {name: path / file for name, file in weight_map.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise HFMixtralError(f"init.from_hf: {path / HF_INDEX} is unreadable ({e!r})") from None
        elif (path / HF_WEIGHTS).is_file():
            with safe_open(path / HF_WEIGHTS, framework="pt") as f:
                self.file_of = {name: path / HF_WEIGHTS for name in f.keys()}
        else:
            raise HFMixtralError(f"init.from_hf: {path} holds neither {HF_WEIGHTS} nor {HF_INDEX}")
        self._files, self._open = files, {}

    def _file(self, name: str):
        file = self.file_of[name]
        if file not in self._open:
            if not file.is_file():
                raise HFMixtralError(f"init.from_hf: {file} (listed in {HF_INDEX}) is missing")
            self._open[file] = self._files.enter_context(safe_open(file, framework="pt"))
        return self._open[file]

    def shape(self, name: str) -> Optional[list[int]]:
        return list(self._file(name).get_slice(name).get_shape()) if name in self.file_of else None

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)


def init_from_hf(model: Transformer, path: str | Path, cfg: Config) -> str:
    """Copy a local Mixtral checkpoint into `model` (already parallelised: it holds this rank's
    experts only, and only those are read). Every rank checks every name and shape, so a bad
    checkpoint fails alike everywhere. Returns a line for the log."""
    path = Path(path)
    hf = read_hf_config(path)
    problem = mixtral_problem(cfg) or config_mismatch(hf, cfg)
    if problem:
        raise HFMixtralError(f"init.from_hf: {problem}")
    with ExitStack() as files:
        tensors = _Tensors(path, files)
        tied = bool(_hf_value(hf, "tie_word_embeddings"))
        for name, shape in hf_shapes(cfg).items():
            if name == "lm_head.weight" and tied and tensors.shape(name) is None:
                continue  # tied: the head is the embedding
            if tensors.shape(name) != shape:
                found = f"has shape {tensors.shape(name)}" if name in tensors.file_of else "is missing"
                raise HFMixtralError(f"init.from_hf: {name} {found} in {path}, expected {shape}")
        with torch.no_grad():
            params = dict(model.named_parameters())
            for ours, hf_name in _dense_names(cfg.model.n_layers).items():
                if hf_name == "lm_head.weight" and hf_name not in tensors.file_of:
                    hf_name = "model.embed_tokens.weight"
                copy_full_(params[ours], tensors.get(hf_name))  # whole or an FSDP shard of it
            for l, block in enumerate(model.blocks):
                copy_full_(params[f"blocks.{l}.attn.qkv.weight"],
                           torch.cat([tensors.get(f"model.layers.{l}.self_attn.{proj}.weight") for proj in QKV]))
                experts = block.ffn.experts
                for ours, hf_weight in EXPERT_WEIGHTS:
                    w_L = torch.stack([tensors.get(_expert_name(l, e, hf_weight)) for e in experts.global_expert_ids])
                    if hf_weight == "w2":
                        w_L = w_L / cfg.moe.route_scale  # our combine multiplies it back (to_hf folds it in)
                    copy_full_(getattr(experts, ours), w_L)  # the EP rank's experts (sharded over replicas)
    first = model.blocks[0].ffn.experts.global_expert_ids
    return (f"initialised from Hugging Face Mixtral {path} ({cfg.model.n_layers} layers, {cfg.moe.num_experts} "
            f"experts; rank 0 read experts {first.start}-{first.stop - 1} of each layer)")

"""Run configuration: nested dataclasses, a YAML file, dotted `key=value` overrides.

Every problem is reported as one `ConfigError` whose message starts with the dotted key,
so the CLI can print a single line and exit before any process group exists.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


BYTE_VOCAB = 256  # ids of data.tokenizer=bytes
MAX_TIMEOUT_S = 365 * 24 * 3600  # parallel.timeout_s: a year is past any real wait; 1e30 overflows the timedelta groups take


class ConfigError(ValueError):
    """A bad configuration value; the message names the dotted key."""


@dataclass
class ModelConfig:
    d_model: int = 128  # width of the residual stream
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads (must divide d_model)
    seq_len: int = 128  # tokens per training sequence
    vocab_size: int = 256  # byte-level tokens
    moe_every: int = 1  # every moe_every-th block has an MoE FFN, the others a dense one
    dense_d_ff: Optional[int] = None  # hidden size of dense FFN blocks; null = moe.d_ff
    rope_theta: float = 10000.0  # rotary embedding base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    n_kv_heads: Optional[int] = None  # key/value heads (grouped-query attention; must divide n_heads); null = n_heads
    head_dim: Optional[int] = None  # width of one attention head; null = d_model / n_heads (Qwen3 sets it apart)
    qk_norm: str = "none"  # none | per_head (RMSNorm of each head's q and k, Qwen3) | full (of the whole q and k projections, OLMoE)
    first_moe_layer: int = 0  # blocks before this one are dense (DeepSeek/GLM first_k_dense_replace, Qwen3 mlp_only_layers)
    tie_embeddings: bool = False  # the output head is the input embedding (one matrix)
    attention_bias: bool = False  # the q, k and v projections have biases (GLM-4.5); the output projection never does
    rope_fraction: float = 1.0  # share of each head's dims that rotate (GLM-4.5: 0.5); the rest pass through


@dataclass
class MoEConfig:
    num_experts: int = 8  # 0 = dense baseline (every block a dense SwiGLU FFN)
    top_k: int = 2  # experts per token; k=1 keeps the raw router score (Switch), k>1 renormalises over the k
    d_ff: int = 256  # hidden size of each expert, independent of model.d_model (fine-grained experts: many small ones)
    num_shared_experts: int = 0  # always-on SwiGLU experts of size d_ff beside the routed ones (dense, replicated)
    overlap_shared_experts: bool = True  # compute the shared experts while the tokens' all_to_all is in flight (the same numbers)
    n_groups: int = 1  # > 1: group-limited routing over this many contiguous expert groups (e.g. = parallel.ep)
    topk_groups: int = 1  # with n_groups > 1: each token's experts come from its topk_groups best groups
    capacity_factor: Optional[float] = None  # null = dropless
    eval_capacity_factor: Optional[float] = None  # capacity in evaluation only; null = dropless
    min_capacity: int = 0  # each expert keeps at least this many routes per rank when capacity applies
    max_recv_factor: Optional[float] = None  # dropless: fail when an EP rank would receive more than this x the balanced load
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss E * sum_i f_i P_i (averaged over MoE layers)
    aux_loss_scope: str = "micro_batch"  # micro_batch | global_batch | sequence: what f and P of the aux loss cover
    z_loss_coef: float = 0.001  # weight of the router z-loss mean(logsumexp(logits)^2)
    normalize_top_k: Optional[bool] = None  # null = renormalise over the k chosen when k > 1
    score_func: str = "softmax"  # softmax | sigmoid (DeepSeek-V3: independent scores, renormalised over the k when k > 1; chosen with the expert bias)
    route_scale: float = 1.0  # multiplies the combine weights
    router_jitter: float = 0.0  # training: multiply the router input by U(1-eps, 1+eps) per element (Switch)
    noisy_topk: bool = False  # training: add N(0,1) * softplus(x W_noise) to the logits (Shazeer 2017)
    expert_bias_rate: float = 0.0  # > 0: aux-loss-free balancing (DeepSeek-V3 expert bias), bias step per optimizer step
    drop_policy: str = "position"  # position | probs: which routes keep their capacity slot
    expert_impl: str = "auto"  # auto | loop | grouped_mm


@dataclass
class ParallelConfig:
    ep: int = 1  # experts are sharded over groups of ep contiguous ranks
    backend: str = "auto"  # auto (nccl on CUDA, else gloo) | gloo | nccl
    timeout_s: float = 600.0  # a collective that waits longer raises instead of hanging
    debug_splits: bool = False  # all-gather and check the all_to_all split matrix every layer


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps; the cosine schedule ends here
    batch_size: int = 16  # GLOBAL sequences per optimizer step, whatever the world size
    grad_accum: int = 1  # micro-batches per optimizer step on each rank
    lr: float = 3e-3  # peak learning rate (AdamW)
    expert_lr_scale: float = 1.0  # routed experts' learning rate = lr x this, through warmup and decay alike
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30  # linear warmup from lr/warmup_steps to lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on matrices only
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # 0 = no clipping (the norm is still measured)
    stop_at: int = 0  # > 0: save a checkpoint and stop after this step (the schedule still follows train.steps)
    skip_nonfinite: int = 0  # steps with a non-finite loss or grad norm that may be skipped; 0 = stop at the first
    seed: int = 1337  # seeds the initialisation (layout-independent) and the data order
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 4  # global batches of the validation split per evaluation; 0 = the whole split, each window once
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16 (autocast; router and losses stay fp32)
    engine: str = "native"  # native (our gradient sync + AdamW) | deepspeed (DeepSpeed's ZeRO 0-2) | fsdp (torch FSDP2: ZeRO-3)
    reshard_after_forward: bool = True  # fsdp: free gathered weights after each block's forward (ZeRO-3); false keeps them to backward (ZeRO-2)
    activation_checkpointing: str = "none"  # none | full (each block recomputed in backward) | moe (only MoE FFNs recomputed)
    compile: bool = False  # torch.compile each block's norms, attention and dense/shared FFNs (inductor: needs a C++ compiler on CPU); routing, dispatch and experts stay eager
    zero_stage: int = 0  # deepspeed: ZeRO stage 0, 1 (optimizer state sharded) or 2 (and gradients); 3 is refused
    deepspeed_config: Optional[str] = None  # deepspeed: a DeepSpeed JSON config merged in; keys the trainer owns are refused


@dataclass
class DataConfig:
    dataset: str = "stdlib"  # stdlib (this Python's own .py sources) | files (data.path) | hf (data.hf_name)
    path: Optional[str] = None  # files: a file, directory (data.glob) or glob; .txt: a document per file, .jsonl/.parquet: per row
    glob: str = "**/*.txt"  # files: which files of a directory (e.g. "**/*.jsonl")
    text_field: str = "text"  # jsonl/parquet/hf: the column holding the text
    val_fraction: float = 0.05  # share of documents held out for validation (by a hash of each name)
    max_documents: int = 0  # > 0: only the first N documents of the corpus (a slice of a large or streamed one)
    hf_name: Optional[str] = None  # hf: hub dataset, local dataset directory, or builder ("json", "parquet", "text", ...)
    hf_config: Optional[str] = None  # hf: the dataset's configuration name
    hf_data_files: Optional[str] = None  # hf: data files for builders like "text" or "json"
    hf_split: str = "train"  # hf: the split read (the trainer holds out its own validation share)
    streaming: bool = False  # hf: stream the dataset instead of downloading it whole (data.max_documents: a slice)
    tokenizer: str = "bytes"  # bytes (256 ids) | bpe (trained on the train split; run.dir/tokenizer.json) | pretrained
    bpe_vocab_size: int = 8192  # bpe: vocabulary size, separator included (model.vocab_size must be >= it)
    tokenizer_name: Optional[str] = None  # pretrained: a hub repository ("gpt2") or a local tokenizer.json (or its directory)
    cache_dir: Optional[str] = None  # token shards and BPEs, built once; null = $XDG_CACHE_HOME (or ~/.cache)/moe-trainer


@dataclass
class RunConfig:
    dir: str = "runs/default"  # output directory: config.yaml, metrics.jsonl, checkpoints/; resumed if it holds a run
    log_every: int = 10  # steps between lines in metrics.jsonl
    tracker: str = "none"  # none | wandb | tensorboard (metrics.jsonl is always written)
    wandb_project: str = "moe-trainer"  # wandb: project name
    name: Optional[str] = None  # wandb: run name (null = wandb's own)
    progress: bool = True  # tqdm bar on rank 0
    log_expert_counts: bool = False  # also log each MoE layer's routes per expert (expert_counts)


@dataclass
class CheckpointConfig:
    every: int = 100  # save every N steps; 0 = only at the end and when stopped by SIGTERM/SIGINT
    keep: int = 2  # newest complete checkpoints kept under run.dir/checkpoints/


@dataclass
class InitConfig:
    from_hf: Optional[str] = None  # fresh run starts from this local HF Mixtral dir (any EP size); resume ignores it


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    init: InitConfig = field(default_factory=InitConfig)


def head_dim(m: ModelConfig) -> int:
    return m.head_dim if m.head_dim is not None else m.d_model // m.n_heads


def kv_heads(m: ModelConfig) -> int:
    return m.n_kv_heads if m.n_kv_heads is not None else m.n_heads


def rotary_dim(m: ModelConfig) -> int:
    """How many of a head's dims rotate: head_dim x rope_fraction, rounded down to an even number."""
    return int(head_dim(m) * m.rope_fraction) // 2 * 2


def chooses_with_expert_bias(e: MoEConfig) -> bool:
    """Whether routers add their expert bias to the scores they choose by: when it moves (expert_bias_rate
    > 0), and always for sigmoid scores, as DeepSeek-V3 and GLM-4.5 do (the bias stays zero unless it
    moves or init.from_hf loads one; adding a zero changes no choice)."""
    return e.expert_bias_rate > 0 or e.score_func == "sigmoid"


def is_moe_layer(m: ModelConfig, e: MoEConfig, layer: int) -> bool:
    """Whether block `layer` has an MoE FFN: from model.first_moe_layer on, every model.moe_every-th."""
    return e.num_experts > 0 and layer >= m.first_moe_layer and (layer + 1) % m.moe_every == 0


# ----------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp` (a field annotation), or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if value is None:
        raise ConfigError(f"{key}: null is not allowed, expected {_type_name(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _merge(obj: Any, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"{key}: unknown key")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section of keys, got {value!r}")
            _merge(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`moe.num_experts=16` -> (["moe", "num_experts"], 16); values are read as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"{text}: an override must look like key=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then each override in order."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); a config is a YAML text file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read: {e.strerror or e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return config_from_dict(values, overrides)


RENAMED_KEYS = {("data", "hf_text_field"): "text_field"}  # old name -> new name, for configs saved before


def _renamed_keys(values: dict) -> dict:
    """`values` with keys renamed since it was saved (a checkpoint's or an older YAML's config)."""
    values = dict(values)
    for (section, old), new in RENAMED_KEYS.items():
        if isinstance(values.get(section), dict) and old in values[section]:
            values[section] = {(new if k == old else k): v for k, v in values[section].items()}
    return values


def config_from_dict(values: dict, overrides: list[str] = ()) -> Config:
    """Defaults, then `values` (a YAML file's, or a checkpoint's `to_dict`), then the overrides."""
    cfg = Config()
    _merge(cfg, _renamed_keys(values), "")
    for text in overrides:
        parts, value = parse_override(text)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        _merge(cfg, nested, "")
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

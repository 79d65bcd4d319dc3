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
    score_func: str = "softmax"  # softmax | sigmoid (DeepSeek-V3: independent scores, renormalised over the k when k > 1)
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


# ----------------------------------------------------------------------------- validation


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"must be one of {' | '.join(choices)}, got {value!r}")


def validate(cfg: Config, world_size: int) -> None:
    """Check values and their consistency with each other and with `world_size`.

    Runs on every rank before any collective, on the same inputs, so every rank fails with
    the same message.
    """
    m, e, p, t, d, r = cfg.model, cfg.moe, cfg.parallel, cfg.train, cfg.data, cfg.run
    for key, value in [
        ("model.d_model", m.d_model), ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
        ("model.seq_len", m.seq_len), ("model.vocab_size", m.vocab_size), ("model.moe_every", m.moe_every),
        ("moe.d_ff", e.d_ff), ("parallel.ep", p.ep), ("train.steps", t.steps),
        ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum),
        ("run.log_every", r.log_every),
    ]:
        _require(value >= 1, key, f"must be >= 1, got {value}")
    _require(t.eval_batches >= 0, "train.eval_batches", f"must be >= 0 (0 = the whole validation split), "
                                                         f"got {t.eval_batches}")
    _require(m.d_model % m.n_heads == 0, "model.n_heads",
             f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    _require((m.d_model // m.n_heads) % 2 == 0, "model.n_heads",
             f"head size d_model/n_heads={m.d_model // m.n_heads} must be even for rotary embeddings")
    _require(m.dense_d_ff is None or m.dense_d_ff >= 1, "model.dense_d_ff", f"must be >= 1, got {m.dense_d_ff}")
    # model.vocab_size against the tokenizer: below with data.*, or when a pretrained tokenizer loads

    _require(e.num_experts >= 0, "moe.num_experts", f"must be >= 0 (0 = dense), got {e.num_experts}")
    if e.num_experts > 0:
        _require(1 <= e.top_k <= e.num_experts, "moe.top_k",
                 f"must be between 1 and moe.num_experts={e.num_experts}, got {e.top_k}")
        _require(e.num_experts % p.ep == 0, "moe.num_experts",
                 f"moe.num_experts={e.num_experts} is not divisible by parallel.ep={p.ep}")
    else:
        _require(p.ep == 1, "parallel.ep", f"a dense model (moe.num_experts=0) needs parallel.ep=1, got {p.ep}")
    _require(e.capacity_factor is None or e.capacity_factor > 0, "moe.capacity_factor",
             f"must be > 0 or null (dropless), got {e.capacity_factor}")
    _require(e.eval_capacity_factor is None or e.eval_capacity_factor > 0, "moe.eval_capacity_factor",
             f"must be > 0 or null (dropless), got {e.eval_capacity_factor}")
    if e.num_experts > 0:
        _require(e.n_groups >= 1 and e.num_experts % e.n_groups == 0, "moe.n_groups",
                 f"must be >= 1 and divide moe.num_experts={e.num_experts}, got {e.n_groups}")
        _require(e.n_groups == 1 or (1 <= e.topk_groups <= e.n_groups
                                     and e.topk_groups * (e.num_experts // e.n_groups) >= e.top_k),
                 "moe.topk_groups", f"must be in [1, moe.n_groups={e.n_groups}] and its groups must hold at least "
                                    f"moe.top_k={e.top_k} experts, got {e.topk_groups}")
    _require(e.num_shared_experts >= 0, "moe.num_shared_experts", f"must be >= 0, got {e.num_shared_experts}")
    _require(e.min_capacity >= 0, "moe.min_capacity", f"must be >= 0, got {e.min_capacity}")
    _require(e.max_recv_factor is None or e.max_recv_factor >= 1, "moe.max_recv_factor",
             f"must be >= 1 (1 = perfectly balanced) or null (no limit), got {e.max_recv_factor}")
    _choice(e.aux_loss_scope, "moe.aux_loss_scope", ("micro_batch", "global_batch", "sequence"))
    _require(e.aux_loss_coef >= 0, "moe.aux_loss_coef", f"must be >= 0, got {e.aux_loss_coef}")
    _require(e.z_loss_coef >= 0, "moe.z_loss_coef", f"must be >= 0, got {e.z_loss_coef}")
    _choice(e.drop_policy, "moe.drop_policy", ("position", "probs"))
    _choice(e.score_func, "moe.score_func", ("softmax", "sigmoid"))
    _require(e.route_scale > 0, "moe.route_scale", f"must be > 0, got {e.route_scale}")
    _require(0 <= e.router_jitter < 1, "moe.router_jitter", f"must be in [0, 1), got {e.router_jitter}")
    _require(e.expert_bias_rate >= 0, "moe.expert_bias_rate", f"must be >= 0 (0 = off), got {e.expert_bias_rate}")
    _choice(e.expert_impl, "moe.expert_impl", ("auto", "loop", "grouped_mm"))

    _require(world_size % p.ep == 0, "parallel.ep",
             f"world size {world_size} is not divisible by parallel.ep={p.ep}")
    _choice(p.backend, "parallel.backend", ("auto", "gloo", "nccl"))
    _require(0 < p.timeout_s <= MAX_TIMEOUT_S, "parallel.timeout_s",
             f"must be > 0 and at most {MAX_TIMEOUT_S:,} (a year), got {p.timeout_s}")

    per_rank, rest = divmod(t.batch_size, world_size)
    _require(rest == 0, "train.batch_size",
             f"train.batch_size={t.batch_size} is not divisible by the world size {world_size}")
    _require(per_rank % t.grad_accum == 0, "train.grad_accum",
             f"per-rank batch {per_rank} (train.batch_size/world size) is not divisible by train.grad_accum={t.grad_accum}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(t.expert_lr_scale > 0, "train.expert_lr_scale", f"must be > 0, got {t.expert_lr_scale}")
    _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    _require(0 <= t.warmup_steps, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _require(0 <= t.beta1 < 1, "train.beta1", f"must be in [0, 1), got {t.beta1}")
    _require(0 <= t.beta2 < 1, "train.beta2", f"must be in [0, 1), got {t.beta2}")
    _require(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 = off), got {t.grad_clip}")
    _require(t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}")
    _require(t.stop_at >= 0, "train.stop_at", f"must be >= 0 (0 = run to train.steps), got {t.stop_at}")
    _require(t.skip_nonfinite >= 0, "train.skip_nonfinite", f"must be >= 0, got {t.skip_nonfinite}")
    _choice(t.device, "train.device", ("auto", "cpu", "cuda"))
    _choice(t.dtype, "train.dtype", ("fp32", "bf16"))
    _choice(t.engine, "train.engine", ("native", "deepspeed", "fsdp"))
    _choice(t.activation_checkpointing, "train.activation_checkpointing", ("none", "full", "moe"))
    _require(t.reshard_after_forward or t.engine == "fsdp", "train.reshard_after_forward",
             f"false needs train.engine=fsdp (the {t.engine} engine keeps whole weights), got false")
    if t.engine != "deepspeed":  # the DeepSpeed settings and JSON are checked against the machine: preflight
        _require(t.zero_stage == 0, "train.zero_stage", f"needs train.engine=deepspeed, got {t.zero_stage}")
        _require(t.deepspeed_config is None, "train.deepspeed_config", "needs train.engine=deepspeed")

    _choice(d.dataset, "data.dataset", ("stdlib", "files", "hf"))
    _require(0 < d.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    if d.dataset == "files":
        _require(bool(d.path), "data.path", "data.dataset=files needs data.path (a file, a directory or a glob pattern)")
    if d.dataset == "hf":
        _require(bool(d.hf_name), "data.hf_name", "data.dataset=hf needs data.hf_name")
    _require(bool(d.text_field), "data.text_field", "must not be empty")
    _require(d.max_documents >= 0, "data.max_documents", f"must be >= 0 (0 = all), got {d.max_documents}")
    _require(d.cache_dir != "", "data.cache_dir", "must not be empty (null = the user's cache directory)")
    _choice(d.tokenizer, "data.tokenizer", ("bytes", "bpe", "pretrained"))
    if d.tokenizer == "bpe":
        _require(d.bpe_vocab_size > BYTE_VOCAB, "data.bpe_vocab_size",
                 f"must be > {BYTE_VOCAB} (the 256 byte symbols and the document separator), got {d.bpe_vocab_size}")
    if d.tokenizer == "pretrained":
        _require(bool(d.tokenizer_name), "data.tokenizer_name", "data.tokenizer=pretrained needs data.tokenizer_name")
    needed = {"bytes": BYTE_VOCAB, "bpe": d.bpe_vocab_size}.get(d.tokenizer)  # a pretrained one's: once loaded
    _require(needed is None or m.vocab_size >= needed, "model.vocab_size",
             f"data.tokenizer={d.tokenizer} has {needed} token ids, so it must be >= {needed}, got {m.vocab_size}")

    _require(cfg.ckpt.every >= 0, "ckpt.every", f"must be >= 0 (0 = only at the end), got {cfg.ckpt.every}")
    _require(cfg.ckpt.keep >= 1, "ckpt.keep", f"must be >= 1, got {cfg.ckpt.keep}")
    _choice(r.tracker, "run.tracker", ("none", "wandb", "tensorboard"))
    _require(bool(r.dir), "run.dir", "must not be empty")
    # init.from_hf is read (path, config.json, shapes) at start-up, on fresh runs only: a resumed run ignores it
    _require(cfg.init.from_hf != "", "init.from_hf", "must not be empty (null = random initialisation)")

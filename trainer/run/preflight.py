"""Checks of a valid config against this machine, before any process group or allocation.

`config_validation.validate` checks values against each other; this module checks them against the
machine: the device and backend exist, optional packages are installed, dataset scripts are
refused, grouped GEMM can run, DeepSpeed's JSON is one the trainer can use, and parameters
plus activations fit in memory. Every problem is one `ConfigError` naming the key, raised
identically on every rank.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import Config, ConfigError, head_dim, is_moe_layer, kv_heads, rotary_dim
from ..data import dataset_script_problem
from ..moe.experts import grouped_mm_problem
from ..parallel.compile import compile_problem

GiB = 1 << 30
WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")  # what wandb accepts in WANDB_MODE
BYTES_PER_PARAM = 16  # fp32 weight + fp32 gradient + two fp32 AdamW moments


def _cuda_wanted(cfg: Config) -> bool:
    return cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())


def check_device(cfg: Config) -> None:
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but torch.cuda.is_available() is False "
                          f"(torch {torch.__version__}); use train.device=cpu")
    if cfg.parallel.backend == "nccl" and not _cuda_wanted(cfg):
        raise ConfigError("parallel.backend: nccl needs CUDA devices, but this run is on the CPU "
                          "(no CUDA, or train.device=cpu); use parallel.backend=gloo or auto")
    if cfg.moe.expert_impl == "grouped_mm" and cfg.moe.num_experts > 0:
        device = torch.device("cuda" if _cuda_wanted(cfg) else "cpu")
        dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
        problem = grouped_mm_problem(device, dtype, cfg.model.d_model, cfg.moe.d_ff)
        if problem:
            raise ConfigError(f"moe.expert_impl: grouped_mm cannot run here: {problem}; use auto (falls back) or loop")


def check_compile(cfg: Config) -> None:
    if cfg.train.compile:
        problem = compile_problem("cuda" if _cuda_wanted(cfg) else "cpu")
        if problem:
            raise ConfigError(f"train.compile: {problem}; or set train.compile=false")


def check_packages_and_data(cfg: Config) -> None:
    d = cfg.data
    if cfg.run.tracker == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("run.tracker: wandb is not installed; run `bash launch/setup.sh --wandb` "
                          "(or pip install -e '.[wandb]'), or set run.tracker=none")
    mode = os.environ.get("WANDB_MODE")
    if cfg.run.tracker == "wandb" and mode is not None and mode not in WANDB_MODES:
        raise ConfigError(f"run.tracker: the environment's WANDB_MODE={mode!r} is not one of {', '.join(WANDB_MODES)} "
                          "(unset it: without an API key the trainer runs wandb offline by itself)")
    if cfg.run.tracker == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("run.tracker: tensorboard is not installed; run `bash launch/setup.sh --tensorboard` "
                          "(or pip install -e '.[tensorboard]'), or set run.tracker=none")
    if d.dataset == "hf":
        problem = dataset_script_problem(d.hf_name)
        if problem:
            raise ConfigError(f"data.hf_name: {problem}; dataset scripts run arbitrary code and are refused "
                              "(use data.hf_name=text|json|parquet|csv with data.hf_data_files)")
        if importlib.util.find_spec("datasets") is None:
            raise ConfigError("data.dataset: hf needs the Hugging Face datasets package; run "
                              "`bash launch/setup.sh --hf` (or pip install -e '.[hf]')")
    if d.dataset == "files" and not glob.has_magic(d.path) and not Path(d.path).expanduser().exists():
        raise ConfigError(f"data.path: {d.path} does not exist")


# ----------------------------------------------------------------------------- DeepSpeed

# DeepSpeed keys the trainer sets itself, and the config keys that own them
OWNED_KEYS = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.batch_size and train.grad_accum",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr, train.beta1, train.beta2 and train.weight_decay (the trainer's AdamW)",
    "scheduler": "train.lr, train.warmup_steps and train.min_lr_ratio",
    "fp16": "train.dtype (autocast; weights stay fp32)",
    "bf16": "train.dtype (autocast; weights stay fp32)",
    "amp": "train.dtype (autocast; weights stay fp32)",
    "zero_optimization.stage": "train.zero_stage",
}
ZERO3_REASON = ("ZeRO-3 partitions every parameter over all ranks, while expert parallelism already shards the "
                "experts over parallel.ep, and DeepSpeed runs MoE models only with ZeRO stages 0-2")


def deepspeed_user_config(path: Optional[str]) -> dict:
    if path is None:
        return {}
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"train.deepspeed_config: {file} is not a file")
    try:
        values = json.loads(file.read_text())
    except ValueError as e:
        raise ConfigError(f"train.deepspeed_config: {file} is not valid JSON ({e})") from None
    except OSError as e:
        raise ConfigError(f"train.deepspeed_config: {file} cannot be read: {e.strerror or e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"train.deepspeed_config: {file} must hold a JSON object")
    for key, owner in OWNED_KEYS.items():
        section, _, name = key.rpartition(".")
        holder = values.get(section, {}) if section else values
        if isinstance(holder, dict) and name in holder:
            raise ConfigError(f"train.deepspeed_config: {file} sets {key}, which the trainer sets from {owner}; "
                              "remove it from the JSON")
    zero = values.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"train.deepspeed_config: {file}: zero_optimization must be a JSON object")
    for key in ("contiguous_gradients", "reduce_scatter"):
        if zero.get(key) is False:
            raise ConfigError(f"train.deepspeed_config: {file} sets zero_optimization.{key}=false; DeepSpeed "
                              "needs it for MoE parameter groups")
    offload = next((key for key in zero if key.startswith("offload_")), None)
    if offload is not None:
        raise ConfigError(f"train.deepspeed_config: {file} sets zero_optimization.{offload}, which needs "
                          "DeepSpeed's compiled optimizer ops instead of the trainer's AdamW; remove it")
    return values


def check_deepspeed_settings(cfg: Config, world_size: int) -> None:
    """train.engine=deepspeed: the stage, the package and the JSON file; one ConfigError naming the key."""
    t = cfg.train
    if t.zero_stage == 3:
        raise ConfigError(f"train.zero_stage: 3 is refused: {ZERO3_REASON}")
    if t.zero_stage not in (0, 1, 2):
        raise ConfigError(f"train.zero_stage: must be 0, 1 or 2, got {t.zero_stage}")
    if t.skip_nonfinite:
        raise ConfigError("train.skip_nonfinite: must be 0 with train.engine=deepspeed (a non-finite loss or "
                          "gradient norm stops the run)")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("train.engine: deepspeed is not installed; run `bash launch/setup.sh --deepspeed`")
    values = deepspeed_user_config(t.deepspeed_config)
    if values:
        check_with_deepspeed(values, cfg, world_size)


def check_with_deepspeed(values: dict, cfg: Config, world_size: int) -> None:
    """DeepSpeed's own validation of the user's JSON (its pydantic models), here rather than as a
    traceback from every rank inside `deepspeed.initialize`."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _cuda_wanted(cfg) else "cpu")  # as the engine sets it
    from deepspeed.runtime.config import DeepSpeedConfig

    t = cfg.train
    micro = t.batch_size // world_size // t.grad_accum  # DeepSpeed checks the batch keys against a world of one here
    owned = {"train_batch_size": micro * t.grad_accum, "train_micro_batch_size_per_gpu": micro,
             "gradient_accumulation_steps": t.grad_accum,
             "zero_optimization": {**values.get("zero_optimization", {}), "stage": t.zero_stage}}
    try:
        DeepSpeedConfig({**values, **owned})
    except Exception as e:  # pydantic's ValidationError, or whatever DeepSpeed's own parsing raises
        raise ConfigError(f"train.deepspeed_config: {t.deepspeed_config}: DeepSpeed rejects it: "
                          f"{_deepspeed_complaint(e, values)}") from None


def _deepspeed_complaint(error: Exception, values: dict) -> str:
    """`section.key: message` for a pydantic error, else the exception's first line."""
    details = error.errors() if hasattr(error, "errors") and callable(error.errors) else None
    if not details:
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[0] if lines else ''}"
    loc = [str(part) for part in details[0].get("loc", ())]
    section = next((k for k, v in values.items() if isinstance(v, dict) and loc and loc[0] in v), None)
    return f"{'.'.join(([section] if section else []) + loc)}: {details[0].get('msg', error)}"


# ----------------------------------------------------------------------------- memory


@dataclass
class MemoryEstimate:
    """A lower bound of one rank's peak memory in bytes, from the config alone."""

    params_and_optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params_and_optimizer + self.activations


def estimate_memory(cfg: Config, world_size: int) -> MemoryEstimate:
    m, e, t = cfg.model, cfg.moe, cfg.train
    D, S, V, L = m.d_model, m.seq_len, m.vocab_size, m.n_layers
    n_moe = sum(1 for layer in range(L) if is_moe_layer(m, e, layer))
    Q, KV = m.n_heads * head_dim(m), kv_heads(m) * head_dim(m)  # attention projection widths
    dense_ff = m.dense_d_ff or e.d_ff
    local_experts = e.num_experts // cfg.parallel.ep if e.num_experts else 0
    params = ((1 if m.tie_embeddings else 2) * V * D  # embedding and head
              + L * (D * (2 * Q + 2 * KV) + 2 * D)  # attention and norms
              + (L - n_moe) * 3 * D * dense_ff
              + n_moe * (local_experts * 3 * D * e.d_ff + e.num_experts * D))
    rotary = 2 * S * rotary_dim(m) * 4
    micro = t.batch_size // world_size // t.grad_accum
    tokens = micro * S
    ffn_floats = max(e.top_k * (3 * e.d_ff + 3 * D) + 2 * e.num_experts if n_moe else 0, 3 * dense_ff)
    per_token_layer = 12 * D + ffn_floats  # what autograd keeps per token and layer, roughly
    activations = 4 * tokens * (L * per_token_layer + 3 * V)
    batch_rows = (t.batch_size // world_size) * (S + 1) * 8 * 3  # int64 windows, inputs, targets
    return MemoryEstimate(float(params * bytes_per_param(cfg, world_size) + rotary), float(activations + batch_rows))


def bytes_per_param(cfg: Config, world_size: int) -> float:
    """Weights, gradients and AdamW state per parameter of this rank. ZeRO-1 partitions the moments and
    keeps an fp32 master partition; ZeRO-2 partitions the gradients too (over at most the world)."""
    stage = cfg.train.zero_stage if cfg.train.engine == "deepspeed" else 0
    if stage == 0:
        return BYTES_PER_PARAM
    kept = 4 + (4 if stage == 1 else 0)  # weights, and gradients unless stage 2 partitions them
    partitioned = 8 + 4 + (4 if stage == 2 else 0)  # moments, fp32 master copy, gradients (stage 2)
    return kept + partitioned / world_size


def available_memory_per_rank(cfg: Config, world_size: int) -> tuple[float, str]:
    """(bytes, where) one rank could ever use: its GPU, or its share of this node's RAM.

    Totals, not what is free right now: the check refuses configs that cannot fit at all, and
    must not refuse a valid one because the machine is busy for a moment."""
    if _cuda_wanted(cfg) and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
        return float(torch.cuda.get_device_properties(local_rank).total_memory), f"GPU {local_rank}"
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return float(total) / ranks_here, f"1/{ranks_here} of this machine's RAM"


def check_memory(cfg: Config, world_size: int) -> None:
    estimate = estimate_memory(cfg, world_size)
    available, where = available_memory_per_rank(cfg, world_size)
    if estimate.total <= available:
        return
    if estimate.activations >= estimate.params_and_optimizer:
        keys = ["train.batch_size", "model.seq_len", "model.d_model", "train.grad_accum"]
        if cfg.model.seq_len > cfg.train.batch_size:
            keys[0], keys[1] = keys[1], keys[0]
    else:
        keys = ["model.d_model", "model.n_layers", "moe.num_experts", "moe.d_ff", "parallel.ep", "model.vocab_size"]
        if cfg.model.seq_len > cfg.model.d_model * 1024:
            keys.insert(0, "model.seq_len")
    raise ConfigError(f"{keys[0]}: this run needs at least {estimate.total / GiB:,.1f} GiB per rank "
                      f"(parameters and optimizer {estimate.params_and_optimizer / GiB:,.1f} GiB, activations "
                      f"{estimate.activations / GiB:,.1f} GiB) but {where} is {available / GiB:,.1f} GiB; "
                      f"the size is driven by {', '.join(keys)}")


def cpu_bf16_matrix_instructions(capabilities: dict | None = None) -> list[str]:
    """The bf16 matrix instruction sets of this CPU that torch uses (empty: bf16 is emulated)."""
    if capabilities is None:
        capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return [name for name in ("amx_bf16", "avx512_bf16") if capabilities.get(name)]


def bf16_cpu_note(cfg: Config, capabilities: dict | None = None) -> str | None:
    """One line for a bf16 run on a CPU that would emulate bf16 (not an error: it still trains)."""
    if cfg.train.dtype != "bf16" or _cuda_wanted(cfg) or cpu_bf16_matrix_instructions(capabilities):
        return None
    return ("note: train.dtype=bf16 on a CPU without bf16 matrix instructions (no AMX, no avx512_bf16): torch "
            "emulates bf16 here and runs many times slower than fp32 (about 20x on an AVX2-only CPU); "
            "train.dtype=fp32 is the fast choice on this machine")


def preflight(cfg: Config, world_size: int) -> None:
    """Everything that can be known before joining a process group; raises ConfigError."""
    check_device(cfg)
    check_compile(cfg)
    check_packages_and_data(cfg)
    if cfg.train.engine == "deepspeed":
        check_deepspeed_settings(cfg, world_size)  # reads train.deepspeed_config
    check_memory(cfg, world_size)

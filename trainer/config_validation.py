"""Validation of a run configuration: each value, and the values against each other and the world
size. Every problem is one `ConfigError` whose message starts with the dotted key.

Runs on every rank before any collective, on the same inputs, so every rank fails with the same
message. Checks against the machine (devices, compilers, DeepSpeed) are `trainer.run.preflight`'s.
"""

from __future__ import annotations

from .config import BYTE_VOCAB, MAX_TIMEOUT_S, Config, ConfigError, head_dim, is_moe_layer, rotary_dim


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
    if m.head_dim is None:
        _require(m.d_model % m.n_heads == 0, "model.n_heads",
                 f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads} (or set model.head_dim)")
    else:
        _require(m.head_dim >= 2, "model.head_dim", f"must be >= 2 or null (= d_model / n_heads), got {m.head_dim}")
    _require(m.n_kv_heads is None or (m.n_kv_heads >= 1 and m.n_heads % m.n_kv_heads == 0), "model.n_kv_heads",
             f"must be >= 1 and divide model.n_heads={m.n_heads}, or null (= n_heads), got {m.n_kv_heads}")
    _choice(m.qk_norm, "model.qk_norm", ("none", "per_head", "full"))
    _require(0 < m.rope_fraction <= 1, "model.rope_fraction", f"must be in (0, 1], got {m.rope_fraction}")
    rotary = rotary_dim(m)
    _require(rotary >= 2 and rotary % 2 == 0, "model.rope_fraction" if m.rope_fraction < 1 else "model.n_heads",
             f"the rotating part of a head, {rotary} dims (head_dim {head_dim(m)} x model.rope_fraction "
             f"{m.rope_fraction}), must be even and >= 2")
    _require(0 <= m.first_moe_layer, "model.first_moe_layer", f"must be >= 0, got {m.first_moe_layer}")
    _require(m.dense_d_ff is None or m.dense_d_ff >= 1, "model.dense_d_ff", f"must be >= 1, got {m.dense_d_ff}")
    # model.vocab_size against the tokenizer: below with data.*, or when a pretrained tokenizer loads

    _require(e.num_experts >= 0, "moe.num_experts", f"must be >= 0 (0 = dense), got {e.num_experts}")
    _require(e.num_experts == 0 or any(is_moe_layer(m, e, layer) for layer in range(m.n_layers)),
             "model.first_moe_layer" if m.first_moe_layer > 0 else "model.moe_every",
             f"model.n_layers={m.n_layers}, model.first_moe_layer={m.first_moe_layer} and model.moe_every="
             f"{m.moe_every} leave no MoE block (for a dense model set moe.num_experts=0)")
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

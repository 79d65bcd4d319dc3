"""What one rank holds for a layout: parameters, gradients, optimizer state, activations, traffic.

`memory_plan(model, cfg, layout)` reads the bytes off a model that is already parallelized (expert
parallelism applied, FSDP units made): a real one at the start of a run, or one on the meta device
over fake process groups (`python -m trainer plan`), so both report the same numbers.

    params, param_bytes   this rank's tensors (an FSDP shard counts its local part)
    grad_bytes            gradients of the same tensors; DeepSpeed ZeRO-2 partitions them
    optimizer_bytes       AdamW's two moments per parameter plus its step count; DeepSpeed ZeRO-1/2
                          partitions the moments
    activation_bytes      what autograd saves for backward in one micro-batch, for the chosen
                          activation checkpointing, with balanced routing (each rank's experts get
                          tokens * top_k rows, at most the capacity); derived from the ops the model
                          runs (see `_block_activation_bytes`), checked against saved-tensor hooks
    all_to_all_bytes_per_step  rows this rank sends to other ranks in one optimizer step: dispatch
                          and combine, forward and backward
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import Config, head_dim, kv_heads
from ..moe import MoE
from ..moe.experts import expert_parameters
from .dist import Layout
from .fsdp import local_tensor

INDEX_BYTES = 8  # int64 route and row indices


def _block_activation_bytes(cfg: Config, tokens: int, moe_block: bool, mode: str, act: int) -> int:
    """Bytes one block saves for backward on `tokens` tokens, from the tensors each op keeps."""
    m, moe = cfg.model, cfg.moe
    T, D, H = tokens, m.d_model, m.n_heads
    Q, KV = H * head_dim(m), kv_heads(m) * head_dim(m)  # attention projection widths
    if mode == "full":
        return T * D * act  # the block's input; the rest is recomputed in backward
    # attention: the norm's input, 1/rms and normalised input (before its gain), the qkv input,
    # the qkv output (v is a view of it), roped q and k, the attention output and its
    # log-sum-exp, the output projection's input; q/k norms keep their inputs and outputs
    norm = 2 * T * D * act + T * 4
    qk_norm = 0 if m.qk_norm == "none" else 2 * T * (Q + KV) * act
    attention = norm + T * (D + (Q + 2 * KV) + (Q + KV) + Q + Q) * act + qk_norm + T * H * 4
    ffn_norm = norm
    if not moe_block:
        d_ff = m.dense_d_ff or moe.d_ff
        return attention + ffn_norm + T * D * act + 4 * T * d_ff * act  # input, gate, silu, up, product
    if mode == "moe":
        return attention + ffn_norm + T * D * act  # the MoE layer's input only
    E, K, F = moe.num_experts, moe.top_k, moe.d_ff
    routes = T * K
    if moe.capacity_factor is not None:
        routes = min(routes, E * max(math.ceil(moe.capacity_factor * T * K / E), moe.min_capacity))
    rows = routes  # balanced: this rank's experts receive as many rows as it sends
    router = T * D * act + 2 * T * E * 4 + routes * INDEX_BYTES + T * K * 4 + 4 * T * 4
    if moe.noisy_topk:
        router += 2 * T * E * 4
    dispatch = 3 * routes * INDEX_BYTES + (rows * INDEX_BYTES if cfg.parallel.ep > 1 else 0)
    experts = rows * D * act + 2 * rows * F * act  # rows in, gate and up (silu * up is recomputed)
    combine = routes * D * 4 + routes * 4  # fp32 outputs and combine weights
    shared = 0
    if moe.num_shared_experts:
        shared = 4 * T * moe.num_shared_experts * F * act + T * D * 4
    return attention + ffn_norm + router + dispatch + experts + combine + shared


def activation_bytes(model: nn.Module, cfg: Config, micro_batch: int) -> int:
    """Bytes autograd saves in the forward of one micro-batch of `micro_batch` sequences on one rank."""
    act = 2 if cfg.train.dtype == "bf16" else 4
    T, D, V = micro_batch * cfg.model.seq_len, cfg.model.d_model, cfg.model.vocab_size
    mode = cfg.train.activation_checkpointing
    blocks = sum(_block_activation_bytes(cfg, T, isinstance(b.ffn, MoE), mode, act) for b in model.blocks)
    head = 3 * T * D * act + T * 4 + T * V * 4 + T * INDEX_BYTES  # norm, lm_head input, log-softmax, targets
    return blocks + head + T * INDEX_BYTES  # + the embedding's indices


def all_to_all_bytes_per_step(cfg: Config, tokens_per_micro_batch: int, moe_layers: int) -> int:
    """Bytes this rank sends to the other ranks of its EP group per optimizer step (balanced routing)."""
    ep = cfg.parallel.ep
    if ep == 1 or not moe_layers:
        return 0
    act = 2 if cfg.train.dtype == "bf16" else 4
    row_bytes = cfg.model.d_model * act
    sent = tokens_per_micro_batch * cfg.moe.top_k * (ep - 1) / ep  # rows leaving this rank
    exchanges = 4  # dispatch and combine, each in the forward and again (as gradients) in the backward
    return int(sent * row_bytes * exchanges * moe_layers * cfg.train.grad_accum)


def memory_plan(model: nn.Module, cfg: Config, layout: Layout) -> dict:
    """This rank's bytes for `model` as parallelized for `layout` (see the module docstring)."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    experts = {id(p) for p in expert_parameters(model)}
    elem = {id(p): p.element_size() for p in params}
    local = {id(p): local_tensor(p).numel() for p in params}
    param_bytes = sum(local[id(p)] * elem[id(p)] for p in params)
    grad_bytes = param_bytes
    moment_bytes = 2 * sum(local[id(p)] * 4 for p in params)  # fp32 exp_avg and exp_avg_sq
    step_bytes = 4 * len(params)  # AdamW's step count, one fp32 scalar per parameter
    if t.engine == "deepspeed" and t.zero_stage > 0:  # ZeRO partitions over each parameter's data-parallel group

        def partitioned(p) -> float:
            return local[id(p)] * 4 / (layout.num_replicas if id(p) in experts else layout.world_size)

        moment_bytes = int(2 * sum(partitioned(p) for p in params))
        if t.zero_stage == 2:
            grad_bytes = int(sum(partitioned(p) for p in params))
    micro_batch = t.batch_size // layout.world_size // t.grad_accum
    activations = activation_bytes(model, cfg, micro_batch)
    optimizer_bytes = moment_bytes + step_bytes
    moe_layers = sum(1 for m in model.modules() if isinstance(m, MoE))
    return {
        "params": sum(local.values()),
        "param_bytes": param_bytes,
        "grad_bytes": grad_bytes,
        "optimizer_bytes": optimizer_bytes,
        "activation_bytes": activations,
        "total_bytes": param_bytes + grad_bytes + optimizer_bytes + activations,
        "all_to_all_bytes_per_step": all_to_all_bytes_per_step(cfg, micro_batch * cfg.model.seq_len, moe_layers),
    }


def measured_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What a real run holds after a step: local parameter, gradient and optimizer-state bytes."""
    params = [p for p in model.parameters() if p.requires_grad]

    def nbytes(t) -> int:
        return local_tensor(t).numel() * t.element_size() if t is not None else 0

    return {
        "param_bytes": sum(nbytes(p) for p in params),
        "grad_bytes": sum(nbytes(p.grad) for p in params),
        "optimizer_bytes": sum(nbytes(v) for p in params for v in optimizer.state.get(p, {}).values()),
    }


def describe_plan(result: dict) -> str:
    """The plan's parts in GiB, for people (`python -m trainer plan` and a run's start-up lines)."""
    gib = {k: v / 2**30 for k, v in result.items() if k.endswith("_bytes")}
    line = (f"rank 0 holds {result['params']:,} parameters; params {gib['param_bytes']:.2f} + grads "
            f"{gib['grad_bytes']:.2f} + optimizer {gib['optimizer_bytes']:.2f} + activations "
            f"{gib['activation_bytes']:.2f} = {gib['total_bytes']:.2f} GiB")
    if "fits" in result:
        line += f", {'fits' if result['fits'] else 'does NOT fit'} in {gib['device_memory_bytes']:.1f} GiB"
    return line + f"; all_to_all {result['all_to_all_bytes_per_step'] / 2**20:,.1f} MiB sent per step"

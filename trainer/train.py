"""The training loop: `train_step`, then log, evaluate and checkpoint, read top to bottom.

One optimizer step consumes `train.batch_size` sequences in total, split evenly over the
ranks and, on each rank, over `train.grad_accum` micro-batches. What comes before the first
step (the run.dir lock, the checkpoint to resume, the corpus, agreement) is `startup.py`;
what the model, the engine, evaluation and the schedule are is `build.py`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .build import Trainer, autocast_context, build_trainer, evaluate, lr_at, spec_peak_bf16_flops
from .config import Config, save_config, to_dict
from .data import Corpus, TokenBatches, save_tokenizer
from .engines import NonFiniteError
from .moe import LoadError
from .moe.collectives import CollectiveError, all_reduce_sum_
from .moe.experts import expert_impl_used
from .parallel.dist import Layout, shutdown
from .parallel.fsdp import local_tensor
from .parallel.memory import describe_plan, memory_plan
from .run.checkpoint import TrainState, save_checkpoint
from .run.checkpoint_files import Found
from .run.preemption import StopRequest
from .run.rundir import RunDirLock, run_dir_lost
from .run.tracking import (RoutingWindow, StepStats, Tracker, console_log, eval_record, git_commit, print0,
                           progress_bar, train_record)
from .startup import resume, start


@dataclass
class StepResult:
    losses: list[float]  # loss, lm, aux, z: global means
    grad_norm: float  # before clipping, identical on every rank
    routing: list[float]  # dropped fraction, worst expert load ratio
    applied: bool  # False: non-finite, the optimizer step was skipped
    stop: bool = False  # some rank was asked to stop (SIGTERM/SIGINT): every rank sees the same
    routed_LE: Optional[torch.Tensor] = None  # routes per expert of each MoE layer over the step (host, global)
    entropy_L: Optional[torch.Tensor] = None  # mean router entropy per MoE layer over the step's tokens (host)


def train_step(tr: Trainer, inputs: torch.Tensor, targets: torch.Tensor, lr: float,
               stop_requested: bool = False) -> StepResult:
    """Forward and backward over this rank's micro-batches, gradient sync, clipping, update.

    The update is applied only when the global loss and gradient norm are finite; the caller
    decides whether a skipped step stops the run. `stop_requested` rides on the loss
    all_reduce, so a signal on one rank reaches all of them after this same step."""
    cfg, layout, A = tr.cfg, tr.layout, tr.cfg.train.grad_accum
    device = layout.device
    micro = inputs.shape[0] // A
    # the LM loss weighs every scored token of the global batch alike, whichever rank holds it:
    # each rank divides its summed cross-entropy by (global scored tokens) / (world * micro-batches)
    scored = (targets != -100).sum().to(device=device, dtype=torch.float64)
    all_reduce_sum_(scored, layout.world_group, "train step", "all_reduce of scored token counts")
    lm_tokens = (scored.clamp(min=1) / (layout.world_size * A)).float()

    stats = StepStats(device)
    for m in range(A):
        rows = slice(m * micro, (m + 1) * micro)
        with autocast_context(cfg, device):
            # the data is rank-major: this micro-batch's first row is global row rank*rows + m*micro
            first_token = (layout.rank * inputs.shape[0] + m * micro) * inputs.shape[1]
            out = tr.engine.forward(inputs[rows].to(device), targets[rows].to(device), lm_tokens=lm_tokens,
                                    token_offset=first_token)
        tr.engine.backward(out.loss, A, last=m == A - 1)
        stats.add(out, A)

    grad_norm = tr.engine.reduce_and_clip(cfg.train.grad_clip)  # None: the engine measures it in step()
    # the step's one all_reduce of reported values: losses, the stop flag, router entropy sums
    entropy_L = stats.entropy_L if stats.entropy_L is not None else stats.losses.new_zeros(0)
    reduced = torch.cat([stats.losses, stats.losses.new_tensor([float(stop_requested)]), entropy_L])
    all_reduce_sum_(reduced, layout.world_group, "train step", "all_reduce of losses")
    mean_entropy_L = reduced[5:] / stats.valid_L.clamp(min=1) if stats.valid_L is not None else entropy_L
    # one device-to-host copy for everything the step reports
    routed = stats.routed_LE.flatten().double() if stats.routed_LE is not None else entropy_L
    measured = grad_norm.double().view(1) if grad_norm is not None else reduced.new_full((1,), math.nan)
    host = torch.cat([reduced[:4] / layout.world_size, measured, stats.routing_summary(),
                      reduced[4:5], mean_entropy_L, routed]).cpu()
    values = host[:8].tolist()
    losses, norm, routing, stop = values[:4], values[4], values[5:7], values[7] > 0
    n_layers = mean_entropy_L.numel()
    entropy_host_L = host[8:8 + n_layers]
    routed_LE = host[8 + n_layers:].long().view(n_layers, -1) if stats.routed_LE is not None else None
    norm = tr.engine.step(lr, norm if grad_norm is not None else None, math.isfinite(losses[0]))
    applied = math.isfinite(losses[0]) and math.isfinite(norm)
    for layer in tr.model.moe_layers:  # once per optimizer step: expert bias, global-batch balance counts
        if layer.router.counts_steps:
            layer.router.finish_step(applied, cfg.moe.expert_bias_rate)
    return StepResult(losses, norm, routing, applied, stop, routed_LE, entropy_host_L if routed_LE is not None else None)



def train(cfg: Config) -> dict:
    """Run training as configured, resuming from run.dir's latest checkpoint if it has one;
    returns the last logged metrics (on every rank)."""
    layout, corpus, lock, found = start(cfg)
    run_dir = Path(cfg.run.dir)
    ended_normally = False
    try:
        with console_log(run_dir / "train.log" if layout.is_main else None):  # rank 0 holds the run.dir lock
            last = _train(cfg, layout, corpus, run_dir, found, lock)
        ended_normally = True
        return last
    finally:
        shutdown(all_ranks_here=ended_normally, timeout_s=cfg.parallel.timeout_s)
        if lock is not None:
            lock.release()



def _train(cfg: Config, layout: Layout, corpus: Corpus, run_dir: Path, found: Optional[Found],
           lock: Optional[RunDirLock]) -> dict:
    t, S = cfg.train, cfg.model.seq_len
    tr = build_trainer(cfg, layout)
    state = resume(tr, found, corpus)
    if layout.is_main:
        save_config(cfg, run_dir / "config.yaml")
        save_tokenizer(corpus.tokenizer, run_dir)  # bpe, pretrained: run.dir/tokenizer.json, which a resume reads
    last_step = min(t.steps, t.stop_at) if t.stop_at else t.steps
    if state.step >= last_step:
        limit = f"train.stop_at={t.stop_at}" if last_step < t.steps else f"train.steps={t.steps}"
        print0(layout.is_main, f"nothing to train: the checkpoint is at step {state.step} and {limit}; "
                               f"raise it to train longer")
        return {}
    train_batches = TokenBatches(corpus.train, S, t.batch_size, layout.rank, layout.world_size, t.seed, True, "train")
    train_batches.continue_from(state.step, state.data_position)
    val_batches = TokenBatches(corpus.val, S, t.batch_size, layout.rank, layout.world_size, t.seed, False, "val")

    micro = t.batch_size // layout.world_size // t.grad_accum
    memory = memory_plan(tr.model, cfg, layout)  # what `python -m trainer plan` predicts for this layout
    n_params = memory["params"]  # this rank's own (an FSDP shard counts its part)
    n_expert = sum(local_tensor(p).numel() for p in tr.grad_sync.expert)
    commit = git_commit() if layout.is_main else None
    print0(layout.is_main, f"run: {run_dir} (console in {run_dir / 'train.log'}), code {commit or 'not a git checkout'}, "
                           f"torch {torch.__version__}")
    print0(layout.is_main, f"data: {corpus.description}")
    print0(layout.is_main, f"tokens: {corpus.cache}")
    compute_dtype = torch.bfloat16 if t.dtype == "bf16" else torch.float32
    impl = expert_impl_used(cfg.moe.expert_impl, layout.device, compute_dtype, cfg.model.d_model, cfg.moe.d_ff)
    print0(layout.is_main, f"model: {cfg.model.n_layers} layers, {len(tr.model.moe_layers)} MoE, "
                           f"{cfg.moe.num_experts} experts top-{cfg.moe.top_k} (experts: {impl}); this rank holds "
                           f"{n_params / 1e6:.2f}M params ({n_expert / 1e6:.2f}M expert)")
    print0(layout.is_main, f"layout: world {layout.world_size}, ep {layout.ep}, {layout.num_replicas} expert "
                           f"replica(s), device {layout.device}, batch {t.batch_size} x {S} tokens "
                           f"({micro} per micro-batch x {t.grad_accum} per rank), engine {tr.engine.name}"
                           + (f" ZeRO-{t.zero_stage}" if t.engine == "deepspeed" else "")
                           + f", activation checkpointing {t.activation_checkpointing}")
    print0(layout.is_main, f"plan: {json.dumps(memory)} ({describe_plan(memory)})")

    newest_checkpoint = found.step if found else None

    def require_run_dir(step: int) -> None:
        """Collective: every rank stops if rank 0 (which holds the lock) finds run.dir deleted or replaced."""
        change = torch.tensor([float(lock.change()) if lock is not None else 0.0])
        if layout.world_group is not None:
            all_reduce_sum_(change, layout.world_group, "train step", "all_reduce of whether run.dir is still there")
        if change.item() > 0:
            raise run_dir_lost(run_dir, int(change.item()), step, newest_checkpoint)

    def checkpoint(step: int) -> Path:
        nonlocal newest_checkpoint
        done = TrainState(step, train_batches.position_of(step), state.skipped_steps)
        meta = {"config": to_dict(cfg), "data_fingerprint": corpus.fingerprint}
        started = time.perf_counter()
        path = save_checkpoint(run_dir, done, tr.model, tr.engine.optimizer_state(), layout, meta, cfg.ckpt.keep)
        print0(layout.is_main, f"step {step}: checkpoint {path} ({time.perf_counter() - started:.1f}s)")
        newest_checkpoint = step
        return path

    run_info = {"git_commit": commit, "data_fingerprint": corpus.fingerprint, "world_size": layout.world_size,
                "corpus_fingerprint": corpus.corpus_fingerprint, "tokenizer": corpus.tokenizer.description,
                "tokenizer_fingerprint": corpus.tokenizer.fingerprint}
    tracker = Tracker(run_dir, layout.is_main, cfg.run.tracker, cfg.run.wandb_project, cfg.run.name,
                      {**to_dict(cfg), "run_info": run_info}, resumed_step=state.step)
    bar = progress_bar(t.steps, state.step, layout.is_main and cfg.run.progress)
    peak = spec_peak_bf16_flops(layout.device)
    tokens_per_step = t.batch_size * S
    last: dict = {}
    window_time, window_steps = 0.0, 0
    routing_window = RoutingWindow()
    start_time = time.perf_counter()
    step = state.step
    try:
        with StopRequest() as stop:
            for step in range(state.step + 1, t.steps + 1):
                step_start = time.perf_counter()
                lr = lr_at(step - 1, cfg)
                inputs, targets = train_batches.batch(step - 1)
                try:
                    result = train_step(tr, inputs, targets, lr, stop.requested)
                except NonFiniteError as e:  # raised by an engine that cannot skip a step
                    raise NonFiniteError(f"step {step}: {e}") from e
                if not result.applied:
                    state.skipped_steps += 1
                    _count_nonfinite(result, step, state.skipped_steps, t.skip_nonfinite, layout.is_main)
                if layout.device.type == "cuda":
                    torch.cuda.synchronize(layout.device)
                window_time += time.perf_counter() - step_start
                window_steps += 1
                routing_window.add(result.routed_LE, result.entropy_L)

                record = None
                if step % cfg.run.log_every == 0 or step in (t.steps, t.stop_at) or result.stop:
                    tokens_per_s = tokens_per_step * window_steps / window_time
                    mfu = tr.model.flops_per_token() * tokens_per_s / (peak * layout.world_size) if peak else None
                    record = train_record(step, result.losses, result.grad_norm, lr, result.routing, tokens_per_s,
                                          train_batches.epoch_of(step), time.perf_counter() - start_time,
                                          state.skipped_steps, mfu)
                    record.update(routing_window.summary(cfg.run.log_expert_counts))
                    window_time, window_steps = 0.0, 0
                    bar.set_postfix(loss=f"{result.losses[0]:.3f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
                if step == t.steps or (t.eval_every > 0 and step % t.eval_every == 0):
                    evaluated = eval_record(step, evaluate(tr.model, cfg, layout, val_batches))
                    record = {**record, **evaluated} if record else evaluated
                    print0(layout.is_main, f"step {step}: val_loss {evaluated['val_loss']:.4f}")
                stop_here = step == t.stop_at
                saving = result.stop or stop_here or step == t.steps or (cfg.ckpt.every > 0 and step % cfg.ckpt.every == 0)
                if record is not None or saving:  # before writing: a save would quietly make run.dir anew
                    require_run_dir(step)
                if record is not None:
                    tracker.log(record)
                    last = {**last, **record}
                bar.update(1)
                if saving:
                    path = checkpoint(step)
                if stop_here:
                    print0(layout.is_main, f"stopped at step {step} (train.stop_at); checkpoint {path}; run again "
                                           "without train.stop_at to continue")
                    return last
                if result.stop:
                    print0(layout.is_main, f"stopped at step {step} by a signal ({stop.signal_name or 'on another rank'}"
                                           f"); checkpoint {path}; run the same command again to resume")
                    return last
    except CollectiveError as e:
        raise CollectiveError(f"step {step}: {e}") from e
    except LoadError as e:
        raise LoadError(f"step {step}: {e}") from e
    finally:
        bar.close()
        tracker.close()

    elapsed = time.perf_counter() - start_time
    trained = t.steps - (found.step if found else 0)
    print0(layout.is_main, f"done: {t.steps} steps ({trained} in this run) in {elapsed:.1f}s, "
                           f"loss {last.get('loss', float('nan')):.4f}, val_loss {last.get('val_loss', float('nan')):.4f}, "
                           f"{tokens_per_step * trained / elapsed:.0f} tokens/s (incl. eval and checkpoints)")
    return last


def _count_nonfinite(result: StepResult, step: int, skipped: int, allowed: int, is_main: bool) -> None:
    """Raise NonFiniteError once more steps were skipped than `train.skip_nonfinite` allows."""
    what = "loss" if not math.isfinite(result.losses[0]) else "gradient norm"
    value = result.losses[0] if what == "loss" else result.grad_norm
    if skipped > allowed:
        allowance = (f"{skipped - 1} step(s) skipped before, train.skip_nonfinite={allowed}"
                     if allowed else "train.skip_nonfinite=N skips up to N such steps")
        raise NonFiniteError(f"step {step}: non-finite {what} ({value}); the run stopped without "
                             f"applying this step ({allowance})")
    print0(is_main, f"step {step}: non-finite {what} ({value}), step skipped ({skipped} of "
                    f"train.skip_nonfinite={allowed})")

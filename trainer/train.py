"""The training loop: setup -> `train_step` -> log record, read top to bottom.

One optimizer step consumes `train.batch_size` sequences in total, split evenly over the
ranks and, on each rank, over `train.grad_accum` micro-batches.

Start-up order matters: before the first collective that depends on the config, every rank
has checked the machine (`preflight`, in the CLI), rank 0 holds the run.dir lock, and all
ranks have compared configs and data over the world group (`agreement`). Only then are the
EP groups created and the model materialised.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .agreement import StartReport, check_replicas_identical, flat_config, require_agreement
from .checkpoint import (CheckpointError, Found, TrainState, broadcast_found, check_model_shapes, config_of,
                         expected_model_shapes, latest_checkpoint, load_checkpoint, remove_dead_saves,
                         save_checkpoint)
from .config import Config, save_config, to_dict
from .data import Corpus, DataError, TokenBatches, check_corpus, load_corpus, save_tokenizer
from .dist import Layout, env_rank, init_world, make_layout, pick_device, shutdown
from .engines import Engine, NonFiniteError, build_engine
from .grad_sync import GradSync
from .model import Transformer
from .moe import LoadError
from .moe.collectives import CollectiveError, all_reduce_sum_
from .moe.experts import expert_impl_used
from .parallelize import parallelize
from .preemption import StopRequest
from .rundir import RunDirError, RunDirLock, holds_a_run_without_checkpoint
from .tracking import (METRICS_FILE, RoutingWindow, StepStats, Tracker, console_log, eval_record, git_commit, print0,
                       progress_bar, train_record, truncate_metrics)

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, per GPU


def spec_peak_bf16_flops(device: torch.device) -> Optional[float]:
    """The spec sheet's dense bf16 FLOP/s of this GPU, if it is one we know; else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to train.lr, then cosine decay to train.lr * train.min_lr_ratio (step from 0)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def autocast_context(cfg: Config, device: torch.device):
    if cfg.train.dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_model_on_meta(cfg: Config) -> Transformer:
    """Every expert, no storage, no groups: what the config describes, for shape checks."""
    with torch.device("meta"):
        return Transformer(cfg.model, cfg.moe)


def build_model(cfg: Config, layout: Layout) -> Transformer:
    """Built on the meta device with no process groups, then sharded, materialised and initialised."""
    return parallelize(full_model_on_meta(cfg), layout, cfg.train.seed, cfg.parallel.debug_splits)


@dataclass
class Trainer:
    """What a step needs; built once by `build_trainer`."""

    cfg: Config
    layout: Layout
    model: Transformer
    engine: Engine  # native (GradSync + AdamW) or DeepSpeed: backward, gradient reduction, update

    @property
    def grad_sync(self) -> GradSync:
        return self.engine.grad_sync


def build_trainer(cfg: Config, layout: Layout) -> Trainer:
    model = build_model(cfg, layout)
    engine = build_engine(cfg, model, layout)
    check_replicas_identical(model, engine.grad_sync.expert, layout.world_group, layout.expert_dp_group)
    return Trainer(cfg, layout, model, engine)


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


def eval_batch_count(cfg: Config, batches: TokenBatches) -> int:
    """`train.eval_batches`, or for 0 every window of the split once (at least one batch)."""
    return cfg.train.eval_batches or max(1, batches.num_windows // batches.global_batch)


@torch.no_grad()
def evaluate(model: Transformer, cfg: Config, layout: Layout, batches: TokenBatches) -> float:
    """LM loss over `eval_batch_count` global validation batches, weighted by token; every rank takes part."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=layout.device)  # summed cross-entropy, scored tokens
    for index in range(eval_batch_count(cfg, batches)):
        inputs, targets = (t.to(layout.device) for t in batches.batch(index))
        with autocast_context(cfg, layout.device):
            ce_sum = model(inputs, targets, lm_tokens=1.0).lm_loss
        sums += torch.stack([ce_sum.double(), (targets != -100).sum().double()])
    model.train()
    all_reduce_sum_(sums, layout.world_group, "evaluation", "all_reduce of validation losses")
    return (sums[0] / sums[1].clamp(min=1)).item()


def checkpoint_to_resume(cfg: Config, run_dir: Path, warn=lambda line: print0(True, line)) -> Optional[Found]:
    """The checkpoint this run continues from, or None for a fresh run; changes nothing (also
    used by `check`). Damaged checkpoints are skipped with a warning; a model that does not fit
    the config, or metrics with nothing to resume, is a one-line error."""
    found = latest_checkpoint(run_dir, warn)
    if found is None:
        if (run_dir / METRICS_FILE).exists():
            raise holds_a_run_without_checkpoint(run_dir)
        return None
    check_model_shapes(found, expected_model_shapes(lambda: full_model_on_meta(cfg)))
    return found


def prepare_resume(run_dir: Path, found: Found) -> None:
    """Rank 0, once the checkpoint is known to fit: drop dead saves and the metrics lines a
    dead run wrote after the checkpoint, so every step is logged once."""
    try:
        remove_dead_saves(run_dir)
        truncate_metrics(run_dir, found.step)
    except OSError as e:
        raise RunDirError(f"run.dir: {run_dir} cannot be prepared for resuming: {e.strerror or e}") from None


def start(cfg: Config) -> tuple[Layout, Corpus, Optional[RunDirLock], Optional[Found]]:
    """Lock run.dir and pick the checkpoint to resume (rank 0), load the corpus, join the world
    and agree, then build the layout."""
    device = pick_device(cfg.train.device)
    is_main = env_rank() == 0
    problem, lock, corpus, found = None, None, None, None
    if is_main:
        try:
            lock = RunDirLock(Path(cfg.run.dir)).acquire()
            found = checkpoint_to_resume(cfg, Path(cfg.run.dir))
            if found is not None:
                prepare_resume(Path(cfg.run.dir), found)
        except (RunDirError, CheckpointError) as e:
            problem = str(e)
    if problem is None:
        try:
            corpus = load_corpus(cfg.data, Path(cfg.run.dir), cfg.parallel.timeout_s)
            check_corpus(corpus, cfg.model.vocab_size, cfg.model.seq_len)
        except DataError as e:
            problem = str(e)
    world_group = init_world(cfg.parallel, device)
    try:
        report = StartReport(flat_config(cfg), corpus.fingerprint if corpus else None, problem)
        require_agreement(report, world_group)
        found = broadcast_found(found, world_group)
        return make_layout(cfg.parallel, device), corpus, lock, found
    except BaseException:
        if lock is not None:
            lock.release()
        shutdown()
        raise


def train(cfg: Config) -> dict:
    """Run training as configured, resuming from run.dir's latest checkpoint if it has one;
    returns the last logged metrics (on every rank)."""
    layout, corpus, lock, found = start(cfg)
    run_dir = Path(cfg.run.dir)
    ended_normally = False
    try:
        with console_log(run_dir / "train.log" if layout.is_main else None):  # rank 0 holds the run.dir lock
            last = _train(cfg, layout, corpus, run_dir, found)
        ended_normally = True
        return last
    finally:
        shutdown(all_ranks_here=ended_normally, timeout_s=cfg.parallel.timeout_s)
        if lock is not None:
            lock.release()


def _describe_changes(found: Found, cfg: Config) -> Optional[str]:
    """Settings that differ from the checkpoint's run, other than the layout and the step count."""
    try:
        old = flat_config(config_of(found))
    except CheckpointError as e:
        return f"note: {e}"
    new = flat_config(cfg)
    ignored = ("parallel.", "train.steps", "train.stop_at", "train.device", "run.")  # layout, length, machine
    changed = [f"{k} ({old[k]} -> {v})" for k, v in new.items()
               if k in old and old[k] != v and not k.startswith(ignored)]
    return "changed since the checkpoint: " + ", ".join(changed) if changed else None


def _resume(tr: Trainer, found: Optional[Found], corpus: Corpus) -> TrainState:
    """Load `found` (if any) into the trainer and say where the run continues from."""
    cfg, layout = tr.cfg, tr.layout
    if found is None:
        if cfg.init.from_hf is not None:  # a fresh run starts from a Hugging Face Mixtral checkpoint
            from .hf_mixtral import init_from_hf
            print0(layout.is_main, init_from_hf(tr.model, cfg.init.from_hf, cfg))
            tr.engine.loaded(tr.engine.optimizer_state(for_loading=True))  # the engine's copies (ZeRO) follow
        return TrainState()
    if cfg.init.from_hf is not None:
        print0(layout.is_main, f"init.from_hf={cfg.init.from_hf} is ignored: run.dir holds a checkpoint, resume wins")
    started = time.perf_counter()
    optimizer_state = tr.engine.optimizer_state(for_loading=True)
    state = load_checkpoint(found, tr.model, optimizer_state, layout)
    tr.engine.loaded(optimizer_state)
    print0(layout.is_main, f"resuming from {found.path} (step {state.step}), saved with {found.layout}; "
                           f"now world {layout.world_size}, ep {layout.ep} (loaded in {time.perf_counter() - started:.1f}s)")
    changes = _describe_changes(found, cfg)
    if changes:
        print0(layout.is_main, changes)
    if found.data_fingerprint not in (None, corpus.fingerprint):
        print0(layout.is_main, f"data differs from the checkpoint's (fingerprint {found.data_fingerprint} -> "
                               f"{corpus.fingerprint}): training continues on the new corpus")
    return state


def _train(cfg: Config, layout: Layout, corpus: Corpus, run_dir: Path, found: Optional[Found]) -> dict:
    t, S = cfg.train, cfg.model.seq_len
    tr = build_trainer(cfg, layout)
    state = _resume(tr, found, corpus)
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
    n_params = sum(p.numel() for p in tr.model.parameters())
    n_expert = sum(p.numel() for p in tr.grad_sync.expert)
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
                           + (f" ZeRO-{t.zero_stage}" if t.engine == "deepspeed" else ""))

    def checkpoint(step: int) -> Path:
        done = TrainState(step, train_batches.position_of(step), state.skipped_steps)
        meta = {"config": to_dict(cfg), "data_fingerprint": corpus.fingerprint}
        started = time.perf_counter()
        path = save_checkpoint(run_dir, done, tr.model, tr.engine.optimizer_state(), layout, meta, cfg.ckpt.keep)
        print0(layout.is_main, f"step {step}: checkpoint {path} ({time.perf_counter() - started:.1f}s)")
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
                if record is not None:
                    tracker.log(record)
                    last = {**last, **record}
                bar.update(1)
                stop_here = step == t.stop_at
                if result.stop or stop_here or step == t.steps or (cfg.ckpt.every > 0 and step % cfg.ckpt.every == 0):
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

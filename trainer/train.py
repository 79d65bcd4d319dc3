"""The training loop: config -> layout -> model -> data -> steps (forward, backward, sync, clip, step) -> eval.

Read top to bottom. One optimizer step consumes `train.batch_size` sequences in total,
split evenly over the ranks and, on each rank, over `train.grad_accum` micro-batches.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .config import Config, save_config, to_dict
from .data import TokenBatches, load_corpus
from .dist import Layout, init_distributed, pick_device, shutdown
from .grad_sync import GradSync
from .model import ModelOutput, Transformer
from .moe.collectives import CollectiveError
from .tracking import METRICS_FILE, Tracker, print0, progress_bar

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, per GPU


class RunDirError(ValueError):
    """`run.dir` cannot be used for this run; the message says why."""


def prepare_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.run.dir)
    if (run_dir / METRICS_FILE).exists():
        raise RunDirError(f"run.dir: {run_dir} already holds a run ({METRICS_FILE} exists) and resuming from "
                          "checkpoints is not implemented yet; choose a new run.dir or remove the old one")
    return run_dir


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to train.lr, then cosine decay to train.lr * train.min_lr_ratio (step from 0)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.train.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2))


def world_mean(values: list[float], layout: Layout) -> list[float]:
    """Mean over all ranks of a few scalars, in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=layout.device)
    if layout.world_group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=layout.world_group)
        t /= layout.world_size
    return t.tolist()


def autocast_context(cfg: Config, device: torch.device):
    if cfg.train.dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: Transformer, batches: TokenBatches, cfg: Config, layout: Layout) -> float:
    """Mean LM loss over `train.eval_batches` global validation batches; every rank takes part."""
    model.eval()
    total = 0.0
    for index in range(cfg.train.eval_batches):
        inputs, targets = (t.to(layout.device) for t in batches.batch(index))
        with autocast_context(cfg, layout.device):
            total += model(inputs, targets).lm_loss.item()
    model.train()
    return world_mean([total / cfg.train.eval_batches], layout)[0]


class StepStats:
    """Sums over the micro-batches of one optimizer step, kept on the device until read."""

    def __init__(self, device: torch.device):
        self.losses = torch.zeros(4, dtype=torch.float64, device=device)  # loss, lm, aux, z
        self.dropped = torch.zeros((), dtype=torch.float64, device=device)
        self.routes = torch.zeros((), dtype=torch.float64, device=device)
        self.load_max = torch.zeros((), dtype=torch.float64, device=device)  # busiest / mean, worst layer

    def add(self, out: ModelOutput, micro_batches: int) -> None:
        self.losses += torch.stack([out.loss, out.lm_loss, out.aux_loss, out.z_loss]).detach().double() / micro_batches
        for s in out.moe_stats:
            self.dropped += s.dropped
            self.routes += s.routes
            load = s.routed_E.double()
            self.load_max = torch.maximum(self.load_max, load.max() / load.mean().clamp(min=1e-9))

    def read(self) -> tuple[list[float], float, float]:
        """([loss, lm, aux, z] of this rank, dropped fraction, worst load ratio) in one device-to-host copy."""
        dropped_frac = self.dropped / self.routes.clamp(min=1)
        host = torch.cat([self.losses, torch.stack([dropped_frac, self.load_max])]).tolist()
        return host[:4], host[4], host[5]


def train(cfg: Config) -> dict:
    """Run training as configured; returns the last logged metrics (on every rank)."""
    run_dir = prepare_run_dir(cfg)
    device = pick_device(cfg.train.device)
    layout = init_distributed(cfg.parallel, device)
    try:
        return _train(cfg, layout, run_dir)
    finally:
        shutdown()


def _train(cfg: Config, layout: Layout, run_dir: Path) -> dict:
    t = cfg.train
    if layout.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    torch.manual_seed(t.seed)
    model = Transformer(cfg.model, cfg.moe, layout.ep_group, layout.world_group, cfg.parallel.debug_splits)
    model.init_weights(t.seed)
    model.to(layout.device)
    optimizer = build_optimizer(model, cfg)
    grad_sync = GradSync(model, layout)

    corpus = load_corpus(cfg.data)
    S = cfg.model.seq_len
    train_batches = TokenBatches(corpus.train, S, t.batch_size, layout.rank, layout.world_size, t.seed, True, "train")
    val_batches = TokenBatches(corpus.val, S, t.batch_size, layout.rank, layout.world_size, t.seed, False, "val")
    micro = t.batch_size // layout.world_size // t.grad_accum

    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for p in grad_sync.expert)
    print0(layout.is_main, f"data: {corpus.description}")
    print0(layout.is_main, f"model: {cfg.model.n_layers} layers, {len(model.moe_layers)} MoE, "
                           f"{cfg.moe.num_experts} experts top-{cfg.moe.top_k}; this rank holds "
                           f"{n_params / 1e6:.2f}M params ({n_expert / 1e6:.2f}M expert)")
    print0(layout.is_main, f"layout: world {layout.world_size}, ep {layout.ep}, {layout.num_replicas} expert "
                           f"replica(s), device {layout.device}, batch {t.batch_size} x {S} tokens "
                           f"({micro} per micro-batch x {t.grad_accum} per rank)")

    tracker = Tracker(run_dir, layout.is_main, cfg.run.tracker, cfg.run.wandb_project, cfg.run.name, to_dict(cfg))
    bar = progress_bar(t.steps, 0, layout.is_main and cfg.run.progress)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items()
                 if layout.device.type == "cuda" and k in torch.cuda.get_device_name(layout.device)), None)
    tokens_per_step = t.batch_size * S
    last: dict = {}
    window_time, window_steps = 0.0, 0
    start = time.perf_counter()
    step = 0
    try:
        for step in range(1, t.steps + 1):
            step_start = time.perf_counter()
            lr = lr_at(step - 1, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr

            inputs, targets = train_batches.batch(step - 1)
            stats = StepStats(layout.device)
            for m in range(t.grad_accum):
                rows = slice(m * micro, (m + 1) * micro)
                with autocast_context(cfg, layout.device):
                    out = model(inputs[rows].to(layout.device), targets[rows].to(layout.device))
                (out.loss / t.grad_accum).backward()
                stats.add(out, t.grad_accum)

            grad_sync.reduce()
            grad_norm = grad_sync.clip_(t.grad_clip).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if layout.device.type == "cuda":
                torch.cuda.synchronize(layout.device)
            window_time += time.perf_counter() - step_start
            window_steps += 1

            is_log = step % cfg.run.log_every == 0 or step == t.steps
            is_eval = step == t.steps or (t.eval_every > 0 and step % t.eval_every == 0)
            if is_log:
                local_losses, dropped_frac, load_max = stats.read()
                loss, lm, aux, z = world_mean(local_losses, layout)
                tokens_per_s = tokens_per_step * window_steps / window_time
                last = {"step": step, "loss": loss, "lm_loss": lm, "aux_loss": aux, "z_loss": z,
                        "grad_norm": grad_norm, "lr": lr, "tokens_per_s": tokens_per_s,
                        "dropped_frac": dropped_frac, "expert_load_max": load_max,
                        "epoch": train_batches.epoch_of(step), "elapsed_s": time.perf_counter() - start}
                if peak is not None:
                    last["mfu"] = model.flops_per_token() * tokens_per_s / (peak * layout.world_size)
                window_time, window_steps = 0.0, 0
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
            if is_eval:
                last = dict(last, step=step, val_loss=evaluate(model, val_batches, cfg, layout))
                print0(layout.is_main, f"step {step}: val_loss {last['val_loss']:.4f}")
            if is_log or is_eval:
                tracker.log(last)
            bar.update(1)
    except CollectiveError as e:
        raise CollectiveError(f"step {step}: {e}") from e
    finally:
        bar.close()
        tracker.close()

    elapsed = time.perf_counter() - start
    print0(layout.is_main, f"done: {t.steps} steps in {elapsed:.1f}s, loss {last.get('loss', float('nan')):.4f}, "
                           f"val_loss {last.get('val_loss', float('nan')):.4f}, "
                           f"{tokens_per_step * t.steps / elapsed:.0f} tokens/s (incl. eval)")
    return last

"""Whole training steps of configs for `python -m trainer bench --config A --config B ...`:
each config's trainer built as `train` builds it, their steps timed in alternating rounds, the
ratio to the first config, MFU, memory held against the plan, and (`--profile`) where the time goes."""

from __future__ import annotations

import shlex
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .measure import DTYPES, activation_bytes, matmul_peak_flops, max_over_ranks, mean_over_ranks, timed


@dataclass
class StepCase:
    """One config's trainer and batches, ready to time training steps."""

    name: str
    cfg: object
    layout: object
    tr: object
    batches: object
    next_step: int = 0

    def step(self) -> None:
        from ..build import lr_at
        from ..train import train_step

        inputs, targets = self.batches.batch(self.next_step)
        train_step(self.tr, inputs, targets, lr_at(self.next_step, self.cfg))
        self.next_step += 1

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.model.seq_len


def config_argument(value: str, shared_overrides: list[str]) -> tuple[str, list[str]]:
    """`--config "PATH key=value ..."`: the path, then its own overrides after the shared ones."""
    path, *own = shlex.split(value)
    return path, [*shared_overrides, *own]


def build_step_case(config: str, overrides: list[str], device: torch.device, group) -> StepCase:
    """A config's trainer as `train` builds it (no run.dir is touched)."""
    from ..build import build_trainer
    from ..config import load_config
    from ..config_validation import validate
    from ..data import TokenBatches, check_corpus, load_corpus
    from ..parallel.dist import make_layout
    from ..run.preflight import preflight

    world = 1 if group is None else dist.get_world_size(group)
    cfg = load_config(config, [*overrides, f"train.device={device.type}",
                               f"parallel.backend={'nccl' if device.type == 'cuda' else 'gloo'}"])
    validate(cfg, world)
    preflight(cfg, world)
    layout = make_layout(cfg.parallel, device)
    corpus = load_corpus(cfg.data)
    check_corpus(corpus, cfg.model.vocab_size, cfg.model.seq_len)
    tr = build_trainer(cfg, layout)
    t = cfg.train
    batches = TokenBatches(corpus.train, cfg.model.seq_len, t.batch_size, layout.rank, world, t.seed, True, "train")
    name = f"step:{config}" + (f" {' '.join(overrides)}" if overrides else "")
    return StepCase(name, cfg, layout, tr, batches)


def run_step_cases(configs: list[tuple[str, list[str]]], steps: int, warmup: int, rounds: int, profile: bool,
                   device: torch.device, group) -> list[dict]:
    """Whole training steps of each config, timed in alternating rounds (so drift in the machine's
    speed hits every config alike); `ratio` is each config's tokens/s over the first one's."""
    cases = [build_step_case(path, overrides, device, group) for path, overrides in configs]
    for case in cases:
        for _ in range(warmup):
            case.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds: list[list[float]] = [[] for _ in cases]
    for _ in range(rounds):
        for case, times in zip(cases, seconds):
            times.append(timed(case.step, steps, device, group))
    peaks = {dtype: matmul_peak_flops(DTYPES[dtype], device, group) for dtype in sorted({c.cfg.train.dtype for c in cases})}
    records = [step_record(case, statistics.median(times), times, peaks, device, group)
               for case, times in zip(cases, seconds)]
    for record in records:
        record["ratio"] = round(record["tokens_per_s"] / records[0]["tokens_per_s"], 4)
    if profile:
        from .stage_timing import synchronize
        from .step_profile import profile_steps

        for case, record in zip(cases, records):
            def profiled_step(case=case) -> None:
                case.step()
                synchronize(device)
            split = profile_steps(profiled_step, steps, case.tr.model, case.tr.engine)
            # the mean over ranks, and the busiest rank's: experts that differ between ranks are
            # routing imbalance, which the other ranks spend waiting in all_to_all
            mean = mean_over_ranks(list(split.values()), group, device)
            most = [max_over_ranks(v, group, device) for v in split.values()]
            record["profile_ms"] = {k: round(v, 2) for k, v in zip(split, mean)}
            record["profile_max_ms"] = {k: round(v, 2) for k, v in zip(split, most)}
    return records


def step_record(case: StepCase, seconds: float, rounds_s: list[float], peaks: dict, device, group) -> dict:
    from ..build import spec_peak_bf16_flops

    cfg, tr, t = case.cfg, case.tr, case.cfg.train
    world = 1 if group is None else dist.get_world_size(group)
    tokens_per_s = case.tokens_per_step / seconds
    flops_per_token = tr.model.flops_per_token()
    peak, spec = peaks[t.dtype], spec_peak_bf16_flops(device)
    return {
        "case": case.name,
        "dtype": t.dtype,
        "ranks": world,
        "ep": cfg.parallel.ep,
        "tokens_per_s": round(tokens_per_s, 1),
        "rounds_tokens_per_s": [round(case.tokens_per_step / s, 1) for s in rounds_s],
        "step_ms": round(1e3 * seconds, 2),
        "flops_per_token": flops_per_token,
        "matmul_peak_tflops": round(peak / 1e12, 4),
        "mfu": round(flops_per_token * tokens_per_s / (peak * world), 4),
        "mfu_spec": round(flops_per_token * tokens_per_s / (spec * world), 4) if spec and t.dtype == "bf16" else None,
        "peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "params": sum(p.numel() for p in tr.model.parameters()),
        "engine": t.engine,
        "activation_checkpointing": t.activation_checkpointing,
        "compile": t.compile,
        **_memory_record(tr, cfg, case.layout, case.batches),
    }


def _memory_record(tr, cfg, layout, batches) -> dict:
    """This rank's parameter + optimizer bytes as held (and as planned), and one micro-batch's saved
    activations as measured (not under FSDP, whose gathered weights would count) and as planned."""
    from ..parallel.activation_checkpointing import checkpointed_modules
    from ..parallel.memory import measured_bytes, memory_plan

    held = measured_bytes(tr.model, tr.engine.optimizer) if hasattr(tr.engine, "optimizer") else None
    planned = memory_plan(tr.model, cfg, layout)
    record = {
        "param_optimizer_mb": round((held["param_bytes"] + held["optimizer_bytes"]) / 2**20, 2) if held else None,
        "planned_param_optimizer_mb": round((planned["param_bytes"] + planned["optimizer_bytes"]) / 2**20, 2),
        "activation_mb": None,
        "planned_activation_mb": round(planned["activation_bytes"] / 2**20, 2),
    }
    if cfg.train.engine != "fsdp":
        inputs, targets = batches.batch(0)
        micro = inputs.shape[0] // cfg.train.grad_accum
        inputs, targets = inputs[:micro].to(layout.device), targets[:micro].to(layout.device)
        skip = list(tr.model.parameters()) + list(tr.model.buffers())
        saved = activation_bytes(lambda: tr.model(inputs, targets).loss, skip,
                                 checkpointed_modules(tr.model, cfg.train.activation_checkpointing))
        record["activation_mb"] = round(saved / 2**20, 2)
    return record

"""`python -m trainer bench`: MoE layer and training-step throughput against references
measured in the same run, one JSON line per case on stdout.

Layer cases (`--preset`): forward+backward of one MoE layer on T tokens per rank, and, in
the same run, alternating with it, the dense SwiGLU FFN with the same active FLOPs
(hidden size top_k * d_ff) on the same tokens: `ratio` = MoE tokens/s over dense tokens/s.
Each case also reports the time split by stage (`trainer.tools.stage_timing`), the expert
matmuls' FLOP rate against this machine's matmul peak (measured here, per dtype, with the
same threads per rank), activation memory (bytes saved for backward) and peak device memory.

Step cases (`--config CONFIG [key=value ...]`): whole training steps of a config: tokens/s,
model FLOPs utilisation against the measured matmul peak, and against the spec sheet
(989 TFLOP/s bf16 on H100/H200) on a known GPU.

Run it alone (one process) or under torchrun (the MoE layer's experts sharded over all
ranks, ep = world size); on CPU torchrun gives each rank OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config import ParallelConfig
from ..moe.collectives import group_rank
from ..moe.experts import SharedExperts, default_init_std, expert_impl_used
from ..moe.layer import MoE
from ..parallel.dist import init_world, pick_device, shutdown
from ..run.preflight import cpu_bf16_matrix_instructions
from .bench_peer import deepspeed_layer, peer_d_ff, peer_problem
from .stage_timing import STAGES, StageClock, staged_forward_backward, synchronize

AUX_COEF, Z_COEF = 0.01, 0.001
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LayerCase:
    dtype: str
    num_experts: int
    capacity_factor: Optional[float]  # None = dropless
    d_model: int
    d_ff: int
    top_k: int
    tokens: int  # per rank

    @property
    def name(self) -> str:
        capacity = "dropless" if self.capacity_factor is None else f"cap{self.capacity_factor:g}"
        return f"{self.dtype}-E{self.num_experts}-{capacity}-d{self.d_model}-f{self.d_ff}-k{self.top_k}-t{self.tokens}"


def _cases(dtypes, experts, capacities, d_model, d_ff, top_k, tokens) -> list[LayerCase]:
    return [LayerCase(dt, e, cf, d_model, d_ff, top_k, tokens)
            for dt in dtypes for cf in capacities for e in experts if cf is None or e == experts[0]]


PRESETS: dict[str, list[LayerCase]] = {
    # the reference shape: fp32 and bf16, dropless and capacity 1.25, 8 / 64 / 256 experts
    "reference": _cases(("fp32", "bf16"), (8, 64, 256), (None, 1.25), 256, 1024, 2, 4096),
    # a GPU-sized layer (bf16 only): d_model 2048, 16k tokens per rank
    "gpu": _cases(("bf16",), (8, 64), (None, 1.25), 2048, 2048, 2, 16384),
    # seconds on a laptop: for trying the command and for the test suite
    "quick": _cases(("fp32",), (8, 32), (None, 1.25), 64, 128, 2, 512),
}


# ---------------------------------------------------------------------------- environment

def max_over_ranks(value: float, group, device) -> float:
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def mean_over_ranks(values: list[float], group, device) -> list[float]:
    if group is None:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return (t / dist.get_world_size(group)).tolist()


def timed(fn: Callable[[], None], iters: int, device: torch.device, group) -> float:
    """Seconds per call of `fn`, the slowest rank's (every rank waits for it anyway)."""
    if group is not None:
        dist.barrier(group)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return max_over_ranks((time.perf_counter() - start) / iters, group, device)


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, group, extra_shapes=()) -> float:
    """The best matmul FLOP/s of this machine in `dtype` with this rank's threads, all ranks at
    once (as in the cases): square shapes and the dense reference's own, the best of them."""
    sizes = (1024, 2048) if device.type == "cpu" else (4096, 8192)
    shapes = [(n, n, n) for n in sizes] + list(extra_shapes)
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        flops = 2.0 * m * k * n
        iters = max(2, min(50, int(2e10 / flops) if device.type == "cpu" else int(2e13 / flops)))
        a @ b  # warm-up
        for _ in range(3):  # the best of three: a peak, not an average over a noisy machine
            best = max(best, flops / timed(lambda: a @ b, iters, device, group))
    return best


def activation_bytes(fn: Callable[[], torch.Tensor], params, checkpointed: Iterable[nn.Module] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward during `fn`, parameters (and other
    tensors in `params`, e.g. buffers) left out: the activation memory. The inputs of `checkpointed`
    modules count too: activation checkpointing keeps them outside autograd's saved tensors."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            storages[ptr] = t.untyped_storage().nbytes()

    def pack(t: torch.Tensor):
        keep(t)
        return t

    def held(module, args):
        for a in args:
            if isinstance(a, torch.Tensor) and torch.is_grad_enabled():
                keep(a)

    hooks = [m.register_forward_pre_hook(held) for m in checkpointed]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        for hook in hooks:
            hook.remove()
    return sum(storages.values())


# ---------------------------------------------------------------------------- layer cases

def build_pair(case: LayerCase, device: torch.device, group, impl: str, seed: int = 0):
    """(MoE layer with its experts sharded over `group`, dense SwiGLU with the same active FLOPs)."""
    with torch.device("meta"):
        layer = MoE(case.d_model, case.d_ff, case.num_experts, case.top_k, case.capacity_factor,
                    expert_impl=impl)
        dense = SharedExperts(case.top_k, case.d_model, case.d_ff)
    layer.apply_expert_parallel(group, group)
    layer.to_empty(device=device)
    dense.to_empty(device=device)
    layer.init_weights(seed)
    dense.init_weights(seed, 0, *default_init_std(case.d_model, 1))  # as the MoE layer's own init
    return layer, dense


def run_layer_case(case: LayerCase, device: torch.device, group, iters: int, rounds: int, impl: str,
                   peaks: dict, peer: Optional[str] = None) -> dict:
    layer, dense = build_pair(case, device, group, impl)
    peer_skipped = peer_problem(case.top_k) if peer else None
    peer_layer = None
    if peer and not peer_skipped:
        peer_layer = deepspeed_layer(case.d_model, case.d_ff, case.num_experts, case.top_k, case.capacity_factor,
                                     group, device)
    rank = group_rank(group)
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    x_TD = torch.randn(case.tokens, case.d_model, device=device, generator=gen)
    grad_TD = torch.randn(case.tokens, case.d_model, device=device, generator=gen)
    autocast_dtype = DTYPES[case.dtype] if case.dtype != "fp32" else None

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)

    def moe_forward() -> torch.Tensor:
        x = x_TD.detach().requires_grad_()
        with autocast():
            out = layer(x)
        return (out.out.float() * grad_TD).sum() + AUX_COEF * out.aux_loss + Z_COEF * out.z_loss

    def dense_forward() -> torch.Tensor:
        x = x_TD.detach().requires_grad_()
        with autocast():
            y = dense(x)
        return (y.float() * grad_TD).sum()

    def peer_forward() -> torch.Tensor:
        x = x_TD.detach().requires_grad_()
        with autocast():
            y, l_aux, _ = peer_layer(x)
        return (y.float() * grad_TD).sum() + AUX_COEF * l_aux

    def step(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            forward().backward()
            for p in (*layer.parameters(), *dense.parameters(), *(peer_layer.parameters() if peer_layer else ())):
                p.grad = None
        return run

    moe_step, dense_step, peer_step = step(moe_forward), step(dense_forward), step(peer_forward)
    moe_step(), dense_step()  # warm-up
    if peer_layer is not None:
        peer_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    moe_s, dense_s, peer_s = [], [], []
    for _ in range(rounds):  # alternate, so drift in the machine's speed hits all alike
        moe_s.append(timed(moe_step, iters, device, group))
        dense_s.append(timed(dense_step, iters, device, group))
        if peer_layer is not None:
            peer_s.append(timed(peer_step, iters, device, group))
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    clock = StageClock(device)
    rows = 0
    for _ in range(iters):
        _, _, rows = staged_forward_backward(layer, x_TD, grad_TD, AUX_COEF, Z_COEF, clock, autocast_dtype)
    split = dict(zip(STAGES, mean_over_ranks([clock.ms[s] / iters for s in STAGES], group, device)))
    expert_flops = 3 * 2 * 3 * rows * case.d_model * case.d_ff  # fwd + 2x bwd, three matmuls per row
    expert_rate = mean_over_ranks([expert_flops / max(clock.ms["experts"] / iters / 1e3, 1e-12)], group, device)[0]

    moe_t, dense_t = statistics.median(moe_s), statistics.median(dense_s)
    return {
        "case": case.name,
        "dtype": case.dtype,
        "num_experts": case.num_experts,
        "capacity_factor": case.capacity_factor,
        "ranks": 1 if group is None else dist.get_world_size(group),
        "expert_impl": expert_impl_used(impl, device, DTYPES[case.dtype], case.d_model, case.d_ff),
        "tokens_per_s": round(case.tokens / moe_t, 1),
        "ceiling_tokens_per_s": round(case.tokens / dense_t, 1),
        "ratio": round(dense_t / moe_t, 4),
        "peak_mem_mb": None if peak_mem is None else round(peak_mem, 1),
        "activation_mb": round(activation_bytes(moe_forward, layer.parameters()) / 2**20, 2),
        "ceiling_activation_mb": round(activation_bytes(dense_forward, dense.parameters()) / 2**20, 2),
        "split_ms": {s: round(v, 2) for s, v in split.items()},
        "split_total_ms": round(sum(split.values()), 2),
        "layer_ms": round(1e3 * moe_t, 2),
        "expert_tflops": round(expert_rate / 1e12, 4),
        "matmul_peak_tflops": round(peaks[case.dtype] / 1e12, 4),
        "experts_vs_peak": round(expert_rate / peaks[case.dtype], 4),
        "rounds_tokens_per_s": [round(case.tokens / t, 1) for t in moe_s],
        **_peer_record(peer, peer_skipped, peer_s, moe_t, case),
    }


def _peer_record(peer: Optional[str], skipped: Optional[str], peer_s: list[float], moe_t: float,
                 case: LayerCase) -> dict:
    if not peer:
        return {}
    if skipped:
        return {"peer": peer, "peer_skipped": skipped}
    peer_t = statistics.median(peer_s)
    return {"peer": peer, "peer_d_ff": peer_d_ff(case.d_ff), "peer_tokens_per_s": round(case.tokens / peer_t, 1),
            "vs_peer": round(peer_t / moe_t, 4), "peer_rounds_tokens_per_s": [round(case.tokens / t, 1) for t in peer_s]}


# ---------------------------------------------------------------------------- step cases

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
    from ..config import load_config, validate
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


# ---------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="layer cases: reference (the CPU reference shape), gpu, quick (default: reference, "
                             "unless --config is given)")
    parser.add_argument("--cases", default=None,
                        help="only layer cases whose name contains one of these comma-separated parts, "
                             "e.g. 'bf16,E64'")
    parser.add_argument("--impl", choices=("auto", "loop", "grouped_mm"), default="auto",
                        help="expert implementation (moe.expert_impl; default auto)")
    parser.add_argument("--peer", choices=("deepspeed",), default=None,
                        help="layer cases: also time DeepSpeed's MoE layer (deepspeed.moe.layer.MoE, GELU experts "
                             "1.5x wider: equal FLOPs) on the same tokens, in the same rounds (vs_peer)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per round (default 5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds (MoE/dense layer, or the --config steps); median (default 3)")
    parser.add_argument("--config", action="append", default=None, metavar="CONFIG",
                        help="time whole training steps of this config; repeat it to compare configs, timed in "
                             "alternating rounds with the ratio to the first; \"CONFIG key=value ...\" gives "
                             "one config its own overrides (after the shared ones)")
    parser.add_argument("--profile", action="store_true",
                        help="with --config: also profile the steps and report where the time goes (profile_ms)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first (default 3)")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")


def run(args, overrides: list[str]) -> int:
    device = pick_device("auto")
    group = init_world(ParallelConfig(), device)  # torchrun's world (gloo on CPU, NCCL on CUDA); None alone
    is_main = group is None or dist.get_rank() == 0
    out = open(args.out, "a") if args.out and is_main else None
    finished = False

    def emit(record: dict) -> None:
        if is_main:
            line = json.dumps(record)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()

    try:
        if is_main and device.type == "cpu":
            found = cpu_bf16_matrix_instructions()
            print(f"bench: {torch.get_num_threads()} thread(s) per rank; bf16 matrix instructions: "
                  f"{', '.join(found) if found else 'none (bf16 is emulated, expect it slower than fp32)'}",
                  file=sys.stderr)
        if args.preset or not args.config:
            cases = PRESETS[args.preset or "reference"]
            if args.cases:
                parts = args.cases.split(",")
                cases = [c for c in cases if any(p in c.name for p in parts)]
            peaks = {}
            for dtype in sorted({c.dtype for c in cases}):
                shapes = {(c.tokens, c.d_model, c.top_k * c.d_ff) for c in cases if c.dtype == dtype}
                peaks[dtype] = matmul_peak_flops(DTYPES[dtype], device, group, shapes)
                emit({"case": f"matmul_peak-{dtype}", "tflops": round(peaks[dtype] / 1e12, 4)})
            for case in cases:
                emit(run_layer_case(case, device, group, args.iters, args.rounds, args.impl, peaks, args.peer))
        if args.config:
            configs = [config_argument(value, overrides) for value in args.config]
            for record in run_step_cases(configs, args.steps, args.warmup, args.rounds, args.profile, device, group):
                emit(record)
        finished = True
    finally:
        if out:
            out.close()
        shutdown(all_ranks_here=finished)
    return 0

"""`python -m trainer bench`: MoE layer and training-step throughput against references
measured in the same run, one JSON line per case on stdout.

Layer cases (`--preset`): forward+backward of one MoE layer on T tokens per rank, and, in
the same run, alternating with it, the dense SwiGLU FFN with the same active FLOPs
(hidden size top_k * d_ff) on the same tokens: `ratio` = MoE tokens/s over dense tokens/s.
Each case also reports the time split by stage (`trainer.tools.stage_timing`), the expert
matmuls' FLOP rate against this machine's matmul peak (measured here, per dtype, with the
same threads per rank), activation memory (bytes saved for backward) and peak device memory.

Step cases (`--config CONFIG [--config CONFIG2 ...] [key=value ...]`): whole training steps of
configs timed alternately, with the ratio to the first (`trainer.tools.bench_steps`). `--peer
deepspeed` times DeepSpeed's own MoE layer beside each layer case (`trainer.tools.bench_peer`).

Run it alone (one process) or under torchrun (the MoE layer's experts sharded over all
ranks, ep = world size); on CPU torchrun gives each rank OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..config import ParallelConfig
from ..moe.collectives import group_rank
from ..moe.experts import SharedExperts, default_init_std, expert_impl_used
from ..moe.layer import MoE
from ..parallel.dist import init_world, pick_device, shutdown
from ..run.preflight import cpu_bf16_matrix_instructions
from .bench_peer import deepspeed_layer, peer_d_ff, peer_problem
from .bench_steps import config_argument, run_step_cases
from .measure import DTYPES, activation_bytes, matmul_peak_flops, mean_over_ranks, timed
from .stage_timing import STAGES, StageClock, staged_forward_backward

AUX_COEF, Z_COEF = 0.01, 0.001


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

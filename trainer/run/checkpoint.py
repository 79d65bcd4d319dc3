"""What a checkpoint holds, independent of the layout that wrote it, saved and loaded with
`torch.distributed.checkpoint` (DCP). The directory around it (names, manifest, atomic
publishing, verification) is `checkpoint_files.py`.

Every entry is a plain tensor (no pickled Python objects), keyed by what it is, not by
who held it:

    model/<name>                         a replicated tensor, saved once (DCP de-duplicates); an FSDP
                                         shard (DTensor) is saved as its part of the logical tensor
    model/<name>/expert_<e>              expert e's slice of a stacked expert weight; e is the
                                         GLOBAL id, so any EP size can find its experts
    optim/<name>[/expert_<e>]/<moment>   each per-parameter optimizer tensor (AdamW's exp_avg and
                                         exp_avg_sq), keyed like its parameter
    optim/<name>/step
    train/step, train/data_position, train/skipped_steps
    rng/rank_<r>/cpu, rng/rank_<r>/cuda

One entry per global expert rather than DTensors sharded over an EP mesh: loading at another
EP size is asking for other ids, nothing needs a DeviceMesh (gloo and NCCL alike), a missing
expert is a missing key, and a later tensor (an expert-bias buffer, say) is one more entry.
"""

from __future__ import annotations

import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.tensor import DTensor

from ..moe.collectives import all_reduce_sum_, named_collective
from ..moe.experts import Experts
from .checkpoint_files import (CHECKPOINTS, FORMAT_VERSION, PARTIAL_PREFIX, CheckpointError, Found, prune, publish,
                               remove_checkpoint, step_dir_name)


@dataclass
class TrainState:
    """Where the loop stands; saved as int64 tensors."""

    step: int = 0
    data_position: int = 0  # training windows consumed so far (step * global batch while it is constant)
    skipped_steps: int = 0


# ----------------------------------------------------------------------------- entries


def _expert_ids_by_name(model: nn.Module) -> dict[str, range]:
    """Full name of every stacked expert tensor -> the global expert ids of its rows."""
    return {f"{prefix}.{name}" if prefix else name: module.global_expert_ids
            for prefix, module in model.named_modules() if isinstance(module, Experts)
            for name, _ in module.named_parameters(recurse=False)}


def _split_by_expert(key: str, tensor_L: torch.Tensor, ids: range, suffix: str = "") -> dict[str, torch.Tensor]:
    """One entry per expert this rank holds. Views, not copies: DCP saves from them and loads into
    them in place. A stacked weight sharded by FSDP over the experts' replicas (a DTensor split on
    its expert dim) holds a run of whole experts: this rank writes (and reads) only those."""
    if isinstance(tensor_L, DTensor):
        first = tensor_L.__create_chunk_list__()[0].offsets[0]  # the shard's first row among the L
        ids, tensor_L = ids[first:first + tensor_L.to_local().shape[0]], tensor_L.to_local()
    return {f"{key}/expert_{e}{suffix}": tensor_L[local] for local, e in enumerate(ids)}


def model_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every persistent tensor of `model`, experts under their global ids (views of the model's own storage)."""
    experts = _expert_ids_by_name(model)
    entries: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        tensor = tensor.detach()
        if name in experts:
            entries.update(_split_by_expert(f"model/{name}", tensor, experts[name]))
        else:
            entries[f"model/{name}"] = tensor
    return entries


def optimizer_entries(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """Each parameter's optimizer state (`optimizer.state[param]`: its `step` and its moments, each
    shaped like the parameter), keyed like the parameter; parameters without state have no entries.
    The engine names the moments and, for loading, gives every parameter zeroed state to fill."""
    experts = _expert_ids_by_name(model)
    entries: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        state = optimizer.state.get(param) or {}
        for moment, tensor in state.items():
            if moment == "step":
                entries[f"optim/{name}/step"] = tensor
            elif name in experts:
                entries.update(_split_by_expert(f"optim/{name}", tensor, experts[name], f"/{moment}"))
            else:
                entries[f"optim/{name}/{moment}"] = tensor
    return entries


def optional_entries(model: nn.Module) -> set[str]:
    """Entries of buffers (expert bias, balance counts, noise step): a checkpoint written before
    one existed still loads, and the buffer keeps its initial value."""
    params = {name for name, _ in model.named_parameters()}
    buffers = {name for name in model.state_dict() if name not in params}
    return {key for key in model_entries(model) if key.split("/")[1] in buffers}


def expected_model_shapes(build_full_model: Callable[[], nn.Module]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(entry -> shape, optional entries) for the model a config describes (`build_full_model`
    builds it on the meta device, ep=1)."""
    model = build_full_model()
    return {key: tuple(t.shape) for key, t in model_entries(model).items()}, optional_entries(model)


def _train_entries(state: TrainState) -> dict[str, torch.Tensor]:
    return {f"train/{k}": torch.tensor(v, dtype=torch.int64) for k, v in vars(state).items()}


def _rng_entries(rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    entries = {f"rng/rank_{rank}/cpu": torch.get_rng_state()}
    if device.type == "cuda":
        entries[f"rng/rank_{rank}/cuda"] = torch.cuda.get_rng_state(device)
    return entries


# ----------------------------------------------------------------------------- save


@contextmanager
def _dcp_errors(what: str) -> Iterator[None]:
    """DCP reports failures as CheckpointException (a BaseException) holding each rank's error:
    turn them into one line naming the first failing rank."""
    try:
        with named_collective("checkpoint", what), warnings.catch_warnings():
            # one process without a process group is our normal single-process run, not a mistake
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    except CheckpointException as e:
        rank, failure = next(iter(e.failures.items()), (None, e))
        error = failure[0] if isinstance(failure, tuple) else failure
        lines = str(error).strip().splitlines() or [type(error).__name__]
        raise CheckpointError(f"{what} failed on rank {rank}: {lines[0]}") from None


def _agree(problem: Optional[str], layout, what: str, fallback: str) -> None:
    """Collective: raise the same CheckpointError on every rank if rank 0 met `problem`."""
    failed = torch.tensor([1.0 if problem else 0.0])
    if layout.world_group is not None:
        all_reduce_sum_(failed, layout.world_group, "checkpoint", what)
    if problem or failed.item() > 0:
        raise CheckpointError(problem or fallback)



def save_checkpoint(run_dir: Path, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer,
                    layout, meta: dict, keep: int) -> Path:
    """Collective over the world: write `checkpoints/step_N` atomically and return its path.

    `layout` is a `trainer.parallel.dist.Layout`; `meta` is what `meta.json` records besides the
    manifest (config, data fingerprint)."""
    root = run_dir / CHECKPOINTS
    final = root / step_dir_name(state.step)
    partial = root / f"{PARTIAL_PREFIX}{final.name}"
    problem = None
    if layout.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # a save of this step that died earlier
            partial.mkdir()
        except OSError as e:
            problem = f"checkpoint {final.name}: {root} cannot be written: {e.strerror or e}"
    # nobody writes before the directory is fresh, and nobody writes if it could not be made
    _agree(problem, layout, "agreeing on the checkpoint directory", f"checkpoint {final.name}: rank 0 could not "
                                                                    "create its directory")

    entries = {**model_entries(model), **optimizer_entries(model, optimizer),
               **_train_entries(state), **_rng_entries(layout.rank, layout.device)}
    with _dcp_errors(f"checkpoint {final.name}: saving"):
        dcp.save(entries, storage_writer=FileSystemWriter(partial, thread_count=1, sync_files=True),
                 process_group=layout.world_group, no_dist=layout.world_group is None)

    # rank 0 publishes; every rank learns whether it worked, so all fail or none does
    if layout.is_main:
        try:
            if final.exists():  # the same step saved before (a damaged copy that resume skipped)
                remove_checkpoint(final)
            publish(partial, final, {"format": FORMAT_VERSION, "step": state.step, "world_size": layout.world_size,
                                     "ep": layout.ep, **meta})
            prune(run_dir, keep, final)
        except OSError as e:
            problem = f"{final}: could not be published: {e.strerror or e}"
    _agree(problem, layout, "agreeing that the save was published",
           f"checkpoint {final.name} could not be published (see rank 0)")
    return final


# ----------------------------------------------------------------------------- load


def load_checkpoint(found: Found, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], layout,
                    restore_rng: bool = True) -> TrainState:
    """Collective over the world (or one process): fill `model` (and `optimizer`) in place.

    Each rank asks for its own experts by global id, whatever layout saved them; RNG states
    are restored (`restore_rng`) only when the world size is the one that saved them."""
    saved = found.shapes
    entries = model_entries(model)
    if optimizer is not None and any(k.startswith("optim/") for k in saved):
        bare = next((name for name, p in model.named_parameters() if not optimizer.state.get(p)), None)
        if bare is not None:  # the engine's job (`optimizer_state(for_loading=True)`): a bug, not bad input
            raise RuntimeError(f"no optimizer state to load {bare!r} into; the engine must give every parameter some")
        entries.update(optimizer_entries(model, optimizer))
    state = _train_entries(TrainState())
    entries.update(state)
    rng = {}
    if restore_rng and found.world_size == layout.world_size:
        rng = {k: v.clone() for k, v in _rng_entries(layout.rank, layout.device).items() if k in saved}
        entries.update(rng)
    for key in optional_entries(model) - set(saved):
        del entries[key]  # a buffer newer than the checkpoint keeps its initial value
    missing = next((k for k in entries if k not in saved), None)
    if missing is not None:
        raise CheckpointError(f"{found.path}: {missing} is not in the checkpoint")
    with _dcp_errors(f"{found.path}: loading"):
        dcp.load(entries, checkpoint_id=found.path, process_group=layout.world_group,
                 no_dist=layout.world_group is None)
    for key, value in rng.items():
        if key.endswith("/cpu"):
            torch.set_rng_state(value)
        else:
            torch.cuda.set_rng_state(value, layout.device)
    return TrainState(**{k.split("/", 1)[1]: int(v) for k, v in state.items()})


def broadcast_found(found: Optional[Found], group: Optional[ProcessGroup]) -> Optional[Found]:
    """Rank 0's choice of checkpoint, on every rank (in memory, between our own processes)."""
    if group is None:
        return found
    box = [found]
    with named_collective("start-up", "broadcast of the checkpoint to resume from"):
        dist.broadcast_object_list(box, src=0, group=group)
    return box[0]

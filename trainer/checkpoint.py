"""Checkpoints on `torch.distributed.checkpoint` (DCP), independent of the layout that wrote them.

On disk, under `run.dir/checkpoints/`:

    step_0000120/            a complete checkpoint (only complete ones carry this name)
        .metadata            DCP's index of every entry (pickled by DCP: see "What is trusted")
        __0_0.distcp, ...    the tensors, written by whichever ranks DCP picked
        meta.json            step, the layout it was saved at, the resolved config, and the
                             size and sha256 of every file above
    .partial-step_0000140/   a save in progress or one that died: never read

Every entry is a plain tensor (no pickled Python objects), keyed by what it is, not by
who held it:

    model/<name>                         a replicated tensor, saved once (DCP de-duplicates)
    model/<name>/expert_<e>              expert e's slice of a stacked expert weight; e is the
                                         GLOBAL id, so any EP size can find its experts
    optim/<name>[/expert_<e>]/exp_avg    AdamW moments, keyed like their parameter
    optim/<name>[/expert_<e>]/exp_avg_sq
    optim/<name>/step
    train/step, train/data_position, train/skipped_steps
    rng/rank_<r>/cpu, rng/rank_<r>/cuda

One entry per global expert rather than DTensors sharded over an EP mesh: loading at another
EP size is asking for other ids, nothing needs a DeviceMesh (gloo and NCCL alike), a missing
expert is a missing key, and a later tensor (an expert-bias buffer, say) is one more entry.

Publishing is atomic: all ranks write into `.partial-step_N`, rank 0 records sizes and
hashes in `meta.json`, then renames the directory. A kill at any moment leaves either the
old set of checkpoints or the old set plus a complete new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter

from .moe.collectives import all_reduce_sum_, named_collective
from .moe.experts import Experts

CHECKPOINTS = "checkpoints"
META_FILE = "meta.json"
FORMAT_VERSION = 1
PARTIAL_PREFIX = ".partial-"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


class CheckpointError(ValueError):
    """A checkpoint cannot be used or written; the message names it."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


@dataclass
class Found:
    """A complete checkpoint whose files match its manifest."""

    path: Path
    step: int
    world_size: int
    ep: int
    config: dict
    data_fingerprint: Optional[str]

    @property
    def layout(self) -> str:
        return f"world {self.world_size}, ep {self.ep}"


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
    # views, not copies: DCP saves from them and loads into them in place
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


def optimizer_entries(model: nn.Module, optimizer: torch.optim.Optimizer, create: bool) -> dict[str, torch.Tensor]:
    """AdamW state keyed like the parameters. `create`: give every parameter zeroed state to load into."""
    experts = _expert_ids_by_name(model)
    entries: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        state = optimizer.state.get(param)
        if not state:
            if not create:
                continue
            state = optimizer.state[param] = {"step": torch.zeros((), dtype=torch.float32),
                                              **{m: torch.zeros_like(param) for m in ADAM_MOMENTS}}
        for moment in ADAM_MOMENTS:
            if name in experts:
                entries.update(_split_by_expert(f"optim/{name}", state[moment], experts[name], f"/{moment}"))
            else:
                entries[f"optim/{name}/{moment}"] = state[moment]
        entries[f"optim/{name}/step"] = state["step"]
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict[str, dict]:
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != META_FILE}


def publish(partial: Path, final: Path, meta: dict) -> None:
    """Rank 0: record the manifest, then make the checkpoint visible with one rename."""
    meta = {**meta, "files": _manifest(partial)}
    with open(partial / META_FILE, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, final)
    _fsync_dir(final.parent)


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every published checkpoint directory, newest first (not yet verified)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def _remove(path: Path) -> None:
    """Rename out of the `step_N` namespace first, so a kill midway never leaves half a
    checkpoint under a complete one's name."""
    doomed = path.with_name(f"{PARTIAL_PREFIX}{path.name}.removed")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_dead_saves(run_dir: Path) -> None:
    """Drop `.partial-*` directories: saves that died, or removals a kill interrupted."""
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(PARTIAL_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def _prune(run_dir: Path, keep: int, newest: Path) -> None:
    """Keep the `keep` newest checkpoints (always `newest`); drop leftovers of dead saves."""
    remove_dead_saves(run_dir)
    for _, path in complete_checkpoints(run_dir)[keep:]:
        if path != newest:
            _remove(path)


def save_checkpoint(run_dir: Path, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer,
                    layout, meta: dict, keep: int) -> Path:
    """Collective over the world: write `checkpoints/step_N` atomically and return its path.

    `layout` is a `trainer.dist.Layout`; `meta` is what `meta.json` records besides the
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

    entries = {**model_entries(model), **optimizer_entries(model, optimizer, create=False),
               **_train_entries(state), **_rng_entries(layout.rank, layout.device)}
    with _dcp_errors(f"checkpoint {final.name}: saving"):
        dcp.save(entries, storage_writer=FileSystemWriter(partial, thread_count=1, sync_files=True),
                 process_group=layout.world_group, no_dist=layout.world_group is None)

    # rank 0 publishes; every rank learns whether it worked, so all fail or none does
    if layout.is_main:
        try:
            if final.exists():  # the same step saved before (a damaged copy that resume skipped)
                _remove(final)
            publish(partial, final, {"format": FORMAT_VERSION, "step": state.step, "world_size": layout.world_size,
                                     "ep": layout.ep, **meta})
            _prune(run_dir, keep, final)
        except OSError as e:
            problem = f"{final}: could not be published: {e.strerror or e}"
    _agree(problem, layout, "agreeing that the save was published",
           f"checkpoint {final.name} could not be published (see rank 0)")
    return final


# ----------------------------------------------------------------------------- find and verify


def verify(path: Path) -> Found:
    """Read `meta.json` and check every file against it; CheckpointError names the first fault."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {META_FILE} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: {META_FILE} is unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    try:
        files = meta["files"]
        if ".metadata" not in files:
            raise CheckpointError(f"{path}: {META_FILE} lists no DCP .metadata file")
        for name, expected in files.items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{path}: {name} is missing")
            size = file.stat().st_size
            if size != expected["bytes"]:
                raise CheckpointError(f"{path}: {name} has {size} bytes, {expected['bytes']} were written")
            if _sha256(file) != expected["sha256"]:
                raise CheckpointError(f"{path}: {name} does not match the sha256 recorded when it was written")
        found = Found(path, int(meta["step"]), int(meta["world_size"]), int(meta["ep"]), dict(meta["config"]),
                      meta.get("data_fingerprint"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read: {e.strerror or e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: {META_FILE} is malformed ({type(e).__name__}: {e})") from None
    named = _STEP_DIR.match(path.name)
    if named and int(named.group(1)) != found.step:
        raise CheckpointError(f"{path}: {META_FILE} says step {found.step}, not the step in its name")
    return found


def latest_checkpoint(run_dir: Path, warn: Callable[[str], None]) -> Optional[Found]:
    """The newest checkpoint that verifies; each damaged newer one is reported through `warn`."""
    for _, path in complete_checkpoints(run_dir):
        try:
            return verify(path)
        except CheckpointError as e:
            warn(f"warning: checkpoint {e}; skipping it for an earlier one")
    return None


def config_of(found: Found):
    """The checkpoint's resolved config as a `Config` of this version of the trainer."""
    from .config import ConfigError, config_from_dict

    try:
        return config_from_dict(found.config)
    except ConfigError as e:
        raise CheckpointError(f"{found.path}: its config does not fit this version of the trainer: {e}") from None


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Entry -> shape, from DCP's metadata file."""
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # whatever unpickling a damaged index raises
        raise CheckpointError(f"{path}: DCP's .metadata cannot be read ({type(e).__name__}: {e})") from None
    return {key: tuple(m.size) for key, m in metadata.state_dict_metadata.items() if hasattr(m, "size")}


def check_model_shapes(found: Found, expected: tuple[dict[str, tuple[int, ...]], set[str]]) -> None:
    """CheckpointError naming the first model tensor that the config and the checkpoint disagree on."""
    shapes, optional = expected
    saved = {k: v for k, v in saved_shapes(found.path).items() if k.startswith("model/")}
    for key, shape in shapes.items():
        if key not in saved and key in optional:
            continue
        if key not in saved:
            raise CheckpointError(f"{found.path}: {key} {list(shape)} is not in the checkpoint (the config describes "
                                  "a model it does not hold)")
        if saved[key] != shape:
            raise CheckpointError(f"{found.path}: {key} has shape {list(saved[key])} in the checkpoint but "
                                  f"{list(shape)} in the model the config describes")
    extra = next((k for k in saved if k not in shapes), None)
    if extra is not None:
        raise CheckpointError(f"{found.path}: {extra} {list(saved[extra])} is in the checkpoint but not in the "
                              "model the config describes")


# ----------------------------------------------------------------------------- load


def load_checkpoint(found: Found, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], layout,
                    restore_rng: bool = True) -> TrainState:
    """Collective over the world (or one process): fill `model` (and `optimizer`) in place.

    Each rank asks for its own experts by global id, whatever layout saved them; RNG states
    are restored (`restore_rng`) only when the world size is the one that saved them."""
    saved = saved_shapes(found.path)
    entries = model_entries(model)
    if optimizer is not None and any(k.startswith("optim/") for k in saved):
        entries.update(optimizer_entries(model, optimizer, create=True))
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

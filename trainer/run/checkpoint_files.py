"""`run.dir/checkpoints/` on disk: names, the manifest, atomic publishing, verification, discovery.

    step_0000120/            a complete checkpoint (only complete ones carry this name)
        .metadata            DCP's index of every entry (pickled by DCP: see the README's "What is trusted")
        __0_0.distcp, ...    the tensors, written by whichever ranks DCP picked
        meta.json            step, the layout it was saved at, the resolved config, and the
                             size and sha256 of every file above
    .partial-step_0000140/   a save in progress or one that died: never read

What the tensors are is `checkpoint.py`'s business; this module knows only files. Publishing
is atomic: all ranks write into `.partial-step_N`, rank 0 records sizes and hashes in
`meta.json`, then renames the directory. A kill at any moment leaves either the old set of
checkpoints or the old set plus a complete new one. A checkpoint is used only once every file
matches its manifest; a damaged one is skipped for the one before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from torch.distributed.checkpoint import FileSystemReader

CHECKPOINTS = "checkpoints"
META_FILE = "meta.json"
FORMAT_VERSION = 1
PARTIAL_PREFIX = ".partial-"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


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
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)  # entry -> shape, from DCP's index

    @property
    def layout(self) -> str:
        return f"world {self.world_size}, ep {self.ep}"


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


def remove_checkpoint(path: Path) -> None:
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


def prune(run_dir: Path, keep: int, newest: Path) -> None:
    """Keep the `keep` newest checkpoints (always `newest`); drop leftovers of dead saves."""
    remove_dead_saves(run_dir)
    for _, path in complete_checkpoints(run_dir)[keep:]:
        if path != newest:
            remove_checkpoint(path)



# ----------------------------------------------------------------------------- find and verify


def verify(path: Path) -> Found:
    """Read `meta.json`, check every file against it and read DCP's index; CheckpointError names the first fault."""
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
    found.shapes = saved_shapes(path)  # DCP's index must load too (a manifest can match a damaged one)
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
    from ..config import ConfigError, config_from_dict

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
    saved = {k: v for k, v in found.shapes.items() if k.startswith("model/")}
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

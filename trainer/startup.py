"""Start-up, before the loop's first step: lock run.dir, choose the checkpoint to resume, load
the corpus, join the world and agree; then load the checkpoint (or `init.from_hf`) into the
built trainer.

Order matters: before the first collective that depends on the config, every rank has
checked the machine (`preflight`, in the CLI), rank 0 holds the run.dir lock, and all ranks
have compared configs and data over the world group (`agreement`). Only then are the EP
groups created and the model materialised.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from .build import Trainer, full_model_on_meta
from .config import Config
from .data import Corpus, DataError, check_corpus, load_corpus
from .launch_env import env_rank
from .parallel.dist import Layout, init_world, make_layout, pick_device, shutdown
from .run.agreement import StartReport, flat_config, require_agreement
from .run.checkpoint import TrainState, broadcast_found, expected_model_shapes, load_checkpoint
from .run.checkpoint_files import (CheckpointError, Found, check_model_shapes, config_of, latest_checkpoint,
                                   remove_dead_saves)
from .run.rundir import RunDirError, RunDirLock, holds_a_run_without_checkpoint
from .run.tracking import METRICS_FILE, MetricsError, print0, truncate_metrics


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
    except MetricsError as e:
        raise RunDirError(f"run.dir: {e}") from None


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



def describe_changes(found: Found, cfg: Config) -> Optional[str]:
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


def resume(tr: Trainer, found: Optional[Found], corpus: Corpus) -> TrainState:
    """Load `found` (if any) into the trainer and say where the run continues from."""
    cfg, layout = tr.cfg, tr.layout
    if found is None:
        if cfg.init.from_hf is not None:  # a fresh run starts from a Hugging Face checkpoint (any family)
            from .interop.hf import init_from_hf

            print0(layout.is_main, init_from_hf(tr.model, cfg.init.from_hf, cfg))
            tr.engine.loaded(None)  # new weights, no optimizer state: the engine's copies (ZeRO) follow
        return TrainState()
    if cfg.init.from_hf is not None:
        print0(layout.is_main, f"init.from_hf={cfg.init.from_hf} is ignored: run.dir holds a checkpoint, resume wins")
    started = time.perf_counter()
    optimizer_state = tr.engine.optimizer_state(for_loading=True)
    state = load_checkpoint(found, tr.model, optimizer_state, layout)
    tr.engine.loaded(optimizer_state)
    print0(layout.is_main, f"resuming from {found.path} (step {state.step}), saved with {found.layout}; "
                           f"now world {layout.world_size}, ep {layout.ep} (loaded in {time.perf_counter() - started:.1f}s)")
    changes = describe_changes(found, cfg)
    if changes:
        print0(layout.is_main, changes)
    if found.data_fingerprint not in (None, corpus.fingerprint):
        print0(layout.is_main, f"data differs from the checkpoint's (fingerprint {found.data_fingerprint} -> "
                               f"{corpus.fingerprint}): training continues on the new corpus")
    return state

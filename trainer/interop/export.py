"""Trained weights outside training: `export` to safetensors, `load_model` in one process, and
the one-process evaluation behind `python -m trainer eval`.

An export directory holds `model.safetensors` (the model's own state dict: experts stacked
`[E, ...]`, as a one-process model holds them), `config.yaml` (the run's resolved config),
`export.json` (which checkpoint it came from) and, for a bpe or pretrained tokenizer, the run's
`tokenizer.json`. Nothing in it is pickled.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..build import build_model, eval_batch_count, evaluate, full_model_on_meta
from ..config import Config, ConfigError, config_from_dict, load_config, save_config, to_dict
from ..model import Transformer
from ..parallel.dist import Layout
from ..run.checkpoint import expected_model_shapes, load_checkpoint
from ..run.checkpoint_files import (META_FILE, CheckpointError, Found, check_model_shapes, config_of, latest_checkpoint,
                                    verify)
from ..run.output_dir import make_output_dir, writing_into

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"
EXPORT_INFO = "export.json"
NATIVE_ENGINE = {"engine": "native", "zero_stage": 0, "deepspeed_config": None}  # train.* for one-process tools


def one_process_layout(device: torch.device) -> Layout:
    return Layout(rank=0, world_size=1, local_rank=0, ep=1, device=device, world_group=None, ep_group=None,
                  expert_dp_group=None)


def _for_one_process(cfg: Config, device: torch.device) -> Config:
    """The run's config as one process on `device` runs it (every expert local)."""
    impl = cfg.moe.expert_impl
    if impl == "grouped_mm" and device.type != "cuda":
        impl = "auto"  # a GPU run's grouped GEMM falls back to the loop here; same numbers
    # the native engine: a DeepSpeed run's weights need neither DeepSpeed nor its JSON to be read
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, expert_impl=impl),
                               parallel=dataclasses.replace(cfg.parallel, ep=1),
                               train=dataclasses.replace(cfg.train, **NATIVE_ENGINE))


def find_checkpoint(path: Path, warn=lambda line: None) -> Found:
    """`path` is a checkpoint directory or a run.dir (its newest checkpoint that verifies)."""
    if (path / META_FILE).is_file():
        return verify(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such run.dir, checkpoint or export")
    found = latest_checkpoint(path, warn)
    if found is None:
        raise CheckpointError(f"{path}: holds no complete checkpoint (and no {EXPORT_WEIGHTS})")
    return found


def load_checkpoint_model(found: Found, cfg: Config, device: torch.device) -> Transformer:
    """A one-process model holding every expert of `found` (a checkpoint of any EP size)."""
    check_model_shapes(found, expected_model_shapes(lambda: full_model_on_meta(cfg)))
    model = build_model(cfg, one_process_layout(device))
    load_checkpoint(found, model, None, one_process_layout(device), restore_rng=False)
    return model


def _load_export(path: Path, device: torch.device) -> tuple[Transformer, Config]:
    try:
        cfg = _for_one_process(load_config(path / EXPORT_CONFIG), device)
    except ConfigError as e:
        raise CheckpointError(f"{path / EXPORT_CONFIG}: {e}") from None
    expected = {name: tuple(t.shape) for name, t in full_model_on_meta(cfg).state_dict().items()}
    with safe_open(path / EXPORT_WEIGHTS, framework="pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    for name, shape in expected.items():
        if saved.get(name) != shape:
            what = f"has shape {list(saved[name])}" if name in saved else "is missing"
            raise CheckpointError(f"{path / EXPORT_WEIGHTS}: {name} {what} but {EXPORT_CONFIG} describes "
                                  f"{list(shape)}")
    extra = next((name for name in saved if name not in expected), None)
    if extra is not None:
        raise CheckpointError(f"{path / EXPORT_WEIGHTS}: {extra} is not in the model {EXPORT_CONFIG} describes")
    model = build_model(cfg, one_process_layout(device))
    model.load_state_dict(load_file(path / EXPORT_WEIGHTS, device=str(device)))
    return model, cfg


def _load(path: Path, device: torch.device, warn) -> tuple[Transformer, Config, Optional[int], str]:
    """(model, its config, the step it was trained to, where it came from) from any PATH kind."""
    if (path / EXPORT_WEIGHTS).is_file():
        model, cfg = _load_export(path, device)
        try:
            step = json.loads((path / EXPORT_INFO).read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            step = None
        return model.eval(), cfg, step, str(path)
    found = find_checkpoint(path, warn)
    cfg = _for_one_process(config_of(found), device)
    return load_checkpoint_model(found, cfg, device).eval(), cfg, found.step, str(found.path)


def load_model(path: str | Path, device: str | torch.device = "cpu", warn=lambda line: None
               ) -> tuple[Transformer, Config]:
    """The trained model and its config, in one process, in eval mode.

    `path` is an export (a directory with `model.safetensors`), a run.dir (its newest complete
    checkpoint) or one checkpoint directory. `model(tokens_BS)` returns an output whose
    `.logits` are `[B, S, vocab]`; tokens are the run's tokenizer's ids (bytes by default)."""
    model, cfg, _, _ = _load(Path(path), torch.device(device), warn)
    return model, cfg


def export(run_dir: str | Path, out_dir: str | Path, warn=lambda line: None) -> tuple[Found, Path]:
    """Write the newest complete checkpoint of `run_dir` (any EP size) as one safetensors file."""
    found = find_checkpoint(Path(run_dir), warn)
    cfg = _for_one_process(config_of(found), torch.device("cpu"))
    out = make_output_dir(out_dir, "export OUT_DIR")  # before the (long) load
    model = load_checkpoint_model(found, cfg, torch.device("cpu"))
    weights = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    info = {"step": found.step, "checkpoint": str(found.path.resolve()), "saved_with": found.layout,
            "parameters": sum(t.numel() for t in weights.values())}
    from ..data import save_tokenizer, saved_tokenizer

    with writing_into(out, "export OUT_DIR"):
        save_file(weights, out / EXPORT_WEIGHTS, metadata={"step": str(found.step), "format": "moe-trainer"})
        save_config(cfg, out / EXPORT_CONFIG)
        (out / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
        # a bpe or pretrained run's tokenizer.json travels with its weights (eval and sample read it there)
        save_tokenizer(saved_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_name, Path(run_dir)), out, replace=True)
    return found, out / EXPORT_WEIGHTS


def eval_checkpoint(path: str | Path, overrides: list[str], warn=lambda line: None) -> dict:
    """Validation loss of a run's newest checkpoint (or an export) in one process, on the
    configured corpus or the one the overrides name (`data.path=...`, `train.eval_batches=...`).
    The device is `auto` (CUDA if present) unless `train.device=` says otherwise."""
    from ..config_validation import validate
    from ..data import TokenBatches, check_corpus, load_corpus, saved_tokenizer
    from ..parallel.dist import pick_device

    fixed = next((o for o in overrides if o.startswith(("model.", "moe."))), None)
    if fixed is not None:
        raise ConfigError(f"{fixed.split('=')[0]}: eval uses the model the checkpoint holds; model.* and moe.* "
                          "keys cannot be overridden")
    fixed = next((o for o in overrides if o.startswith(("data.tokenizer", "data.bpe_vocab_size"))), None)
    if fixed is not None:
        raise ConfigError(f"{fixed.split('=')[0]}: eval reads text with the run's own tokenizer; data.tokenizer, "
                          "data.tokenizer_name and data.bpe_vocab_size cannot be overridden")
    requested = config_from_dict({}, overrides)  # the overrides alone, checked like any
    if requested.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but torch.cuda.is_available() is False")
    device = pick_device(requested.train.device)
    model, trained_cfg, step, source = _load(Path(path), device, warn)
    cfg = _for_one_process(config_from_dict(to_dict(trained_cfg), ["train.device=auto", *overrides]), device)
    validate(cfg, 1)
    tokenizer = saved_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_name, Path(path))  # the run's, not a new one
    corpus = load_corpus(cfg.data, tokenizer=tokenizer)
    check_corpus(corpus, cfg.model.vocab_size, cfg.model.seq_len)
    batches = TokenBatches(corpus.val, cfg.model.seq_len, cfg.train.batch_size, 0, 1, cfg.train.seed, False, "val")
    val_loss = evaluate(model, cfg, one_process_layout(device), batches)
    return {"val_loss": val_loss, "step": step, "source": source, "data": corpus.description,
            "eval_batches": eval_batch_count(cfg, batches), "batch_size": cfg.train.batch_size}

"""The Hugging Face entry points: the family registry, `export --format hf [--hf-arch ...]` and
`init.from_hf`. The mechanism they share (family records, checks, config.json, tensor links) is
`hf_mapping`; each family is a module of its own (`hf_mixtral`, `hf_qwen3_moe`, `hf_olmoe`,
`hf_glm4_moe`), and only this module knows them all, so they import `hf_mapping` and nothing here."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from ..config import Config
from ..model import Transformer
from ..parallel.fsdp import copy_full_
from ..run.checkpoint_files import Found
from .hf_glm4_moe import GLM4_MOE
from .hf_mapping import (HF_ARCHES, HF_CONFIG, HF_GENERATION, HF_INDEX, HF_TOKENIZER_CONFIG, HF_WEIGHTS, Family,
                         HFInteropError, _hf_value, common_checks, config_mismatch, end_of_text_id, hf_config,
                         hf_shapes, links, problem, to_hf)
from .hf_mixtral import MIXTRAL
from .hf_olmoe import OLMOE
from .hf_qwen3_moe import QWEN3_MOE


def families() -> dict[str, Family]:
    return {f.arch: f for f in (MIXTRAL, QWEN3_MOE, OLMOE, GLM4_MOE)}


def pick_family(cfg: Config, arch: str) -> Family:
    """The family `arch` names, or for `auto` the one that represents the run; one-line refusals."""
    known = families()
    if arch != "auto":
        if arch not in known:
            raise HFInteropError(f"--hf-arch: {arch} is not one of {' | '.join(HF_ARCHES)}")
        found = problem(cfg, known[arch])
        if found:
            raise HFInteropError(f"export --format hf --hf-arch {arch}: {found}")
        return known[arch]
    problems = {name: problem(cfg, family) for name, family in known.items()}
    fitting = [name for name, found in problems.items() if found is None]
    if len(fitting) == 1:
        return known[fitting[0]]
    if fitting:  # the families' discriminating settings (qk_norm, score_func) make this unreachable today
        raise HFInteropError(f"export --format hf: {' and '.join(fitting)} both represent this run; pick one "
                             "with --hf-arch")
    # the family the run is nearest to: the fewest settings in the way
    nearest = min(known, key=lambda name: sum(bad for bad, _ in common_checks(cfg, known[name]) + known[name].checks(cfg)))
    raise HFInteropError(f"export --format hf: no Hugging Face family represents this run; nearest is "
                         f"{nearest} ({problems[nearest]})")


# ----------------------------------------------------------------------------- export


def tokenizer_files(cfg: Config, run_dir: Path, out: Path, eos_token_id: Optional[int]) -> None:
    """tokenizer.json (a bpe or pretrained run's own) and the tokenizer_config.json that lets
    `AutoTokenizer` read it whatever the family (its end token named, no bos added)."""
    from ..data import save_tokenizer, saved_tokenizer

    tokenizer = saved_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_name, run_dir)
    if save_tokenizer(tokenizer, out, replace=True) is None:
        return  # bytes: there is no tokenizer file to point transformers at
    eos = tokenizer.tok.id_to_token(eos_token_id) if eos_token_id is not None else None
    (out / HF_TOKENIZER_CONFIG).write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": None, "pad_token": None,
        "add_bos_token": False, "add_eos_token": False, "model_max_length": cfg.model.seq_len,
        "clean_up_tokenization_spaces": False}, indent=2) + "\n")


def export_hf(run_dir: str | Path, out_dir: str | Path, warn=lambda line: None, arch: str = "auto"
              ) -> tuple[Found, Path, Family]:
    """Write the newest complete checkpoint of `run_dir` (any EP size) as a Hugging Face checkpoint
    of `arch` (or the family `auto` picks). Refused, before anything is written, unless it is one."""
    from safetensors.torch import save_file

    from ..run.checkpoint_files import config_of
    from ..run.output_dir import make_output_dir, writing_into
    from .export import _for_one_process, find_checkpoint, load_checkpoint_model

    run_dir = Path(run_dir)
    found = find_checkpoint(run_dir, warn)
    cfg = config_of(found)
    family = pick_family(cfg, arch)
    eos = end_of_text_id(cfg, found.path)
    cpu = torch.device("cpu")
    out = make_output_dir(out_dir, "export OUT_DIR")  # before the (long) load
    model = load_checkpoint_model(found, _for_one_process(cfg, cpu), cpu)
    tensors = {name: t.float() for name, t in to_hf(model.state_dict(), cfg, family).items()}
    with writing_into(out, "export OUT_DIR"):
        save_file(tensors, out / HF_WEIGHTS, metadata={"format": "pt", "step": str(found.step)})
        (out / HF_CONFIG).write_text(json.dumps(hf_config(cfg, family, eos), indent=2) + "\n")
        (out / HF_GENERATION).write_text(json.dumps({"bos_token_id": None, "eos_token_id": eos,
                                                     "pad_token_id": eos}, indent=2) + "\n")
        tokenizer_files(cfg, found.path, out, eos)
    return found, out / HF_WEIGHTS, family


# ----------------------------------------------------------------------------- import


def read_hf_config(path: Path) -> tuple[dict, Family]:
    """The config.json of a local checkpoint directory and its family; one-line errors name init.from_hf."""
    if not (path / HF_CONFIG).is_file():
        what = "is not a directory" if not path.is_dir() else f"has no {HF_CONFIG}"
        raise HFInteropError(f"init.from_hf: {path} {what} (a local Hugging Face checkpoint directory is expected)")
    try:
        hf = json.loads((path / HF_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise HFInteropError(f"init.from_hf: {path / HF_CONFIG} is unreadable ({e})") from None
    kind = hf.get("model_type") if isinstance(hf, dict) else None
    known = families()
    if kind not in known:
        raise HFInteropError(f"init.from_hf: {path / HF_CONFIG} has model_type={kind}, not one of "
                             f"{', '.join(known)}")
    return hf, known[kind]


class _Tensors:
    """The tensors of a checkpoint directory (one file, or shards listed by the index), each file
    opened on first use and only the tensors asked for read."""

    def __init__(self, path: Path, files: ExitStack):
        if (path / HF_INDEX).is_file():
            try:
                weight_map = json.loads((path / HF_INDEX).read_text())["weight_map"]
                self.file_of = {name: path / file for name, file in weight_map.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise HFInteropError(f"init.from_hf: {path / HF_INDEX} is unreadable ({e!r})") from None
        elif (path / HF_WEIGHTS).is_file():
            with safe_open(path / HF_WEIGHTS, framework="pt") as f:
                self.file_of = {name: path / HF_WEIGHTS for name in f.keys()}
        else:
            raise HFInteropError(f"init.from_hf: {path} holds neither {HF_WEIGHTS} nor {HF_INDEX}")
        self._files, self._open = files, {}

    def _file(self, name: str):
        file = self.file_of[name]
        if file not in self._open:
            if not file.is_file():
                raise HFInteropError(f"init.from_hf: {file} (listed in {HF_INDEX}) is missing")
            self._open[file] = self._files.enter_context(safe_open(file, framework="pt"))
        return self._open[file]

    def shape(self, name: str) -> Optional[list[int]]:
        return list(self._file(name).get_slice(name).get_shape()) if name in self.file_of else None

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)


def _check_shapes(tensors: _Tensors, cfg: Config, family: Family, path: Path, untie: bool) -> None:
    for name, shape in hf_shapes(cfg, family).items():
        if name == "lm_head.weight" and untie and tensors.shape(name) is None:
            continue  # theirs tied: our head starts as their embedding
        if tensors.shape(name) != shape:
            found = f"has shape {tensors.shape(name)}" if name in tensors.file_of else "is missing"
            raise HFInteropError(f"init.from_hf: {name} {found} in {path}, expected {shape}")


def init_from_hf(model: Transformer, path: str | Path, cfg: Config) -> str:
    """Copy a local Hugging Face checkpoint of any family into `model` (already parallelised: it
    holds this rank's experts only, and only those are read). Every rank checks every name and
    shape, so a bad checkpoint fails alike everywhere. Returns a line for the log."""
    path = Path(path)
    hf, family = read_hf_config(path)
    found = problem(cfg, family) or config_mismatch(hf, cfg, family)
    if found:
        raise HFInteropError(f"init.from_hf: {found}")
    untie = bool(_hf_value(hf, "tie_word_embeddings", family)) and not cfg.model.tie_embeddings
    with ExitStack() as files:
        tensors = _Tensors(path, files)
        _check_shapes(tensors, cfg, family, path, untie)
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        experts_of = {f"blocks.{l}.": block.ffn.experts for l, block in enumerate(model.blocks)
                      if model.is_moe_block(l)}
        with torch.no_grad():
            for link in links(cfg, family):
                if link.per_expert:
                    experts = experts_of[link.ours.split("ffn.")[0]]
                    full = torch.stack([tensors.get(link.theirs[0].format(e=e)) for e in experts.global_expert_ids])
                    target = getattr(experts, link.ours.rsplit(".", 1)[1])  # the EP rank's (maybe an FSDP shard)
                else:
                    names = link.theirs
                    if untie and names == ("lm_head.weight",) and tensors.shape(names[0]) is None:
                        names = ("model.embed_tokens.weight",)  # theirs tied, ours not: the head starts as it
                    full = torch.cat([tensors.get(name) for name in names])
                    target = buffers[link.ours] if link.buffer else params[link.ours]
                copy_full_(target, full / link.scale if link.scale != 1.0 else full)
    first = next(iter(experts_of.values())).global_expert_ids
    return (f"initialised from Hugging Face {family.title} {path} ({cfg.model.n_layers} layers, "
            f"{cfg.moe.num_experts} experts; rank 0 read experts {first.start}-{first.stop - 1} of each MoE layer)")

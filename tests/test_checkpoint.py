"""Checkpoint format and loading at another layout, on real gloo processes.

Every expert weight and both Adam moments are filled with a value that encodes (layer,
global expert id, tensor, kind); after saving at one (world, ep) and loading at another, each
rank must find exactly its global experts' values. Losses alone could hide a permutation.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from trainer.build import build_trainer
from trainer.config import Config, to_dict
from trainer.model import Transformer
from trainer.moe import Experts
from trainer.parallel.dist import make_layout
from trainer.run.checkpoint import TrainState, expected_model_shapes, load_checkpoint, model_entries, save_checkpoint
from trainer.run.checkpoint_files import CheckpointError, check_model_shapes, latest_checkpoint, saved_shapes, verify

from .distributed import run_processes

CPU = torch.device("cpu")
EXPERT_TENSORS = ("w1_LFD", "w3_LFD", "w2_LDF")
KINDS = ("param", "exp_avg", "exp_avg_sq")


def small_config(ep: int, num_experts: int = 8, d_ff: int = 24) -> Config:
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.seq_len = 16, 2, 2, 8
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.d_ff = num_experts, 2, d_ff
    cfg.parallel.ep = ep
    cfg.train.device = "cpu"
    return cfg


def mark(layer: int, expert: int, tensor: int, kind: int) -> float:
    """A value exact in fp32 that names where it belongs."""
    return layer * 1000 + expert * 10 + tensor + kind * 0.125


def expert_modules(model: Transformer) -> list[tuple[int, Experts]]:
    return [(moe.layer_id, moe.experts) for moe in model.moe_layers]


def _mark_and_save(rank, world_size, run_dir, ep):
    cfg = small_config(ep)
    layout = make_layout(cfg.parallel, CPU)
    tr = build_trainer(cfg, layout)
    tr.engine.optimizer_state(for_loading=True)  # zeroed AdamW state for every parameter, as after a first step
    with torch.no_grad():
        for layer, experts in expert_modules(tr.model):
            for t, name in enumerate(EXPERT_TENSORS):
                param = getattr(experts, name)
                state = tr.engine.optimizer.state[param]
                for local, e in enumerate(experts.global_expert_ids):
                    param[local].fill_(mark(layer, e, t, 0))
                    state["exp_avg"][local].fill_(mark(layer, e, t, 1))
                    state["exp_avg_sq"][local].fill_(mark(layer, e, t, 2))
        for param in tr.grad_sync.dense:
            param.fill_(0.5)
            tr.engine.optimizer.state[param]["exp_avg"].fill_(0.25)
        for param in tr.model.parameters():
            tr.engine.optimizer.state[param]["step"].fill_(7)
    save_checkpoint(run_dir, TrainState(step=7, data_position=56, skipped_steps=1), tr.model, tr.engine.optimizer, layout,
                    {"config": to_dict(cfg)}, keep=2)


def _load_and_check(rank, world_size, run_dir, ep):
    cfg = small_config(ep)
    layout = make_layout(cfg.parallel, CPU)
    tr = build_trainer(cfg, layout)
    found = latest_checkpoint(run_dir, warn=pytest.fail)
    state = load_checkpoint(found, tr.model, tr.engine.optimizer_state(for_loading=True), layout)
    assert state == TrainState(step=7, data_position=56, skipped_steps=1)
    for layer, experts in expert_modules(tr.model):
        assert len(experts.global_expert_ids) == cfg.moe.num_experts // ep
        for t, name in enumerate(EXPERT_TENSORS):
            param = getattr(experts, name)
            held = {"param": param, **{k: tr.engine.optimizer.state[param][k] for k in KINDS[1:]}}
            for local, e in enumerate(experts.global_expert_ids):
                for kind, tensor in enumerate(held.values()):
                    want = mark(layer, e, t, kind)
                    assert torch.all(tensor[local] == want), (
                        f"rank {rank}: layer {layer} expert {e} {name} {KINDS[kind]}: got {tensor[local].flatten()[0]}, "
                        f"want {want}")
            assert float(tr.engine.optimizer.state[param]["step"]) == 7
    for param in tr.grad_sync.dense:
        assert torch.all(param == 0.5) and torch.all(tr.engine.optimizer.state[param]["exp_avg"] == 0.25)


LAYOUT_CHANGES = [  # (world, ep) saved -> (world, ep) loaded
    ((2, 2), (1, 1)),
    ((1, 1), (2, 2)),
    ((2, 2), (4, 2)),  # to ep=4 as well: (4, 4) -> (2, 2) reads the same ep-4 shards the other way
    ((4, 4), (2, 2)),
    ((4, 2), (2, 1)),
]


@pytest.mark.slow
@pytest.mark.parametrize("saved,loaded", LAYOUT_CHANGES, ids=[f"w{a}ep{b}-to-w{c}ep{d}" for (a, b), (c, d) in LAYOUT_CHANGES])
def test_every_expert_and_moment_lands_at_its_global_id(tmp_path, saved, loaded):
    run_processes(_mark_and_save, saved[0], tmp_path, saved[1])
    meta = json.loads((tmp_path / "checkpoints" / "step_0000007" / "meta.json").read_text())
    assert (meta["world_size"], meta["ep"]) == saved
    run_processes(_load_and_check, loaded[0], tmp_path, loaded[1])


def test_entries_name_every_expert_by_global_id_once():
    with torch.device("meta"):
        model = Transformer(small_config(1).model, small_config(1).moe)
    keys = model_entries(model)
    expert_keys = [k for k in keys if "/expert_" in k]
    # 2 MoE layers x 3 stacked tensors x 8 experts, each [F, D] or [D, F]
    assert len(expert_keys) == 2 * 3 * 8
    assert {k.rsplit("/expert_", 1)[1] for k in expert_keys} == {str(e) for e in range(8)}
    assert keys["model/blocks.0.ffn.experts.w1_LFD/expert_7"].shape == (24, 16)


def _save_one_process(tmp_path, cfg: Config, step: int = 3):
    layout = make_layout(cfg.parallel, CPU)
    tr = build_trainer(cfg, layout)
    return save_checkpoint(tmp_path, TrainState(step=step), tr.model, tr.engine.optimizer, layout,
                           {"config": to_dict(cfg)}, keep=2)


def test_a_flipped_byte_or_a_truncated_file_fails_verification(tmp_path):
    path = _save_one_process(tmp_path, small_config(1))
    verify(path)  # intact
    shard = next(path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name} does not match the sha256"):
        verify(path)
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match=f"{shard.name} has 100 bytes"):
        verify(path)


def test_latest_checkpoint_skips_a_damaged_one_and_says_which(tmp_path):
    cfg = small_config(1)
    _save_one_process(tmp_path, cfg, step=3)
    newest = _save_one_process(tmp_path, cfg, step=6)
    (newest / ".metadata").write_bytes(b"")
    warnings = []
    found = latest_checkpoint(tmp_path, warnings.append)
    assert found.step == 3
    assert len(warnings) == 1 and "step_0000006" in warnings[0] and ".metadata" in warnings[0]


def test_a_damaged_index_that_matches_its_manifest_is_skipped_for_an_earlier_checkpoint(tmp_path):
    cfg = small_config(1)
    _save_one_process(tmp_path, cfg, step=3)
    newest = _save_one_process(tmp_path, cfg, step=6)
    index = newest / ".metadata"
    index.write_bytes(b"not a pickle" * 10)  # damaged, and the manifest says so is what it should be
    meta = json.loads((newest / "meta.json").read_text())
    meta["files"][".metadata"] = {"bytes": index.stat().st_size, "sha256": hashlib.sha256(index.read_bytes()).hexdigest()}
    (newest / "meta.json").write_text(json.dumps(meta))
    warnings = []
    found = latest_checkpoint(tmp_path, warnings.append)
    assert found.step == 3
    assert len(warnings) == 1 and "step_0000006" in warnings[0] and "DCP's .metadata cannot be read" in warnings[0]


def test_keep_prunes_old_checkpoints_and_leftovers_of_dead_saves(tmp_path):
    cfg = small_config(1)
    (tmp_path / "checkpoints" / ".partial-step_0000002").mkdir(parents=True)
    for step in (1, 2, 3):
        _save_one_process(tmp_path, cfg, step=step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_0000002", "step_0000003"]


@pytest.mark.parametrize("key,value,first_bad", [
    ("d_ff", 32, "model/blocks.0.ffn.experts.w1_LFD/expert_0"),
    ("num_experts", 16, "model/blocks.0.ffn.router.weight"),
])
def test_a_model_that_does_not_fit_the_config_names_the_first_tensor(tmp_path, key, value, first_bad):
    path = _save_one_process(tmp_path, small_config(1))
    other = small_config(1, **{key: value})

    def meta_model():
        with torch.device("meta"):
            return Transformer(other.model, other.moe)

    with pytest.raises(CheckpointError, match=rf"{first_bad} has shape \[\d+(, \d+)?\] in the checkpoint but "):
        check_model_shapes(verify(path), expected_model_shapes(meta_model))


def test_a_checkpoint_older_than_a_buffer_still_loads_and_the_buffer_keeps_its_initial_value(tmp_path, monkeypatch):
    import trainer.run.checkpoint as checkpoint

    cfg = small_config(1)
    real = checkpoint.model_entries

    def without_buffers(model):  # as written before the router had expert-bias and count buffers
        params = {name for name, _ in model.named_parameters()}
        return {k: v for k, v in real(model).items() if k.split("/")[1] in params}

    monkeypatch.setattr(checkpoint, "model_entries", without_buffers)
    path = _save_one_process(tmp_path, cfg)
    monkeypatch.setattr(checkpoint, "model_entries", real)
    assert not any("expert_bias_E" in k for k in saved_shapes(path))

    def meta_model():
        with torch.device("meta"):
            return Transformer(cfg.model, cfg.moe)

    check_model_shapes(verify(path), expected_model_shapes(meta_model))  # no error
    layout = make_layout(cfg.parallel, CPU)
    tr = build_trainer(cfg, layout)
    with torch.no_grad():
        tr.model.moe_layers[0].router.expert_bias_E.fill_(0.5)
    load_checkpoint(verify(path), tr.model, tr.engine.optimizer, layout)
    assert torch.all(tr.model.moe_layers[0].router.expert_bias_E == 0.5)  # untouched: not in the checkpoint

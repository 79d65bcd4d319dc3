"""The model options the fine-tuned families need (grouped-query attention, head_dim, q/k norms,
dense blocks first, tied embeddings, q/k/v biases, a partly rotating head): each means what it says,
keeps EP invariance and resumes exactly; a bad value is one line naming its key.
(That the defaults are today's model, bit for bit, is `test_checkpoint_compat`: a checkpoint of an
older trainer resumes to the losses it logged.)"""

from __future__ import annotations

import pytest
import torch

from trainer.config import ConfigError, config_from_dict
from trainer.config_validation import validate
from trainer.model import Transformer
from trainer.run.tracking import read_metrics

from .cli import run_cli

OPTIONS = ["model.n_kv_heads=2", "model.head_dim=12", "model.qk_norm=per_head", "model.first_moe_layer=1",
           "model.tie_embeddings=true", "model.attention_bias=true", "model.rope_fraction=0.5"]


def built(overrides: list[str], seed: int = 0) -> Transformer:
    cfg = config_from_dict({}, ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.seq_len=16",
                                "moe.num_experts=4", "moe.d_ff=32", *overrides])
    validate(cfg, 1)
    model = Transformer(cfg.model, cfg.moe)
    model.init_weights(seed)
    return model


@pytest.mark.parametrize("override, message", [
    ("model.n_kv_heads=3", "model.n_kv_heads: must be >= 1 and divide model.n_heads=4"),
    ("model.head_dim=1", "model.head_dim: must be >= 2"),
    ("model.qk_norm=layer", "model.qk_norm: must be one of none | per_head | full"),
    ("model.first_moe_layer=-1", "model.first_moe_layer: must be >= 0"),
    ("model.first_moe_layer=2", "model.first_moe_layer: model.n_layers=2, model.first_moe_layer=2 and "
                                "model.moe_every=1 leave no MoE block"),
    ("model.rope_fraction=0", "model.rope_fraction: must be in (0, 1]"),
    ("model.rope_fraction=0.1", "model.rope_fraction: the rotating part of a head, 0 dims"),
    ("model.tie_embeddings=maybe", "model.tie_embeddings: expected true or false"),
])
def test_a_bad_model_option_is_one_error_naming_its_key(override, message):
    with pytest.raises(ConfigError) as raised:
        built([override])
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_head_dim_frees_the_heads_from_the_model_width():
    model = built(["model.n_heads=3", "model.head_dim=10", "model.n_kv_heads=1"])
    assert model.blocks[0].attn.qkv.weight.shape == (3 * 10 + 2 * 10, 32)
    assert model(torch.randint(0, 256, (2, 16))).logits.shape == (2, 16, 256)


def test_grouped_query_attention_is_full_attention_with_each_kv_head_shared_by_its_group():
    grouped, full = built(["model.n_kv_heads=2"]), built([])
    with torch.no_grad():
        for mine, theirs in zip(grouped.state_dict().values(), full.state_dict().values()):
            if mine.shape == theirs.shape:
                theirs.copy_(mine)
        for g, f in zip(grouped.blocks, full.blocks):
            q_QD, k_KD, v_KD = g.attn.qkv.weight.split(g.attn.widths)
            # query head h reads kv head h // 2: repeat each kv head's rows for the two heads of its group
            repeat = [t.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32) for t in (k_KD, v_KD)]
            f.attn.qkv.weight.copy_(torch.cat([q_QD, *repeat]))
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(grouped(tokens).logits, full(tokens).logits, atol=1e-5)


def test_tied_embeddings_are_one_matrix_that_both_uses_train():
    from trainer.build import build_model
    from trainer.interop.export import one_process_layout

    tied, untied = built(["model.tie_embeddings=true"]), built([])
    assert tied.lm_head.weight is tied.embed.weight
    materialised = build_model(config_from_dict({}, ["model.tie_embeddings=true"]),
                               one_process_layout(torch.device("cpu")))  # built on meta, then given storage
    assert materialised.lm_head.weight is materialised.embed.weight
    assert tied.parameter_counts()[0] == untied.parameter_counts()[0] - 256 * 32
    with torch.no_grad():  # the same weights, the untied head a copy of the embedding
        untied.load_state_dict(tied.state_dict())
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    for model in (tied, untied):
        model(tokens, tokens).loss.backward()
    assert torch.allclose(tied.embed.weight.grad, untied.embed.weight.grad + untied.lm_head.weight.grad, atol=1e-6)


def test_qk_norms_and_a_partly_rotating_head_change_the_model_where_they_should():
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    base = built([]).eval()
    for override, gains in (("model.qk_norm=per_head", (8, 8)), ("model.qk_norm=full", (32, 32))):
        model = built([override]).eval()
        assert (model.blocks[0].attn.q_norm.weight.numel(), model.blocks[0].attn.k_norm.weight.numel()) == gains
        assert not torch.allclose(model(tokens).logits, base(tokens).logits)
    partial = built(["model.rope_fraction=0.5"])
    assert partial.cos_SR.shape == (16, 4)
    first_dense = built(["model.first_moe_layer=1"])
    assert [first_dense.is_moe_block(layer) for layer in range(2)] == [False, True]


SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.seq_len=32", "moe.num_experts=4",
         "moe.d_ff=32", "moe.top_k=2", "train.batch_size=8", "train.eval_every=0", "train.eval_batches=1",
         "train.warmup_steps=1", "run.log_every=1", "run.progress=false", "ckpt.every=2", *OPTIONS]


def run(tmp_path, name: str, nproc: int, ep: int, steps: int, stop_at: int = 0) -> list[dict]:
    result = run_cli(["train", "configs/tiny.yaml", *SMALL, f"parallel.ep={ep}", f"train.steps={steps}",
                      f"train.stop_at={stop_at}", f"run.dir={tmp_path / name}"], nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    return [r for r in read_metrics(tmp_path / name) if "loss" in r]


@pytest.mark.slow
def test_every_option_at_once_keeps_ep_invariance_and_resumes_exactly(tmp_path):
    one = run(tmp_path, "one", 1, 1, 4)
    two = run(tmp_path, "two", 2, 2, 4)
    assert one[-1]["loss"] < one[0]["loss"]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                   rel=1e-5)
    run(tmp_path, "resumed", 2, 2, 4, stop_at=2)
    resumed = run(tmp_path, "resumed", 2, 2, 4)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in two]  # bit for bit

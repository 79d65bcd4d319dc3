"""Hugging Face Mixtral interop through the real CLI: `export --format hf` gives a checkpoint that
`transformers.MixtralForCausalLM` loads and that computes our logits; `init.from_hf` starts a run
from a transformers-written Mixtral at any EP size; what Mixtral cannot express is one line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from trainer.config import Config, config_from_dict
from trainer.interop.hf_mixtral import mixtral_problem
from trainer.run.tracking import read_metrics

from .cli import run_cli
from .test_guards_cli import TINY, assert_one_line_refusal, cli, corpus, files_data, one_process  # noqa: F401

SHAPE = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.seq_len=32", "moe.num_experts=4",
         "moe.d_ff=32", "model.rope_theta=10000.0"]
RUN = ["train.batch_size=4", "train.eval_every=0", "train.eval_batches=1", "run.progress=false", "run.log_every=1",
       "parallel.ep=1"]


@pytest.fixture(scope="module")
def mixtral():
    """transformers' MixtralForCausalLM (the optional dependency only these tests need)."""
    return pytest.importorskip("transformers").MixtralForCausalLM


def max_logit_difference(mixtral, hf_dir, ours_path) -> float:
    from trainer.interop.export import load_model

    hf = mixtral.from_pretrained(hf_dir).eval()
    ours, cfg = load_model(ours_path)
    tokens_BS = torch.randint(0, 256, (3, cfg.model.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(tokens_BS).logits - ours(tokens_BS).logits).abs().max().item()
    print(f"max |HF - native| logit difference: {diff:.3g}")
    return diff


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("routing", [["moe.top_k=2", "moe.route_scale=2.5"], ["moe.top_k=1", "moe.normalize_top_k=true"]])
def test_an_hf_export_computes_our_logits(capsys, tmp_path, corpus, mixtral, routing):
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    code, _, err = cli(capsys, "train", TINY, *SHAPE, *routing, *RUN, *files_data(corpus), "train.steps=3",
                       "moe.capacity_factor=1.0", f"run.dir={run_dir}")  # capacity: training only
    assert code == 0, err
    code, out_text, err = cli(capsys, "export", str(run_dir), str(out), "--format", "hf")
    assert code == 0, err
    assert "as a Hugging Face Mixtral" in out_text
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["output_router_logits"] is False
    assert max_logit_difference(mixtral, out, run_dir) < 1e-4


@pytest.mark.parametrize("override, line", [
    ("moe.num_shared_experts=2", "moe.num_shared_experts=2: Mixtral has no shared experts"),
    ("model.moe_every=2", "model.moe_every=2: every Mixtral block is an MoE block"),
    ("moe.num_experts=0", "moe.num_experts=0: a dense model is not a Mixtral"),
    ("moe.score_func=sigmoid", "moe.score_func=sigmoid: Mixtral's router is a softmax"),
    ("moe.top_k=1", "moe.normalize_top_k=null: with moe.top_k=1 our combine weight is the raw softmax score"),
    ("moe.normalize_top_k=false", "moe.normalize_top_k=false: Mixtral renormalises the top-k combine weights"),
    ("moe.n_groups=2", "moe.n_groups=2: Mixtral routes over all experts"),
    ("moe.expert_bias_rate=0.01", "moe.expert_bias_rate=0.01: the expert bias changes which experts are chosen"),
    ("moe.eval_capacity_factor=1.0", "moe.eval_capacity_factor=1.0: our evaluation drops routes"),
])
def test_each_setting_mixtral_cannot_express_is_named(override, line):
    assert mixtral_problem(config_from_dict({}, [override])).startswith(line)


@pytest.mark.parametrize("override", ["moe.capacity_factor=1.0", "moe.router_jitter=0.1", "moe.noisy_topk=true",
                                      "model.dense_d_ff=64", "moe.top_k=1 moe.normalize_top_k=true",
                                      "moe.aux_loss_scope=sequence", "moe.max_recv_factor=2.0"])
def test_training_only_settings_are_mixtral(override):
    assert mixtral_problem(config_from_dict({}, override.split())) is None


def test_a_non_mixtral_export_is_one_line_and_writes_nothing(capsys, tmp_path, corpus):
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    code, _, err = cli(capsys, "train", TINY, *SHAPE, *RUN, *files_data(corpus), "train.steps=1",
                       "moe.num_shared_experts=2", f"run.dir={run_dir}")
    assert code == 0, err
    code, _, err = cli(capsys, "export", str(run_dir), str(out), "--format", "hf", "--hf-arch", "mixtral")
    line = assert_one_line_refusal(code, err, "error: export --format hf --hf-arch mixtral: ")
    assert line.endswith("moe.num_shared_experts=2: Mixtral has no shared experts")
    code, _, err = cli(capsys, "export", str(run_dir), str(out), "--format", "hf")  # auto: no family fits
    line = assert_one_line_refusal(code, err, "error: export --format hf: no Hugging Face family represents this run")
    assert line.endswith("nearest is mixtral (moe.num_shared_experts=2: Mixtral has no shared experts)")
    assert not out.exists()
    assert cli(capsys, "export", str(run_dir), str(out))[0] == 0  # the native export is unchanged


# ----------------------------------------------------------------------------- import


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, mixtral):
    """A seeded random Mixtral of SHAPE saved by transformers in shards (with an index), and the model."""
    from transformers import MixtralConfig

    config = MixtralConfig(vocab_size=256, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, rope_theta=10000.0, initializer_range=0.15)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = mixtral(config).eval()
    path = tmp_path_factory.mktemp("hf") / "mixtral"
    model.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()  # sharded: the index is read
    return path, model


def first_batch_lm_loss(hf, corpus, seed: int = 1337) -> float:
    """The HF model's own mean cross-entropy on the run's first global batch."""
    from trainer.data import TokenBatches, load_corpus

    cfg = config_from_dict({}, [*files_data(corpus), f"train.seed={seed}"])
    inputs_BS, targets_BS = TokenBatches(load_corpus(cfg.data).train, 32, 4, 0, 1, seed, True, "train").batch(0)
    with torch.no_grad():
        logits_BSV = hf(inputs_BS).logits
    return F.cross_entropy(logits_BSV.flatten(0, 1), targets_BS.flatten()).item()


@pytest.mark.slow
def test_init_from_hf_gives_the_hf_loss_at_any_ep_size_and_exports_back(capsys, tmp_path, corpus, hf_model, mixtral):
    path, hf = hf_model
    args = ["train", TINY, *SHAPE, *RUN, *files_data(corpus), "train.steps=1", f"init.from_hf={path}"]
    two = run_cli([*args, "parallel.ep=2", f"run.dir={tmp_path / 'ep2'}"], nproc=2, timeout=120)
    assert two.returncode == 0, two.stderr
    assert "initialised from Hugging Face Mixtral" in two.stderr and "experts 0-1 of each MoE layer" in two.stderr
    # route_scale at ep=1: the down projections are divided by it on the way in, so HF's loss holds
    code, _, err = cli(capsys, *args, "moe.route_scale=2.5", f"run.dir={tmp_path / 'ep1'}")
    assert code == 0, err
    # under FSDP the weights go into shards: dense over the world, experts over their replicas (ep 1)
    sharded = run_cli([*args, "train.engine=fsdp", "parallel.ep=1", f"run.dir={tmp_path / 'fsdp'}"], nproc=2,
                      timeout=120)
    assert sharded.returncode == 0, sharded.stderr
    first = [read_metrics(tmp_path / name)[0] for name in ("ep2", "ep1", "fsdp")]
    assert abs(first[0]["loss"] - first[1]["loss"]) < 1e-5 and abs(first[2]["loss"] - first[1]["loss"]) < 1e-5, first
    expected = first_batch_lm_loss(hf, corpus)
    with capsys.disabled():
        print(f"first-step lm_loss: ep=2 {first[0]['lm_loss']:.6f}, ep=1 {first[1]['lm_loss']:.6f}, HF {expected:.6f}")
    assert abs(first[1]["lm_loss"] - expected) < 1e-4 and abs(first[0]["lm_loss"] - expected) < 1e-4
    # the step-1 checkpoint was saved at ep=2: export it back and HF computes what we compute
    out = tmp_path / "back"
    code, _, err = cli(capsys, "export", str(tmp_path / "ep2"), str(out), "--format", "hf")
    assert code == 0, err
    assert max_logit_difference(mixtral, out, tmp_path / "ep2") < 1e-4


def test_init_from_hf_refusals_are_one_line_and_resume_wins(capsys, tmp_path, corpus, hf_model):
    path, _ = hf_model
    args = ["train", TINY, *SHAPE, *RUN, *files_data(corpus), "train.steps=1"]
    capsys.readouterr()
    code, _, err = cli(capsys, *args, "model.d_model=64", f"init.from_hf={path}", f"run.dir={tmp_path / 'a'}")
    line = assert_one_line_refusal(code, err, "error: init.from_hf: ", expected_code=1)
    assert line.endswith("config.json has hidden_size=32 but model.d_model=64")
    assert not (tmp_path / "a" / "checkpoints").exists()
    code, _, err = cli(capsys, *args, f"init.from_hf={tmp_path / 'missing'}", f"run.dir={tmp_path / 'b'}")
    assert "is not a directory" in assert_one_line_refusal(code, err, "error: init.from_hf: ", expected_code=1)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = cli(capsys, *args, f"init.from_hf={llama}", f"run.dir={tmp_path / 'c'}")
    assert "model_type=llama, not one of mixtral, qwen3_moe, olmoe, glm4_moe" in assert_one_line_refusal(code, err, "error: init.from_hf: ", 1)
    # a run with a checkpoint resumes whatever init.from_hf says
    assert cli(capsys, *args, f"init.from_hf={path}", f"run.dir={tmp_path / 'd'}")[0] == 0
    code, _, err = cli(capsys, *args, "train.steps=2", f"init.from_hf={llama}", f"run.dir={tmp_path / 'd'}")
    assert code == 0, err
    assert f"init.from_hf={llama} is ignored: run.dir holds a checkpoint" in err
    assert [r["step"] for r in read_metrics(tmp_path / "d") if "loss" in r] == [1, 2]


def test_a_shape_that_does_not_match_the_safetensors_is_one_line(capsys, tmp_path, corpus, hf_model):
    path, _ = hf_model
    index = json.loads((path / "model.safetensors.index.json").read_text())
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((path / "config.json").read_text())
    del index["weight_map"]["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    (partial / "model.safetensors.index.json").write_text(json.dumps(index))
    for shard in set(index["weight_map"].values()):
        (partial / shard).symlink_to(path / shard)
    capsys.readouterr()
    code, _, err = cli(capsys, "train", TINY, *SHAPE, *RUN, *files_data(corpus), "train.steps=1",
                       f"init.from_hf={partial}", f"run.dir={tmp_path / 'run'}")
    line = assert_one_line_refusal(code, err, "error: init.from_hf: ", expected_code=1)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight is missing" in line


def test_init_is_a_config_section_with_a_checked_value():
    assert "init" in {f.name for f in dataclasses.fields(Config)} and Config().init.from_hf is None
    from trainer.config import ConfigError
    from trainer.config_validation import validate

    with pytest.raises(ConfigError, match="^init.from_hf: must not be empty"):
        validate(config_from_dict({}, ["init.from_hf=''", "parallel.ep=1"]), 1)


@pytest.mark.slow
def test_init_from_hf_reaches_the_engine_copies_of_the_weights(capsys, tmp_path, corpus, hf_model):
    """DeepSpeed ZeRO keeps its own fp32 copy of the weights: the second step must still start from HF's."""
    pytest.importorskip("deepspeed")
    path, _ = hf_model
    args = ["train", TINY, *SHAPE, *RUN, *files_data(corpus), "train.steps=2", f"init.from_hf={path}"]
    assert cli(capsys, *args, f"run.dir={tmp_path / 'native'}")[0] == 0
    zero = run_cli([*args, "train.engine=deepspeed", "train.zero_stage=1", f"run.dir={tmp_path / 'zero'}"],
                   timeout=120)  # alone, no launcher: the engine sets up what DeepSpeed expects
    assert zero.returncode == 0, zero.stderr
    native, zero1 = ([r["lm_loss"] for r in read_metrics(tmp_path / name) if "lm_loss" in r]
                     for name in ("native", "zero"))
    assert native == pytest.approx(zero1, abs=1e-5)

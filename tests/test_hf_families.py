"""Qwen3-MoE, OLMoE and GLM-4.5 (DeepSeek-V3 routing) in and out of Hugging Face transformers, per
family, through the real CLI:

* export: a run trained with the family's routing -> `export --format hf` (auto picks the family)
  -> `AutoModelForCausalLM` computes our logits on held-out text (max |diff| <= 1e-4 x logit scale);
* import: a transformers model (random, from a config made here: no hub) -> `init.from_hf` -> our
  first-step loss is transformers' loss on the same batch, at ep 1 and 2 and under FSDP;
* round trip: export -> import -> export gives the same tensors, bit for bit.

Each family's test model sets what a wrong mapping would hide behind: d_ff = d_model (a transposed
expert matrix keeps its shape), head_dim != d_model / n_heads, grouped-query heads, q/k norm gains
and (GLM) expert biases away from their initial values.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import config_from_dict, load_config
from trainer.interop.hf import families, init_from_hf, pick_family
from trainer.interop.hf_mapping import to_hf
from trainer.run.tracking import read_metrics

from .cli import REPO, run_cli
from .test_guards_cli import TINY, assert_one_line_refusal, cli, corpus, files_data  # noqa: F401
from .test_hf_mixtral import RUN, first_batch_lm_loss

transformers = pytest.importorskip("transformers")

SEQ = ["model.seq_len=32", "model.vocab_size=256"]
FAMILY_OURS = {
    "qwen3_moe": ["model.d_model=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=12",
                  "model.qk_norm=per_head", "model.first_moe_layer=1", "model.dense_d_ff=48", "model.tie_embeddings=true",
                  "model.norm_eps=1e-6", "model.rope_theta=1000000.0", "moe.num_experts=4", "moe.top_k=2", "moe.d_ff=32",
                  "moe.normalize_top_k=false", "moe.route_scale=2.0"],
    "olmoe": ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.qk_norm=full",
              "moe.num_experts=4", "moe.top_k=2", "moe.d_ff=32", "moe.normalize_top_k=false"],
    "glm4_moe": ["model.d_model=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=8",
                 "model.qk_norm=per_head", "model.attention_bias=true", "model.rope_fraction=0.5",
                 "model.first_moe_layer=1", "model.dense_d_ff=48", "moe.num_experts=8", "moe.top_k=2", "moe.d_ff=32",
                 "moe.num_shared_experts=1", "moe.score_func=sigmoid", "moe.n_groups=4", "moe.topk_groups=2",
                 "moe.route_scale=2.5"],
}
TRAINING_EXTRAS = {"glm4_moe": ["moe.expert_bias_rate=0.2"]}  # a bias far from zero: its export is checked


def hf_config(arch: str):
    common = dict(vocab_size=256, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, initializer_range=0.15, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, num_hidden_layers=3, head_dim=12, intermediate_size=48,
                                           moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                           norm_topk_prob=False, mlp_only_layers=[0], tie_word_embeddings=True,
                                           rms_norm_eps=1e-6, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 1e6})
    if arch == "olmoe":
        return transformers.OlmoeConfig(**common, num_hidden_layers=2, intermediate_size=32, num_experts=4,
                                        num_experts_per_tok=2, norm_topk_prob=False)
    return transformers.Glm4MoeConfig(**common, num_hidden_layers=3, head_dim=8, intermediate_size=48,
                                      moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                                      n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                      first_k_dense_replace=1, norm_topk_prob=True, use_qk_norm=True,
                                      attention_bias=True, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 10000.0,
                                                                            "partial_rotary_factor": 0.5})


@pytest.fixture(scope="module", params=sorted(FAMILY_OURS))
def hf_family(request, tmp_path_factory):
    """(arch, a seeded random transformers model of that family saved to a directory, the model)."""
    arch = request.param
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(hf_config(arch)).eval()
        with torch.no_grad():  # gains and biases away from 1 and 0: a mapping that drops one shows
            for name, t in model.named_parameters():
                if t.dim() == 1:
                    t.add_(torch.randn_like(t) * 0.3)
            for name, t in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    t.copy_(torch.randn_like(t) * 0.3)
    path = tmp_path_factory.mktemp("hf") / arch
    model.save_pretrained(path)
    return arch, path, model


def held_out_logit_difference(hf_dir, ours_path, corpus) -> tuple[float, float]:
    """(max |HF - ours| logit difference, max |logit|) on three validation sequences."""
    from trainer.data import TokenBatches, load_corpus
    from trainer.interop.export import load_model

    ours, cfg = load_model(ours_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    val = load_corpus(config_from_dict({}, files_data(corpus)).data).val
    tokens_BS, _ = TokenBatches(val, cfg.model.seq_len, 3, 0, 1, 0, False, "val").batch(0)
    with torch.no_grad():
        theirs, mine = hf(tokens_BS).logits, ours(tokens_BS).logits
    return (theirs - mine).abs().max().item(), mine.abs().max().item()


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("arch", sorted(FAMILY_OURS))
def test_a_run_with_the_familys_routing_exports_to_it_and_computes_our_logits(capsys, tmp_path, corpus, arch):
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    code, _, err = cli(capsys, "train", TINY, *SEQ, *FAMILY_OURS[arch], *TRAINING_EXTRAS.get(arch, []), *RUN,
                       *files_data(corpus), "train.steps=3", "moe.capacity_factor=1.0", f"run.dir={run_dir}")
    assert code == 0, err
    code, out_text, err = cli(capsys, "export", str(run_dir), str(out), "--format", "hf")  # auto
    assert code == 0, err
    family = families()[arch]
    assert f"as a Hugging Face {family.title} ({family.architecture})" in out_text
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["architectures"] == [family.architecture]
    if arch == "glm4_moe":  # the trained expert bias travels
        bias = load_file(out / "model.safetensors")["model.layers.1.mlp.gate.e_score_correction_bias"]
        assert bias.abs().max() > 0.1
    diff, scale = held_out_logit_difference(out, run_dir, corpus)
    with capsys.disabled():
        print(f"\n{arch}: max |HF - ours| logit difference {diff:.3g} (logit scale {scale:.3g})")
    assert diff <= 1e-4 * scale


def test_auto_refuses_what_no_family_represents_in_one_line(capsys, tmp_path, corpus):
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    code, _, err = cli(capsys, "train", TINY, *SEQ, *FAMILY_OURS["olmoe"], "moe.score_func=sigmoid", *RUN,
                       *files_data(corpus), "train.steps=1", f"run.dir={run_dir}")
    assert code == 0, err
    code, _, err = cli(capsys, "export", str(run_dir), str(out), "--format", "hf")
    line = assert_one_line_refusal(code, err, "error: export --format hf: no Hugging Face family represents this run")
    assert "model.qk_norm=full" in line or "moe.score_func=sigmoid" in line, line
    code, _, err = cli(capsys, "export", str(run_dir), str(out), "--format", "hf", "--hf-arch", "llama")
    assert "--hf-arch: llama is not one of auto | mixtral" in assert_one_line_refusal(code, err, "error: ")
    assert not out.exists()


@pytest.mark.parametrize("overrides, arch", [
    ([], "mixtral"), (["model.qk_norm=per_head"], "qwen3_moe"), (["model.qk_norm=full"], "olmoe"),
    (["moe.score_func=sigmoid", "moe.num_shared_experts=1"], "glm4_moe"),
    (["model.qk_norm=per_head", "model.first_moe_layer=1", "moe.normalize_top_k=false"], "qwen3_moe"),
    (["model.n_kv_heads=2", "model.tie_embeddings=true"], "mixtral"),
])
def test_auto_picks_the_one_family_that_represents_the_run(overrides, arch):
    assert pick_family(config_from_dict({}, overrides), "auto").arch == arch


@pytest.mark.parametrize("preset", sorted(path.stem for path in (REPO / "configs" / "families").glob("*.yaml")))
def test_each_family_preset_exports_as_the_family_it_is_named_for(preset):
    assert pick_family(load_config(REPO / "configs" / "families" / f"{preset}.yaml"), "auto").arch == preset


@pytest.mark.parametrize("arch, override, message", [
    ("qwen3_moe", "moe.num_shared_experts=1", "moe.num_shared_experts=1: Qwen3-MoE has no shared experts"),
    ("qwen3_moe", "model.qk_norm=none", "model.qk_norm=none: Qwen3-MoE has q/k norms per head"),
    ("olmoe", "model.first_moe_layer=1", "model.first_moe_layer=1: every OLMoE block is an MoE block"),
    ("olmoe", "model.head_dim=16", "model.head_dim=16: OLMoE's q norm spans the model width"),
    ("glm4_moe", "moe.score_func=softmax", "moe.score_func=softmax: GLM-4.5's router scores each expert"),
    ("glm4_moe", "model.qk_norm=full", "model.qk_norm=full: GLM-4.5 has no q/k norms or q/k norms per head"),
    ("glm4_moe", "moe.n_groups=8", "moe.n_groups=8: GLM-4.5 scores a group by its two best experts"),
    ("mixtral", "model.attention_bias=true", "model.attention_bias=true: Mixtral's q/k/v projections have no biases"),
])
def test_each_setting_a_family_cannot_express_is_named(arch, override, message):
    ours = [o for o in FAMILY_OURS.get(arch, []) if not o.startswith(override.split("=")[0] + "=")]
    with pytest.raises(Exception, match="^export --format hf --hf-arch " + arch + ": " + message.replace("(", r"\(")):
        pick_family(config_from_dict({}, [*ours, *SEQ, override]), arch)


# ----------------------------------------------------------------------------- import


def test_init_from_hf_gives_transformers_loss(capsys, tmp_path, corpus, hf_family):
    arch, path, hf = hf_family
    code, _, err = cli(capsys, "train", TINY, *SEQ, *FAMILY_OURS[arch], *RUN, *files_data(corpus), "train.steps=2",
                       f"init.from_hf={path}", f"run.dir={tmp_path / 'ep1'}")
    assert code == 0, err
    assert f"initialised from Hugging Face {families()[arch].title}" in err
    first = read_metrics(tmp_path / "ep1")[0]
    expected = first_batch_lm_loss(hf, corpus)
    with capsys.disabled():
        print(f"\n{arch}: first-step lm_loss ours {first['lm_loss']:.6f}, transformers {expected:.6f}, "
              f"|diff| {abs(first['lm_loss'] - expected):.2g}")
    assert abs(first["lm_loss"] - expected) < 1e-4
    # the run checkpoints, resumes and exports back as the same family
    code, _, err = cli(capsys, "train", TINY, *SEQ, *FAMILY_OURS[arch], *RUN, *files_data(corpus), "train.steps=3",
                       f"init.from_hf={path}", f"run.dir={tmp_path / 'ep1'}")
    assert code == 0 and "is ignored: run.dir holds a checkpoint" in err, err
    assert [r["step"] for r in read_metrics(tmp_path / "ep1") if "loss" in r] == [1, 2, 3]
    code, _, err = cli(capsys, "export", str(tmp_path / "ep1"), str(tmp_path / "back"), "--format", "hf")
    assert code == 0, err
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == arch


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["parallel.ep=2", "train.engine=fsdp", "train.engine=deepspeed train.zero_stage=1"])
def test_init_from_hf_at_two_processes_gives_transformers_loss(tmp_path, corpus, hf_family, engine):
    arch, path, hf = hf_family
    if arch == "olmoe":
        pytest.skip("two families cover the layouts and engines; OLMoE shares every code path they take")
    if "deepspeed" in engine:
        pytest.importorskip("deepspeed")
    result = run_cli(["train", TINY, *SEQ, *FAMILY_OURS[arch], *RUN, *files_data(corpus), "train.steps=1", *engine.split(),
                      f"init.from_hf={path}", f"run.dir={tmp_path / 'run'}"], nproc=2, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    first = read_metrics(tmp_path / "run")[0]
    assert abs(first["lm_loss"] - first_batch_lm_loss(hf, corpus)) < 1e-4


def test_export_import_export_gives_the_same_tensors(tmp_path, hf_family):
    """transformers' tensors -> our model -> transformers' tensors, bit for bit (the route scale is
    a power of two where it is folded, so dividing and multiplying by it is exact)."""
    from trainer.build import build_model
    from trainer.interop.export import one_process_layout

    arch, path, _ = hf_family
    cfg = config_from_dict({}, [*SEQ, *FAMILY_OURS[arch], "parallel.ep=1"])
    model = build_model(cfg, one_process_layout(torch.device("cpu")))
    init_from_hf(model, path, cfg)
    theirs = load_file(path / "model.safetensors")
    again = to_hf(model.state_dict(), cfg, families()[arch])
    assert sorted(again) == sorted(theirs)
    different = [name for name in theirs if not torch.equal(theirs[name], again[name])]
    assert different == []


def test_a_tied_checkpoint_into_an_untied_run_starts_the_head_from_the_embedding(tmp_path, hf_family):
    from trainer.build import build_model
    from trainer.interop.export import one_process_layout

    arch, path, hf = hf_family
    if not hf.config.tie_word_embeddings:
        pytest.skip("only the Qwen3-MoE test model is tied")
    cfg = config_from_dict({}, [*SEQ, *FAMILY_OURS[arch], "model.tie_embeddings=false", "parallel.ep=1"])
    model = build_model(cfg, one_process_layout(torch.device("cpu")))
    init_from_hf(model, path, cfg)
    assert model.lm_head.weight is not model.embed.weight
    assert torch.equal(model.lm_head.weight, hf.model.embed_tokens.weight)
    untied = config_from_dict({}, [*SEQ, *FAMILY_OURS["olmoe"], "model.tie_embeddings=true", "parallel.ep=1"])
    olmoe = path.parent.parent / "olmoe"  # any untied checkpoint: our tied model would lose its head
    if olmoe.is_dir():
        with pytest.raises(Exception, match="tie_word_embeddings=false but model.tie_embeddings=true"):
            init_from_hf(build_model(untied, one_process_layout(torch.device("cpu"))), olmoe, untied)


# ----------------------------------------------------------------------------- the usual tools


def test_a_bpe_export_loads_with_auto_tokenizer_and_generation_stops_at_its_end_id(capsys, tmp_path, corpus):
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    bpe = ["data.tokenizer=bpe", "data.bpe_vocab_size=320", "model.vocab_size=320"]
    code, _, err = cli(capsys, "train", TINY, "model.seq_len=32", *FAMILY_OURS["olmoe"], *bpe, *RUN,
                       *files_data(corpus), "train.steps=1", f"run.dir={run_dir}")
    assert code == 0, err
    assert cli(capsys, "export", str(run_dir), str(out), "--format", "hf")[0] == 0
    from trainer.data import saved_tokenizer

    ours = saved_tokenizer("bpe", None, run_dir)
    end_id = int(ours.separator[0])
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.model_type == "olmoe" and config.eos_token_id == end_id
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "The expert router sends each token to its layer."
    assert tokenizer(text)["input_ids"] == ours.encode(text).tolist()
    assert tokenizer.eos_token_id == end_id

    class EndAtThird(transformers.LogitsProcessor):  # the model chooses the end id on its third token
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == prompt.shape[1] + 2:
                scores[:] = -float("inf")
                scores[:, end_id] = 0.0
            return scores

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = torch.tensor([ours.encode(text).tolist()])
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False, logits_processor=[EndAtThird()])
    assert generated.shape[1] == prompt.shape[1] + 3 and generated[0, -1].item() == end_id

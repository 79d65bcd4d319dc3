"""Edges of checkpoints through the CLI in this process: each ends in one line, never a traceback,
and never costs a good checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from trainer.run.checkpoint_files import CheckpointError, verify
from trainer.run.tracking import read_metrics

from .test_guards_cli import SMALL, TINY, assert_one_line_refusal, cli, corpus, files_data, one_process  # noqa: F401

no_cuda_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the guard is for machines without CUDA")


@pytest.fixture
def trained(capsys, tmp_path, corpus):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path / "run"
    code, _, err = cli(capsys, "train", TINY, *SMALL, *files_data(corpus), "train.steps=4", "ckpt.every=2",
                       f"run.dir={run_dir}")
    assert code == 0, err
    return run_dir


@pytest.mark.parametrize("meta", [
    {"format": 1, "files": {".metadata": 1}},
    {"format": 1, "files": ".metadata"},
    "drop step",
])
def test_a_malformed_meta_json_is_a_checkpoint_error_not_a_crash(trained, meta):
    path = trained / "checkpoints" / "step_0000004"
    if meta == "drop step":
        meta = json.loads((path / "meta.json").read_text())
        del meta["step"]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="meta.json"):
        verify(path)


def test_resume_skips_a_malformed_checkpoint_with_a_warning(capsys, trained, corpus):
    (trained / "checkpoints" / "step_0000004" / "meta.json").write_text('{"format": 1, "files": ".metadata"}')
    code, _, err = cli(capsys, "train", TINY, *SMALL, *files_data(corpus), "train.steps=6", f"run.dir={trained}")
    assert code == 0, err
    assert "warning: checkpoint" in err and "step_0000004" in err and "malformed" in err
    assert "(step 2), saved with world 1, ep 1" in err
    assert [r["step"] for r in read_metrics(trained) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_an_unwritable_checkpoint_directory_is_one_line_and_keeps_what_was_saved(capsys, tmp_path, corpus):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a directory")  # the checkpoint directory cannot be made
    code, _, err = cli(capsys, "train", TINY, *SMALL, *files_data(corpus), "train.steps=2", f"run.dir={run_dir}")
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot be written" in errors[0], err
    assert len(read_metrics(run_dir)) >= 1  # what was logged stays


def test_a_stop_at_already_reached_trains_nothing(capsys, tmp_path, corpus):
    run_dir = tmp_path / "run"
    args = ["train", TINY, *SMALL, *files_data(corpus), "train.steps=6", "train.stop_at=2", f"run.dir={run_dir}"]
    assert cli(capsys, *args)[0] == 0
    code, _, err = cli(capsys, *args)
    assert code == 0
    assert "nothing to train: the checkpoint is at step 2 and train.stop_at=2" in err
    assert max(r["step"] for r in read_metrics(run_dir)) == 2


def test_check_says_where_train_would_resume_and_refuses_what_train_would(capsys, trained, corpus):
    code, out, err = cli(capsys, "check", TINY, *SMALL, *files_data(corpus), f"run.dir={trained}")
    assert code == 0, err
    assert "train resumes from" in out and "step_0000004 (step 4, saved with world 1, ep 1)" in out
    code, _, err = cli(capsys, "check", TINY, *SMALL, *files_data(corpus), "moe.d_ff=48", f"run.dir={trained}")
    line = assert_one_line_refusal(code, err, "error: ")
    assert "experts.w1_LFD/expert_0 has shape [32, 32] in the checkpoint but [48, 32]" in line


def test_an_export_whose_config_does_not_match_its_weights_is_refused(capsys, trained, tmp_path):
    out = tmp_path / "export"
    assert cli(capsys, "export", str(trained), str(out))[0] == 0
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("d_ff: 32", "d_ff: 16"))
    code, _, err = cli(capsys, "sample", str(out), "--tokens", "3")
    line = assert_one_line_refusal(code, err, "error: ")
    assert "model.safetensors" in line and "w1_LFD has shape [4, 32, 32] but config.yaml describes [4, 16, 32]" in line


def test_sample_refuses_an_empty_prompt_and_continues_a_long_one(capsys, trained):
    code, _, err = cli(capsys, "sample", str(trained), "--prompt", "")
    assert_one_line_refusal(code, err, "error: sample: --prompt must not be empty")
    long_prompt = "x" * 100  # longer than model.seq_len=32: the context is its last 32 bytes
    code, out, err = cli(capsys, "sample", str(trained), "--prompt", long_prompt, "--tokens", "5")
    assert code == 0, err
    assert out.startswith(long_prompt) and len(out.rstrip("\n")) >= len(long_prompt)


@no_cuda_only
def test_eval_refuses_cuda_without_it_in_one_line(capsys, trained):
    code, _, err = cli(capsys, "eval", str(trained), "train.device=cuda")
    assert_one_line_refusal(code, err, "error: config: train.device: cuda was asked for")


def test_eval_refuses_model_overrides_and_evaluates_another_corpus(capsys, trained, tmp_path, corpus):
    code, _, err = cli(capsys, "eval", str(trained), "moe.top_k=1")
    assert_one_line_refusal(code, err, "error: config: moe.top_k: eval uses the model the checkpoint holds")
    other = tmp_path / "other.txt"
    shutil.copy(corpus, other)
    other.write_text(other.read_text().upper())
    code, out, err = cli(capsys, "eval", str(trained), f"data.path={other}")
    assert code == 0, err
    line = json.loads(out)
    assert line["step"] == 4 and str(other) in line["data"]


def test_the_expert_bias_balance_counts_and_noise_step_travel_in_the_checkpoint(capsys, tmp_path, corpus):
    bias = ["moe.expert_bias_rate=0.05", "moe.aux_loss_coef=0", "train.steps=6", "moe.aux_loss_scope=global_batch",
            "moe.router_jitter=0.1", "moe.noisy_topk=true"]  # every buffer that steps carry
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert cli(capsys, "train", TINY, *SMALL, *files_data(corpus), *bias, f"run.dir={straight}")[0] == 0
    assert cli(capsys, "train", TINY, *SMALL, *files_data(corpus), *bias, "train.stop_at=3",
               f"run.dir={interrupted}")[0] == 0
    assert cli(capsys, "train", TINY, *SMALL, *files_data(corpus), *bias, f"run.dir={interrupted}")[0] == 0
    losses = [[r["loss"] for r in read_metrics(d) if "loss" in r] for d in (straight, interrupted)]
    assert losses[0] == losses[1]
    from trainer import load_model

    model, _ = load_model(interrupted)
    assert model.moe_layers[0].router.expert_bias_E.abs().sum() > 0

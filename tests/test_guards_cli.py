"""Guards of the real CLI: every refusal is one `error:` line naming the key, with the right exit code.

Exit 2: bad input (config, run.dir, machine), refused before anything is created or allocated.
Exit 1: the run started and failed (a non-finite loss or gradient norm).
Runs without a process group call `trainer.__main__.main` in this process; runs that need a
second process (a concurrent run, torchrun) go through `tests.cli`.
"""

import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import time

import pytest
import torch

from trainer.__main__ import main
from trainer.run.tracking import LOSS_FIELDS, read_metrics

from .cli import REPO, run_cli

TINY = str(REPO / "configs" / "tiny.yaml")

SMALL = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.seq_len=32",
    "moe.num_experts=4", "moe.d_ff=32", "train.batch_size=4", "train.steps=3",
    "train.eval_every=0", "train.eval_batches=1", "run.progress=false", "run.log_every=1", "parallel.ep=1",
]

TRAIN_FIELDS = {"step", *LOSS_FIELDS, "grad_norm", "lr", "tokens_per_s", "dropped_frac", "expert_load_max",
                "epoch", "elapsed_s", "skipped_steps", "expert_load_cv", "expert_load_cv_mean", "dead_experts",
                "dead_experts_mean", "router_entropy", "router_entropy_min"}

no_cuda_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the guard is for machines without CUDA")


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    """Runs in this process are one process, whatever launched pytest."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    for name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 200 KB of varied ASCII text: loads in milliseconds, unlike the stdlib corpus."""
    rng = random.Random(0)
    words = ("expert router token layer gradient norm capacity dropless balance softmax attention rotary "
             "the of and to in is was for on with as by at from that which it be are this or an").split()
    lines, size = [], 0
    while size < 200_000:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 16)))
        line = f"{sentence.capitalize()}{rng.choice('.,;:!?')} {rng.randint(0, 99999)} ({rng.random():.3f})\n"
        lines.append(line)
        size += len(line)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(lines))
    return path


def files_data(corpus) -> list[str]:
    return ["data.dataset=files", f"data.path={corpus}"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`python -m trainer ARGS` in this process: (exit code, stdout, stderr)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def only_error_line(stderr: str) -> str:
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    return lines[0]


def assert_one_line_refusal(code: int, stderr: str, prefix: str, expected_code: int = 2) -> str:
    """The whole of stderr is one line starting with `prefix`."""
    assert code == expected_code, stderr
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    assert stderr.startswith(prefix), stderr
    return stderr.rstrip("\n")


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------- 1. non-finite config numbers

NON_FINITE = [
    ("train.lr=inf", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("train.lr=-inf", "train.lr"),
    ("train.lr=.inf", "train.lr"),  # YAML's own spelling: a float, not a string
    ("train.lr=.nan", "train.lr"),
    ("train.lr=1e999", "train.lr"),  # overflows to inf
    ("moe.capacity_factor=inf", "moe.capacity_factor"),
    ("moe.capacity_factor=.nan", "moe.capacity_factor"),
    ("parallel.timeout_s=inf", "parallel.timeout_s"),
]


@pytest.mark.parametrize("override, key", NON_FINITE, ids=[o for o, _ in NON_FINITE])
def test_non_finite_config_numbers_are_refused(override, key, capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = cli(capsys, "train", TINY, *SMALL, override, f"run.dir={run_dir}")
    line = assert_one_line_refusal(code, err, f"error: config: {key}: ")
    assert "finite" in line, line
    assert out == ""
    assert not run_dir.exists()


def test_non_finite_numbers_in_the_yaml_file_are_refused(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  lr: .nan\n")
    code, _, err = cli(capsys, "check", str(config), f"run.dir={tmp_path / 'run'}")
    line = assert_one_line_refusal(code, err, "error: config: train.lr: ")
    assert "finite" in line


# ----------------------------------------------------------------------------- 2. non-finite during training

DIVERGE = ["train.steps=20", "train.warmup_steps=0", "train.lr=1e10"]
NONFINITE_LINE = re.compile(r"^error: step (\d+): non-finite (loss|gradient norm) \(")


@pytest.mark.parametrize("clip", [["train.grad_clip=0"], []], ids=["no-clip", "default-clip"])
def test_non_finite_loss_stops_the_run_with_one_line(clip, capsys, tmp_path, corpus):
    run_dir = tmp_path / "run"
    code, out, err = cli(capsys, "train", TINY, *SMALL, *files_data(corpus), *DIVERGE, *clip, f"run.dir={run_dir}")
    assert code == 1, err
    line = only_error_line(err)
    match = NONFINITE_LINE.match(line)
    assert match, line
    failed = int(match.group(1))
    assert 1 < failed < 20, line  # it trained, then diverged before the end
    assert "skipped" not in err.replace(line, "")  # stopping at the first is the default
    assert "done:" not in err and "done:" not in out
    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    assert steps == list(range(1, failed)), records  # every step before, none at or after the failure
    for record in records:
        assert record["skipped_steps"] == 0
        for key in (*LOSS_FIELDS, "grad_norm"):
            assert is_finite_number(record[key]), record
        assert "val_loss" not in record  # no final evaluation of a failed run


def test_skip_nonfinite_skips_then_stops_at_the_next_one(capsys, tmp_path, corpus):
    run_dir = tmp_path / "run"
    code, out, err = cli(capsys, "train", TINY, *SMALL, *files_data(corpus), *DIVERGE, "train.grad_clip=0",
                         "train.skip_nonfinite=2", f"run.dir={run_dir}")
    assert code == 1, err
    skipped_lines = [l for l in err.splitlines() if "step skipped" in l]
    skipped = [int(re.match(r"^step (\d+): non-finite ", l).group(1)) for l in skipped_lines]
    assert len(skipped) == 2 and skipped[0] < skipped[1], err
    line = only_error_line(err)  # the skips are reported, but not as errors
    match = NONFINITE_LINE.match(line)
    assert match, line
    failed = int(match.group(1))
    assert failed > skipped[1], err
    assert "train.skip_nonfinite=2" in line
    assert "done:" not in err and "done:" not in out

    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, failed)), records
    for record in records:
        # a logged step reports how many steps were skipped so far; a non-finite value only on a skipped step
        assert record["skipped_steps"] == sum(s <= record["step"] for s in skipped), record
        finite = all(is_finite_number(record[key]) for key in (*LOSS_FIELDS, "grad_norm"))
        assert finite or record["step"] in skipped, record
    assert records[-1]["skipped_steps"] == 2


# ----------------------------------------------------------------------------- 3. unusable run.dir

def unusable_run_dir(kind: str, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    return {"file": a_file, "under-file": a_file / "sub", "proc": "/proc/self/nope/run"}[kind]


@pytest.mark.parametrize("command", ["train", "check"])
@pytest.mark.parametrize("kind", ["file", "under-file", "proc"])
def test_unusable_run_dir_is_refused(kind, command, capsys, tmp_path, corpus):
    run_dir = unusable_run_dir(kind, tmp_path)
    code, out, err = cli(capsys, command, TINY, *SMALL, *files_data(corpus), f"run.dir={run_dir}")
    line = assert_one_line_refusal(code, err, "error: run.dir: ")
    assert str(run_dir) in line
    assert out == ""
    assert (tmp_path / "a_file").read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_check_refuses_a_run_dir_that_holds_a_run(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    code, out, err = cli(capsys, "check", TINY, *SMALL, f"run.dir={run_dir}")
    line = assert_one_line_refusal(code, err, "error: run.dir: ")
    assert "already holds a run" in line
    assert out == ""
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert [p.name for p in run_dir.iterdir()] == ["metrics.jsonl"]  # check creates nothing, not even a lock


# ----------------------------------------------------------------------------- 4. two runs on one run.dir

@pytest.mark.slow
def test_second_run_on_a_live_run_dir_is_refused_and_the_first_is_untouched(capsys, tmp_path, corpus):
    run_dir = tmp_path / "run"
    steps = 150
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WORLD_SIZE": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "trainer", "train", TINY, *SMALL, *files_data(corpus), f"train.steps={steps}",
         f"run.dir={run_dir}"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = run_dir / ".lock"
        deadline = time.monotonic() + 120
        while not (lock.exists() and "pid" in lock.read_text()):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)

        code, out, err = cli(capsys, "train", TINY, *SMALL, *files_data(corpus), f"run.dir={run_dir}")
        line = assert_one_line_refusal(code, err, "error: run.dir: ")
        assert "in use" in line and f"pid {first.pid}" in line, line
        code, out, err = cli(capsys, "check", TINY, *SMALL, *files_data(corpus), f"run.dir={run_dir}")
        line = assert_one_line_refusal(code, err, "error: run.dir: ")
        assert "in use" in line, line
        assert out == ""
        assert first.poll() is None, "the first run ended before the second was tried; raise its steps"

        _, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, first_err
    assert not error_lines(first_err), first_err
    assert "done:" in first_err
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # one line per step, in order
    assert all(TRAIN_FIELDS <= r.keys() for r in records)


# ----------------------------------------------------------------------------- 5. memory refused before allocation

HUGE = [
    (["model.seq_len=1000000000"], "model.seq_len"),
    (["model.d_model=1000000", "model.n_heads=4"], "model.d_model"),
    (["train.batch_size=100000000"], "train.batch_size"),
]


@pytest.mark.parametrize("command", ["check", "train"])
@pytest.mark.parametrize("overrides, key", HUGE, ids=[k for _, k in HUGE])
def test_too_large_a_run_is_refused_before_allocating(overrides, key, command, capsys, tmp_path, corpus):
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    code, out, err = cli(capsys, command, TINY, *SMALL, *files_data(corpus), *overrides, f"run.dir={run_dir}")
    elapsed = time.perf_counter() - started
    line = assert_one_line_refusal(code, err, f"error: config: {key}: ")
    assert "GiB" in line, line
    assert elapsed < 5, f"took {elapsed:.1f}s: something was allocated or loaded"
    assert out == ""
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- 6.-9. config against data and machine

@pytest.mark.parametrize("command", ["check", "train"])
def test_vocab_smaller_than_bytes_is_refused(command, capsys, tmp_path, corpus):
    run_dir = tmp_path / "run"
    code, _, err = cli(capsys, command, TINY, *SMALL, *files_data(corpus), "model.vocab_size=128", f"run.dir={run_dir}")
    line = assert_one_line_refusal(code, err, "error: config: model.vocab_size: ")
    assert "128" in line
    assert not run_dir.exists()


CPU_ONLY = [
    ("parallel.backend=nccl", "parallel.backend"),
    ("train.device=cuda", "train.device"),
]


@no_cuda_only
@pytest.mark.parametrize("override, key", CPU_ONLY, ids=[k for _, k in CPU_ONLY])
def test_what_needs_cuda_is_refused_without_it(override, key, capsys, tmp_path, corpus):
    run_dir = tmp_path / "run"
    code, _, err = cli(capsys, "train", TINY, *SMALL, *files_data(corpus), override, f"run.dir={run_dir}")
    assert_one_line_refusal(code, err, f"error: config: {key}: ")
    assert not run_dir.exists()


def test_grouped_mm_on_unaligned_rows_is_refused(capsys, tmp_path, corpus):
    run_dir = tmp_path / "run"
    code, _, err = cli(capsys, "train", TINY, *SMALL, *files_data(corpus), "moe.expert_impl=grouped_mm",
                       "moe.d_ff=250", "train.device=cpu", f"run.dir={run_dir}")
    line = assert_one_line_refusal(code, err, "error: config: moe.expert_impl: ")
    assert "moe.d_ff=250" in line and "aligned" in line
    assert not run_dir.exists()


EVIL = "from pathlib import Path\nPath({marker!r}).write_text('executed')\n"


@pytest.mark.parametrize("form", ["script", "directory", "directory/"])
def test_dataset_scripts_are_refused_and_never_run(form, capsys, tmp_path):
    marker = tmp_path / "marker"
    if form == "script":
        script = tmp_path / "evil.py"
        name = str(script)
    else:
        (tmp_path / "evil").mkdir()
        script = tmp_path / "evil" / "evil.py"
        name = str(tmp_path / "evil") + ("/" if form.endswith("/") else "")
    script.write_text(EVIL.format(marker=str(marker)))
    run_dir = tmp_path / "run"
    code, _, err = cli(capsys, "train", TINY, *SMALL, "data.dataset=hf", f"data.hf_name={name}", f"run.dir={run_dir}")
    line = assert_one_line_refusal(code, err, "error: config: data.hf_name: ")
    assert "script" in line
    assert not marker.exists()
    assert not run_dir.exists()
    # the marker is a real witness: running the script does create it
    subprocess.run([sys.executable, str(script)], check=True, timeout=60)
    assert marker.read_text() == "executed"


@pytest.mark.parametrize("override, package, key", [
    ("run.tracker=wandb", "wandb", "run.tracker"),
    ("run.tracker=tensorboard", "tensorboard", "run.tracker"),
    ("train.engine=deepspeed", "deepspeed", "train.engine"),
])
def test_an_optional_package_that_is_missing_is_one_line_naming_setup(capsys, tmp_path, monkeypatch, override,
                                                                     package, key):
    """As on a machine without the extra: the package is hidden from import lookups."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))
    code, _, err = cli(capsys, "train", TINY, *SMALL, override, f"run.dir={tmp_path / 'run'}")
    line = assert_one_line_refusal(code, err, f"error: config: {key}: ")
    assert package in line and f"launch/setup.sh --{package}" in line
    assert not (tmp_path / "run").exists()


def test_hf_dataset_without_datasets_is_refused(capsys, tmp_path, monkeypatch):
    """As on a machine without the hf extra: datasets is hidden from import lookups."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else find_spec(name, *a))
    code, _, err = cli(capsys, "train", TINY, *SMALL, "data.dataset=hf", "data.hf_name=text",
                       f"run.dir={tmp_path / 'run'}")
    line = assert_one_line_refusal(code, err, "error: config: data.dataset: ")
    assert "datasets" in line and "launch/setup.sh --hf" in line
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 10. check

def test_check_accepts_a_valid_config_and_creates_nothing(capsys, tmp_path):
    run_dir = tmp_path / "x"
    code, out, err = cli(capsys, "check", TINY, "--nproc", "2", f"run.dir={run_dir}")
    assert code == 0, err
    assert err == ""
    assert len(out.splitlines()) == 1 and out.startswith("ok: "), out
    assert "2 process(es)" in out and str(run_dir) in out
    assert list(tmp_path.iterdir()) == []


def test_check_refuses_a_world_size_that_ep_does_not_divide(capsys, tmp_path):
    code, out, err = cli(capsys, "check", TINY, "--nproc", "3", f"run.dir={tmp_path / 'x'}")
    line = assert_one_line_refusal(code, err, "error: config: parallel.ep: ")
    assert "3" in line
    assert out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["--nproc", "2", "moe.top_k=9"], ["moe.top_k=9", "--nproc", "2"],
                                  ["moe.top_k=1", "--nproc", "2", "moe.top_k=9"]],
                         ids=["after", "before", "both"])
def test_check_applies_overrides_on_either_side_of_nproc_in_order(args, capsys, tmp_path):
    code, out, err = cli(capsys, "check", TINY, *args, f"run.dir={tmp_path / 'x'}")
    line = assert_one_line_refusal(code, err, "error: config: moe.top_k: ")
    assert "got 9" in line


# ----------------------------------------------------------------------------- 11. metric lines of eval-only steps

def test_eval_only_steps_log_only_the_evaluation(capsys, tmp_path, corpus):
    run_dir = tmp_path / "run"
    code, _, err = cli(capsys, "train", TINY, *SMALL, *files_data(corpus), "run.log_every=2", "train.eval_every=3",
                       "train.steps=6", f"run.dir={run_dir}")
    assert code == 0, err
    assert not error_lines(err), err
    assert "done:" in err
    records = read_metrics(run_dir)
    by_step = {r["step"]: r for r in records}
    assert [r["step"] for r in records] == [2, 3, 4, 6]  # one line per step, no duplicates
    assert set(by_step[3]) == {"step", "val_loss"}
    assert set(by_step[2]) == set(by_step[4]) == TRAIN_FIELDS
    assert set(by_step[6]) == TRAIN_FIELDS | {"val_loss"}
    for step in (3, 6):
        assert is_finite_number(by_step[step]["val_loss"])
        assert f"step {step}: val_loss {by_step[step]['val_loss']:.4f}" in err
    # the file is plain JSON lines
    assert all(json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines())


# ----------------------------------------------------------------------------- 12. under torchrun

@pytest.mark.slow
def test_run_dir_error_prints_once_under_torchrun(tmp_path, corpus):
    run_dir = tmp_path / "a_file"
    run_dir.write_text("keep me\n")
    result = run_cli(["train", TINY, *SMALL, *files_data(corpus), f"run.dir={run_dir}"], nproc=2, timeout=300)
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: run.dir: ") and str(run_dir) in lines[0], result.stderr
    assert run_dir.read_text() == "keep me\n"


def test_bf16_on_a_cpu_without_bf16_instructions_says_so_once(capsys, tmp_path, corpus, monkeypatch):
    from trainer.config import load_config
    from trainer.run import preflight

    cfg = load_config(TINY, ["train.dtype=bf16", "train.device=cpu"])
    assert "train.dtype=bf16" in preflight.bf16_cpu_note(cfg, capabilities={"avx2": True})
    assert preflight.bf16_cpu_note(cfg, capabilities={"amx_bf16": True}) is None
    assert preflight.bf16_cpu_note(load_config(TINY, ["train.device=cpu"]), capabilities={}) is None
    monkeypatch.setattr(preflight, "cpu_bf16_matrix_instructions", lambda capabilities=None: [])
    code, _, err = cli(capsys, "check", TINY, *SMALL, *files_data(corpus), "train.dtype=bf16", "train.device=cpu",
                       f"run.dir={tmp_path / 'run'}")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "bf16 matrix instructions" in line]
    assert len(notes) == 1 and notes[0].startswith("note: train.dtype=bf16"), err

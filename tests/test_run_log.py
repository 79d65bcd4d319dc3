"""run.dir/train.log: rank 0's console lines, with the code's commit and the corpus
fingerprint, and the error line that ended a run."""

from .test_guards_cli import SMALL, TINY, cli, corpus, files_data  # noqa: F401


def test_train_log_keeps_the_console_and_the_run_identity(capsys, tmp_path, corpus):
    run_dir = tmp_path / "run"
    code, _, err = cli(capsys, "train", TINY, *SMALL, *files_data(corpus), f"run.dir={run_dir}")
    assert code == 0, err
    log = (run_dir / "train.log").read_text().splitlines()
    console = [line for line in err.splitlines() if line.startswith(("run:", "data:", "model:", "done:"))]
    assert len(console) == 4
    for line in console:  # every console line is in the log, after a timestamp
        assert any(entry.endswith("] " + line) for entry in log), line
    assert "fingerprint" in log[1] and "torch" in log[0] and "code " in log[0]


def test_train_log_ends_with_the_error_that_stopped_the_run(capsys, tmp_path, corpus):
    run_dir = tmp_path / "run"
    code, _, err = cli(capsys, "train", TINY, *SMALL, *files_data(corpus), "train.lr=1e10", "train.grad_clip=0",
                       "train.steps=6", f"run.dir={run_dir}")
    assert code == 1, err
    last = (run_dir / "train.log").read_text().splitlines()[-1]
    assert "] error: step " in last and "non-finite" in last
    assert err.strip().splitlines()[-1].endswith(last.split("] error: ", 1)[1])

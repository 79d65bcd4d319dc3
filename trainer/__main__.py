"""CLI: `python -m trainer train|check CONFIG.yaml [key=value ...]`, alone or under torchrun;
`export RUN_DIR OUT_DIR [--format native|hf]`, `sample RUN_DIR_OR_EXPORT`, `eval RUN_DIR [key=value ...]`
in one process;
`bench [--preset NAME] [--config CONFIG key=value ...]`, alone or under torchrun;
`compare CONFIG [CONFIG ...] --seeds N [key=value ...]` in one process (it launches each run).

Errors are one line on stderr. An error that is the same on every rank (a bad config, an
unusable run.dir, ranks that disagree, a non-finite loss) is printed once per machine, by
whichever rank gets there first (`run/error_once.py`); a failed collective is printed by each
rank that saw it, prefixed with the rank. Ctrl-C outside the training steps is one line and
exit 130, like a signal during training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .config_validation import validate
from .config_keys import format_config_keys
from .launch_env import LaunchError, check_launch_env, env_rank, env_world_size
from .run.error_once import write_error_once, write_line

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # what a shell reports for SIGINT


def _fail(message: str, code: int, every_rank: bool = False) -> int:
    (write_line if every_rank else write_error_once)(f"error: {message}\n")
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Expert-parallel MoE trainer.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train a model from a YAML config"),
                            ("check", "validate a config against this machine without starting anything")):
        cmd = commands.add_parser(name, help=help_text, epilog=format_config_keys(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_argument("config", help="YAML file, e.g. configs/tiny.yaml")
        cmd.add_argument("overrides", nargs="*", metavar="key=value",
                         help="dotted overrides, e.g. moe.num_experts=16 train.steps=100")
        if name == "check":
            cmd.add_argument("--nproc", type=int, default=None,
                             help="world size the run will have (default: $WORLD_SIZE, else 1)")
    export = commands.add_parser("export", help="write a run's newest checkpoint (any EP size) as safetensors")
    export.add_argument("run_dir", help="a run.dir (its newest complete checkpoint) or one checkpoint directory")
    export.add_argument("out_dir", help="directory for model.safetensors, config.yaml and export.json "
                                        "(--format hf: config.json, model.safetensors, generation_config.json, tokenizer files)")
    export.add_argument("--format", choices=("native", "hf"), default="native",
                        help="native: our state dict (default); hf: a Hugging Face transformers checkpoint")
    export.add_argument("--hf-arch", default="auto", metavar="auto|mixtral|qwen3_moe|olmoe|glm4_moe",
                        help="with --format hf: the family to write; auto (default) picks the one that computes "
                             "exactly what the run computes, or names the setting none can express")
    sample = commands.add_parser("sample", help="print a continuation of a prompt")
    sample.add_argument("path", help="a run.dir, a checkpoint directory or an export")
    sample.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sample.add_argument("--tokens", type=int, default=200, help="tokens to generate (default 200)")
    sample.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    sample.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens only")
    sample.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    evaluate = commands.add_parser("eval", help="print one JSON line with val_loss of a run's newest checkpoint")
    evaluate.add_argument("run_dir", help="a run.dir, a checkpoint directory or an export")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value",
                          help="data.*, train.eval_batches, train.batch_size, train.device, ... "
                               "(the model's shape comes from the checkpoint)")
    commands.add_parser("config", help="list every config key with its default and meaning")
    planner = commands.add_parser(
        "plan", help="bytes per rank (params, grads, optimizer, activations) and all_to_all traffic of a layout, "
                     "from fake process groups: one JSON line, and a summary on stderr",
        epilog=format_config_keys(), formatter_class=argparse.RawDescriptionHelpFormatter)
    planner.add_argument("config", help="YAML file, e.g. configs/gpu.yaml")
    planner.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. parallel.ep=8")
    planner.add_argument("--nproc", type=int, required=True, help="world size to plan for (any number)")
    memory = planner.add_mutually_exclusive_group()
    memory.add_argument("--device-memory-gb", type=float, default=None,
                        help="memory per rank to fit in (default: this machine's RAM share per process)")
    memory.add_argument("--gpu", choices=("h100", "h200", "a100"), default=None,
                        help="fit in this GPU's memory (80, 141, 80 GB; FSDP then plans its CUDA bf16 policy)")
    plots = commands.add_parser("report", help="PNG plots of one or more runs (loss, routing, expert load)")
    plots.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run.dirs; the first gets the PNGs")
    plots.add_argument("--out", default=None, help="directory for the PNGs (default: the first RUN_DIR)")
    comparison = commands.add_parser(
        "compare", help="train configs on the same data, steps and seeds; a table of held-out loss (Markdown, JSON) "
                        "and a plot",
        description="Each CONFIG is a YAML file, optionally with overrides of its own after a colon "
                    "(configs/quality/moe.yaml:moe.aux_loss_coef=0.001,moe.z_loss_coef=0); trailing key=value "
                    "overrides apply to every config. The first config is the baseline of the relative column.")
    comparison.add_argument("items", nargs="+", metavar="CONFIG[:k=v,...] | key=value",
                            help="configs to compare, then overrides for all of them")
    comparison.add_argument("--seeds", type=int, default=3, help="seeds per config: train.seed + 0 .. N-1 (default 3)")
    comparison.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun; default 2)")
    comparison.add_argument("--eval-batches", type=int, default=None, metavar="N",
                            help="tabulate each run's final checkpoint evaluated over N validation batches "
                                 "(python -m trainer eval; 0 = the whole split) instead of its own last val loss")
    comparison.add_argument("--budget-seconds", type=float, default=None, metavar="S",
                            help="also train every config for the steps that fit in S seconds of training at its "
                                 "measured speed (its schedule decays there): val loss at equal time beside equal steps")
    comparison.add_argument("--horizons", default=None, metavar="N,N,...",
                            help="the whole comparison at each of these train.steps (OUT/steps<N>/), and how the "
                                 "paired difference moves with steps (horizons.md, horizons.png)")
    comparison.add_argument("--out", default="runs/compare",
                            help="directory for each run (OUT/<config>/seed<S>), compare.md, compare.json and "
                                 "val_loss.png; finished runs there are reused (default runs/compare)")
    corpus = commands.add_parser("corpus", help="write a held-out corpus from a package: austen (Jane Austen's six "
                                                "novels, a file per chapter, from Debian's r-cran-janeaustenr)")
    corpus.add_argument("name", choices=("austen",))
    corpus.add_argument("out_dir", metavar="OUT_DIR", help="a new directory; train on it with data.dataset=files "
                                                           "data.path=OUT_DIR")
    corpus.add_argument("--deb", default=None, metavar="FILE",
                        help="the package's .deb (default: fetched with apt-get download)")
    bench = commands.add_parser("bench", help="MoE layer and training-step throughput against references measured "
                                               "in the same run (JSON lines); alone or under torchrun")
    from .tools.bench import add_arguments

    add_arguments(bench)
    bench.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for --config")
    return parser


def _run_bench(args) -> int:
    if args.overrides and not args.config:
        return _fail(f"bench: key=value overrides ({' '.join(args.overrides)}) need --config", EXIT_BAD_INPUT)
    if min(args.iters, args.rounds, args.steps) < 1 or args.warmup < 0:
        return _fail("bench: --iters, --rounds and --steps must be >= 1 and --warmup >= 0", EXIT_BAD_INPUT)
    import torch

    if args.preset == "gpu" and not torch.cuda.is_available():
        # its d_model-2048 cases would run for a long time on a CPU and measure nothing it is for
        return _fail("bench: --preset gpu needs CUDA (torch.cuda.is_available() is False); use --preset reference "
                     "or quick here", EXIT_BAD_INPUT)
    from .tools.bench import run

    try:
        return run(args, args.overrides)
    except ConfigError as e:
        return _fail(f"config: {e}", EXIT_BAD_INPUT)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _run_compare(args) -> int:
    import signal

    from .tools.compare import compare
    from .tools.compare_runs import CompareError, CompareInterrupted, RunFailedError

    # SIGTERM (a scheduler's preemption) as Ctrl-C: the run in progress saves before compare exits; and
    # SIGINT even where a background launch left it ignored
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    from .tools.horizons import horizons, parse_horizons

    say = lambda line: print(line, flush=True)  # noqa: E731
    try:
        if args.horizons is not None:
            if args.budget_seconds is not None:
                raise CompareError("compare: --budget-seconds and --horizons are separate comparisons; run them "
                                   "one at a time")
            written = horizons(args.items + args.overrides, parse_horizons(args.horizons), args.seeds, args.nproc,
                               args.out, say, args.eval_batches)
        else:
            written = compare(args.items + args.overrides, args.seeds, args.nproc, args.out, say, args.eval_batches,
                              args.budget_seconds)[1]
    except CompareInterrupted as e:
        return _fail(str(e), EXIT_INTERRUPTED)
    except CompareError as e:
        return _fail(str(e), EXIT_FAILED if isinstance(e, RunFailedError) else EXIT_BAD_INPUT)
    except KeyboardInterrupt:  # before or between runs, or a second Ctrl-C (the run was killed)
        return _fail(f"compare: interrupted; finished runs are kept in {args.out}", EXIT_INTERRUPTED)
    print(Path(written[0]).read_text(), end="")
    for path in written:
        print(f"wrote {path}")
    return 0


def _run_offline(args) -> int:
    """export / sample / eval: one process, no process group."""
    import json

    import torch

    from .data import DataError
    from .run.checkpoint_files import CheckpointError
    from .run.output_dir import OutputDirError

    def warn(line: str) -> None:
        print(line, file=sys.stderr)

    try:
        if args.command == "export":
            if args.format == "hf":
                from .interop.hf import export_hf

                found, weights, family = export_hf(args.run_dir, args.out_dir, warn, args.hf_arch)
                kind = f" as a Hugging Face {family.title} ({family.architecture})"
            else:
                from .interop.export import export

                if args.hf_arch != "auto":
                    return _fail("export: --hf-arch needs --format hf", EXIT_BAD_INPUT)
                found, weights = export(args.run_dir, args.out_dir, warn)
                kind = ""
            print(f"exported step {found.step} (saved with {found.layout}){kind} to {weights}")
        elif args.command == "sample":
            from .data import saved_tokenizer
            from .interop.export import load_model
            from .interop.generate import decode, encode, generate

            problem = _sample_problem(args)
            if problem:
                return _fail(f"sample: {problem}", EXIT_BAD_INPUT)
            model, cfg = load_model(args.path, "cpu", warn)
            if args.top_k is not None and args.top_k > cfg.model.vocab_size:
                return _fail(f"sample: --top-k must be at most the model's vocabulary ({cfg.model.vocab_size} ids), got "
                             f"{args.top_k}", EXIT_BAD_INPUT)
            tokenizer = saved_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_name, Path(args.path))  # the run's
            generator = torch.Generator().manual_seed(args.seed)
            new = generate(model, encode(args.prompt, tokenizer), args.tokens, args.temperature, args.top_k, generator)
            print(args.prompt + decode(new, tokenizer))
        else:
            from .interop.export import eval_checkpoint

            print(json.dumps(eval_checkpoint(args.run_dir, args.overrides, warn)))
    except ConfigError as e:
        return _fail(f"config: {e}", EXIT_BAD_INPUT)
    except (CheckpointError, DataError, OutputDirError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    return 0


MAX_SAMPLE_TOKENS = 100_000  # each token is a forward pass over the whole context (no KV cache)


def _sample_problem(args) -> str | None:
    import math

    if not 0 <= args.tokens <= MAX_SAMPLE_TOKENS:
        return f"--tokens must be between 0 and {MAX_SAMPLE_TOKENS:,}, got {args.tokens}"
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        return f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}"
    if args.top_k is not None and args.top_k < 1:
        return f"--top-k must be >= 1, got {args.top_k}"
    if not args.prompt:
        return "--prompt must not be empty (the default is a newline)"
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # during training a signal stops after the step instead (run/preemption.py)
        return _fail("interrupted (Ctrl-C); nothing already saved was changed (a run resumes from its latest "
                     "checkpoint)", EXIT_INTERRUPTED)


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    # overrides may also follow an option (`check CONFIG --nproc 2 key=value`): argparse leaves
    # those over, and parse_intermixed_args does not support subcommands
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command in ("export", "sample", "report", "corpus") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = [*getattr(args, "overrides", []), *rest]
    if args.command in ("export", "sample", "eval"):
        return _run_offline(args)
    if args.command in ("train", "check", "bench"):  # plan runs alone, whatever launched it
        try:
            check_launch_env()
        except LaunchError as e:
            return _fail(f"launch: {e}", EXIT_BAD_INPUT, every_rank=True)  # which rank this is may be unknown
    if args.command == "bench":
        return _run_bench(args)
    if args.command == "report":
        from .tools.report import ReportError, report

        try:
            for path in report(args.run_dirs, args.out, lambda line: print(line, file=sys.stderr)):
                print(f"wrote {path}")
        except ReportError as e:
            return _fail(str(e), EXIT_BAD_INPUT)
        return 0
    if args.command == "compare":
        return _run_compare(args)
    if args.command == "corpus":
        from .tools.corpus import CorpusError, write_austen

        try:
            novels = write_austen(args.out_dir, args.deb)
        except CorpusError as e:
            return _fail(str(e), EXIT_BAD_INPUT)
        print(f"wrote {sum(novels.values())} chapters of {len(novels)} novels to {args.out_dir}: "
              + ", ".join(f"{name} ({n})" for name, n in novels.items()))
        return 0
    if args.command == "config":
        if args.overrides:
            parser.error(f"unrecognized arguments: {' '.join(args.overrides)}")
        print(format_config_keys())
        return 0
    if args.command == "plan" and args.nproc < 1:
        return _fail(f"plan: --nproc must be >= 1, got {args.nproc}", EXIT_BAD_INPUT)
    world_size = getattr(args, "nproc", None) or env_world_size()

    # everything here runs before any process group exists, identically on every rank
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world_size)
        if args.command == "plan":  # for another machine: nothing here is checked against this one
            return _run_plan(cfg, args)
        from .run.preflight import bf16_cpu_note, preflight  # imports torch: only once the config parses

        preflight(cfg, world_size)
        note = bf16_cpu_note(cfg)
        if note and env_rank() == 0:
            print(note, file=sys.stderr)
    except ConfigError as e:
        return _fail(f"config: {e}", EXIT_BAD_INPUT)

    if args.command == "check":
        return _check_run_dir(cfg, args.config, world_size)
    return _run_training(cfg)


def _run_plan(cfg, args) -> int:
    import torch

    from .tools.plan import GPU_MEMORY_GB, machine_share_gb, print_plan

    if args.device_memory_gb is not None and not args.device_memory_gb > 0:
        return _fail(f"plan: --device-memory-gb must be > 0, got {args.device_memory_gb}", EXIT_BAD_INPUT)
    memory_gb = (GPU_MEMORY_GB[args.gpu] if args.gpu else args.device_memory_gb) or machine_share_gb(args.nproc)
    print_plan(cfg, args.nproc, memory_gb, torch.device("cuda" if args.gpu else "cpu"))
    return 0


def _check_run_dir(cfg, config_path: str, world_size: int) -> int:
    """What `train` would do with run.dir, without changing it."""
    from .run.checkpoint_files import CheckpointError
    from .run.rundir import RunDirError, inspect_run_dir
    from .startup import checkpoint_to_resume

    run_dir = Path(cfg.run.dir)
    try:
        inspect_run_dir(run_dir)
        found = checkpoint_to_resume(cfg, run_dir, warn=lambda line: print(line, file=sys.stderr))
    except (RunDirError, CheckpointError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    state = (f"holds a run: train resumes from {found.path} (step {found.step}, saved with {found.layout})"
             if found else "is free")
    print(f"ok: {config_path} is valid for {world_size} process(es); run.dir {run_dir} {state}")
    return 0


def _run_training(cfg) -> int:
    from .data import DataError
    from .engines import NonFiniteError
    from .moe import LoadError
    from .moe.collectives import CollectiveError
    from .run.agreement import AgreementError, ReplicaMismatchError
    from .run.checkpoint_files import CheckpointError
    from .run.rundir import RunDirError
    from .train import train

    try:
        train(cfg)
    except (AgreementError, DataError) as e:  # DataError: the corpus is read once more per rank after start-up
        return _fail(str(e), EXIT_BAD_INPUT)
    except (NonFiniteError, ReplicaMismatchError, CheckpointError, LoadError, RunDirError) as e:  # RunDirError: lost
        return _fail(str(e), EXIT_FAILED)
    except CollectiveError as e:
        return _fail(f"rank {env_rank()}: {e}", EXIT_FAILED, every_rank=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``maml-jax`` command line: ``train``, ``eval``, ``eval-lake-runs``, ``bench``, ``plot``, ``list-configs``.

Exit codes: 0 success, 2 bad usage or config, 3 non-finite loss during training, 4 missing or
broken data / run directory / checkpoint, 130 / 143 stopped by SIGINT / SIGTERM: during training
after saving a checkpoint; elsewhere in ``train`` (setting up, evaluating) and in ``eval``,
``eval-lake-runs`` and ``plot`` as soon as the running computation returns, with what was saved
kept (run the same command to resume). ``bench`` keeps Python's default handling (its PyTorch
peers run in child processes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from maml_jax.checkpoint import CheckpointError, TrainingInterrupted
from maml_jax.compile_cache import ENV_VAR as COMPILE_CACHE_ENV
from maml_jax.compile_cache import CacheUse, enable_compile_cache
from maml_jax.config import ConfigError, apply_overrides, list_configs, load_config
from maml_jax.data.cache import DatasetError
from maml_jax.host import init_distributed, limit_cpus, request_cpu_devices
from maml_jax.signals import stop_signal_handler

EXIT_USAGE, EXIT_NONFINITE, EXIT_DATA = 2, 3, 4


class Stopped(BaseException):
    """SIGINT/SIGTERM arrived outside a training chunk (setting up, compiling, evaluating).
    Training chunks catch the signals themselves and end in ``TrainingInterrupted``. A
    ``BaseException``, as ``KeyboardInterrupt`` is, so that the library's and its dependencies'
    ``except Exception`` (e.g. around a checkpoint restore) cannot mistake it for a failure."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _raise_stopped(signum: int, frame) -> None:
    """The CLI's SIGINT/SIGTERM handler outside the training chunks: it then exits with a
    message and ``128 + signum`` instead of a traceback (SIGINT) or a silent death (SIGTERM).
    Configs, parameters, checkpoints and results JSON are written atomically, so none is left
    half written; a figure or ``.md`` table may be, and the rerun rewrites it."""
    raise Stopped(signum)


STOPPED_HINT = {
    "train": "stopped outside a training chunk (setting up, or evaluating after training); checkpoints and "
    "trained parameters saved so far are kept: run the same command to resume (a model whose training "
    "finished is not trained again)",
    "eval": "evaluation stopped before it finished; run the same command again",
    "eval-lake-runs": "evaluation stopped before it finished; run the same command again",
    "plot": "plotting stopped; a figure may be half written: run the same command again",
}


def split_config_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Pull ``--config.key=value`` (or ``--config.key value``) out of ``argv``."""
    rest, overrides, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"--config.{key} needs a value")
                value, i = argv[i + 1], i + 1
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _with_compile_cache(cache_dir: str | None, parser: argparse.ArgumentParser, work: Callable[[], int]) -> int:
    """``work()``, inside the persistent compilation cache ``cache_dir`` (``--compile-cache``) if
    given, with a one-line report of its use at the end (also after an error or a stop)."""
    if not cache_dir:
        return work()
    try:
        path = enable_compile_cache(cache_dir)
    except ValueError as err:
        parser.error(f"--compile-cache: {err}")
    with CacheUse(path) as use:
        try:
            return work()
        finally:
            print(use.summary(), file=sys.stderr)


def _train(args, overrides, parser: argparse.ArgumentParser) -> int:
    from maml_jax.experiment import train_and_evaluate

    config = apply_overrides(load_config(args.config), overrides)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(args.workdir) if args.workdir else Path("runs") / f"{config.name}-{stamp}"

    def train() -> int:
        print(f"run directory: {workdir}", file=sys.stderr)
        out = train_and_evaluate(config, workdir, progress=not args.no_progress)
        print(out["table"])
        print(f"\nresults, metrics and figures in {workdir}")
        return 0

    return _with_compile_cache(args.compile_cache, parser, train)


def _run_command(args: argparse.Namespace, overrides: dict[str, str], parser: argparse.ArgumentParser) -> int:
    """Run the parsed command (``main`` maps its errors, and ``Stopped``, to exit codes)."""
    if args.command == "list-configs":
        print("\n".join(list_configs()))
        return 0
    if args.command == "eval":
        from maml_jax.experiment import evaluate_run

        def evaluate() -> int:
            out = evaluate_run(
                args.run_dir,
                label=args.model,
                num_tasks=args.num_tasks,
                inner_grad_clip=args.inner_grad_clip,
                data_dir=args.data_dir,
            )
            print(f"model at step {out['step']}\n{out['table']}")
            return 0

        return _with_compile_cache(args.compile_cache, parser, evaluate)
    if args.command == "plot":
        from maml_jax.plotting import plot_runs

        out = args.out or str(Path(args.runs[0]) / "plots" / "compare")
        print("\n".join(str(p) for p in plot_runs(args.runs, out)))
        return 0
    if args.command == "eval-lake-runs":
        from maml_jax.experiment import evaluate_lake_runs

        print(json.dumps(evaluate_lake_runs(args.run_dir, args.runs, label=args.model)))
        return 0
    args.config = args.config_opt or args.config
    if args.config is None:
        parser.error("train needs a config: maml-jax train sinusoid (see maml-jax list-configs)")
    if args.cpus is not None:
        try:
            limit_cpus(args.cpus)
        except (ValueError, RuntimeError) as err:
            parser.error(f"--cpus: {err}")
    if args.cpu_devices is not None:
        if args.cpu_devices < 1:
            parser.error(f"--cpu-devices must be >= 1, got {args.cpu_devices}")
        request_cpu_devices(args.cpu_devices)
    cluster = (args.coordinator_address, args.num_processes, args.process_id)
    if not args.distributed and cluster != (None, None, None):
        parser.error("--coordinator-address, --num-processes and --process-id need --distributed")
    if args.distributed:
        try:
            index, count = init_distributed(*cluster)
        except (RuntimeError, ValueError) as err:
            parser.error(f"--distributed: jax.distributed.initialize failed: {err}")
        import jax

        print(f"process {index} of {count}: {jax.device_count()} devices in all", file=sys.stderr)
    return _train(args, overrides, parser)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own parser: python -m maml_jax.bench
        from maml_jax import bench

        return bench.main(argv[1:])
    parser = argparse.ArgumentParser(prog="maml-jax", description="Gradient-based meta-learning in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser(
        "train",
        help="meta-train and evaluate a config",
        description="Meta-train and evaluate a config. Override any field with --config.KEY=VALUE.",
    )
    p_train.add_argument("config", nargs="?", default=None, help="config name (see list-configs) or path to a .py file")
    p_train.add_argument("--config", dest="config_opt", default=None, help="same as the positional CONFIG")
    p_train.add_argument("--workdir", default=None, help="run directory (default runs/<name>-<time>); reused to resume")
    p_train.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_train.add_argument(
        "--cpus",
        type=int,
        default=None,
        help="run JAX on the first N CPUs (Linux; default all); 1 trains the small sinusoid MLP faster",
    )
    p_train.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="expose N XLA CPU devices, so that --config.num_devices=N (or 0) splits the task batch over "
        "them; the Omniglot workloads train faster with 2 on a 2-core CPU",
    )
    p_train.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process job first (jax.distributed.initialize: TPU pods, multi-GPU nodes, several CPU "
        "processes); run the same command in every process with --config.num_devices=0; process 0 writes the files",
    )
    p_train.add_argument("--coordinator-address", default=None, help="with --distributed: HOST:PORT of process 0")
    p_train.add_argument("--num-processes", type=int, default=None, help="with --distributed: processes in all")
    p_train.add_argument("--process-id", type=int, default=None, help="with --distributed: this process's index")
    p_eval = sub.add_parser(
        "eval", help="meta-test a run directory (finished, or its latest checkpoint)", description=None
    )
    p_eval.add_argument("--run-dir", required=True, help="run directory written by maml-jax train")
    p_eval.add_argument(
        "--model", default=None, help="which trained model of the run (default: the meta-learned one, e.g. maml)"
    )
    p_eval.add_argument(
        "--data-dir", default=None, help="dataset directory (default: the data_dir in the run's config.json)"
    )
    p_eval.add_argument("--num-tasks", type=int, default=None, help="meta-test tasks (default: the config's)")
    for p in (p_train, p_eval):
        p.add_argument(
            "--compile-cache",
            metavar="DIR",
            default=os.environ.get(COMPILE_CACHE_ENV) or None,
            help="keep compiled XLA programs in DIR and load them in later runs (a resume skips the compile; "
            f"results are bitwise the same); env {COMPILE_CACHE_ENV}; default: none",
        )
    p_eval.add_argument(
        "--inner-grad-clip",
        type=float,
        default=None,
        help="clip each inner SGD gradient to this global norm at meta-test (default: the run's config; 0 = none)",
    )
    p_lake = sub.add_parser(
        "eval-lake-runs",
        help="Lake et al. 20-way one-shot runs with a 20-way Omniglot model; prints one JSON line",
    )
    p_lake.add_argument("--run-dir", required=True, help="run directory of a 20-way Omniglot model")
    p_lake.add_argument("--runs", required=True, help="all_runs.zip or its unpacked folder")
    p_lake.add_argument("--model", default=None, help="which trained model (default: the meta-learned one)")
    p_plot = sub.add_parser(
        "plot",
        help="learning curves of several runs, metric vs inner steps, sinusoid figure (PNG and PDF)",
        description="Plot run directories on shared figures: <out>_curves, <out>_inner_steps and (for a "
        "finished sinusoid run) <out>_sinusoid, each as .png and .pdf.",
    )
    p_plot.add_argument("runs", nargs="+", metavar="RUN", help="run directories written by maml-jax train")
    p_plot.add_argument("--out", default=None, help="output path stem (default: <first RUN>/plots/compare)")
    sub.add_parser("list-configs", help="list the available config names")
    sub.add_parser("bench", help="benchmark meta-train steps per second (maml-jax bench --help)", add_help=False)

    try:
        argv, overrides = split_config_overrides(argv)
        args = parser.parse_args(argv)
        if overrides and args.command != "train":
            keys = ", ".join(f"--config.{k}" for k in overrides)
            hint = ""
            if args.command == "eval":
                hint = "; eval uses the run's own config.json (--data-dir points it at data that moved)"
            raise ConfigError(f"{keys}: --config overrides apply to train only, not to {args.command}{hint}")
        with stop_signal_handler(_raise_stopped):
            return _run_command(args, overrides, parser)
    except ConfigError as err:
        print(f"maml-jax: config error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, DatasetError) as err:
        print(f"maml-jax: {err}", file=sys.stderr)
        return EXIT_DATA
    except FloatingPointError as err:
        print(f"maml-jax: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except CheckpointError as err:
        print(f"maml-jax: {err}", file=sys.stderr)
        return EXIT_DATA
    except TrainingInterrupted as err:
        print(f"maml-jax: {err}", file=sys.stderr)
        return 128 + err.signum
    except Stopped as err:
        print(f"maml-jax: {err}: {STOPPED_HINT.get(args.command, 'stopped')}", file=sys.stderr)
        return 128 + err.signum


def console_main() -> int:
    """The ``maml-jax`` command: ``main`` in a process restarted with glibc's huge-page malloc
    for XLA's buffers where that helps (``host.reexec_with_malloc_hugepages``)."""
    from maml_jax.host import reexec_with_malloc_hugepages

    reexec_with_malloc_hugepages()
    return main()


if __name__ == "__main__":
    sys.exit(console_main())

"""``splitflower run``: one split-learning experiment as a Flower simulation.

``splitflower run`` supervises: it starts the experiment in a child process, again while the
simulation fails to start. The supervisor imports neither torch nor Flower (the modules the
commands need are imported where a command runs): supervising costs an interpreter's start,
not torch's.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitflower._logs import configure_logging
from splitflower._termination import TERMINATION_GRACE_S
from splitflower.errors import (
    CRASHED_EXIT_CODE,
    DEFAULT_ATTEMPTS,
    STALLED_EXIT_CODE,
    ConfigError,
    ExperimentFailedError,
    ResultsFileError,
    SplitflowerError,
)

if TYPE_CHECKING:  # the supervisor imports neither torch nor Flower
    from splitflower.experiment import ExperimentConfig
    from splitflower.strategy import SplitResult

__all__ = ["DEFAULT_ATTEMPTS", "STALLED_EXIT_CODE", "build_parser", "main"]

_CHILD_ENV = "SPLITFLOWER_RUN_ATTEMPT"  # set in the process an attempt runs in
_ATTEMPT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "splitflower.cli")  # what runs an attempt


def build_parser() -> argparse.ArgumentParser:
    from splitflower.reproduce import add_reproduce_parser

    parser = argparse.ArgumentParser(prog="splitflower", description=(__doc__ or "").partition("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="run one experiment as a Flower simulation",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # as the supervisor reads --attempts (see _attempts)
    )
    _add_run_arguments(run)
    _add_attempts(
        add_reproduce_parser(commands).add_argument,
        "times to start each cell, each in a fresh process, while its simulation fails to start "
        f"(default {DEFAULT_ATTEMPTS}); after the last, the cell counts as failed and the grid goes on",
    )
    compare = commands.add_parser("compare", help="compare results files side by side")
    compare.add_argument("results", nargs="+", type=Path, help="results JSON files; ratios are to the last one")
    compare.add_argument("--plot", type=Path, default=None, help="also save a PNG of the comparison here")
    return parser


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    for add_group in (_add_what_to_train, _add_training, _add_requests, _add_output, _add_simulation):
        add_group(run)


def _add_what_to_train(run: argparse.ArgumentParser) -> None:
    from splitflower.algorithms import ALGORITHMS
    from splitflower.data import DATASET_NAMES
    from splitflower.models import MODEL_NAMES
    from splitflower.strategies import STRATEGIES

    group = run.add_argument_group("what to train")
    group.add_argument(
        "--algorithm",
        default="dsl",
        metavar="{" + ",".join(sorted(ALGORITHMS)) + "} or MODULE:ATTRIBUTE",
        help="the split-learning algorithm: a registered one, or an Algorithm of your own",
    )
    group.add_argument(
        "--strategy",
        default=None,
        metavar="{" + ",".join(sorted(STRATEGIES)) + "} or MODULE:ATTRIBUTE",
        help="a registered strategy, or a SplitStrategy subclass of your own (None: the algorithm's own)",
    )
    group.add_argument(
        "--option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the algorithm (repeatable), e.g. --option window=4",
    )
    group.add_argument("--dataset", choices=DATASET_NAMES, default="fashion-mnist", help="the training data")
    group.add_argument("--data-root", default=None, help="directory holding the dataset files")
    group.add_argument("--model", choices=MODEL_NAMES, default="lenet5", help="the network to split")
    group.add_argument("--cut", default="s", help="s, m, d or a number of blocks on the client")
    group.add_argument("--clients", type=int, default=3, help="number of clients (Flower SuperNodes)")
    group.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA")
    group.add_argument("--train-size", type=int, default=0, help="train on a seeded random subset (0: all)")
    group.add_argument("--test-size", type=int, default=0, help="evaluate on a seeded subset of this many examples")
    group.add_argument("--device", default="cpu", help="torch device of both parties, e.g. cuda or cuda:1")


def _add_training(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group("training", "both parties' optimisation")
    group.add_argument("--rounds", type=int, default=2, help="number of Flower rounds")
    group.add_argument("--local-epochs", type=int, default=1, help="epochs each client trains per round")
    group.add_argument("--batch-size", type=int, default=64, help="examples per batch")
    group.add_argument("--lr", type=float, default=0.01, help="learning rate of both parties' SGD")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    group.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay")
    group.add_argument("--seed", type=int, default=0, help="seed of models, partitions and batch order")
    group.add_argument(
        "--hand-over-optimizer",
        action="store_true",
        help="sequential strategy: hand the client optimizer's state (momentum) on with the segment",
    )


def _add_requests(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group(
        "server requests", "how the server runs the clients' requests, and the link they cross"
    )
    group.add_argument("--batching", action="store_true", help="batch requests across clients on the server")
    group.add_argument(
        "--flush-timeout",
        type=float,
        default=1.0,  # ExperimentConfig.flush_timeout (not imported, to start fast; a test checks they agree)
        help="seconds a batched request, or one run in the clients' order, waits at most for the other clients'",
    )
    group.add_argument(
        "--request-order",
        choices=("clients", "arrival"),
        default="clients",  # ExperimentConfig.request_order (likewise)
        help="clients training at once that share a server model: run a request of each in turn in the clients' "
        "order, so the run repeats bit for bit (clients), or each as it arrives, so none waits for a slower one "
        "(arrival)",
    )
    group.add_argument("--link", default="", help="emulated client link UP/DOWN/RTT, e.g. 10mbit/50mbit/20ms")


def _add_output(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group("output and resuming")
    group.add_argument("--out", type=Path, default=None, help="write the results JSON here (None: no file)")
    group.add_argument(
        "--save-model", type=Path, default=None, help="write the trained weights of both parties here (.pt)"
    )
    group.add_argument(
        "--save-every",
        type=_positive_int,
        default=1,
        metavar="K",
        help="with --save-model: also write them after every K-th round, so that a run killed at any point "
        "resumes (--resume) from the last written (default: %(default)s)",
    )
    group.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="FILE.pt",
        help="train on from the weights --save-model wrote (after round k: rounds k+1 to --rounds, default "
        "the saved run's last), with the config they were saved with: options that would change what a round "
        "computes are refused unless they agree with it",
    )


def _add_simulation(run: argparse.ArgumentParser) -> None:
    from splitflower.simulation import DEFAULT_STARTUP_TIMEOUT_S

    group = run.add_argument_group("the simulation", "how Flower's simulation runs the clients")
    group.add_argument(
        "--clients-at-once",
        type=_positive_int,
        default=None,
        metavar="N",
        help="clients the simulation trains at a time (default: as many as the strategy trains at once that "
        "fit in the memory available, a cautious estimate; a number given is trusted to fit)",
    )
    group.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    group.add_argument(
        "--startup-timeout",
        type=_positive_seconds,
        default=DEFAULT_STARTUP_TIMEOUT_S,
        help="seconds after which a simulation no client has started in counts as failed to start "
        "(Flower's simulation hangs when Ray's node fails to start)",
    )
    _add_attempts(
        group.add_argument,
        "times to start the simulation, each in a fresh process, while it fails to start; after the "
        f"last, exit with status {STALLED_EXIT_CODE}",
    )


def _add_attempts(add_argument: Callable[..., object], help_text: str = "") -> None:
    add_argument("--attempts", type=_positive_int, default=DEFAULT_ATTEMPTS, help=help_text)


def _attempts(run_argv: Sequence[str]) -> int:
    """``--attempts`` of a ``splitflower run`` command line, read without the full parser
    (whose choices need torch); the attempt's own full parse reports every other mistake."""
    parser = argparse.ArgumentParser(
        prog="splitflower run",
        usage="splitflower run [OPTIONS] [--attempts ATTEMPTS]",
        add_help=False,
        allow_abbrev=False,
    )
    _add_attempts(parser.add_argument)
    attempts: int = parser.parse_known_args(run_argv)[0].attempts
    return attempts


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _run_attempts(argv: Sequence[str], attempts: int) -> int:
    """Run ``splitflower run argv`` in a fresh process, again while it fails to start (a new
    process gets a new Ray node: one started twice in a process fails more often), at most
    ``attempts`` times, and never again once this process was told to stop; return the last
    exit status (128 + N for a child ended by signal N)."""
    supervisor = _AttemptSupervisor()
    for attempt in range(1, attempts + 1):
        status = supervisor.run([*_ATTEMPT_COMMAND, *argv])
        if status != STALLED_EXIT_CODE or attempt == attempts or supervisor.terminated:
            return status
        print(
            f"splitflower: the simulation did not start (attempt {attempt} of {attempts}); "
            "starting it again in a fresh process",
            file=sys.stderr,
            flush=True,
        )
    raise AssertionError("unreachable")


class _AttemptSupervisor:
    """Runs attempts, passing a SIGTERM sent to this process on to the one running.

    Ctrl-C reaches the attempt from the terminal's process group, and it ends itself
    cleanly; this process only notes it, to start no other attempt. A SIGTERM is passed on
    as the Ctrl-C it is handled as: the attempt keeps the rounds it recorded and ends. If it
    has not ended ``TERMINATION_GRACE_S`` later (``timeout`` and Slurm signal the whole
    process group, so its Ray processes may have died under it), or at a second SIGTERM, it
    is killed. Under Ray, an attempt that gets a SIGTERM itself is ended at once by Ray's
    own signal handler; what it wrote after each round is what is kept then.
    """

    def __init__(self) -> None:
        self.terminated = False
        self._kill_at: float | None = None

    def run(self, command: list[str]) -> int:
        child = subprocess.Popen(command, env={**os.environ, _CHILD_ENV: "1"})
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def pass_on(*_: object) -> None:
            self.terminated = True
            if self._kill_at is None:
                self._kill_at = time.monotonic() + TERMINATION_GRACE_S
                child.send_signal(signal.SIGINT)  # under Ray, a SIGTERM kills it before it can keep anything
            elif self._kill_at != math.inf:
                self._kill(child, "a second SIGTERM")

        def note_ctrl_c(*_: object) -> None:  # the attempt has it too, from the terminal
            self.terminated = True

        signal.signal(signal.SIGINT, note_ctrl_c)
        signal.signal(signal.SIGTERM, pass_on)
        try:
            status = self._wait(child)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 128 - status if status < 0 else status

    def _wait(self, child: subprocess.Popen[bytes]) -> int:
        while True:
            try:
                return child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if self._kill_at is not None and time.monotonic() >= self._kill_at:
                    self._kill(child, f"no end {TERMINATION_GRACE_S:.0f} s after SIGTERM")

    def _kill(self, child: subprocess.Popen[bytes], why: str) -> None:
        self._kill_at = math.inf
        if child.poll() is None:
            print(f"splitflower: killing the run's attempt ({why})", file=sys.stderr, flush=True)
            child.kill()


def _compare(args: argparse.Namespace) -> int:
    from splitflower.report import check_plot_path, comparison_table, load_results, plot_results

    runs = [load_results(path) for path in args.results]
    if args.plot is not None:
        check_plot_path(args.plot)  # before the table, so that a bad path is the only output
    print(comparison_table(runs))
    if args.plot is not None:
        print(f"plot written to {plot_results(runs, args.plot)}")
    return 0


def _table(results: dict[str, Any]) -> str:
    columns = ("round", "test acc", "test loss", "up MB", "down MB", "client MB", "server MB", "seconds")
    lines = ["".join(f"{c:>11}" for c in columns), "-" * 11 * len(columns)]
    for r in results["rounds"]:
        cells = (
            r["round"],
            r.get("test_accuracy", float("nan")),
            r.get("test_loss", float("nan")),
            r["bytes"]["up_payload_bytes"] / 1e6,
            r["bytes"]["down_payload_bytes"] / 1e6,
            r["memory"]["client_peak_tally_bytes"] / 1e6,
            r["memory"]["server_peak_tally_bytes"] / 1e6,
            r["seconds"],
        )
        lines.append("".join(_cell(c) for c in cells))
    return "\n".join(lines)


def _cell(value: float) -> str:
    """A table cell of 11 characters at most: a diverged loss must not run into the next column."""
    if isinstance(value, int):
        return f"{value:>11}"
    return f"{value:>11.4f}" if abs(value) < 1e5 else f"{value:>11.3e}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # As under `python -m`: an algorithm of the user's own (MODULE:ATTRIBUTE) is found in the
    # folder the command runs in, whichever way it was started.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if argv[:1] == ["run"] and not os.environ.get(_CHILD_ENV) and (attempts := _attempts(argv[1:])) > 1:
        return _run_attempts(argv, attempts)
    if os.environ.get(_CHILD_ENV):
        # The supervisor stops an attempt with SIGINT, which a command started in the
        # background (`nohup ... &`) would have it ignore.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compare":
            return _compare(args)
        if args.command == "reproduce":
            from splitflower.reproduce import reproduce_main

            return reproduce_main(args)
        return _run(args, argv[1:])
    except SplitflowerError as err:
        print(f"splitflower: error: {err}", file=sys.stderr)
        # A run whose clients all failed is a failed run, not a bad command line.
        return CRASHED_EXIT_CODE if isinstance(err, ExperimentFailedError) else 2


def _given(run_argv: Sequence[str]) -> set[str]:
    """The ``splitflower run`` options ``run_argv`` gives, by destination, whatever their value."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_run_arguments(probe)
    probe.set_defaults(**dict.fromkeys(vars(probe.parse_args([])), None))  # given values are never None
    return {dest for dest, value in vars(probe.parse_args(run_argv)).items() if value is not None}


def _run(args: argparse.Namespace, run_argv: Sequence[str]) -> int:
    from splitflower.checkpoint import ModelWriter
    from splitflower.results import ProgressWriter, check_results_path, partial_results_path, write_results
    from splitflower.simulation import run_experiment_owning_the_process

    configure_logging(args.verbose)
    fields, given = _config_fields(args), _given(run_argv)
    resume = None
    if args.resume is not None:
        from splitflower.checkpoint import load_model, resumed_config

        resume = load_model(args.resume)
        changes = {name: value for name, value in fields.items() if ("option" if name == "options" else name) in given}
        config = resumed_config(resume, changes)
    else:
        from splitflower.experiment import ExperimentConfig

        config = ExperimentConfig(**fields)
    if args.out is not None:
        check_results_path(args.out)  # before the run, not after it
    if args.save_model is not None:
        check_results_path(args.save_model, what="the model")
        if args.out is not None and Path(args.out).resolve() == Path(args.save_model).resolve():
            raise ConfigError(
                f"--out and --save-model both name {args.out}: the results would overwrite the weights; "
                "give them different files (e.g. run.json and run.pt)"
            )
    elif "save_every" in given:
        raise ConfigError("--save-every says how often --save-model writes the weights; give --save-model FILE.pt")
    unsaved: list[ResultsFileError] = []
    # A run resumed from a file keeps that file's rounds' history on in the files it writes.
    write_model = None if args.save_model is None else ModelWriter(args.save_model, resumed=resume)
    # The rounds so far, kept while it runs, where a failed run's go (see run_experiment's keep_progress).
    keep_progress = None if args.out is None else ProgressWriter(partial_results_path(args.out))
    results = run_experiment_owning_the_process(
        config,
        say=lambda line: print(line, flush=True),
        startup_timeout=args.startup_timeout,
        keep_partial=lambda partial: _keep_partial_results(partial, args.out),
        keep_model=None if write_model is None else _model_keeper(write_model, unsaved),
        resume=resume,
        # A write after a round that fails is logged and the run goes on; the final one decides the exit code.
        checkpoint=write_model,
        checkpoint_every=args.save_every,
        clients_at_once=args.clients_at_once,
        keep_progress=keep_progress,
    )
    written = None if args.out is None else write_results(results, args.out)  # kept before anything else can fail
    if keep_progress is not None:  # the whole run is written: what was kept of it as it ran goes
        with contextlib.suppress(OSError):
            Path(keep_progress.path).unlink(missing_ok=True)
    print(_table(results))
    if written is None:
        print("no results file written (give --out FILE.json to keep the figures)")
    else:
        print(f"results written to {written}")
    return CRASHED_EXIT_CODE if unsaved else 0


def _config_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`ExperimentConfig` fields the command line sets (given or by default)."""
    return dict(
        algorithm=args.algorithm,
        strategy=args.strategy,
        dataset=args.dataset,
        data_root=args.data_root,
        model=args.model,
        cut=args.cut,
        clients=args.clients,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        seed=args.seed,
        partition=args.partition,
        batching=args.batching,
        flush_timeout=args.flush_timeout,
        request_order=args.request_order,
        device=args.device,
        options=tuple(args.option),
        train_size=args.train_size,
        test_size=args.test_size,
        link=args.link,
        hand_over_optimizer=args.hand_over_optimizer,
    )


def _model_keeper(
    write: Callable[[ExperimentConfig, SplitResult], Path], unsaved: list[ResultsFileError]
) -> Callable[[ExperimentConfig, SplitResult], None]:
    """``write`` a run's final weights, or those of the last round a failed run kept. A write
    that fails is said and listed in ``unsaved`` (the results go on)."""

    def keep(config: ExperimentConfig, result: SplitResult) -> None:
        try:
            written = write(config, result)
        except ResultsFileError as err:
            print(f"splitflower: error: the trained weights are not kept: {err}", file=sys.stderr, flush=True)
            unsaved.append(err)
            return
        print(
            f"the weights after round {result.last_round} written to {written} "
            "(splitflower.checkpoint.load_model reads them; splitflower run --resume trains on from them)"
        )

    return keep


def _keep_partial_results(partial: dict[str, Any], out: Path | None) -> None:
    """Write the rounds a failed run recorded beside ``out`` (never to ``out`` itself)."""
    from splitflower.results import partial_results_path, write_results

    recorded = len(partial["rounds"])
    if out is None:
        print(f"the {recorded} recorded round(s) are not kept (give --out FILE.json to keep them)")
        return
    try:
        written = write_results(partial, partial_results_path(out))
    except ResultsFileError as err:  # the run's own error is the one to report
        print(f"the {recorded} recorded round(s) could not be kept: {err}", file=sys.stderr)
        return
    print(f"the {recorded} recorded round(s) written to {written} (marked incomplete)", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

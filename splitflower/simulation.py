"""Running an :class:`~splitflower.experiment.ExperimentConfig` as a Flower simulation:
progress while it runs, the results document it returns, and what a run that stops early,
is interrupted, or never starts leaves behind.

The CLI (``splitflower run``) and ``splitflower reproduce`` run experiments through
:func:`run_experiment_owning_the_process`; a library caller uses :func:`run_experiment`.

Example
-------
>>> from splitflower.experiment import ExperimentConfig
>>> config = ExperimentConfig(algorithm="dsl", dataset="synthetic", clients=2, rounds=1)
>>> results = run_experiment(config, say=lambda line: None)  # doctest: +SKIP
>>> results["rounds"][0]["bytes"]["down_payload_bytes"]  # doctest: +SKIP
0
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NoReturn

from flwr.app import Context
from flwr.serverapp import ServerApp

from splitflower._checks import checked_count
from splitflower._client_errors import raised_by_client
from splitflower._fork import fork_handlers_warning
from splitflower._host_memory import clients_at_once_in_memory
from splitflower._termination import is_interruption, sigterm_as_ctrl_c, sigterm_handler_kept, stopping
from splitflower.compute import run_on_compute_thread
from splitflower.errors import (
    CRASHED_EXIT_CODE,
    INTERRUPTED_EXIT_CODE,
    STALLED_EXIT_CODE,
    ExperimentFailedError,
    RunInterruptedError,
    SimulationStartError,
    SplitflowerError,
)
from splitflower.experiment import Experiment, ExperimentConfig, cached_experiment, clients_trained_at_once
from splitflower.results import (
    OncePerRound,
    results_document,
    summarise_round,
    summarise_rounds,
    versions,
)
from splitflower.strategy import NO_REPLY, SplitResult, SplitStrategy

if typing.TYPE_CHECKING:  # splitflower.checkpoint builds on splitflower.experiment
    from splitflower.checkpoint import SavedModel

__all__ = [
    "CRASHED_EXIT_CODE",
    "DEFAULT_STARTUP_TIMEOUT_S",
    "INTERRUPTED_EXIT_CODE",
    "NOT_ENDED",
    "STALLED_EXIT_CODE",
    "STALL_MESSAGE",
    "progress_document",
    "run_experiment",
    "run_experiment_owning_the_process",
    "stopped_early",
]

logger = logging.getLogger(__name__)

DEFAULT_STARTUP_TIMEOUT_S = 300.0


_NEVER_STARTED: Final = (
    "the simulation failed before any client reached a server model, and not in the ServerApp; "
    "Ray's local node most likely failed to start (look for 'The current node timed out during "
    "startup' above). Run again"
)
STALL_MESSAGE = (
    "no client reached a server model within {seconds:.0f}s of the simulation starting; Ray's local "
    "node most likely failed to start (look for 'The current node timed out during startup' above), "
    "and Flower's simulation does not end by itself then. Run again; if it keeps happening, free memory "
    "and CPU for Ray or raise --startup-timeout"
)


class _Progress:
    """Prints how far the server models have got, every few seconds, while a round runs.

    If no server model has trained on a single example ``startup_timeout`` seconds after
    the simulation started, it calls ``on_stall`` once with :data:`STALL_MESSAGE`.
    """

    def __init__(
        self,
        strategy: SplitStrategy,
        total: int,
        rounds: int,
        say: Callable[[str], None],
        every: float = 5.0,
        *,
        startup_timeout: float | None = None,
        on_stall: Callable[[str], None] | None = None,
        first_round: int = 1,
    ) -> None:
        self.strategy, self.total, self.say, self.every = strategy, total, say, every
        self.first_round = self.round = first_round
        self.last_round = rounds
        self.startup_timeout = startup_timeout
        self.on_stall = on_stall or say
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="splitflower-progress")

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        started = time.perf_counter()
        stalled = False
        while not self._stop.wait(self.every):
            if self.round > self.last_round:
                continue
            done = sum(m.num_examples for m in self.strategy.server_models)
            waited = time.perf_counter() - started
            starting = self.round == self.first_round and not done
            if starting and not stalled and self.startup_timeout is not None:
                if waited >= self.startup_timeout:
                    stalled = True
                    self.on_stall(STALL_MESSAGE.format(seconds=waited))
                    continue
            if starting:
                self.say(
                    f"  round {self.round}: no example has reached a server model yet: clients starting ({waited:.0f}s)"
                )
            else:
                self.say(f"  round {self.round}: server trained on {done}/{self.total} examples ({waited:.0f}s)")

    def started(self) -> bool:
        """Whether a round has ended or a server model has trained on an example."""
        return self.round > self.first_round or any(m.num_examples for m in self.strategy.server_models)


def run_experiment(
    config: ExperimentConfig,
    *,
    say: Callable[[str], None] = print,
    startup_timeout: float | None = None,
    on_stall: Callable[[str], None] | None = None,
    keep_model: Callable[[ExperimentConfig, SplitResult], None] | None = None,
    resume: SavedModel | None = None,
    checkpoint: Callable[[ExperimentConfig, SplitResult], object] | None = None,
    checkpoint_every: int = 1,
    clients_at_once: int | None = None,
    keep_progress: Callable[[dict[str, Any]], object] | None = None,
) -> dict[str, Any]:
    """Run ``config`` as a Flower simulation and return the results document.

    ``clients_at_once``: how many clients the simulation trains at a time (default: as many
    as the strategy trains at once that fit in the memory available, see
    :func:`clients_at_once_in_memory`; the results say it under ``clients_at_once``).

    ``resume``: weights a run saved after round k (:func:`splitflower.checkpoint.load_model`),
    trained on from round k + 1 to ``config.rounds``; the config must be the one they were
    saved with (see :func:`splitflower.checkpoint.resumed_config`), and the results hold the
    saved run's rounds (``SavedModel.history``) and the new ones, with ``resumed_from``.

    ``startup_timeout``: seconds after which, if no client has reached a server model yet,
    ``on_stall`` (default: ``say``) is called once with the reason. Flower's simulation
    never returns when Ray's node fails to start, so only a caller that owns the process
    (the CLI) can act on it, by exiting. ``keep_model(config, result)`` is given the run's
    validated config and its weights (``result.arrays``: the client's; ``server_arrays``)
    after its last round, or, if it fails or is interrupted, after the last round it
    recorded (``result.last_round``; see :func:`splitflower.checkpoint.save_model`).
    ``checkpoint(config, result)`` is given the run so far after every ``checkpoint_every``-th
    round but the last (the weights after it, and every round's record), before the round is
    said: where a long run saves what a killed process would otherwise lose (as
    :func:`~splitflower.app.build_server_app`'s ``checkpoint``, which calls it: a
    :class:`~splitflower.errors.ResultsFileError` it raises is logged and the run goes on).
    Neither is given a round that stops the run (``SplitStrategy.last_trained``).
    ``keep_progress(document)`` is given, after every round but the last (after
    ``checkpoint``), the results document so far, marked ``incomplete`` as not ended: what a
    process killed outright (SIGKILL, or SIGTERM under Ray) leaves of its rounds.
    """
    checked_count(checkpoint_every, "checkpoint_every")
    if clients_at_once is not None:
        checked_count(clients_at_once, "clients_at_once")

    for key, value in _OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    # Data and models are built on the compute thread, the only thread of this process
    # that runs parallel torch work (see splitflower.compute).
    experiment = run_on_compute_thread(cached_experiment, config)
    config = experiment.config
    clients_at_once = _clients_at_once(config, clients_at_once, say)
    if warning := fork_handlers_warning():
        say(f"splitflower: warning: {warning}")
    # (run_versions: results_document's, taken once, not at every round's progress file)
    extra: dict[str, Any] = {"clients_at_once": clients_at_once, "run_versions": versions()}
    if resume is not None:
        from splitflower.checkpoint import check_resumable

        run_on_compute_thread(check_resumable, experiment, resume)
        extra["resumed_from"] = resume.resumed_from(config)

    strategy = experiment.make_strategy(resume.strategy_state if resume is not None else None)
    progress = _Progress(
        strategy,
        len(experiment.train) * config.local_epochs,
        config.rounds,
        say,
        startup_timeout=startup_timeout,
        on_stall=on_stall,
        first_round=1 if resume is None else resume.first_round,
    )
    hooks = _RoundHooks(config, progress, say, resume, extra, (checkpoint, checkpoint_every), keep_progress)
    server_errors: list[BaseException] = []
    say(_opening_line(config, resume))
    server_app = experiment.server_app(
        strategy, hooks.keep_result, hooks.on_round, server_errors.append, resume=resume, checkpoint=hooks.after_round
    )
    stopped_by = _simulate(experiment, server_app, clients_at_once, progress, server_errors)
    result = hooks.result
    if stopped_by is not None or result is None:
        if stopped_by is None and not server_errors and not progress.started():
            raise SimulationStartError(_NEVER_STARTED)
        rounds = _keep_what_was_recorded(config, strategy, keep_model)
        if stopped_by is None:
            stopped_by = _first_server_error(server_errors)
        raise _stopped_error(config, rounds and hooks.carried(rounds), hooks.wall_s(), stopped_by, extra)
    # (A round that trained on no client stopped the run in the strategy: see SplitStrategy.start.)
    if keep_model is not None:
        keep_model(config, result)
    return results_document(config, hooks.carried(summarise_rounds(result.rounds)), hooks.wall_s(), **extra)


class _RoundHooks:
    """What the ServerApp calls as a run goes: ``on_round`` says each round, ``after_round``
    saves the model (``checkpoint``: the saver and every how many rounds) and the rounds so
    far (every round) where asked, ``keep_result`` takes the run's result at its end."""

    def __init__(
        self,
        config: ExperimentConfig,
        progress: _Progress,
        say: Callable[[str], None],
        resume: SavedModel | None,
        extra: Mapping[str, Any],
        checkpoint: tuple[Callable[[ExperimentConfig, SplitResult], object] | None, int],
        keep_progress: Callable[[dict[str, Any]], object] | None,
    ) -> None:
        self.config, self.progress, self.say, self.resume, self.extra = config, progress, say, resume, extra
        self.checkpoint, self.checkpoint_every = checkpoint
        self.keep_progress = keep_progress
        self.result: SplitResult | None = None
        self._summaries = OncePerRound(summarise_round)
        self._started = time.perf_counter()

    def wall_s(self) -> float:
        return time.perf_counter() - self._started

    def carried(self, rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A resumed run's entries follow the saved run's."""
        return rounds if self.resume is None else self.resume.carry_on(rounds)

    def on_round(self, server_round: int, record: dict[str, Any]) -> None:
        self.progress.round = server_round + 1
        self.say(_round_line(server_round, self.config.rounds, self._summaries(server_round, record)))
        for line in _failure_lines(record):
            self.say(line)

    def after_round(self, _: Context, result: SplitResult) -> None:
        if result.last_round >= self.config.rounds:
            return
        try:
            if self.checkpoint is not None and result.last_round % self.checkpoint_every == 0:
                self.checkpoint(self.config, result)
        finally:
            if self.keep_progress is not None:
                rounds = self.carried(self._summaries.each(result.rounds))
                self.keep_progress(progress_document(self.config, rounds, self.wall_s(), **self.extra))

    def keep_result(self, _: Context, result: SplitResult) -> None:
        self.result = result


def _clients_at_once(config: ExperimentConfig, given: int | None, say: Callable[[str], None]) -> int:
    """The clients a simulation trains at a time: ``given`` (at most as many as the strategy
    trains at once), else those that fit in memory, said where that is fewer."""
    wanted = clients_trained_at_once(config)
    if given is not None:
        return min(given, wanted)
    fit, fewer = clients_at_once_in_memory(wanted)
    if fewer:
        say(f"splitflower: warning: {fewer} (--clients-at-once N sets the number and trusts it to fit)")
    return fit


def _simulate(
    experiment: Experiment,
    server_app: ServerApp,
    clients_at_once: int,
    progress: _Progress,
    server_errors: Sequence[BaseException],
) -> BaseException | None:
    """Run the experiment's simulation with ``server_app``; what stopped it early, or None."""
    from flwr.simulation import run_simulation

    config = experiment.config
    with progress, sigterm_handler_kept():
        try:
            run_simulation(
                server_app=server_app,
                client_app=experiment.client_app(clients_at_once),
                num_supernodes=config.clients,
                backend_config=_backend_config(config, clients_at_once),
            )
        except Exception as err:
            # An error of the ServerApp's own (a strategy's, a server model's) is not Ray's.
            if not server_errors and not progress.started():
                raise SimulationStartError(_NEVER_STARTED) from err
            return err
        except BaseException as err:
            if not is_interruption(err):
                raise
            # Ctrl-C or SIGTERM: the rounds recorded so far are kept all the same.
            stopping()
            return err if isinstance(err, KeyboardInterrupt) else KeyboardInterrupt("SIGTERM")
    return None


NOT_ENDED: Final = "the run had not ended when this was written (it went on, or was killed)"


def progress_document(
    config: ExperimentConfig, rounds: list[dict[str, Any]], wall_s: float, **extra: Any
) -> dict[str, Any]:
    """The results document of a run still going after ``rounds`` (at least one), marked
    ``incomplete`` as :data:`NOT_ENDED`: what a progress file holds between rounds
    (:class:`~splitflower.results.ProgressWriter`), and what a killed run leaves."""
    return _incomplete_document(config, rounds, wall_s, NOT_ENDED, extra)


def _incomplete_document(
    config: ExperimentConfig, rounds: list[dict[str, Any]], wall_s: float, reason: str, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The results document of a run that has recorded ``rounds`` (some) but not all, and why."""
    incomplete = {"error": reason, "rounds_recorded": len(rounds), "rounds_planned": config.rounds}
    return results_document(
        config, rounds, wall_s, incomplete={**incomplete, "last_round": rounds[-1]["round"]}, **extra
    )


def _opening_line(config: ExperimentConfig, resume: SavedModel | None) -> str:
    """The line a run starts with: what runs, and which rounds."""
    rounds = f"{config.rounds} rounds"
    if resume is not None:
        rounds = f"rounds {resume.first_round} to {config.rounds} ({resume.path})"
    return (
        f"splitflower: {config.algorithm} / {config.strategy}, {config.dataset}, {config.model} cut {config.cut}, "
        f"{config.clients} clients, {rounds}"
    )


def _stopped_error(
    config: ExperimentConfig,
    rounds: list[dict[str, Any]],
    wall_s: float,
    stopped_by: BaseException,
    extra: Mapping[str, Any],
) -> BaseException:
    """What a run that ``stopped_by`` ended after recording ``rounds`` (the saved run's
    carried before them; none if it recorded none of its own) raises."""
    if not rounds and isinstance(stopped_by, SplitflowerError) and not isinstance(stopped_by, ExperimentFailedError):
        return stopped_by  # bad input (a strategy's assign, say) before any round: said as it is
    # No new round, no partial file (as in the example app): the saved run's rounds alone add nothing.
    error = stopped_early(config, rounds, wall_s, stopped_by, **extra)
    error.__cause__ = stopped_by
    return error


def _keep_what_was_recorded(
    config: ExperimentConfig,
    strategy: SplitStrategy,
    keep_model: Callable[[ExperimentConfig, SplitResult], None] | None,
) -> list[dict[str, Any]]:
    """A stopped run: give ``keep_model`` the weights of its last round worth keeping; return
    the results entries of the rounds it recorded."""
    # One snapshot for the rounds and the weights: an interrupted ServerApp may still be recording.
    recorded, kept = strategy.last_recorded, strategy.last_trained
    if keep_model is not None and kept is not None:
        try:
            keep_model(config, kept)
        except Exception:  # the run's own error is the one to report
            logger.exception("[server] keeping the weights of the last round recorded failed")
    return summarise_rounds(recorded.rounds) if recorded is not None else []


def _first_server_error(server_errors: Sequence[BaseException]) -> BaseException:
    """The ServerApp's error to report: the strategy's own verdict (an untrained round) first."""
    for error in server_errors:
        if isinstance(error, ExperimentFailedError):
            return error
    if server_errors:
        return server_errors[0]
    return RuntimeError("the simulation ended without a result; see the log above for the ServerApp's error")


def stopped_early(
    config: ExperimentConfig, rounds: list[dict[str, Any]], wall_s: float, error: BaseException, **extra: Any
) -> ExperimentFailedError | RunInterruptedError:
    """The :class:`ExperimentFailedError` of a run that ``error`` stopped, carrying the rounds
    it finished as a results document marked ``incomplete`` (none if it finished none)."""
    if isinstance(error, ExperimentFailedError):
        reason = str(error)
    elif isinstance(error, KeyboardInterrupt):
        reason = "interrupted (KeyboardInterrupt)"
    else:
        reason = f"{type(error).__name__}: {error}"
    # The last round trained, of the run or of the run it resumed.
    done = rounds[-1]["round"] if rounds else extra.get("resumed_from", {}).get("rounds", 0)
    partial = _incomplete_document(config, rounds, wall_s, reason, extra) if rounds else None
    if isinstance(error, KeyboardInterrupt):
        return RunInterruptedError(f"interrupted after {done} of {config.rounds} rounds", partial)
    if isinstance(error, ExperimentFailedError):
        return ExperimentFailedError(reason, partial)
    return ExperimentFailedError(f"the run stopped after {done} of {config.rounds} rounds: {reason}", partial)


_OFFLINE_ENVIRONMENT: Final = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
}


def _backend_config(config: ExperimentConfig, clients_at_once: int | None = None) -> dict[str, Any]:
    concurrent = clients_at_once or clients_trained_at_once(config)
    # Ray hides the GPUs from actors that ask for none: clients on CUDA share them.
    gpus_per_client = 1 / concurrent if config.device.startswith("cuda") else 0.0
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": gpus_per_client},
        "init_args": {"num_cpus": concurrent, "include_dashboard": False},
    }


def _round_line(server_round: int, rounds: int, entry: Mapping[str, Any]) -> str:
    return (
        f"round {server_round}/{rounds}: test accuracy {entry.get('test_accuracy', float('nan')):.4f}, "
        f"up {entry['bytes']['up_payload_bytes'] / 1e6:.1f} MB, "
        f"down {entry['bytes']['down_payload_bytes'] / 1e6:.1f} MB, "
        f"{entry['seconds']:.1f}s"
    )


def _failure_lines(record: Mapping[str, Any]) -> list[str]:
    """A line per client of the round whose code raised, with what it raised (the strategy's
    log says which clients did not reply in time or whose replies it left out)."""
    lines = []
    for entry in record["clients"]:
        if "error" in entry and entry["error"] != NO_REPLY:
            who = f"client {entry['index']}" if entry["index"] >= 0 else f"node {entry['node_id']}"
            lines.append(f"  {who} failed: {raised_by_client(entry['error'])}")
    return lines


def run_experiment_owning_the_process(
    config: ExperimentConfig,
    *,
    say: Callable[[str], None] = print,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S,
    keep_partial: Callable[[dict[str, Any]], None] | None = None,
    keep_model: Callable[[ExperimentConfig, SplitResult], None] | None = None,
    resume: SavedModel | None = None,
    checkpoint: Callable[[ExperimentConfig, SplitResult], object] | None = None,
    checkpoint_every: int = 1,
    clients_at_once: int | None = None,
    keep_progress: Callable[[dict[str, Any]], object] | None = None,
) -> dict[str, Any]:
    """:func:`run_experiment` for a caller that owns its process (the CLI, a reproduce cell).

    When Ray's node fails to start, Flower's ServerApp thread waits for replies forever, and
    a normal exit would wait for that thread: the process would never end. So if no client
    reaches a server model within ``startup_timeout`` seconds, or the simulation fails before
    one does, the process ends with :data:`STALLED_EXIT_CODE` (running it again is the cure).
    A run that fails later, or is interrupted (Ctrl-C, or SIGTERM: the first one; those after it
    are ignored, see :mod:`splitflower._termination`), hands the rounds it recorded (a results
    document marked ``incomplete``) to ``keep_partial`` and ends the process with
    :data:`CRASHED_EXIT_CODE` or :data:`INTERRUPTED_EXIT_CODE`, saying why: the ServerApp's
    thread may still be waiting for replies. A bad config or dataset, found before the
    simulation starts, raises its :class:`~splitflower.errors.SplitflowerError` as usual.
    """
    with sigterm_as_ctrl_c():  # the handler before is put back when the run returns
        try:
            return run_experiment(
                config,
                say=say,
                startup_timeout=startup_timeout,
                on_stall=_end_stalled,
                keep_model=keep_model,
                resume=resume,
                checkpoint=checkpoint,
                checkpoint_every=checkpoint_every,
                clients_at_once=clients_at_once,
                keep_progress=keep_progress,
            )
        except SimulationStartError as err:
            traceback.print_exc()
            _end_stalled(str(err))
        except (ExperimentFailedError, RunInterruptedError) as err:
            _end_stopped_run(err, keep_partial)
        except SplitflowerError:
            raise
        except KeyboardInterrupt:  # a second Ctrl-C, while the first was being handled
            _end_process(INTERRUPTED_EXIT_CODE, "splitflower: interrupted")
        except Exception:  # noqa: BLE001 - reported, then the process ends at once
            traceback.print_exc()
            _end_process(CRASHED_EXIT_CODE, "splitflower: error: the simulation failed (traceback above)")


def _end_stopped_run(
    error: ExperimentFailedError | RunInterruptedError, keep_partial: Callable[[dict[str, Any]], None] | None
) -> NoReturn:
    """Show where a run's own bug raised, keep its recorded rounds, and end the process, whatever
    happens meanwhile (a closed pipe, a second Ctrl-C): the ServerApp's thread may be alive."""
    interrupted = isinstance(error, RunInterruptedError)
    try:
        cause = error.__cause__
        if cause is not None and not isinstance(cause, SplitflowerError | KeyboardInterrupt):
            traceback.print_exception(cause)
        if error.partial_results is not None and keep_partial is not None:
            keep_partial(error.partial_results)
    except BaseException:  # noqa: BLE001 - said if it can be, then the process ends all the same
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        _end_process(
            INTERRUPTED_EXIT_CODE if interrupted else CRASHED_EXIT_CODE,
            f"splitflower: {error}" if interrupted else f"splitflower: error: {error}",
        )


def _end_stalled(message: str) -> NoReturn:
    _end_process(STALLED_EXIT_CODE, f"splitflower: error: {message}")


def _end_process(code: int, message: str) -> NoReturn:
    with contextlib.suppress(BaseException):  # a closed pipe must not keep the process alive
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
    os._exit(code)

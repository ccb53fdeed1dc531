"""Builders that turn a strategy, a server-model factory and a client factory into Flower apps.

The ServerApp hosts the split-learning gRPC service for the run's lifetime and hands its
address and a per-round token to each client in the round's ConfigRecord; Flower messages
carry only that control and the client-segment weights. Run-config keys the ServerApp
reads (all optional): ``num-server-rounds`` (default 1), ``sf-round-timeout`` (seconds a
round waits for its clients' replies, default 3600), ``sf-node-wait-timeout`` (seconds a round
waits for the strategy's ``min_available_nodes`` to be connected, e.g. after a SuperNode was
lost; default the strategy's own, 300), ``sf-host`` (default 127.0.0.1),
``sf-port`` (0 = any free port), ``sf-advertised-host``, ``sf-max-message-bytes``, and for
TLS ``sf-tls-certificate``, ``sf-tls-private-key``, ``sf-tls-root-certificates`` (paths to
PEM files), and ``sf-tls-client-ca`` (PEM path: require each client to present a certificate
it signed). A ClientApp reads its own certificate, for such a service, from its SuperNode's
node config: ``sf-tls-client-certificate`` and ``sf-tls-client-private-key`` (PEM paths on the
device; ``flower-supernode --node-config``).
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from splitflower._checks import checked_count, checked_seconds
from splitflower._client_states import own_state_record
from splitflower._fork import fork_handlers_warning
from splitflower._tensor_record import record_tensors, tensor_record
from splitflower.client import Client
from splitflower.compute import run_on_compute_thread
from splitflower.errors import ConfigError, ResultsFileError
from splitflower.proxy import ServerModelProxy
from splitflower.server_model import FitResult, ServerModel
from splitflower.service import SplitService, TlsConfig
from splitflower.strategy import DEFAULT_ROUND_TIMEOUT_S, CentralEvaluateFn, SplitResult, SplitStrategy
from splitflower.wire import DEFAULT_MAX_MESSAGE_BYTES, ConfigKey, MetricKey, RecordKey

__all__ = [
    "DEFAULT_ROUND_TIMEOUT_S",
    "NODE_WAIT_TIMEOUT_KEY",
    "ROUND_TIMEOUT_KEY",
    "round_timeout_from_run_config",
    "build_server_app",
    "build_client_app",
    "service_from_run_config",
    "client_certificate_from_node_config",
    "NUM_SERVER_ROUNDS_KEY",
    "TLS_CLIENT_CA_KEY",
    "TLS_CLIENT_CERTIFICATE_KEYS",
    "client_reply_metrics",
]

logger = logging.getLogger(__name__)

ROUND_TIMEOUT_KEY = "sf-round-timeout"
NUM_SERVER_ROUNDS_KEY = "num-server-rounds"  # Flower's own templates' name for it
NODE_WAIT_TIMEOUT_KEY = "sf-node-wait-timeout"
TLS_CLIENT_CA_KEY = "sf-tls-client-ca"
"""Run-config key: PEM path of the CA whose certificates the service requires of clients (mutual TLS)."""
TLS_CLIENT_CERTIFICATE_KEYS = ("sf-tls-client-certificate", "sf-tls-client-private-key")
"""Node-config keys of a client's own certificate chain and key (PEM paths), for mutual TLS."""


def _read_pem(config: Mapping[str, Any], key: str, source: str = "run config") -> bytes:
    path = Path(str(config[key]))
    if not path.is_file():
        raise ConfigError(f"{source} {key!r} must name a PEM file; {path} does not exist")
    return path.read_bytes()


def client_certificate_from_node_config(node_config: Mapping[str, Any]) -> tuple[bytes, bytes] | None:
    """The client's (certificate chain, private key) its node config names, or None if it names none."""
    given = [k for k in TLS_CLIENT_CERTIFICATE_KEYS if node_config.get(k)]
    if not given:
        return None
    if len(given) != len(TLS_CLIENT_CERTIFICATE_KEYS):
        raise ConfigError(f"a client certificate needs all of {list(TLS_CLIENT_CERTIFICATE_KEYS)}; got only {given}")
    chain, key = (_read_pem(node_config, k, "node config") for k in TLS_CLIENT_CERTIFICATE_KEYS)
    chain_path, key_path = (str(node_config[k]) for k in TLS_CLIENT_CERTIFICATE_KEYS)
    try:  # gRPC would only say "unreachable" at the first call
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(chain_path, key_path)
    except ssl.SSLError as err:
        raise ConfigError(
            f"node config {list(TLS_CLIENT_CERTIFICATE_KEYS)} must name a PEM certificate chain and its PEM "
            f"private key; {chain_path} and {key_path} are not such a pair ({err.reason or err})"
        ) from err
    return chain, key


def service_from_run_config(run_config: Mapping[str, Any]) -> SplitService:
    """Build (not start) the split-learning service the run config describes.

    Empty values count as unset, so an app can declare every key (Flower refuses
    ``--run-config`` overrides of undeclared keys) with ``""`` as its default.
    """
    tls_keys = ("sf-tls-certificate", "sf-tls-private-key", "sf-tls-root-certificates")
    given = [k for k in tls_keys if run_config.get(k)]
    if given and len(given) != len(tls_keys):
        raise ConfigError(f"TLS needs all of {list(tls_keys)}; got only {given}")
    mutual = bool(run_config.get(TLS_CLIENT_CA_KEY))
    if mutual and not given:
        raise ConfigError(f"{TLS_CLIENT_CA_KEY!r} (mutual TLS) needs TLS too: set {list(tls_keys)}")
    tls = None
    if given:
        certificate, private_key, roots = (_read_pem(run_config, k) for k in tls_keys)
        client_ca = _read_pem(run_config, TLS_CLIENT_CA_KEY) if mutual else None
        tls = TlsConfig(certificate, private_key, roots, client_ca=client_ca)
    try:
        port = int(run_config.get("sf-port") or 0)
        max_bytes = int(run_config.get(ConfigKey.MAX_MESSAGE_BYTES) or DEFAULT_MAX_MESSAGE_BYTES)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sf-port and sf-max-message-bytes must be integers: {err}") from err
    return SplitService(
        str(run_config.get("sf-host") or "127.0.0.1"),
        port,
        advertised_host=str(run_config.get("sf-advertised-host") or "") or None,
        max_message_bytes=max_bytes,
        tls=tls,
    )


def round_timeout_from_run_config(run_config: Mapping[str, Any]) -> float:
    """The run config's ``sf-round-timeout`` in seconds (empty or absent: the default)."""
    seconds = _seconds_from_run_config(run_config, ROUND_TIMEOUT_KEY)
    return DEFAULT_ROUND_TIMEOUT_S if seconds is None else seconds


def _seconds_from_run_config(run_config: Mapping[str, Any], key: str) -> float | None:
    value = run_config.get(key)
    if value in (None, ""):
        return None
    return checked_seconds(value, f"run config {key!r}")


def _rounds_from_run_config(run_config: Mapping[str, Any]) -> int:
    return checked_count(run_config.get(NUM_SERVER_ROUNDS_KEY, 1), f"run config {NUM_SERVER_ROUNDS_KEY!r}")


def build_server_app(
    strategy: Callable[[Context], SplitStrategy],
    server_model: Callable[[Context], ServerModel],
    *,
    initial_client_weights: Callable[[Context], Mapping[str, torch.Tensor]],
    train_config: Callable[[Context], Mapping[str, Any]] | None = None,
    central_evaluate: Callable[[Context], CentralEvaluateFn | None] | None = None,
    on_result: Callable[[Context, SplitResult], None] | None = None,
    on_round: Callable[[int, dict[str, Any]], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_stopped: Callable[[Context, dict[int, dict[str, Any]], BaseException], None] | None = None,
    num_rounds: int | None = None,
    round_timeout: float | None = None,
    initial_server_weights: Callable[[Context], Mapping[str, torch.Tensor] | None] | None = None,
    first_round: Callable[[Context], int] | None = None,
    checkpoint: Callable[[Context, SplitResult], None] | None = None,
) -> ServerApp:
    """A Flower ServerApp that runs ``strategy`` with server models from ``server_model``.

    ``num_rounds`` overrides the run config's ``num-server-rounds``. A run resumed from
    weights saved after round k gives both parties' weights (``initial_client_weights``,
    ``initial_server_weights``; None, or a callable that returns None: the first server
    model's own) and
    ``first_round`` (k + 1; default 1; see :mod:`splitflower.checkpoint`). ``on_error`` is called
    with any exception the ServerApp raises (a bug in a strategy or server model, say),
    before Flower receives it. ``on_stopped(context, rounds, error)`` is called when the run
    fails after recording at least one round, with the strategy's records of them (those
    ``on_round`` was given: ``SplitStrategy.last_recorded.rounds``), so that they can be kept
    (see :func:`splitflower.simulation.stopped_early`). ``checkpoint(context, result)`` is
    called after every round that does not stop the run, before ``on_round`` (what a run says
    it finished is on disk), with the run so far (``SplitStrategy.last_trained``): where a
    long run saves its weights
    (:func:`splitflower.checkpoint.save_model`) so that a killed process loses no more than a
    round. A :class:`~splitflower.errors.ResultsFileError` it raises (a full disk, say) is
    logged and the run goes on; any other error ends the run, as ``on_round``'s does.
    ``on_round(server_round, record)`` gets the round's record as the strategy keeps it (and a
    :class:`~splitflower.checkpoint.ModelWriter` has saved it): read it, do not change it.
    ``round_timeout``: seconds a round waits for its clients' replies (under a strategy that
    serves clients in turn, for each client's); a client that has not replied by then is
    recorded as failed, and the round goes on without it. None: the run config's
    ``sf-round-timeout``, else :data:`DEFAULT_ROUND_TIMEOUT_S`.

    Example
    -------
    >>> app = build_server_app(  # doctest: +SKIP
    ...     lambda ctx: ParallelStrategy(),
    ...     lambda ctx: CSLServerModel(top),
    ...     initial_client_weights=lambda ctx: {"segment." + k: v for k, v in bottom.state_dict().items()},
    ... )
    """
    if round_timeout is not None:
        checked_seconds(round_timeout, "round_timeout")
    run = _ServerRun(
        strategy,
        server_model,
        initial_client_weights,
        train_config=train_config,
        central_evaluate=central_evaluate,
        initial_server_weights=initial_server_weights,
        first_round=first_round,
        num_rounds=num_rounds,
        round_timeout=round_timeout,
        hooks=_ServerHooks(on_result, on_round, on_error, on_stopped, checkpoint),
    )
    app = ServerApp()
    app.main()(run.main)
    return app


@dataclass(frozen=True)
class _ServerHooks:
    """What :func:`build_server_app` calls back, as its docstring says."""

    on_result: Callable[[Context, SplitResult], None] | None
    on_round: Callable[[int, dict[str, Any]], None] | None
    on_error: Callable[[BaseException], None] | None
    on_stopped: Callable[[Context, dict[int, dict[str, Any]], BaseException], None] | None
    checkpoint: Callable[[Context, SplitResult], None] | None


def _fork_handlers_warning(grid: Grid) -> str | None:
    """The fork-handlers warning (:mod:`splitflower._fork`) where a fork follows: in a
    simulation, whose backend (Ray) starts in this process and forks its own. Under the
    deployment runtime this process forks nothing, and Flower starts its processes by vfork,
    which runs no fork handler (``benchmarks/ray_start.py``), so there is nothing to warn of."""
    try:  # Flower does not export its simulation's grid
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    except ImportError:  # moved in a later Flower: warn wherever, rather than nowhere
        return fork_handlers_warning()
    return fork_handlers_warning() if isinstance(grid, InMemoryGrid) else None


@dataclass(frozen=True)
class _ServerRun:
    """The ServerApp's ``main``: one run of the strategy, with the service up throughout."""

    strategy: Callable[[Context], SplitStrategy]
    server_model: Callable[[Context], ServerModel]
    initial_client_weights: Callable[[Context], Mapping[str, torch.Tensor]]
    train_config: Callable[[Context], Mapping[str, Any]] | None
    central_evaluate: Callable[[Context], CentralEvaluateFn | None] | None
    initial_server_weights: Callable[[Context], Mapping[str, torch.Tensor] | None] | None
    first_round: Callable[[Context], int] | None
    num_rounds: int | None
    round_timeout: float | None
    hooks: _ServerHooks

    def main(self, grid: Grid, context: Context) -> None:
        """Read the run config, start the service, train, and stop the service whatever happens;
        a failure goes to ``on_error`` and, with rounds recorded, to ``on_stopped``, then to Flower."""
        service: SplitService | None = None
        split_strategy: SplitStrategy | None = None
        hooks = self.hooks
        if warning := _fork_handlers_warning(grid):
            logger.warning("[server] %s", warning)
        try:
            # The run config is read before anything starts: a bad value fails the run at once.
            timeout = self.round_timeout or round_timeout_from_run_config(context.run_config)
            node_wait = _seconds_from_run_config(context.run_config, NODE_WAIT_TIMEOUT_KEY)
            rounds = self.num_rounds or _rounds_from_run_config(context.run_config)
            service = service_from_run_config(context.run_config)
            service.start()
            split_strategy = self.strategy(context)
            if node_wait is not None:
                split_strategy.node_wait_timeout = node_wait
            result = self._train(grid, context, split_strategy, service, rounds, timeout)
            if hooks.on_result is not None:
                hooks.on_result(context, result)
        except BaseException as err:
            if hooks.on_error is not None:
                hooks.on_error(err)
            recorded = split_strategy.last_recorded if split_strategy is not None else None
            if hooks.on_stopped is not None and recorded is not None and recorded.rounds:
                _keep_recorded_rounds(hooks.on_stopped, context, recorded.rounds, err)
            raise
        finally:
            if service is not None:
                service.stop()

    def _train(
        self,
        grid: Grid,
        context: Context,
        split_strategy: SplitStrategy,
        service: SplitService,
        rounds: int,
        timeout: float,
    ) -> SplitResult:
        """``split_strategy``'s rounds, from the app's initial weights and config."""
        config = ConfigRecord(dict(self.train_config(context)) if self.train_config else {})
        return split_strategy.start(
            grid,
            ArrayRecord(dict(run_on_compute_thread(self.initial_client_weights, context))),
            num_rounds=rounds,
            timeout=timeout,
            train_config=config,
            evaluate_fn=self.central_evaluate(context) if self.central_evaluate else None,
            service=service,
            server_model_factory=lambda: self.server_model(context),
            initial_server_arrays=_initial_server_arrays(self.initial_server_weights, context),
            on_round=_after_round(self.hooks.on_round, self.hooks.checkpoint, context, split_strategy),
            first_round=self.first_round(context) if self.first_round is not None else 1,
        )


def _after_round(
    on_round: Callable[[int, dict[str, Any]], None] | None,
    checkpoint: Callable[[Context, SplitResult], None] | None,
    context: Context,
    strategy: SplitStrategy,
) -> Callable[[int, dict[str, Any]], None] | None:
    """The strategy's ``on_round``: the app's ``checkpoint`` of the run so far, then its ``on_round``."""
    if checkpoint is None:
        return on_round

    def after_round(server_round: int, record: dict[str, Any]) -> None:
        kept = strategy.last_trained
        if kept is not None and kept is strategy.last_recorded:  # not a round that stops the run
            try:
                checkpoint(context, kept)
            except ResultsFileError as err:
                logger.warning("[server] the weights after round %d are not kept: %s", server_round, err)
        if on_round is not None:
            on_round(server_round, record)

    return after_round


def _initial_server_arrays(
    weights: Callable[[Context], Mapping[str, torch.Tensor] | None] | None, context: Context
) -> ArrayRecord | None:
    given = run_on_compute_thread(weights, context) if weights is not None else None
    return ArrayRecord(dict(given)) if given is not None else None


def _keep_recorded_rounds(
    on_stopped: Callable[[Context, dict[int, dict[str, Any]], BaseException], None],
    context: Context,
    recorded: dict[int, dict[str, Any]],
    error: BaseException,
) -> None:
    try:
        on_stopped(context, recorded, error)
    except Exception:  # the run's own error is the one Flower must see
        logger.exception("[server] keeping the %d recorded round(s) of a failed run failed too", len(recorded))


def _fit_then_close(
    client: Client, proxy: ServerModelProxy, arrays: ArrayRecord, config: Mapping[str, Any]
) -> FitResult:
    """``client.fit`` on ``arrays``, then close its proxy, so that its server model waits for
    it no longer, whatever failed. If loading or fit failed, its error is the one raised: the
    proxy's, after it (often the same failure seen again), is only logged."""
    try:
        fit = client.fit(arrays.to_torch_state_dict() if len(arrays) else {}, config)
    except BaseException:
        try:
            proxy.close()
        except Exception as err:  # noqa: BLE001 - the fit error above is the one to report
            logger.warning("%s closing the proxy after a failed round failed too: %s", client.log_prefix, err)
        raise
    proxy.close()
    return fit


def client_reply_metrics(
    client: Client, proxy: ServerModelProxy, examples: int, metrics: Mapping[str, float]
) -> dict[str, float]:
    """The flat metrics a client reports: its own, traffic, time split and memory."""
    out: dict[str, float] = {RecordKey.NUM_EXAMPLES: float(examples), **{k: float(v) for k, v in metrics.items()}}
    out.update({k: float(v) for k, v in proxy.traffic.totals().items()})
    times = proxy.times.seconds
    wall = float(metrics.get("client_wall_s", 0.0))
    blocked, server = times["blocked_s"], times["server_compute_s"]
    out[MetricKey.CLIENT_COMPUTE_S] = max(wall - blocked, 0.0)
    out[MetricKey.SERVER_COMPUTE_S] = server
    out[MetricKey.COMMUNICATION_WAIT_S] = max(blocked - server, 0.0)
    out.update(client.memory.summary("client"))
    return out


def build_client_app(client: Callable[[Context], Client]) -> ClientApp:
    """A Flower ClientApp whose train handler runs ``client(context).fit`` over the proxy,
    and whose query handler tells the strategy which client the node is (its ``client_id``,
    read from ``client(context)`` at the start of each round: a factory that loads data
    should load it once per process, as :class:`~splitflower.experiment.Experiment`'s does).

    Per-client state (:meth:`Client.local_state`) is kept in ``context.state``: in
    simulation, actors are shared between virtual clients, so nothing per-client may live
    in module globals. It also goes with each reply, so that the strategy can keep it for a
    model file, and comes back in a resumed run's first message.
    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = dict(msg.content[RecordKey.CONFIG])  # type: ignore[call-overload]
        arrays: ArrayRecord = msg.content[RecordKey.ARRAYS]  # type: ignore[assignment]
        instance = client(context)
        _restore_local_state(instance, msg.content, context)
        instance.handed_optimizer_state = _handed_optimizer_state(msg.content)
        proxy = _proxy_from_config(config, instance, context.node_config)
        instance.server_model_proxy = proxy
        fit = _fit_then_close(instance, proxy, arrays, config)
        local = instance.local_state()
        if local:
            context.state[RecordKey.LOCAL_STATE] = ArrayRecord(local)
        manifest = json.dumps({"manifest": proxy.traffic.manifest(), "by_method": proxy.traffic.by_method()})
        content = RecordDict(
            {
                RecordKey.ARRAYS: ArrayRecord(fit.weights),
                RecordKey.METRICS: MetricRecord(client_reply_metrics(instance, proxy, fit.num_examples, fit.metrics)),  # type: ignore[arg-type]
                RecordKey.WIRE_MANIFEST: ConfigRecord({RecordKey.VALUE: manifest}),
            }
        )
        _add_client_id(content, instance.client_id)
        if local:  # the strategy keeps it, so that a model file holds it
            content[RecordKey.LOCAL_STATE] = own_state_record(local, fit.weights)
        if config.get(ConfigKey.HAND_OVER_OPTIMIZER):
            content[RecordKey.OPTIMIZER] = tensor_record(instance.optimizer_state())
        return Message(content=content, reply_to=msg)

    @app.query()
    def identify(msg: Message, context: Context) -> Message:
        # The strategy orders its clients, and finds two nodes that are one client, by this.
        if RecordKey.IDENTIFY not in msg.content:
            raise ConfigError(
                f"a splitflower ClientApp answers only the strategy's identification query (a "
                f"ConfigRecord named {RecordKey.IDENTIFY!r}); got records {sorted(msg.content.keys())}"
            )
        content = RecordDict()
        _add_client_id(content, client(context).client_id)
        return Message(content=content, reply_to=msg)

    return app


def _add_client_id(content: RecordDict, client_id: int | str | None) -> None:
    """Name the client in a reply (the strategy reads it with ``_reported_client_id``)."""
    if client_id is not None:
        content[RecordKey.CLIENT_ID] = ConfigRecord({RecordKey.VALUE: client_id})


def _restore_local_state(client: Client, content: RecordDict, context: Context) -> None:
    """Give ``client`` the state it kept of its own: from the message when the strategy sends
    it (a resumed run's first round), else from Flower's context (the last round it trained)."""
    if RecordKey.LOCAL_STATE in content:
        client.load_local_state(record_tensors(content[RecordKey.LOCAL_STATE], "the client's own state"))
    elif RecordKey.LOCAL_STATE in context.state:
        client.load_local_state(context.state[RecordKey.LOCAL_STATE].to_torch_state_dict())  # type: ignore[union-attr]


def _handed_optimizer_state(content: RecordDict) -> dict[str, torch.Tensor]:
    """The optimizer state a message carries (see :func:`tensor_record`), or none."""
    record = content.get(RecordKey.OPTIMIZER)
    return {} if record is None else record_tensors(record, "the handed-on optimizer state")


def _proxy_from_config(
    config: Mapping[str, Any], client: Client, node_config: Mapping[str, Any] | None = None
) -> ServerModelProxy:
    """The proxy the round config describes. Where the service serves over TLS, the node
    presents the certificate its node config names, if any (a service without mutual TLS
    does not ask for it; one with it refuses a node without one)."""
    missing = [k for k in (ConfigKey.PROXY_ADDRESS, ConfigKey.TOKEN) if k not in config]
    if missing:
        raise ConfigError(f"round config lacks {missing}; was this message sent by a SplitStrategy?")
    roots = config.get(ConfigKey.ROOT_CERTIFICATES) or None
    return ServerModelProxy(
        str(config[ConfigKey.PROXY_ADDRESS]),
        bytes(config[ConfigKey.TOKEN]),
        root_certificates=roots,
        max_message_bytes=int(config.get(ConfigKey.MAX_MESSAGE_BYTES, DEFAULT_MAX_MESSAGE_BYTES)),
        default_timeout=float(config[ConfigKey.CALL_TIMEOUT]) if ConfigKey.CALL_TIMEOUT in config else None,
        max_in_flight=client.max_in_flight,
        log_prefix=client.log_prefix,
        memory=client.memory,
        client_certificate=client_certificate_from_node_config(node_config or {}) if roots else None,
    )

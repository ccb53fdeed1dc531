"""The split-learning strategy: Flower's FedAvg plus server models, routing and scheduling."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from splitflower._checks import checked_seconds
from splitflower._client_errors import raised_by_client
from splitflower._client_states import CLIENT_STATE_PREFIX, ClientStates
from splitflower.compute import run_on_compute_thread
from splitflower.errors import ConfigError, ExperimentFailedError, NotEnoughNodesError
from splitflower.linkemu import LinkEmulator, LinkSpec
from splitflower.scheduling import (
    DEFAULT_FLUSH_TIMEOUT_S,
    DEFAULT_REQUEST_ORDER,
    REQUEST_ORDERS,
    BatchingScheduler,
    ImmediateScheduler,
    OrderedScheduler,
    Scheduler,
    checked_flush_timeout,
)
from splitflower.server_model import FitResult, ServerModel
from splitflower.service import ClientSession, SplitService
from splitflower.wire import MAX_IN_FLIGHT, ConfigKey, RecordKey

__all__ = ["DEFAULT_ROUND_TIMEOUT_S", "NO_REPLY", "SplitStrategy", "SplitResult", "RoundPlan", "CentralEvaluateFn"]

logger = logging.getLogger(__name__)

# How often replies are pulled from a grid without a pull_interval (in Flower 1.41 only the
# in-memory grid has one; its deployment grid waits 3 s between pulls): a round ends this soon
# after its last reply, a failed client stops holding batches this soon, and a pull is one small call.
_PULL_INTERVAL_S = 0.5

# FedAvg warns of this on every construction; a split strategy evaluates centrally (or not) by design.
_NO_FEDERATED_EVALUATION_WARNING = "fraction_evaluate is set to 0.0"


@contextlib.contextmanager
def _without_flower_warning(starting: str) -> Iterator[None]:
    """Drop Flower's log records whose message starts with ``starting`` while the block runs."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(starting)

    flower = logging.getLogger("flwr")
    flower.addFilter(keep)
    try:
        yield
    finally:
        flower.removeFilter(keep)


CentralEvaluateFn = Callable[[int, ArrayRecord, ArrayRecord], Mapping[str, float] | None]


@dataclass
class RoundPlan:
    """Who trains this round, and which server model serves each of them."""

    server_round: int
    node_ids: list[int]
    server_models: list[ServerModel]
    schedulers: list[Scheduler]
    assignment: dict[int, int]
    tokens: dict[int, bytes] = field(default_factory=dict)
    sessions: dict[int, ClientSession] = field(default_factory=dict)
    left_out: dict[int, str] = field(default_factory=dict)
    """Clients whose reply could not be aggregated, and why."""
    reply_keys: tuple[frozenset[str], frozenset[str]] | None = None
    """Weight and metric names of the round's first accepted reply: Flower averages only
    replies that agree on them."""
    sent: list[Message] = field(default_factory=list)
    """The round's train messages: a reply names the one it answers (Flower gives each an id
    as it sends it)."""

    def sender(self, reply: Message) -> int:
        """The client a reply is about. Not always its source: the SuperLink answers for a
        node it lost with an error reply of its own."""
        return _sender(self.sent, reply)


def _sender(sent: Iterable[Message], reply: Message) -> int:
    """The node of the message in ``sent`` that ``reply`` answers (else the reply's source)."""
    answered = reply.metadata.reply_to_message_id
    for message in sent:
        if answered and message.metadata.message_id == answered:
            return message.metadata.dst_node_id
    return reply.metadata.src_node_id


@dataclass
class SplitResult(Result):
    """Flower's :class:`Result` plus the server-side weights and per-round measurements."""

    server_arrays: ArrayRecord = field(default_factory=ArrayRecord)
    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)
    strategy_state: dict[str, torch.Tensor] = field(default_factory=dict)
    """What the strategy carries on after the last round besides the weights (:meth:`SplitStrategy.carried_state`)."""

    @property
    def last_round(self) -> int:
        """The number of the last round recorded (0: none), which the weights are the result of."""
        return max(self.rounds, default=0)


DEFAULT_ROUND_TIMEOUT_S = 3600.0  # Flower's own default for a strategy's round
_NODE_WAIT_REPORT_S = 15.0  # how often a round still waiting for its clients says so
# The error a round records for a client that did not reply in time (sf-round-timeout, round_timeout).
NO_REPLY: Final = "no reply before the round's timeout"


class SplitStrategy(FedAvg):
    """Samples clients, places server models, schedules requests, aggregates both sides.

    Built on Flower's :class:`~flwr.serverapp.strategy.FedAvg`: its sampling, message
    construction, reply checks and example-weighted averaging are reused as they are.
    What split learning adds lives in six hooks a subclass may override:

    * :meth:`order_clients` - the order of the round's sampled clients (default: by client id);
    * :meth:`num_server_models` - how many server models exist this round (default 1);
    * :meth:`assign` - which of them serves the i-th sampled client (default 0);
    * :meth:`make_scheduler` - when requests run: a request of each client in turn, in the
      clients' order (default), as they arrive (``request_order="arrival"``), or batched
      across clients (``batching=True``); gathering waits ``flush_timeout`` at most, so it
      can never wait forever;
    * :meth:`train_round` - how the round's clients are driven: all at once (default) or,
      e.g., one after another; send through :meth:`send_and_receive` and hand the replies
      to :meth:`collect`, so that a failed client holds no other's requests;
    * :meth:`reply_problem` - what a client's reply must hold to be aggregated (a reply
      lacking it is left out with a warning, never ends the run).

    A strategy that carries state from round to round besides the weights (the sequential
    strategy's handed-on optimizer state) says so in :meth:`carried_state` and
    :meth:`load_carried_state`, so that a saved run resumes with it. Every strategy carries
    the state clients keep of their own (:meth:`Client.local_state
    <splitflower.client.Client.local_state>`, sent with their replies) that way.

    ``request_order``: where clients that train at once share a server model, ``"clients"``
    (default) runs a request of each in turn, in the clients' order, so the model steps in the
    same order in every run and the run repeats bit for bit; ``"arrival"`` runs each request
    as soon as the model is free, so no client waits for a slower one (devices of unequal
    speed), and the order, hence the weights to rounding, differs from run to run.

    ``call_timeout`` (seconds) becomes the default deadline of every proxy call.
    ``node_wait_timeout`` (seconds): how long a round waits for ``min_available_nodes``
    (and ``min_train_nodes``) to connect before the run fails saying how many did.
    ``link`` (a :class:`~splitflower.linkemu.LinkSpec`) puts an emulated link between each
    client and the service: clients are handed a relay's address (:mod:`splitflower.linkemu`).

    Server models are averaged by examples trained, like client segments; every server model
    starts each round from that average (per-client server models that stay apart would
    override ``aggregate_server_models``). ``hands_on`` is read by the sequential strategy
    (:class:`~splitflower.strategies.SequentialStrategy`): whether it hands each client's
    segment on to the next. Sampling is FedAvg's: ``fraction_train`` of the connected nodes,
    at least ``min_train_nodes``, once ``min_available_nodes`` are connected; but seeded (the
    train config's ``ConfigKey.SEED`` and the round) and drawn by client id, so repeatable.

    Example
    -------
    >>> class OneServerModelPerClient(SplitStrategy):
    ...     def num_server_models(self, num_clients: int) -> int:
    ...         return num_clients
    ...     def assign(self, index: int, num_clients: int) -> int:
    ...         return index
    """

    hands_on = False
    clients_at_once = True
    """Whether the round's clients train at the same time (:meth:`train_round`'s default); a
    strategy that drives them one after another sets it False (requests then need no order)."""
    carried_names: ClassVar[Mapping[str, str]] = {}
    """The name prefixes of what a subclass adds to :meth:`carried_state`, each with what it is."""

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        min_available_nodes: int = 1,
        batching: bool = False,
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT_S,
        request_order: str = DEFAULT_REQUEST_ORDER,
        call_timeout: float | None = None,
        link: LinkSpec | None = None,
        node_wait_timeout: float = 300.0,
    ) -> None:
        if request_order not in REQUEST_ORDERS:
            raise ConfigError(f"request_order must be one of {list(REQUEST_ORDERS)}, got {request_order!r}")
        if call_timeout is not None:
            checked_seconds(call_timeout, "call_timeout")
        checked_seconds(node_wait_timeout, "node_wait_timeout")
        with _without_flower_warning(_NO_FEDERATED_EVALUATION_WARNING):
            super().__init__(
                fraction_train=fraction_train,
                fraction_evaluate=0.0,
                min_train_nodes=min_train_nodes,
                min_evaluate_nodes=0,
                min_available_nodes=min_available_nodes,
                weighted_by_key=RecordKey.NUM_EXAMPLES,
                arrayrecord_key=RecordKey.ARRAYS,
                configrecord_key=RecordKey.CONFIG,
            )
        self.batching = batching
        self.flush_timeout = checked_flush_timeout(flush_timeout)
        self.request_order = request_order
        self.call_timeout = call_timeout
        self.link = link
        self.node_wait_timeout = node_wait_timeout
        self._client_address = ""
        self.last_recorded: SplitResult | None = None
        """The run's result as of its last recorded round (its weights and records), kept
        while :meth:`start` runs, so that a run that fails later still has them."""
        self.last_trained: SplitResult | None = None
        """As :attr:`last_recorded`, but of the last round worth keeping the weights of: a
        round that stops the run (no client trained in it, or two nodes were one client) is
        recorded, not kept."""
        self._server_models: list[ServerModel] = []
        self._client_ids: dict[int, int | str | None] = {}  # node -> client id, from its last answer
        self._client_states = ClientStates()
        self._service: SplitService
        self._server_model_factory: Callable[[], ServerModel]

    # ----------------------------------------------------------------------------- hooks
    def num_server_models(self, num_clients: int) -> int:
        """How many server models train this round."""
        return 1

    def assign(self, index: int, num_clients: int) -> int:
        """Index of the server model serving the ``index``-th sampled client."""
        return 0

    def make_scheduler(self, model: ServerModel) -> Scheduler:
        """When requests to ``model`` run (see ``batching`` and ``request_order``)."""
        if self.batching:
            return BatchingScheduler(model, flush_timeout=self.flush_timeout)
        if self.orders_requests:
            return OrderedScheduler(model, flush_timeout=self.flush_timeout)
        return ImmediateScheduler(model)

    @property
    def orders_requests(self) -> bool:
        """Whether requests run in the clients' order, one of each in turn (not batched)."""
        return self.clients_at_once and not self.batching and self.request_order == "clients"

    def shares_server_models(self, num_clients: int) -> bool:
        """Whether, with ``num_clients`` sampled, a server model serves two or more of them."""
        served = Counter(self.assign(index, num_clients) for index in range(num_clients))
        return max(served.values(), default=0) > 1

    def order_clients(self, node_ids: list[int]) -> list[int]:
        """The order of the round's clients: by :attr:`Client.client_id
        <splitflower.client.Client.client_id>` (numbers first, then names), then clients
        without one by node id. Node ids are drawn anew in each run; client ids (a
        SuperNode's partition) are not, so a run with the same seed visits its clients in
        the same order, and gives each the same batches, again."""
        return sorted(node_ids, key=self._order_key)

    def _order_key(self, node: int) -> tuple[int, int, str, int]:
        client_id = self._client_ids.get(node)
        if isinstance(client_id, int):
            return (0, client_id, "", node)
        if isinstance(client_id, str):
            return (1, 0, client_id, node)
        return (2, 0, "", node)

    def train_round(
        self, grid: Grid, plan: RoundPlan, arrays: ArrayRecord, config: ConfigRecord, timeout: float
    ) -> list[Message]:
        """Send every client its message at once and wait for all replies."""
        messages = [self.client_message(plan, node, arrays, config) for node in plan.node_ids]
        return self.collect(plan, self.send_and_receive(grid, plan, messages, timeout), plan.node_ids)

    def send_and_receive(self, grid: Grid, plan: RoundPlan, messages: list[Message], timeout: float) -> list[Message]:
        """Send ``messages`` and return their replies, in the order they came, as Flower's
        ``Grid.send_and_receive`` does, but closing each client's session as its reply comes
        (and at once where its message could not be sent, a node gone offline, say): a client
        whose ClientApp failed before its last request (an error reply, its own or the
        SuperLink's for a lost node) holds the others' gathered requests (see
        :mod:`splitflower.scheduling`) one pull interval at most, instead of a
        ``flush_timeout``.

        Replies are pulled every ``grid.pull_interval`` seconds where the grid has one
        (Flower's in-memory grid: 0.1), else every 0.5 s, until all have come or ``timeout``
        seconds (counted from when the messages were sent) have passed; they are pulled once
        more at that deadline. Messages without a reply by then get none here.
        """
        pending = {message_id for message_id in grid.push_messages(messages) if message_id}
        self._close_sessions(plan, {m.metadata.dst_node_id for m in messages if m.metadata.message_id not in pending})
        deadline = time.monotonic() + timeout
        interval = float(getattr(grid, "pull_interval", _PULL_INTERVAL_S))
        replies: list[Message] = []
        while pending:
            came = list(grid.pull_messages(pending))
            self._close_sessions(plan, {plan.sender(reply) for reply in came})
            replies += came
            pending -= {reply.metadata.reply_to_message_id for reply in came}
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                break
            time.sleep(min(interval, left))
        return replies

    @property
    def server_models(self) -> list[ServerModel]:
        """The server models created so far (read-only view for monitoring)."""
        return list(self._server_models)

    # ------------------------------------------------------------------------- mechanics
    def client_message(self, plan: RoundPlan, node_id: int, arrays: ArrayRecord, config: ConfigRecord) -> Message:
        """The train message for one client: weights and its own config (see :meth:`client_config`)."""
        content = RecordDict(
            {self.arrayrecord_key: arrays, self.configrecord_key: self.client_config(plan, node_id, config)}
        )
        own_state = self._client_states.to_deliver(self._client_ids.get(node_id))
        if own_state is not None:  # the first round of a resumed run gives the client its own back
            content[RecordKey.LOCAL_STATE] = own_state
        message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)
        plan.sent.append(message)
        return message

    def client_config(self, plan: RoundPlan, node_id: int, config: ConfigRecord) -> ConfigRecord:
        """A copy of the round's config plus what this client needs to reach its server model."""
        own = ConfigRecord(dict(config))
        own[ConfigKey.SERVER_ROUND] = plan.server_round
        own[ConfigKey.TOKEN] = plan.tokens[node_id]
        own[ConfigKey.PROXY_ADDRESS] = self._client_address or self._service.address
        own[ConfigKey.MAX_MESSAGE_BYTES] = self._service.max_message_bytes
        own[ConfigKey.CLIENT_INDEX] = plan.node_ids.index(node_id)
        if self.call_timeout is not None:
            own[ConfigKey.CALL_TIMEOUT] = self.call_timeout
        if self._service.root_certificates:
            own[ConfigKey.ROOT_CERTIFICATES] = self._service.root_certificates
        return own

    def collect(self, plan: RoundPlan, replies: Iterable[Message], sent_to: Iterable[int] = ()) -> list[Message]:
        """Close the session of each client in ``sent_to`` and each replying one, so batching
        stops waiting for it and a client past the round's timeout trains no server model any
        more; leave out (with a warning, and noted in ``plan.left_out``) a successful reply
        that cannot be aggregated, rather than let one client's malformed reply end the run."""
        collected: list[Message] = []
        replies = list(replies)
        self._close_sessions(plan, {*sent_to, *(plan.sender(reply) for reply in replies)})
        for reply in replies:
            node = plan.sender(reply)
            problem = None if reply.has_error() else self.reply_problem(reply) or _disagreement(plan, reply)
            if problem is None:
                collected.append(reply)
            else:
                plan.left_out[node] = problem
                logger.warning("[server] round %d: left out client %d's reply: %s", plan.server_round, node, problem)
        # In the round's order, not as they came: averaging adds them up in this order.
        return sorted(collected, key=lambda reply: _index(plan, plan.sender(reply)))

    def _close_sessions(self, plan: RoundPlan, nodes: Iterable[int]) -> None:
        """End the round's sessions of ``nodes``: their later requests are refused, and no
        gathering waits for them (closing one twice does nothing)."""
        for node in nodes:
            token = plan.tokens.get(node)
            if token is not None:
                self._service.close_session(token)

    def reply_problem(self, reply: Message) -> str | None:
        """What a successful train reply lacks, or None: one ArrayRecord named
        ``arrayrecord_key`` and one MetricRecord whose ``weighted_by_key`` is a number >= 0."""
        arrays, metrics = reply.content.array_records, reply.content.metric_records
        if list(arrays) != [self.arrayrecord_key]:
            return f"expected one ArrayRecord named {self.arrayrecord_key!r}, got {sorted(arrays) or 'none'}"
        record = next(iter(metrics.values()), None)
        if len(metrics) != 1 or record is None or self.weighted_by_key not in record:
            return (
                f"expected one MetricRecord holding {self.weighted_by_key!r}, got "
                f"{ {name: sorted(record) for name, record in metrics.items()} or 'none' }"
            )
        weight = record[self.weighted_by_key]
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
            return f"expected {self.weighted_by_key!r} to be a number >= 0, got {weight!r}"
        return ClientStates.problem(reply)

    def carried_state(self) -> dict[str, torch.Tensor]:
        """State this strategy carries from one round to the next besides both parties'
        weights, as named tensors: a model file keeps it, and a run resumed from that file
        gives it back through :meth:`load_carried_state` before its first round. Here: the
        state each client keeps of its own, as it last replied with it (names
        ``client:<id>:...``; none for most algorithms); a subclass adds its own (the sequential
        strategy's handed-on optimizer state) to ``super()``'s."""
        return self._client_states.tensors()

    def load_carried_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take on what :meth:`carried_state` gave after the round a run resumes from,
        refusing names of neither :attr:`carried_names` nor clients' states; a subclass takes
        its own names after ``super()``'s call."""
        kinds = {**self.carried_names, CLIENT_STATE_PREFIX: "clients' own states"}
        unknown = sorted(name for name in state if not name.startswith(tuple(kinds)))
        if unknown:
            carried = " and ".join(f"{what} ({prefix}*)" for prefix, what in kinds.items())
            raise ConfigError(
                f"{type(self).__name__} carries only {carried} between rounds, but was given {unknown[:5]}; "
                "resume with the strategy the state was saved from"
            )
        self._client_states.load({name: t for name, t in state.items() if name.startswith(CLIENT_STATE_PREFIX)})

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        # Flower's sample_nodes waits for the nodes forever; a run asking for more clients
        # than will ever connect must end instead, saying so.
        needed = max(self.min_available_nodes, self.min_train_nodes)
        started = time.monotonic()
        deadline, next_report = started + self.node_wait_timeout, started + _NODE_WAIT_REPORT_S
        while len(nodes := list(grid.get_node_ids())) < needed:
            if time.monotonic() >= next_report:
                next_report += _NODE_WAIT_REPORT_S
                logger.warning(
                    "[server] waiting for clients: %d of %d connected (%.0fs of %gs)",
                    len(nodes), needed, time.monotonic() - started, self.node_wait_timeout,
                )  # fmt: skip
            if time.monotonic() >= deadline:
                raise NotEnoughNodesError(
                    f"the round needs {needed} clients (min_available_nodes / min_train_nodes, e.g. the app's "
                    f"num-clients) but only {len(nodes)} connected within {self.node_wait_timeout:g}s; start more "
                    "SuperNodes (num-supernodes in simulation) or ask for fewer clients"
                )
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
        return nodes

    def _identify(self, grid: Grid, server_round: int, node_ids: Sequence[int], timeout: float) -> None:
        """Ask each of ``node_ids`` not known yet which client it is (a query message; its
        reply carries the client's ``client_id``, or nothing), and stop the run before the
        round trains if two of them are the same client. Known ids are refreshed from every
        train reply (a SuperNode may reconnect as another partition); a node that did not
        answer is asked again next round. A node whose ClientApp cannot answer (not one
        :func:`~splitflower.app.build_client_app` built) counts as having no id."""
        asked = [
            Message(
                content=RecordDict({RecordKey.IDENTIFY: ConfigRecord()}),
                message_type=MessageType.QUERY,
                dst_node_id=node,
            )
            for node in node_ids
            if node not in self._client_ids
        ]
        if asked:
            for reply in grid.send_and_receive(asked, timeout=min(timeout, self.node_wait_timeout)):
                node = _sender(asked, reply)
                self._client_ids[node] = None if reply.has_error() else _reported_client_id(reply)
                if reply.has_error():
                    logger.warning("[server] node %d cannot say which client it is: %s", node, reply.error.reason)
            if silent := sorted(set(node_ids) - self._client_ids.keys()):
                logger.warning("[server] nodes %s did not say which client they are; ordered by node id", silent)
        repeated = _repeated_clients(
            {node: client_id for node in node_ids if (client_id := self._client_ids.get(node)) is not None},
            f"round {server_round}, before it trains: several nodes are the same client",
        )
        if repeated is not None:
            raise repeated

    def _sample(
        self, grid: Grid, server_round: int, config: ConfigRecord, timeout: float
    ) -> tuple[list[int], list[int]]:
        """FedAvg's sample (``fraction_train`` of the connected nodes, at least
        ``min_train_nodes``), in :meth:`order_clients`' order, and the connected nodes; drawn
        from the nodes in that order with a generator seeded by the run's seed and the round, so that a run samples the
        same clients again, whatever node ids Flower gave them."""
        available = self._wait_for_nodes(grid)
        size = max(int(len(available) * self.fraction_train), self.min_train_nodes)
        self._identify(grid, server_round, available, timeout)
        ordered = self.order_clients(available)
        if size >= len(ordered):
            return ordered, available
        seed = config.get(ConfigKey.SEED, 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"the train config's {ConfigKey.SEED!r} must be an int (it seeds sampling), got {seed!r}")
        draw = random.Random(seed * 1_000_003 + server_round)
        chosen = set(draw.sample(ordered, size))
        return [node for node in ordered if node in chosen], available

    def _plan_round(
        self, server_round: int, grid: Grid, server_weights: ArrayRecord, config: ConfigRecord, timeout: float
    ) -> RoundPlan:
        node_ids, available = self._sample(grid, server_round, config, timeout)
        logger.info("[server] round %d: %d of %d clients sampled", server_round, len(node_ids), len(available))
        count = self.num_server_models(len(node_ids))
        while len(self._server_models) < count:
            self._server_models.append(run_on_compute_thread(self._server_model_factory))
        models = self._server_models[:count]
        weights = server_weights.to_torch_state_dict() if len(server_weights) else None
        round_config = {**config, ConfigKey.SERVER_ROUND: server_round}  # as Flower's FedAvg tells clients
        for index, model in enumerate(models):
            run_on_compute_thread(model.configure_fit, weights, {**round_config, ConfigKey.SERVER_MODEL_INDEX: index})
        schedulers = [self.make_scheduler(model) for model in models]
        assignment = {node: self._checked_assign(i, len(node_ids), count) for i, node in enumerate(node_ids)}
        plan = RoundPlan(server_round, node_ids, models, schedulers, assignment)
        for index, scheduler in enumerate(schedulers):
            scheduler.set_clients([n for n, m in assignment.items() if m == index])
        # Every client's requests in flight may be waiting at once (a gathered one for the others').
        self._service.reserve_workers(len(node_ids) * (MAX_IN_FLIGHT + 1))
        for node in node_ids:
            plan.tokens[node], plan.sessions[node] = self._service.open_session(node, schedulers[assignment[node]])
        return plan

    def _checked_assign(self, index: int, num_clients: int, num_models: int) -> int:
        model = self.assign(index, num_clients)
        if isinstance(model, bool) or not isinstance(model, int) or not 0 <= model < num_models:
            raise ConfigError(
                f"{type(self).__name__}.assign({index}, {num_clients}) returned {model!r}, but "
                f"num_server_models({num_clients}) is {num_models}: return an index from 0 to {num_models - 1}"
            )
        return model

    def aggregate_server_models(self, results: Sequence[FitResult]) -> ArrayRecord | None:
        """Example-weighted average of the server models that trained this round."""
        trained = [r for r in results if r.num_examples > 0]
        if not trained:
            return None
        records = [
            RecordDict({"a": ArrayRecord(r.weights), "m": MetricRecord({self.weighted_by_key: r.num_examples})})
            for r in trained
        ]
        return aggregate_arrayrecords(records, self.weighted_by_key)

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = DEFAULT_ROUND_TIMEOUT_S,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: CentralEvaluateFn | None = None,
        *,
        service: SplitService,
        server_model_factory: Callable[[], ServerModel],
        initial_server_arrays: ArrayRecord | None = None,
        on_round: Callable[[int, dict[str, Any]], None] | None = None,
        first_round: int = 1,
    ) -> SplitResult:
        """Run rounds ``first_round`` to ``num_rounds`` (a run resumed from weights saved after
        round k starts at k + 1); ``evaluate_fn(round, client_arrays, server_arrays)``
        evaluates the assembled model centrally after each round. The run stops before a
        round trains if two of its nodes say they are the same
        :attr:`Client.client_id <splitflower.client.Client.client_id>` (:class:`ConfigError`;
        also after it, if they say so only in their replies), and after ``on_round`` has the
        record of a round in which no client trained (:class:`ExperimentFailedError`)."""
        if isinstance(first_round, bool) or not isinstance(first_round, int) or not 1 <= first_round <= num_rounds:
            raise ConfigError(
                f"first_round must be a round number from 1 to num_rounds ({num_rounds}), got {first_round!r}"
            )
        self._service = service
        self._server_model_factory = server_model_factory
        config = ConfigRecord(dict(train_config or ConfigRecord()))
        if initial_server_arrays is None:
            # Every server model starts from the first one's initial weights.
            self._server_models = [run_on_compute_thread(server_model_factory)]
            initial_server_arrays = ArrayRecord(self._server_models[0].get_fit_result().weights)
        result = SplitResult(arrays=initial_arrays, server_arrays=initial_server_arrays)
        self.last_recorded = self.last_trained = None
        self._client_ids = {}
        link = LinkEmulator(service.address, self.link) if self.link is not None else contextlib.nullcontext()
        with link as emulator:
            self._client_address = emulator.address if emulator is not None else ""
            try:
                rounds = range(first_round, num_rounds + 1)
                self._run_rounds(grid, rounds, timeout, config, evaluate_fn, on_round, result)
            finally:
                self._client_address = ""
        return result

    def _run_rounds(
        self,
        grid: Grid,
        rounds: range,
        timeout: float,
        config: ConfigRecord,
        evaluate_fn: CentralEvaluateFn | None,
        on_round: Callable[[int, dict[str, Any]], None] | None,
        result: SplitResult,
    ) -> None:
        service = self._service
        for server_round in rounds:
            started = time.perf_counter()
            plan = self._plan_round(server_round, grid, result.server_arrays, config, timeout)
            try:
                replies = self.train_round(grid, plan, result.arrays, config, timeout)
            finally:
                for token in plan.tokens.values():
                    service.close_session(token)
            for reply in replies:
                if not reply.has_error():
                    client_id = _reported_client_id(reply)
                    if client_id is None:  # the reply did not say: who the node said it was
                        client_id = self._client_ids.get(plan.sender(reply))
                    self._client_states.keep(client_id, reply)
            arrays, metrics = self.aggregate_train(server_round, replies)
            server_results = [run_on_compute_thread(m.get_fit_result) for m in plan.server_models]
            server_arrays = self.aggregate_server_models(server_results)
            if arrays is not None:
                result.arrays = arrays
            if server_arrays is not None:
                result.server_arrays = server_arrays
            if metrics is not None:
                result.train_metrics_clientapp[server_round] = metrics
            record = _round_record(plan, replies, server_results, time.perf_counter() - started)
            if evaluate_fn is not None:
                evaluation = run_on_compute_thread(evaluate_fn, server_round, result.arrays, result.server_arrays)
                if evaluation is not None:
                    result.evaluate_metrics_serverapp[server_round] = MetricRecord(dict(evaluation))
                    record["evaluation"] = dict(evaluation)
            result.rounds[server_round] = record
            result.strategy_state = self.carried_state()
            self.last_recorded = dataclasses.replace(result, rounds=dict(result.rounds))
            stop = _reason_to_stop(record)
            if stop is None:
                self.last_trained = self.last_recorded
            if on_round is not None:
                on_round(server_round, record)
            self._client_ids.update({c["node_id"]: c["client_id"] for c in record["clients"] if "client_id" in c})
            if stop is not None:
                raise stop


def _reason_to_stop(record: dict[str, Any]) -> ConfigError | ExperimentFailedError | None:
    """Why the run must stop after the round of ``record`` (raised after it is recorded), or None."""
    repeated = _repeated_clients(
        {entry["node_id"]: entry["client_id"] for entry in record["clients"] if "client_id" in entry},
        f"round {record['round']}: several nodes replied as the same client",
    )
    return repeated or _untrained(record)


def _untrained(record: dict[str, Any]) -> ExperimentFailedError | None:
    """The error that stops a run whose round trained on no client (every later round would
    start from the same weights, and the results would look like a run), or None."""
    trained = sum(entry["metrics"].get(RecordKey.NUM_EXAMPLES, 0) for entry in record["clients"] if "metrics" in entry)
    if trained:
        return None
    problems = [str(p) for entry in record["clients"] if (p := entry.get("error") or entry.get("left_out"))]
    return ExperimentFailedError(
        f"round {record['round']} trained on no client ({len(problems)} failed or were left out), so the run "
        "stops: its results would be meaningless; the first client error: "
        + (raised_by_client(problems[0]) if problems else "(none: no client reported an example)")
    )


def _disagreement(plan: RoundPlan, reply: Message) -> str | None:
    """How ``reply``'s weight and metric names differ from the round's first accepted reply's
    (the first sets them), or None."""
    keys = (
        frozenset(next(iter(reply.content.array_records.values())).keys()),
        frozenset(next(iter(reply.content.metric_records.values())).keys()),
    )
    if plan.reply_keys is None:
        plan.reply_keys = keys
    if keys == plan.reply_keys:
        return None
    differences = []
    for what, got, expected in zip(("weights", "metrics"), keys, plan.reply_keys, strict=True):
        if got != expected:
            missing, extra = sorted(expected - got)[:5], sorted(got - expected)[:5]
            differences.append(f"{what} missing {missing or 'none'}, unexpected {extra or 'none'}")
    return "its names differ from the round's first reply's (" + "; ".join(differences) + ")"


def _client_wire(reply: Message, node: int) -> Any:
    """What a client reports crossed its wire (a JSON ConfigRecord), or None if absent or unreadable."""
    record = reply.content.config_records.get(RecordKey.WIRE_MANIFEST)
    if record is None:
        return None
    try:
        return json.loads(str(record[RecordKey.VALUE]))
    except (KeyError, ValueError) as err:
        logger.warning("[server] client %d's wire manifest is unreadable (%s); left out", node, err)
        return None


def _reported_client_id(reply: Message) -> int | str | None:
    record = reply.content.config_records.get(RecordKey.CLIENT_ID)
    value = record.get(RecordKey.VALUE) if record is not None else None
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None


def _repeated_clients(client_ids: Mapping[int, int | str], what: str) -> ConfigError | None:
    """The error that stops a run in which two nodes of ``client_ids`` (node -> client id) are
    the same client (two SuperNodes started with the same partition, so one partition is
    trained twice and another never), or None."""
    nodes_by_id: dict[int | str, list[int]] = {}
    for node, client_id in client_ids.items():
        nodes_by_id.setdefault(client_id, []).append(node)
    repeated = {client_id: sorted(nodes) for client_id, nodes in nodes_by_id.items() if len(nodes) > 1}
    if not repeated:
        return None
    shown = "; ".join(f"client {cid!r} from nodes {nodes}" for cid, nodes in repeated.items())
    return ConfigError(
        f"{what} ({shown}), so the run stops: their data is one partition trained twice while another "
        'is never trained; give each SuperNode its own partition (flower-supernode --node-config "partition-id=I '
        'num-partitions=N")'
    )


def _gathering(plan: RoundPlan, index: int) -> dict[str, Any]:
    """How a gathering scheduler's round went (nothing for one that runs requests as they
    come); warns when some ran on the flush timeout, without a request of every client still
    training."""
    scheduler = plan.schedulers[index]
    if isinstance(scheduler, BatchingScheduler):
        entry, runs, what = "batching", "calls", "batched calls"
    elif isinstance(scheduler, OrderedScheduler) and scheduler.requests_served:  # none: it served one client
        entry, runs, what = "in_client_order", "cycles", "cycles of the clients' requests in turn"
    else:
        return {}
    if scheduler.timeout_flushes:
        logger.warning(
            "[server] round %d: server model %d: %d of %d %s ran on the flush timeout (%g s) without every "
            "client's request: a client was slower than that; a longer flush timeout keeps them whole (and "
            "the run repeatable)",
            plan.server_round,
            index,
            scheduler.timeout_flushes,
            scheduler.flushes,
            what,
            scheduler.flush_timeout,
        )
    return {
        entry: {
            runs: scheduler.flushes,
            "requests": scheduler.requests_served,
            "timeout_flushes": scheduler.timeout_flushes,
        }
    }


def _index(plan: RoundPlan, node: int) -> int:
    return plan.node_ids.index(node) if node in plan.node_ids else -1


def _round_record(
    plan: RoundPlan, replies: Sequence[Message], server_results: Sequence[FitResult], seconds: float
) -> dict[str, Any]:
    """A JSON-able account of one round: per client and per server model."""
    clients: list[dict[str, Any]] = []
    for reply in replies:
        node = plan.sender(reply)
        entry: dict[str, Any] = {"node_id": node, "index": _index(plan, node)}
        if reply.has_error():
            entry["error"] = reply.error.reason
        else:
            metrics = list(reply.content.metric_records.values())
            entry["metrics"] = dict(metrics[0]) if metrics else {}
            wire = _client_wire(reply, node)
            if wire is not None:
                entry["wire"] = wire
            client_id = _reported_client_id(reply)
            if client_id is not None:
                entry["client_id"] = client_id
        clients.append(entry)
    for node, problem in plan.left_out.items():
        clients.append({"node_id": node, "index": _index(plan, node), "left_out": problem})
    answered = {entry["node_id"] for entry in clients}
    for node in plan.node_ids:
        if node not in answered:
            logger.warning("[server] round %d: client %d: %s", plan.server_round, node, NO_REPLY)
            clients.append({"node_id": node, "index": _index(plan, node), "error": NO_REPLY})
    for entry in clients:
        session = plan.sessions.get(entry["node_id"])
        if session is not None:
            entry["server_view"] = {"wire": dict(session.wire), "times": dict(session.seconds)}
    servers = []
    for index, (model, fit) in enumerate(zip(plan.server_models, server_results, strict=True)):
        servers.append(
            {
                "index": index,
                "num_examples": fit.num_examples,
                "metrics": fit.metrics,
                "memory": model.memory.summary("server"),
                **_gathering(plan, index),
            }
        )
    return {"round": plan.server_round, "seconds": seconds, "clients": clients, "server_models": servers}

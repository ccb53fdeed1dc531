"""Each algorithm's defining property, through the real service (one process, threads as clients)."""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

from conftest import connect
from splitflower.algorithms import ALGORITHMS, Algorithm
from splitflower.algorithms.dsl import DSLClient, DSLOptions, DSLServerModel
from splitflower.algorithms.fedsl import FedSLClient, FedSLServerModel
from splitflower.algorithms.locfedmix import LocFedMixClient, LocFedMixOptions, LocFedMixServerModel, _unit_range
from splitflower.algorithms.splitavg import SplitAvgServerModel
from splitflower.algorithms.streamsl import StreamSLClient, StreamSLServerModel
from splitflower.algorithms.ushaped import UShapedClient, UShapedServerModel
from splitflower.client import Client
from splitflower.data import ArrayDataset, partition, synthetic
from splitflower.errors import (
    AlgorithmError,
    ConfigError,
    IncompatibleStrategyError,
    InvalidArgumentsError,
    RemoteComputationError,
)
from splitflower.experiment import ExperimentConfig
from splitflower.scheduling import BatchingScheduler, Scheduler
from splitflower.server_model import ServerModel, sgd
from splitflower.service import SplitService
from splitflower.split import cut_shape, split_last_layer, split_model
from splitflower.supervised import AUX_HEADS, SupervisedServerModel
from splitflower.wire import ConfigKey

LR, CLASSES = 0.05, 3


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, CLASSES),
    )


def _data(num: int, seed: int = 1) -> ArrayDataset:
    return synthetic(num, 8, num_classes=CLASSES, input_shape=(1, 8, 8), seed=seed)[0]


def _config(batch: int = 16, server_round: int = 1) -> dict[str, Any]:
    return {ConfigKey.LR: LR, ConfigKey.BATCH_SIZE: batch, ConfigKey.SEED: 3, ConfigKey.SERVER_ROUND: server_round}


def _fit(service: SplitService, scheduler: Scheduler, clients: Sequence[Client], config: dict[str, Any]) -> None:
    """Fit every client at once, each on its own thread and session (client ids 0..n-1)."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            clients[i].server_model_proxy = connect(service, scheduler, client=i)
            clients[i].fit({}, config)
            clients[i].server_model_proxy.close()
            scheduler.client_finished(i)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
            errors.append(err)

    scheduler.set_clients(list(range(len(clients))))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


class _Counting(nn.Module):
    """Wraps a server segment and records the rows of every forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(len(x))
        return self.inner(x)


# ------------------------------------------------------------------------------ LocFedMix-SL
@pytest.mark.parametrize(
    ("mixup", "decoder", "n_s", "partners"),
    [(True, True, 1, 1), (False, False, 1, 0), (True, False, 0, 2)],
    ids=["mixup-decoder-ns1", "neither", "mixup-ns0-all-others"],
)
def test_locfedmix_server_trains_on_mixups_and_client_combines_both_gradients(
    service: SplitService, mixup: bool, decoder: bool, n_s: int, partners: int
) -> None:
    """3 clients, one batch each: the server forwards (1 + partners) x the rows (n_s others
    each; n_s = 0: all others; no mixup: none), and each client's update is its decoder's
    gradient (when it has one) plus the gradient of its own mean loss at the server's weights
    before the step (mixed rows send nothing back)."""
    bottom, top = split_model(_model(), 3)
    parts = partition(_data(48), 3, "iid", seed=0)
    options = LocFedMixOptions(n_s=n_s, decoder=decoder, mixup=mixup)
    counting = _Counting(copy.deepcopy(top))
    server = LocFedMixServerModel(counting, optimizer=sgd(0.0), options=options)
    server.configure_fit(None, {"lr": LR})
    clients = [LocFedMixClient(copy.deepcopy(bottom), p, optimizer=sgd(0.0), options=options) for p in parts]
    initial = [_state(c.model) for c in clients]
    scheduler = BatchingScheduler(server, flush_timeout=10.0)
    _fit(service, scheduler, clients, _config(batch=16))

    assert scheduler.flushes == 1 and server.num_examples == 48, "one batched call of 3 x 16 rows"
    assert sum(counting.rows) == 48 * (1 + partners), "the server trained on (1 + n_s) x the rows"
    for client, part, start in zip(clients, parts, initial, strict=True):
        reference = LocFedMixClient(copy.deepcopy(bottom), part, options=options)
        reference.model.load_state_dict(start)
        reference.model.train()
        x, y = part.images, part.labels
        z = reference.segment(x)
        zd = z.detach().requires_grad_()
        (global_grad,) = torch.autograd.grad(nn.functional.cross_entropy(top(zd), y), zd)
        local = [nn.functional.mse_loss(reference.model["decoder"](z), _unit_range(x))] if decoder else []
        assert ("decoder" in client.model) == decoder
        torch.autograd.backward([z, *local], [global_grad, *[None] * len(local)])
        with torch.no_grad():
            for p in reference.model.parameters():
                p -= LR * p.grad
        torch.testing.assert_close(_state(client.model), _state(reference.model), rtol=1e-4, atol=1e-5)


def test_locfedmix_combos_set_the_techniques_and_keep_segments_between_syncs() -> None:
    assert (LocFedMixOptions(combo=4).mixup, LocFedMixOptions(combo=4).decoder) == (False, False)
    eight = LocFedMixOptions(combo=8)
    assert (eight.mixup, eight.decoder, eight.sync_every) == (True, True, 1)
    assert LocFedMixOptions(combo=2).sync_every == 0
    with pytest.raises(ConfigError, match="combo must be 0"):
        ALGORITHMS["locfedmix"].parse_options(["combo=9"])
    with pytest.raises(ConfigError, match=r"combo=4 sets mixup=False, but mixup=True was also given"):
        ALGORITHMS["locfedmix"].parse_options(["combo=4", "mixup=true"])
    agreeing = ALGORITHMS["locfedmix"].parse_options(["combo=4", "sync_every=1", "n_s=2"])
    assert (agreeing.mixup, agreeing.sync_every, agreeing.n_s) == (False, 1, 2)
    assert LocFedMixOptions(mixup=False).decoder is True, "without a combo, unset techniques are row 8's"
    client = LocFedMixClient(split_model(_model(), 3)[0], _data(16), options=LocFedMixOptions(sync_every=2))
    own = {k: torch.full_like(v, 7.0) if v.is_floating_point() else v for k, v in client.weights().items()}
    fresh = {k: torch.zeros_like(v) for k, v in own.items()}
    assert client.local_state().keys() == own.keys(), "its weights are kept in Flower's context"
    client.load_local_state(own)
    for server_round, expected in ((1, fresh), (2, own), (3, fresh), (4, own)):
        assert client.round_weights(fresh, server_round) is expected, f"round {server_round}"
    client.sync_every = 0  # only the first round (before any own state exists) adopts the strategy's weights
    for server_round in (2, 3, 5):
        assert client.round_weights(fresh, server_round) is own, f"sync_every=0, round {server_round}"


# --------------------------------------------------------------------------------- U-shaped
def test_ushaped_no_label_or_logit_crosses_the_wire(service: SplitService) -> None:
    bottom, top = split_model(_model(), 3)
    middle, tail = split_last_layer(top)
    server = UShapedServerModel(middle)
    server.configure_fit(None, {"lr": LR})
    client = UShapedClient(bottom, _data(64), tail=tail)
    before_client, before_server = _state(client.model), _state(server.model)
    client.server_model_proxy = connect(service, server)
    client.fit({}, _config())
    client.server_model_proxy.close()
    manifest = client.server_model_proxy.traffic.manifest()
    assert {(e["direction"], e["method"]) for e in manifest} == {
        ("up", "forward"),
        ("down", "forward"),
        ("up", "backward"),
        ("down", "backward"),
    }
    for entry in manifest:
        assert "int" not in entry["dtype"], f"an integer (label) tensor crossed the wire: {entry}"
        assert entry["sample_shape"] != [CLASSES], f"a logit-shaped tensor crossed the wire: {entry}"
    assert _changed(before_client, _state(client.model)) and _changed(before_server, _state(server.model))
    assert _changed({"t": before_client["tail.6.weight"]}, {"t": client.model["tail"].state_dict()["6.weight"]})


def test_ushaped_backward_before_forward_is_refused_clearly(service: SplitService) -> None:
    server = UShapedServerModel(nn.Linear(4, 3))
    server.configure_fit(None, {"lr": LR})
    proxy = connect(service, server)
    with pytest.raises(InvalidArgumentsError, match=r"call forward\(\) first"):
        proxy.backward(grad=torch.ones(2, 3))
    proxy.forward(embeddings=torch.ones(2, 4))
    assert isinstance(proxy.backward(grad=torch.ones(2, 3)), torch.Tensor), "the server still serves"
    proxy.close()


def test_ushaped_backward_with_a_wrong_shaped_gradient_keeps_the_graph(service: SplitService) -> None:
    torch.manual_seed(0)
    server = UShapedServerModel(nn.Linear(4, 3))
    server.configure_fit(None, {"lr": LR})
    reference = copy.deepcopy(server.model)
    proxy = connect(service, server)
    z = torch.randn(2, 4)
    proxy.forward(embeddings=z)
    with pytest.raises(InvalidArgumentsError, match=r"shape of the output.*\[2, 3\].*got \[3, 2\]"):
        proxy.backward(grad=torch.ones(3, 2))
    grad = torch.randn(2, 3)
    z_grad = proxy.backward(grad=grad)
    proxy.close()
    expected_z = z.clone().requires_grad_()
    reference(expected_z).backward(grad)
    torch.testing.assert_close(z_grad, expected_z.grad)
    assert server.num_examples == 2, "only the good backward trained"


def test_what_a_failed_call_may_have_used_is_dropped_not_given_back(service: SplitService) -> None:
    class UsesThenFails(UShapedServerModel):
        def backward(self, grad: torch.Tensor) -> torch.Tensor | None:
            z, h = self.take_kept("forward")
            self.step(h, grad=grad, num_examples=len(z))
            raise RuntimeError("failed after stepping")

    server = UsesThenFails(nn.Linear(4, 3))
    server.configure_fit(None, {"lr": LR})
    proxy = connect(service, server)
    proxy.forward(embeddings=torch.ones(2, 4))
    with pytest.raises(RemoteComputationError, match="failed after stepping"):
        proxy.backward(grad=torch.ones(2, 3))
    with pytest.raises(InvalidArgumentsError, match=r"nothing kept .*call forward\(\) first"):
        proxy.backward(grad=torch.ones(2, 3))
    proxy.close()
    assert server.num_examples == 2, "the batch trained once"


def test_a_graph_kept_across_another_client_s_step_is_refused_not_used(service: SplitService) -> None:
    # One U-shaped server model shared by two clients (a custom strategy could do it): client
    # b's kept graph holds weights that client a's backward then steps in place.
    server = UShapedServerModel(nn.Linear(4, 3))
    server.configure_fit(None, {"lr": LR})
    a, b = connect(service, server, client="a"), connect(service, server, client="b")
    a.forward(embeddings=torch.ones(2, 4))
    b.forward(embeddings=torch.ones(2, 4))
    a.backward(grad=torch.ones(2, 3))
    with pytest.raises(RemoteComputationError, match="StaleGraphError: a tensor autograd saved for backward"):
        b.backward(grad=torch.ones(2, 3))
    a.close()
    b.close()
    assert server.num_examples == 2, "only client a's batch trained"


def test_ushaped_refuses_batching_and_shared_server_models() -> None:
    for strategy in ("batched", "parallel"):
        with pytest.raises(IncompatibleStrategyError, match="runs under splitfed-v1"):
            ExperimentConfig(algorithm="ushaped", strategy=strategy).validate()


# --------------------------------------------------------------------------------- StreamSL
def test_streamsl_client_frozen_server_trained(service: SplitService) -> None:
    bottom, top = split_model(_model(), 3)
    server = StreamSLServerModel(top)
    server.configure_fit(None, {"lr": LR})
    client = StreamSLClient(bottom, _data(64))
    before_client, before_server = _state(client.model), _state(server.model)
    client.server_model_proxy = connect(service, server)
    result = client.fit({}, _config())
    client.server_model_proxy.close()
    torch.testing.assert_close(result.weights, before_client)
    assert client.optimizer is None
    assert server.num_examples == 64 and _changed(before_server, _state(server.model))
    assert client.server_model_proxy.traffic.by_method()["train_batch"]["down_payload_bytes"] == 0


# ----------------------------------------------------------------------------------- FedSL
def test_fedsl_trains_locally_and_streams(service: SplitService) -> None:
    bottom, top = split_model(_model(), 3)
    server = FedSLServerModel(top)
    server.configure_fit(None, {"lr": LR})
    client = FedSLClient(bottom, _data(64))
    before = _state(client.model)
    client.server_model_proxy = connect(service, server)
    client.fit({}, _config())
    client.server_model_proxy.close()
    assert _changed(before, _state(client.model)) and server.num_examples == 64
    assert client.server_model_proxy.traffic.by_method()["train_batch"]["down_payload_bytes"] == 0


# --------------------------------------------------------------------------------- SplitAvg
@pytest.mark.parametrize("sizes", [(5, 5, 5), (5, 5, 3)], ids=["equal", "last-batch-smaller"])
def test_splitavg_every_client_of_a_batched_call_gets_the_same_mean_gradient(
    service: SplitService, sizes: tuple[int, ...]
) -> None:
    _, top = split_model(_model(), 3)
    server = SplitAvgServerModel(copy.deepcopy(top))
    server.configure_fit(None, {"lr": LR})
    scheduler = BatchingScheduler(server, flush_timeout=10.0)
    scheduler.set_clients([0, 1, 2])
    inputs = [(torch.randn(n, 4, 4, 4), torch.randint(0, CLASSES, (n,))) for n in sizes]
    grads: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        proxy = connect(service, scheduler, client=i)
        grad = proxy.forward_backward(embeddings=inputs[i][0], labels=inputs[i][1])
        assert isinstance(grad, torch.Tensor)
        grads[i] = grad
        proxy.close()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert scheduler.flushes == 1
    own = []
    for z, y in inputs:
        z = z.clone().requires_grad_()
        own.append(torch.autograd.grad(nn.functional.cross_entropy(top(z), y), z)[0])
    for i in range(3):
        # Averaged over the clients whose batch has the same size (a smaller last batch alone).
        peers = [own[j] for j in range(3) if sizes[j] == sizes[i]]
        torch.testing.assert_close(grads[i], torch.stack(peers).mean(0))


def test_splitavg_and_locfedmix_need_the_batched_strategy() -> None:
    with pytest.raises(IncompatibleStrategyError, match="runs under batched, not 'parallel'"):
        ExperimentConfig(algorithm="splitavg", strategy="parallel").validate()
    assert ExperimentConfig(algorithm="splitavg").validate().strategy == "batched"
    assert ExperimentConfig(algorithm="locfedmix").validate().strategy == "batched"


# ------------------------------------------------------------------------------ DSL options
def _dsl_one_step(service: SplitService, options: DSLOptions, data: ArrayDataset) -> dict[str, torch.Tensor]:
    bottom, top = split_model(_model(), 3)
    server = DSLServerModel(top, optimizer=sgd(0.0))
    server.configure_fit(None, {"lr": LR})
    torch.manual_seed(5)  # the same auxiliary head every time
    client = DSLClient(bottom, data, optimizer=sgd(0.0), options=options)
    client.server_model_proxy = connect(service, server)
    client.fit({}, _config(batch=len(data)))
    client.server_model_proxy.close()
    return _state(client.model)


def test_dsl_lam_zero_is_pure_dsl_and_lam_adds_the_server_gradient(service: SplitService) -> None:
    data = _data(32)
    bottom, top = split_model(_model(), 3)
    torch.manual_seed(5)
    reference = DSLClient(bottom, data, options=DSLOptions())
    start = _state(reference.model)
    results = {}
    for lam in (0.0, 0.5):
        results[lam] = _dsl_one_step(service, DSLOptions(lam=lam), data)
        model = copy.deepcopy(reference.model)
        model.load_state_dict(start)
        z = model["segment"](data.images)
        loss = nn.functional.cross_entropy(model["aux_head"](z), data.labels)
        zd = z.detach().requires_grad_()
        (server_grad,) = torch.autograd.grad(nn.functional.cross_entropy(top(zd), data.labels), zd)
        torch.autograd.backward([loss, z], [None, lam * server_grad])
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
        torch.testing.assert_close(results[lam], _state(model), rtol=1e-4, atol=1e-6)
    assert _changed(results[0.0], results[0.5]), "lam > 0 changes the client's update"


def test_dsl_client_trains_a_head_it_is_given(service: SplitService) -> None:
    bottom, top = split_model(_model(), 3)
    numel = math.prod(cut_shape(bottom, (1, 8, 8)))
    head = nn.Sequential(nn.Flatten(), nn.Linear(numel, 16), nn.Tanh(), nn.Linear(16, CLASSES))
    before = _state(head)
    client = DSLClient(bottom, _data(32), aux_head=head)
    assert client.model["aux_head"] is head
    client.server_model_proxy = connect(service, DSLServerModel(top))
    client.fit({}, _config())
    client.server_model_proxy.close()
    assert _changed(before, _state(head)), "the given head is trained by the auxiliary loss"


@pytest.mark.parametrize("head", ["linear", "pooled", "mlp"])
def test_dsl_each_head_kind_trains(service: SplitService, head: str) -> None:
    bottom, top = split_model(_model(), 3)
    server = DSLServerModel(top)
    client = DSLClient(bottom, _data(96), options=DSLOptions(head=head))
    expected = AUX_HEADS[head](cut_shape(bottom, (1, 8, 8)), CLASSES)
    assert str(client.model["aux_head"]) == str(expected), "the head the option names is built"
    losses = []
    for server_round in (1, 2, 3):
        server.configure_fit(None, {"lr": LR})
        client.server_model_proxy = connect(service, server, client=f"round-{server_round}")
        losses.append(client.fit({}, _config(server_round=server_round)).metrics["aux_loss"])
        client.server_model_proxy.close()
    assert losses[-1] < losses[0], losses


def test_every_algorithm_registered_with_its_strategies() -> None:
    assert {"csl", "dsl", "locfedmix", "ushaped", "streamsl", "fedsl", "splitavg"} <= set(ALGORITHMS)
    for algorithm in ALGORITHMS.values():
        algorithm.check_strategy(algorithm.default_strategy)
        assert issubclass(algorithm.server_model, ServerModel)


def test_dsl_options_parse_lam_and_head() -> None:
    dsl = ALGORITHMS["dsl"]
    assert dsl.parse_options(["lam=0.5", "head=pooled"]) == DSLOptions(lam=0.5, head="pooled")
    with pytest.raises(ConfigError, match="option 'head': expected one of linear, pooled, mlp, got 'none'"):
        dsl.parse_options(["head=none"])
    with pytest.raises(ConfigError, match="lam must be 0"):
        dsl.parse_options(["lam=-1"])


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_split_last_layer_gives_u_shaped_thirds_that_compose(name: str) -> None:
    from splitflower.models import build_model
    from splitflower.split import split_for_cut

    model = build_model(name, num_classes=10, in_channels=1, image_size=28).eval()
    bottom, top = split_for_cut(name, model, "s")
    middle, tail = split_last_layer(top)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(tail.eval()(middle.eval()(bottom.eval()(x))), model(x))
    (last,) = [m for m in tail.modules() if next(m.parameters(False), None) is not None]
    assert isinstance(last, nn.Linear) and last.out_features == 10, "the client keeps the output layer"


def test_a_part_added_to_a_client_trains_and_travels_with_the_segment(service: SplitService) -> None:
    bottom, top = split_model(_model(), 3)
    client = FedSLClient(bottom, _data(32))
    assert tuple(client.cut_shape) == (4, 4, 4)
    head_before = copy.deepcopy(client.model["aux_head"].state_dict())
    server = FedSLServerModel(top)
    server.configure_fit(None, {"lr": LR})
    client.server_model_proxy = connect(service, server)
    weights = client.fit({}, _config()).weights
    client.server_model_proxy.close()
    assert any(name.startswith("aux_head.") for name in weights), "the part is sent back with the segment"
    assert _changed(head_before, client.model["aux_head"].state_dict()), "the round's optimizer trained it"
    with pytest.raises(ConfigError, match="already has a part named 'aux_head'"):
        client.add_part("aux_head", nn.Identity())


def test_common_mistakes_in_a_new_algorithm_get_errors_that_name_them(service: SplitService) -> None:
    class NoMetrics(FedSLClient):
        def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
            super().train_step(x, y)

    class LossAsMetrics(FedSLClient):
        def train_step(self, x: torch.Tensor, y: torch.Tensor) -> Any:
            return float(super().train_step(x, y)["aux_loss"])

    class ForgotTheGradient(SupervisedServerModel):
        def forward_backward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
            self.train_on(embeddings, labels)  # its input was not made a leaf: no .grad
            return embeddings.grad

    class Conventional(Client):
        def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
            z = self.segment(x)
            self.step(z, self.server_model_proxy.forward_backward(embeddings=z, labels=y))
            return {}

    def fit(client: Client, server: ServerModel) -> None:
        server.configure_fit(None, {"lr": LR})
        client.server_model_proxy = connect(service, server)
        try:
            client.fit({}, _config())
        finally:
            client.server_model_proxy.close()

    bottom, top = split_model(_model(), 3)
    fit(NoMetrics(copy.deepcopy(bottom), _data(32)), FedSLServerModel(copy.deepcopy(top)))  # None: no metrics
    with pytest.raises(AlgorithmError, match=r"LossAsMetrics.train_step must return a mapping .*got float"):
        fit(LossAsMetrics(copy.deepcopy(bottom), _data(32)), FedSLServerModel(copy.deepcopy(top)))
    with pytest.raises(AlgorithmError, match=r"output 0 has shape \[16, 4, 4, 4\] but its gradient is None"):
        fit(Conventional(copy.deepcopy(bottom), _data(32)), ForgotTheGradient(copy.deepcopy(top)))
    client = Conventional(copy.deepcopy(bottom), _data(32))
    z = client.segment(torch.zeros(2, 1, 8, 8))
    with pytest.raises(AlgorithmError, match=r"output 1 has shape \[2, 4, 4, 4\] but its gradient is None"):
        client.step([z.sum(), z], None)


@pytest.mark.parametrize(
    ("arguments", "refusal"),
    [
        (("swapped", FedSLServerModel, FedSLClient), "client must be a subclass of Client, got <class .*swapped\\?"),
        (("typo", FedSLClient, FedSLServerModel, "paralel"), "strategy 'paralel' is not one of sequential, parallel"),
        (("narrow", FedSLClient, FedSLServerModel, "parallel", ("sequential",)), "default_strategy 'parallel' is not"),
        (("text", FedSLClient, FedSLServerModel, "parallel", "parallel"), "strategies must be a tuple of names"),
        (("number", FedSLClient, FedSLServerModel, 3), "strategy 3 is not one of"),
    ],
)
def test_an_algorithm_that_cannot_run_is_refused_when_it_is_named(arguments: tuple[Any, ...], refusal: str) -> None:
    with pytest.raises(AlgorithmError, match=f"Algorithm '{arguments[0]}': {refusal}"):
        Algorithm(*arguments)

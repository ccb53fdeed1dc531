"""Split training through the real gRPC proxy equals the same computation in one process."""

from __future__ import annotations

import copy
import re
import threading

import pytest
import torch
from torch import nn

from conftest import connect
from splitflower.algorithms.csl import CSLClient, CSLOptions, CSLServerModel
from splitflower.client import Client
from splitflower.data import ArrayDataset, partition, synthetic
from splitflower.errors import ConfigError
from splitflower.scheduling import BatchingScheduler, OrderedScheduler
from splitflower.server_model import sgd
from splitflower.service import SplitService
from splitflower.split import split_model
from splitflower.wire import ConfigKey

LR, BATCH = 0.05, 8


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def _data(num: int) -> ArrayDataset:
    train, _ = synthetic(num, 8, num_classes=3, input_shape=(1, 8, 8), seed=1)
    return train


def _config(index: int = 0) -> dict[str, object]:
    return {
        ConfigKey.LR: LR,
        ConfigKey.LOCAL_EPOCHS: 1,
        ConfigKey.BATCH_SIZE: BATCH,
        ConfigKey.SEED: 7,
        ConfigKey.CLIENT_INDEX: index,
    }


def _batches(data: ArrayDataset, config: dict[str, object]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(data.batches(BATCH, shuffle=True, generator=Client.batch_generator(config)))


def _segment_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("segment."): v for k, v in weights.items()}


def test_csl_one_client_equals_unsplit_training(service: SplitService) -> None:
    data = _data(24 * BATCH)
    bottom, top = split_model(_model(), 4)
    reference = nn.Sequential(copy.deepcopy(bottom), copy.deepcopy(top))

    server = CSLServerModel(top, optimizer=sgd(0.9))
    server.configure_fit(None, {"lr": LR})
    client = CSLClient(bottom, data, optimizer=sgd(0.9))
    client.server_model_proxy = connect(service, server)
    fit = client.fit({}, _config())
    client.server_model_proxy.close()

    optimizer = torch.optim.SGD(reference.parameters(), lr=LR, momentum=0.9)
    steps = 0
    for x, y in _batches(data, _config()):
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        optimizer.step()
        steps += 1
    assert steps >= 20
    assert fit.num_examples == len(data)
    torch.testing.assert_close(_segment_weights(fit.weights), reference[0].state_dict())
    torch.testing.assert_close(server.get_fit_result().weights, reference[1].state_dict())


def _three_clients_one_server() -> tuple[list[ArrayDataset], nn.Module, nn.Module, CSLServerModel]:
    """Three clients' data, their initial segment, the server segment's copy for the
    reference and the server model training the original."""
    bottom, top = split_model(_model(), 4)
    server = CSLServerModel(top, optimizer=sgd(0.9))
    server.configure_fit(None, {"lr": LR})
    return partition(_data(3 * 20 * BATCH), 3, "iid", seed=0), copy.deepcopy(bottom), copy.deepcopy(top), server


def _fit_at_once(
    service: SplitService, scheduler: BatchingScheduler | OrderedScheduler, bottom: nn.Module, parts: list[ArrayDataset]
) -> dict[int, dict[str, torch.Tensor]]:
    """Train a CSL client per part, all at once (a thread each), against ``scheduler``; their segments."""
    scheduler.set_clients(list(range(len(parts))))
    clients = [CSLClient(copy.deepcopy(bottom), part, optimizer=sgd(0.9), client_id=i) for i, part in enumerate(parts)]
    results: dict[int, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            clients[i].server_model_proxy = connect(service, scheduler, client=i)
            results[i] = _segment_weights(clients[i].fit({}, _config(i)).weights)
            clients[i].server_model_proxy.close()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(parts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert scheduler.timeout_flushes == 0
    return results


def test_parallel_csl_three_clients_equals_joint_computation(service: SplitService) -> None:
    """Three clients, one shared server model batching their requests: each step is one
    forward/backward of the server segment on the three clients' activations concatenated."""
    parts, initial_bottom, reference_top, server = _three_clients_one_server()
    results = _fit_at_once(service, BatchingScheduler(server, flush_timeout=30.0), initial_bottom, parts)

    bottoms = [copy.deepcopy(initial_bottom) for _ in range(3)]
    params = [p for m in [*bottoms, reference_top] for p in m.parameters()]
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9)
    streams = [_batches(parts[i], _config(i)) for i in range(3)]
    assert len(streams[0]) >= 20 and len({len(s) for s in streams}) == 1
    for step in zip(*streams, strict=True):
        z = torch.cat([bottoms[i](x) for i, (x, _) in enumerate(step)])
        y = torch.cat([y for _, y in step])
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference_top(z), y).backward()
        optimizer.step()
    for i in range(3):
        torch.testing.assert_close(results[i], bottoms[i].state_dict())
    torch.testing.assert_close(server.get_fit_result().weights, reference_top.state_dict())


def test_parallel_csl_three_clients_in_turn_equals_the_same_steps_in_one_process(service: SplitService) -> None:
    """Three clients at once, one shared server model taking a request of each in turn: the
    server steps on client 0's batch, then 1's, then 2's, batch after batch, in every run."""
    parts, initial_bottom, reference_top, server = _three_clients_one_server()
    scheduler = OrderedScheduler(server, flush_timeout=30.0)
    results = _fit_at_once(service, scheduler, initial_bottom, parts)

    bottoms = [copy.deepcopy(initial_bottom) for _ in range(3)]
    client_optimizers = [torch.optim.SGD(b.parameters(), lr=LR, momentum=0.9) for b in bottoms]
    server_optimizer = torch.optim.SGD(reference_top.parameters(), lr=LR, momentum=0.9)
    streams = [_batches(parts[i], _config(i)) for i in range(3)]
    assert len(streams[0]) >= 20 and len({len(s) for s in streams}) == 1
    for step in zip(*streams, strict=True):
        for i, (x, y) in enumerate(step):
            z = bottoms[i](x)
            cut = z.detach().requires_grad_()
            server_optimizer.zero_grad()
            nn.functional.cross_entropy(reference_top(cut), y).backward()
            server_optimizer.step()
            client_optimizers[i].zero_grad()
            z.backward(cut.grad)
            client_optimizers[i].step()
    assert (scheduler.flushes, scheduler.requests_served) == (len(streams[0]), 3 * len(streams[0]))
    for i in range(3):
        torch.testing.assert_close(results[i], bottoms[i].state_dict())
    torch.testing.assert_close(server.get_fit_result().weights, reference_top.state_dict())


@pytest.mark.parametrize("steps", [3])
def test_csl_returns_gradient_on_callers_tensor_shape(service: SplitService, steps: int) -> None:
    _, top = split_model(_model(), 4)
    server = CSLServerModel(top)
    server.configure_fit(None, {"lr": LR})
    proxy = connect(service, server)
    z = torch.randn(BATCH, 4, 4, 4)
    for _ in range(steps):
        grad = proxy.forward_backward(embeddings=z, labels=torch.zeros(BATCH, dtype=torch.int64))
        assert isinstance(grad, torch.Tensor) and grad.shape == z.shape and grad.dtype == z.dtype
    proxy.close()


def test_client_evaluate_through_the_proxy_equals_the_assembled_model(service: SplitService) -> None:
    data = _data(64)
    bottom, top = split_model(_model(), 4)
    server = CSLServerModel(copy.deepcopy(top))
    client = CSLClient(copy.deepcopy(bottom), data, data)
    client.server_model_proxy = connect(service, server)
    loss, examples, metrics = client.evaluate({}, {ConfigKey.BATCH_SIZE: 16})
    client.server_model_proxy.close()
    with torch.no_grad():
        full = nn.Sequential(bottom, top).eval()
        logits = full(data.images)
    assert examples == len(data)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(1) == data.labels).float().mean()))
    assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, data.labels)), rel=1e-5)


def test_server_models_are_averaged_by_examples() -> None:
    from splitflower.server_model import FitResult
    from splitflower.strategies import ParallelStrategy

    a = FitResult({"w": torch.tensor([0.0, 4.0])}, num_examples=1)
    b = FitResult({"w": torch.tensor([4.0, 0.0])}, num_examples=3)
    idle = FitResult({"w": torch.tensor([100.0, 100.0])}, num_examples=0)
    averaged = ParallelStrategy().aggregate_server_models([a, b, idle])
    assert averaged is not None
    torch.testing.assert_close(averaged.to_torch_state_dict()["w"], torch.tensor([3.0, 1.0]))


def test_csl_window_accumulates_gradients_of_batches_in_flight(service: SplitService) -> None:
    """CSL with window=3: three batches forwarded with the same client weights, the server
    training on each in turn, then one client step on the three gradients summed."""
    data = _data(9 * BATCH)
    bottom, top = split_model(_model(), 4)
    ref_bottom, ref_top = copy.deepcopy(bottom), copy.deepcopy(top)

    server = CSLServerModel(top, optimizer=sgd(0.9))
    server.configure_fit(None, {"lr": LR})
    client = CSLClient(bottom, data, optimizer=sgd(0.9), options=CSLOptions(window=3))
    client.server_model_proxy = connect(service, server)
    fit = client.fit({}, _config())
    client.server_model_proxy.close()

    client_opt = torch.optim.SGD(ref_bottom.parameters(), lr=LR, momentum=0.9)
    server_opt = torch.optim.SGD(ref_top.parameters(), lr=LR, momentum=0.9)
    batches = _batches(data, _config())
    for start in range(0, len(batches), 3):
        outputs, grads = [], []
        for x, y in batches[start : start + 3]:
            z = ref_bottom(x)
            cut = z.detach().requires_grad_()
            server_opt.zero_grad()
            nn.functional.cross_entropy(ref_top(cut), y).backward()
            server_opt.step()
            outputs.append(z)
            grads.append(cut.grad)
        client_opt.zero_grad()
        torch.autograd.backward(outputs, grads)
        client_opt.step()
    torch.testing.assert_close(_segment_weights(fit.weights), ref_bottom.state_dict())
    torch.testing.assert_close(server.get_fit_result().weights, ref_top.state_dict())


@pytest.mark.parametrize("hand_over", [True, False], ids=["optimizer-handed-on", "fresh-optimizer"])
def test_sequential_csl_with_the_optimizer_handed_on_equals_one_optimizer(
    service: SplitService, hand_over: bool
) -> None:
    """Vanilla SL, two clients one after the other on one server model: with the client
    optimizer's state handed on with the segment, training equals one model and one
    optimizer going through the first client's batches and then the second's."""
    parts = partition(_data(2 * 10 * BATCH), 2, "iid", seed=0)
    bottom, top = split_model(_model(), 4)
    reference = nn.Sequential(copy.deepcopy(bottom), copy.deepcopy(top))
    server = CSLServerModel(top, optimizer=sgd(0.9))
    server.configure_fit(None, {"lr": LR})
    weights: dict[str, torch.Tensor] = {}
    handed: dict[str, torch.Tensor] = {}
    for index, data in enumerate(parts):
        client = CSLClient(copy.deepcopy(bottom), data, optimizer=sgd(0.9), client_id=index)
        client.handed_optimizer_state = handed
        client.server_model_proxy = connect(service, server, client=index)
        weights = client.fit(weights, _config(index)).weights
        client.server_model_proxy.close()
        handed = client.optimizer_state() if hand_over else {}

    optimizer = torch.optim.SGD(reference.parameters(), lr=LR, momentum=0.9)
    for index, data in enumerate(parts):
        for x, y in _batches(data, _config(index)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(reference(x), y).backward()
            optimizer.step()
    if hand_over:
        torch.testing.assert_close(_segment_weights(weights), reference[0].state_dict())
        torch.testing.assert_close(server.get_fit_result().weights, reference[1].state_dict())
    else:  # a fresh optimizer per client forgets the momentum: not the same computation
        with pytest.raises(AssertionError):
            torch.testing.assert_close(_segment_weights(weights), reference[0].state_dict())


def test_handed_optimizer_state_that_does_not_fit_is_refused_clearly() -> None:
    bottom, _ = split_model(_model(), 4)
    client = CSLClient(bottom, _data(8), optimizer=sgd(0.9))
    client.optimizer = client._build_optimizer(LR)
    with pytest.raises(ConfigError, match=r"index below 4 \(this optimizer's parameters\)"):
        client.load_optimizer_state({"9.momentum_buffer": torch.zeros(3)})
    with pytest.raises(ConfigError, match=r"'0.momentum_buffer' has shape \[3\], its parameter \[4, 1, 3, 3\]"):
        client.load_optimizer_state({"0.momentum_buffer": torch.zeros(3)})
    with pytest.raises(ConfigError, match=re.escape("expected '<parameter index>.<key>'")):
        client.load_optimizer_state({"momentum": torch.zeros(3)})
    frozen = CSLClient(nn.Flatten(), _data(8))
    with pytest.raises(ConfigError, match="no trainable parameters"):
        frozen.load_optimizer_state({"0.momentum_buffer": torch.zeros(3)})

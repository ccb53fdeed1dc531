"""Bad values (labels out of range, NaN activations or gradients) are refused, per caller, with a clear error."""

from __future__ import annotations

import copy
import math
import re
import threading
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from conftest import connect
from splitflower.algorithms.csl import CSLClient, CSLServerModel
from splitflower.data import synthetic
from splitflower.errors import AlgorithmError, DivergedError, InvalidArgumentsError
from splitflower.experiment import Experiment, ExperimentConfig
from splitflower.scheduling import BatchingScheduler
from splitflower.server_model import FLOATING, ServerModel, TensorSpec, check_values, remote, remote_methods
from splitflower.service import SplitService
from splitflower.supervised import EMBEDDINGS, LABELS, SupervisedServerModel

FEATURES, CLASSES, ROWS = 6, 3, 4


def _server() -> CSLServerModel:
    torch.manual_seed(0)
    server = CSLServerModel(nn.Sequential(nn.Linear(FEATURES, 5), nn.ReLU(), nn.Linear(5, CLASSES)))
    server.configure_fit(None, {"lr": 0.1})
    return server


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, FEATURES, generator=generator), torch.randint(0, CLASSES, (ROWS,), generator=generator)


def test_spec_refuses_values_out_of_bounds_and_says_which() -> None:
    refusal = r"'labels': expected value < 3 \(num_classes of the server model\), got values from 0 to 5"
    with pytest.raises(InvalidArgumentsError, match=refusal):
        LABELS.check_values("labels", torch.tensor([0, 5, 2]), _WithClasses(3))
    with pytest.raises(InvalidArgumentsError, match=r"'x'.*value < 1.5, got values from"):
        TensorSpec(high=1.5).check_values("x", torch.tensor([0.0, float("nan")]), None)
    LABELS.check_values("labels", torch.tensor([0, 2]), _WithClasses(3))
    LABELS.check_values("labels", torch.tensor([0, 7]), _WithClasses(None))  # not learned yet: unchecked
    TensorSpec(low=0, high=2).check_values("mask", torch.tensor([True, False]), None)
    with pytest.raises(InvalidArgumentsError, match=r"'z': expected real values to bound, got torch.complex64"):
        TensorSpec(high=1).check_values("z", torch.ones(2, dtype=torch.complex64), None)


def test_spec_refuses_nan_and_infinity_but_not_large_finite_values() -> None:
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(
            InvalidArgumentsError, match=r"'embeddings': expected finite values, got 1 NaN or infinite of 4"
        ):
            EMBEDDINGS.check_values("embeddings", torch.tensor([1.0, bad, 2.0, 3.0]), None)
    huge = torch.full((4,), torch.finfo(torch.float32).max)  # its sum overflows; every value is finite
    EMBEDDINGS.check_values("embeddings", huge, None)
    EMBEDDINGS.check_values("embeddings", huge.half().clamp(max=60000), None)
    EMBEDDINGS.check_values("embeddings", torch.tensor([1, 2]), None)  # integers are always finite


@pytest.mark.parametrize(
    ("bounds", "refusal"),
    [
        ({"low": "0"}, "low: expected a number, got '0'"),
        ({"high": True}, "high: expected a number or an attribute name, got True"),
        ({"low": float("nan")}, "low: expected a number, got nan"),
        ({"low": 5, "high": 5}, "low must be below high"),
    ],
)
def test_a_spec_with_bounds_that_cannot_work_is_refused_when_defined(bounds: dict[str, Any], refusal: str) -> None:
    with pytest.raises(AlgorithmError, match=re.escape(refusal)):
        TensorSpec(**bounds)


class _WithClasses:
    def __init__(self, num_classes: int | None) -> None:
        self.num_classes = num_classes


def test_unbatched_bad_values_are_refused_and_change_nothing(service: SplitService) -> None:
    server = _server()
    before = copy.deepcopy(server.model.state_dict())
    proxy = connect(service, server)
    z, y = _batch(0)
    with pytest.raises(InvalidArgumentsError, match=r"'labels': expected value < 3 .*from 0 to 9"):
        proxy.forward_backward(embeddings=z, labels=torch.arange(ROWS) * 3)  # the first call: checked after forward
    for name, value in server.model.state_dict().items():
        torch.testing.assert_close(value, before[name])
    proxy.forward_backward(embeddings=z, labels=y)
    trained = copy.deepcopy(server.model.state_dict())
    with pytest.raises(InvalidArgumentsError, match=r"forward_backward: argument 'labels'.*value < 3"):
        proxy.forward_backward(embeddings=z, labels=torch.full((ROWS,), CLASSES))
    with pytest.raises(InvalidArgumentsError, match=r"forward_backward: argument 'embeddings': expected finite"):
        proxy.forward_backward(embeddings=torch.full_like(z, float("nan")), labels=y)
    for name, value in server.model.state_dict().items():
        torch.testing.assert_close(value, trained[name])
    assert server.num_examples == ROWS
    assert not all(torch.equal(before[k], trained[k]) for k in before)
    assert proxy.forward_backward(embeddings=z, labels=y) is not None, "the server stopped serving"
    proxy.close()


def test_a_bad_value_fails_its_caller_and_the_batch_runs_without_it(service: SplitService) -> None:
    server, alone = _server(), _server()
    scheduler = BatchingScheduler(server, flush_timeout=5.0)
    scheduler.set_clients(["bad", "good"])
    bad_inputs = {
        0: _batch(10),
        1: (_batch(11)[0], torch.full((ROWS,), CLASSES + 4)),
        2: (torch.full((ROWS, FEATURES), float("inf")), _batch(12)[1]),
    }
    refusals: list[str] = []
    grads: list[object] = []

    def bad() -> None:
        proxy = connect(service, scheduler, client="bad")
        for step, (z, y) in bad_inputs.items():
            try:
                proxy.forward_backward(embeddings=z, labels=y)
            except InvalidArgumentsError as err:
                refusals.append(f"{step}: {err}")
        proxy.close()

    def good() -> None:
        proxy = connect(service, scheduler, client="good")
        grads.extend(proxy.forward_backward(embeddings=z, labels=y) for z, y in map(_batch, range(3)))
        proxy.close()

    threads = [threading.Thread(target=job, daemon=True) for job in (bad, good)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    assert [r.split(":")[0] for r in refusals] == ["1", "2"], refusals
    assert "'labels'" in refusals[0] and "'embeddings'" in refusals[1]
    assert scheduler.timeout_flushes == 0, "a refused caller left the others waiting for the flush timeout"

    # The same computation in one process: both callers' first batches together, then the good one's alone.
    z0, y0 = _batch(10)
    alone.forward_backward(embeddings=torch.cat([z0, _batch(0)[0]]), labels=torch.cat([y0, _batch(0)[1]]))
    for step in (1, 2):
        z, y = _batch(step)
        torch.testing.assert_close(grads[step], alone.forward_backward(embeddings=z, labels=y))
    for name, value in alone.model.state_dict().items():
        torch.testing.assert_close(server.model.state_dict()[name], value)
    assert server.num_examples == 4 * ROWS


def test_the_client_refuses_a_gradient_that_would_ruin_its_weights() -> None:
    client = CSLClient(nn.Linear(4, 3), synthetic(8, 8, num_classes=3, input_shape=(1, 2, 2))[0])
    client.optimizer = torch.optim.SGD(client.model.parameters(), lr=0.5)
    before = copy.deepcopy(client.model.state_dict())
    z = client.segment(torch.randn(2, 4))
    with pytest.raises(DivergedError, match="the gradient of output 0 holds NaN or infinity"):
        client.step(z, torch.full((2, 3), float("nan")))
    with pytest.raises(AlgorithmError, match=r"output 0 has shape \[2, 3\] but its gradient is \[6\]"):
        client.step(z, torch.ones(6))
    with pytest.raises(AlgorithmError, match=r"2 output\(s\) but 1 gradient\(s\)"):
        client.step([z, z.sum()], [torch.ones(2, 3)])
    for name, value in client.model.state_dict().items():
        torch.testing.assert_close(value, before[name])
    client.step(z, torch.ones(2, 3, dtype=torch.float16))  # a float16 gradient (a server computing in half)
    torch.testing.assert_close(client.model.state_dict()["segment.bias"], before["segment.bias"] - 0.5 * 2)


def test_specs_that_would_fail_every_call_are_refused_when_the_class_is_defined() -> None:
    with pytest.raises(AlgorithmError, match=r"dtypes: expected a tuple of torch dtypes .* got torch.float32"):
        TensorSpec(dtypes=torch.float32)  # type: ignore[arg-type]
    with pytest.raises(AlgorithmError, match=r"shape: expected a tuple such as \('batch', ...\), got 'batch'"):
        TensorSpec(shape="batch")  # type: ignore[arg-type]
    with pytest.raises(AlgorithmError, match=r"@remote takes a TensorSpec per argument"):
        remote(x=FLOATING)  # type: ignore[arg-type]
    with pytest.raises(AlgorithmError, match=r"write @remote\(...\) with parentheses"):
        remote(lambda self, x: x)
    with pytest.raises(AlgorithmError, match=r"Typo.train: argument 'labels' is bounded by 'num_clases', which Typo"):

        class Typo(ServerModel):
            @remote(labels=TensorSpec(high="num_clases"))
            def train(self, labels: torch.Tensor) -> None: ...


def test_positional_tensors_to_a_remote_method_get_a_hint(service: SplitService) -> None:
    proxy = connect(service, _server())
    z, y = _batch(0)
    for call, variant in ((proxy.forward_backward, ""), (proxy.forward_backward.future, ".future")):
        with pytest.raises(InvalidArgumentsError, match=rf"got 2 positional: write proxy.forward_backward{variant}\("):
            call(z, y)
    proxy.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_embeddings_of_another_floating_dtype_train_the_model_and_get_their_gradient_back(
    service: SplitService, dtype: torch.dtype
) -> None:
    server, reference = _server(), _server()
    z, y = _batch(0)
    grad = connect(service, server).forward_backward(embeddings=z.to(dtype), labels=y)
    assert isinstance(grad, torch.Tensor) and grad.dtype == dtype
    expected = reference.forward_backward(embeddings=z.to(dtype).float(), labels=y)
    torch.testing.assert_close(grad.float(), expected, atol=1e-2, rtol=1e-2)
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(server.model.state_dict()[name], value)


def test_targets_that_are_not_class_indices_are_not_bounded() -> None:
    binary = SupervisedServerModel(nn.Linear(FEATURES, 1), loss_fn=nn.functional.binary_cross_entropy_with_logits)
    binary.configure_fit(None, {"lr": 0.1})
    binary.train_on(torch.randn(2, FEATURES), torch.tensor([[0.0], [1.0]]))
    assert binary.num_classes is None, "a binary head's width is not a class count"
    classifier = _server()
    classifier.train_on(torch.randn(2, FEATURES), torch.tensor([0, -100]))  # cross_entropy's ignored label
    assert classifier.num_classes == CLASSES
    pair = SupervisedServerModel(_TwoHeads())
    assert [t.shape for t in pair.predict(embeddings=torch.randn(2, FEATURES))] == [(2, 3), (2, 1)]
    ids = SupervisedServerModel(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3)))
    assert ids.predict(embeddings=torch.tensor([[1, 2]])).shape == (1, 3)  # int64 ids are not cast


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(FEATURES, 3), nn.Linear(FEATURES, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


def test_a_gradient_that_overflows_the_outputs_dtype_is_refused() -> None:
    client = CSLClient(nn.Linear(4, 3).half(), synthetic(8, 8, num_classes=3, input_shape=(1, 2, 2))[0])
    z = client.segment(torch.randn(2, 4).half())
    with pytest.raises(DivergedError, match=r"NaN or infinity \(in the output's dtype, float16\)"):
        client.step(z, torch.full((2, 3), 1e6))


@pytest.mark.parametrize("algorithm", ["csl", "dsl", "locfedmix"])
def test_a_server_model_built_for_a_dataset_checks_the_labels_of_its_very_first_call(algorithm: str) -> None:
    experiment = Experiment(ExperimentConfig(algorithm=algorithm, dataset="synthetic", clients=1, train_size=64))
    server = experiment.make_server_model()
    takes_labels = [name for name, method in remote_methods(type(server)).items() if "labels" in method.specs]
    assert takes_labels
    for method in takes_labels:  # refused before any forward has run (which would learn num_classes)
        with pytest.raises(InvalidArgumentsError, match=r"'labels': expected value < 10"):
            check_values(server, method, {"labels": torch.tensor([0, 10])})


def test_an_override_without_remote_keeps_the_checks_of_the_method_it_overrides(service: SplitService) -> None:
    class Clipped(CSLServerModel):
        def forward_backward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return super().forward_backward(embeddings=embeddings, labels=labels).clamp(-1, 1)

    server = _server()
    clipped = Clipped(copy.deepcopy(server.model))
    clipped.configure_fit(None, {"lr": 0.1})
    before = copy.deepcopy(clipped.model.state_dict())
    z, y = _batch(0)
    proxy = connect(service, clipped)
    with pytest.raises(InvalidArgumentsError, match="expected finite values"):
        proxy.forward_backward(embeddings=z.index_fill(0, torch.tensor([1]), math.nan), labels=y)
    with pytest.raises(InvalidArgumentsError, match="expected dtype"):
        proxy.forward_backward(embeddings=z, labels=y.int())
    for name, value in before.items():
        torch.testing.assert_close(clipped.model.state_dict()[name], value)
    grad = proxy.forward_backward(embeddings=z, labels=y)
    assert isinstance(grad, torch.Tensor) and grad.abs().max() <= 1

    class Unchecked(CSLServerModel):
        @remote()  # an explicit declaration: no checks
        def forward_backward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return super().forward_backward(embeddings=embeddings, labels=labels)

    assert remote_methods(Unchecked)["forward_backward"].specs == {}


@pytest.mark.parametrize("bad", [True, 1.0, (0,)])
def test_a_client_id_a_reply_cannot_carry_is_refused_when_the_client_is_built(bad: Any) -> None:
    data, _ = synthetic(8, 8, input_shape=(1, 4, 4))
    with pytest.raises(AlgorithmError, match=re.escape(f"client_id must be an int, a str or None, got {bad!r}")):
        CSLClient(nn.Flatten(), data, client_id=bad)
    assert CSLClient(nn.Flatten(), data, client_id="jetson-3").log_prefix == "[client jetson-3]"
    assert CSLClient(nn.Flatten(), data).log_prefix == "[client]"
    assert type(CSLClient(nn.Flatten(), data, client_id=np.int64(3)).client_id) is int  # a reply carries it

"""ServerModel.call_context through the real service: who calls, and whose rows are whose."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from conftest import connect
from splitflower.scheduling import BatchingScheduler, ImmediateScheduler
from splitflower.server_model import CallContext, ServerModel
from splitflower.service import SplitService


class WhoAsks(ServerModel):
    """Echoes the call context back (a 3-row dict broadcasts to every caller of a batch)."""

    def __init__(self) -> None:
        super().__init__(nn.Identity())

    def who(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        context = self.call_context
        return {
            "callers": torch.tensor(context.callers),
            "starts": torch.tensor([r.start for r in context.rows]),
            "stops": torch.tensor([r.stop for r in context.rows]),
        }


def test_unbatched_call_names_its_caller(service: SplitService) -> None:
    model = WhoAsks()
    proxy = connect(service, ImmediateScheduler(model), client=7)
    reply = proxy.who(x=torch.zeros(4, 2))
    proxy.close()
    assert isinstance(reply, dict)
    assert reply["callers"].tolist() == [7]
    assert (reply["starts"].tolist(), reply["stops"].tolist()) == ([0], [4])
    assert model.call_context == CallContext(), "cleared after the call"


def test_batched_call_gives_each_caller_its_rows(service: SplitService) -> None:
    model = WhoAsks()
    scheduler = BatchingScheduler(model, flush_timeout=5.0)
    scheduler.set_clients([1, 2])  # the strategy's order: rows follow it, not arrival order
    replies: dict[int, object] = {}

    def ask(client: int, rows: int) -> None:
        proxy = connect(service, scheduler, client=client)
        replies[client] = proxy.who(x=torch.zeros(rows, 2))
        proxy.close()

    threads = [threading.Thread(target=ask, args=(2, 5)), threading.Thread(target=ask, args=(1, 3))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert scheduler.flushes == 1, "both requests ran as one batch"
    for reply in replies.values():
        assert isinstance(reply, dict)
        assert reply["callers"].tolist() == [1, 2]
        assert (reply["starts"].tolist(), reply["stops"].tolist()) == ([0, 3], [3, 8])


def test_caller_refuses_a_batched_call_and_own_mean_grad_rescales_rows() -> None:
    context = CallContext(callers=("a", "b"), rows=(slice(0, 1), slice(1, 4)))
    with pytest.raises(RuntimeError, match="exactly one caller"):
        _ = context.caller
    # d(mean over 4 rows)/d(row) = 1/4; each caller's own mean gives 1/1 and 1/3.
    grad = context.own_mean_grad(torch.full((4, 2), 1 / 4))
    torch.testing.assert_close(grad, torch.tensor([[1.0, 1.0]] + [[1 / 3, 1 / 3]] * 3))


@pytest.mark.parametrize(("count", "width"), [(None, 3), (2, 2), (9, 3)])
def test_rows_of_other_callers_pairs_each_row_with_rows_of_as_many_different_other_callers(
    count: int | None, width: int
) -> None:
    sizes = (1, 2, 3, 4)
    rows = tuple(slice(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes)))
    context = CallContext(callers=tuple("abcd"), rows=rows)
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    seen: set[tuple[int, ...]] = set()
    for _ in range(50):
        partners = context.rows_of_other_callers(count)
        assert partners.shape == (sum(sizes), width)
        callers = owner[partners]  # the caller each partner row came from
        assert (callers != owner.unsqueeze(1)).all(), "never the row's own caller"
        assert all(len(set(row.tolist())) == width for row in callers), "a different caller each"
        seen.update(tuple(row.tolist()) for row in callers[:1])
    assert len(seen) > 1, "the callers are drawn at random"


@pytest.mark.parametrize("count", [0, -1, 1.5])
def test_rows_of_other_callers_refuses_a_count_that_is_not_a_positive_integer(count: object) -> None:
    context = CallContext(callers=("a", "b"), rows=(slice(0, 1), slice(1, 2)))
    with pytest.raises(ValueError, match=rf"count must be None \(every other caller\) or at least 1, got {count}"):
        context.rows_of_other_callers(count)  # type: ignore[arg-type]

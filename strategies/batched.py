"""Parallel split learning with cross-client batching always on."""

from __future__ import annotations

from typing import Any

from splitflower.strategies.parallel import ParallelStrategy

__all__ = ["BatchedStrategy"]


class BatchedStrategy(ParallelStrategy):
    """:class:`ParallelStrategy` whose server concatenates the pending requests of the
    round's clients into one batch (``batching=True`` whatever is passed), so a server
    method sees every client's tensors at once; ``call_context.rows`` tells whose rows
    are whose. The flush timeout keeps unequal batch counts and dropped clients from
    stalling it.

    Example
    -------
    >>> BatchedStrategy(batching=False).batching
    True
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "batching": True})

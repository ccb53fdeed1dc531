"""Strategies: how many server models, who talks to which, when requests run.

Installed as ``splitflower.strategies``.
"""

from splitflower._named import lookup
from splitflower.errors import ConfigError
from splitflower.strategies.batched import BatchedStrategy
from splitflower.strategies.parallel import ParallelStrategy
from splitflower.strategies.sequential import SequentialStrategy
from splitflower.strategies.splitfed_v1 import SplitFedV1Strategy
from splitflower.strategies.splitfed_v2 import SplitFedV2Strategy
from splitflower.strategy import SplitStrategy

__all__ = [
    "BatchedStrategy",
    "ParallelStrategy",
    "SequentialStrategy",
    "SplitFedV1Strategy",
    "SplitFedV2Strategy",
    "STRATEGIES",
    "find_strategy",
]

STRATEGIES = {
    "sequential": SequentialStrategy,
    "parallel": ParallelStrategy,
    "batched": BatchedStrategy,
    "splitfed-v1": SplitFedV1Strategy,
    "splitfed-v2": SplitFedV2Strategy,
}


def find_strategy(name: str) -> type[SplitStrategy]:
    """A registered strategy (a key of :data:`STRATEGIES`), or a :class:`SplitStrategy`
    subclass of your own named ``MODULE:ATTRIBUTE``.

    Example
    -------
    >>> find_strategy("parallel").__name__
    'ParallelStrategy'
    """
    found = lookup("strategy", name, STRATEGIES)
    if not (isinstance(found, type) and issubclass(found, SplitStrategy)):
        raise ConfigError(f"strategy {name!r} must be a SplitStrategy subclass, got {found!r}")
    return found

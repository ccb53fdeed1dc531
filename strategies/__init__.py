"""Strategies: how many server models, who talks to which, when requests run.

Installed as ``splitflower.strategies``.
"""

from splitflower.strategies.batched import BatchedStrategy
from splitflower.strategies.parallel import ParallelStrategy
from splitflower.strategies.sequential import SequentialStrategy
from splitflower.strategies.splitfed_v1 import SplitFedV1Strategy
from splitflower.strategies.splitfed_v2 import SplitFedV2Strategy

__all__ = [
    "BatchedStrategy",
    "ParallelStrategy",
    "SequentialStrategy",
    "SplitFedV1Strategy",
    "SplitFedV2Strategy",
    "STRATEGIES",
]

STRATEGIES = {
    "sequential": SequentialStrategy,
    "parallel": ParallelStrategy,
    "batched": BatchedStrategy,
    "splitfed-v1": SplitFedV1Strategy,
    "splitfed-v2": SplitFedV2Strategy,
}

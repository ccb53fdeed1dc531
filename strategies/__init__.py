"""Strategies: how many server models, who talks to which, when requests run.

Installed as ``splitflower.strategies``.
"""

from splitflower.strategies.parallel import ParallelStrategy
from splitflower.strategies.sequential import SequentialStrategy

__all__ = ["ParallelStrategy", "SequentialStrategy", "STRATEGIES"]

STRATEGIES = {"sequential": SequentialStrategy, "parallel": ParallelStrategy}

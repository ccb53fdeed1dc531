"""Split-learning algorithms, one file each (client and server model together).

Installed as ``splitflower.algorithms``. :data:`ALGORITHMS` maps the names the CLI accepts
to each algorithm's pair and the strategies it can run under.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitflower.algorithms.csl import CSLClient, CSLServerModel
from splitflower.algorithms.dsl import DSLClient, DSLServerModel
from splitflower.client import Client
from splitflower.errors import IncompatibleStrategyError
from splitflower.server_model import ServerModel

__all__ = ["ALGORITHMS", "Algorithm", "CSLClient", "CSLServerModel", "DSLClient", "DSLServerModel"]


@dataclass(frozen=True)
class Algorithm:
    """A named client + server-model pair and the strategies it runs under."""

    name: str
    client: type[Client]
    server_model: type[ServerModel]
    default_strategy: str = "parallel"
    strategies: tuple[str, ...] | None = None  # None: any strategy

    def check_strategy(self, strategy: str) -> None:
        """Refuse a strategy this algorithm cannot run under, naming the ones it can."""
        if self.strategies is not None and strategy not in self.strategies:
            raise IncompatibleStrategyError(
                f"algorithm {self.name!r} runs under {', '.join(self.strategies)}, not {strategy!r}; "
                f"drop --strategy to use its default ({self.default_strategy})"
            )


ALGORITHMS: dict[str, Algorithm] = {
    "csl": Algorithm("csl", CSLClient, CSLServerModel),
    "dsl": Algorithm("dsl", DSLClient, DSLServerModel),
}

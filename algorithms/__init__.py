"""Split-learning algorithms, one file each (client and server model together).

Installed as ``splitflower.algorithms``. :data:`ALGORITHMS` maps the names the CLI accepts
to each algorithm's pair and the strategies it can run under.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from splitflower._named import lookup
from splitflower.algorithms.csl import CSLClient, CSLOptions, CSLServerModel
from splitflower.algorithms.dsl import DSLClient, DSLOptions, DSLServerModel
from splitflower.algorithms.fedsl import FedSLClient, FedSLServerModel
from splitflower.algorithms.locfedmix import LocFedMixClient, LocFedMixOptions, LocFedMixServerModel
from splitflower.algorithms.splitavg import SplitAvgClient, SplitAvgServerModel
from splitflower.algorithms.streamsl import StreamSLClient, StreamSLServerModel
from splitflower.algorithms.ushaped import UShapedClient, UShapedServerModel
from splitflower.client import Client
from splitflower.errors import AlgorithmError, ConfigError, IncompatibleStrategyError
from splitflower.options import parse_options
from splitflower.server_model import ServerModel
from splitflower.strategies import STRATEGIES

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "find_algorithm",
    "CSLClient",
    "CSLOptions",
    "CSLServerModel",
    "DSLClient",
    "DSLOptions",
    "DSLServerModel",
    "FedSLClient",
    "FedSLServerModel",
    "LocFedMixClient",
    "LocFedMixOptions",
    "LocFedMixServerModel",
    "SplitAvgClient",
    "SplitAvgServerModel",
    "StreamSLClient",
    "StreamSLServerModel",
    "UShapedClient",
    "UShapedServerModel",
]

# A server model holding a client's graph between two calls must not step for another
# client meanwhile (the step would invalidate the held graph): one client per model at a time.
_ONE_CLIENT_PER_MODEL = ("splitfed-v1", "splitfed-v2", "sequential")


@dataclass(frozen=True)
class Algorithm:
    """A named client + server-model pair, the strategies it runs under, and its options.

    Its options are the client's ``Options`` dataclass (else the server model's); when
    there is one, both the client and the server model are built with ``options=<instance>``.

    Example
    -------
    >>> ALGORITHMS["csl"].parse_options(["window=2"])
    CSLOptions(window=2)
    """

    name: str
    client: type[Client]
    server_model: type[ServerModel]
    default_strategy: str = "parallel"
    strategies: tuple[str, ...] | None = None  # None: any strategy
    keeps_tail: bool = False  # the client also keeps the model's last layer (``tail=`` to the client)

    def __post_init__(self) -> None:
        for role, given, base in (("client", self.client, Client), ("server_model", self.server_model, ServerModel)):
            if not (isinstance(given, type) and issubclass(given, base)):
                other = ServerModel if base is Client else Client
                is_other = isinstance(given, type) and issubclass(given, other)
                swapped = " (client and server model swapped?)" if is_other else ""
                raise AlgorithmError(
                    f"Algorithm {self.name!r}: {role} must be a subclass of {base.__name__}, got {given!r}{swapped}; "
                    "write Algorithm(name, ClientClass, ServerModelClass)"
                )
        if not isinstance(self.strategies, tuple | list | type(None)):
            raise AlgorithmError(
                f"Algorithm {self.name!r}: strategies must be a tuple of names, got {self.strategies!r}"
            )
        for strategy in (self.default_strategy, *(self.strategies or ())):
            if not isinstance(strategy, str) or (":" not in strategy and strategy not in STRATEGIES):
                raise AlgorithmError(
                    f"Algorithm {self.name!r}: strategy {strategy!r} is not one of {', '.join(STRATEGIES)} "
                    "(or MODULE:ATTRIBUTE of your own)"
                )
        if self.strategies is not None and self.default_strategy not in self.strategies:
            raise AlgorithmError(
                f"Algorithm {self.name!r}: default_strategy {self.default_strategy!r} is not among its strategies "
                f"{list(self.strategies)}"
            )

    @property
    def options(self) -> type | None:
        """The dataclass of this algorithm's options, if it has any."""
        return self.client.Options or self.server_model.Options

    def parse_options(self, pairs: Sequence[str]) -> Any:
        """The options instance for ``key=value`` strings (None if the algorithm has none)."""
        if self.options is None:
            if pairs:
                raise ConfigError(f"algorithm {self.name!r} takes no options, got {list(pairs)}")
            return None
        return parse_options(self.options, pairs, owner=self.name)

    def option_kwargs(self, pairs: Sequence[str]) -> dict[str, Any]:
        """Keyword arguments that hand the parsed options to a client or server model."""
        options = self.parse_options(pairs)
        return {} if options is None else {"options": options}

    def check_strategy(self, strategy: str) -> None:
        """Refuse a strategy this algorithm cannot run under, naming the ones it can."""
        if self.strategies is not None and strategy not in self.strategies:
            raise IncompatibleStrategyError(
                f"algorithm {self.name!r} runs under {', '.join(self.strategies)}, not {strategy!r}; "
                f"drop --strategy (in a Flower run config: strategy='') to use its default ({self.default_strategy})"
            )


ALGORITHMS: dict[str, Algorithm] = {
    "csl": Algorithm("csl", CSLClient, CSLServerModel),
    "dsl": Algorithm("dsl", DSLClient, DSLServerModel),
    "locfedmix": Algorithm("locfedmix", LocFedMixClient, LocFedMixServerModel, "batched", ("batched", "sequential")),
    "ushaped": Algorithm(
        "ushaped", UShapedClient, UShapedServerModel, "splitfed-v1", _ONE_CLIENT_PER_MODEL, keeps_tail=True
    ),
    "streamsl": Algorithm("streamsl", StreamSLClient, StreamSLServerModel),
    "fedsl": Algorithm("fedsl", FedSLClient, FedSLServerModel),
    "splitavg": Algorithm("splitavg", SplitAvgClient, SplitAvgServerModel, "batched", ("batched",)),
}


def find_algorithm(name: str) -> Algorithm:
    """A registered algorithm (a key of :data:`ALGORITHMS`), or one of your own named
    ``MODULE:ATTRIBUTE``, where ``MODULE`` is importable (e.g. a file in the working folder)
    and ``ATTRIBUTE`` an :class:`Algorithm`; no change to this package is needed.

    Example
    -------
    >>> find_algorithm("splitflower.algorithms:ALGORITHMS")
    Traceback (most recent call last):
    ...
    splitflower.errors.ConfigError: algorithm 'splitflower.algorithms:ALGORITHMS' must be an Algorithm, got dict
    """
    found = lookup("algorithm", name, ALGORITHMS)
    if not isinstance(found, Algorithm):
        raise ConfigError(f"algorithm {name!r} must be an Algorithm, got {type(found).__name__}")
    return found

"""The contracts other code implements: backplanes (and the factories entry points name), their
listeners, client transports and their connections, conflict strategies and alert rules."""

from ._alerts import AlertRule
from ._backplane import Backplane, BackplaneFactory, Listener
from ._strategy import ConflictStrategy, Split
from ._transport import Connection, Transport

__all__ = [
    "AlertRule",
    "Backplane",
    "BackplaneFactory",
    "ConflictStrategy",
    "Connection",
    "Listener",
    "Split",
    "Transport",
]

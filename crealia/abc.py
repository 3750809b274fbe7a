"""The contracts other code implements: backplanes (and the factories entry points name),
their listeners, client connections, conflict strategies and alert rules."""

from ._alerts import AlertRule
from ._backplane import Backplane, BackplaneFactory, Listener
from ._session import Connection
from ._strategy import ConflictStrategy

__all__ = [
    "AlertRule",
    "Backplane",
    "BackplaneFactory",
    "ConflictStrategy",
    "Connection",
    "Listener",
]

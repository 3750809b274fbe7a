"""The contracts other code implements: backplanes, their listeners, client transports and their
connections, conflict strategies and alert rules."""

from ._alerts import AlertRule
from ._backplane import Backplane, Listener
from ._strategy import ConflictStrategy
from ._transport import Connection, Transport

__all__ = ["AlertRule", "Backplane", "ConflictStrategy", "Connection", "Listener", "Transport"]

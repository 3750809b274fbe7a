"""The contracts other code implements: backplanes, their listeners, client connections,
conflict strategies and alert rules."""

from ._alerts import AlertRule
from ._backplane import Backplane, Listener
from ._session import Connection
from ._strategy import ConflictStrategy

__all__ = ["AlertRule", "Backplane", "ConflictStrategy", "Connection", "Listener"]

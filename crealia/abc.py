"""The contracts other code implements: backplanes, their listeners, and client connections."""

from ._backplane import Backplane, Listener
from ._session import Connection
from ._strategy import ConflictStrategy

__all__ = ["Backplane", "ConflictStrategy", "Connection", "Listener"]

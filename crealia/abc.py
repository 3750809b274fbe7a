"""The contracts other code implements: backplanes, their listeners, and client connections."""

from ._backplane import Backplane, Listener
from ._session import Connection

__all__ = ["Backplane", "Connection", "Listener"]

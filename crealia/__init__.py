"""crealia: the real-time collaboration layer for a creative timeline editor, on Trio.

Every public name lives in a private module and is imported from it the first time it is used
(:pep:`562`): ``import crealia`` costs no more than :data:`__version__`, so the ``crealia``
command parses its arguments and answers ``--version`` or ``--help`` without importing the
server, and a program that needs the client does not import hypercorn. :data:`_HOMES` says
where each name lives; the ``TYPE_CHECKING`` block imports them all, so type checkers and IDEs
see the same names eagerly (``tests/test_exports.py`` checks the three lists agree).
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING
from typing import Any as _Any

from ._version import __version__ as __version__

if TYPE_CHECKING:
    from ._alerts import Alert, AlertEngine, Finding, ThresholdRule
    from ._auth import TokenAuthority
    from ._backplane import Backplane, HeldHistory, Listener
    from ._client import ClientSession, Push, SessionState, connect, open_session
    from ._config import Config
    from ._errors import (
        AIProviderError,
        BadRequest,
        ClientClosed,
        ClientError,
        ConfigurationError,
        ConnectionClosed,
        ConnectionLost,
        CrealiaError,
        Forbidden,
        InternalError,
        NotFound,
        Overloaded,
        ProtocolError,
        RateLimited,
        RoomError,
        ServerError,
        StorageError,
        StrategyError,
        TooLarge,
        TransportError,
        Unauthorized,
        Unsupported,
    )
    from ._model import (
        ROLES,
        ChangeOutcome,
        Choice,
        Conflict,
        DurableEvent,
        Ephemeral,
        Resolution,
        Role,
        Settled,
        User,
    )
    from ._sequencing import ChangeRecord, PreparedWrite, Sequencer
    from ._server import Server, open_server, serve
    from ._strategy import DECLINE, DEFER, Answer, Part, Participant, ResolutionContext, Verdict
    from ._transport import Acceptor, Connection, HandshakeRefusal
    from ._wire import Comment, TimelineChange

#: Each public name and the module it lives in (imported when the name is first read).
_HOMES: dict[str, str] = {
    name: f"crealia.{module}"
    for module, names in (
        ("_alerts", ("Alert", "AlertEngine", "Finding", "ThresholdRule")),
        ("_auth", ("TokenAuthority",)),
        ("_backplane", ("Backplane", "HeldHistory", "Listener")),
        ("_client", ("ClientSession", "Push", "SessionState", "connect", "open_session")),
        ("_config", ("Config",)),
        ("_errors", (
            "AIProviderError", "BadRequest", "ClientClosed", "ClientError", "ConfigurationError",
            "ConnectionClosed", "ConnectionLost", "CrealiaError", "Forbidden", "InternalError",
            "NotFound", "Overloaded", "ProtocolError", "RateLimited", "RoomError", "ServerError",
            "StorageError", "StrategyError", "TooLarge", "TransportError", "Unauthorized",
            "Unsupported",
        )),
        ("_model", (
            "ROLES", "ChangeOutcome", "Choice", "Conflict", "DurableEvent", "Ephemeral",
            "Resolution", "Role", "Settled", "User",
        )),
        ("_sequencing", ("ChangeRecord", "PreparedWrite", "Sequencer")),
        ("_server", ("Server", "open_server", "serve")),
        ("_strategy", (
            "DECLINE", "DEFER", "Answer", "Part", "Participant", "ResolutionContext", "Verdict",
        )),
        ("_transport", ("Acceptor", "Connection", "HandshakeRefusal")),
        ("_wire", ("Comment", "TimelineChange")),
    )
    for name in names
}  # fmt: skip

__all__ = [
    "DECLINE",
    "DEFER",
    "ROLES",
    "AIProviderError",
    "Acceptor",
    "Alert",
    "AlertEngine",
    "Answer",
    "Backplane",
    "BadRequest",
    "ChangeOutcome",
    "ChangeRecord",
    "Choice",
    "ClientClosed",
    "ClientError",
    "ClientSession",
    "Comment",
    "Config",
    "ConfigurationError",
    "Conflict",
    "Connection",
    "ConnectionClosed",
    "ConnectionLost",
    "CrealiaError",
    "DurableEvent",
    "Ephemeral",
    "Finding",
    "Forbidden",
    "HandshakeRefusal",
    "HeldHistory",
    "InternalError",
    "Listener",
    "NotFound",
    "Overloaded",
    "Part",
    "Participant",
    "PreparedWrite",
    "ProtocolError",
    "Push",
    "RateLimited",
    "Resolution",
    "ResolutionContext",
    "Role",
    "RoomError",
    "Sequencer",
    "Server",
    "ServerError",
    "SessionState",
    "Settled",
    "StorageError",
    "StrategyError",
    "ThresholdRule",
    "TimelineChange",
    "TokenAuthority",
    "TooLarge",
    "TransportError",
    "Unauthorized",
    "Unsupported",
    "User",
    "Verdict",
    "connect",
    "open_server",
    "open_session",
    "serve",
]


#: The subpackages, read as attributes of the package (``crealia.transports``) without an
#: import of their own, as when the package imported everything eagerly.
_SUBPACKAGES = frozenset({"backplanes", "strategies", "transports"})


def _import_public(name: str) -> _Any:
    """The public ``name``, imported from its module on first use and kept in the package (the
    package's ``__getattr__``).

    Raises:
        AttributeError: ``name`` is not public (``from crealia import _wire`` then imports the
            submodule, as it always did).
    """
    if name in _SUBPACKAGES:
        return _importlib.import_module(f"{__name__}.{name}")  # the import sets the attribute
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(home), name)
    globals()[name] = value
    return value


if not TYPE_CHECKING:
    # Hidden from type checkers, which would otherwise take any name, a misspelt one too, as a
    # lazy attribute of type Any: they see the names imported above, and no others.
    __getattr__ = _import_public


def __dir__() -> list[str]:
    # The public names and the subpackages; not what the package imports for itself.
    return sorted({*__all__, *_SUBPACKAGES, *(name for name in globals() if name[:2] == "__")})

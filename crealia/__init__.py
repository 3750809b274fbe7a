"""crealia: the real-time collaboration layer for a creative timeline editor, on Trio."""

from ._alerts import Alert, AlertEngine, Finding, ThresholdRule
from ._auth import TokenAuthority
from ._backplane import Backplane, Listener
from ._client import (
    ClientClosed,
    ClientError,
    ClientSession,
    ConnectionLost,
    Push,
    ServerError,
    SessionState,
    connect,
)
from ._config import Config
from ._errors import (
    BadRequest,
    ConfigurationError,
    CrealiaError,
    Forbidden,
    InternalError,
    NotFound,
    Overloaded,
    ProtocolError,
    RateLimited,
    RoomError,
    StorageError,
    TooLarge,
    TransportError,
    Unauthorized,
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
from ._session import ConnectionClosed
from ._strategy import DECLINE, DEFER, Answer, Participant, ResolutionContext, Verdict
from ._transport import Acceptor, Connection, HandshakeRefusal
from ._wire import Comment, TimelineChange

__version__ = "0.1.0"

__all__ = [
    "DECLINE",
    "DEFER",
    "ROLES",
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
    "InternalError",
    "Listener",
    "NotFound",
    "Overloaded",
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
    "ThresholdRule",
    "TimelineChange",
    "TokenAuthority",
    "TooLarge",
    "TransportError",
    "Unauthorized",
    "User",
    "Verdict",
    "connect",
    "open_server",
    "serve",
]

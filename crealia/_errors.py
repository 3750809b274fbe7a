"""The crealia error tree.

Every error crealia raises on purpose derives from :class:`CrealiaError`, and every class below is
exported by :mod:`crealia` (``tests/test_errors.py`` checks this drawing against the classes)::

    CrealiaError
    ├── ConfigurationError        bad settings, unknown plugin names, unusable data dir
    ├── TransportError            a backplane or client transport failed (storage, Redis, socket)
    │   ├── StorageError          the embedded store could not read or commit
    │   └── ConnectionClosed      a client connection was closed or broke; ``code``: close code
    ├── ProtocolError             a client message broke docs/protocol.md; carries the wire code
    │   ├── BadRequest            ``bad_request``: malformed JSON, unknown type, invalid field
    │   ├── Unauthorized          ``unauthorized``: bad, expired or foreign token
    │   ├── Forbidden             ``forbidden``: the role does not allow the action
    │   ├── NotFound              ``not_found``: unknown element, conflict or project
    │   ├── TooLarge              ``too_large``: a field over its limit
    │   ├── RateLimited           ``rate_limited``: carries ``retry_after_ms``
    │   ├── Overloaded            ``overloaded``: the server cannot take the write now;
    │   │                         ``outcome``: "not_applied" or "unknown" (resend, same id)
    │   ├── Unsupported           ``unsupported`` (REST 501): not possible in this setup
    │   └── InternalError         ``internal`` (REST 500): a bug, reported to the client
    ├── RoomError                 a room was used after it closed (join again)
    ├── StrategyError             a conflict strategy could not answer (the chain goes on)
    │   └── AIProviderError       the ``ai`` strategy's provider gave no usable answer
    └── ClientError               the Python client (:func:`crealia.open_session`)
        ├── ServerError           the server answered ``error`` (``code``, ``message``, ...)
        ├── ConnectionLost        the connection could not be opened or was lost for good
        └── ClientClosed          the session was closed by its owner

:class:`InternalError` is a :class:`ProtocolError` because it travels like one: the edges turn it
into an ``internal`` error envelope or a 500 response, as they do every protocol error.

Adapters map library exceptions into this tree at the boundary (``raise ... from exc``); edges turn
:class:`ProtocolError` into an ``error`` envelope or an HTTP response with its status. Context
managers that own a nursery (:func:`crealia.open_server`, :func:`crealia.open_session`) raise a
lone error as itself rather than in the :class:`ExceptionGroup` its nursery wrapped it in.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Literal, NoReturn, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class CrealiaError(Exception):
    """Base of every error crealia raises on purpose."""


class ConfigurationError(CrealiaError):
    """The configuration cannot be used (bad value, unknown plugin, unusable data dir)."""


class TransportError(CrealiaError):
    """A transport or backplane operation failed."""


class StorageError(TransportError):
    """The store could not read or commit."""


class ConnectionClosed(TransportError):
    """The peer closed the connection or it broke; ``code`` is the close code if known."""

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}) {reason}".strip())
        self.code = code
        self.reason = reason


class RoomError(CrealiaError):
    """A room was used after it closed (:meth:`Room.add_joining <crealia._room.Room.add_joining>`):
    a session let into a closed room would hear nothing, so it must join again, which opens a
    new room. The hub joins again when a room closes while a session is on its way in."""


class StrategyError(CrealiaError):
    """A conflict strategy could not give an answer; the settler takes it for a decline and asks
    the next strategy of the chain."""


class AIProviderError(StrategyError):
    """A provider could not give a usable answer (network, HTTP status, JSON, contract).

    Raised by the providers of :mod:`crealia.strategies.ai`, which re-exports it.
    """


class ProtocolError(CrealiaError):
    """A client request broke the protocol; ``code`` is the wire error code."""

    code = "bad_request"
    http_status = 400

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms

    def to_wire(self) -> dict[str, object]:
        """The ``data`` of the ``error`` envelope for this error."""
        data: dict[str, object] = {"code": self.code, "message": self.message}
        if self.retry_after_ms is not None:
            data["retry_after_ms"] = self.retry_after_ms
        return data


class BadRequest(ProtocolError):
    """Malformed JSON, unknown type, or a field with an invalid value."""

    code = "bad_request"
    http_status = 400


class Unauthorized(ProtocolError):
    """The token is missing, forged, expired, or for another project."""

    code = "unauthorized"
    http_status = 401


class Forbidden(ProtocolError):
    """The caller's role does not allow the action."""

    code = "forbidden"
    http_status = 403


class NotFound(ProtocolError):
    """The named element, conflict or resource does not exist."""

    code = "not_found"
    http_status = 404


class TooLarge(ProtocolError):
    """A field is over its limit inside an acceptable frame."""

    code = "too_large"
    http_status = 413


class RateLimited(ProtocolError):
    """Too many requests of one class; retry after ``retry_after_ms``."""

    code = "rate_limited"
    http_status = 429


class Overloaded(ProtocolError):
    """The server cannot take the request now (storage or backplane unavailable).

    ``outcome`` says what became of the request: ``"not_applied"`` (nothing changed: retry
    when you like) or ``"unknown"`` (the write reached the store but its answer did not come
    back: it may have been applied; resend it with the same ``change_id`` or comment id, and the
    ack says ``duplicate`` if it was). It is sent as ``data.outcome`` of the ``error``.
    """

    code = "overloaded"
    http_status = 503

    def __init__(
        self,
        message: str,
        *,
        retry_after_ms: int | None = None,
        outcome: Literal["not_applied", "unknown"] = "not_applied",
    ) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms)
        self.outcome = outcome

    def to_wire(self) -> dict[str, object]:
        data = super().to_wire()
        data["outcome"] = self.outcome
        return data


class InternalError(ProtocolError):
    """A bug: something failed that should not have."""

    code = "internal"
    http_status = 500


class Unsupported(ProtocolError):
    """The server cannot do this in its current setup (REST only: 501)."""

    code = "unsupported"
    http_status = 501


class ClientError(CrealiaError):
    """Base of every error the Python client raises on purpose."""


class ServerError(ClientError):
    """The server answered a request with ``error``.

    Attributes:
        code: the wire error code (``bad_request``, ``unauthorized``, ``forbidden``,
            ``not_found``, ``rate_limited``, ``too_large``, ``overloaded``, ``internal``).
        message: the server's explanation, naming the offending field where it can.
        retry_after_ms: for ``rate_limited``, how long to wait before trying again.
        outcome: for ``overloaded``, ``"not_applied"`` (nothing changed) or ``"unknown"`` (the
            write may have been applied: resend it with the same id); ``None`` otherwise.
    """

    def __init__(
        self,
        code: str,
        message: str,
        retry_after_ms: int | None = None,
        outcome: str | None = None,
    ) -> None:
        super().__init__(code, message, retry_after_ms)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.outcome = outcome

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConnectionLost(ClientError):
    """The connection could not be opened, or it was lost and the session will not reopen it.

    Also raised by a request whose connection dropped before its reply when sending it again
    would not be safe: it may or may not have taken effect.

    Attributes:
        close_code: the WebSocket close code, when the connection got as far as closing
            (1006 when it ended without a closing handshake); ``None`` otherwise.
        reason: the close reason the server gave, if any.
    """

    def __init__(
        self, message: str, close_code: int | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message, close_code, reason)
        self.message = message
        self.close_code = close_code
        self.reason = reason

    def __str__(self) -> str:
        return self.message


class ClientClosed(ClientError):
    """The session was closed by its owner; it cannot be used any more."""


# ---------------------------------------------------------------------------------------------
# Lone errors out of nurseries


def sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception in ``group`` (however deeply nested) that is not a
    :class:`trio.Cancelled`, if there is exactly one."""
    # Imported here, on the way out of a failed nursery: the error tree itself needs no trio, so
    # what imports only the tree (the ``crealia`` command parsing its arguments) does not load it.
    import trio

    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else None


def reraise(exc: BaseException) -> NoReturn:
    """Raise ``exc`` again, keeping the context it had rather than the group it came in."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context


def raising_lone_errors(
    func: Callable[P, AbstractAsyncContextManager[T]],
) -> Callable[P, AbstractAsyncContextManager[T]]:
    """Wrap an ``open_*`` async context manager so that a :class:`CrealiaError` or
    :class:`OSError` that comes alone out of its nurseries is raised as itself, not in the
    :class:`ExceptionGroup` (one per nursery level) trio wrapped it in. Groups of several
    errors, and lone errors of other kinds (a bug, the body's own), propagate unchanged.
    """

    @functools.wraps(func)
    @asynccontextmanager
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
        try:
            async with func(*args, **kwargs) as value:
                yield value
        except BaseExceptionGroup as group:
            sole = sole_exception(group)
            if not isinstance(sole, CrealiaError | OSError):
                raise
            reraise(sole)

    return wrapper

"""The crealia error tree.

Every error crealia raises on purpose derives from :class:`CrealiaError`::

    CrealiaError
    ├── ConfigurationError        bad settings, unknown plugin names, unusable data dir
    ├── TransportError            a backplane or client transport failed (storage, Redis, socket)
    │   └── StorageError          the embedded store could not read or commit
    ├── ProtocolError             a client message broke docs/protocol.md; carries the wire code
    │   ├── BadRequest            ``bad_request``: malformed JSON, unknown type, invalid field
    │   ├── Unauthorized          ``unauthorized``: bad, expired or foreign token
    │   ├── Forbidden             ``forbidden``: the role does not allow the action
    │   ├── NotFound              ``not_found``: unknown element, conflict or project
    │   ├── TooLarge              ``too_large``: a field over its limit
    │   ├── RateLimited           ``rate_limited``: carries ``retry_after_ms``
    │   ├── Overloaded            ``overloaded``: the server cannot take the write now;
    │   │                         ``outcome``: "not_applied" or "unknown" (resend, same id)
    │   └── Unsupported           ``unsupported`` (REST 501): not possible in this setup
    ├── RoomError                 a room was used after it closed
    └── InternalError             a bug: reported to the client as ``internal``

Adapters map library exceptions into this tree at the boundary (``raise ... from exc``); edges turn
:class:`ProtocolError` into an ``error`` envelope or an HTTP response with its status.
"""

from __future__ import annotations

from typing import Literal


class CrealiaError(Exception):
    """Base of every error crealia raises on purpose."""


class ConfigurationError(CrealiaError):
    """The configuration cannot be used (bad value, unknown plugin, unusable data dir)."""


class TransportError(CrealiaError):
    """A transport or backplane operation failed."""


class StorageError(TransportError):
    """The store could not read or commit."""


class RoomError(CrealiaError):
    """A room was used after it was closed."""


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

"""Conformance checks and helpers for people who write strategies, backplanes and transports
(and for crealia's own tests)."""

from ._conformance import check_backplane
from ._conformance_connection import (
    ConnectionCatcher,
    ConnectionFactory,
    ConnectionPeer,
    check_connection,
)
from ._testing import check_strategy, make_conflict, make_context

__all__ = [
    "ConnectionCatcher",
    "ConnectionFactory",
    "ConnectionPeer",
    "check_backplane",
    "check_connection",
    "check_strategy",
    "make_conflict",
    "make_context",
]

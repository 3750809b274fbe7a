"""Conformance checks and helpers for people who write strategies and transports (and for
crealia's tests)."""

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
    "check_connection",
    "check_strategy",
    "make_conflict",
    "make_context",
]

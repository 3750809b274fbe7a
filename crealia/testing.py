"""Conformance checks and helpers for people who write strategies (and for crealia's tests)."""

from ._testing import check_strategy, make_conflict, make_context

__all__ = ["check_strategy", "make_conflict", "make_context"]

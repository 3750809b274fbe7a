"""Conformance checks and helpers for people who write strategies and backplanes (and for
crealia's own tests)."""

from ._conformance import check_backplane
from ._testing import check_strategy, make_conflict, make_context

__all__ = ["check_backplane", "check_strategy", "make_conflict", "make_context"]

"""``longest``: a crealia conflict strategy that keeps the longer of two texts.

When two people change the same text property (a clip's label, a marker's note) from the same
base, the longer text usually carries more of what they meant: this strategy keeps it. It
settles only conflicts between two strings of different lengths (leading and trailing
whitespace does not count); it declines everything else — numbers, objects, deletes, texts of
equal length — so the next strategy of the project's chain decides those.

Its confidence grows with the difference in length: ``1 - shorter / longer / 2``, so 0.5 for
texts of nearly the same length and 1.0 when the other side is empty.

Option ``min_confidence`` (0..1, default 0): decline when the confidence would be lower, e.g.
``{"longest": {"min_confidence": 0.7}}`` keeps a text only when it is at least 2.5 times as long
as the other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# The strategy contract; crealia does not re-export it publicly yet.
from crealia import DECLINE, Answer, Conflict, ResolutionContext
from crealia.abc import ConflictStrategy

__all__ = ["LongestTextStrategy"]
__version__ = "0.1.0"


class LongestTextStrategy(ConflictStrategy):
    """Keeps the longer text of a text conflict; declines any other conflict.

    Registered as ``longest`` in the ``crealia.strategies`` entry-point group; crealia calls
    the class with the strategy's options.

    Raises:
        ValueError: an unknown option, or ``min_confidence`` outside 0..1.
    """

    name = "longest"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        min_confidence = options.pop("min_confidence", 0.0)
        if options:
            raise ValueError(f"unknown options {sorted(options)}")
        if not (
            isinstance(min_confidence, int | float)
            and not isinstance(min_confidence, bool)
            and math.isfinite(min_confidence)
            and 0.0 <= min_confidence <= 1.0
        ):
            raise ValueError(f"option min_confidence must be a number in 0..1: {min_confidence!r}")
        #: Below this confidence the strategy declines.
        self.min_confidence = float(min_confidence)

    async def resolve(self, conflict: Conflict, context: ResolutionContext) -> Answer:
        """Keep the longer text, or decline. Pure computation: it never waits."""
        current = conflict.current.get("value")
        incoming = conflict.incoming.get("value")
        if conflict.op != "set" or not (isinstance(current, str) and isinstance(incoming, str)):
            return DECLINE
        current_len, incoming_len = len(current.strip()), len(incoming.strip())
        if current_len == incoming_len:
            return DECLINE
        shorter, longer = sorted((current_len, incoming_len))
        confidence = round(1.0 - shorter / longer / 2.0, 3)
        if confidence < self.min_confidence:
            return DECLINE
        what = f"{conflict.element_id}.{conflict.prop}"
        if incoming_len > current_len:
            author = conflict.incoming.get("user_id") or "the incoming change"
            return self.resolution(
                conflict,
                "incoming",
                incoming,
                confidence,
                f"Kept the longer text of {what}: {author}'s {longer} characters over {shorter}.",
            )
        author = conflict.current.get("user_id") or "the current value"
        return self.resolution(
            conflict,
            "current",
            current,
            confidence,
            f"Kept the longer text of {what}: {author}'s {longer} characters over {shorter}.",
        )

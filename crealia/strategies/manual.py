"""``manual``: a person settles the conflict (``conflict_resolve``/``conflict_dismiss`` over the
WebSocket, or ``POST /api/collaboration/conflicts/{id}/resolve``).

Option ``timeout`` (seconds): if nobody settles it within that time, the conflict goes on to the
strategies after ``manual`` in the chain. Without it, it waits for a person indefinitely.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .._backplane import Conflict
from .._strategy import DEFER, Answer, ConflictStrategy, ResolutionContext


class ManualStrategy(ConflictStrategy):
    """Defers every conflict to a person."""

    name = "manual"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        timeout = options.pop("timeout", None)
        if options:
            raise ValueError(f"unknown options {sorted(options)}")
        if timeout is not None and not (
            isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0
        ):
            raise ValueError(f"option timeout must be a positive number of seconds: {timeout!r}")
        #: Seconds to wait for a person before handing the conflict on (None: forever).
        self.timeout: float | None = None if timeout is None else float(timeout)

    async def resolve(self, conflict: Conflict, context: ResolutionContext) -> Answer:
        return DEFER

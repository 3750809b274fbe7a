"""``manual``: a person settles the conflict (``conflict_resolve``/``conflict_dismiss`` over the
WebSocket, or ``POST /api/collaboration/conflicts/{id}/resolve``).

Option ``timeout`` (seconds, a number in 0 < timeout <= 604800, one week): if nobody settles it
within that time, the conflict goes on to the strategies after ``manual`` in the chain. Without
it, it waits for a person indefinitely, so a chain accepts ``manual`` without a timeout only as
its last strategy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .._model import Conflict
from .._strategy import DEFER, Answer, ConflictStrategy, ResolutionContext

#: The longest ``timeout`` accepted, in seconds (one week).
MAX_TIMEOUT = 7 * 24 * 3600


class ManualStrategy(ConflictStrategy):
    """Defers every conflict to a person."""

    name = "manual"
    defers = True

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        timeout = options.pop("timeout", None)
        if options:
            raise ValueError(f"unknown options {sorted(options)} (known: timeout)")
        if timeout is not None and not (
            isinstance(timeout, int | float)
            and not isinstance(timeout, bool)
            and math.isfinite(timeout)
            and 0 < timeout <= MAX_TIMEOUT
        ):
            raise ValueError(
                f"option timeout must be a number of seconds in 0 < timeout <= {MAX_TIMEOUT}, "
                f"got {str(timeout)[:40]!r}"
            )
        #: Seconds to wait for a person before handing the conflict on (None: forever).
        self.timeout: float | None = None if timeout is None else float(timeout)

    async def resolve(self, conflict: Conflict, context: ResolutionContext) -> Answer:
        return DEFER

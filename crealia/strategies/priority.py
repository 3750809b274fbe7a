"""``priority``: the higher role wins; between equal roles, the first or the last writer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._model import ROLES, Conflict
from .._strategy import Answer, ConflictStrategy, ResolutionContext

_RANK: dict[str, int] = {role: rank for rank, role in enumerate(ROLES)}


class PriorityStrategy(ConflictStrategy):
    """Settles every conflict: role rank (owner > editor > commenter > viewer), then the
    writer order given by the ``tie`` option: ``"last"`` (default: the incoming change wins)
    or ``"first"`` (the current value stays).
    """

    name = "priority"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = dict(options or {})
        tie = options.pop("tie", "last")
        if tie not in ("first", "last"):
            raise ValueError(f"option tie must be 'first' or 'last', got {str(tie)[:40]!r}")
        if options:
            raise ValueError(f"unknown options {sorted(options)} (known: tie)")
        self.tie = tie

    async def resolve(self, conflict: Conflict, context: ResolutionContext) -> Answer:
        current_user = conflict.current.get("user_id")
        incoming_user = conflict.incoming.get("user_id")
        current_role = context.current.role or conflict.roles.get(str(current_user))
        incoming_role = context.incoming.role or conflict.roles.get(str(incoming_user))
        current_rank = _RANK.get(current_role or "", -1)
        incoming_rank = _RANK.get(incoming_role or "", -1)
        what = conflict.prop or "the element"
        if current_rank != incoming_rank and current_rank >= 0 and incoming_rank >= 0:
            if incoming_rank > current_rank:
                return self.resolution(
                    conflict, "incoming", conflict.incoming["value"], 0.8,
                    f"{incoming_user} ({incoming_role}) outranks {current_user} "
                    f"({current_role}): their change to {what} wins.",
                )  # fmt: skip
            return self.resolution(
                conflict, "current", conflict.current["value"], 0.8,
                f"{current_user} ({current_role}) outranks {incoming_user} ({incoming_role}): "
                f"the current value of {what} stays.",
            )  # fmt: skip
        same = f"both are {current_role}s" if current_role == incoming_role and current_role \
            else "their roles do not decide"  # fmt: skip
        if self.tie == "last":
            return self.resolution(
                conflict, "incoming", conflict.incoming["value"], 0.6,
                f"{same}; the last writer wins: {incoming_user}'s change to {what}.",
            )  # fmt: skip
        return self.resolution(
            conflict, "current", conflict.current["value"], 0.6,
            f"{same}; the first writer wins: {current_user}'s value of {what} stays.",
        )  # fmt: skip

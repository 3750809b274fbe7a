"""The conflict strategy contract: what a strategy is given, and what it may answer.

A strategy looks at one :class:`~crealia.Conflict` and its :class:`ResolutionContext` and answers
with one of:

- a :class:`Resolution` — it settles the conflict: the value, which side it took (``current``,
  ``incoming`` or ``custom``), a confidence in 0..1 and a plain-language explanation;
- :data:`DECLINE` — it cannot settle this one; the next strategy of the project's chain tries;
- :data:`DEFER` — the conflict stays pending until a person settles it (or the deferral's
  timeout hands it on down the chain).

A strategy that declined may also take the conflict apart (:meth:`ConflictStrategy.split`): the
``merge`` strategy merges what merges and hands each colliding leaf (a key of an object, an item
or the order of a list of items, a text) to the rest of the chain, then puts the answers together
(:class:`Split`).

Strategies are plain objects registered in the ``crealia.strategies`` entry-point group; the entry
point names a factory called with the strategy's options (a mapping, possibly empty: the
operator's ``strategy_options`` with the project owner's over them, so options are untrusted
input: a strategy refuses unknown ones and values outside their documented ranges); the server
then calls :meth:`ConflictStrategy.configure` with its configuration. The entry-point name is the
strategy's public name. :meth:`ConflictStrategy.resolve` is async: a
strategy that does I/O (the AI strategy) must be cancellation-safe, because the server always runs
it under a deadline inside the room's nursery and cancels it when the deadline passes or the room
closes. A strategy that raises is treated as declining (and the error is logged).
"""

from __future__ import annotations

import enum
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ._model import Choice, Conflict, Resolution

if TYPE_CHECKING:
    from ._config import Config


class Verdict(enum.Enum):
    """A strategy's answer when it does not settle the conflict."""

    DECLINE = "decline"
    DEFER = "defer"


#: The strategy cannot settle this conflict: the next one in the chain tries.
DECLINE = Verdict.DECLINE
#: Leave the conflict pending for a person (see the ``manual`` strategy).
DEFER = Verdict.DEFER


@attrs.frozen(kw_only=True)
class Participant:
    """What the server knows of one side's author."""

    user_id: str | None
    role: str | None = None
    #: The element this user has active right now, if they are present in the room.
    active_element: str | None = None
    present: bool = False
    #: Server time (ms) of this side's write, when known.
    at: int | None = None


@attrs.frozen(kw_only=True)
class ResolutionContext:
    """Everything a strategy may weigh besides the conflict itself."""

    project_id: str
    conflict: Conflict
    current: Participant
    incoming: Participant
    #: Server time (ms) when the chain started on this conflict.
    now: int
    #: This strategy's options from the project's configuration.
    options: Mapping[str, Any] = attrs.Factory(dict)


Answer = Resolution | Verdict


@attrs.frozen(kw_only=True)
class Part:
    """One colliding leaf of a conflict a strategy split (:meth:`ConflictStrategy.split`).

    ``conflict`` is the conflict narrowed to that leaf: the same ids, element and authors, its
    ``prop`` naming the leaf (``"transform.x"``, ``"clips[c3]"``, ``"clips (order)"``) and its
    three values the leaf's (``None`` where a side has no such leaf: it removed it).
    """

    label: str
    conflict: Conflict


#: Most parts a split may have; the server ignores a split with more (each part may cost a call
#: to a model: one conflict must not cost thousands).
MAX_PARTS = 16


class Split(ABC):
    """A conflict taken apart by a strategy: what merges is merged, and :attr:`parts` are the
    leaves that collide, for the rest of the chain to settle one by one (at most
    :data:`MAX_PARTS`, all of them within twice the strategy deadline)."""

    parts: tuple[Part, ...]

    @abstractmethod
    def join(self, answers: tuple[Resolution, ...]) -> Resolution | None:
        """The whole conflict's resolution once each part has one (``answers[i]`` settles
        ``parts[i]``), naming the parts and who settled each in its explanation; ``None``
        when the answers cannot be put together (a custom value the merged whole has no place
        for): the chain goes on with the whole conflict."""


def plain_text(text: str, limit: int) -> str:
    """``text`` as one line of plain text: control, format (bidi overrides, zero-width) and
    surrogate characters dropped, whitespace runs made one space, at most ``limit`` characters
    (clipped with an ellipsis)."""
    kept = "".join(
        " " if ch.isspace() else ch
        for ch in text[: limit * 4]
        if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn")
    )
    kept = " ".join(kept.split())
    return kept if len(kept) <= limit else kept[: limit - 1] + "…"


class ConflictStrategy(ABC):
    """A way of settling conflicts. See the module documentation for the contract."""

    #: The strategy's public name (set from the entry-point name when loaded).
    name: str = ""
    #: Whether :meth:`resolve` may answer :data:`DEFER`. A deferring strategy hands a conflict
    #: on after its ``timeout`` attribute (seconds; ``None``: never), so a chain refuses one
    #: without a timeout anywhere but last: the strategies after it would never run.
    defers: bool = False
    #: Seconds a deferral waits for a person before the next strategy tries (``None``: forever).
    timeout: float | None = None

    def configure(self, config: Config) -> None:  # noqa: B027 - optional hook, empty by default
        """Called by the server once the strategy is built, with the operator's configuration:
        what only the operator may set (the ``ai`` strategy's providers) comes from here, never
        from the options, which a project's owner sets.

        Raises:
            ValueError: the options ask for something the configuration does not allow (the
                chain is refused with the message).
        """

    @abstractmethod
    async def resolve(self, conflict: Conflict, context: ResolutionContext) -> Answer:
        """Settle ``conflict``, decline it, or defer it to a person.

        Called at most once per conflict per chain run, always under a deadline; cancellation
        must leave no trace. Must not modify ``conflict`` or ``context``.
        """

    async def split(self, conflict: Conflict, context: ResolutionContext) -> Split | None:
        """Called after :meth:`resolve` declined, when strategies follow this one in the chain:
        the conflict taken apart into what this strategy settles and the leaves it cannot
        (each then goes through the rest of the chain), or ``None`` (the default: the whole
        conflict goes on). Under the same deadline as :meth:`resolve`; cancellation must leave
        no trace."""
        return None

    def resolution(
        self, conflict: Conflict, choice: Choice, value: Any, confidence: float, explanation: str
    ) -> Resolution:
        """Build a :class:`Resolution` signed with this strategy's name."""
        return Resolution(
            value=value,
            choice=choice,
            strategy=self.name,
            confidence=confidence,
            explanation=explanation,
        )

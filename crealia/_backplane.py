"""The backplane contract: how rooms sequence durable events and share ephemeral ones.

A backplane owns each project's ordered, durable history. Rooms hand it changes, comments and
conflict resolutions; it checks them against the document, gives accepted ones the next ``seq``,
makes them durable, and only then tells every subscribed room, in ``seq`` order, on every node.
Ephemeral traffic (cursors, typing, membership) goes through :meth:`Backplane.publish` and is
never stored. The SQLite backplane (``crealia.backplanes.sqlite``) serves one process; a
cluster backplane serves many processes from one shared store.
"""

from __future__ import annotations

import collections
from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from . import _wire
from ._errors import Unsupported
from ._model import ChangeOutcome, Conflict, DurableEvent, Ephemeral, Resolution, Settled, User

#: Events a project's history keeps whatever their size (docs/protocol.md §6: at least 1,000).
MIN_HISTORY_EVENTS = 1000


class History(collections.deque[DurableEvent]):
    """A project's recent durable events, oldest first: at most ``limit`` of them and, beyond
    the last :data:`MIN_HISTORY_EVENTS`, at most ``max_bytes`` of encoded events.

    Only :meth:`append` adds (events come one at a time, in ``seq`` order); the oldest events go.
    """

    def __init__(self, events: Iterable[DurableEvent] = (), *, limit: int, max_bytes: int) -> None:
        super().__init__()
        self.limit = limit
        self.max_bytes = max_bytes
        #: Encoded bytes of the events held.
        self.bytes = 0
        for event in events:
            self.append(event)

    def append(self, event: DurableEvent) -> None:
        super().append(event)
        self.bytes += len(event.encoded)
        while len(self) > self.limit or (
            self.bytes > self.max_bytes and len(self) > MIN_HISTORY_EVENTS
        ):
            self.bytes -= len(self.popleft().encoded)


class Listener(Protocol):
    """What a backplane calls on a subscribed room. Calls are synchronous and must not block."""

    def on_durable(self, event: DurableEvent) -> None: ...

    def on_conflicts(self, conflicts: list[Conflict]) -> None: ...

    def on_ephemeral(self, message: Ephemeral) -> None: ...


class Backplane(ABC):
    """Sequencing, durable history and fan-out between rooms, for every project.

    Every method may be called concurrently from many tasks. Durable methods return only once
    the event is durable *and* has been handed to every subscribed listener, so an ack sent after
    they return never overtakes the event. Cancelling a durable call never leaves half an event:
    either it is sequenced and stored, or nothing is.
    """

    @abstractmethod
    async def commit_change(
        self, user: User, change: _wire.TimelineChange, *, strategy: str = "manual"
    ) -> ChangeOutcome:
        """Check, sequence and store a ``timeline_change``.

        Conflicts it detects are stored pending, naming ``strategy`` (the first of the project's
        chain) as the one settling them, and come back in :attr:`ChangeOutcome.detected`.

        Raises:
            BadRequest, NotFound: the change contradicts the document; nothing is recorded.
            Overloaded: the store cannot take the write now; nothing is recorded.
        """

    @abstractmethod
    async def commit_comment(self, user: User, comment: _wire.Comment) -> tuple[int, bool]:
        """Sequence and store a comment; returns ``(seq, duplicate)``.

        A comment id already stored in the project is a duplicate: its first ``seq`` comes back.

        Raises:
            Overloaded: the store cannot take the write now.
        """

    @abstractmethod
    async def settle(
        self,
        project_id: str,
        conflict_id: str,
        resolution: Resolution,
        *,
        by: str,
        writer: str,
        expect_seq: int | None = None,
        redetect: bool = True,
    ) -> Settled:
        """Settle a pending conflict: the resolution becomes a durable event with its own seq.

        ``by`` is who settled it (the event's user), ``writer`` who the resolved value counts as
        written by. With ``expect_seq``, the target must still be at that version: if it moved,
        the newer value stands (the conflict is resolved as ``current``) and, when the newer
        value is someone else's (and ``redetect``), the incoming value is detected again as a new
        conflict, which :class:`Settled` returns.

        Raises:
            NotFound: no pending conflict with that id in the project.
            Overloaded: the store cannot take the write now.
        """

    @abstractmethod
    async def conflicts(
        self, project_id: str, *, status: str | None = None, limit: int = 200
    ) -> list[Conflict]:
        """The project's conflicts, newest first (``status``: only pending or resolved)."""

    @abstractmethod
    async def dry_run(self, user: User, change: _wire.TimelineChange) -> dict[str, Any]:
        """What ``change`` would do now: ``{"applies": [ops], "conflicts": [...]}``. Changes
        nothing.

        Raises:
            BadRequest, NotFound: the change contradicts the document.
        """

    @abstractmethod
    async def get_settings(self, project_id: str) -> dict[str, Any]:
        """The project's stored settings (``{}`` when none)."""

    @abstractmethod
    async def set_settings(self, project_id: str, settings: dict[str, Any]) -> None:
        """Replace the project's stored settings."""

    @abstractmethod
    async def snapshot(self, project_id: str) -> dict[str, Any]:
        """The project's document as a wire snapshot (docs/protocol.md §5)."""

    @abstractmethod
    async def events_since(self, project_id: str, seq: int) -> list[DurableEvent] | None:
        """Every durable event after ``seq``, in order, or ``None`` if some are no longer kept."""

    async def epoch(self, project_id: str) -> str:
        """The name of the project's history as it stands (docs/protocol.md §3, ``welcome.epoch``).

        It changes whenever the history is rewritten or restored (a GDPR erasure, a restore from
        backup), so that a client resuming with another epoch gets a snapshot, never a replay of
        events that no longer match what it holds. Every process of a cluster answers the same.
        The default, for a backplane that never rewrites history, is one epoch for ever.
        """
        return "0"

    @abstractmethod
    async def pending_conflicts(self, project_id: str) -> list[Conflict]:
        """The project's conflicts still waiting for a resolution."""

    @abstractmethod
    def subscribe(self, project_id: str, listener: Listener) -> AbstractAsyncContextManager[None]:
        """Deliver the project's durable events, conflicts and ephemeral messages to
        ``listener`` while the context is open."""

    @abstractmethod
    async def publish(self, message: Ephemeral) -> None:
        """Send an ephemeral message to every subscribed listener of its project."""

    async def share_presence(  # noqa: B027 - an optional hook: nothing to share in one process
        self, project_id: str, members: list[dict[str, Any]]
    ) -> None:
        """Tell the other processes who is in this process's room of the project (a heartbeat:
        called on every membership change and every few seconds). One process: nothing to do."""

    async def remote_presence(self, project_id: str) -> list[dict[str, Any]]:
        """The members of the project's rooms in the other live processes."""
        return []

    async def sync_rate_limits(self, updates: list[tuple[str, int, float]]) -> list[float] | None:
        """Share rate-limit consumption with the other processes (GCRA, ``crealia._ratelimit``).

        Each update is ``(name, cost, emission_interval_ms)``: ``name`` is a key and class
        (e.g. ``"p:u:edit"``) that admitted ``cost`` more events since the last call, each
        ``emission_interval_ms`` apart at the sustained rate. The shared store moves the name's
        theoretical arrival time (TAT) to ``max(TAT, now) + cost * emission_interval_ms`` on
        *its own* clock, and forgets it once it has passed. Returns, for each update in order,
        how many milliseconds the name's TAT now lies ahead of the store's clock, which the caller
        adds to its own now: so the processes' clocks need not agree.

        Returns ``None`` when there is nothing to share (one process: the default).

        Raises:
            Overloaded: the shared store is unreachable; nothing may have been recorded.
        """
        return None

    async def user_data(self, project_id: str, user_id: str) -> dict[str, Any]:
        """What the backplane stores about a user in a project (GDPR export): ``comments``,
        ``edits`` and ``conflicts``.

        Raises:
            Unsupported: this backplane cannot (the default).
        """
        raise Unsupported(f"GDPR export is not available with {type(self).__name__} yet")

    async def erase_user(self, project_id: str, user_id: str, pseudonym: str) -> dict[str, int]:
        """Erase a user from a project (GDPR): delete their content, pseudonymize the rest.
        The project's room must be closed. Returns what was changed, per kind.

        Raises:
            Unsupported: this backplane cannot (the default).
        """
        raise Unsupported(f"GDPR erasure is not available with {type(self).__name__} yet")

    @abstractmethod
    async def check(self) -> None:
        """Prove the backplane is usable (for ``/readyz``).

        Raises:
            TransportError: it is not.
        """

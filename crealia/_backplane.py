"""The backplane contract: how rooms sequence durable events and share ephemeral ones.

A backplane owns each project's ordered, durable history. Rooms hand it changes, comments and
conflict resolutions; it checks them against the document, gives accepted ones the next ``seq``,
makes them durable, and only then tells every subscribed room, in ``seq`` order, on every node.
Ephemeral traffic (cursors, typing, membership) goes through :meth:`Backplane.publish` and is
never stored.

Everything the core needs from a backplane is on :class:`Backplane`, the core imports nothing
else of it: the durable and ephemeral methods, and the capabilities a simple one-process
backplane may leave at their defaults (:meth:`~Backplane.release`,
:attr:`~Backplane.shares_presence`, :attr:`~Backplane.shares_rate_limits`,
:attr:`~Backplane.supports_gdpr`, :meth:`~Backplane.health_checks`, :meth:`~Backplane.metrics`,
:meth:`~Backplane.held_history`).
A server is handed one (``open_server(config, backplane=...)``, like httpcore's
``network_backend=``) or builds one from ``Config.backplane_url`` through a
:class:`BackplaneFactory` registered in the ``crealia.backplanes`` entry-point group, where the
built-ins (``sqlite``: one process, ``redis``: a cluster) are registered like a third party's.

``crealia.testing.check_backplane`` runs the contract's conformance suite over any backplane;
:class:`~crealia.Sequencer` is the pure, in-memory part of sequencing (document checks,
conflict detection, resume windows) that a new backplane can build on.
"""

from __future__ import annotations

import array
import collections
import itertools
import sys
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from . import _wire
from ._errors import Unsupported
from ._model import ChangeOutcome, Conflict, DurableEvent, Ephemeral, Resolution, Settled, User

if TYPE_CHECKING:
    from prometheus_client import Metric

    from ._config import Config
    from ._ops import OpsStore

#: Events a project's history keeps whatever their size (docs/protocol.md §6: at least 1,000).
MIN_HISTORY_EVENTS = 1000

#: A health probe: returns when healthy, raises (any exception, its message the detail) when not.
#: The server runs each under a deadline of its own (5 s), so a probe needs none.
HealthProbe = Callable[[], Awaitable[None]]


#: Store reads one :meth:`History.since` makes at most (the kept window's own bounds can push
#: events out while it reads; memory's cannot, see :meth:`History.since`).
SINCE_READS = 3


class History(collections.deque[DurableEvent]):
    """A project's recent durable events, oldest first, and the window of them kept for resume.

    The *kept window* is what a resume may be replayed from: the last ``limit`` events and,
    beyond the last :data:`MIN_HISTORY_EVENTS`, at most ``max_bytes`` of encoded events. It
    starts at :attr:`first_kept`. The deque itself (what iterating and indexing see) holds the
    newest events of the window in memory: all of them or, with ``memory_bytes``, as many as fit
    in that many bytes of what they cost in memory (:func:`held_bytes`: the encoded frame, the
    event and its payload and effects, and the deque's own bookkeeping). The older ones of the
    window are the store's to read back (a backplane with a ``memory_bytes`` bound reads them
    in :meth:`Backplane.events_since`); ``memory_bytes=None`` holds the whole window (a
    backplane without a store: the window is all there is).

    Only :meth:`append` adds (events come one at a time, in ``seq`` order, without a gap: one
    after a gap starts a new window); the oldest events go.
    """

    def __init__(
        self,
        events: Iterable[DurableEvent] = (),
        *,
        limit: int,
        max_bytes: int,
        memory_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self.limit = limit
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        #: Encoded bytes of the events in the kept window (what ``max_bytes`` bounds).
        self.bytes = 0
        #: What the events held in memory cost (what ``memory_bytes`` bounds).
        self.held_bytes = 0
        #: The seq of the newest event (0 before the first).
        self.last_seq = 0
        self._sizes = _IntQueue()  # encoded size of each event of the window
        self._costs = _IntQueue()  # held_bytes of each event in memory
        #: The oldest held seq of each :meth:`since` reading the store now: memory keeps it.
        self._pins: list[int] = []
        for event in events:
            self.append(event)

    @property
    def first_kept(self) -> int:
        """The seq of the oldest event of the kept window (``last_seq + 1`` when empty)."""
        return self.last_seq - self.kept + 1

    @property
    def first_held(self) -> int:
        """The seq of the oldest event held in memory (``last_seq + 1`` when none is)."""
        return self[0].seq if self else self.last_seq + 1

    @property
    def kept(self) -> int:
        """How many events the kept window holds (in memory or not)."""
        return len(self._sizes)

    def append(self, event: DurableEvent) -> None:
        if self._sizes and event.seq != self.last_seq + 1:
            self.clear()  # a gap: what came before cannot be replayed across it
        super().append(event)
        self.last_seq = event.seq
        size = len(event.encoded)
        self._sizes.append(size)
        self.bytes += size
        cost = held_bytes(event)
        self._costs.append(cost)
        self.held_bytes += cost + KEPT_ENTRY_BYTES
        while len(self._sizes) > self.limit or (
            self.bytes > self.max_bytes and len(self._sizes) > MIN_HISTORY_EVENTS
        ):
            if self and self[0].seq == self.first_kept:
                self._drop_held()
            self.bytes -= self._sizes.popleft()
            self.held_bytes -= KEPT_ENTRY_BYTES
        self._fit_memory()

    def _fit_memory(self) -> None:
        """Drop the oldest held events past ``memory_bytes``, but those a reader pinned."""
        if self.memory_bytes is not None:
            floor = min(self._pins) if self._pins else self.last_seq + 1
            while self and self.held_bytes > self.memory_bytes and self[0].seq < floor:
                self._drop_held()

    async def since(
        self, seq: int, read_stored: Callable[[int, int], Awaitable[list[DurableEvent]]]
    ) -> list[DurableEvent] | None:
        """The kept events after ``seq`` up to the newest, in order: ``None`` when ``seq`` is
        before the kept window (or beyond the newest). Those no longer held in memory are read
        with ``read_stored(after, upto)`` (every stored event ``after < seq <= upto``). While
        it reads, memory keeps what it held from ``upto + 1`` on, past ``memory_bytes`` if
        events come meanwhile (by what they cost, until the read ends): otherwise writes could
        push them out faster than the reader reads them back, and a resume under load would
        get a snapshot. The kept window's own bounds still apply; what they push out is read in
        turn (at most :data:`SINCE_READS` reads, then ``None``: send a snapshot). A read that
        does not return exactly those events (the store lost some it should keep) makes it
        ``None`` too.

        Raises:
            Whatever ``read_stored`` raises (``Overloaded`` for a store unavailable now).
        """
        if seq + 1 < self.first_kept or seq > self.last_seq:
            return None
        events: list[DurableEvent] = []
        after = seq
        pin: int | None = None  # this call's, kept until what memory holds is taken
        try:
            for _read in range(SINCE_READS + 1):
                if self.first_held <= after + 1:
                    break
                if _read == SINCE_READS:
                    return None
                upto = self.first_held - 1
                if pin is not None:
                    self._pins.remove(pin)
                pin = upto + 1
                self._pins.append(pin)
                stored = await read_stored(after, upto)
                if len(stored) != upto - after or (stored and stored[0].seq != after + 1):
                    return None
                events += stored
                after = upto
            events += itertools.islice(self, after + 1 - self.first_held, None)
            return events
        finally:
            if pin is not None:
                self._pins.remove(pin)
                self._fit_memory()

    def _drop_held(self) -> None:
        self.popleft()
        self.held_bytes -= self._costs.popleft()

    def clear(self) -> None:
        """Forget every event (held and kept)."""
        super().clear()
        self._sizes = _IntQueue()
        self._costs = _IntQueue()
        self.bytes = 0
        self.held_bytes = 0


#: What the kept window costs per event besides the events held (an entry of each array, the
#: deque's slot), counted in :attr:`History.held_bytes`.
KEPT_ENTRY_BYTES = 24

_sizeof = sys.getsizeof
_SHARED = frozenset({type(None), bool})


def held_bytes(event: DurableEvent) -> int:
    """What ``event`` costs in memory, as tracemalloc would count it: the event object, its
    encoded frame, and every object of its payload and effects (once each: a timeline change's
    payload shares its ``changes`` with its effects). Dict keys, small ints, booleans and
    ``None`` are not counted: they are shared (orjson caches keys, CPython the rest). Within
    a few percent of tracemalloc's figure (``tests/test_history_memory.py`` checks it)."""
    total = _sizeof(event) + _sizeof(event.encoded)
    seen: set[int] = set()
    stack: list[Any] = [event.payload, event.effects]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind in _SHARED or (kind is int and -5 <= value <= 256):
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        total += _sizeof(value)
        if kind is dict:
            stack.extend(value.values())
        elif kind is list or kind is tuple:
            stack.extend(value)
    return total


class _IntQueue:
    """A FIFO of ints in an array (8 bytes each, unlike a deque of int objects)."""

    __slots__ = ("_head", "_items")

    def __init__(self) -> None:
        self._items = array.array("q")
        self._head = 0

    def __len__(self) -> int:
        return len(self._items) - self._head

    def append(self, value: int) -> None:
        self._items.append(value)

    def popleft(self) -> int:
        if self._head >= len(self._items):
            raise IndexError("pop from an empty queue")
        value = self._items[self._head]
        self._head += 1
        if self._head >= 1024 and self._head * 2 >= len(self._items):
            del self._items[: self._head]
            self._head = 0
        return value


@attrs.frozen(kw_only=True)
class HeldHistory:
    """What projects' histories hold in memory (:meth:`Backplane.held_history`)."""

    #: What the held events cost in memory (:attr:`History.held_bytes`).
    bytes: int = 0
    #: Events held in memory.
    events: int = 0
    #: Projects whose history is loaded.
    projects: int = 0

    @classmethod
    def of(cls, histories: Iterable[History]) -> HeldHistory:
        """The sum over ``histories``."""
        size = events = projects = 0
        for history in histories:
            size += history.held_bytes
            events += len(history)
            projects += 1
        return cls(bytes=size, events=events, projects=projects)

    @classmethod
    def among(cls, held: Mapping[str, Any], project_id: str | None = None) -> HeldHistory:
        """Over ``held`` (a backplane's projects or mirrors by id, each with a ``history``),
        or only ``project_id``'s."""
        if project_id is not None:
            one = held.get(project_id)
            return cls.of([one.history] if one is not None else [])
        return cls.of(each.history for each in list(held.values()))


class Listener(Protocol):
    """What a backplane calls on a subscribed room (:meth:`Backplane.subscribe`).

    Calls are synchronous, from the Trio thread, and must not block: a room only queues what
    it hears. A backplane makes them in ``seq`` order for durable events, never twice for one
    event, and never from inside another listener call.
    """

    def on_durable(self, event: DurableEvent) -> None:
        """A durable event of the project, the next in ``seq`` order."""

    def on_conflicts(self, conflicts: list[Conflict]) -> None:
        """Conflicts detected (or detected again) in the project, already stored pending."""

    def on_ephemeral(self, message: Ephemeral) -> None:
        """An ephemeral message of the project (the room skips its ``origin``)."""

    def on_rewritten(self) -> None:
        """The project's history was rewritten where this process did not see it coming
        (another process erased a user from it, the database was restored or failed over to
        a replica): what the listener holds may be gone or different. The backplane has
        dropped its copy already and the listener hears nothing more from this subscription;
        a room closes, and its members resume with a snapshot (a new epoch)."""


class Backplane(ABC):
    """Sequencing, durable history and fan-out between rooms, for every project.

    Every method may be called concurrently from many tasks, for one project or many.

    **Durable writes** (:meth:`commit_change`, :meth:`commit_comment`, :meth:`settle`) give each
    accepted event the project's next ``seq``, with no gap and no seq handed out twice (across
    every process of a cluster). They return only once the event is durable *and* has been
    handed to every listener subscribed to the project in this process, so an ack sent after
    they return never overtakes the event.

    **Cancellation.** Like :meth:`trio.abc.SendStream.send_all`, a cancelled durable write may or
    may not have happened, but never half: either the event is sequenced, stored and (possibly
    after the cancellation) delivered to every listener, with its id recorded, or nothing of it
    is, and its ``seq`` goes to the next write. Resending with the same ``change_id`` or comment
    id tells which (``duplicate`` with the first ``seq``, or applied now). ``trio.Cancelled`` is
    never swallowed. A cancelled read changes nothing.

    **Errors** are the project's own (:mod:`crealia._errors`): a backplane maps its library's
    exceptions at its boundary, :class:`~crealia.Overloaded` for a store it cannot reach now
    (``outcome="unknown"`` when the write may have been applied).

    **Lifetime.** A backplane is opened by its :class:`BackplaneFactory` (an async context
    manager that owns its tasks and connections) or by whoever builds it; the server that is
    handed one uses it as is and never closes it.
    """

    # -- durable writes -----------------------------------------------------------------------

    @abstractmethod
    async def commit_change(
        self, user: User, change: _wire.TimelineChange, *, strategy: str = "manual"
    ) -> ChangeOutcome:
        """Check, sequence and store a ``timeline_change`` (docs/protocol.md §5).

        The operations that apply become one event at the next ``seq``; those that conflict
        become conflicts, stored pending before this returns, naming ``strategy`` (the first of
        the project's chain) as the one settling them; they come back in
        :attr:`ChangeOutcome.detected` and are told to every subscribed listener, on every
        process (:meth:`Listener.on_conflicts`). A ``change_id`` already accepted in the
        project is a ``duplicate``: nothing is recorded and the first ``seq`` comes back, once
        the first is durable.

        Cancelled: the whole change (event, conflicts, id) is recorded, or none of it.

        Raises:
            BadRequest, NotFound: the change contradicts the document, or its ``change_id`` was
                first used by another user or for other operations; nothing is recorded.
            TooLarge: it would take the document, a value or the pending conflicts past a
                quota; nothing is recorded.
            Overloaded: the store cannot take the write now (``outcome`` says whether it may
                have been applied).
        """

    @abstractmethod
    async def commit_comment(self, user: User, comment: _wire.Comment) -> tuple[int, bool]:
        """Sequence and store a comment; returns ``(seq, duplicate)``.

        A comment id already stored in the project is a duplicate: nothing is recorded and its
        first ``seq`` comes back, once the first is durable.

        Cancelled: the comment is recorded whole (event and id) or not at all.

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
        """Settle a pending conflict: the resolution becomes a durable event with its own seq,
        and the conflict is stored as resolved.

        ``by`` is who settled it (the event's user), ``writer`` who the resolved value counts as
        written by. With ``expect_seq``, the target must still be at that version: if it moved,
        the newer value stands (the conflict is resolved as ``current``) and, when the newer
        value is someone else's (and ``redetect``), the incoming value is detected again as a new
        pending conflict, which :class:`Settled` returns and the listeners hear of.

        Cancelled: the conflict is resolved with its event (and any conflict detected again),
        or it is still pending and nothing was recorded.

        Raises:
            NotFound: no pending conflict with that id in the project (already settled).
            BadRequest, TooLarge: the resolved value could not be written by a client either.
            Overloaded: the store cannot take the write now.
        """

    @abstractmethod
    async def set_settings(self, project_id: str, settings: dict[str, Any]) -> None:
        """Replace the project's stored settings (a JSON object).

        Cancelled: the old or the new settings are stored, never a mix.

        Raises:
            Overloaded: the store cannot take the write now.
        """

    # -- reads --------------------------------------------------------------------------------

    @abstractmethod
    async def conflicts(
        self, project_id: str, *, status: str | None = None, limit: int = 200
    ) -> list[Conflict]:
        """The project's conflicts, newest first, at most ``limit`` (``status``: only
        ``"pending"`` or ``"resolved"`` ones)."""

    async def conflict(self, project_id: str, conflict_id: str) -> Conflict | None:
        """The project's conflict ``conflict_id``, pending or settled, or ``None``.

        The default looks among the last 10,000 (:meth:`conflicts`); a backplane that can
        read one conflict by id should (the built-in ones do).
        """
        found = await self.conflicts(project_id, limit=10_000)
        return next((c for c in found if c.id == conflict_id), None)

    @abstractmethod
    async def pending_conflicts(self, project_id: str) -> list[Conflict]:
        """The project's conflicts still waiting for a resolution (every one stored pending by a
        write that returned, on any process)."""

    @abstractmethod
    async def dry_run(self, user: User, change: _wire.TimelineChange) -> dict[str, Any]:
        """What ``change`` would do now: ``{"applies": [ops], "conflicts": [...]}``. Changes
        nothing.

        Raises:
            BadRequest, NotFound: the change contradicts the document.
        """

    @abstractmethod
    async def get_settings(self, project_id: str) -> dict[str, Any]:
        """The project's stored settings (``{}`` when none were ever set)."""

    @abstractmethod
    async def snapshot(self, project_id: str) -> dict[str, Any]:
        """The project's document as a wire snapshot (docs/protocol.md §5), with its ``seq``:
        every event up to it is durable, every write that returned before the call is in it."""

    @abstractmethod
    async def events_since(self, project_id: str, seq: int) -> list[DurableEvent] | None:
        """Every durable event after ``seq``, in order and without a gap, up to the project's
        latest; ``[]`` at the latest, and ``None`` when that cannot be answered exactly: some
        of them are no longer kept, or ``seq`` is beyond the latest (a client of another
        history). At least the last :data:`MIN_HISTORY_EVENTS` events are kept."""

    async def epoch(self, project_id: str) -> str:
        """The name of the project's history as it stands (docs/protocol.md §3, ``welcome.epoch``).

        It changes whenever the history is rewritten or restored (a GDPR erasure, a restore from
        backup), so that a client resuming with another epoch gets a snapshot, never a replay of
        events that no longer match what it holds. Every process of a cluster answers the same.
        The default, for a backplane that never rewrites history, is one epoch for ever.
        """
        return "0"

    # -- fan-out ------------------------------------------------------------------------------

    @abstractmethod
    def subscribe(self, project_id: str, listener: Listener) -> AbstractAsyncContextManager[None]:
        """Deliver the project's durable events, conflicts and ephemeral messages to
        ``listener`` while the context is open.

        Every durable event that becomes durable after the context was entered (written by any
        process) is delivered once, in ``seq`` order; what came before is read with
        :meth:`events_since`. Leaving the context (or cancelling its entry) stops delivery at
        once and leaves nothing registered.
        """

    @abstractmethod
    async def publish(self, message: Ephemeral) -> None:
        """Send an ephemeral message to every listener subscribed to its project, on every
        process (its room skips the ``origin`` connection). Never stored; under load it may be
        dropped, never reordered after a later message of the same ``key``.

        Cancelled: it was sent or it was not.
        """

    def release(self, project_id: str) -> None:  # noqa: B027 - a hook: nothing held by default
        """The last room of the project in this process closed: forget what is held in memory
        for it, if no listener is subscribed (it is loaded again on demand). Synchronous and
        never fails; the default holds nothing."""

    # -- presence across processes ------------------------------------------------------------

    @property
    def shares_presence(self) -> bool:
        """Whether other processes may serve the same projects (a cluster): then rooms call
        :meth:`share_presence` on every membership change and every ``presence_interval``,
        and merge :meth:`remote_presence` into their member list. ``False`` by default."""
        return False

    async def share_presence(  # noqa: B027 - a hook: nothing to share in one process
        self, project_id: str, members: list[dict[str, Any]], *, ttl: float
    ) -> None:
        """Tell the other processes who is in this process's room of the project (the members'
        wire objects, docs/protocol.md §4; ``[]``: nobody any more).

        A heartbeat: the share lasts ``ttl`` seconds (three of the room's heartbeats), after
        which a process that stopped calling counts as gone and its members leave. Called only
        when :attr:`shares_presence`. Cancelled: the previous share or this one stands.

        Raises:
            Overloaded: the shared store is unreachable (the room tries again next beat).
        """

    async def remote_presence(self, project_id: str) -> list[dict[str, Any]]:
        """The members of the project's rooms in the other live processes, as shared with
        :meth:`share_presence` (``[]`` by default).

        Raises:
            Overloaded: the shared store is unreachable.
        """
        return []

    # -- rate limits across processes ---------------------------------------------------------

    @property
    def shares_rate_limits(self) -> bool:
        """Whether the rate limiter syncs with :meth:`sync_rate_limits`, so that a user spread
        over several processes is limited once. ``False`` by default."""
        return False

    async def sync_rate_limits(self, updates: list[tuple[str, int, float]]) -> list[float] | None:
        """Share rate-limit consumption with the other processes (GCRA, ``crealia._ratelimit``).

        Each update is ``(name, cost, emission_interval_ms)``: ``name`` is a key and class
        (e.g. ``"p:u:edit"``) that admitted ``cost`` more events since the last call, each
        ``emission_interval_ms`` apart at the sustained rate. The shared store moves the name's
        theoretical arrival time (TAT) to ``max(TAT, now) + cost * emission_interval_ms`` on
        *its own* clock, and forgets it once it has passed. Returns, for each update in order,
        how many milliseconds the name's TAT now lies ahead of the store's clock, which the caller
        adds to its own now: so the processes' clocks need not agree.

        Returns ``None`` when there is nothing to share (one process: the default). Called only
        when :attr:`shares_rate_limits`. Cancelled: the updates were recorded or not (the
        caller sends them again).

        Raises:
            Overloaded: the shared store is unreachable; nothing may have been recorded.
        """
        return None

    # -- GDPR ---------------------------------------------------------------------------------

    @property
    def supports_gdpr(self) -> bool:
        """Whether :meth:`user_data` and :meth:`erase_user` work. When ``False`` (the default)
        the server answers GDPR requests with ``unsupported`` before touching anything."""
        return False

    async def user_data(self, project_id: str, user_id: str) -> dict[str, Any]:
        """What the backplane stores about a user in a project (GDPR export): ``comments``,
        ``edits`` and ``conflicts``.

        Raises:
            Unsupported: this backplane cannot (the default).
            Overloaded: the store cannot be read now.
        """
        raise Unsupported(f"GDPR export is not available with {type(self).__name__} yet")

    async def erase_user(self, project_id: str, user_id: str, pseudonym: str) -> dict[str, int]:
        """Erase a user from a project (GDPR): delete their content, pseudonymize the rest, and
        give the project a new :meth:`epoch`. The server closes the project's room first.
        Returns what was changed, per kind.

        Cancelled: the erasure is done whole or not at all.

        Raises:
            Unsupported: this backplane cannot (the default).
            Overloaded: the project is open, or the store failed; nothing was changed.
        """
        raise Unsupported(f"GDPR erasure is not available with {type(self).__name__} yet")

    # -- operations data ----------------------------------------------------------------------

    def ops_store(self) -> OpsStore | None:
        """Where the server keeps audit events, security alerts, metric samples and alerts
        (:class:`crealia._ops.OpsStore`) when the backplane has a store every process shares,
        so that each answers operator queries for the whole cluster; its lifetime is the
        backplane's. ``None`` (the default): the server keeps them in its own
        ``ops.sqlite3``."""
        return None

    # -- health and metrics -------------------------------------------------------------------

    @abstractmethod
    async def check(self) -> None:
        """Prove the backplane is usable now: that a write can commit.

        Raises:
            TransportError: it is not (the message says why).
        """

    def health_checks(self) -> Mapping[str, HealthProbe]:
        """The backplane's health checks by name, for ``/readyz`` and
        ``crealia_health_check_up{check}``: ``{"backplane": self.check}`` by default.

        The server runs them beside its own (``storage``, for its operations database, and
        ``event_loop``); a check named like one of the server's is folded into it (both must
        pass). The built-ins name theirs ``storage`` (SQLite) and ``redis``.
        """
        return {"backplane": self.check}

    def degraded(self) -> Mapping[str, str | None]:
        """The parts of the backplane that may fail without stopping writes, by name: ``None``
        while one works, else what is lost meanwhile (``{}`` by default). Must not block.

        ``/readyz`` shows each beside the health checks (``"ok"`` or ``"degraded: …"``) and
        lists the degraded ones under ``degraded``, but stays ready: a process that still
        commits and acknowledges writes must keep its traffic. (PostgreSQL with Redis beside it
        names ``redis``: while Redis is away, presence, cursors and rate limits are per
        process.) What would stop writes belongs in :meth:`health_checks` instead.
        """
        return {}

    def held_history(self, project_id: str | None = None) -> HeldHistory:
        """What the projects' histories hold in memory in this process now (or only
        ``project_id``'s): for ``crealia_history_bytes`` and ``historyBytes`` in the metric
        samples. Must not block. A backplane that keeps no history in memory, or does not say,
        answers zeros (the default); the built-in ones count :attr:`History.held_bytes`.
        """
        return HeldHistory()

    def metrics(self) -> Iterable[Metric]:
        """The backplane's own Prometheus metric families, read at every scrape of
        ``/metrics`` (none by default). Must not block.

        A family named like one of the server's is merged into it: its samples are added, and
        a sample with the same labels as the server's is combined with it (counters add up,
        gauges take the larger value), so a backplane can count its own background jobs in
        ``crealia_background_failures_total{job}``.
        """
        return ()


class BackplaneFactory(Protocol):
    """What an entry point of the ``crealia.backplanes`` group names.

    ``open_backplane(url, config)`` opens a backplane for ``url`` (the server's
    ``Config.backplane_url``, or ``"sqlite:"`` when none is set) and the server's ``config``
    (its quotas, history limits, presence interval, data dir, ...). It is an async context
    manager that owns everything the backplane starts (connections, tasks) and closes it all on
    exit, also when cancelled. The entry point's name is the URL scheme it serves; it may serve
    more schemes, listed in a ``schemes`` attribute of the factory (``redis`` lists ``rediss``
    and ``unix``).

    Opening raises :class:`~crealia.ConfigurationError` for a URL it cannot use and
    :class:`~crealia.TransportError` (or :class:`~crealia.Overloaded`) for a store it cannot
    reach.
    """

    def __call__(self, url: str, config: Config, /) -> AbstractAsyncContextManager[Backplane]: ...

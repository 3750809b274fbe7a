"""The backplane conformance suite: :func:`check_backplane`, like trio's ``check_two_way_stream``.

It runs the contract of :class:`crealia.abc.Backplane` over backplanes a factory opens, through
the public methods only, and fails with an :class:`AssertionError` naming the check and what
broke::

    from crealia.testing import check_backplane

    async def test_my_backplane_keeps_the_contract() -> None:
        with trio.fail_after(120):
            await check_backplane(lambda: open_my_backplane(...))

What it checks, each on fresh projects (random ids, so a factory need not wipe its store):

- ``ordering``: concurrent writes get gap-free seqs; a durable call returns only once the
  listeners heard its event; listeners hear every event once, in seq order; ``events_since``
  and ``snapshot`` agree with what they heard;
- ``idempotency``: a ``change_id`` or comment id resent (also concurrently) is a duplicate with
  the first seq and records nothing; another user's or other operations under a used
  ``change_id`` are refused;
- ``resume``: ``events_since`` is exact over the last 1,000 events at least, ``[]`` at the head,
  ``None`` beyond it, and ``None`` or exact further back;
- ``conflicts``: a conflicting change stores its conflict pending before it returns and tells
  the listeners; ``dry_run`` changes nothing; settling makes an event, resolves it (keeping its
  seq), refuses a second settlement, and a target that moved meanwhile detects the conflict
  again; a revert based on a resolution conflicts with a newer write and is a duplicate resent;
- ``cancellation``: writes cancelled after 0 to 30 checkpoints (each three times) leave a whole
  event or nothing: a resend tells which, the history stays gap-free, each id appears once,
  listeners heard each event once;
- ``ephemeral``: published messages reach the project's listeners (not another project's, not a
  listener that left);
- ``presence``: when the backplane shares presence, a second backplane from the factory sees the
  first's members and not its own, and stops seeing them once they leave; with a second
  backplane, durable events and ephemeral messages reach its listeners too;
- ``settings``, ``snapshot``, ``epoch``, ``release`` (nothing durable is lost) and the
  capability members (``health_checks`` pass on a healthy backplane, ``metrics`` are Prometheus
  families).

A backplane that shares presence is taken for a cluster backplane: two backplanes from one
factory must then be two processes of one cluster (the same shared store).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any

import trio
from prometheus_client import Metric

from ._backplane import MIN_HISTORY_EVENTS, Backplane
from ._errors import BadRequest, NotFound, ProtocolError
from ._model import Conflict, DurableEvent, Ephemeral, Resolution, User
from ._sequencing import RevertChange
from ._wire import Comment, InsertOp, SetOp, TimelineChange

__all__ = ["check_backplane"]

#: Seconds each check may take before it fails as hung.
CHECK_SECONDS = 90

BackplaneMaker = Callable[[], AbstractAsyncContextManager[Backplane]]


class _Recorder:
    """A listener that keeps everything it hears and wakes whoever waits for more."""

    def __init__(self) -> None:
        self.durable: list[DurableEvent] = []
        self.conflicts: list[Conflict] = []
        self.ephemeral: list[Ephemeral] = []
        self.rewritten = 0
        self._changed = trio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def on_durable(self, event: DurableEvent) -> None:
        self.durable.append(event)
        self._wake()

    def on_conflicts(self, conflicts: list[Conflict]) -> None:
        self.conflicts.extend(conflicts)
        self._wake()

    def on_ephemeral(self, message: Ephemeral) -> None:
        self.ephemeral.append(message)
        self._wake()

    def on_rewritten(self) -> None:
        self.rewritten += 1
        self._wake()

    @property
    def heard(self) -> set[int]:
        return {event.seq for event in self.durable}

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds (the check's deadline bounds it)."""
        while not predicate():
            await self._changed.wait()


def _user(project_id: str, name: str = "alice") -> User:
    return User(id=name, name=name.title(), role="editor", project_id=project_id)


def _project() -> str:
    return f"conformance-{uuid.uuid4().hex[:12]}"


def _insert(change_id: str, element_id: str, **props: Any) -> TimelineChange:
    op = InsertOp(op="insert", element_id=element_id, element_type="clip", props=props)
    return TimelineChange(change_id=change_id, changes=[op])


def _set(change_id: str, element_id: str, value: Any, base: int | None = None) -> TimelineChange:
    op = SetOp(op="set", element_id=element_id, prop="v", value=value, base=base)
    return TimelineChange(change_id=change_id, changes=[op])


def _resolution(value: Any, choice: str = "incoming") -> Resolution:
    return Resolution(value=value, choice=choice, strategy="manual", confidence=1.0,  # type: ignore[arg-type]
                      explanation="settled by the conformance suite")  # fmt: skip


def _change_id(event: DurableEvent) -> str | None:
    return event.payload.get("change_id") if event.kind == "timeline_change" else None


class _Failed(AssertionError):
    pass


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise _Failed(what)


def _seqs(events: list[DurableEvent] | None) -> list[int] | None:
    return None if events is None else [event.seq for event in events]


async def _gap_free(backplane: Backplane, project_id: str, what: str) -> list[DurableEvent]:
    """The whole kept history, checked to be 1..head without a gap and to match the snapshot."""
    snapshot = await backplane.snapshot(project_id)
    head = snapshot["seq"]
    events = await backplane.events_since(project_id, 0)
    _expect(events is not None, f"{what}: events_since(0) is None with only {head} events")
    assert events is not None
    _expect(_seqs(events) == list(range(1, head + 1)),
            f"{what}: the history is not 1..{head} without a gap: {_seqs(events)}")  # fmt: skip
    return events


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _failure(exc: BaseException) -> str | None:
    """What failed in ``exc`` (which may be a group from a nursery): a check's finding first,
    else an exception the backplane raised; ``None`` for a cancellation."""
    leaves = list(_leaves(exc))
    for leaf in leaves:
        if isinstance(leaf, _Failed):
            return str(leaf)
    for leaf in leaves:
        if isinstance(leaf, Exception):
            return f"the backplane raised {type(leaf).__name__}: {leaf}"
    return None


@contextmanager
def _named(check: str) -> Iterator[None]:
    try:
        with trio.fail_after(CHECK_SECONDS):
            yield
    except trio.TooSlowError:
        raise AssertionError(f"check_backplane {check}: did not finish within "
                             f"{CHECK_SECONDS} s") from None  # fmt: skip
    except (Exception, BaseExceptionGroup) as exc:
        failed = _failure(exc)
        if failed is None:
            raise
        raise AssertionError(f"check_backplane {check}: {failed}") from exc


# -- the checks ------------------------------------------------------------------------------


async def _check_ordering(backplane: Backplane) -> None:
    project = _project()
    recorder = _Recorder()
    seqs: list[int] = []
    async with backplane.subscribe(project, recorder):

        async def write(i: int) -> None:
            user = _user(project, "alice" if i % 2 else "bob")
            if i % 3 == 0:
                seq, duplicate = await backplane.commit_comment(
                    user, Comment(id=f"k{i}", text=f"comment {i}")
                )
                _expect(not duplicate, f"comment k{i} was taken for a duplicate")
            else:
                outcome = await backplane.commit_change(user, _insert(f"c{i}", f"e{i}", v=i))
                _expect(outcome.status == "applied" and outcome.seq is not None,
                        f"change c{i}: {outcome}")  # fmt: skip
                assert outcome.seq is not None
                seq = outcome.seq
            _expect(seq in recorder.heard,
                    f"write {i} returned seq {seq} before its listener heard it")  # fmt: skip
            seqs.append(seq)

        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(write, i)
        _expect(sorted(seqs) == list(range(1, 61)), f"the seqs handed out: {sorted(seqs)}")
        heard = [event.seq for event in recorder.durable]
        _expect(heard == list(range(1, 61)),
                f"the listener heard {heard}, not 1..60 once each in order")  # fmt: skip
        events = await _gap_free(backplane, project, "after 60 concurrent writes")
        _expect([(e.seq, e.kind, e.payload) for e in events]
                == [(e.seq, e.kind, e.payload) for e in recorder.durable],
                "events_since(0) differs from what the listener heard")  # fmt: skip
        snapshot = await backplane.snapshot(project)
        elements = snapshot["elements"]
        _expect(snapshot["seq"] == 60 and snapshot["project_id"] == project,
                f"snapshot: seq {snapshot['seq']}, project {snapshot['project_id']!r}")  # fmt: skip
        expected = {f"e{i}": i for i in range(60) if i % 3}
        _expect({eid: el["props"].get("v") for eid, el in elements.items()} == expected,
                f"snapshot elements: {sorted(elements)}")  # fmt: skip
        for event in events:
            _expect(event.project_id == project, f"event {event.seq} names another project")
            wire = event.to_wire()
            _expect(wire["type"] == "collaboration_event", f"event {event.seq}: {wire}")


async def _check_idempotency(backplane: Backplane) -> None:
    project = _project()
    alice, bob = _user(project, "alice"), _user(project, "bob")
    first = await backplane.commit_change(alice, _insert("c1", "e", v=0))
    _expect((first.status, first.seq) == ("applied", 1), f"first change: {first}")
    try:
        again = await backplane.commit_change(alice, _insert("c1", "e", v=0))
    except ProtocolError as exc:
        raise _Failed(f"the same change resent was refused: {exc!r}") from exc
    _expect((again.status, again.seq, again.change_id) == ("duplicate", 1, "c1"),
            f"the same change resent: {again}")  # fmt: skip
    for who, change, why in ((bob, _insert("c1", "e", v=0), "by another user"),
                             (alice, _set("c1", "e", 5), "with other operations")):  # fmt: skip
        try:
            await backplane.commit_change(who, change)
        except BadRequest:
            pass
        else:
            raise _Failed(f"a used change_id resent {why} was not refused with BadRequest")
    seq, duplicate = await backplane.commit_comment(alice, Comment(id="k1", text="hi"))
    _expect((seq, duplicate) == (2, False), f"first comment: {(seq, duplicate)}")
    seq, duplicate = await backplane.commit_comment(alice, Comment(id="k1", text="hi"))
    _expect((seq, duplicate) == (2, True), f"the same comment resent: {(seq, duplicate)}")
    # Two sends of one change at once: one event, both answers name it.
    outcomes = []

    async def send() -> None:
        outcomes.append(await backplane.commit_change(alice, _set("c2", "e", 1)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(send)
    statuses = sorted(outcome.status for outcome in outcomes)
    _expect(statuses == ["applied", "duplicate"] and outcomes[0].seq == outcomes[1].seq == 3,
            f"one change sent twice at once: {outcomes}")  # fmt: skip
    events = await _gap_free(backplane, project, "after the resends")
    _expect(len(events) == 3, f"resends recorded events: {_seqs(events)}")


async def _check_resume(backplane: Backplane) -> None:
    project = _project()
    total = MIN_HISTORY_EVENTS + 25
    user = _user(project)
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            await backplane.commit_comment(user, Comment(id=f"k{i}", text="x"))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(worker)
    head = (await backplane.snapshot(project))["seq"]
    _expect(head == total, f"{total} comments gave head {head}")
    _expect(await backplane.events_since(project, head) == [], "events_since(head) is not []")
    for beyond in (head + 1, head + 100):
        _expect(await backplane.events_since(project, beyond) is None,
                f"events_since({beyond}) beyond the head {head} is not None")  # fmt: skip
    for back in (1, 5, MIN_HISTORY_EVENTS):
        seqs = _seqs(await backplane.events_since(project, head - back))
        _expect(seqs == list(range(head - back + 1, head + 1)),
                f"events_since(head - {back}) is not the last {back} events: "
                f"{None if seqs is None else (seqs[:3], len(seqs))}")  # fmt: skip
    whole = _seqs(await backplane.events_since(project, 0))
    _expect(whole is None or whole == list(range(1, head + 1)),
            "events_since(0) is neither None nor the whole history")  # fmt: skip


async def _check_conflicts(backplane: Backplane) -> None:
    project = _project()
    alice, bob, carol = (_user(project, name) for name in ("alice", "bob", "carol"))
    recorder = _Recorder()
    async with backplane.subscribe(project, recorder):
        await backplane.commit_change(alice, _insert("c1", "e", v=0))  # seq 1
        await backplane.commit_change(alice, _set("c2", "e", 1, base=1))  # seq 2
        dry = await backplane.dry_run(bob, _set("c3", "e", 2, base=1))
        _expect(len(dry.get("conflicts", [])) == 1 and dry.get("applies") == [],
                f"dry_run of a conflicting change: {dry}")  # fmt: skip
        _expect((await backplane.snapshot(project))["seq"] == 2, "dry_run changed the project")
        outcome = await backplane.commit_change(bob, _set("c3", "e", 2, base=1))
        _expect(outcome.status == "conflict" and outcome.seq is None
                and len(outcome.conflicts) == 1, f"a conflicting change: {outcome}")  # fmt: skip
        conflict_id = outcome.conflicts[0]
        _expect([c.id for c in outcome.detected] == [conflict_id],
                f"detected: {outcome.detected}")  # fmt: skip
        pending = await backplane.pending_conflicts(project)
        _expect([c.id for c in pending] == [conflict_id]
                and pending[0].status == "pending" and pending[0].project_id == project,
                f"pending after the change returned: {pending}")  # fmt: skip
        listed = await backplane.conflicts(project, status="pending")
        _expect([c.id for c in listed] == [conflict_id], f"conflicts(pending): {listed}")
        await recorder.until(lambda: conflict_id in {c.id for c in recorder.conflicts})
        settled = await backplane.settle(project, conflict_id, _resolution(2), by="alice",
                                         writer="bob")  # fmt: skip
        _expect(settled.seq == 3 and settled.redetected is None, f"settle: {settled}")
        _expect(3 in recorder.heard, "settle returned before its listener heard its event")
        resolved_event = recorder.durable[-1]
        _expect(resolved_event.kind == "conflict_resolved"
                and resolved_event.payload.get("conflict_id") == conflict_id,
                f"the resolution's event: {resolved_event}")  # fmt: skip
        _expect(await backplane.pending_conflicts(project) == [], "still pending once settled")
        resolved = await backplane.conflicts(project, status="resolved")
        _expect([c.id for c in resolved] == [conflict_id]
                and resolved[0].status == "resolved" and resolved[0].resolution is not None,
                f"conflicts(resolved): {resolved}")  # fmt: skip
        snapshot = await backplane.snapshot(project)
        _expect(snapshot["elements"]["e"]["props"] == {"v": 2}, f"settled value: {snapshot}")
        try:
            await backplane.settle(project, conflict_id, _resolution(9), by="alice", writer="bob")
        except NotFound:
            pass
        else:
            raise _Failed("settling a settled conflict was not refused with NotFound")
        # The target moves while a conflict waits: settling it keeps the newer value and
        # detects the incoming one again.
        again = await backplane.commit_change(carol, _set("c4", "e", 7, base=2))
        _expect(again.status == "conflict", f"carol's stale change: {again}")
        moved = await backplane.commit_change(alice, _set("c5", "e", 8, base=3))
        _expect(moved.status == "applied" and moved.seq == 4, f"alice's change: {moved}")
        second = await backplane.settle(project, again.conflicts[0], _resolution(7), by="carol",
                                        writer="carol", expect_seq=3)  # fmt: skip
        _expect(second.seq == 5 and second.redetected is not None,
                f"settling after the target moved: {second}")  # fmt: skip
        assert second.redetected is not None
        pending = await backplane.pending_conflicts(project)
        _expect([c.id for c in pending] == [second.redetected.id],
                f"pending after a redetection: {pending}")  # fmt: skip
        snapshot = await backplane.snapshot(project)
        _expect(snapshot["elements"]["e"]["props"] == {"v": 8}, f"the newer value: {snapshot}")
        # A revert (conflict_revert) is a change prepared like the others, based on the seq the
        # stored resolution keeps: alice wrote after the first resolution, so it conflicts.
        first = next(c for c in await backplane.conflicts(project, status="resolved")
                     if c.id == conflict_id)  # fmt: skip
        _expect((first.resolution or {}).get("seq") == 3,
                f"a stored resolution keeps its seq: {first.resolution}")  # fmt: skip
        revert = RevertChange(change_id=f"revert:{conflict_id}", revert_of=conflict_id,
                              conflict=first, side="current", value=1,
                              resolution_seq=3)  # fmt: skip
        stale = await backplane.commit_change(carol, revert)
        _expect(stale.status == "conflict" and stale.seq is None and len(stale.conflicts) == 1,
                f"a revert over a newer write: {stale}")  # fmt: skip
        _expect((await backplane.commit_change(carol, revert)).status == "duplicate",
                "a revert resent is not a duplicate")  # fmt: skip
        snapshot = await backplane.snapshot(project)
        _expect(snapshot["elements"]["e"]["props"] == {"v": 8}, f"a revert overwrote: {snapshot}")
        await _gap_free(backplane, project, "after the settlements")


#: Writes the cancellation check cancels: each point from 0 to 30 checkpoints three times (the
#: scheduler's order varies, so each point lands at several places inside the write).
CANCELLED_WRITES = 93


async def _check_cancellation(backplane: Backplane) -> None:
    project = _project()
    user = _user(project)
    recorder = _Recorder()
    async with backplane.subscribe(project, recorder):
        await backplane.commit_change(user, _insert("seed", "e", v=-1))
        for n in range(CANCELLED_WRITES):
            points, comment = n % 31, n % 3 == 2
            write_id = f"k{n}" if comment else f"c{n}"
            scope = trio.CancelScope()
            failure: list[BaseException] = []

            async def attempt(scope: trio.CancelScope = scope, n: int = n, comment: bool = comment,
                              failure: list[BaseException] = failure) -> None:  # fmt: skip
                with scope:
                    try:
                        if comment:
                            await backplane.commit_comment(user, Comment(id=f"k{n}", text="x"))
                        else:
                            await backplane.commit_change(user, _set(f"c{n}", "e", n))
                    except trio.Cancelled:
                        raise
                    except Exception as exc:
                        failure.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attempt)
                for _ in range(points):
                    await trio.lowlevel.checkpoint()
                scope.cancel()
            where = f"write {write_id} cancelled after {points} checkpoints"
            _expect(not failure, f"{where} raised {failure!r}")
            # The resend says what became of it.
            if comment:
                seq, duplicate = await backplane.commit_comment(
                    user, Comment(id=write_id, text="x")
                )
            else:
                outcome = await backplane.commit_change(user, _set(write_id, "e", n))
                _expect(outcome.status in ("applied", "duplicate") and outcome.seq is not None,
                        f"the resend of {where}: {outcome}")  # fmt: skip
                assert outcome.seq is not None
                seq, duplicate = outcome.seq, outcome.status == "duplicate"
            events = await _gap_free(backplane, project, f"after {where}")
            mine = [e for e in events
                    if (e.payload.get("comment", {}).get("id") if comment else _change_id(e))
                    == write_id]  # fmt: skip
            _expect([e.seq for e in mine] == [seq],
                    f"{where} (resent: seq {seq}, duplicate {duplicate}) is in the history as "
                    f"{[e.seq for e in mine]}")  # fmt: skip
        head = (await backplane.snapshot(project))["seq"]
        await recorder.until(lambda: head in recorder.heard)
        heard = [event.seq for event in recorder.durable]
        _expect(heard == list(range(1, head + 1)),
                f"the listener heard {heard} across cancelled writes")  # fmt: skip
        snapshot = await backplane.snapshot(project)
        last = max(n for n in range(CANCELLED_WRITES) if n % 3 != 2)
        _expect(snapshot["elements"]["e"]["props"] == {"v": last}, f"final value: {snapshot}")


def _ephemeral(project_id: str, body: bytes, key: tuple[str, str] | None = None) -> Ephemeral:
    return Ephemeral(project_id=project_id, encoded=body, origin="conformance", key=key)


async def _check_ephemeral(backplane: Backplane) -> None:
    project, other = _project(), _project()
    first, second, elsewhere = _Recorder(), _Recorder(), _Recorder()
    async with backplane.subscribe(project, second), backplane.subscribe(other, elsewhere):
        async with backplane.subscribe(project, first):
            await backplane.publish(_ephemeral(project, b'{"n":1}', ("alice", "cursor")))
            await first.until(lambda: len(first.ephemeral) == 1)
            await second.until(lambda: len(second.ephemeral) == 1)
            message = first.ephemeral[0]
            _expect((message.project_id, message.encoded, message.origin, message.key)
                    == (project, b'{"n":1}', "conformance", ("alice", "cursor")),
                    f"the message heard: {message}")  # fmt: skip
        await backplane.publish(_ephemeral(project, b'{"n":2}'))
        await second.until(lambda: len(second.ephemeral) == 2)
        await backplane.publish(_ephemeral(other, b'{"n":3}'))
        await elsewhere.until(lambda: len(elsewhere.ephemeral) == 1)
        _expect(len(first.ephemeral) == 1, "a listener that left still hears the project")
        _expect([m.encoded for m in elsewhere.ephemeral] == [b'{"n":3}'],
                "a listener of another project heard this one's messages")  # fmt: skip
        _expect([m.encoded for m in second.ephemeral] == [b'{"n":1}', b'{"n":2}'],
                "a listener heard another project's messages")  # fmt: skip


async def _check_cluster(one: Backplane, two: Backplane) -> None:
    project = _project()
    user = _user(project)
    member = {"user_id": "alice", "name": "Alice", "role": "editor", "connections": 1}
    await one.share_presence(project, [member], ttl=10)
    seen = await two.remote_presence(project)
    _expect([m.get("user_id") for m in seen] == ["alice"],
            f"the other process sees {seen}, not alice")  # fmt: skip
    _expect(await one.remote_presence(project) == [], "a process sees its own members as remote")
    await one.share_presence(project, [], ttl=10)
    _expect(await two.remote_presence(project) == [], "members that left are still seen")
    recorder = _Recorder()
    async with two.subscribe(project, recorder):
        outcome = await one.commit_change(user, _insert("c1", "e", v=1))
        await recorder.until(lambda: outcome.seq in recorder.heard)
        await one.publish(_ephemeral(project, b'{"n":1}'))
        await recorder.until(lambda: len(recorder.ephemeral) == 1)
        conflicted = await two.commit_change(_user(project, "bob"), _set("c2", "e", 2, base=0))
        _expect(conflicted.status == "conflict", f"a stale change on the other process: "
                f"{conflicted}")  # fmt: skip
    _expect(await one.epoch(project) == await two.epoch(project),
            "two processes name the project's history differently")  # fmt: skip
    _expect([c.id for c in await one.pending_conflicts(project)] == conflicted.conflicts,
            "a conflict stored by one process is not pending on the other")  # fmt: skip
    snapshot = await two.snapshot(project)
    _expect(snapshot["seq"] == 1 and snapshot["elements"]["e"]["props"] == {"v": 1},
            f"the other process's snapshot: {snapshot}")  # fmt: skip


async def _check_state(backplane: Backplane) -> None:
    project, other = _project(), _project()
    empty = await backplane.snapshot(project)
    _expect(empty.get("seq") == 0 and empty.get("elements") == {},
            f"a new project's snapshot: {empty}")  # fmt: skip
    _expect(await backplane.events_since(project, 0) == [], "a new project has events")
    _expect(await backplane.pending_conflicts(project) == [], "a new project has conflicts")
    _expect(await backplane.get_settings(project) == {}, "a new project has settings")
    await backplane.set_settings(project, {"chain": ["merge", "manual"], "n": 1})
    _expect(await backplane.get_settings(project) == {"chain": ["merge", "manual"], "n": 1},
            "settings read back differ")  # fmt: skip
    await backplane.set_settings(project, {"m": 2})
    _expect(await backplane.get_settings(project) == {"m": 2}, "settings were not replaced")
    _expect(await backplane.get_settings(other) == {}, "settings leak into another project")
    epoch = await backplane.epoch(project)
    _expect(isinstance(epoch, str) and bool(epoch), f"epoch: {epoch!r}")
    await backplane.commit_change(_user(project), _insert("c1", "e", v=1))
    _expect(await backplane.epoch(project) == epoch, "the epoch changed with a write")
    before = await backplane.snapshot(project)
    backplane.release(project)
    _expect(await backplane.snapshot(project) == before, "release lost what was durable")
    _expect(_seqs(await backplane.events_since(project, 0)) == [1], "release lost the history")
    for name in ("shares_presence", "shares_rate_limits", "supports_gdpr"):
        _expect(isinstance(getattr(backplane, name), bool), f"{name} is not a bool")
    checks = backplane.health_checks()
    _expect(bool(checks), "health_checks() names no check")
    for name, probe in checks.items():
        try:
            await probe()
        except Exception as exc:
            raise _Failed(f"health check {name!r} fails on a healthy backplane: {exc!r}") from exc
    metrics = list(backplane.metrics())
    _expect(all(isinstance(m, Metric) for m in metrics), f"metrics(): {metrics}")


# -- the suite -------------------------------------------------------------------------------

_SINGLE: tuple[tuple[str, Callable[[Backplane], Awaitable[None]]], ...] = (
    ("ordering", _check_ordering),
    ("idempotency", _check_idempotency),
    ("resume", _check_resume),
    ("conflicts", _check_conflicts),
    ("cancellation", _check_cancellation),
    ("ephemeral", _check_ephemeral),
    ("state", _check_state),
)


@asynccontextmanager
async def _opened(factory: BackplaneMaker) -> AsyncIterator[Backplane]:
    async with factory() as backplane:
        if not isinstance(backplane, Backplane):
            raise AssertionError(f"check_backplane: the factory gave a {type(backplane).__name__}"
                                 ", not a crealia.abc.Backplane")  # fmt: skip
        yield backplane


async def check_backplane(factory: BackplaneMaker) -> None:
    """Run the conformance suite of :class:`crealia.abc.Backplane` (see this module's
    docstring for what it checks).

    ``factory()`` opens a backplane (an async context manager, like a
    :class:`~crealia.abc.BackplaneFactory` bound to its URL and config); each check opens its
    own and uses fresh project ids. When the backplane shares presence, the cluster checks open
    two at once, which must share one store.

    Each check is bounded by :data:`CHECK_SECONDS`; bound the whole call too
    (``trio.fail_after``). Cancelling it cancels the check running and closes its backplanes.

    Raises:
        AssertionError: a check failed; the message names it and what broke.
    """
    for name, check in _SINGLE:
        with _named(name):
            async with _opened(factory) as backplane:
                await check(backplane)
    with _named("presence"):
        async with _opened(factory) as one:
            if not one.shares_presence:
                _expect(await one.remote_presence(_project()) == [],
                        "a backplane that shares no presence reports remote members")  # fmt: skip
                return
            async with _opened(factory) as two:
                await _check_cluster(one, two)

"""A test-only backplane: pure in memory, one process, nothing durable past its lifetime.

Written against crealia's public API only (``crealia``, ``crealia.abc``), as a third party would
write one: it proves a new backplane touches no core module. It passes
``crealia.testing.check_backplane`` and serves real sessions (tests/test_backplane_conformance.py).

Each project is a :class:`crealia.Sequencer` (the document, the history, the pending conflicts),
the ids its writes took, its conflicts and settings, behind a lock that serializes its writes.
A write prepares against the sequencer, yields once where a real store would be written (so a
cancellation there leaves nothing), then commits and tells the listeners without another
checkpoint (so once past it, the write is whole).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from crealia import (
    ChangeOutcome,
    ChangeRecord,
    Comment,
    Config,
    Conflict,
    DurableEvent,
    Ephemeral,
    PreparedWrite,
    Resolution,
    Sequencer,
    Settled,
    TimelineChange,
    TransportError,
    User,
)
from crealia.abc import Backplane, Listener


@attrs.define(eq=False)
class _Project:
    sequencer: Sequencer
    lock: trio.Lock = attrs.Factory(trio.Lock)
    changes: dict[str, ChangeRecord] = attrs.Factory(dict)
    comments: dict[str, int] = attrs.Factory(dict)
    #: Every conflict ever stored, pending or resolved, by id.
    conflicts: dict[str, Conflict] = attrs.Factory(dict)
    settings: dict[str, Any] = attrs.Factory(dict)
    listeners: set[Listener] = attrs.Factory(set)
    epoch: str = attrs.Factory(lambda: uuid.uuid4().hex)


@attrs.define(eq=False)
class MemoryBackplane(Backplane):
    """Every project in this process's memory. Open it with :func:`open_memory_backplane`."""

    config: Config = attrs.Factory(Config)
    closed: bool = False
    _projects: dict[str, _Project] = attrs.Factory(dict)

    def _project(self, project_id: str) -> _Project:
        if self.closed:
            raise TransportError("the memory backplane is closed")
        project = self._projects.get(project_id)
        if project is None:
            project = self._projects[project_id] = _Project(
                Sequencer(project_id, config=self.config)
            )
        return project

    def _committed(self, project: _Project, prepared: PreparedWrite) -> None:
        """Make ``prepared`` part of the project and tell its listeners (no checkpoint)."""
        project.sequencer.commit(prepared)
        for conflict in prepared.conflicts:
            project.conflicts[conflict.id] = conflict
        listeners = list(project.listeners)
        if prepared.event is not None:
            for listener in listeners:
                listener.on_durable(prepared.event)
        if prepared.new_conflicts:
            for listener in listeners:
                listener.on_conflicts(prepared.new_conflicts)

    # -- durable writes -----------------------------------------------------------------------

    async def commit_change(
        self, user: User, change: TimelineChange, *, strategy: str = "manual"
    ) -> ChangeOutcome:
        project = self._project(user.project_id)
        async with project.lock:
            first = project.changes.get(change.change_id)
            if first is not None:
                return Sequencer.duplicate(first, user, change)
            prepared = project.sequencer.prepare_change(user, change, strategy=strategy)
            await trio.lowlevel.checkpoint()  # where a store would be written
            self._committed(project, prepared)
            assert prepared.outcome is not None and prepared.record is not None
            project.changes[change.change_id] = prepared.record
            return prepared.outcome

    async def commit_comment(self, user: User, comment: Comment) -> tuple[int, bool]:
        project = self._project(user.project_id)
        async with project.lock:
            seq = project.comments.get(comment.id)
            if seq is not None:
                return seq, True
            prepared = project.sequencer.prepare_comment(user, comment)
            await trio.lowlevel.checkpoint()
            self._committed(project, prepared)
            assert prepared.event is not None
            project.comments[comment.id] = prepared.event.seq
            return prepared.event.seq, False

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
        project = self._project(project_id)
        async with project.lock:
            prepared = project.sequencer.prepare_settle(
                conflict_id, resolution, by=by, writer=writer, expect_seq=expect_seq,
                redetect=redetect,
            )  # fmt: skip
            await trio.lowlevel.checkpoint()
            self._committed(project, prepared)
            assert prepared.settled is not None
            return prepared.settled

    async def set_settings(self, project_id: str, settings: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        self._project(project_id).settings = dict(settings)

    # -- reads --------------------------------------------------------------------------------

    async def conflicts(
        self, project_id: str, *, status: str | None = None, limit: int = 200
    ) -> list[Conflict]:
        await trio.lowlevel.checkpoint()
        found = [c for c in self._project(project_id).conflicts.values()
                 if status is None or c.status == status]  # fmt: skip
        return list(reversed(found))[:limit]

    async def pending_conflicts(self, project_id: str) -> list[Conflict]:
        await trio.lowlevel.checkpoint()
        return self._project(project_id).sequencer.pending

    async def dry_run(self, user: User, change: TimelineChange) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return self._project(user.project_id).sequencer.dry_run(user, change)

    async def get_settings(self, project_id: str) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return dict(self._project(project_id).settings)

    async def snapshot(self, project_id: str) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return self._project(project_id).sequencer.snapshot()

    async def events_since(self, project_id: str, seq: int) -> list[DurableEvent] | None:
        await trio.lowlevel.checkpoint()
        return self._project(project_id).sequencer.events_since(seq)

    async def epoch(self, project_id: str) -> str:
        await trio.lowlevel.checkpoint()
        return self._project(project_id).epoch

    # -- fan-out ------------------------------------------------------------------------------

    @asynccontextmanager
    async def _subscription(self, project_id: str, listener: Listener) -> AsyncIterator[None]:
        await trio.lowlevel.checkpoint()
        listeners = self._project(project_id).listeners
        listeners.add(listener)
        try:
            yield
        finally:
            listeners.discard(listener)

    def subscribe(self, project_id: str, listener: Listener) -> Any:
        return self._subscription(project_id, listener)

    async def publish(self, message: Ephemeral) -> None:
        for listener in list(self._project(message.project_id).listeners):
            listener.on_ephemeral(message)
        await trio.lowlevel.checkpoint()

    async def check(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.closed:
            raise TransportError("the memory backplane is closed")


@asynccontextmanager
async def open_memory_backplane(config: Config | None = None) -> AsyncIterator[MemoryBackplane]:
    """A memory backplane for the ``async with`` block (everything is gone after it)."""
    backplane = MemoryBackplane(config=config or Config())
    try:
        yield backplane
    finally:
        backplane.closed = True
        backplane._projects.clear()


@asynccontextmanager
async def open_backplane(url: str, config: Config) -> AsyncIterator[MemoryBackplane]:
    """A :class:`crealia.abc.BackplaneFactory` for ``memory:`` URLs (as an entry point of the
    ``crealia.backplanes`` group would name it)."""
    if url.rstrip("/") not in ("memory:", "memory:/"):
        raise ValueError(f"expected memory:, got {url!r}")
    async with open_memory_backplane(config) as backplane:
        yield backplane

"""What the Redis and PostgreSQL backplanes share: each process keeps a *mirror* of every
project a room of it has open (the document and the kept history, caught up from the store of
record by ``seq``), and delivers to the mirror's listeners."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from .._backplane import HeldHistory, History, Listener
from .._document import Document
from .._model import Ephemeral


@attrs.define(eq=False)
class Mirror:
    """One project as this process holds it, and the rooms listening to it."""

    doc: Document
    history: History
    roles: dict[str, str]
    lock: trio.Lock = attrs.Factory(trio.Lock)
    listeners: set[Listener] = attrs.Factory(set)
    catching_up: bool = False
    #: The highest seq a notice announced; a catch-up runs until the mirror reaches it.
    wanted: int = 0


class MirrorSubscriptions:
    """``subscribe`` and local delivery over ``_mirrors`` (the backplane's mirrors by project)
    and ``_loading`` (a lock per project being loaded), for a backplane whose ``_fresh`` loads
    a project's mirror and keeps it."""

    _mirrors: dict[str, Any]
    _loading: dict[str, trio.Lock]

    async def _fresh(self, project_id: str) -> Any:
        raise NotImplementedError

    @asynccontextmanager
    async def _subscription(self, project_id: str, listener: Listener) -> AsyncIterator[None]:
        mirror = await self._fresh(project_id)
        # The mirror may have been dropped (its last room closed) while this one was loading:
        # register it again, or join the one a commit loaded meanwhile.
        mirror = self._mirrors.setdefault(project_id, mirror)
        mirror.listeners.add(listener)
        try:
            yield
        finally:
            mirror.listeners.discard(listener)
            # Unless it was dropped meanwhile (a rewrite: ``_rewritten``) and loaded anew.
            if not mirror.listeners and self._mirrors.get(project_id) is mirror:
                del self._mirrors[project_id]
                self._loading.pop(project_id, None)

    def _rewritten(self, project_id: str) -> None:
        """The project's history was rewritten behind this process: drop its mirror now (the
        next reader loads the store's) and tell its listeners (``on_rewritten``)."""
        mirror = self._mirrors.pop(project_id, None)
        self._loading.pop(project_id, None)
        if mirror is not None:
            for listener in list(mirror.listeners):
                listener.on_rewritten()
            mirror.listeners.clear()

    def subscribe(self, project_id: str, listener: Listener) -> Any:
        return self._subscription(project_id, listener)

    def held_history(self, project_id: str | None = None) -> HeldHistory:
        """What the mirrors' histories hold in memory (or only ``project_id``'s mirror's)."""
        return HeldHistory.among(self._mirrors, project_id)

    def _deliver_here(self, message: Ephemeral) -> None:
        """Hand ``message`` to this process's listeners of its project."""
        mirror = self._mirrors.get(message.project_id)
        if mirror is not None:
            for listener in list(mirror.listeners):
                listener.on_ephemeral(message)

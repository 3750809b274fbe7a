"""Giving memory back to the system once projects close.

A closed project's document and history are freed (``Backplane.release``), but CPython's
allocator and glibc's keep the freed pages for reuse: without more, the process's RSS stays at
its peak after every client left (docs/performance.md, "Memory after a soak"). glibc's
``malloc_trim(0)`` returns the free pages of its heaps; it costs a walk of the heap (about 2 ms
at 100 MB), so :class:`Trimmer` runs it at most once per ``interval`` seconds, after a room
closed, never on the hot path. Elsewhere than glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Callable

import attrs
import trio

log = logging.getLogger("crealia.room")


def _malloc_trim() -> Callable[[], object] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


@attrs.define(eq=False)
class Trimmer:
    """Trims the heap (``malloc_trim``) a while after rooms closed, at most once per
    ``interval`` seconds (0: never). :meth:`closed` is called when a room closed; :meth:`run`
    is a task of the room manager's nursery."""

    interval: float = 1.0
    #: Times the heap was trimmed.
    trims: int = 0
    _trim: Callable[[], object] | None = attrs.field(factory=_malloc_trim)
    _wanted: trio.Event = attrs.Factory(trio.Event)
    _trimmed: trio.Event = attrs.Factory(trio.Event)

    @property
    def available(self) -> bool:
        """Whether this platform's allocator can be trimmed (glibc)."""
        return self._trim is not None

    def closed(self) -> None:
        """A room closed: trim soon."""
        self._wanted.set()

    async def run(self) -> None:
        """Trim after closes until cancelled."""
        if self._trim is None or self.interval <= 0:
            return
        while True:
            await self._wanted.wait()
            # Coalesce: rooms closing together (a shutdown, a crowd leaving) trim once.
            await trio.sleep(self.interval)
            self._wanted = trio.Event()
            self._trim()
            self.trims += 1
            self._trimmed.set()
            self._trimmed = trio.Event()

    async def trimmed(self) -> None:
        """Wait for the next trim (the caller bounds the wait)."""
        await self._trimmed.wait()

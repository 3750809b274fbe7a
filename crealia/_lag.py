"""How far behind a client is, measured from its own progress rather than from our outbox.

A session's outbox (:mod:`crealia._session`) only fills once the kernel stops taking our
writes, and the kernel's socket buffers take megabytes first: a client that stopped reading
was tolerated for tens of seconds. Two measures of the client's progress see it sooner:

- **acknowledged bytes.** :func:`unacked_bytes` asks the kernel how many of the bytes we wrote
  to a TCP socket the peer has not acknowledged yet (Linux ``ioctl(SIOCOUTQ)``, which is
  ``TIOCOUTQ``). With the count of bytes written (:meth:`~crealia._transport.Connection.
  tcp_progress`), a :class:`LagMeter` knows when the oldest unacknowledged byte was written;
  the client is that far behind. A peer whose receive window is closed (it does not read)
  acknowledges nothing. Behind a reverse proxy this measures the proxy, which reads for it.
- **ping round trips.** A WebSocket ping is queued behind everything sent before it, so its
  pong says the client has read all of that (:meth:`~crealia._transport.Connection.
  start_ping`). That is end to end, also through a proxy, but a pong also waits for the
  session's reader, which does not read while it handles a message (an edit waiting for a
  slow store): a late pong may be the server's delay. So a ping is used only where TCP cannot
  tell.

The hub's watch (:meth:`crealia._session.Hub.watch_lag`) samples every session with traffic
every quarter of ``client_lag_timeout`` and closes one that is behind by more than that with
4409 (docs/protocol.md §7, "Slow consumers").
"""

from __future__ import annotations

import collections
import fcntl
import struct
import termios
from typing import Any

#: ``TIOCOUTQ`` (the same number as ``SIOCOUTQ`` on Linux), or None where termios lacks it.
_OUTQ: int | None = getattr(termios, "TIOCOUTQ", None)

#: Unacknowledged bytes tolerated however old: a few control frames (pongs, a close) are
#: written outside the byte counts, and a client is not slow for them.
SLACK_BYTES = 1024


def unacked_bytes(sock: Any) -> int | None:
    """Bytes written to TCP socket ``sock`` (an object with ``fileno()``) that its peer has not
    acknowledged, unsent ones included; None where the platform cannot tell (no ``TIOCOUTQ``,
    a closed or non-TCP socket). Never raises."""
    if _OUTQ is None:
        return None
    try:
        fd = sock.fileno()
        if fd < 0:
            return None
        packed = fcntl.ioctl(fd, _OUTQ, b"\0\0\0\0")
    except (OSError, ValueError, AttributeError):
        return None
    value: int = struct.unpack("i", packed)[0]
    return value


#: Samples a :class:`LagMeter` keeps: taken a quarter of the bound apart, twice the bound.
_KEPT = 8


class LagMeter:
    """How long ago the oldest byte a peer has not acknowledged was written, from samples of
    ``(written, unacked)`` taken every so often (the lag is known to that period).

    Only the samples since the peer's last acknowledged one are kept, at most eight.
    """

    __slots__ = ("_samples",)

    def __init__(self) -> None:
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def sample(self, now: float, written: int, unacked: int) -> float:
        """Record a sample at trio time ``now``; return the lag in seconds (a lower bound, to
        the sampling period): 0 when the peer acknowledged everything but :data:`SLACK_BYTES`."""
        samples = self._samples
        acked = written - unacked
        if unacked <= SLACK_BYTES:
            samples.clear()
            samples.append((now, written))
            return 0.0
        # The newest sample the peer has acknowledged all of is where its lag starts.
        while len(samples) > 1 and samples[1][1] - acked <= SLACK_BYTES:
            samples.popleft()
        samples.append((now, written))
        if len(samples) > _KEPT:  # no progress for a long while: over the horizon anyway
            samples.popleft()
        for at, then in samples:
            if then - acked > SLACK_BYTES:
                return now - at
        return 0.0

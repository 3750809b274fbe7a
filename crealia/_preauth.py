"""Limits per client address before authentication: WebSocket handshakes and REST requests.

Until a token is verified, the only thing the server knows of a caller is its address, and
checking a token costs CPU (and a refusal an audit event). :class:`AddressLimiter` keeps one GCRA
per address and class (see :mod:`crealia._ratelimit` for the algorithm): ``handshake`` is charged
for every ``hello``, ``rest`` for every REST request that presents itself for authentication.
An address over its limit is refused with ``rate_limited`` (close 4429 on the WebSocket, 429 on
REST) before its token is looked at.

IPv6 clients are counted per /64 (one customer's network), IPv4 clients per address. The state
is bounded: past ``max_addresses`` the least recently seen address is forgotten (it starts
afresh, which only ever admits more).
"""

from __future__ import annotations

import collections
import ipaddress
import math
import time
from collections.abc import Callable, Mapping

import attrs

from ._errors import ConfigurationError

#: Classes and their default ``count/burst`` per minute.
DEFAULT_PREAUTH_LIMITS: dict[str, str] = {"handshake": "600/300", "rest": "6000/600"}
#: Addresses tracked at once.
MAX_ADDRESSES = 100_000
_WINDOW_MS = 60_000.0


@attrs.frozen
class _Rate:
    interval: float  # ms between events at the sustained rate
    tolerance: float  # ms of burst


def parse_preauth_limit(name: str, raw: str) -> tuple[int, int] | None:
    """``"count/burst"`` per minute (``"count"``: burst a tenth of it, at least 1), or
    ``"off"`` (None).

    Raises:
        ConfigurationError: anything else, naming the setting.
    """
    text = str(raw).strip().lower()
    if text in ("off", "0", "none"):
        return None
    count, _, burst = text.partition("/")
    try:
        counted = int(count)
        bursting = int(burst) if burst else max(1, counted // 10)
    except ValueError:
        counted = bursting = 0
    if not 1 <= counted <= 10_000_000 or not 1 <= bursting <= 10_000_000:
        raise ConfigurationError(
            f"{name}={raw!r}: expected count/burst per minute (each 1..10000000), count, or off"
        )
    return counted, bursting


def address_key(address: str) -> str:
    """What an address is counted under: itself for IPv4, its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class AddressLimiter:
    """GCRA limits per client address and class, decided locally and at once.

    ``limits`` maps a class to ``(count, burst)`` per minute; a class without one is not
    limited. ``clock`` returns seconds (monotonic).
    """

    def __init__(
        self,
        limits: Mapping[str, tuple[int, int] | None],
        *,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rates = {
            cls: _Rate(interval=_WINDOW_MS / count, tolerance=burst * _WINDOW_MS / count)
            for cls, limit in limits.items()
            if limit is not None
            for count, burst in [limit]
        }
        self._tats: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()
        self._max = max_addresses
        self._clock = clock
        #: Requests refused, per class, since the start.
        self.refused: dict[str, int] = dict.fromkeys(limits, 0)

    @classmethod
    def from_strings(cls, handshake: str, rest: str) -> AddressLimiter:
        """The limiter of the ``preauth_handshake_limit`` and ``preauth_rest_limit`` settings.

        Raises:
            ConfigurationError: a malformed setting.
        """
        return cls({"handshake": parse_preauth_limit("preauth_handshake_limit", handshake),
                    "rest": parse_preauth_limit("preauth_rest_limit", rest)})  # fmt: skip

    def check(self, address: str, cls: str) -> int:
        """Admit one request of ``cls`` from ``address`` now (0), or say in how many
        milliseconds it would be admitted (a refusal records nothing)."""
        rate = self._rates.get(cls)
        if rate is None or not address:
            return 0
        key = (address_key(address), cls)
        now = self._clock() * 1000.0
        tat = max(self._tats.pop(key, now), now) + rate.interval
        excess = tat - now - rate.tolerance
        if excess > 1e-3:
            self._tats[key] = tat - rate.interval
            self.refused[cls] = self.refused.get(cls, 0) + 1
            return max(1, math.ceil(excess))
        self._tats[key] = tat  # most recently seen last
        while len(self._tats) > self._max:
            self._tats.popitem(last=False)
        return 0

    @property
    def size(self) -> int:
        """(address, class) pairs tracked now."""
        return len(self._tats)

"""The client's real address behind reverse proxies: ``trusted_proxies`` and ``X-Forwarded-For``.

Behind HAProxy, a Kubernetes ingress or any reverse proxy, every TCP connection comes from the
proxy, so the audit log, the per-address limits and the security alerts would all see one
address. ``trusted_proxies`` (``--trusted-proxies``, ``TRUSTED_PROXIES``) names the networks
the proxies connect from; for a connection or request whose TCP peer is in one of them, the
client's address is read from ``X-Forwarded-For``:

- the header's lines are one list, in order (``a, b`` then ``c`` is ``a, b, c``); it is read
  from the right, each proxy having appended the address it saw. Addresses in a trusted network
  are skipped (proxies in a chain); the first that is not is the client. When every address is
  a trusted proxy, the leftmost is taken (an internal client).
- What lies left of the address taken is never read: the client wrote it, and a client may
  write anything (``X-Forwarded-For: 1.2.3.4`` of its own, which the proxy then appends to).
- An address that has to be read but is no IP address (``unknown``, garbage, an empty entry):
  the header is ignored and the peer's address is used; logged once per process, at debug (a
  misconfigured proxy would otherwise log on every request). No header at all from a trusted
  peer (the proxy's own health check) is the peer too, silently.
- From a peer outside every trusted network the header is ignored entirely: a client cannot
  choose its address. With no trusted network (the default) nobody is trusted.

An entry is ``192.0.2.7``, ``2001:db8::7``, ``[2001:db8::7]``, ``192.0.2.7:41234`` or
``[2001:db8::7]:41234`` (some proxies append the port); an IPv4-mapped IPv6 address counts as
its IPv4 address. The address taken is written canonically (``2001:db8::7``).

This module is the policy only; the transports apply it where they read the peer
(:meth:`crealia.Acceptor.client_address`), and :class:`crealia._edge.ConnectionGate` counts a
trusted proxy's connections against the per-address cap only once the client is known.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from typing import Any

import attrs

from ._errors import ConfigurationError

log = logging.getLogger("crealia.proxies")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Entries one ``X-Forwarded-For`` is read for at most, from the right: a chain of proxies is
#: short, and a header of thousands of trusted entries must not cost a parse of each.
MAX_HOPS = 32

_EXAMPLE = "a CIDR such as 10.0.0.0/8 or fd00::/8, or one address such as 192.0.2.10"


def parse_trusted_proxies(value: Any) -> tuple[str, ...]:
    """``trusted_proxies``: networks (CIDR) or single addresses, canonical (``10.0.0.0/8``,
    ``192.0.2.10/32``); a comma-separated string or a list.

    Raises:
        ConfigurationError: naming the first bad entry: not a network, host bits set
            (``10.0.0.1/8``), or a network of every address (``0.0.0.0/0``, ``::/0``), which
            would let any client claim any address.
    """
    if isinstance(value, str):
        entries = tuple(item.strip() for item in value.split(",") if item.strip())
    else:
        entries = tuple(value)
    canonical: list[str] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise ConfigurationError(f"trusted_proxies: {entry!r} is not a string ({_EXAMPLE})")
        try:
            network = ipaddress.ip_network(entry.strip())
        except ValueError as exc:
            if "host bits set" in str(exc):
                loose = ipaddress.ip_network(entry.strip(), strict=False)
                raise ConfigurationError(
                    f"trusted_proxies: {entry!r} has host bits set (the network is {loose})"
                ) from None
            raise ConfigurationError(
                f"trusted_proxies: {entry!r} is not an IP network ({_EXAMPLE})"
            ) from None
        if network.prefixlen == 0:
            raise ConfigurationError(
                f"trusted_proxies: {entry!r} trusts every address, so any client could claim "
                "any address; name the networks the proxies connect from"
            )
        canonical.append(str(network))
    return tuple(canonical)


def parse_address(text: str) -> Address | None:
    """An ``X-Forwarded-For`` entry (or a peer's address) as an IP address, or None.

    Takes ``a.b.c.d``, ``a.b.c.d:port``, an IPv6 address bare or in brackets, with a port
    after the brackets; an IPv4-mapped IPv6 address becomes its IPv4 address.
    """
    text = text.strip()
    if text.startswith("["):
        inside, bracket, port = text[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and port[1:].isdigit())):
            return None
        text = inside
    elif text.count(":") == 1:  # IPv4 with a port (an IPv6 address has two colons or more)
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@attrs.define(eq=False)
class TrustedProxies:
    """The networks whose connections may say whose request they carry (see the module
    docstring). Empty: trust no one, and :meth:`client_address` returns the peer at no cost."""

    networks: tuple[Network, ...] = ()
    #: Headers from trusted peers that were ignored as malformed, since the start.
    malformed: int = 0

    @classmethod
    def from_config(cls, entries: Iterable[str]) -> TrustedProxies:
        """From ``Config.trusted_proxies`` (canonical: :func:`parse_trusted_proxies` checked
        them when the config was made)."""
        return cls(networks=tuple(ipaddress.ip_network(entry) for entry in entries))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str | Address | None) -> bool:
        """Whether ``address`` (a peer's, or an entry of the header) is in a trusted network."""
        if not self.networks or address is None:
            return False
        if isinstance(address, str):
            address = parse_address(address)
            if address is None:
                return False
        return self._within(address)

    def _within(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def client_address(self, peer: str, forwarded: Iterable[str]) -> str:
        """The client's address for a connection or request from TCP peer ``peer`` carrying
        the ``X-Forwarded-For`` lines ``forwarded`` (in order; none: an empty iterable).

        ``peer`` itself when it is not a trusted proxy, or when the header is missing or
        malformed (the latter logged once, at debug).
        """
        if not self.trusts(peer):
            return peer
        entries: list[str] = []
        for line in forwarded:
            # Only the rightmost MAX_HOPS + 1 entries are ever read: a long header costs no
            # parse of the rest (its left part stays one entry, past the limit).
            entries.extend(line.rsplit(",", MAX_HOPS))
        if not entries:
            return peer  # the proxy's own request (a health check), or one it did not mark
        taken: Address | None = None
        for hop, entry in enumerate(reversed(entries)):
            address = parse_address(entry)
            if address is None or hop >= MAX_HOPS:
                taken = None
                break
            taken = address
            if not self._within(address):
                break
        if taken is None:
            self._ignored(peer, entries)
            return peer
        return str(taken)

    def _ignored(self, peer: str, entries: list[str]) -> None:
        self.malformed += 1
        if self.malformed == 1:
            shown = ",".join(entries)[:200]
            log.debug(
                "ignored X-Forwarded-For from trusted proxy %s: %r is not a list of IP "
                "addresses; using the proxy's address (logged once)",
                peer,
                shown,
            )

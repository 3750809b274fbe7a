"""The WebSocket Origin allow-list: refuse cross-site WebSocket hijacking.

Browsers send an ``Origin`` header with every WebSocket handshake and let any page open a
WebSocket to any server; only the server can refuse a page of another site. Every transport asks
:meth:`crealia._transport.Acceptor.check_handshake` before it accepts a handshake, which applies
:class:`OriginPolicy` (and :class:`HostPolicy`, which the HTTP edge applies to every request
too), audits a refused origin, and tells the transport to answer 403 (421 for a host).

The rules:

- no ``Origin`` header (Python programs, the CLI, other non-browser clients): allowed;
- ``allowed_origins`` holds ``*``: every origin is allowed;
- the origin is in ``allowed_origins`` (exact ``scheme://host[:port]``, host case-insensitive,
  default ports normalized away): allowed;
- with ``dev`` (``crealia serve --dev``): ``http://localhost``, ``http://127.0.0.1`` and
  ``http://[::1]`` on any port, for pages a developer serves locally;
- otherwise only the same origin is: the page's origin must name the host and port of the
  ``Host`` header (http or https), or the same host with the port the server's pages come from
  (the HTTP app's: its pages connect to the fast path's port too).

The same policy decides which origins get CORS headers from the REST API (``_pages``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

import attrs

from ._errors import ConfigurationError

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(value: str) -> str | None:
    """``scheme://host[:port]`` in canonical form (lower case, no default port), or ``None``
    when ``value`` is not an http(s) origin (``null``, a path, another scheme, a bad port)."""
    value = value.strip()
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host or parts.username or parts.password:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def parse_allowed_origins(value: str | Iterable[str]) -> tuple[str, ...]:
    """The ``allowed_origins`` setting: a comma-separated string or a list of origins, each
    normalized, or ``*``.

    Raises:
        ConfigurationError: an entry is not an http(s) origin.
    """
    entries = value.split(",") if isinstance(value, str) else list(value)
    origins: list[str] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise ConfigurationError(f"allowed_origins: expected strings, got {entry!r}")
        entry = entry.strip()
        if not entry:
            continue
        if entry == "*":
            origins.append("*")
            continue
        origin = normalize_origin(entry)
        if origin is None:
            raise ConfigurationError(
                f"allowed_origins: {entry!r} is not an origin: expected scheme://host[:port] "
                "with scheme http or https, or *"
            )
        origins.append(origin)
    return tuple(dict.fromkeys(origins))


@attrs.frozen
class OriginPolicy:
    """Which browser origins may open a WebSocket (the rules are in this module's docstring)."""

    allowed: frozenset[str] = frozenset()
    any: bool = False
    #: Also allow local development origins (http://localhost:*, 127.0.0.1, [::1]).
    dev: bool = False

    @classmethod
    def from_origins(cls, origins: Iterable[str], *, dev: bool = False) -> OriginPolicy:
        """A policy for the ``allowed_origins`` setting (and ``dev``).

        Raises:
            ConfigurationError: an entry is not an origin.
        """
        parsed = parse_allowed_origins(origins)
        return cls(allowed=frozenset(o for o in parsed if o != "*"), any="*" in parsed, dev=dev)

    def listed(self, origin: str | None) -> bool:
        """Whether ``origin`` is allowed by the settings alone (listed, ``*``, or a local origin
        under ``dev``), whatever the ``Host``: what earns CORS headers."""
        if origin is None:
            return False
        if self.any:
            return True
        normalized = normalize_origin(origin)
        if normalized is None:
            return False
        return normalized in self.allowed or (
            self.dev and _DEV_ORIGIN.fullmatch(normalized) is not None
        )

    def allows(self, origin: str | None, host: str | None, ports: Sequence[int] = ()) -> bool:
        """Whether a handshake with these ``Origin`` and ``Host`` headers may go on.

        Args:
            ports: the server's ports a same-origin page may come from (the HTTP app's).
        """
        if origin is None or self.any:
            return True
        if self.listed(origin):
            return True
        normalized = normalize_origin(origin)
        if normalized is None:
            return False
        if not host:
            return False
        scheme = normalized.split(":", 1)[0]
        if normalize_origin(f"{scheme}://{host}") == normalized:
            return True
        hostname = urlsplit(f"{scheme}://{host}").hostname
        if not hostname:
            return False
        if ":" in hostname:
            hostname = f"[{hostname}]"
        return any(normalize_origin(f"{scheme}://{hostname}:{p}") == normalized for p in ports)


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The value of the first ``name`` header (lower-case ``name``), decoded as latin-1."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    """The values of every ``name`` header (lower-case ``name``), in order, as latin-1."""
    return [value.decode("latin-1") for key, value in headers if key.lower() == name]


#: Local development origins, allowed under ``dev``.
_DEV_ORIGIN = re.compile(r"http://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]+)?")

#: How to allow an origin, said wherever one is refused.
ALLOW_HINT = "allow it with --allowed-origins or CREALIA_ALLOWED_ORIGINS"


def shown_origin(origin: str) -> str:
    """``origin`` as it may be logged and sent back: printable ASCII, at most 200 characters."""
    return "".join(c if " " <= c <= "~" else "?" for c in origin[:200])


def refusal_body(origin: str) -> bytes:
    """The short 403 body naming a refused origin and the setting that would allow it."""
    return f"origin not allowed: {shown_origin(origin)} ({ALLOW_HINT})\n".encode("ascii")


# -- allowed hosts (DNS rebinding) ------------------------------------------------------------


def parse_allowed_hosts(value: str | Iterable[str]) -> tuple[str, ...]:
    """The ``allowed_hosts`` setting: a comma-separated string or a list of host names (lower
    case, no port), ``.example.com`` for a domain and all its subdomains, or ``*`` (any).

    Raises:
        ConfigurationError: an entry is not a host name.
    """
    entries = value.split(",") if isinstance(value, str) else list(value)
    hosts: list[str] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise ConfigurationError(f"allowed_hosts: expected strings, got {entry!r}")
        entry = entry.strip().lower()
        if not entry:
            continue
        name = entry[1:] if entry.startswith(".") else entry
        if entry != "*" and (_host_name(name) != name or not name):
            raise ConfigurationError(
                f"allowed_hosts: {entry!r} is not a host name: expected a name or an address "
                "without scheme or port, .domain for it and its subdomains, or *"
            )
        hosts.append(entry)
    return tuple(dict.fromkeys(hosts))


def _host_name(host: str) -> str | None:
    """The host part of a ``Host`` header, lower case, without port; None when malformed."""
    try:
        parts = urlsplit(f"http://{host.strip()}")
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return None
    name = parts.hostname
    if not name or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    if ":" in name:
        return f"[{name}]" if _IPV6.fullmatch(name) else None
    return name if _HOST_NAME.fullmatch(name) else None


_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")
_IPV6 = re.compile(r"[0-9a-f:.]+")


@attrs.frozen
class HostPolicy:
    """Which ``Host`` headers a request may carry (against DNS rebinding: a page of an
    attacker's domain that resolves to this server). Empty: any host (the default)."""

    allowed: tuple[str, ...] = ()

    @classmethod
    def from_hosts(cls, hosts: Iterable[str]) -> HostPolicy:
        parsed = parse_allowed_hosts(hosts)
        return cls(allowed=() if "*" in parsed else parsed)

    def allows(self, host: str | None) -> bool:
        """Whether a request with this ``Host`` header (None: none) may be served."""
        if not self.allowed:
            return True
        name = _host_name(host) if host else None
        if name is None:
            return False
        for entry in self.allowed:
            if entry.startswith("."):
                if name == entry[1:] or name.endswith(entry):
                    return True
            elif name == entry:
                return True
        return False


def misdirected_body(host: str) -> bytes:
    """The short 421 body naming a refused ``Host`` (printable ASCII, at most 200 characters)."""
    shown = "".join(c if " " <= c <= "~" else "?" for c in host[:200])
    return f"host not allowed: {shown or '(none)'}\n".encode("ascii")

"""Server configuration: one frozen object built from defaults, a TOML file, the environment
and flags.

Every value is checked for its type and its range wherever it comes from:

- **types** by one cattrs converter (:data:`converter`), strict as the protocol's: an integer
  setting takes an integer (not ``"4420"``, not ``true``), a number an integer or a float, a
  list a list of strings or one comma-separated string, a table a table. Text from the
  environment and from flags is first read as the setting's type (``"4420"`` is an integer
  there);
- **ranges** by each field's validator (:func:`_int_range`, :func:`_float_range` and the
  settings' own parsers), which :class:`Config` runs however it is built; relations between
  settings (``snapshot_every`` below ``history_limit``, the WAL bounds, the JWT keys) are
  checked once all are known.

A refused value is a :class:`~crealia.ConfigurationError` naming what the user wrote: the flag
(``--ws-port 70000: must be an integer from 0 to 65535``), the variable
(``CREALIA_TICK_MS='-3': tick_ms must be a number from 0 to 1000``) or the file key
(``metrics_interval in crealia.toml must be a number from 0 to 86400, got 'five'``). Secrets are
never shown.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from types import UnionType
from typing import Any
from urllib.parse import urlsplit

import attrs
import cattrs

from ._aiproviders import DEFAULT as DEFAULT_AI_PROVIDER
from ._aiproviders import AIProviderSettings, default_from_env, parse_ai_providers
from ._auth import check_algorithms as check_jwt_algorithms
from ._auth import check_config as check_jwt_config
from ._auth import keys_file_path, parse_key_map, parse_public_keys_env
from ._errors import ConfigurationError
from ._origin import parse_allowed_hosts, parse_allowed_origins
from ._preauth import parse_preauth_limit
from ._proxies import parse_trusted_proxies


@attrs.frozen
class _Rule:
    """A field validator that can say what it expects: ``accepts`` tells a good value."""

    expected: str
    accepts: Callable[[Any], bool] = attrs.field(eq=False)

    def __call__(self, _instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not self.accepts(value):
            raise ConfigurationError(f"{attribute.name} must be {self.expected}, got {value!r}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _int_range(low: int, high: int, text: str | None = None) -> _Rule:
    """A validator: an integer from ``low`` to ``high`` (never a boolean)."""

    def accepts(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    return _Rule(text or f"an integer from {low} to {high}", accepts)


def _float_range(low: float, high: float, text: str | None = None) -> _Rule:
    """A validator: an integer or a float from ``low`` to ``high`` (never a boolean)."""

    def accepts(value: Any) -> bool:
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high
        )

    return _Rule(text or f"a number from {_number(low)} to {_number(high)}", accepts)


def _one_of(*choices: str, optional: bool = False) -> _Rule:
    """A validator: one of ``choices`` (or None, if ``optional``)."""
    return _Rule(
        f"one of {', '.join(choices)}",
        lambda value: value in choices or (optional and value is None),
    )


def _to_path(value: str | os.PathLike[str]) -> Path:
    if not isinstance(value, str | os.PathLike):
        raise ConfigurationError(f"expected a path, got {value!r}")
    return Path(value)


def _data_dir(value: str | os.PathLike[str]) -> Path:
    if not isinstance(value, str | os.PathLike):
        raise ConfigurationError(f"data_dir must be a path, got {value!r}")
    return Path(value)


def _non_empty(_inst: Any, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{attribute.name} must be a non-empty string, got {value!r}")


def _boolean(_inst: Any, attribute: attrs.Attribute[bool], value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{attribute.name} must be true or false, got {value!r}")


_REDIS_SCHEMES = ("redis", "rediss", "unix")


def redis_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a Redis URL, or None (``redis://``, ``rediss://`` or
    ``unix://``, with a port that is a number)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number from 0 to 65535
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in _REDIS_SCHEMES:
        return "not a redis://, rediss:// or unix:// URL"
    if parts.scheme == "unix" and not parts.path:
        return "a unix:// URL needs the socket's path"
    return None


def _is_redis_url(value: object) -> bool:
    return value is None or (isinstance(value, str) and redis_url_problem(value) is None)


_redis_url = _Rule("a redis://host[:port], rediss://host[:port] or unix:///path URL", _is_redis_url)


def database_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a PostgreSQL URL, or None (``postgresql://`` or ``postgres://``,
    with a port that is a number)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number from 0 to 65535
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("postgresql", "postgres"):
        return "not a postgresql:// URL"
    return None


_database_url = _Rule(
    "a postgresql://[user[:password]@]host[:port]/database URL",
    lambda value: value is None or (isinstance(value, str) and not database_url_problem(value)),
)


def _lower(value: str | None) -> str | None:
    return value.lower() if isinstance(value, str) else value


def redact_url_password(url: str) -> str:
    """``url`` with the password of its user info masked (``redis://:***@host``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a malformed URL)"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _preauth_limit(_inst: Any, attribute: attrs.Attribute[str], value: str) -> None:
    parse_preauth_limit(attribute.name, value)


def _is_ops_max_bytes(value: object) -> bool:
    in_range = _int_range(1024**2, 1024**5).accepts(value)
    return in_range or (value == 0 and type(value) is int)


_ops_max_bytes = _Rule("0 (no cap) or an integer from 1 MiB to 1 PiB", _is_ops_max_bytes)


def parse_listen_ips(value: Any) -> tuple[str, ...]:
    """``webrtc_listen_ips``: IP addresses (IPv4 or IPv6) the machine has, not a wildcard.

    Raises:
        ConfigurationError: an entry that is no IP address, or is ``0.0.0.0``/``::``.
    """
    entries = comma_list(value) if isinstance(value, str) else tuple(value)
    for entry in entries:
        try:
            address = ipaddress.ip_address(entry)
        except ValueError:
            raise ConfigurationError(
                f"webrtc_listen_ips: {entry!r} is not an IP address (e.g. 192.0.2.10)"
            ) from None
        if address.is_unspecified:
            raise ConfigurationError(
                f"webrtc_listen_ips: {entry!r} is a wildcard; name the addresses media should "
                "reach (leave the setting empty for every address of the machine)"
            )
    return entries


def parse_stun_urls(value: Any) -> tuple[str, ...]:
    """``webrtc_stun_servers``: ``stun:``/``stuns:`` URLs (:func:`parse_ice_urls`)."""
    return parse_ice_urls(value, "webrtc_stun_servers", ("stun", "stuns"))


def parse_turn_urls(value: Any) -> tuple[str, ...]:
    """``webrtc_turn_servers``: ``turn:``/``turns:`` URLs (:func:`parse_ice_urls`)."""
    return parse_ice_urls(value, "webrtc_turn_servers", ("turn", "turns"))


def parse_ice_urls(value: Any, setting: str, schemes: tuple[str, ...]) -> tuple[str, ...]:
    """``webrtc_stun_servers`` / ``webrtc_turn_servers``: URLs of one of ``schemes``.

    Raises:
        ConfigurationError: an entry with another scheme or no host.
    """
    entries = comma_list(value) if isinstance(value, str) else tuple(value)
    for entry in entries:
        scheme, _, rest = entry.partition(":")
        if scheme.lower() not in schemes or not rest.split("?")[0].strip("/"):
            raise ConfigurationError(
                f"{setting}: {entry!r} is not a {' or '.join(schemes)} URL (e.g. "
                f"{schemes[0]}:host.example.com:3478)"
            )
    return entries


@attrs.frozen(kw_only=True)
class Config:
    """Everything a crealia server can be told.

    Durations that are configuration live here, in seconds unless the name says otherwise.
    """

    #: The address both ports listen on.
    host: str = attrs.field(default="127.0.0.1", validator=_non_empty)
    #: The HTTP port (REST, metrics and the WebSocket route); 0: any free port.
    port: int = attrs.field(default=3000, validator=_int_range(0, 65535))
    #: The fast-path WebSocket port; 0: any free port.
    ws_port: int = attrs.field(default=3001, validator=_int_range(0, 65535))
    #: Where the stores (and the generated JWT secret) live; created if missing.
    data_dir: Path = attrs.field(default=Path("./crealia-data"), converter=_data_dir)
    #: The Redis URL (``--redis``, ``REDIS_URL``). Beside ``database_url`` it is the Redis that
    #: carries presence, ephemeral messages and rate limits; alone it is the older name of
    #: ``backplane_url`` (the Redis backplane, durable log in Redis too).
    redis_url: str | None = attrs.field(default=None, validator=_redis_url, repr=False)
    jwt_secret: str | None = attrs.field(default=None, repr=False)
    dev: bool = attrs.field(default=False, validator=_boolean)
    #: A test aid: both WebSocket endpoints also answer at ``/conformance/echo`` with an echo of
    #: every message, behind the same limits, deflate and handshake policy as sessions, for RFC
    #: 6455 conformance runs (crealia._echo). It asks for no token: never in production.
    conformance_echo: bool = attrs.field(default=False, validator=_boolean)

    #: Outbound batching tick in milliseconds (0 to 1,000); 0 turns batching off (one frame per
    #: message).
    tick_ms: float = attrs.field(default=20.0, validator=_float_range(0, 1000))
    #: Frames a second the fan-out may send over every room before it coalesces (1,000 to
    #: 10,000,000): a room flushes at most every ``members / batch_frames_per_s`` seconds, up
    #: to the tick, so quiet and small rooms send each message at once.
    batch_frames_per_s: float = attrs.field(default=20_000.0, validator=_float_range(1000, 1e7))
    #: Largest client frame, after decompression (docs/protocol.md §2), 1 KiB to 16 MiB.
    max_frame_bytes: int = attrs.field(default=64 * 1024, validator=_int_range(1024, 16 << 20))
    #: Seconds a new connection has to send ``hello`` (0.1 to 3,600).
    hello_timeout: float = attrs.field(default=10.0, validator=_float_range(0.1, 3600))
    #: Frames a connection may have queued before it is closed as a slow consumer (4409).
    outbox_frames: int = attrs.field(default=512, validator=_int_range(16, 1_000_000))
    #: Bytes a connection may have queued before it is closed as a slow consumer (4409).
    outbox_bytes: int = attrs.field(
        default=8 * 1024 * 1024, validator=_int_range(64 * 1024, 1 << 30)
    )
    #: Refused or invalid messages a connection may send within ``abuse_window`` seconds before
    #: it is closed with 4429.
    abuse_errors: int = attrs.field(default=200, validator=_int_range(1, 10**9))
    abuse_window: float = attrs.field(default=10.0, validator=_float_range(0.1, 86_400))
    #: Seconds a client may fall behind, while data waits for it, before it is closed as a slow
    #: consumer (4409): the age of the oldest byte its TCP has not acknowledged, or of its
    #: unanswered ping. 0 turns the check off (the outbox limits remain); else 0.5 to 300.
    client_lag_timeout: float = attrs.field(
        default=3.0,
        validator=_Rule(
            "0 (off) or a number from 0.5 to 300",
            lambda value: (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and (value == 0 or 0.5 <= value <= 300)
            ),
        ),
    )
    #: Seconds a closing session may take to finish its frame and send its close (0.1 to 300).
    close_timeout: float = attrs.field(default=5.0, validator=_float_range(0.1, 300))
    #: Durable events kept per project for resume (1,000 to 10,000,000).
    history_limit: int = attrs.field(
        default=10_000,
        validator=_int_range(1000, 10_000_000, "at least 1000 and at most 10000000"),
    )
    #: Seconds between presence heartbeats in a cluster; a process silent for three of them is
    #: taken for dead and its users leave (0.05 to 60).
    presence_interval: float = attrs.field(default=2.0, validator=_float_range(0.05, 60))
    #: Seconds a room stays open after its last member leaves (0 to 86,400).
    room_grace: float = attrs.field(default=5.0, validator=_float_range(0, 86_400))
    #: A snapshot is stored every this many durable events (below ``history_limit``).
    snapshot_every: int = attrs.field(default=500, validator=_int_range(1, 1_000_000))
    #: Longest comment text, in characters.
    comment_max_chars: int = attrs.field(default=10_000, validator=_int_range(1, 1_000_000))
    #: Seconds to wait for connections to close on shutdown before forcing them (0 to 3,600).
    shutdown_grace: float = attrs.field(default=5.0, validator=_float_range(0, 3600))
    #: Allowed JWT clock skew, seconds (0 to 3,600).
    jwt_leeway: float = attrs.field(default=5.0, validator=_float_range(0, 3600))
    #: HMAC secrets by key id (the ``kid`` of a token's header), beside the kid-less
    #: ``jwt_secret``: configure the new and the old one at once while keys rotate.
    jwt_secrets: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    #: Public keys by key id: PEM text or the path of a PEM file (a public key or a
    #: certificate). RSA keys verify RS256 tokens, EC P-256 keys ES256. The id ``""`` is the key
    #: of tokens without ``kid``; a token without ``kid`` also uses the only key there is.
    jwt_public_keys: Mapping[str, str] = attrs.Factory(dict)
    #: The algorithms tokens may use (each key still only those of its kind); empty: HS256,
    #: RS256 and ES256. ``none`` is never accepted.
    jwt_algorithms: tuple[str, ...] = attrs.field(default=(), converter=check_jwt_algorithms)
    #: A file of more public keys: a JSON object of key id to PEM text or a path (relative to
    #: the file), or one PEM public key (the key of tokens without ``kid``).
    jwt_keys_file: Path | None = attrs.field(default=None, converter=keys_file_path)
    #: Browser origins (``scheme://host[:port]``) allowed to open a WebSocket besides the
    #: server's own; ``*`` allows every origin. Requests without ``Origin`` are always allowed.
    allowed_origins: tuple[str, ...] = attrs.field(default=(), converter=parse_allowed_origins)
    #: The default strategy chain of every project (a project may set its own over the API).
    strategy_chain: tuple[str, ...] = attrs.field(default=("merge", "priority"), converter=tuple)
    #: Options per strategy name, e.g. ``{"priority": {"tie": "first"}, "manual": {"timeout":
    #: 60}}``; a project's own options override these key by key.
    strategy_options: Mapping[str, Mapping[str, Any]] = attrs.Factory(dict)
    #: Seconds each strategy may take on one conflict before the next one is asked (0.01 to
    #: 3,600).
    strategy_timeout: float = attrs.field(default=3.0, validator=_float_range(0.01, 3600))
    #: In a cluster, seconds after which a pending conflict found when a room opens is taken
    #: for dropped by the process that detected it (it died), and its chain is run again.
    orphan_conflict_age: float = attrs.field(default=30.0, validator=_float_range(1, 86_400))
    #: Strategies registered in code by an embedding program, beside the entry points.
    strategies: Mapping[str, Any] = attrs.Factory(dict)
    #: The window rate limits are counted over, in milliseconds.
    rate_limit_window_ms: int = attrs.field(default=60_000, validator=_int_range(1, 86_400_000))
    #: Limits per event class (cursor, edit, comment, signal, rest, other) per window, over the
    #: defaults: ``"count/burst"``, ``"count"`` (burst a tenth of it) or ``"off"``.
    rate_limits: Mapping[str, str] = attrs.Factory(dict)
    #: Seconds between metric samples (and alert evaluations); 0 turns metrics sampling,
    #: fan-out timing and alerting off.
    metrics_interval: float = attrs.field(default=5.0, validator=_float_range(0, 86_400))
    #: Days metric samples and alerts are kept in the store (1 to 3,650), and audit events.
    metrics_retention_days: int = attrs.field(default=30, validator=_int_range(1, 3650))
    audit_log_retention_days: int = attrs.field(default=90, validator=_int_range(1, 3650))
    #: Suspicious events (refused actions, bad tokens, ...) within ``security_alert_window``
    #: seconds that make a security alert, for rules without a threshold of their own.
    security_alert_threshold: int = attrs.field(default=5, validator=_int_range(1, 1_000_000))
    security_alert_window: float = attrs.field(default=300.0, validator=_float_range(1, 86_400))
    #: A user kept over a rate limit is audited at most once per this many seconds and class
    #: (the event counts the refusals), so a flood cannot flood the audit log.
    audit_rate_limited_every: float = attrs.field(default=1.0, validator=_float_range(0, 3600))
    #: Seconds between health checks (storage writable, Redis reachable, event-loop lag).
    health_interval: float = attrs.field(default=30.0, validator=_float_range(0.1, 86_400))
    #: Event-loop lag, in seconds, past which the server reports itself unhealthy.
    max_loop_lag: float = attrs.field(default=1.0, validator=_float_range(0.01, 3600))
    #: Options per alert rule name, e.g. ``{"latency": {"warning": 150, "critical": 400}}``.
    alert_options: Mapping[str, Mapping[str, Any]] = attrs.Factory(dict)
    #: Seconds a rule's condition (or its end) must hold before an alert fires (or resolves).
    alert_hold: float = attrs.field(default=15.0, validator=_float_range(0, 86_400))
    #: URLs every alert change is POSTed to (JSON), with retries.
    alert_webhooks: tuple[str, ...] = attrs.field(default=(), converter=tuple, repr=False)
    #: Alert rules registered in code by an embedding program, beside the entry points.
    alert_rules: Mapping[str, Any] = attrs.Factory(dict)
    #: Log format of ``crealia serve``: ``json`` (one object a line) or ``text``.
    log_format: str = attrs.field(default="json", validator=_one_of("json", "text"))
    # --- the edge: connection caps, HTTP read deadlines, allowed hosts (docs/security.md)
    #: Open TCP connections, both ports together, at most (0 to 1,048,576; 0: three quarters
    #: of the process's RLIMIT_NOFILE). Past it a connection is answered 503 and closed.
    max_connections: int = attrs.field(default=0, validator=_int_range(0, 1 << 20))
    #: Open TCP connections from one client address at most (0 to 1,048,576; 0: no cap), and
    #: never more than a quarter of ``max_connections``, so one address cannot take them all.
    #: Behind a reverse proxy, name it in ``trusted_proxies`` (its connections then count
    #: against their clients' addresses), or set 0.
    max_connections_per_address: int = attrs.field(default=256, validator=_int_range(0, 1 << 20))
    #: Authenticated sessions of one user at most (0 to 65,536; 0: no cap); the next ``hello``
    #: gets ``overloaded`` and close 1013.
    max_sessions_per_user: int = attrs.field(default=32, validator=_int_range(0, 1 << 16))
    #: Seconds an HTTP request's headers may take, from the connection's start or its previous
    #: response (0.5 to 3600).
    http_header_timeout: float = attrs.field(default=10.0, validator=_float_range(0.5, 3600))
    #: Seconds an HTTP request's body may take after its headers (0.5 to 3600).
    http_body_timeout: float = attrs.field(default=30.0, validator=_float_range(0.5, 3600))
    #: Host names requests may name in ``Host`` (against DNS rebinding); ``.example.com`` also
    #: allows its subdomains. Empty or ``*``: any host. Others get 421.
    allowed_hosts: tuple[str, ...] = attrs.field(default=(), converter=parse_allowed_hosts)
    #: Networks (CIDR, or single addresses) of the reverse proxies in front: from a TCP peer in
    #: one of them the client's address is read from ``X-Forwarded-For`` (the rightmost entry
    #: that is not itself a trusted proxy) for the audit log, the per-address limits and the
    #: security alerts (:mod:`crealia._proxies`). Empty: trust no one, the header is ignored.
    trusted_proxies: tuple[str, ...] = attrs.field(default=(), converter=parse_trusted_proxies)
    #: In a cluster, the share of a class's burst (0.01 to 1) a process may admit for a user
    #: ahead of what Redis confirmed; a user spread over N processes gets at most the burst
    #: plus N such slacks (at least one event each).
    cluster_rate_slack: float = attrs.field(default=0.1, validator=_float_range(0.01, 1))
    # --- project quotas, welcome and replay budgets
    #: Largest single value (a prop, a resolved value, a strategy's answer), JSON-encoded bytes.
    value_max_bytes: int = attrs.field(default=64 * 1024, validator=_int_range(1024, 16 << 20))
    #: Largest document (its live elements, JSON-encoded bytes): a change that would grow it
    #: past this is refused with ``too_large``; one that shrinks it is always accepted. Deleted
    #: elements kept for conflicts live in what is left (the oldest are forgotten first).
    document_max_bytes: int = attrs.field(
        default=16 << 20, validator=_int_range(64 * 1024, 1 << 30)
    )
    #: Most bytes of durable events kept per project for resume (besides ``history_limit``), in
    #: memory and in the kept log; the last 1,000 events are kept whatever their size.
    history_max_bytes: int = attrs.field(default=64 << 20, validator=_int_range(1 << 20, 4 << 30))
    #: Most bytes a project's history holds in memory (what its events really cost: the encoded
    #: frame, the event and its payload), 64 KiB to 16 GiB; older events of the kept history
    #: (``history_limit``, ``history_max_bytes``) are read from the store when a client resumes
    #: from them. Released when the project's room closes.
    history_memory_bytes: int = attrs.field(
        default=4 << 20, validator=_int_range(64 * 1024, 16 << 30)
    )
    #: Largest frame of a ``welcome``: one that would be larger has its snapshot, users and
    #: pending conflicts sent in ``welcome_chunk`` frames of at most this many bytes.
    welcome_frame_bytes: int = attrs.field(
        default=512 * 1024, validator=_int_range(16 * 1024, 16 << 20)
    )
    #: Most bytes of missed events replayed after a resumed ``welcome``; a resume that needs
    #: more is answered with a snapshot instead. Never more than half of ``outbox_bytes``.
    replay_max_bytes: int = attrs.field(default=4 << 20, validator=_int_range(64 * 1024, 1 << 30))
    #: Most pending conflicts (awaiting a person or a strategy) per project (1 to 100,000): a
    #: change that would open more is refused with ``too_large``; resolving one makes room.
    max_pending_conflicts: int = attrs.field(default=1000, validator=_int_range(1, 100_000))
    #: Most bytes the pending conflicts of a project may hold (their incoming, current and base
    #: values, JSON-encoded; 64 KiB to 1 GiB), likewise.
    pending_conflicts_max_bytes: int = attrs.field(
        default=16 << 20, validator=_int_range(64 * 1024, 1 << 30)
    )
    # --- storage: durability and WAL checkpoints
    #: What an ack promises of the embedded store (``crealia.sqlite3``): ``normal`` (SQLite's
    #: ``synchronous=NORMAL`` in WAL mode: a commit survives the process being killed, not a
    #: power loss or an OS crash) or ``fsync`` (``synchronous=FULL``: each grouped commit is
    #: fsynced before its acks, so it survives those too, at the cost of an fsync a commit).
    durability: str = attrs.field(default="normal", validator=_one_of("normal", "fsync"))
    #: Seconds between passive WAL checkpoints of each SQLite database (0.05..60).
    wal_checkpoint_interval: float = attrs.field(default=1.0, validator=_float_range(0.05, 60))
    #: WAL growth in bytes that starts a passive checkpoint before the interval is up
    #: (64 KiB..``wal_max_bytes``).
    wal_checkpoint_bytes: int = attrs.field(
        default=4 * 1024 * 1024, validator=_int_range(64 * 1024, 16 * 1024**3)
    )
    #: The bound on each WAL file, in bytes (1 MiB..16 GiB): a TRUNCATE checkpoint starts at
    #: half of it.
    wal_max_bytes: int = attrs.field(
        default=64 * 1024 * 1024, validator=_int_range(1024 * 1024, 16 * 1024**3)
    )
    # --- members
    #: Users present in one project at most (0 to 1,000,000; 0: no cap), counting those of
    #: every process of a cluster as last shared; the next user's ``hello`` gets ``overloaded``
    #: and close 1013 (more connections of a user already present are let in).
    max_members_per_project: int = attrs.field(default=1000, validator=_int_range(0, 1_000_000))

    # --- strategies: the operator's AI providers
    #: The AI providers a project's ``ai`` strategy may name: the only endpoints it calls
    #: (see :mod:`crealia._aiproviders`). CREALIA_AI_URL/_MODEL/_API_KEY define ``default``.
    ai_providers: Mapping[str, AIProviderSettings] = attrs.field(
        factory=dict, converter=parse_ai_providers, repr=False
    )
    # --- audit log and limits before authentication
    #: Handshakes (``hello``) one address may start per minute before authentication, as
    #: ``"count/burst"`` (each 1..10,000,000), ``"count"`` or ``"off"``; over it: 4429.
    preauth_handshake_limit: str = attrs.field(default="600/300", validator=_preauth_limit)
    #: REST requests one address may make per minute before authentication (same form); over
    #: it: 429 before the token is looked at.
    preauth_rest_limit: str = attrs.field(default="6000/600", validator=_preauth_limit)
    #: Seconds over which refusals (refused tokens, permissions, rate limits) of one address,
    #: action and user are stored as one audit event counting them (0..60; 0: one event each).
    audit_refusal_window: float = attrs.field(default=1.0, validator=_float_range(0, 60))
    #: Bytes the operations database (``ops.sqlite3``: audit log, alerts, metric samples) may
    #: hold; past it the oldest audit events (then metric samples) are pruned first. 0 turns the
    #: cap off; otherwise 1 MiB .. 1 PiB.
    ops_max_bytes: int = attrs.field(default=1024**3, validator=_ops_max_bytes)
    # --- background jobs
    #: Seconds between deletions of audit events, metric samples and resolved alerts past
    #: their retention (1 .. 86,400; a failed pruning is retried sooner, with a backoff).
    retention_interval: float = attrs.field(default=3600.0, validator=_float_range(1, 86_400))
    # --- live sessions (WebRTC, docs/protocol.md §8)
    #: The addresses the server's own WebRTC peers (relay sessions) gather host candidates on,
    #: i.e. where media reaches the server; empty: every non-loopback address of the machine.
    webrtc_listen_ips: tuple[str, ...] = attrs.field(default=(), converter=parse_listen_ips)
    #: STUN and TURN server URLs (``stun:host:port``, ``turn:host:port?transport=udp``) given
    #: to every peer of a live session as ``ice_servers``, the server's own peers included.
    webrtc_stun_servers: tuple[str, ...] = attrs.field(default=(), converter=parse_stun_urls)
    webrtc_turn_servers: tuple[str, ...] = attrs.field(default=(), converter=parse_turn_urls)
    #: The TURN servers' username and credential (long-term credentials), if they need them.
    webrtc_turn_username: str | None = attrs.field(default=None, repr=False)
    webrtc_turn_credential: str | None = attrs.field(default=None, repr=False)
    #: Live sessions one project may have at once (1 to 100).
    live_sessions_per_project: int = attrs.field(default=4, validator=_int_range(1, 100))
    #: Viewers of one ``p2p`` session at most (1 to 64): the host sends one stream to each.
    live_p2p_viewers: int = attrs.field(default=8, validator=_int_range(1, 64))
    #: Share of one CPU core, in percent (1 to 6,400), that one ``relay`` session may use: the
    #: server decodes the host's video once and encodes it for each viewer, so this sets the
    #: session's viewer limit (docs/live.md gives the measured cost of a viewer per rung).
    live_relay_cpu_budget: float = attrs.field(default=100.0, validator=_float_range(1, 6400))
    #: Largest SDP in a ``webrtc_signal`` (bytes, 1 KiB to 60 KiB) and largest candidate line.
    live_sdp_max_bytes: int = attrs.field(default=32 * 1024, validator=_int_range(1024, 60 * 1024))
    live_candidate_max_bytes: int = attrs.field(default=1024, validator=_int_range(64, 8192))
    #: Seconds a viewer's quality must hold without trouble before it goes up a rung (the
    #: period doubles after a rise that had to be undone), 1 to 600.
    live_stable_period: float = attrs.field(default=10.0, validator=_float_range(1, 600))
    #: Seconds the server's peers have to close when a session ends, and the server to set one
    #: of them up (answer an offer), 0.5 to 60.
    live_peer_timeout: float = attrs.field(default=5.0, validator=_float_range(0.5, 60))
    # --- backplane (issue 11): which backplane a server opens when none is passed in
    #: The backplane's URL (``--backplane``, ``CREALIA_BACKPLANE``): its scheme names the entry
    #: point of the ``crealia.backplanes`` group that opens it, e.g. ``sqlite:`` (SQLite in
    #: ``data_dir``), ``sqlite:///var/lib/crealia`` or ``redis://host:6379/0`` (a cluster).
    #: ``None`` or empty: SQLite in ``data_dir``. ``redis_url`` is an older name for it.
    backplane_url: str | None = attrs.field(default=None, repr=False)
    #: PostgreSQL as the store of record (``--database``, ``DATABASE_URL``): selects the
    #: ``postgresql`` backplane, on which any number of processes serve every project. Setting
    #: it sets ``backplane_url``. With ``redis_url`` (``--redis``) as well, Redis beside it
    #: carries presence, ephemeral messages and rate limits: the recommended cluster.
    database_url: str | None = attrs.field(default=None, validator=_database_url, repr=False)

    # --- cli: what only ``crealia serve`` reads
    #: Log level of ``crealia serve`` (debug, info, warning or error); unset: warning, or debug
    #: with ``dev``.
    log_level: str | None = attrs.field(
        default=None,
        converter=_lower,
        validator=_one_of("debug", "info", "warning", "error", optional=True),
    )

    def _beside_database(self, database: str) -> None:
        """PostgreSQL chooses the backplane; a Redis URL given as well (``redis_url``, or
        ``backplane_url`` naming Redis) is the Redis beside it, for presence, ephemeral
        messages and rate limits (``--database`` plus ``--redis``: the recommended cluster).

        Raises:
            ConfigurationError: another backplane is chosen too, or two Redis URLs disagree.
        """
        beside = self.redis_url
        chosen = self.backplane_url
        if chosen and chosen != database:
            if redis_url_problem(chosen) is not None:
                raise ConfigurationError(
                    f"database_url ({redact_url_password(database)!r}) and backplane_url "
                    f"({redact_url_password(chosen)!r}) both choose the backplane: set one of "
                    "them (a Redis URL beside the database goes in redis_url, --redis)"
                )
            if beside and beside != chosen:
                raise ConfigurationError(
                    f"backplane_url ({redact_url_password(chosen)!r}) and redis_url "
                    f"({redact_url_password(beside)!r}) name two Redis servers beside the "
                    "database: set one of them"
                )
            beside = chosen
        object.__setattr__(self, "backplane_url", database)
        object.__setattr__(self, "redis_url", beside)

    def __attrs_post_init__(self) -> None:
        """The checks that relate several settings (each field checked its own already).

        Raises:
            ConfigurationError: naming the settings.
        """
        database = self.database_url
        if not database and self.backplane_url and not database_url_problem(self.backplane_url):
            database = self.backplane_url  # --backplane postgresql://… is --database too
        if database:
            self._beside_database(database)
        elif self.redis_url:
            if self.backplane_url is None:
                object.__setattr__(self, "backplane_url", self.redis_url)
            elif self.backplane_url != self.redis_url:
                raise ConfigurationError(
                    f"backplane_url ({redact_url_password(self.backplane_url)!r}) and redis_url, "
                    f"its older name ({redact_url_password(self.redis_url)!r}), disagree: set "
                    "one of them"
                )
        if self.snapshot_every >= self.history_limit:
            # A snapshot must land inside the kept log, or a project cannot be rebuilt.
            raise ConfigurationError(
                f"snapshot_every ({self.snapshot_every}) must be below history_limit "
                f"({self.history_limit})"
            )
        if self.wal_checkpoint_bytes > self.wal_max_bytes:
            raise ConfigurationError(
                f"wal_checkpoint_bytes ({self.wal_checkpoint_bytes}) must not exceed "
                f"wal_max_bytes ({self.wal_max_bytes})"
            )
        check_jwt_config(self)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        config_file: str | Path | None = None,
        flags: Mapping[str, tuple[str, Any]] | None = None,
        **overrides: Any,
    ) -> Config:
        """Build a config from a TOML file, then environment variables, then flags, then
        ``overrides`` (each wins over those before it).

        The file is ``config_file``, else ``CREALIA_CONFIG`` if set. ``flags`` maps a field to
        the flag that set it and what was given (``{"ws_port": ("--ws-port", "70000")}``): text
        is read as the field's type, like a variable's, and errors name the flag. ``overrides``
        are values from code; those whose value is ``None`` are ignored, so unset flags fall
        through. Every value is checked as the module docstring says.

        Raises:
            ConfigurationError: the file, a variable, a flag or an override has an unusable
                value; the message names it and what was expected.
        """
        return load_config(environ, config_file=config_file, flags=flags, **overrides)[0]


@attrs.frozen
class Source:
    """Where a setting's value came from: ``kind`` is ``"file"`` (``name``: the file),
    ``"env"`` (the variable), ``"flag"`` (the flag) or ``"code"``; ``raw`` is what was written."""

    kind: str
    name: str
    raw: Any = attrs.field(repr=False)

    def __str__(self) -> str:
        return self.name


def load_config(
    environ: Mapping[str, str] | None = None,
    *,
    config_file: str | Path | None = None,
    flags: Mapping[str, tuple[str, Any]] | None = None,
    **overrides: Any,
) -> tuple[Config, dict[str, Source]]:
    """:meth:`Config.from_env`, also saying where each setting that is not a default came from.

    Raises:
        ConfigurationError: as :meth:`Config.from_env`.
    """
    env = os.environ if environ is None else environ
    values: dict[str, tuple[Any, Source]] = {}
    path = config_file if config_file is not None else env.get("CREALIA_CONFIG")
    file_values = _read_file(Path(path)) if path else {}
    alert_options = _env_alert_options(env, file_values.pop("alert_options", {}))
    file_rates = file_values.pop("rate_limits", {})
    if not isinstance(file_rates, Mapping):
        raise ConfigurationError(f"rate_limits in {path} must be a table, got {file_rates!r}")
    rate_limits = {
        **{str(k): str(v) for k, v in file_rates.items()},
        **{key[len(_RATE_PREFIX) :].lower(): raw for key, raw in env.items()
           if key.startswith(_RATE_PREFIX)},
    }  # fmt: skip
    for key, value in file_values.items():
        values[key] = (value, Source("file", str(path), value))
    env_set: set[str] = set()
    for name, field, kind in _ENV:
        if name in env and field not in env_set:
            raw = env[name]
            source = Source("env", name, raw)
            try:
                values[field] = (kind(raw), source)
            except ValueError:
                raise ConfigurationError(_refusal(source, field, _expected(field), raw)) from None
            env_set.add(field)
    for field, (flag, given) in (flags or {}).items():
        if given is None:
            continue
        source = Source("flag", flag, given)
        if isinstance(given, str):
            try:
                given = _from_text(_field(field).type, given)
            except ValueError:
                raise ConfigurationError(
                    _refusal(source, field, _expected(field), source.raw)
                ) from None
        values[field] = (given, source)
    if alert_options:
        values["alert_options"] = (alert_options, Source("file", str(path or "env"), None))
    if rate_limits:
        values["rate_limits"] = (rate_limits, Source("file", str(path or "env"), None))
    for field, value in overrides.items():
        if value is not None:
            values[field] = (value, Source("code", field, value))
    # CREALIA_AI_* define the provider "default".
    providers = dict(values.get("ai_providers", ({}, None))[0] or {})
    env_default = default_from_env(env)
    if env_default is not None and DEFAULT_AI_PROVIDER not in providers:
        providers[DEFAULT_AI_PROVIDER] = env_default
    if providers:
        where = values.get("ai_providers", (None, Source("env", "CREALIA_AI_URL", None)))[1]
        values["ai_providers"] = (parse_ai_providers(providers, env), where)
    known = {a.name for a in attrs.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigurationError(f"unknown setting {unknown[0]!r}")
    _backplane_alias(values)
    checked = {name: _check(name, value, source) for name, (value, source) in values.items()}
    try:
        config = Config(**checked)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(str(exc)) from exc
    return config, {name: source for name, (_value, source) in values.items()}


# ---------------------------------------------------------------------------------------------
# Checking one setting


def _string_list(value: Any, _type: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return comma_list(value)
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise TypeError("expected a list of strings")


def _strict(kind: type[Any]) -> Callable[[Any, Any], Any]:
    def structure(value: Any, _type: Any) -> Any:
        # bool is an int to Python, never to a setting.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise TypeError(f"expected {kind.__name__}")
        return value

    return structure


def _structure_number(value: Any, _type: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("expected a number")
    return value


def _is_mapping(type_: Any) -> bool:
    return typing.get_origin(type_) is Mapping


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter()
    conv.register_structure_hook(int, _strict(int))
    conv.register_structure_hook(float, _structure_number)
    conv.register_structure_hook(str, _strict(str))
    conv.register_structure_hook(bool, _strict(bool))
    conv.register_structure_hook(Path, lambda value, _type: _to_path(value))
    conv.register_structure_hook(Any, lambda value, _type: value)
    # Settings objects pass through: Config's converter checks them.
    conv.register_structure_hook(AIProviderSettings, lambda value, _type: value)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _string_list)

    def mapping(type_: Any) -> Callable[[Any, Any], Any]:
        key_type, value_type = typing.get_args(type_)

        def structure(value: Any, _type: Any) -> dict[Any, Any]:
            if not isinstance(value, Mapping):
                raise TypeError("expected a table")
            return {
                conv.structure(k, key_type): conv.structure(v, value_type) for k, v in value.items()
            }

        return structure

    conv.register_structure_hook_factory(_is_mapping, mapping)
    return conv


#: The converter every setting's value goes through (strict: no ``"4420"`` for an integer).
converter = _make_converter()

#: Settings whose values are never shown, in messages or by ``crealia check-config``.
SECRET_SETTINGS = frozenset({"jwt_secret", "jwt_secrets", "ai_providers",
                             "webrtc_turn_credential"})  # fmt: skip


def _field(name: str) -> attrs.Attribute[Any]:
    return getattr(attrs.fields(Config), name)  # type: ignore[no-any-return]


def _describe(type_: Any) -> str:
    args = [arg for arg in typing.get_args(type_) if arg is not type(None)]
    if typing.get_origin(type_) in (typing.Union, UnionType) and len(args) == 1:
        return _describe(args[0])
    if type_ == tuple[str, ...]:
        return "a list of strings (or one comma-separated string)"
    if _is_mapping(type_):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            Path: "a path"}.get(type_, str(type_))  # fmt: skip


def _expected(name: str) -> str:
    field = _field(name)
    if isinstance(field.validator, _Rule):
        return field.validator.expected
    return _describe(field.type)


def _from_text(type_: Any, raw: str) -> Any:
    """A flag's text as a value of ``type_`` (as the environment's variables are read).

    Raises:
        ValueError: not a value of that type.
    """
    args = [arg for arg in typing.get_args(type_) if arg is not type(None)]
    if typing.get_origin(type_) in (typing.Union, UnionType) and len(args) == 1:
        type_ = args[0]
    if type_ is bool:
        return _flag(raw)
    if type_ is int:
        return int(raw)
    if type_ is float:
        return float(raw)
    if type_ == tuple[str, ...]:
        return comma_list(raw)
    return raw


def _shown(name: str, value: Any) -> str:
    """``value`` of setting ``name`` as a message may show it."""
    if name in SECRET_SETTINGS:
        return "(hidden)"
    if name in ("redis_url", "backplane_url", "database_url", "alert_webhooks") and isinstance(
        value, str
    ):
        return repr(redact_url_password(value))
    return repr(value)


def _refusal(source: Source, name: str, expected: str, value: Any) -> str:
    """The message refusing ``value`` of setting ``name`` from ``source``."""
    shown = _shown(name, value)
    if source.kind == "file":
        return f"{name} in {source.name} must be {expected}, got {shown}"
    if source.kind == "env":
        return f"{source.name}={shown}: {name} must be {expected}"
    if source.kind == "flag":
        given = shown if name in SECRET_SETTINGS or not isinstance(value, str) else value
        return f"{source.name} {shlex.quote(given)}: must be {expected}"
    return f"{name} must be {expected}, got {shown}"


def _prefixed(source: Source, name: str, message: str) -> str:
    """A setting's own complaint (it names the setting), prefixed with where the value came
    from."""
    shown = _shown(name, source.raw)
    if source.kind == "file":
        return f"{source.name}: {message}"
    if source.kind == "env":
        return f"{source.name}={shown}: {message}"
    if source.kind == "flag":
        given = shown if name in SECRET_SETTINGS or not isinstance(source.raw, str) else source.raw
        return f"{source.name} {shlex.quote(given)}: {message}"
    return message


def _check(name: str, value: Any, source: Source) -> Any:
    """``value`` for setting ``name``, of its type and within its range, as Config will take it.

    Raises:
        ConfigurationError: it is not; the message names ``source``.
    """
    field = _field(name)
    try:
        value = converter.structure(value, field.type or Any)
    except (TypeError, ValueError, ConfigurationError, cattrs.BaseValidationError):
        raise ConfigurationError(_refusal(source, name, _expected(name), source.raw)) from None
    # The field's own converter and validator, as Config runs them, to say where the value
    # came from when they refuse it. None of them looks at the other settings.
    validator = field.validator
    try:
        converted = field.converter(value) if callable(field.converter) else value
        if isinstance(validator, _Rule):
            if not validator.accepts(converted):
                raise _Refused
        elif validator is not None:
            validator(None, field, converted)
    except _Refused:
        raise ConfigurationError(_refusal(source, name, _expected(name), source.raw)) from None
    except (TypeError, ValueError, ConfigurationError) as exc:
        raise ConfigurationError(_prefixed(source, name, str(exc))) from None
    return value


class _Refused(Exception):
    pass


_RANK = {"file": 0, "env": 1, "flag": 2, "code": 3}


def _backplane_alias(values: dict[str, tuple[Any, Source]]) -> None:
    """``backplane_url`` and its older name ``redis_url`` are one setting: code wins over a
    flag, which wins over the environment, which wins over the file, whichever name each uses
    (``--backplane`` over ``REDIS_URL``), and from one place the newer name wins
    (``CREALIA_BACKPLANE`` over ``REDIS_URL``); the loser is dropped."""
    if "backplane_url" in values and "redis_url" in values:
        chosen = values["backplane_url"][0]
        if isinstance(chosen, str) and not database_url_problem(chosen):
            return  # PostgreSQL chosen, and a Redis beside it: two settings
        new, old = values["backplane_url"][1], values["redis_url"][1]
        if _RANK[new.kind] >= _RANK[old.kind]:
            del values["redis_url"]
        else:
            del values["backplane_url"]


def _read_file(path: Path) -> dict[str, Any]:
    """A TOML config file: top-level keys are :class:`Config` field names; the table
    ``[alerts.<rule>]`` holds a rule's options (``warning``, ``critical``, ...)."""
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigurationError(f"config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config file {path}: {exc}") from exc
    known = {a.name for a in attrs.fields(Config)}
    alerts = raw.pop("alerts", {})
    if not isinstance(alerts, dict) or not all(isinstance(v, dict) for v in alerts.values()):
        raise ConfigurationError(f"config file {path}: [alerts.<rule>] must be tables")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigurationError(f"config file {path}: unknown setting {unknown[0]!r}")
    return {**raw, "alert_options": alerts}


def _env_alert_options(
    env: Mapping[str, str], base: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """``CREALIA_ALERT_<RULE>_<OPTION>=number`` (e.g. CREALIA_ALERT_LATENCY_WARNING=150) over
    the file's ``[alerts.<rule>]`` options."""
    options = {name: dict(values) for name, values in base.items()}
    for key, raw in env.items():
        if not key.startswith(_ALERT_PREFIX) or key in _NOT_ALERT_OPTIONS:
            continue
        rule, sep, option = key[len(_ALERT_PREFIX) :].lower().rpartition("_")
        if not sep or not rule:
            raise ConfigurationError(f"{key}: expected CREALIA_ALERT_<RULE>_<OPTION>")
        try:
            value = float(raw)
        except ValueError:
            raise ConfigurationError(f"{key}={raw!r}: expected a number") from None
        options.setdefault(rule, {})[option] = value
    return options


_ALERT_PREFIX = "CREALIA_ALERT_"
_RATE_PREFIX = "CREALIA_RATE_LIMIT_"
_NOT_ALERT_OPTIONS = {"CREALIA_ALERT_HOLD", "CREALIA_ALERT_WEBHOOKS"}


def comma_list(raw: str) -> tuple[str, ...]:
    """``"a, b,,c"`` → ``("a", "b", "c")``: a list setting given as one string."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def read_secret_file(path: Path) -> str:
    """A secret kept in a file (``--jwt-secret-file``, ``CREALIA_JWT_SECRET_FILE``): its text
    without surrounding whitespace, so that ``echo secret > file`` works.

    Raises:
        ConfigurationError: the file cannot be read or holds only whitespace.
    """
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"JWT secret file {str(path)!r}: {exc}") from None
    if not secret:
        raise ConfigurationError(f"JWT secret file {str(path)!r} is empty")
    return secret


def _flag(raw: str) -> bool:
    """``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off`` (or empty), any case.

    Raises:
        ValueError: anything else.
    """
    word = raw.strip().lower()
    if word in {"1", "true", "yes", "on"}:
        return True
    if word in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


_ENV: list[tuple[str, str, Any]] = [
    ("CREALIA_HOST", "host", str),
    ("HOST", "host", str),
    ("PORT", "port", int),
    ("WS_PORT", "ws_port", int),
    ("CREALIA_WS_PORT", "ws_port", int),
    ("CREALIA_DATA_DIR", "data_dir", str),
    ("CREALIA_BACKPLANE", "backplane_url", str),
    ("REDIS_URL", "redis_url", str),
    ("DATABASE_URL", "database_url", str),
    ("CREALIA_JWT_SECRET", "jwt_secret", str),
    ("JWT_SECRET", "jwt_secret", str),
    ("CREALIA_JWT_SECRET_FILE", "jwt_secret", lambda raw: read_secret_file(Path(raw))),
    ("CREALIA_JWT_SECRETS", "jwt_secrets", lambda raw: parse_key_map("CREALIA_JWT_SECRETS", raw)),
    ("CREALIA_JWT_PUBLIC_KEYS", "jwt_public_keys", parse_public_keys_env),
    ("CREALIA_JWT_KEYS_FILE", "jwt_keys_file", str),
    (
        "CREALIA_JWT_ALGORITHMS",
        "jwt_algorithms",
        comma_list,
    ),
    ("CREALIA_JWT_LEEWAY", "jwt_leeway", float),
    ("CREALIA_ALLOWED_ORIGINS", "allowed_origins", str),
    ("CREALIA_TICK_MS", "tick_ms", float),
    ("CREALIA_BATCH_FRAMES_PER_S", "batch_frames_per_s", float),
    ("CREALIA_HISTORY_LIMIT", "history_limit", int),
    ("CREALIA_MAX_FRAME_BYTES", "max_frame_bytes", int),
    ("CREALIA_CLIENT_LAG_TIMEOUT", "client_lag_timeout", float),
    ("RATE_LIMIT_WINDOW_MS", "rate_limit_window_ms", int),
    ("METRICS_RETENTION_DAYS", "metrics_retention_days", int),
    ("AUDIT_LOG_RETENTION_DAYS", "audit_log_retention_days", int),
    ("SECURITY_ALERT_THRESHOLD", "security_alert_threshold", int),
    ("CREALIA_SECURITY_ALERT_WINDOW", "security_alert_window", float),
    ("CREALIA_DEV", "dev", _flag),
    ("CREALIA_CONFORMANCE_ECHO", "conformance_echo", _flag),
    (
        "CREALIA_STRATEGIES",
        "strategy_chain",
        comma_list,
    ),
    ("CREALIA_STRATEGY_TIMEOUT", "strategy_timeout", float),
    ("CREALIA_PRESENCE_INTERVAL", "presence_interval", float),
    ("CREALIA_METRICS_INTERVAL", "metrics_interval", float),
    ("CREALIA_HEALTH_INTERVAL", "health_interval", float),
    ("CREALIA_MAX_LOOP_LAG", "max_loop_lag", float),
    ("CREALIA_ALERT_HOLD", "alert_hold", float),
    (
        "CREALIA_ALERT_WEBHOOKS",
        "alert_webhooks",
        comma_list,
    ),
    ("CREALIA_LOG_FORMAT", "log_format", str),
    ("CREALIA_MAX_CONNECTIONS", "max_connections", int),
    ("CREALIA_MAX_CONNECTIONS_PER_ADDRESS", "max_connections_per_address", int),
    ("CREALIA_MAX_SESSIONS_PER_USER", "max_sessions_per_user", int),
    ("CREALIA_HTTP_HEADER_TIMEOUT", "http_header_timeout", float),
    ("CREALIA_HTTP_BODY_TIMEOUT", "http_body_timeout", float),
    ("CREALIA_ALLOWED_HOSTS", "allowed_hosts", str),
    ("TRUSTED_PROXIES", "trusted_proxies", str),
    ("CREALIA_CLUSTER_RATE_SLACK", "cluster_rate_slack", float),
    ("CREALIA_VALUE_MAX_BYTES", "value_max_bytes", int),
    ("CREALIA_DOCUMENT_MAX_BYTES", "document_max_bytes", int),
    ("CREALIA_HISTORY_MAX_BYTES", "history_max_bytes", int),
    ("CREALIA_HISTORY_MEMORY_BYTES", "history_memory_bytes", int),
    ("CREALIA_WELCOME_FRAME_BYTES", "welcome_frame_bytes", int),
    ("CREALIA_REPLAY_MAX_BYTES", "replay_max_bytes", int),
    ("CREALIA_MAX_PENDING_CONFLICTS", "max_pending_conflicts", int),
    ("CREALIA_PENDING_CONFLICTS_MAX_BYTES", "pending_conflicts_max_bytes", int),
    ("CREALIA_WAL_CHECKPOINT_INTERVAL", "wal_checkpoint_interval", float),
    ("CREALIA_WAL_CHECKPOINT_BYTES", "wal_checkpoint_bytes", int),
    ("CREALIA_WAL_MAX_BYTES", "wal_max_bytes", int),
    ("CREALIA_DURABILITY", "durability", str),
    ("CREALIA_PREAUTH_HANDSHAKE_LIMIT", "preauth_handshake_limit", str),
    ("CREALIA_PREAUTH_REST_LIMIT", "preauth_rest_limit", str),
    ("CREALIA_AUDIT_REFUSAL_WINDOW", "audit_refusal_window", float),
    ("CREALIA_OPS_MAX_BYTES", "ops_max_bytes", int),
    ("CREALIA_MAX_MEMBERS_PER_PROJECT", "max_members_per_project", int),
    ("CREALIA_RETENTION_INTERVAL", "retention_interval", float),
    ("WEBRTC_LISTEN_IPS", "webrtc_listen_ips", comma_list),
    ("WEBRTC_STUN_SERVERS", "webrtc_stun_servers", comma_list),
    ("WEBRTC_TURN_SERVERS", "webrtc_turn_servers", comma_list),
    ("WEBRTC_TURN_USERNAME", "webrtc_turn_username", str),
    ("WEBRTC_TURN_CREDENTIAL", "webrtc_turn_credential", str),
    ("CREALIA_LIVE_RELAY_CPU_BUDGET", "live_relay_cpu_budget", float),
    # --- cli
    ("CREALIA_LOG_LEVEL", "log_level", str),
]
attrs.resolve_types(Config)

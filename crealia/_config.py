"""Server configuration: one frozen object built from defaults, the environment and flags."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from ._aiproviders import DEFAULT as DEFAULT_AI_PROVIDER
from ._aiproviders import AIProviderSettings, default_from_env, parse_ai_providers
from ._auth import check_algorithms as check_jwt_algorithms
from ._auth import check_config as check_jwt_config
from ._auth import keys_file_path, parse_key_map, parse_public_keys_env
from ._errors import ConfigurationError
from ._origin import parse_allowed_hosts, parse_allowed_origins
from ._preauth import parse_preauth_limit


def _int_range(low: int, high: int) -> Any:
    def check(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigurationError(
                f"{attribute.name} must be an integer from {low} to {high}, got {value!r}"
            )

    return check


def _float_range(low: float, high: float) -> Any:
    def check(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (low <= value <= high)
        ):
            raise ConfigurationError(
                f"{attribute.name} must be a number from {low} to {high}, got {value!r}"
            )

    return check


def _preauth_limit(_inst: Any, attribute: attrs.Attribute[str], value: str) -> None:
    parse_preauth_limit(attribute.name, value)


def _ops_max_bytes(_inst: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not (value == 0 or 1024**2 <= value <= 1024**5)
    ):
        raise ConfigurationError(
            f"{attribute.name} must be 0 (no cap) or an integer from 1 MiB to 1 PiB, got {value!r}"
        )


@attrs.frozen(kw_only=True)
class Config:
    """Everything a crealia server can be told.

    Durations that are configuration live here, in seconds unless the name says otherwise.
    """

    host: str = "127.0.0.1"
    port: int = 3000
    ws_port: int = 3001
    data_dir: Path = Path("./crealia-data")
    #: The older name of ``backplane_url`` (``--redis``, ``REDIS_URL``): setting it sets that.
    redis_url: str | None = None
    jwt_secret: str | None = None
    dev: bool = False

    #: Outbound batching tick in milliseconds; 0 turns batching off (one frame per message).
    tick_ms: float = 20.0
    #: Largest client frame, after decompression (docs/protocol.md §2).
    max_frame_bytes: int = 64 * 1024
    #: Seconds a new connection has to send ``hello``.
    hello_timeout: float = 10.0
    #: Frames a connection may have queued before it is closed as a slow consumer (4409).
    outbox_frames: int = 512
    #: Bytes a connection may have queued before it is closed as a slow consumer (4409).
    outbox_bytes: int = 8 * 1024 * 1024
    #: Refused or invalid messages a connection may send within ``abuse_window`` seconds before
    #: it is closed with 4429.
    abuse_errors: int = 200
    abuse_window: float = 10.0
    #: Seconds a closing session may take to finish its frame and send its close.
    close_timeout: float = 5.0
    #: Durable events kept per project for resume (at least 1,000).
    history_limit: int = attrs.field(default=10_000)
    #: Seconds between presence heartbeats in a cluster; a process silent for three of them is
    #: taken for dead and its users leave.
    presence_interval: float = 2.0
    #: Seconds a room stays open after its last member leaves.
    room_grace: float = 5.0
    #: A snapshot is stored every this many durable events.
    snapshot_every: int = 500
    #: Longest comment text, in characters.
    comment_max_chars: int = 10_000
    #: Seconds to wait for connections to close on shutdown before forcing them.
    shutdown_grace: float = 5.0
    #: Allowed JWT clock skew, seconds.
    jwt_leeway: float = 5.0
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
    jwt_keys_file: Path | None = attrs.field(
        default=None,
        converter=keys_file_path,
        validator=check_jwt_config,
    )
    #: Browser origins (``scheme://host[:port]``) allowed to open a WebSocket besides the
    #: server's own; ``*`` allows every origin. Requests without ``Origin`` are always allowed.
    allowed_origins: tuple[str, ...] = attrs.field(default=(), converter=parse_allowed_origins)
    #: The default strategy chain of every project (a project may set its own over the API).
    strategy_chain: tuple[str, ...] = attrs.field(default=("merge", "priority"), converter=tuple)
    #: Options per strategy name, e.g. ``{"priority": {"tie": "first"}, "manual": {"timeout":
    #: 60}}``; a project's own options override these key by key.
    strategy_options: Mapping[str, Mapping[str, Any]] = attrs.Factory(dict)
    #: Seconds each strategy may take on one conflict before the next one is asked.
    strategy_timeout: float = 3.0
    #: In a cluster, seconds after which a pending conflict found when a room opens is taken
    #: for dropped by the process that detected it (it died), and its chain is run again.
    orphan_conflict_age: float = 30.0
    #: Strategies registered in code by an embedding program, beside the entry points.
    strategies: Mapping[str, Any] = attrs.Factory(dict)
    #: The window rate limits are counted over, in milliseconds.
    rate_limit_window_ms: int = attrs.field(default=60_000, validator=attrs.validators.gt(0))
    #: Limits per event class (cursor, edit, comment, signal, rest, other) per window, over the
    #: defaults: ``"count/burst"``, ``"count"`` (burst a tenth of it) or ``"off"``.
    rate_limits: Mapping[str, str] = attrs.Factory(dict)
    #: Seconds between metric samples (and alert evaluations); 0 turns metrics sampling,
    #: fan-out timing and alerting off.
    metrics_interval: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    #: Days metric samples and alerts are kept in the store.
    metrics_retention_days: int = 30
    audit_log_retention_days: int = 90
    #: Suspicious events (refused actions, bad tokens, ...) within ``security_alert_window``
    #: seconds that make a security alert, for rules without a threshold of their own.
    security_alert_threshold: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    security_alert_window: float = attrs.field(default=300.0, validator=attrs.validators.gt(0))
    #: A user kept over a rate limit is audited at most once per this many seconds and class
    #: (the event counts the refusals), so a flood cannot flood the audit log.
    audit_rate_limited_every: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    #: Seconds between health checks (storage writable, Redis reachable, event-loop lag).
    health_interval: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    #: Event-loop lag, in seconds, past which the server reports itself unhealthy.
    max_loop_lag: float = 1.0
    #: Options per alert rule name, e.g. ``{"latency": {"warning": 150, "critical": 400}}``.
    alert_options: Mapping[str, Mapping[str, Any]] = attrs.Factory(dict)
    #: Seconds a rule's condition (or its end) must hold before an alert fires (or resolves).
    alert_hold: float = 15.0
    #: URLs every alert change is POSTed to (JSON), with retries.
    alert_webhooks: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: Alert rules registered in code by an embedding program, beside the entry points.
    alert_rules: Mapping[str, Any] = attrs.Factory(dict)
    #: Log format of ``crealia serve``: ``json`` (one object a line) or ``text``.
    log_format: str = attrs.field(default="json", validator=attrs.validators.in_(("json", "text")))
    # --- the edge: connection caps, HTTP read deadlines, allowed hosts (docs/security.md)
    #: Open TCP connections, both ports together, at most (0 to 1,048,576; 0: three quarters
    #: of the process's RLIMIT_NOFILE). Past it a connection is answered 503 and closed.
    max_connections: int = attrs.field(default=0, validator=_int_range(0, 1 << 20))
    #: Open TCP connections from one client address at most (0 to 1,048,576; 0: no cap), and
    #: never more than a quarter of ``max_connections``, so one address cannot take them all.
    #: Behind a reverse proxy every client has the proxy's address: set 0 there.
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
    # --- storage: WAL checkpoints
    #: Seconds between passive WAL checkpoints of each SQLite database (0.05..60).
    wal_checkpoint_interval: float = attrs.field(
        default=1.0, validator=[attrs.validators.ge(0.05), attrs.validators.le(60)]
    )
    #: WAL growth in bytes that starts a passive checkpoint before the interval is up
    #: (64 KiB..``wal_max_bytes``).
    wal_checkpoint_bytes: int = attrs.field(
        default=4 * 1024 * 1024, validator=attrs.validators.ge(64 * 1024)
    )
    #: The bound on each WAL file, in bytes (1 MiB..16 GiB): a TRUNCATE checkpoint starts at
    #: half of it.
    wal_max_bytes: int = attrs.field(
        default=64 * 1024 * 1024,
        validator=[attrs.validators.ge(1024 * 1024), attrs.validators.le(16 * 1024**3)],
    )
    # --- members
    #: Users present in one project at most (0 to 1,000,000; 0: no cap), counting those of
    #: every process of a cluster as last shared; the next user's ``hello`` gets ``overloaded``
    #: and close 1013 (more connections of a user already present are let in).
    max_members_per_project: int = attrs.field(default=1000, validator=_int_range(0, 1_000_000))

    @wal_max_bytes.validator
    def _check_wal(self, _attr: object, value: int) -> None:
        if self.wal_checkpoint_bytes > value:
            raise ConfigurationError(
                f"wal_checkpoint_bytes ({self.wal_checkpoint_bytes}) must not exceed "
                f"wal_max_bytes ({value})"
            )

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
    audit_refusal_window: float = attrs.field(
        default=1.0, validator=[attrs.validators.ge(0), attrs.validators.le(60)]
    )
    #: Bytes the operations database (``ops.sqlite3``: audit log, alerts, metric samples) may
    #: hold; past it the oldest audit events (then metric samples) are pruned first. 0 turns the
    #: cap off; otherwise 1 MiB .. 1 PiB.
    ops_max_bytes: int = attrs.field(default=1024**3, validator=_ops_max_bytes)
    # --- background jobs
    #: Seconds between deletions of audit events, metric samples and resolved alerts past
    #: their retention (1 .. 86,400; a failed pruning is retried sooner, with a backoff).
    retention_interval: float = attrs.field(default=3600.0, validator=_float_range(1, 86_400))
    # --- backplane (issue 11): which backplane a server opens when none is passed in
    #: The backplane's URL (``--backplane``, ``CREALIA_BACKPLANE``): its scheme names the entry
    #: point of the ``crealia.backplanes`` group that opens it, e.g. ``sqlite:`` (SQLite in
    #: ``data_dir``), ``sqlite:///var/lib/crealia`` or ``redis://host:6379/0`` (a cluster).
    #: ``None`` or empty: SQLite in ``data_dir``. ``redis_url`` is an older name for it.
    backplane_url: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.redis_url:
            if self.backplane_url is None:
                object.__setattr__(self, "backplane_url", self.redis_url)
            elif self.backplane_url != self.redis_url:
                raise ConfigurationError(
                    f"backplane_url ({self.backplane_url!r}) and redis_url, its older name "
                    f"({self.redis_url!r}), disagree: set one of them"
                )

    @history_limit.validator
    def _check_history(self, _attr: object, value: int) -> None:
        if value < 1000:
            raise ConfigurationError(f"history_limit must be at least 1000, got {value}")
        if self.snapshot_every >= value:
            # A snapshot must land inside the kept log, or a project cannot be rebuilt.
            raise ConfigurationError(
                f"snapshot_every ({self.snapshot_every}) must be below history_limit ({value})"
            )

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        config_file: str | Path | None = None,
        **overrides: Any,
    ) -> Config:
        """Build a config from a TOML file, then environment variables, then ``overrides``
        (flags win over the environment, which wins over the file).

        The file is ``config_file``, else ``CREALIA_CONFIG`` if set. Overrides whose value is
        ``None`` are ignored, so unset flags fall through.

        Raises:
            ConfigurationError: the file, a variable or an override has an unusable value.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = config_file if config_file is not None else env.get("CREALIA_CONFIG")
        file_values = _read_file(Path(path)) if path else {}
        alert_options = _env_alert_options(env, file_values.pop("alert_options", {}))
        rate_limits = {
            **{str(k): str(v) for k, v in file_values.pop("rate_limits", {}).items()},
            **{key[len(_RATE_PREFIX) :].lower(): raw for key, raw in env.items()
               if key.startswith(_RATE_PREFIX)},
        }  # fmt: skip
        for name, field, kind in _ENV:
            if name in env and field not in values:
                raw = env[name]
                try:
                    values[field] = kind(raw)
                except ValueError as exc:
                    raise ConfigurationError(f"{name}={raw!r}: {exc}") from exc
        from_env = dict(values)
        for field, value in file_values.items():
            values.setdefault(field, value)
        if alert_options:
            values["alert_options"] = alert_options
        if rate_limits:
            values["rate_limits"] = rate_limits
        values.update({k: v for k, v in overrides.items() if v is not None})
        _backplane_alias(values, [overrides, from_env, file_values])
        # CREALIA_AI_* define the provider "default".
        providers = dict(values.get("ai_providers") or {})
        env_default = default_from_env(env)
        if env_default is not None and DEFAULT_AI_PROVIDER not in providers:
            providers[DEFAULT_AI_PROVIDER] = env_default
        if providers:
            values["ai_providers"] = parse_ai_providers(providers, env)
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"])
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(str(exc)) from exc


def _backplane_alias(values: dict[str, Any], layers: list[Mapping[str, Any]]) -> None:
    """``backplane_url`` and its older name ``redis_url`` are one setting: the flag wins over
    the environment, which wins over the file, whichever name each uses (``--backplane`` over
    ``REDIS_URL``); ``redis_url`` is kept only when it is the winner."""
    for layer in layers:
        for key in ("backplane_url", "redis_url"):
            if layer.get(key) is not None:
                values["backplane_url"] = layer[key]
                if values.get("redis_url") != layer[key]:
                    values.pop("redis_url", None)
                return


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
    return raw.strip().lower() in {"1", "true", "yes", "on"}


_ENV: list[tuple[str, str, Any]] = [
    ("CREALIA_HOST", "host", str),
    ("HOST", "host", str),
    ("PORT", "port", int),
    ("WS_PORT", "ws_port", int),
    ("CREALIA_WS_PORT", "ws_port", int),
    ("CREALIA_DATA_DIR", "data_dir", str),
    ("CREALIA_BACKPLANE", "backplane_url", str),
    ("REDIS_URL", "redis_url", str),
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
    ("CREALIA_HISTORY_LIMIT", "history_limit", int),
    ("CREALIA_MAX_FRAME_BYTES", "max_frame_bytes", int),
    ("RATE_LIMIT_WINDOW_MS", "rate_limit_window_ms", int),
    ("METRICS_RETENTION_DAYS", "metrics_retention_days", int),
    ("AUDIT_LOG_RETENTION_DAYS", "audit_log_retention_days", int),
    ("SECURITY_ALERT_THRESHOLD", "security_alert_threshold", int),
    ("CREALIA_SECURITY_ALERT_WINDOW", "security_alert_window", float),
    ("CREALIA_DEV", "dev", _flag),
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
    ("CREALIA_CLUSTER_RATE_SLACK", "cluster_rate_slack", float),
    ("CREALIA_VALUE_MAX_BYTES", "value_max_bytes", int),
    ("CREALIA_DOCUMENT_MAX_BYTES", "document_max_bytes", int),
    ("CREALIA_HISTORY_MAX_BYTES", "history_max_bytes", int),
    ("CREALIA_WELCOME_FRAME_BYTES", "welcome_frame_bytes", int),
    ("CREALIA_REPLAY_MAX_BYTES", "replay_max_bytes", int),
    ("CREALIA_MAX_PENDING_CONFLICTS", "max_pending_conflicts", int),
    ("CREALIA_PENDING_CONFLICTS_MAX_BYTES", "pending_conflicts_max_bytes", int),
    ("CREALIA_WAL_CHECKPOINT_INTERVAL", "wal_checkpoint_interval", float),
    ("CREALIA_WAL_CHECKPOINT_BYTES", "wal_checkpoint_bytes", int),
    ("CREALIA_WAL_MAX_BYTES", "wal_max_bytes", int),
    ("CREALIA_PREAUTH_HANDSHAKE_LIMIT", "preauth_handshake_limit", str),
    ("CREALIA_PREAUTH_REST_LIMIT", "preauth_rest_limit", str),
    ("CREALIA_AUDIT_REFUSAL_WINDOW", "audit_refusal_window", float),
    ("CREALIA_OPS_MAX_BYTES", "ops_max_bytes", int),
    ("CREALIA_MAX_MEMBERS_PER_PROJECT", "max_members_per_project", int),
    ("CREALIA_RETENTION_INTERVAL", "retention_interval", float),
]

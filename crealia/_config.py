"""Server configuration: one frozen object built from defaults, the environment and flags."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from ._errors import ConfigurationError


@attrs.frozen(kw_only=True)
class Config:
    """Everything a crealia server can be told.

    Durations that are configuration live here, in seconds unless the name says otherwise.
    """

    host: str = "127.0.0.1"
    port: int = 3000
    ws_port: int = 3001
    data_dir: Path = Path("./crealia-data")
    redis_url: str | None = None
    jwt_secret: str | None = None
    dev: bool = False

    #: Outbound batching tick in milliseconds; 0 turns batching off (one frame per message).
    tick_ms: float = 20.0
    #: Largest client frame, after decompression (PROTOCOL.md §2).
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
    rate_limit_window_ms: int = 60_000
    #: Seconds between metric samples (and alert evaluations); 0 turns metrics sampling,
    #: fan-out timing and alerting off.
    metrics_interval: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    #: Days metric samples and alerts are kept in the store.
    metrics_retention_days: int = 30
    audit_log_retention_days: int = 90
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
        for name, field, kind in _ENV:
            if name in env and field not in values:
                raw = env[name]
                try:
                    values[field] = kind(raw)
                except ValueError as exc:
                    raise ConfigurationError(f"{name}={raw!r}: {exc}") from exc
        for field, value in file_values.items():
            values.setdefault(field, value)
        if alert_options:
            values["alert_options"] = alert_options
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"])
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(str(exc)) from exc


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
_NOT_ALERT_OPTIONS = {"CREALIA_ALERT_HOLD", "CREALIA_ALERT_WEBHOOKS"}


def _flag(raw: str) -> bool:
    return raw.strip().lower() in {"1", "true", "yes", "on"}


_ENV: list[tuple[str, str, Any]] = [
    ("CREALIA_HOST", "host", str),
    ("HOST", "host", str),
    ("PORT", "port", int),
    ("WS_PORT", "ws_port", int),
    ("CREALIA_WS_PORT", "ws_port", int),
    ("CREALIA_DATA_DIR", "data_dir", str),
    ("REDIS_URL", "redis_url", str),
    ("CREALIA_JWT_SECRET", "jwt_secret", str),
    ("JWT_SECRET", "jwt_secret", str),
    ("CREALIA_TICK_MS", "tick_ms", float),
    ("CREALIA_HISTORY_LIMIT", "history_limit", int),
    ("CREALIA_MAX_FRAME_BYTES", "max_frame_bytes", int),
    ("RATE_LIMIT_WINDOW_MS", "rate_limit_window_ms", int),
    ("METRICS_RETENTION_DAYS", "metrics_retention_days", int),
    ("AUDIT_LOG_RETENTION_DAYS", "audit_log_retention_days", int),
    ("CREALIA_DEV", "dev", _flag),
    (
        "CREALIA_STRATEGIES",
        "strategy_chain",
        lambda raw: tuple(name.strip() for name in raw.split(",") if name.strip()),
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
        lambda raw: tuple(url.strip() for url in raw.split(",") if url.strip()),
    ),
    ("CREALIA_LOG_FORMAT", "log_format", str),
]

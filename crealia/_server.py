"""The server: one nursery holding the operations store, the rooms and the transports, beside
a backplane it is handed or opens.

Like httpcore's ``network_backend=``, the backplane is passed in: ``open_server(config,
backplane=...)`` uses the one given as is (its lifetime stays the caller's); with none, the
server opens one from ``config.backplane_url`` through the ``crealia.backplanes`` entry points
(:class:`~crealia._plugins.BackplaneRegistry`; SQLite in ``data_dir`` by default) and closes it
last. The core talks to it only through :class:`crealia.abc.Backplane`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import hypercorn.config
import trio

from ._alerts import AlertEngine, AlertNotifier
from ._audit import AuditLog
from ._auth import TokenAuthority, load_or_create_secret
from ._backplane import Backplane
from ._config import Config
from ._edge import ConnectionGate, address_cap, default_max_connections, edge_app, serve_http
from ._errors import raising_lone_errors
from ._http import create_app
from ._jobs import JobFailures
from ._metrics import Traffic
from ._model import Role
from ._monitor import Monitor
from ._ops import OpsStore, SqliteOps
from ._origin import HostPolicy
from ._plugins import (
    DEFAULT_BACKPLANE_URL,
    AlertRuleRegistry,
    BackplaneRegistry,
    StrategyRegistry,
)
from ._ratelimit import RateLimiter, rate_limits
from ._room import RoomManager
from ._security import AuditContext, AuditRule, SecurityMonitor
from ._session import Hub
from ._settle import Settler
from ._storage import OPS_DB, Store, WalPolicy, open_store
from ._transport import Transport
from .transports._asgi import configure_hypercorn, websocket_route
from .transports._trio_ws import TrioWebSocketTransport

log = logging.getLogger("crealia")


@attrs.define(eq=False)
class Server:
    """A running crealia server. Get one from :func:`open_server`."""

    config: Config
    hub: Hub
    #: The operations store: audit log, security alerts, metric samples and alerts (this
    #: process's ``ops.sqlite3``, or the backplane's shared one).
    ops_store: OpsStore
    #: ``ops.sqlite3`` when the server keeps one (None on a backplane with its own ops store).
    ops: Store | None
    monitor: Monitor
    security: SecurityMonitor
    http_port: int
    ws_port: int
    _stop_http: trio.Event
    _cancel: trio.CancelScope
    #: What each transport reported when it started (its port, or None), the fast path first.
    transport_ports: dict[Transport, int | None] = attrs.Factory(dict)

    @property
    def backplane(self) -> Backplane:
        """The backplane the server runs on (handed in, or opened from the config)."""
        return self.hub.backplane

    @property
    def ws_url(self) -> str:
        """The fast-path WebSocket URL."""
        return f"ws://{self.config.host}:{self.ws_port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.http_port}"

    def issue_token(
        self,
        user_id: str,
        project_id: str,
        role: Role = "editor",
        name: str | None = None,
        ttl: float = 3600.0,
    ) -> str:
        """A token this server accepts (for embedding programs and tests)."""
        return self.hub.auth.issue(
            user_id=user_id, project_id=project_id, role=role, name=name, ttl=ttl
        )  # type: ignore[arg-type]

    async def aclose(self) -> None:
        """Graceful stop: refuse new connections, close open ones with 1001, stop serving.

        Bounded by ``config.shutdown_grace``; safe to call more than once and when cancelled.
        """
        with trio.CancelScope(shield=True):
            await self.hub.shutdown()
            self._stop_http.set()
            self._cancel.cancel()


@raising_lone_errors
@asynccontextmanager
async def open_server(
    config: Config | None = None,
    *,
    backplane: Backplane | None = None,
    transports: Sequence[Transport] = (),
) -> AsyncIterator[Server]:
    """Run a crealia server for the duration of the ``async with`` block.

    ``backplane``: the :class:`~crealia.abc.Backplane` to run on, used as is: the caller opened
    it and closes it after the block (build it from the same config, whose quotas and limits
    it should share); ``config.backplane_url`` is then not looked at. Without one, the server
    opens the backplane ``config.backplane_url`` names through the ``crealia.backplanes`` entry
    points (SQLite in ``config.data_dir`` when unset) and closes it after everything else.

    ``transports`` are run beside the built-in ones (the fast path on ``ws_port``, the ``/ws``
    route of the HTTP app), in the server's nursery, each given the same
    :class:`~crealia.Acceptor` (see :class:`~crealia.abc.Transport`).

    The block starts once every transport and the HTTP port accept connections. Leaving it (or
    cancelling it) shuts the server down gracefully, then flushes and closes the stores.

    Raises:
        ConfigurationError: unusable configuration or data dir, or a backplane URL no installed
            backplane serves (the message lists the known schemes).
        StorageError: a store cannot be opened.
        TransportError, Overloaded: the backplane's store cannot be reached.
        OSError: a port cannot be bound.

    Each as itself: an error that comes alone out of the server's nurseries is not wrapped in
    an :class:`ExceptionGroup`.
    """
    config = config or Config()
    registry = StrategyRegistry.discover(config.strategies)
    registry.check(list(config.strategy_chain))  # before anything is created on disk
    backplanes = None if backplane is not None else BackplaneRegistry.discover()
    if backplanes is not None:
        backplanes.resolve(config.backplane_url or DEFAULT_BACKPLANE_URL)  # likewise
    rules = AlertRuleRegistry.discover(config.alert_rules).create_all(config.alert_options)
    limits = rate_limits(config.rate_limits)
    secret = config.jwt_secret or load_or_create_secret(config.data_dir)
    wal = WalPolicy(
        interval=config.wal_checkpoint_interval,
        checkpoint_bytes=config.wal_checkpoint_bytes,
        max_bytes=config.wal_max_bytes,
    )
    # Every background job's failures, counted for /metrics: none of them ends the server.
    jobs = JobFailures()
    async with _open_backplane(config, backplanes, backplane) as backplane, \
            _open_ops(config, backplane, wal, jobs) as (ops_store, ops):  # fmt: skip
        audit = AuditLog(ops_store, retention_days=config.audit_log_retention_days,
                         refusal_window=config.audit_refusal_window,
                         max_bytes=config.ops_max_bytes, jobs=jobs,
                         prune_interval=config.retention_interval)  # fmt: skip
        settler = Settler(registry=registry, backplane=backplane, config=config, audit=audit)
        settler.build(list(config.strategy_chain), {})  # options a strategy refuses fail here
        async with trio.open_nursery() as nursery:
            limiter = RateLimiter(
                limits,
                config.rate_limit_window_ms,
                shared=backplane if backplane.shares_rate_limits else None,
                slack=config.cluster_rate_slack,
                jobs=jobs,
            )
            await nursery.start(limiter.run)
            traffic = Traffic()
            max_connections = config.max_connections or default_max_connections()
            gate = ConnectionGate(
                max_connections=max_connections,
                max_per_address=address_cap(config.max_connections_per_address, max_connections),
                max_per_user=config.max_sessions_per_user,
            )
            rooms = RoomManager(backplane, config, settler, traffic=traffic, jobs=jobs)
            await nursery.start(rooms.run)
            hub = Hub(
                config=config,
                auth=TokenAuthority.from_config(config, fallback_secret=secret),
                backplane=backplane,
                rooms=rooms,
                settler=settler,
                audit=audit,
                limiter=limiter,
                traffic=traffic,
                gate=gate,
            )
            await nursery.start(hub.watch_lag)
            notifier = AlertNotifier(config.alert_webhooks, jobs=jobs)
            monitor = Monitor(
                config=config,
                ops=ops_store,
                backplane=backplane,
                hub=hub,
                engine=AlertEngine(rules, hold=config.alert_hold),
                notifier=notifier,
                traffic=traffic,
                jobs=jobs,
            )
            security = SecurityMonitor(
                store=ops_store,
                rules=[rule for rule in rules if isinstance(rule, AuditRule)],
                context=AuditContext(threshold=config.security_alert_threshold,
                                     window=config.security_alert_window),
                notifier=notifier,
                on_change=monitor.publish_security_alert,
                jobs=jobs,
            )  # fmt: skip
            audit.observers.append(security.observe)
            await nursery.start(security.run)
            await nursery.start(audit.run)
            await nursery.start(monitor.run)
            acceptor = hub.acceptor()
            fast_path = TrioWebSocketTransport(config.host, config.ws_port)
            started: dict[Transport, int | None] = {}
            for transport in (fast_path, *transports):
                started[transport] = await nursery.start(transport.serve, acceptor)
            stop_http = trio.Event()
            hconfig = hypercorn.config.Config()
            hconfig.graceful_timeout = 2.0
            # Idle keep-alive connections hold a descriptor each: at most 5 s (or less when
            # headers must come sooner); the read deadlines are crealia._edge's.
            hconfig.keep_alive_timeout = min(5.0, config.http_header_timeout)
            hconfig.accesslog = None
            hconfig.errorlog = logging.getLogger("crealia.http")
            configure_hypercorn(hconfig, config.max_frame_bytes)
            app: Any = edge_app(
                websocket_route(acceptor, create_app(hub, monitor, security)),
                hosts=HostPolicy.from_hosts(config.allowed_hosts),
                header_timeout=config.http_header_timeout,
                body_timeout=config.http_body_timeout,
                gate=gate,
            )
            http_port = await nursery.start(
                partial(
                    serve_http,
                    app,
                    hconfig,
                    gate,
                    config.host,
                    config.port,
                    header_timeout=config.http_header_timeout,
                    shutdown_trigger=stop_http.wait,
                )
            )
            acceptor.page_ports = (http_port,)  # its pages are same-origin on every transport
            ws_port = started[fast_path]
            assert ws_port is not None
            server = Server(
                config=config,
                hub=hub,
                ops_store=ops_store,
                ops=ops,
                monitor=monitor,
                security=security,
                http_port=http_port,
                ws_port=ws_port,
                stop_http=stop_http,
                cancel=nursery.cancel_scope,
                transport_ports=started,
            )
            try:
                yield server
            finally:
                await server.aclose()
                await settler.aclose()


@asynccontextmanager
async def _open_backplane(
    config: Config, backplanes: BackplaneRegistry | None, given: Backplane | None
) -> AsyncIterator[Backplane]:
    if given is not None:
        yield given  # the caller's: it opened it and closes it
        return
    assert backplanes is not None
    async with backplanes.open(config.backplane_url, config) as backplane:
        yield backplane


@asynccontextmanager
async def _open_ops(
    config: Config, backplane: Backplane, wal: WalPolicy, jobs: JobFailures
) -> AsyncIterator[tuple[OpsStore, Store | None]]:
    """The backplane's shared operations store, or else ``ops.sqlite3`` in the data dir."""
    shared = backplane.ops_store()
    if shared is not None:
        yield shared, None
        return
    async with open_store(config.data_dir, OPS_DB, wal=wal, jobs=jobs) as ops:
        yield SqliteOps(ops), ops


async def serve(
    config: Config,
    *,
    backplane: Backplane | None = None,
    transports: Sequence[Transport] = (),
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a server until cancelled (``backplane`` and ``transports`` as for
    :func:`open_server`); reports the running :class:`Server` via ``task_status``."""
    async with open_server(config, backplane=backplane, transports=transports) as server:
        task_status.started(server)
        await trio.sleep_forever()

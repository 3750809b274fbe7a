"""The HTTP app (quart-trio): REST API, health endpoints, and the ``/ws`` route in front of it.

Every error answers ``{"error": {"code", "message"}}`` with the status of its
:class:`~crealia._errors.ProtocolError`.
"""

from __future__ import annotations

import csv
import datetime
import io
import math
from collections.abc import AsyncIterator
from typing import Any, Literal, TypeVar

import attrs
import orjson
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from quart import Response, request
from quart_trio import QuartTrio

from . import _wire
from ._auth import User, require
from ._backplane import Conflict
from ._errors import (
    BadRequest,
    ConfigurationError,
    Forbidden,
    NotFound,
    ProtocolError,
    Unauthorized,
)
from ._metrics import ServerCollector
from ._monitor import Monitor
from ._session import Hub
from .transports._asgi import ASGIApp, websocket_route

T = TypeVar("T")


def _json(data: Any, status: int = 200) -> Response:
    return Response(_wire.dumps(data), status=status, content_type="application/json")


def error_response(exc: ProtocolError) -> Response:
    response = _json({"error": {"code": exc.code, "message": exc.message}}, exc.http_status)
    if exc.retry_after_ms is not None:
        response.headers["Retry-After"] = str(max(1, round(exc.retry_after_ms / 1000)))
    return response


@attrs.frozen(kw_only=True)
class DetectBody:
    changes: list[_wire.Op] = attrs.field(validator=_wire._ops)
    projectId: str | None = None


@attrs.frozen(kw_only=True)
class ResolveBody:
    choice: Literal["current", "incoming", "custom"]
    value: Any = _wire.MISSING
    dismiss: bool = False
    projectId: str | None = None


@attrs.frozen(kw_only=True)
class ReportBody:
    startDate: Any
    endDate: Any
    format: Literal["json", "csv"] = "json"
    projectId: str | None = None


@attrs.frozen(kw_only=True)
class ChainBody:
    strategies: list[str]
    options: dict[str, dict[str, Any]] = attrs.Factory(dict)


def conflict_view(conflict: Conflict) -> dict[str, Any]:
    """A conflict as the REST API shows it: the wire object plus when and how it was settled."""
    return {**conflict.to_wire(), "created_at": conflict.created_at,
            "resolution": conflict.resolution}  # fmt: skip


def create_app(hub: Hub, monitor: Monitor) -> ASGIApp:
    """The ASGI app served on ``--port``: REST, health, metrics, and the ``/ws`` route."""
    app = QuartTrio("crealia")
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(monitor))
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)

    def bearer(*, query: bool = False) -> User:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if query and not header:
            # EventSource cannot set headers: the live feed also takes ?access_token=.
            scheme, token = "bearer", request.args.get("access_token", "")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing Authorization: Bearer <token> header")
        return hub.auth.verify(token.strip())

    def for_project(user: User, project_id: str) -> None:
        if user.project_id != project_id:
            raise Forbidden(f"token is for project {user.project_id!r}, not {project_id!r}")

    @app.errorhandler(ProtocolError)
    async def protocol_error(exc: ProtocolError) -> Response:
        return error_response(exc)

    @app.errorhandler(404)
    async def not_found(_exc: Exception) -> Response:
        return error_response(NotFound(f"no such endpoint: {request.method} {request.path}"))

    @app.errorhandler(405)
    async def not_allowed(exc: Exception) -> Response:
        response = error_response(NotFound(f"{request.method} is not allowed on {request.path}"))
        response.status_code = 405
        return response

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        results = await monitor.check_health()
        checks = {name: "ok" if r.ok else f"failing: {r.detail}" for name, r in results.items()}
        ok = hub.accepting and all(r.ok for r in results.values())
        if not hub.accepting:
            checks["server"] = "shutting down"
        return _json(
            {"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    @app.get("/api/collaboration/performance/metrics")
    async def performance_metrics() -> Response:
        user = bearer()
        require(user, "performance_metrics")
        project_id = project_param(user)
        series, server = monitor.recent(project_id), monitor.recent(None)
        firing = [a.to_wire() for a in monitor.engine.firing()
                  if a.project_id in (None, project_id)]  # fmt: skip
        return _json({
            "projectId": project_id,
            "interval": hub.config.metrics_interval,
            "current": series[-1] if series else None,
            "series": series,
            "global": {"current": server[-1] if server else None, "series": server},
            "alerts": firing,
            "health": {name: r.to_wire() for name, r in monitor.health.items()},
        })  # fmt: skip

    @app.post("/api/collaboration/performance/report")
    async def performance_report() -> Response:
        user = bearer()
        require(user, "performance_report")
        data = await body(ReportBody)
        if data.projectId is not None:
            for_project(user, data.projectId)
        start = _timestamp(data.startDate, "body.startDate")
        end = _timestamp(data.endDate, "body.endDate")
        if end <= start:
            raise BadRequest("body.endDate: must be after body.startDate")
        report = await monitor.report(data.projectId, start, end)
        if data.format == "json":
            return _json(report)
        name = f"crealia-report-{data.projectId or 'server'}-{start}-{end}.csv"
        response = Response(_report_csv(report), content_type="text/csv; charset=utf-8")
        response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return response

    @app.get("/api/collaboration/performance/stream")
    async def performance_stream() -> Response:
        user = bearer(query=True)
        require(user, "performance_metrics")
        project_id = project_param(user)

        async def events() -> AsyncIterator[bytes]:
            async with monitor.subscribe(project_id) as news:
                yield b"retry: 2000\n\n"
                while True:
                    with trio.move_on_after(SSE_KEEPALIVE):
                        kind, data = await news.receive()
                        yield b"event: " + kind.encode() + b"\ndata: " + _wire.dumps(data) + b"\n\n"
                        continue
                    yield b": keepalive\n\n"

        response = Response(events(), content_type="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.timeout = None  # type: ignore[assignment]
        return response

    @app.get("/api/projects/<project_id>/snapshot")
    async def snapshot(project_id: str) -> Response:
        user = bearer()
        for_project(user, project_id)
        return _json(await hub.backplane.snapshot(project_id))

    async def body(cls: type[T]) -> T:
        raw = await request.get_data(cache=False, as_text=False)
        try:
            value = orjson.loads(raw or b"{}")
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise BadRequest("body: expected a JSON object")
        return _wire.structure(value, cls, path="body")

    def project_param(user: User) -> str:
        project_id = request.args.get("projectId") or user.project_id
        for_project(user, project_id)
        return project_id

    @app.get("/api/collaboration/conflicts")
    async def list_conflicts() -> Response:
        user = bearer()
        project_id = project_param(user)
        status = request.args.get("status")
        if status not in (None, "pending", "resolved"):
            raise BadRequest("status: must be pending or resolved")
        conflicts = await hub.backplane.conflicts(project_id, status=status)
        return _json({"project_id": project_id,
                      "conflicts": [conflict_view(c) for c in conflicts]})  # fmt: skip

    @app.post("/api/collaboration/conflicts/detect")
    async def detect_conflicts() -> Response:
        user = bearer()
        require(user, "timeline_change")
        data = await body(DetectBody)
        for_project(user, data.projectId or user.project_id)
        change = _wire.TimelineChange(change_id="dry-run", changes=data.changes)
        return _json(await hub.backplane.dry_run(user, change))

    @app.post("/api/collaboration/conflicts/<conflict_id>/resolve")
    async def resolve_conflict(conflict_id: str) -> Response:
        user = bearer()
        require(user, "conflict_resolve")
        data = await body(ResolveBody)
        for_project(user, data.projectId or user.project_id)
        if data.choice == "custom" and data.value is _wire.MISSING:
            raise BadRequest("body.value: is required when choice is 'custom'")
        value = None if data.value is _wire.MISSING else data.value
        seq = await hub.resolve_by_hand(user, conflict_id, data.choice, value,
                                        dismiss=data.dismiss)  # fmt: skip
        return _json({"conflict_id": conflict_id, "seq": seq})

    @app.get("/api/projects/<project_id>/strategies")
    async def get_strategies(project_id: str) -> Response:
        user = bearer()
        for_project(user, project_id)
        chain = await hub.settler.chain(project_id)
        return _json({**chain.to_wire(), "available": hub.settler.registry.names()})

    @app.put("/api/projects/<project_id>/strategies")
    async def set_strategies(project_id: str) -> Response:
        user = bearer()
        for_project(user, project_id)
        if user.role != "owner":
            raise Forbidden(f"setting the strategy chain needs role owner; you are {user.role}")
        data = await body(ChainBody)
        try:
            chain = await hub.settler.set_chain(project_id, data.strategies, data.options)
        except ConfigurationError as exc:
            raise BadRequest(f"body.strategies: {exc}") from None
        return _json({**chain.to_wire(), "available": hub.settler.registry.names()})

    return websocket_route(hub, app)  # type: ignore[arg-type]


#: Seconds between comments sent on an idle live feed, so proxies keep it open.
SSE_KEEPALIVE = 15.0


def _timestamp(value: Any, path: str) -> int:
    """Epoch milliseconds from a number of milliseconds or an ISO 8601 date/time string."""
    if isinstance(value, bool):
        raise BadRequest(f"{path}: expected an ISO 8601 date or epoch milliseconds")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise BadRequest(f"{path}: expected non-negative epoch milliseconds")
        return int(value)
    if isinstance(value, str):
        try:
            moment = datetime.datetime.fromisoformat(value)
        except ValueError:
            raise BadRequest(f"{path}: {value[:40]!r} is not an ISO 8601 date") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        return int(moment.timestamp() * 1000)
    raise BadRequest(f"{path}: expected an ISO 8601 date or epoch milliseconds")


def _report_csv(report: dict[str, Any]) -> bytes:
    """A report as CSV: the metrics table, a blank line, then the alerts table."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["metric", "min", "avg", "p95", "max", "samples"])
    for name, stats in report["metrics"].items():
        writer.writerow([name, stats["min"], stats["avg"], stats["p95"], stats["max"],
                         stats["samples"]])  # fmt: skip
    writer.writerow([])
    columns = ["id", "rule", "level", "state", "projectId", "value", "threshold", "message",
               "startedAt", "resolvedAt"]  # fmt: skip
    writer.writerow(columns)
    for alert in report["alerts"]:
        writer.writerow(["" if alert.get(c) is None else alert[c] for c in columns])
    return out.getvalue().encode()

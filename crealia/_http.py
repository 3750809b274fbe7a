"""The HTTP app (quart-trio): REST API and health endpoints (the server mounts the ``/ws`` route,
``crealia/transports/_asgi.py``, in front of it).

Every error answers ``{"error": {"code", "message"}}`` with the status of its
:class:`~crealia._errors.ProtocolError`.
"""

from __future__ import annotations

import csv
import datetime
import io
import math
import re
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any, Literal, TypeVar

import attrs
import orjson
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from quart import Response, g, has_websocket_context, request, websocket
from quart_trio import QuartTrio

from . import _gdpr, _openapi, _pages, _wire
from ._auth import require
from ._edge import ASGIApp
from ._errors import (
    BadRequest,
    ConfigurationError,
    Forbidden,
    NotFound,
    ProtocolError,
    RateLimited,
    TooLarge,
    Unauthorized,
)
from ._logging import iso_time
from ._metrics import ServerCollector
from ._model import Conflict, User
from ._monitor import Monitor
from ._security import SecurityMonitor
from ._session import DRY_RUN_PREVIEWS as DRY_RUN_PREVIEWS
from ._session import Hub

T = TypeVar("T")


def _json(data: Any, status: int = 200) -> Response:
    return Response(_wire.dumps(data), status=status, content_type="application/json")


def error_response(exc: ProtocolError) -> Response:
    response = _json({"error": exc.to_wire()}, exc.http_status)
    if exc.retry_after_ms is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_ms / 1000)))
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
class RevertBody:
    side: Literal["current", "incoming"] | None = None
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
    ask_when_unsure: bool = False


def conflict_view(conflict: Conflict) -> dict[str, Any]:
    """A conflict as the REST API shows it: the wire object plus when and how it was settled."""
    return {**conflict.to_wire(), "created_at": conflict.created_at,
            "resolution": conflict.resolution}  # fmt: skip


def create_app(hub: Hub, monitor: Monitor, security: SecurityMonitor) -> ASGIApp:
    """The ASGI app served on ``--port``: REST, health, metrics, the OpenAPI document (not
    ``/ws``: the server puts the route in front)."""
    app = QuartTrio("crealia", static_folder=None)  # no static files: no /static route
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    app.config["BODY_TIMEOUT"] = hub.config.http_body_timeout  # the socket's deadline: _edge
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(monitor))
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)

    def bearer(action: str, *, query: bool = False) -> User:
        """The caller, authenticated and allowed ``action`` (REQUIRED_ROLE), within its rate."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if query and not header:
            # EventSource cannot set headers: the live feed also takes ?access_token=.
            scheme, token = "bearer", request.args.get("access_token", "")
        wait = hub.preauth.check(request.remote_addr or "", "rest")
        if wait:
            raise RateLimited(f"too many requests from this address: retry in {wait} ms",
                              retry_after_ms=wait)  # fmt: skip
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing Authorization: Bearer <token> header")
        user = hub.auth.verify(token.strip())
        g.user = user
        require(user, action)
        hub.check_rate(user, "rest")
        return user

    def origin() -> tuple[str, str]:
        return request.remote_addr or "", request.headers.get("User-Agent", "")

    def audit(user: User, action: str, resource: str, details: dict[str, Any]) -> None:
        ip, agent = origin()
        hub.audit.record(action, user_id=user.id, project_id=user.project_id, resource=resource,
                         details=details, ip_address=ip, user_agent=agent)  # fmt: skip

    def for_project(user: User, project_id: str) -> None:
        if user.project_id != project_id:
            raise Forbidden(f"token is for project {user.project_id!r}, not {project_id!r}")

    @app.errorhandler(ProtocolError)
    async def protocol_error(exc: ProtocolError) -> Response:
        user: User | None = g.get("user")
        refused = {Unauthorized: "token_refused", Forbidden: "permission_refused",
                   RateLimited: "rate_limited"}.get(type(exc))  # fmt: skip
        if refused is not None:
            # Aggregated per address, action and user each second: a flood of refusals is one
            # event a second, its details counting them.
            ip, agent = origin()
            hub.audit.refusal(
                refused, user_id=user.id if user else None,
                project_id=user.project_id if user else request.args.get("projectId"),
                resource=f"{request.method} {request.path}", details={"message": exc.message},
                ip_address=ip, user_agent=agent,
            )  # fmt: skip
        return error_response(exc)

    @app.errorhandler(413)
    async def body_too_large(_exc: Exception) -> Response:
        limit = app.config["MAX_CONTENT_LENGTH"]
        return error_response(TooLarge(f"body: larger than {limit} bytes"))

    @app.errorhandler(404)
    async def not_found(_exc: Exception) -> Response:
        if has_websocket_context():  # a WebSocket upgrade to a path that is not /ws
            return error_response(NotFound(f"no WebSocket endpoint at {websocket.path}"))
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
        # What may fail without stopping writes: shown, but the server stays ready.
        degraded = {name: detail for name, detail in hub.backplane.degraded().items() if detail}
        for name, detail in hub.backplane.degraded().items():
            checks.setdefault(name, "ok" if detail is None else f"degraded: {detail}")
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "checks": checks}
        if degraded:
            body["degraded"] = degraded
        return _json(body, 200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    described = _wire.dumps(_openapi.document())

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return Response(described, content_type="application/json")

    @app.get("/api/collaboration/performance/metrics")
    async def performance_metrics() -> Response:
        user = bearer("performance_metrics")
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
        user = bearer("performance_report")
        data = await body(ReportBody)
        if data.projectId is not None:
            for_project(user, data.projectId)
        start = _timestamp(data.startDate, "body.startDate")
        end = _timestamp(data.endDate, "body.endDate")
        if end <= start:
            raise BadRequest("body.endDate: must be after body.startDate")
        report = await monitor.report(data.projectId, start, end)
        audit(user, "export", f"performance:{data.projectId or 'server'}",
              {"startDate": start, "endDate": end, "format": data.format})  # fmt: skip
        if data.format == "json":
            return _json(report)
        name = f"crealia-report-{data.projectId or 'server'}-{start}-{end}.csv"
        return _csv(_report_rows(report), name)

    @app.get("/api/collaboration/performance/stream")
    async def performance_stream() -> Response:
        user = bearer("performance_metrics", query=True)
        project_id = project_param(user)

        async def events() -> AsyncIterator[bytes]:
            async with monitor.subscribe(project_id) as news:
                yield b"retry: 2000\n\n"
                while True:
                    news_item = None
                    with trio.move_on_after(SSE_KEEPALIVE):
                        news_item = await news.receive()
                    # Yield outside the deadline: it must not cover the consumer's write.
                    if news_item is None:
                        yield b": keepalive\n\n"
                    else:
                        kind, data = news_item
                        yield b"event: " + kind.encode() + b"\ndata: " + _wire.dumps(data) + b"\n\n"

        response = Response(events(), content_type="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.timeout = None  # type: ignore[assignment]
        return response

    @app.get("/api/projects/<project_id>/snapshot")
    async def snapshot(project_id: str) -> Response:
        user = bearer("snapshot_read")
        for_project(user, project_id)
        return _json(await hub.backplane.snapshot(project_id))

    async def json_body() -> dict[str, Any]:
        raw = await request.get_data(cache=False, as_text=False)
        try:
            value = orjson.loads(raw or b"{}")
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from None
        where = _wire.big_int_path(raw, value)
        if where is not None:
            sep = "" if where[:1] in ("", "[") else "."
            raise BadRequest(f"body{sep}{where}: {_wire.BIG_INT}")
        if not isinstance(value, dict):
            raise BadRequest("body: expected a JSON object")
        return value

    async def body(cls: type[T]) -> T:
        return _wire.structure(await json_body(), cls, path="body")

    def project_param(user: User) -> str:
        project_id = request.args.get("projectId") or user.project_id
        for_project(user, project_id)
        return project_id

    @app.get("/api/collaboration/conflicts")
    async def list_conflicts() -> Response:
        user = bearer("conflicts_read")
        project_id = project_param(user)
        status = request.args.get("status")
        if status not in (None, "pending", "resolved"):
            raise BadRequest("status: must be pending or resolved")
        conflicts = await hub.backplane.conflicts(project_id, status=status)
        return _json({"project_id": project_id,
                      "conflicts": [conflict_view(c) for c in conflicts]})  # fmt: skip

    @app.get("/api/collaboration/live")
    async def list_live_sessions() -> Response:
        user = bearer("live_read")
        project_id = project_param(user)
        room = hub.rooms.rooms.get(project_id)
        sessions = [] if room is None else [live.details() for live in room.live.open()]
        return _json({"project_id": project_id, "sessions": sessions})

    @app.post("/api/collaboration/conflicts/detect")
    async def detect_conflicts() -> Response:
        user = bearer("conflict_preview")
        data = await body(DetectBody)
        for_project(user, data.projectId or user.project_id)
        return _json(await hub.preview_change(user, data.changes, origin=origin()))

    @app.post("/api/collaboration/conflicts/<conflict_id>/resolve")
    async def resolve_conflict(conflict_id: str) -> Response:
        user = bearer("conflict_resolve")
        data = await body(ResolveBody)
        for_project(user, data.projectId or user.project_id)
        if data.choice == "custom" and data.value is _wire.MISSING:
            raise BadRequest("body.value: is required when choice is 'custom'")
        value = None if data.value is _wire.MISSING else data.value
        seq = await hub.resolve_by_hand(user, conflict_id, data.choice, value,
                                        dismiss=data.dismiss, origin=origin())  # fmt: skip
        return _json({"conflict_id": conflict_id, "seq": seq})

    @app.post("/api/collaboration/conflicts/<conflict_id>/revert")
    async def revert_conflict(conflict_id: str) -> Response:
        user = bearer("conflict_revert")
        data = await body(RevertBody)
        for_project(user, data.projectId or user.project_id)
        ack = await hub.revert_conflict(user, conflict_id, data.side, origin=origin())
        return _json({"conflict_id": conflict_id, **ack})

    @app.get("/api/projects/<project_id>/strategies")
    async def get_strategies(project_id: str) -> Response:
        user = bearer("strategies_read")
        for_project(user, project_id)
        chain = await hub.settler.chain(project_id)
        return _json({**chain.to_wire(), "available": hub.settler.registry.names()})

    @app.put("/api/projects/<project_id>/strategies")
    async def set_strategies(project_id: str) -> Response:
        user = bearer("strategies_write")
        for_project(user, project_id)
        raw = await json_body()
        extra = sorted(set(raw) - {"strategies", "options", "ask_when_unsure"})
        if extra:  # a misspelt "options" must not pass for "no options"
            shown = ", ".join(str(key)[:40] for key in extra[:5])
            raise BadRequest(f"body: unknown fields {shown}; known: strategies, options, "
                             "ask_when_unsure")  # fmt: skip
        data = _wire.structure(raw, ChainBody, path="body")
        try:
            chain = await hub.settler.set_chain(project_id, data.strategies, data.options,
                                                ask_when_unsure=data.ask_when_unsure)  # fmt: skip
        except ConfigurationError as exc:
            raise BadRequest(f"body.strategies: {exc}") from None
        audit(user, "strategy_change", f"project:{project_id}", chain.to_wire())
        return _json({**chain.to_wire(), "available": hub.settler.registry.names()})

    # -- audit, security alerts, GDPR -------------------------------------------------------

    def audit_filters(user: User, source: Any) -> dict[str, Any]:
        """Filters of an audit query, from query arguments or a JSON body (same names)."""
        project_id = source.get("projectId") or user.project_id
        for_project(user, project_id)
        filters: dict[str, Any] = {"project_id": project_id}
        for name, key in (("userId", "user_id"), ("action", "action")):
            value = source.get(name)
            if value is not None and not isinstance(value, str):
                raise BadRequest(f"{name}: expected a string")
            filters[key] = value
        for name, key in (("startDate", "start_ms"), ("endDate", "end_ms")):
            value = source.get(name)
            filters[key] = None if value in (None, "") else _timestamp(value, name)
        limit = source.get("limit", 1000)
        try:
            filters["limit"] = max(1, min(10_000, int(limit)))
        except (TypeError, ValueError):
            raise BadRequest("limit: expected an integer") from None
        return filters

    @app.get("/api/collaboration/audit")
    async def audit_events() -> Response:
        user = bearer("audit_read")
        events = await hub.audit.query(**audit_filters(user, request.args))
        return _json({"projectId": user.project_id, "events": [e.to_wire() for e in events]})

    @app.post("/api/collaboration/audit/export")
    async def audit_export() -> Response:
        user = bearer("audit_export")
        data = await json_body()
        fmt = _format(data)
        events = [e.to_wire() for e in await hub.audit.query(**audit_filters(user, data))]
        audit(user, "export", "audit", {"events": len(events), "format": fmt})
        if fmt == "json":
            return _json({"projectId": user.project_id, "events": events})
        return _csv(_table(events, AUDIT_COLUMNS), f"crealia-audit-{user.project_id}.csv")

    @app.get("/api/collaboration/security/alerts")
    async def security_alerts() -> Response:
        user = bearer("security_alerts_read")
        project_id = project_param(user)
        status = request.args.get("status")
        if status not in (None, "open", "resolved"):
            raise BadRequest("status: must be open or resolved")
        alerts = await security.alerts(project_id, status)
        return _json({"projectId": project_id,
                      "alerts": [a.to_wire(project_id) for a in alerts]})  # fmt: skip

    @app.post("/api/collaboration/security/alerts/<alert_id>/resolve")
    async def resolve_security_alert(alert_id: str) -> Response:
        user = bearer("security_alert_resolve")
        data = await json_body()
        for_project(user, data.get("projectId") or user.project_id)
        note = data.get("note", "")
        if not isinstance(note, str) or len(note) > 2000:
            raise BadRequest("body.note: expected a string of at most 2000 characters")
        alert = await security.resolve(user.project_id, alert_id, by=user.id, note=note)
        audit(user, "alert_resolution", f"security_alert:{alert_id}",
              {"type": alert.type, "note": note})  # fmt: skip
        return _json(alert.to_wire(user.project_id))

    def gdpr_subject(user: User, data: dict[str, Any]) -> str:
        for_project(user, data.get("projectId") or user.project_id)
        subject = data.get("userId")
        if not isinstance(subject, str) or not subject:
            raise BadRequest("body.userId: required, the id of the user")
        return subject

    @app.post("/api/collaboration/gdpr/export")
    async def gdpr_export() -> Response:
        user = bearer("gdpr_export")
        data = await json_body()
        subject, fmt = gdpr_subject(user, data), _format(data)
        stored = await _gdpr.export_user(hub, user.project_id, subject)
        audit(user, "export", f"user:{subject}", {"format": fmt, "kind": "gdpr"})
        export = {"userId": subject, "projectId": user.project_id,
                  "exportedAt": iso_time(time.time()), **stored}  # fmt: skip
        if fmt == "json":
            return _json(export)
        return _csv(_gdpr_rows(export), f"crealia-user-{subject}.csv")

    @app.post("/api/collaboration/gdpr/erase")
    async def gdpr_erase() -> Response:
        user = bearer("gdpr_erase")
        data = await json_body()
        subject = gdpr_subject(user, data)
        pseudonym, counts = await _gdpr.erase_user(hub, security, user.project_id, subject)
        audit(user, "erasure", f"user:{pseudonym}", {"erased": counts})
        return _json({"userId": subject, "pseudonym": pseudonym, "erased": counts})

    _pages.install(app, config=hub.config, auth=hub.auth, audit=hub.audit, json_body=json_body)
    return app  # type: ignore[return-value]


#: 9999-12-31T23:59:59Z in epoch milliseconds: later dates are refused.
_LATEST_MS = 253_402_300_799_000
#: Seconds between comments sent on an idle live feed, so proxies keep it open.
SSE_KEEPALIVE = 15.0


def _timestamp(value: Any, path: str) -> int:
    """Epoch milliseconds from a number of milliseconds or an ISO 8601 date/time string."""
    if isinstance(value, bool):
        raise BadRequest(f"{path}: expected an ISO 8601 date or epoch milliseconds")
    if isinstance(value, int | float):
        if not math.isfinite(value) or not 0 <= value <= _LATEST_MS:
            raise BadRequest(f"{path}: expected epoch milliseconds from 0 to year 9999")
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


REPORT_COLUMNS = ("metric", "min", "avg", "p95", "max", "samples")
ALERT_COLUMNS = ("id", "rule", "level", "state", "projectId", "value", "threshold", "message",
                 "startedAt", "resolvedAt")  # fmt: skip
AUDIT_COLUMNS = ("id", "timestamp", "userId", "projectId", "action", "resource", "severity",
                 "riskScore", "ipAddress", "userAgent", "details")  # fmt: skip


def _format(data: dict[str, Any]) -> str:
    fmt = data.get("format", "json")
    if fmt not in ("json", "csv"):
        raise BadRequest("body.format: must be json or csv")
    return str(fmt)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return _wire.dumps(value).decode()
    return value


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> list[list[Any]]:
    return [list(columns)] + [[_cell(row.get(c)) for c in columns] for row in rows]


def _gdpr_rows(export: dict[str, Any]) -> list[list[Any]]:
    """A user's export as one CSV table: one row per stored item, its data as JSON."""
    rows: list[list[Any]] = [["kind", "id", "seq", "at", "data"]]
    for kind, key in (("comment", "comments"), ("edit", "edits"), ("conflict", "conflicts"),
                      ("audit", "audit")):  # fmt: skip
        for item in export[key]:
            ident = item.get("id") or item.get("payload", {}).get("change_id", "")
            at = item.get("at") or item.get("timestamp") or item.get("created_at")
            rows.append([kind, ident, _cell(item.get("seq")), _cell(at), _cell(item)])
    return rows


#: What a spreadsheet takes for the start of a formula (OWASP, "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: a string starting with ``= + - @``, a tab
    or a carriage return gets a leading ``'`` (OWASP's advice), so that a user agent or an id
    chosen by a client never runs as a formula in an owner's spreadsheet."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _csv(rows: list[list[Any]], filename: str) -> Response:
    """Every CSV the server writes goes through here: each cell made :func:`csv_safe`."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([[csv_safe(c) for c in row] for row in rows])
    response = Response(out.getvalue().encode(), content_type="text/csv; charset=utf-8")
    response.headers["Content-Disposition"] = _attachment(filename)
    return response


def _attachment(filename: str) -> str:
    """A ``Content-Disposition`` naming ``filename``, whatever ids it holds: an ASCII
    ``filename`` (other characters made ``_``) and the exact name as RFC 6266's ``filename*``."""
    plain = re.sub(r"[^A-Za-z0-9._-]", "_", filename)
    if plain == filename:
        return f'attachment; filename="{filename}"'
    exact = urllib.parse.quote(filename, safe="")
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{exact}"


def _report_rows(report: dict[str, Any]) -> list[list[Any]]:
    """A report as CSV rows: the metrics table, an empty row, then the alerts table."""
    metrics = [{"metric": name, **stats} for name, stats in report["metrics"].items()]
    return [*_table(metrics, REPORT_COLUMNS), [], *_table(report["alerts"], ALERT_COLUMNS)]

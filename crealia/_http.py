"""The HTTP app (quart-trio): REST API, health endpoints, and the ``/ws`` route in front of it.

Every error answers ``{"error": {"code", "message"}}`` with the status of its
:class:`~crealia._errors.ProtocolError`.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import attrs
import orjson
from quart import Response, request
from quart_trio import QuartTrio

from . import _wire
from ._auth import User, require
from ._backplane import Conflict
from ._errors import (
    BadRequest,
    ConfigurationError,
    CrealiaError,
    Forbidden,
    NotFound,
    ProtocolError,
    Unauthorized,
)
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
class ChainBody:
    strategies: list[str]
    options: dict[str, dict[str, Any]] = attrs.Factory(dict)


def conflict_view(conflict: Conflict) -> dict[str, Any]:
    """A conflict as the REST API shows it: the wire object plus when and how it was settled."""
    return {**conflict.to_wire(), "created_at": conflict.created_at,
            "resolution": conflict.resolution}  # fmt: skip


def create_app(hub: Hub) -> ASGIApp:
    """The ASGI app served on ``--port``: REST, health, and the ``/ws`` WebSocket route."""
    app = QuartTrio("crealia")
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024

    def bearer() -> User:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
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
        checks: dict[str, str] = {}
        ok = hub.accepting
        try:
            await hub.backplane.check()
            checks["storage"] = "ok"
        except CrealiaError as exc:
            checks["storage"] = f"failing: {exc}"
            ok = False
        if not hub.accepting:
            checks["server"] = "shutting down"
        return _json(
            {"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503
        )

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

"""The HTTP app (quart-trio): REST API, health endpoints, and the ``/ws`` route in front of it.

Every error answers ``{"error": {"code", "message"}}`` with the status of its
:class:`~crealia._errors.ProtocolError`.
"""

from __future__ import annotations

from typing import Any

from quart import Response, request
from quart_trio import QuartTrio

from . import _wire
from ._auth import User
from ._errors import CrealiaError, Forbidden, NotFound, ProtocolError, Unauthorized
from ._session import Hub
from .transports._asgi import ASGIApp, websocket_route


def _json(data: Any, status: int = 200) -> Response:
    return Response(_wire.dumps(data), status=status, content_type="application/json")


def error_response(exc: ProtocolError) -> Response:
    response = _json({"error": {"code": exc.code, "message": exc.message}}, exc.http_status)
    if exc.retry_after_ms is not None:
        response.headers["Retry-After"] = str(max(1, round(exc.retry_after_ms / 1000)))
    return response


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

    return websocket_route(hub, app)  # type: ignore[arg-type]

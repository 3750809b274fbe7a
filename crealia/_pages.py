"""The faces of the HTTP app: the browser client, the pages, CORS and the ``--dev`` helpers.

What it serves (docs/protocol.md §9):

- ``/crealia.js`` (the browser client, one ES module), ``/crealia.d.ts`` (its types) and
  ``/crealia-react.js`` (the React hook); ``/`` (landing), ``/demo``, ``/dashboard`` and
  ``/security``; ``/static/<name>`` for the other files of ``crealia/static`` (styles, the
  pages' scripts). Every file is read once, when the app is made (``--dev`` reads a file again
  when it changed on disk); answers carry an ``ETag`` and revalidate (``Cache-Control:
  no-cache``). Pages are served under a Content-Security-Policy that admits nothing from
  another origin and no inline script or style.
- ``GET /api/info``: what is running (name, version, protocol, dev mode, uptime), no token.
- ``POST /api/dev/token`` (``--dev`` only, 404 otherwise): a token for a chosen user, project
  and role, so the pages can be tried without the CLI. Audited as ``dev_token``.

CORS: the REST API (and its live feed) answers cross-origin requests from the origins the
WebSocket accepts by setting (``allowed_origins``; under ``--dev`` also ``http://localhost:*``
and ``http://127.0.0.1:*``), never by ``Host``: a preflight (``OPTIONS`` with
``Access-Control-Request-Method``) from such an origin gets 204 with the methods and headers
allowed; from another origin 403 naming the origin and the setting. Credentials (cookies) are
never allowed: the API takes Bearer tokens.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
from quart import Quart, Response, request

from . import _wire
from ._errors import BadRequest, Forbidden, NotFound
from ._model import ROLES, Role
from ._origin import ALLOW_HINT, OriginPolicy, shown_origin
from ._version import __version__

log = logging.getLogger("crealia.http")

STATIC_DIR = Path(__file__).parent / "static"

#: Paths that serve a page, and the file each serves.
PAGES = {"/": "index.html", "/demo": "demo.html", "/dashboard": "dashboard.html",
         "/security": "security.html", "/favicon.ico": "favicon.svg"}  # fmt: skip
#: Files served at the root (the client's import paths are part of the contract).
ROOT_FILES = ("crealia.js", "crealia.d.ts", "crealia-react.js")

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".ts": "text/plain; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}
#: A file name ``/static/`` serves: no directories, no dot files.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")

#: The policy every served file carries: this origin only, no inline script or style (the
#: WebSocket is ``ws://`` on the same host; CSP 3 ``'self'`` covers it, ``ws:`` spells it out
#: for older browsers), media from the camera or the peer, never framed.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob: mediastream:; connect-src 'self' ws: wss:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
    "Permissions-Policy": "camera=(self), microphone=(self), display-capture=(self)",
}

#: What a CORS preflight is told is allowed.
CORS_METHODS = "GET, POST, PUT, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, Accept"
#: Response headers a cross-origin page may read.
CORS_EXPOSE = "Retry-After, Content-Disposition"
#: Seconds a browser may cache a preflight.
CORS_MAX_AGE = 600

#: Lifetimes ``/api/dev/token`` accepts, in seconds.
DEV_TOKEN_TTL = (60.0, 7 * 86400.0)


@attrs.define
class _File:
    path: Path
    content_type: str
    body: bytes = b""
    etag: str = ""
    mtime_ns: int = -1

    def load(self) -> None:
        stat = self.path.stat()
        if stat.st_mtime_ns != self.mtime_ns:
            self.body = self.path.read_bytes()
            self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'
            self.mtime_ns = stat.st_mtime_ns


class StaticFiles:
    """The files of ``crealia/static``, read into memory once (again on change when ``reload``)."""

    def __init__(self, directory: Path = STATIC_DIR, *, reload: bool = False) -> None:
        self.reload = reload
        self.files: dict[str, _File] = {}
        if directory.is_dir():
            for path in sorted(directory.iterdir()):
                kind = _TYPES.get(path.suffix)
                if path.is_file() and kind and _NAME.fullmatch(path.name):
                    self.files[path.name] = _File(path, kind)
                    self.files[path.name].load()

    def response(self, name: str) -> Response:
        """The file ``name`` (304 when the browser holds it already).

        Raises:
            NotFound: no such file.
        """
        found = self.files.get(name)
        if found is None:
            raise NotFound(f"no such file: {name[:100]}")
        if self.reload:
            # --dev only: a developer editing the pages sees the change on reload.
            try:
                found.load()
            except OSError as exc:
                raise NotFound(f"{name}: {exc.strerror}") from None
        if request.headers.get("If-None-Match") == found.etag:
            response = Response(b"", status=304)
        else:
            response = Response(found.body, content_type=found.content_type)
        response.headers.update(_HEADERS)
        response.headers["ETag"] = found.etag
        return response


def install(
    app: Quart,
    *,
    config: Any,
    auth: Any,
    audit: Any,
    json_body: Callable[[], Awaitable[dict[str, Any]]],
) -> None:
    """Add the pages, the client files, ``/api/info``, ``/api/dev/token`` and CORS to ``app``.

    ``config`` is the server's :class:`~crealia.Config`, ``auth`` its token verifier (which
    can issue tokens), ``audit`` its audit log, ``json_body`` the app's reader of a request's
    JSON object (``BadRequest`` naming what is wrong).
    """
    static = StaticFiles(reload=config.dev)
    origins = OriginPolicy.from_origins(config.allowed_origins, dev=config.dev)
    started = time.time()

    def page(name: str) -> Any:
        async def serve() -> Response:
            return static.response(name)

        serve.__name__ = "page_" + re.sub(r"\W", "_", name)
        return serve

    for path, name in PAGES.items():
        app.add_url_rule(path, view_func=page(name), methods=["GET"])
    for name in ROOT_FILES:
        app.add_url_rule("/" + name, view_func=page(name), methods=["GET"])

    @app.get("/static/<name>")
    async def static_file(name: str) -> Response:
        if name in PAGES.values():
            raise NotFound(f"no such file: {name}")  # pages have their own paths
        return static.response(name)

    @app.get("/api/info")
    async def info() -> Response:
        return _json({"name": "crealia", "version": __version__, "protocol": 1,
                      "dev": bool(config.dev), "uptime_s": round(time.time() - started, 1),
                      "started_at": int(started * 1000), "websocket": "/ws"})  # fmt: skip

    @app.post("/api/dev/token")
    async def dev_token() -> Response:
        if not config.dev:
            await request.get_data(cache=False)  # past the size limit: 413, as everywhere
            raise NotFound("no such endpoint: POST /api/dev/token (it needs crealia serve --dev)")
        data = await json_body()
        user = _ident(data, "user")
        project = _ident(data, "project")
        role = data.get("role")
        if role not in ROLES:
            raise BadRequest(f"body.role: must be one of {', '.join(ROLES)}")
        name = data.get("name", user)
        if not isinstance(name, str) or not 0 < len(name.strip()) <= 64:
            raise BadRequest("body.name: expected a name of 1 to 64 characters")
        ttl = data.get("ttl", 3600 * 8)
        low, high = DEV_TOKEN_TTL
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not low <= ttl <= high:
            raise BadRequest(f"body.ttl: expected seconds from {low:.0f} to {high:.0f}")
        chosen: Role = role
        token = auth.issue(user_id=user, project_id=project, role=chosen, name=name.strip(),
                           ttl=float(ttl))  # fmt: skip
        audit.record("dev_token", user_id=user, project_id=project, resource=f"user:{user}",
                     details={"role": role}, ip_address=request.remote_addr or "",
                     user_agent=request.headers.get("User-Agent", ""))  # fmt: skip
        claims = {"sub": user, "name": name.strip(), "project": project, "role": role,
                  "exp": int(time.time() + ttl)}  # fmt: skip
        return _json({"token": token, "claims": claims})

    @app.before_request
    async def preflight() -> Response | None:
        origin = request.headers.get("Origin")
        if request.method != "OPTIONS" or origin is None:
            return None
        if not request.headers.get("Access-Control-Request-Method"):
            return None
        if not origins.listed(origin):
            log.warning("refused a CORS preflight from origin %s for %s: %s",
                        shown_origin(origin), request.path, ALLOW_HINT)  # fmt: skip
            exc = Forbidden(f"origin not allowed: {shown_origin(origin)} ({ALLOW_HINT})")
            return _json({"error": exc.to_wire()}, exc.http_status)
        response = Response(b"", status=204)
        response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
        response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
        response.headers["Access-Control-Max-Age"] = str(CORS_MAX_AGE)
        return response

    @app.after_request
    async def cors(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin is not None and origins.listed(origin):
            # It must repeat the origin as the browser sent it.
            response.headers["Access-Control-Allow-Origin"] = origin.strip()
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
        response.vary.add("Origin")
        return response


def _ident(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not _wire.ID_PATTERN.fullmatch(value):
        raise BadRequest(
            f"body.{key}: expected an id of 1 to 64 letters, digits and _ . : @ - "
            "(starting with a letter or digit)"
        )
    return value


def _json(data: Any, status: int = 200) -> Response:
    return Response(_wire.dumps(data), status=status, content_type="application/json")

"""Tokens and roles: HS256 JWTs, the jwt secret's home, and the role matrix of PROTOCOL.md §4."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any, Literal

import attrs
import jwt

from ._errors import ConfigurationError, Forbidden, Unauthorized

Role = Literal["owner", "editor", "commenter", "viewer"]
ROLES: tuple[Role, ...] = ("viewer", "commenter", "editor", "owner")
_RANK = {role: rank for rank, role in enumerate(ROLES)}

#: The least role each client event needs (PROTOCOL.md §4). ``live_stop`` also needs to be the
#: session's host and ``webrtc_signal``/``stream_stats`` a session member: checked where handled.
REQUIRED_ROLE: dict[str, Role] = {
    "cursor_update": "viewer",
    "element_active": "viewer",
    "typing_start": "commenter",
    "typing_stop": "commenter",
    "comment_add": "commenter",
    "timeline_change": "editor",
    "conflict_resolve": "editor",
    "conflict_dismiss": "editor",
    "users_request": "viewer",
    "ping": "viewer",
    "live_start": "editor",
    "live_join": "viewer",
    "live_leave": "viewer",
    "live_stop": "viewer",
    "webrtc_signal": "viewer",
    "stream_stats": "viewer",
    "metrics_subscribe": "owner",
    "metrics_unsubscribe": "owner",
    # REST actions beside the WebSocket messages, checked with require() the same way.
    "performance_metrics": "owner",
    "performance_report": "owner",
}

SECRET_FILE = "jwt-secret"  # noqa: S105 - a file name, not a secret


@attrs.frozen(kw_only=True)
class User:
    """An authenticated caller: who, in which project, with which role."""

    id: str
    name: str
    role: Role
    project_id: str

    def to_wire(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "role": self.role}


def allows(role: Role, action: str) -> bool:
    """Whether ``role`` may perform the client event ``action``."""
    needed = REQUIRED_ROLE.get(action)
    return needed is not None and _RANK[role] >= _RANK[needed]


def require(user: User, action: str) -> None:
    """Raises:
    Forbidden: ``user``'s role does not allow ``action``.
    """
    if not allows(user.role, action):
        needed = REQUIRED_ROLE.get(action, "owner")
        raise Forbidden(f"{action} needs role {needed} or higher; you are {user.role}")


def load_or_create_secret(data_dir: Path) -> str:
    """The jwt secret kept in ``data_dir`` (mode 0600), created on first use.

    Raises:
        ConfigurationError: the data dir cannot be created or the file read.
    """
    path = Path(data_dir) / SECRET_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from exc
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(48)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot create {path}: {exc}") from exc
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


@attrs.define
class TokenAuthority:
    """Issues and checks HS256 tokens with one secret."""

    secret: str
    leeway: float = 5.0

    def issue(
        self,
        *,
        user_id: str,
        project_id: str,
        role: Role,
        name: str | None = None,
        ttl: float = 3600.0,
        now: float | None = None,
    ) -> str:
        """A signed token with the claims of PROTOCOL.md §1."""
        if role not in _RANK:
            raise ConfigurationError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "sub": user_id,
            "name": name or user_id,
            "project": project_id,
            "role": role,
            "iat": issued,
            "exp": issued + int(ttl),
        }
        return jwt.encode(claims, self.secret, algorithm="HS256")

    def verify(self, token: str, project_id: str | None = None) -> User:
        """Check a token's signature, expiry and claims.

        Args:
            project_id: when given, the token must be for this project.

        Raises:
            Unauthorized: forged, expired, malformed, or for another project.
        """
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=["HS256"],
                leeway=self.leeway,
                options={"require": ["sub", "project", "role", "exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        sub, project, role = claims.get("sub"), claims.get("project"), claims.get("role")
        name = claims.get("name", sub)
        if not (
            isinstance(sub, str)
            and sub
            and isinstance(project, str)
            and project
            and isinstance(role, str)
        ):
            raise Unauthorized("invalid token: sub, project and role must be strings")
        if role not in _RANK:
            raise Unauthorized(f"invalid token: unknown role {role!r}")
        if not isinstance(name, str):
            name = str(sub)
        if project_id is not None and project != project_id:
            raise Unauthorized("token is for another project")
        return User(id=sub, name=name[:128], role=role, project_id=project)

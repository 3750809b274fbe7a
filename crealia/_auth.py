"""Tokens and roles: JWTs (HS256 secrets, RS256/ES256 public keys, rotation by ``kid``), the jwt
secret's home, and the role matrix of docs/protocol.md §4."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import attrs
import jwt

from ._errors import ConfigurationError, Forbidden, Unauthorized
from ._model import ROLES, Role, User
from ._protocol import PROTOCOL
from ._wire import id_problem

_RANK = {role: rank for rank, role in enumerate(ROLES)}

#: The least role of each REST action that is not also a client message (docs/protocol.md §14,
#: §16); the messages' roles are in the protocol table (crealia._protocol), which REST calls
#: doing what a message does (``conflict_resolve``) share.
REST_ROLES: Mapping[str, Role] = MappingProxyType({
    "snapshot_read": "viewer",
    "conflicts_read": "viewer",
    "live_read": "viewer",
    "strategies_read": "viewer",
    "strategies_write": "owner",
    "performance_metrics": "owner",
    "performance_report": "owner",
    "audit_read": "owner",
    "audit_export": "owner",
    "security_alerts_read": "owner",
    "security_alert_resolve": "owner",
    "gdpr_export": "owner",
    "gdpr_erase": "owner",
})  # fmt: skip

#: The least role of every action, client messages (from the protocol table) and REST actions.
#: ``live_stop`` also needs to be the session's host and ``webrtc_signal``/``stream_stats`` a
#: session member: checked where handled.
REQUIRED_ROLE: Mapping[str, Role] = MappingProxyType(
    {
        **{name: entry.role for name, entry in PROTOCOL.items() if entry.role is not None},
        **REST_ROLES,
    }
)

SECRET_FILE = "jwt-secret"  # noqa: S105 - a file name, not a secret


def allows(role: Role, action: str) -> bool:
    """Whether ``role`` may perform ``action`` (a client message type or a REST action)."""
    needed = REQUIRED_ROLE.get(action)
    return needed is not None and _RANK[role] >= _RANK[needed]


def require(user: User, action: str) -> None:
    """Check ``user`` may perform ``action`` (a client message type or a REST action; an
    unknown one needs more than any role).

    Raises:
        Forbidden: ``user``'s role does not allow ``action``.
    """
    if not allows(user.role, action):
        raise _refused(user, action, REQUIRED_ROLE.get(action, "owner"))


def require_role(user: User, action: str, needed: Role) -> None:
    """Check ``user``'s role is at least ``needed`` for ``action`` (the role a protocol table's
    entry names).

    Raises:
        Forbidden: ``user``'s role ranks below ``needed``.
    """
    if _RANK[user.role] < _RANK[needed]:
        raise _refused(user, action, needed)


def _refused(user: User, action: str, needed: Role) -> Forbidden:
    return Forbidden(f"{action} needs role {needed} or higher; you are {user.role}")


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


#: Every algorithm a key may be used with, by kind of key. ``none`` is never accepted.
_FAMILIES: dict[str, tuple[str, ...]] = {
    "secret": ("HS256", "HS384", "HS512"),
    "RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    "EC secp256r1": ("ES256",),
    "EC secp384r1": ("ES384",),
    "EC secp521r1": ("ES512",),
    "Ed25519": ("EdDSA",),
    "Ed448": ("EdDSA",),
}
#: The algorithms accepted when ``jwt_algorithms`` is empty: HS256 for secrets, RS256 for RSA
#: keys, ES256 for EC P-256 keys.
DEFAULT_ALGORITHMS: tuple[str, ...] = ("HS256", "RS256", "ES256")
SUPPORTED_ALGORITHMS: tuple[str, ...] = tuple(
    dict.fromkeys(alg for algs in _FAMILIES.values() for alg in algs)
)
_CLAIMS = ("sub", "project", "role", "exp")


def check_algorithms(algorithms: Iterable[str]) -> tuple[str, ...]:
    """``algorithms`` as a tuple, each one supported.

    Raises:
        ConfigurationError: ``none`` or an unknown name.
    """
    checked: list[str] = []
    for alg in algorithms:
        if not isinstance(alg, str) or alg not in SUPPORTED_ALGORITHMS:
            hint = " (unsigned tokens are never accepted)" if str(alg).lower() == "none" else ""
            raise ConfigurationError(
                f"jwt_algorithms: {alg!r} is not supported{hint}; expected some of "
                f"{', '.join(SUPPORTED_ALGORITHMS)}"
            )
        checked.append(alg)
    return tuple(dict.fromkeys(checked))


def parse_key_map(name: str, raw: str) -> dict[str, str]:
    """An environment variable holding a JSON object ``{"kid": "value"}``.

    Raises:
        ConfigurationError: not a JSON object of strings (the message never shows the value,
            which may hold secrets).
    """
    try:
        value = json.loads(raw)
    except ValueError:
        raise ConfigurationError(f"{name}: expected a JSON object of key id to key") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigurationError(f"{name}: expected a JSON object of key id to key (strings)")
    return value


def parse_public_keys_env(raw: str) -> dict[str, str]:
    """``CREALIA_JWT_PUBLIC_KEYS``: a JSON object (key id to PEM text or a PEM file's path), or
    the path of one PEM file (a key without id).

    Raises:
        ConfigurationError: a malformed JSON object.
    """
    if raw.lstrip().startswith("{"):
        return parse_key_map("CREALIA_JWT_PUBLIC_KEYS", raw)
    return {"": raw.strip()}


def _read_pem(kid: str, value: str, base: Path | None) -> bytes:
    """PEM text as given, or read from the file ``value`` names (relative to ``base``)."""
    if value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    path = Path(value).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"jwt key {kid!r}: cannot read {path}: {exc.strerror}") from None


def _load_public_key(kid: str, value: str, base: Path | None = None) -> Any:
    """A public key (or the key of an X.509 certificate) from PEM text or a PEM file."""
    pem = _read_pem(kid, value, base)
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:  # pragma: no cover - cryptography is installed with crealia
        raise ConfigurationError("jwt public keys need the cryptography package") from None
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            return x509.load_pem_x509_certificate(pem).public_key()
        return load_pem_public_key(pem)
    except (ValueError, TypeError):
        # Never echo the text: a private key pasted here by mistake must not reach a log.
        hint = " (a private key? configure its public half)" if b"PRIVATE" in pem else ""
        raise ConfigurationError(
            f"jwt key {kid!r}: not a PEM public key or certificate{hint}"
        ) from None


def _key_kind(key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"EC {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey | ed448.Ed448PrivateKey):
        return "Ed448"
    return type(key).__name__


def _read_keys_file(path: Path) -> dict[str, str]:
    """``jwt_keys_file``: a JSON object (key id to PEM text or a path relative to the file), or
    one PEM public key (a key without id). Paths come back absolute."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"jwt_keys_file: cannot read {path}: {exc}") from None
    if text.lstrip().startswith("-----BEGIN"):
        return {"": text}
    keys = parse_key_map(f"jwt_keys_file {path}", text)
    base = path.parent
    return {
        kid: value if value.lstrip().startswith("-----BEGIN") else str(base / Path(value))
        for kid, value in keys.items()
    }


def keys_file_path(value: str | Path | None) -> Path | None:
    """The ``jwt_keys_file`` setting as a path."""
    return None if value is None else Path(value)


class JwtSettings(Protocol):
    """The JWT settings this module reads from a configuration (:class:`crealia.Config` has
    them; naming only these keeps the configuration module above this one)."""

    @property
    def jwt_secret(self) -> str | None: ...
    @property
    def jwt_secrets(self) -> Mapping[str, str]: ...
    @property
    def jwt_public_keys(self) -> Mapping[str, str]: ...
    @property
    def jwt_keys_file(self) -> str | Path | None: ...
    @property
    def jwt_leeway(self) -> float: ...
    @property
    def jwt_algorithms(self) -> tuple[str, ...]: ...


def has_configured_keys(config: JwtSettings) -> bool:
    """Whether ``config`` names keys of its own (then no generated secret is used)."""
    return bool(
        config.jwt_secret or config.jwt_secrets or config.jwt_public_keys or config.jwt_keys_file
    )


def check_config(config: JwtSettings, _attribute: Any = None, _value: Any = None) -> None:
    """Validate the JWT settings of ``config`` (an attrs validator of :class:`Config`): the
    algorithms, and that every key loads and fits one of them.

    Raises:
        ConfigurationError: naming the setting or key id at fault.
    """
    TokenAuthority.from_config(config)


@attrs.frozen
class _Key:
    kid: str | None
    kind: str
    material: Any = attrs.field(repr=False)
    algorithms: tuple[str, ...]

    def describe(self) -> str:
        return "the default key" if self.kid is None else f"key {self.kid!r}"


def token_claims(
    *,
    user_id: str,
    project_id: str,
    role: Role,
    name: str | None = None,
    ttl: float = 3600.0,
    now: float | None = None,
) -> dict[str, Any]:
    """The claims of docs/protocol.md §1 for a new token.

    Raises:
        ConfigurationError: an unknown role.
    """
    if role not in _RANK:
        raise ConfigurationError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    for what, value in (("user id", user_id), ("project id", project_id)):
        problem = id_problem(value) if value else "must not be empty"
        if problem is not None:
            raise ConfigurationError(f"{what} {value!r} {problem}")
    issued = int(time.time() if now is None else now)
    return {
        "sub": user_id,
        "name": name or user_id,
        "project": project_id,
        "role": role,
        "iat": issued,
        "exp": issued + int(ttl),
    }


def sign_token(
    claims: dict[str, Any], key: Any, *, algorithm: str = "HS256", kid: str | None = None
) -> str:
    """A JWT of ``claims`` signed with ``key`` (an HMAC secret, or a private key object or PEM)
    under ``algorithm``, carrying ``kid`` in its header when given.

    Raises:
        ConfigurationError: the key does not fit the algorithm, or the algorithm is unknown.
    """
    check_algorithms([algorithm])
    headers = {"kid": kid} if kid is not None else None
    try:
        return jwt.encode(claims, key, algorithm=algorithm, headers=headers)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"cannot sign with {algorithm}: {type(exc).__name__}") from None


def load_private_key(path: Path) -> Any:
    """A private key from an unencrypted PEM file, for signing tokens.

    Raises:
        ConfigurationError: unreadable, encrypted, or not a private key.
    """
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the private key {path}: {exc.strerror}") from None
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        return load_pem_private_key(pem, password=None)
    except TypeError:
        raise ConfigurationError(f"{path}: encrypted private keys are not supported") from None
    except ValueError:
        raise ConfigurationError(f"{path}: not a PEM private key") from None


def default_algorithm(key: Any) -> str:
    """The algorithm a private key signs with by default: RS256 for RSA, ES256/384/512 by
    curve, EdDSA for Edwards keys.

    Raises:
        ConfigurationError: a kind of key JWTs cannot use.
    """
    kind = _key_kind(key)
    family = _FAMILIES.get(kind)
    if family is None:
        raise ConfigurationError(f"a {kind} key cannot sign JWTs")
    return family[0]


@attrs.define
class TokenAuthority:
    """Issues and checks tokens.

    Verification keys, each selected by the ``kid`` of a token's header:

    - ``secret``: the HS256 secret of tokens without ``kid``;
    - ``secrets``: more HMAC secrets by key id (several at once while keys rotate);
    - ``public_keys``: public keys by key id, as PEM text or a PEM file's path (RSA keys verify
      RS256, EC P-256 keys ES256; ``algorithms`` widens or narrows that). The id ``""`` is a key
      for tokens without ``kid``.

    A token without ``kid`` is checked with ``secret`` (or the ``""`` key), else with the only
    key there is. Each key accepts only the algorithms of its own kind among ``algorithms``
    (empty: :data:`DEFAULT_ALGORITHMS`): a public key is never taken for an HMAC secret, and
    unsigned tokens are never accepted.

    Raises:
        ConfigurationError: (when built) an unknown algorithm, a key that cannot be read or
            fits no allowed algorithm, the same key id twice.
    """

    secret: str | None = attrs.field(default=None, repr=False)
    leeway: float = 5.0
    secrets: Mapping[str, str] = attrs.field(factory=dict, kw_only=True, repr=False)
    public_keys: Mapping[str, str] = attrs.field(factory=dict, kw_only=True, repr=False)
    algorithms: tuple[str, ...] = attrs.field(default=(), kw_only=True, converter=check_algorithms)
    #: Where relative paths in ``public_keys`` start (default: the working directory).
    key_dir: Path | None = attrs.field(default=None, kw_only=True)
    _keys: dict[str | None, _Key] = attrs.field(init=False, factory=dict, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.leeway < 0:
            raise ConfigurationError(f"jwt_leeway must not be negative, got {self.leeway}")
        allowed = self.algorithms or DEFAULT_ALGORITHMS
        entries: list[tuple[str | None, str, Any]] = []
        if self.secret:
            entries.append((None, "secret", self.secret))
        for kid, secret in self.secrets.items():
            if not isinstance(kid, str) or not isinstance(secret, str) or not secret:
                raise ConfigurationError(f"jwt_secrets: key {kid!r} needs a non-empty string")
            entries.append((kid or None, "secret", secret))
        for kid, value in self.public_keys.items():
            if not isinstance(kid, str) or not isinstance(value, str):
                raise ConfigurationError(f"jwt_public_keys: key {kid!r} needs a string")
            key = _load_public_key(kid, value, self.key_dir)
            entries.append((kid or None, _key_kind(key), key))
        for key_id, kind, material in entries:
            shown = "the key without id" if key_id is None else f"key id {key_id!r}"
            if key_id in self._keys:
                raise ConfigurationError(f"jwt: {shown} is configured twice")
            algorithms = tuple(a for a in _FAMILIES.get(kind, ()) if a in allowed)
            if not algorithms:
                raise ConfigurationError(
                    f"jwt: {shown} ({kind}) fits none of the allowed algorithms "
                    f"{', '.join(allowed)}; set jwt_algorithms"
                )
            self._keys[key_id] = _Key(
                kid=key_id, kind=kind, material=material, algorithms=algorithms
            )

    @classmethod
    def from_config(cls, config: JwtSettings, fallback_secret: str | None = None) -> TokenAuthority:
        """The authority of ``config``'s JWT settings.

        Args:
            fallback_secret: the kid-less secret when ``config`` names no key at all (the
                secret generated in the data dir).

        Raises:
            ConfigurationError: as the constructor; an unreadable ``jwt_keys_file``.
        """
        public_keys = dict(config.jwt_public_keys)
        if config.jwt_keys_file is not None:
            for kid, value in _read_keys_file(Path(config.jwt_keys_file)).items():
                if kid in public_keys:
                    raise ConfigurationError(
                        f"jwt: key id {kid!r} is in both jwt_public_keys and jwt_keys_file"
                    )
                public_keys[kid] = value
        secret = config.jwt_secret
        if not has_configured_keys(config):
            secret = fallback_secret
        return cls(
            secret,
            leeway=config.jwt_leeway,
            secrets=dict(config.jwt_secrets),
            public_keys=public_keys,
            algorithms=config.jwt_algorithms,
        )

    @property
    def key_ids(self) -> list[str | None]:
        """The configured key ids (``None``: the key for tokens without ``kid``)."""
        return list(self._keys)

    def issue(
        self,
        *,
        user_id: str,
        project_id: str,
        role: Role,
        name: str | None = None,
        ttl: float = 3600.0,
        now: float | None = None,
        kid: str | None = None,
    ) -> str:
        """A token with the claims of docs/protocol.md §1, signed HS256 with the secret of ``kid``
        (``None``: ``secret``, and no ``kid`` in the header).

        Raises:
            ConfigurationError: an unknown role; no secret for ``kid`` (public keys cannot
                sign: use :func:`sign_token` with the private key).
        """
        claims = token_claims(
            user_id=user_id, project_id=project_id, role=role, name=name, ttl=ttl, now=now
        )
        key = self._keys.get(kid)
        if key is None or key.kind != "secret":
            shown = "without a key id" if kid is None else f"with key id {kid!r}"
            raise ConfigurationError(f"no HMAC secret to sign tokens {shown}")
        algorithm = "HS256" if "HS256" in key.algorithms else key.algorithms[0]
        return sign_token(claims, key.material, algorithm=algorithm, kid=kid)

    def _key_for(self, kid: str | None) -> _Key:
        if kid is not None:
            key = self._keys.get(kid)
            if key is None:
                raise Unauthorized(f"invalid token: unknown key id {kid[:64]!r}")
            return key
        key = self._keys.get(None)
        if key is None and len(self._keys) == 1:
            key = next(iter(self._keys.values()))
        if key is None:
            raise Unauthorized("invalid token: no kid in its header, and no default key")
        return key

    def verify(self, token: str, project_id: str | None = None) -> User:
        """Check a token's key, algorithm, signature, time claims (within ``leeway``) and
        claims.

        Args:
            project_id: when given, the token must be for this project.

        Raises:
            Unauthorized: unknown key id, an algorithm its key does not allow, forged,
                expired, not yet valid, malformed, or for another project. The message never
                shows key material.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        kid, alg = header.get("kid"), header.get("alg")
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("invalid token: kid must be a string")
        key = self._key_for(kid)
        if not isinstance(alg, str) or alg not in key.algorithms:
            raise Unauthorized(
                f"invalid token: algorithm {str(alg)[:16]!r} is not allowed for "
                f"{key.describe()} (allowed: {', '.join(key.algorithms)})"
            )
        try:
            claims = jwt.decode(
                token,
                key.material,
                algorithms=[alg],
                leeway=self.leeway,
                options={"require": list(_CLAIMS)},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("token not yet valid") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("invalid token: bad signature") from None
        except jwt.InvalidKeyError:
            raise Unauthorized(f"invalid token: {key.describe()} cannot check {alg}") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        except (ValueError, TypeError):
            raise Unauthorized("invalid token: malformed") from None
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
        for claim, value in (("sub", sub), ("project", project)):
            problem = id_problem(value)
            if problem is not None:
                raise Unauthorized(f"invalid token: {claim} {problem}")
        if not isinstance(name, str):
            name = str(sub)
        if project_id is not None and project != project_id:
            raise Unauthorized("token is for another project")
        return User(id=sub, name=name[:128], role=role, project_id=project)

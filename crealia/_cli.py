"""The ``crealia`` command: ``serve`` and ``token``."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from pathlib import Path

import trio

from ._auth import (
    TokenAuthority,
    default_algorithm,
    has_configured_keys,
    load_or_create_secret,
    load_private_key,
    sign_token,
    token_claims,
)
from ._config import Config, comma_list, read_secret_file
from ._errors import ConfigurationError, CrealiaError
from ._logging import configure as configure_logging
from ._model import ROLES
from ._plugins import StrategyRegistry
from ._server import open_server

_HS256_FLAG_HELP = (
    "the HS256 secret; visible to every local user in ps: prefer CREALIA_JWT_SECRET or "
    "--jwt-secret-file"
)
_HS256_FILE_HELP = "read the HS256 secret from this file (CREALIA_JWT_SECRET_FILE)"
#: Printed (and logged) when the secret comes on the command line.
CMDLINE_KEY_WARNING = (
    "--jwt-secret puts the secret on the command line, where every local user can read it "
    "(ps, /proc/<pid>/cmdline): set CREALIA_JWT_SECRET or use --jwt-secret-file instead"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crealia", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None, help="HTTP port (default 3000)")
    serve.add_argument(
        "--ws-port", type=int, default=None, help="fast-path WebSocket port (default 3001)"
    )
    serve.add_argument("--data-dir", default=None, help="default ./crealia-data")
    serve.add_argument(
        "--backplane",
        "--redis",
        dest="backplane",
        default=None,
        metavar="URL",
        help="the backplane: sqlite: (the default, in the data dir) or redis://HOST:PORT/DB to "
        "join a cluster (CREALIA_BACKPLANE; --redis and REDIS_URL are older names)",
    )
    serve.add_argument("--jwt-secret", default=None, help=_HS256_FLAG_HELP)
    serve.add_argument("--jwt-secret-file", default=None, help=_HS256_FILE_HELP)
    serve.add_argument(
        "--jwt-public-key",
        action="append",
        default=None,
        metavar="[KID=]PEM_PATH",
        help="a public key verifying RS256/ES256 tokens with this kid (repeatable; "
        "CREALIA_JWT_PUBLIC_KEYS)",
    )
    serve.add_argument(
        "--jwt-keys-file",
        default=None,
        help="a JSON file of kid to PEM (text or path), or one PEM file (CREALIA_JWT_KEYS_FILE)",
    )
    serve.add_argument(
        "--allowed-origins",
        default=None,
        help="browser origins allowed to open a WebSocket besides the server's own, "
        "comma-separated; * allows any (CREALIA_ALLOWED_ORIGINS)",
    )
    serve.add_argument(
        "--allowed-hosts",
        default=None,
        help="host names requests may carry in Host (.example.com: and its subdomains), "
        "comma-separated; default any (CREALIA_ALLOWED_HOSTS)",
    )
    serve.add_argument("--dev", action="store_true", default=None)
    serve.add_argument(
        "--tick-ms", type=float, default=None, help="outbound batching tick in ms (0: batching off)"
    )
    serve.add_argument(
        "--history",
        type=int,
        default=None,
        help="durable events kept per project for resume (default 10000)",
    )

    serve.add_argument("--config", default=None, help="a TOML file of settings (CREALIA_CONFIG)")
    serve.add_argument(
        "--metrics-interval",
        type=float,
        default=None,
        help="seconds between metric samples and alert checks (default 5; 0: metrics off)",
    )
    serve.add_argument("--log-format", choices=("json", "text"), default=None)
    serve.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=None,
        help="default warning (debug with --dev); also CREALIA_LOG_LEVEL",
    )
    commands.add_parser(
        "strategies", help="list the installed conflict strategies and where they come from"
    )
    serve.add_argument(
        "--strategies",
        default=None,
        help="default strategy chain, comma-separated (default merge,priority)",
    )

    token = commands.add_parser("token", help="print a token for a user")
    token.add_argument("--user", required=True)
    token.add_argument("--project", required=True)
    token.add_argument("--role", required=True, choices=ROLES)
    token.add_argument("--name", default=None)
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds (default 3600)")
    token.add_argument("--jwt-secret", default=None, help=_HS256_FLAG_HELP)
    token.add_argument("--jwt-secret-file", default=None, help=_HS256_FILE_HELP)
    token.add_argument("--data-dir", default=None)
    token.add_argument(
        "--private-key",
        default=None,
        metavar="PEM_PATH",
        help="sign with this private key (RS256/ES256) instead of the HS256 secret",
    )
    token.add_argument(
        "--alg",
        default=None,
        choices=("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
                 "EdDSA"),
        help="the private key's algorithm (default RS256 for RSA keys, ES256 for EC P-256)",
    )  # fmt: skip
    token.add_argument(
        "--kid", default=None, help="the key id to put in the token's header (selects the key)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "token":
            return _token(args)
        if args.command == "strategies":
            return _strategies()
        secret = _secret(args)
        config = Config.from_env(
            config_file=args.config,
            metrics_interval=args.metrics_interval,
            log_format=args.log_format,
            host=args.host,
            port=args.port,
            ws_port=args.ws_port,
            data_dir=args.data_dir,
            backplane_url=args.backplane,
            jwt_secret=secret,
            jwt_public_keys=_public_keys(args.jwt_public_key),
            jwt_keys_file=args.jwt_keys_file,
            allowed_origins=args.allowed_origins,
            allowed_hosts=args.allowed_hosts,
            dev=args.dev,
            tick_ms=args.tick_ms,
            history_limit=args.history,
            strategy_chain=None if args.strategies is None else comma_list(args.strategies),
        )  # fmt: skip
        level = args.log_level or os.environ.get("CREALIA_LOG_LEVEL") or (
            "debug" if config.dev else "warning")  # fmt: skip
        if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigurationError(f"CREALIA_LOG_LEVEL={level!r}: expected debug, info, "
                                     "warning or error")  # fmt: skip
        configure_logging(config.log_format, getattr(logging, level.upper()))
        for noisy in ("httpx", "httpcore", "hpack"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        if args.jwt_secret is not None:
            logging.getLogger("crealia").warning(CMDLINE_KEY_WARNING)
        _tune_gc()
        trio.run(_serve, config)
    except CrealiaError as exc:
        print(f"crealia: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"crealia: {exc}", file=sys.stderr)
        return 1
    return 0


def _tune_gc() -> None:
    """Collect young objects less often than CPython's default (700 allocations).

    A server holds hundreds of thousands of long-lived objects (tasks, sessions, rooms), and with
    the default thresholds a full collection ran about twice a second under fan-out load, each
    pausing every room for tens of milliseconds: it doubled p99 latency in the fan-out
    benchmark. CREALIA_GC_THRESHOLD="g0,g1,g2" overrides. Only ``crealia serve`` does this: a
    program that embeds crealia keeps its own settings.
    """
    raw = os.environ.get("CREALIA_GC_THRESHOLD", "20000,20,10")
    try:
        thresholds = [int(part) for part in raw.split(",")]
        gc.set_threshold(*thresholds)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"CREALIA_GC_THRESHOLD={raw!r}: {exc}") from exc


def _strategies() -> int:
    registry = StrategyRegistry.discover()
    default = Config.from_env().strategy_chain
    width = max((len(p.name) for p in registry.plugins), default=4)
    for plugin in registry.plugins:
        mark = "*" if plugin.name in default else " "
        where = f"{plugin.distribution} {plugin.version}  {plugin.target}"
        state = f"  FAILED: {plugin.error}" if plugin.error else ""
        print(f"{mark} {plugin.name:<{width}}  {where}{state}")
    print(f"(* in the default chain: {', '.join(default)})")
    return 1 if any(p.error for p in registry.plugins) else 0


def _secret(args: argparse.Namespace) -> str | None:
    """The secret of ``--jwt-secret`` (with a warning on stderr) or ``--jwt-secret-file``."""
    if args.jwt_secret is not None and args.jwt_secret_file is not None:
        raise ConfigurationError("--jwt-secret and --jwt-secret-file: give one of them")
    if args.jwt_secret is not None:
        print(f"crealia: warning: {CMDLINE_KEY_WARNING}", file=sys.stderr, flush=True)
        return str(args.jwt_secret)
    if args.jwt_secret_file is not None:
        return read_secret_file(Path(args.jwt_secret_file))
    return None


def _public_keys(values: list[str] | None) -> dict[str, str] | None:
    """``--jwt-public-key [KID=]PEM_PATH`` flags as ``jwt_public_keys`` (no KID: id "")."""
    if not values:
        return None
    keys: dict[str, str] = {}
    for value in values:
        kid, sep, path = value.partition("=")
        if not sep:
            kid, path = "", value
        if kid in keys:
            raise ConfigurationError(f"--jwt-public-key: key id {kid!r} given twice")
        keys[kid] = path
    return keys


def _token(args: argparse.Namespace) -> int:
    claims = token_claims(
        user_id=args.user, project_id=args.project, role=args.role, name=args.name, ttl=args.ttl
    )
    if args.private_key:
        key = load_private_key(Path(args.private_key))
        alg = args.alg or default_algorithm(key)
        print(sign_token(claims, key, algorithm=alg, kid=args.kid))
        return 0
    if args.alg:
        raise ConfigurationError("--alg needs --private-key (the secret signs HS256)")
    config = Config.from_env(jwt_secret=_secret(args), data_dir=args.data_dir)
    fallback = None
    if not has_configured_keys(config):
        fallback = load_or_create_secret(Path(config.data_dir))
    authority = TokenAuthority.from_config(config, fallback_secret=fallback)
    print(
        authority.issue(
            user_id=args.user,
            project_id=args.project,
            role=args.role,
            name=args.name,
            ttl=args.ttl,
            kid=args.kid,
        )
    )
    return 0


async def _serve(config: Config) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_server(config) as server:
            # What exists now lives as long as the server: keep it out of every collection.
            gc.freeze()
            print(f"crealia listening http={server.http_port} ws={server.ws_port}", flush=True)
            async for _signum in signals:
                break
        # Leaving the block closed every connection with 1001 and flushed the store.

"""The ``crealia`` command.

Subcommands::

    crealia serve          run the server
    crealia check-config   check the settings as serve would, and print them with secrets masked
    crealia token          print a token for a user
    crealia check-token    verify a token as the server would, and print its claims
    crealia plugins        the strategies, alert rules and backplanes, and where each comes from
    crealia strategies     the strategies only, and which are in the default chain
    crealia strategies train   fit the ai strategy's offline model (the corpus, and projects'
                           conflicts settled by hand) and write it where the server loads it
    crealia loadtest       drive a running server with simulated users and report what it did
    crealia backup         copy the projects' store to a file, online
    crealia restore        put a backup back (server stopped), every project a new epoch
    crealia migrate        bring a database's schema up to this version (--database URL)
    crealia --version

Every value is checked for its type and range wherever it comes from (a flag, a variable, the
TOML file: see :mod:`crealia._config`). A failure to start (a bad setting, a port in use, Redis
unreachable, a bad URL, a strategy refusing its options, an unusable data dir) is one line on
stderr, ``crealia: ...``, and exit status 2, never a traceback; so is a bad command line.
``check-token`` exits 1 for a refused token, ``loadtest`` 1 for a server it cannot reach.
Help is plain text.

Each command imports what it needs when it runs (the server, trio, PyJWT, the plugins,
scikit-learn...): at the top of this module are only the modules that define the parser's
constants, which import no trio, so ``--version`` and ``--help`` cost little more than
starting Python (``tests/test_cli.py`` lists what they may import).
"""

from __future__ import annotations

import argparse
import errno
import gc
import importlib.util
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import attrs

# From modules that import little (no trio, no server, no network or learning library): what
# the parser and the error handling need. Each command imports the rest when it runs.
from ._aiproviders import OFFLINE_MODEL_FILE, AIProviderSettings, redact_url
from ._echo import ECHO_PATH
from ._errors import ConfigurationError, CrealiaError, Unauthorized
from ._model import ROLES
from ._version import __version__
from ._wire import ID_PATTERN as _PROJECT_ID

if TYPE_CHECKING:
    from ._config import Config, Source
    from ._loadtest import LoadtestOptions

#: The entry-point group of backplanes (``crealia.backplanes``), listed by ``crealia plugins``.
BACKPLANE_GROUP = "crealia.backplanes"

_HS256_FLAG_HELP = (
    "the HS256 secret; visible to every local user in ps: prefer CREALIA_JWT_SECRET or "
    "--jwt-secret-file"
)
_HS256_FILE_HELP = "read the HS256 secret from this file (CREALIA_JWT_SECRET_FILE)"
#: Printed (and logged) when the secret comes on the command line.
#: What ``crealia serve --dev`` says once it listens.
DEV_NOTICE = (
    "crealia: --dev: pages at http://127.0.0.1:{http}/ can mint tokens (POST /api/dev/token); "
    "WebSocket and CORS also allow the origins http://localhost:*, http://127.0.0.1:* and "
    "http://[::1]:*; refused origins are audited as dev_origin_refused, with no security alert. "
    "Never run --dev where others can reach it."
)

#: What ``crealia serve --conformance-echo`` says once it listens.
ECHO_NOTICE = (
    "crealia: --conformance-echo: ws://{host}:{ws}{path} and ws://{host}:{http}{path} "
    "echo every message, without a token, for RFC 6455 conformance runs. A test aid: never "
    "enable it in production."
)

CMDLINE_KEY_WARNING = (
    "--jwt-secret puts the secret on the command line, where every local user can read it "
    "(ps, /proc/<pid>/cmdline): set CREALIA_JWT_SECRET or use --jwt-secret-file instead"
)
#: The longest lifetime ``crealia token --ttl`` gives a token: a year (and a leap day).
MAX_TOKEN_TTL = 366 * 86_400

#: The flags of ``serve`` and ``check-config`` that set a :class:`Config` field: (flag, field,
#: help). Their text is read and checked like the variables' (see crealia._config).
SETTING_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--host", "host", "the address both ports listen on (default 127.0.0.1; CREALIA_HOST)"),
    ("--port", "port", "HTTP port, 0 to 65535 (default 3000; 0: any free port; PORT)"),
    ("--ws-port", "ws_port", "fast-path WebSocket port, 0 to 65535 (default 3001; WS_PORT)"),
    ("--data-dir", "data_dir", "where the stores live (default ./crealia-data)"),
    ("--backplane", "backplane_url",
     "the backplane: sqlite: (the default, in the data dir) or redis://HOST:PORT/DB to join a "
     "cluster (CREALIA_BACKPLANE)"),
    ("--redis", "redis_url",
     "Redis, redis://HOST:6379/DB: beside --database it carries presence, cursors and rate "
     "limits (the recommended cluster); alone, the older name of --backplane for a Redis URL "
     "(REDIS_URL)"),
    ("--database", "database_url",
     "PostgreSQL as the store of record, postgresql://USER:PASSWORD@HOST:5432/DB: any number "
     "of processes on one database; add --redis for a cluster (DATABASE_URL)"),
    ("--jwt-keys-file", "jwt_keys_file",
     "a JSON file of kid to PEM (text or path), or one PEM file (CREALIA_JWT_KEYS_FILE)"),
    ("--allowed-origins", "allowed_origins",
     "browser origins allowed to open a WebSocket besides the server's own, comma-separated; "
     "* allows any (CREALIA_ALLOWED_ORIGINS)"),
    ("--allowed-hosts", "allowed_hosts",
     "host names requests may carry in Host (.example.com: and its subdomains), "
     "comma-separated; default any (CREALIA_ALLOWED_HOSTS)"),
    ("--trusted-proxies", "trusted_proxies",
     "networks of the reverse proxies in front, CIDR[,CIDR...]: from them the client's address "
     "is read from X-Forwarded-For (default: trust no one; TRUSTED_PROXIES)"),
    ("--tick-ms", "tick_ms", "outbound batching tick in ms, 0 to 1000 (0: batching off)"),
    ("--batch-frames-per-s", "batch_frames_per_s",
     "frames a second the fan-out sends before it coalesces, up to the tick (default 20000)"),
    ("--client-lag-timeout", "client_lag_timeout",
     "seconds a client may fall behind before it is closed as a slow consumer, 4409 "
     "(default 3; 0: off; CREALIA_CLIENT_LAG_TIMEOUT)"),
    ("--history", "history_limit", "durable events kept per project for resume (default 10000)"),
    ("--metrics-interval", "metrics_interval",
     "seconds between metric samples and alert checks (default 5; 0: metrics off)"),
    ("--log-format", "log_format", "json or text (default json; CREALIA_LOG_FORMAT)"),
    ("--durability", "durability",
     "normal (an ack survives a killed process) or fsync (also a power loss: each commit is "
     "fsynced) (default normal; CREALIA_DURABILITY)"),
    ("--log-level", "log_level",
     "debug, info, warning or error (default warning, debug with --dev; CREALIA_LOG_LEVEL)"),
    ("--webrtc-listen-ip", "webrtc_listen_ips",
     "the addresses the server's WebRTC peers take media on, comma-separated (default every "
     "non-loopback address; WEBRTC_LISTEN_IPS)"),
    ("--strategies", "strategy_chain",
     "default strategy chain, comma-separated (default merge,priority)"),
)  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse with plain-text help (no colour, whatever the Python) and one-line errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if sys.version_info >= (3, 14):
            kwargs.setdefault("color", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _add_key_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that say how tokens are verified (serve, check-config, check-token)."""
    parser.add_argument("--jwt-secret", default=None, help=_HS256_FLAG_HELP)
    parser.add_argument("--jwt-secret-file", default=None, help=_HS256_FILE_HELP)
    parser.add_argument(
        "--jwt-public-key",
        action="append",
        default=None,
        metavar="[KID=]PEM_PATH",
        help="a public key verifying RS256/ES256 tokens with this kid (repeatable; "
        "CREALIA_JWT_PUBLIC_KEYS)",
    )


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``serve``, which ``check-config`` takes too."""
    for flag, field, text in SETTING_FLAGS:
        parser.add_argument(flag, dest=field, default=None, metavar=field.upper(), help=text)
    parser.add_argument(
        "--dev", action="store_const", const="true", default=None,
        help="development mode: more logging (CREALIA_DEV)",
    )  # fmt: skip
    parser.add_argument(
        "--conformance-echo", action="store_const", const="true", default=None,
        dest="conformance_echo",
        help=f"also echo every message at {ECHO_PATH} on both ports, for RFC 6455 conformance "
        "runs; a test aid, never in production (CREALIA_CONFORMANCE_ECHO)",
    )  # fmt: skip
    _add_key_flags(parser)
    parser.add_argument("--config", default=None, help="a TOML file of settings (CREALIA_CONFIG)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="crealia",
        description="crealia: the real-time collaboration server for a creative timeline editor.",
    )
    parser.add_argument("--version", action="version", version=f"crealia {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server")
    _add_setting_flags(serve)

    check = commands.add_parser(
        "check-config",
        help="check the settings (flags, environment, file) as serve would and print them, "
        "secrets masked",
    )
    _add_setting_flags(check)

    strategies = commands.add_parser(
        "strategies", help="list the installed conflict strategies and where they come from"
    )
    strategy_commands = strategies.add_subparsers(dest="strategies_command", metavar="SUBCOMMAND")
    train = strategy_commands.add_parser(
        "train",
        help="fit the ai strategy's offline model on the generated corpus and on projects' "
        "conflicts settled by hand, and write it where the server loads it",
    )
    train.add_argument(
        "--project", action="append", default=[], metavar="PROJECT",
        help="also learn from this project's conflicts settled by hand (repeatable)",
    )  # fmt: skip
    train.add_argument(
        "--out", default=None, metavar="FILE",
        help=f"where to write the model (default: DATA_DIR/{OFFLINE_MODEL_FILE}, which the "
        "server's ai strategy loads)",
    )  # fmt: skip
    train.add_argument("--data-dir", dest="data_dir", default=None)
    train.add_argument(
        "--backplane", default=None, help="where the projects are stored (default: sqlite:)"
    )
    backup = commands.add_parser(
        "backup",
        help="copy the projects' store (DATA_DIR/crealia.sqlite3) to a new file, online: the "
        "server may keep running",
    )
    backup.add_argument("--to", required=True, metavar="FILE", help="the new backup file")
    backup.add_argument("--data-dir", dest="data_dir", default=None)
    restore = commands.add_parser(
        "restore",
        help="put a backup back in place of the projects' store (the server stopped); every "
        "project gets a new history epoch, so resuming clients get a snapshot",
    )
    restore.add_argument("--from", dest="source", required=True, metavar="FILE",
                         help="a file written by crealia backup")  # fmt: skip
    restore.add_argument("--data-dir", dest="data_dir", default=None)
    plugins = commands.add_parser(
        "plugins",
        help="list the strategies, alert rules and backplanes and where each comes from",
    )
    plugins.add_argument("--json", action="store_true", help="one JSON array instead of text")

    token = commands.add_parser("token", help="print a token for a user")
    token.add_argument("--user", required=True)
    token.add_argument("--project", required=True)
    token.add_argument("--role", required=True, choices=ROLES)
    token.add_argument("--name", default=None)
    token.add_argument(
        "--ttl", default="3600", help=f"seconds, 1 to {MAX_TOKEN_TTL} (default 3600)"
    )
    token.add_argument("--jwt-secret", default=None, help=_HS256_FLAG_HELP)
    token.add_argument("--jwt-secret-file", default=None, help=_HS256_FILE_HELP)
    token.add_argument("--data-dir", dest="data_dir", default=None)
    token.add_argument("--config", default=None, help="a TOML file of settings (CREALIA_CONFIG)")
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

    check_token = commands.add_parser(
        "check-token",
        help="verify a token as the server would (same keys as serve) and print its claims",
    )
    check_token.add_argument("token", metavar="TOKEN")
    check_token.add_argument(
        "--project", default=None, help="refuse the token unless it is for this project"
    )
    check_token.add_argument("--data-dir", dest="data_dir", default=None)
    check_token.add_argument(
        "--jwt-keys-file", dest="jwt_keys_file", default=None,
        help="a JSON file of kid to PEM (text or path), or one PEM file (CREALIA_JWT_KEYS_FILE)",
    )  # fmt: skip
    _add_key_flags(check_token)
    check_token.add_argument(
        "--config", default=None, help="a TOML file of settings (CREALIA_CONFIG)"
    )
    migrate = commands.add_parser(
        "migrate",
        help="bring a database's schema up to this crealia's version (serve also does it when "
        "it starts, and refuses a newer schema)",
    )
    migrate.add_argument(
        "--database", dest="database_url", default=None, metavar="URL",
        help="the database, postgresql://USER:PASSWORD@HOST:5432/DB (DATABASE_URL)",
    )  # fmt: skip
    _add_loadtest(commands)
    return parser


def _count(low: int, high: int) -> Any:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not from {low} to {high}")
        return value

    return parse


def _number(low: float, high: float) -> Any:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{raw!r} is not a number from {low:g} to {high:g}")
        return value

    return parse


def _period(low: float, high: float, *, zero: bool) -> Any:
    def parse(raw: str) -> float:
        from ._loadtest import parse_duration

        try:
            seconds = parse_duration(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if zero and seconds == 0:
            return 0.0
        if not low <= seconds <= high:
            allowed = f"0 (off) or from {low:g} s" if zero else f"from {low:g} s"
            raise argparse.ArgumentTypeError(f"{raw!r}: must be {allowed} to {high:g} s")
        return seconds

    return parse


def _ws_url(raw: str) -> str:
    parts = urlsplit(raw)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("ws", "wss") or not parts.hostname or port == -1:
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not a WebSocket URL (ws://HOST:PORT/ws or wss://...)"
        )
    return raw


def _add_loadtest(commands: Any) -> None:
    loadtest = commands.add_parser(
        "loadtest", help="drive a running server with simulated users and report what it did"
    )
    loadtest.add_argument(
        "--url",
        action="append",
        type=_ws_url,
        required=True,
        metavar="URL",
        help="the server's WebSocket URL, ws://HOST:WS_PORT/ws (repeat it for the nodes of a "
        "cluster: users are spread over them)",
    )
    loadtest.add_argument(
        "--jwt-secret",
        default=None,
        help="the secret the server signs tokens with (CREALIA_JWT_SECRET)",
    )
    loadtest.add_argument(
        "--data-dir", default=None, help="the server's data dir, to use the secret it keeps there"
    )
    loadtest.add_argument(
        "--users", type=_count(1, 20_000), default=50, help="simulated users (default 50)"
    )
    loadtest.add_argument(
        "--projects",
        type=_count(1, 10_000),
        default=5,
        help="projects the users are spread over (default 5)",
    )
    loadtest.add_argument(
        "--duration",
        type=_period(0.1, 86_400, zero=False),
        default=600.0,
        help="how long the traffic runs: 90, 30s, 10m, 1h (default 10m)",
    )
    loadtest.add_argument(
        "--cursor-hz",
        type=_number(0, 60),
        default=10.0,
        help="cursor moves per user per second, 0 to 60 (default 10)",
    )
    loadtest.add_argument(
        "--edit-every",
        type=_period(0.05, 86_400, zero=True),
        default=5.0,
        help="time between a user's edits, 0: none (default 5s)",
    )
    loadtest.add_argument(
        "--comment-every",
        type=_period(0.05, 86_400, zero=True),
        default=30.0,
        help="time between a user's comments, 0: none (default 30s)",
    )
    loadtest.add_argument(
        "--conflict-rate",
        type=_number(0, 1),
        default=0.0,
        help="the share of edits made to a clip every user of the project "
        "edits, with a stale base: conflicts (0 to 1, default 0)",
    )
    loadtest.add_argument(
        "--streams",
        type=_count(0, 100),
        default=0,
        help="relay live sessions (an aiortc host and viewer each) beside the traffic (default 0)",
    )
    loadtest.add_argument(
        "--media-ip",
        default=None,
        metavar="IP[,IP...]",
        help="the addresses the streams' peers take media on (default "
        "127.0.0.1 for a loopback server, else every address)",
    )
    loadtest.add_argument(
        "--project-prefix",
        default="loadtest",
        help="projects are PREFIX-0 ... PREFIX-(N-1) (default loadtest)",
    )
    loadtest.add_argument(
        "--seed",
        type=_count(0, 2**63),
        default=None,
        help="seed the users' timing and conflict picks (default random)",
    )
    loadtest.set_defaults(command_parser=loadtest)
    loadtest.add_argument(
        "--json",
        action="store_true",
        help="end with one JSON object on stdout (the table goes to stderr)",
    )


def _loadtest_options(args: argparse.Namespace) -> LoadtestOptions:
    """The options of ``loadtest``'s checked arguments (exits 2, in one line, on a bad one)."""
    from ._auth import SECRET_FILE
    from ._loadtest import LoadtestOptions

    command: argparse.ArgumentParser = args.command_parser
    if args.jwt_secret is not None and args.data_dir is not None:
        command.error("--jwt-secret and --data-dir: give one of them")
    # What the command line says wins over the environment: --jwt-secret, --data-dir, then
    # CREALIA_JWT_SECRET.
    secret = args.jwt_secret
    if secret is None and args.data_dir is not None:
        path = Path(args.data_dir) / SECRET_FILE
        try:
            secret = path.read_text().strip()
        except OSError as exc:
            command.error(
                f"--data-dir {args.data_dir}: cannot read the server's secret "
                f"{path} ({exc.strerror or exc})"
            )
        if not secret:
            command.error(f"--data-dir {args.data_dir}: the server's secret {path} is empty")
    if secret is None:
        secret = os.environ.get("CREALIA_JWT_SECRET")
    if not secret:
        command.error(
            "give --jwt-secret (or CREALIA_JWT_SECRET) or --data-dir: the "
            "secret the server verifies tokens with"
        )
    if args.projects > args.users:
        command.error(f"--projects {args.projects}: more projects than --users {args.users}")
    last = f"{args.project_prefix}-{args.projects - 1}"
    if not _PROJECT_ID.fullmatch(args.project_prefix) or len(last) > 64:
        command.error(
            f"--project-prefix {args.project_prefix!r}: project ids like {last!r} "
            "must be 1 to 64 letters, digits or _.:@- and start with a letter or "
            "digit"
        )
    if args.media_ip is None:
        hosts = {urlsplit(url).hostname for url in args.url}
        media = ("127.0.0.1",) if hosts <= {"127.0.0.1", "localhost", "::1"} else ()
    else:
        media = tuple(part.strip() for part in args.media_ip.split(",") if part.strip())
        for address in media:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                command.error(f"--media-ip: {address!r} is not an IP address")
    return LoadtestOptions(
        urls=tuple(args.url),
        secret=secret,
        users=args.users,
        projects=args.projects,
        duration=args.duration,
        cursor_hz=args.cursor_hz,
        edit_every=args.edit_every,
        comment_every=args.comment_every,
        conflict_rate=args.conflict_rate,
        streams=args.streams,
        project_prefix=args.project_prefix,
        media_ips=media,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``crealia`` command; its exit status (0 ok, 1 refused or failed plugins, 2 a
    failure to start or a bad setting)."""
    args = _parser().parse_args(argv)
    config: Config | None = None
    if args.command == "loadtest":
        from ._loadtest import run_command as run_loadtest_command

        return run_loadtest_command(_loadtest_options(args), as_json=args.json)
    try:
        if args.command == "token":
            return _token(args)
        if args.command == "check-token":
            return _check_token(args)
        if args.command == "strategies" and args.strategies_command == "train":
            return _train(args)
        if args.command == "strategies":
            return _strategies()
        if args.command == "plugins":
            return _plugins(as_json=args.json)
        if args.command in ("backup", "restore"):
            return _backup_or_restore(args)
        if args.command == "migrate":
            return _migrate(args.database_url or os.environ.get("DATABASE_URL"))
        config, sources = _settings(args)
        if args.command == "check-config":
            return _check_config(config, sources)
        import trio

        from ._logging import configure as configure_logging

        level = config.log_level or ("debug" if config.dev else "warning")
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
        print(f"crealia: {_start_failure(exc, config)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _settings(args: argparse.Namespace) -> tuple[Config, dict[str, Source]]:
    """The config of ``serve``'s (or ``check-config``'s) flags, environment and file.

    Raises:
        ConfigurationError: a value is unusable (the message names where it came from).
    """
    from ._config import load_config

    flags: dict[str, tuple[str, Any]] = {
        field: (flag, getattr(args, field)) for flag, field, _text in SETTING_FLAGS
    }
    flags["dev"] = ("--dev", args.dev)
    flags["conformance_echo"] = ("--conformance-echo", args.conformance_echo)
    secret = _secret(args)
    if secret is not None:
        flags["jwt_secret"] = secret
    flags["jwt_public_keys"] = ("--jwt-public-key", _public_keys(args.jwt_public_key))
    return load_config(config_file=args.config, flags=flags)


def _start_failure(exc: OSError, config: Config | None) -> str:
    """One line for an OSError that stopped the server from starting."""
    if exc.errno == errno.EADDRINUSE and config is not None:
        for flag, port in (("--port", config.port), ("--ws-port", config.ws_port)):
            if port and _in_use(config.host, port):
                return f"cannot listen on {config.host}:{port} ({flag}): address already in use"
    return f"cannot start: {exc}"


def _in_use(host: str, port: int) -> bool:
    """Whether ``host:port`` cannot be bound (asked after the server failed to bind one of its
    two ports, to say which)."""
    try:
        socket.create_server((host, port)).close()
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE
    return False


def _gc_thresholds() -> list[int]:
    """CREALIA_GC_THRESHOLD="g0,g1,g2" (default 20000,20,10).

    Raises:
        ConfigurationError: not up to three non-negative integers.
    """
    raw = os.environ.get("CREALIA_GC_THRESHOLD", "20000,20,10")
    try:
        thresholds = [int(part) for part in raw.split(",")]
    except ValueError:
        thresholds = []
    if not 1 <= len(thresholds) <= 3 or min(thresholds) < 0:
        raise ConfigurationError(
            f"CREALIA_GC_THRESHOLD={raw!r}: must be one to three non-negative integers, "
            "comma-separated (g0,g1,g2)"
        )
    return thresholds


def _tune_gc() -> None:
    """Collect young objects less often than CPython's default (700 allocations).

    A server holds hundreds of thousands of long-lived objects (tasks, sessions, rooms), and with
    the default thresholds a full collection ran about twice a second under fan-out load, each
    pausing every room for tens of milliseconds: it doubled p99 latency in the fan-out
    benchmark. CREALIA_GC_THRESHOLD="g0,g1,g2" overrides. Only ``crealia serve`` does this: a
    program that embeds crealia keeps its own settings.
    """
    gc.set_threshold(*_gc_thresholds())


# -- check-config -------------------------------------------------------------------------------


def _check_config(config: Config, sources: Mapping[str, Source]) -> int:
    from ._config import Config

    _preflight(config)
    print("# crealia check-config: these settings are valid; secrets are masked.")
    print("# A comment says where a value came from (none: the default).")
    for field in attrs.fields(Config):
        value = _masked(field.name, getattr(config, field.name))
        source = sources.get(field.name)
        where = f"  # {_where(source)}" if source is not None else ""
        if value is None:
            print(f"# {field.name} is not set{where}")
        else:
            print(f"{field.name} = {json.dumps(value, default=str)}{where}")
    return 0


def _where(source: Source) -> str:
    return "set in code" if source.kind == "code" else f"from {source.name}"


def _preflight(config: Config) -> None:
    """What ``serve`` checks before it opens anything, without opening anything: the plugins
    and their options, the default chain, the rate limits, the data dir, the GC thresholds.

    Raises:
        ConfigurationError: naming what is wrong.
    """
    from ._plugins import AlertRuleRegistry, StrategyRegistry
    from ._ratelimit import rate_limits
    from ._settle import build_chain

    _gc_thresholds()
    registry = StrategyRegistry.discover(config.strategies)
    registry.check(list(config.strategy_chain))
    AlertRuleRegistry.discover(config.alert_rules).create_all(config.alert_options)
    rate_limits(config.rate_limits)
    build_chain(registry, config, list(config.strategy_chain), {})
    _check_data_dir(Path(config.data_dir))


def _check_data_dir(path: Path) -> None:
    """Raises:
    ConfigurationError: ``path`` is not a directory this process may write, nor can it be made.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigurationError(f"data dir {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigurationError(f"data dir {path}: {existing} is not writable")


def _masked(name: str, value: Any) -> Any:
    """``value`` of setting ``name`` as check-config prints it: JSON, with secrets masked."""
    from ._config import SECRET_SETTINGS, redact_url_password

    if value is None:
        return None
    if name in SECRET_SETTINGS and isinstance(value, str):  # jwt_secret, the TURN credential
        return "***"
    if name == "jwt_secrets":
        return {kid: "***" for kid in value}
    if name == "jwt_public_keys":
        return {kid: "(PEM text)" if "-----BEGIN" in key else key for kid, key in value.items()}
    if name in ("redis_url", "backplane_url", "database_url"):
        return redact_url_password(value)
    if name == "alert_webhooks":
        return [_masked_webhook(url) for url in value]
    if name == "ai_providers":
        return {provider: _masked_provider(settings) for provider, settings in value.items()}
    if name in ("strategies", "alert_rules"):  # objects registered in code: their names
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _masked(name, v) if isinstance(v, Mapping) else v for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _masked_webhook(url: str) -> str:
    """A webhook URL with what may be a credential masked: the password of its user info,
    its path (chat services put the key there) and its query."""
    shown = redact_url(url)
    scheme, _sep, rest = shown.partition("://")
    host, slash, path = rest.partition("/")
    user = "***@" if "@" in url.partition("://")[2].partition("/")[0] else ""
    return f"{scheme}://{user}{host}{slash}{'***' if path else ''}"


def _masked_provider(settings: AIProviderSettings) -> dict[str, Any]:
    shown = {f.name: getattr(settings, f.name) for f in attrs.fields(AIProviderSettings)}
    shown["url"] = redact_url(settings.url)
    shown["models"] = list(settings.models)
    if settings.api_key is not None:
        shown["api_key"] = "***"
    return shown


# -- plugins ------------------------------------------------------------------------------------


def _strategies() -> int:
    from ._config import Config
    from ._plugins import StrategyRegistry

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


def _backup_or_restore(args: argparse.Namespace) -> int:
    """``crealia backup`` / ``crealia restore`` on the data dir of ``--data-dir``, else of the
    environment (``CREALIA_DATA_DIR``), else the default.

    Raises:
        ConfigurationError: see :func:`crealia._backup.backup` and :func:`~crealia._backup.restore`.
    """
    from . import _backup
    from ._config import Config

    config = Config.from_env()
    data_dir = Path(args.data_dir if args.data_dir is not None else config.data_dir)
    if args.command == "backup":
        print(_backup.backup(data_dir, Path(args.to)).line("backed up"))
    else:
        report = _backup.restore(data_dir, Path(args.source))
        print(report.line("restored") + " (every project has a new epoch)")
    return 0


def _train(args: argparse.Namespace) -> int:
    """``crealia strategies train``: fit the offline model and write it.

    Raises:
        ConfigurationError: a bad project id, an --out that cannot be written, a backplane
            that cannot be opened, or scikit-learn missing.
    """
    import trio

    from ._config import Config
    from .strategies import _training

    for project in args.project:
        if not _PROJECT_ID.fullmatch(project):
            raise ConfigurationError(f"--project: {project[:70]!r} is not a project id")
    config = Config.from_env()
    if args.data_dir is not None:
        config = attrs.evolve(config, data_dir=args.data_dir)
    if args.backplane is not None:
        config = attrs.evolve(config, backplane_url=args.backplane)
    out = Path(args.out) if args.out is not None else Path(config.data_dir) / OFFLINE_MODEL_FILE
    if args.out is None:
        _check_data_dir(Path(config.data_dir))
    elif not out.parent.is_dir():
        raise ConfigurationError(f"--out {out}: {out.parent} is not a directory")
    if importlib.util.find_spec("sklearn") is None:
        raise ConfigurationError(
            "strategies train needs scikit-learn>=1.6: pip install 'crealia[train]'"
        )
    examples = _training.default_examples()
    by_hand: dict[str, int] = {}
    if args.project:
        stored = trio.run(_settled_conflicts, config, list(args.project))
        for project, conflicts in stored.items():
            found = _training.resolution_examples(conflicts)
            by_hand[project] = len(found)
            examples += found
    trained_on = {
        "corpus_seed": _training.TRAINING_SEED,
        "corpus_scale": _training.TRAINING_SCALE,
        "settled_by_hand": by_hand,
    }
    model = _training.train(examples, trained_on=trained_on)
    partial = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Whole or not at all: a server building a chain meanwhile reads the old file or this.
        partial.write_text(json.dumps(model.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ConfigurationError(f"--out {out}: {exc.strerror}") from None
    hand = ", ".join(f"{p}: {n}" for p, n in by_hand.items()) or "no project named"
    print(f"trained on {len(examples)} decided conflicts (settled by hand: {hand}); wrote {out}")
    return 0


#: Most conflicts read from one project to train on, newest first.
MAX_TRAINING_CONFLICTS = 10_000


async def _settled_conflicts(config: Config, projects: list[str]) -> dict[str, list[Any]]:
    """Each project's resolved conflicts, newest first, from the configured backplane."""
    from ._plugins import BackplaneRegistry

    out: dict[str, list[Any]] = {}
    async with BackplaneRegistry.discover().open(config.backplane_url, config) as backplane:
        for project in projects:
            out[project] = await backplane.conflicts(
                project, status="resolved", limit=MAX_TRAINING_CONFLICTS
            )
    return out


def _plugins(*, as_json: bool) -> int:
    """Every plugin of the three groups, built-ins included (they register the same way)."""
    from ._plugins import ALERT_RULE_GROUP, STRATEGY_GROUP, PluginInfo, load_entry_points

    groups = (("strategies", STRATEGY_GROUP, "strategy"),
              ("alert rules", ALERT_RULE_GROUP, "alert rule"),
              ("backplanes", BACKPLANE_GROUP, "backplane"))  # fmt: skip
    found: list[tuple[str, list[PluginInfo]]] = [
        (title, load_entry_points(group, kind)[1]) for title, group, kind in groups
    ]
    every = [info for _title, infos in found for info in infos]
    if as_json:
        print(json.dumps([attrs.asdict(info) for info in every], indent=2))
    else:
        width = max((len(info.name) for info in every), default=4)
        for (title, infos), (_title, group, _kind) in zip(found, groups, strict=True):
            print(f"{title} ({group}):")
            for info in infos:
                state = f"  FAILED: {info.error}" if info.error else ""
                print(f"  {info.name:<{width}}  {info.distribution} {info.version}  "
                      f"{info.target}{state}")  # fmt: skip
            if not infos:
                print("  (none)")
    return 1 if any(info.error for info in every) else 0


# -- tokens -------------------------------------------------------------------------------------


def _secret(args: argparse.Namespace) -> tuple[str, str] | None:
    """The secret of ``--jwt-secret`` (with a warning on stderr) or ``--jwt-secret-file``, with
    the flag that gave it."""
    from ._config import read_secret_file

    if args.jwt_secret is not None and args.jwt_secret_file is not None:
        raise ConfigurationError("--jwt-secret and --jwt-secret-file: give one of them")
    if args.jwt_secret is not None:
        print(f"crealia: warning: {CMDLINE_KEY_WARNING}", file=sys.stderr, flush=True)
        return "--jwt-secret", str(args.jwt_secret)
    if args.jwt_secret_file is not None:
        return "--jwt-secret-file", read_secret_file(Path(args.jwt_secret_file))
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


def _ttl(raw: str) -> float:
    """Raises:
    ConfigurationError: ``--ttl`` is not a number of seconds from 1 to :data:`MAX_TOKEN_TTL`.
    """
    try:
        ttl = float(raw)
    except ValueError:
        ttl = math.nan
    if not 1 <= ttl <= MAX_TOKEN_TTL:
        raise ConfigurationError(
            f"--ttl {raw}: must be a number of seconds from 1 to {MAX_TOKEN_TTL}"
        )
    return ttl


def _token_config(args: argparse.Namespace) -> Config:
    """The settings that say which keys sign and verify tokens, as ``serve`` reads them."""
    from ._config import load_config

    flags: dict[str, tuple[str, Any]] = {"data_dir": ("--data-dir", args.data_dir)}
    secret = _secret(args)
    if secret is not None:
        flags["jwt_secret"] = secret
    if getattr(args, "jwt_keys_file", None) is not None:
        flags["jwt_keys_file"] = ("--jwt-keys-file", args.jwt_keys_file)
    keys = _public_keys(getattr(args, "jwt_public_key", None))
    if keys is not None:
        flags["jwt_public_keys"] = ("--jwt-public-key", keys)
    return load_config(config_file=args.config, flags=flags)[0]


def _token(args: argparse.Namespace) -> int:
    from ._auth import (
        TokenAuthority,
        default_algorithm,
        has_configured_keys,
        load_or_create_secret,
        load_private_key,
        sign_token,
        token_claims,
    )

    ttl = _ttl(args.ttl)
    claims = token_claims(
        user_id=args.user, project_id=args.project, role=args.role, name=args.name, ttl=ttl
    )
    if args.private_key:
        key = load_private_key(Path(args.private_key))
        alg = args.alg or default_algorithm(key)
        print(sign_token(claims, key, algorithm=alg, kid=args.kid))
        return 0
    if args.alg:
        raise ConfigurationError("--alg needs --private-key (the secret signs HS256)")
    config = _token_config(args)
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
            ttl=ttl,
            kid=args.kid,
        )
    )
    return 0


def _check_token(args: argparse.Namespace) -> int:
    """Verify the token with the keys ``serve`` would use: print its header, claims and user
    (exit 0), or one line saying why it is refused (exit 1)."""
    import jwt

    from ._auth import SECRET_FILE, TokenAuthority, has_configured_keys, load_or_create_secret

    config = _token_config(args)
    fallback = None
    if not has_configured_keys(config):
        # The secret serve generates in its data dir; a check never creates one.
        path = Path(config.data_dir) / SECRET_FILE
        if not path.exists():
            raise ConfigurationError(
                f"no key is configured and {path} does not exist (crealia serve or crealia "
                "token creates it): give --data-dir, a secret or public keys"
            )
        fallback = load_or_create_secret(Path(config.data_dir))
    authority = TokenAuthority.from_config(config, fallback_secret=fallback)
    try:
        user = authority.verify(args.token, args.project)
    except Unauthorized as exc:
        print(f"crealia: token refused: {exc.message}", file=sys.stderr)
        return 1
    shown = {
        "header": jwt.get_unverified_header(args.token),
        "claims": jwt.decode(args.token, options={"verify_signature": False}),
        "user": {**user.to_wire(), "project_id": user.project_id},
    }
    print(json.dumps(shown, indent=2, sort_keys=True))
    return 0


# -- migrate ------------------------------------------------------------------------------------


def _migrate(url: str | None) -> int:
    """``crealia migrate``: the ``migrate`` of the backplane the URL's scheme names (an async
    function of the URL returning the schema versions before and after).

    Raises:
        ConfigurationError: no URL, an unknown scheme, a backplane without migrations, or a
            schema newer than this crealia's.
        TransportError: the database cannot be reached or failed.
    """
    import trio

    from ._config import redact_url_password
    from ._plugins import BackplaneRegistry

    if not url:
        raise ConfigurationError("migrate: give the database with --database URL (or DATABASE_URL)")
    registry = BackplaneRegistry.discover()
    name = registry.resolve(url)
    migrate = getattr(registry.factories[name], "migrate", None)
    if migrate is None:
        raise ConfigurationError(f"backplane {name!r} has no migrations to run (it brings its "
                                 "store up to date when it opens)")  # fmt: skip
    before, after = trio.run(migrate, url)
    shown = redact_url_password(url)
    if before == after:
        print(f"crealia: database {shown}: schema version {after}, up to date")
    else:
        print(f"crealia: database {shown}: schema migrated from version {before} to {after}")
    return 0


# -- serve --------------------------------------------------------------------------------------


async def _serve(config: Config) -> None:
    import trio

    from ._server import open_server

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_server(config) as server:
            # What exists now lives as long as the server: keep it out of every collection.
            gc.freeze()
            print(f"crealia listening http={server.http_port} ws={server.ws_port}", flush=True)
            if config.dev:
                print(DEV_NOTICE.format(http=server.http_port), file=sys.stderr, flush=True)
            if config.conformance_echo:
                print(ECHO_NOTICE.format(host=config.host, http=server.http_port,
                                         ws=server.ws_port, path=ECHO_PATH),
                      file=sys.stderr, flush=True)  # fmt: skip
            async for _signum in signals:
                break
        # Leaving the block closed every connection with 1001 and flushed the store.

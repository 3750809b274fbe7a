"""The ``crealia`` command as a user runs it (``python -m crealia`` in a subprocess): every
failure to start is one line on stderr and exit status 2; --version, check-config, check-token
and plugins do what they say; help is plain text.

Policy: loopback only, port 0 or a port we hold ourselves, a deadline on every run; no sleeps.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import sys
import time
from pathlib import Path

import attrs
import pytest
import trio

import crealia
from crealia import TokenAuthority

SECRET = "cli-test-secret-0123456789abcdef"
#: Variables the command reads: the tests set their own, whatever the caller's shell has.
_READ = ("CREALIA_", "PORT", "WS_PORT", "HOST", "REDIS_URL", "JWT_SECRET", "RATE_LIMIT_",
         "METRICS_", "AUDIT_", "SECURITY_")  # fmt: skip


@attrs.frozen
class Run:
    status: int
    out: str
    err: str

    @property
    def line(self) -> str:
        """stderr, which must be exactly one line."""
        lines = self.err.splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got:\n{self.err}"
        return lines[0]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_READ)}
    return {**env, **extra}


async def crealia_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Run:
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "crealia", *args],
            env=clean_env() if env is None else env,
            cwd=cwd,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return Run(result.returncode, result.stdout.decode(), result.stderr.decode())


def free_port() -> int:
    """A port nothing listens on (bound and released: nothing else is told about it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_args(data: Path, *extra: str) -> list[str]:
    return ["--port", "0", "--ws-port", "0", "--data-dir", str(data), *extra]


# -- failures to start --------------------------------------------------------------------------


def _bad_settings(tmp_path: Path) -> list[tuple[list[str], dict[str, str], str | None, str]]:
    """(flags, variables, config file text, the line): each refused by serve and check-config."""
    toml = tmp_path / "crealia.toml"
    return [
        (["--ws-port", "70000"], {}, None,
         "crealia: --ws-port 70000: must be an integer from 0 to 65535"),
        ([], {}, 'metrics_interval = "five"\n',
         f"crealia: metrics_interval in {toml} must be a number from 0 to 86400, got 'five'"),
        ([], {}, 'port = "4420"\n',
         f"crealia: port in {toml} must be an integer from 0 to 65535, got '4420'"),
        ([], {"CREALIA_TICK_MS": "-3"}, None,
         "crealia: CREALIA_TICK_MS='-3': tick_ms must be a number from 0 to 1000"),
        (["--redis", "http://127.0.0.1:6379"], {}, None,
         "crealia: --redis http://127.0.0.1:6379: must be a redis://host[:port], "
         "rediss://host[:port] or unix:///path URL"),
        ([], {"REDIS_URL": "redis://:hunter2@127.0.0.1:port"}, None,
         "crealia: REDIS_URL='redis://:***@127.0.0.1:port': redis_url must be a "
         "redis://host[:port], rediss://host[:port] or unix:///path URL"),
        (["--strategies", "merge,nonesuch"], {}, None,
         "crealia: unknown strategy 'nonesuch'; known: ai, manual, merge, priority"),
        ([], {}, '[strategy_options.priority]\ntie = "sideways"\n',
         "crealia: strategy 'priority': option tie must be 'first' or 'last', got 'sideways'"),
        (["--log-level", "loud"], {}, None,
         "crealia: --log-level loud: must be one of debug, info, warning, error"),
    ]  # fmt: skip


@pytest.mark.parametrize("command", ["serve", "check-config"])
async def test_cli_bad_settings_are_one_line_and_exit_2(tmp_path: Path, command: str) -> None:
    known = ", ".join(sorted(ep.name for ep in importlib.metadata.entry_points(
        group="crealia.strategies")))  # fmt: skip
    runs: list[tuple[Run, str, object]] = []
    # Two at a time: each run is mostly Python importing crealia.
    limiter = trio.CapacityLimiter(2)

    async def one(index: int, flags: list[str], variables: dict[str, str], text: str | None,
                  expected: str) -> None:  # fmt: skip
        # A port set by the file must not be overridden by the test's own --port 0.
        ports = (
            ["--ws-port", "0"]
            if text and text.startswith("port")
            else ["--port", "0", "--ws-port", "0"]
        )
        args = [*ports, "--data-dir", str(tmp_path / "data"), *flags]
        if text is not None:
            toml = tmp_path / f"case{index}" / "crealia.toml"
            toml.parent.mkdir()
            toml.write_text(text)
            expected = expected.replace(str(tmp_path / "crealia.toml"), str(toml))
            args += ["--config", str(toml)]
        env = clean_env(CREALIA_JWT_SECRET=SECRET, **variables)
        async with limiter:
            run = await crealia_cli(command, *args, env=env)
        runs.append(
            (run, expected.replace("ai, manual, merge, priority", known), (flags, variables, text))
        )

    async with trio.open_nursery() as nursery:
        for index, case in enumerate(_bad_settings(tmp_path)):
            nursery.start_soon(one, index, *case)
    assert len(runs) == len(_bad_settings(tmp_path))
    for run, expected, case in runs:
        assert (run.status, run.err) == (2, expected + "\n"), case
        assert "hunter2" not in run.err
        assert not run.out


@pytest.mark.parametrize("flag", ["--port", "--ws-port"])
async def test_cli_port_in_use_names_the_port_and_flag(tmp_path: Path, flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "--ws-port" if flag == "--port" else "--port"
        run = await crealia_cli("serve", "--data-dir", str(tmp_path / "d"), flag, str(port),
                                other, "0", env=clean_env(CREALIA_JWT_SECRET=SECRET))  # fmt: skip
    assert run.status == 2
    assert (
        run.line == f"crealia: cannot listen on 127.0.0.1:{port} ({flag}): address already in use"
    )


async def test_cli_redis_unreachable_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    args = serve_args(tmp_path / "d", "--redis", f"redis://127.0.0.1:{port}")
    run = await crealia_cli("serve", *args, env=clean_env(CREALIA_JWT_SECRET=SECRET))
    assert run.status == 2
    line = run.line
    assert line.startswith("crealia: ") and "redis" in line.lower(), line
    assert f"127.0.0.1:{port}" in line and "refused" in line.lower(), line


async def test_cli_unusable_data_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    env = clean_env(CREALIA_JWT_SECRET=SECRET)
    run = await crealia_cli("serve", *serve_args(blocker), env=env)
    assert run.status == 2
    assert run.line.startswith(f"crealia: cannot create data dir {blocker}: "), run.line
    checked = await crealia_cli("check-config", *serve_args(blocker / "sub"), env=env)
    assert checked.status == 2
    assert checked.line == f"crealia: data dir {blocker / 'sub'}: {blocker} is not a directory"


async def test_cli_usage_errors_are_one_line_and_exit_2() -> None:
    run = await crealia_cli("serve", "--port")
    expected = "crealia serve: argument --port: expected one argument (see crealia serve --help)"
    assert (run.status, run.line) == (2, expected)
    run = await crealia_cli()
    assert run.status == 2
    assert run.line.startswith("crealia: the following arguments are required: COMMAND")


@pytest.mark.parametrize(
    ("ttl", "line"),
    [("-5", "crealia: --ttl -5: must be a number of seconds from 1 to 31622400"),
     ("0", "crealia: --ttl 0: must be a number of seconds from 1 to 31622400"),
     ("soon", "crealia: --ttl soon: must be a number of seconds from 1 to 31622400"),
     ("1e9", "crealia: --ttl 1e9: must be a number of seconds from 1 to 31622400")],
)  # fmt: skip
async def test_cli_token_ttl_is_checked(tmp_path: Path, ttl: str, line: str) -> None:
    run = await crealia_cli("token", "--user", "u1", "--project", "p1", "--role", "editor",
                            "--ttl", ttl, "--data-dir", str(tmp_path / "d"))  # fmt: skip
    assert (run.status, run.line, run.out) == (2, line, "")
    assert not (tmp_path / "d").exists()  # refused before anything was created


# -- --version and --help ---------------------------------------------------------------------


async def test_cli_version_is_the_package_version() -> None:
    run = await crealia_cli("--version")
    assert run.status == 0
    assert run.out == f"crealia {crealia.__version__}\n"
    assert crealia.__version__ == importlib.metadata.version("crealia")


#: All of crealia that parsing the command line may import: the modules that define the parser's
#: constants, which import no trio, no server, no network or learning library.
_PARSER_MODULES = {"crealia", "crealia.__main__", "crealia._cli", "crealia._version",
                   "crealia._errors", "crealia._wire", "crealia._model", "crealia._echo",
                   "crealia._aiproviders"}  # fmt: skip
#: Libraries that only the commands needing them import.
_HEAVY = ("trio", "hypercorn", "quart", "trio_websocket", "aiortc", "sklearn", "httpx", "jwt",
          "redis", "psutil", "cryptography")  # fmt: skip


@pytest.mark.parametrize("args", [["--version"], ["--help"]])
async def test_cli_version_and_help_import_only_the_parser(args: list[str]) -> None:
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-X", "importtime", "-m", "crealia", *args],
            env=clean_env(),
            capture_stdout=True,
            capture_stderr=True,
        )
    assert result.stdout.decode().startswith(("crealia ", "usage: crealia"))
    # -X importtime writes a header, then "import time: self | cumulative | name" for every
    # module imported.
    header, *lines = result.stderr.decode().splitlines()
    assert header == "import time: self [us] | cumulative | imported package"
    imported = {line.rpartition("|")[2].strip() for line in lines}
    assert "crealia._cli" in imported  # the listing is read right
    assert {m for m in imported if m.split(".")[0] == "crealia"} <= _PARSER_MODULES
    assert not {m for m in imported if m.split(".")[0] in _HEAVY}


async def test_cli_help_is_plain_text() -> None:
    # Asked for colour every way Python knows: help stays plain.
    env = clean_env(FORCE_COLOR="1", PYTHON_COLORS="1", TERM="xterm-256color")
    commands = ["serve", "check-config", "token", "check-token", "plugins", "strategies",
                "strategies train"]  # fmt: skip
    helps: dict[str, Run] = {}
    limiter = trio.CapacityLimiter(2)

    async def one(command: str) -> None:
        async with limiter:
            helps[command] = await crealia_cli(*command.split(), "--help", env=env)

    async with trio.open_nursery() as nursery:
        for command in ["", *commands]:
            nursery.start_soon(one, command)
    for command, run in helps.items():
        assert run.status == 0, command
        assert f"usage: crealia {command}".strip() in run.out
        assert "\x1b" not in run.out, f"ANSI escapes in crealia {command} --help"
        assert "``" not in run.out and ":func:" not in run.out, f"markup in {command} --help"
    for command in commands[:-1]:
        assert command in helps[""].out
    assert "train" in helps["strategies"].out


# -- check-config -------------------------------------------------------------------------------


async def test_cli_check_config_prints_the_effective_config_with_secrets_masked(
    tmp_path: Path,
) -> None:
    secrets = {
        "file": "file-jwt-secret-0123456789",
        "kid": "rotated-secret-0123456789",
        "ai": "sk-provider-key-0123456789",
        "hook_password": "hook-password-0123456789",
        "hook_path": "T000-B000-webhookpathkey",
        "redis": "redis-password-0123456789",
        "turn": "turn-credential-0123456789",
    }
    toml = tmp_path / "crealia.toml"
    toml.write_text(
        f'jwt_secret = "{secrets["file"]}"\n'
        f'alert_webhooks = ["https://alerts:{secrets["hook_password"]}@hooks.example.com/'
        f'services/{secrets["hook_path"]}?token=x"]\n'
        "[ai_providers.default]\n"
        'url = "https://api.example.com/v1"\nmodel = "m1"\n'
        f'api_key = "{secrets["ai"]}"\n'
    )
    env = clean_env(
        CREALIA_JWT_SECRETS=json.dumps({"old": secrets["kid"]}),
        REDIS_URL=f"redis://:{secrets['redis']}@127.0.0.1:6379/0",
        WEBRTC_TURN_CREDENTIAL=secrets["turn"],
        CREALIA_TICK_MS="5",
    )
    run = await crealia_cli("check-config", "--config", str(toml), "--port", "4420",
                            "--data-dir", str(tmp_path / "data"), env=env)  # fmt: skip
    assert run.status == 0, run.err
    for name, secret in secrets.items():
        assert secret not in run.out + run.err, f"the {name} secret was shown"
    lines = run.out.splitlines()
    assert "port = 4420  # from --port" in lines
    assert "tick_ms = 5.0  # from CREALIA_TICK_MS" in lines
    assert "ws_port = 3001" in lines  # a default: no comment
    assert f'jwt_secret = "***"  # from {toml}' in lines
    assert 'jwt_secrets = {"old": "***"}  # from CREALIA_JWT_SECRETS' in lines
    assert 'redis_url = "redis://:***@127.0.0.1:6379/0"  # from REDIS_URL' in lines
    assert 'webrtc_turn_credential = "***"  # from WEBRTC_TURN_CREDENTIAL' in lines
    assert f'alert_webhooks = ["https://***@hooks.example.com/***"]  # from {toml}' in lines
    (ai,) = [line for line in lines if line.startswith("ai_providers = ")]
    assert '"api_key": "***"' in ai and '"url": "https://api.example.com/v1"' in ai
    assert not (tmp_path / "data").exists()  # a check creates nothing


# -- check-token --------------------------------------------------------------------------------


async def test_cli_check_token_accepts_what_token_issues(tmp_path: Path) -> None:
    data = tmp_path / "data"
    issued = await crealia_cli("token", "--user", "u1", "--project", "p9", "--role", "viewer",
                               "--name", "Una", "--data-dir", str(data))  # fmt: skip
    assert issued.status == 0, issued.err
    token = issued.out.strip()
    run = await crealia_cli("check-token", token, "--data-dir", str(data))
    assert (run.status, run.err) == (0, "")
    shown = json.loads(run.out)
    assert shown["user"] == {"id": "u1", "name": "Una", "role": "viewer", "project_id": "p9"}
    assert shown["claims"]["project"] == "p9" and shown["header"]["alg"] == "HS256"
    other = await crealia_cli("check-token", token, "--data-dir", str(data), "--project", "p1")
    assert (other.status, other.line) == (1, "crealia: token refused: token is for another project")


async def test_cli_check_token_refuses_expired_and_forged_tokens(tmp_path: Path) -> None:
    env = clean_env(CREALIA_JWT_SECRET=SECRET)
    args = ["--data-dir", str(tmp_path / "data")]
    expired = TokenAuthority(SECRET).issue(user_id="u1", project_id="p1", role="editor", ttl=60,
                                           now=time.time() - 3600)  # fmt: skip
    run = await crealia_cli("check-token", expired, *args, env=env)
    assert (run.status, run.line, run.out) == (1, "crealia: token refused: token expired", "")
    forged = TokenAuthority("another-secret-0123456789abcdefghij").issue(
        user_id="u1", project_id="p1", role="owner")  # fmt: skip
    run = await crealia_cli("check-token", forged, *args, env=env)
    assert (run.status, run.line) == (1, "crealia: token refused: invalid token: bad signature")
    good = TokenAuthority(SECRET).issue(user_id="u1", project_id="p1", role="editor")
    run = await crealia_cli("check-token", good, *args, env=env)
    assert run.status == 0 and json.loads(run.out)["user"]["id"] == "u1"
    # Without any key and without the data dir's generated secret nothing can be checked.
    nowhere = tmp_path / "nowhere"
    run = await crealia_cli("check-token", good, "--data-dir", str(nowhere))
    assert run.status == 2
    assert run.line.startswith(f"crealia: no key is configured and {nowhere / 'jwt-secret'} ")
    assert not nowhere.exists()


# -- plugins --------------------------------------------------------------------------------------


async def test_cli_plugins_lists_builtins_with_their_distribution() -> None:
    version = importlib.metadata.version("crealia")
    run = await crealia_cli("plugins", "--json")
    assert run.status == 0, run
    listed = json.loads(run.out)
    by_group: dict[str, dict[str, dict[str, object]]] = {}
    for info in listed:
        by_group.setdefault(str(info["group"]), {})[str(info["name"])] = info
    expected = {
        "crealia.strategies": {"merge": "crealia.strategies.merge:MergeStrategy",
                               "priority": "crealia.strategies.priority:PriorityStrategy",
                               "ai": "crealia.strategies.ai:AIStrategy",
                               "manual": "crealia.strategies.manual:ManualStrategy"},
        "crealia.alert_rules": {"latency": "crealia._alerts:latency",
                                "memory": "crealia._alerts:memory",
                                "cpu": "crealia._alerts:cpu",
                                "error_rate": "crealia._alerts:error_rate",
                                "conflict_rate": "crealia._alerts:conflict_rate",
                                "active_users": "crealia._alerts:active_users",
                                "refused_actions": "crealia._security:refused_actions",
                                "bad_tokens": "crealia._security:bad_tokens",
                                "rate_limit_abuse": "crealia._security:rate_limit_abuse",
                                "mass_export": "crealia._security:mass_export",
                                "abuse": "crealia._security:abuse"},
        "crealia.backplanes": {"sqlite": "crealia.backplanes.sqlite:open_backplane",
                               "redis": "crealia.backplanes.redis:open_backplane",
                               "postgresql": "crealia.backplanes.postgresql:open_backplane"},
    }  # fmt: skip
    # Every built-in the distribution declares is one of those: none is left unchecked.
    declared: dict[str, dict[str, str]] = {}
    for ep in importlib.metadata.distribution("crealia").entry_points:
        if ep.group in expected:
            declared.setdefault(ep.group, {})[ep.name] = ep.value
    assert declared == expected
    for group, plugins in expected.items():
        builtins = {name: info for name, info in by_group[group].items()
                    if info["distribution"] == "crealia"}  # fmt: skip
        assert builtins.keys() == plugins.keys(), (group, sorted(builtins))
        for name, target in plugins.items():
            info = builtins[name]
            assert (info["version"], info["target"], info["error"]) == (version, target, None), info
    text = await crealia_cli("plugins")
    assert text.status == 0, text
    lines = text.out.splitlines()
    assert "strategies (crealia.strategies):" in lines
    assert "alert rules (crealia.alert_rules):" in lines
    assert "backplanes (crealia.backplanes):" in lines
    assert not [line for line in lines if "FAILED" in line]
    (merge,) = [line for line in lines if line.split()[:1] == ["merge"]]
    assert f"crealia {version}  crealia.strategies.merge:MergeStrategy" in merge


# -- strategies train ---------------------------------------------------------------------------


async def test_cli_strategies_train_writes_the_shipped_model_again(tmp_path: Path) -> None:
    listed = await crealia_cli("strategies")
    assert listed.status == 0
    assert "(* in the default chain: merge, priority)" in listed.out
    out = tmp_path / "model.json"
    run = await crealia_cli("strategies", "train", "--out", str(out))
    assert (run.status, run.err) == (0, ""), run.err
    assert run.out == (
        f"trained on 967 decided conflicts (settled by hand: no project named); wrote {out}\n"
    )
    shipped = Path(crealia.__file__).parent / "strategies" / "offline_model.json"
    assert out.read_text() == shipped.read_text()  # deterministic: the shipped one is this


async def test_cli_strategies_train_reads_projects_from_the_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run = await crealia_cli("strategies", "train", "--project", "p1", "--project", "p2",
                            "--data-dir", str(data))  # fmt: skip
    assert run.status == 0, run.err
    written = data / "ai-offline-model.json"
    assert f"(settled by hand: p1: 0, p2: 0); wrote {written}" in run.out
    assert json.loads(written.read_text())["trained_on"]["settled_by_hand"] == {"p1": 0, "p2": 0}


@pytest.mark.parametrize(
    ("args", "line"),
    [(["--project", "bad id!"], "crealia: --project: 'bad id!' is not a project id"),
     (["--out", "/nonexistent/dir/m.json"],
      "crealia: --out /nonexistent/dir/m.json: /nonexistent/dir is not a directory"),
     (["--project"], "crealia strategies train: argument --project: expected one argument "
                     "(see crealia strategies train --help)"),
     (["--bogus"], "crealia: unrecognized arguments: --bogus (see crealia --help)")],
)  # fmt: skip
async def test_cli_strategies_train_refuses_bad_arguments_in_one_line(
    tmp_path: Path, args: list[str], line: str
) -> None:
    run = await crealia_cli("strategies", "train", "--data-dir", str(tmp_path / "d"), *args)
    assert (run.status, run.line, run.out) == (2, line, "")
    assert not (tmp_path / "d").exists()


async def test_cli_strategies_refuses_an_unknown_subcommand() -> None:
    run = await crealia_cli("strategies", "bogus")
    assert run.status == 2
    assert run.line.startswith("crealia strategies: argument SUBCOMMAND: invalid choice: 'bogus'")


def refusing_plugin(site: Path) -> dict[str, str]:
    """A throwaway distribution whose strategy factories refuse their options (TypeError,
    ValueError): the environment that puts it on the path."""
    dist_info = site / "crealia_refusing_example-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: crealia-refusing-example\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[crealia.strategies]\n"
        "typed = crealia_refusing_example:typed\n"
        "valued = crealia_refusing_example:valued\n"
    )
    (site / "crealia_refusing_example.py").write_text(
        "def typed(options):\n"
        "    raise TypeError('typed() takes no options mapping')\n"
        "def valued(options):\n"
        "    raise ValueError(f'option level must be 1 to 3, got {options.get(\"level\")!r}')\n"
    )
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return clean_env(PYTHONPATH=path, CREALIA_JWT_SECRET=SECRET)


async def test_cli_a_strategy_factory_refusing_its_options_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    env = refusing_plugin(tmp_path / "site")
    toml = tmp_path / "crealia.toml"
    toml.write_text("[strategy_options.valued]\nlevel = 9\n")
    lines = {
        "typed": "crealia: strategy 'typed': typed() takes no options mapping",
        "valued": "crealia: strategy 'valued': option level must be 1 to 3, got 9",
    }
    runs: dict[tuple[str, str], Run] = {}
    limiter = trio.CapacityLimiter(2)  # as above: each run is mostly Python importing crealia

    async def one(command: str, strategy: str) -> None:
        # A data dir each: the runs are independent of one another, whichever ends first.
        data = tmp_path / f"data-{command}-{strategy}"
        args = serve_args(data, "--strategies", strategy, "--config", str(toml))
        async with limiter:
            runs[command, strategy] = await crealia_cli(command, *args, env=env)

    async with trio.open_nursery() as nursery:
        for strategy in lines:
            for command in ("serve", "check-config"):
                nursery.start_soon(one, command, strategy)
    assert len(runs) == 4
    for (command, strategy), run in runs.items():
        assert (run.status, run.err) == (2, lines[strategy] + "\n"), (command, strategy)

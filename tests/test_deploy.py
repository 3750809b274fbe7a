"""The deployment files agree with the server they deploy, and with each other.

Nothing here builds an image or starts a container: the Dockerfile, .dockerignore, the Compose
file and its ``.env.example``, the Redis and HAProxy configurations and the Kubernetes manifests
are parsed and checked against the command line (``crealia serve --help``), the configuration
(``crealia._config``), the protocol's defaults (docs/protocol.md §1) and one another: every
Secret a manifest references exists in ``secret.example.yaml``, the URLs the app is given name
the services, ports and passwords the database and Redis are given, the NetworkPolicies select
the right pods. Where the tools are installed, ``haproxy -c`` checks the balancer's
configuration, a real redis-server runs ``deploy/redis.conf`` with a password, and ``kubectl
kustomize`` builds the manifests (each skipped, saying so, where missing). A real HAProxy runs
the shipped configuration in tests/test_trusted_proxies.py.
"""

from __future__ import annotations

import configparser
import fnmatch
import ipaddress
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import trio
import yaml

import crealia
from crealia._config import _ENV, Config

from ._redis import free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
REDIS_CONF = DEPLOY / "redis.conf"
HAPROXY_CFG = DEPLOY / "haproxy.cfg"
ENV_EXAMPLE = DEPLOY / ".env.example"

#: docs/protocol.md §1: HTTP on 3000, the fast-path WebSocket on 3001.
HTTP_PORT = 3000
WS_PORT = 3001

#: Names the server reads outside ``_ENV`` (each is checked to be in the package's source).
ALSO_READ = {"CREALIA_GC_THRESHOLD", "CREALIA_AI_URL", "CREALIA_AI_MODEL", "CREALIA_AI_API_KEY"}
#: The interpreter's own variables, which the image may set.
INTERPRETER_ENV = {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}


# -- reading the files ---------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


@cache
def load_docs(path: Path) -> tuple[Any, ...]:
    with path.open(encoding="utf-8") as f:
        return tuple(doc for doc in yaml.safe_load_all(f) if doc is not None)


def compose() -> dict[str, Any]:
    (doc,) = load_docs(COMPOSE)
    return doc


def k8s_objects() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        for doc in load_docs(path)
        if doc.get("kind") != "Kustomization"
    ]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [
        o for o in k8s_objects() if o.get("kind") == kind and o["metadata"].get("name") == name
    ]
    assert len(found) == 1, f"expected one {kind} named {name!r} in deploy/k8s, got {len(found)}"
    return found[0]


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, rest), continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def instructions(keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile() if kw == keyword]


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list), f"not exec (JSON) form: {text}"
    assert all(isinstance(part, str) for part in value)
    return value


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in instructions("ENV"):
        for pair in shlex.split(rest):
            name, sep, value = pair.partition("=")
            assert sep, f"ENV without '=' (legacy form): {rest}"
            env[name] = value
    return env


def compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.partition("=")[::2] for item in raw)
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR:?message}`` as if VAR were unset (a required
    variable becomes a placeholder)."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        if op in {":-", "-"}:
            return arg
        if op in {":?", "?"}:
            return f"placeholder-for-{name}"
        return ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", one, value)


def crealia_deployment() -> dict[str, Any]:
    return k8s_object("Deployment", "crealia")


def crealia_container() -> dict[str, Any]:
    containers = crealia_deployment()["spec"]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == "crealia"]
    return container


def k8s_env(container: Mapping[str, Any]) -> dict[str, str]:
    """A container's environment as its process gets it: ``$(NAME)`` expanded from the
    variables listed before it (as Kubernetes does), a Secret's value a placeholder, and the
    variables that only serve such expansions (:func:`k8s_helpers`) left out."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
        else:
            env[item["name"]] = f"placeholder-for-{item['name']}"
    assert not container.get("envFrom"), "list the app's variables in env, so they are checked"
    return {name: value for name, value in env.items() if name not in k8s_helpers(container)}


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(NAME)`` expansion of an env value (only names defined before it)."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in env, f"$({name}) refers to no variable listed before it"
        return env[name]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)


def k8s_helpers(container: Mapping[str, Any]) -> set[str]:
    """The variables of a container only there to be expanded into others (the passwords
    that go into the URLs)."""
    referenced = {
        name
        for item in container.get("env", [])
        for name in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(item.get("value", "")))
    }
    return {item["name"] for item in container.get("env", []) if item["name"] in referenced}


def env_item(container: Mapping[str, Any], name: str) -> dict[str, Any]:
    (item,) = [item for item in container.get("env", []) if item["name"] == name]
    return dict(item)


def secret_ref(container: Mapping[str, Any], name: str) -> tuple[str, str]:
    """The Secret and key the variable ``name`` of ``container`` comes from."""
    ref = env_item(container, name)["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def workload(name: str) -> dict[str, Any]:
    """The one Deployment or StatefulSet called ``name``."""
    kinds = {"Deployment", "StatefulSet"}
    found = [o for o in k8s_objects() if o["kind"] in kinds and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one workload named {name!r}, got {len(found)}"
    return found[0]


def pod_labels(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict(obj["spec"]["template"]["metadata"]["labels"])


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return selector.items() <= labels.items()


def only_container(obj: Mapping[str, Any]) -> dict[str, Any]:
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    return dict(container)


def container_port(container: Mapping[str, Any], port: int | str) -> int:
    """A probe's or Service's target port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"no container port named {port!r} (have {sorted(named)})"
    return named[port]


def seconds(duration: str | int) -> float:
    """A Compose duration ("30s", "1m30s", "1500ms") in seconds."""
    if isinstance(duration, int):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def redis_conf(text: str) -> dict[str, str]:
    directives: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            directives[key.lower()] = value.strip()
    return directives


@cache
def serve_help() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "crealia", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    return done.stdout


def server_env_names() -> set[str]:
    source = "\n".join(
        p.read_text(encoding="utf-8") for p in Path(crealia.__file__).parent.rglob("*.py")
    )
    unread = {name for name in ALSO_READ if f'"{name}"' not in source}
    assert not unread, f"ALSO_READ names the package no longer reads: {sorted(unread)}"
    return {name for name, _field, _kind in _ENV} | ALSO_READ


def app_environments() -> Iterator[tuple[str, dict[str, str]]]:
    """Each place that sets the app's environment, with the variables it sets."""
    yield "Dockerfile ENV", dockerfile_env()
    yield "docker-compose.yml app", compose_env(compose()["services"]["app"])
    yield "k8s Deployment crealia", k8s_env(crealia_container())


def masked(value: str) -> str:
    """A Compose value with each ``${VAR...}`` replaced by ``VAR`` (a URL then parses, its
    password naming the variable it comes from)."""
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}", r"\1", value)


def compose_variable(value: str) -> str:
    """The one ``${VAR...}`` of a Compose value, by name."""
    names = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", value)
    assert len(names) == 1, f"expected one variable in {value!r}"
    return names[0]


def compose_required(value: str) -> bool:
    """Whether every ``${VAR}`` in a Compose value is required (``${VAR:?message}``)."""
    return all(op == ":?" for op in re.findall(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?])?", value))


def migrate_help() -> str:
    argv = [sys.executable, "-m", "crealia", "migrate", "--help"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
    return done.stdout


# -- the files parse, and the defaults are the protocol's -----------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no document"
    if path.parent == K8S:
        for doc in docs:
            assert {"apiVersion", "kind"} <= doc.keys(), doc
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], doc


def test_the_config_defaults_are_the_protocol_ports() -> None:
    config = Config()
    assert (config.port, config.ws_port) == (HTTP_PORT, WS_PORT)


# -- Dockerfile -----------------------------------------------------------------------------------


def test_dockerfile_builds_from_python_slim_and_installs_this_checkout() -> None:
    assert instructions("FROM") == ["python:3.11-slim"]
    runs = " ".join(instructions("RUN"))
    assert re.search(r"pip install\b[^&;]*\s\.(\s|$)", runs), "no `pip install .` of the checkout"


def test_dockerfile_runs_crealia_serve_as_a_non_root_user() -> None:
    (cmd,) = instructions("CMD")
    argv = exec_form(cmd)
    assert argv[:2] == ["crealia", "serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert not instructions("ENTRYPOINT")
    users = instructions("USER")
    assert users, "the image runs as root"
    user = users[-1].partition(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "a numeric USER lets Kubernetes' runAsNonRoot verify it"
    pod_security = crealia_deployment()["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert str(pod_security["runAsUser"]) == user


def test_dockerfile_exposes_the_protocol_ports() -> None:
    exposed = {int(p.partition("/")[0]) for rest in instructions("EXPOSE") for p in rest.split()}
    assert exposed == {HTTP_PORT, WS_PORT} == {Config().port, Config().ws_port}


def test_dockerfile_env_volume_stopsignal_and_healthcheck() -> None:
    env = dockerfile_env()
    assert env["CREALIA_DATA_DIR"] == "/data"
    assert int(env["PORT"]) == HTTP_PORT
    assert int(env["WS_PORT"]) == WS_PORT
    volumes = [v for rest in instructions("VOLUME") for v in exec_form(rest)]
    assert env["CREALIA_DATA_DIR"] in volumes
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    (check,) = instructions("HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    assert "--interval=" in options
    argv = exec_form(command)
    assert argv[:2] == ["python", "-c"]
    assert "urllib" in argv[2] and "/healthz" in argv[2]
    assert "PORT" in argv[2], "the health check follows the PORT the server listens on"
    compile(argv[2], "<HEALTHCHECK>", "exec")


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (last match wins; a
    pattern that matches a parent directory matches what is inside it)."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    candidates = [path] + [str(p) for p in Path(path).parents if str(p) != "."]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if pattern.startswith("**/"):
            hit = any(
                fnmatch.fnmatch(Path(c).name, pattern[3:]) or fnmatch.fnmatch(c, pattern[3:])
                for c in candidates
            )
        else:
            hit = any(fnmatch.fnmatch(c, pattern) for c in candidates)
        if hit:
            excluded = not negate
    return excluded


def test_dockerignore_lets_in_what_the_build_needs() -> None:
    sources: list[str] = []
    for rest in instructions("COPY"):
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        sources += parts[:-1]
    assert sources
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    long_description = setup["metadata"].get("long_description", "")
    needed = re.findall(r"file:\s*(\S+)", long_description)
    for name in needed:
        assert name in sources, f"setup.cfg reads {name}: the Dockerfile must COPY it"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the checkout"
        assert not dockerignore_excludes(source), f".dockerignore keeps {source} out"
        if (ROOT / source).is_dir():
            assert not dockerignore_excludes(f"{source}/__init__.py")
    for kept_out in [".venv/bin/python", ".git/HEAD", "crealia-data/x", "tests/test_deploy.py"]:
        assert dockerignore_excludes(kept_out), f"{kept_out} should stay out of the image"
    assert dockerignore_excludes("crealia/__pycache__/_cli.cpython-311.pyc")


# -- environment variables ------------------------------------------------------------------------


def test_every_app_environment_variable_is_one_the_server_reads() -> None:
    known = server_env_names() | INTERPRETER_ENV
    for where, env in app_environments():
        unknown = sorted(set(env) - known)
        assert not unknown, f"{where} sets variables the server never reads: {unknown}"
    for container in [crealia_container(), *crealia_init_containers()]:
        for helper in k8s_helpers(container):
            assert "valueFrom" in env_item(container, helper), f"{helper}: expanded, not a secret"


def test_every_app_environment_builds_the_recommended_cluster_config() -> None:
    image_env = dockerfile_env()
    for where, env in app_environments():
        merged = {**image_env, **{k: interpolate(v) for k, v in env.items()}}
        config = Config.from_env(merged)
        assert (config.port, config.ws_port) == (HTTP_PORT, WS_PORT), where
        assert config.data_dir == Path("/data"), where
        if where != "Dockerfile ENV":
            # PostgreSQL the store of record, Redis beside it (docs/backplanes.md).
            assert config.database_url, f"{where}: no DATABASE_URL"
            assert config.backplane_url == config.database_url, where
            assert config.redis_url, f"{where}: no REDIS_URL"
            assert config.jwt_secret, f"{where}: no CREALIA_JWT_SECRET"
            assert config.trusted_proxies, f"{where}: no TRUSTED_PROXIES behind the balancer"
            assert urlsplit(config.redis_url).password, f"{where}: Redis without a password"
            assert urlsplit(config.database_url).password, f"{where}: no database password"


def test_the_flags_the_deploy_files_pass_are_serve_and_migrate_flags() -> None:
    help_text = serve_help()
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
    assert {"--host", "--port", "--ws-port", "--data-dir", "--redis", "--database",
            "--jwt-secret", "--trusted-proxies"} <= known  # fmt: skip
    migrate_known = set(re.findall(r"(--[a-z][a-z0-9-]*)", migrate_help()))
    argvs = [exec_form(rest) for rest in instructions("CMD")]
    for service in compose()["services"].values():
        for key in ("command", "entrypoint"):
            if key in service and str(service.get("image", "")).startswith("crealia"):
                value = service[key]
                argvs.append(value if isinstance(value, list) else shlex.split(value))
    for container in [crealia_container(), *crealia_init_containers()]:
        argvs.append([*container.get("command", []), *container.get("args", [])])
    commands = []
    for argv in argvs:
        if not argv:
            continue
        assert argv[0] == "crealia", argv
        commands.append(argv[1])
        assert argv[1] in {"serve", "migrate"}, argv
        flags = known if argv[1] == "serve" else migrate_known
        for arg in argv:
            flag = arg.partition("=")[0]
            if flag.startswith("--"):
                assert flag in flags, f"{flag} is not a `crealia {argv[1]}` flag"
    assert commands.count("migrate") == 2, "Compose and Kubernetes each run crealia migrate"


# -- Compose --------------------------------------------------------------------------------------


def test_compose_app_is_scalable_and_uses_the_protocol_ports() -> None:
    app = compose()["services"]["app"]
    assert "container_name" not in app, "a fixed container name prevents --scale"
    for port in app.get("ports", []):
        spec = str(port if not isinstance(port, dict) else port.get("published", ""))
        assert ":" not in spec and not isinstance(port, dict), f"fixed host port {port!r}"
    exposed = {int(str(p).partition("/")[0]) for p in app.get("expose", [])}
    published = {int(str(p).partition("/")[0]) for p in app.get("ports", [])}
    assert exposed | published == {HTTP_PORT, WS_PORT}
    build = app["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert seconds(app["stop_grace_period"]) >= 10
    assert app.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_compose_app_reaches_postgres_and_redis_with_their_passwords() -> None:
    services = compose()["services"]
    app, postgres, redis_service = services["app"], services["postgres"], services["redis"]
    env = compose_env(app)
    database = urlsplit(masked(env["DATABASE_URL"]))
    assert database.scheme == "postgresql"
    assert database.hostname == "postgres" and database.hostname in services
    assert (database.port or 5432) == 5432
    pg_env = compose_env(postgres)
    assert database.username == pg_env["POSTGRES_USER"]
    assert database.path == f"/{pg_env['POSTGRES_DB']}"
    assert database.password == compose_variable(pg_env["POSTGRES_PASSWORD"]), (
        "DATABASE_URL carries another password than PostgreSQL is given"
    )
    cache = urlsplit(masked(env["REDIS_URL"]))
    assert cache.scheme == "redis"
    assert cache.hostname == "redis" and cache.hostname in services
    assert (cache.port or 6379) == 6379
    command = redis_service["command"]
    password = command[command.index("--requirepass") + 1]
    assert cache.password == compose_variable(password)
    assert re.fullmatch(r"\$\{CREALIA_JWT_SECRET:\?[^}]+\}", env["CREALIA_JWT_SECRET"])
    for value in (env["DATABASE_URL"], env["REDIS_URL"], password):
        assert compose_required(value), f"{value}: Compose must refuse to start without it"
    assert app["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_compose_migrates_the_database_once_before_the_app() -> None:
    services = compose()["services"]
    migrate, app = services["migrate"], services["app"]
    assert migrate["command"] == ["crealia", "migrate"]
    assert migrate["image"] == app["image"]
    assert compose_env(migrate)["DATABASE_URL"] == compose_env(app)["DATABASE_URL"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate.get("restart", "no") == "no", "a one-shot: restarted, it never completes"


def test_compose_postgres_is_persistent_with_a_password_from_the_env_file() -> None:
    doc = compose()
    postgres = doc["services"]["postgres"]
    assert str(postgres["image"]) == "postgres:15"
    assert "container_name" not in postgres and "ports" not in postgres
    mounts = dict(reversed(str(v).split(":")[:2]) for v in postgres["volumes"])
    assert mounts["/var/lib/postgresql/data"] in doc["volumes"], "data belongs in a named volume"
    assert compose_required(compose_env(postgres)["POSTGRES_PASSWORD"])
    assert "synchronous_commit=on" in postgres["command"]
    test = " ".join(postgres["healthcheck"]["test"])
    assert "pg_isready" in test
    assert seconds(postgres["stop_grace_period"]) >= 30


def test_compose_env_example_lists_every_required_variable() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", text))
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "CREALIA_JWT_SECRET"} <= required
    listed = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, line
            listed[name] = value
    assert set(listed) == required
    assert all(value == "" for value in listed.values()), "no secret in an example"
    assert "deploy/.env" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()


def test_compose_redis_has_a_password_and_is_health_checked() -> None:
    redis_service = compose()["services"]["redis"]
    assert str(redis_service["image"]).startswith("redis:7")
    assert "container_name" not in redis_service and "ports" not in redis_service
    mounts = {}
    for volume in redis_service["volumes"]:
        source, target = str(volume).split(":")[:2]
        mounts[target] = source
    conf_target = next(t for t, s in mounts.items() if (COMPOSE.parent / s).resolve() == REDIS_CONF)
    command = redis_service["command"]
    assert command[:2] == ["redis-server", conf_target]
    password = compose_variable(command[command.index("--requirepass") + 1])
    # redis-cli takes the password from REDISCLI_AUTH, not from an argument.
    assert compose_variable(compose_env(redis_service)["REDISCLI_AUTH"]) == password
    test = redis_service["healthcheck"]["test"]
    test = " ".join(test) if isinstance(test, list) else test
    assert "redis-cli ping" in test and "-a " not in test


def test_compose_load_balancer_spreads_both_ports_and_is_the_trusted_proxy() -> None:
    doc = compose()
    lb = doc["services"]["lb"]
    targets = {int(str(p).rsplit(":", 1)[-1].partition("/")[0]) for p in lb["ports"]}
    assert targets == {HTTP_PORT, WS_PORT}
    assert any(
        (COMPOSE.parent / str(v).split(":")[0]).resolve() == HAPROXY_CFG for v in lb["volumes"]
    )
    config = HAPROXY_CFG.read_text(encoding="utf-8")
    binds = {int(m) for m in re.findall(r"^\s*bind\s+\S*:(\d+)", config, re.M)}
    assert binds == {HTTP_PORT, WS_PORT}
    servers = set(re.findall(r"^\s*server-template\s+\S+\s+\d+\s+(\S+)", config, re.M))
    assert servers == {f"app:{HTTP_PORT}", f"app:{WS_PORT}"}
    assert re.findall(r"option httpchk GET (\S+)", config) == ["/readyz", "/readyz"]
    # HTTP mode, so that HAProxy can add X-Forwarded-For (TCP mode would pass a client's own).
    assert re.findall(r"^\s*mode\s+(\S+)", config, re.M) == ["http"]
    assert re.search(r"^\s*option forwardfor\s*$", config, re.M)
    assert re.search(r"^\s*timeout tunnel\s+\S+", config, re.M), "WebSockets need a tunnel timeout"
    # The app trusts the balancer's fixed address alone.
    address = lb["networks"]["default"]["ipv4_address"]
    (subnet,) = [c["subnet"] for c in doc["networks"]["default"]["ipam"]["config"]]
    assert ipaddress.ip_address(address) in ipaddress.ip_network(subnet)
    trusted = compose_env(doc["services"]["app"])["TRUSTED_PROXIES"]
    assert Config(trusted_proxies=trusted).trusted_proxies == (f"{address}/32",)  # type: ignore[arg-type]


#: Debian's haproxy is in /usr/sbin, which a user's PATH may lack.
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
def test_haproxy_accepts_its_configuration() -> None:
    done = subprocess.run([str(HAPROXY), "-c", "-f", str(HAPROXY_CFG)], capture_output=True,
                          text=True, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


# -- Redis configuration --------------------------------------------------------------------------


def test_redis_conf_keeps_nothing_and_may_evict_anything() -> None:
    # Beside PostgreSQL Redis holds only what may be lost (docs/backplanes.md).
    conf = redis_conf(REDIS_CONF.read_text(encoding="utf-8"))
    assert conf["appendonly"] == "no"
    assert conf["save"] == '""', "RDB snapshots are on"
    assert conf["maxmemory-policy"] == "allkeys-lru"
    assert conf["dir"] == "/data"
    assert "requirepass" not in conf, "the password comes from the Secret, not from this file"


async def test_redis_conf_runs_on_a_real_redis_server_with_a_password(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    text = REDIS_CONF.read_text(encoding="utf-8")
    conf = tmp_path / "redis.conf"
    conf.write_text(re.sub(r"^dir /data$", f"dir {tmp_path}", text, count=1, flags=re.M))
    port = free_port()
    process = await trio.lowlevel.open_process(
        [binary, str(conf), "--requirepass", "pw-from-the-secret", "--port", str(port),
         "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with trio.fail_after(10):
            while True:
                assert process.returncode is None, "redis-server refused deploy/redis.conf"
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.02)  # polling for the port to open, bounded above
                    continue
                async with stream:
                    await stream.send_all(b"PING\r\n")
                    assert (await stream.receive_some(64)).startswith(b"-NOAUTH")
                break

            def check() -> dict[str, Any]:
                # The URL as crealia is given it (deploy/k8s/crealia.yaml), the password in it.
                url = f"redis://:pw-from-the-secret@127.0.0.1:{port}/0"
                with redis.Redis.from_url(url, socket_timeout=5) as client:
                    assert client.ping()
                    settings = client.config_get("*")
                    try:
                        client.flushall()
                    except redis.ResponseError as exc:
                        settings["flushall"] = str(exc)
                    return dict(settings)

            settings = await trio.to_thread.run_sync(check)
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
    assert settings["appendonly"] == "no" and settings["save"] == ""
    assert settings["maxmemory-policy"] == "allkeys-lru"
    assert "unknown command" in settings["flushall"]


def test_k8s_redis_runs_the_same_conf_with_the_password_from_the_secret() -> None:
    config_map = k8s_object("ConfigMap", "redis-config")
    assert config_map["data"]["redis.conf"] == REDIS_CONF.read_text(encoding="utf-8")
    service = k8s_object("Service", "redis")
    assert [p["port"] for p in service["spec"]["ports"]] == [6379]
    workloads = [
        o
        for o in k8s_objects()
        if o["kind"] in {"Deployment", "StatefulSet"}
        and selects(service["spec"]["selector"], pod_labels(o))
    ]
    assert len(workloads) == 1, "the redis Service selects exactly one workload"
    (redis_workload,) = workloads
    pod = redis_workload["spec"]["template"]["spec"]
    assert redis_workload["spec"].get("replicas", 1) == 1
    assert redis_workload["spec"]["strategy"]["type"] == "Recreate", "one Redis at a time"
    container = only_container(redis_workload)
    assert str(container["image"]).startswith("redis:7")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "persistentVolumeClaim" not in volumes[mounts["/data"]], "Redis keeps nothing"
    conf_dir = next(p for p, n in mounts.items() if "configMap" in volumes[n])
    assert volumes[mounts[conf_dir]]["configMap"]["name"] == "redis-config"
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[:2] == ["redis-server", f"{conf_dir}/redis.conf"]
    assert argv[argv.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert secret_ref(container, "REDIS_PASSWORD") == secret_ref(container, "REDISCLI_AUTH")
    maxmemory = argv[argv.index("--maxmemory") + 1]
    assert quantity(maxmemory) < quantity(container["resources"]["limits"]["memory"])
    target = container_port(container, service["spec"]["ports"][0]["targetPort"])
    assert target == 6379
    for probe in ("readinessProbe", "livenessProbe"):
        command = " ".join(container[probe]["exec"]["command"])
        assert "redis-cli ping" in command and "-a " not in command


def quantity(text: str) -> int:
    """A memory size as Redis (``768mb``) or Kubernetes (``1Gi``) writes it, in bytes."""
    match = re.fullmatch(r"(\d+)\s*(mb|gb|kb|Mi|Gi|Ki)?", text)
    assert match, text
    unit = {None: 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "Ki": 1024, "Mi": 1024**2,
            "Gi": 1024**3}[match.group(2)]  # fmt: skip
    return int(match.group(1)) * unit


# -- Kubernetes: PostgreSQL -----------------------------------------------------------------------


def test_k8s_postgres_is_a_statefulset_with_a_volume_claim_and_a_headless_service() -> None:
    postgres = workload("postgres")
    assert postgres["kind"] == "StatefulSet"
    assert postgres["spec"].get("replicas", 1) == 1
    service = k8s_object("Service", postgres["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None", "a StatefulSet's governing Service is headless"
    assert selects(service["spec"]["selector"], pod_labels(postgres))
    container = only_container(postgres)
    assert str(container["image"]) == "postgres:15"
    (template,) = postgres["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    data = mounts[template["metadata"]["name"]]
    assert data == "/var/lib/postgresql/data"
    assert "ReadWriteOnce" in template["spec"]["accessModes"]
    pgdata = env_item(container, "PGDATA")["value"]
    assert pgdata.startswith(data + "/"), "PGDATA inside the volume, not its root (lost+found)"
    assert secret_ref(container, "POSTGRES_PASSWORD")[1] == "postgres-password"
    assert "synchronous_commit=on" in container["args"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"][0] == "pg_isready"
    (port,) = [p["port"] for p in service["spec"]["ports"]]
    assert container_port(container, service["spec"]["ports"][0]["targetPort"]) == port == 5432
    # SIGTERM would be a smart shutdown, waiting for crealia's connections until the SIGKILL.
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "pg_ctl stop" in pre_stop and "-m fast" in pre_stop
    wait = int(re.search(r"-t (\d+)", pre_stop).group(1))  # type: ignore[union-attr]
    assert postgres["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > wait
    security = postgres["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True


# -- Kubernetes: Secrets and the network ---------------------------------------------------------


def secret_references() -> Iterator[tuple[str, str, str | None]]:
    """Every reference to a Secret in the manifests: (where, name, key or None for all)."""
    for obj in k8s_objects():
        if obj["kind"] not in {"Deployment", "StatefulSet"}:
            continue
        pod = obj["spec"]["template"]["spec"]
        where = f"{obj['kind']} {obj['metadata']['name']}"
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    yield f"{where} {container['name']} {item['name']}", ref["name"], ref["key"]
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    yield f"{where} {container['name']} envFrom", source["secretRef"]["name"], None
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                yield f"{where} volume {volume['name']}", volume["secret"]["secretName"], None


def test_every_secret_referenced_exists_in_the_example_secret() -> None:
    examples = {
        doc["metadata"]["name"]: {**doc.get("data", {}), **doc.get("stringData", {})}
        for doc in load_docs(K8S / "secret.example.yaml")
        if doc["kind"] == "Secret"
    }
    references = list(secret_references())
    assert {key for _w, _n, key in references} >= {"jwt-secret", "postgres-password",
                                                   "redis-password"}  # fmt: skip
    for where, name, key in references:
        assert name in examples, f"{where}: no Secret {name!r} in secret.example.yaml"
        if key is not None:
            assert key in examples[name], f"{where}: Secret {name!r} has no key {key!r}"
    # ... and the command in its comment creates every key.
    comment = (K8S / "secret.example.yaml").read_text(encoding="utf-8")
    for key in {key for _w, _n, key in references if key}:
        assert f"--from-literal={key}=" in comment, f"the example's command makes no {key!r}"


def selector_of(policy: Mapping[str, Any]) -> dict[str, str]:
    return dict(policy["spec"]["podSelector"]["matchLabels"])


def test_k8s_network_policies_let_only_crealia_reach_redis_and_postgres() -> None:
    policies = [o for o in k8s_objects() if o["kind"] == "NetworkPolicy"]
    crealia_pods = pod_labels(crealia_deployment())
    workloads = [o for o in k8s_objects() if o["kind"] in {"Deployment", "StatefulSet"}]
    for name, port in (("redis", 6379), ("postgres", 5432)):
        target = workload(name)
        labels = pod_labels(target)
        selecting = [
            p for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], labels)
        ]
        assert len(selecting) == 1, f"{name}: expected one NetworkPolicy, got {len(selecting)}"
        (policy,) = selecting
        spec = policy["spec"]
        # It selects that workload's pods and no other's (not crealia's).
        chosen = [o["metadata"]["name"] for o in workloads
                  if selects(spec["podSelector"]["matchLabels"], pod_labels(o))]  # fmt: skip
        assert chosen == [name], f"the {name} policy selects {chosen}"
        assert "Ingress" in spec["policyTypes"]
        assert spec["ingress"], f"{name}: an empty ingress list would shut out crealia too"
        ports = {p["containerPort"] for p in only_container(target)["ports"]}
        for rule in spec["ingress"]:
            assert [p["port"] for p in rule["ports"]] == [port] and port in ports
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{name}: only pods, no {sorted(peer)}"
                labels = peer["podSelector"]["matchLabels"]
                allowed = [o["metadata"]["name"] for o in workloads
                           if selects(labels, pod_labels(o))]  # fmt: skip
                assert allowed == ["crealia"] and selects(labels, crealia_pods), allowed


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_every_manifest() -> None:
    done = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    built = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(done.stdout) if d}
    (kustomization,) = load_docs(K8S / "kustomization.yaml")
    listed = {
        (d["kind"], d["metadata"]["name"])
        for name in kustomization["resources"]
        for d in load_docs(K8S / name)
    }
    assert built == listed
    assert ("Secret", "crealia-secrets") not in built


# -- Kubernetes: crealia --------------------------------------------------------------------------


def crealia_init_containers() -> list[dict[str, Any]]:
    return list(crealia_deployment()["spec"]["template"]["spec"].get("initContainers", []))


def test_k8s_deployment_runs_three_replicas_on_the_protocol_ports() -> None:
    deployment = crealia_deployment()
    assert deployment["spec"]["replicas"] == 3
    container = crealia_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": HTTP_PORT, "ws": WS_PORT}
    assert {Config().port, Config().ws_port} == set(ports.values())


def test_k8s_probes_hit_healthz_and_readyz_on_the_http_port() -> None:
    container = crealia_container()
    liveness = container["livenessProbe"]["httpGet"]
    readiness = container["readinessProbe"]["httpGet"]
    assert liveness["path"] == "/healthz"
    assert readiness["path"] == "/readyz"
    assert container_port(container, liveness["port"]) == HTTP_PORT
    assert container_port(container, readiness["port"]) == HTTP_PORT


def test_k8s_pods_get_time_to_stop_and_have_resources() -> None:
    pod = crealia_deployment()["spec"]["template"]["spec"]
    container = crealia_container()
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= 15
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    pause = int(pre_stop[-1]) if pre_stop and pre_stop[0] == "sleep" else 0
    assert grace >= pause + 10, "preStop plus the server's 10 s shutdown must fit in the grace"
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]
    for obj in (crealia_deployment(), workload("redis"), workload("postgres")):
        spec = obj["spec"]["template"]["spec"]
        assert spec["enableServiceLinks"] is False, "service links inject CREALIA_PORT=tcp://..."


def test_k8s_app_reaches_postgres_and_redis_with_the_secrets() -> None:
    container = crealia_container()
    env = k8s_env(container)
    database = urlsplit(env["DATABASE_URL"])
    assert database.scheme == "postgresql"
    service = k8s_object("Service", str(database.hostname))
    assert (database.port or 5432) in [p["port"] for p in service["spec"]["ports"]]
    postgres = only_container(workload("postgres"))
    assert selects(service["spec"]["selector"], pod_labels(workload("postgres")))
    assert database.username == env_item(postgres, "POSTGRES_USER")["value"]
    assert database.path == "/" + env_item(postgres, "POSTGRES_DB")["value"]
    assert env_item(container, "DATABASE_URL")["value"].count("$(POSTGRES_PASSWORD)") == 1
    assert secret_ref(container, "POSTGRES_PASSWORD") == secret_ref(postgres, "POSTGRES_PASSWORD")
    cache = urlsplit(env["REDIS_URL"])
    assert cache.scheme == "redis"
    service = k8s_object("Service", str(cache.hostname))
    assert (cache.port or 6379) in [p["port"] for p in service["spec"]["ports"]]
    assert env_item(container, "REDIS_URL")["value"].count("$(REDIS_PASSWORD)") == 1
    assert secret_ref(container, "REDIS_PASSWORD") == secret_ref(
        only_container(workload("redis")), "REDIS_PASSWORD"
    )
    assert secret_ref(container, "CREALIA_JWT_SECRET") == ("crealia-secrets", "jwt-secret")


def test_k8s_migrate_runs_before_the_server_on_the_same_image_and_database() -> None:
    (migrate,) = crealia_init_containers()
    container = crealia_container()
    assert [*migrate.get("command", []), *migrate.get("args", [])] == ["crealia", "migrate"]
    assert migrate["image"] == container["image"]
    assert k8s_env(migrate)["DATABASE_URL"] == k8s_env(container)["DATABASE_URL"]
    assert migrate["securityContext"]["readOnlyRootFilesystem"] is True


def test_k8s_service_exposes_both_ports_of_the_pods() -> None:
    service = k8s_object("Service", "crealia")
    labels = crealia_deployment()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    container = crealia_container()
    ports = {
        p["port"]: container_port(container, p["targetPort"]) for p in service["spec"]["ports"]
    }
    assert ports == {HTTP_PORT: HTTP_PORT, WS_PORT: WS_PORT}
    assert all(p.get("name") for p in service["spec"]["ports"]), "multi-port Services need names"


def test_kustomization_applies_everything_but_the_example_secret() -> None:
    (kustomization,) = load_docs(K8S / "kustomization.yaml")
    resources = kustomization["resources"]
    for name in resources:
        assert (K8S / name).is_file(), name
    assert "secret.example.yaml" not in resources
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert manifests - set(resources) == {"secret.example.yaml"}

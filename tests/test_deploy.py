"""The deployment files agree with the server they deploy.

Nothing here builds an image or starts a container: the Dockerfile, .dockerignore, the Compose
file, the Redis and HAProxy configurations and the Kubernetes manifests are parsed and checked
against the command line (``crealia serve --help``), the configuration (``crealia._config``) and
the protocol's defaults (docs/protocol.md §1).
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

import crealia
from crealia._config import _ENV, Config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
REDIS_CONF = DEPLOY / "redis.conf"
HAPROXY_CFG = DEPLOY / "haproxy.cfg"

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
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            env[item["name"]] = f"placeholder-for-{item['name']}"
    assert not container.get("envFrom"), "list the app's variables in env, so they are checked"
    return env


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


def test_every_app_environment_builds_the_cluster_config() -> None:
    image_env = dockerfile_env()
    for where, env in app_environments():
        merged = {**image_env, **{k: interpolate(v) for k, v in env.items()}}
        config = Config.from_env(merged)
        assert (config.port, config.ws_port) == (HTTP_PORT, WS_PORT), where
        assert config.data_dir == Path("/data"), where
        if where != "Dockerfile ENV":
            assert config.redis_url, f"{where}: no REDIS_URL"
            assert config.jwt_secret, f"{where}: no CREALIA_JWT_SECRET"


def test_the_flags_the_deploy_files_pass_are_serve_flags() -> None:
    help_text = serve_help()
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
    assert {"--host", "--port", "--ws-port", "--data-dir", "--redis", "--jwt-secret"} <= known
    argvs = [exec_form(rest) for rest in instructions("CMD")]
    app = compose()["services"]["app"]
    for key in ("command", "entrypoint"):
        if key in app:
            argvs.append(app[key] if isinstance(app[key], list) else shlex.split(app[key]))
    container = crealia_container()
    argvs.append([*container.get("command", []), *container.get("args", [])])
    for argv in argvs:
        if argv and argv[0] == "crealia":
            assert argv[1] == "serve", argv
        for arg in argv:
            flag = arg.partition("=")[0]
            if flag.startswith("--"):
                assert flag in known, f"{flag} is not a `crealia serve` flag:\n{help_text}"


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


def test_compose_app_uses_redis_and_a_required_secret() -> None:
    services = compose()["services"]
    app = services["app"]
    env = compose_env(app)
    url = urlsplit(env["REDIS_URL"])
    assert url.scheme == "redis"
    assert url.hostname == "redis" and url.hostname in services
    assert (url.port or 6379) == 6379
    assert re.fullmatch(r"\$\{CREALIA_JWT_SECRET:\?[^}]+\}", env["CREALIA_JWT_SECRET"])
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_redis_is_persistent_and_health_checked() -> None:
    doc = compose()
    redis = doc["services"]["redis"]
    assert str(redis["image"]).startswith("redis:7")
    assert "container_name" not in redis
    mounts = {}
    for volume in redis["volumes"]:
        source, target = str(volume).split(":")[:2]
        mounts[target] = source
    conf_target = next(t for t, s in mounts.items() if (COMPOSE.parent / s).resolve() == REDIS_CONF)
    assert conf_target in redis["command"]
    assert mounts["/data"] in doc["volumes"], "Redis data belongs in a named volume"
    test = redis["healthcheck"]["test"]
    test = " ".join(test) if isinstance(test, list) else test
    assert "redis-cli ping" in test
    assert seconds(redis.get("stop_grace_period", "10s")) >= 10


def test_compose_load_balancer_spreads_both_ports_over_the_app() -> None:
    lb = compose()["services"]["lb"]
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


# -- Redis configuration --------------------------------------------------------------------------


def test_redis_conf_is_durable_and_never_evicts() -> None:
    conf = redis_conf(REDIS_CONF.read_text(encoding="utf-8"))
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] in {"everysec", "always"}
    assert conf["save"] not in {"", '""'}, "RDB snapshots are off"
    assert conf["maxmemory-policy"] == "noeviction"
    assert conf["dir"] == "/data"


def test_k8s_redis_uses_the_same_redis_conf_on_a_persistent_volume() -> None:
    config_map = k8s_object("ConfigMap", "redis-config")
    assert config_map["data"]["redis.conf"] == REDIS_CONF.read_text(encoding="utf-8")
    service = k8s_object("Service", "redis")
    assert [p["port"] for p in service["spec"]["ports"]] == [6379]
    workloads = [
        o
        for o in k8s_objects()
        if o["kind"] in {"Deployment", "StatefulSet"}
        and service["spec"]["selector"].items()
        <= o["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(workloads) == 1, "the redis Service selects exactly one workload"
    (redis,) = workloads
    pod = redis["spec"]["template"]["spec"]
    assert redis["spec"].get("replicas", 1) == 1
    (container,) = pod["containers"]
    assert str(container["image"]).startswith("redis:7")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claim = volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"]
    k8s_object("PersistentVolumeClaim", claim)
    conf_dir = next(p for p, n in mounts.items() if "configMap" in volumes[n])
    assert volumes[mounts[conf_dir]]["configMap"]["name"] == "redis-config"
    argv = [*container.get("command", []), *container.get("args", [])]
    assert f"{conf_dir}/redis.conf" in argv
    target = container_port(container, service["spec"]["ports"][0]["targetPort"])
    assert target == 6379
    probe = " ".join(container["readinessProbe"]["exec"]["command"])
    assert "redis-cli ping" in probe


# -- Kubernetes: crealia --------------------------------------------------------------------------


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
    assert pod["enableServiceLinks"] is False, "service links inject CREALIA_PORT=tcp://..."


def test_k8s_app_uses_the_redis_service_and_the_secret() -> None:
    container = crealia_container()
    env = {item["name"]: item for item in container["env"]}
    url = urlsplit(env["REDIS_URL"]["value"])
    assert url.scheme == "redis"
    service = k8s_object("Service", str(url.hostname))
    assert (url.port or 6379) in [p["port"] for p in service["spec"]["ports"]]
    ref = env["CREALIA_JWT_SECRET"]["valueFrom"]["secretKeyRef"]
    secret = k8s_object("Secret", ref["name"])
    assert ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}


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

"""Backplanes are passed in, chosen by URL through the ``crealia.backplanes`` entry points, and
held to one contract: ``crealia.testing.check_backplane`` over SQLite, over Redis (a real
redis-server) and over a test-only backplane written against the public API alone, which also
serves real sessions. The suite itself fails a backplane that breaks the contract.

Policy: loopback only, port 0, a deadline on every I/O test, real servers and stores; no sleeps.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from crealia import Config, ConfigurationError, PreparedWrite, open_server
from crealia._cli import main
from crealia._plugins import BackplaneRegistry
from crealia.abc import Backplane
from crealia.backplanes.sqlite import SQLiteBackplane
from crealia.testing import check_backplane

from ._memory_backplane import MemoryBackplane, open_memory_backplane
from ._redis import RedisServer, run_redis
from .conftest import make_config, opened
from .test_protocol import insert, set_op

Factory = Callable[[], AbstractAsyncContextManager[Backplane]]


def _factory(url: str, config: Config) -> Factory:
    """What the server does with a URL: the entry point its scheme names, called with it."""
    registry = BackplaneRegistry.discover()
    return lambda: registry.open(url, config)


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with run_redis(tmp_path / "redis") as server:
        yield server


# -- the suite over every backplane -----------------------------------------------------------


#: The default bound on a history's memory, and the least one: with it, most resumes the suite
#: makes read their events back from the store (issue 17).
MEMORY_BOUNDS = pytest.mark.parametrize("memory", [4 << 20, 64 * 1024])


@MEMORY_BOUNDS
async def test_check_backplane_passes_on_sqlite(tmp_path: Path, memory: int) -> None:
    dirs = itertools.count()
    registry = BackplaneRegistry.discover()

    def fresh() -> AbstractAsyncContextManager[Backplane]:
        config = make_config(tmp_path / f"d{next(dirs)}", history_limit=1000,
                             history_memory_bytes=memory)  # fmt: skip
        return registry.open(None, config)  # no URL: the default, SQLite in the data dir

    with trio.fail_after(300):
        await check_backplane(fresh)


@MEMORY_BOUNDS
async def test_check_backplane_passes_on_redis(
    tmp_path: Path, redis_server: RedisServer, memory: int
) -> None:
    config = make_config(tmp_path / "d", history_limit=1000, history_memory_bytes=memory)
    with trio.fail_after(300):
        await check_backplane(_factory(redis_server.url, config))


async def test_check_backplane_passes_on_a_backplane_defined_in_tests() -> None:
    with trio.fail_after(300):
        await check_backplane(lambda: open_memory_backplane(Config(history_limit=1000)))


def test_memory_backplane_uses_only_the_public_api() -> None:
    """tests/_memory_backplane.py imports crealia's public modules only, and from them only
    what they export: what it passes, a third party's backplane can pass."""
    source = (Path(__file__).parent / "_memory_backplane.py").read_text(encoding="utf-8")
    public = {"crealia", "crealia.abc", "crealia.testing"}
    used: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            used.setdefault(node.module, set()).update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                used.setdefault(alias.name, set())
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            # crealia._something reached through an attribute instead of an import.
            assert not (isinstance(node.value, ast.Name) and node.value.id == "crealia"), (
                f"_memory_backplane.py reads crealia.{node.attr}"
            )
    ours = {module: names for module, names in used.items() if module.split(".")[0] == "crealia"}
    assert {"crealia", "crealia.abc"} <= ours.keys() <= public, sorted(ours)
    for module, names in ours.items():
        exported = set(importlib.import_module(module).__all__)
        assert names <= exported, f"{module} does not export {sorted(names - exported)}"


# -- the suite catches a backplane that breaks the contract -----------------------------------


@attrs.define(eq=False)
class _ForgetsIds(MemoryBackplane):
    """Takes every resend for a new change."""

    async def commit_change(self, user: Any, change: Any, *, strategy: str = "manual") -> Any:
        self._project(user.project_id).changes.clear()
        return await super().commit_change(user, change, strategy=strategy)


@attrs.define(eq=False)
class _HalfWrites(MemoryBackplane):
    """Records a change's id only after a checkpoint past its event: cancelled there, the
    change is in the history but its id is not, and the resend applies it again."""

    async def commit_change(self, user: Any, change: Any, *, strategy: str = "manual") -> Any:
        project = self._project(user.project_id)
        async with project.lock:
            first = project.changes.get(change.change_id)
            if first is not None:
                return self._duplicate(first, user, change)
            prepared = project.sequencer.prepare_change(user, change, strategy=strategy)
            self._committed(project, prepared)
            await trio.lowlevel.checkpoint()
            project.changes[change.change_id] = prepared.record  # type: ignore[assignment]
            return prepared.outcome

    @staticmethod
    def _duplicate(first: Any, user: Any, change: Any) -> Any:
        from crealia import Sequencer

        return Sequencer.duplicate(first, user, change)


@attrs.define(eq=False)
class _LateListeners(MemoryBackplane):
    """Tells the listeners of an event only with the next write (after returning)."""

    held: list[tuple[Any, Any]] = attrs.Factory(list)

    def _committed(self, project: Any, prepared: PreparedWrite) -> None:
        for listener, event in self.held:
            listener.on_durable(event)
        self.held.clear()
        project.sequencer.commit(prepared)
        for conflict in prepared.conflicts:
            project.conflicts[conflict.id] = conflict
        if prepared.event is not None:
            self.held.extend((listener, prepared.event) for listener in project.listeners)
        for listener in list(project.listeners):
            if prepared.new_conflicts:
                listener.on_conflicts(prepared.new_conflicts)


@pytest.mark.parametrize(
    ("broken", "check", "why"),
    [
        (_ForgetsIds, "idempotency", "the same change resent"),
        (_HalfWrites, "cancellation", "is in the history as"),
        (_LateListeners, "ordering", "before its listener heard it"),
    ],
)
async def test_check_backplane_fails_a_backplane_that_breaks_the_contract(
    broken: type[MemoryBackplane], check: str, why: str
) -> None:
    with trio.fail_after(120):
        with pytest.raises(AssertionError, match=f"check_backplane {check}: .*{why}"):
            await check_backplane(lambda: _opened(broken))


class _opened:  # an async context manager, named like the function it stands for
    def __init__(self, kind: type[MemoryBackplane]) -> None:
        self.backplane = kind(config=Config(history_limit=1000))

    async def __aenter__(self) -> MemoryBackplane:
        return self.backplane

    async def __aexit__(self, *exc: object) -> None:
        self.backplane.closed = True


# -- a backplane passed in serves real sessions -----------------------------------------------


async def test_a_backplane_passed_in_serves_a_real_session_and_stays_the_callers(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = make_config(tmp_path / "data")
    with trio.fail_after(30):
        async with open_memory_backplane(config) as backplane:
            async with open_server(config, backplane=backplane) as server:
                assert server.backplane is backplane
                async with opened(server, nursery) as clients:
                    alice = await clients.join("alice")
                    bob = await clients.join("bob")
                    ack = await alice.request("timeline_change", insert("c1", "clip", v=1))
                    assert ack["type"] == "ack" and ack["data"]["status"] == "applied", ack
                    event = await bob.event("timeline_change", seq=1)
                    assert event["data"]["payload"]["changes"][0]["element_id"] == "clip"
                    comment = await bob.request(
                        "comment_add", {"comment": {"id": "k", "text": "hi"}}
                    )
                    assert comment["type"] == "ack" and comment["data"]["seq"] == 2, comment
                    await alice.event("comment_add", seq=2)
                    await alice.send("cursor_update", {"position": {"x": 1, "y": 2}})
                    cursor = await bob.event("cursor_update")
                    assert cursor["data"]["user_id"] == "alice"
                    conflict = await bob.request("timeline_change", set_op("c2", "clip", "v", 2, 0))
                    assert conflict["data"]["status"] in ("conflict", "applied"), conflict
                    carol = await clients.raw()
                    welcome = await carol.hello(clients.token("carol"), "p1", resume=1,
                                                epoch=alice.welcome["epoch"])  # fmt: skip
                    assert "snapshot" not in welcome and welcome["replayed"] >= 1, welcome
                    replayed = await carol.event("comment_add", seq=2)
                    assert replayed["data"]["payload"]["comment"]["text"] == "hi"
                async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
                    ready = await http.get("/readyz")
                assert ready.status_code == 200, ready.text
                assert ready.json()["checks"] == {
                    "storage": "ok", "backplane": "ok", "event_loop": "ok"
                }  # fmt: skip
            # The server is gone; the backplane is still the caller's, and open.
            assert not backplane.closed
            snapshot = await backplane.snapshot("p1")
            assert snapshot["seq"] >= 2 and snapshot["elements"]["clip"]["type"] == "clip"
    # A backplane handed in is not opened from the config: no SQLite store in the data dir.
    assert not (tmp_path / "data" / "crealia.sqlite3").exists()
    assert (tmp_path / "data" / "ops.sqlite3").exists()


async def test_the_default_backplane_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_server(make_config(tmp_path / "data")) as server:
            assert isinstance(server.backplane, SQLiteBackplane)
            assert server.backplane.store.path == tmp_path / "data" / "crealia.sqlite3"
            elsewhere = tmp_path / "elsewhere"
        config = make_config(tmp_path / "data2", backplane_url=f"sqlite://{elsewhere}")
        async with open_server(config) as server:
            assert isinstance(server.backplane, SQLiteBackplane)
            assert server.backplane.store.path == elsewhere / "crealia.sqlite3"


# -- choosing a backplane by URL ---------------------------------------------------------------


def test_builtin_backplanes_register_through_the_entry_points() -> None:
    registry = BackplaneRegistry.discover()
    builtin = {p.name: p for p in registry.plugins if p.distribution == "crealia"}
    assert {name: p.target for name, p in builtin.items()} == {
        "postgresql": "crealia.backplanes.postgresql:open_backplane",
        "redis": "crealia.backplanes.redis:open_backplane",
        "sqlite": "crealia.backplanes.sqlite:open_backplane",
    }
    for url, name in (("sqlite:", "sqlite"), ("redis://h:1/0", "redis"), ("rediss://h", "redis"),
                      ("unix:///tmp/redis.sock", "redis"), ("REDIS://h", "redis"),
                      ("postgresql://h/db", "postgresql"),
                      ("postgres://h/db", "postgresql")):  # fmt: skip
        assert registry.resolve(url) == name, url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "nats://127.0.0.1:4222",
            r"unknown scheme 'nats'; known: postgres, postgresql, redis, rediss, sqlite, unix",
        ),
        ("127.0.0.1:6379", r"has no scheme \(the part before the colon, as in sqlite:\); known"),
        ("sqlite://somehost/dir", r"expected sqlite: \(the data dir\), sqlite:///absolute/dir"),
        ("redis://127.0.0.1:notaport/0", r"backplane URL 'redis://127.0.0.1:notaport/0': Port"),
    ],
)
async def test_an_unusable_backplane_url_is_refused_naming_it(
    tmp_path: Path, url: str, message: str
) -> None:
    config = make_config(tmp_path / "data", backplane_url=url)
    with trio.fail_after(20), pytest.raises(ConfigurationError, match=message):
        async with open_server(config):
            pytest.fail("the server must not start")  # pragma: no cover


async def test_an_unknown_scheme_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", backplane_url="nats://x")
    with trio.fail_after(20), pytest.raises(ConfigurationError):
        async with open_server(config):
            pytest.fail("the server must not start")  # pragma: no cover
    assert not (tmp_path / "data").exists()


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A throwaway distribution on sys.path registering two backplanes: ``memory`` (the test
    backplane's factory) and ``broken`` (a module that fails on import)."""
    site = tmp_path / "site"
    dist_info = site / "crealia_backplane_example-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: crealia-backplane-example\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[crealia.backplanes]\n"
        "memory = tests._memory_backplane:open_backplane\n"
        "broken = crealia_backplane_example_broken:open_backplane\n"
    )
    (site / "crealia_backplane_example_broken.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(site))
    try:
        yield site
    finally:
        sys.modules.pop("crealia_backplane_example_broken", None)


async def test_a_third_party_backplane_is_chosen_by_its_scheme(
    third_party: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    with trio.fail_after(30):
        async with open_server(make_config(tmp_path / "data", backplane_url="memory:")) as server:
            assert isinstance(server.backplane, MemoryBackplane)
            async with opened(server, nursery) as clients:
                alice = await clients.join("alice")
                ack = await alice.request("timeline_change", insert("c1", "clip"))
                assert ack["data"]["seq"] == 1, ack
        assert server.backplane.closed  # the server opened it: the server closed it


async def test_a_backplane_plugin_that_fails_to_load_is_reported_with_its_distribution(
    third_party: Path, tmp_path: Path
) -> None:
    registry = BackplaneRegistry.discover()
    (info,) = [p for p in registry.plugins if p.name == "broken"]
    assert (info.distribution, info.version) == ("crealia-backplane-example", "1.0")
    assert "RuntimeError: boom" in str(info.error)
    assert "memory" in registry.factories  # the others still load
    config = make_config(tmp_path / "data", backplane_url="broken://x")
    with (
        trio.fail_after(20),
        pytest.raises(
            ConfigurationError,
            match=r"backplane 'broken' from crealia-backplane-example 1.0 failed to load: "
            r"RuntimeError: boom",
        ),
    ):
        async with open_server(config):
            pytest.fail("the server must not start")  # pragma: no cover


# -- config: --backplane, CREALIA_BACKPLANE, and the older --redis / REDIS_URL / redis_url ------


def test_redis_url_is_an_older_name_of_backplane_url(tmp_path: Path) -> None:
    assert Config(redis_url="redis://a:1/0").backplane_url == "redis://a:1/0"
    assert Config(backplane_url="sqlite:").redis_url is None
    assert Config(redis_url="redis://a:1/0", backplane_url="redis://a:1/0").backplane_url
    with pytest.raises(ConfigurationError, match=r"backplane_url .* and redis_url, its older"):
        Config(redis_url="redis://a:1/0", backplane_url="sqlite:")
    env = {"REDIS_URL": "redis://env:1/0"}
    from_env = Config.from_env(env)
    assert (from_env.backplane_url, from_env.redis_url) == ("redis://env:1/0", "redis://env:1/0")
    assert Config.from_env({**env, "CREALIA_BACKPLANE": "sqlite:"}).backplane_url == "sqlite:"
    flag = Config.from_env(env, backplane_url="redis://flag:1/0")
    assert (flag.backplane_url, flag.redis_url) == ("redis://flag:1/0", None)
    assert Config.from_env(env, redis_url="redis://old-flag:1/0").backplane_url == (
        "redis://old-flag:1/0"
    )
    toml = tmp_path / "crealia.toml"
    toml.write_text('redis_url = "redis://file:1/0"\n')
    assert Config.from_env({}, config_file=toml).backplane_url == "redis://file:1/0"
    overridden = Config.from_env({"CREALIA_BACKPLANE": "sqlite:"}, config_file=toml)
    assert (overridden.backplane_url, overridden.redis_url) == ("sqlite:", None)


def test_cli_serve_refuses_an_unknown_backplane_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --redis, the older name, takes only Redis URLs; --backplane any installed backplane's.
    for flag, line in (
        ("--backplane", "crealia: backplane URL 'nats://127.0.0.1:4222': unknown scheme 'nats'; "
                        "known: postgres, postgresql, redis, rediss, sqlite, unix"),
        ("--redis", "crealia: --redis nats://127.0.0.1:4222: must be a redis://host[:port], "
                    "rediss://host[:port] or unix:///path URL"),
    ):  # fmt: skip
        status = main(["serve", flag, "nats://127.0.0.1:4222", "--data-dir", str(tmp_path),
                       "--port", "0", "--ws-port", "0",
                       "--jwt-secret-file", str(_secret(tmp_path))])  # fmt: skip
        err = capsys.readouterr().err
        assert status == 2, err
        assert err.splitlines() == [line], err


def _secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text("a-test-secret-of-at-least-32-bytes-long!!")
    return path


# -- the core names no backplane -------------------------------------------------------------


def test_the_core_imports_no_backplane_and_tests_no_redis_url() -> None:
    """Only the adapters in crealia/backplanes/ import redis or name a backplane; ``redis_url``
    lives on in the config, as the older name of ``backplane_url``, and nowhere else."""
    core = sorted((Path(__file__).resolve().parent.parent / "crealia").glob("*.py"))
    assert core
    for path in core:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                if isinstance(node, ast.Attribute) and node.attr == "redis_url":
                    assert path.name == "_config.py", f"{path.name} reads redis_url"
                continue
            for name in names:
                assert not name.startswith(("redis", "backplanes", "crealia.backplanes")), (
                    f"{path.name} imports {name}"
                )

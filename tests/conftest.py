"""Shared fixtures. Policy: loopback only, port 0, a deadline on every I/O test, real servers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from crealia import Config, Server, open_server
from crealia._storage import Store
from crealia.backplanes.sqlite import SQLiteBackplane

from ._browser import browser, crealia_server, pages  # noqa: F401 - fixtures
from ._netns import enter_loopback_namespace, loopback_only_reason
from ._wsclient import RawClient, open_raw_client

JWT_SECRET = "test-secret-of-at-least-32-bytes-long!!"


def pytest_configure(config: pytest.Config) -> None:
    # Before any test, server or thread: the suite runs on a network that is only loopback.
    enter_loopback_namespace()


@pytest.fixture
def loopback_only() -> None:
    """Skip the test, saying why, unless the suite runs in a loopback-only network namespace
    (WebRTC tests: their peers would otherwise gather every interface of the machine)."""
    reason = loopback_only_reason()
    if reason is not None:
        pytest.skip(f"WebRTC media must stay on loopback: {reason}")


def make_config(data_dir: Path, **overrides: object) -> Config:
    values: dict[str, object] = {
        "port": 0,
        "ws_port": 0,
        "data_dir": data_dir,
        "jwt_secret": JWT_SECRET,
        "room_grace": 0.2,
        "hello_timeout": 2.0,
    }
    values.update(overrides)
    return Config(**values)  # type: ignore[arg-type]


def data_store(server: Server) -> Store:
    """The projects' store of a server on the SQLite backplane (the default)."""
    backplane = server.backplane
    assert isinstance(backplane, SQLiteBackplane), backplane
    return backplane.store


@pytest.fixture
async def server(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    """The server, in this test's nursery. ``@pytest.mark.chain("manual", ...)`` sets the default
    strategy chain (e.g. to keep conflicts pending for a person);
    ``@pytest.mark.settings(**config)`` overrides config fields."""
    overrides: dict[str, object] = {}
    marker = request.node.get_closest_marker("chain")
    if marker is not None:
        overrides["strategy_chain"] = tuple(marker.args)
    settings = request.node.get_closest_marker("settings")
    if settings is not None:
        overrides.update(settings.kwargs)
    async with open_server(make_config(tmp_path / "data", **overrides)) as srv:
        yield srv


@pytest.fixture(params=["ws", "http"])
def endpoint(request: pytest.FixtureRequest) -> str:
    """Which WebSocket endpoint a test talks to: the fast path or the HTTP app's /ws."""
    return str(request.param)


def ws_url(server: Server, endpoint: str) -> str:
    if endpoint == "ws":
        return f"ws://127.0.0.1:{server.ws_port}/ws"
    return f"ws://127.0.0.1:{server.http_port}/ws"


class Clients:
    """Opens raw protocol clients against one server and endpoint, in the test's nursery."""

    def __init__(self, server: Server, endpoint: str, nursery: trio.Nursery) -> None:
        self.server = server
        self.endpoint = endpoint
        self.nursery = nursery
        self.url = ws_url(server, endpoint)
        self.opened: list[RawClient] = []

    def token(self, user: str, project: str = "p1", role: str = "editor", **kw: object) -> str:
        return self.server.issue_token(user, project, role, **kw)  # type: ignore[arg-type]

    async def raw(self, **kwargs: object) -> RawClient:
        client = await open_raw_client(self.nursery, self.url, **kwargs)  # type: ignore[arg-type]
        self.opened.append(client)
        return client

    async def aclose(self) -> None:
        with trio.move_on_after(5):
            for client in self.opened:
                await client.aclose()

    async def join(
        self, user: str, project: str = "p1", role: str = "editor", **hello: object
    ) -> RawClient:
        client = await self.raw()
        client.welcome = await client.hello(self.token(user, project, role), project, **hello)
        return client


@pytest.fixture
async def clients(server: Server, endpoint: str, nursery: trio.Nursery) -> AsyncIterator[Clients]:
    opened = Clients(server, endpoint, nursery)
    try:
        yield opened
    finally:
        await opened.aclose()


@asynccontextmanager
async def opened(server: Server, nursery: trio.Nursery) -> AsyncIterator[Clients]:
    """Raw clients of ``server``'s fast path, closed when the block ends."""
    clients = Clients(server, "ws", nursery)
    try:
        yield clients
    finally:
        await clients.aclose()

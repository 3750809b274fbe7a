"""Strategy plugins: the example plugin installs and is discovered, projects choose their chain
over REST, broken plugins are reported with their distribution, and crealia.testing's
check_strategy holds every strategy to the contract.

Policy: loopback only, port 0, a deadline on every I/O test, real servers; no sleeps.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from crealia import Config, ConfigurationError, Server, open_server
from crealia._plugins import StrategyRegistry
from crealia._strategy import DECLINE, ConflictStrategy, ResolutionContext
from crealia.testing import check_strategy, make_conflict, make_context

from ._plugin_install import install_plugin, normalized
from .conftest import Clients, make_config

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugins" / "crealia-longest-text"
BUILTINS = ("merge", "priority", "ai", "manual")
#: The servers here start with a chain of built-ins that always load; tests set their own.
BASE_CHAIN = ("priority",)


@pytest.fixture(scope="session")
def longest_plugin(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The example plugin, pip-installed into this venv (once per version): (name, version)."""
    return install_plugin(PLUGIN, tmp_path_factory)


@pytest.fixture
async def server(longest_plugin: tuple[str, str], tmp_path: Path) -> AsyncIterator[Server]:
    """Replaces conftest's server: started after the plugin is installed."""
    async with open_server(make_config(tmp_path / "data", strategy_chain=BASE_CHAIN)) as srv:
        yield srv


def bearer(server: Server, user: str, role: str, project: str = "p1") -> dict[str, str]:
    return {"Authorization": f"Bearer {server.issue_token(user, project, role)}"}  # type: ignore[arg-type]


async def put_chain(
    server: Server, user: str, role: str, body: dict[str, Any], project: str = "p1"
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        return await http.put(
            f"/api/projects/{project}/strategies", json=body, headers=bearer(server, user, role)
        )


async def get(server: Server, path: str, user: str = "carol", role: str = "owner") -> Any:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        response = await http.get(path, headers=bearer(server, user, role))
    assert response.status_code == 200, response.text
    return response.json()


# -- discovery ----------------------------------------------------------------------------------


def test_discover_lists_the_installed_plugin_with_its_distribution(
    longest_plugin: tuple[str, str],
) -> None:
    name, version = longest_plugin
    registry = StrategyRegistry.discover()
    (info,) = [p for p in registry.plugins if p.name == "longest"]
    assert normalized(info.distribution) == normalized(name)
    assert info.version == version
    assert info.target == "crealia_longest_text:LongestTextStrategy"
    assert info.error is None
    assert "longest" in registry.names()
    strategy = registry.create("longest", {"min_confidence": 0.5})
    assert strategy.name == "longest"
    with pytest.raises(ConfigurationError, match="strategy 'longest': unknown options"):
        registry.create("longest", {"colour": "blue"})


def test_builtins_register_through_the_same_entry_points() -> None:
    registry = StrategyRegistry.discover()
    for info in registry.plugins:
        if info.name in BUILTINS:
            assert info.distribution == "crealia"
            assert info.target.startswith(f"crealia.strategies.{info.name}:")


def test_code_registrations_win_and_are_listed_as_such() -> None:
    registry = StrategyRegistry.discover({"priority": NeverSure, "mine": NeverSure})
    assert registry.factories["priority"] is NeverSure
    mine = [p for p in registry.plugins if p.name == "mine"]
    assert [p.distribution for p in mine] == ["(registered in code)"]


async def test_cli_strategies_lists_the_plugin(longest_plugin: tuple[str, str]) -> None:
    name, version = longest_plugin
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "crealia", "strategies"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=ROOT,
        )
    out = result.stdout.decode()
    (line,) = [line for line in out.splitlines() if line.split()[:1] == ["longest"]]
    assert f"{name} {version}" in line
    assert "crealia_longest_text:LongestTextStrategy" in line
    assert "FAILED" not in line
    broken = any(p.error for p in StrategyRegistry.discover().plugins)
    assert result.returncode == (1 if broken else 0), out


async def test_plugin_own_test_suite_passes(longest_plugin: tuple[str, str]) -> None:
    with trio.fail_after(120):
        result = await trio.run_process(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=PLUGIN,
        )
    out = result.stdout.decode()
    assert result.returncode == 0, f"{out}\n{result.stderr.decode()}"
    assert re.search(r"\d+ passed", out), out


# -- a project's chain over REST ------------------------------------------------------------------


def set_op(change_id: str, prop: str, value: object, base: int) -> dict[str, object]:
    return {
        "change_id": change_id,
        "changes": [
            {"op": "set", "element_id": "clip", "prop": prop, "value": value, "base": base}
        ],
    }


async def test_project_chain_with_plugin_settles_text_conflict_for_every_member(
    clients: Clients,
) -> None:
    server = clients.server
    with trio.fail_after(20):
        response = await put_chain(
            server, "carol", "owner", {"strategies": ["longest", "priority"], "options": {}}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["strategies"] == ["longest", "priority"]
        assert "longest" in body["available"]
        chain = await get(server, "/api/projects/p1/strategies", "vic", "viewer")
        assert chain["strategies"] == ["longest", "priority"]

        carol = await clients.join("carol", role="owner")
        alice = await clients.join("alice")
        bob = await clients.join("bob")
        vic = await clients.join("vic", role="viewer")
        insert = {
            "change_id": "c1",
            "changes": [
                {"op": "insert", "element_id": "clip", "element_type": "clip",
                 "props": {"label": "intro", "start": 0}}
            ],
        }  # fmt: skip
        assert (await alice.request("timeline_change", insert))["data"]["seq"] == 1
        await alice.request("timeline_change", set_op("c2", "label", "Opening", 1))
        reply = await bob.request("timeline_change", set_op("c3", "label", "Intro, wide shot", 1))
        assert reply["data"]["status"] == "conflict", reply
        (cid,) = reply["data"]["conflicts"]

        for member in (carol, alice, bob, vic):
            pushed = await member.expect_type("conflict_resolved", conflict_id=cid)
            resolution = pushed["data"]["resolution"]
            assert resolution["strategy"] == "longest"
            assert resolution["choice"] == "incoming"
            assert resolution["value"] == "Intro, wide shot"
            assert resolution["confidence"] == round(1 - 7 / 16 / 2, 3)
            assert "longer text of clip.label" in resolution["explanation"]
        seq = pushed["data"]["seq"]

        snapshot = await get(server, "/api/projects/p1/snapshot")
        assert snapshot["seq"] >= seq
        assert snapshot["elements"]["clip"]["props"]["label"] == "Intro, wide shot"
        listed = await get(server, "/api/collaboration/conflicts?projectId=p1&status=resolved")
        (conflict,) = [c for c in listed["conflicts"] if c["id"] == cid]
        assert conflict["strategy"] == "longest"
        assert conflict["resolution"]["strategy"] == "longest"


async def test_project_chain_falls_through_what_the_plugin_declines(clients: Clients) -> None:
    server = clients.server
    with trio.fail_after(20):
        body = {"strategies": ["longest", "priority"], "options": {"priority": {"tie": "first"}}}
        assert (await put_chain(server, "carol", "owner", body)).status_code == 200
        alice = await clients.join("alice")
        bob = await clients.join("bob")
        insert = {
            "change_id": "c1",
            "changes": [
                {"op": "insert", "element_id": "clip", "element_type": "clip",
                 "props": {"start": 0}}
            ],
        }  # fmt: skip
        await alice.request("timeline_change", insert)
        await alice.request("timeline_change", set_op("c2", "start", 5, 1))
        reply = await bob.request("timeline_change", set_op("c3", "start", 9, 1))
        (cid,) = reply["data"]["conflicts"]
        pushed = await bob.expect_type("conflict_resolved", conflict_id=cid)
        assert pushed["data"]["resolution"]["strategy"] == "priority"
        assert pushed["data"]["resolution"]["value"] == 5


async def test_put_chain_with_unknown_strategy_is_400_naming_known_ones(server: Server) -> None:
    with trio.fail_after(10):
        response = await put_chain(server, "carol", "owner", {"strategies": ["nope", "priority"]})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "bad_request"
        assert "unknown strategy 'nope'" in error["message"]
        known = error["message"].split("known:", 1)[1]
        assert "longest" in known and "priority" in known and "manual" in known
        bad_options = await put_chain(
            server, "carol", "owner", {"strategies": ["longest"], "options": {"longest": {"x": 1}}}
        )
        assert bad_options.status_code == 400
        assert "unknown options" in bad_options.json()["error"]["message"]
        empty = await put_chain(server, "carol", "owner", {"strategies": []})
        assert empty.status_code == 400
        wrong_type = await put_chain(server, "carol", "owner", {"strategies": "longest"})
        assert wrong_type.status_code == 400
        assert "body.strategies" in wrong_type.json()["error"]["message"]
        chain = await get(server, "/api/projects/p1/strategies")
        assert chain["strategies"] == list(BASE_CHAIN)


async def test_put_chain_needs_the_owner_of_that_project(server: Server) -> None:
    with trio.fail_after(10):
        body = {"strategies": ["longest"]}
        for role in ("editor", "commenter", "viewer"):
            response = await put_chain(server, "eve", role, body)
            assert response.status_code == 403, role
            assert response.json()["error"]["code"] == "forbidden"
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            elsewhere = await http.put(
                "/api/projects/p1/strategies",
                json=body,
                headers=bearer(server, "carol", "owner", project="p2"),
            )
            anonymous = await http.put("/api/projects/p1/strategies", json=body)
        assert elsewhere.status_code == 403
        assert anonymous.status_code == 401
        chain = await get(server, "/api/projects/p1/strategies")
        assert chain["strategies"] == list(BASE_CHAIN)


# -- broken plugins -------------------------------------------------------------------------------


@pytest.fixture
def broken_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A throwaway distribution on sys.path whose strategies cannot be used: a missing module,
    a module that fails on import, and an object that is not callable."""
    site = tmp_path / "site"
    dist_info = site / "crealia_broken_example-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: crealia-broken-example\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[crealia.strategies]\n"
        "gone = crealia_broken_example_gone:Strategy\n"
        "explodes = crealia_broken_example_explodes:Strategy\n"
        "constant = crealia_broken_example:NOT_A_FACTORY\n"
    )
    (site / "crealia_broken_example_explodes.py").write_text("raise RuntimeError('boom')\n")
    (site / "crealia_broken_example.py").write_text("NOT_A_FACTORY = 3\n")
    monkeypatch.syspath_prepend(str(site))
    try:
        yield site
    finally:
        sys.modules.pop("crealia_broken_example", None)


def test_broken_plugins_are_reported_with_their_distribution(broken_plugins: Path) -> None:
    registry = StrategyRegistry.discover()
    broken = {p.name: p for p in registry.plugins if p.error}
    assert {"gone", "explodes", "constant"} <= set(broken)
    for name in ("gone", "explodes", "constant"):
        assert broken[name].distribution == "crealia-broken-example"
        assert broken[name].version == "1.0"
        assert name not in registry.names()
    assert "ModuleNotFoundError" in str(broken["gone"].error)
    assert "RuntimeError: boom" in str(broken["explodes"].error)
    assert "not callable" in str(broken["constant"].error)
    assert "priority" in registry.names()  # the others still load
    with pytest.raises(ConfigurationError, match=r"'explodes' \(it failed to load: Runtime"):
        registry.check(["explodes"])


async def test_cli_strategies_reports_broken_plugin_and_fails(broken_plugins: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(broken_plugins)}
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "crealia", "strategies"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=ROOT,
            env=env,
        )
    out = result.stdout.decode()
    (line,) = [line for line in out.splitlines() if line.split()[:1] == ["explodes"]]
    assert "crealia-broken-example 1.0" in line and "FAILED: RuntimeError: boom" in line
    assert result.returncode == 1


async def test_server_refuses_a_broken_plugin_in_a_chain(
    broken_plugins: Path, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        config = make_config(tmp_path / "data", strategy_chain=BASE_CHAIN)
        async with open_server(config) as srv:
            response = await put_chain(srv, "carol", "owner", {"strategies": ["gone"]})
            assert response.status_code == 400
            message = response.json()["error"]["message"]
            assert "unknown strategy 'gone' (it failed to load: ModuleNotFoundError" in message
        # open_server raises it from inside its store's nursery, so it may come in a group.
        refused: list[str] = []
        try:
            async with open_server(make_config(tmp_path / "data2", strategy_chain=("explodes",))):
                pass  # pragma: no cover - the server must not start
        except* ConfigurationError as group:
            refused.extend(str(exc) for exc in leaves(group))
        assert len(refused) == 1
        assert "unknown strategy 'explodes' (it failed to load: RuntimeError: boom)" in refused[0]


def leaves(group: BaseExceptionGroup[Any]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from leaves(exc)
        else:
            yield exc


# -- check_strategy --------------------------------------------------------------------------------


@pytest.fixture(params=[*BUILTINS, "longest"])
def installed_strategy(
    request: pytest.FixtureRequest, longest_plugin: tuple[str, str]
) -> ConflictStrategy:
    """Each built-in strategy and the example plugin's, as the server would create it.

    (A sync fixture: pytest-trio loses the reason of a skip raised inside an async test.)
    """
    name = str(request.param)
    registry = StrategyRegistry.discover()
    if name not in registry.factories:
        why = [p.error for p in registry.plugins if p.name == name] or ["not installed"]
        pytest.skip(f"strategy {name!r} does not load here: {why[0]}")
    return registry.create(name)


async def test_check_strategy_passes_for_installed_strategy(
    installed_strategy: ConflictStrategy,
) -> None:
    try:
        with trio.fail_after(60):
            await check_strategy(installed_strategy)
    finally:
        aclose = getattr(installed_strategy, "aclose", None)
        if aclose is not None:
            with trio.fail_after(5):
                await aclose()


class NeverSure(ConflictStrategy):
    """Declines everything: the smallest strategy that keeps the contract."""

    def __init__(self, options: object = None) -> None:
        pass

    async def resolve(self, conflict: Any, context: ResolutionContext) -> Any:
        await trio.lowlevel.checkpoint()
        return DECLINE


class OverConfident(ConflictStrategy):
    """Bypasses Resolution's validation to claim a confidence of 2."""

    async def resolve(self, conflict: Any, context: ResolutionContext) -> Any:
        resolution = self.resolution(conflict, "incoming", conflict.incoming["value"], 1.0, "sure")
        object.__setattr__(resolution, "confidence", 2)
        return resolution


class RaisesOnBadConfidence(ConflictStrategy):
    async def resolve(self, conflict: Any, context: ResolutionContext) -> Any:
        return self.resolution(conflict, "current", conflict.current["value"], 2.0, "sure")


class Mutates(ConflictStrategy):
    async def resolve(self, conflict: Any, context: ResolutionContext) -> Any:
        conflict.current["value"] = "mine"
        return DECLINE


class MutatesOptions(ConflictStrategy):
    async def resolve(self, conflict: Any, context: ResolutionContext) -> Any:
        context.options["seen"] = True  # type: ignore[index]
        return DECLINE


class WrongValue(ConflictStrategy):
    async def resolve(self, conflict: Any, context: ResolutionContext) -> Any:
        return self.resolution(conflict, "current", conflict.incoming["value"], 0.5, "swapped")


class Unexplained(ConflictStrategy):
    async def resolve(self, conflict: Any, context: ResolutionContext) -> Any:
        return self.resolution(conflict, "incoming", conflict.incoming["value"], 0.5, "  ")


class NotJSON(ConflictStrategy):
    async def resolve(self, conflict: Any, context: ResolutionContext) -> Any:
        return self.resolution(conflict, "custom", {1, 2}, 0.5, "a set")


class AnswersNone(ConflictStrategy):
    async def resolve(self, conflict: Any, context: ResolutionContext) -> Any:
        return None


class SwallowsCancelled(ConflictStrategy):
    async def resolve(self, conflict: Any, context: ResolutionContext) -> Any:
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled:
            return DECLINE
        return DECLINE


class RaisesWhenCancelled(ConflictStrategy):
    async def resolve(self, conflict: Any, context: ResolutionContext) -> Any:
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled:
            raise RuntimeError("interrupted") from None
        return DECLINE


class Slow(ConflictStrategy):
    async def resolve(self, conflict: Any, context: ResolutionContext) -> Any:
        await trio.sleep_forever()


class LeavesTaskBehind(ConflictStrategy):
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery

    async def resolve(self, conflict: Any, context: ResolutionContext) -> Any:
        self.nursery.start_soon(trio.sleep_forever, name="orphan")
        return DECLINE


@pytest.mark.parametrize(
    ("strategy", "complaint"),
    [
        (OverConfident(), "confidence 2 is not a number in 0..1"),
        (RaisesOnBadConfidence(), "resolve() raised ValueError: confidence must be"),
        (Mutates(), "resolve() modified the conflict: current:"),
        (MutatesOptions(), "resolve() modified the context: options:"),
        (WrongValue(), "choice 'current' with value"),
        (Unexplained(), "explanation '  ' is empty"),
        (NotJSON(), "cannot be encoded as JSON"),
        (AnswersNone(), "answered None: expected a Resolution, DECLINE or DEFER"),
        (SwallowsCancelled(), "it swallowed trio.Cancelled"),
        (RaisesWhenCancelled(), "raised RuntimeError: interrupted when cancelled"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, ConflictStrategy) else None,
)
async def test_check_strategy_fails_a_broken_strategy(
    strategy: ConflictStrategy, complaint: str
) -> None:
    with trio.fail_after(10), pytest.raises(AssertionError) as failure:
        await check_strategy(strategy)
    message = str(failure.value)
    assert f"strategy {type(strategy).__name__!r} breaks the conflict strategy contract" in message
    assert complaint in message
    assert re.search(r"case '[^']+' \(", message)


async def test_check_strategy_fails_a_strategy_past_its_deadline() -> None:
    with trio.fail_after(10), pytest.raises(AssertionError, match=r"within the deadline of 0\.01"):
        await check_strategy(Slow(), deadline=0.01)


async def test_check_strategy_fails_a_strategy_that_leaves_a_task(nursery: trio.Nursery) -> None:
    with trio.fail_after(10), pytest.raises(AssertionError, match=r"left 1 task\(s\) running"):
        await check_strategy(LeavesTaskBehind(nursery))


async def test_check_strategy_passes_a_strategy_that_declines_after_a_checkpoint() -> None:
    with trio.fail_after(10):
        await check_strategy(NeverSure())


async def test_custom_strategy_example_settles_a_conflict_and_keeps_the_contract() -> None:
    path = ROOT / "examples" / "custom_strategy.py"
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, str(path)], capture_stdout=True, capture_stderr=True, check=False
        )
        out = result.stdout.decode()
        assert result.returncode == 0, f"{out}\n{result.stderr.decode()}"
        for name in ("alice", "bob"):
            assert f"{name} got conflict_resolved (seq 3): strategy=midpoint value=7.0" in out
        assert "met in the middle at 7.0" in out
        assert out.rstrip().endswith("done")
        spec = importlib.util.spec_from_file_location("custom_strategy_example", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        await check_strategy(module.MidpointStrategy({}))


async def test_make_conflict_and_context_build_what_the_server_hands_a_strategy() -> None:
    conflict = make_conflict("a", "b", current_role="owner", incoming_role=None)
    assert conflict.op == "set" and conflict.prop == "label" and conflict.status == "pending"
    assert conflict.current == {"value": "a", "user_id": "alice", "seq": 2}
    assert conflict.incoming["value"] == "b" and conflict.incoming["user_id"] == "bob"
    assert conflict.roles == {"alice": "owner"}
    context = make_context(conflict, present=True, options={"tie": "first"})
    assert context.conflict is conflict and context.project_id == "p1"
    assert context.current.role == "owner" and context.current.present
    assert context.current.active_element == "clip-1"
    assert context.incoming.role is None
    assert dict(context.options) == {"tie": "first"}
    deleted = make_conflict({"start": 1}, None, op="delete")
    assert deleted.prop is None and deleted.op == "delete"
    with pytest.raises(ValueError, match="prop must be None"):
        make_conflict({"start": 1}, None, op="delete", prop="start")
    assert make_context(conflict, roles=False).current.role is None
    assert Config(strategies={"never": NeverSure}).strategies["never"] is NeverSure

"""The error tree: the drawing in crealia/_errors.py's docstring is the classes, every error
class is exported, open_server raises a lone error as itself, and a room used after it closed
raises RoomError.

Policy: loopback only, port 0, a deadline on every I/O test, real servers; no sleeps.
"""

from __future__ import annotations

import errno
import importlib
import pkgutil
import re
import socket
from pathlib import Path

import pytest
import trio

import crealia
import crealia._errors
import crealia.strategies.ai
from crealia import (
    ConfigurationError,
    Connection,
    CrealiaError,
    RoomError,
    User,
    open_server,
)
from crealia._session import Session

from .conftest import make_config

#: Error classes that never leave crealia, each with where it is turned into an exported one.
INTERNAL = {
    "crealia._wire.FieldTooLarge": "a field validator's carrier, raised as TooLarge by structure()",
}

_ENTRY = re.compile(r"^(?P<indent>[│ ]*)(?:├── |└── )(?P<name>\w+)")


def drawn_tree() -> dict[str, str | None]:
    """Each class name in the docstring's drawing, with the name it is drawn under."""
    doc = crealia._errors.__doc__ or ""
    block = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    lines = [line[4:] for line in block.splitlines()]
    parents: dict[str, str | None] = {}
    stack: list[str] = []
    for line in lines:
        if re.fullmatch(r"\w+", line.strip()) and not line.startswith(" "):
            parents[line.strip()] = None
            stack = [line.strip()]
            continue
        match = _ENTRY.match(line)
        if match is None:
            continue  # a description's second line
        depth = len(match["indent"]) // 4 + 1
        name = match["name"]
        assert name not in parents, f"{name} is drawn twice"
        del stack[depth:]
        parents[name] = stack[depth - 1]
        stack.append(name)
    return parents


def exported_errors() -> dict[str, type[CrealiaError]]:
    return {
        name: obj
        for name in crealia.__all__
        if isinstance(obj := getattr(crealia, name), type) and issubclass(obj, CrealiaError)
    }


def test_errors_drawing_matches_the_exported_classes() -> None:
    drawn = drawn_tree()
    exported = exported_errors()
    assert drawn["CrealiaError"] is None
    for name, cls in exported.items():
        assert name in drawn, f"{name} is exported but not drawn in crealia/_errors.py"
        if cls is not CrealiaError:
            (base,) = cls.__bases__
            assert drawn[name] == base.__name__, (
                f"{name} is drawn under {drawn[name]}, but its parent is {base.__name__}"
            )
    for name in drawn:
        assert name in exported, f"{name} is drawn but crealia does not export it"


def test_errors_every_public_error_class_is_exported_and_defined_in_errors() -> None:
    for info in pkgutil.walk_packages(crealia.__path__, "crealia."):
        if info.name != "crealia.__main__":  # that one runs the command line
            importlib.import_module(info.name)
    found: set[type[CrealiaError]] = set()
    pending: list[type[CrealiaError]] = [CrealiaError]
    while pending:
        cls = pending.pop()
        qualified = f"{cls.__module__}.{cls.__qualname__}"
        public = not cls.__name__.startswith("_") and qualified not in INTERNAL
        if cls.__module__.startswith("crealia") and public:
            found.add(cls)
        pending.extend(cls.__subclasses__())
    exported = set(exported_errors().values())
    assert found == exported, f"not exported: {sorted(c.__name__ for c in found - exported)}"
    for cls in found:
        assert cls.__module__ == "crealia._errors", f"{cls.__name__} lives in {cls.__module__}"
    # Where they were used before they moved, they still are.
    assert crealia.strategies.ai.AIProviderError is crealia.AIProviderError
    from crealia._client import ConnectionLost
    from crealia._errors import ConnectionClosed

    assert ConnectionClosed is crealia.ConnectionClosed
    assert ConnectionLost is crealia.ConnectionLost


def test_errors_the_old_client_name_is_an_alias() -> None:
    assert crealia.connect is crealia.open_session


async def test_errors_open_server_raises_a_lone_error_as_itself(tmp_path: Path) -> None:
    with trio.fail_after(20):
        bad = make_config(tmp_path / "d1", strategy_chain=("priority",),
                          strategy_options={"priority": {"tie": "sideways"}})  # fmt: skip
        with pytest.raises(ConfigurationError, match="strategy 'priority'") as refused:
            async with open_server(bad):
                pass  # pragma: no cover - the server must not start
        assert type(refused.value) is ConfigurationError
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(OSError) as busy:
                async with open_server(make_config(tmp_path / "d2", ws_port=port)):
                    pass  # pragma: no cover - the server must not start
            assert busy.value.errno == errno.EADDRINUSE


async def test_errors_the_body_s_own_errors_keep_their_group(tmp_path: Path) -> None:
    with trio.fail_after(20):
        with pytest.RaisesGroup(KeyError, flatten_subgroups=True):
            async with open_server(make_config(tmp_path / "data")):
                raise KeyError("the body's")


class _Silent(Connection):
    """A connection that never gets a message: enough to make a Session to hand a room."""

    async def receive(self) -> str | bytes:
        await trio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(self, frame: bytes) -> None:
        pass

    async def close(self, code: int, reason: str = "") -> None:
        pass

    async def abort(self) -> None:
        pass


async def test_errors_room_used_after_close_raises_room_error(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_server(make_config(tmp_path / "data")) as server:
            rooms = server.hub.rooms
            room = await rooms.join("p1")
            await rooms.close("p1")
            assert room.closed
            user = User(id="u1", name="Una", role="editor", project_id="p1")
            session = Session.create(user, _Silent(), server.config)
            with pytest.raises(RoomError, match="the room of project 'p1' has closed"):
                room.add_joining(session)
            # The manager opens a new room for the next joiner.
            again = await rooms.join("p1")
            assert again is not room and not again.closed
            again.add_joining(session)
            again.remove(session)

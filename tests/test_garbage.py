"""Issue 17: a session that ends leaves nothing for the cycle collector.

The soak's memory beyond the histories grew by about 340 bytes per event: each session that
ended left its frames, its writer and its connection in reference cycles (the peer's close
raised through the session's nursery: the exception's traceback held the frames holding it), so
they lived until a full collection, which a large heap makes rare. Here every way a session ends
is run under ``gc.DEBUG_SAVEALL``, so that what only the cycle collector would free is kept in
``gc.garbage`` and named.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from crealia import open_server

from .conftest import Clients, make_config
from .test_protocol import insert, set_op


@contextmanager
def cyclic_garbage() -> Iterator[list[Any]]:
    """What became cyclic garbage in the block (the list is filled when it ends)."""
    found: list[Any] = []
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def described(garbage: list[Any]) -> str:
    kinds = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in garbage)
    frames = Counter(o.f_code.co_qualname for o in garbage if type(o).__name__ == "frame")
    return f"{len(garbage)} objects: {kinds.most_common(8)}; frames {frames.most_common(6)}"


def ours(garbage: list[Any]) -> list[Any]:
    """The garbage that is crealia's: its objects and its code's frames and coroutines."""
    found = []
    for o in garbage:
        code = getattr(o, "f_code", None) or getattr(o, "cr_code", None)
        module = code.co_filename if code is not None else type(o).__module__
        if "crealia" in module:
            found.append(o)
    return found


async def end_sessions_every_way(clients: Clients, rounds: int) -> None:
    """Sessions that join, edit and end: a close by the client, a resume, a dropped TCP
    connection without a close frame, a refused hello, and a close by the server."""
    for k in range(rounds):
        client = await clients.join(f"u{k}")
        ack = await client.request("timeline_change", set_op(f"e{k}", "clip", "start", k, None))
        await client.aclose()

        client = await clients.raw()
        await client.hello(clients.token(f"u{k}"), "p1", resume=ack["data"]["seq"] - 1)
        await client.aclose()

        client = await clients.join(f"v{k}")
        await client.ws._stream.aclose()  # gone: no close frame

        client = await clients.raw()
        await client.send("hello", {"token": "not a token", "project_id": "p1"})
        assert await client.closed() == 4401

        client = await clients.join(f"w{k}")
        await client.send_raw(b"\x00binary")  # refused, the session goes on
        await client.expect_type("error")
        await client.aclose()
    clients.opened.clear()


@pytest.mark.parametrize("endpoint", ["ws", "http"])
async def test_ended_sessions_leave_no_cyclic_garbage(tmp_path: Path, endpoint: str) -> None:
    config = make_config(tmp_path / "data", room_grace=30.0)  # the room outlives its members
    async with open_server(config) as server, trio.open_nursery() as nursery:
        clients = Clients(server, endpoint, nursery)
        with trio.fail_after(30):
            keeper = await clients.join("keeper")  # the room stays open throughout
            await keeper.request("timeline_change", insert("c0", "clip", start=0))
            await end_sessions_every_way(clients, 2)  # warm: first-use caches, imports
            with cyclic_garbage() as garbage:
                await end_sessions_every_way(clients, 5)
                # Bounded by the fail_after: every ended session's task has left the hub.
                while len(server.hub.live) > 1:
                    await trio.sleep(0.01)
            await keeper.aclose()
        nursery.cancel_scope.cancel()
    assert not garbage, (
        f"ended sessions left cyclic garbage: {described(garbage)}; "
        f"crealia's: {described(ours(garbage))}"
    )

"""permessage-deflate on the real server's two endpoints: negotiated, and bombs refused."""

from __future__ import annotations

import orjson
import trio
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

from .conftest import Clients
from .test_deflate import SMALL_WINDOW, _bomb, _connect, _masked_frame, _peak_rss_growth


def _port(clients: Clients) -> int:
    server = clients.server
    return server.ws_port if clients.endpoint == "ws" else server.http_port


async def test_deflate_negotiated_on_both_endpoints(clients: Clients) -> None:
    with trio.fail_after(10):
        async with _connect(_port(clients), PerMessageDeflate()) as raw:
            assert raw.extensions_header == SMALL_WINDOW
            hello = {
                "type": "hello",
                "ref": 1,
                "data": {"token": clients.token("alice"), "project_id": "p1"},
            }
            await raw.send(orjson.dumps(hello).decode())
            welcome = orjson.loads(await raw.receive())
            assert welcome["type"] == "welcome"
            before = len(raw.wire)
            big = {
                "type": "comment_add",
                "ref": 2,
                "data": {"comment": {"id": "k", "text": "the same words " * 300}},
            }
            await raw.send(orjson.dumps(big).decode())
            replies = []
            while len(replies) < 2:
                value = orjson.loads(await raw.receive())
                replies.extend(value if isinstance(value, list) else [value])
            kinds = {r["type"] for r in replies}
            assert kinds == {"ack", "collaboration_event"}
            # The 4.5 KB comment came back compressed.
            assert len(raw.wire) - before < 1500


async def test_compressed_bombs_closed_with_1009_and_room_goes_on(clients: Clients) -> None:
    watcher = await clients.join("watcher")
    bomb_frame = _masked_frame(_bomb())
    codes: list[int] = []

    async def bomber(i: int) -> None:
        async with _connect(_port(clients), PerMessageDeflate()) as raw:
            hello = {
                "type": "hello",
                "ref": 1,
                "data": {"token": clients.token(f"b{i}"), "project_id": "p1"},
            }
            await raw.send(orjson.dumps(hello).decode())
            await raw.receive()
            await raw.send_raw(bomb_frame)
            while True:
                reply = await raw.receive()
                if not isinstance(reply, str):
                    codes.append(reply.code)
                    return

    async def bombard() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(bomber, i)

    with trio.fail_after(20):
        growth = await _peak_rss_growth(bombard)
        assert codes == [CloseReason.MESSAGE_TOO_BIG] * 6
        assert growth < 100 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
        reply = await watcher.request("comment_add", {"comment": {"id": "k", "text": "fine"}})
        assert reply["type"] == "ack"

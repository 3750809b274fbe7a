"""The scenarios' client connections on their own, against a WebSocket peer written here with
wsproto, so that it can do at a chosen moment what a real server does at a random one."""

from __future__ import annotations

from functools import partial

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request

from ._scenario import close, connect


async def _ping_while_closing(stream: trio.SocketStream) -> None:
    """Accept the handshake; when the client's close frame comes, send a ping before the close
    reply (as a server whose ping was on its way does)."""
    ws = WSConnection(ConnectionType.SERVER)
    async with stream:
        while data := await stream.receive_some(65536):
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Request):
                    await stream.send_all(ws.send(AcceptConnection()))
                elif isinstance(event, CloseConnection):
                    # wsproto sends nothing but the close reply from here: the frame by hand
                    # (final, unmasked, four bytes of payload: RFC 6455 §5.5.2).
                    await stream.send_all(b"\x89\x04late" + ws.send(event.response()))
                    return


async def test_a_ping_during_our_close_ends_that_connection_not_the_scenario() -> None:
    """trio-websocket answers it with a pong wsproto refuses in ``LOCAL_CLOSING``
    (python-trio/trio-websocket#184); the reader task raising that must not end the nursery
    the scenario's clients live in."""
    with trio.fail_after(10):
        async with trio.open_nursery() as servers:
            listeners = await servers.start(
                partial(trio.serve_tcp, _ping_while_closing, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                client = await connect(nursery, f"ws://127.0.0.1:{port}/ws")
                await close(client)
            servers.cancel_scope.cancel()

"""The python-socketio server `compare.py` measures crealia against: what a Socket.IO
collaboration backend does for presence, in the fewest lines.

A client connects with ``?room=R`` (and ``&user=U``), joins the room, and every ``cursor`` event
it emits is broadcast to the rest of the room, as crealia's ``cursor_update`` is. Runs on
uvicorn (its ``websockets`` implementation) on 127.0.0.1; prints ``socketio listening PORT``
once it accepts, and stops on SIGINT/SIGTERM.

    python benchmarks/_socketio_server.py [--port 0]
"""

from __future__ import annotations

import argparse
import socket
from urllib.parse import parse_qs

import socketio
import uvicorn

# Engine.IO's keep-alive ping every hour: longer than any run, so it carries only the workload.
sio = socketio.AsyncServer(
    async_mode="asgi", cors_allowed_origins="*", logger=False, engineio_logger=False,
    ping_interval=3600,
)  # fmt: skip
rooms: dict[str, str] = {}


@sio.event
async def connect(sid: str, environ: dict[str, object], auth: object = None) -> None:
    query = parse_qs(str(environ.get("QUERY_STRING", "")))
    room = query.get("room", ["r0"])[0]
    rooms[sid] = room
    await sio.enter_room(sid, room)


@sio.event
async def disconnect(sid: str, *_reason: object) -> None:
    rooms.pop(sid, None)


@sio.on("cursor")
async def cursor(sid: str, data: object) -> None:
    await sio.emit("cursor", data, room=rooms.get(sid), skip_sid=sid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(4096)
    config = uvicorn.Config(socketio.ASGIApp(sio), ws="websockets", log_level="warning",
                            lifespan="off", ws_ping_interval=None)  # fmt: skip
    server = uvicorn.Server(config)
    print(f"socketio listening {listener.getsockname()[1]}", flush=True)
    server.run(sockets=[listener])


if __name__ == "__main__":
    main()

"""Embed crealia in a custom Trio program.

The server runs in this program's nursery next to the program's own tasks: here a "robot" that
joins a project with the Python client and places a marker on the timeline every second, and a
watcher that prints what happens. Ctrl+C (or --seconds) ends everything in order.

    python examples/embed.py --seconds 5
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import trio

import crealia


async def robot(server: crealia.Server, count: int) -> None:
    token = server.issue_token("robot", "demo", "editor", name="Marker robot")
    async with crealia.connect(server.ws_url, token, "demo") as session:
        for i in range(count):
            ack = await session.change(
                [
                    {
                        "op": "insert",
                        "element_id": f"marker-{i}",
                        "element_type": "marker",
                        "props": {"time": float(i), "label": f"beat {i}"},
                    }
                ]
            )
            print(f"robot: marker-{i} stored at seq {ack['seq']}")
            await trio.sleep(1)  # the robot's own pace, not synchronization


async def watcher(server: crealia.Server, count: int) -> None:
    token = server.issue_token("watcher", "demo", "viewer")
    async with crealia.connect(server.ws_url, token, "demo") as session:
        seen = 0
        async for push in session:
            if push.type == "collaboration_event" and push.data.get("seq"):
                change = push.data["payload"]["changes"][0]
                print(f"watcher: seq {push.data['seq']}: {change['op']} {change['element_id']}")
                seen += 1
                if seen == count:
                    return


async def main(seconds: int, data_dir: Path) -> None:
    config = crealia.Config(port=0, ws_port=0, data_dir=data_dir)
    async with crealia.open_server(config) as server:
        print(f"crealia embedded: http={server.http_port} ws={server.ws_port}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher, server, seconds)
            nursery.start_soon(robot, server, seconds)
    print("done: the server shut down with the program")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(main, args.seconds, args.data_dir or Path(tmp))

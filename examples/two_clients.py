"""Two people editing one project through crealia's Python client, printing what each sees.

Run it as is to start a throwaway server (``python -m crealia serve`` on free ports, in a temporary
data dir), or point it at a running one::

    python examples/two_clients.py
    python examples/two_clients.py --url ws://127.0.0.1:3001/ws --jwt-secret S [--project demo]

Alice inserts a clip; Alice and Bob then set properties of it at the same time (two different
ones, then the same one, which makes a conflict for the server's strategies to settle); Bob
comments on the clip; both move their cursors. The script waits until each has seen every
durable event and the other's cursor, prints the ping round trips, and ends by itself.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from crealia import ClientSession, Push, open_session

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(rb"crealia listening http=(\d+) ws=(\d+)")


class View:
    """What one client has seen so far, and a way to wait for more."""

    def __init__(self, name: str, session: ClientSession) -> None:
        self.name = name
        self.session = session
        self.seen: list[Push] = []
        self._changed = trio.Event()

    async def watch(self) -> None:
        """Print and record every push until the session closes."""
        async for push in self.session:
            print(f"  [{self.name} sees] {describe(push)}")
            self.seen.append(push)
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()

    def resolved(self) -> set[str]:
        return {push.data["conflict_id"] for push in self.seen if push.type == "conflict_resolved"}

    async def wait_for_seq(self, seq: int) -> None:
        await self.wait_for(lambda: (self.session.seq or 0) >= seq)

    async def wait_for_cursor_of(self, user_id: str) -> None:
        await self.wait_for(
            lambda: any(
                push.data.get("kind") == "cursor_update" and push.data.get("user_id") == user_id
                for push in self.seen
            )
        )


def describe(push: Push) -> str:
    data = push.data
    if push.type == "collaboration_event":
        seq = f" seq={data['seq']}" if "seq" in data else ""
        payload = data.get("payload", {})
        if data.get("kind") == "timeline_change":
            ops = ", ".join(
                f"{op['op']} {op['element_id']}"
                + (f".{op['prop']}={op['value']!r}" if "prop" in op else "")
                for op in payload.get("changes", [])
            )
            return f"{data['user_id']} changed the timeline{seq}: {ops}"
        if data.get("kind") == "comment_add":
            return f"{data['user_id']} commented{seq}: {payload['comment']['text']!r}"
        if data.get("kind") == "cursor_update":
            return f"{data['user_id']}'s cursor at {payload['position']}"
        return f"{data.get('kind')} by {data.get('user_id')}{seq}"
    if push.type == "users_list":
        return "users: " + ", ".join(user["name"] for user in data.get("users", []))
    if push.type == "conflict_detected":
        return "conflicts: " + "; ".join(
            f"{c['element_id']}.{c['prop']}: current {c['current']['value']!r} "
            f"vs incoming {c['incoming']['value']!r}"
            for c in data.get("conflicts", [])
        )
    if push.type == "conflict_resolved":
        resolution = data.get("resolution", {})
        return (
            f"conflict {data.get('conflict_id')} resolved (seq={data.get('seq')}) by "
            f"{resolution.get('strategy')}: {resolution.get('value')!r} "
            f"({resolution.get('explanation')})"
        )
    return f"{push.type}: {data}"


def with_secret(secret: str) -> dict[str, str]:
    """The environment for a ``crealia`` command that needs the secret: in
    ``CREALIA_JWT_SECRET``, not on the command line, where ``ps`` shows it to every local user
    (and where a secret starting with ``-`` would read as an option)."""
    return {**os.environ, "CREALIA_JWT_SECRET": secret}


@asynccontextmanager
async def local_server(secret: str) -> AsyncIterator[str]:
    """Start ``crealia serve`` on free loopback ports in a temporary data dir; yield its URL."""
    with tempfile.TemporaryDirectory(prefix="crealia-example-") as data_dir:
        command = [
            sys.executable, "-m", "crealia", "serve",
            "--host", "127.0.0.1", "--port", "0", "--ws-port", "0",
            "--data-dir", data_dir,
        ]  # fmt: skip
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
            env=with_secret(secret),
        )  # fmt: skip
        try:
            assert process.stdout is not None
            buffer = b""
            with trio.fail_after(20):
                while (match := LISTENING.search(buffer)) is None:
                    chunk = await process.stdout.receive_some()
                    if not chunk:
                        raise SystemExit("crealia serve exited before listening")
                    buffer += chunk
            print(f"started crealia serve: http={match[1].decode()} ws={match[2].decode()}")
            yield f"ws://127.0.0.1:{match[2].decode()}/ws"
        finally:
            process.terminate()
            with trio.move_on_after(10, shield=True):
                await process.wait()
            if process.returncode is None:
                process.kill()


async def make_token(secret: str, user: str, project: str, role: str) -> str:
    """A token from ``crealia token``, as an operator would mint it."""
    result = await trio.run_process(
        [
            sys.executable, "-m", "crealia", "token",
            "--user", user, "--name", user.title(), "--project", project,
            "--role", role,
        ],
        capture_stdout=True,
        cwd=ROOT,
        env=with_secret(secret),
    )  # fmt: skip
    return result.stdout.decode().strip()


def set_op(element_id: str, prop: str, value: Any, base: int) -> dict[str, Any]:
    return {"op": "set", "element_id": element_id, "prop": prop, "value": value, "base": base}


async def demo(url: str, secret: str, project: str) -> None:
    alice_token = await make_token(secret, "alice", project, "editor")
    bob_token = await make_token(secret, "bob", project, "editor")
    async with (
        open_session(url, alice_token, project) as alice,
        open_session(url, bob_token, project) as bob,
        trio.open_nursery() as nursery,
    ):
        views = {"alice": View("alice", alice), "bob": View("bob", bob)}
        for view in views.values():
            nursery.start_soon(view.watch)
        print(f"alice and bob joined {project!r} at seq {alice.seq}")

        print("alice inserts clip-1")
        insert = await alice.change(
            [
                {
                    "op": "insert",
                    "element_id": "clip-1",
                    "element_type": "clip",
                    "props": {"start": 0.0, "duration": 5.0, "label": "intro"},
                }
            ]
        )
        print(f"  alice's ack: {insert}")
        base = insert["seq"]
        await views["bob"].wait_for_seq(base)

        print("alice sets start while bob sets duration (different props: both apply)")
        async with trio.open_nursery() as both:
            both.start_soon(alice.change, [set_op("clip-1", "start", 2.0, base)])
            both.start_soon(bob.change, [set_op("clip-1", "duration", 4.0, base)])

        print("both rename the clip from the same base (the same prop: a conflict)")
        acks: dict[str, dict[str, Any]] = {}

        async def rename(name: str, session: ClientSession, label: str) -> None:
            acks[name] = await session.change([set_op("clip-1", "label", label, base)])

        async with trio.open_nursery() as both:
            both.start_soon(rename, "alice", alice, "Opening")
            both.start_soon(rename, "bob", bob, "Intro shot")
        conflict_ids: set[str] = set()
        for name, ack in acks.items():
            print(f"  {name}'s ack: status={ack['status']} seq={ack['seq']}")
            conflict_ids.update(ack["conflicts"])

        print("bob comments on clip-1")
        comment = await bob.comment("Trim the first second?", element_id="clip-1", time=1.0)

        print("both move their cursors")
        await alice.cursor(120, 40, time=2.5, track="v1")
        await bob.cursor(300, 80, time=4.0, track="v1")

        # Wait for each to see everything: every durable event and the other's cursor.
        last = comment["seq"]
        await views["alice"].wait_for_seq(last)
        await views["bob"].wait_for_seq(last)
        await views["alice"].wait_for_cursor_of("bob")
        await views["bob"].wait_for_cursor_of("alice")
        # The project's strategy chain settles the conflict (or leaves it to a person: then
        # stop waiting after a while; it stays in the welcome's pending_conflicts).
        with trio.move_on_after(3):
            await views["alice"].wait_for(lambda: conflict_ids <= views["alice"].resolved())

        rtt_alice, rtt_bob = await alice.ping(), await bob.ping()
        print(f"round trips: alice {rtt_alice * 1000:.1f} ms, bob {rtt_bob * 1000:.1f} ms")
        print(f"both at seq {alice.seq} / {bob.seq}; closing")
        await alice.aclose()
        await bob.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server's WebSocket URL (default: start one)")
    parser.add_argument(
        "--jwt-secret",
        default=os.environ.get("CREALIA_JWT_SECRET"),
        help="the server's JWT secret (default: $CREALIA_JWT_SECRET; needed with --url)",
    )
    parser.add_argument("--project", default="demo-" + secrets.token_hex(3))
    args = parser.parse_args()
    with trio.fail_after(60):
        if args.url:
            if not args.jwt_secret:
                parser.error("--url needs --jwt-secret (or CREALIA_JWT_SECRET)")
            await demo(args.url, args.jwt_secret, args.project)
        else:
            secret = args.jwt_secret or secrets.token_urlsafe(32)
            async with local_server(secret) as url:
                await demo(url, secret, args.project)


if __name__ == "__main__":
    trio.run(main)

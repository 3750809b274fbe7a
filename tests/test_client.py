"""The Python client (``crealia.open_session``) against a real ``crealia serve`` subprocess.

Policy: loopback only; the server picks its ports (port 0) and keeps them across restarts; every
test runs under ``trio.fail_after``; nothing sleeps to synchronize: tests wait for the pushes and
state changes they expect. Drops are made by a real loopback TCP relay (:class:`Relay`) that a
test can cut, close and mute, or by stopping and restarting the server on the same data dir.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypedDict

import attrs
import jwt
import pytest
import trio

from crealia._client import (
    ClientClosed,
    ClientSession,
    ConnectionLost,
    Push,
    ServerError,
    SessionState,
    open_session,
)

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-for-the-client-tests-0123456789"
LISTENING = re.compile(rb"crealia listening http=(\d+) ws=(\d+)")
TEST_TIMEOUT = 30


class Backoff(TypedDict):
    min_backoff: float
    max_backoff: float


#: Backoff bounds that keep reconnection tests quick.
FAST: Backoff = {"min_backoff": 0.05, "max_backoff": 0.5}


def make_token(user: str, project: str = "p1", role: str = "editor", secret: str = SECRET) -> str:
    """A token with the claims docs/protocol.md §1 names, signed like ``crealia token`` does."""
    now = int(time.time())
    claims = {
        "sub": user,
        "name": user.title(),
        "project": project,
        "role": role,
        "iat": now,
        "exp": now + 3600,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def insert(element_id: str, **props: Any) -> dict[str, Any]:
    return {"op": "insert", "element_id": element_id, "element_type": "clip", "props": props}


@attrs.define
class ServerProcess:
    """``crealia serve`` in a subprocess, restartable on the same ports and data dir."""

    data_dir: Path
    log_path: Path
    nursery: trio.Nursery
    secret: str = SECRET
    http_port: int = 0
    ws_port: int = 0
    process: trio.Process | None = None

    @property
    def url(self) -> str:
        """The trio-websocket fast path."""
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    def url_for(self, endpoint: str) -> str:
        """``ws``: the fast path; ``http``: the same protocol through the HTTP app."""
        port = self.ws_port if endpoint == "ws" else self.http_port
        return f"ws://127.0.0.1:{port}/ws"

    async def start(self) -> None:
        command = [
            sys.executable, "-m", "crealia", "serve",
            "--host", "127.0.0.1",
            "--port", str(self.http_port),
            "--ws-port", str(self.ws_port),
            "--data-dir", str(self.data_dir),
            "--jwt-secret", self.secret,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = await trio.lowlevel.open_process(
                command, stdout=subprocess.PIPE, stderr=log, cwd=ROOT
            )
        assert self.process.stdout is not None
        buffer = b""
        while (match := LISTENING.search(buffer)) is None:
            chunk = await self.process.stdout.receive_some()
            if not chunk:
                log_text = self.log_path.read_text(errors="replace")
                pytest.fail(f"crealia serve exited before listening:\n{log_text[-3000:]}")
            buffer += chunk
        self.http_port, self.ws_port = int(match[1]), int(match[2])
        self.nursery.start_soon(_drain, self.process.stdout)

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.returncode is None:
            self.process.send_signal(sig)
        with trio.move_on_after(10) as scope:
            await self.process.wait()
        if scope.cancelled_caught:
            self.process.kill()
            await self.process.wait()
        self.process = None


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    async with trio.open_nursery() as nursery:
        proc = ServerProcess(
            data_dir=tmp_path / "data", log_path=tmp_path / "server.log", nursery=nursery
        )
        try:
            with trio.fail_after(20):
                await proc.start()
            yield proc
        finally:
            with trio.CancelScope(shield=True):
                await proc.stop(signal.SIGKILL)
            nursery.cancel_scope.cancel()


@attrs.define(eq=False)
class Relay:
    """A loopback TCP relay in front of the server: a real network that tests can break.

    ``cut()`` drops every relayed connection abruptly; while ``accepting`` is false new
    connections are closed at once; while ``muted`` the server's bytes are thrown away.
    """

    target_port: int
    port: int = 0
    accepting: bool = True
    muted: bool = False
    _scopes: set[trio.CancelScope] = attrs.Factory(set)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    def cut(self) -> None:
        for scope in self._scopes:
            scope.cancel()

    async def _relay(self, downstream: trio.SocketStream) -> None:
        try:
            if not self.accepting:
                return
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            try:
                async with trio.open_nursery() as nursery:
                    self._scopes.add(nursery.cancel_scope)
                    nursery.start_soon(
                        self._pump, downstream, upstream, False, nursery.cancel_scope
                    )
                    nursery.start_soon(self._pump, upstream, downstream, True, nursery.cancel_scope)
                self._scopes.discard(nursery.cancel_scope)
            finally:
                await trio.aclose_forcefully(upstream)
        finally:
            await trio.aclose_forcefully(downstream)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        replies: bool,
        connection: trio.CancelScope,
    ) -> None:
        try:
            while data := await source.receive_some():
                if not (replies and self.muted):
                    await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            connection.cancel()  # one side ended: end the relayed connection


@pytest.fixture
async def relay(served: ServerProcess) -> AsyncIterator[Relay]:
    relay = Relay(target_port=served.ws_port)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        yield relay
        nursery.cancel_scope.cancel()


async def next_push(session: ClientSession, match: Callable[[Push], bool]) -> Push:
    """The next push of ``session`` that ``match`` accepts, skipping the others."""
    async for push in session:
        if match(push):
            return push
    raise AssertionError("the session closed first")


def event(kind: str) -> Callable[[Push], bool]:
    return lambda push: push.type == "collaboration_event" and push.data.get("kind") == kind


def durable(push: Push) -> bool:
    return push.seq is not None


async def durable_seqs_until(session: ClientSession, last: int) -> list[int]:
    """The ``seq`` of every durable push up to ``last``, in delivery order."""
    seqs: list[int] = []
    while not seqs or seqs[-1] < last:
        push = await next_push(session, durable)
        assert push.seq is not None
        seqs.append(push.seq)
    return seqs


ENDPOINTS = pytest.mark.parametrize("endpoint", ["ws", "http"])


@ENDPOINTS
async def test_client_request_reply(served: ServerProcess, endpoint: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_session(served.url_for(endpoint), make_token("ann"), "p1") as ann:
            assert ann.state is SessionState.CONNECTED
            assert ann.welcome["user"]["id"] == "ann"
            assert ann.welcome["project_id"] == "p1"
            assert ann.seq == ann.welcome["snapshot"]["seq"] == 0
            assert await ann.ping() > 0
            assert [u["user_id"] for u in await ann.users()] == ["ann"]
            reply = await ann.request("ping", {"t": 5})
            assert reply["t"] == 5
            assert isinstance(reply["timestamp"], int)
            with pytest.raises(ServerError) as info:
                await ann.request("no_such_event", {})
            assert info.value.code == "bad_request"
            with pytest.raises(ServerError) as info:
                await ann.change([{"op": "fly", "element_id": "x"}])
            assert info.value.code == "bad_request"
            # A refused request changes nothing and the session goes on.
            assert await ann.ping() > 0
            with pytest.raises(ValueError, match="hello"):
                await ann.request("hello", {})


async def test_client_role_refusal_is_server_error(served: ServerProcess) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_session(served.url, make_token("vic", role="viewer"), "p1") as vic:
            with pytest.raises(ServerError) as info:
                await vic.change([insert("clip-1", start=0)])
            assert info.value.code == "forbidden"
            with pytest.raises(ServerError) as info:
                await vic.comment("hello")
            assert info.value.code == "forbidden"
            await vic.cursor(1, 2)  # viewers may move their cursor
            assert await vic.ping() > 0


@ENDPOINTS
async def test_client_pushes_between_two_clients(served: ServerProcess, endpoint: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_session(served.url_for(endpoint), make_token("ann"), "p1") as ann,
            open_session(served.url, make_token("bob"), "p1") as bob,
        ):
            joined = await next_push(ann, event("user_joined"))
            assert joined.data["user_id"] == "bob"
            assert joined.seq is None

            await ann.cursor(10.5, 20, time=3.0, track="v1")
            moved = await next_push(bob, event("cursor_update"))
            assert moved.data["user_id"] == "ann"
            assert moved.data["payload"]["position"] == {
                "x": 10.5,
                "y": 20,
                "time": 3.0,
                "track": "v1",
            }

            ack = await bob.comment("nice cut", element_id="clip-1", comment_id="c-1")
            for session in (ann, bob):
                pushed = await next_push(session, event("comment_add"))
                assert pushed.seq == ack["seq"]
                assert pushed.data["user_id"] == "bob"
                assert pushed.data["payload"]["comment"]["text"] == "nice cut"
                assert session.seq == ack["seq"]


async def test_client_change_ack(served: ServerProcess) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_session(served.url, make_token("ann"), "p1") as ann,
            open_session(served.url, make_token("bob"), "p1") as bob,
        ):
            ack = await ann.change([insert("clip-1", start=0, duration=5)], change_id="chg-1")
            assert ack["change_id"] == "chg-1"
            assert ack["status"] == "applied"
            assert ack["conflicts"] == []
            seq = ack["seq"]
            assert isinstance(seq, int)
            for session in (ann, bob):
                pushed = await next_push(session, event("timeline_change"))
                assert pushed.seq == seq
                assert pushed.data["payload"]["change_id"] == "chg-1"
                assert session.seq == seq

            again = await ann.change([insert("clip-1", start=0, duration=5)], change_id="chg-1")
            assert again["status"] == "duplicate"
            assert again["seq"] == seq

            generated = await bob.change(
                [{"op": "set", "element_id": "clip-1", "prop": "start", "value": 2, "base": seq}]
            )
            assert generated["status"] == "applied"
            assert generated["change_id"]  # a UUID made by the client
            assert generated["seq"] == seq + 1


async def test_client_resume_seq_replays_missed_events(served: ServerProcess) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_session(served.url, make_token("bob"), "p1") as bob:
            first = await bob.change([insert("clip-1", start=0)])
            await bob.change([insert("clip-2", start=5)])
            await bob.comment("two clips")
        async with open_session(
            served.url, make_token("ann"), "p1", resume_seq=first["seq"]
        ) as ann:
            assert ann.welcome["replayed"] == 2
            assert "snapshot" not in ann.welcome
            assert await durable_seqs_until(ann, first["seq"] + 2) == [2, 3]
            assert ann.seq == 3


async def test_client_reconnects_and_resumes_without_duplicates(
    served: ServerProcess, relay: Relay
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_session(relay.url, make_token("ann"), "p1", **FAST) as ann,
            open_session(served.url, make_token("bob"), "p1") as bob,
        ):
            first = await ann.change([insert("clip-1", start=0)])
            assert await durable_seqs_until(ann, first["seq"]) == [first["seq"]]

            relay.accepting = False
            relay.cut()
            await ann.wait_disconnected()
            assert ann.state is SessionState.RECONNECTING
            await bob.change([insert("clip-2", start=5)])
            await bob.comment("while ann was away")
            last = await bob.change([insert("clip-3", start=9)])

            relay.accepting = True
            await ann.wait_connected()
            assert ann.reconnects == 1
            welcome = await next_push(ann, lambda push: push.type == "welcome")
            assert welcome.data["replayed"] == 3
            assert welcome.data == ann.welcome
            # Replayed after the welcome, in order, then live: each seq exactly once.
            after = await bob.change([insert("clip-4", start=12)])
            seqs = await durable_seqs_until(ann, after["seq"])
            assert seqs == list(range(first["seq"] + 1, after["seq"] + 1))
            assert last["seq"] in seqs
            assert ann.seq == after["seq"]


async def test_client_resends_unacked_change_with_same_change_id(
    served: ServerProcess, relay: Relay
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_session(relay.url, make_token("ann"), "p1", **FAST) as ann,
            open_session(served.url, make_token("bob"), "p1") as bob,
            trio.open_nursery() as nursery,
        ):
            acks: list[dict[str, Any]] = []

            async def change_in_background() -> None:
                acks.append(await ann.change([insert("clip-1", start=0)], change_id="chg-lost"))

            relay.muted = True  # the server applies the change but its ack never reaches ann
            nursery.start_soon(change_in_background)
            applied = await next_push(bob, event("timeline_change"))
            assert applied.data["payload"]["change_id"] == "chg-lost"
            assert acks == []

            relay.cut()
            relay.muted = False
            await ann.wait_disconnected()
            await ann.wait_connected()

        # The nursery has waited for the pending change(): it got the resent change's ack.
        assert len(acks) == 1
        assert acks[0]["change_id"] == "chg-lost"
        assert acks[0]["status"] == "duplicate"
        assert acks[0]["seq"] == applied.seq


async def test_client_resent_change_is_delivered_once(served: ServerProcess, relay: Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_session(relay.url, make_token("ann"), "p1", **FAST) as ann,
            open_session(served.url, make_token("bob"), "p1") as bob,
            trio.open_nursery() as nursery,
        ):
            acks: list[dict[str, Any]] = []

            async def change_in_background() -> None:
                acks.append(await ann.change([insert("clip-1", start=0)], change_id="chg-1"))

            relay.muted = True
            nursery.start_soon(change_in_background)
            applied = await next_push(bob, event("timeline_change"))
            relay.cut()
            relay.muted = False
            await ann.wait_disconnected()
            await ann.wait_connected()
            later = await bob.change([insert("clip-2", start=5)])
            assert await durable_seqs_until(ann, later["seq"]) == [applied.seq, later["seq"]]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_client_reconnects_after_server_restart(served: ServerProcess, sig: int) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_session(served.url, make_token("ann"), "p1", **FAST) as ann:
            first = await ann.change([insert("clip-1", start=0)])
            assert await durable_seqs_until(ann, first["seq"]) == [first["seq"]]

            await served.stop(sig)
            await ann.wait_disconnected()
            await served.start()
            await ann.wait_connected()

            welcome = await next_push(ann, lambda push: push.type == "welcome")
            assert welcome.data["replayed"] == 0
            assert welcome.data["seq"] == first["seq"]  # the acked change survived
            second = await ann.change([insert("clip-2", start=3)])
            assert second["seq"] == first["seq"] + 1
            assert await durable_seqs_until(ann, second["seq"]) == [second["seq"]]


async def test_client_without_reconnect_ends_on_drop(served: ServerProcess, relay: Relay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_session(relay.url, make_token("ann"), "p1", reconnect=False) as ann:
            relay.cut()
            with pytest.raises(ConnectionLost) as info:
                await ann.receive()
            assert info.value.close_code == 1006
            assert ann.state is SessionState.CLOSED
            with pytest.raises(ConnectionLost):
                await ann.ping()


@pytest.mark.parametrize(
    "token",
    [
        make_token("ann", secret="not-the-server-secret-0123456789abcdef"),
        make_token("ann", project="p2"),
        "not-a-jwt",
    ],
    ids=["bad-signature", "other-project", "garbage"],
)
async def test_client_unauthorized_raises(served: ServerProcess, token: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        with pytest.raises(ServerError) as info:
            async with open_session(served.url, token, "p1"):
                pytest.fail("connected with a bad token")
        assert info.value.code == "unauthorized"


async def test_client_reconnect_refused_ends_session(served: ServerProcess) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_session(served.url, make_token("ann"), "p1", **FAST) as ann:
            await served.stop()
            await ann.wait_disconnected()
            served.secret = "a-new-secret-that-ann-token-was-not-signed-with"
            await served.start()
            # The resumed hello is refused with unauthorized and close 4401: no more retries.
            with pytest.raises(ServerError) as info:
                await ann.receive()
            assert info.value.code == "unauthorized"
            assert ann.state is SessionState.CLOSED
            with pytest.raises(ServerError):
                await ann.wait_connected()
            with pytest.raises(ServerError):
                await ann.change([insert("clip-1", start=0)])


async def test_client_connect_refused_raises_connection_lost(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.close()  # nothing listens there now
        with pytest.raises(ConnectionLost):
            async with open_session(f"ws://127.0.0.1:{port}/ws", make_token("ann"), "p1"):
                pytest.fail("connected to nothing")


async def test_client_cli_token(served: ServerProcess) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        result = await trio.run_process(
            [
                sys.executable, "-m", "crealia", "token",
                "--user", "cli-user", "--project", "p1", "--role", "commenter",
                "--jwt-secret", SECRET,
            ],
            capture_stdout=True,
            cwd=ROOT,
        )  # fmt: skip
        token = result.stdout.decode().strip()
        async with open_session(served.url, token, "p1") as session:
            assert session.welcome["user"] == {
                "id": "cli-user",
                "name": "cli-user",
                "role": "commenter",
            }
            await session.comment("from the CLI token")


async def test_client_close_ends_iteration_and_calls(served: ServerProcess) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_session(served.url, make_token("ann"), "p1") as ann,
            trio.open_nursery() as nursery,
        ):
            seen: list[Push] = []

            async def read_all() -> None:
                async for push in ann:
                    seen.append(push)

            nursery.start_soon(read_all)
            await ann.change([insert("clip-1", start=0)])
            await ann.aclose()
        assert ann.state is SessionState.CLOSED
        with pytest.raises(ClientClosed):
            await ann.ping()
        with pytest.raises(ClientClosed):
            await ann.receive()
        await ann.aclose()  # idempotent


async def test_client_small_push_buffer_resyncs_without_loss(served: ServerProcess) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_session(served.url, make_token("ann"), "p1", max_pushes=4, **FAST) as ann,
            open_session(served.url, make_token("bob"), "p1") as bob,
        ):
            # Ann reads nothing while 30 durable events arrive: more than her buffer holds.
            for n in range(30):
                last = await bob.change([insert(f"clip-{n}", start=n)])
            assert await durable_seqs_until(ann, last["seq"]) == list(range(1, 31))
            assert ann.reconnects >= 1  # the overflow was fetched again by resuming


async def test_client_conflict_resolution_is_a_durable_push(served: ServerProcess) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_session(served.url, make_token("ann"), "p1") as ann,
            open_session(served.url, make_token("bob"), "p1") as bob,
        ):
            base = (await ann.change([insert("clip-1", label="a")]))["seq"]
            first = await ann.change(
                [
                    {
                        "op": "set",
                        "element_id": "clip-1",
                        "prop": "label",
                        "value": "ann",
                        "base": base,
                    }
                ]
            )
            assert first["status"] == "applied"
            clash = await bob.change(
                [
                    {
                        "op": "set",
                        "element_id": "clip-1",
                        "prop": "label",
                        "value": "bob",
                        "base": base,
                    }
                ]
            )
            assert clash["status"] == "conflict"
            assert clash["seq"] is None
            (conflict_id,) = clash["conflicts"]
            detected = await next_push(bob, lambda push: push.type == "conflict_detected")
            assert [c["id"] for c in detected.data["conflicts"]] == [conflict_id]
            with contextlib.suppress(ServerError):  # unless a strategy settled it first
                await bob.request(
                    "conflict_resolve", {"conflict_id": conflict_id, "choice": "incoming"}
                )
            for session in (ann, bob):
                resolved = await next_push(session, lambda push: push.type == "conflict_resolved")
                assert resolved.data["conflict_id"] == conflict_id
                assert resolved.seq == session.seq == first["seq"] + 1
            # The resolution's seq counts: the next change follows it.
            after = await ann.change([insert("clip-2")])
            assert after["seq"] == first["seq"] + 2

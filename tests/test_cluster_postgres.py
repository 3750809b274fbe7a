"""The recommended cluster under faults: three ``crealia serve`` processes on one PostgreSQL and
one Redis (``--database`` plus ``--redis``, docs/backplanes.md), all started, killed and
restarted by the test.

One scenario in rounds, with writers on every node (tests/faults/_scenario.py: WebSocket
clients speaking docs/protocol.md, which keep a window of unacknowledged changes, resend them
with the same ``change_id`` after an ``overloaded`` answer or a reconnect, and resume with their
replica's ``seq`` and ``epoch``). Each round:

1. a node SIGKILLed: its clients reconnect to another node and resume; the node is started
   again and a new client joins it;
2. Redis SIGKILLed (edits still commit and ack meanwhile), then started again;
3. PostgreSQL stopped with ``pg_ctl stop -m immediate`` (a crash: its next start replays the
   WAL), then started again;
4. operator queries on every node: a user's audit events, a security alert raised by refused
   tokens spread over the three nodes (and resolved on one), the user's GDPR export, and its
   erasure on one node: every node's room of the project closes, its clients resume with a
   snapshot of the new epoch, and no node serves the erased content.

After each fault, a checkpoint while the writers go on (a fresh member's snapshot and a replay
of the whole log, :func:`checkpoint`): 0 acknowledged edits lost, 0 duplicated, no gap; and every
client resumed exactly once if the fault cut its connection (with a replay when the epoch
stayed, with a snapshot when it changed), never if it did not. (One exception, by design: a
client of the erasing node that reconnects to another node may resume there with a replay
before the erasure reached it, then with the snapshot; it is listed as ``resumed_twice``.) At
the end :func:`verify`: every replica saw one gap-free order and equals the server's snapshot.

The recovery time of each fault, from its end (the node listening again, Redis answering
``PING``, PostgreSQL accepting connections, the erasure answered) to the first acknowledged
edit through each node, and the counts, are printed (``-s``) and written to
``test-artifacts/faults/cluster_postgres.json``.

One round runs in the default suite; ``CREALIA_FAULTS_FULL=1`` (``make test-faults``, marker
``faults_full``) runs five. Policy: loopback only, free ports, a deadline on everything, a real
PostgreSQL (tests/_postgres.py) and redis-server (tests/_redis.py); the only sleeps are pacing
and the polling of nodes reading what another node wrote, bounded by the deadline.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Container
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import httpx
import pytest
import trio

from ._postgres import PostgresServer, run_postgres
from ._process import ServerProcess, run_server
from ._redis import RedisServer, run_redis
from .faults._scenario import (
    FULL,
    SECRET,
    Counts,
    Writer,
    checkpoint,
    close,
    connect,
    join,
    recovery_time,
    replay_from,
    report,
    setup_project,
    token,
    verify,
    wait_acks,
)

NODES = 3
#: Writers homed on each node (at 10 edits a second each).
PER_NODE = 2
#: Refused tokens per node; the cluster's alert threshold is their sum over the nodes.
REFUSALS = 2
T = TypeVar("T")


@attrs.define(eq=False)
class Cluster:
    """The nodes (``None`` while one is down), the database and Redis they share."""

    directory: Path
    postgres: PostgresServer
    redis: RedisServer
    database: str
    procs: list[ServerProcess | None] = attrs.Factory(lambda: [None] * NODES)
    #: Every WebSocket URL each node has had (a restarted node listens on new ports).
    urls: list[set[str]] = attrs.Factory(lambda: [set() for _ in range(NODES)])
    _stacks: list[AsyncExitStack] = attrs.Factory(lambda: [AsyncExitStack() for _ in range(NODES)])

    async def start(self, i: int) -> ServerProcess:
        """Start node ``i`` (``crealia serve --database … --redis …``) and wait until it listens."""
        stack = self._stacks[i] = AsyncExitStack()
        env = {
            "SECURITY_ALERT_THRESHOLD": str(REFUSALS * NODES),
            # Every checkpoint replays the whole log (about 10,000 events by the full run's end).
            "CREALIA_HISTORY_LIMIT": "50000",
            "CREALIA_REPLAY_MAX_BYTES": str(32 << 20),
        }
        proc = await stack.enter_async_context(
            run_server(self.directory / f"node{i}", SECRET, "--database", self.database,
                       "--redis", self.redis.url, env=env, drain=True)
        )  # fmt: skip
        self.procs[i] = proc
        self.urls[i].add(proc.ws_url)
        return proc

    async def kill(self, i: int) -> None:
        """SIGKILL node ``i`` and wait for it to be gone."""
        proc, self.procs[i] = self.procs[i], None
        assert proc is not None
        proc.kill()
        await self._stacks[i].aclose()

    def ws_url(self, i: int) -> str:
        """Node ``i``'s WebSocket URL or, while it is down, the next live node's."""
        for k in range(NODES):
            proc = self.procs[(i + k) % NODES]
            if proc is not None:
                return proc.ws_url
        raise AssertionError("every node is down")

    def http_url(self, i: int) -> str:
        proc = self.procs[i]
        assert proc is not None
        return proc.http_url

    async def aclose(self) -> None:
        for stack in self._stacks:
            await stack.aclose()


@asynccontextmanager
async def open_cluster(directory: Path) -> AsyncIterator[Cluster]:
    async with run_postgres() as postgres, run_redis(directory / "redis") as redis:
        database = await postgres.create_database("cluster")
        cluster = Cluster(directory=directory, postgres=postgres, redis=redis, database=database)
        try:
            await cluster.start(0)  # migrates the schema; the others find it done
            async with trio.open_nursery() as nursery:
                for i in range(1, NODES):
                    nursery.start_soon(cluster.start, i)
            yield cluster
        finally:
            await cluster.aclose()


async def rest(
    cluster: Cluster, i: int, method: str, path: str, body: Any = None, *, auth: str | None = None
) -> httpx.Response:
    """One HTTP request to node ``i``, as the project's owner (or with ``auth``)."""
    headers = {"Authorization": auth or f"Bearer {token('olga', 'owner')}"}
    async with httpx.AsyncClient(base_url=cluster.http_url(i), timeout=10) as http:
        return await http.request(method, path, json=body, headers=headers)


async def agreed(
    ask: Callable[[int], Awaitable[T]], until: Callable[[T], bool], *, within: float = 20
) -> T:
    """What every node answers alike, once ``until`` holds for it: the answer. A node reads
    what another wrote to the shared tables a moment later (its audit flush, the alerts'
    tail), so the nodes are asked again until they agree, for ``within`` seconds at most.

    Raises:
        AssertionError: they did not agree in time (with their last answers).
    """
    answers: list[T] = []
    with trio.move_on_after(within):
        while True:
            answers = [await ask(i) for i in range(NODES)]
            if all(answer == answers[0] for answer in answers) and until(answers[0]):
                return answers[0]
            await trio.sleep(0.1)  # polling the nodes until they agree, bounded above
    raise AssertionError(f"the nodes did not agree within {within} s: {answers}")


@attrs.define(eq=False)
class Scenario:
    cluster: Cluster
    nursery: trio.Nursery
    setup_seq: int
    writers: list[Writer] = attrs.Factory(list)
    #: One entry per fault: what it cost and what the checkpoint after it found.
    faults: list[dict[str, Any]] = attrs.Factory(list)

    def add_writer(self, name: str, home: int) -> Writer:
        writer = Writer(name, functools.partial(self.cluster.ws_url, home), rate=10)
        self.writers.append(writer)
        self.nursery.start_soon(writer.run)
        return writer

    def on_node(self, i: int) -> set[str]:
        """The writers whose current connection is to node ``i``."""
        return {w.name for w in self.writers if w.connected_to in self.cluster.urls[i]}

    async def fault(
        self,
        name: str,
        inject: Callable[[], Awaitable[float]],
        cut: set[str],
        *,
        snapshot: bool = False,
        moving: Container[str] = (),
    ) -> dict[str, Any]:
        """Run ``inject`` (it returns when the fault ended), wait for every writer to be acked
        again, and record the recovery per node, the resumes and a checkpoint.

        ``cut``: the writers whose connection the fault ends; each must resume exactly once
        (with a snapshot when ``snapshot``: the epoch changed), the others never. Those of
        ``moving`` (cut and reconnecting to another node) may first resume with a replay
        there, before the epoch changed on that node, then with the snapshot."""
        before = {w.name: len(w.resumed_with_snapshot) for w in self.writers}
        retried = sum(w.retried for w in self.writers)
        began = trio.current_time()
        ended = await inject()
        await recovery_time(self.writers, ended)
        recovery = {}
        for i in range(NODES):
            via = self.cluster.urls[i]
            firsts = [t for w in self.writers if (t := w.first_ack_after(ended, via)) is not None]
            recovery[f"node{i}"] = round(min(firsts) - ended, 3) if firsts else None
        await wait_acks(self.writers, 3)
        inexact, twice = [], []
        for w in self.writers:
            resumes = w.resumed_with_snapshot[before.get(w.name, 0) :]
            expected = [[snapshot]] if w.name in cut else [[]]
            if w.name in moving:
                expected.append([False, True])
            if resumes == [False, True] and w.name in moving:
                twice.append(w.name)
            elif resumes not in expected:
                kinds = ["snapshot" if kind else "replay" for kind in resumes]
                inexact.append(f"{w.name} resumed: {kinds or 'never'}")
        # Through each node in turn: every node serves the whole log exactly.
        through = len(self.faults) % NODES
        url = self.cluster.ws_url(through)
        found = await checkpoint(url, self.writers, setup_seq=self.setup_seq)
        resent = sum(w.retried for w in self.writers) - retried
        entry = {"fault": name, "outage_s": round(ended - began, 3), "recovery_s": recovery,
                 **found, "checked_through": f"node{through}", "cut": sorted(cut),
                 "inexact_resumes": inexact, "resumed_twice": twice,
                 "resent_after_overloaded": resent}  # fmt: skip
        self.faults.append(entry)
        print(f"\n[cluster] {name}: {entry['outage_s']} s, then to the first ack per node "
              f"{recovery}; acked {found['acked']}, lost {found['lost']}, duplicated "
              f"{found['duplicated']}, gaps {found['gaps']}; {len(cut)} cut, inexact resumes "
              f"{inexact}, {twice} resumed twice, {resent} resent after overloaded")  # fmt: skip
        return entry

    # -- the faults ---------------------------------------------------------------------------

    async def kill_node(self, i: int, round_: int) -> None:
        cut = self.on_node(i)
        moved = [w for w in self.writers if w.name in cut]
        failover: dict[str, float] = {}

        async def inject() -> float:
            killed = trio.current_time()
            await self.cluster.kill(i)
            # Its clients go to the next node and resume there, before it comes back (an ack
            # the killed node had sent already may still arrive: not a failover).
            elsewhere = set().union(*(self.cluster.urls[k] for k in range(NODES) if k != i))
            for w in moved:
                await w.wait_until(lambda w=w: w.first_ack_after(killed, elsewhere) is not None)  # type: ignore[misc]
            failover["s"] = (
                max(w.first_ack_after(killed, elsewhere) or killed for w in moved) - killed
            )
            proc = await self.cluster.start(i)
            back = trio.current_time()
            self.add_writer(f"n{i}r{round_}", i)  # a new client of the node back
            assert self.cluster.ws_url(i) == proc.ws_url
            return back

        entry = await self.fault(f"SIGKILL node{i}", inject, cut)
        entry["failover_s"] = round(failover["s"], 3)
        entry["recovery_from"] = "the node listening again"

    async def kill_redis(self) -> None:
        acked_while_down: dict[str, int] = {}

        async def inject() -> float:
            await self.cluster.redis.kill()
            start = sum(len(w.acked) for w in self.writers)
            await wait_acks(self.writers, 5)  # edits commit and ack with Redis down
            acked_while_down["n"] = sum(len(w.acked) for w in self.writers) - start
            await self.cluster.redis.start()
            return trio.current_time()

        entry = await self.fault("SIGKILL redis", inject, set())
        entry["acked_while_down"] = acked_while_down["n"]
        entry["recovery_from"] = "redis answering PING again"

    async def restart_postgres(self) -> None:
        async def inject() -> float:
            await self.cluster.postgres.stop("immediate")
            await self.cluster.postgres.start()
            return trio.current_time()

        entry = await self.fault("pg_ctl stop -m immediate", inject, set())
        entry["recovery_from"] = "postgresql accepting connections again"

    async def operator_queries_and_erasure(self, user: str) -> None:
        """The user edits and comments on node 1; every node answers its audit events, an
        alert and its export alike; node 0 erases it; every node's room closes under its
        members, and no node serves what was erased."""
        cluster = self.cluster
        text = f"{user} was here"
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                client = await connect(nursery, cluster.ws_url(1))
                await join(client, user)
                insert = {"op": "insert", "element_id": f"{user}-note", "element_type": "note",
                          "props": {"by": "hand"}}  # fmt: skip
                note = {"change_id": f"{user}-note", "changes": [insert]}
                for kind, data in (
                    ("timeline_change", note),
                    ("comment_add", {"comment": {"id": f"{user}-c", "text": text}}),
                ):
                    reply = await client.request(kind, data)
                    assert reply["type"] == "ack", reply
                await close(client)

        async def audit(i: int, query: str = f"userId={user}") -> list[dict[str, Any]]:
            response = await rest(cluster, i, "GET", f"/api/collaboration/audit?{query}")
            assert response.status_code == 200, response.text
            return list(response.json()["events"])

        with trio.fail_after(60):
            events = await agreed(audit, lambda events: {"join", "edit", "comment", "leave"}
                                  <= {e["action"] for e in events})  # fmt: skip
        for i in range(NODES):  # a bad token, on every node: one alert for the cluster
            for _ in range(REFUSALS):
                refused = await rest(cluster, i, "GET", "/api/collaboration/conflicts",
                                     auth="Bearer x.y.z")  # fmt: skip
                assert refused.status_code == 401, refused.text

        async def alerts(i: int) -> list[dict[str, Any]]:
            response = await rest(cluster, i, "GET", "/api/collaboration/security/alerts")
            assert response.status_code == 200, response.text
            return list(response.json()["alerts"])

        def opened(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [a for a in alerts if not a["resolved"]]

        with trio.fail_after(60):
            raised = opened(await agreed(alerts, lambda found: len(opened(found)) == 1))
            refusals = re.fullmatch(r".*?(\d+) refused tokens from ip:127\.0\.0\.1.*",
                                    raised[0]["message"])  # fmt: skip
            assert refusals and int(refusals[1]) >= REFUSALS * NODES, raised
            path = f"/api/collaboration/security/alerts/{raised[0]['id']}/resolve"
            resolved = await rest(cluster, 2, "POST", path, {"note": "the cluster test"})
            assert resolved.status_code == 200, resolved.text
            await agreed(alerts, lambda found: not opened(found))

        async def export(i: int, who: str = user) -> dict[str, Any]:
            response = await rest(cluster, i, "POST", "/api/collaboration/gdpr/export",
                                  {"userId": who})  # fmt: skip
            assert response.status_code == 200, response.text
            return {k: v for k, v in response.json().items() if k != "exportedAt"}

        with trio.fail_after(60):
            exported = await agreed(export, lambda found: bool(found["comments"]))
        assert [c["text"] for c in exported["comments"]] == [text], exported
        assert [e["payload"]["change_id"] for e in exported["edits"]] == [f"{user}-note"]
        assert {e["action"] for e in exported["audit"]} >= {e["action"] for e in events}
        old_epoch = self.writers[0].epoch
        erased: dict[str, Any] = {}

        async def erase() -> float:
            response = await rest(cluster, 0, "POST", "/api/collaboration/gdpr/erase",
                                  {"userId": user})  # fmt: skip
            assert response.status_code == 200, response.text
            erased.update(response.json())
            return trio.current_time()

        # Every node's room of the project closes under its members: each resumes once, with
        # a snapshot (the epoch changed). A member of node 0 that reconnects to another node
        # (its own, back since it left it) may get there before the rewrite committed: then a
        # replay first, and the snapshot when that node's room closes too.
        everyone = {w.name for w in self.writers}
        node0 = cluster.urls[0]
        moving = {w.name for w in self.writers if w.connected_to in node0 and w.url() not in node0}
        entry = await self.fault(f"gdpr erasure of {user} on node0", erase, everyone,
                                 snapshot=True, moving=moving)  # fmt: skip
        entry["recovery_from"] = "the erasure's answer"
        assert erased["erased"]["comments"] == 1, erased
        pseudonym = erased["pseudonym"]
        with trio.fail_after(60):
            gone = await agreed(export, lambda found: not found["audit"])
            assert gone["comments"] == gone["edits"] == [], gone
            under = await agreed(functools.partial(export, who=pseudonym),
                                 lambda found: bool(found["edits"]))  # fmt: skip
            assert [e["payload"]["change_id"] for e in under["edits"]] == [f"{user}-note"]
            erasures = sum(f["fault"].startswith("gdpr erasure") for f in self.faults)
            await agreed(functools.partial(audit, query="action=erasure"),
                         lambda found: len(found) == erasures)  # fmt: skip
            # No node serves the erased history: a member replaying the whole log of the new
            # epoch, on each node, sees neither the user nor the comment's text.
            epochs = set()
            async with trio.open_nursery() as nursery:
                for i in range(NODES):
                    client = await connect(nursery, cluster.ws_url(i))
                    epoch = (await join(client, "auditor"))["epoch"]
                    await close(client)
                    epochs.add(epoch)
                    welcome, log = await replay_from(nursery, cluster.ws_url(i), 0, epoch)
                    assert welcome["replayed"] == welcome["seq"] == len(log), welcome
                    authors = {e["data"].get("user_id") for e in log}
                    assert user not in authors and pseudonym in authors, (i, authors)
                    assert text not in str(log), i
            assert len(epochs) == 1 and old_epoch not in epochs, (old_epoch, epochs)


async def cluster_rounds(tmp_path: Path, rounds: int, name: str) -> None:
    counts = Counts(name, extra={"rounds": rounds, "nodes": NODES,
                                 "writers_per_node": PER_NODE})  # fmt: skip
    with trio.fail_after(90 + 60 * rounds):  # generous: the machine may be shared
        async with open_cluster(tmp_path) as cluster, trio.open_nursery() as nursery:
            setup_seq = await setup_project(cluster.ws_url(0))
            scenario = Scenario(cluster, nursery, setup_seq)
            for i in range(NODES):
                for k in range(PER_NODE):
                    scenario.add_writer(f"n{i}w{k}", i)
            await wait_acks(scenario.writers, 10)  # concurrent writers on every node
            for round_ in range(rounds):
                await scenario.kill_node((NODES - 1 + round_) % NODES, round_)
                await scenario.kill_redis()
                await scenario.restart_postgres()
                await scenario.operator_queries_and_erasure(f"eve{round_}")
            await verify(cluster.ws_url(1), scenario.writers, counts, setup_seq=setup_seq)
            nursery.cancel_scope.cancel()
    faults = scenario.faults
    counts.extra["faults"] = faults
    counts.recovery_s = [t for f in faults for t in f["recovery_s"].values() if t is not None]
    for fault in faults:
        counts.lost += fault["lost"]
        counts.duplicated += fault["duplicated"]
        counts.gaps += fault["gaps"]
        counts.inexact_resumes += fault["inexact"] + len(fault["inexact_resumes"])
    report(counts)
    assert counts.failures() == {}, counts
    assert all(f["acked"] > 0 for f in faults), faults
    assert all(None not in f["recovery_s"].values() for f in faults), faults
    assert counts.acked > 0


async def test_cluster_on_postgresql_and_redis_loses_no_acknowledged_edit(tmp_path: Path) -> None:
    await cluster_rounds(tmp_path, 1, "cluster_postgres")


@pytest.mark.faults_full
@pytest.mark.skipif(not FULL, reason="a full fault run: set CREALIA_FAULTS_FULL=1")
async def test_cluster_on_postgresql_and_redis_full(tmp_path: Path) -> None:
    await cluster_rounds(tmp_path, 5, "cluster_postgres_full")

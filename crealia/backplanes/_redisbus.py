"""Redis as an ephemeral bus: what a cluster may lose without losing an acknowledged edit.

:class:`RedisBus` holds the pieces of the Redis backplane that are not the durable log, so that
the same code serves two backplanes:

- the ``redis`` backplane (``--redis`` alone), whose durable log is also in Redis, and
- the ``postgresql`` backplane with Redis beside it (``--database`` plus ``--redis``, the
  recommended cluster), where PostgreSQL is the store of record and Redis only carries this.

What it carries, all of which may be lost (a Redis restart, an eviction) at the cost of a
moment's staleness, never of data:

- **presence**: each process's members of a project in a hash (``crealia:{p}:presence``, a
  field per node) beside a per-node liveness key that expires after the room's TTL (three
  heartbeats), so a process that stops answering counts as gone;
- **ephemeral messages** (cursors, typing, membership announcements) over pub/sub
  (``crealia:{p}:eph``), batched by one publisher task and coalesced by key while they wait,
  read by a listener thread that reconnects with a backoff of up to 2 s;
- **rate-limit state**: GCRA theoretical arrival times per key, on Redis's own clock.

redis-py has no Trio support: its synchronous client runs in worker threads
(:class:`RedisThreads`); Redis errors become :class:`~crealia.Overloaded` at this boundary.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import Any, TypeVar

import attrs
import orjson
import redis
import trio

from .._errors import Overloaded
from .._model import Ephemeral

log = logging.getLogger("crealia.redis")

T = TypeVar("T")

# GCRA for rate limits shared by the cluster (see ``crealia._ratelimit``): per name, the TAT in
# epoch milliseconds on Redis's own clock, expiring once it has passed. ARGV holds a (cost,
# emission interval) pair per key; the answer is each TAT's lead over Redis's now, as a string
# (a Lua number would come back truncated to an integer).
_RATE_LIMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local out = {}
for i = 1, #KEYS do
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  tat = tat + tonumber(ARGV[2 * i - 1]) * tonumber(ARGV[2 * i])
  redis.call('SET', KEYS[i], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1)
  out[i] = string.format('%.3f', tat - now)
end
return out
"""

#: Rate-limit updates per script call: bounds how long one call holds Redis.
RATE_LIMIT_BATCH = 500

#: Ephemeral messages waiting for the publisher at most (past it, new keys are dropped).
OUTGOING = 10_000

#: The pub/sub pattern of every project's ephemeral channel.
EPHEMERAL_PATTERN = "crealia:*:eph"


def key(project_id: str, what: str) -> str:
    """The Redis key (or channel) ``what`` of a project: ``crealia:{project}:what``."""
    return f"crealia:{{{project_id}}}:{what}"


def project_of(channel: str) -> tuple[str, str]:
    """``(project_id, what)`` of a key or channel named by :func:`key`."""
    inner = channel[len("crealia:{") :]
    project_id, _, rest = inner.rpartition("}:")
    return project_id, rest


def _presence_share(raw: bytes) -> list[dict[str, Any]] | None:
    """A node's presence entry (a list of members, each with a string ``user_id``), or None
    when it is not one."""
    try:
        share = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(share, list) or not all(
        isinstance(m, dict) and isinstance(m.get("user_id"), str)
        and isinstance(m.get("connections", 0), int) for m in share
    ):  # fmt: skip
        return None
    return share


class RedisThreads:
    """redis-py's synchronous client, run in worker threads; errors mapped at this boundary."""

    def __init__(self, url: str) -> None:
        """Raises ``ValueError`` (redis-py's word) for a URL it cannot use."""
        self.client = redis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=False
        )
        self.url = url
        self._limiter = trio.CapacityLimiter(16)

    async def run(self, fn: Callable[[redis.Redis], T]) -> T:
        """Run ``fn(client)`` in a worker thread.

        Cancellation waits for the command (bounded by the 2 s socket timeout).

        Raises:
            Overloaded: Redis is unreachable or failed the command.
        """
        try:
            return await trio.to_thread.run_sync(fn, self.client, limiter=self._limiter)
        except redis.RedisError as exc:
            raise Overloaded(f"redis unavailable, nothing was applied: {exc}") from exc

    def close(self) -> None:
        self.client.close()


def listen(
    client: redis.Redis,
    patterns: Iterable[str],
    stop: list[bool],
    on_messages: Callable[[list[dict[str, Any]]], None],
    on_state: Callable[[bool, BaseException | None], None],
) -> None:
    """A listener thread's loop: read pub/sub ``patterns`` until ``stop[0]``.

    ``on_messages`` gets groups of up to 512 messages, ``on_state(True, None)`` each time the
    subscription is (re)made and ``on_state(False, exc)`` each time it is lost; both are called
    from this thread (they hand over to Trio themselves) and may raise
    :class:`trio.RunFinishedError` to end it. A lost connection is retried with a backoff of
    0.1 s doubling up to 2 s; nothing ends the loop but ``stop`` and the end of the Trio run.
    """
    backoff = 0.1
    pubsub = None
    while not stop[0]:
        try:
            if pubsub is None:
                pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.psubscribe(*patterns)
                on_state(True, None)
                backoff = 0.1
            # A short timeout so that ``stop`` is noticed quickly (closing the socket would
            # not stop it: redis-py reconnects).
            message = pubsub.get_message(timeout=0.1)
            batch: list[dict[str, Any]] = []
            while message is not None and len(batch) < 512:
                if message.get("type") in ("message", "pmessage"):
                    batch.append(message)
                message = pubsub.get_message(timeout=0)
            if batch:
                on_messages(batch)
        except trio.RunFinishedError:
            return
        except Exception as exc:  # RedisError, or anything else: reconnect, never die
            log.warning("redis pub/sub lost (%s); reconnecting in %.1f s", exc, backoff)
            if pubsub is not None:
                with suppress(redis.RedisError):
                    pubsub.close()
            pubsub = None
            try:
                on_state(False, exc)
            except trio.RunFinishedError:
                return
            time.sleep(backoff)  # in the listener thread, not the event loop
            backoff = min(backoff * 2, 2.0)
    if pubsub is not None:
        pubsub.close()


@attrs.define(eq=False)
class RedisBus:
    """Presence, ephemeral pub/sub and rate-limit state in Redis, for one process.

    It owns no task: its owner (a backplane) runs :meth:`publisher` in its nursery, reads the
    ephemeral channels (:data:`EPHEMERAL_PATTERN`) with :func:`listen` in a thread of that
    nursery, and hands each message to :meth:`ephemeral_of`.
    """

    redis: RedisThreads
    node_id: str
    _outgoing: dict[tuple[Any, ...], Ephemeral] = attrs.Factory(dict)
    _outgoing_ready: trio.Event = attrs.Factory(trio.Event)
    _rate_limit_script: Any = None

    def __attrs_post_init__(self) -> None:
        self._rate_limit_script = self.redis.client.register_script(_RATE_LIMIT)

    # -- ephemeral messages -------------------------------------------------------------------

    def enqueue(self, message: Ephemeral) -> None:
        """Queue ``message`` for the other processes (never blocks; dropped when
        :data:`OUTGOING` other keys wait). The publisher sends in batches: one thread hop and
        one pipeline per batch instead of per cursor move. A user's presence updates of one
        kind coalesce while they wait (the latest wins), like in a room's tick."""
        k = (message.project_id, *message.key) if message.key else (message.project_id, id(message))
        if len(self._outgoing) < OUTGOING or k in self._outgoing:
            self._outgoing[k] = message
            self._outgoing_ready.set()

    async def publisher(self) -> None:
        """Publish what :meth:`enqueue` queued, until cancelled. A batch Redis refuses is
        dropped (ephemeral traffic may be)."""
        while True:
            await self._outgoing_ready.wait()
            self._outgoing_ready = trio.Event()
            batch, self._outgoing = list(self._outgoing.values()), {}
            prefix = self.node_id.encode() + b"|"
            items = [
                (
                    key(m.project_id, "eph"),
                    prefix + orjson.dumps({"frame": m.encoded.decode(), "origin": m.origin,
                                           "key": list(m.key) if m.key else None}),
                )
                for m in batch
            ]  # fmt: skip

            def send(client: redis.Redis, items: list[tuple[str, bytes]] = items) -> Any:
                pipe = client.pipeline(transaction=False)
                for channel, data in items:
                    pipe.publish(channel, data)
                return pipe.execute()

            with contextlib.suppress(Overloaded):  # ephemeral traffic may be dropped
                await self.redis.run(send)

    def ephemeral_of(self, project_id: str, raw: bytes) -> Ephemeral | None:
        """The ephemeral message a pub/sub payload of ``project_id``'s channel carries, or
        ``None`` for this process's own (delivered locally already).

        Raises:
            orjson.JSONDecodeError, KeyError, TypeError: not one (another version's, a stray
                PUBLISH).
        """
        node, _, body = raw.partition(b"|")
        if node == self.node_id.encode():
            return None
        data = orjson.loads(body)
        k = data.get("key")
        return Ephemeral(
            project_id=project_id,
            encoded=data["frame"].encode(),
            origin=data.get("origin"),
            key=tuple(k) if k else None,  # type: ignore[arg-type]
        )

    # -- presence -----------------------------------------------------------------------------

    async def share_presence(
        self, project_id: str, members: list[dict[str, Any]], *, ttl: float
    ) -> None:
        """This node's members of the project, alive for ``ttl`` seconds (see
        :meth:`crealia.abc.Backplane.share_presence`).

        Raises:
            Overloaded: Redis is unreachable.
        """
        k = key(project_id, "presence")
        data = orjson.dumps(members)
        alive = f"crealia:node:{self.node_id}"
        seconds = max(1, round(ttl))

        def write(client: redis.Redis) -> Any:
            pipe = client.pipeline(transaction=False)
            pipe.set(alive, b"1", ex=seconds)
            if members:
                pipe.hset(k, self.node_id, data)
            else:
                pipe.hdel(k, self.node_id)
            return pipe.execute()

        await self.redis.run(write)

    async def remote_presence(self, project_id: str) -> list[dict[str, Any]]:
        """The members other live nodes share for the project (a dead node's are forgotten).

        Raises:
            Overloaded: Redis is unreachable.
        """
        k = key(project_id, "presence")

        def read(client: redis.Redis) -> Any:
            shares: dict[bytes, bytes] = client.hgetall(k)  # type: ignore[assignment]
            nodes = [n for n in shares if n != self.node_id.encode()]
            if not nodes:
                return []
            alive = client.mget([b"crealia:node:" + n for n in nodes])
            dead = [n for n, up in zip(nodes, alive, strict=True) if up is None]
            if dead:
                client.hdel(k, *dead)  # a process that stopped answering: forget its users
            return [(n, shares[n]) for n, up in zip(nodes, alive, strict=True) if up]

        members: list[dict[str, Any]] = []
        for node, raw in await self.redis.run(read):
            share = _presence_share(raw)
            if share is None:
                # Another version's or a broken node's entry: not this process's to fail on.
                log.warning("project %s: ignored malformed presence of node %r", project_id,
                            node.decode(errors="replace")[:64])  # fmt: skip
                continue
            members.extend(share)
        return members

    # -- rate limits --------------------------------------------------------------------------

    async def sync_rate_limits(self, updates: list[tuple[str, int, float]]) -> list[float]:
        """GCRA in Redis, on its clock (see :meth:`crealia.abc.Backplane.sync_rate_limits`).

        Raises:
            Overloaded: Redis is unreachable; nothing may have been recorded.
        """
        script = self._rate_limit_script
        batches = [updates[i : i + RATE_LIMIT_BATCH]
                   for i in range(0, len(updates), RATE_LIMIT_BATCH)]  # fmt: skip

        def sync(client: redis.Redis) -> Any:
            pipe = client.pipeline(transaction=False)
            for batch in batches:
                keys = [f"crealia:rl:{name}" for name, _cost, _interval in batch]
                args: list[str | int] = []
                for _name, cost, interval in batch:
                    args += (cost, repr(interval))
                script(keys=keys, args=args, client=pipe)
            return pipe.execute()

        if not updates:
            return []
        return [float(ahead) for answer in await self.redis.run(sync) for ahead in answer]

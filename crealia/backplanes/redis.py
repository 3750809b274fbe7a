"""The Redis backplane: any number of crealia processes serving every project from one Redis.

Registered as ``redis`` in the ``crealia.backplanes`` entry-point group, for ``redis://``,
``rediss://`` (TLS) and ``unix://`` URLs (``--backplane``; ``--redis`` and ``REDIS_URL`` are
older spellings). It shares presence and rate limits between the processes, names its health
check ``redis``, and does not support GDPR export and erasure yet.

Sequencing is optimistic and atomic. Each process keeps a mirror of every project it serves (the
document at some ``seq``, recent history, roles). To write, it prepares the event against its
mirror (the same pure code as the in-process backplane) and runs one Lua script that, in a single
step, refuses a duplicate ``change_id``/comment id, checks that the project's ``seq`` is still the
one the mirror was at, appends the event to the project's stream under the next ``seq``, records
the outcome and conflicts, and publishes a notice. If another process wrote first, the script
answers ``stale``; the process catches its mirror up from the stream and prepares again. So two
processes can never hand out the same ``seq`` nor miss a conflict, and an ack is sent only after
Redis accepted the write.

Change and comment ids are kept in a hash per project (with the author and a digest of the
operations, so that only the same change resent is a ``duplicate``), trimmed oldest first to the
last ``history_limit`` ids like the log: a resend older than that is taken for a new change.

The stream (``crealia:{p}:log``, trimmed to about ``history_limit`` entries) is the durable log
and serves resume (``crealia:{p}:epoch`` names that history, docs/protocol.md §3: a mirror
holds at most ``history_memory_bytes`` of its history, the older kept events are read back from
the stream); a snapshot
(``crealia:{p}:snap``) is written every ``snapshot_every`` events so a mirror can be rebuilt
from the snapshot plus the stream. Notices (``crealia:{p}:events``) and ephemeral traffic
(``crealia:{p}:eph``) travel over pub/sub; a process that misses notices catches up from the
stream, so no member misses a durable event. Presence, ephemeral pub/sub and rate limits are
:class:`~crealia.backplanes._redisbus.RedisBus`'s, the same code the PostgreSQL backplane uses
with Redis beside it.

redis-py has no Trio support: its synchronous client runs in worker threads behind
:class:`_RedisThreads`, and pub/sub is read by one listener thread that hands messages to Trio
in groups. Redis errors become :class:`~crealia.Overloaded` at this boundary.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import orjson
import redis
import trio

from .. import _wire
from .._backplane import Backplane, HealthProbe, History
from .._config import Config
from .._document import Document, Quotas
from .._errors import ConfigurationError, NotFound, Overloaded, ProtocolError, TransportError
from .._model import ChangeOutcome, Conflict, DurableEvent, Ephemeral, Resolution, Settled, User
from .._sequencing import (
    ChangeRecord,
    PendingLoad,
    dry_run_of,
    duplicate_of,
    now_ms,
    prepare_change,
    prepare_comment,
    prepare_settle,
    record_of,
    value_at,
)
from .._storage import scrub_chain
from ._mirrors import Mirror, MirrorSubscriptions
from ._redisbus import EPHEMERAL_PATTERN, RedisBus, RedisThreads, listen
from ._redisbus import RATE_LIMIT_BATCH as RATE_LIMIT_BATCH  # re-exported: tests and users
from ._redisbus import key as _key
from ._redisbus import project_of as _project_of

log = logging.getLogger("crealia.redis")

#: Attempts at one write before giving up with ``overloaded`` (each failed attempt means another
#: process wrote to the same project in between).
MAX_ATTEMPTS = 64

#: A write that opens and settles no conflict.
_NO_PENDING = PendingLoad()

_COMMIT = """
local mode = ARGV[2]
if mode == 'settle' then
  local raw = redis.call('HGET', KEYS[4], ARGV[3])
  if not raw or cjson.decode(raw)['status'] ~= 'pending' then return {'gone', ''} end
else
  local first = redis.call('HGET', KEYS[3], ARGV[3])
  if first then return {'dup', first} end
end
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur ~= tonumber(ARGV[1]) then return {'stale', tostring(cur)} end
-- What the pending conflicts hold (count, bytes): a change may not open more past the quotas.
local dn, db = tonumber(ARGV[9]), tonumber(ARGV[10])
local n, held = 0, 0
if dn ~= 0 or db ~= 0 then
  local counted = redis.call('HMGET', KEYS[6], 'n', 'bytes')
  if not counted[1] then return {'uncounted', ''} end
  n, held = tonumber(counted[1]), tonumber(counted[2] or '0')
  if mode == 'change' and (n + dn > tonumber(ARGV[11]) or held + db > tonumber(ARGV[12])) then
    return {'quota', tostring(n) .. ' ' .. tostring(held)}
  end
end
local seq = cur
if ARGV[5] ~= '' then
  seq = cur + 1
  redis.call('SET', KEYS[1], seq)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], tostring(seq) .. '-1', 'e', ARGV[5])
end
if mode ~= 'settle' then
  -- Ids are remembered about as long as the log keeps events: oldest first out.
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
  redis.call('ZADD', KEYS[5], seq, ARGV[3])
  local excess = redis.call('ZCARD', KEYS[5]) - tonumber(ARGV[6])
  if excess > 0 then
    local old = redis.call('ZPOPMIN', KEYS[5], excess)
    for j = 1, #old, 2 do redis.call('HDEL', KEYS[3], old[j]) end
  end
end
local i = 13
while i < #ARGV do
  redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
  i = i + 2
end
if dn ~= 0 or db ~= 0 then
  redis.call('HSET', KEYS[6], 'n', math.max(0, n + dn), 'bytes', math.max(0, held + db))
end
if ARGV[8] ~= '' then redis.call('PUBLISH', ARGV[7], ARGV[8]) end
return {'ok', tostring(seq)}
"""

_SNAPSHOT = """
local cur = redis.call('HGET', KEYS[1], 'seq')
if not cur or tonumber(cur) < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'doc', ARGV[2])
end
return 1
"""


#: Set once every project's stored settings are free of AI endpoints and keys.
SCRUBBED_KEY = "crealia:settings-scrubbed:1"

_COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2])
    return 1
end
return 0
"""


def _event_dict(event: DurableEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "kind": event.kind,
        "user_id": event.user_id,
        "at": event.at,
        "payload": event.payload,
        "effects": event.effects,
    }


def _event_from(project_id: str, data: dict[str, Any]) -> DurableEvent:
    return DurableEvent(project_id=project_id, **data)


def _conflict_from(data: dict[str, Any]) -> Conflict:
    return Conflict(**data)


def _stored_change(user: User, change: _wire.TimelineChange, outcome: ChangeOutcome) -> bytes:
    record = record_of(user, change, outcome)
    return orjson.dumps(
        {**attrs.asdict(record.outcome), "user_id": record.user_id, "digest": record.digest}
    )


def _duplicate(stored: bytes, user: User, change: _wire.TimelineChange) -> ChangeOutcome:
    """The duplicate ack of ``change``, whose id is stored as ``stored``.

    Raises:
        BadRequest: the id was first used by another user or for other changes.
    """
    first = orjson.loads(stored)
    first.pop("detected", None)
    # Outcomes stored before the author and digest were have neither: taken as the same.
    user_id = first.pop("user_id", user.id)
    digest = first.pop("digest", None)
    record = ChangeRecord(outcome=ChangeOutcome(**first), user_id=user_id, digest=digest)
    return duplicate_of(record, user, change)


class _RedisThreads(RedisThreads):
    """The bus's client, with the durable log's scripts."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.commit_script = self.client.register_script(_COMMIT)
        self.snapshot_script = self.client.register_script(_SNAPSHOT)


@attrs.define(eq=False)
class RedisBackplane(MirrorSubscriptions, Backplane):
    """The cluster backplane. Open it with :func:`open_redis_backplane`."""

    redis: _RedisThreads
    history_limit: int = 10_000
    snapshot_every: int = 500
    quotas: Quotas = attrs.Factory(Quotas)
    node_id: str = attrs.Factory(lambda: uuid.uuid4().hex[:12])
    _mirrors: dict[str, Mirror] = attrs.Factory(dict)
    _loading: dict[str, trio.Lock] = attrs.Factory(dict)
    _nursery: trio.Nursery | None = None
    #: False while the pub/sub listener has lost Redis (for ``/readyz``).
    connected: bool = True
    _connected_event: trio.Event = attrs.Factory(trio.Event)
    #: Presence, ephemeral pub/sub and rate limits (shared with PostgreSQL plus Redis).
    bus: RedisBus = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.bus = RedisBus(self.redis, self.node_id)

    # -- mirrors ------------------------------------------------------------------------------

    async def _mirror(self, project_id: str) -> Mirror:
        mirror = self._mirrors.get(project_id)
        if mirror is not None:
            return mirror
        lock = self._loading.setdefault(project_id, trio.Lock())
        async with lock:
            mirror = self._mirrors.get(project_id)
            if mirror is None:
                mirror = await self._load(project_id)
                self._mirrors[project_id] = mirror
            return mirror

    async def _load(self, project_id: str) -> Mirror:
        def load(client: redis.Redis) -> tuple[Any, Any, Any]:
            pipe = client.pipeline(transaction=True)
            pipe.hgetall(_key(project_id, "snap"))
            pipe.xrange(_key(project_id, "log"))
            pipe.hgetall(_key(project_id, "roles"))
            snap, entries, roles = pipe.execute()
            return snap, entries, roles

        snap, entries, roles = await self.redis.run(load)

        def build() -> tuple[Document, History]:
            # In a worker thread (not Redis's: its commands go on): decoding up to
            # history_limit events on the event loop held everything else (issue 17).
            doc = (
                Document.load(project_id, orjson.loads(snap[b"doc"]))
                if snap
                else Document(project_id=project_id)
            )
            doc.quotas = self.quotas
            history = History(limit=self.history_limit, max_bytes=self.quotas.history_bytes,
                              memory_bytes=self.quotas.history_memory)  # fmt: skip
            for _id, fields in entries:
                event = _event_from(project_id, orjson.loads(fields[b"e"]))
                if event.seq > doc.seq + 1:
                    raise Overloaded(f"project {project_id!r}: the log lost events "
                                     f"{doc.seq + 1}..{event.seq - 1}")  # fmt: skip
                if event.seq == doc.seq + 1:
                    doc.apply(event.effects, event.seq, event.user_id)
                history.append(event)
            return doc, history

        doc, history = await trio.to_thread.run_sync(build)
        return Mirror(
            doc=doc,
            history=history,
            roles={k.decode(): v.decode() for k, v in roles.items()},
        )

    def _apply(self, mirror: Mirror, event: DurableEvent) -> bool:
        """Apply the next event to the mirror and tell the listeners; False on a gap."""
        if event.seq <= mirror.doc.seq:
            return True
        if event.seq > mirror.doc.seq + 1:
            return False
        mirror.doc.apply(event.effects, event.seq, event.user_id)
        mirror.history.append(event)
        for listener in list(mirror.listeners):
            listener.on_durable(event)
        return True

    async def _catch_up(self, project_id: str, mirror: Mirror) -> None:
        """Read what the stream holds after the mirror's seq and apply it, in order."""
        start = mirror.doc.seq + 1

        def read(client: redis.Redis) -> Any:
            return client.xrange(_key(project_id, "log"), min=f"{start}-1")

        entries = await self.redis.run(read)
        for _id, fields in entries:
            event = _event_from(project_id, orjson.loads(fields[b"e"]))
            if not self._apply(mirror, event):
                # The stream was trimmed past the mirror: rebuild it from the snapshot, and
                # hand the listeners what they missed that the log still holds.
                old_seq = mirror.doc.seq
                fresh = await self._load(project_id)
                after = max(old_seq, fresh.history.first_kept - 1)
                missed = await fresh.history.since(after, partial(self._logged, project_id))
                missed = missed or []
                # No await from here on: an event from pub/sub must not reach the listeners
                # (through the new mirror) before the ones they missed.
                fresh.listeners = mirror.listeners
                fresh.lock = mirror.lock
                self._mirrors[project_id] = fresh
                if missed and missed[0].seq > old_seq + 1:
                    log.error("project %s: events %d..%d are gone from the log; members "
                              "resync on their next resume", project_id, old_seq + 1,
                              missed[0].seq - 1)  # fmt: skip
                for missed_event in missed:
                    for listener in list(fresh.listeners):
                        listener.on_durable(missed_event)
                return

    # -- writes -------------------------------------------------------------------------------

    async def _commit(
        self,
        project_id: str,
        mirror: Mirror,
        mode: str,
        dedup_id: str,
        dedup_value: bytes,
        event: DurableEvent | None,
        conflicts: list[Conflict],
        pending: PendingLoad = _NO_PENDING,
    ) -> tuple[str, bytes]:
        """Run the commit script: ``pending`` is what the write changes in the project's pending
        conflicts (a change that would take them past the quotas gets ``quota``, and
        ``uncounted`` while the project has no count yet: :meth:`_count_pending`)."""
        notice = orjson.dumps(
            {
                "node": self.node_id,
                "event": _event_dict(event) if event else None,
                "conflicts": [attrs.asdict(c) for c in conflicts if c.status == "pending"],
            }
        )
        expected = mirror.doc.seq
        args: list[Any] = [
            expected,
            mode,
            dedup_id,
            dedup_value,
            orjson.dumps(_event_dict(event)) if event else b"",
            self.history_limit,
            _key(project_id, "events"),
            notice if (event or conflicts) else b"",
            pending.count,
            pending.bytes,
            self.quotas.pending_conflicts,
            self.quotas.pending_bytes,
        ]
        for conflict in conflicts:
            args += [conflict.id, orjson.dumps(attrs.asdict(conflict))]
        ids = "changes" if mode == "change" else "comments"
        keys = [
            _key(project_id, "seq"),
            _key(project_id, "log"),
            _key(project_id, ids),
            _key(project_id, "conflicts"),
            _key(project_id, f"{ids}-order"),
            _key(project_id, "pending"),
        ]

        def run(client: redis.Redis) -> Any:
            return self.redis.commit_script(keys=keys, args=args, client=client)

        try:
            status, value = await self.redis.run(run)
        except Overloaded as exc:
            # The script may have run before the connection failed (or may run once a paused
            # Redis goes on): whatever it did is in the stream, and a catch-up brings it to this
            # process's rooms. The client cannot know either: it must resend with the same id.
            self._schedule_catch_up(project_id, mirror)
            cause = exc.__cause__ or exc
            raise Overloaded(
                f"redis did not answer the write, which may have been applied: resend it with "
                f"the same id ({cause})",
                outcome="unknown",
            ) from exc
        if status in (b"dup", b"gone"):
            self._schedule_catch_up(project_id, mirror)
        if status == b"stale" and int(value) < expected:
            # No catch-up can help: Redis holds less than this process had seen from it. (The
            # mirror may have moved on since the script ran: compare with what it was sent.)
            raise Overloaded(
                f"redis is behind this process (seq {int(value)} there, {expected} here: "
                "it lost acknowledged writes), nothing was applied"
            )
        return status.decode(), value

    def _after_commit(self, project_id: str, mirror: Mirror, event: DurableEvent | None,
                      conflicts: list[Conflict]) -> None:  # fmt: skip
        if event is not None:
            self._apply(mirror, event)
            if event.seq % self.snapshot_every == 0 and self._nursery is not None:
                self._nursery.start_soon(self._write_snapshot, project_id, mirror)
                # The stream keeps what the history keeps: by count (MAXLEN) and by bytes.
                # Never past the previous snapshot: the new one may fail to be written.
                first_kept = min(mirror.history.first_kept, event.seq - self.snapshot_every + 1)
                self._nursery.start_soon(self._trim_log, project_id, first_kept)
        if conflicts:
            for listener in list(mirror.listeners):
                listener.on_conflicts(conflicts)

    async def _write_snapshot(self, project_id: str, mirror: Mirror) -> None:
        seq, doc = mirror.doc.seq, orjson.dumps(mirror.doc.dump())

        def write(client: redis.Redis) -> Any:
            return self.redis.snapshot_script(
                keys=[_key(project_id, "snap")], args=[seq, doc], client=client
            )

        try:
            await self.redis.run(write)
        except Overloaded as exc:
            log.warning("snapshot of %s at %d not written: %s", project_id, seq, exc)

    async def _trim_log(self, project_id: str, first_kept: int) -> None:
        """Drop the stream's entries before ``first_kept`` (the history's byte bound)."""

        def trim(client: redis.Redis) -> Any:
            return client.xtrim(_key(project_id, "log"), minid=f"{first_kept}-0", approximate=True)

        try:
            await self.redis.run(trim)
        except Overloaded as exc:
            log.warning("log of %s not trimmed: %s", project_id, exc)

    async def commit_change(
        self, user: User, change: _wire.TimelineChange, *, strategy: str = "manual"
    ) -> ChangeOutcome:
        project_id = user.project_id
        mirror = await self._mirror(project_id)
        for _attempt in range(MAX_ATTEMPTS):
            async with mirror.lock:
                mirror = self._mirrors.get(project_id, mirror)
                try:
                    outcome, event = prepare_change(
                        mirror.doc, user, change, strategy=strategy, roles=mirror.roles,
                        lookup=value_at(mirror.history), at=now_ms(), pending=None,
                    )  # fmt: skip
                except ProtocolError:
                    # A resend of an accepted change may no longer fit the document (its insert
                    # exists now): it is a duplicate, not an error. (A fitting one is caught by
                    # the script, atomically.)
                    first = await self._first_outcome(project_id, change.change_id)
                    if first is not None:
                        return _duplicate(first, user, change)
                    raise
                stored = _stored_change(user, change, outcome)
                # The quotas on pending conflicts are checked by the script, atomically.
                status, value = await self._commit(
                    project_id, mirror, "change", change.change_id, stored, event,
                    outcome.detected, PendingLoad.of(outcome.detected),
                )  # fmt: skip
                if status == "dup":
                    return _duplicate(value, user, change)
                if status == "quota":
                    count, held = (int(float(x)) for x in value.split())
                    # Raises the same ``too_large`` as the embedded backplane.
                    prepare_change(
                        mirror.doc, user, change, strategy=strategy, roles=mirror.roles,
                        lookup=value_at(mirror.history), at=now_ms(),
                        pending=PendingLoad(count, held),
                    )  # fmt: skip
                    continue  # room was made meanwhile
                if status == "uncounted":
                    await self._count_pending(project_id)
                    continue
                if status == "ok":
                    # Before any await: the event is in Redis, so it must reach this
                    # process's rooms whatever happens next.
                    mirror.roles[user.id] = user.role
                    self._after_commit(project_id, mirror, event, outcome.detected)
                    with contextlib.suppress(Overloaded):
                        await self._remember_role(project_id, user)
                    return outcome
                await self._catch_up(project_id, mirror)
        raise Overloaded("too many concurrent writes to this project; retry")

    async def _first_outcome(self, project_id: str, change_id: str) -> bytes | None:
        def read(client: redis.Redis) -> Any:
            return client.hget(_key(project_id, "changes"), change_id)

        raw = await self.redis.run(read)
        return raw or None

    async def _remember_role(self, project_id: str, user: User) -> None:
        def write(client: redis.Redis) -> Any:
            return client.hset(_key(project_id, "roles"), user.id, user.role)

        await self.redis.run(write)

    async def commit_comment(self, user: User, comment: _wire.Comment) -> tuple[int, bool]:
        project_id = user.project_id
        mirror = await self._mirror(project_id)
        for _attempt in range(MAX_ATTEMPTS):
            async with mirror.lock:
                mirror = self._mirrors.get(project_id, mirror)
                event = prepare_comment(mirror.doc, user, comment, now_ms())
                status, value = await self._commit(
                    project_id, mirror, "comment", comment.id, str(event.seq).encode(), event, []
                )
                if status == "dup":
                    return int(value), True
                if status == "ok":
                    self._after_commit(project_id, mirror, event, [])
                    return event.seq, False
                await self._catch_up(project_id, mirror)
        raise Overloaded("too many concurrent writes to this project; retry")

    async def settle(
        self,
        project_id: str,
        conflict_id: str,
        resolution: Resolution,
        *,
        by: str,
        writer: str,
        expect_seq: int | None = None,
        redetect: bool = True,
    ) -> Settled:
        mirror = await self._mirror(project_id)
        for _attempt in range(MAX_ATTEMPTS):
            async with mirror.lock:
                mirror = self._mirrors.get(project_id, mirror)
                conflict = await self._pending_one(project_id, conflict_id)
                event, resolved, redetected = prepare_settle(
                    mirror.doc, conflict, resolution, by=by, writer=writer,
                    expect_seq=expect_seq, at=now_ms(), redetect=redetect,
                )  # fmt: skip
                written = [resolved] + ([redetected] if redetected else [])
                # The redetected one takes the settled one's place: never refused for room.
                freed, taken = PendingLoad.of([conflict]), PendingLoad.of(written)
                status, _value = await self._commit(
                    project_id, mirror, "settle", conflict_id, b"", event, written,
                    PendingLoad(taken.count - freed.count, taken.bytes - freed.bytes),
                )  # fmt: skip
                if status == "uncounted":
                    await self._count_pending(project_id)
                    continue
                if status == "gone":
                    raise NotFound(
                        f"data.conflict_id: no pending conflict {conflict_id!r} in this project"
                    )
                if status == "ok":
                    self._after_commit(project_id, mirror, event,
                                       [redetected] if redetected else [])  # fmt: skip
                    return Settled(seq=event.seq, redetected=redetected)
                await self._catch_up(project_id, mirror)
        raise Overloaded("too many concurrent writes to this project; retry")

    async def _count_pending(self, project_id: str) -> None:
        """Count the project's stored pending conflicts for the quotas, once (conflicts stored
        before the count was kept). No write touches them while the count is missing."""
        load = PendingLoad.of(await self._all_conflicts(project_id))
        key = _key(project_id, "pending")

        def write(client: redis.Redis) -> Any:
            pipe = client.pipeline(transaction=True)
            pipe.hsetnx(key, "n", load.count)
            pipe.hsetnx(key, "bytes", load.bytes)
            return pipe.execute()

        await self.redis.run(write)

    async def conflict(self, project_id: str, conflict_id: str) -> Conflict | None:
        def read(client: redis.Redis) -> Any:
            return client.hget(_key(project_id, "conflicts"), conflict_id)

        raw = await self.redis.run(read)
        return _conflict_from(orjson.loads(raw)) if raw else None

    async def _pending_one(self, project_id: str, conflict_id: str) -> Conflict:
        conflict = await self.conflict(project_id, conflict_id)
        if conflict is None or conflict.status != "pending":
            raise NotFound(f"data.conflict_id: no pending conflict {conflict_id!r} in this project")
        return conflict

    # -- reads --------------------------------------------------------------------------------

    async def _fresh(self, project_id: str) -> Mirror:
        mirror = await self._mirror(project_id)
        async with mirror.lock:
            await self._catch_up(project_id, mirror)
        return self._mirrors.get(project_id, mirror)

    async def snapshot(self, project_id: str) -> dict[str, Any]:
        return (await self._fresh(project_id)).doc.snapshot()

    async def events_since(self, project_id: str, seq: int) -> list[DurableEvent] | None:
        mirror = await self._fresh(project_id)
        head = mirror.doc.seq
        if seq > head:
            return None
        if seq == head:
            return []
        return await mirror.history.since(seq, partial(self._logged, project_id))

    async def _logged(self, project_id: str, after: int, upto: int) -> list[DurableEvent]:
        """The stream's events ``after < seq <= upto``."""

        def read(client: redis.Redis) -> Any:
            return client.xrange(_key(project_id, "log"), min=f"{after + 1}-0", max=str(upto))

        def decode(entries: Any) -> list[DurableEvent]:
            events = [_event_from(project_id, orjson.loads(f[b"e"])) for _id, f in entries]
            for event in events:
                _ = event.encoded
            return events

        # Decoded in a worker thread, not on the event loop (see _load).
        return await trio.to_thread.run_sync(decode, await self.redis.run(read))

    async def epoch(self, project_id: str) -> str:
        # One key per project, created by whichever process asks first: every process answers
        # the same, and replacing the key (a rewrite, a restore) is seen by the next welcome.
        key, fresh = _key(project_id, "epoch"), uuid.uuid4().hex

        def read(client: redis.Redis) -> Any:
            pipe = client.pipeline(transaction=True)
            pipe.set(key, fresh, nx=True)
            pipe.get(key)
            return pipe.execute()[1]

        raw = await self.redis.run(read)
        return bytes(raw).decode() if raw else fresh

    async def _all_conflicts(self, project_id: str) -> list[Conflict]:
        def read(client: redis.Redis) -> Any:
            return client.hvals(_key(project_id, "conflicts"))

        rows = await self.redis.run(read)
        return sorted((_conflict_from(orjson.loads(r)) for r in rows),
                      key=lambda c: c.created_at)  # fmt: skip

    async def pending_conflicts(self, project_id: str) -> list[Conflict]:
        return [c for c in await self._all_conflicts(project_id) if c.status == "pending"]

    async def conflicts(
        self, project_id: str, *, status: str | None = None, limit: int = 200
    ) -> list[Conflict]:
        found = [c for c in await self._all_conflicts(project_id)
                 if status is None or c.status == status]  # fmt: skip
        return list(reversed(found))[:limit]

    async def dry_run(self, user: User, change: _wire.TimelineChange) -> dict[str, Any]:
        mirror = await self._fresh(user.project_id)
        return dry_run_of(mirror.doc, mirror.history, user, change)

    async def get_settings(self, project_id: str) -> dict[str, Any]:
        def read(client: redis.Redis) -> Any:
            return client.get(_key(project_id, "settings"))

        raw = await self.redis.run(read)
        return dict(orjson.loads(raw)) if raw else {}

    async def scrub_secrets(self) -> int:
        """Remove AI endpoints and keys from every project's stored strategy options (what
        ``_storage.SCHEMA_VERSION`` 1 does to SQLite), once per Redis: a marker key says it
        was done. Returns how many projects' settings were rewritten. A settings value changed
        meanwhile by another process is left to it (compare and set)."""

        def scrub(client: redis.Redis) -> int:
            if client.exists(SCRUBBED_KEY):
                return 0
            rewritten = 0
            for key in client.scan_iter(match="crealia:{*}:settings", count=1000):
                raw: bytes | None = client.get(key)  # type: ignore[assignment]
                if not raw:
                    continue
                try:
                    settings = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if scrub_chain(settings):
                    rewritten += int(client.eval(_COMPARE_AND_SET, 1, key, raw,
                                                 orjson.dumps(settings)))  # fmt: skip
            client.set(SCRUBBED_KEY, b"1")
            return rewritten

        rewritten = await self.redis.run(scrub)
        if rewritten:
            log.warning("removed AI endpoints and keys from %d projects' stored strategy "
                        "settings in redis (they are the operator's now)", rewritten)  # fmt: skip
        return rewritten

    async def set_settings(self, project_id: str, settings: dict[str, Any]) -> None:
        data = orjson.dumps(settings)

        def write(client: redis.Redis) -> Any:
            return client.set(_key(project_id, "settings"), data)

        await self.redis.run(write)

    # -- fan-out ------------------------------------------------------------------------------

    async def publish(self, message: Ephemeral) -> None:
        self._deliver_here(message)
        self.bus.enqueue(message)  # for the other processes
        await trio.lowlevel.checkpoint()

    @property
    def shares_presence(self) -> bool:
        """Every process of the cluster serves every project."""
        return True

    @property
    def shares_rate_limits(self) -> bool:
        """Rate limits are counted in Redis, on its clock, for the whole cluster."""
        return True

    async def share_presence(
        self, project_id: str, members: list[dict[str, Any]], *, ttl: float
    ) -> None:
        await self.bus.share_presence(project_id, members, ttl=ttl)

    async def remote_presence(self, project_id: str) -> list[dict[str, Any]]:
        return await self.bus.remote_presence(project_id)

    async def sync_rate_limits(self, updates: list[tuple[str, int, float]]) -> list[float]:
        return await self.bus.sync_rate_limits(updates)

    def health_checks(self) -> Mapping[str, HealthProbe]:
        """``redis``: a real write, and no open project behind this process."""
        return {"redis": self.check}

    async def check(self) -> None:
        # A real write (Redis out of memory under ``noeviction`` still answers PING but refuses
        # writes), and every open project's seq in Redis against this process's copy: Redis
        # behind it lost acknowledged writes (restored from an older copy), and no write of
        # those projects can commit.
        mirrors = list(self._mirrors.items())
        keys = [_key(project_id, "seq") for project_id, _mirror in mirrors]
        health = f"crealia:health:{self.node_id}"

        def probe(client: redis.Redis) -> Any:
            client.set(health, now_ms(), px=60_000)
            return client.mget(keys) if keys else []

        try:
            seqs = await self.redis.run(probe)
        except Overloaded as exc:
            raise TransportError(f"redis cannot take writes: {exc.__cause__ or exc}") from exc
        behind = [(project_id, int(raw or 0), mirror.doc.seq)
                  for (project_id, mirror), raw in zip(mirrors, seqs, strict=True)
                  if int(raw or 0) < mirror.doc.seq]  # fmt: skip
        if behind:
            for project_id, stored, here in behind:
                log.error("project %s is at seq %d in redis but %d here: redis lost "
                          "acknowledged writes", project_id, stored, here)  # fmt: skip
            raise TransportError(
                f"redis lost acknowledged writes (restored from an older copy?): {len(behind)} "
                "open project(s) are behind this process; their writes cannot commit"
            )
        if not self.connected:
            raise TransportError("redis pub/sub is reconnecting")

    # -- pub/sub ------------------------------------------------------------------------------

    def _deliver(self, messages: list[dict[str, Any]]) -> None:
        """On the Trio thread: hand a group of pub/sub messages to the mirrors."""
        own = self.node_id.encode()
        for message in messages:
            try:
                self._deliver_one(message, own)
            except Exception:
                # A bad message (another version, a stray PUBLISH) or a listener's bug must not
                # take the backplane down; whatever was durable comes back through a catch-up.
                log.exception("bad pub/sub message on %r", message.get("channel"))
                project_id, _kind = _project_of(bytes(message.get("channel", b"")).decode())
                mirror = self._mirrors.get(project_id)
                if mirror is not None:
                    self._schedule_catch_up(project_id, mirror)

    def _deliver_one(self, message: dict[str, Any], own: bytes) -> None:
        channel = message["channel"].decode()
        project_id, kind = _project_of(channel)
        mirror = self._mirrors.get(project_id)
        if mirror is None:
            return
        raw: bytes = message["data"]
        if kind == "eph":
            ephemeral = self.bus.ephemeral_of(project_id, raw)
            if ephemeral is None:
                return  # our own, delivered locally already
            for listener in list(mirror.listeners):
                listener.on_ephemeral(ephemeral)
            return
        data = orjson.loads(raw)
        # Our own events were applied when their script returned; applying again is a no-op,
        # and it covers a commit whose answer was lost. Our own conflicts were delivered then.
        own_notice = data.get("node") == self.node_id
        event = data.get("event")
        if event is not None:
            durable = _event_from(project_id, event)
            if not self._apply(mirror, durable):
                mirror.wanted = max(mirror.wanted, durable.seq)
                self._schedule_catch_up(project_id, mirror)
        conflicts = [] if own_notice else [_conflict_from(c) for c in data.get("conflicts") or ()]
        if conflicts:
            for listener in list(mirror.listeners):
                listener.on_conflicts(conflicts)

    def _schedule_catch_up(self, project_id: str, mirror: Mirror) -> None:
        if mirror.catching_up or self._nursery is None:
            return
        mirror.catching_up = True

        async def catch_up() -> None:
            try:
                current = mirror
                for _round in range(10):
                    async with current.lock:
                        await self._catch_up(project_id, current)
                    current = self._mirrors.get(project_id, current)
                    # A notice that came while reading (its event after what was read) would
                    # otherwise wait for the next write: read again until it is in.
                    if current.doc.seq >= max(mirror.wanted, current.wanted):
                        break
            except Exception:
                log.exception("catching up %s failed", project_id)
            finally:
                mirror.catching_up = False

        self._nursery.start_soon(catch_up)

    async def wait_connected(self) -> None:
        """Wait until the pub/sub listener is subscribed (at start, or after losing Redis)."""
        while not self.connected:
            await self._connected_event.wait()

    def _disconnected(self) -> None:
        self.connected = False
        self._connected_event = trio.Event()

    def _reconnected(self) -> None:
        """On the Trio thread: pub/sub is back; notices may have been missed meanwhile."""
        self.connected = True
        self._connected_event.set()
        for project_id, mirror in list(self._mirrors.items()):
            self._schedule_catch_up(project_id, mirror)

    def _listen(self, stop: list[bool], token: trio.lowlevel.TrioToken) -> None:
        """The listener thread: read pub/sub until ``stop[0]``, reconnecting with backoff."""

        def on_messages(batch: list[dict[str, Any]]) -> None:
            trio.from_thread.run_sync(self._deliver, batch, trio_token=token)

        def on_state(up: bool, _exc: BaseException | None) -> None:
            callback = self._reconnected if up else self._disconnected
            trio.from_thread.run_sync(callback, trio_token=token)

        listen(self.redis.client, ("crealia:*:events", EPHEMERAL_PATTERN), stop, on_messages,
               on_state)  # fmt: skip


@asynccontextmanager
async def open_backplane(url: str, config: Config) -> AsyncIterator[RedisBackplane]:
    """The ``redis`` entry point (:class:`~crealia.abc.BackplaneFactory`): a Redis backplane on
    ``url`` (``redis://``, ``rediss://`` or ``unix://``) with the config's history limits and
    quotas, for the ``async with`` block.

    Raises:
        ConfigurationError: ``url`` is not a Redis URL.
        Overloaded: Redis cannot be reached at start.
    """
    async with open_redis_backplane(
        url,
        history_limit=config.history_limit,
        snapshot_every=config.snapshot_every,
        quotas=Quotas.of(config),
    ) as backplane:
        yield backplane


#: The URL schemes :func:`open_backplane` serves besides its entry point's name (``redis``).
open_backplane.schemes = ("rediss", "unix")  # type: ignore[attr-defined]


@asynccontextmanager
async def open_redis_backplane(
    url: str,
    *,
    history_limit: int = 10_000,
    snapshot_every: int = 500,
    quotas: Quotas | None = None,
) -> AsyncIterator[RedisBackplane]:
    """A Redis backplane on ``url`` with its pub/sub listener, for the ``async with`` block.

    Raises:
        ConfigurationError: ``url`` is not a Redis URL.
        Overloaded: Redis cannot be reached at start.
    """
    try:
        threads = _RedisThreads(url)
    except ValueError as exc:  # redis-py's word for a URL it cannot use
        raise ConfigurationError(f"backplane URL {url!r}: {exc}") from exc
    backplane = RedisBackplane(threads, history_limit=history_limit,
                               snapshot_every=snapshot_every,
                               quotas=quotas or Quotas())  # fmt: skip
    try:
        await threads.run(lambda client: client.ping())
        await backplane.scrub_secrets()
        stop = [False]
        token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            backplane._nursery = nursery
            nursery.start_soon(backplane.bus.publisher)
            nursery.start_soon(lambda: trio.to_thread.run_sync(backplane._listen, stop, token))
            try:
                yield backplane
            finally:
                stop[0] = True  # the listener ends within its 0.1 s read timeout
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(threads.close)

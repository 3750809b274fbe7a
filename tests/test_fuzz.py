"""Property test: random and mutated envelopes never break a session (DESIGN.md "Bad input").

Each Hypothesis example starts one server and sends a few hundred frames over one connection:
valid messages, mutations of valid messages (wrong types, missing and extra keys, huge numbers,
NaN-like strings, long strings, deep nesting, type confusion, junk refs) and raw junk. Frames stay
within 64 KiB and valid UTF-8, so the server must never close the connection. Properties:

- the server never crashes and the connection stays open;
- every message with a ``ref`` gets exactly one reply carrying it, of the right type;
- every error has a code of docs/protocol.md §7 (never ``internal``) and a non-empty message;
- the project's ``seq`` moves only for accepted ``timeline_change``/``comment_add`` messages,
  gap-free, and every member sees the same durable events; nothing leaks to another project.

Hypothesis draws the building blocks of each example (valid templates, junk values, a seeded
random that combines them), since one example holds far more frames than its buffer could.
"""

from __future__ import annotations

import copy
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from crealia import Server, open_server

from ._wsclient import RawClient
from .conftest import Clients, make_config

FRAMES_PER_EXAMPLE = 500
EXAMPLES = 8
BATCH = 10
MAX_FRAME = 64 * 1024
MAX_REF = 2**53 - 1
ERROR_CODES = {
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "rate_limited",
    "too_large",
    "overloaded",
    "internal",
}
CLIENT_TYPES = [
    "hello",
    "cursor_update",
    "element_active",
    "typing_start",
    "typing_stop",
    "comment_add",
    "timeline_change",
    "conflict_resolve",
    "conflict_dismiss",
    "users_request",
    "ping",
    "live_start",
    "live_join",
    "live_leave",
    "live_stop",
    "webrtc_signal",
    "stream_stats",
]
ELEMENTS = ["e0", "e1", "e2", "e3", "e4"]  # seeded, never deleted
DELETABLE = ["d0", "d1", "d2", "d3", "d4"]  # seeded, deleted at most once


class _Track:
    """Placeholder ref: the frame gets a fresh, tracked ref when it is sent."""

    def __deepcopy__(self, _memo: object) -> _Track:
        return self


TRACK = _Track()


# -- strategies -----------------------------------------------------------------------------------

element_ids = st.sampled_from(ELEMENTS) | st.text(min_size=1, max_size=12)
props = st.sampled_from(["start", "end", "title", "gain", "track"]) | st.text(
    min_size=1, max_size=10
)
numbers = st.integers(-(10**6), 10**6) | st.floats(-1e9, 1e9, allow_nan=False)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
bases = st.none() | st.integers(0, 60)


def _with_base(op: dict[str, Any], base: int | None) -> dict[str, Any]:
    return op if base is None else {**op, "base": base}


ops = st.one_of(
    st.builds(
        lambda e, t, p: {"op": "insert", "element_id": e, "element_type": t, "props": p},
        element_ids,
        st.sampled_from(["clip", "track", "marker"]),
        st.dictionaries(props, json_values, max_size=3),
    ),
    st.builds(
        lambda e, p, v, b: _with_base({"op": "set", "element_id": e, "prop": p, "value": v}, b),
        element_ids,
        props,
        json_values,
        bases,
    ),
    st.builds(
        lambda e, b: _with_base({"op": "delete", "element_id": e}, b),
        st.sampled_from(DELETABLE) | st.text(min_size=1, max_size=12),
        bases,
    ),
)
positions = st.fixed_dictionaries(
    {"x": numbers, "y": numbers},
    optional={"time": numbers, "track": st.text(min_size=1, max_size=8)},
)
live = st.fixed_dictionaries({"session_id": st.text(min_size=1, max_size=10)})
datas: dict[str, st.SearchStrategy[Any]] = {
    "cursor_update": st.fixed_dictionaries({"position": positions}),
    "element_active": st.fixed_dictionaries(
        {"element_id": st.none() | element_ids, "element_type": st.sampled_from(["clip"])}
    ),
    "typing_start": st.fixed_dictionaries({}, optional={"element_id": element_ids}),
    "typing_stop": st.fixed_dictionaries({}, optional={"element_id": element_ids}),
    "comment_add": st.fixed_dictionaries(
        {
            "comment": st.fixed_dictionaries(
                {"id": st.text(min_size=1, max_size=10), "text": st.text(max_size=60)},
                optional={"element_id": element_ids, "time": numbers},
            )
        }
    ),
    "timeline_change": st.fixed_dictionaries(
        {
            "change_id": st.text(min_size=1, max_size=10),
            "changes": st.lists(ops, min_size=1, max_size=4),
        }
    ),
    "conflict_resolve": st.fixed_dictionaries(
        {
            "conflict_id": st.text(min_size=1, max_size=10),
            "choice": st.sampled_from(["current", "incoming", "custom"]),
            "value": json_values,
        }
    ),
    "conflict_dismiss": st.fixed_dictionaries({"conflict_id": st.text(min_size=1, max_size=10)}),
    "users_request": st.just({}),
    "ping": st.fixed_dictionaries({}, optional={"t": numbers}),
    "live_start": st.fixed_dictionaries(
        {"kind": st.sampled_from(["camera", "screen"]), "mode": st.sampled_from(["p2p", "relay"])}
    ),
    "live_join": live,
    "live_leave": live,
    "live_stop": live,
    "webrtc_signal": st.fixed_dictionaries(
        {"session_id": st.text(min_size=1, max_size=10), "to": st.just("server")},
        optional={"candidate": st.dictionaries(st.text(max_size=5), json_values, max_size=2)},
    ),
    "stream_stats": st.fixed_dictionaries(
        {
            "session_id": st.text(min_size=1, max_size=10),
            "bitrate_kbps": numbers,
            "rtt_ms": numbers,
            "packet_loss": numbers,
        },
        optional={"fps": numbers, "width": st.integers(0, 4000), "height": st.integers(0, 4000)},
    ),
}
# Timeline changes and comments are weighted up: they are the ones that can move the seq.
templates = st.sampled_from([*datas, *["timeline_change"] * 4, *["comment_add"] * 2]).flatmap(
    lambda kind: datas[kind].map(lambda data: {"type": kind, "data": data})
)

junk_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.integers(2**64, 10**30),  # beyond 64 bits: JSON allows it
    st.integers(-(10**30), -(2**63) - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(
        [
            "NaN",
            "Infinity",
            "-Infinity",
            "nan",
            "1e999",
            "-0",
            "0x1F",
            "",
            " ",
            "null",
            "true",
            "[]",
            "{}",
            "\x00",
            "\u202e",
            "\U0001f4a5",
            "x" * 129,
            "\u00e9" * 300,
            "__proto__",
            "constructor",
        ]
    ),
    st.text(max_size=30),
)
junk_values = st.recursive(
    junk_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


# -- mutations -------------------------------------------------------------------------------------


def _slots(value: Any, depth: int = 0) -> list[tuple[Any, Any]]:
    """Every (container, key) inside ``value`` but the envelope's ``ref`` (mutated apart)."""
    out: list[tuple[Any, Any]] = []
    if depth > 12:
        return out
    items = (
        value.items()
        if isinstance(value, dict)
        else (enumerate(value) if isinstance(value, list) else ())
    )
    for key, item in items:
        if depth == 0 and key == "ref":
            continue
        out.append((value, key))
        out.extend(_slots(item, depth + 1))
    return out


def _nest(value: Any, levels: int, rnd: random.Random) -> Any:
    for _ in range(levels):
        value = [value] if rnd.random() < 0.5 else {"n": value}
    return value


HUGE = [
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    10**20,
    10**30,
    -(2**63) - 1,
    1e308,
    -1e308,
    5e-324,
    1.5,
    -1,
]
JUNK_REFS = [0, -1, 1.5, "1", True, False, None, [1], {"r": 1}, MAX_REF + 1, 10**20, ""]


def mutate(env: Any, rnd: random.Random, junk: list[Any]) -> Any:
    """One random mutation of ``env``; returns the (possibly new) envelope."""
    slots = _slots(env)
    how = rnd.randrange(11)
    if how == 0 and slots:  # replace anything with junk
        container, key = rnd.choice(slots)
        container[key] = copy.deepcopy(rnd.choice(junk))
    elif how == 1 and slots:  # drop a key or an item
        container, key = rnd.choice(slots)
        del container[key]
    elif how == 2:  # an extra key somewhere
        dicts = [env] + [c[k] for c, k in slots if isinstance(c[k], dict)]
        target = rnd.choice(dicts) if isinstance(env, dict) else None
        if target is not None:
            name = rnd.choice(["seq", "user_id", "role", "__proto__", "extra", "ref", "x" * 200])
            target[name] = copy.deepcopy(rnd.choice(junk))
    elif how == 3 and isinstance(env, dict):  # type confusion
        env["type"] = rnd.choice([*CLIENT_TYPES, *(j for j in junk if isinstance(j, str))])
    elif how == 4 and isinstance(env, dict):
        env["ref"] = copy.deepcopy(rnd.choice(JUNK_REFS))
    elif how == 5 and slots:  # deep nesting
        container, key = rnd.choice(slots)
        container[key] = _nest(container[key], rnd.randint(30, 45), rnd)
    elif how == 6 and slots:  # long strings
        container, key = rnd.choice(slots)
        container[key] = rnd.choice("ab\u00e9\U0001f3ac") * rnd.choice([129, 300, 10_001, 12_000])
    elif how == 7 and slots:  # huge and edge numbers, mostly where numbers belong
        numeric = [
            (c, k) for c, k in slots if isinstance(c[k], int | float) and not isinstance(c[k], bool)
        ]
        container, key = rnd.choice(numeric if numeric and rnd.random() < 0.8 else slots)
        container[key] = rnd.choice(HUGE)
    elif how == 8 and isinstance(env, dict):  # data of the wrong shape
        env["data"] = copy.deepcopy(rnd.choice([*junk, [env.get("data")], None, "data"]))
    elif how == 9 and slots:  # right value, wrong JSON type
        container, key = rnd.choice(slots)
        value = container[key]
        container[key] = (
            str(value)
            if not isinstance(value, str)
            else ([value] if rnd.random() < 0.5 else len(value))
        )
    elif how == 10 and isinstance(env, dict):  # a batch, which clients may not send
        env = [env, copy.deepcopy(env)]
    return env


def _plausible(ops: list[dict[str, Any]], i: int, rnd: random.Random) -> list[dict[str, Any]]:
    """The ops retargeted so that they mostly apply: inserts of new elements, sets on the seeded
    ones, deletes of what this change inserted."""
    out, inserted = [], []
    for k, op in enumerate(ops):
        op = dict(op)
        if op["op"] == "insert":
            op["element_id"] = f"n-{i}-{k}"
            inserted.append(op["element_id"])
        elif op["op"] == "delete" and inserted and rnd.random() < 0.8:
            op["element_id"] = inserted.pop()
        else:
            op = {
                "op": "set",
                "element_id": rnd.choice(ELEMENTS),
                "prop": op.get("prop", "start"),
                "value": op.get("value", k),
                **({"base": op["base"]} if "base" in op else {}),
            }
        out.append(op)
    return out


def build_messages(
    pool: list[dict[str, Any]], junk: list[Any], rnd: random.Random, count: int
) -> list[Any]:
    """``count`` messages: valid, mutated, or raw junk text (as ``str``)."""
    out: list[Any] = []
    for i in range(count):
        roll = rnd.random()
        if roll < 0.04:
            # Raw junk: not JSON, or JSON that is not an object, or valid JSON cut short.
            template = json.dumps({**rnd.choice(pool), "ref": 1})
            out.append(
                rnd.choice(
                    [
                        template[: rnd.randrange(1, len(template))],
                        json.dumps(rnd.choice(junk)),
                        "".join(rnd.choice('{}[]":,ab1 \\') for _ in range(rnd.randrange(1, 40))),
                    ]
                )
            )
            continue
        env: Any = copy.deepcopy(rnd.choice(pool))
        data = env["data"]
        if rnd.random() < 0.8:  # fresh ids, so that valid changes apply rather than repeat
            if "change_id" in data:
                data["change_id"] = f"fz-{i}"
                data["changes"] = _plausible(data["changes"], i, rnd)
            if "comment" in data:
                data["comment"]["id"] = f"fz-{i}"
        if rnd.random() < 0.9:
            env["ref"] = TRACK
        if roll > 0.35:
            for _ in range(rnd.choice([1, 1, 1, 2, 3])):
                env = mutate(env, rnd, junk)
        out.append(env)
    return out


# -- the session -----------------------------------------------------------------------------------


def _trackable(ref: Any) -> bool:
    return isinstance(ref, int) and not isinstance(ref, bool) and 0 < ref <= MAX_REF


def _encode(env: Any, rnd: random.Random) -> str:
    # A placeholder that a mutation moved elsewhere becomes a plain 1.
    return json.dumps(env, ensure_ascii=rnd.random() < 0.5, allow_nan=False, default=lambda _: 1)


class Fuzzer:
    """One connection sending messages and checking every reply."""

    def __init__(self, client: RawClient, rnd: random.Random) -> None:
        self.client = client
        self.rnd = rnd
        self.next_ref = 1000
        self.outstanding: dict[int, tuple[str, Any]] = {}  # ref -> (frame, envelope type)
        self.answered: set[int] = set()
        self.untracked = 0
        self.untracked_replies = 0
        self.untracked_ids: set[str] = set()
        self.accepted: dict[int, tuple[str, str]] = {}  # seq -> (kind, id) from acks
        self.durable: list[dict[str, Any]] = []
        self.sent: list[str] = []
        self.errors: dict[str, int] = {}

    def fresh_ref(self) -> int:
        self.next_ref += 1
        return self.next_ref

    async def send(self, message: Any) -> None:
        if isinstance(message, str):
            text, kind, ref = message, None, None
        else:
            ref = None
            if isinstance(message, dict):
                if message.get("ref") is TRACK or _trackable(message.get("ref")):
                    ref = message["ref"] = self.fresh_ref()
            elif isinstance(message, list):
                for item in message:
                    if isinstance(item, dict) and item.get("ref") is TRACK:
                        item["ref"] = 1
            text = _encode(message, self.rnd)
            if len(text.encode()) > MAX_FRAME - 16:
                text, ref = json.dumps({"type": "ping", "data": {"t": 1}}), None
            kind = message.get("type") if isinstance(message, dict) else None
            kind = kind if isinstance(kind, str) else None
        if ref is None:
            self.untracked += 1
            if isinstance(message, dict) and isinstance(message.get("data"), dict):
                data = message["data"]
                for value in (
                    data.get("change_id"),
                    data.get("comment", {}).get("id")
                    if isinstance(data.get("comment"), dict)
                    else None,
                ):
                    if isinstance(value, str):
                        self.untracked_ids.add(value)
        else:
            self.outstanding[ref] = (text, kind)
        self.sent.append(text)
        await self.client.send_raw(text)

    async def sync(self) -> None:
        """Send a probe and check every envelope received up to its reply."""
        probe = self.fresh_ref()
        await self.client.send("ping", {"t": probe}, probe)
        while True:
            env = await self.client.next()
            if env.get("ref") == probe:
                assert env["type"] == "pong" and env["data"]["t"] == probe, env
                break
            self.check(env)
        missing = set(self.outstanding) - self.answered
        assert not missing, [self.outstanding[r][0][:300] for r in sorted(missing)]
        self.outstanding.clear()
        self.answered.clear()

    def check(self, env: dict[str, Any]) -> None:
        kind, data = env.get("type"), env.get("data")
        assert isinstance(data, dict), env
        if kind == "error":
            code, message = data.get("code"), data.get("message")
            assert code in ERROR_CODES and code != "internal", env
            assert isinstance(message, str) and message.strip(), env
            self.errors[code] = self.errors.get(code, 0) + 1
        if "ref" in env:
            ref = env["ref"]
            assert ref in self.outstanding, f"reply with a ref nobody is waiting for: {env}"
            assert ref not in self.answered, f"second reply to ref {ref}: {env}"
            self.answered.add(ref)
            text, sent_type = self.outstanding[ref]
            expected = {"ping": "pong", "users_request": "users_list"}.get(sent_type, "ack")
            assert kind in (expected, "error"), (text[:300], env)
            if kind == "ack":
                self.accept(sent_type, text, data)
            return
        if kind == "collaboration_event" and "seq" in data:
            self.durable.append(env)
        elif kind in ("conflict_detected", "conflict_resolved"):
            raise AssertionError(f"one writer cannot conflict with itself: {env}")
        elif kind in ("error", "pong", "users_list"):
            self.untracked_replies += 1
        else:
            assert kind == "collaboration_event", env

    def accept(self, sent_type: str, text: str, data: dict[str, Any]) -> None:
        if sent_type == "timeline_change":
            assert data["status"] in ("applied", "partial", "conflict", "duplicate"), data
            if data["status"] in ("applied", "partial"):
                assert data["seq"] not in self.accepted, (text[:300], data)
                self.accepted[data["seq"]] = ("timeline_change", data["change_id"])
            elif data["status"] == "duplicate" and data["seq"] is not None:
                assert (
                    self.accepted.get(data["seq"], ("", data["change_id"]))[1] == data["change_id"]
                ), (text[:300], data, self.accepted.get(data["seq"]))
        elif sent_type == "comment_add":
            assert data["status"] in ("applied", "duplicate"), data
            if data["status"] == "applied":
                assert data["seq"] not in self.accepted, (text[:300], data)
                self.accepted[data["seq"]] = (
                    "comment_add",
                    json.loads(text)["data"]["comment"]["id"],
                )


async def snapshot_seq(server: Server, project: str) -> int:
    token = server.issue_token("auditor", project, "viewer")
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(
            f"{server.http_url}/api/projects/{project}/snapshot",
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 200, response.text
    return int(response.json()["seq"])


async def wait_durable(client: RawClient, seen: list[dict[str, Any]], upto: int) -> None:
    """Read ``client`` until it has durable events up to ``upto``."""
    seen.extend(
        e for e in client.inbox if e.get("type") == "collaboration_event" and "seq" in e["data"]
    )
    client.inbox.clear()
    while not seen or max(e["data"]["seq"] for e in seen) < upto:
        env = await client.next()
        if env.get("type") == "collaboration_event" and "seq" in env["data"]:
            seen.append(env)


async def fuzz_session(endpoint: str, messages: list[Any], seed: int) -> None:
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        # Validation is under test, not rate limits (their own tests): the fuzzer and its
        # probes may send as fast as they like.
        unlimited = dict.fromkeys(("cursor", "edit", "comment", "signal", "rest", "other"), "off")
        config = make_config(Path(tmp) / "data", abuse_errors=10**9, rate_limits=unlimited)
        async with open_server(config) as server, trio.open_nursery() as nursery:
            clients = Clients(server, endpoint, nursery)
            try:
                with trio.fail_after(10):
                    await _fuzz(clients, messages, rnd)
            finally:
                await clients.aclose()


async def _fuzz(clients: Clients, messages: list[Any], rnd: random.Random) -> None:
    server = clients.server
    client = await clients.join("fuzz", role="owner")
    watcher = await clients.join("watch", role="viewer")
    outsider = await clients.join("outsider", project="p2", role="owner")
    seed_ack = await client.request(
        "timeline_change",
        {
            "change_id": "seed",
            "changes": [
                {"op": "insert", "element_id": e, "element_type": "clip", "props": {"start": 0}}
                for e in ELEMENTS + DELETABLE
            ],
        },
    )
    assert seed_ack["data"]["seq"] == 1
    fuzzer = Fuzzer(client, rnd)
    fuzzer.accepted[1] = ("timeline_change", "seed")
    watched: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        # The watcher keeps reading, as a live client does.
        nursery.start_soon(_collect, watcher, watched)
        await _send_all(fuzzer, messages)
        nursery.cancel_scope.cancel()
    # The connection is still open and answered every probe; pushes without a ref (errors,
    # pongs, user lists) came only for messages without a ref.
    assert fuzzer.untracked_replies <= fuzzer.untracked
    # The seq moved once per accepted change or comment, with no gap, the same for everyone.
    head = await snapshot_seq(server, "p1")
    await wait_durable(client, fuzzer.durable, head)
    watcher.inbox[:0] = watched
    seen: list[dict[str, Any]] = []
    await wait_durable(watcher, seen, head)
    seqs = [e["data"]["seq"] for e in fuzzer.durable]
    assert seqs == list(range(1, head + 1)), seqs
    assert [e["data"] for e in seen] == [e["data"] for e in fuzzer.durable]
    for event in fuzzer.durable:
        data = event["data"]
        kind, payload = data["kind"], data["payload"]
        assert kind in ("timeline_change", "comment_add"), event
        ident = payload["change_id"] if kind == "timeline_change" else payload["comment"]["id"]
        if data["seq"] in fuzzer.accepted:
            assert fuzzer.accepted[data["seq"]] == (kind, ident), event
        else:
            assert ident in fuzzer.untracked_ids, f"seq moved for no accepted message: {event}"
    assert set(fuzzer.accepted) <= set(seqs)
    # The watcher never got anyone's reply.
    assert [e for e in watcher.inbox + watched if "ref" in e or e.get("type") == "error"] == []
    # Nothing leaked to the other project, and it did not move.
    assert (await outsider.request("ping", {}))["type"] == "pong"
    assert outsider.inbox == []
    assert await snapshot_seq(server, "p2") == 0


async def _collect(client: RawClient, into: list[dict[str, Any]]) -> None:
    while True:
        into.append(await client.next())


async def _send_all(fuzzer: Fuzzer, messages: list[Any]) -> None:
    try:
        for start in range(0, len(messages), BATCH):
            batch = messages[start : start + BATCH]
            first = len(fuzzer.sent)
            for message in batch:
                await fuzzer.send(message)
            try:
                await fuzzer.sync()
            except BaseException as exc:
                exc.add_note(
                    "frames of the last batch:\n"
                    + "\n".join(text[:500] for text in fuzzer.sent[first:])
                )
                raise
    except BaseException as exc:
        exc.add_note(f"after {len(fuzzer.sent)} frames; errors so far: {fuzzer.errors}")
        raise


@pytest.mark.parametrize("endpoint", ["ws", "http"])
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
def test_random_and_mutated_envelopes_never_break_the_session(
    endpoint: str, data: st.DataObject
) -> None:
    pool = data.draw(st.lists(templates, min_size=24, max_size=24), label="templates")
    junk = data.draw(st.lists(junk_values, min_size=24, max_size=24), label="junk")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    messages = build_messages(pool, junk, random.Random(seed), FRAMES_PER_EXAMPLE)
    trio.run(fuzz_session, endpoint, messages, seed)

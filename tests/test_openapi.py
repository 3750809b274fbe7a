"""The OpenAPI document (crealia/_openapi.py) is the HTTP app as it is.

- Every route registered in the Quart app is an operation of the document, under the handler's
  name, and every operation is a route.
- schemathesis runs every operation against a live server (its explicit examples, then
  generated valid and invalid requests, derandomized) with an owner's token, and checks that
  each response's status, content type, headers and body are the ones documented. The live
  feed never ends, so it gets its own test against the same document.
- ``GET /openapi.json`` serves the document, without a token.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import h11
import httpx
import hypothesis
import jsonschema_rs
import orjson
import pytest
import requests
import schemathesis
import trio
from hypothesis import strategies as st
from quart import Quart
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from crealia import Server, _http, _openapi, _pages, open_server

from ._redis import run_redis
from .conftest import make_config, opened

DOCUMENT = _openapi.document()
OPERATIONS = [f"{method.upper()} {path}" for path, item in DOCUMENT["paths"].items()
              for method in item]  # fmt: skip
#: Its response never ends: checked by test_openapi_live_feed_conforms instead.
STREAMS = {"GET /api/collaboration/performance/stream"}
#: What a response is checked for: that it is documented (status, content type, headers, body).
CONFORMANCE = [status_code_conformance, content_type_conformance, response_headers_conformance,
               response_schema_conformance]  # fmt: skip
#: What a generated request's response is checked for: that too, no 5xx, and that the operation
#: refuses the request without its token (schemathesis resends it without, then forged).
#: (negative_data_rejection is left out: with the token set for every request, it takes a
#: request whose token schemathesis meant to leave out for one the server wrongly accepted.)
CHECKS = [not_a_server_error, *CONFORMANCE, ignored_auth]
#: Requests per operation and kind: its explicit examples and generated valid requests, then
#: generated invalid ones (derandomized: the same every run).
EXAMPLES = 15


def _quart_app(asgi: Any) -> Quart:
    """The Quart app inside what create_app returns (the /ws route may be wrapped around it)."""
    if isinstance(asgi, Quart):
        return asgi
    cells = [cell.cell_contents for cell in asgi.__closure__ or ()]
    (app,) = [value for value in cells if isinstance(value, Quart)]
    return app


def _is_page(path: str) -> bool:
    """The browser's files and pages are not API operations (docs/protocol.md §9 lists them)."""
    return (path in _pages.PAGES or path.lstrip("/") in _pages.ROOT_FILES
            or path.startswith("/static/"))  # fmt: skip


async def test_openapi_lists_every_route_of_the_app(server: Server) -> None:
    app = _quart_app(_http.create_app(server.hub, server.monitor, server.security))
    routes = {
        (method, re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)): rule.endpoint
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS") and not _is_page(rule.rule)
    }
    documented = {
        (method.upper(), path): operation["operationId"]
        for path, item in DOCUMENT["paths"].items()
        for method, operation in item.items()
    }
    assert len(routes) >= 18  # the scan sees the app's routes
    assert sorted(set(routes) - set(documented)) == [], "routes missing from the document"
    assert sorted(set(documented) - set(routes)) == [], "documented operations with no route"
    assert routes == documented  # each operationId is its handler's name


async def test_openapi_json_is_served_without_a_token(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        with trio.fail_after(10):
            response = await http.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == DOCUMENT
    schemathesis.openapi.from_dict(response.json()).validate()  # OpenAPI 3.1's own schema


def test_openapi_csv_columns_are_the_exports() -> None:
    assert _openapi.AUDIT_CSV_COLUMNS == _http.AUDIT_COLUMNS
    assert _openapi.REPORT_CSV_COLUMNS == _http.REPORT_COLUMNS
    assert _openapi.REPORT_ALERT_CSV_COLUMNS == _http.ALERT_COLUMNS
    rows = _http._gdpr_rows({"comments": [], "edits": [], "conflicts": [], "audit": []})
    assert tuple(rows[0]) == _openapi.GDPR_CSV_COLUMNS


def test_openapi_error_codes_are_every_error_class() -> None:
    codes = DOCUMENT["components"]["schemas"]["Error"]["properties"]["error"]["properties"]
    assert {"bad_request", "unauthorized", "forbidden", "not_found", "too_large",
            "rate_limited", "overloaded", "unsupported", "internal"} == set(
        codes["code"]["enum"])  # fmt: skip


@asynccontextmanager
async def _live(data_dir: Path) -> AsyncIterator[tuple[Server, dict[str, str]]]:
    """A server whose REST rate limits are off (schemathesis sends hundreds of requests a
    second), with something in it: an element, a pending conflict (the chain is ``manual``),
    a comment and an open security alert. Yields it with the path parameters of real
    resources."""
    config = make_config(data_dir, strategy_chain=("manual",), preauth_rest_limit="off",
                         rate_limits={"rest": "off"}, metrics_interval=0.2)  # fmt: skip
    async with open_server(config) as server:
        async with trio.open_nursery() as nursery, opened(server, nursery) as clients:
            with trio.fail_after(10):
                alice = await clients.join("alice")
                bob = await clients.join("bob")
                insert = {"op": "insert", "element_id": "clip", "element_type": "clip",
                          "props": {"title": "The quick fox"}}  # fmt: skip
                await alice.request("timeline_change", {"change_id": "c1", "changes": [insert]})
                mine = {"op": "set", "element_id": "clip", "prop": "title", "value": "A",
                        "base": 1}  # fmt: skip
                await alice.request("timeline_change", {"change_id": "c2", "changes": [mine]})
                theirs = {**mine, "value": "B"}
                ack = await bob.request("timeline_change", {"change_id": "c3",
                                                            "changes": [theirs]})  # fmt: skip
                (conflict_id,) = ack["data"]["conflicts"]
                comment = {"comment": {"id": "m1", "text": "hello"}}
                await bob.request("comment_add", comment)
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            with trio.fail_after(10):
                forged = {"Authorization": "Bearer forged"}
                for _ in range(server.config.security_alert_threshold):
                    await http.get("/api/collaboration/audit", params={"projectId": "p1"},
                                   headers=forged)  # fmt: skip
                owner = {"Authorization": f"Bearer {server.issue_token('olga', 'p1', 'owner')}"}
                listed = await http.get("/api/collaboration/security/alerts", headers=owner)
        (alert,) = listed.json()["alerts"]  # bad_tokens: 5 refused tokens from 127.0.0.1
        yield server, {"project_id": "p1", "conflict_id": conflict_id, "alert_id": alert["id"]}


def _conform(base_url: str, token: str, real: dict[str, str]) -> dict[str, str]:
    """Run schemathesis over every operation but the streams (in a worker thread: it is
    synchronous); returns what failed, by operation."""
    schema = schemathesis.openapi.from_dict(DOCUMENT)
    headers = {"Authorization": f"Bearer {token}"}
    failures: dict[str, str] = {}
    with requests.Session() as session:
        for label in OPERATIONS:
            if label in STREAMS:
                continue
            operation = schema.find_operation_by_label(label)
            assert operation is not None, label
            method, path = label.split(" ", 1)
            definition = DOCUMENT["paths"][path][method.lower()]
            parameters = definition.get("parameters", ())
            names = {p["name"] for p in parameters if p["in"] == "path"}
            known = {name: value for name, value in real.items() if name in names}
            valid = st.one_of(
                *operation.get_strategies_from_examples(path_parameters=known),
                operation.as_strategy(path_parameters=known),
            )
            kinds = [valid]
            if parameters or "requestBody" in definition or definition["security"]:
                # Something to get wrong: a parameter, the body, the token.
                kinds.append(operation.as_strategy(schemathesis.GenerationMode.NEGATIVE))
            for strategy in kinds:

                @hypothesis.settings(
                    max_examples=EXAMPLES,
                    derandomize=True,
                    database=None,
                    deadline=None,
                    suppress_health_check=list(hypothesis.HealthCheck),
                )
                @hypothesis.given(case=strategy)
                def check(case: schemathesis.Case) -> None:
                    case.call_and_validate(base_url=base_url, session=session, headers=headers,
                                           checks=CHECKS, timeout=10)  # fmt: skip

                try:
                    check()
                # schemathesis raises a BaseExceptionGroup of its failures.
                except (Exception, BaseExceptionGroup) as exc:  # reported with the others
                    failures[label] = str(exc)
                    break
    return failures


async def test_openapi_every_operation_conforms(tmp_path: Path) -> None:
    async with _live(tmp_path / "data") as (server, real):
        token = server.issue_token("olga", "p1", "owner")
        run = partial(_conform, server.http_url, token, real)
        with trio.fail_after(120):
            failures = await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())


def _refused(
    base_url: str, token: str, status: int, labels: list[str], body: Any = NOT_SET
) -> list[str]:
    """Send each operation of ``labels`` once (an owner's token, ``body`` if it takes one) and
    check the answer is ``status`` and conforms; returns what did not (in a worker thread)."""
    schema = schemathesis.openapi.from_dict(DOCUMENT)
    problems = []
    for label in labels:
        operation = schema.find_operation_by_label(label)
        assert operation is not None, label
        path_parameters = {name: "p1" for name in re.findall(r"{(\w+)}", label)}
        case = operation.Case(path_parameters=path_parameters,
                              body=body if operation.body else NOT_SET)  # fmt: skip
        with requests.Session() as session:
            try:
                response = case.call_and_validate(
                    base_url=base_url,
                    session=session,
                    timeout=10,
                    checks=CONFORMANCE,
                    headers={"Authorization": f"Bearer {token}"},
                )
            except (Exception, BaseExceptionGroup) as exc:
                problems.append(f"{label}: {exc}")
                continue
        if response.status_code != status:
            problems.append(f"{label}: {response.status_code} {response.text[:200]}")
    return problems


#: The operations that take a body.
_WITH_BODY = [label for label in OPERATIONS
              if "requestBody" in DOCUMENT["paths"][label.split(" ", 1)[1]][
                  label.split(" ", 1)[0].lower()]]  # fmt: skip
_SECURED = [label for label in OPERATIONS if label not in STREAMS
            and DOCUMENT["paths"][label.split(" ", 1)[1]][label.split(" ", 1)[0].lower()][
                "security"]]  # fmt: skip
_ALL = [label for label in OPERATIONS if label not in STREAMS]


@asynccontextmanager
async def _refusing(data_dir: Path, status: int) -> AsyncIterator[Server]:
    """A server set up to answer ``status``."""
    settings: dict[str, Any] = {
        413: {},
        429: {"rate_limits": {"rest": "1/1"}},
        421: {"allowed_hosts": ("crealia.example.com",)},
        503: {"max_connections": 1, "http_header_timeout": 60},
    }[status]
    async with open_server(make_config(data_dir, **settings)) as server:
        yield server


@pytest.mark.parametrize("status", [413, 429, 421, 503])
async def test_openapi_documents_each_refusal(status: int, tmp_path: Path) -> None:
    async with _refusing(tmp_path / "d", status) as server:
        token = server.issue_token("olga", "p1", "owner")
        labels, body = {
            413: (_WITH_BODY, {"padding": "x" * (1024 * 1024)}),
            429: (_SECURED[1:], NOT_SET),
            421: (_ALL, NOT_SET),
            503: (_ALL, NOT_SET),
        }[status]
        with trio.fail_after(60):
            if status == 429:  # the token's one request of the window
                await _one_request(server, token)
            async with await _holding(server, status == 503):
                run = partial(_refused, server.http_url, token, status, labels, body)
                problems = await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    assert not problems, "\n".join(problems)


async def _holding(server: Server, hold: bool) -> trio.abc.AsyncResource:
    """With ``hold``, the one connection ``max_connections=1`` allows, held open: accepted (a
    request answered on it), then in the middle of the next request's headers."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.http_port)
    if hold:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200")
        await stream.send_all(b"GET /healthz HTTP/1.1\r\n")
    else:
        await stream.aclose()
    return stream


async def _one_request(server: Server, token: str) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        path = "/api/projects/p1/snapshot"
        response = await http.get(path, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200


async def test_openapi_documents_unsupported_on_redis(tmp_path: Path) -> None:
    async with run_redis(tmp_path / "redis") as redis:
        config = make_config(tmp_path / "d", redis_url=redis.url)
        async with open_server(config) as server:
            token = server.issue_token("olga", "p1", "owner")
            labels = ["POST /api/collaboration/gdpr/export", "POST /api/collaboration/gdpr/erase"]
            run = partial(_refused, server.http_url, token, 501, labels, {"userId": "bob"})
            with trio.fail_after(30):
                problems = await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    assert not problems, "\n".join(problems)


def _validator(status: str, media: str) -> jsonschema_rs.Validator:
    """The live feed's documented schema for ``status`` and ``media``, references resolved."""
    responses = DOCUMENT["paths"]["/api/collaboration/performance/stream"]["get"]["responses"]
    response = responses[status]
    if "$ref" in response:
        response = DOCUMENT["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    return _schema_validator(response["content"][media]["schema"])


def _schema_validator(schema: dict[str, Any]) -> jsonschema_rs.Validator:
    return jsonschema_rs.Draft202012Validator({**schema, "components": DOCUMENT["components"]})


async def _read_feed(server: Server, target: str, count: int) -> tuple[h11.Response, list[Any]]:
    """The response head and first ``count`` events of the live feed, over a plain socket
    with h11 (httpx's iterators cannot be left early without leaking their generators)."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.http_port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target=target, headers=[("Host", "127.0.0.1")])
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        head, buffer, events = None, b"", []
        while len(events) < count:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                buffer += event.data
                *blocks, buffer = buffer.split(b"\n\n")
                events += [block.decode() for block in blocks]
            else:
                raise AssertionError(f"unexpected {event!r}")
    assert head is not None
    return head, events[:count]


async def test_openapi_live_feed_conforms(tmp_path: Path) -> None:
    path = "/api/collaboration/performance/stream"
    async with open_server(make_config(tmp_path / "d", metrics_interval=0.05)) as server:
        owner = server.issue_token("olga", "p1", "owner")
        editor = server.issue_token("ed", "p1", "editor")
        with trio.fail_after(20):
            head, events = await _read_feed(server, f"{path}?access_token={owner}", 3)
            async with httpx.AsyncClient(base_url=server.http_url) as http:
                refusals = [
                    (await http.get(path, params=params, headers=headers), status)
                    for params, headers, status in [
                        ({}, {}, "401"),
                        ({"access_token": "forged"}, {}, "401"),
                        ({}, {"Authorization": f"Bearer {editor}"}, "403"),
                        ({"projectId": "p2", "access_token": owner}, {}, "403"),
                    ]
                ]
    assert head.status_code == 200
    headers = dict(head.headers)
    content = DOCUMENT["paths"][path]["get"]["responses"]["200"]["content"]
    assert headers[b"content-type"].decode().split(";")[0] in content
    assert headers[b"cache-control"] == b"no-cache"
    assert events[0] == "retry: 2000"
    sample = _schema_validator(DOCUMENT["components"]["schemas"]["Sample"])
    for event in events[1:]:
        kind, data = re.fullmatch(r"event: (\w+)\ndata: (.*)", event, re.DOTALL).groups()
        assert kind == "metrics"
        sample.validate(orjson.loads(data))
    for response, status in refusals:
        assert str(response.status_code) == status, response.text
        assert response.headers["content-type"] == "application/json"
        _validator(status, "application/json").validate(response.json())

"""The OpenAPI 3.1 description of the HTTP app, served at ``GET /openapi.json``.

:func:`document` builds it from what the handlers of :mod:`crealia._http` really answer, read
handler by handler: each operation's parameters and body, the least role it needs (taken from
``REQUIRED_ROLE``, the table the handlers check), every status it can answer (the edge's 421 and
503 included) and the schema of every body. The enums come from the code too (error codes from
the error classes, audit actions, severities, alert types and levels, metric fields), so a new
value shows up here without anyone remembering to add it.

Three tests keep it true (tests/test_openapi.py): every route registered in the Quart app is an
operation here and every operation is a route (``operationId`` is the handler's name);
schemathesis runs every operation against a live server with an owner's token and checks each
response's status, content type, headers and body against this document; and
docs/api-reference.md must be what scripts/api_reference.py renders from it.

The WebSocket endpoint ``/ws`` is not an HTTP operation: docs/protocol.md describes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import _errors
from ._alerts import LEVELS
from ._audit import ACTIONS, SEVERITIES
from ._auth import REQUIRED_ROLE
from ._monitor import FIELDS
from ._security import ALERT_TYPES
from ._version import __version__

Schema = dict[str, Any]

#: The REST body limit the HTTP app enforces (``MAX_CONTENT_LENGTH`` in crealia/_http.py).
BODY_LIMIT = "1 MiB"
#: The columns of the CSV exports, as crealia/_http.py writes them (a test compares).
AUDIT_CSV_COLUMNS = ("id", "timestamp", "userId", "projectId", "action", "resource", "severity",
                     "riskScore", "ipAddress", "userAgent", "details")  # fmt: skip
REPORT_CSV_COLUMNS = ("metric", "min", "avg", "p95", "max", "samples")
REPORT_ALERT_CSV_COLUMNS = ("id", "rule", "level", "state", "projectId", "value", "threshold",
                            "message", "startedAt", "resolvedAt")  # fmt: skip
GDPR_CSV_COLUMNS = ("kind", "id", "seq", "at", "data")


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(properties: dict[str, Schema], required: Iterable[str] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    names = list(required)
    if names:
        schema["required"] = names
    schema.update(extra)
    return schema


def _all(properties: dict[str, Schema], **extra: Any) -> Schema:
    """An object whose every listed property is always present."""
    return _obj(properties, properties, **extra)


_STRING: Schema = {"type": "string"}
_INTEGER: Schema = {"type": "integer"}
_NUMBER: Schema = {"type": "number"}
_ANY_OBJECT: Schema = {"type": "object"}
_ID: Schema = {"type": "string", "minLength": 1, "maxLength": 128}
_EPOCH_MS: Schema = {"type": "integer", "description": "epoch milliseconds"}
_ISO_TIME: Schema = {
    "type": "string",
    "description": "ISO 8601, UTC, milliseconds: `2026-11-27T04:35:24.123Z`",
}
#: An audit action to filter on: any text (one that names no action matches nothing).
_ACTION: Schema = {
    "type": "string",
    "description": "Only events of this action ("
    + ", ".join(f"`{action}`" for action in ACTIONS)
    + "); another text matches none.",
}
#: A date a client sends: what Python's ``datetime.fromisoformat`` reads (crealia/_http.py).
_DATE_TEXT: Schema = {
    "type": "string",
    "description": "An ISO 8601 date or date-time (UTC when it has no offset).",
    "examples": ["2026-11-27", "2026-11-27T04:35:24Z", "2026-11-27T05:35:24+01:00"],
}
_DATE_INPUT: Schema = {
    "description": "An ISO 8601 date or date-time (UTC when it has no offset) or epoch "
    "milliseconds (0 to the end of year 9999).",
    "anyOf": [
        {"type": "string"},
        {"type": "number", "minimum": 0, "maximum": 253_402_300_799_000},
    ],
}


# -- responses ----------------------------------------------------------------------------------


def _error_response(description: str) -> Schema:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref("Error")}},
    }


#: What the edge answers on every route, before the app sees the request.
_TEXT: Schema = {"text/plain": {"schema": _STRING}}
_RETRY_AFTER: Schema = {
    "Retry-After": {
        "description": "Seconds to wait before retrying (rounded up).",
        "schema": {"type": "integer", "minimum": 1},
    }
}

_RESPONSES: dict[str, Schema] = {
    "BadRequest": _error_response(
        "`bad_request`: a malformed body or parameter; the message names the field "
        "(`body.changes[0].op: ...`)."
    ),
    "Unauthorized": _error_response(
        "`unauthorized`: no `Authorization: Bearer` header, or a token that is forged, "
        "expired or not yet valid; the message says which. Refusals are audited as "
        "`token_refused`, one row per address and second."
    ),
    "Forbidden": _error_response(
        "`forbidden`: the token's role is below the operation's, or the token is for another "
        "project than the one named (`token is for project 'a', not 'b'`)."
    ),
    "NotFound": _error_response("`not_found`: the named resource does not exist."),
    "TooLarge": _error_response(
        f"`too_large`: the body is over {BODY_LIMIT} (answered from its `Content-Length`, "
        "before it is read), or a field is over its limit or quota (the message names it)."
    ),
    "RateLimited": {
        "description": "`rate_limited`: over the per-address limit before authentication "
        "(`preauth_rest_limit`) or the user's `rest` rate class; `retry_after_ms` and "
        "`Retry-After` say when to retry.",
        "headers": _RETRY_AFTER,
        "content": {"application/json": {"schema": _ref("Error")}},
    },
    "Unsupported": _error_response(
        "`unsupported`: not possible with this server's backplane (GDPR export and erasure "
        "need the embedded SQLite store; the Redis backplane answers 501)."
    ),
    "MisdirectedRequest": {
        "description": "The `Host` header names a host that `allowed_hosts` does not list "
        "(answered before the app, as plain text `host not allowed: <host>`).",
        "content": _TEXT,
    },
    "ServerBusy": {
        "description": "The connection is over a connection cap (`max_connections`, "
        "`max_connections_per_address`); answered as plain text naming the cap when the "
        "connection is accepted, then closed.",
        "headers": _RETRY_AFTER,
        "content": _TEXT,
    },
    "Overloaded": {
        "description": "`overloaded` (JSON): the store or the backplane cannot take the request "
        "now; `outcome` says whether anything was applied. Plain text: the connection is over "
        "a connection cap (`max_connections`, `max_connections_per_address`), answered when it "
        "is accepted, then closed.",
        "content": {"application/json": {"schema": _ref("Error")}, **_TEXT},
    },
}

_JSON_ERRORS = {"400": "BadRequest", "401": "Unauthorized", "403": "Forbidden",
                "404": "NotFound", "413": "TooLarge", "429": "RateLimited",
                "501": "Unsupported", "503": "Overloaded"}  # fmt: skip


def _responses(ok: Schema, *errors: str) -> dict[str, Schema]:
    """``ok`` (200), the error statuses named, and the edge's answers (421, 503) on every
    operation."""
    responses: dict[str, Schema] = {"200": ok}
    for status in sorted((*errors, "421")):
        name = _JSON_ERRORS.get(status, "MisdirectedRequest")
        responses[status] = {"$ref": f"#/components/responses/{name}"}
    responses.setdefault("503", {"$ref": "#/components/responses/ServerBusy"})
    return dict(sorted(responses.items()))


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


#: What every CSV the server writes does to its cells (crealia/_http.py ``csv_safe``).
_CSV_SAFE = ("A cell starting with `=`, `+`, `-`, `@`, a tab or a carriage return gets a leading "
             "`'`, so that no spreadsheet runs it as a formula.")  # fmt: skip


def _json_or_csv(schema: Schema, description: str, csv: str) -> Schema:
    return {
        "description": description,
        "headers": {
            "Content-Disposition": {
                "description": 'For CSV only: `attachment; filename="..."`.',
                "schema": _STRING,
            }
        },
        "content": {
            "application/json": {"schema": schema},
            "text/csv": {"schema": {"type": "string", "description": csv}},
        },
    }


# -- parameters ---------------------------------------------------------------------------------


def _query(name: str, schema: Schema, description: str, **extra: Any) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description, **extra}  # fmt: skip


def _path(name: str, description: str, example: str | None = None) -> Schema:
    parameter: Schema = {"name": name, "in": "path", "required": True, "schema": _STRING,
                         "description": description}  # fmt: skip
    if example is not None:
        parameter["example"] = example
    return parameter


_PROJECT_QUERY = _query(
    "projectId",
    _STRING,
    "The project; default the token's, and it must be the token's (403 otherwise).",
    example="p1",
)
_PROJECT_PATH = _path("project_id", "The project; it must be the token's (403 otherwise).", "p1")


# -- operations ---------------------------------------------------------------------------------

_SECURED: list[dict[str, list[str]]] = [{"bearerAuth": []}]


def _operation(
    handler: str,
    tag: str,
    summary: str,
    description: str,
    responses: dict[str, Schema],
    *,
    action: str | None = None,
    parameters: list[Schema] | None = None,
    body: Schema | None = None,
    examples: dict[str, Any] | None = None,
    security: list[dict[str, list[str]]] | None = None,
) -> Schema:
    """One operation; ``handler`` names its function in crealia/_http.py (the route test
    matches them), ``action`` the ``REQUIRED_ROLE`` entry it checks, ``examples`` bodies by
    name."""
    operation: Schema = {"operationId": handler, "tags": [tag], "summary": summary}
    if action is not None:
        role = REQUIRED_ROLE[action]
        operation["x-crealia-role"] = role
        least = "" if role == "owner" else " or higher"
        description = f"Role: **{role}**{least}. {description}"
        operation["security"] = security or _SECURED
    else:
        operation["security"] = []
    operation["description"] = description
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {
            "required": False,
            "description": "A JSON object (an empty body counts as `{}`), at most "
            f"{BODY_LIMIT}. Its content type is not checked.",
            "content": {"application/json": {"schema": body}},
        }
        if examples:
            operation["requestBody"]["content"]["application/json"]["examples"] = {
                name: {"value": value} for name, value in examples.items()
            }
    operation["responses"] = responses
    return operation


def _paths() -> dict[str, Any]:
    # What a handler can answer besides 200, read from it: every one authenticates (401),
    # checks the role and the project (403) and the rate (429); one that reads a body can find
    # it malformed (400) or too large (413); one that reads a parameter can find it bad (400).
    token = ("401", "403", "429")
    query = ("400", *token)
    body = ("400", "413", *token)
    conflict_statuses = (*body, "404", "503")
    return {
        "/healthz": {"get": _operation(
            "healthz", "health", "Liveness",
            "200 as long as the process runs.",
            _responses(_json(_all({"status": {"const": "ok"}}), "The process runs.")),
        )},
        "/readyz": {"get": _operation(
            "readyz", "health", "Readiness",
            "Runs the health checks now (one at a time: concurrent calls share the one in "
            "flight). Ready means a write can commit and be checkpointed: `storage` commits a "
            "row to each SQLite database and checkpoints its WAL; in a cluster `redis` writes "
            "a key and checks Redis is not behind the projects open here; `event_loop` checks "
            "the loop's lag is under `max_loop_lag`; with PostgreSQL, `postgresql` commits a "
            "row and checks its listener. While the server shuts down `server` is `shutting "
            "down`. Redis beside PostgreSQL is not required to be ready: while it is away "
            "`checks.redis` and `degraded.redis` say what is per process, with 200.",
            {**_responses(_json(_ref("Readiness"), "Every check passes.")),
             "503": {"description": "A check fails or the server is shutting down (JSON); or "
                                    "the connection is over a connection cap (plain text).",
                     "content": {"application/json": {"schema": _ref("Readiness")}, **_TEXT}}},
        )},
        "/metrics": {"get": _operation(
            "prometheus", "health", "Prometheus metrics",
            "The Prometheus text exposition: server counters, gauges and histograms, the "
            "process and GC collectors. No token and no project or user ids: bind it to a "
            "private interface or filter it at the proxy. docs/troubleshooting.md lists the "
            "families and what they mean.",
            _responses({"description": "The metrics, Prometheus text format.",
                        "content": {"text/plain": {"schema": _STRING}}}),
        )},
        "/openapi.json": {"get": _operation(
            "openapi", "meta", "This document",
            "The OpenAPI 3.1 description of this API (docs/api-reference.md is rendered from "
            "it).",
            _responses(_json(_ANY_OBJECT, "The OpenAPI document.")),
        )},
        "/api/info": {"get": _operation(
            "info", "meta", "What is running",
            "The server's name, version, protocol version, whether it runs with `--dev`, its "
            "uptime and the path of its WebSocket route. No token: the landing page shows it.",
            _responses(_json(_all({
                "name": {"const": "crealia"}, "version": _STRING,
                "protocol": {"type": "integer"}, "dev": {"type": "boolean"},
                "uptime_s": {"type": "number"}, "started_at": {"type": "integer"},
                "websocket": _STRING,
            }), "What is running.")),
        )},
        "/api/dev/token": {"post": _operation(
            "dev_token", "meta", "Mint a token (--dev only)",
            "Only with `crealia serve --dev` (404 otherwise): a token for the user, project and "
            "role given, signed like `crealia token`'s, so that the pages can be tried without "
            "the command line. `ttl` in seconds, 60 to 604800 (default 8 hours). Audited as "
            "`dev_token`.",
            _responses(_json(_all({
                "token": _STRING,
                "claims": _all({"sub": _STRING, "name": _STRING, "project": _STRING,
                                "role": _STRING, "exp": {"type": "integer"}}),
            }), "The token and its claims."), "400", "404", "413"),
            body=_obj({
                "user": {**_STRING, "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$"},
                "project": {**_STRING, "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$"},
                "role": {"enum": ["owner", "editor", "commenter", "viewer"]},
                "name": {**_STRING, "minLength": 1, "maxLength": 64},
                "ttl": {"type": "number", "minimum": 60, "maximum": 604800},
            }, ["user", "project", "role"]),
            examples={"alice": {"user": "alice", "project": "p1", "role": "owner"}},
        )},
        "/api/projects/{project_id}/snapshot": {"get": _operation(
            "snapshot", "projects", "Project snapshot",
            "The project's document as of its latest `seq` (docs/protocol.md §5). A project "
            "that is not open on this process is built from the store and not kept in memory.",
            _responses(_json(_ref("Snapshot"), "The snapshot."), *token, "503"),
            action="snapshot_read", parameters=[_PROJECT_PATH],
        )},
        "/api/projects/{project_id}/strategies": {
            "get": _operation(
                "get_strategies", "strategies", "A project's strategy chain",
                "The chain conflicts of the project go through, with its options, and the "
                "names of every installed strategy.",
                _responses(_json(_ref("Chain"), "The chain."), *token, "503"),
                action="strategies_read", parameters=[_PROJECT_PATH],
            ),
            "put": _operation(
                "set_strategies", "strategies", "Set a project's strategy chain",
                "Validates, stores and uses a new chain (audited as `strategy_change`). A "
                "chain holds 1 to 8 distinct strategies; one that waits for a person "
                "(`manual` without `timeout`) only last; options at most 16 KiB of JSON; every "
                "strategy refuses unknown options and values outside their ranges "
                "(docs/security.md lists them). Nothing is stored when it is refused.",
                _responses(_json(_ref("Chain"), "The chain now in use."), *body, "503"),
                action="strategies_write", parameters=[_PROJECT_PATH],
                body=_obj({
                    "strategies": {"type": "array", "items": _STRING,
                                   "description": "Strategy names, in order."},
                    "options": {"type": "object",
                                "additionalProperties": {"type": "object"},
                                "description": "Options by strategy name."},
                    "ask_when_unsure": {"type": "boolean", "description":
                                        "Ask a person when unsure: a strategy's resolution "
                                        "that needs review waits for a person (default "
                                        "false)."},
                }, ["strategies"], additionalProperties=False),
                examples={"merge then priority": {"strategies": ["merge", "priority"],
                                                  "options": {"priority": {"tie": "first"}}}},
            ),
        },
        "/api/collaboration/conflicts": {"get": _operation(
            "list_conflicts", "conflicts", "List conflicts",
            "The project's conflicts, newest first, each with when it was detected and how "
            "it was settled.",
            _responses(_json(_all({
                "project_id": _STRING,
                "conflicts": {"type": "array", "items": _ref("ConflictView")},
            }), "The conflicts."), *query, "503"),
            action="conflicts_read",
            parameters=[_PROJECT_QUERY, _query(
                "status", {"enum": ["pending", "resolved"]}, "Only conflicts in this state.")],
        )},
        "/api/collaboration/live": {"get": _operation(
            "list_live_sessions", "live", "List live sessions",
            "The project's live sessions open on this process (docs/protocol.md §8), each with "
            "its members: the host's and viewers' connections, the rung each viewer is sent, "
            "its latest `stream_stats` and, in relay mode, the server's own statistics of its "
            "connection.",
            _responses(_json(_all({
                "project_id": _STRING,
                "sessions": {"type": "array", "items": _ref("LiveSession")},
            }), "The live sessions."), *query),
            action="live_read", parameters=[_PROJECT_QUERY],
        )},
        "/api/collaboration/conflicts/detect": {"post": _operation(
            "detect_conflicts", "conflicts", "Dry-run a change",
            "Checks operations against the document as `timeline_change` would and says "
            "which would apply and which would conflict. Nothing is stored or sent. Refused "
            "like a change: inserting an element that exists or touching one deleted earlier "
            "in the change is 400, touching an element that does not exist 404, a value or a "
            "document over its quota 413. The WebSocket's `conflict_preview` is the same call "
            "(its ack's data is this answer). Audited as `conflict_preview`.",
            _responses(_json(_ref("DryRun"), "What the change would do."),
                       *conflict_statuses),
            action="conflict_preview",
            body=_obj({
                "changes": {"type": "array", "items": _ref("Op"), "minItems": 1,
                            "maxItems": 1000},
                "projectId": {**_STRING, "description": "Default the token's; must be it."},
            }, ["changes"]),
            examples={"an edit": {"changes": [
                {"op": "set", "element_id": "clip", "prop": "title", "value": "The slow fox",
                 "base": 1},
                {"op": "insert", "element_id": "clip-2", "element_type": "clip",
                 "props": {"start": 4.5}},
            ]}},
        )},
        "/api/collaboration/conflicts/{conflict_id}/resolve": {"post": _operation(
            "resolve_conflict", "conflicts", "Settle a pending conflict by hand",
            "Like `conflict_resolve` (or `conflict_dismiss` with `dismiss`) on the WebSocket: "
            "`current` keeps the current value, `incoming` writes the incoming one, `custom` "
            "writes `value`. The resolution is a durable event with its own `seq`, pushed to "
            "every member as `conflict_resolved`, and audited as `conflict_resolution`. A "
            "custom value is checked like a client's write (400, 413).",
            _responses(_json(_all({"conflict_id": _STRING, "seq": _INTEGER}),
                             "Settled: the resolution's seq."), *conflict_statuses),
            action="conflict_resolve",
            parameters=[_path("conflict_id", "A pending conflict of the token's project.")],
            body=_obj({
                "choice": {"enum": ["current", "incoming", "custom"]},
                "value": {"description": "Required when `choice` is `custom`: any JSON value "
                                         "(nested at most 32 levels, integers within 64 bits)."},
                "dismiss": {"type": "boolean", "default": False,
                            "description": "Record it as dismissed (the current value stays)."},
                "projectId": {**_STRING, "description": "Default the token's; must be it."},
            }, ["choice"]),
            examples={"a value of one's own": {"choice": "custom", "value": "The quick fox"},
                      "dismissed": {"choice": "current", "dismiss": True}},
        )},
        "/api/collaboration/conflicts/{conflict_id}/revert": {"post": _operation(
            "revert_conflict", "conflicts", "Revert a settled conflict's resolution",
            "Like `conflict_revert` on the WebSocket: a new change (a `timeline_change` event "
            "with `revert_of`, change id `revert:<conflict_id>`) restores the value of `side`, "
            "by default the side the resolution did not choose (required when it was "
            "`custom`). It is checked like a change made right after the resolution: when "
            "someone else wrote the property (or the element) since, nothing is overwritten "
            "and the revert becomes a new conflict (`status` `conflict`, settled by the "
            "chain). 400 for a conflict still pending, dismissed, reverted already, a missing "
            "or wrong `side`, or a target the revert cannot restore; 404 for an unknown "
            "conflict. Audited as `conflict_revert`.",
            _responses(_json(_all({
                "conflict_id": _STRING,
                "change_id": _STRING,
                "seq": {"type": ["integer", "null"],
                        "description": "The revert's seq; null when it became a conflict."},
                "status": {"enum": ["applied", "conflict"]},
                "conflicts": {"type": "array", "items": _STRING},
            }), "Reverted, or turned into a new conflict."), *conflict_statuses),
            action="conflict_revert",
            parameters=[_path("conflict_id", "A settled conflict of the token's project.")],
            body=_obj({
                "side": {"enum": ["current", "incoming"],
                         "description": "The side whose value comes back (default: the one "
                                        "the resolution did not choose)."},
                "projectId": {**_STRING, "description": "Default the token's; must be it."},
            }, []),
            examples={"the other side": {}, "a side named": {"side": "incoming"}},
        )},
        "/api/collaboration/performance/metrics": {"get": _operation(
            "performance_metrics", "performance", "Recent metric samples",
            "The samples kept in memory (the last 120, oldest first) for the project and for "
            "the whole server, the alerts firing now and the last health checks.",
            _responses(_json(_ref("PerformanceMetrics"), "Samples, alerts and health."),
                       *token),
            action="performance_metrics", parameters=[_PROJECT_QUERY],
        )},
        "/api/collaboration/performance/report": {"post": _operation(
            "performance_report", "performance", "A report over a range",
            "Per-metric min, average, p95 (nearest rank) and max over the stored samples of "
            "`[startDate, endDate)`, and the alerts firing at any time in it. Without "
            "`projectId`, the server's samples. Audited as `export`.",
            _responses(_json_or_csv(
                _ref("Report"), "The report.",
                f"The metrics table ({', '.join(REPORT_CSV_COLUMNS)}), an empty line, then the "
                f"alerts table ({', '.join(REPORT_ALERT_CSV_COLUMNS)}). {_CSV_SAFE}",
            ), *body),
            action="performance_report",
            body=_obj({
                "startDate": _DATE_INPUT,
                "endDate": {**_DATE_INPUT, "description": "After `startDate`. "
                            + _DATE_INPUT["description"]},
                "format": {"enum": ["json", "csv"], "default": "json"},
                "projectId": {**_STRING, "description": "Must be the token's; absent: the "
                                                        "server's samples."},
            }, ["startDate", "endDate"]),
            examples={"a year, JSON": {"startDate": "2026-01-01", "endDate": "2027-01-01"},
                      "a day of a project, CSV": {
                          "startDate": "2026-11-27T00:00:00Z", "endDate": 1_795_824_000_000,
                          "format": "csv", "projectId": "p1"}},
        )},
        "/api/collaboration/performance/stream": {"get": _operation(
            "performance_stream", "performance", "Live metrics (server-sent events)",
            "A `text/event-stream` that never ends: `retry: 2000` first, then an event "
            "`metrics` for every sample and `alert` for every alert change (the server's and "
            "the project's; the same data as the WebSocket's `metrics_sample` and `alert`), "
            "and a comment `: keepalive` after 15 s without news. A reader that falls behind "
            "loses the oldest news. EventSource cannot send headers, so the token may come as "
            "`access_token` (keep access logs off or scrub them).",
            _responses({
                "description": "The live feed.",
                "headers": {"Cache-Control": {"schema": {"const": "no-cache"}}},
                "content": {"text/event-stream": {"schema": _STRING}},
            }, *token),
            action="performance_metrics",
            parameters=[_PROJECT_QUERY, _query(
                "access_token", _STRING,
                "The token, when there is no `Authorization` header.")],
            security=[{"bearerAuth": []}, {"accessToken": []}],
        )},
        "/api/collaboration/audit": {"get": _operation(
            "audit_events", "audit", "Query the audit log",
            "Audit events of the project, newest first. Refusals are stored aggregated (one "
            "row per address, action and user each `audit_refusal_window`, `details.refused` "
            "counting them).",
            _responses(_json(_ref("AuditEvents"), "The events."), *query),
            action="audit_read",
            parameters=[
                _PROJECT_QUERY,
                _query("userId", _STRING, "Only this user's events."),
                _query("action", _ACTION, _ACTION["description"], example="edit"),
                _query("startDate", _DATE_TEXT, "From this ISO 8601 date or date-time (UTC "
                       "without an offset); empty: no bound.", example="2026-11-27"),
                _query("endDate", _DATE_TEXT, "Before this ISO 8601 date or date-time; empty: "
                       "no bound.", example="2026-11-28T00:00:00Z"),
                _query("limit", _INTEGER,
                       "At most this many (default 1000; clamped to 1..10000)."),
            ],
        )},
        "/api/collaboration/audit/export": {"post": _operation(
            "audit_export", "audit", "Export the audit log",
            "The same filters as the query, in the body (dates also as epoch milliseconds), "
            "as JSON or CSV. Audited as `export`.",
            _responses(_json_or_csv(
                _ref("AuditEvents"), "The events.",
                f"Columns {', '.join(AUDIT_CSV_COLUMNS)} (`details` as JSON). {_CSV_SAFE}",
            ), *body),
            action="audit_export",
            body=_obj({
                "projectId": {**_STRING, "description": "Default the token's; must be it."},
                "userId": _STRING,
                "action": _ACTION,
                "startDate": _DATE_INPUT,
                "endDate": _DATE_INPUT,
                "limit": {**_INTEGER, "description": "Default 1000; clamped to 1..10000."},
                "format": {"enum": ["json", "csv"], "default": "json"},
            }),
            examples={"edits as CSV": {"action": "edit", "format": "csv"}},
        )},
        "/api/collaboration/security/alerts": {"get": _operation(
            "security_alerts", "security", "List security alerts",
            "Security alerts concerning the project (with its `projectId`) and server-wide "
            "ones (`projectId` null), newest first; other projects' ids never show.",
            _responses(_json(_all({
                "projectId": _STRING,
                "alerts": {"type": "array", "items": _ref("SecurityAlert")},
            }), "The alerts."), *query),
            action="security_alerts_read",
            parameters=[_PROJECT_QUERY, _query(
                "status", {"enum": ["open", "resolved"]}, "Only alerts in this state.")],
        )},
        "/api/collaboration/security/alerts/{alert_id}/resolve": {"post": _operation(
            "resolve_security_alert", "security", "Resolve a security alert",
            "Resolves an open alert concerning the project, or a server-wide one concerning "
            "no project, for every project (404 otherwise). Audited as `alert_resolution`.",
            _responses(_json(_ref("SecurityAlert"), "The resolved alert."), *body, "404"),
            action="security_alert_resolve",
            parameters=[_path("alert_id", "An open security alert.")],
            body=_obj({
                "note": {"type": "string", "maxLength": 2000, "default": ""},
                "projectId": {**_STRING, "description": "Default the token's; must be it."},
            }),
            examples={"a note": {"note": "our load test, from the office"}},
        )},
        "/api/collaboration/gdpr/export": {"post": _operation(
            "gdpr_export", "gdpr", "Export what is stored about a user",
            "Everything the project stores about the user: comments, edits, conflicts they "
            "were a side of, audit events. Audited as `export`.",
            _responses(_json_or_csv(
                _ref("GdprExport"), "The user's data.",
                f"One row per item: {', '.join(GDPR_CSV_COLUMNS)} (`data` as JSON). {_CSV_SAFE}",
            ), *body, "501", "503"),
            action="gdpr_export",
            body=_obj({
                "userId": {"type": "string", "minLength": 1},
                "format": {"enum": ["json", "csv"], "default": "json"},
                "projectId": {**_STRING, "description": "Default the token's; must be it."},
            }, ["userId"]),
            examples={"JSON": {"userId": "bob"}, "CSV": {"userId": "bob", "format": "csv"}},
        )},
        "/api/collaboration/gdpr/erase": {"post": _operation(
            "gdpr_erase", "gdpr", "Erase a user",
            "Deletes the user's comments and pseudonymizes every attribution (authors, "
            "writers, audit and alert subjects; never content), drops addresses and user "
            "agents from their audit trail, and gives the project a new `epoch`. The "
            "project's room closes with 1011 during the rewrite (members reconnect and "
            "resume). Audited as `erasure`.",
            _responses(_json(_ref("GdprErasure"), "What was erased."), *body, "501", "503"),
            action="gdpr_erase",
            body=_obj({
                "userId": {"type": "string", "minLength": 1},
                "projectId": {**_STRING, "description": "Default the token's; must be it."},
            }, ["userId"]),
            examples={"bob": {"userId": "bob"}},
        )},
    }  # fmt: skip


# -- schemas ------------------------------------------------------------------------------------


def _error_codes() -> list[str]:
    classes = [cls for cls in vars(_errors).values()
               if isinstance(cls, type) and issubclass(cls, _errors.ProtocolError)]  # fmt: skip
    return sorted({cls.code for cls in classes})


def _schemas() -> dict[str, Schema]:
    nullable_number = {"type": ["number", "null"]}
    sample_fields = {name: nullable_number for name in FIELDS}
    current = _obj({"value": {}, "user_id": _STRING, "seq": _INTEGER}, ["value"],
                   description="The value now, who wrote it and at which seq.")  # fmt: skip
    incoming = _obj({"value": {}, "user_id": _STRING, "change_id": _STRING}, ["value"],
                    description="What the conflicting change wanted, whose, which.")  # fmt: skip
    return {
        "Error": _all({"error": _obj({
            "code": {"enum": _error_codes(), "description": "The HTTP status follows it."},
            "message": {**_STRING, "description": "What is wrong, the field's path first "
                                                  "(`body.changes[0].op: ...`)."},
            "retry_after_ms": {**_INTEGER, "description": "`rate_limited`: when to retry."},
            "outcome": {"enum": ["not_applied", "unknown"],
                        "description": "`overloaded`: whether anything was applied."},
        }, ["code", "message"])}),
        "Readiness": _obj({
            "status": {"enum": ["ok", "unavailable"]},
            "checks": {"type": "object", "additionalProperties": _STRING,
                       "description": "`ok` or `failing: <why>` by check (`storage`, `redis` "
                                      "in a cluster, `postgresql`, `event_loop`; `server` while "
                                      "shutting down); `ok` or `degraded: <what>` for what may "
                                      "fail without stopping writes (`redis` beside "
                                      "PostgreSQL)."},
            "degraded": {"type": "object", "additionalProperties": _STRING,
                         "description": "Present while something is degraded but writes go on "
                                        "(the server stays ready): what is lost meanwhile, by "
                                        "name (`redis` beside PostgreSQL: presence, cursors and "
                                        "rate limits per process)."},
        }, ("status", "checks")),
        "Op": {
            "description": "A document operation (docs/protocol.md §5).",
            "oneOf": [_ref("InsertOp"), _ref("SetOp"), _ref("DeleteOp")],
            "discriminator": {"propertyName": "op", "mapping": {
                "insert": "#/components/schemas/InsertOp",
                "set": "#/components/schemas/SetOp",
                "delete": "#/components/schemas/DeleteOp",
            }},
        },
        "InsertOp": _obj({
            "op": {"const": "insert"},
            "element_id": _ID,
            "element_type": _ID,
            "props": {"type": "object"},
        }, ["op", "element_id", "element_type"]),
        "SetOp": _obj({
            "op": {"const": "set"},
            "element_id": _ID,
            "prop": _ID,
            "value": {"description": "Any JSON value."},
            "base": {"type": "integer", "minimum": 0,
                     "description": "The seq of the version last seen; absent: no conflict."},
        }, ["op", "element_id", "prop", "value"]),
        "DeleteOp": _obj({
            "op": {"const": "delete"},
            "element_id": _ID,
            "base": {"type": "integer", "minimum": 0},
        }, ["op", "element_id"]),
        "Conflict": _all({
            "id": _STRING,
            "element_id": _STRING,
            "prop": {"type": ["string", "null"],
                     "description": "null for a conflicting delete."},
            "base_value": {},
            "current": current,
            "incoming": incoming,
            "strategy": _STRING,
            "status": {"enum": ["pending", "resolved"]},
        }),
        "LiveSession": _all({
            "session_id": _ID,
            "host": _STRING,
            "kind": {"enum": ["camera", "screen"]},
            "mode": {"enum": ["p2p", "relay"]},
            "viewers": {"type": "array", "items": _STRING},
            "started_at": _EPOCH_MS,
            "host_size": _nullable({"type": "array", "items": _INTEGER}),
            "quality_changes": _INTEGER,
            "members": {"type": "array", "items": _all({
                "user_id": _STRING,
                "connection": _STRING,
                "role": {"enum": ["host", "viewer"]},
                "quality": _nullable({"enum": ["360p", "480p", "720p", "1080p"]}),
                "stats": _nullable(_ANY_OBJECT),
                "link": _nullable(_ANY_OBJECT),
            })},
        }),
        "ConflictView": {"allOf": [_ref("Conflict"), _all({
            "created_at": _EPOCH_MS,
            "resolution": _nullable(_obj({
                "value": {},
                "choice": {"enum": ["current", "incoming", "custom"]},
                "strategy": _STRING,
                "confidence": _NUMBER,
                "explanation": _STRING,
                "review": {"type": "boolean",
                           "description": "Whether a person should look at it."},
                "seq": {**_INTEGER, "description": "The resolution's seq (absent on those "
                                                   "stored before this version)."},
            }, ["value", "choice", "strategy", "confidence", "explanation"])),
        })]},
        "DryRun": _all({
            "applies": {"type": "array", "items": {"type": "object"},
                        "description": "The operations that would apply, as applied."},
            "conflicts": {"type": "array", "items": _all({
                "op": {"enum": ["set", "delete"]},
                "element_id": _STRING,
                "prop": {"type": ["string", "null"]},
                "base": {"type": ["integer", "null"]},
                "base_value": {},
                "current": current,
                "incoming": incoming,
                "strategies": {
                    "type": ["array", "null"],
                    "description": "What each strategy of the project's chain would answer, "
                                   "in order; nothing is applied (null past the first 20 "
                                   "conflicts).",
                    "items": _obj({
                        "strategy": _STRING,
                        "answer": {"enum": ["resolved", "declined", "deferred", "failed"]},
                        "resolution": {"type": "object"},
                        "parts": {"type": "array", "description": "The colliding leaves "
                                  "settled apart, when merge split the conflict.",
                                  "items": _all({"part": _STRING, "strategy": _STRING,
                                                 "choice": _STRING, "confidence": _NUMBER,
                                                 "review": {"type": "boolean"}})},
                        "held": {"type": "boolean", "description": "Under ask_when_unsure: "
                                 "the resolution would wait for a person."},
                    }, ["strategy", "answer"]),
                },
                "settled_by": {"type": ["string", "null"],
                               "description": "The strategy that would settle it (or wait "
                                              "for a person); null: none would."},
            })},
        }),
        "Snapshot": _all({
            "project_id": _STRING,
            "seq": _INTEGER,
            "elements": {"type": "object", "additionalProperties": _all({
                "type": _STRING, "props": {"type": "object"}})},
            "versions": {"type": "object", "additionalProperties": {
                "type": "object", "additionalProperties": _INTEGER}},
        }),
        "Chain": _all({
            "strategies": {"type": "array", "items": _STRING},
            "options": {"type": "object", "additionalProperties": {"type": "object"}},
            "ask_when_unsure": {"type": "boolean"},
            "available": {"type": "array", "items": _STRING,
                          "description": "Every installed strategy."},
        }),
        "Sample": _obj({
            "at": _EPOCH_MS,
            "projectId": {"type": ["string", "null"],
                          "description": "null: the whole server."},
            **sample_fields,
        }, ["at", "projectId"], description="A metric sample (docs/protocol.md §13); fields "
           "that do not apply are absent or null."),
        "Alert": _all({
            "id": _STRING,
            "category": {"const": "performance"},
            "rule": _STRING,
            "level": {"enum": list(LEVELS)},
            "state": {"enum": ["firing", "resolved"]},
            "projectId": {"type": ["string", "null"]},
            "value": _NUMBER,
            "threshold": _NUMBER,
            "message": _STRING,
            "startedAt": _EPOCH_MS,
            "updatedAt": _EPOCH_MS,
            "resolvedAt": {"type": ["integer", "null"]},
        }),
        "PerformanceMetrics": _all({
            "projectId": _STRING,
            "interval": {**_NUMBER, "description": "`metrics_interval`, seconds."},
            "current": _nullable(_ref("Sample")),
            "series": {"type": "array", "items": _ref("Sample")},
            "global": _all({
                "current": _nullable(_ref("Sample")),
                "series": {"type": "array", "items": _ref("Sample")},
            }),
            "alerts": {"type": "array", "items": _ref("Alert")},
            "health": {"type": "object", "additionalProperties": _all({
                "ok": {"type": "boolean"}, "detail": _STRING, "at": _EPOCH_MS})},
        }),
        "Report": _all({
            "projectId": {"type": ["string", "null"]},
            "startDate": _ISO_TIME,
            "endDate": _ISO_TIME,
            "samples": _INTEGER,
            "metrics": {"type": "object", "propertyNames": {"enum": list(FIELDS)},
                        "additionalProperties": _all({
                            "min": _NUMBER, "avg": _NUMBER, "p95": _NUMBER, "max": _NUMBER,
                            "samples": _INTEGER})},
            "alerts": {"type": "array", "items": _ref("Alert")},
        }),
        "AuditEvent": _all({
            "id": _STRING,
            "userId": {"type": ["string", "null"], "description": "null for refused tokens."},
            "projectId": {"type": ["string", "null"]},
            "action": {"type": "string", "examples": list(ACTIONS)},
            "resource": _STRING,
            "details": {"type": "object"},
            "timestamp": _ISO_TIME,
            "ipAddress": _STRING,
            "userAgent": _STRING,
            "severity": {"enum": list(SEVERITIES)},
            "riskScore": {"type": "integer", "minimum": 0, "maximum": 100},
        }),
        "AuditEvents": _all({
            "projectId": _STRING,
            "events": {"type": "array", "items": _ref("AuditEvent")},
        }),
        "SecurityAlert": _all({
            "id": _STRING,
            "category": {"const": "security"},
            "type": {"enum": list(ALERT_TYPES)},
            "severity": {"enum": list(SEVERITIES)},
            "rule": _STRING,
            "subject": {**_STRING, "description": "`user:<id>` or `ip:<address>`."},
            "message": _STRING,
            "userId": {"type": ["string", "null"]},
            "projectId": {"type": ["string", "null"],
                          "description": "The caller's project, or null: server-wide."},
            "ipAddress": _STRING,
            "count": {**_INTEGER, "description": "Findings since it was raised."},
            "timestamp": _ISO_TIME,
            "updatedAt": _ISO_TIME,
            "resolved": {"type": "boolean"},
            "resolvedAt": {"type": ["string", "null"]},
            "resolvedBy": {"type": ["string", "null"]},
            "note": _STRING,
        }),
        "GdprExport": _all({
            "userId": _STRING,
            "projectId": _STRING,
            "exportedAt": _ISO_TIME,
            "comments": {"type": "array", "items": {"type": "object"}},
            "edits": {"type": "array", "items": {"type": "object"}},
            "conflicts": {"type": "array", "items": {"type": "object"}},
            "audit": {"type": "array", "items": {"type": "object"}},
        }),
        "GdprErasure": _all({
            "userId": _STRING,
            "pseudonym": _STRING,
            "erased": {"type": "object", "additionalProperties": _INTEGER,
                       "description": "Rows changed, by table."},
        }),
    }  # fmt: skip


_DESCRIPTION = """\
The HTTP API of a crealia server: the REST endpoints around the WebSocket protocol, health,
metrics and this document. It is served by the HTTP app on `--port` (3000 by default), which
also serves the WebSocket route `/ws` described in docs/protocol.md.

Authentication: a JWT in `Authorization: Bearer <token>` (docs/protocol.md §15), for one
project and with a role; each operation names the least role it needs
(viewer < commenter < editor < owner). A token of another project than the one named is 403.

Errors: every error the app answers is JSON `{"error": {"code", "message"}}` with the status of
its code (`bad_request` 400, `unauthorized` 401, `forbidden` 403, `not_found` 404 (and 405 for a
method a path does not allow), `too_large` 413, `rate_limited` 429 with `retry_after_ms` and
`Retry-After`, `unsupported` 501, `overloaded` 503 with `outcome`). Before the app, the edge may
answer plain text: 421 for a `Host` that `allowed_hosts` does not list, 503 for a connection
over a connection cap. A request whose headers or body do not arrive within
`http_header_timeout` or `http_body_timeout` has its connection closed.
"""


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP app (a new dict each call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "crealia HTTP API",
            "version": __version__,
            "summary": "REST, health and metrics of a crealia real-time collaboration server.",
            "description": _DESCRIPTION,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [
            {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
            {"name": "meta", "description": "This document, what is running, `--dev` tokens."},
            {"name": "projects", "description": "A project's document."},
            {"name": "strategies", "description": "How a project's conflicts are settled."},
            {"name": "conflicts", "description": "Conflicts: list, dry-run, settle by hand."},
            {"name": "live", "description": "Live sessions (WebRTC) and their statistics."},
            {"name": "performance", "description": "Metric samples, reports, the live feed."},
            {"name": "audit", "description": "The audit log."},
            {"name": "security", "description": "Security alerts."},
            {"name": "gdpr", "description": "A user's data: export and erasure."},
        ],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "responses": _RESPONSES,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A crealia token (`crealia token`).",
                },
                "accessToken": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "access_token",
                    "description": "The token as a query parameter: the live feed only.",
                },
            },
        },
    }

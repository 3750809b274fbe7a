"""Wire format: envelopes, client message types, and the one cattrs converter.

Every client frame is decoded here: JSON, then the envelope (``type``, ``ref``, ``data``), then
``data`` into the attrs class the protocol table (:mod:`crealia._protocol`) names for ``type``.
Any failure becomes a :class:`BadRequest` or :class:`TooLarge` whose message names the offending
field (``data.position.x: expected a number``), so the edge can answer with an ``error`` and
change nothing.
"""

from __future__ import annotations

import json
import math
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, TypeVar

import attrs
import cattrs
import cattrs.cols
import orjson
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from ._errors import BadRequest, ProtocolError, TooLarge

T = TypeVar("T")

#: The WebSocket subprotocol of docs/protocol.md: the server selects it when a client offers it,
#: and crealia's client offers it. One constant for every transport and the client.
SUBPROTOCOL: Final = "crealia.v1"

#: Longest id (element, change, comment, conflict, session, user) accepted, in characters.
MAX_ID_CHARS = 128
#: Longest other short string (element type, prop name, track) accepted, in characters.
MAX_NAME_CHARS = 128
#: Longest ``resume.epoch`` accepted, in characters (the server's epochs have 32).
MAX_EPOCH_CHARS = 128
#: Deepest nesting accepted inside a JSON value (props, values).
MAX_DEPTH = 32
#: Most operations in one ``timeline_change``.
MAX_OPS = 1000
MAX_REF = 2**53 - 1
#: Integers in values must fit a signed 64-bit integer (larger ones would silently become floats).
MIN_INT, MAX_INT = -(2**63), 2**63 - 1
#: Default largest single value (a prop, a resolved value, an AI answer), as encoded JSON bytes;
#: a server applies ``Config.value_max_bytes``.
MAX_VALUE_BYTES = 64 * 1024

#: What a user or project id may be where crealia makes one up or takes one from a person: the
#: dev pages' tokens, ``crealia loadtest``'s project prefix, ``crealia strategies train
#: --project``. Ids on the wire are checked by :func:`id_problem` and :data:`MAX_ID_CHARS`.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}")
#: What an id may not contain: C0/C1 control characters (NUL included), line and paragraph
#: separators, and the Unicode bidirectional controls (embeddings, overrides, isolates, marks)
#: that make an id display as another one (CVE-2021-42574, "Trojan Source").
_BAD_ID_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
#: A run of digits long enough to be an integer beyond 64 bits (2**63 has 19 digits).
_LONG_DIGITS = re.compile(rb"[0-9]{19,}")
_LONG_DIGITS_TEXT = re.compile(r"[0-9]{19,}")
#: Up to this length a frame is scanned for long digit runs; longer ones (a 60 KB text costs
#: ~650 µs to scan) are searched in their parsed tree for a number orjson could have rounded.
_SCAN_CHARS = 2048


class _Missing:
    """Marks an optional field that the client left out (distinct from JSON null)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class FieldInvalid(ValueError):
    """A validator's complaint about one named field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class FieldTooLarge(TooLarge):
    """A named field over its limit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------------------------------------
# Field checks


def id_problem(value: str) -> str | None:
    """Why ``value`` cannot be an id (element, comment, change, conflict, project, user,
    session), or None: ids hold no control characters and no bidirectional controls."""
    bad = _BAD_ID_CHARS.search(value)
    if bad is None:
        return None
    return f"must not contain control or bidirectional characters (U+{ord(bad.group()):04X})"


def _id(
    max_chars: int = MAX_ID_CHARS, *, text: bool = True
) -> Callable[[Any, attrs.Attribute[Any], str], None]:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
        if value is None:
            return
        if not value:
            raise FieldInvalid(attribute.name, "must not be empty")
        if len(value) > max_chars:
            raise FieldTooLarge(attribute.name, f"longer than {max_chars} characters")
        problem = id_problem(value) if text else None
        if problem is not None:
            raise FieldInvalid(attribute.name, problem)

    return check


def _finite(_inst: Any, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise FieldInvalid(attribute.name, "must be a finite number")


def check_json_value(value: Any, depth: int = 0) -> None:
    """Check a free JSON value (element props, resolved values) for depth and integer range.

    Raises:
        ValueError: nested deeper than :data:`MAX_DEPTH`, an integer outside the signed 64-bit
            range, or something that is not JSON (a non-finite number, a non-string key).
    """
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError("object keys must be strings")
            check_json_value(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_json_value(item, depth + 1)
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        return
    elif isinstance(value, int):
        if not MIN_INT <= value <= MAX_INT:
            raise ValueError("integer out of range: integers must fit in 64 bits (±2**63)")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("numbers must be finite")
    else:
        raise ValueError(f"not a JSON value ({type(value).__name__})")


def check_value(value: Any, *, path: str, max_bytes: int = MAX_VALUE_BYTES) -> None:
    """Check one value a client (or a strategy answering for one) wants written: JSON only,
    nested at most :data:`MAX_DEPTH` levels, integers within 64 bits, and at most ``max_bytes``
    bytes encoded (the server's ``value_max_bytes`` quota).

    ``path`` names the value in the error (``data.changes[0].value``).

    Raises:
        BadRequest: not an acceptable JSON value; the message names ``path``.
        TooLarge: over ``max_bytes``; the message names ``path`` and the ``value_max_bytes``
            quota.
    """
    try:
        check_json_value(value)
    except ValueError as exc:
        raise BadRequest(f"{path}: {exc}") from None
    check_value_size(value, path=path, max_bytes=max_bytes)


def check_value_size(value: Any, *, path: str, max_bytes: int = MAX_VALUE_BYTES) -> None:
    """The size half of :func:`check_value`, for values the converter already checked (a
    client's ops): one encoding, no second walk.

    Raises:
        TooLarge: over ``max_bytes``; the message names ``path`` and the quota.
    """
    size = value_bytes(value)
    if size > max_bytes:
        raise TooLarge(
            f"{path}: value_max_bytes quota: the value is {size} bytes encoded, over {max_bytes}"
        )


def value_bytes(value: Any) -> int:
    """The size of ``value`` encoded as JSON, in bytes (what quotas count)."""
    try:
        return len(orjson.dumps(value))
    except TypeError as exc:  # e.g. an integer beyond 64 bits
        raise BadRequest(f"value: not encodable as JSON: {exc}") from None


def _json_value(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is MISSING:
        return
    try:
        check_json_value(value)
    except ValueError as exc:
        raise FieldInvalid(attribute.name, str(exc)) from None


def _props(_inst: Any, attribute: attrs.Attribute[Any], value: dict[str, Any]) -> None:
    for key in value:
        if not key or len(key) > MAX_NAME_CHARS:
            raise FieldInvalid(
                attribute.name,
                f"property name {key[:40]!r} must be 1..{MAX_NAME_CHARS} characters",
            )
        problem = id_problem(key)
        if problem is not None:
            raise FieldInvalid(attribute.name, f"property name {key[:40]!r} {problem}")
    try:
        check_json_value(value, 1)
    except ValueError as exc:
        raise FieldInvalid(attribute.name, str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Client messages (the ``data`` of each client envelope; crealia._protocol says which type
# decodes into which)


@attrs.frozen(kw_only=True)
class Resume:
    seq: int = attrs.field(validator=attrs.validators.ge(0))
    #: The ``epoch`` of the welcome the client had (docs/protocol.md §6); absent: not checked.
    epoch: str | None = attrs.field(default=None, validator=_id(MAX_EPOCH_CHARS))


@attrs.frozen(kw_only=True)
class Hello:
    token: str = attrs.field(validator=_id(8192, text=False))
    project_id: str = attrs.field(validator=_id())
    resume: Resume | None = None


@attrs.frozen(kw_only=True)
class Position:
    x: float = attrs.field(validator=_finite)
    y: float = attrs.field(validator=_finite)
    time: float | None = attrs.field(default=None, validator=_finite)
    track: str | None = attrs.field(default=None, validator=_id(MAX_NAME_CHARS))


@attrs.frozen(kw_only=True)
class CursorUpdate:
    position: Position


@attrs.frozen(kw_only=True)
class ElementActive:
    element_id: str | None = attrs.field(validator=_id())
    element_type: str | None = attrs.field(default=None, validator=_id(MAX_NAME_CHARS))


@attrs.frozen(kw_only=True)
class Typing:
    element_id: str | None = attrs.field(default=None, validator=_id())


@attrs.frozen(kw_only=True)
class Comment:
    """A comment of ``comment_add`` (docs/protocol.md §4), as validated off the wire."""

    id: str = attrs.field(validator=_id())
    text: str
    element_id: str | None = attrs.field(default=None, validator=_id())
    time: float | None = attrs.field(default=None, validator=_finite)


@attrs.frozen(kw_only=True)
class CommentAdd:
    comment: Comment


@attrs.frozen(kw_only=True)
class InsertOp:
    op: Literal["insert"]
    element_id: str = attrs.field(validator=_id())
    element_type: str = attrs.field(validator=_id(MAX_NAME_CHARS))
    props: dict[str, Any] = attrs.field(factory=dict, validator=_props)


@attrs.frozen(kw_only=True)
class SetOp:
    op: Literal["set"]
    element_id: str = attrs.field(validator=_id())
    prop: str = attrs.field(validator=_id(MAX_NAME_CHARS))
    value: Any = attrs.field(validator=_json_value)
    #: The seq of the version the client last saw; absent means an unconditional write.
    base: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0))
    )


@attrs.frozen(kw_only=True)
class DeleteOp:
    op: Literal["delete"]
    element_id: str = attrs.field(validator=_id())
    base: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0))
    )


Op = InsertOp | SetOp | DeleteOp


def _ops(_inst: Any, attribute: attrs.Attribute[Any], value: list[Op]) -> None:
    if not value:
        raise FieldInvalid(attribute.name, "must hold at least one operation")
    if len(value) > MAX_OPS:
        raise FieldTooLarge(attribute.name, f"more than {MAX_OPS} operations")


@attrs.frozen(kw_only=True)
class TimelineChange:
    """The data of a ``timeline_change`` (docs/protocol.md §5), as validated off the wire."""

    change_id: str = attrs.field(validator=_id())
    changes: list[Op] = attrs.field(validator=_ops)


@attrs.frozen(kw_only=True)
class ConflictResolve:
    conflict_id: str = attrs.field(validator=_id())
    choice: Literal["current", "incoming", "custom"]
    value: Any = attrs.field(default=MISSING, validator=_json_value)

    def __attrs_post_init__(self) -> None:
        if self.choice == "custom" and self.value is MISSING:
            raise FieldInvalid("value", "is required when choice is 'custom'")


@attrs.frozen(kw_only=True)
class ConflictDismiss:
    conflict_id: str = attrs.field(validator=_id())


@attrs.frozen(kw_only=True)
class ConflictRevert:
    """The data of a ``conflict_revert``: the settled conflict, and the side whose value comes
    back (by default the one its resolution did not choose)."""

    conflict_id: str = attrs.field(validator=_id())
    side: Literal["current", "incoming"] | None = None


@attrs.frozen(kw_only=True)
class ConflictPreview:
    """The data of a ``conflict_preview``: the operations of a dry run (docs/protocol.md §5)."""

    changes: list[Op] = attrs.field(validator=_ops)


@attrs.frozen(kw_only=True)
class Empty:
    pass


@attrs.frozen(kw_only=True)
class Ping:
    t: float | None = attrs.field(default=None, validator=_finite)


@attrs.frozen(kw_only=True)
class LiveStart:
    kind: Literal["camera", "screen"]
    mode: Literal["p2p", "relay"] = "p2p"


@attrs.frozen(kw_only=True)
class LiveRef:
    session_id: str = attrs.field(validator=_id())


@attrs.frozen(kw_only=True)
class WebrtcSignal:
    session_id: str = attrs.field(validator=_id())
    to: str = attrs.field(validator=_id())
    description: dict[str, Any] | None = attrs.field(default=None, validator=_json_value)
    candidate: dict[str, Any] | None = attrs.field(default=None, validator=_json_value)


@attrs.frozen(kw_only=True)
class StreamStats:
    session_id: str = attrs.field(validator=_id())
    bitrate_kbps: float = attrs.field(validator=_finite)
    rtt_ms: float = attrs.field(validator=_finite)
    packet_loss: float = attrs.field(validator=_finite)
    fps: float = attrs.field(default=0.0, validator=_finite)
    width: int = 0
    height: int = 0


@attrs.frozen(kw_only=True)
class Envelope:
    """A decoded client message."""

    type: str
    ref: int | None
    data: Any


# ---------------------------------------------------------------------------------------------
# The converter


def _strict_str(value: Any, _type: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {_json_type(value)}")
    return value


def _strict_float(value: Any, _type: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {_json_type(value)}")
    return float(value)


def _strict_int(value: Any, _type: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected an integer, got {_json_type(value)}")
    if isinstance(value, float) and not value.is_integer():
        raise TypeError("expected an integer, got a fraction")
    if not -MAX_REF <= value <= MAX_REF:
        raise ValueError(f"out of range: integers must be within ±{MAX_REF}")
    return int(value)


def _strict_bool(value: Any, _type: Any) -> bool:
    # Registered ahead of int's hook, which a bool would otherwise reach (bool is an int).
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {_json_type(value)}")
    return value


def _any(value: Any, _type: Any) -> Any:
    return value


def _json_dict(value: Any, _type: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "an array"
        case dict():
            return "an object"
    return type(value).__name__


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(omit_if_default=True, detailed_validation=True)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(Any, _any)
    conv.register_structure_hook_func(lambda t: t == dict[str, Any], _json_dict)
    ops = {"insert": InsertOp, "set": SetOp, "delete": DeleteOp}

    def structure_op(value: Any, _type: Any) -> Op:
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {_json_type(value)}")
        kind = value.get("op")
        cls = ops.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise ValueError(f"op must be one of insert, set, delete (got {kind!r})")
        return conv.structure(value, cls)  # type: ignore[no-any-return]

    conv.register_structure_hook_func(lambda t: t == Op, structure_op)

    def structure_list(type_: Any) -> Callable[[Any, Any], Any]:
        inner = cattrs.cols.list_structure_factory(type_, conv)

        def hook(value: Any, _type: Any) -> Any:
            if not isinstance(value, list):
                raise TypeError(f"expected an array, got {_json_type(value)}")
            return inner(value, type_)

        return hook

    # JSON arrays only: a string or an object is not a list of its characters or keys.
    def is_list(type_: Any) -> bool:
        return bool(typing.get_origin(type_) is list)

    conv.register_structure_hook_factory(is_list, structure_list)

    def structure_class(cls: type[Any]) -> Callable[[Any, Any], Any]:
        inner = cattrs.gen.make_dict_structure_fn(cls, conv)

        def hook(value: Any, _type: Any) -> Any:
            if not isinstance(value, dict):
                raise TypeError(f"expected an object, got {_json_type(value)}")
            return inner(value, cls)

        return hook

    conv.register_structure_hook_factory(attrs.has, structure_class)
    return conv


converter = _make_converter()


def _format_leaf(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, KeyError):
        return "is required"
    if isinstance(exc, FieldInvalid | FieldTooLarge):
        return f"@{exc.field} {exc.message}"
    if isinstance(exc, ProtocolError):
        return exc.message
    if typing.get_origin(type_) is Literal:
        allowed = ", ".join(repr(a) for a in typing.get_args(type_))
        return f"must be one of {allowed}"
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"unknown fields {sorted(exc.extra_fields)}"
    if isinstance(exc, TypeError | ValueError) and str(exc):
        text = str(exc)
        if "Literal" in text or "not in literal" in text:
            return "has a value that is not allowed"
        return text
    return "is invalid"


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, ClassValidationError | IterableValidationError | BaseExceptionGroup):
        out: list[BaseException] = []
        for sub in exc.exceptions:
            out.extend(_leaves(sub))
        return out
    return [exc]


def structure(value: Any, cls: type[T], path: str = "data") -> T:
    """Structure ``value`` into ``cls`` with the shared converter.

    Raises:
        TooLarge: a field is over its limit.
        BadRequest: a field is missing or invalid; the message names it (``data.x.y: ...``).
    """
    try:
        return converter.structure(value, cls)
    except (ClassValidationError, IterableValidationError) as exc:
        messages = cattrs.transform_error(exc, path=path, format_exception=_format_leaf)
        text = "; ".join(_tidy(m) for m in messages[:3])
        if any(isinstance(leaf, TooLarge) for leaf in _leaves(exc)):
            raise TooLarge(text) from None
        raise BadRequest(text) from None
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"{path}: {_format_leaf(exc, cls)}") from None


def _tidy(message: str) -> str:
    # cattrs formats "<what> @ <path>"; clients read "<path>: <what>" more easily.
    what, _, where = message.rpartition(" @ ")
    if not where:
        return message
    where = where.replace("$.", "").replace("$", "")
    if what.startswith("@"):
        field, _, what = what[1:].partition(" ")
        where = f"{where}.{field}"
    return f"{where}: {what}"


# ---------------------------------------------------------------------------------------------
# Decoding and encoding


def decode_client_frame(frame: str | bytes, messages: Mapping[str, type[Any]]) -> Envelope:
    """Decode one client frame into an envelope with typed ``data``.

    ``messages`` maps each client message type to the class its ``data`` decodes into (the
    protocol table's view, ``crealia._protocol.CLIENT_MESSAGES``).

    Raises:
        BadRequest: binary frame, malformed JSON, bad envelope, unknown type, invalid data.
        TooLarge: a field over its limit.
    """
    if isinstance(frame, bytes | bytearray | memoryview):
        raise BadRequest("binary frames are not accepted: send JSON in a text frame")
    try:
        raw = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"frame is not valid JSON: {exc}") from None
    where = big_int_path(frame, raw)
    if where is not None:
        ref = raw.get("ref") if isinstance(raw, dict) else None
        valid = isinstance(ref, int) and not isinstance(ref, bool) and 0 < ref <= MAX_REF
        raise _with_ref(BadRequest(f"{where or 'frame'}: {BIG_INT}"), ref if valid else None)
    if not isinstance(raw, dict):
        raise BadRequest(f"frame must be a JSON object envelope, got {_json_type(raw)}")
    kind = raw.get("type")
    ref = raw.get("ref")
    if ref is not None and (
        isinstance(ref, bool) or not isinstance(ref, int) or not 0 < ref <= MAX_REF
    ):
        raise BadRequest("ref: must be a positive integer")
    if not isinstance(kind, str):
        raise _with_ref(BadRequest("type: must be a string naming the event"), ref)
    cls = messages.get(kind)
    if cls is None:
        raise _with_ref(BadRequest(f"type: unknown event type {kind[:64]!r}"), ref)
    data = raw.get("data", {})
    if not isinstance(data, dict):
        raise _with_ref(BadRequest(f"data: expected an object, got {_json_type(data)}"), ref)
    try:
        value = structure(data, cls)
    except ProtocolError as exc:
        raise _with_ref(exc, ref) from None
    return Envelope(type=kind, ref=ref, data=value)


def big_int_path(text: str | bytes, parsed: Any) -> str | None:
    """Where ``text`` (JSON that orjson parsed into ``parsed``) holds an integer beyond 64 bits,
    which orjson silently turns into a float (``""``: the whole text); None when it holds none.

    Cheap in the common case: a short text is scanned for a run of 19 digits, a long one's tree
    for a number of 2**63 or more; only then is it parsed again, exactly, by the standard
    library."""
    if len(text) <= _SCAN_CHARS:
        found = (_LONG_DIGITS_TEXT.search(text) if isinstance(text, str)
                 else _LONG_DIGITS.search(text))  # fmt: skip
        if found is None:
            return None
    elif not _holds_huge_number(parsed):
        return None
    return _big_int_path(json.loads(text), "")


def _holds_huge_number(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, float | int) and not isinstance(item, bool) and abs(item) >= 2**63:
            return True
    return False


#: The message for an integer beyond 64 bits.
BIG_INT = "integer out of range: integers must fit in 64 bits (±2**63)"


def _big_int_path(value: Any, path: str) -> str | None:
    """Where in ``value`` (a stdlib parse: exact integers) an integer beyond 64 bits is."""
    if isinstance(value, dict):
        for key, item in value.items():
            found = _big_int_path(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _big_int_path(item, f"{path}[{i}]")
            if found is not None:
                return found
    elif isinstance(value, int) and not isinstance(value, bool) and not MIN_INT <= value <= MAX_INT:
        return path
    return None


def _with_ref(exc: ProtocolError, ref: int | None) -> ProtocolError:
    exc.ref = ref  # type: ignore[attr-defined]
    return exc


def error_ref(exc: ProtocolError) -> int | None:
    """The ``ref`` of the message that caused ``exc``, when the decoder could read it."""
    ref = getattr(exc, "ref", None)
    return ref if isinstance(ref, int) else None


def unstructure(value: Any) -> Any:
    """Turn a validated message back into plain JSON data (absent optionals stay absent)."""
    return converter.unstructure(value)


def tight(encoded: bytes) -> bytes:
    """``encoded`` in a bytes object of its own size.

    orjson's result keeps its growth buffer's capacity: at least 4 KiB, and about 8 times the
    text for large ones (a 60 KB event holds 500 KiB). What is kept (a project's history, the
    frames in outboxes) is copied once into an object of its length, which costs a memcpy.
    """
    return bytes(memoryview(encoded))


def dumps(value: Any) -> bytes:
    """Encode a JSON value with orjson (:func:`tight`: it may be kept)."""
    return tight(orjson.dumps(value))


def envelope(kind: str, data: Any, ref: int | None = None) -> bytes:
    """Encode one server envelope (:func:`tight`: it may wait in outboxes)."""
    if ref is None:
        return tight(orjson.dumps({"type": kind, "data": data}))
    return tight(orjson.dumps({"type": kind, "ref": ref, "data": data}))


def error_envelope(exc: ProtocolError, ref: int | None = None) -> bytes:
    """Encode the ``error`` envelope for ``exc``."""
    return envelope("error", exc.to_wire(), ref)

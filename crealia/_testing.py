"""Helpers for testing crealia extensions: conflict builders and a strategy conformance check.

Plugin authors and crealia's own tests use the same tools::

    from crealia.testing import check_strategy, make_conflict, make_context

    async def test_my_strategy_keeps_the_contract() -> None:
        await check_strategy(MyStrategy({}))

    async def test_my_strategy_prefers_the_owner() -> None:
        conflict = make_conflict("old", "new", current_role="owner", incoming_role="editor")
        answer = await MyStrategy({}).resolve(conflict, make_context(conflict))
        assert answer.choice == "current"

:func:`check_strategy` runs the strategy on a set of representative conflicts and asserts the
contract of :class:`crealia._strategy.ConflictStrategy`; :func:`make_conflict` and
:func:`make_context` build the objects the server hands a strategy, with sensible defaults.
"""

from __future__ import annotations

import copy
import enum
import math
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final, Literal

import attrs
import orjson
import trio

from ._model import Conflict, Resolution
from ._strategy import DECLINE, DEFER, ConflictStrategy, Participant, ResolutionContext

__all__ = ["check_strategy", "make_conflict", "make_context"]

#: The server time (ms) conflicts built here are created at, unless told otherwise.
CREATED_AT: Final = 1_700_000_000_000
_CHOICES: Final = ("current", "incoming", "custom")


class _Default(enum.Enum):
    TOKEN = enum.auto()


_DEFAULT: Final = _Default.TOKEN


def make_conflict(
    current: Any = "current text",
    incoming: Any = "incoming text",
    *,
    op: Literal["set", "delete"] = "set",
    prop: str | _Default | None = _DEFAULT,
    base_value: Any = None,
    base: int | None = 1,
    current_seq: int | None = None,
    element_id: str = "clip-1",
    project_id: str = "p1",
    current_user: str | None = "alice",
    incoming_user: str | None = "bob",
    current_role: str | None = "editor",
    incoming_role: str | None = "editor",
    conflict_id: str | None = None,
    created_at: int = CREATED_AT,
    strategy: str = "",
) -> Conflict:
    """A pending :class:`~crealia.Conflict` shaped as the server detects it (docs/protocol.md §5).

    ``current`` is the value the document holds (written by ``current_user`` at
    ``current_seq``, by default ``base + 1``); ``incoming`` is the value of the change that
    collided with it (by ``incoming_user``), made on top of ``base`` where the property held
    ``base_value``. ``base=None`` means the base is unknown.

    For ``op="delete"`` (someone deleted an element that was changed since their base),
    ``prop`` is ``None``, ``current`` should be the element's props (a mapping) and
    ``incoming`` is ``None``. ``prop`` defaults to ``"label"`` for a ``set``.

    The roles become the conflict's ``roles`` (a role of ``None``, or an author of ``None``,
    leaves that author out: the server did not know it).

    Raises:
        ValueError: a ``delete`` conflict given a ``prop``.
    """
    if op == "delete":
        if prop is not _DEFAULT and prop is not None:
            raise ValueError("a delete conflict is about a whole element: prop must be None")
        prop = None
    elif prop is _DEFAULT:
        prop = "label"
    if current_seq is None:
        current_seq = (base or 0) + 1
    roles = {
        user: role
        for user, role in ((current_user, current_role), (incoming_user, incoming_role))
        if user is not None and role is not None
    }
    return Conflict(
        id=conflict_id or uuid.uuid4().hex[:16],
        project_id=project_id,
        element_id=element_id,
        prop=prop,
        op=op,
        base=base,
        base_value=copy.deepcopy(base_value),
        current={"value": copy.deepcopy(current), "user_id": current_user, "seq": current_seq},
        incoming={"value": copy.deepcopy(incoming), "user_id": incoming_user, "change_id": "c-in"},
        strategy=strategy,
        created_at=created_at,
        roles=roles,
    )


def make_context(
    conflict: Conflict,
    *,
    present: bool = False,
    roles: bool = True,
    options: Mapping[str, Any] | None = None,
    now: int | None = None,
    current: Participant | None = None,
    incoming: Participant | None = None,
) -> ResolutionContext:
    """The :class:`~crealia._strategy.ResolutionContext` the server would give a strategy.

    By default both authors have left the room (``present=False``); with ``present=True`` both
    are in it with the conflicted element active. With ``roles=True`` each participant's role
    is taken from ``conflict.roles``; with ``roles=False`` the participants carry none (the
    strategy may still look in ``conflict.roles``). ``current`` and ``incoming`` replace the
    participants outright; ``options`` are the strategy's options; ``now`` defaults to a
    moment after the conflict was detected.
    """

    def participant(side: Mapping[str, Any], at: int | None) -> Participant:
        user_id = side.get("user_id")
        return Participant(
            user_id=user_id,
            role=conflict.roles.get(str(user_id)) if roles and user_id is not None else None,
            active_element=conflict.element_id if present else None,
            present=present,
            at=at,
        )

    created = conflict.created_at or int(time.time() * 1000)
    return ResolutionContext(
        project_id=conflict.project_id,
        conflict=conflict,
        current=current or participant(conflict.current, created - 1_500),
        incoming=incoming or participant(conflict.incoming, created),
        now=created + 5 if now is None else now,
        options=dict(options or {}),
    )


@attrs.frozen
class _Case:
    name: str
    kwargs: dict[str, Any]


#: The conflicts every strategy is tried on: each kind of value a property can hold, the
#: conflicting delete, and the unknown base.
_CASES: Final = (
    _Case("text", {"current": "Opening", "incoming": "Intro shot", "base_value": "intro"}),
    _Case("text of equal length", {"current": "abc", "incoming": "xyz", "base_value": "abd"}),
    _Case("empty text", {"current": "", "incoming": "Title", "base_value": "T"}),
    _Case("unicode text", {"current": "café ☕", "incoming": "naïve 🎬 scène"}),
    _Case("integer", {"prop": "start", "current": 5, "incoming": 9, "base_value": 0}),
    _Case("float", {"prop": "gain", "current": 0.25, "incoming": -1.5, "base_value": 0.0}),
    _Case("boolean", {"prop": "muted", "current": True, "incoming": False, "base_value": False}),
    _Case("number against text", {"prop": "start", "current": 5, "incoming": "5"}),
    _Case(
        "object",
        {
            "prop": "transform",
            "current": {"x": 1, "y": 2},
            "incoming": {"x": 1, "y": 3},
            "base_value": {"x": 1, "y": 1},
        },
    ),
    _Case(
        "object with disjoint edits",
        {
            "prop": "style",
            "current": {"color": "red", "size": 1, "font": {"family": "serif"}},
            "incoming": {"color": "blue", "size": 2, "font": {"family": "serif"}},
            "base_value": {"color": "red", "size": 2, "font": {"family": "serif"}},
        },
    ),
    _Case(
        "list",
        {"prop": "tags", "current": ["a", "b"], "incoming": ["a", "c", 3], "base_value": ["a"]},
    ),
    _Case("None against a value", {"current": None, "incoming": "back", "base_value": "x"}),
    _Case("value against None", {"current": "kept", "incoming": None, "base_value": "x"}),
    _Case(
        "set on an element deleted since its base",
        {"current": None, "incoming": "edited", "base_value": "old"},
    ),
    _Case(
        "conflicting delete",
        {
            "op": "delete",
            "current": {"start": 5, "label": "intro", "tags": ["a"]},
            "incoming": None,
            "base_value": {"start": 0, "label": "intro", "tags": []},
        },
    ),
    _Case(
        "unknown base",
        {"base": None, "current_seq": 4, "current": "now", "incoming": "mine", "base_value": None},
    ),
)


@attrs.frozen
class _Variant:
    name: str
    conflict: dict[str, Any]
    context: dict[str, Any]


#: Who wrote each side, and what the server knows of them.
_VARIANTS: Final = (
    _Variant(
        "owner against editor, both present",
        {"current_role": "owner", "incoming_role": "editor"},
        {"present": True},
    ),
    _Variant(
        "editor against owner, both gone",
        {"current_role": "editor", "incoming_role": "owner"},
        {"present": False},
    ),
    _Variant(
        "equal roles, both present",
        {"current_role": "editor", "incoming_role": "editor"},
        {"present": True},
    ),
    _Variant(
        "no roles known, both gone",
        {"current_role": None, "incoming_role": None},
        {"present": False, "roles": False},
    ),
    _Variant(
        "unknown current author",
        {"current_user": None, "current_role": None, "incoming_role": "viewer"},
        {"present": False},
    ),
)


@attrs.define(eq=False)
class _Watch(trio.abc.Instrument):
    """Sees whether the watched task yielded to Trio, and which tasks it (transitively) spawned
    that are still running."""

    owner: trio.lowlevel.Task
    steps: int = 0
    family: set[trio.lowlevel.Task] = attrs.Factory(set)
    running: set[trio.lowlevel.Task] = attrs.Factory(set)

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        try:
            spawner = trio.lowlevel.current_task()
        except RuntimeError:  # spawned from outside any task
            return
        if spawner is self.owner or spawner in self.family:
            self.family.add(task)
            self.running.add(task)

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self.running.discard(task)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.owner:
            self.steps += 1


@contextmanager
def _watching() -> Iterator[_Watch]:
    watch = _Watch(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(watch)
    try:
        yield watch
    finally:
        trio.lowlevel.remove_instrument(watch)


def _leaks(watch: _Watch) -> str | None:
    if not watch.running:
        return None
    names = ", ".join(sorted(task.name for task in watch.running))
    return f"left {len(watch.running)} task(s) running after it returned: {names}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _changes(before: Any, after: Any) -> str:
    """Which fields of an attrs instance differ, as ``field: old -> new``; empty if none."""
    return "; ".join(
        f"{field.name}: {_short(getattr(before, field.name))} -> "
        f"{_short(getattr(after, field.name))}"
        for field in attrs.fields(type(before))
        if getattr(before, field.name) != getattr(after, field.name)
    )


def _answer_problems(answer: Any, conflict: Conflict) -> list[str]:
    """What is wrong with ``answer`` as an answer to ``conflict`` (as it was before the call)."""
    if answer is DECLINE or answer is DEFER:
        return []
    if not isinstance(answer, Resolution):
        return [f"answered {_short(answer)}: expected a Resolution, DECLINE or DEFER"]
    problems: list[str] = []
    if answer.choice not in _CHOICES:
        problems.append(f"choice {answer.choice!r} is not one of current, incoming, custom")
    sides = {"current": conflict.current.get("value"), "incoming": conflict.incoming.get("value")}
    for side, expected in sides.items():
        if answer.choice == side and answer.value != expected:
            problems.append(
                f"choice {side!r} with value {_short(answer.value)}, but the {side} value is "
                f"{_short(expected)} (use choice 'custom' for a value of your own)"
            )
    if (
        conflict.op == "delete"
        and answer.choice == "custom"
        and not (answer.value is None or isinstance(answer.value, Mapping))
    ):
        problems.append(
            f"a custom resolution of a delete conflict must be None (delete the element) or "
            f"an object of props, not {_short(answer.value)}"
        )
    confidence = answer.confidence
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, int | float)
        or not math.isfinite(confidence)
        or not 0.0 <= confidence <= 1.0
    ):
        problems.append(f"confidence {confidence!r} is not a number in 0..1")
    if not isinstance(answer.explanation, str) or not answer.explanation.strip():
        problems.append(f"explanation {answer.explanation!r} is empty: say why, for people")
    if not isinstance(answer.strategy, str):
        problems.append(f"strategy {answer.strategy!r} is not a name")
    try:
        encoded = orjson.dumps(answer.value)
    except orjson.JSONEncodeError as exc:
        problems.append(f"value {_short(answer.value)} cannot be encoded as JSON: {exc}")
    else:
        if orjson.loads(encoded) != answer.value:
            problems.append(
                f"value {_short(answer.value)} is not plain JSON data (it comes back from JSON "
                f"as {_short(orjson.loads(encoded))})"
            )
    return problems


async def _check_case(
    strategy: ConflictStrategy,
    conflict: Conflict,
    context: ResolutionContext,
    deadline: float,
) -> list[str]:
    before_conflict = copy.deepcopy(conflict)
    before_context = copy.deepcopy(context)
    started = trio.current_time()
    answer: Any = None
    with _watching() as watch, trio.move_on_after(deadline) as scope:
        try:
            answer = await strategy.resolve(conflict, context)
        except Exception as exc:  # the check reports it; the server would decline
            return [f"resolve() raised {type(exc).__name__}: {exc}"]
    if scope.cancelled_caught or scope.cancel_called or trio.current_time() - started > deadline:
        return [f"resolve() did not answer within the deadline of {deadline} s"]
    problems = _answer_problems(answer, before_conflict)
    if changed := _changes(before_conflict, conflict):
        problems.append(f"resolve() modified the conflict: {changed}")
    elif changed := _changes(before_context, context):
        problems.append(f"resolve() modified the context: {changed}")
    if leaked := _leaks(watch):
        problems.append(leaked)
    return problems


async def _check_cancellation(
    strategy: ConflictStrategy, conflict: Conflict, context: ResolutionContext
) -> list[str]:
    """Call ``resolve()`` already cancelled (a zero deadline). It may answer at once without
    yielding to Trio, or raise ``Cancelled`` from its first checkpoint; it must not carry on
    past a checkpoint, raise something else, or leave tasks behind."""
    before_conflict = copy.deepcopy(conflict)
    answer: Any = None
    returned = False
    with _watching() as watch, trio.CancelScope() as scope:
        scope.cancel()
        try:
            answer = await strategy.resolve(conflict, context)
            returned = True
        except Exception as exc:
            return [
                f"resolve() raised {type(exc).__name__}: {exc} when cancelled, instead "
                f"of letting trio.Cancelled through"
            ]
    problems: list[str] = []
    if returned:
        if watch.steps:
            problems.append(
                "resolve() returned normally after reaching a checkpoint under a cancelled "
                "scope: it swallowed trio.Cancelled (or shielded its work); let Cancelled "
                "propagate"
            )
        problems.extend(_answer_problems(answer, before_conflict))
    elif not scope.cancelled_caught:  # pragma: no cover - the scope was cancelled up front
        problems.append("resolve() neither returned nor raised Cancelled")
    if changed := _changes(before_conflict, conflict):
        problems.append(f"resolve() modified the conflict before it was cancelled: {changed}")
    if leaked := _leaks(watch):
        problems.append(leaked.replace("after it returned", "after it was cancelled"))
    return problems


async def check_strategy(
    strategy: ConflictStrategy,
    *,
    deadline: float = 3.0,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Check that ``strategy`` keeps the conflict strategy contract.

    It calls ``strategy.resolve()`` on representative conflicts — ``set`` conflicts over text,
    numbers, booleans, objects, lists and ``None``, a conflict between a value and a deleted
    element, a conflicting ``delete``, an unknown base — each with authors whose roles are
    known or not and who are still in the room or gone, under a deadline of ``deadline``
    seconds per call (``options`` become the context's options). Every answer must be a
    :class:`~crealia._strategy.Resolution`, ``DECLINE`` or ``DEFER``; a resolution must have a
    choice among ``current``, ``incoming`` and ``custom``, a value equal to the side it chose
    (for a delete conflict, a custom value of ``None`` or an object of props), a confidence in
    0..1, a non-empty explanation and a value that is plain JSON data. ``resolve()`` must not
    raise, modify the conflict or the context, or leave tasks running.

    Then it checks cancellation: called under an already-cancelled scope (a zero deadline),
    ``resolve()`` must either answer at once (without reaching a checkpoint) or let
    ``trio.Cancelled`` out of its first checkpoint, leaving no task behind.

    Run it in a Trio task (pytest-trio's trio mode, or ``trio.run``). It only checks the
    contract; what a strategy decides is for the strategy's own tests.

    Raises:
        AssertionError: the strategy broke the contract; the message lists each failing case
            and what was wrong.
    """
    label = strategy.name or type(strategy).__name__
    # (case, problem) -> the variants it happened in, so one fault reads as one line.
    found: dict[tuple[str, str], list[str]] = {}
    for case in _CASES:
        for variant in _VARIANTS:
            conflict = make_conflict(**{**case.kwargs, **variant.conflict})
            context = make_context(conflict, options=options, **variant.context)
            for problem in await _check_case(strategy, conflict, context, deadline):
                found.setdefault((case.name, problem), []).append(variant.name)
    for case in (_CASES[0], _CASES[-2]):
        conflict = make_conflict(**case.kwargs)
        context = make_context(conflict, options=options)
        for problem in await _check_cancellation(strategy, conflict, context):
            found.setdefault((case.name, problem), []).append("cancelled at once")
    failures = [
        f"case {case!r} ({variants[0]}"
        + (f" and {len(variants) - 1} more" if len(variants) > 1 else "")
        + f"): {problem}"
        for (case, problem), variants in found.items()
    ]
    if failures:
        shown = failures[:20]
        more = f"\n  ... and {len(failures) - len(shown)} more" if len(failures) > 20 else ""
        raise AssertionError(
            f"strategy {label!r} breaks the conflict strategy contract:\n  "
            + "\n  ".join(shown)
            + more
        )

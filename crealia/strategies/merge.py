"""``merge``: a three-way merge of both sides against the value they both started from.

The strategy settles a conflict only when both edits can be kept without guessing; anything else
is declined, so the next strategy of the chain decides. The merge itself is a set of pure
functions (:func:`merge_values` and the per-kind functions it uses); :class:`MergeStrategy` is a
thin wrapper that turns their result into a :class:`~crealia._strategy.Resolution`.

Rules, by the kind of the three values (``base`` is the conflict's ``base_value``; "equal" is
JSON equality: ``true`` is not ``1``, ``1`` is ``1.0``, key order does not matter):

- **Trivial.** Both sides equal: that value. One side equal to the base: the other side (it is
  the only change). These hold for every kind of value, ``null`` included.
- **Text** (three strings). A diff3 on tokens (runs of letters and digits, runs of whitespace,
  single punctuation marks; CJK ideographs and kana one by one): each side's edits against the
  base are found with a Myers diff, and both sets are applied when no two edits of different
  sides overlap or touch the same *word* (a run of tokens without whitespace, so ``video/mp4``
  is one word; each CJK character is a word). Two insertions at the same place conflict unless
  identical; an insertion at the edge of the other side's replaced range goes before or after
  it, except next to a deletion (words removed, none put in their place; only whitespace and
  punctuation between): that conflicts, as the insertion would be a fragment of what was
  deleted (``"Opening titles"`` emptied by one side, ``" red"`` appended by the other) or lose
  the words it went with; identical edits are applied once. Edits of one side separated only
  by whitespace and punctuation count as one edit (so an insertion between two words the other
  side rewrote together conflicts). The result is exact: base plus every edit of both sides,
  nothing else (and each side's edits are checked to reproduce that side before they are used).
- **Objects** (three dicts). Key by key: a key changed (added, removed, set) on one side only takes
  that side; the same change on both sides is kept once; a key changed differently on both sides
  is merged recursively when base and both sides are mergeable kinds of the same kind (text,
  object, list of items), otherwise the whole merge declines (so do "removed on one side, changed
  on the other" and "added on both sides with different values"). Keys keep current's order, then
  incoming's new keys in incoming's order.
- **Lists of items** (three lists whose items are all objects with a string or integer ``"id"``,
  unique within each list): item by item, by id, with the object rules (an item is a key).
  Order: the side that reordered the items common to all three lists gives the order (current
  when neither or both did the same; both reordering differently declines); the other side's new
  items go right after the nearest item before them on their side that the leading side also
  has (at the start when there is none), in their own order and before the leading side's items
  that follow that one.
- **Anything else** (numbers, booleans, ``null``, lists without ids, values of different kinds):
  only the trivial rules; two different changes decline.

Splitting (:func:`split_conflict`, the strategy's :meth:`MergeStrategy.split`): when a merge
declines only because some leaves collide (two different changes of a number, overlapping text
edits, a key or item removed on one side and changed on the other, a key added twice with
different values, two different reorders of a list of items) and something else merged, the
server merges the rest and hands each colliding leaf to the rest of the chain; the answers are
put back in place (an order's answer must be one side's order) and the explanation names the
leaves and what settled each. Limits passed still decline the whole conflict.

A conflicting ``delete`` (``op == "delete"``: the element's props against ``None``) is settled only
when the current props equal the props at the base (the later writes changed nothing): the delete
stands. A ``base_value`` of ``None`` is read as "unknown" (the history may not reach back that
far): then only identical sides are settled, unless the ``trust_null_base`` option says a
``None`` base is a real ``null``. Texts longer than ``max_text_chars`` (per conflict, all texts
together), nesting deeper than ``max_depth``, diffs costlier than ``max_diff_steps`` and diffs
still running after ``max_diff_ms`` milliseconds (checked inside the diff loop) decline. Every
limit has an upper bound (:data:`LIMIT_RANGES`) no project can raise. A merge with more than
:data:`THREAD_TEXT_CHARS` characters of text runs in a worker thread (one at a time in the
whole server), so the event loop keeps serving every other project while it runs; a title's merge
takes some microseconds and runs in the event loop.

Confidence: 1.0 for the trivial rules (nothing to reconcile); 0.95 for objects whose changed keys
are disjoint; 0.9 for lists of items; text merges start at 0.9 and lose 0.02 per edit beyond two,
0.1 for each neighbouring pair of edits of different sides with no unchanged word between them
and 0.05 for each such pair with one to three unchanged words between them, never going under
0.5. A nested
merge has the lowest confidence of its parts.
"""

from __future__ import annotations

import enum
import functools
import itertools
import math
import re
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias, TypeVar

import attrs
import trio

from .._model import Choice, Conflict, Resolution
from .._strategy import (
    DECLINE,
    MAX_PARTS,
    Answer,
    ConflictStrategy,
    Part,
    ResolutionContext,
    Split,
)

_T = TypeVar("_T")

__all__ = [
    "LIMIT_RANGES",
    "Edit",
    "Limits",
    "Merge",
    "MergeOutcome",
    "MergeStrategy",
    "is_id_list",
    "json_equal",
    "merge_conflict",
    "merge_id_lists",
    "merge_objects",
    "merge_text",
    "merge_values",
    "split_conflict",
    "tokenize",
]

#: The confidence of a merge where one side changed nothing (or both made the same change).
CONFIDENCE_TRIVIAL: Final = 1.0
#: Objects whose changed keys are disjoint.
CONFIDENCE_OBJECTS: Final = 0.95
#: Lists of items merged by id.
CONFIDENCE_ITEMS: Final = 0.9
#: The best a text merge gets; see the module documentation for what lowers it.
CONFIDENCE_TEXT: Final = 0.9
#: The least a text merge gets.
CONFIDENCE_TEXT_FLOOR: Final = 0.5

Side: TypeAlias = Literal["current", "incoming", "both"]
Outcome: TypeAlias = Literal["same", "current", "incoming", "merged"]


@attrs.frozen(kw_only=True)
class Limits:
    """Bounds that keep one merge cheap; past any of them the merge declines.

    Each has a range (:data:`LIMIT_RANGES`): the strategy refuses options outside it, so no
    project can buy itself an unbounded merge.
    """

    #: Characters of text diffed per merge, all texts together (the longest of the three
    #: versions of each text counts).
    max_text_chars: int = 100_000
    #: Nesting levels a merge descends into objects and lists.
    max_depth: int = 32
    #: Work units of the text diff (about one per compared token), all texts together.
    max_diff_steps: int = 100_000
    #: Wall-clock milliseconds one merge may spend diffing, checked inside the diff loop: the
    #: bound that holds whatever the machine's speed.
    max_diff_ms: int = 250


DEFAULT_LIMITS: Final = Limits()
#: The inclusive range each limit may be set to (by the operator or a project's owner).
LIMIT_RANGES: Final[Mapping[str, tuple[int, int]]] = {
    "max_text_chars": (1, 200_000),
    "max_depth": (1, 32),
    "max_diff_steps": (1, 1_000_000),
    "max_diff_ms": (1, 1000),
}


@attrs.frozen(kw_only=True)
class Edit:
    """One change found while merging, for the explanation.

    ``path`` locates it inside the merged value (``()`` is the value itself; an item of a list
    is ``"[<id>]"``); ``summary`` says what changed, without who (e.g. ``"changed 'quick' to
    'slow'"``).
    """

    side: Side
    path: tuple[str, ...]
    summary: str


@attrs.frozen(kw_only=True)
class Merge:
    """A successful merge.

    ``outcome`` is ``"same"`` (both sides equal), ``"current"`` / ``"incoming"`` (only that side
    changed the value, and it was taken) or ``"merged"`` (both changes combined). The value may
    share unchanged parts with the inputs: treat it as read-only.
    """

    value: Any
    outcome: Outcome
    confidence: float
    edits: tuple[Edit, ...] = ()


@attrs.frozen(kw_only=True)
class MergeOutcome:
    """What :func:`merge_conflict` settles a conflict with."""

    value: Any
    choice: Choice
    confidence: float
    explanation: str


class _Missing(enum.Enum):
    MISSING = "missing"


_MISSING: Final = _Missing.MISSING


class _Unmergeable(Exception):
    """Raised inside a merge to give up; public functions answer ``None`` instead."""


class _Collision(_Unmergeable):
    """Both sides changed one leaf in ways that do not merge (as opposed to a limit passed):
    a split (:func:`split_conflict`) hands such a leaf to the rest of the chain."""


#: The last path element naming the order of a list of items as a leaf.
ORDER: Final = "(order)"


@attrs.frozen(kw_only=True)
class Leaf:
    """A colliding leaf found by a split: where, its three values (``_MISSING``: absent on that
    side), and why it does not merge."""

    path: tuple[str, ...]
    base: Any
    current: Any
    incoming: Any
    reason: str


# -- equality and kinds ---------------------------------------------------------------------


def json_equal(a: Any, b: Any) -> bool:
    """Whether two JSON-like values are equal as JSON: ``True`` differs from ``1``, ``1`` equals
    ``1.0``, NaN equals NaN, dict key order does not matter, tuples compare like lists.

    Iterative, so any nesting depth is fine.
    """
    stack: list[tuple[Any, Any]] = [(a, b)]
    while stack:
        x, y = stack.pop()
        if x is y:
            continue
        if isinstance(x, bool) or isinstance(y, bool):
            if not (isinstance(x, bool) and isinstance(y, bool) and x == y):
                return False
        elif isinstance(x, int | float) and isinstance(y, int | float):
            if not (x == y or (_is_nan(x) and _is_nan(y))):
                return False
        elif isinstance(x, str) or isinstance(y, str):
            if not (isinstance(x, str) and isinstance(y, str) and x == y):
                return False
        elif isinstance(x, Mapping) and isinstance(y, Mapping):
            if len(x) != len(y):
                return False
            for key, value in x.items():
                if key not in y:
                    return False
                stack.append((value, y[key]))
        elif isinstance(x, list | tuple) and isinstance(y, list | tuple):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif x is None or y is None or type(x) is not type(y) or x != y:
            return False
    return True


def _is_nan(x: int | float) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _same(a: Any, b: Any) -> bool:
    if a is _MISSING or b is _MISSING:
        return a is b
    return json_equal(a, b)


def _item_id(item: Any) -> str | int | None:
    if not isinstance(item, Mapping):
        return None
    ident = item.get("id")
    if isinstance(ident, bool) or not isinstance(ident, str | int):
        return None
    return ident


def is_id_list(value: Any) -> bool:
    """Whether ``value`` is a list of items: objects that each have a string or integer
    ``"id"``, unique within the list (the empty list is one)."""
    if not isinstance(value, list | tuple):
        return False
    seen: set[str | int] = set()
    for item in value:
        ident = _item_id(item)
        if ident is None or ident in seen:
            return False
        seen.add(ident)
    return True


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, Mapping):
        return "object"
    if is_id_list(value):
        return "items"
    return "other"


# -- descriptions ---------------------------------------------------------------------------


def _clip(text: str, width: int = 30) -> str:
    text = " ".join(text.split()) if text.strip() else text
    return text if len(text) <= width else text[: width - 1] + "…"


def _short(value: Any) -> str:
    """A few words for a value, whatever its size."""
    if value is None or value is _MISSING:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _clip(repr(value), 20)
    if isinstance(value, str):
        return f"'{_clip(value)}'"
    if isinstance(value, Mapping):
        return "an object" if value else "an empty object"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    return "a value"


def _label(path: Sequence[str]) -> str:
    out = ""
    for part in path:
        out += part if part.startswith("[") or not out else f".{part}"
    return out


# -- text -----------------------------------------------------------------------------------

_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN: Final = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|\s+|[^\w\s]")
_WORD: Final = re.compile(r"\w")
_CJK_CHAR: Final = re.compile(rf"[{_CJK}]")


def tokenize(text: str) -> list[str]:
    """Split text into merge tokens; ``"".join(tokenize(t)) == t`` always."""
    return _TOKEN.findall(text)


def _is_word(token: str) -> bool:
    """Letters or digits, or a symbol such as an emoji (``✨`` says something a space does
    not)."""
    return _WORD.match(token) is not None or unicodedata.category(token[0]) == "So"


@attrs.frozen
class _Hunk:
    start: int  # base tokens [start, end) are replaced by ``tokens``
    end: int
    tokens: tuple[str, ...]
    side: Side


# -- the merger -----------------------------------------------------------------------------


class _Merger:
    """One merge's state: the budget left and what was found. Raises :class:`_Unmergeable`."""

    def __init__(
        self,
        limits: Limits,
        *,
        leaves: list[Leaf] | None = None,
        decided: Sequence[tuple[tuple[str, ...], Choice, Any]] | None = None,
    ) -> None:
        self.limits = limits
        self.chars_left = limits.max_text_chars
        self.steps_left = limits.max_diff_steps
        self.deadline = time.perf_counter() + limits.max_diff_ms / 1000
        self.confidence = CONFIDENCE_TRIVIAL
        self.edits: list[Edit] = []
        #: Splitting: colliding leaves are collected here (and current's value stands in).
        self.leaves = leaves
        #: Joining: each colliding leaf's path and answer, in the order they collide (paths
        #: alone can be ambiguous: ids 1 and "1" both read "[1]").
        self.decided = decided
        self._next = 0

    def collide(
        self, path: tuple[str, ...], base: Any, current: Any, incoming: Any, reason: str
    ) -> Any:
        """Both sides changed the leaf at ``path`` in ways that do not merge: give up, or
        (splitting) note it and go on with current's value, or (joining) take its answer."""
        if self.decided is not None:
            if self._next >= len(self.decided) or self.decided[self._next][0] != path:
                raise _Unmergeable(f"no answer for {_label(path) or 'the value'}")
            _path, choice, value = self.decided[self._next]
            self._next += 1
            if choice == "current":
                return current
            if choice == "incoming":
                return incoming
            return _custom_leaf(path, current, incoming, value)
        if self.leaves is None:
            raise _Collision(reason)
        self.leaves.append(
            Leaf(path=path, base=base, current=current, incoming=incoming, reason=reason)
        )
        return current

    def lower(self, confidence: float) -> None:
        self.confidence = min(self.confidence, confidence)

    def run(self, base: Any, current: Any, incoming: Any) -> Merge | None:
        if _same(current, incoming):
            return Merge(value=current, outcome="same", confidence=CONFIDENCE_TRIVIAL)
        if _same(current, base):
            return Merge(value=incoming, outcome="incoming", confidence=CONFIDENCE_TRIVIAL)
        if _same(incoming, base):
            return Merge(value=current, outcome="current", confidence=CONFIDENCE_TRIVIAL)
        try:
            value = self.merge(base, current, incoming, ())
        except (_Unmergeable, RecursionError):
            return None
        return Merge(
            value=value, outcome="merged", confidence=self.confidence, edits=tuple(self.edits)
        )

    # Both sides differ from the base and from each other here.
    def merge(self, base: Any, current: Any, incoming: Any, path: tuple[str, ...]) -> Any:
        if len(path) > self.limits.max_depth:
            raise _Unmergeable("too deep")
        kind = _kind(base)
        if kind == "other" or _kind(current) != kind or _kind(incoming) != kind:
            return self.collide(path, base, current, incoming,
                                "both sides changed a value that cannot be merged")  # fmt: skip
        if kind == "text":
            edits, confidence = len(self.edits), self.confidence
            try:
                return self.text(base, current, incoming, path)
            except _Collision as exc:
                del self.edits[edits:]
                self.confidence = confidence
                return self.collide(path, base, current, incoming, str(exc))
        if kind == "object":
            return self.objects(base, current, incoming, path)
        return self.items(base, current, incoming, path)

    def pick(self, base: Any, current: Any, incoming: Any, path: tuple[str, ...], what: str) -> Any:
        """The three-way rule for one key or item; ``_MISSING`` means "absent"."""
        if _same(current, incoming):
            if not _same(current, base):
                self.edits.append(
                    Edit(side="both", path=path, summary=self.change(base, current, path, what))
                )
            return current
        if _same(current, base):
            self.edits.append(
                Edit(side="incoming", path=path, summary=self.change(base, incoming, path, what))
            )
            return incoming
        if _same(incoming, base):
            self.edits.append(
                Edit(side="current", path=path, summary=self.change(base, current, path, what))
            )
            return current
        if base is _MISSING:
            added = f"both sides added {_label(path)} with different values"
            return self.collide(path, base, current, incoming, added)
        if current is _MISSING or incoming is _MISSING:
            return self.collide(
                path, base, current, incoming,
                f"{_label(path)} was removed on one side and changed on the other",
            )  # fmt: skip
        return self.merge(base, current, incoming, path)

    @staticmethod
    def change(before: Any, after: Any, path: tuple[str, ...], what: str) -> str:
        if what == "item":
            name = path[-1][1:-1]
            where = f" in '{_label(path[:-1])}'" if len(path) > 1 else ""
            if before is _MISSING:
                return f"added item '{_clip(name, 20)}'{where}"
            if after is _MISSING:
                return f"removed item '{_clip(name, 20)}'{where}"
            return f"changed item '{_clip(name, 20)}'{where}"
        label = _clip(_label(path), 40)
        if after is _MISSING:
            return f"removed '{label}'"
        if before is _MISSING:
            return f"added '{label}' ({_short(after)})"
        return f"set '{label}' to {_short(after)}"

    # -- objects --

    def objects(
        self,
        base: Mapping[str, Any],
        current: Mapping[str, Any],
        incoming: Mapping[str, Any],
        path: tuple[str, ...],
    ) -> dict[str, Any]:
        keys = list(current)
        keys += [k for k in incoming if k not in current]
        keys += [k for k in base if k not in current and k not in incoming]
        out: dict[str, Any] = {}
        for key in keys:
            value = self.pick(
                base.get(key, _MISSING),
                current.get(key, _MISSING),
                incoming.get(key, _MISSING),
                (*path, str(key)),
                "key",
            )
            if value is not _MISSING:
                out[key] = value
        self.lower(CONFIDENCE_OBJECTS)
        return out

    # -- lists of items --

    def items(
        self,
        base: Sequence[Mapping[str, Any]],
        current: Sequence[Mapping[str, Any]],
        incoming: Sequence[Mapping[str, Any]],
        path: tuple[str, ...],
    ) -> list[Any]:
        by_base = {_item_id(item): item for item in base}
        by_current = {_item_id(item): item for item in current}
        by_incoming = {_item_id(item): item for item in incoming}
        merged: dict[str | int | None, Any] = {}
        for ident in [*by_current, *by_incoming, *by_base]:
            if ident in merged:
                continue
            value = self.pick(
                by_base.get(ident, _MISSING),
                by_current.get(ident, _MISSING),
                by_incoming.get(ident, _MISSING),
                (*path, f"[{ident}]"),
                "item",
            )
            merged[ident] = value
        kept = {ident for ident, value in merged.items() if value is not _MISSING}

        # Which side's order leads: the one that moved the items all three share.
        common = kept & by_base.keys() & by_current.keys() & by_incoming.keys()
        order_base = [i for i in by_base if i in common]
        order_current = [i for i in by_current if i in common]
        order_incoming = [i for i in by_incoming if i in common]
        lead, follow = by_current, by_incoming
        where = f"'{_label(path)}'" if path else "the items"
        if order_current != order_base and order_incoming not in (order_base, order_current):
            order = self.collide((*path, ORDER), order_base, order_current, order_incoming,
                                 f"both sides reordered {where} differently")  # fmt: skip
            if order == order_incoming:
                lead, follow = by_incoming, by_current
            elif order != order_current:
                raise _Unmergeable(f"an order of {where} that is neither side's")
        elif order_current == order_base and order_incoming != order_base:
            lead, follow = by_incoming, by_current
            self.edits.append(Edit(side="incoming", path=path, summary=f"reordered {where}"))
        elif order_current != order_base:
            self.edits.append(
                Edit(
                    side="both" if order_incoming == order_current else "current",
                    path=path,
                    summary=f"reordered {where}",
                )
            )

        # A new item of the following side goes right after its predecessor there (None: the
        # start), before the leading side's own items that follow that predecessor.
        after: dict[str | int | None, list[str | int | None]] = {}
        anchor: str | int | None = None
        for ident in follow:
            if ident not in kept:
                continue
            if ident not in lead:
                after.setdefault(anchor, []).append(ident)
            else:
                anchor = ident
        order = after.get(None, [])
        for ident in lead:
            if ident in kept:
                order.append(ident)
                order.extend(after.get(ident, ()))
        self.lower(CONFIDENCE_ITEMS)
        return [merged[ident] for ident in order]

    # -- text --

    def text(self, base: str, current: str, incoming: str, path: tuple[str, ...]) -> str:
        size = max(len(base), len(current), len(incoming))
        if size > self.chars_left:
            raise _Unmergeable("text too long to merge")
        if time.perf_counter() > self.deadline:
            raise _Unmergeable("the merge took longer than its time budget")
        self.chars_left -= size
        base_tokens, current_tokens, incoming_tokens = (
            tokenize(base),
            tokenize(current),
            tokenize(incoming),
        )
        # One character per distinct token, so runs of equal tokens compare in C.
        distinct = dict.fromkeys([*base_tokens, *current_tokens, *incoming_tokens])
        codes = {token: chr(i) for i, token in enumerate(distinct)}
        base_code = "".join(map(codes.__getitem__, base_tokens))
        hunks = self.hunks(base_tokens, base_code, current_tokens, codes, "current")
        hunks += self.hunks(base_tokens, base_code, incoming_tokens, codes, "incoming")
        # Insertions sort before a range starting at the same token.
        hunks.sort(key=lambda h: (h.start, h.end))
        combined: list[_Hunk] = []
        for hunk in hunks:
            if combined:
                prev = combined[-1]
                if (prev.start, prev.end, prev.tokens) == (hunk.start, hunk.end, hunk.tokens):
                    combined[-1] = attrs.evolve(prev, side="both")
                    continue
                overlap = hunk.start < prev.end
                same_insertion = prev.start == prev.end == hunk.start == hunk.end
                if overlap or same_insertion:
                    raise _Collision("both sides edited the same words")
            combined.append(hunk)
        # An insertion next to the other side's deletion (nothing but spaces and punctuation
        # between) is a conflict: kept, it would be a fragment ("Opening titles" deleted,
        # " red" appended: " red") or land where its context was deleted.
        for prev, hunk in itertools.pairwise(combined):
            if "both" in (prev.side, hunk.side) or prev.side == hunk.side:
                continue
            for deleted, inserted in ((prev, hunk), (hunk, prev)):
                if _deletes(base_tokens, deleted) and _inserts(inserted):
                    # Where the deletion could equally be ("the valley before" deleted from
                    # "the valley before the storm" may show as "valley before the").
                    low, high = _deletion_extent(base_tokens, deleted)
                    if inserted.start <= low:
                        gap = base_tokens[inserted.start : low]
                    else:
                        gap = base_tokens[high : max(high, inserted.start)]
                    if not any(_is_word(t) for t in gap):
                        raise _Collision("an insertion touches the other side's deletion")
        # Edits of different sides must not touch the same word ("video/mp4" is one word).
        words = _words(base_tokens)
        touched: dict[int, Side] = {}
        for hunk in combined:
            if hunk.side == "both":
                continue
            for word in _touched(base_tokens, words, hunk):
                if touched.setdefault(word, hunk.side) != hunk.side:
                    raise _Collision("both sides edited the same word")

        out = _apply(base_tokens, combined)
        penalty = 0.02 * max(0, len(combined) - 2)
        for prev, hunk in itertools.pairwise(combined):
            if "both" in (prev.side, hunk.side) or prev.side == hunk.side:
                continue
            between = {words[i] for i in range(prev.end, hunk.start) if words[i] >= 0}
            between -= _touched(base_tokens, words, prev) | _touched(base_tokens, words, hunk)
            penalty += 0.1 if not between else 0.05 if len(between) <= 3 else 0.0
        self.lower(max(CONFIDENCE_TEXT_FLOOR, CONFIDENCE_TEXT - penalty))

        where = f" in '{_clip(_label(path), 40)}'" if path else ""
        for hunk in combined:
            old = "".join(base_tokens[hunk.start : hunk.end])
            new = "".join(hunk.tokens)
            if old.strip() and new.strip():
                summary = f"changed '{_clip(old)}' to '{_clip(new)}'"
            elif new.strip():
                summary = f"added '{_clip(new)}'"
            elif old.strip():
                summary = f"removed '{_clip(old)}'"
            else:
                summary = "changed spacing"
            self.edits.append(Edit(side=hunk.side, path=path, summary=summary + where))
        return "".join(out)

    def hunks(
        self, base: list[str], a: str, other: list[str], codes: Mapping[str, str], side: Side
    ) -> list[_Hunk]:
        """The edits turning ``base`` (encoded as ``a`` by ``codes``) into ``other``."""
        b = "".join(map(codes.__getitem__, other))
        n, m = len(a), len(b)
        head = _common_prefix(a, b, 0, 0)
        tail = min(_common_prefix(a[::-1], b[::-1], 0, 0), min(n, m) - head)
        matches = self.myers(a[head : n - tail], b[head : m - tail])
        raw: list[_Hunk] = []
        x0 = y0 = 0
        for x, y, length in [*matches, (n - head - tail, m - head - tail, 0)]:
            if x > x0 or y > y0:
                raw.append(_Hunk(head + x0, head + x, tuple(other[head + y0 : head + y]), side))
            x0, y0 = x + length, y + length
        # Edits separated only by whitespace and punctuation are one edit.
        hunks: list[_Hunk] = []
        for hunk in raw:
            if hunks:
                prev = hunks[-1]
                gap = base[prev.end : hunk.start]
                if len(gap) <= 3 and not any(_is_word(t) for t in gap):
                    tokens = (*prev.tokens, *gap, *hunk.tokens)
                    hunks[-1] = _Hunk(prev.start, hunk.end, tokens, side)
                    continue
            hunks.append(hunk)
        if _apply(base, hunks) != other:  # never expected; a wrong merge is worse than none
            raise _Unmergeable("the diff did not reproduce the text")
        return hunks

    def myers(self, a: str, b: str) -> list[tuple[int, int, int]]:
        """Matching runs ``(a_index, b_index, length)`` of a shortest edit script (Myers 1986),
        in order; spends ``steps_left`` (one per diagonal visited, one per 64 matched)."""
        n, m = len(a), len(b)
        if n == 0 or m == 0:
            return []
        offset = n + m + 1
        v = [0] * (2 * offset + 1)
        trace: list[list[int]] = []
        steps = self.steps_left
        for d in range(n + m + 1):
            for k in range(-d, d + 1, 2):
                if k == -d or (k != d and v[offset + k - 1] < v[offset + k + 1]):
                    x = v[offset + k + 1]
                else:
                    x = v[offset + k - 1] + 1
                y = x - k
                if x < n and y < m and a[x] == b[y]:
                    run = _common_prefix(a, b, x, y)
                    x += run
                    y += run
                    steps -= run >> 6
                v[offset + k] = x
                if x >= n and y >= m:
                    self.steps_left = steps
                    return _backtrack(trace, n, m, d)
            steps -= d + 1
            if steps < 0:
                raise _Unmergeable("the texts differ too much to merge")
            # Each round costs d + 1 steps: checking the clock every round costs nothing.
            if time.perf_counter() > self.deadline:
                raise _Unmergeable("the diff took longer than its time budget")
            trace.append(v[offset - d : offset + d + 1])
        raise AssertionError("unreachable: a script of n + m steps always exists")


def _common_prefix(a: str, b: str, x: int, y: int) -> int:
    """The length of the common prefix of ``a[x:]`` and ``b[y:]`` (galloping, then bisecting,
    so the comparing happens in C)."""
    limit = min(len(a) - x, len(b) - y)
    lo, hi = 0, 1
    while hi <= limit and a[x : x + hi] == b[y : y + hi]:
        lo, hi = hi, hi * 2
    if hi > limit:
        if a[x : x + limit] == b[y : y + limit]:
            return limit
        hi = limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[x : x + mid] == b[y : y + mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _backtrack(trace: list[list[int]], n: int, m: int, depth: int) -> list[tuple[int, int, int]]:
    """The matching runs of the path Myers' forward pass found, from its saved diagonals."""
    matches: list[tuple[int, int, int]] = []
    x, y = n, m
    for d in range(depth, 0, -1):
        prev = trace[d - 1]  # the furthest x of each diagonal k after step d - 1, at k + d - 1
        k = x - y
        if k == -d or (k != d and prev[k - 1 + d - 1] < prev[k + 1 + d - 1]):
            prev_k = k + 1  # came down: an insertion
            prev_x = prev[prev_k + d - 1]
            start_x, start_y = prev_x, prev_x - prev_k + 1
        else:
            prev_k = k - 1  # came right: a deletion
            prev_x = prev[prev_k + d - 1]
            start_x, start_y = prev_x + 1, prev_x - prev_k
        if x > start_x:
            matches.append((start_x, start_y, x - start_x))
        x, y = prev_x, prev_x - prev_k
    if x > 0:
        matches.append((0, 0, x))
    matches.reverse()
    return matches


def _joins(left: str, right: str) -> bool:
    """Whether two adjacent tokens belong to one word: neither is whitespace nor CJK."""
    return not (
        left.isspace() or right.isspace() or _CJK_CHAR.match(left) or _CJK_CHAR.match(right)
    )


def _words(tokens: Sequence[str]) -> list[int]:
    """The word index of each token (-1 for whitespace). A word is a run of tokens without
    whitespace; each CJK character is a word of its own."""
    out: list[int] = []
    word = -1
    prev = " "
    for token in tokens:
        if token.isspace():
            out.append(-1)
        else:
            if not _joins(prev, token):
                word += 1
            out.append(word)
        prev = token
    return out


def _touched(tokens: Sequence[str], words: Sequence[int], hunk: _Hunk) -> set[int]:
    """The base words an edit changes: those it replaces, and a neighbour it joins onto."""
    out = {words[i] for i in range(hunk.start, hunk.end) if words[i] >= 0}
    left = tokens[hunk.start - 1] if hunk.start > 0 else None
    right = tokens[hunk.end] if hunk.end < len(tokens) else None
    first = hunk.tokens[0] if hunk.tokens else right
    last = hunk.tokens[-1] if hunk.tokens else left
    if left is not None and first is not None and _joins(left, first):
        out.add(words[hunk.start - 1])
    if right is not None and last is not None and _joins(last, right):
        out.add(words[hunk.end])
    return out


def _deletes(base: Sequence[str], hunk: _Hunk) -> bool:
    """Whether ``hunk`` removes words and puts none in their place."""
    removed = any(_is_word(t) for t in base[hunk.start : hunk.end])
    return removed and not any(_is_word(t) for t in hunk.tokens)


def _deletion_extent(base: Sequence[str], hunk: _Hunk) -> tuple[int, int]:
    """The span of base tokens a deletion could be slid over and delete the same text (a run
    deleted next to an equal token can move by one, as diff chooses): the lowest start and the
    highest end. A replacement stays where it is."""
    start, end = hunk.start, hunk.end
    if hunk.tokens or start == end:
        return start, end
    low_start, low_end = start, end
    while low_start > 0 and base[low_start - 1] == base[low_end - 1]:
        low_start, low_end = low_start - 1, low_end - 1
    high_start, high_end = start, end
    while high_end < len(base) and base[high_start] == base[high_end]:
        high_start, high_end = high_start + 1, high_end + 1
    return low_start, high_end


def _inserts(hunk: _Hunk) -> bool:
    """Whether ``hunk`` adds words without replacing anything."""
    return hunk.start == hunk.end and any(_is_word(t) for t in hunk.tokens)


def _apply(base: Sequence[str], hunks: Sequence[_Hunk]) -> list[str]:
    out: list[str] = []
    position = 0
    for hunk in hunks:
        out.extend(base[position : hunk.start])
        out.extend(hunk.tokens)
        position = hunk.end
    out.extend(base[position:])
    return out


# -- public functions -----------------------------------------------------------------------


def merge_values(
    base: Any, current: Any, incoming: Any, *, limits: Limits = DEFAULT_LIMITS
) -> Merge | None:
    """Three-way merge of any JSON-like values by the rules of the module documentation.

    Returns ``None`` when the sides cannot be merged cleanly. ``None`` values are JSON ``null``
    here (the strategy decides what an unknown base means). Never raises on JSON-like input.
    """
    return _Merger(limits).run(base, current, incoming)


def merge_text(
    base: str, current: str, incoming: str, *, limits: Limits = DEFAULT_LIMITS
) -> Merge | None:
    """Three-way merge of three texts (token diff3); ``None`` when edits overlap or a limit is
    passed."""
    return merge_values(base, current, incoming, limits=limits)


def merge_objects(
    base: Mapping[str, Any],
    current: Mapping[str, Any],
    incoming: Mapping[str, Any],
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> Merge | None:
    """Three-way merge of three objects, key by key and recursively; ``None`` when some key
    cannot be merged."""
    return merge_values(base, current, incoming, limits=limits)


def merge_id_lists(
    base: Sequence[Mapping[str, Any]],
    current: Sequence[Mapping[str, Any]],
    incoming: Sequence[Mapping[str, Any]],
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> Merge | None:
    """Three-way merge of three lists of items (see :func:`is_id_list`), by id; ``None`` when
    some item cannot be merged or both sides reordered differently."""
    return merge_values(base, current, incoming, limits=limits)


def _explain(merge: Merge, what: str, current_user: str, incoming_user: str) -> str:
    if merge.outcome == "same":
        return (
            f"{current_user} and {incoming_user} both set {what} to {_short(merge.value)}; "
            "nothing to merge."
        )
    if merge.outcome == "incoming":
        return (
            f"{current_user}'s write left {what} as it was at {incoming_user}'s base, so "
            f"{incoming_user}'s change stands ({_short(merge.value)})."
        )
    if merge.outcome == "current":
        return (
            f"{incoming_user}'s change left {what} as it was at its base, so "
            f"{current_user}'s value stays ({_short(merge.value)})."
        )
    parts = []
    for side, who in (
        ("current", current_user),
        ("incoming", incoming_user),
        ("both", f"{current_user} and {incoming_user} both"),
    ):
        summaries = [edit.summary for edit in merge.edits if edit.side == side]
        if not summaries:
            continue
        shown = summaries[:3]
        if len(summaries) > 3:
            shown.append(f"{len(summaries) - 3} more change{'s' if len(summaries) > 4 else ''}")
        listed = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]
        parts.append(f"{who} {listed}")
    return f"Merged both edits of {what}: " + "; ".join(parts) + "."


def _capitalized(text: str) -> str:
    # User ids keep their case; only the stand-in for an unknown author starts a sentence.
    return "S" + text[1:] if text.startswith("someone") else text


def merge_conflict(
    conflict: Conflict, *, limits: Limits = DEFAULT_LIMITS, trust_null_base: bool = False
) -> MergeOutcome | None:
    """Settle ``conflict`` by a three-way merge, or ``None`` (decline).

    ``trust_null_base`` reads a ``None`` ``base_value`` as JSON ``null`` rather than "unknown".
    Never raises on a well-formed conflict with JSON-like values.
    """
    current = conflict.current.get("value")
    incoming = conflict.incoming.get("value")
    base = conflict.base_value
    current_user = str(conflict.current.get("user_id") or "someone")
    incoming_user = str(conflict.incoming.get("user_id") or "someone else")

    if conflict.op == "delete":
        # The element's props against a delete: only when the later writes changed nothing.
        if incoming is None and isinstance(base, Mapping) and json_equal(current, base):
            return MergeOutcome(
                value=None,
                choice="incoming",
                confidence=CONFIDENCE_TRIVIAL,
                explanation=_capitalized(
                    f"{current_user}'s later writes left '{_clip(conflict.element_id, 40)}' as "
                    f"it was when {incoming_user} deleted it, so the delete stands."
                ),
            )
        return None

    if base is None and not trust_null_base and not json_equal(current, incoming):
        return None  # an unknown base: nothing tells which side changed what
    merge = merge_values(base, current, incoming, limits=limits)
    if merge is None:
        return None
    value = merge.value
    if json_equal(value, current):
        choice: Choice = "current"
        value = current
    elif json_equal(value, incoming):
        choice = "incoming"
        value = incoming
    else:
        choice = "custom"
    what = f"'{_clip(conflict.prop, 40)}'" if conflict.prop else "the element"
    return MergeOutcome(
        value=value,
        choice=choice,
        confidence=merge.confidence,
        explanation=_capitalized(_explain(merge, what, current_user, incoming_user)),
    )


# -- splitting: merge what merges, hand the colliding leaves on -----------------------------

#: Longest explanation of one part kept in the joined explanation, in characters.
PART_EXPLANATION_CHARS: Final = 200


def _custom_leaf(path: tuple[str, ...], current: Any, incoming: Any, value: Any) -> Any:
    """A custom answer for a colliding leaf, as it goes back in place: ``null`` for a leaf one
    side removed is its removal; an item stays an object with its id (or the whole join is
    given up: the list would no longer be a list of items)."""
    removed = current is _MISSING or incoming is _MISSING
    if value is None and removed:
        return _MISSING
    if path and path[-1].startswith("[") and path[-1] != ORDER:
        present = incoming if current is _MISSING else current
        ident = _item_id(present)
        if (
            not isinstance(value, Mapping)
            or _item_id(value) != ident
            or (type(_item_id(value)) is not type(ident))
        ):
            raise _Unmergeable(f"a custom {_label(path)} that is not that item")
    return value


def _part_label(prop: str | None, path: tuple[str, ...]) -> str:
    order = bool(path) and path[-1] == ORDER
    parts = [p for p in (prop, *(path[:-1] if order else path)) if p]
    label = _label(parts)
    if order:
        return f"{label} (order)" if label else "the order"
    return label or "the value"


def _present(value: Any) -> Any:
    return None if value is _MISSING else value


@attrs.frozen(kw_only=True)
class _MergeSplit(Split):
    conflict: Conflict
    limits: Limits
    leaves: tuple[Leaf, ...]
    parts: tuple[Part, ...]

    def join(self, answers: tuple[Resolution, ...]) -> Resolution | None:
        if len(answers) != len(self.parts):
            return None
        decided = [(leaf.path, answer.choice, answer.value)
                   for leaf, answer in zip(self.leaves, answers, strict=True)]  # fmt: skip
        conflict = self.conflict
        current, incoming = conflict.current.get("value"), conflict.incoming.get("value")
        merger = _Merger(self.limits, decided=decided)
        try:
            value = merger.merge(conflict.base_value, current, incoming, ())
        except (_Unmergeable, RecursionError):
            return None
        if merger._next != len(decided):
            return None
        choice: Choice = "custom"
        if json_equal(value, current):
            choice, value = "current", current
        elif json_equal(value, incoming):
            choice, value = "incoming", incoming
        current_user = str(conflict.current.get("user_id") or "someone")
        incoming_user = str(conflict.incoming.get("user_id") or "someone else")
        what = f"'{_clip(conflict.prop, 40)}'" if conflict.prop else "the element"
        merged = Merge(value=value, outcome="merged", confidence=merger.confidence,
                       edits=tuple(merger.edits))  # fmt: skip
        apart = "; ".join(
            f"'{_clip(part.label, 40)}' by {answer.strategy}: "
            f"{_clip(answer.explanation.rstrip('.'), PART_EXPLANATION_CHARS)}"
            for part, answer in zip(self.parts, answers, strict=True)
        )
        explanation = _capitalized(_explain(merged, what, current_user, incoming_user))
        explanation = explanation.replace(
            "Merged both edits of", "Merged the edits that do not collide of", 1
        )
        return Resolution(
            value=value,
            choice=choice,
            strategy=MergeStrategy.name,
            confidence=min([merger.confidence, *(answer.confidence for answer in answers)]),
            explanation=f"{explanation} Settled apart: {apart}.",
        )


def split_conflict(
    conflict: Conflict, *, limits: Limits = DEFAULT_LIMITS, trust_null_base: bool = False
) -> Split | None:
    """``conflict`` taken apart: everything that merges merged, and each leaf both sides
    changed in ways that do not merge (two numbers, overlapping text edits, a key removed on one
    side and changed on the other, two reorders of a list of items) a :class:`Part` for the
    rest of the chain. ``None`` when there is nothing to gain: a delete conflict, an unknown
    base, a limit passed, nothing colliding, or nothing merging besides the collisions.
    """
    if conflict.op != "set":
        return None
    base = conflict.base_value
    current = conflict.current.get("value")
    incoming = conflict.incoming.get("value")
    if base is None and not trust_null_base:
        return None
    leaves: list[Leaf] = []
    merger = _Merger(limits, leaves=leaves)
    try:
        merger.merge(base, current, incoming, ())
    except (_Unmergeable, RecursionError):
        return None
    if not leaves or not merger.edits or len(leaves) > MAX_PARTS:
        return None
    parts = []
    for leaf in leaves:
        label = _part_label(conflict.prop, leaf.path)
        narrowed = attrs.evolve(
            conflict,
            prop=label,
            base_value=_present(leaf.base),
            current={**conflict.current, "value": _present(leaf.current)},
            incoming={**conflict.incoming, "value": _present(leaf.incoming)},
        )
        parts.append(Part(label=label, conflict=narrowed))
    return _MergeSplit(conflict=conflict, limits=limits, leaves=tuple(leaves),
                       parts=tuple(parts))  # fmt: skip


# -- the strategy ---------------------------------------------------------------------------


def _parse_options(options: Mapping[str, Any], limits: Limits, trust: bool) -> tuple[Limits, bool]:
    unknown = sorted(set(options) - {*LIMIT_RANGES, "trust_null_base"})
    if unknown:
        known = ", ".join([*LIMIT_RANGES, "trust_null_base"])
        raise ValueError(f"unknown options {unknown} (known: {known})")
    changes: dict[str, int] = {}
    for key, (low, high) in LIMIT_RANGES.items():
        if key in options:
            value = options[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(
                    f"option {key} must be an integer in {low}..{high}, got {_clip(repr(value))}"
                )
            changes[key] = value
    if "trust_null_base" in options:
        trust = options["trust_null_base"]
        if not isinstance(trust, bool):
            raise ValueError(f"option trust_null_base must be true or false, got {trust!r}")
    return attrs.evolve(limits, **changes), trust


#: Conflicts with at least this many characters of text are merged in a worker thread.
THREAD_TEXT_CHARS: Final = 2_000


def _text_chars(value: Any, budget: int) -> int:
    """Characters of text in ``value``, counting at most to ``budget`` (cheap on big values)."""
    total = 0
    stack = [value]
    while stack and total < budget:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return total


#: Merge threads of the whole server (of this Trio run): one at a time. Threads share the GIL, so
#: more of them merge no faster, they only take more turns from the event loop: six projects
#: merging at once, each in its own thread, put another project's ping p99 at ~300 ms.
_MERGE_THREADS: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("merge_threads")


def _merge_threads() -> trio.CapacityLimiter:
    try:
        return _MERGE_THREADS.get()
    except LookupError:
        limiter = trio.CapacityLimiter(1)
        _MERGE_THREADS.set(limiter)
        return limiter


async def _run_merge(conflict: Conflict, limits: Limits, trust: bool) -> MergeOutcome | None:
    """:func:`merge_conflict`, in a worker thread when the texts are large enough to matter
    (:func:`_cheap_or_threaded`)."""
    return await _cheap_or_threaded(merge_conflict, conflict, limits, trust)


async def _cheap_or_threaded(
    function: Callable[..., _T], conflict: Conflict, limits: Limits, trust: bool
) -> _T:
    """``function(conflict, limits=…, trust_null_base=…)`` (a merge or a split), in a worker
    thread when the texts are large enough to matter.

    Measured (benchmarks/strategy_stall.py): another project's ping p99 during worst-case merges
    is ~30 ms this way against ~380 ms in the event loop (the GIL is handed back every
    switch interval). The thread cannot be cancelled, but ``limits.max_diff_ms`` ends it soon:
    cancellation waits for it rather than leaving it behind. One merge thread runs at a time in
    the whole server (:data:`_MERGE_THREADS`); the others queue, each under its strategy's
    timeout. Small merges (a title) stay in the event loop, where they cost microseconds.
    """
    sides = (conflict.base_value, conflict.current.get("value"), conflict.incoming.get("value"))
    if _text_chars(sides, THREAD_TEXT_CHARS) < THREAD_TEXT_CHARS:
        return function(conflict, limits=limits, trust_null_base=trust)
    return await trio.to_thread.run_sync(
        functools.partial(function, conflict, limits=limits, trust_null_base=trust),
        limiter=_merge_threads(),
    )


class MergeStrategy(ConflictStrategy):
    """Settles a conflict by a three-way merge of both sides against the base value, or
    declines (see the module documentation for the rules and the confidence scale).

    Options (all optional; integers in the range of :data:`LIMIT_RANGES`): ``max_text_chars``
    (100000, 1..200000), ``max_depth`` (32, 1..32), ``max_diff_steps`` (100000, 1..1000000) and
    ``max_diff_ms`` (250, 1..1000) bound the work of one merge; ``trust_null_base`` (false) reads
    a ``null`` base value as a real ``null`` instead of "unknown". Unknown options are refused.
    The project's options in the :class:`~crealia._strategy.ResolutionContext` override the
    server's.

    Raises:
        ValueError: an unknown option or a bad value (the registry reports it as a
            :class:`~crealia.ConfigurationError`).
    """

    name = "merge"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.limits, self.trust_null_base = _parse_options(options or {}, DEFAULT_LIMITS, False)

    async def resolve(self, conflict: Conflict, context: ResolutionContext) -> Answer:
        """Merge, or :data:`~crealia._strategy.DECLINE`. CPU-bound and bounded by the limits
        (large merges in a worker thread); one checkpoint first, so cancellation takes effect
        before any work, and a thread's merge is waited for (at most ``max_diff_ms``)."""
        await trio.lowlevel.checkpoint()
        limits, trust = self.limits, self.trust_null_base
        if context.options:
            limits, trust = _parse_options(context.options, limits, trust)
        outcome = await _run_merge(conflict, limits, trust)
        if outcome is None:
            return DECLINE
        return self.resolution(
            conflict, outcome.choice, outcome.value, outcome.confidence, outcome.explanation
        )

    async def split(self, conflict: Conflict, context: ResolutionContext) -> Split | None:
        """:func:`split_conflict` under this strategy's limits (in a worker thread like a
        merge, when the texts are large)."""
        await trio.lowlevel.checkpoint()
        limits, trust = self.limits, self.trust_null_base
        if context.options:
            limits, trust = _parse_options(context.options, limits, trust)
        return await _cheap_or_threaded(split_conflict, conflict, limits, trust)

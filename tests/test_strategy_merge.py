"""The ``merge`` strategy: the three-way merge rules (pure functions), the strategy around them,
and Hypothesis properties of both.

Pure computation, no I/O: the async tests only call ``resolve()``, which never waits.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crealia._model import Resolution
from crealia._plugins import StrategyRegistry
from crealia._strategy import DECLINE
from crealia.strategies.merge import (
    LIMIT_RANGES,
    Limits,
    Merge,
    MergeStrategy,
    is_id_list,
    json_equal,
    merge_conflict,
    merge_id_lists,
    merge_objects,
    merge_text,
    merge_values,
    tokenize,
)
from crealia.testing import check_strategy, make_conflict, make_context


async def resolve(conflict: Any, strategy: MergeStrategy | None = None) -> Any:
    return await (strategy or MergeStrategy()).resolve(conflict, make_context(conflict))


def merged(base: Any, current: Any, incoming: Any, **limits: int) -> Merge:
    result = merge_values(base, current, incoming, limits=Limits(**limits))
    assert result is not None, "expected a clean merge"
    return result


def clip(id_: str, **props: Any) -> dict[str, Any]:
    return {"id": id_, **props}


# ---------------------------------------------------------------------------------------------
# Text


def test_merge_text_keeps_edits_of_different_words() -> None:
    result = merged("The quick fox", "The slow fox", "The quick red fox")
    assert result.value == "The slow red fox"
    assert result.outcome == "merged"
    summaries = {(e.side, e.summary) for e in result.edits}
    assert summaries == {("current", "changed 'quick' to 'slow'"), ("incoming", "added 'red'")}


def test_merge_text_declines_edits_of_the_same_word() -> None:
    assert merge_text("The quick fox", "The slow fox", "The fast fox") is None
    assert merge_text("The quick fox", "The quick brown fox", "The quick red fox") is None


def test_merge_text_declines_edits_inside_one_word() -> None:
    # "video/mp4" is one word: mixing halves of two edits would make a value nobody wrote.
    assert merge_text("video/mp4", "video/webm", "audio/mp4") is None
    assert merge_text("The quick fox", "The quick dog", "The quick fox!") is None


def test_merge_text_declines_an_insertion_inside_a_rewritten_phrase() -> None:
    assert merge_text("a quick brown fox", "a slow red fox", "a quick very brown fox") is None


def test_merge_text_merges_across_punctuation_and_sentences() -> None:
    result = merged("Hello, world. Bye now.", "Hi, world. Bye now.", "Hello, world. Bye then.")
    assert result.value == "Hi, world. Bye then."


def test_merge_text_applies_identical_edits_once() -> None:
    result = merged("one two three four five", "one 2 three four 5", "one 2 three four five")
    assert result.value == "one 2 three four 5"
    assert any(e.side == "both" for e in result.edits)


def test_merge_text_declines_two_insertions_at_one_place() -> None:
    assert merge_text("a b", "a x b", "a y b") is None


def test_merge_text_handles_cjk_characters_as_words() -> None:
    assert merged("我爱猫", "我恨猫", "我爱狗").value == "我恨狗"


def test_merge_text_confidence_falls_with_nearby_and_many_edits() -> None:
    far = merged(
        "one two three four five six seven eight",
        "ONE two three four five six seven eight",
        "one two three four five six seven EIGHT",
    )
    near = merged("one two three", "ONE two three", "one two THREE")
    adjacent = merged("one two", "ONE two", "one TWO")
    assert far.confidence == pytest.approx(0.9)
    assert near.confidence == pytest.approx(0.85)
    assert adjacent.confidence == pytest.approx(0.8)
    words = [f"w{i}" for i in range(60)]
    current = [w.upper() if i % 10 == 0 else w for i, w in enumerate(words)]
    incoming = [w.upper() if i % 10 == 5 else w for i, w in enumerate(words)]
    many = merged(" ".join(words), " ".join(current), " ".join(incoming))
    assert 0.5 <= many.confidence < adjacent.confidence


def test_merge_text_declines_past_the_limits() -> None:
    base = "word " * 30
    current, incoming = "start " + base, base + "end"
    assert merge_text(base, current, incoming) is not None
    assert merge_text(base, current, incoming, limits=Limits(max_text_chars=100)) is None
    rewrite = " ".join(f"x{i}" for i in range(30))
    assert merge_text(base, rewrite, incoming, limits=Limits(max_diff_steps=50)) is None


def test_merge_text_is_fast_on_long_texts() -> None:
    words = [f"w{i % 97}" for i in range(16_000)]  # about 80,000 characters, many repeats
    current, incoming = list(words), list(words)
    for i in range(0, len(words), 400):
        current[i] = "EDIT"
    incoming[len(words) // 2 + 7] = "OTHER"
    started = time.perf_counter()
    result = merge_text(" ".join(words), " ".join(current), " ".join(incoming))
    assert result is not None
    assert "EDIT" in result.value and "OTHER" in result.value
    rewritten = " ".join(f"r{i % 89}" for i in range(16_000))
    assert merge_text(" ".join(words), rewritten, " ".join(incoming)) is None
    assert time.perf_counter() - started < 1.0  # about 0.1 s on a laptop


@given(st.text(max_size=200))
def test_tokenize_is_lossless(text: str) -> None:
    assert "".join(tokenize(text)) == text


# ---------------------------------------------------------------------------------------------
# Objects


def test_merge_objects_merges_disjoint_keys() -> None:
    result = merge_objects(
        {"x": 0, "y": 0, "z": 0},
        {"x": 1, "y": 0, "z": 0, "w": 9},
        {"x": 0, "y": 2},
    )
    assert result is not None
    assert result.value == {"x": 1, "y": 2, "w": 9}  # z: deleted on one side, unchanged on other
    assert result.confidence == pytest.approx(0.95)


def test_merge_objects_recurses_into_keys_changed_on_both_sides() -> None:
    base = {"caption": "The quick fox", "style": {"color": "red", "size": 1}}
    current = {"caption": "The slow fox", "style": {"color": "blue", "size": 1}}
    incoming = {"caption": "The quick red fox", "style": {"color": "red", "size": 2}}
    result = merged(base, current, incoming)
    assert result.value == {
        "caption": "The slow red fox",
        "style": {"color": "blue", "size": 2},
    }
    assert ("incoming", "added 'red' in 'caption'") in {(e.side, e.summary) for e in result.edits}
    assert ("current", "set 'style.color' to 'blue'") in {(e.side, e.summary) for e in result.edits}


def test_merge_objects_keeps_the_same_change_once() -> None:
    assert merged({"a": 1, "b": 1}, {"a": 2, "b": 3}, {"a": 2, "b": 1}).value == {"a": 2, "b": 3}


@pytest.mark.parametrize(
    ("base", "current", "incoming"),
    [
        ({"a": 1}, {"a": 2}, {"a": 3}),  # a number changed differently on both sides
        ({"a": 1}, {}, {"a": 3}),  # removed on one side, changed on the other
        ({}, {"a": 1}, {"a": 2}),  # added on both sides with different values
        ({"a": "x y"}, {"a": 5}, {"a": "x z"}),  # kinds differ
        ({"a": {"b": 1}, "c": 1}, {"a": {"b": 2}, "c": 1}, {"a": {"b": 3}, "c": 2}),
    ],
)
def test_merge_objects_declines_real_conflicts(base: Any, current: Any, incoming: Any) -> None:
    assert merge_objects(base, current, incoming) is None


def test_merge_declines_past_the_depth_limit() -> None:
    def nest(value: Any, depth: int) -> Any:
        for _ in range(depth):
            value = {"k": value}
        return value

    base, current, incoming = (
        nest({"a": 0, "b": 0}, 40),
        nest({"a": 1, "b": 0}, 40),
        nest({"a": 0, "b": 1}, 40),
    )
    assert merge_values(base, current, incoming) is None
    assert merge_values(base, current, incoming, limits=Limits(max_depth=64)) is not None


# ---------------------------------------------------------------------------------------------
# Lists of items


def test_merge_id_lists_adds_removes_and_merges_items() -> None:
    base = [clip("a", t=0), clip("b", t=1), clip("c", t=2)]
    current = [clip("a", t=0), clip("b", t=10), clip("c", t=2), clip("d", t=3)]
    incoming = [clip("z", t=-1), clip("a", t=0), clip("b", t=1, label="B")]
    result = merge_id_lists(base, current, incoming)
    assert result is not None
    # c: removed by incoming, unchanged by current; b: merged key by key; z placed before a
    # (its predecessor on its side: none), d after c's place in current's order.
    assert result.value == [
        clip("z", t=-1),
        clip("a", t=0),
        clip("b", t=10, label="B"),
        clip("d", t=3),
    ]
    assert result.confidence == pytest.approx(0.9)


def test_merge_id_lists_places_new_items_after_their_predecessor() -> None:
    base = [clip("a"), clip("b"), clip("c")]
    current = [clip("a"), clip("b"), clip("c"), clip("x")]
    incoming = [clip("a"), clip("n"), clip("b"), clip("c")]
    assert [i["id"] for i in merged(base, current, incoming).value] == ["a", "n", "b", "c", "x"]


def test_merge_id_lists_follows_the_side_that_reordered() -> None:
    base = [clip("a"), clip("b"), clip("c")]
    current = [clip("a"), clip("b", t=1), clip("c")]
    incoming = [clip("c"), clip("a"), clip("b")]
    result = merged(base, current, incoming)
    assert [i["id"] for i in result.value] == ["c", "a", "b"]
    assert result.value[2] == clip("b", t=1)
    assert merge_id_lists(base, [clip("b"), clip("a"), clip("c")], incoming) is None


def test_merge_id_lists_declines_removed_against_changed() -> None:
    base = [clip("a", t=0), clip("b", t=1)]
    assert merge_id_lists(base, [clip("a", t=0)], [clip("a", t=5), clip("b", t=2)]) is None


def test_is_id_list_needs_unique_string_or_integer_ids() -> None:
    assert is_id_list([]) and is_id_list([clip("a"), {"id": 2}])
    assert not is_id_list([clip("a"), clip("a")])
    assert not is_id_list([{"id": True}])
    assert not is_id_list([{"id": None}])
    assert not is_id_list([1, 2])


# ---------------------------------------------------------------------------------------------
# Scalars and other values


@pytest.mark.parametrize(
    ("base", "current", "incoming", "expected"),
    [
        (1, 1, 2, 2),
        (1, 3, 1, 3),
        (1, 5, 5, 5),
        (False, True, False, True),
        (None, None, 7, 7),
        ([1, 2], [1, 2], [1, 2, 3], [1, 2, 3]),
        ("a", "a", None, None),
    ],
)
def test_merge_values_takes_the_only_change(
    base: Any, current: Any, incoming: Any, expected: Any
) -> None:
    assert json_equal(merged(base, current, incoming).value, expected)


@pytest.mark.parametrize(
    ("base", "current", "incoming"),
    [(1, 2, 3), (1.5, 0.0, 2.5), (True, False, None), ([1], [1, 2], [0, 1]), (None, "a", 2)],
)
def test_merge_values_declines_two_changes_of_a_scalar(
    base: Any, current: Any, incoming: Any
) -> None:
    assert merge_values(base, current, incoming) is None


def test_json_equal_is_strict_about_types() -> None:
    assert json_equal(1, 1.0)
    assert not json_equal(True, 1)
    assert not json_equal("1", 1)
    assert json_equal({"a": [1, {"b": None}]}, {"a": [1.0, {"b": None}]})
    assert not json_equal({"a": None}, {})
    assert json_equal(float("nan"), float("nan"))
    deep_a: Any = []
    deep_b: Any = []
    for _ in range(5000):
        deep_a, deep_b = [deep_a], [deep_b]
    assert json_equal(deep_a, deep_b)


# ---------------------------------------------------------------------------------------------
# The strategy


async def test_merge_strategy_resolves_a_text_conflict() -> None:
    conflict = make_conflict(
        "The slow fox",
        "The quick red fox",
        base_value="The quick fox",
        prop="title",
        current_user="ana",
        incoming_user="ben",
    )
    answer = await resolve(conflict)
    assert isinstance(answer, Resolution)
    assert answer.value == "The slow red fox"
    assert answer.choice == "custom"
    assert answer.strategy == "merge"
    assert 0.5 <= answer.confidence < 1.0
    assert answer.explanation == (
        "Merged both edits of 'title': ana changed 'quick' to 'slow'; ben added 'red'."
    )


async def test_merge_strategy_takes_the_only_changed_side_with_full_confidence() -> None:
    incoming_only = await resolve(make_conflict("old", "new", base_value="old"))
    assert isinstance(incoming_only, Resolution)
    assert (incoming_only.choice, incoming_only.value, incoming_only.confidence) == (
        "incoming",
        "new",
        1.0,
    )
    current_only = await resolve(make_conflict(12.5, 3, prop="start", base_value=3))
    assert isinstance(current_only, Resolution)
    assert (current_only.choice, current_only.value, current_only.confidence) == (
        "current",
        12.5,
        1.0,
    )
    assert "alice" in current_only.explanation and "bob" in current_only.explanation


async def test_merge_strategy_chooses_a_side_when_the_merge_equals_it() -> None:
    # Incoming's only edit is one current also made: the result is current's text.
    conflict = make_conflict(
        "one 2 three four 5", "one 2 three four five", base_value="one two three four five"
    )
    answer = await resolve(conflict)
    assert isinstance(answer, Resolution)
    assert answer.choice == "current"
    assert answer.value == conflict.current["value"]


async def test_merge_strategy_merges_objects_and_items() -> None:
    conflict = make_conflict(
        {"clips": [clip("a", t=1)], "muted": False},
        {"clips": [clip("a", t=0), clip("b", t=4)], "muted": True},
        prop="track",
        base_value={"clips": [clip("a", t=0)], "muted": True},
    )
    answer = await resolve(conflict)
    assert isinstance(answer, Resolution)
    assert answer.value == {"clips": [clip("a", t=1), clip("b", t=4)], "muted": False}
    assert answer.choice == "custom"
    assert "added item 'b' in 'clips'" in answer.explanation


@pytest.mark.parametrize(
    "conflict",
    [
        make_conflict("The slow fox", "The fast fox", base_value="The quick fox"),
        make_conflict(5, 9, prop="start", base_value=0),
        make_conflict("now", "mine", base=None, base_value=None),  # unknown base
        # None base with one None side: a real null, or a deleted element with no history?
        make_conflict(None, "edited", base_value=None),
        make_conflict("kept", None, base_value=None),
        make_conflict(None, "edited", base_value="old"),  # set on a deleted element
    ],
)
async def test_merge_strategy_declines_what_it_cannot_merge(conflict: Any) -> None:
    assert await resolve(conflict) is DECLINE


async def test_merge_strategy_trusts_a_null_base_only_when_told() -> None:
    conflict = make_conflict(None, "edited", base_value=None)
    trusting = MergeStrategy({"trust_null_base": True})
    answer = await resolve(conflict, trusting)
    assert isinstance(answer, Resolution)
    assert (answer.choice, answer.value) == ("incoming", "edited")
    per_project = await MergeStrategy().resolve(
        conflict, make_context(conflict, options={"trust_null_base": True})
    )
    assert isinstance(per_project, Resolution)
    assert await resolve(make_conflict("same", "same", base_value=None)) != DECLINE


async def test_merge_strategy_lets_a_delete_stand_only_over_unchanged_props() -> None:
    props = {"start": 0, "label": "intro"}
    unchanged = make_conflict(props, None, op="delete", base_value=dict(props))
    answer = await resolve(unchanged)
    assert isinstance(answer, Resolution)
    assert (answer.choice, answer.value, answer.confidence) == ("incoming", None, 1.0)
    assert "delete stands" in answer.explanation
    changed = make_conflict({"start": 5, "label": "intro"}, None, op="delete", base_value=props)
    assert await resolve(changed) is DECLINE
    unknown = make_conflict(props, None, op="delete", base_value=None)
    assert await resolve(unknown) is DECLINE


async def test_merge_strategy_keeps_the_strategy_contract() -> None:
    await check_strategy(MergeStrategy())
    await check_strategy(MergeStrategy({"trust_null_base": True}))


def test_merge_strategy_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="unknown options"):
        MergeStrategy({"fuzzy": True})
    with pytest.raises(ValueError, match="max_text_chars"):
        MergeStrategy({"max_text_chars": 0})
    with pytest.raises(ValueError, match="trust_null_base"):
        MergeStrategy({"trust_null_base": "yes"})
    strategy = MergeStrategy({"max_text_chars": 10, "max_depth": 4, "max_diff_steps": 99})
    assert strategy.limits == Limits(max_text_chars=10, max_depth=4, max_diff_steps=99)


def test_merge_strategy_is_registered_as_merge() -> None:
    registry = StrategyRegistry.discover()
    strategy = registry.create("merge", {})
    assert isinstance(strategy, MergeStrategy)
    assert strategy.name == MergeStrategy.name == "merge"


# ---------------------------------------------------------------------------------------------
# Properties

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-1000, 1000)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
items = st.lists(
    st.fixed_dictionaries({"id": st.sampled_from(["a", "b", "c", 1, 2])}, optional={"v": scalars}),
    max_size=4,
    unique_by=lambda item: item["id"],
)
json_values = st.recursive(
    scalars | items,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(json_values, json_values)
def test_merge_takes_the_other_side_when_one_equals_the_base(base: Any, other: Any) -> None:
    for current, incoming in ((base, other), (other, base)):
        result = merge_values(base, current, incoming)
        assert result is not None
        assert json_equal(result.value, other)
        assert result.confidence == 1.0
        if base is not None:  # an unknown base only matters to the strategy
            outcome = merge_conflict(make_conflict(current, incoming, base_value=base))
            assert outcome is not None
            assert json_equal(outcome.value, other)


@given(json_values, json_values)
def test_merge_of_the_same_change_is_that_change(base: Any, value: Any) -> None:
    result = merge_values(base, value, value)
    assert result is not None
    assert json_equal(result.value, value)
    outcome = merge_conflict(make_conflict(value, value, base_value=base))
    assert outcome is not None and outcome.choice == "current"


VOCABULARY = [f"w{i}" for i in range(60)]
edits = st.sampled_from(["replace", "insert", "delete"])


def edit_words(words: list[str], at: int, edit: str, new: str) -> list[str]:
    out = list(words)
    if edit == "replace":
        out[at] = new
    elif edit == "insert":
        out.insert(at, new)
    else:
        del out[at]
    return out


@given(
    st.lists(st.sampled_from(VOCABULARY), min_size=6, max_size=30, unique=True),
    st.data(),
    edits,
    edits,
    st.sampled_from([" ", ", ", "  ", " - "]),
)
def test_merge_text_keeps_well_separated_edits(
    words: list[str], data: st.DataObject, first: str, second: str, sep: str
) -> None:
    i = data.draw(st.integers(0, len(words) - 4), label="first position")
    j = data.draw(st.integers(i + 3, len(words) - 1), label="second position")
    one = edit_words(words, i, first, "NEW")
    other = edit_words(words, j, second, "ALSO")
    both = edit_words(edit_words(words, j, second, "ALSO"), i, first, "NEW")
    swap = data.draw(st.booleans(), label="swap sides")
    current, incoming = (other, one) if swap else (one, other)
    result = merge_text(sep.join(words), sep.join(current), sep.join(incoming))
    assert result is not None
    assert result.value == sep.join(both)


texts = st.lists(st.sampled_from(["a", "b", "c", "d", ",", " ", " ", ".", "é", "猫"]), max_size=12)


@st.composite
def word_edits(draw: st.DrawFn, words: list[str]) -> list[str]:
    """``words`` with up to three random edits."""
    out = list(words)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(out)))
        new = draw(st.sampled_from(["x", "y", " ", ",", "b"]))
        if at < len(out) and draw(st.booleans()):
            if draw(st.booleans()):
                out[at] = new
            else:
                del out[at]
        else:
            out.insert(at, new)
    return out


@given(texts.flatmap(lambda base: st.tuples(st.just(base), word_edits(base), word_edits(base))))
def test_merge_text_is_symmetric(case: tuple[list[str], list[str], list[str]]) -> None:
    base, current, incoming = ("".join(words) for words in case)
    forward = merge_text(base, current, incoming)
    backward = merge_text(base, incoming, current)
    assert (forward is None) == (backward is None)
    if forward is not None and backward is not None:
        assert forward.value == backward.value
        assert forward.confidence == backward.confidence


@st.composite
def related(draw: st.DrawFn, base: Any) -> Any:
    """A value for one side: the base itself, mostly an edit of it, or anything."""
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return base
    if choice == 5:
        return draw(json_values)
    if isinstance(base, dict):
        edited = {k: draw(related(v)) if draw(st.booleans()) else v for k, v in base.items()}
        dropped = draw(st.sets(st.sampled_from(sorted(edited)))) if edited else set()
        updates = draw(st.dictionaries(st.text(max_size=3), json_values, max_size=2))
        return {k: v for k, v in {**edited, **updates}.items() if k not in dropped}
    if isinstance(base, str):
        return "".join(draw(word_edits(tokenize(base))))
    if is_id_list(base):
        kept = [draw(related(item)) for item in base if draw(st.booleans())]
        kept = [item for item in kept if is_id_list([item])]
        new = [item for item in draw(items) if all(item["id"] != k["id"] for k in kept)]
        return kept + new
    return draw(json_values)


@st.composite
def conflicts(draw: st.DrawFn) -> Any:
    base = draw(
        st.dictionaries(st.text(max_size=2), json_values | texts.map("".join), max_size=4)
        | texts.map("".join)
        | items
        | json_values
        | st.floats()
    )
    return make_conflict(
        draw(related(base)),
        draw(related(base)),
        op=draw(st.sampled_from(["set", "set", "delete"])),
        prop=None,
        base_value=base,
        base=draw(st.none() | st.integers(0, 10)),
        current_user=draw(st.none() | st.sampled_from(["ana", "ben"])),
        incoming_user=draw(st.none() | st.sampled_from(["ana", "ben"])),
    )


@settings(deadline=None, max_examples=300)
@given(conflicts(), st.booleans())
async def test_merge_strategy_never_raises(conflict: Any, trust_null_base: bool) -> None:
    strategy = MergeStrategy({"trust_null_base": trust_null_base})
    answer = await strategy.resolve(conflict, make_context(conflict))
    assert answer is DECLINE or isinstance(answer, Resolution)
    if isinstance(answer, Resolution):
        assert 0.0 <= answer.confidence <= 1.0
        assert answer.explanation.strip()
        if answer.choice == "current":
            assert json_equal(answer.value, conflict.current["value"])
        elif answer.choice == "incoming":
            assert json_equal(answer.value, conflict.incoming["value"])


def test_merge_text_declines_past_its_time_budget() -> None:
    words = 15 * 1024 // 6
    base, current, incoming = (" ".join(f"{t}{i:04d}" for i in range(words)) for t in "abc")
    unbounded = Limits(max_diff_steps=10**12, max_text_chars=10**12, max_diff_ms=1)
    started = time.perf_counter()
    assert merge_text(base, current, incoming, limits=unbounded) is None
    # Only the budget stopped it (the steps would allow seconds of work): generous bound here.
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_diff_steps": 10**12}, "max_diff_steps must be an integer in 1..1000000"),
        ({"max_text_chars": 0}, "max_text_chars must be an integer in 1..200000"),
        ({"max_depth": 33}, "max_depth must be an integer in 1..32"),
        ({"max_diff_ms": 1001}, "max_diff_ms must be an integer in 1..1000"),
        ({"max_diff_ms": 2.5}, "max_diff_ms must be an integer"),
        ({"max_diff_steps": True}, "max_diff_steps must be an integer"),
        ({"bogus": 1}, "unknown options ['bogus']"),
    ],
)
def test_merge_options_have_ranges(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        MergeStrategy(options)
    for key, (low, high) in LIMIT_RANGES.items():
        MergeStrategy({key: low})
        MergeStrategy({key: high})


@pytest.mark.parametrize(
    ("base", "deleted", "inserted"),
    [
        ("Opening titles", "", "Opening titles red"),
        ("Keep shot 3 and shot 4 in the cut", "Keep shot 3 in the cut",
         "Keep shot 3 and shot 4 (slow-mo) in the cut"),
        ("Keep shot 3 and shot 4 in the cut", "Keep shot 3 in the cut",
         "Keep shot 3 and (slow-mo) shot 4 in the cut"),
        ("Intro, beach, sunset", "Intro, sunset", "Intro, beach at dawn, sunset"),
        ("Opening titles", "titles", "Big Opening titles"),
        # the deleted run repeats its neighbour ("the"): the diff may show it one word off
        ("Wide shot of the valley before the storm", "Wide shot of the storm",
         "Wide shot of v2 the valley before the storm"),
        # an emoji is a word
        ("Love the light in this shot ✨", "Love the shot ✨", "Love the ⭐ light in this shot ✨"),
        ("Best moment 🔥 use it in the intro", "Best moment 🔥 use it in",
         "Best moment 🔥 use it in the intro 👍"),
    ],
)  # fmt: skip
def test_an_insertion_touching_the_other_sides_deletion_is_not_merged(
    base: str, deleted: str, inserted: str
) -> None:
    """Kept, the insertion would be a fragment (" red") or lose the words it went with."""
    assert merge_text(base, deleted, inserted) is None
    assert merge_text(base, inserted, deleted) is None


@given(
    st.lists(st.sampled_from(VOCABULARY), min_size=6, max_size=20, unique=True),
    st.data(),
)
def test_a_deletion_and_an_insertion_merge_only_when_a_kept_word_separates_them(
    words: list[str], data: st.DataObject
) -> None:
    start = data.draw(st.integers(0, len(words) - 2), label="deletion start")
    end = data.draw(st.integers(start + 1, len(words) - 1), label="deletion end")
    at = data.draw(st.integers(0, len(words)), label="insertion point")
    deleted = words[:start] + words[end:]
    inserted = [*words[:at], "NEW", *words[at:]]
    result = merge_text(" ".join(words), " ".join(deleted), " ".join(inserted))
    if start <= at <= end:  # at the deletion's edge or inside it
        assert result is None
    else:
        assert result is not None
        survivors = [w for i, w in enumerate(words) if not start <= i < end]
        kept_at = at if at < start else at - (end - start)
        assert result.value == " ".join([*survivors[:kept_at], "NEW", *survivors[kept_at:]])

"""The ``longest`` strategy: the contract (crealia.testing.check_strategy) and its decisions."""

from __future__ import annotations

import importlib.metadata

import pytest
import trio
from crealia_longest_text import LongestTextStrategy

from crealia import DECLINE, Resolution
from crealia.testing import check_strategy, make_conflict, make_context


async def resolve(strategy: LongestTextStrategy, current: object, incoming: object, **kw: object):
    conflict = make_conflict(current, incoming, **kw)  # type: ignore[arg-type]
    with trio.fail_after(1):
        return await strategy.resolve(conflict, make_context(conflict))


async def test_longest_keeps_the_strategy_contract() -> None:
    with trio.fail_after(10):
        await check_strategy(LongestTextStrategy({}))
        await check_strategy(LongestTextStrategy({"min_confidence": 0.9}))


async def test_longest_keeps_the_longer_incoming_text() -> None:
    answer = await resolve(LongestTextStrategy(), "Intro", "Intro, wide shot")
    assert isinstance(answer, Resolution)
    assert answer.choice == "incoming"
    assert answer.value == "Intro, wide shot"
    assert answer.strategy == "longest"
    assert answer.confidence == round(1 - 5 / 16 / 2, 3)
    assert "bob's 16 characters over 5" in answer.explanation


async def test_longest_keeps_the_longer_current_text() -> None:
    answer = await resolve(LongestTextStrategy(), "A much longer label", "Short")
    assert isinstance(answer, Resolution)
    assert answer.choice == "current"
    assert answer.value == "A much longer label"
    assert "alice's" in answer.explanation


async def test_longest_is_sure_against_an_empty_text() -> None:
    answer = await resolve(LongestTextStrategy(), "", "Title")
    assert isinstance(answer, Resolution)
    assert answer.confidence == 1.0


async def test_longest_ignores_surrounding_whitespace() -> None:
    assert await resolve(LongestTextStrategy(), "abc      ", "xyz") is DECLINE


@pytest.mark.parametrize(
    ("current", "incoming"),
    [(5, 9), ({"a": 1}, {"a": 2}), (["x"], ["x", "y"]), (None, "text"), ("text", 3), ("ab", "cd")],
)
async def test_longest_declines_what_is_not_two_texts_of_different_lengths(
    current: object, incoming: object
) -> None:
    assert await resolve(LongestTextStrategy(), current, incoming) is DECLINE


async def test_longest_declines_a_conflicting_delete() -> None:
    answer = await resolve(LongestTextStrategy(), {"label": "x"}, None, op="delete")
    assert answer is DECLINE


async def test_longest_declines_below_min_confidence() -> None:
    strategy = LongestTextStrategy({"min_confidence": 0.7})
    assert await resolve(strategy, "abcdef", "abcdefgh") is DECLINE  # confidence 0.625
    kept = await resolve(strategy, "abc", "abcdefghij")  # confidence 0.85
    assert isinstance(kept, Resolution)
    assert kept.value == "abcdefghij"


@pytest.mark.parametrize("options", [{"min_confidence": 2}, {"min_confidence": "x"}, {"z": 1}])
def test_longest_refuses_bad_options(options: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"min_confidence|unknown options"):
        LongestTextStrategy(options)


def test_longest_is_registered_as_a_crealia_strategy() -> None:
    (entry_point,) = [
        ep
        for ep in importlib.metadata.entry_points(group="crealia.strategies")
        if ep.name == "longest"
    ]
    assert entry_point.load() is LongestTextStrategy

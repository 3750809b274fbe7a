"""A corpus of conflicts with known right answers, generated from templates (no network, no files).

:func:`generate` builds, deterministically from a seed, several hundred conflict triples
(``base``, ``current``, ``incoming``) the way people make them: titles, notes and multi-line
notes edited word by word, Arabic and Hebrew (RTL), Chinese and Japanese (each ideograph or kana
a word), emoji, words moved, fields cleared, the same edit made twice, numbers, booleans, objects
(a ``transform`` of ``x``, ``y``, ``scale``, ``rotation``), lists of clips with ``"id"``
(reordered, added, removed, edited) and deleted elements. Each :class:`Case` knows its right
answer because it is built from the edits, not found by a merge: each side's edits are applied to
the base's words, and when the two sides' edits are apart (at least two unchanged words between
them) the right answer is the base with both applied (:attr:`Case.answers`: every acceptable
value, e.g. both orders of two clips added at the same place).

Cases that *need a person* (``needs_person``) are those where no value keeps both changes: both
rewrote the same words differently, both inserted different words at one place, one removed a
key or an item the other changed, both moved the same clip, both set a number differently, an
element deleted by one side and edited by the other, and the *fragments*: an insertion next to
the other side's deletion (``"Opening titles"`` cleared by one side, ``" red"`` appended by the
other; ``"and shot 4"`` deleted by one, ``"(slow-mo)"`` put after it by the other), where any
merge would keep a piece of what was deleted or lose what the insertion went with.

Every case also carries the context a strategy is given (:class:`Author`: role, presence, the
element the author has active, how long ago each wrote) and :attr:`Case.keep`: the side a person
settling it by hand keeps. Where one side's value is a right answer, that side; where a person
is needed, the choice of a *simulated reviewer*, which weighs the context (who is on the element
now, who changed more words, who wrote last, who has the higher role) with a random element of
its own (:func:`_reviewer`). That choice is a stand-in for a project's stored manual
resolutions: it is what the ``ai`` strategy's default offline model is fitted on
(:mod:`crealia.strategies._training`), and it says nothing about real people beyond the
weights written in :func:`_reviewer`.

:func:`word_problems` says precisely when a value drops a word of either side's change, and
:func:`is_right` whether a value is one of a case's answers; the corpus test and
``benchmarks/conflicts.py`` both use them.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias

import attrs
import orjson

from .._model import Conflict
from .._strategy import Participant, ResolutionContext
from .merge import json_equal, tokenize

__all__ = [
    "CATEGORIES",
    "DEFAULT_SEED",
    "NOW",
    "Author",
    "Case",
    "generate",
    "is_right",
    "word_problems",
]

#: The seed of the corpus the tests and the benchmark use.
DEFAULT_SEED: Final = 0
#: Server time (ms) every case's conflict is raised at.
NOW: Final = 1_700_000_000_000

Keep: TypeAlias = Literal["current", "incoming"]


@attrs.frozen(kw_only=True)
class Author:
    """One side's author, as the server knows them when the conflict is raised."""

    user_id: str
    role: str
    #: Connected to the project's room.
    present: bool
    #: Present, with the conflict's element active.
    active: bool
    #: How long before the conflict this side wrote, in ms.
    age_ms: int

    def participant(self, element_id: str) -> Participant:
        """The author as a :class:`~crealia._strategy.Participant` of the context."""
        return Participant(
            user_id=self.user_id,
            role=self.role,
            active_element=element_id if self.active else None,
            present=self.present or self.active,
            at=NOW - self.age_ms,
        )


@attrs.frozen(kw_only=True)
class Case:
    """One conflict of the corpus and its right answer."""

    id: str
    category: str
    element_id: str
    #: The conflicting property (``None`` for a conflicting delete).
    prop: str | None
    op: Literal["set", "delete"]
    base: Any
    current: Any
    incoming: Any
    #: Every acceptable settled value (empty when ``needs_person``).
    answers: tuple[Any, ...]
    #: No value keeps both changes: a person must choose.
    needs_person: bool
    #: The side a person settling it by hand keeps (``None``: neither side alone is right).
    keep: Keep | None
    current_author: Author
    incoming_author: Author

    def conflict(self) -> Conflict:
        """The case as the server detects it (docs/protocol.md §5)."""
        cur, inc = self.current_author, self.incoming_author
        return Conflict(
            id=f"corpus-{self.id}",
            project_id="corpus",
            element_id=self.element_id,
            prop=self.prop,
            op=self.op,
            base=3,
            base_value=self.base,
            current={"value": self.current, "user_id": cur.user_id, "seq": 4},
            incoming={"value": self.incoming, "user_id": inc.user_id, "change_id": self.id},
            strategy="merge",
            created_at=NOW,
            roles={cur.user_id: cur.role, inc.user_id: inc.role},
        )

    def context(self, conflict: Conflict | None = None) -> ResolutionContext:
        """The context a strategy is given with :meth:`conflict`."""
        conflict = conflict or self.conflict()
        return ResolutionContext(
            project_id=conflict.project_id,
            conflict=conflict,
            current=self.current_author.participant(self.element_id),
            incoming=self.incoming_author.participant(self.element_id),
            now=NOW,
        )

    def swapped(self) -> Case:
        """The same case with the two sides exchanged (a delete cannot be swapped)."""
        keep: Keep | None = None
        if self.keep is not None:
            keep = "incoming" if self.keep == "current" else "current"
        return attrs.evolve(
            self,
            id=f"{self.id}~",
            current=self.incoming,
            incoming=self.current,
            keep=keep,
            current_author=self.incoming_author,
            incoming_author=self.current_author,
        )


# -- checking a value against a case --------------------------------------------------------


def is_right(case: Case, value: Any) -> bool:
    """Whether ``value`` is one of the case's answers (JSON equality)."""
    return any(json_equal(value, answer) for answer in case.answers)


def _bag(value: Any, path: str, out: Counter[str]) -> None:
    """The words of a JSON value, each tagged with where it is: a text's tokens other than
    whitespace, a scalar's JSON, an item of a list of items under its id."""
    if isinstance(value, str):
        out.update(f"{path}:{token}" for token in tokenize(value) if not token.isspace())
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _bag(item, f"{path}.{key}", out)
    elif isinstance(value, list | tuple):
        ids = [item.get("id") if isinstance(item, Mapping) else None for item in value]
        if ids and all(isinstance(i, str | int) and not isinstance(i, bool) for i in ids):
            for ident, item in zip(ids, value, strict=True):
                _bag(item, f"{path}[{ident}]", out)
        else:
            out.update(f"{path}[]={_json(item)}" for item in value)
    else:
        out[f"{path}={_json(value)}"] += 1


def _json(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def words(value: Any) -> Counter[str]:
    """The multiset of located words of ``value`` (see :func:`word_problems`)."""
    out: Counter[str] = Counter()
    _bag(value, "", out)
    return out


def word_problems(base: Any, current: Any, incoming: Any, result: Any) -> list[str]:
    """How ``result`` drops or invents a word of the two sides' changes; ``[]`` when it keeps
    them all.

    Words are counted as a multiset, each located by its path in the value (a text's tokens
    other than whitespace, so punctuation and emoji count; a number, boolean or ``null`` is the
    word ``path=value``; an item of a list of items is under its id). With ``b``, ``c``, ``i``,
    ``r`` the counts of one word in base, current, incoming and result:

    - a word a side inserted is in the result: when ``c > b``, ``r >= c - max(0, b - i)``
      (as many as current has, less those incoming deleted), and the same for incoming;
    - a word a side deleted is not, unless the other side re-inserted it: when ``c < b``,
      ``r <= c + max(0, i - b)``, and the same for incoming;
    - a word neither side touched stays (``r >= b``), and nothing else is added
      (``r <= b + max(0, c - b) + max(0, i - b)``).
    """
    wb, wc, wi, wr = words(base), words(current), words(incoming), words(result)
    problems = []
    for word in sorted(wb.keys() | wc.keys() | wi.keys() | wr.keys()):
        b, c, i, r = wb[word], wc[word], wi[word], wr[word]
        for side, mine, other in (("current", c, i), ("incoming", i, c)):
            if mine > b and r < mine - max(0, b - other):
                problems.append(f"drops {word!r}, which {side} inserted")
            if mine < b and r > mine + max(0, other - b):
                problems.append(f"keeps {word!r}, which {side} deleted")
        if c == b == i and r < b:
            problems.append(f"drops {word!r}, which neither side touched")
        if r > b + max(0, c - b) + max(0, i - b):
            problems.append(f"adds {word!r}, which neither side wrote")
    return problems


# -- text material ---------------------------------------------------------------------------

_TITLES = [
    "Opening titles over the harbour at dawn",
    "Interview with the mayor outside city hall",
    "Drone shot of the old bridge at sunset",
    "Closing credits with the band playing live",
    "Chef prepares the fish market special",
    "Cut to the crowd cheering at the finish line",
    "Slow pan across the empty stadium seats",
    "Street market in the rain after midnight",
    "Wide shot of the valley before the storm",
    "Kids racing bikes down the hill road",
]
_NOTES = [
    "Keep shot 3 and shot 4 in the cut but trim the intro by two seconds",
    "Colour grade feels too warm so pull the reds down a little before export",
    "Music swells too early here and covers the line about the harbour",
    "Use the second take of the interview because the first one has wind noise",
    "Check the subtitles against the script and fix the names in the last scene",
    "Move the title card after the drone shot and fade in from black",
    "Audio from the lapel mic is clipped so use the boom track for this part",
    "Client wants the logo bigger on the end card and the tagline in white",
]
_LINES = [
    "Scene 1: harbour at dawn, boats leaving",
    "Scene 2: market opens, stalls and crowd",
    "Scene 3: interview with the fish seller",
    "Scene 4: noon bells over the old town",
    "Scene 5: storm clouds over the valley",
    "Scene 6: night market under the lamps",
]
_EN_WORDS = ["quick", "final", "wide", "new", "short", "bright", "quiet", "second", "early", "late",
             "blue", "golden", "rough", "clean", "north", "full", "tight", "soft"]  # fmt: skip
_EN_INSERTS = [["again"], ["really"], ["slowly"], ["v2"], ["(draft)"], ["extended"],
               ["(slow-mo)"], ["very", "carefully"], ["in", "4K"], ["tonight"]]  # fmt: skip
_AR = [
    "افتتاح العرض فوق الميناء عند الفجر الهادئ",
    "مقابلة مع رئيس البلدية أمام مبنى المدينة القديم",
    "لقطة جوية للجسر القديم عند غروب الشمس",
    "الاعتمادات الختامية مع الفرقة تعزف مباشرة على المسرح",
]
_AR_WORDS = ["جديد", "سريع", "طويل", "ثاني", "ذهبي", "واسع", "قصير"]
_HE = [
    "כותרות פתיחה מעל הנמל עם שחר השקט",
    "ראיון עם ראש העיר מול בניין העירייה הישן",
    "צילום רחפן של הגשר הישן בזמן השקיעה",
    "קרדיטים בסוף עם הלהקה מנגנת על הבמה",
]
_HE_WORDS = ["חדש", "מהיר", "ארוך", "שני", "זהוב", "רחב", "קצר"]
_ZH = ["港口黎明时的开场字幕镜头", "市长在市政厅外接受记者采访", "日落时分旧桥的航拍远景镜头",
       "乐队现场演奏时的片尾字幕"]  # fmt: skip
_JA = [
    "夜明けの港の上のオープニング",
    "市役所の前で市長にインタビュー",
    "夕暮れの古い橋のドローン撮影",
]
_CJK_CHARS = list("新旧大小红蓝快慢长短高低")
_EMOJI = [
    "Great take 🎬 keep this one for the trailer",
    "Best moment of the day 🔥 use it in the intro",
    "Sound is off here 🎧 ask Sam to check the mix",
    "Love the light in this shot ✨ match the next one to it",
]
_EMOJI_INSERTS = [["🎉"], ["👍"], ["🔥", "🔥"], ["❤️"], ["⭐"], ["🎥"]]


# -- building edits ---------------------------------------------------------------------------


@attrs.frozen
class _Op:
    """Replace base words ``[start, end)`` with ``words`` (``start == end``: an insertion)."""

    start: int
    end: int
    words: tuple[str, ...]


def _apply(base: Sequence[str], ops: Sequence[_Op]) -> list[str]:
    out: list[str] = []
    position = 0
    for op in sorted(ops, key=lambda o: (o.start, o.end)):
        out.extend(base[position : op.start])
        out.extend(op.words)
        position = op.end
    out.extend(base[position:])
    return out


def _apart(a: Sequence[_Op], b: Sequence[_Op], gap: int) -> bool:
    """Whether every op of ``a`` is at least ``gap`` unchanged base words from every op of
    ``b``."""
    for x in a:
        for y in b:
            if x.end <= y.start:
                if y.start - x.end < gap:
                    return False
            elif y.end <= x.start:
                if x.start - y.end < gap:
                    return False
            else:
                return False
    return True


class _Gen:
    """The generator's state: the random source and the cases so far."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.cases: list[Case] = []

    # -- context --

    def author(self, user_id: str) -> Author:
        rng = self.rng
        role = rng.choices(["owner", "editor", "commenter"], weights=[2, 6, 1])[0]
        present = rng.random() < 0.6
        active = present and rng.random() < 0.5
        age = int(rng.choice([rng.uniform(0, 5_000), rng.uniform(5_000, 120_000),
                              rng.uniform(120_000, 7_200_000)]))  # fmt: skip
        return Author(user_id=user_id, role=role, present=present, active=active, age_ms=age)

    def add(
        self,
        category: str,
        base: Any,
        current: Any,
        incoming: Any,
        answers: Sequence[Any] = (),
        *,
        prop: str | None = "label",
        op: Literal["set", "delete"] = "set",
    ) -> None:
        names = self.rng.sample(["ana", "ben", "chloé", "dmitri", "eun-ji", "farah", "gil"], 2)
        cur, inc = self.author(names[0]), self.author(names[1])
        # Within one write of each other, the incoming write is the later one.
        if inc.age_ms > cur.age_ms:
            cur, inc = (attrs.evolve(cur, age_ms=inc.age_ms),
                        attrs.evolve(inc, age_ms=cur.age_ms))  # fmt: skip
        needs_person = not answers
        keep: Keep | None
        if needs_person:
            keep = _reviewer(self.rng, base, current, incoming, cur, inc, op)
        elif any(json_equal(current, a) for a in answers):
            keep = "current"
        elif any(json_equal(incoming, a) for a in answers):
            keep = "incoming"
        else:
            keep = None
        number = sum(1 for c in self.cases if c.category == category) + 1
        self.cases.append(
            Case(
                id=f"{category}-{number:03d}",
                category=category,
                element_id=f"clip-{self.rng.randrange(1, 40)}",
                prop=None if op == "delete" else prop,
                op=op,
                base=base,
                current=current,
                incoming=incoming,
                answers=tuple(answers),
                needs_person=needs_person,
                keep=keep,
                current_author=cur,
                incoming_author=inc,
            )
        )

    # -- word edits --

    def word_op(self, base: Sequence[str], vocab: Sequence[str], inserts: Sequence[Sequence[str]],
                kind: str | None = None) -> list[_Op]:  # fmt: skip
        """One side's edit of ``base``'s words: a replaced word, an insertion, a deletion or a
        word moved (two ops)."""
        rng = self.rng
        n = len(base)
        kind = kind or rng.choice(["replace", "replace", "insert", "delete", "move", "append"])
        fresh = [w for w in vocab if w not in base]
        if kind == "replace":
            i = rng.randrange(n)
            return [_Op(i, i + 1, (rng.choice(fresh),))]
        if kind == "insert":
            i = rng.randrange(1, n)
            return [_Op(i, i, tuple(rng.choice(inserts)))]
        if kind == "append":
            return [_Op(n, n, tuple(rng.choice(inserts)))]
        if kind == "delete":
            i = rng.randrange(1, n)
            return [_Op(i, i + 1, ())]
        i = rng.randrange(n - 3)  # move: word i goes two to four words later
        j = min(n, i + rng.randrange(3, 5))
        return [_Op(i, i + 1, ()), _Op(j, j, (base[i],))]

    def apart_edits(
        self, base: Sequence[str], vocab: Sequence[str], inserts: Sequence[Sequence[str]],
        kinds: Sequence[str | None] = (None, None), gap: int = 2,
    ) -> tuple[list[_Op], list[_Op]]:  # fmt: skip
        """Two sides' edits at least ``gap`` unchanged words apart."""
        for _ in range(200):
            a = self.word_op(base, vocab, inserts, kinds[0])
            b = self.word_op(base, vocab, inserts, kinds[1])
            if _apart(a, b, gap) and _apart(a[:1], a[1:], 1) and _apart(b[:1], b[1:], 1):
                return a, b
        raise AssertionError("no edits apart in 200 tries: the sentence is too short")

    def text_cases(
        self,
        category: str,
        sentences: Sequence[str],
        vocab: Sequence[str],
        inserts: Sequence[Sequence[str]],
        count: int,
        *,
        joiner: str = " ",
        split: Callable[[str], list[str]] = str.split,
        prop: str = "label",
    ) -> None:
        """``count`` cases of each shape on ``sentences``: edits apart (merged), one side only,
        the same edit on both sides, the same word rewritten differently, different insertions at
        one place, an insertion next to the other side's deletion."""
        rng = self.rng

        def text(ws: Sequence[str]) -> str:
            return joiner.join(ws)

        for _ in range(count):
            base = split(rng.choice(sentences))
            a, b = self.apart_edits(base, vocab, inserts)
            cur, inc = _apply(base, a), _apply(base, b)
            both = _apply(base, [*a, *b])
            self.add(category, text(base), text(cur), text(inc), [text(both)], prop=prop)
        for _ in range(max(1, count // 4)):
            base = split(rng.choice(sentences))
            a = self.word_op(base, vocab, inserts)
            self.add(category, text(base), text(base), text(_apply(base, a)),
                     [text(_apply(base, a))], prop=prop)  # fmt: skip
        for _ in range(max(1, count // 4)):
            base = split(rng.choice(sentences))
            a = self.word_op(base, vocab, inserts)
            same = text(_apply(base, a))
            self.add("identical", text(base), same, same, [same], prop=prop)
        for _ in range(max(1, count // 3)):
            base = split(rng.choice(sentences))
            i = rng.randrange(len(base))
            x, y = rng.sample([w for w in vocab if w not in base], 2)
            self.add("same_words", text(base), text(_apply(base, [_Op(i, i + 1, (x,))])),
                     text(_apply(base, [_Op(i, i + 1, (y,))])), prop=prop)  # fmt: skip
        for _ in range(max(1, count // 4)):
            base = split(rng.choice(sentences))
            i = rng.randrange(1, len(base) + 1)
            one, two = rng.sample(list(inserts), 2)
            self.add("same_place", text(base), text(_apply(base, [_Op(i, i, tuple(one))])),
                     text(_apply(base, [_Op(i, i, tuple(two))])), prop=prop)  # fmt: skip
        for _ in range(max(1, count // 3)):
            base = split(rng.choice(sentences))
            n = len(base)
            start = rng.randrange(1, n - 1)
            end = min(n, start + rng.randrange(1, 4))
            gone = _Op(start, end, ())
            at = rng.choice([start, end])
            added = _Op(at, at, tuple(rng.choice(inserts)))
            deleted, inserted = text(_apply(base, [gone])), text(_apply(base, [added]))
            if rng.random() < 0.5:
                deleted, inserted = inserted, deleted
            self.add("fragment", text(base), deleted, inserted, prop=prop)


# -- the simulated reviewer ------------------------------------------------------------------

_RANK: Final = {"owner": 3, "editor": 2, "commenter": 1, "viewer": 0}


def _changed_words(base: Any, value: Any) -> int:
    wb, wv = words(base), words(value)
    return sum(((wb - wv) + (wv - wb)).values())


def _reviewer(
    rng: random.Random, base: Any, current: Any, incoming: Any, cur: Author, inc: Author,
    op: str,
) -> Keep:  # fmt: skip
    """The side a person keeps when no value keeps both: weights of presence, size of change,
    recency and role, plus a logistic random term (people differ, and see what no feature does).
    Positive favours current."""

    def level(a: Author) -> int:
        return 2 if a.active else 1 if a.present else 0

    if op == "delete":
        size = 1.0 + 0.6 * min(_changed_words(base, current), 5)  # keeping what was edited
    else:
        dc, di = _changed_words(base, current), _changed_words(base, incoming)
        size = 1.2 * (math.log1p(dc) - math.log1p(di))
    presence = 0.9 * (level(cur) - level(inc))
    recency = 0.8 * math.tanh((inc.age_ms - cur.age_ms) / 60_000)
    role = 0.6 * (_RANK.get(cur.role, 0) - _RANK.get(inc.role, 0))
    u = rng.random()
    noise = 0.8 * math.log(u / (1 - u)) if 0 < u < 1 else 0.0
    return "current" if presence + size + recency + role + noise >= 0 else "incoming"


# -- the other kinds ---------------------------------------------------------------------------


def _numbers(gen: _Gen, count: int) -> None:
    rng = gen.rng
    for _ in range(count):
        prop = rng.choice(["start", "duration", "volume", "speed"])
        base = round(rng.uniform(0, 60), 1) if prop != "volume" else rng.randrange(0, 100)
        a = round(base + rng.choice([-1, 1]) * rng.uniform(0.5, 10), 1)
        b = round(base + rng.choice([-1, 1]) * rng.uniform(0.5, 10), 1)
        shape = rng.choice(["one", "one", "same", "both", "both"])
        if shape == "one":
            gen.add("number", base, base, a, [a], prop=prop)
        elif shape == "same":
            gen.add("identical", base, a, a, [a], prop=prop)
        elif a != b:
            gen.add("number", base, a, b, prop=prop)


def _booleans(gen: _Gen, count: int) -> None:
    rng = gen.rng
    for _ in range(count):
        prop = rng.choice(["muted", "locked", "hidden", "looped"])
        base = rng.random() < 0.5
        if rng.random() < 0.6:
            gen.add("boolean", base, base, not base, [not base], prop=prop)
        else:
            gen.add("identical", base, not base, not base, [not base], prop=prop)


def _transforms(gen: _Gen, count: int) -> None:
    rng = gen.rng
    keys = ["x", "y", "scale", "rotation"]

    def value(key: str) -> float:
        if key == "scale":
            return round(rng.uniform(0.5, 2.0), 2)
        if key == "rotation":
            return float(rng.randrange(-45, 46))
        return float(rng.randrange(-960, 961))

    for _ in range(count):
        base = {key: value(key) for key in keys}
        shape = rng.choice(["apart", "apart", "added", "same_key", "same_change", "removed"])
        k1, k2 = rng.sample(keys, 2)
        v1, v2 = value(k1), value(k2)
        if shape == "apart":
            cur, inc = {**base, k1: v1}, {**base, k2: v2}
            gen.add("object", base, cur, inc, [{**base, k1: v1, k2: v2}], prop="transform")
        elif shape == "added":
            opacity = round(rng.uniform(0, 1), 2)
            cur, inc = {**base, k1: v1}, {**base, "opacity": opacity}
            gen.add("object", base, cur, inc, [{**base, k1: v1, "opacity": opacity}],
                    prop="transform")  # fmt: skip
        elif shape == "same_change":
            cur, inc = {**base, k1: v1, k2: v2}, {**base, k1: v1}
            gen.add("object", base, cur, inc, [cur], prop="transform")
        elif shape == "same_key":
            other = value(k1)
            if other == v1 or v1 == base[k1] or other == base[k1]:
                continue
            cur, inc = {**base, k1: v1}, {**base, k1: other, k2: v2}
            gen.add("object_conflict", base, cur, inc, prop="transform")
        else:
            cur = {k: v for k, v in base.items() if k != k1}
            inc = {**base, k1: v1} if v1 != base[k1] else {**base, k1: v1 + 1}
            gen.add("object_conflict", base, cur, inc, prop="transform")


def _clips(gen: _Gen, count: int) -> None:
    rng = gen.rng
    labels = ["Intro", "Harbour", "Market", "Interview", "Bells", "Storm", "Night", "Credits"]

    def clip(n: int) -> dict[str, Any]:
        return {"id": f"c{n}", "label": labels[n % len(labels)], "start": float(n * 4)}

    def with_new(items: list[dict[str, Any]], after: int, new: dict[str, Any]) -> list[Any]:
        return [*items[: after + 1], new, *items[after + 1 :]]

    for _ in range(count):
        size = rng.randrange(3, 7)
        base = [clip(n) for n in range(1, size + 1)]
        shape = rng.choice(["reorder_add", "remove_edit", "add_add", "add_add_same", "edit_edit",
                            "reorder_reorder", "remove_changed", "move_same"])  # fmt: skip
        new_a, new_b = clip(size + 1), clip(size + 2)
        if shape == "reorder_add":
            cur = base[:]
            i, j = rng.sample(range(size), 2)
            cur[i], cur[j] = cur[j], cur[i]
            after = rng.randrange(size)
            inc = with_new(base, after, new_a)
            before = base[after]["id"]
            answer = with_new(cur, next(k for k, c in enumerate(cur) if c["id"] == before), new_a)
            gen.add("items", base, cur, inc, [answer], prop="clips")
        elif shape == "remove_edit":
            i, j = rng.sample(range(size), 2)
            cur = [c for k, c in enumerate(base) if k != i]
            edited = {**base[j], "label": base[j]["label"] + " (alt)"}
            inc = [edited if k == j else c for k, c in enumerate(base)]
            answer = [edited if c["id"] == edited["id"] else c for c in cur]
            gen.add("items", base, cur, inc, [answer], prop="clips")
        elif shape in ("add_add", "add_add_same"):
            i = rng.randrange(size)
            j = i if shape == "add_add_same" else rng.choice([k for k in range(size) if k != i])
            cur, inc = with_new(base, i, new_a), with_new(base, j, new_b)
            if i == j:
                answers = [[*base[: i + 1], x, y, *base[i + 1 :]]
                           for x, y in ((new_a, new_b), (new_b, new_a))]  # fmt: skip
            else:
                first, second = (i, new_a), (j, new_b)
                if j < i:
                    first, second = second, first
                answers = [with_new(with_new(base, second[0], second[1]), first[0], first[1])]
            gen.add("items", base, cur, inc, answers, prop="clips")
        elif shape == "edit_edit":
            i, j = rng.sample(range(size), 2)
            cur = [{**c, "start": c["start"] + 1.5} if k == i else c for k, c in enumerate(base)]
            inc = [{**c, "label": c["label"] + " v2"} if k == j else c for k, c in enumerate(base)]
            answer = [cur[k] if k == i else inc[k] if k == j else c for k, c in enumerate(base)]
            gen.add("items", base, cur, inc, [answer], prop="clips")
        elif shape == "reorder_reorder":
            cur, inc = base[:], base[:]
            cur.reverse()
            inc = [*inc[1:], inc[0]]
            gen.add("items_conflict", base, cur, inc, prop="clips")
        elif shape == "remove_changed":
            i = rng.randrange(size)
            cur = [c for k, c in enumerate(base) if k != i]
            inc = [{**c, "label": c["label"] + " (final)"} if k == i else c
                   for k, c in enumerate(base)]  # fmt: skip
            gen.add("items_conflict", base, cur, inc, prop="clips")
        else:
            # Both moved the same clip, to different places.
            moved = base[0]
            rest = base[1:]
            cur = [*rest[:1], moved, *rest[1:]]
            inc = [*rest, moved]
            if len(rest) < 2:
                continue
            gen.add("items_conflict", base, cur, inc, prop="clips")


def _deletes(gen: _Gen, count: int) -> None:
    rng = gen.rng
    for _ in range(count):
        base: dict[str, Any] = {"label": rng.choice(_TITLES),
                                "start": float(rng.randrange(0, 60)), "muted": False}  # fmt: skip
        if rng.random() < 0.4:
            gen.add("delete", base, dict(base), None, [None], op="delete")
        else:
            edited = {**base, "label": base["label"] + " (extended cut)"}
            gen.add("delete_edited", base, edited, None, op="delete")


def _cleared(gen: _Gen, count: int) -> None:
    rng = gen.rng
    for _ in range(count):
        base = rng.choice(_TITLES + _NOTES)
        shape = rng.random()
        if shape < 0.5:
            gen.add("cleared", base, "", base, [""], prop=rng.choice(["label", "notes"]))
        elif shape < 0.7:
            gen.add("identical", base, "", "", [""], prop="notes")
        else:
            ws = base.split()
            added = " ".join([*ws, *rng.choice(_EN_INSERTS)])
            gen.add("fragment", base, "", added, prop="label")


def _lines(text: str) -> list[str]:
    return text.split("\n")


def _multiline(gen: _Gen, count: int) -> None:
    """Notes of several lines: each side edits words of a different line, or adds a line."""
    rng = gen.rng
    for _ in range(count):
        lines = [line.split() for line in rng.sample(_LINES, rng.randrange(3, 6))]
        i, j = sorted(rng.sample(range(len(lines)), 2))
        if j - i < 2 and rng.random() < 0.5:
            j = len(lines)  # a new last line
        cur_lines = [list(line) for line in lines]
        inc_lines = [list(line) for line in lines]
        cur_lines[i] = _apply(lines[i], gen.word_op(lines[i], _EN_WORDS, _EN_INSERTS, "replace"))
        if j == len(lines):
            inc_lines.append(["Scene", str(j + 1) + ":", "wrap", "party", "at", "the", "harbour"])
        else:
            inc_lines[j] = _apply(lines[j], gen.word_op(lines[j], _EN_WORDS, _EN_INSERTS))
        both = [cur_lines[k] if k == i else inc_lines[k] for k in range(len(inc_lines))]

        def text(ls: Sequence[Sequence[str]]) -> str:
            return "\n".join(" ".join(line) for line in ls)

        gen.add("multiline", text(lines), text(cur_lines), text(inc_lines), [text(both)],
                prop="notes")  # fmt: skip


#: Every category of :func:`generate`'s cases.
CATEGORIES: Final = (
    "title", "notes", "multiline", "rtl_arabic", "rtl_hebrew", "cjk_chinese", "cjk_japanese",
    "emoji", "move", "cleared", "identical", "same_words", "same_place", "fragment", "number",
    "boolean", "object", "object_conflict", "items", "items_conflict", "delete", "delete_edited",
)  # fmt: skip


def generate(seed: int = DEFAULT_SEED, *, scale: int = 1) -> list[Case]:
    """The corpus for ``seed``: about 720 cases per unit of ``scale``, the same for the same
    seed on every machine (Python's :class:`random.Random` is specified)."""
    gen = _Gen(seed)
    for _ in range(scale):
        gen.text_cases("title", _TITLES, _EN_WORDS, _EN_INSERTS, 40)
        gen.text_cases("notes", _NOTES, _EN_WORDS, _EN_INSERTS, 40, prop="notes")
        gen.text_cases("rtl_arabic", _AR, _AR_WORDS, [[w] for w in _AR_WORDS], 20)
        gen.text_cases("rtl_hebrew", _HE, _HE_WORDS, [[w] for w in _HE_WORDS], 20)
        gen.text_cases("cjk_chinese", _ZH, _CJK_CHARS, [[c] for c in _CJK_CHARS], 20,
                       joiner="", split=list)  # fmt: skip
        gen.text_cases("cjk_japanese", _JA, _CJK_CHARS, [[c] for c in _CJK_CHARS], 16,
                       joiner="", split=list)  # fmt: skip
        gen.text_cases("emoji", _EMOJI, _EN_WORDS, _EMOJI_INSERTS, 20)
        for _ in range(30):
            base = gen.rng.choice(_NOTES).split()
            a, b = gen.apart_edits(base, _EN_WORDS, _EN_INSERTS, ("move", None))
            gen.add("move", " ".join(base), " ".join(_apply(base, a)), " ".join(_apply(base, b)),
                    [" ".join(_apply(base, [*a, *b]))], prop="notes")  # fmt: skip
        _multiline(gen, 30)
        _cleared(gen, 30)
        _numbers(gen, 40)
        _booleans(gen, 20)
        _transforms(gen, 60)
        _clips(gen, 80)
        _deletes(gen, 20)
    return gen.cases


def by_category(cases: Sequence[Case]) -> Iterator[tuple[str, list[Case]]]:
    """The cases grouped by category, in :data:`CATEGORIES` order."""
    for category in CATEGORIES:
        group = [case for case in cases if case.category == category]
        if group:
            yield category, group

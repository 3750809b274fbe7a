"""The conflict strategies over the generated corpus (crealia/strategies/corpus.py).

Runs every case through ``merge``, ``priority`` and the ``ai`` strategy's offline model, and
prints: how many cases merge settles cleanly and how many of those are right, wrong clean merges
(a clean merge of a case that needs a person, or a value not among the case's answers), clean
merges that drop a word of a side, fragments merged, a per-category table, µs per merge, and
calibration tables (confidence bucket -> count, % right) for merge and for the model, with the
threshold under which resolutions should be marked for review to keep >= 98 % right above it.

"Right" is: the value is one of the case's answers; for a case that needs a person, a side
pick is right when it is the side the person kept (the corpus's simulated reviewer: see
corpus.py), and a merge is never right. The model is fitted on another seed's corpus, so its
figures here are out of sample.

    python benchmarks/conflicts.py [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from crealia._model import Resolution
from crealia.strategies.ai import AIRequest, OfflineProvider
from crealia.strategies.corpus import DEFAULT_SEED, Case, by_category, generate, is_right
from crealia.strategies.corpus import word_problems as drops
from crealia.strategies.merge import json_equal, merge_conflict
from crealia.strategies.priority import PriorityStrategy

BUCKETS = ((0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 0.95), (0.95, 1.0), (1.0, 1.01))
TARGET = 0.98


def pick_right(case: Case, value: Any) -> bool:
    """Whether a strategy's value for ``case`` is right (see the module documentation)."""
    if case.needs_person:
        kept = case.current if case.keep == "current" else case.incoming
        return case.keep is not None and json_equal(value, kept)
    return is_right(case, value)


def calibration(rows: Sequence[tuple[float, bool]]) -> list[dict[str, Any]]:
    table = []
    for low, high in BUCKETS:
        inside = [right for conf, right in rows if low <= conf < high]
        confs = [conf for conf, _ in rows if low <= conf < high]
        if inside:
            table.append({
                "bucket": f"{low:.2f}-{min(high, 1.0):.2f}" if high <= 1.0 else "1.00",
                "count": len(inside),
                "mean_confidence": round(sum(confs) / len(confs), 3),
                "right_pct": round(100 * sum(inside) / len(inside), 1),
            })  # fmt: skip
    return table


def threshold(rows: Sequence[tuple[float, bool]]) -> float | None:
    """The least confidence t such that resolutions at t or above are >= TARGET right."""
    for t in sorted({conf for conf, _ in rows}):
        above = [right for conf, right in rows if conf >= t]
        if above and sum(above) / len(above) >= TARGET:
            return t
    return None


async def run(cases: Sequence[Case]) -> dict[str, Any]:
    priority = PriorityStrategy()
    model = OfflineProvider()
    merges: dict[str, Any] = {}
    started = time.perf_counter()
    for case in cases:
        merges[case.id] = merge_conflict(case.conflict())
    merge_us = (time.perf_counter() - started) / len(cases) * 1e6
    per_category = []
    merge_rows: list[tuple[float, bool]] = []
    model_rows: list[tuple[float, bool]] = []
    model_after_merge: list[tuple[float, bool]] = []
    totals = {"cases": len(cases), "needs_person": 0, "clean": 0, "clean_right": 0,
              "wrong_clean": 0, "word_drops": 0, "fragments": 0, "fragments_merged": 0,
              "identical": 0, "identical_merged": 0, "priority_right": 0, "model_right": 0,
              "chain_right": 0}  # fmt: skip
    wrong_clean: list[str] = []
    for category, group in by_category(cases):
        row = {"category": category, "cases": len(group), "clean": 0, "right": 0,
               "priority_right": 0, "model_right": 0}  # fmt: skip
        for case in group:
            conflict = case.conflict()
            outcome = merges[case.id]
            pick = await priority.resolve(conflict, case.context(conflict))
            assert isinstance(pick, Resolution)
            answer = model.weigh(AIRequest.from_conflict(conflict, case.context(conflict)))
            model_value = case.current if answer.choice == "current" else case.incoming
            model_ok = pick_right(case, model_value)
            model_rows.append((answer.confidence, model_ok))
            totals["needs_person"] += case.needs_person
            totals["fragments"] += case.category == "fragment"
            totals["identical"] += case.category == "identical"
            row["priority_right"] += pick_right(case, pick.value)
            row["model_right"] += model_ok
            if outcome is None:
                model_after_merge.append((answer.confidence, model_ok))
                totals["chain_right"] += pick_right(case, pick.value)
                continue
            right = not case.needs_person and is_right(case, outcome.value)
            row["clean"] += 1
            row["right"] += right
            totals["chain_right"] += right
            merge_rows.append((outcome.confidence, right))
            if not right:
                wrong_clean.append(case.id)
            totals["word_drops"] += bool(
                drops(case.base, case.current, case.incoming, outcome.value)
            )
            totals["fragments_merged"] += case.category == "fragment"
            totals["identical_merged"] += case.category == "identical"
        for key in ("clean", "priority_right", "model_right"):
            totals[key] += row[key]
        totals["clean_right"] += row["right"]
        per_category.append(row)
    totals["wrong_clean"] = len(wrong_clean)
    n = len(cases)
    return {
        "seed": None,
        "totals": totals,
        "clean_pct": round(100 * totals["clean"] / n, 1),
        "right_of_clean_pct": round(100 * totals["clean_right"] / max(1, totals["clean"]), 1),
        "merge_right_overall_pct": round(100 * totals["clean_right"] / n, 1),
        "chain_right_overall_pct": round(100 * totals["chain_right"] / n, 1),
        "priority_right_pct": round(100 * totals["priority_right"] / n, 1),
        "model_right_pct": round(100 * totals["model_right"] / n, 1),
        "us_per_merge": round(merge_us, 1),
        "wrong_clean_merges": wrong_clean,
        "per_category": per_category,
        "calibration": {
            "merge": calibration(merge_rows),
            "model_all_cases": calibration(model_rows),
            "model_after_merge": calibration(model_after_merge),
        },
        "review_threshold": {
            "merge": threshold(merge_rows),
            "model_after_merge": threshold(model_after_merge),
            "target_right_pct": 100 * TARGET,
        },
        "model": dict(model.model.trained_on),
    }


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    for r in rows:
        lines.append("  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    t = result["totals"]
    out = [
        f"corpus seed {result['seed']}: {t['cases']} cases, {t['needs_person']} need a person",
        f"merge: clean {t['clean']} ({result['clean_pct']} %), right {t['clean_right']} "
        f"({result['right_of_clean_pct']} % of clean, {result['merge_right_overall_pct']} % of "
        f"all), wrong clean merges {t['wrong_clean']}, clean merges dropping a word "
        f"{t['word_drops']}, fragments merged {t['fragments_merged']} of {t['fragments']}, "
        f"identical edits merged {t['identical_merged']} of {t['identical']}, "
        f"{result['us_per_merge']} µs per merge",
        f"wrong clean merges: {', '.join(result['wrong_clean_merges']) or 'none'}",
        f"merge then priority: right {result['chain_right_overall_pct']} % of all; priority "
        f"alone {result['priority_right_pct']} %; the offline model alone "
        f"{result['model_right_pct']} %",
        "",
        _table(result["per_category"],
               ["category", "cases", "clean", "right", "priority_right", "model_right"]),
    ]  # fmt: skip
    for name, rows in result["calibration"].items():
        out += ["", f"calibration: {name}",
                _table(rows, ["bucket", "count", "mean_confidence", "right_pct"])]  # fmt: skip
    th = result["review_threshold"]
    out += [
        "",
        f"review below (to keep >= {th['target_right_pct']:.0f} % right above): merge "
        f"{th['merge']}, the model after merge {th['model_after_merge']}",
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = parser.parse_args(argv)
    result = trio.run(run, generate(args.seed))
    result["seed"] = args.seed
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fitting the ``ai`` strategy's offline model (``crealia strategies train``).

The model (:class:`~crealia.strategies.ai.OfflineModel`) is a logistic regression without
intercept over :func:`~crealia.strategies.ai.features`, whose margin is calibrated into a
confidence by isotonic regression: the margins come from a 5-fold cross-validation (each one
from a fit that did not see its example), so the calibration measures how often answers of each
margin were right on data the model had not been fitted on. scikit-learn does the fitting and is
imported here only, when training: the server evaluates the stored weights and calibration
points itself (a sum and an interpolation), with nothing heavier than the standard library.

What it is fitted on: :func:`corpus_examples`, the cases of the generated corpus
(:mod:`crealia.strategies.corpus`) that need a person, labelled with its simulated reviewer's
choice; and :func:`resolution_examples`, a project's conflicts settled by hand
(``resolution.strategy == "manual"``, ``choice`` ``current`` or ``incoming``), whose context
(presence, recency) was not stored, so only the sides' sizes and the roles inform them. A
``set`` example is also used mirrored (the two sides exchanged, the label flipped), which keeps
the fitted model exactly symmetric.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypeAlias

from .._model import Conflict
from .._strategy import Participant, ResolutionContext
from .ai import FEATURES, AIRequest, OfflineModel, features
from .corpus import Case, generate

__all__ = ["Example", "corpus_examples", "resolution_examples", "train"]

#: A decided conflict: the request a provider would be given, and the side a person kept.
Example: TypeAlias = tuple[AIRequest, Literal["current", "incoming"]]
#: The corpus seed the shipped model is fitted on (the tests and benchmark use seed 0).
TRAINING_SEED = 1
#: Corpus scale of the shipped model (about 250 cases needing a person per unit).
TRAINING_SCALE = 4


def case_request(case: Case) -> AIRequest:
    """The request the ``ai`` strategy would make for ``case``."""
    conflict = case.conflict()
    return AIRequest.from_conflict(conflict, case.context(conflict))


def corpus_examples(cases: Iterable[Case]) -> list[Example]:
    """The cases that need a person, with the side the corpus's simulated reviewer kept."""
    return [(case_request(c), c.keep) for c in cases if c.needs_person and c.keep is not None]


def _who(conflict: Conflict, side: dict[str, Any]) -> Participant:
    user = side.get("user_id")
    return Participant(user_id=user, role=conflict.roles.get(str(user)))


def resolution_examples(conflicts: Iterable[Conflict]) -> list[Example]:
    """Conflicts settled by hand by keeping one side (``manual``, ``current``/``incoming``),
    as examples; others are skipped. Presence and recency were not stored with the conflict, so
    they count as unknown; the roles come from the conflict."""
    out: list[Example] = []
    for conflict in conflicts:
        resolution = conflict.resolution or {}
        choice = resolution.get("choice")
        if resolution.get("strategy") != "manual" or choice not in ("current", "incoming"):
            continue

        context = ResolutionContext(
            project_id=conflict.project_id,
            conflict=conflict,
            current=_who(conflict, conflict.current),
            incoming=_who(conflict, conflict.incoming),
            now=conflict.created_at,
        )
        out.append((AIRequest.from_conflict(conflict, context), choice))
    return out


def train(examples: Sequence[Example], *, trained_on: dict[str, Any] | None = None) -> OfflineModel:
    """Fit the offline model on ``examples`` (see the module documentation).

    Raises:
        ValueError: fewer than 20 examples, or all of them keeping the same side.
    """
    # Heavy (about 1.5 s to import), and only training needs them.
    import numpy as np
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rows: list[list[float]] = []
    labels: list[int] = []
    for request, keep in examples:
        values = features(request)
        row = [values[name] for name in FEATURES]
        rows.append(row)
        labels.append(1 if keep == "current" else 0)
        if request.op == "set":
            rows.append([-x for x in row])
            labels.append(0 if keep == "current" else 1)
    if len(examples) < 20 or len(set(labels)) < 2:
        raise ValueError(f"training needs at least 20 decided conflicts, got {len(examples)}")
    x, y = np.array(rows), np.array(labels)
    model = LogisticRegression(fit_intercept=False, C=1.0, max_iter=1000)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    margins = cross_val_predict(model, x, y, cv=folds, method="decision_function")
    right = ((margins >= 0) == (y == 1)).astype(float)
    calibration = IsotonicRegression(y_min=0.5, y_max=1.0, increasing=True, out_of_bounds="clip")
    calibration.fit(np.abs(margins), right)
    model.fit(x, y)
    info = {
        **(trained_on or {}),
        "examples": len(examples),
        "method": "logistic regression (no intercept), isotonic calibration of |margin| "
        "on 5-fold cross-validated margins",
    }
    return OfflineModel(
        weights=tuple(round(float(w), 6) for w in model.coef_[0]),
        calibration_x=tuple(round(float(v), 6) for v in calibration.X_thresholds_),
        calibration_y=tuple(round(float(v), 6) for v in calibration.y_thresholds_),
        trained_on=info,
    )


def default_examples() -> list[Example]:
    """The examples the shipped model is fitted on: the corpus of :data:`TRAINING_SEED`."""
    return corpus_examples(generate(TRAINING_SEED, scale=TRAINING_SCALE))

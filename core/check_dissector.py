"""How well a dissector sees the annotated concepts: AUROC of P against ground truth.

A dissector that cannot tell images with a concept from images without it
cannot label a unit with that concept.  Given P [N x M] from a dissector and
the annotation dissector's ground truth [N x G] (1 where an image is
annotated with a concept) on the same probe images, :func:`check_dissector`
returns, for each annotated concept that both cover, the AUROC of the
dissector's similarity as a score for the annotation, with a percentile
bootstrap interval.

A concept is flagged ``near_chance`` when its 95% bootstrap interval
includes 0.5: on this probe set the dissector's score for that concept is
not distinguishable from a random one, and labels naming it are not
supported by the dissector.  AUROC below 0.5 with an interval above chance
is flagged ``inverted``.  A concept with no positive or no negative image
has no AUROC (``undefined``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mammo_dissect.core.errors import ConfigError


@dataclass(frozen=True)
class ConceptCheck:
    """AUROC of one annotated concept with its bootstrap interval."""

    concept: str
    n_positive: int
    n_negative: int
    auroc: float | None
    ci_low: float | None
    ci_high: float | None
    #: ``ok``, ``near_chance``, ``inverted`` or ``undefined``.
    status: str

    @property
    def near_chance(self) -> bool:
        return self.status == "near_chance"


def auroc(scores: Any, labels: Any) -> float:
    """Return the area under the ROC curve of ``scores`` for binary ``labels``.

    Computed as the Mann-Whitney U statistic with average ranks, so tied
    scores count one half.  Raises :class:`ConfigError` when the labels are
    not all 0 or 1, or when a class is empty.
    """
    values = np.asarray(scores, dtype=np.float64).ravel()
    truth = np.asarray(labels).ravel()
    if values.shape != truth.shape:
        raise ConfigError(f"scores and labels differ in length: {values.shape[0]} vs {truth.shape[0]}")
    if not np.isin(truth, (0, 1)).all():
        raise ConfigError("labels must be 0 or 1")
    positive = truth == 1
    n_positive = int(positive.sum())
    n_negative = int(truth.size - n_positive)
    if n_positive == 0 or n_negative == 0:
        raise ConfigError(f"AUROC needs positive and negative images, got {n_positive} and {n_negative}")
    ranks = average_ranks(values)
    rank_sum = ranks[positive].sum()
    return float((rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Return 1-based ranks of ``values``, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(values.size, dtype=np.float64)
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + 1 + end) / 2.0
    return ranks


def bootstrap_interval(
    scores: np.ndarray,
    labels: np.ndarray,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Return the percentile bootstrap interval of the AUROC, resampling positives and negatives separately.

    Stratified resampling keeps both classes in every resample, so every
    resample has an AUROC.
    """
    rng = np.random.default_rng(seed)
    positives = scores[labels == 1]
    negatives = scores[labels == 0]
    truth = np.r_[np.ones(positives.size), np.zeros(negatives.size)]
    values = np.empty(resamples)
    for index in range(resamples):
        sample = np.r_[rng.choice(positives, positives.size), rng.choice(negatives, negatives.size)]
        values[index] = auroc(sample, truth)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def check_dissector(
    similarity: Any,
    concepts: Sequence[str],
    ground_truth: Any,
    annotated_concepts: Sequence[str],
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> list[ConceptCheck]:
    """Return one :class:`ConceptCheck` per annotated concept that the dissector also scores.

    ``similarity`` is the dissector's P [N x M] with columns ``concepts``;
    ``ground_truth`` is the annotation dissector's [N x G] with columns
    ``annotated_concepts``.  Concepts are matched case-insensitively after
    collapsing whitespace; annotated concepts the dissector did not score are
    skipped.
    """
    scores = np.asarray(similarity, dtype=np.float64)
    truth = np.asarray(ground_truth, dtype=np.float64)
    if scores.ndim != 2 or truth.ndim != 2 or scores.shape[0] != truth.shape[0]:
        raise ConfigError(
            f"P and the ground truth must be 2-D with the same number of images, got {scores.shape} and {truth.shape}"
        )
    if scores.shape[1] != len(concepts) or truth.shape[1] != len(annotated_concepts):
        raise ConfigError("the concept lists must name the columns of P and of the ground truth")
    columns = {normalise(concept): index for index, concept in enumerate(concepts)}
    results = []
    for gt_index, concept in enumerate(annotated_concepts):
        column = columns.get(normalise(concept))
        if column is None:
            continue
        labels = (truth[:, gt_index] > 0.5).astype(np.int64)
        n_positive = int(labels.sum())
        n_negative = int(labels.size - n_positive)
        if n_positive == 0 or n_negative == 0:
            results.append(ConceptCheck(concept, n_positive, n_negative, None, None, None, "undefined"))
            continue
        value = auroc(scores[:, column], labels)
        low, high = bootstrap_interval(scores[:, column], labels, resamples, level, seed)
        if low <= 0.5 <= high:
            status = "near_chance"
        elif high < 0.5:
            status = "inverted"
        else:
            status = "ok"
        results.append(ConceptCheck(concept, n_positive, n_negative, value, low, high, status))
    return results


def normalise(text: str) -> str:
    """Fold case and collapse whitespace, for matching concept names."""
    return " ".join(text.split()).casefold()

"""Sanity tests of similarity functions on synthetic units with known concepts.

Oikarinen, Yan & Weng ("Evaluating Neuron Explanations: A Unified Framework
with Sanity Checks", ICML 2025) proposed two tests of a neuron-explanation
metric.  Both start from a unit and the concept vector that describes it
exactly.  The "missing labels" test deletes positive labels from that vector
and the "extra labels" test sets labels on images without the concept.  A
metric passes when the exact vector scores higher than the altered one.  In
that study Pearson correlation, cosine similarity, AUPRC, F1 and IoU passed
both tests.

This module builds the altered labels from other concepts, so every
explanation is a column of one concept matrix P.  Each test then checks the
order in which a similarity function ranks concepts for a unit, and that
order decides the unit's label:

* missing-label test: a unit fires on the union of two concepts c and c'.
  The union must score strictly higher than c alone and than c' alone,
  since each part misses labels the unit fires on.
* extra-label test: a unit fires on concept c only.  c must score strictly
  higher than the union of c and another concept c'', which carries labels
  on images where the unit is silent.

A test passes when at least :data:`REQUIRED_FRACTION` of its comparisons
hold.  The data are synthetic (:func:`synthetic_ground_truth`), so the same
seed gives the same numbers on every machine up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any


if TYPE_CHECKING:
    import torch

    from mammo_dissect.core.types import SimilarityFunction


#: Probe images, base concepts and activation noise of the synthetic data.
N_IMAGES = 400
N_BASE_CONCEPTS = 20
#: Concept prevalences rise linearly from the first to the last base concept.
PREVALENCE_RANGE = (0.05, 0.30)
#: Standard deviation of the Gaussian noise added to every activation (the
#: activation is 1 on the unit's images and 0 elsewhere before the noise).
NOISE_STD = 0.1
#: Share of a test's comparisons that must hold for the test to pass.
REQUIRED_FRACTION = 0.9

MISSING_LABEL = "missing label"
EXTRA_LABEL = "extra label"


@dataclass(frozen=True)
class SyntheticGroundTruth:
    """Binary concept matrix, unit activations and the comparisons the two tests make.

    Each comparison is (unit, complete concept column, altered concept column):
    the unit's score for the complete column should exceed its score for the
    altered one.
    """

    P: torch.Tensor
    A: torch.Tensor
    concept_names: list[str]
    comparisons: dict[str, list[tuple[int, int, int]]]


@dataclass(frozen=True)
class SanityResult:
    """Outcome of one sanity test for one similarity function."""

    function: str
    #: Parameters passed to the function (empty for its defaults).
    params: dict[str, Any]
    test: str
    comparisons: int
    #: Comparisons in which the complete explanation scored strictly higher.
    held: int
    #: Mean score of the complete explanations and of the altered ones.
    mean_complete: float
    mean_altered: float
    seed: int
    required_fraction: float = REQUIRED_FRACTION
    #: (unit, complete column, altered column) of every comparison that failed.
    failures: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        """Share of comparisons that held."""
        return self.held / self.comparisons if self.comparisons else 0.0

    @property
    def passed(self) -> bool:
        """Whether at least ``required_fraction`` of the comparisons held."""
        return self.comparisons > 0 and self.fraction >= self.required_fraction


def synthetic_ground_truth(seed: int = 0) -> SyntheticGroundTruth:
    """Build 400 images, 40 binary concept columns and 30 units with known concepts.

    Columns 0-19 are base concepts; base concept c is present on exactly
    round(prevalence_c * 400) images drawn at random, with prevalences from
    5% to 30%.  Column 20 + c is the union of base concepts c and c + 1
    (modulo 20).  Units 0-19 fire on base concept k.  Units 20-29 fire on
    the union of base concepts 2i and 2i + 1 (column 20 + 2i).  Every
    activation is 1 on the unit's images and 0 elsewhere, plus Gaussian
    noise of standard deviation NOISE_STD.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    low, high = PREVALENCE_RANGE
    prevalences = torch.linspace(low, high, N_BASE_CONCEPTS, dtype=torch.float64)
    base = torch.zeros(N_IMAGES, N_BASE_CONCEPTS, dtype=torch.float32)
    for concept, prevalence in enumerate(prevalences.tolist()):
        count = round(prevalence * N_IMAGES)
        images = torch.randperm(N_IMAGES, generator=generator)[:count]
        base[images, concept] = 1.0

    successors = [(concept + 1) % N_BASE_CONCEPTS for concept in range(N_BASE_CONCEPTS)]
    unions = torch.maximum(base, base[:, successors])
    P = torch.cat([base, unions], dim=1)
    names = [f"c{concept}" for concept in range(N_BASE_CONCEPTS)]
    names += [f"c{concept} | c{successor}" for concept, successor in enumerate(successors)]

    union_columns = [N_BASE_CONCEPTS + concept for concept in range(0, N_BASE_CONCEPTS, 2)]
    firing = torch.cat([base, P[:, union_columns]], dim=1)
    noise = torch.randn(firing.shape, generator=generator, dtype=torch.float32)
    A = firing + NOISE_STD * noise

    extra = [(unit, unit, N_BASE_CONCEPTS + unit) for unit in range(N_BASE_CONCEPTS)]
    missing = []
    for offset, column in enumerate(union_columns):
        unit = N_BASE_CONCEPTS + offset
        first = column - N_BASE_CONCEPTS
        missing.append((unit, column, first))
        missing.append((unit, column, successors[first]))
    return SyntheticGroundTruth(
        P=P,
        A=A,
        concept_names=names,
        comparisons={MISSING_LABEL: missing, EXTRA_LABEL: extra},
    )


def run_sanity_checks(
    similarity: SimilarityFunction,
    params: dict[str, Any] | None = None,
    seed: int = 0,
) -> list[SanityResult]:
    """Run the missing-label and extra-label tests for ``similarity`` on synthetic units.

    ``params`` are passed to the similarity function (unknown names raise
    :class:`~mammo_dissect.core.errors.ConfigError`).  Returns one result per
    test, missing label first.
    """
    data = synthetic_ground_truth(seed)
    given = dict(params or {})
    scores = similarity(data.P, data.A, **given).detach().cpu().double()

    results = []
    for test in (MISSING_LABEL, EXTRA_LABEL):
        comparisons = data.comparisons[test]
        complete = [float(scores[unit, good]) for unit, good, _ in comparisons]
        altered = [float(scores[unit, bad]) for unit, _, bad in comparisons]
        failures = [comparison for comparison, good, bad in zip(comparisons, complete, altered) if not good > bad]
        results.append(
            SanityResult(
                function=similarity.name,
                params=given,
                test=test,
                comparisons=len(comparisons),
                held=len(comparisons) - len(failures),
                mean_complete=sum(complete) / len(complete),
                mean_altered=sum(altered) / len(altered),
                seed=seed,
                failures=failures,
            )
        )
    return results


def format_sanity_table(results: Sequence[SanityResult]) -> str:
    """Format results as a Markdown table with one row per function and test."""
    header = [
        "| function | params | test | held | mean score (complete) | mean score (altered) | result |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = []
    for result in results:
        params = ", ".join(f"{key}={value}" for key, value in sorted(result.params.items())) or "defaults"
        verdict = "pass" if result.passed else "FAIL"
        rows.append(
            f"| {result.function} | {params} | {result.test} | {result.held}/{result.comparisons} | "
            f"{result.mean_complete:.4g} | {result.mean_altered:.4g} | {verdict} |"
        )
    return "\n".join(header + rows)

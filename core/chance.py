"""Chance controls: what the study's counts and label validity look like without evidence.

A run's labels are compared with the same pipeline (same target, layers,
activations, concept set and similarity function) under controls:

* ``random``: the random dissector (seeded random embeddings), one trial per seed.
  It bounds from below what a label carries: its validity is chance (about 0.5).
* ``shuffled_concepts``: the run's own dissector with the concept texts
  permuted relative to the dissector's columns, one trial per seed.  Each
  concept keeps its text and category but gets another concept's evidence.
* ``annotation``: the annotation dissector, whose P is the ground truth (the
  ceiling), when the probe set has annotations that match concepts.
* ``observed``: the run itself, for reference.

For every trial and layer the study's count (units whose top concept is a
mammography concept against a distractor, from the concepts'
``broad_category``, ``non-mammography`` being a distractor) and the mean
validity of the top labels (:mod:`mammo_dissect.core.validity`) are stored
in ``chance_counts``.  ``concept_null_wins`` counts, per control, how often
each concept was a unit's top label.  Null trials run without the
permutation baseline, because neither count uses it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import numpy as np
import pyarrow as pa

from mammo_dissect.core.errors import MammoDissectError
from mammo_dissect.core.validity import GroundTruth
from mammo_dissect.core.validity import ground_truth
from mammo_dissect.core.validity import unit_validity
from mammo_dissect.core.validity import write_rows


if TYPE_CHECKING:
    from mammo_dissect.core.config import RunConfig
    from mammo_dissect.core.pipeline import Plan
    from mammo_dissect.core.plugins import Registry
    from mammo_dissect.core.scoring import ConceptEvidence


logger = logging.getLogger(__name__)

#: Broad category of distractor concepts.
DISTRACTOR_CATEGORY = "non-mammography"


@dataclass
class ControlContext:
    """A prepared plan with its layers' activations, shared by all trials of one study."""

    plan: Plan
    run_id: str
    layer_names: list[str]
    activations: list[np.ndarray]
    truth: GroundTruth | None


@dataclass(frozen=True)
class Distribution:
    """Mean and 5th and 95th percentiles of a value over trials."""

    mean: float | None
    p05: float | None
    p95: float | None
    n_trials: int


@dataclass
class ChanceReport:
    """Rows written to ``chance_counts`` and ``concept_null_wins`` for one run."""

    run_id: str
    #: One dict per trial and layer, with the columns of ``chance_counts``.
    counts: list[dict[str, Any]]
    #: One dict per control and concept, with the columns of ``concept_null_wins`` plus ``concept``.
    null_wins: list[dict[str, Any]]

    def summary(self) -> dict[str, dict[str, dict[str, Distribution]]]:
        """Return by layer and control the distributions of ``mean_auroc`` and ``n_mammography``."""
        return summarise_counts(self.counts)


def distribution(values: Sequence[float | None]) -> Distribution:
    """Return the mean and 5th/95th percentiles (linear interpolation) of the values that are not None."""
    kept = np.array([value for value in values if value is not None and np.isfinite(value)], dtype=np.float64)
    if kept.size == 0:
        return Distribution(None, None, None, 0)
    return Distribution(
        float(kept.mean()), float(np.percentile(kept, 5)), float(np.percentile(kept, 95)), int(kept.size)
    )


def summarise_counts(counts: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Distribution]]]:
    """Group ``chance_counts`` rows by layer and control into distributions of their values."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in counts:
        grouped.setdefault(row["layer"], {}).setdefault(row["control"], []).append(row)
    return {
        layer: {
            control: {
                "mean_auroc": distribution([row["mean_auroc"] for row in rows]),
                "n_mammography": distribution([row["n_mammography"] for row in rows]),
                "n_distractor": distribution([row["n_distractor"] for row in rows]),
            }
            for control, rows in controls.items()
        }
        for layer, controls in grouped.items()
    }


# ---------------------------------------------------------------- shared steps


def study_run_id(config: RunConfig, registry: Registry | None, progress: bool, run_id: str | None) -> str:
    """Return ``run_id``, or run the study (stored in ``config.database``) and return its id."""
    from mammo_dissect.core.pipeline import run

    if run_id is not None:
        from mammo_dissect.core.store import Store

        with Store(Path(config.database)) as store:
            return store.resolve_run_id(run_id)
    outcome = run(config, registry, progress=progress)
    logger.info("study run %s stored in %s", outcome.run_id, outcome.database)
    return outcome.run_id


def control_context(
    config: RunConfig, run_id: str, registry: Registry | None = None, progress: bool = False
) -> ControlContext:
    """Prepare the study once without the permutation baseline and load its layers' activations."""
    from mammo_dissect.core.activations import cached_activations
    from mammo_dissect.core.pipeline import prepare

    plan = prepare(config.model_copy(update={"permutations": 0}), registry, progress=progress)
    layers = cached_activations(plan)
    truth = None
    if any(image.annotations for image in plan.probe_set.images):
        truth = ground_truth([list(image.annotations) for image in plan.probe_set.images])
    return ControlContext(
        plan=plan,
        run_id=run_id,
        layer_names=[item.layer.name for item in layers],
        activations=[np.asarray(item.load(), dtype=np.float32) for item in layers],
        truth=truth,
    )


def evidence_for_texts(plan: Plan, texts: Sequence[str]) -> ConceptEvidence:
    """Run the plan's dissector on ``texts`` in place of the plan's concepts."""
    from mammo_dissect.core.scoring import concept_evidence

    swapped = dataclasses.replace(plan, concepts=_renamed_concepts(plan, texts))
    return concept_evidence(swapped)


def _renamed_concepts(plan: Plan, texts: Sequence[str]) -> Any:
    from mammo_dissect.core.types import Concept

    renamed = [
        Concept(text, concept.category, concept.broad_category)
        for text, concept in zip(texts, plan.concepts.concepts, strict=True)
    ]
    return dataclasses.replace(plan.concepts, concepts=renamed)


def with_dissector(plan: Plan, name: str, options: dict[str, Any]) -> Plan:
    """Return the plan with another dissector, its options validated."""
    from mammo_dissect.core.types import validate_options

    dissector = plan.registry.get("dissector", name)
    validated = validate_options(dissector.Options, options, "dissector.options")
    return dataclasses.replace(plan, dissector=dissector, dissector_options=validated)


def permuted_evidence(evidence: ConceptEvidence, order: np.ndarray) -> ConceptEvidence:
    """Return the evidence with concept column j taken from concept ``order[j]``."""
    from mammo_dissect.core.scoring import ConceptEvidence

    index = np.asarray(order, dtype=np.int64)
    if evidence.P is not None:
        return ConceptEvidence(P=evidence.P[:, index])
    assert evidence.text_embeddings is not None
    return ConceptEvidence(image_embeddings=evidence.image_embeddings, text_embeddings=evidence.text_embeddings[index])


def image_subset_evidence(evidence: ConceptEvidence, rows: np.ndarray) -> ConceptEvidence:
    """Return the evidence of the probe images ``rows`` (repeats allowed), in that order."""
    from mammo_dissect.core.scoring import ConceptEvidence

    index = np.asarray(rows, dtype=np.int64)
    if evidence.P is not None:
        return ConceptEvidence(P=evidence.P[index])
    assert evidence.image_embeddings is not None
    return ConceptEvidence(image_embeddings=evidence.image_embeddings[index], text_embeddings=evidence.text_embeddings)


def top_concepts(plan: Plan, evidence: ConceptEvidence, activations: np.ndarray) -> np.ndarray:
    """Return each unit's top concept id [K] for activations [N x K] under ``evidence``."""
    import torch

    scores = evidence.score(plan, torch.from_numpy(np.array(activations, dtype=np.float32)))
    if not bool(torch.isfinite(scores).all()):
        raise MammoDissectError(
            f"similarity {plan.similarity.name!r} produced NaN or Inf; this is a bug in the similarity function"
        )
    return scores.argmax(dim=1).numpy().astype(np.int64)


# ---------------------------------------------------------------- chance controls


def count_trial(
    context: ControlContext, control: str, seed: int | None, tops: list[np.ndarray]
) -> list[dict[str, Any]]:
    """Return the ``chance_counts`` rows of one trial: the top concepts of every layer."""
    concepts = context.plan.concepts.concepts
    texts = [concept.text for concept in concepts]
    broad = np.array([concept.broad_category for concept in concepts], dtype=object)
    rows = []
    for layer_id, (name, activations, top) in enumerate(zip(context.layer_names, context.activations, tops, strict=True)):
        categories = broad[top]
        n_distractor = int(sum(category == DISTRACTOR_CATEGORY for category in categories))
        n_unknown = int(sum(category is None for category in categories))
        n_auroc, mean_auroc = 0, None
        if context.truth is not None:
            aurocs = unit_validity(activations, top, texts, context.truth)["auroc"]
            aurocs = aurocs[np.isfinite(aurocs)]
            n_auroc = int(aurocs.size)
            mean_auroc = float(aurocs.mean()) if aurocs.size else None
        rows.append({
            "layer_id": layer_id,
            "layer": name,
            "control": control,
            "seed": seed,
            "n_units": int(top.size),
            "n_mammography": int(top.size) - n_distractor - n_unknown,
            "n_distractor": n_distractor,
            "n_unknown_category": n_unknown,
            "n_auroc": n_auroc,
            "mean_auroc": mean_auroc,
        })
    return rows


def trial_tops(context: ControlContext, evidence: ConceptEvidence) -> list[np.ndarray]:
    """Return every layer's top concepts under ``evidence``."""
    return [top_concepts(context.plan, evidence, activations) for activations in context.activations]


def ceiling_evidence(context: ControlContext) -> ConceptEvidence | None:
    """Return the annotation dissector's evidence, or None when no concept is annotated."""
    from mammo_dissect.core.errors import ConceptSetError
    from mammo_dissect.core.errors import ProbeSetError
    from mammo_dissect.core.scoring import concept_evidence

    try:
        plan = with_dissector(context.plan, "annotation", {})
        plan.dissector.check(plan.dissector_options, plan.probe_set, plan.concepts.texts)
    except (ConceptSetError, ProbeSetError) as exc:
        logger.warning("no annotation-dissector ceiling: %s", exc)
        return None
    return concept_evidence(plan)


def chance_controls(
    config: RunConfig,
    seeds: int = 10,
    shuffled_concepts: int = 3,
    *,
    registry: Registry | None = None,
    progress: bool = False,
    run_id: str | None = None,
    dimension: int = 512,
    ceiling: bool = True,
) -> ChanceReport:
    """Run the study and its chance controls, and store the counts in ``config.database``.

    :param seeds: random-dissector trials (seeds 0 to ``seeds - 1``).
    :param shuffled_concepts: trials with the concept texts permuted (seeds 0 to n - 1).
    :param run_id: attach the controls to this stored run of ``config``
        instead of running the study first.
    :param dimension: embedding length of the random dissector.
    :param ceiling: add the annotation-dissector trial when the probe set has annotations.
    Earlier chance rows of the run are replaced.
    """
    if seeds < 0 or shuffled_concepts < 0:
        raise MammoDissectError(
            f"seeds={seeds} and shuffled_concepts={shuffled_concepts}: both must be 0 or more trials"
        )
    run_id = study_run_id(config, registry, progress, run_id)
    context = control_context(config, run_id, registry, progress)
    from mammo_dissect.core.scoring import concept_evidence

    observed = concept_evidence(context.plan)
    counts = count_trial(context, "observed", None, trial_tops(context, observed))
    wins: dict[str, np.ndarray] = {}
    n_concepts = len(context.plan.concepts.concepts)

    def add_wins(control: str, tops: list[np.ndarray]) -> None:
        total = wins.setdefault(control, np.zeros(n_concepts, dtype=np.int64))
        for top in tops:
            total += np.bincount(top, minlength=n_concepts)

    if ceiling and context.truth is not None:
        evidence = ceiling_evidence(context)
        if evidence is not None:
            counts += count_trial(context, "annotation", None, trial_tops(context, evidence))
    for seed in range(seeds):
        plan = with_dissector(context.plan, "random", {"seed": seed, "dimension": dimension})
        tops = trial_tops(context, concept_evidence(plan))
        counts += count_trial(context, "random", seed, tops)
        add_wins("random", tops)
        logger.info("random dissector seed %d done", seed)
    for seed in range(shuffled_concepts):
        order = np.random.default_rng([seed, 3]).permutation(n_concepts)
        tops = trial_tops(context, permuted_evidence(observed, order))
        counts += count_trial(context, "shuffled_concepts", seed, tops)
        add_wins("shuffled_concepts", tops)

    units = sum(activations.shape[1] for activations in context.activations)
    trials = {"random": seeds, "shuffled_concepts": shuffled_concepts}
    null_wins = [
        {
            "control": control,
            "concept_id": concept_id,
            "concept": context.plan.concepts.concepts[concept_id].text,
            "wins": int(total[concept_id]),
            "trials": units * trials[control],
        }
        for control, total in wins.items()
        for concept_id in range(n_concepts)
    ]
    store_chance(config, run_id, counts, null_wins)
    return ChanceReport(run_id=run_id, counts=counts, null_wins=null_wins)


def store_chance(config: RunConfig, run_id: str, counts: list[dict[str, Any]], null_wins: list[dict[str, Any]]) -> None:
    """Replace the run's rows of ``chance_counts`` and ``concept_null_wins`` in one transaction."""
    from mammo_dissect.core.store import Store

    count_columns = [
        "layer_id", "layer", "control", "seed", "n_units", "n_mammography", "n_distractor",
        "n_unknown_category", "n_auroc", "mean_auroc",
    ]
    tables = {"chance_counts": pa.Table.from_pylist([{key: row[key] for key in count_columns} for row in counts])}
    if null_wins:
        tables["concept_null_wins"] = pa.Table.from_pylist(
            [{key: row[key] for key in ("control", "concept_id", "wins", "trials")} for row in null_wins]
        )
    with Store(Path(config.database)) as store:
        write_rows(store, run_id, tables, {"chance_counts": "true", "concept_null_wins": "true"})

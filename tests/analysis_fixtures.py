"""Two small hand-made runs with known analysis results, for the analysis and comparison tests.

Runs ``run-a`` and ``run-b`` have the same probe set, concept set and
architecture: layer ``early`` (depth 1, 4 units, null baseline) and layer
``late`` (depth 2, 4 units, no baseline).  Scores are multiples of 1/16, so
float32 storage and means are exact and a score equal to a threshold passes.

=========  ================================  ========================  ==================
run/layer  top scores (unit 0..3)            top concept ids            layer mean
=========  ================================  ========================  ==================
A early    0.75, 0.5, 0.5, 0.25              3, 0, 4, 2                 0.5 (null p95 0.5625)
A late     0.5, 0.375, 0.25, 0.125           3, 3, 0, 1                 0.3125
B early    1.0, 0.75, 0.5, 0.25              0, 1, 3, 2                 0.625 (null p95 0.875)
B late     1.0, 0.875, 0.5, 0.125            1, 0, 0, 3                 0.625
=========  ================================  ========================  ==================

Global thresholds: ``early`` max(0.5, 0.625) = 0.625, ``late`` max(0.3125, 0.625) = 0.625.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from mammo_dissect.core.results import ConceptRecord
from mammo_dissect.core.results import LayerRecord
from mammo_dissect.core.results import RunResults
from mammo_dissect.core.results import UnitTables
from mammo_dissect.core.store import Store
from mammo_dissect.tests.store_fixtures import HOSTILE_CONCEPT
from mammo_dissect.tests.store_fixtures import make_results
from mammo_dissect.tests.store_fixtures import unit_tables_from_rows


#: (text, category, broad category); the hostile concept has no category (unknown).
CONCEPTS = (
    ("fatty tissue", "density", "breast anatomy or structure"),
    ("dense-glandular tissue", "density", "breast anatomy or structure"),
    ("spiculated mass", "mass", "findings and characterisations"),
    ("aircraft", "objects", "non-mammography"),
    (HOSTILE_CONCEPT, None, None),
    ("calcification", "calcification morphology", "findings and characterisations"),
)

#: run -> layer name -> (top scores, top concept ids, p-values or None)
RUN_UNITS: dict[str, dict[str, tuple[list[float], list[int], list[float] | None]]] = {
    "run-a": {
        "early": ([0.75, 0.5, 0.5, 0.25], [3, 0, 4, 2], [0.1, 0.2, 0.3, 0.8]),
        "late": ([0.5, 0.375, 0.25, 0.125], [3, 3, 0, 1], None),
    },
    "run-b": {
        "early": ([1.0, 0.75, 0.5, 0.25], [0, 1, 3, 2], [0.01, 0.02, 0.5, 0.9]),
        "late": ([1.0, 0.875, 0.5, 0.125], [1, 0, 0, 3], None),
    },
}
NULL_P95 = {"run-a": 0.5625, "run-b": 0.875}
LAYERS = ("early", "late")
TOP_IMAGES = 2


def _unit_tables(units: dict[str, tuple[list[float], list[int], list[float] | None]], n_images: int) -> UnitTables:
    labels: list[tuple[int, int, int, int, float]] = []
    images: list[tuple[int, int, int, int, float]] = []
    scores: list[tuple[int, int, float, float, float]] = []
    for layer_id, name in enumerate(LAYERS):
        top_scores, concept_ids, p_values = units[name]
        for unit, (top, concept_id) in enumerate(zip(top_scores, concept_ids)):
            # Rank 1 is the next concept id, at a lower score.
            labels.append((layer_id, unit, 0, concept_id, top))
            labels.append((layer_id, unit, 1, (concept_id + 1) % len(CONCEPTS), top - 0.0625))
            for rank in range(TOP_IMAGES):
                images.append((layer_id, unit, rank, (unit + rank) % n_images, 1.0 - 0.25 * rank))
            below = sum(1 for other in top_scores if other < top)
            percentile = 100.0 * below / (len(top_scores) - 1)
            p_value = float("nan") if p_values is None else p_values[unit]
            scores.append((layer_id, unit, top, percentile, p_value))
    return unit_tables_from_rows(labels, images, scores)


def make_comparison_results(run_id: str, image_paths: list[Path], **changes: Any) -> RunResults:
    """Build the results of ``run-a`` or ``run-b``; ``changes`` replace RunResults fields."""
    results = make_results(image_paths)
    units = RUN_UNITS[run_id]
    results.layers = [
        LayerRecord(
            layer_id=layer_id,
            model_id=0,
            name=name,
            depth=layer_id + 1,
            n_units=len(units[name][0]),
            output_shape=[len(units[name][0]), 4, 4],
            pooling="mean",
            null_mean=0.25 if units[name][2] is not None else None,
            null_p95=NULL_P95[run_id] if units[name][2] is not None else None,
            null_max=1.0 if units[name][2] is not None else None,
            permutations=10 if units[name][2] is not None else 0,
        )
        for layer_id, name in enumerate(LAYERS)
    ]
    results.concepts = [
        ConceptRecord(concept_id=index, text=text, category=category, broad_category=broad)
        for index, (text, category, broad) in enumerate(CONCEPTS)
    ]
    results.concept_set_name = "analysis-test"
    results.similarity = "soft_wpmi"
    results.similarity_params = {"top_k": 2}
    results.units = _unit_tables(units, len(image_paths))
    return replace(results, **changes)


def write_comparison_run(store: Store, run_id: str, image_paths: list[Path], source: str | None = None, **changes: Any) -> None:
    """Write one run; ``source`` picks the unit table (``run-a``/``run-b``) when ``run_id`` is another id."""
    results = make_comparison_results(source or run_id, image_paths, **changes)
    store.begin_run(run_id, f"{run_id} model", {"top_n": 2}, "b" * 64, "0.1.0")
    store.write_results(run_id, results)


def make_comparison_database(path: Path, image_paths: list[Path]) -> Path:
    """Create a database with the two comparable runs ``run-a`` and ``run-b``."""
    with Store(path) as store:
        write_comparison_run(store, "run-a", image_paths)
        write_comparison_run(store, "run-b", image_paths)
    return path

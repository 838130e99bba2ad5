"""The study's analyses over stored runs, as functions that return rows.

Each function runs one of the analysis views or table macros created by the
schema migration ``m002_analyses`` (see ``docs/analyses.md``) and returns a
list of dicts, one per row.  The SQL is the single definition: these
functions only validate arguments, resolve run ids and check that runs can be
compared.

Conventions shared with the SQL:

- A unit's top concept is its rank-0 label, and its top score is
  ``unit_scores.top_score``.
- A concept counts as mammography when its broad category is set and is not
  ``non-mammography``, as non-mammography for ``non-mammography``, and as
  unknown when it has no broad category (for example every concept of a
  plain text concept set).  Shares divide by all units counted, unknown ones
  included.
- Thresholds: ``local`` passes a unit whose top score is >= the mean top
  score of its own layer; ``global`` passes it when the top score is >= the
  largest of the compared runs' means of the layer with the same name;
  ``none`` passes every unit.  With ``alpha`` set, a unit must also beat the
  layer's null baseline (p-value < alpha, or top score > null p95); units of
  layers without a null baseline are not filtered by it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from mammo_dissect.core.errors import MammoDissectError
from mammo_dissect.core.store import Store


logger = logging.getLogger(__name__)

THRESHOLDS = ("local", "global", "none")


class ComparisonError(MammoDissectError):
    """Runs cannot be compared: different probe sets, concept sets or architectures."""


@dataclass
class Comparability:
    """Result of :func:`check_comparable` for a set of runs."""

    run_ids: list[str]
    #: Problems that make raw comparisons meaningless (probe set or concept set differ).
    errors: list[str] = field(default_factory=list)
    #: Differences that limit the comparison (similarity functions or parameters differ).
    warnings: list[str] = field(default_factory=list)
    #: True when every run has the same layer names and unit counts.
    same_architecture: bool = True


Database = Store | str | Path


@contextmanager
def open_store(database: Database) -> Iterator[Store]:
    """Yield ``database`` when it is an open :class:`Store`, else open the file read-only."""
    if isinstance(database, Store):
        yield database
        return
    with Store(database, read_only=True) as store:
        yield store


def _rows(store: Store, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    columns, rows = store.query(sql, list(params or []))
    return [dict(zip(columns, row)) for row in rows]


def _check_threshold(threshold: str, alpha: float | None) -> None:
    if threshold not in THRESHOLDS:
        raise ValueError(f"invalid threshold {threshold!r}: use one of {', '.join(THRESHOLDS)}")
    if alpha is not None and not 0.0 < alpha <= 1.0:
        raise ValueError(f"invalid alpha {alpha!r}: give a p-value threshold in (0, 1], or None for no null filter")


def resolve_run_ids(store: Store, run_ids: Sequence[str]) -> list[str]:
    """Return the full ids of ``run_ids`` (ids or unique prefixes), without duplicates.

    :raises ValueError: when ``run_ids`` is empty.
    :raises UnknownNameError: when an id fits no run.
    """
    if isinstance(run_ids, str):
        run_ids = [run_ids]
    if not run_ids:
        raise ValueError("no run ids given; pass at least one run id (see `mammo-dissect runs DB`)")
    resolved: list[str] = []
    for run_id in run_ids:
        full_id = store.resolve_run_id(run_id)
        if full_id not in resolved:
            resolved.append(full_id)
    return resolved


def _macro_call(name: str) -> str:
    """Return a call of table macro ``name`` with placeholders for runs, threshold and alpha."""
    return f"{name}(?::VARCHAR[], threshold_mode := ?, null_alpha := ?::DOUBLE)"


# ---------------------------------------------------------------- comparability


def _architecture(store: Store, run_id: str) -> list[tuple[str, int]]:
    _, rows = store.query("SELECT name, n_units FROM layers WHERE run_id = ? ORDER BY name", [run_id])
    return [(str(name), int(n_units)) for name, n_units in rows]


def check_comparable(database: Database, run_ids: Sequence[str], *, strict: bool = True) -> Comparability:
    """Check that runs share probe set and concept set, and compare their similarity functions.

    :param strict: raise on a probe-set or concept-set mismatch; when False,
        log each mismatch as a warning and return it in ``errors``.
    :raises ComparisonError: (``strict``) when the runs' probe fingerprints or
        concept-set hashes differ.
    """
    with open_store(database) as store:
        full_ids = resolve_run_ids(store, run_ids)
        runs = [store.get_run(run_id) for run_id in full_ids]
        architectures = {run_id: _architecture(store, run_id) for run_id in full_ids}
    result = Comparability(run_ids=full_ids)
    checks = (
        ("probe_fingerprint", "probe sets", "dissect the same probe images in every run"),
        ("concept_set_sha256", "concept sets", "use the same concept set file in every run"),
    )
    for column, what, fix in checks:
        values = {run["run_id"]: run.get(column) for run in runs}
        if len(set(values.values())) > 1:
            shown = ", ".join(f"{run_id}: {str(value)[:12]}" for run_id, value in values.items())
            result.errors.append(
                f"runs use different {what} ({column} {shown}), so their labels and scores are not "
                f"comparable; {fix}"
            )
    similarities = {run["run_id"]: (run.get("similarity"), run.get("similarity_params")) for run in runs}
    if len({repr(value) for value in similarities.values()}) > 1:
        shown = ", ".join(f"{run_id}: {name} {params}" for run_id, (name, params) in similarities.items())
        result.warnings.append(
            f"runs use different similarity functions or parameters ({shown}); raw scores and "
            "global thresholds are not comparable across them, compare percentiles and labels instead"
        )
    first = architectures[full_ids[0]]
    result.same_architecture = all(architecture == first for architecture in architectures.values())
    if result.errors and strict:
        raise ComparisonError(
            "; ".join(result.errors) + ". Pass strict=False (or --allow-mismatch) to compare them anyway."
        )
    for message in result.errors + result.warnings:
        logger.warning("comparing runs %s: %s", ", ".join(full_ids), message)
    return result


# ---------------------------------------------------------------- per layer


def layer_summary(database: Database, run_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Return per run and layer: unit count, top-score mean and quantiles, distinct concepts, category counts.

    Rows come from the view ``layer_summary``, ordered by run (as given) and depth.
    """
    with open_store(database) as store:
        full_ids = resolve_run_ids(store, run_ids)
        rows = _rows(
            store,
            "SELECT * FROM layer_summary WHERE list_contains(?::VARCHAR[], run_id) "
            "ORDER BY list_position(?::VARCHAR[], run_id), depth, layer_id",
            [full_ids, full_ids],
        )
    return rows


def layer_categories(database: Database, run_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Return the number of units per run, layer, broad category and category (all units)."""
    with open_store(database) as store:
        full_ids = resolve_run_ids(store, run_ids)
        return _rows(
            store,
            "SELECT * FROM layer_categories WHERE list_contains(?::VARCHAR[], run_id) "
            "ORDER BY list_position(?::VARCHAR[], run_id), depth, layer_id, n_units DESC, "
            "broad_category NULLS LAST, category NULLS LAST",
            [full_ids, full_ids],
        )


def _macro_rows(
    database: Database, run_ids: Sequence[str], threshold: str, alpha: float | None, macro: str, then_by: str
) -> list[dict[str, Any]]:
    """Call a threshold-aware table macro for ``run_ids`` and return its rows.

    Rows are sorted by run, in the order of ``run_ids``, then by the ORDER BY terms in ``then_by``.
    """
    _check_threshold(threshold, alpha)
    with open_store(database) as store:
        full_ids = resolve_run_ids(store, run_ids)
        return _rows(
            store,
            f"SELECT * FROM {_macro_call(macro)} ORDER BY list_position(?::VARCHAR[], run_id), {then_by}",
            [full_ids, threshold, alpha, full_ids],
        )


def passing_units(
    database: Database, run_ids: Sequence[str], threshold: str = "global", alpha: float | None = None
) -> list[dict[str, Any]]:
    """Return every unit of the runs with its threshold and whether it passes (``passes``)."""
    return _macro_rows(database, run_ids, threshold, alpha, "passing_units", "depth, layer_id, unit")


def passing_layer_summary(
    database: Database, run_ids: Sequence[str], threshold: str = "global", alpha: float | None = None
) -> list[dict[str, Any]]:
    """Return per run and layer: passing units and how many of them are mammography, non-mammography, unknown."""
    return _macro_rows(database, run_ids, threshold, alpha, "passing_layer_summary", "depth, layer_id")


def passing_broad_categories(
    database: Database, run_ids: Sequence[str], threshold: str = "global", alpha: float | None = None
) -> list[dict[str, Any]]:
    """Return per run and layer the broad categories of passing units, most frequent first."""
    return _macro_rows(
        database, run_ids, threshold, alpha, "passing_broad_categories",
        "depth, layer_id, category_rank, broad_category NULLS LAST",
    )


def passing_categories(
    database: Database, run_ids: Sequence[str], threshold: str = "global", alpha: float | None = None
) -> list[dict[str, Any]]:
    """Return per run and layer the number of passing units per broad category and category."""
    return _macro_rows(
        database, run_ids, threshold, alpha, "passing_categories",
        "depth, layer_id, n_units DESC, broad_category NULLS LAST, category NULLS LAST",
    )


# ---------------------------------------------------------------- two runs


def concept_changes(
    database: Database, run_a: str, run_b: str, threshold: str = "global", alpha: float | None = None
) -> list[dict[str, Any]]:
    """Return per layer the top concepts of passing units that run B gained or lost against run A.

    ``change`` is ``gained`` (only in B), ``lost`` (only in A) or ``kept``;
    ``n_units_a`` and ``n_units_b`` count the passing units with that concept.
    """
    _check_threshold(threshold, alpha)
    with open_store(database) as store:
        full_a = store.resolve_run_id(run_a)
        full_b = store.resolve_run_id(run_b)
        return _rows(
            store,
            "SELECT c.* FROM concept_changes(?, ?, threshold_mode := ?, null_alpha := ?::DOUBLE) AS c "
            "LEFT JOIN (SELECT name, min(depth) AS depth FROM layers WHERE run_id IN (?, ?) GROUP BY name) AS l "
            "ON l.name = c.layer ORDER BY l.depth, c.layer, c.change, c.concept",
            [full_a, full_b, threshold, alpha, full_a, full_b],
        )


def label_changes(
    database: Database, run_a: str, run_b: str, threshold: str = "global", alpha: float | None = None
) -> list[dict[str, Any]]:
    """Return the units whose top concept differs between two runs of the same architecture.

    :raises ComparisonError: when the runs' layer names or unit counts differ,
        because then unit indices do not refer to the same channels.
    """
    _check_threshold(threshold, alpha)
    with open_store(database) as store:
        full_a = store.resolve_run_id(run_a)
        full_b = store.resolve_run_id(run_b)
        architecture_a = _architecture(store, full_a)
        architecture_b = _architecture(store, full_b)
        if architecture_a != architecture_b:
            raise ComparisonError(
                f"runs {full_a} and {full_b} have different layers or unit counts "
                f"({architecture_a} against {architecture_b}), so their units cannot be matched; "
                "compare per-layer summaries instead"
            )
        return _rows(
            store,
            "SELECT * FROM label_changes(?, ?, threshold_mode := ?, null_alpha := ?::DOUBLE) "
            "ORDER BY depth, layer, unit",
            [full_a, full_b, threshold, alpha],
        )


# ---------------------------------------------------------------- coverage


def concept_coverage(
    database: Database, run_ids: Sequence[str], threshold: str = "global", alpha: float | None = None
) -> list[dict[str, Any]]:
    """Return every concept of each run with the number of passing units it labels (0 = never)."""
    return _macro_rows(database, run_ids, threshold, alpha, "concept_coverage", "concept_id")


def category_coverage(
    database: Database, run_ids: Sequence[str], threshold: str = "global", alpha: float | None = None
) -> list[dict[str, Any]]:
    """Return per run and category how many of its concepts label at least one passing unit."""
    return _macro_rows(
        database, run_ids, threshold, alpha, "category_coverage", "broad_category NULLS LAST, category NULLS LAST"
    )


def never_top_concepts(
    database: Database, run_ids: Sequence[str], threshold: str = "global", alpha: float | None = None
) -> list[dict[str, Any]]:
    """Return the concepts that label no passing unit in any of the runs (concept text and categories)."""
    rows = concept_coverage(database, run_ids, threshold, alpha)
    covered = {row["concept"] for row in rows if row["n_passing_units"] > 0}
    never: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["concept"] not in covered and row["concept"] not in never:
            never[row["concept"]] = {key: row[key] for key in ("concept", "category", "broad_category")}
    return list(never.values())

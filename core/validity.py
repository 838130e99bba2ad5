"""Label validity: does a unit's activation separate images that have its label from images that do not?

For every unit whose top label (rank 0) is an annotated concept of the probe
set, the validity of the label is the AUROC of the unit's pooled activation
as a score for "the image is annotated with this concept".  0.5 is chance,
1.0 means every annotated image activates the unit more than every other
image, and below 0.5 the unit prefers images without the concept.  Units
whose top label is not an annotated concept get no row.

Concepts are matched to annotations after :func:`clean_text` and case
folding, as the annotation dissector matches them.  The ground truth is by
default the run's own probe-set annotations, read from ``probe_images``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import numpy as np
import pyarrow as pa

from mammo_dissect.core.check_dissector import average_ranks
from mammo_dissect.core.concepts import clean_text
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.errors import StoreError
from mammo_dissect.core.fingerprint import check_image_order


if TYPE_CHECKING:
    from mammo_dissect.core.plugins import Registry
    from mammo_dissect.core.store import Store
    from mammo_dissect.core.types import ProbeSet


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroundTruth:
    """Binary annotations of the probe images: ``matrix[i, g]`` is true when image i has concept g."""

    #: Annotated concepts after :func:`concept_key`, one per column.
    keys: list[str]
    matrix: np.ndarray

    def column(self, text: str) -> int | None:
        """Return the column of concept ``text``, or None when it is not annotated."""
        try:
            return self.keys.index(concept_key(text))
        except ValueError:
            return None


@dataclass(frozen=True)
class LayerValidity:
    """Validity of one layer's top labels."""

    layer_id: int
    layer: str
    n_units: int
    #: Units whose top label is an annotated concept.
    n_labels_checked: int
    #: Of those, units with an AUROC (both classes non-empty).
    n_auroc: int
    mean_auroc: float | None
    share_above_half: float | None


def concept_key(text: str) -> str:
    """Return the form in which concepts and annotations are compared (spaces collapsed, case folded)."""
    return clean_text(text).casefold()


def ground_truth(annotations: Sequence[Sequence[str]], vocabulary: Sequence[str] = ()) -> GroundTruth:
    """Build the ground truth from each image's annotations.

    The concepts are those annotated on at least one image, plus
    ``vocabulary`` (concepts the data set can annotate, which then may have
    no positive image).
    """
    keys: list[str] = []
    for text in list(vocabulary) + [text for image in annotations for text in image]:
        key = concept_key(text)
        if key and key not in keys:
            keys.append(key)
    matrix = np.zeros((len(annotations), len(keys)), dtype=bool)
    column = {key: index for index, key in enumerate(keys)}
    for row, image in enumerate(annotations):
        for text in image:
            matrix[row, column[concept_key(text)]] = True
    return GroundTruth(keys=keys, matrix=matrix)


def unit_validity(
    activations: np.ndarray, top_concepts: np.ndarray, concept_texts: Sequence[str], truth: GroundTruth
) -> dict[str, np.ndarray]:
    """Return the validity of each unit's top label as columns ``unit, concept_id, auroc, n_positive, n_negative``.

    :param activations: pooled activations [N x K], rows in probe-set order.
    :param top_concepts: each unit's top concept id [K], indexing ``concept_texts``.
    :param truth: ground truth with N rows.
    The AUROC is the Mann-Whitney U statistic with average ranks, so tied
    activations count one half; it is NaN when a class is empty.
    """
    values = np.asarray(activations, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != truth.matrix.shape[0]:
        raise ConfigError(
            f"activations of shape {values.shape} do not match the ground truth of {truth.matrix.shape[0]} images; "
            f"pass activations [images x units] of the same probe set"
        )
    if len(top_concepts) != values.shape[1]:
        raise ConfigError(f"{len(top_concepts)} top concepts given for {values.shape[1]} units; pass one per unit")
    columns = [truth.column(text) for text in concept_texts]
    units, concepts, aurocs, positives, negatives = [], [], [], [], []
    for unit, concept_id in enumerate(np.asarray(top_concepts, dtype=np.int64)):
        column = columns[concept_id]
        if column is None:
            continue
        labels = truth.matrix[:, column]
        n_positive = int(labels.sum())
        n_negative = int(labels.size - n_positive)
        auroc = float("nan")
        if n_positive and n_negative:
            ranks = average_ranks(values[:, unit])
            auroc = float((ranks[labels].sum() - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative))
        units.append(unit)
        concepts.append(int(concept_id))
        aurocs.append(auroc)
        positives.append(n_positive)
        negatives.append(n_negative)
    return {
        "unit": np.array(units, dtype=np.int32),
        "concept_id": np.array(concepts, dtype=np.int32),
        "auroc": np.array(aurocs, dtype=np.float64),
        "n_positive": np.array(positives, dtype=np.int32),
        "n_negative": np.array(negatives, dtype=np.int32),
    }


def summarise(layer_id: int, layer: str, n_units: int, rows: dict[str, np.ndarray]) -> LayerValidity:
    """Return a layer's mean AUROC and share of AUROCs above 0.5 from :func:`unit_validity` rows."""
    aurocs = rows["auroc"][np.isfinite(rows["auroc"])]
    return LayerValidity(
        layer_id=layer_id,
        layer=layer,
        n_units=n_units,
        n_labels_checked=int(rows["unit"].size),
        n_auroc=int(aurocs.size),
        mean_auroc=float(aurocs.mean()) if aurocs.size else None,
        share_above_half=float((aurocs > 0.5).mean()) if aurocs.size else None,
    )


def write_rows(store: Store, run_id: str, tables: dict[str, pa.Table], delete: dict[str, str]) -> None:
    """Replace rows of ``run_id`` in several tables in one transaction.

    ``delete`` maps a table to the SQL condition (besides ``run_id = ?``)
    selecting the rows that the new ones replace; use ``"true"`` for all of
    the run's rows.
    """
    # NOTE: Store has no public method for bulk rows outside a run, so this
    # uses its connection and Arrow insert directly.
    con = store._con
    con.begin()
    try:
        for table, condition in delete.items():
            con.execute(f"DELETE FROM {table} WHERE run_id = ? AND ({condition})", [run_id])
        for table, rows in tables.items():
            store._insert_arrow(table, run_id, rows)
        con.commit()
    except BaseException as exc:
        con.rollback()
        if isinstance(exc, Exception):
            raise StoreError(
                f"writing {', '.join(tables)} of run {run_id} to {store.path} failed: {exc}; "
                f"the transaction was rolled back, so the tables are unchanged"
            ) from exc
        raise


def run_activations(
    config: dict[str, Any],
    probe_fingerprint: str | None,
    registry: Registry | None = None,
    progress: bool = False,
    image_ids: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Return a stored run's pooled activations by layer name, from the cache or by extracting them again.

    The stored resolved configuration is prepared again, which gives the same
    activation cache keys as the run had.  Raises :class:`ProbeSetError`
    when the probe images changed since the run, or when ``image_ids`` (the
    run's images in stored order) differ from the probe set's current order.
    """
    from mammo_dissect.core.activations import cached_activations
    from mammo_dissect.core.config import load_config
    from mammo_dissect.core.pipeline import prepare

    plan = prepare(load_config(None, data=config), registry, progress=progress)
    if probe_fingerprint and plan.probe_fingerprint != probe_fingerprint:
        raise ProbeSetError(
            f"the probe images at {plan.probe_set.root} changed since the run (fingerprint "
            f"{plan.probe_fingerprint[:12]} instead of {probe_fingerprint[:12]}); restore them, or run the "
            f"dissection again and validate the new run"
        )
    if image_ids is not None:
        check_image_order(
            [image.image_id for image in plan.probe_set.images], image_ids, plan.probe_set.root,
            "run the dissection again and validate the new run",
        )
    return {item.layer.name: np.asarray(item.load()) for item in cached_activations(plan)}


def run_ground_truth(store: Store, run_id: str, probe_set: ProbeSet | None) -> GroundTruth:
    """Return the ground truth of a stored run: its own annotations, or those of ``probe_set`` matched by image id."""
    _, rows = store.query(
        "SELECT image_id, annotations FROM probe_images WHERE run_id = ? ORDER BY image_index", [run_id]
    )
    if probe_set is None:
        return ground_truth([list(annotations or []) for _, annotations in rows])
    by_id = {image.image_id: image.annotations for image in probe_set.images}
    missing = [image_id for image_id, _ in rows if image_id not in by_id]
    if missing:
        raise ProbeSetError(
            f"{len(missing)} image(s) of run {run_id} are not in the ground-truth probe set {probe_set.reader!r} "
            f"(first: {', '.join(missing[:5])}); pass the probe set the run used"
        )
    return ground_truth([list(by_id[image_id]) for image_id, _ in rows], probe_set.annotation_vocabulary)


def validate_run(
    database: str | Path,
    run_id: str,
    ground_truth_probe: ProbeSet | None = None,
    *,
    registry: Registry | None = None,
    activations: dict[str, np.ndarray] | None = None,
    progress: bool = False,
) -> list[LayerValidity]:
    """Measure the validity of a completed run's top labels, store it in ``unit_validity`` and return it per layer.

    :param run_id: a run id or a unique prefix of one.
    :param ground_truth_probe: probe set whose annotations are the ground
        truth, matched to the run's images by image id; by default the
        run's own annotations.
    :param activations: pooled activations [N x K] by layer name; by default
        the run's cached activations (extracted again when the cache lost them).
    Earlier validity rows of the run are replaced.
    """
    from mammo_dissect.core.store import Store

    with Store(Path(database)) as store:
        run_id = store.resolve_run_id(run_id)
        run = store.get_run(run_id)
        if run["status"] != "completed":
            raise StoreError(
                f"run {run_id} in {database} has status {run['status']!r}; only completed runs can be validated"
            )
        truth = run_ground_truth(store, run_id, ground_truth_probe)
        if not truth.keys:
            raise ProbeSetError(
                f"run {run_id} has no annotated probe images, so its labels cannot be validated; "
                f"pass a labelled ground_truth_probe"
            )
        _, concept_rows = store.query("SELECT text FROM concepts WHERE run_id = ? ORDER BY concept_id", [run_id])
        texts = [text for (text,) in concept_rows]
        _, layers = store.query(
            "SELECT layer_id, name, n_units FROM layers WHERE run_id = ? ORDER BY layer_id", [run_id]
        )
        if activations is None:
            _, id_rows = store.query(
                "SELECT image_id FROM probe_images WHERE run_id = ? ORDER BY image_index", [run_id]
            )
            activations = run_activations(
                run["config"], run.get("probe_fingerprint"), registry, progress, [image_id for (image_id,) in id_rows]
            )
        results: list[LayerValidity] = []
        parts: list[pa.Table] = []
        for layer_id, name, n_units in layers:
            if name not in activations:
                raise ConfigError(
                    f"activations of layer {name!r} of run {run_id} are missing; pass one array per stored layer"
                )
            _, top_rows = store.query(
                "SELECT concept_id FROM unit_labels WHERE run_id = ? AND layer_id = ? AND rank = 0 ORDER BY unit",
                [run_id, layer_id],
            )
            top = np.array([concept_id for (concept_id,) in top_rows], dtype=np.int64)
            rows = unit_validity(activations[name], top, texts, truth)
            results.append(summarise(layer_id, name, int(n_units), rows))
            parts.append(_validity_table(layer_id, rows))
            logger.info("run %s layer %s: %d labels checked", run_id, name, rows["unit"].size)
        write_rows(store, run_id, {"unit_validity": pa.concat_tables(parts)} if parts else {}, {"unit_validity": "true"})
    return results


def _validity_table(layer_id: int, rows: dict[str, np.ndarray]) -> pa.Table:
    auroc = rows["auroc"]
    return pa.table({
        "layer_id": pa.array(np.full(rows["unit"].size, layer_id, dtype=np.int32)),
        "unit": pa.array(rows["unit"]),
        "concept_id": pa.array(rows["concept_id"]),
        "auroc": pa.array(auroc, mask=~np.isfinite(auroc)),
        "n_positive": pa.array(rows["n_positive"]),
        "n_negative": pa.array(rows["n_negative"]),
    })

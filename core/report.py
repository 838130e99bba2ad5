"""Render the HTML report of one run, or the comparison of several runs, from the store.

A single-run report is a folder of static files.  ``index.html`` has the run
summary and the per-layer analyses (inline SVG charts).  Each layer gets one or
more pages with a table of its units.  ``images/`` has PNG thumbnails of the
probe images, and ``overlays/`` has thumbnails with the unit's activation map
overlaid where the store has maps.  Where the store has label validity,
chance-control or stability results (see ``docs/validity.md``), the index and
the layer pages show them too.  A comparison report has the
comparison in ``index.html`` and one single-run report per run in
``run-1/``, ``run-2/``, ...  Pages use inline CSS, inline SVG and a few lines of
optional inline script, and load nothing from the network, so they open
offline.  The report reads the store through a read-only connection.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from mammo_dissect.core import analyses
from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.errors import StoreError
from mammo_dissect.core.heatmap import overlay_heatmap
from mammo_dissect.core.images import read_image
from mammo_dissect.core.report_charts import category_colours
from mammo_dissect.core.report_charts import line_chart
from mammo_dissect.core.report_charts import run_colour
from mammo_dissect.core.report_charts import stacked_bar_chart
from mammo_dissect.core.store import Store


logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "reports" / "templates"
THUMBNAIL_SIZE = 160
IMAGE_FOLDER = "images"
OVERLAY_FOLDER = "overlays"
#: Missing probe images named one by one in the warning; the rest are counted.
MISSING_IMAGES_LISTED = 5
#: Changed units listed per pair of runs on the comparison page; the rest are counted.
LABEL_CHANGES_LISTED = 500
#: Table of per-unit activation maps (see ``docs/schema.md``); the report reads it where it exists.
ACTIVATION_MAP_TABLE = "unit_activation_maps"
#: Controls of ``chance_counts`` in the order the chance table lists them.  Other controls follow by name.
CONTROL_ORDER = ("observed", "annotation", "random", "shuffled_concepts")
#: Perturbations of ``unit_stability`` in the order of the unit table's columns.  Others follow by name.
PERTURBATION_ORDER = ("bootstrap", "noise", "synonyms")
#: Control whose 5th to 95th percentile of the mammography share is shaded in the share chart.
BAND_CONTROL = "random"
#: Concepts listed per control in the table of concepts that win most often under the null.
NULL_WINS_LISTED = 10


@dataclass
class Thumbnail:
    """A thumbnail written for the report: its path relative to the pages, and its size."""

    src: str
    width: int
    height: int


# ---------------------------------------------------------------- Jinja setup


def format_number(value: Any, digits: int = 3) -> str:
    """Format a number with ``digits`` decimals; None and NaN become an en dash."""
    if value is None:
        return "\u2013"
    number = float(value)
    if math.isnan(number):
        return "\u2013"
    return f"{number:.{digits}f}"


def format_percent(value: Any) -> str:
    """Format a share in [0, 1] as a percentage; None and NaN become an en dash."""
    if value is None:
        return "\u2013"
    number = float(value)
    if math.isnan(number):
        return "\u2013"
    return f"{100.0 * number:.1f} %"


def format_timestamp(value: Any, missing: str = "\u2013") -> str:
    """Format a timestamp to whole seconds; None becomes ``missing``."""
    if value is None:
        return missing
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def format_json(value: Any) -> str:
    """Format a JSON value with indentation, keys in their stored order."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def make_environment() -> jinja2.Environment:
    """Build the Jinja environment over ``reports/templates`` with autoescaping on."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["number"] = format_number
    environment.filters["percent"] = format_percent
    environment.filters["pretty_json"] = format_json
    environment.filters["timestamp"] = format_timestamp
    return environment


# ---------------------------------------------------------------- store queries


def _rows(store: Store, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    columns, rows = store.query(sql, params)
    return [dict(zip(columns, row)) for row in rows]


def _models(store: Store, run_id: str) -> list[dict[str, Any]]:
    models = _rows(
        store,
        "SELECT model_id, role, plugin, plugin_version, spec, weights_path, weights_sha256, "
        "preprocessing FROM models WHERE run_id = ? ORDER BY role DESC, model_id",
        [run_id],
    )
    for model in models:
        model["preprocessing"] = json.loads(model["preprocessing"] or "null")
    return models


def _layers(store: Store, run_id: str) -> list[dict[str, Any]]:
    return _rows(
        store,
        """
        SELECT l.layer_id, l.model_id, l.name, l.depth, l.n_units, l.pooling, l.null_mean, l.null_p95,
               l.null_max, l.permutations, m.spec AS model_spec,
               avg(s.top_score) AS mean_top_score,
               avg(CASE WHEN l.null_p95 IS NULL THEN NULL
                        WHEN s.top_score > l.null_p95 THEN 1.0 ELSE 0.0 END) AS share_above_null
        FROM layers AS l
        LEFT JOIN models AS m ON m.run_id = l.run_id AND m.model_id = l.model_id
        LEFT JOIN unit_scores AS s ON s.run_id = l.run_id AND s.layer_id = l.layer_id
        WHERE l.run_id = ?
        GROUP BY ALL
        ORDER BY l.model_id, l.depth, l.layer_id
        """,
        [run_id],
    )


def _used_images(store: Store, run_id: str) -> dict[int, str]:
    """Return the path of every probe image that is a top image of some unit."""
    _, rows = store.query(
        """
        SELECT DISTINCT p.image_index, p.path
        FROM unit_top_images AS t
        JOIN probe_images AS p ON p.run_id = t.run_id AND p.image_index = t.image_index
        WHERE t.run_id = ?
        ORDER BY p.image_index
        """,
        [run_id],
    )
    return {int(index): str(path) for index, path in rows}


def _layer_units(
    store: Store,
    run_id: str,
    layer: dict[str, Any],
    top_concepts: int,
    thumbnails: dict[int, Thumbnail | None],
    out_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Collect the rows of one layer's unit table, ordered by unit index.

    With ``out_dir`` set and activation maps stored for the layer, each top
    image also gets an ``overlay`` thumbnail written under ``out_dir``.
    """
    params = [run_id, layer["layer_id"]]
    units = {
        row["unit"]: {**row, "concepts": [], "images": []}
        for row in _rows(
            store,
            "SELECT unit, top_score, percentile, p_value FROM unit_scores "
            "WHERE run_id = ? AND layer_id = ? ORDER BY unit",
            params,
        )
    }
    labels = _rows(
        store,
        "SELECT unit, rank, concept AS text, category, score FROM labels "
        "WHERE run_id = ? AND layer_id = ? AND rank < ? ORDER BY unit, rank",
        [*params, top_concepts],
    )
    images = _rows(
        store,
        """
        SELECT t.unit, t.rank, t.image_index, t.activation, p.image_id, p.patient_id,
               p.laterality, p.view
        FROM unit_top_images AS t
        JOIN probe_images AS p ON p.run_id = t.run_id AND p.image_index = t.image_index
        WHERE t.run_id = ? AND t.layer_id = ?
        ORDER BY t.unit, t.rank
        """,
        params,
    )

    scores = [label["score"] for label in labels if label["score"] is not None]
    finite = [score for score in scores if math.isfinite(score)]
    low = min(finite, default=0.0)
    high = max(finite, default=1.0)
    for label in labels:
        unit = units.setdefault(label["unit"], _empty_unit(label["unit"]))
        unit["concepts"].append({**label, "bar": _bar_width(label["score"], low, high)})
    maps = _activation_maps(store, run_id, layer["layer_id"]) if out_dir is not None else {}
    for image in images:
        unit = units.setdefault(image["unit"], _empty_unit(image["unit"]))
        thumbnail = thumbnails.get(image["image_index"])
        overlay = None
        activation_map = maps.get((image["unit"], image["rank"]))
        if out_dir is not None and thumbnail is not None and activation_map is not None:
            overlay = write_overlay(out_dir, thumbnail, activation_map, layer["layer_id"], image["unit"], image["rank"])
        unit["images"].append({**image, "thumbnail": thumbnail, "overlay": overlay})

    null_p95 = layer["null_p95"]
    for unit in units.values():
        top = unit["top_score"]
        unit["above_null"] = None if null_p95 is None or top is None else bool(top > null_p95)
    return [units[index] for index in sorted(units)]


def _empty_unit(unit: int) -> dict[str, Any]:
    return {
        "unit": unit,
        "top_score": None,
        "percentile": None,
        "p_value": None,
        "concepts": [],
        "images": [],
    }


def _bar_width(score: float | None, low: float, high: float) -> float:
    """Return the bar length in percent: ``score`` scaled between ``low`` and ``high``."""
    if score is None or not math.isfinite(score):
        return 0.0
    if high <= low:
        return 100.0
    share = (score - low) / (high - low)
    # A small minimum keeps the lowest score's bar visible.
    return round(max(2.0, 100.0 * share), 1)


# ---------------------------------------------------------------- thumbnails


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_thumbnail(source: Path, target: Path, size: int = THUMBNAIL_SIZE) -> tuple[int, int]:
    """Write a PNG thumbnail of ``source`` whose longer side is at most ``size`` pixels.

    :returns: the thumbnail's width and height.
    :raises ProbeSetError: when ``source`` is missing or cannot be decoded.
    """
    from PIL import Image

    pixels = _to_uint8(read_image(source))
    with Image.fromarray(pixels) as image:
        image.thumbnail((size, size))
        image.save(target, format="PNG")
        return image.width, image.height


def write_thumbnails(
    images: dict[int, str], out_dir: Path, run_id: str
) -> dict[int, Thumbnail | None]:
    """Write one thumbnail per probe image into ``out_dir/images``.

    An image that is missing or cannot be decoded gets None, and one warning
    names the first few of them.
    """
    folder = out_dir / IMAGE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    thumbnails: dict[int, Thumbnail | None] = {}
    missing: list[str] = []
    for image_index, path in images.items():
        name = f"image-{image_index:06d}.png"
        try:
            width, height = write_thumbnail(Path(path), folder / name)
        except ProbeSetError as exc:
            thumbnails[image_index] = None
            missing.append(str(exc))
            continue
        thumbnails[image_index] = Thumbnail(f"{IMAGE_FOLDER}/{name}", width, height)
    if missing:
        listed = "; ".join(missing[:MISSING_IMAGES_LISTED])
        more = len(missing) - MISSING_IMAGES_LISTED
        suffix = f"; and {more} more" if more > 0 else ""
        logger.warning(
            "report of run %s: %d of %d probe images cannot be read and show a placeholder: %s%s",
            run_id,
            len(missing),
            len(images),
            listed,
            suffix,
        )
    return thumbnails


def _has_table(store: Store, name: str) -> bool:
    _, rows = store.query(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND schema_name = 'main'", [name]
    )
    return bool(rows[0][0])


def _activation_maps(store: Store, run_id: str, layer_id: int) -> dict[tuple[int, int], np.ndarray]:
    """Return the stored activation map of each (unit, rank) of a layer; empty when none are stored."""
    if not _has_table(store, ACTIVATION_MAP_TABLE):
        return {}
    _, rows = store.query(
        f"SELECT unit, rank, height, width, activation_map FROM {ACTIVATION_MAP_TABLE} "
        "WHERE run_id = ? AND layer_id = ?",
        [run_id, layer_id],
    )
    maps: dict[tuple[int, int], np.ndarray] = {}
    for unit, rank, height, width, values in rows:
        if values is None or len(values) != height * width:
            logger.warning(
                "run %s layer %d unit %d rank %d: activation map has %s values, expected %d x %d; not shown",
                run_id, layer_id, unit, rank, None if values is None else len(values), height, width,
            )
            continue
        maps[(int(unit), int(rank))] = np.asarray(values, dtype=np.float32).reshape(height, width)
    return maps


def write_overlay(
    out_dir: Path, thumbnail: Thumbnail, activation_map: np.ndarray, layer_id: int, unit: int, rank: int
) -> Thumbnail | None:
    """Write the thumbnail with ``activation_map`` overlaid to ``out_dir/overlays``; None when the map is invalid."""
    from PIL import Image

    folder = out_dir / OVERLAY_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    name = f"layer-{layer_id}-unit-{unit}-rank-{rank}.png"
    try:
        with Image.open(out_dir / thumbnail.src) as image:
            overlay_heatmap(image, activation_map).save(folder / name, format="PNG")
    except ValueError as exc:
        logger.warning("layer %d unit %d rank %d: activation map not shown: %s", layer_id, unit, rank, exc)
        return None
    return Thumbnail(f"{OVERLAY_FOLDER}/{name}", thumbnail.width, thumbnail.height)


# ---------------------------------------------------------------- validity, chance and stability


def _has_relation(store: Store, name: str) -> bool:
    """Return whether the store has a table or view ``name`` in its main schema.

    Databases written before schema migration ``m003_validity`` and opened
    read-only have none of the validity, chance and stability tables.
    """
    if _has_table(store, name):
        return True
    _, rows = store.query(
        "SELECT count(*) FROM duckdb_views() WHERE view_name = ? AND schema_name = 'main'", [name]
    )
    return bool(rows[0][0])


def _ordered(names: set[str], order: Sequence[str]) -> list[str]:
    """Sort ``names`` by their position in ``order``, followed by the names not in it, alphabetically."""
    return sorted(names, key=lambda name: (order.index(name) if name in order else len(order), name))


def _layer_validity(store: Store, run_id: str) -> dict[int, dict[str, Any]]:
    """Return the ``layer_validity`` row of each layer of the run that has one."""
    if not _has_relation(store, "layer_validity"):
        return {}
    rows = _rows(
        store,
        "SELECT layer_id, n_labels_checked, n_auroc, mean_auroc, share_above_half "
        "FROM layer_validity WHERE run_id = ?",
        [run_id],
    )
    return {row["layer_id"]: row for row in rows}


def _perturbations(store: Store, run_id: str) -> list[str]:
    """Return the perturbations that ``unit_stability`` has rows of for the run."""
    if not _has_relation(store, "unit_stability"):
        return []
    _, rows = store.query("SELECT DISTINCT perturbation FROM unit_stability WHERE run_id = ?", [run_id])
    return _ordered({row[0] for row in rows}, PERTURBATION_ORDER)


def _attach_unit_trust(
    store: Store, run_id: str, layer_id: int, units: list[dict[str, Any]], perturbations: list[str]
) -> None:
    """Add each unit's validity row (or None) and its label-changed share per perturbation to ``units``."""
    validity: dict[int, dict[str, Any]] = {}
    if _has_relation(store, "unit_validity"):
        rows = _rows(
            store,
            """
            SELECT v.unit, v.auroc, v.n_positive, v.n_negative, c.text AS concept
            FROM unit_validity AS v
            LEFT JOIN concepts AS c ON c.run_id = v.run_id AND c.concept_id = v.concept_id
            WHERE v.run_id = ? AND v.layer_id = ?
            """,
            [run_id, layer_id],
        )
        validity = {row["unit"]: row for row in rows}
    shares: dict[tuple[int, str], float | None] = {}
    if perturbations:
        _, rows = store.query(
            "SELECT unit, perturbation, label_changed_share FROM unit_stability WHERE run_id = ? AND layer_id = ?",
            [run_id, layer_id],
        )
        shares = {(unit, perturbation): share for unit, perturbation, share in rows}
    for unit in units:
        unit["validity"] = validity.get(unit["unit"])
        unit["stability"] = [shares.get((unit["unit"], perturbation)) for perturbation in perturbations]


def _chance_summary(store: Store, run_id: str) -> list[dict[str, Any]]:
    """Return per layer and control the trials' mean mammography count, its 5th and 95th percentiles and mean validity."""
    if not (_has_relation(store, "chance_summary") and _has_relation(store, "chance_counts")):
        return []
    # chance_summary has percentiles of the validity only, so the count's
    # percentiles come from chance_counts.
    rows = _rows(
        store,
        """
        SELECT s.layer_id, s.layer, s.control, s.n_trials, s.mean_n_mammography, s.mean_auroc,
               q.n_units, q.p05_n_mammography, q.p95_n_mammography
        FROM chance_summary AS s
        JOIN (
            SELECT layer_id, control, max(n_units) AS n_units,
                   quantile_cont(n_mammography, 0.05) AS p05_n_mammography,
                   quantile_cont(n_mammography, 0.95) AS p95_n_mammography
            FROM chance_counts
            WHERE run_id = ?
            GROUP BY layer_id, control
        ) AS q ON q.layer_id = s.layer_id AND q.control = s.control
        WHERE s.run_id = ?
        """,
        [run_id, run_id],
    )
    order = _ordered({row["control"] for row in rows}, CONTROL_ORDER)
    return sorted(rows, key=lambda row: (row["layer_id"], order.index(row["control"])))


def _null_wins(store: Store, run_id: str) -> list[dict[str, Any]]:
    """Return per control the concepts with the highest ``wins / trials`` in ``concept_null_wins``."""
    if not _has_relation(store, "concept_null_wins"):
        return []
    rows = _rows(
        store,
        """
        SELECT w.control, w.concept_id, c.text AS concept, c.category, w.wins, w.trials,
               w.wins / nullif(w.trials, 0) AS win_share
        FROM concept_null_wins AS w
        LEFT JOIN concepts AS c ON c.run_id = w.run_id AND c.concept_id = w.concept_id
        WHERE w.run_id = ? AND w.wins > 0
        QUALIFY row_number() OVER (
            PARTITION BY w.control ORDER BY win_share DESC NULLS LAST, w.wins DESC, w.concept_id
        ) <= ?
        """,
        [run_id, NULL_WINS_LISTED],
    )
    order = _ordered({row["control"] for row in rows}, CONTROL_ORDER)
    return sorted(
        rows,
        key=lambda row: (
            order.index(row["control"]),
            -(row["win_share"] if row["win_share"] is not None else -1.0),
            -row["wins"],
            row["concept_id"],
        ),
    )


def _chance_bands(store: Store, run_ids: list[str]) -> dict[tuple[str, str], tuple[float, float]]:
    """Return by (run id, layer name) the 5th and 95th percentiles of the ``random`` control's mammography share.

    The share is ``n_mammography / n_units`` of one trial, over all of the
    layer's units, as the chance controls do not apply the pass threshold.
    """
    if not run_ids or not _has_relation(store, "chance_counts"):
        return {}
    placeholders = ", ".join("?" for _ in run_ids)
    _, rows = store.query(
        f"""
        SELECT run_id, layer,
               quantile_cont(n_mammography / nullif(n_units, 0), 0.05) AS low,
               quantile_cont(n_mammography / nullif(n_units, 0), 0.95) AS high
        FROM chance_counts
        WHERE control = ? AND run_id IN ({placeholders})
        GROUP BY run_id, layer
        """,
        [BAND_CONTROL, *run_ids],
    )
    return {
        (run_id, layer): (float(low), float(high))
        for run_id, layer, low, high in rows
        if low is not None and high is not None
    }


# ---------------------------------------------------------------- analyses overview


THRESHOLD_TEXT = {
    "local": "a unit passes when its top score is at least its own layer's mean top score",
    "global": (
        "a unit passes when its top score is at least the largest mean top score of its layer "
        "among the runs shown (layers matched by name; for one run this is the local threshold)"
    ),
    "none": "every unit passes",
}


def build_overview(
    store: Store,
    runs: list[dict[str, Any]],
    threshold: str,
    alpha: float | None,
    layer_links: dict[tuple[str, str], str] | None = None,
) -> dict[str, Any]:
    """Collect the per-layer analyses and chart geometry of one or more runs for ``_overview.html``.

    :param runs: dicts with at least ``run_id``, ``number`` and ``colour``, in display order.
    :param layer_links: (run id, layer name) -> link to the layer's first page.
    """
    run_ids = [run["run_id"] for run in runs]
    summary = analyses.layer_summary(store, run_ids)
    passing = analyses.passing_layer_summary(store, run_ids, threshold, alpha)
    broad = analyses.passing_broad_categories(store, run_ids, threshold, alpha)
    coverage = analyses.category_coverage(store, run_ids, threshold, alpha)
    never = analyses.never_top_concepts(store, run_ids, threshold, alpha)

    depth_of: dict[str, int] = {}
    for row in summary:
        depth_of[row["layer"]] = min(depth_of.get(row["layer"], row["depth"]), row["depth"])
    layer_names = sorted(depth_of, key=lambda name: (depth_of[name], name))
    passing_by_key = {(row["run_id"], row["layer"]): row for row in passing}
    run_by_id = {run["run_id"]: run for run in runs}

    layer_rows = []
    for row in summary:
        run = run_by_id[row["run_id"]]
        extra = passing_by_key.get((row["run_id"], row["layer"]), {})
        layer_rows.append(
            {
                **row,
                "threshold": extra.get("threshold"),
                "n_passing": extra.get("n_passing"),
                "n_mammography": extra.get("n_mammography"),
                "n_non_mammography": extra.get("n_non_mammography"),
                "n_unknown_category": extra.get("n_unknown_category"),
                "mammography_share": extra.get("mammography_share"),
                "run_number": run["number"],
                "colour": run["colour"],
                "link": (layer_links or {}).get((row["run_id"], row["layer"])),
            }
        )
    layer_rows.sort(key=lambda row: (depth_of[row["layer"]], row["layer"], row["run_number"]))

    def values(rows: dict[tuple[str, str], dict[str, Any]], run_id: str, column: str) -> list[float | None]:
        return [
            None if rows.get((run_id, name)) is None or rows[(run_id, name)][column] is None
            else float(rows[(run_id, name)][column])
            for name in layer_names
        ]

    summary_by_key = {(row["run_id"], row["layer"]): row for row in summary}
    labels = [f"{run['number']}: {run.get('name') or run['run_id']}" for run in runs]
    mean_chart = line_chart(
        layer_names,
        [
            {"name": label, "colour": run["colour"], "values": values(summary_by_key, run["run_id"], "mean_top_score")}
            for label, run in zip(labels, runs)
        ],
    )
    chance_bands = _chance_bands(store, run_ids)
    bands = [
        {
            "name": f"{label}: {BAND_CONTROL} control, 5th\u201395th percentile",
            "colour": run["colour"],
            "low": [chance_bands.get((run["run_id"], name), (None, None))[0] for name in layer_names],
            "high": [chance_bands.get((run["run_id"], name), (None, None))[1] for name in layer_names],
        }
        for label, run in zip(labels, runs)
        if any(run_id == run["run_id"] for run_id, _ in chance_bands)
    ]
    share_chart = line_chart(
        layer_names,
        [
            {"name": label, "colour": run["colour"], "values": values(passing_by_key, run["run_id"], "mammography_share")}
            for label, run in zip(labels, runs)
        ],
        y_range=(0.0, 1.0),
        value_format="{:.1%}",
        bands=bands,
    )
    colours = category_colours(sorted({row["broad_category"] for row in broad}, key=lambda c: (c is None, c or "")))
    counts: dict[tuple[str, str], list[tuple[str | None, int]]] = {}
    for row in broad:
        label = labels[run_by_id[row["run_id"]]["number"] - 1]
        counts.setdefault((row["layer"], label), []).append((row["broad_category"], int(row["n_units"])))
    category_chart = stacked_bar_chart(layer_names, labels, counts, colours)

    coverage_rows: dict[tuple[Any, Any], dict[str, Any]] = {}
    for row in coverage:
        key = (row["broad_category"], row["category"])
        entry = coverage_rows.setdefault(
            key,
            {"broad_category": key[0], "category": key[1], "n_concepts": row["n_concepts"], "covered": [0] * len(runs)},
        )
        entry["covered"][run_by_id[row["run_id"]]["number"] - 1] = row["n_concepts_covered"]
    threshold_text = THRESHOLD_TEXT[threshold]
    if alpha is not None:
        threshold_text += f", and beats the null baseline (p-value < {alpha} or top score > null p95) where the layer has one"
    return {
        "runs": runs,
        "threshold": threshold,
        "alpha": alpha,
        "threshold_text": threshold_text,
        "layer_names": layer_names,
        "layer_rows": layer_rows,
        "mean_chart": mean_chart,
        "share_chart": share_chart,
        "band_control": BAND_CONTROL if bands else None,
        "category_chart": category_chart,
        "coverage_rows": sorted(
            coverage_rows.values(), key=lambda row: (row["broad_category"] is None, row["broad_category"] or "", row["category"] or "")
        ),
        "never": never,
    }


# ---------------------------------------------------------------- rendering


def layer_page_file(layer_id: int, page: int) -> str:
    """Return the file name of page ``page`` (0-based) of a layer."""
    if page == 0:
        return f"layer-{layer_id}.html"
    return f"layer-{layer_id}-page-{page + 1}.html"


def _pages(layer: dict[str, Any], n_units: int, units_per_page: int) -> list[dict[str, Any]]:
    n_pages = max(1, math.ceil(n_units / units_per_page))
    return [
        {"file": layer_page_file(layer["layer_id"], page), "start": page * units_per_page}
        for page in range(n_pages)
    ]


def _resolve_run(store: Store, run_id: str | None) -> dict[str, Any]:
    if run_id is None:
        run_id = store.latest_run_id()
        if run_id is None:
            raise StoreError(
                f"the results database {store.path} has no runs; run a dissection into it first"
            )
    return store.get_run(run_id)


def _alignment_card(store: Store, run_id: str, models: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Return the card view of an aligned dissector, taking the card out of its model row; None for others.

    The view also lists the run's concepts that the card did not gate in
    (possible with the dissector's ``allow_ungated`` option).
    """
    from mammo_dissect.core.alignment_report import card_view

    for model in models:
        described = model["preprocessing"]
        if model["role"] == "dissector" and isinstance(described, dict) and isinstance(described.get("card"), dict):
            view = card_view(described.pop("card"))
            _, rows = store.query("SELECT text FROM concepts WHERE run_id = ? ORDER BY concept_id", [run_id])
            gated = set(view["gated_concepts"])
            view["used_ungated"] = [text for (text,) in rows if text not in gated]
            return view
    return None


def _render_run(
    store: Store,
    run: dict[str, Any],
    out_dir: Path,
    environment: jinja2.Environment,
    *,
    top_concepts: int,
    units_per_page: int,
    overview_runs: list[dict[str, Any]] | None = None,
    threshold: str = "global",
    alpha: float | None = None,
    comparison_link: str | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Write the single-run report of ``run`` into ``out_dir``; return index.html and the layers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    full_id = run["run_id"]
    models = _models(store, full_id)
    layers = _layers(store, full_id)
    _, count_rows = store.query("SELECT count(*) FROM probe_images WHERE run_id = ?", [full_id])
    n_images = count_rows[0][0]
    thumbnails = write_thumbnails(_used_images(store, full_id), out_dir, full_id)
    layer_units = {
        layer["layer_id"]: _layer_units(store, full_id, layer, top_concepts, thumbnails, out_dir)
        for layer in layers
    }
    validity = _layer_validity(store, full_id)
    perturbations = _perturbations(store, full_id)
    for layer in layers:
        layer["pages"] = _pages(layer, len(layer_units[layer["layer_id"]]), units_per_page)
        layer["validity"] = validity.get(layer["layer_id"])
        _attach_unit_trust(store, full_id, layer["layer_id"], layer_units[layer["layer_id"]], perturbations)

    own = {"run_id": full_id, "number": 1, "colour": run_colour(0), "name": run.get("name")}
    links = {(full_id, layer["name"]): layer["pages"][0]["file"] for layer in layers}
    overview = build_overview(store, overview_runs or [own], threshold, alpha, links)
    target = next((model for model in models if model["role"] == "target"), None)
    alignment_card = _alignment_card(store, full_id, models)
    stored_top_n = (run.get("config") or {}).get("top_n")
    common = {
        "run": run,
        "models": models,
        "layers": layers,
        "target": target,
        "n_images": n_images,
        "shown_concepts": top_concepts,
        "stored_concepts": stored_top_n,
        "overview": overview,
        "comparison_link": comparison_link,
        "has_validity": bool(validity),
        "perturbations": perturbations,
        "chance_rows": _chance_summary(store, full_id),
        "null_wins": _null_wins(store, full_id),
        "null_wins_listed": NULL_WINS_LISTED,
        "alignment_card": alignment_card,
    }

    index = out_dir / "index.html"
    index.write_text(environment.get_template("index.html").render(**common), encoding="utf-8")
    layer_template = environment.get_template("layer.html")
    for layer in layers:
        units = layer_units[layer["layer_id"]]
        for page_number, page in enumerate(layer["pages"]):
            page_units = units[page["start"] : page["start"] + units_per_page]
            categories = sorted({unit["concepts"][0]["category"] for unit in page_units if unit["concepts"] and unit["concepts"][0]["category"]})
            html = layer_template.render(
                **common,
                layer=layer,
                page_number=page_number,
                units=page_units,
                page_categories=categories,
            )
            (out_dir / page["file"]).write_text(html, encoding="utf-8")
    return index, layers


def _check_render_options(top_concepts: int, units_per_page: int) -> None:
    if top_concepts < 1 or units_per_page < 1:
        raise ValueError(
            f"top_concepts ({top_concepts}) and units_per_page ({units_per_page}) must be >= 1"
        )


def render_report(
    database: Path,
    run_id: str | Sequence[str] | None,
    out_dir: Path,
    *,
    top_concepts: int = 5,
    units_per_page: int = 256,
) -> Path:
    """Render the report of one run into ``out_dir`` and return the path of ``index.html``.

    :param database: the results database, opened read-only.
    :param run_id: a run id or a unique prefix of one; None picks the newest
        run.  A list of two or more ids renders a comparison
        (:func:`render_comparison` with its defaults); a list of one id is that run.
    :param out_dir: the report folder, created when missing.  Files of an
        earlier report in it are overwritten.
    :param top_concepts: concepts shown per unit, at most the number stored.
    :param units_per_page: units per layer page; longer layers get several pages.
    :raises StoreError: when the database cannot be read.
    :raises UnknownNameError: when no run fits ``run_id``.
    """
    if run_id is not None and not isinstance(run_id, str):
        run_ids = list(run_id)
        if len(run_ids) > 1:
            return render_comparison(
                database, run_ids, out_dir, top_concepts=top_concepts, units_per_page=units_per_page
            )
        if not run_ids:
            raise ValueError("run_id is an empty list; pass a run id, a list of run ids or None for the newest run")
        run_id = run_ids[0]
    _check_render_options(top_concepts, units_per_page)
    out_dir = Path(out_dir)
    environment = make_environment()
    with Store(database, read_only=True) as store:
        run = _resolve_run(store, run_id)
        index, _ = _render_run(
            store, run, out_dir, environment, top_concepts=top_concepts, units_per_page=units_per_page
        )
    logger.info("report of run %s written to %s", run["run_id"], index)
    return index


def _first_model(store: Store, run_id: str, role: str) -> dict[str, Any]:
    models = [model for model in _models(store, run_id) if model["role"] == role]
    return models[0] if models else {}


def _change_section(
    store: Store,
    run_a: dict[str, Any],
    run_b: dict[str, Any],
    threshold: str,
    alpha: float | None,
    same_architecture: bool,
    pages: dict[tuple[str, str], list[dict[str, Any]]],
    units_per_page: int,
) -> dict[str, Any]:
    """Collect concepts gained and lost and units whose label changed, run B against run A."""
    rows = analyses.concept_changes(store, run_a["run_id"], run_b["run_id"], threshold, alpha)
    concepts: dict[str, dict[str, Any]] = {}
    for row in rows:
        layer = concepts.setdefault(row["layer"], {"layer": row["layer"], "gained": [], "lost": [], "kept": 0})
        if row["change"] == "kept":
            layer["kept"] += 1
        else:
            layer[row["change"]].append(row)
    section: dict[str, Any] = {
        "run_a": run_a,
        "run_b": run_b,
        "concepts": list(concepts.values()),
        "labels": None,
        "label_layers": [],
        "labels_hidden": 0,
    }
    if not same_architecture:
        return section

    def link(run: dict[str, Any], layer: str, unit: int) -> str:
        layer_pages = pages[(run["run_id"], layer)]
        page = layer_pages[min(unit // units_per_page, len(layer_pages) - 1)]
        return f"{run['folder']}/{page['file']}#unit-{unit}"

    changes = analyses.label_changes(store, run_a["run_id"], run_b["run_id"], threshold, alpha)
    summary = {row["layer"]: row for row in analyses.layer_summary(store, [run_a["run_id"]])}
    per_layer: dict[str, dict[str, Any]] = {}
    for row in changes:
        layer = per_layer.setdefault(
            row["layer"],
            {"layer": row["layer"], "n_units": summary[row["layer"]]["n_units"], "n_changed": 0, "n_changed_passing": 0},
        )
        layer["n_changed"] += 1
        layer["n_changed_passing"] += int(bool(row["passes_a"] or row["passes_b"]))
        row["link_a"] = link(run_a, row["layer"], row["unit"])
        row["link_b"] = link(run_b, row["layer"], row["unit"])
    section["labels"] = changes[:LABEL_CHANGES_LISTED]
    section["labels_hidden"] = max(0, len(changes) - LABEL_CHANGES_LISTED)
    section["label_layers"] = list(per_layer.values())
    return section


def render_comparison(
    database: Path,
    run_ids: Sequence[str],
    out_dir: Path,
    *,
    threshold: str = "global",
    alpha: float | None = None,
    strict: bool = True,
    top_concepts: int = 5,
    units_per_page: int = 256,
) -> Path:
    """Render a side-by-side comparison of runs into ``out_dir`` and return the path of ``index.html``.

    ``index.html`` compares the runs: configurations and fingerprints,
    per-layer charts, coverage, and for every run after the first the concepts
    gained and lost and the units whose label changed against the first run.
    Each run also gets its single-run report in ``run-N/`` (N = 1, 2, ...).

    :param run_ids: one or more run ids or unique prefixes; the first is the
        reference that later runs are compared against.
    :param threshold: ``global`` (the study's threshold between models),
        ``local`` or ``none``; see :mod:`mammo_dissect.core.analyses`.
    :param alpha: also require units to beat the null baseline at this
        p-value where the layer has one; None for no null filter.
    :param strict: raise when the runs' probe sets or concept sets differ;
        when False, render with a warning at the top of the page.
    :raises ComparisonError: (``strict``) when probe sets or concept sets differ.
    :raises UnknownNameError: when a run id fits no run.
    """
    _check_render_options(top_concepts, units_per_page)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    environment = make_environment()
    with Store(database, read_only=True) as store:
        full_ids = analyses.resolve_run_ids(store, list(run_ids))
        comparability = analyses.check_comparable(store, full_ids, strict=strict)
        runs = []
        for number, full_id in enumerate(full_ids, start=1):
            run = store.get_run(full_id)
            target = _first_model(store, full_id, "target")
            dissector = _first_model(store, full_id, "dissector")
            run.update(
                number=number,
                colour=run_colour(number - 1),
                folder=f"run-{number}",
                target_spec=target.get("spec"),
                weights_sha256=target.get("weights_sha256"),
                dissector_spec=dissector.get("spec"),
            )
            runs.append(run)
        pages: dict[tuple[str, str], list[dict[str, Any]]] = {}
        layer_links: dict[tuple[str, str], str] = {}
        for run in runs:
            _, layers = _render_run(
                store,
                run,
                out_dir / run["folder"],
                environment,
                top_concepts=top_concepts,
                units_per_page=units_per_page,
                threshold=threshold,
                alpha=alpha,
                overview_runs=None,
                comparison_link="../index.html",
            )
            for layer in layers:
                pages[(run["run_id"], layer["name"])] = layer["pages"]
                layer_links[(run["run_id"], layer["name"])] = f"{run['folder']}/{layer['pages'][0]['file']}"
        overview = build_overview(store, runs, threshold, alpha, layer_links)
        changes = [
            _change_section(
                store, runs[0], run, threshold, alpha, comparability.same_architecture, pages, units_per_page
            )
            for run in runs[1:]
        ]
    index = out_dir / "index.html"
    html = environment.get_template("compare.html").render(
        overview=overview, comparability=comparability, changes=changes, comparison_link=None
    )
    index.write_text(html, encoding="utf-8")
    logger.info("comparison of runs %s written to %s", ", ".join(full_ids), index)
    return index

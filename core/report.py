"""Render the HTML report of one run from the store.

The report is a folder of static files: ``index.html`` with the run summary
and the per-layer overview, one or more pages per layer with a table of its
units, and PNG thumbnails of the probe images in ``images/``.  Pages use
inline CSS only and load nothing from the network, so they open offline.
The report reads the store through a read-only connection.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.errors import StoreError
from mammo_dissect.core.images import read_image
from mammo_dissect.core.store import Store


logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "reports" / "templates"
THUMBNAIL_SIZE = 160
IMAGE_FOLDER = "images"
#: Missing probe images named one by one in the warning; the rest are counted.
MISSING_IMAGES_LISTED = 5


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
    """Format a share in [0, 1] as a percentage; None becomes an en dash."""
    if value is None:
        return "\u2013"
    return f"{100.0 * float(value):.1f} %"


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
) -> list[dict[str, Any]]:
    """Collect the rows of one layer's unit table, ordered by unit index."""
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
    for image in images:
        unit = units.setdefault(image["unit"], _empty_unit(image["unit"]))
        unit["images"].append({**image, "thumbnail": thumbnails.get(image["image_index"])})

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


def render_report(
    database: Path,
    run_id: str | None,
    out_dir: Path,
    *,
    top_concepts: int = 5,
    units_per_page: int = 256,
) -> Path:
    """Render the report of one run into ``out_dir`` and return the path of ``index.html``.

    :param database: the results database, opened read-only.
    :param run_id: a run id or a unique prefix of one; None picks the newest run.
    :param out_dir: the report folder, created when missing.  Files of an
        earlier report in it are overwritten.
    :param top_concepts: concepts shown per unit, at most the number stored.
    :param units_per_page: units per layer page; longer layers get several pages.
    :raises StoreError: when the database cannot be read.
    :raises UnknownNameError: when no run fits ``run_id``.
    """
    if top_concepts < 1 or units_per_page < 1:
        raise ValueError(
            f"top_concepts ({top_concepts}) and units_per_page ({units_per_page}) must be >= 1"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    environment = make_environment()

    with Store(database, read_only=True) as store:
        run = _resolve_run(store, run_id)
        full_id = run["run_id"]
        models = _models(store, full_id)
        layers = _layers(store, full_id)
        _, count_rows = store.query("SELECT count(*) FROM probe_images WHERE run_id = ?", [full_id])
        n_images = count_rows[0][0]
        thumbnails = write_thumbnails(_used_images(store, full_id), out_dir, full_id)
        layer_units = {
            layer["layer_id"]: _layer_units(store, full_id, layer, top_concepts, thumbnails)
            for layer in layers
        }

    for layer in layers:
        layer["pages"] = _pages(layer, len(layer_units[layer["layer_id"]]), units_per_page)
    target = next((model for model in models if model["role"] == "target"), None)
    stored_top_n = (run.get("config") or {}).get("top_n")
    common = {
        "run": run,
        "models": models,
        "layers": layers,
        "target": target,
        "n_images": n_images,
        "shown_concepts": top_concepts,
        "stored_concepts": stored_top_n,
    }

    index = out_dir / "index.html"
    index.write_text(environment.get_template("index.html").render(**common), encoding="utf-8")
    layer_template = environment.get_template("layer.html")
    for layer in layers:
        units = layer_units[layer["layer_id"]]
        for page_number, page in enumerate(layer["pages"]):
            html = layer_template.render(
                **common,
                layer=layer,
                page_number=page_number,
                units=units[page["start"] : page["start"] + units_per_page],
            )
            (out_dir / page["file"]).write_text(html, encoding="utf-8")
    logger.info("report of run %s written to %s", full_id, index)
    return index

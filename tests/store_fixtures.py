"""Small hand-made runs for the store and report tests.

The synthetic run has two layers of one target model: ``layer3`` with 3
units and a null baseline, and ``layer4`` with 4 units and none.  It has four
concepts, one of them an HTML script tag to test escaping, and six probe
images written as tiny PNG files.  Every unit has its top 2 concepts and its
top 3 images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mammo_dissect.core.results import ConceptRecord
from mammo_dissect.core.results import ImageRecord
from mammo_dissect.core.results import LayerRecord
from mammo_dissect.core.results import ModelRecord
from mammo_dissect.core.results import RunResults
from mammo_dissect.core.results import UnitTables
from mammo_dissect.core.store import Store


HOSTILE_CONCEPT = "<script>alert(1)</script>"
CONCEPT_TEXTS = ("mass", "calcification", HOSTILE_CONCEPT, "architectural distortion")
CONCEPT_CATEGORIES = ("finding", "finding", "test", "finding")
LAYER_NAMES = ("layer3", "layer4")
UNITS_PER_LAYER = (3, 4)
N_IMAGES = 6
TOP_CONCEPTS = 2
TOP_IMAGES = 3
#: Top scores of the units of layer3.  Its null p95 is 0.5, so units 0 and 1 beat it.
LAYER3_TOP_SCORES = (0.9, 0.6, 0.4)
LAYER3_NULL_P95 = 0.5
LAYER3_P_VALUES = (0.01, 0.2, 0.6)


def write_probe_images(folder: Path, count: int = N_IMAGES) -> list[Path]:
    """Write ``count`` small grey PNG images (20 x 16 pixels) and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = np.full((20, 16), 30 * index, dtype=np.uint8)
        pixels[5:10, 4:8] = 255
        path = folder / f"image_{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _concept_id(layer_id: int, unit: int, rank: int) -> int:
    return (layer_id + unit + rank) % len(CONCEPT_TEXTS)


def _image_index(layer_id: int, unit: int, rank: int) -> int:
    return (layer_id + unit + rank) % N_IMAGES


def make_unit_tables() -> UnitTables:
    """Build the per-unit rows: scores fall with unit and rank so every value is predictable."""
    labels: list[tuple[int, int, int, int, float]] = []
    images: list[tuple[int, int, int, int, float]] = []
    scores: list[tuple[int, int, float, float, float]] = []
    for layer_id, n_units in enumerate(UNITS_PER_LAYER):
        for unit in range(n_units):
            if layer_id == 0:
                top = LAYER3_TOP_SCORES[unit]
                p_value = LAYER3_P_VALUES[unit]
            else:
                top = 0.8 - 0.1 * unit
                p_value = float("nan")
            for rank in range(TOP_CONCEPTS):
                labels.append((layer_id, unit, rank, _concept_id(layer_id, unit, rank), top - 0.2 * rank))
            for rank in range(TOP_IMAGES):
                images.append((layer_id, unit, rank, _image_index(layer_id, unit, rank), 1.0 - 0.1 * rank))
            percentile = 100.0 * (n_units - 1 - unit) / max(n_units - 1, 1)
            scores.append((layer_id, unit, top, percentile, p_value))

    return unit_tables_from_rows(labels, images, scores)


def unit_tables_from_rows(
    labels: list[tuple[int, int, int, int, float]],
    images: list[tuple[int, int, int, int, float]],
    scores: list[tuple[int, int, float, float, float]],
) -> UnitTables:
    """Build :class:`UnitTables` from row tuples, one tuple per stored row.

    ``labels`` rows are (layer id, unit, rank, concept id, score), ``images``
    rows (layer id, unit, rank, image index, activation) and ``scores`` rows
    (layer id, unit, top score, percentile, p-value).
    """
    label_columns = list(zip(*labels))
    image_columns = list(zip(*images))
    score_columns = list(zip(*scores))
    return UnitTables(
        label_layer_id=np.array(label_columns[0], dtype=np.int64),
        label_unit=np.array(label_columns[1], dtype=np.int64),
        label_rank=np.array(label_columns[2], dtype=np.int64),
        label_concept_id=np.array(label_columns[3], dtype=np.int64),
        label_score=np.array(label_columns[4], dtype=np.float32),
        image_layer_id=np.array(image_columns[0], dtype=np.int64),
        image_unit=np.array(image_columns[1], dtype=np.int64),
        image_rank=np.array(image_columns[2], dtype=np.int64),
        image_index=np.array(image_columns[3], dtype=np.int64),
        image_activation=np.array(image_columns[4], dtype=np.float32),
        score_layer_id=np.array(score_columns[0], dtype=np.int64),
        score_unit=np.array(score_columns[1], dtype=np.int64),
        score_top=np.array(score_columns[2], dtype=np.float32),
        score_percentile=np.array(score_columns[3], dtype=np.float32),
        score_p_value=np.array(score_columns[4], dtype=np.float32),
    )


def make_results(image_paths: list[Path]) -> RunResults:
    """Build the synthetic :class:`RunResults` over the given probe image files."""
    models = [
        ModelRecord(
            model_id=0,
            role="target",
            plugin="timm",
            plugin_version="1.0",
            spec="timm:resnet18",
            weights_path=None,
            weights_sha256=None,
            preprocessing={"size": [224, 224], "mean": [0.5], "std": [0.5]},
        ),
        ModelRecord(
            model_id=1,
            role="dissector",
            plugin="annotation",
            plugin_version="0.1.0",
            spec="annotation",
            weights_path=None,
            weights_sha256=None,
            preprocessing={},
        ),
    ]
    layers = [
        LayerRecord(
            layer_id=0,
            model_id=0,
            name=LAYER_NAMES[0],
            depth=3,
            n_units=UNITS_PER_LAYER[0],
            output_shape=[UNITS_PER_LAYER[0], 14, 14],
            pooling="mean",
            null_mean=0.3,
            null_p95=LAYER3_NULL_P95,
            null_max=0.55,
            permutations=10,
        ),
        LayerRecord(
            layer_id=1,
            model_id=0,
            name=LAYER_NAMES[1],
            depth=4,
            n_units=UNITS_PER_LAYER[1],
            output_shape=[UNITS_PER_LAYER[1], 7, 7],
            pooling="mean",
        ),
    ]
    images = [
        ImageRecord(
            image_index=index,
            image_id=f"img{index}",
            path=str(path),
            sha256=f"{index:064x}",
            patient_id=f"P{index // 2}",
            laterality="L" if index % 2 == 0 else "R",
            view="CC" if index < 3 else "MLO",
            metadata={"density": "B", "age": 50 + index},
            annotations=["mass"] if index % 3 == 0 else [],
        )
        for index, path in enumerate(image_paths)
    ]
    concepts = [
        ConceptRecord(concept_id=index, text=text, category=category, broad_category="all")
        for index, (text, category) in enumerate(zip(CONCEPT_TEXTS, CONCEPT_CATEGORIES))
    ]
    return RunResults(
        probe_set_reader="folder",
        probe_set_root=str(image_paths[0].parent),
        probe_fingerprint="f" * 64,
        similarity="wpmi",
        similarity_params={"lam": 1.0},
        similarity_range="any real number; higher is more similar",
        concept_set_name="synthetic",
        concept_set_source="tests",
        concept_set_sha256="c" * 64,
        concept_set_dropped={"duplicates": 0},
        models=models,
        layers=layers,
        images=images,
        concepts=concepts,
        units=make_unit_tables(),
    )


RUN_CONFIG = {"target": {"spec": "timm:resnet18"}, "layers": list(LAYER_NAMES), "top_k": TOP_IMAGES}


def write_run(store: Store, run_id: str, image_paths: list[Path], name: str = "synthetic") -> RunResults:
    """Begin and complete one synthetic run in ``store`` and return its results."""
    results = make_results(image_paths)
    store.begin_run(run_id, name, RUN_CONFIG, "a" * 64, "0.1.0")
    store.write_results(run_id, results)
    return results


def make_database(path: Path, image_paths: list[Path], run_ids: tuple[str, ...] = ("run-a",)) -> Path:
    """Create a database at ``path`` with one completed synthetic run per id."""
    with Store(path) as store:
        for run_id in run_ids:
            write_run(store, run_id, image_paths)
    return path

"""Measure how long the HTML report takes for a run with 7,000 units.

Builds a synthetic results database (7 layers x 1,000 units, 5 concepts and 5
top images per unit, 200 probe images of 256 x 256 pixels, 60 concepts with
categories), then renders the single-run report and the comparison of two such
runs, each ``--repeats`` times, and prints the median wall time.

    .venv/bin/python benchmarks/report_render.py --out /tmp/report-bench

The numbers in ``docs/benchmarks.md`` come from this script.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mammo_dissect.core.report import render_comparison
from mammo_dissect.core.report import render_report
from mammo_dissect.core.results import ConceptRecord
from mammo_dissect.core.results import ImageRecord
from mammo_dissect.core.results import LayerRecord
from mammo_dissect.core.results import ModelRecord
from mammo_dissect.core.results import RunResults
from mammo_dissect.core.results import UnitTables
from mammo_dissect.core.store import Store


N_LAYERS = 7
UNITS_PER_LAYER = 1000
N_IMAGES = 200
N_CONCEPTS = 60
TOP_N = 5
TOP_K = 5
BROAD_CATEGORIES = (
    "breast anatomy or structure",
    "findings and characterisations",
    "interpretations",
    "non-mammography",
)


def write_images(folder: Path, rng: np.random.Generator) -> list[Path]:
    """Write the probe images as 256 x 256 grey PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(N_IMAGES):
        pixels = rng.integers(0, 255, size=(256, 256), dtype=np.uint8)
        path = folder / f"probe_{index:04d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def make_results(paths: list[Path], rng: np.random.Generator) -> RunResults:
    """Build random per-unit results of the benchmark's size."""
    n_units = N_LAYERS * UNITS_PER_LAYER
    layer_ids = np.repeat(np.arange(N_LAYERS), UNITS_PER_LAYER)
    units = np.tile(np.arange(UNITS_PER_LAYER), N_LAYERS)
    scores = np.sort(rng.random((n_units, TOP_N)).astype(np.float32), axis=1)[:, ::-1]
    concepts = np.stack([rng.permutation(N_CONCEPTS)[:TOP_N] for _ in range(n_units)])
    images = np.stack([rng.permutation(N_IMAGES)[:TOP_K] for _ in range(n_units)])
    unit_tables = UnitTables(
        label_layer_id=np.repeat(layer_ids, TOP_N),
        label_unit=np.repeat(units, TOP_N),
        label_rank=np.tile(np.arange(TOP_N), n_units),
        label_concept_id=concepts.reshape(-1),
        label_score=scores.reshape(-1),
        image_layer_id=np.repeat(layer_ids, TOP_K),
        image_unit=np.repeat(units, TOP_K),
        image_rank=np.tile(np.arange(TOP_K), n_units),
        image_index=images.reshape(-1),
        image_activation=np.tile(np.linspace(1.0, 0.5, TOP_K, dtype=np.float32), n_units),
        score_layer_id=layer_ids,
        score_unit=units,
        score_top=scores[:, 0].copy(),
        score_percentile=rng.random(n_units).astype(np.float32) * 100,
        score_p_value=rng.random(n_units).astype(np.float32),
    )
    return RunResults(
        probe_set_reader="folder",
        probe_set_root=str(paths[0].parent),
        probe_fingerprint="0" * 64,
        similarity="soft_wpmi",
        similarity_params={"top_k": 20},
        similarity_range="benchmark",
        concept_set_name="benchmark",
        concept_set_source="benchmark",
        concept_set_sha256="1" * 64,
        concept_set_dropped={},
        models=[
            ModelRecord(0, "target", "benchmark", "0", "benchmark-net", None, None, {}),
            ModelRecord(1, "dissector", "annotation", "0", "annotation", None, None, {}),
        ],
        layers=[
            LayerRecord(layer_id, 0, f"block{layer_id}", layer_id, UNITS_PER_LAYER, [UNITS_PER_LAYER, 7, 7], "avg", 0.3, 0.9, 0.95, 10)
            for layer_id in range(N_LAYERS)
        ],
        images=[
            ImageRecord(index, f"probe_{index:04d}", str(path), "0" * 64, f"P{index // 2}", "L", "MLO", {}, [])
            for index, path in enumerate(paths)
        ],
        concepts=[
            ConceptRecord(index, f"concept {index}", f"category {index % 12}", BROAD_CATEGORIES[index % len(BROAD_CATEGORIES)])
            for index in range(N_CONCEPTS)
        ],
        units=unit_tables,
    )


def median_seconds(action, repeats: int) -> tuple[float, list[float]]:
    """Run ``action`` ``repeats`` times and return the median and all wall times in seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("report-benchmark"), help="work folder (replaced)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.out.exists():
        shutil.rmtree(args.out)
    rng = np.random.default_rng(0)
    paths = write_images(args.out / "probe", rng)
    database = args.out / "bench.duckdb"
    with Store(database) as store:
        for run_id in ("bench-a", "bench-b"):
            store.begin_run(run_id, run_id, {"top_n": TOP_N}, "2" * 64, "bench")
            store.write_results(run_id, make_results(paths, rng))

    single, single_times = median_seconds(
        lambda: render_report(database, "bench-a", args.out / "single"), args.repeats
    )
    pair, pair_times = median_seconds(
        lambda: render_comparison(database, ["bench-a", "bench-b"], args.out / "pair"), args.repeats
    )
    pages = len(list((args.out / "single").glob("*.html")))
    result = {
        "machine": f"{platform.machine()}, {platform.processor() or 'unknown CPU'}, python {platform.python_version()}",
        "units_per_run": N_LAYERS * UNITS_PER_LAYER,
        "single_run_pages": pages,
        "single_run_median_s": round(single, 2),
        "single_run_times_s": [round(value, 2) for value in single_times],
        "comparison_of_two_median_s": round(pair, 2),
        "comparison_of_two_times_s": [round(value, 2) for value in pair_times],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

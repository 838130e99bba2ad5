"""Benchmark extraction against the bare forward pass, and a full run cold and warm.

Measures, on the same probe images and the same batch size:

* the bare forward pass of the target over the probe set (decoding and
  preprocessing included, no hooks): the floor;
* mammo-dissect's extraction of all requested layers (hooks, pooling,
  streaming to disk, progress file after every batch);
* a full run with an empty cache (extraction, P, scoring, null baseline, DuckDB write);
* the same run again with a warm cache;
* DuckDB ingest speed (label rows per second) of the full run.

Each measurement runs in a fresh Python process, so peak memory (ru_maxrss)
belongs to that measurement alone.  Usage::

    python benchmarks/extraction.py --root ../shared/data/mini-mias --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


LAYERS = ["_blocks.2", "_blocks.8", "_blocks.15", "_conv_head"]

MEASURE = r'''
import json, resource, sys, time, tempfile
from pathlib import Path
import torch
torch.set_num_threads({threads})
from mammo_dissect.core.config import load_config
from mammo_dissect.core.pipeline import prepare, run
from mammo_dissect.core.extraction import extract_activations, make_loader

config = load_config(None, data={config})
mode = {mode!r}
start = time.perf_counter()
extra = {{}}
if mode == "forward":
    plan = prepare(config, progress=False)
    model = plan.target.model.eval()
    with torch.inference_mode():
        for _, batch in make_loader(plan.probe_set, plan.target.preprocess, plan.runtime):
            model(batch)
elif mode == "extract":
    plan = prepare(config, progress=False)
    start = time.perf_counter()
    extract_activations(plan.target, plan.layers, plan.probe_set, plan.runtime, "avg",
                        Path(tempfile.mkdtemp()))
elif mode == "run":
    outcome = run(config, progress=False)
    import duckdb
    with duckdb.connect(str(outcome.database), read_only=True) as con:
        extra["label_rows"] = con.execute("SELECT count(*) FROM unit_labels WHERE run_id = ?",
                                          [outcome.run_id]).fetchone()[0]
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}}))
'''


def measure(mode: str, config: dict, threads: int) -> dict:
    code = MEASURE.format(mode=mode, config=repr(config), threads=threads)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def ingest_rate(database: Path) -> float:
    """Insert the run's label rows again through Arrow and return rows per second."""
    import time

    import duckdb

    with duckdb.connect(str(database)) as con:
        relation = con.sql("SELECT * FROM unit_labels")
        # DuckDB 2.0 renamed arrow() to to_arrow_table().
        table = relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()
        con.execute("CREATE TEMP TABLE copy_labels AS SELECT * FROM unit_labels LIMIT 0")
        con.register("batch", table)
        start = time.perf_counter()
        con.execute("INSERT INTO copy_labels SELECT * FROM batch")
        seconds = time.perf_counter() - start
    return table.num_rows / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="mini-MIAS folder (labels.csv, images/).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (this machine has 2 cores).")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mammo-dissect-bench-"))
    config = {
        "probe_set": {"name": "mini-mias", "options": {"root": str(args.root.resolve())}},
        "target": {"loader": "efficientnet-lite", "options": {"model": "efficientnet-lite0"}, "layers": LAYERS},
        "dissector": {"name": "annotation"},
        "concept_set": {"name": "annotations"},
        "similarity": {"name": "soft_wpmi"},
        "batch_size": args.batch_size,
        "permutations": 10,
    }
    results: dict[str, list[dict]] = {"forward": [], "extract": [], "cold run": [], "warm run": []}
    for repeat in range(args.repeats):
        cache = work / f"cache-{repeat}"
        run_config = dict(config, cache_dir=str(cache), database=str(work / f"run-{repeat}.duckdb"))
        results["forward"].append(measure("forward", run_config, args.threads))
        results["extract"].append(measure("extract", run_config, args.threads))
        results["cold run"].append(measure("run", run_config, args.threads))
        results["warm run"].append(measure("run", run_config, args.threads))

    median = {name: statistics.median(r["seconds"] for r in runs) for name, runs in results.items()}
    peak = {name: max(r["peak_rss_mb"] for r in runs) for name, runs in results.items()}
    rate = ingest_rate(work / "run-0.duckdb")
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} torch threads, "
          f"python {platform.python_version()}")
    print(f"probe set: mini-MIAS ({args.root}), EfficientNet-Lite0, layers {', '.join(LAYERS)}, batch {args.batch_size}")
    print("| measurement | median seconds | peak RSS (MB) |")
    print("| --- | --- | --- |")
    for name in results:
        print(f"| {name} | {median[name]:.2f} | {peak[name]:.0f} |")
    print(f"extraction / bare forward: {median['extract'] / median['forward']:.3f}")
    print(f"cold run / warm run: {median['cold run'] / median['warm run']:.1f}x")
    print(f"label rows per run: {results['cold run'][0]['label_rows']}; DuckDB Arrow ingest: {rate:,.0f} rows/s")


if __name__ == "__main__":
    main()

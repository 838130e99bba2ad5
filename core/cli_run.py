"""Commands that run a dissection: ``run``, ``ingest`` (sharded runs) and ``demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from mammo_dissect.core.cli_common import CliState
from mammo_dissect.core.cli_common import format_table
from mammo_dissect.core.cli_common import load_run_config
from mammo_dissect.core.cli_common import render_run_report


DEMO_LAYERS = ["_blocks.2", "_blocks.8", "_blocks.15", "_conv_head"]


@click.command()
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a configuration value, for example --set similarity.params.top_k=50 (TOML syntax).")
@click.option("--database", type=click.Path(path_type=Path, dir_okay=False), help="DuckDB file to write the run into.")
@click.option("--device", help="torch device, for example cpu or cuda:0.")
@click.option("--batch-size", type=int, help="Images per forward pass.")
@click.option("--limit", type=int, help="Use only the first N probe images (smoke runs).")
@click.option("--report", "report_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Also render the HTML report into this folder.")
@click.option("--recompute", is_flag=True, help="Ignore cached activations and embeddings and compute them again.")
@click.option("--dry-run", is_flag=True, help="Validate and print the plan (layers, units, sizes) without running it.")
@click.option("--shard", metavar="I/N",
              help="Only extract the activations of slice I of N (1-based, as $SLURM_ARRAY_TASK_ID), then stop; "
                   "'mammo-dissect ingest' assembles the slices.")
@click.option("--wait", "wait_seconds", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Seconds to wait for a database locked by another run before failing.")
def run(config: Path, overrides: tuple[str, ...], database: Path | None, device: str | None,
        batch_size: int | None, limit: int | None, report_dir: Path | None, recompute: bool,
        dry_run: bool, shard: str | None, wait_seconds: float) -> None:
    """Run the dissection described by the TOML file CONFIG."""
    from mammo_dissect.core.pipeline import run as run_pipeline

    extra = list(overrides)
    if database is not None:
        extra.append(f"database={json.dumps(str(database.resolve()))}")
    if device is not None:
        extra.append(f"device={json.dumps(device)}")
    if batch_size is not None:
        extra.append(f"batch_size={batch_size}")
    if limit is not None:
        extra.append(f"probe_set.limit={limit}")
    if dry_run:
        _print_plan(load_run_config(config, extra), recompute)
        return
    if shard is not None:
        from mammo_dissect.core.sharding import extract_shard
        from mammo_dissect.core.sharding import parse_shard

        index, count = parse_shard(shard)
        folder = extract_shard(load_run_config(config, extra), index, count, progress=CliState.progress)
        click.echo(f"shard {index}/{count} extracted: {folder}")
        click.echo(f"when all {count} shards are done, run: mammo-dissect ingest {config}")
        return
    outcome = run_pipeline(
        load_run_config(config, extra), progress=CliState.progress, recompute=recompute, wait_seconds=wait_seconds
    )
    _print_outcome(outcome)
    if report_dir is not None:
        render_run_report(outcome.database, outcome.run_id, report_dir)


@click.command()
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a configuration value.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Also render the HTML report into this folder.")
def ingest(config: Path, overrides: tuple[str, ...], report_dir: Path | None) -> None:
    """Assemble the shards extracted with 'run --shard I/N' and finish the run of CONFIG.

    Every shard must be finished (a missing one is named in the error).  The
    assembled activations go into the cache; the run then scores them and
    writes the database as an ordinary run does, without extracting again.
    """
    from mammo_dissect.core.pipeline import run as run_pipeline
    from mammo_dissect.core.sharding import ingest as ingest_shards

    run_config = load_run_config(config, list(overrides))
    layers = ingest_shards(run_config, progress=CliState.progress)
    click.echo(f"assembled {len(layers)} layer(s) from the shards")
    outcome = run_pipeline(run_config, progress=CliState.progress)
    _print_outcome(outcome)
    if report_dir is not None:
        render_run_report(outcome.database, outcome.run_id, report_dir)


def _print_plan(config: Any, recompute: bool) -> None:
    from mammo_dissect.core.pipeline import plan_summary
    from mammo_dissect.core.pipeline import prepare

    summary = plan_summary(prepare(config, progress=False, recompute=recompute))
    click.echo(
        f"plan: {summary['target']} x {len(summary['layers'])} layer(s) x {summary['images']} images; "
        f"dissector {summary['dissector']}, {summary['concepts']} concepts, similarity {summary['similarity']}"
    )
    rows = [
        (layer["name"], "x".join(str(size) for size in layer["output_shape"]), layer["units"],
         f"{layer['activations_bytes'] / 1e6:.1f}", "cached" if layer["cached"] else "to extract")
        for layer in summary["layers"]
    ]
    click.echo(format_table(["layer", "output", "units", "activations MB", "cache"], rows))
    click.echo(f"P (images x concepts): {summary['p_bytes'] / 1e6:.1f} MB in memory")
    click.echo(f"label rows to store: {summary['label_rows']}; permutations per layer: {summary['permutations']}")
    click.echo(f"database: {summary['database']}; cache: {summary['cache_dir']}")
    click.echo("dry run: nothing was extracted or written")


def _print_outcome(outcome: Any) -> None:
    click.echo(f"run {outcome.run_id} completed: {outcome.n_images} images, {outcome.n_concepts} concepts")
    for name, units in outcome.layers:
        click.echo(f"  layer {name}: {units} units labelled")
    click.echo(f"database: {outcome.database}")


def demo_config(out_dir: Path) -> dict[str, Any]:
    """Return the embedded demo configuration: EfficientNet-Lite0 on the 8 CBIS-DDSM DICOMs."""
    return {
        "name": "demo: EfficientNet-Lite0 (ImageNet) on 8 CBIS-DDSM mammograms, annotation dissector",
        "probe_set": {"name": "cbis-ddsm-dicom"},
        "target": {"loader": "efficientnet-lite", "options": {"model": "efficientnet-lite0"}, "layers": DEMO_LAYERS},
        "dissector": {"name": "annotation"},
        "concept_set": {"name": "annotations"},
        # 8 probe images: soft_wpmi's default top_k of 100 cannot apply.
        "similarity": {"name": "soft_wpmi", "params": {"top_k": 3}},
        "top_n": 5,
        "top_k_images": 3,
        "permutations": 20,
        "batch_size": 4,
        "cache_dir": str(out_dir / "cache"),
        "database": str(out_dir / "demo.duckdb"),
    }


@click.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              default=Path("mammo-dissect-demo"), show_default=True, help="Folder for the database and report.")
def demo(out_dir: Path) -> None:
    """Dissect EfficientNet-Lite0 on 8 real CBIS-DDSM mammograms, offline, and render a report."""
    from mammo_dissect.core.pipeline import run as run_pipeline

    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    outcome = run_pipeline(load_run_config(None, [], data=demo_config(out_dir)), progress=CliState.progress)
    _print_outcome(outcome)
    index = render_run_report(outcome.database, outcome.run_id, out_dir / "report")
    click.echo("")
    click.echo(f"Open {index} in a browser, or query the results:")
    click.echo(f"  mammo-dissect sql {outcome.database} \"SELECT * FROM top_labels LIMIT 10\"")
    click.echo("To dissect a real probe set, write a configuration file (see examples/mini-mias.toml) and run:")
    click.echo("  mammo-dissect run my-run.toml --report my-report")

"""The ``mammo-dissect`` command line: the only place that prints and maps errors to exit codes."""

from __future__ import annotations

import csv
import io
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from mammo_dissect import __version__
from mammo_dissect.core.errors import MammoDissectError
from mammo_dissect.core.errors import Terminated


logger = logging.getLogger("mammo_dissect")

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

DEMO_LAYERS = ["_blocks.2", "_blocks.8", "_blocks.15", "_conv_head"]


class _State:
    progress = True


def setup_logging(verbose: int, quiet: bool) -> None:
    """Send log records to stderr at INFO (default), DEBUG (-v) or WARNING (--quiet)."""
    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    if quiet:
        level = logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("mammo_dissect")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    _State.progress = not quiet and sys.stderr.isatty()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mammo-dissect")
@click.option("-v", "--verbose", count=True, help="Show debug messages.")
@click.option("-q", "--quiet", is_flag=True, help="Show only warnings and errors; no progress bars.")
@click.option("--progress/--no-progress", default=None, help="Force progress bars on or off.")
def cli(verbose: int, quiet: bool, progress: bool | None) -> None:
    """Label the units of mammography vision models with textual concepts."""
    setup_logging(verbose, quiet)
    if progress is not None:
        _State.progress = progress


def _run_config(config_path: Path | None, overrides: list[str], data: dict[str, Any] | None = None) -> Any:
    from mammo_dissect.core.config import load_config

    return load_config(config_path, overrides, data=data)


@cli.command()
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
        _print_plan(_run_config(config, extra), recompute)
        return
    if shard is not None:
        from mammo_dissect.core.sharding import extract_shard
        from mammo_dissect.core.sharding import parse_shard

        index, count = parse_shard(shard)
        folder = extract_shard(_run_config(config, extra), index, count, progress=_State.progress)
        click.echo(f"shard {index}/{count} extracted: {folder}")
        click.echo(f"when all {count} shards are done, run: mammo-dissect ingest {config}")
        return
    outcome = run_pipeline(
        _run_config(config, extra), progress=_State.progress, recompute=recompute, wait_seconds=wait_seconds
    )
    _print_outcome(outcome)
    if report_dir is not None:
        _render(outcome.database, outcome.run_id, report_dir)


@cli.command()
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

    run_config = _run_config(config, list(overrides))
    layers = ingest_shards(run_config, progress=_State.progress)
    click.echo(f"assembled {len(layers)} layer(s) from the shards")
    outcome = run_pipeline(run_config, progress=_State.progress)
    _print_outcome(outcome)
    if report_dir is not None:
        _render(outcome.database, outcome.run_id, report_dir)


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


def _render(database: Path, run_id: str, out_dir: Path) -> Path:
    from mammo_dissect.core.report import render_report

    index = render_report(database, run_id, out_dir)
    click.echo(f"report: {index}")
    return index


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


@cli.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              default=Path("mammo-dissect-demo"), show_default=True, help="Folder for the database and report.")
def demo(out_dir: Path) -> None:
    """Dissect EfficientNet-Lite0 on 8 real CBIS-DDSM mammograms, offline, and render a report."""
    from mammo_dissect.core.pipeline import run as run_pipeline

    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    outcome = run_pipeline(_run_config(None, [], data=demo_config(out_dir)), progress=_State.progress)
    _print_outcome(outcome)
    index = _render(outcome.database, outcome.run_id, out_dir / "report")
    click.echo("")
    click.echo(f"Open {index} in a browser, or query the results:")
    click.echo(f"  mammo-dissect sql {outcome.database} \"SELECT * FROM top_labels LIMIT 10\"")
    click.echo("To dissect a real probe set, write a configuration file (see examples/mini-mias.toml) and run:")
    click.echo("  mammo-dissect run my-run.toml --report my-report")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def plugins(as_json: bool) -> None:
    """List every plugin with its version and what it registered."""
    from mammo_dissect.core.plugins import get_registry

    registry = get_registry()
    infos = [info.as_dict() for _, info in sorted(registry.plugins.items())]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
        return
    for info in infos:
        click.echo(f"{info['name']} {info['version'] or ''} ({info['source']})")
        for kind, names in sorted(info["registered"].items()):
            click.echo(f"    {kind}: {', '.join(names)}")


def _parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    from mammo_dissect.core.config import parse_override

    options: dict[str, Any] = {}
    for pair in pairs:
        parts, value = parse_override(pair)
        options[".".join(parts)] = value
    return options


@cli.command()
@click.argument("loader")
@click.option("-o", "--option", "option_pairs", multiple=True, metavar="KEY=VALUE",
              help="Target loader option, for example -o model=efficientnet-lite0.")
@click.option("--input-size", nargs=2, type=int, metavar="H W", help="Input height and width; default: the loader's.")
@click.option("--filter", "pattern", help="Show only layers whose name contains this text (brackets as in _blocks[3] work).")
def layers(loader: str, option_pairs: tuple[str, ...], input_size: tuple[int, int] | None, pattern: str | None) -> None:
    """Print the layers of target LOADER with their output shapes (one forward pass on zeros)."""
    import torch

    from mammo_dissect.core.errors import ConfigError
    from mammo_dissect.core.extraction import canonical_layer_name
    from mammo_dissect.core.extraction import layer_table
    from mammo_dissect.core.plugins import get_registry
    from mammo_dissect.core.types import validate_options

    if input_size is not None and not all(1 <= side <= 8192 for side in input_size):
        raise ConfigError(f"--input-size {input_size[0]} {input_size[1]}: height and width must be 1 to 8192 pixels")
    target_loader = get_registry().get("target loader", loader)
    options = validate_options(target_loader.Options, _parse_options(option_pairs), "target.options")
    target = target_loader.load(options)
    if input_size is None:
        size = getattr(target.preprocess, "size", (224, 224))
        channels = getattr(target.preprocess, "channels", 3)
    else:
        size, channels = input_size, getattr(target.preprocess, "channels", 3)
    try:
        rows = layer_table(target.model, torch.zeros(1, channels, *size))
    except RuntimeError as exc:
        raise ConfigError(
            f"{target.spec} cannot run on a 1x{channels}x{size[0]}x{size[1]} input: {exc}; try a larger --input-size"
        ) from None
    if pattern:
        pattern = canonical_layer_name(pattern)
        rows = [row for row in rows if pattern in row[0]]
        if not rows:
            raise ConfigError(f"no layer name of {target.spec} contains {pattern!r}; run without --filter to list all")
    click.echo(f"{target.spec}, input 1x{channels}x{size[0]}x{size[1]}")
    width = max(len(name) for name, _, _ in rows)
    for name, kind, shape in rows:
        click.echo(f"{name:<{width}}  {kind:<28} {shape}")


@cli.command()
@click.argument("database", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("query")
@click.option("--json", "as_json", is_flag=True, help="Print rows as JSON objects.")
@click.option("--csv", "as_csv", is_flag=True, help="Print rows as CSV.")
def sql(database: Path, query: str, as_json: bool, as_csv: bool) -> None:
    """Run read-only SQL QUERY on DATABASE and print the result."""
    from mammo_dissect.core.errors import ConfigError
    from mammo_dissect.core.store import read_only_query

    if as_json and as_csv:
        raise ConfigError("choose one of --json and --csv")
    columns, rows = read_only_query(database, query)
    if as_json:
        click.echo(json.dumps([dict(zip(columns, row)) for row in rows], indent=2, default=str))
    elif as_csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        writer.writerows(rows)
        click.echo(buffer.getvalue(), nl=False)
    else:
        click.echo(format_table(columns, rows))


def format_table(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    """Format rows as an aligned text table."""
    def show(value: Any) -> str:
        if value is None:
            return "NULL"
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value)

    cells = [[show(value) for value in row] for row in rows]
    widths = [max([len(column)] + [len(row[i]) for row in cells]) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


@cli.command()
@click.argument("database", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--run", "run_ids", multiple=True,
              help="Run id (or a unique prefix); repeat to compare runs. Default: the latest completed run.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder to write index.html and thumbnails into.")
@click.option("--threshold", type=click.Choice(["global", "local", "none"]), default="global", show_default=True,
              help="Comparisons: which units pass (global = at least the larger of the runs' layer means).")
@click.option("--alpha", type=click.FloatRange(0, 1), help="Comparisons: also require p-value < ALPHA against the null.")
@click.option("--allow-mismatch", is_flag=True,
              help="Compare runs whose probe sets or concept sets differ (otherwise an error).")
def report(database: Path, run_ids: tuple[str, ...], out_dir: Path, threshold: str, alpha: float | None,
           allow_mismatch: bool) -> None:
    """Render the HTML report of a run, or a side-by-side comparison of several runs, stored in DATABASE."""
    from mammo_dissect.core.errors import StoreError
    from mammo_dissect.core.report import render_comparison
    from mammo_dissect.core.store import Store

    with Store(database, read_only=True) as store:
        if not run_ids:
            latest = store.latest_run_id(status="completed") or store.latest_run_id()
            if latest is None:
                raise StoreError(f"{database} contains no runs; run a dissection first")
            run_ids = (latest,)
        resolved = [store.resolve_run_id(run_id) for run_id in run_ids]
        statuses = {run_id: store.get_run(run_id)["status"] for run_id in resolved}
    for run_id, status in statuses.items():
        if status != "completed":
            logger.warning("run %s has status %s: it stored no labels, so the report shows only its configuration",
                           run_id, status)
    if len(resolved) == 1:
        _render(database, resolved[0], out_dir)
        return
    index = render_comparison(database, resolved, out_dir, threshold=threshold, alpha=alpha,
                              strict=not allow_mismatch)
    click.echo(f"report: {index}")


@cli.command()
@click.argument("database", type=click.Path(path_type=Path, dir_okay=False))
def runs(database: Path) -> None:
    """List the runs stored in DATABASE."""
    from mammo_dissect.core.store import read_only_query

    columns, rows = read_only_query(
        database, "SELECT run_id, name, status, created_at, similarity, n_concepts FROM runs ORDER BY created_at"
    )
    click.echo(format_table(columns, rows))


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--param", "param_pairs", multiple=True, metavar="KEY=VALUE",
              help="Parameter passed to the function(s), for example --param quantile=0.75.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic units.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a Markdown table.")
def sanity(names: tuple[str, ...], param_pairs: tuple[str, ...], seed: int, as_json: bool) -> None:
    """Run the missing-label and extra-label tests on similarity functions NAMES (default: all).

    Each function scores synthetic units whose ground-truth concepts are known.
    The exit code is 0 whatever the outcome; read the table.
    """
    from mammo_dissect.core.plugins import get_registry
    from mammo_dissect.core.sanity import format_sanity_table
    from mammo_dissect.core.sanity import run_sanity_checks

    registry = get_registry()
    selected = list(names) or registry.names("similarity function")
    params = _parse_options(param_pairs)
    results = []
    for name in selected:
        results.extend(run_sanity_checks(registry.get("similarity function", name), params, seed=seed))
    if as_json:
        payload = [
            {
                "function": result.function,
                "params": result.params,
                "test": result.test,
                "held": result.held,
                "comparisons": result.comparisons,
                "passed": result.passed,
                "mean_complete": result.mean_complete,
                "mean_altered": result.mean_altered,
                "seed": result.seed,
            }
            for result in results
        ]
        click.echo(json.dumps(payload, indent=2))
    else:
        click.echo(format_sanity_table(results))


@cli.group()
def cache() -> None:
    """Show and prune the cache of activations and embeddings."""


def _cache_root(cache_dir: Path | None, config: Path | None) -> Path:
    from mammo_dissect.core.config import DEFAULT_CACHE_DIR

    if cache_dir is not None:
        return cache_dir
    if config is not None:
        return Path(_run_config(config, []).cache_dir)
    return DEFAULT_CACHE_DIR.expanduser()


@cache.command(name="ls")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), help="Cache folder; default: ~/.cache/mammo-dissect.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), help="Take the cache folder from this run configuration.")
def cache_ls(cache_dir: Path | None, config_path: Path | None) -> None:
    """List cached arrays with their size and whether their checksum still matches."""
    from mammo_dissect.core.cache import ArrayCache

    root = _cache_root(cache_dir, config_path)
    entries = ArrayCache(root).entries()
    rows = [
        (entry.kind, entry.key[:16], f"{entry.size_bytes / 1e6:.1f}", entry.created_at,
         "ok" if entry.valid else "INVALID", entry.description)
        for entry in entries
    ]
    click.echo(f"cache: {root}")
    click.echo(format_table(["kind", "key", "MB", "created", "check", "description"], rows))


@cache.command(name="rm")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), help="Cache folder; default: ~/.cache/mammo-dissect.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), help="Take the cache folder from this run configuration.")
@click.option("--kind", type=click.Choice(["activations", "activation_maps", "image_embeddings", "text_embeddings",
                                          "scores", "alignment_features", "alignment_shortcuts"]),
              help="Remove only this kind.")
@click.option("--key", "key_prefix", default="", help="Remove only entries whose key starts with this.")
@click.option("--invalid", is_flag=True, help="Remove only entries whose checksum does not match.")
@click.option("--all", "remove_all", is_flag=True, help="Allow removing every entry (no filter given).")
def cache_rm(cache_dir: Path | None, config_path: Path | None, kind: str | None, key_prefix: str,
             invalid: bool, remove_all: bool) -> None:
    """Remove cached arrays; they are recomputed when a run needs them."""
    from mammo_dissect.core.cache import ArrayCache
    from mammo_dissect.core.errors import ConfigError

    if not (kind or key_prefix or invalid or remove_all):
        raise ConfigError("give --kind, --key or --invalid to choose entries, or --all to remove every entry")
    removed = ArrayCache(_cache_root(cache_dir, config_path)).remove(kind, key_prefix, invalid_only=invalid)
    freed = sum(entry.size_bytes for entry in removed) / 1e6
    click.echo(f"removed {len(removed)} cache entr{'y' if len(removed) == 1 else 'ies'} ({freed:.1f} MB)")


@cli.group()
def concepts() -> None:
    """List concept sets and check concept files."""


@concepts.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def concepts_list(as_json: bool) -> None:
    """List the registered concept sets with their options."""
    from mammo_dissect.concept_sets.tools import list_concept_sets
    from mammo_dissect.core.plugins import get_registry

    rows = list_concept_sets(get_registry().objects["concept set"])
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(format_table(["name", "options", "description"],
                            [(row["name"], row["options"], row["description"]) for row in rows]))


@concepts.command(name="check")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--workbook", type=click.Path(path_type=Path, dir_okay=False),
              help="Category workbook (one sheet per broad category) to match the concepts against.")
@click.option("--token-limit", type=click.IntRange(min=1), default=77, show_default=True,
              help="Flag concepts longer than this many tokens (counted in words without a tokenizer).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def concepts_check(path: Path, workbook: Path | None, token_limit: int, as_json: bool) -> None:
    """Check a concept file: counts per category, duplicates, dropped lines, over-long concepts."""
    from mammo_dissect.concept_sets.tools import check_concept_file

    report = check_concept_file(path, workbook=workbook, token_limit=token_limit)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    click.echo(f"{report['file']}: {report['concepts']} concepts kept of {report['raw_entries']} entries")
    click.echo(f"blank lines dropped: {report['blank_lines']}; duplicates dropped: {len(report['duplicates'])}")
    for duplicate in report["duplicates"]:
        click.echo(f"  duplicate {duplicate['dropped']!r} (same as {duplicate['kept']!r})")
    click.echo("per broad category:")
    for name, count in sorted(report["by_broad_category"].items()):
        click.echo(f"  {name}: {count}")
    click.echo(f"over {report['token_limit']} tokens ({report['token_counter']}): {len(report['over_long'])}")
    for entry in report["over_long"]:
        click.echo(f"  {entry['tokens']} tokens: {entry['concept'][:80]}")
    if "workbook" in report:
        click.echo("workbook: " + json.dumps(report["workbook"], default=str)[:2000])


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("output", type=click.Path(path_type=Path, dir_okay=False))
def convert(checkpoint: Path, output: Path) -> None:
    """Write a slim weights-only .safetensors copy of a Mammo-CLIP CHECKPOINT (plus a JSON sidecar)."""
    from mammo_dissect.core.convert import convert_checkpoint

    sidecar = convert_checkpoint(checkpoint, output)
    click.echo(f"weights: {output}")
    click.echo(f"configuration: {sidecar}")


@cli.command(name="check-dissector")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a configuration value.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def check_dissector_command(config: Path, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check whether the dissector of CONFIG sees the probe set's annotated concepts (AUROC per concept).

    The probe set must carry annotations.  Concepts whose 95% bootstrap
    interval includes 0.5 are flagged: a dissector near chance on a concept
    cannot label units with it.
    """
    from mammo_dissect.core.pipeline import dissector_check

    results = dissector_check(_run_config(config, list(overrides)), progress=_State.progress)
    if as_json:
        click.echo(json.dumps([result.__dict__ for result in results], indent=2))
        return
    rows = [
        (result.concept, result.n_positive, result.n_negative,
         "-" if result.auroc is None else f"{result.auroc:.3f}",
         "-" if result.ci_low is None else f"{result.ci_low:.3f} to {result.ci_high:.3f}", result.status)
        for result in results
    ]
    click.echo(format_table(["concept", "positives", "negatives", "AUROC", "95% interval", "status"], rows))
    near = [result.concept for result in results if result.status in ("near_chance", "inverted")]
    if near:
        logger.warning("the dissector is near chance or inverted on: %s", ", ".join(near))
    if not results:
        logger.warning("no annotated concept of the probe set is in the concept set; nothing was checked")


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@cli.command()
@click.argument("database", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--run", "run_id", required=True, help="Run id (or a unique prefix).")
def validate(database: Path, run_id: str) -> None:
    """Measure label validity of a run: AUROC of each unit's activations for its label's annotated images.

    Uses the run's own probe-set annotations as ground truth and stores the
    results in unit_validity (summary view: layer_validity).
    """
    from mammo_dissect.core.store import Store
    from mammo_dissect.core.validity import validate_run

    with Store(database, read_only=True) as store:
        run_id = store.resolve_run_id(run_id)
    layers = validate_run(database, run_id, progress=_State.progress)
    rows = [
        (layer.layer, f"{layer.n_labels_checked}/{layer.n_units}", layer.n_auroc,
         _number(layer.mean_auroc), _number(layer.share_above_half))
        for layer in layers
    ]
    click.echo(f"run {run_id}: label validity (AUROC of a unit's activations for its label)")
    click.echo(format_table(["layer", "labels checked", "with AUROC", "mean AUROC", "share > 0.5"], rows))


@cli.command()
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a configuration value.")
@click.option("--seeds", type=click.IntRange(min=1), default=10, show_default=True, help="Random dissectors (null).")
@click.option("--shuffled", type=click.IntRange(min=0), default=3, show_default=True,
              help="Runs with the concept texts shuffled against their columns.")
def chance(config: Path, overrides: tuple[str, ...], seeds: int, shuffled: int) -> None:
    """Compare a run's mammography and distractor counts with chance (random dissectors, shuffled concepts)."""
    from mammo_dissect.core.chance import chance_controls

    report = chance_controls(_run_config(config, list(overrides)), seeds=seeds, shuffled_concepts=shuffled,
                             progress=_State.progress)
    click.echo(f"run {report.run_id}: counts per layer under each control (mean, 5th to 95th percentile)")
    rows = []
    for layer, controls in report.summary().items():
        for control, values in controls.items():
            mammography = values.get("n_mammography")
            validity = values.get("mean_auroc")
            rows.append((
                layer, control,
                f"{_number(mammography.mean, 1)} ({_number(mammography.p05, 1)} to {_number(mammography.p95, 1)})"
                if mammography else "-",
                f"{_number(validity.mean)} ({_number(validity.p05)} to {_number(validity.p95)})" if validity else "-",
            ))
    click.echo(format_table(["layer", "control", "units with mammography labels", "mean validity"], rows))


@cli.command()
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a configuration value.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=20, show_default=True, help="Bootstrap resamples of the probe images.")
@click.option("--noise", type=click.FloatRange(min=0), default=0.02, show_default=True,
              help="Standard deviation of Gaussian noise on the normalised input (0 = none).")
def stability(config: Path, overrides: tuple[str, ...], bootstrap: int, noise: float) -> None:
    """Measure how often units' labels change under resampling, input noise and concept synonyms."""
    from mammo_dissect.core.stability import stability as measure_stability

    layers = measure_stability(_run_config(config, list(overrides)), bootstrap=bootstrap, noise=noise or None,
                               progress=_State.progress)
    rows = [
        (layer.layer, layer.perturbation, layer.n_trials, _number(layer.mean_label_changed_share),
         _number(layer.share_units_changed))
        for layer in layers
    ]
    click.echo(format_table(["layer", "perturbation", "trials", "mean share changed", "units ever changed"], rows))


@cli.group()
def align() -> None:
    """Train the closed-vocabulary 'aligned' dissector from a labelled probe set."""


@align.command(name="train")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder for head.pt and the alignment card (card.json).")
def align_train(config: Path, out_dir: Path) -> None:
    """Train a linear head from image features to sentence embeddings and write its alignment card.

    CONFIG is a TOML file described in docs/aligned.md.  The card records
    cross-validated AUROC per concept against random and shuffled-caption
    heads, a linear-probe ceiling, shortcut checks, unseen paraphrases and a
    leave-concept-out run; only gated concepts can be used for dissection.
    """
    from mammo_dissect.core.alignment import train_alignment

    card = train_alignment(config, out_dir).resolve()
    click.echo(f"alignment card: {card}")
    click.echo(f'use it with: [dissector] name = "aligned" options = {{ card = "{card}" }}')
    click.echo(f"see it as a page: mammo-dissect align card {card} --out {card.parent / 'card.html'}")


@align.command(name="card")
@click.argument("card", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", "out_path", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="HTML file to write.")
def align_card(card: Path, out_path: Path) -> None:
    """Render an alignment card (card.json) as an HTML page: checks, warnings, gate per concept."""
    from mammo_dissect.core.alignment_report import render_card

    click.echo(f"alignment card page: {render_card(card, out_path)}")


@cli.command(name="mask-iou")
@click.argument("database", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--run", "run_id", required=True, help="Run id (or a unique prefix) on a probe set with masks.")
@click.option("--quantile", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.995,
              show_default=True, help="Activation quantile above which a unit counts as active (NetDissect uses 0.995).")
def mask_iou(database: Path, run_id: str, quantile: float) -> None:
    """Score each unit against segmentation masks: IoU of its thresholded activation map with each concept mask."""
    from mammo_dissect.core.mask_dissection import mask_iou_run

    layers = mask_iou_run(database, run_id, quantile=quantile, progress=_State.progress)
    for layer in layers:
        best = ", ".join(f"{concept} {count}" for concept, count in sorted(layer["best_concept_units"].items()))
        click.echo(
            f"layer {layer['layer']}: {layer['n_units']} units over {layer['n_images']} images, mean best IoU "
            f"{layer['mean_best_iou']:.3f}, {layer['n_units_above_cut']} above {layer['iou_cut']} "
            f"(NetDissect's detector cut); best: {best}"
        )
    click.echo(f"stored in {database}: table unit_mask_iou, view top_mask_labels")


def build_cli() -> click.Group:
    """Return the command group with plugin commands added."""
    from mammo_dissect.core.plugins import get_registry

    registry = get_registry()
    if not getattr(cli, "_plugin_commands_added", False):
        registry.manager.hook.register_commands(cli=cli)
        cli._plugin_commands_added = True  # type: ignore[attr-defined]
    return cli


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated("terminated by SIGTERM")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; maps errors to one-line messages and exit codes."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> None:
    try:
        group = build_cli()
        group.main(args=argv, prog_name="mammo-dissect", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MammoDissectError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Terminated:
        click.echo("terminated by SIGTERM", err=True)
        sys.exit(EXIT_TERMINATED)
    except OSError as exc:
        # File-system errors outside the library's own checks (a report folder
        # below a file, a read-only disk) still get one line, not a traceback.
        target = f" {exc.filename}" if exc.filename else ""
        click.echo(f"error: {exc.strerror or exc}:{target}", err=True)
        sys.exit(EXIT_ERROR)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)

"""Commands that read a run database: ``report``, ``runs`` and ``sql``."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import click

from mammo_dissect.core.cli_common import format_table
from mammo_dissect.core.cli_common import render_run_report


logger = logging.getLogger("mammo_dissect")


@click.command()
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
        render_run_report(database, resolved[0], out_dir)
        return
    index = render_comparison(database, resolved, out_dir, threshold=threshold, alpha=alpha,
                              strict=not allow_mismatch)
    click.echo(f"report: {index}")


@click.command()
@click.argument("database", type=click.Path(path_type=Path, dir_okay=False))
def runs(database: Path) -> None:
    """List the runs stored in DATABASE."""
    from mammo_dissect.core.store import read_only_query

    columns, rows = read_only_query(
        database, "SELECT run_id, name, status, created_at, similarity, n_concepts FROM runs ORDER BY created_at"
    )
    click.echo(format_table(columns, rows))


@click.command()
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

"""Helpers shared by the modules of the ``mammo-dissect`` commands.

This module imports no command module, so that every command module can import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


class CliState:
    """Settings of the current invocation, set by the root group before any command runs."""

    progress = True


def load_run_config(config_path: Path | None, overrides: list[str], data: dict[str, Any] | None = None) -> Any:
    from mammo_dissect.core.config import load_config

    return load_config(config_path, overrides, data=data)


def parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    from mammo_dissect.core.config import parse_override

    options: dict[str, Any] = {}
    for pair in pairs:
        parts, value = parse_override(pair)
        options[".".join(parts)] = value
    return options


def render_run_report(database: Path, run_id: str, out_dir: Path) -> Path:
    from mammo_dissect.core.report import render_report

    index = render_report(database, run_id, out_dir)
    click.echo(f"report: {index}")
    return index


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


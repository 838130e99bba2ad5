"""Commands that inspect or prepare the inputs of a run: ``plugins``, ``layers``, ``concepts`` and ``convert``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mammo_dissect.core.cli_common import format_table
from mammo_dissect.core.cli_common import parse_options


@click.command()
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


@click.command()
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
    options = validate_options(target_loader.Options, parse_options(option_pairs), "target.options")
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


@click.group()
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


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("output", type=click.Path(path_type=Path, dir_okay=False))
def convert(checkpoint: Path, output: Path) -> None:
    """Write a slim weights-only .safetensors copy of a Mammo-CLIP CHECKPOINT (plus a JSON sidecar)."""
    from mammo_dissect.core.convert import convert_checkpoint

    sidecar = convert_checkpoint(checkpoint, output)
    click.echo(f"weights: {output}")
    click.echo(f"configuration: {sidecar}")

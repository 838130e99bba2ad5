"""The ``align`` command group: train the 'aligned' dissector and render its alignment card."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
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
    leave-concept-out run.  Only gated concepts can be used for dissection.
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

"""The ``cache`` command group: list and remove cached activations and embeddings."""

from __future__ import annotations

from pathlib import Path

import click

from mammo_dissect.core.cli_common import format_table
from mammo_dissect.core.cli_common import load_run_config


@click.group()
def cache() -> None:
    """Show and prune the cache of activations and embeddings."""


def _cache_root(cache_dir: Path | None, config: Path | None) -> Path:
    from mammo_dissect.core.config import DEFAULT_CACHE_DIR

    if cache_dir is not None:
        return cache_dir
    if config is not None:
        return Path(load_run_config(config, []).cache_dir)
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

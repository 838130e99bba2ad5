"""Sharded extraction without any engine: ``run --shard i/N`` per process, then ``ingest``.

Shard ``i`` of ``N`` (1-based, like a SLURM array with ``--array=1-N``)
extracts the probe images in the contiguous range
``[(i-1)*n/N, i*n/N)`` for every target layer, with the same loop as a local
run, into ``<cache_dir>/shards/<group key>/shard-i-of-N/``.  Each finished
shard folder has one ``.npy`` file per layer and a ``manifest.json`` with the
key parts, the image range and the shapes.  ``ingest`` checks that all ``N``
shards are present and agree, concatenates each layer in image order and
stores it in the activation cache under the key a normal run looks up.  The
next run then only scores and writes the database.

Shards share nothing but the file system, so they can run on different GPUs
or machines as long as ``cache_dir`` is shared.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mammo_dissect.core.cache import cache_key
from mammo_dissect.core.cache import write_json_atomic
from mammo_dissect.core.config import RunConfig
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.errors import MammoDissectError
from mammo_dissect.core.extraction import LayerActivations
from mammo_dissect.core.extraction import extract_activations
from mammo_dissect.core.extraction import safe_file_name
from mammo_dissect.core.plugins import Registry


logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
SHARDS_FOLDER = "shards"
_SHARD_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_SHARD_FOLDER = re.compile(r"^shard-(\d+)-of-(\d+)$")


class ShardError(MammoDissectError):
    """Shards are missing, inconsistent, or the shard specification is invalid."""


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"i/N"`` into ``(i, N)``; ``i`` is 1-based, from 1 to ``N``.

    1-based numbers match ``$SLURM_ARRAY_TASK_ID`` of ``sbatch --array=1-N``.
    """
    match = _SHARD_PATTERN.match(text)
    if match is None:
        raise ConfigError(
            f"--shard {text!r} is invalid; write INDEX/COUNT with whole numbers, such as 2/8 "
            f"for the second of eight shards"
        )
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ConfigError(f"--shard {text!r}: the shard count must be at least 1, got {count}")
    if not 1 <= index <= count:
        raise ConfigError(
            f"--shard {text!r}: the shard index must be between 1 and {count} (shards are numbered "
            f"from 1, so a SLURM array needs --array=1-{count}), got {index}"
        )
    return index, count


def shard_range(index: int, count: int, n_images: int) -> tuple[int, int]:
    """Return the image range ``[start, stop)`` of 1-based shard ``index`` of ``count``."""
    if not 1 <= index <= count:
        raise ConfigError(f"shard index {index} is outside 1..{count}")
    return (index - 1) * n_images // count, index * n_images // count


def _shard_folder_name(index: int, count: int) -> str:
    return f"shard-{index}-of-{count}"


def _group(plan: Any) -> tuple[dict[str, Any], dict[str, str], Path]:
    """Return the activation key parts, each layer's cache key and the shard group's folder."""
    from mammo_dissect.core.activations import activation_key_parts

    base = activation_key_parts(plan)
    keys = {layer.name: cache_key({**base, "layer": layer.name}) for layer in plan.layers}
    group = cache_key({"kind": "shards", "layers": [keys[layer.name] for layer in plan.layers]})
    return base, keys, plan.cache.root / SHARDS_FOLDER / group


def extract_shard(
    config: RunConfig, index: int, count: int, registry: Registry | None = None, progress: bool = True
) -> Path:
    """Extract every target layer for shard ``index`` of ``count`` (1-based); return the shard's folder.

    A finished shard is not extracted again.  An interrupted one resumes where it stopped.
    """
    from mammo_dissect.core.pipeline import prepare

    plan = prepare(config, registry, progress=progress)
    n_images = len(plan.probe_set)
    if count > n_images:
        raise ConfigError(
            f"--shard {index}/{count}: {count} shards for {n_images} probe images would leave shards empty; "
            f"use at most {n_images} shards"
        )
    start, stop = shard_range(index, count, n_images)
    base, keys, group_dir = _group(plan)
    final = group_dir / _shard_folder_name(index, count)
    if (final / MANIFEST_FILE).is_file():
        logger.info("shard %d/%d is already extracted in %s", index, count, final)
        return final

    subset = dataclasses.replace(plan.probe_set, images=plan.probe_set.images[start:stop])
    partial = group_dir / f".{_shard_folder_name(index, count)}.partial"
    logger.info("extracting shard %d/%d: images %d to %d of %d into %s", index, count, start, stop - 1, n_images, final)
    extracted = extract_activations(
        plan.target, plan.layers, subset, plan.runtime, plan.config.target.pooling, partial
    )
    manifest = {
        "index": index,
        "count": count,
        "start": start,
        "stop": stop,
        "n_images": n_images,
        "key_parts": base,
        "layers": {
            activations.layer.name: {
                "key": keys[activations.layer.name],
                "file": activations.path.name,
                "shape": list(np.load(activations.path, mmap_mode="r").shape),
                "output_shape": activations.output_shape,
            }
            for activations in extracted
        },
    }
    (partial / "progress.json").unlink(missing_ok=True)
    write_json_atomic(partial / MANIFEST_FILE, manifest)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final


def _read_manifests(group_dir: Path) -> dict[tuple[int, int], dict[str, Any]]:
    manifests = {}
    if not group_dir.is_dir():
        return manifests
    for folder in sorted(group_dir.iterdir()):
        match = _SHARD_FOLDER.match(folder.name)
        if match is None or not (folder / MANIFEST_FILE).is_file():
            continue
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        manifest["folder"] = str(folder)
        manifests[(int(match.group(1)), int(match.group(2)))] = manifest
    return manifests


def _check_shards(
    manifests: dict[tuple[int, int], dict[str, Any]], group_dir: Path, base: dict[str, Any],
    keys: dict[str, str], n_images: int,
) -> list[dict[str, Any]]:
    """Return the shards' manifests in order, or raise :class:`ShardError` listing every problem."""
    counts = sorted({count for _, count in manifests})
    if not counts:
        raise ShardError(
            f"no finished shards in {group_dir} for this configuration; run "
            f"'mammo-dissect run CONFIG --shard i/N' for i = 1..N first, with the same configuration"
        )
    if len(counts) > 1:
        raise ShardError(
            f"{group_dir} contains shards of {len(counts)} different shard counts ({', '.join(map(str, counts))}); "
            f"remove the folders of the split you do not want (shard-i-of-N) and ingest again"
        )

    count = counts[0]
    missing = [index for index in range(1, count + 1) if (index, count) not in manifests]
    if missing:
        raise ShardError(
            f"{len(missing)} of {count} shards are missing or unfinished in {group_dir}: "
            f"{', '.join(f'{index}/{count}' for index in missing)}; run "
            f"'mammo-dissect run CONFIG --shard i/{count}' for each of them, then ingest again"
        )

    ordered = [manifests[(index, count)] for index in range(1, count + 1)]
    problems = []
    expected_start = 0
    for manifest in ordered:
        name = f"shard {manifest['index']}/{count}"
        if manifest["n_images"] != n_images:
            problems.append(f"{name} was extracted for {manifest['n_images']} images, not {n_images}")
        if manifest["start"] != expected_start:
            problems.append(f"{name} starts at image {manifest['start']}, expected {expected_start}")
        expected_start = manifest["stop"]
        if json.loads(json.dumps(manifest["key_parts"], default=str)) != json.loads(json.dumps(base, default=str)):
            problems.append(f"{name} was extracted with other model, preprocessing or probe-set settings")
        layer_keys = {layer: info["key"] for layer, info in manifest["layers"].items()}
        if layer_keys != keys:
            problems.append(f"{name} has layers {sorted(layer_keys)}, expected {sorted(keys)}")

    if expected_start != n_images and not problems:
        problems.append(f"the shards end at image {expected_start}, expected {n_images}")
    if problems:
        raise ShardError(f"the shards in {group_dir} do not fit together:\n  " + "\n  ".join(problems)
                         + "\nremove the shard folders named above and extract them again")
    return ordered


def ingest(config: RunConfig, registry: Registry | None = None, progress: bool = True) -> list[LayerActivations]:
    """Assemble the finished shards of ``config`` and store every layer in the activation cache.

    Stores under the same keys as :func:`mammo_dissect.core.activations.cached_activations`,
    so the next run of ``config`` reuses every layer.  Removes the shard folder afterwards.
    Raises :class:`ShardError` naming every missing shard, or every inconsistency.
    """
    from mammo_dissect.core.pipeline import prepare

    plan = prepare(config, registry, progress=progress)
    n_images = len(plan.probe_set)
    base, keys, group_dir = _group(plan)
    ordered = _check_shards(_read_manifests(group_dir), group_dir, base, keys, n_images)

    results = []
    for layer in plan.layers:
        first = ordered[0]["layers"][layer.name]
        width = first["shape"][1]
        assembled_path = group_dir / f".{safe_file_name(layer.name)}.assembled.npy"
        assembled = np.lib.format.open_memmap(assembled_path, mode="w+", dtype=np.float32, shape=(n_images, width))
        for manifest in ordered:
            info = manifest["layers"][layer.name]
            part = np.load(Path(manifest["folder"]) / info["file"], mmap_mode="r")
            if part.shape != (manifest["stop"] - manifest["start"], width):
                raise ShardError(
                    f"shard {manifest['index']}/{manifest['count']} layer {layer.name!r} has shape {part.shape}, "
                    f"expected {(manifest['stop'] - manifest['start'], width)}; extract that shard again"
                )
            assembled[manifest["start"]:manifest["stop"]] = part
        assembled.flush()
        del assembled
        path = plan.cache.store_file(
            "activations",
            keys[layer.name],
            assembled_path,
            {
                "description": f"{plan.target.spec} layer {layer.name}, {n_images} images, from {len(ordered)} shards",
                "output_shape": first["output_shape"],
                "layer_depth": layer.depth,
            },
        )
        results.append(LayerActivations(layer=layer, path=path, output_shape=list(first["output_shape"])))
    logger.info("ingested %d shards of %d layers; removing %s", len(ordered), len(plan.layers), group_dir)
    shutil.rmtree(group_dir, ignore_errors=True)
    return results

"""Fingerprint of a probe set: what a cached or stored result was computed from.

Two probe sets have the same fingerprint exactly when they hold the same
image ids with byte-identical files and declare the same preprocessing, so
a change of any image, of the image list or of a preprocessing step forces
a recomputation.  The order of the images does not matter to the fingerprint.
Arrays with one row per image (activations, image embeddings) also depend on
the order, so their cache keys add :func:`image_order`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_of_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Return the SHA-256 of a file's bytes, read in chunks of ``chunk_size`` bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_payload(probe_set: Any, file_hashes: dict[str, str] | None = None) -> dict[str, Any]:
    """Return the plain data the fingerprint hashes: sorted (id, file SHA-256) pairs and the preprocessing.

    ``file_hashes`` maps image ids to SHA-256 values already computed (for
    example by the pipeline's image records); other files are hashed here.
    """
    hashes = file_hashes or {}
    pairs = sorted(
        (image.image_id, hashes.get(image.image_id) or sha256_of_file(image.path)) for image in probe_set.images
    )
    return {"images": [list(pair) for pair in pairs], "preprocessing": list(getattr(probe_set, "preprocessing", []))}


def probe_fingerprint(probe_set: Any, file_hashes: dict[str, str] | None = None) -> str:
    """Return the SHA-256 fingerprint of ``probe_set`` (sorted ids, file hashes, preprocessing description)."""
    payload = fingerprint_payload(probe_set, file_hashes)
    encoded = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


def image_order(probe_set: Any) -> str:
    """Return the SHA-256 of the probe set's image ids in their order, for keys of per-image arrays."""
    ids = [image.image_id for image in probe_set.images]
    return hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode("utf-8")).hexdigest()


def check_image_order(current: list[str], stored: list[str], root: Any, next_step: str) -> None:
    """Raise :class:`ProbeSetError` when the probe images of a stored run now come in another order.

    Stored unit results refer to images by position, so activations extracted
    again in a different order would not line up with them.
    """
    from mammo_dissect.core.errors import ProbeSetError

    if current == stored:
        return
    first = next(
        (position for position, (now, then) in enumerate(zip(current, stored, strict=False)) if now != then),
        min(len(current), len(stored)),
    )
    raise ProbeSetError(
        f"the probe images at {root} are listed in another order than in the run (position {first}: "
        f"{current[first] if first < len(current) else 'nothing'} instead of "
        f"{stored[first] if first < len(stored) else 'nothing'}); restore the manifest's order, or {next_step}"
    )

"""Image-caption samples for training an aligned head, and their cached encoder features.

A sample is a whole probe image or a square crop of it, with the set of
concept texts that describe it (its caption) and the patient it belongs to.
Three kinds of source build samples from a probe set's labels:

- ``whole``: every probe image with its annotations (for mini-MIAS the
  density, abnormality class and severity).
- ``lesions``: a square crop around each annotated lesion centre (side =
  ``context`` x the diameter, at least ``min_side`` pixels), captioned with
  the lesion's class and severity, plus ``normal_crops`` crops inside the
  breast of each normal image, captioned "normal".  Needs
  ``metadata["abnormalities"]`` with top-left ``x``, ``y`` and ``radius``.
- ``tissue_patches``: square patches whose pixels are at least
  ``min_purity`` one tissue of the label image in ``metadata["mask_path"]``
  (DDSM-66: fat, fibroglandular tissue, pectoral muscle).

Features are the chosen layer of a frozen target, pooled per channel, cached
in an :class:`~mammo_dissect.core.cache.ArrayCache` under a key made of the
encoder, the probe set's fingerprint and the crop specification.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import numpy as np

from mammo_dissect.core.cache import ArrayCache
from mammo_dissect.core.cache import cache_key
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.fingerprint import probe_fingerprint
from mammo_dissect.core.preprocessing import describe_preprocess
from mammo_dissect.core.types import ProbeSet


logger = logging.getLogger(__name__)

SOURCE_KINDS = ("whole", "lesions", "tissue_patches")

#: Concept text of each DDSM-66 label value that patches are cut from.
PATCH_TISSUES: dict[int, str] = {128: "fatty tissue", 192: "fibroglandular tissue", 255: "pectoral muscle"}

#: mini-MIAS abnormality class codes and severity codes as concept texts.
LESION_CLASSES: dict[str, str] = {
    "CALC": "calcification",
    "CIRC": "circumscribed mass",
    "SPIC": "spiculated mass",
    "MISC": "ill-defined mass",
    "ARCH": "architectural distortion",
    "ASYM": "asymmetry",
}
LESION_SEVERITIES: dict[str, str] = {"B": "benign", "M": "malignant"}

#: Grid step (pixels) of the coarse breast mask.
MASK_STEP = 8


@dataclass(frozen=True)
class Sample:
    """One image or crop with its caption concepts and patient."""

    source: str
    image_index: int
    image_id: str
    patient_id: str
    concepts: tuple[str, ...]
    #: Crop as (top, left, side) in image pixels; None for the whole image.
    box: tuple[int, int, int] | None = None


@dataclass
class SourceSamples:
    """The samples of one source, the concepts it can label and how they were cut."""

    name: str
    kind: str
    probe_set: ProbeSet
    samples: list[Sample]
    vocabulary: list[str]
    spec: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- breast mask


def breast_mask(image: np.ndarray, threshold: float = 0.1, step: int = MASK_STEP) -> np.ndarray:
    """Return a boolean mask [H, W] of the breast: the largest bright region of a coarse grid.

    The image is averaged over ``step`` x ``step`` cells, cells brighter than
    ``threshold`` (image values in [0, 1]) are kept, and the largest
    4-connected region of kept cells is the breast; labels and markers are
    smaller regions and are dropped.
    """
    grey = image if image.ndim == 2 else image.mean(axis=2)
    height, width = grey.shape
    rows, columns = height // step, width // step
    cells = grey[: rows * step, : columns * step].reshape(rows, step, columns, step).mean(axis=(1, 3))
    bright = cells > threshold
    region = largest_region(bright)
    mask = np.zeros((height, width), dtype=bool)
    mask[: rows * step, : columns * step] = np.repeat(np.repeat(region, step, axis=0), step, axis=1)
    return mask


def largest_region(cells: np.ndarray) -> np.ndarray:
    """Return the largest 4-connected region of True cells (all False when there is none)."""
    labels = np.zeros(cells.shape, dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    rows, columns = cells.shape
    for start in zip(*np.nonzero(cells), strict=True):
        if labels[start]:
            continue
        current += 1
        labels[start] = current
        queue = deque([start])
        size = 0
        while queue:
            row, column = queue.popleft()
            size += 1
            for d_row, d_column in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                r, c = row + d_row, column + d_column
                if 0 <= r < rows and 0 <= c < columns and cells[r, c] and not labels[r, c]:
                    labels[r, c] = current
                    queue.append((r, c))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label if best_label else np.zeros(cells.shape, dtype=bool)


def check_lesion_centres(probe_set: ProbeSet, threshold: float = 0.1) -> list[dict[str, Any]]:
    """Return the lesions whose annotated centre lies outside the breast mask of their image.

    Each entry names the image, the class, both y conventions and whether
    the centre would be inside the breast if y were not flipped (a hint
    that the row is wrong rather than the lesion).
    """
    problems = []
    for index, image in enumerate(probe_set.images):
        lesions = [item for item in image.metadata.get("abnormalities", []) if item.get("x") is not None]
        if not lesions:
            continue
        mask = breast_mask(probe_set.read(index), threshold)
        height, width = mask.shape
        for lesion in lesions:
            x, y = int(lesion["x"]), int(lesion["y"])
            inside = 0 <= y < height and 0 <= x < width and bool(mask[y, x])
            if inside:
                continue
            unflipped = lesion.get("y_bottom_left")
            inside_unflipped = (
                unflipped is not None and 0 <= unflipped < height and 0 <= x < width and bool(mask[unflipped, x])
            )
            problems.append(
                {
                    "image_id": image.image_id,
                    "class": lesion.get("class"),
                    "severity": lesion.get("severity"),
                    "x": x,
                    "y_top_left": y,
                    "y_bottom_left": unflipped,
                    "radius": lesion.get("radius"),
                    "problem": "lesion centre outside the breast mask",
                    "inside_if_y_not_flipped": inside_unflipped,
                }
            )
    for problem in problems:
        logger.warning(
            "bad label: %s %s centre (x=%d, y=%d from the top) lies outside the breast mask",
            problem["image_id"], problem["class"], problem["x"], problem["y_top_left"],
        )
    return problems


# ---------------------------------------------------------------- samples


def patient_of(probe_set: ProbeSet, index: int) -> str:
    """Return the patient id of image ``index``, or its image id when the reader gives none."""
    image = probe_set.images[index]
    return str(image.metadata.get("patient_id") or image.image_id)


def whole_samples(name: str, probe_set: ProbeSet, concepts: Sequence[str] | None) -> SourceSamples:
    """Return one sample per probe image, captioned with its annotations (restricted to ``concepts``)."""
    vocabulary = list(concepts) if concepts else list(probe_set.annotation_vocabulary)
    allowed = set(vocabulary)
    samples = []
    for index, image in enumerate(probe_set.images):
        caption = tuple(text for text in image.annotations if text in allowed)
        samples.append(Sample(name, index, image.image_id, patient_of(probe_set, index), caption))
    return SourceSamples(name, "whole", probe_set, samples, vocabulary, {"kind": "whole", "concepts": vocabulary})


def lesion_samples(
    name: str,
    probe_set: ProbeSet,
    context: float,
    min_side: int,
    normal_crops: int,
    excluded: set[tuple[str, int, int]],
    seed: int,
    mask_threshold: float,
) -> SourceSamples:
    """Return lesion crops captioned with class and severity, plus crops of normal breasts captioned "normal".

    ``excluded`` holds (image id, x, top-left y) of lesions with bad labels,
    which get no crop.
    """
    rng = np.random.default_rng(seed)
    samples = []
    sides = []
    for index, image in enumerate(probe_set.images):
        for lesion in image.metadata.get("abnormalities", []):
            if lesion.get("x") is None or lesion.get("radius") is None:
                continue
            if (image.image_id, int(lesion["x"]), int(lesion["y"])) in excluded:
                continue
            side = max(min_side, int(round(2 * lesion["radius"] * context)))
            caption = [LESION_CLASSES[lesion["class"]]]
            if lesion.get("severity") in LESION_SEVERITIES:
                caption.append(LESION_SEVERITIES[lesion["severity"]])
            box = (int(lesion["y"]) - side // 2, int(lesion["x"]) - side // 2, side)
            samples.append(Sample(name, index, image.image_id, patient_of(probe_set, index), tuple(caption), box))
            sides.append(side)
    if not samples:
        raise ProbeSetError(
            f"source {name!r}: no lesion in probe set {probe_set.reader!r} has a centre and radius in "
            f"metadata['abnormalities']; use kind = \"whole\" for this probe set"
        )
    normal_side = int(np.median(sides))
    for index, image in enumerate(probe_set.images):
        if "normal" not in image.annotations or normal_crops < 1:
            continue
        mask = breast_mask(probe_set.read(index), mask_threshold)
        rows, columns = np.nonzero(mask[:: MASK_STEP, :: MASK_STEP])
        if rows.size == 0:
            continue
        for choice in rng.choice(rows.size, size=min(normal_crops, rows.size), replace=False):
            centre_y, centre_x = rows[choice] * MASK_STEP, columns[choice] * MASK_STEP
            box = (int(centre_y) - normal_side // 2, int(centre_x) - normal_side // 2, normal_side)
            samples.append(Sample(name, index, image.image_id, patient_of(probe_set, index), ("normal",), box))
    vocabulary = sorted({text for sample in samples for text in sample.concepts})
    spec = {
        "kind": "lesions",
        "context": context,
        "min_side": min_side,
        "normal_crops": normal_crops,
        "seed": seed,
        "excluded": sorted(list(item) for item in excluded),
        "mask_threshold": mask_threshold,
    }
    return SourceSamples(name, "lesions", probe_set, samples, vocabulary, spec)


def tissue_patch_samples(
    name: str,
    probe_set: ProbeSet,
    patch_size: int,
    patches_per_tissue: int,
    min_purity: float,
    seed: int,
) -> SourceSamples:
    """Return square patches that are at least ``min_purity`` one tissue of the image's label image."""
    from mammo_dissect.plugins.probe_sets.ddsm_seg66 import read_labels

    rng = np.random.default_rng(seed)
    samples = []
    for index, image in enumerate(probe_set.images):
        mask_path = image.metadata.get("mask_path")
        if not mask_path:
            raise ProbeSetError(
                f"source {name!r}: image {image.image_id} has no metadata['mask_path']; tissue patches need a "
                f"probe set with label images, such as ddsm-seg66"
            )
        labels = read_labels(mask_path)
        for value, concept in PATCH_TISSUES.items():
            purity = window_fraction(labels == value, patch_size)
            rows, columns = np.nonzero(purity >= min_purity)
            if rows.size == 0:
                continue
            for choice in rng.choice(rows.size, size=min(patches_per_tissue, rows.size), replace=False):
                box = (int(rows[choice]), int(columns[choice]), patch_size)
                samples.append(Sample(name, index, image.image_id, patient_of(probe_set, index), (concept,), box))
    vocabulary = sorted({text for sample in samples for text in sample.concepts})
    spec = {
        "kind": "tissue_patches",
        "patch_size": patch_size,
        "patches_per_tissue": patches_per_tissue,
        "min_purity": min_purity,
        "seed": seed,
    }
    return SourceSamples(name, "tissue_patches", probe_set, samples, vocabulary, spec)


def window_fraction(indicator: np.ndarray, size: int) -> np.ndarray:
    """Return the share of True pixels in every ``size`` x ``size`` window, indexed by its top-left corner."""
    height, width = indicator.shape
    if size > height or size > width:
        raise ConfigError(f"patch_size {size} is larger than the label image ({height} x {width}); lower patch_size")
    integral = np.zeros((height + 1, width + 1), dtype=np.int64)
    integral[1:, 1:] = indicator.astype(np.int64).cumsum(axis=0).cumsum(axis=1)
    total = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    return total / float(size * size)


def crop(image: np.ndarray, box: tuple[int, int, int] | None) -> np.ndarray:
    """Return the square ``box`` (top, left, side) of ``image``, zero-padded where it leaves the image."""
    if box is None:
        return image
    top, left, side = box
    height, width = image.shape[:2]
    out = np.zeros((side, side, *image.shape[2:]), dtype=image.dtype)
    source_top, source_left = max(top, 0), max(left, 0)
    source_bottom, source_right = min(top + side, height), min(left + side, width)
    if source_bottom > source_top and source_right > source_left:
        out[source_top - top : source_bottom - top, source_left - left : source_right - left] = image[
            source_top:source_bottom, source_left:source_right
        ]
    return out


# ---------------------------------------------------------------- features


def encoder_description(target: Any, loader: str, options: dict[str, Any], layer: str, pooling: str) -> dict[str, Any]:
    """Return what determines the features of a loaded target handle, for cache keys and cards."""
    preprocess = target.preprocess
    return {
        "loader": loader,
        "options": options,
        "spec": target.loaded.spec,
        "weights_sha256": target.loaded.weights_sha256,
        "layer": layer,
        "pooling": pooling,
        "preprocessing": describe_preprocess(preprocess),
    }


def source_features(
    target: Any,
    encoder: dict[str, Any],
    source: SourceSamples,
    cache: ArrayCache | None,
    batch_size: int = 32,
) -> np.ndarray:
    """Return the pooled features [samples x channels] of a source, from the cache when present."""
    import torch

    samples_payload = [[sample.image_id, list(sample.box) if sample.box else None] for sample in source.samples]
    key = cache_key(
        {
            "kind": "alignment_features",
            "encoder": encoder,
            "probe_fingerprint": probe_fingerprint(source.probe_set),
            "crops": source.spec,
            "samples": samples_payload,
        }
    )
    what = f"alignment features of {source.name} ({encoder['spec']} {encoder['layer']})"
    if cache is not None:
        hit = cache.load("alignment_features", key, what)
        if hit is not None:
            return np.array(hit[0], dtype=np.float32)

    rows: list[np.ndarray] = []
    decoded: dict[int, np.ndarray] = {}
    batch: list[torch.Tensor] = []
    for sample in source.samples:
        if sample.image_index not in decoded:
            decoded.clear()
            decoded[sample.image_index] = source.probe_set.read(sample.image_index)
        batch.append(target.preprocess(crop(decoded[sample.image_index], sample.box)))
        if len(batch) == batch_size:
            rows.append(_pooled(target, batch, encoder))
            batch = []
    if batch:
        rows.append(_pooled(target, batch, encoder))
    features = np.concatenate(rows, axis=0).astype(np.float32)
    logger.info("computed %s: %d x %d", what, features.shape[0], features.shape[1])
    if cache is not None:
        cache.store("alignment_features", key, features, {"description": what})
    return features


def shortcut_values(source: SourceSamples, mask_threshold: float, cache: ArrayCache | None) -> np.ndarray:
    """Return [samples x 2]: each sample's crop side in pixels and the share of it outside the breast mask.

    A whole image's side is its longer side.  Padding where a crop leaves the
    image counts as background.  Cached under the crops and the mask threshold.
    """
    what = f"shortcut properties of {source.name}"
    key = None
    if cache is not None:
        key = cache_key(
            {
                "kind": "alignment_shortcuts",
                "probe_fingerprint": probe_fingerprint(source.probe_set),
                "crops": source.spec,
                "samples": [[sample.image_id, list(sample.box) if sample.box else None] for sample in source.samples],
                "mask_threshold": mask_threshold,
                "mask_step": MASK_STEP,
            }
        )
        hit = cache.load("alignment_shortcuts", key, what)
        if hit is not None:
            return np.array(hit[0], dtype=np.float64)
    values = np.zeros((len(source.samples), 2), dtype=np.float64)
    mask: np.ndarray | None = None
    mask_index = -1
    for row, sample in enumerate(source.samples):
        if sample.image_index != mask_index:
            mask = breast_mask(source.probe_set.read(sample.image_index), mask_threshold)
            mask_index = sample.image_index
        assert mask is not None
        if sample.box is None:
            values[row] = (max(mask.shape), 1.0 - float(mask.mean()))
            continue
        side = sample.box[2]
        inside = crop(mask, sample.box)
        values[row] = (side, 1.0 - float(inside.sum()) / float(side * side))
    if cache is not None and key is not None:
        cache.store("alignment_shortcuts", key, values, {"description": what})
    return values


def _pooled(target: Any, batch: list[Any], encoder: dict[str, Any]) -> np.ndarray:
    import torch

    output = target.activations(torch.stack(batch), [encoder["layer"]], encoder["pooling"])
    return output[encoder["layer"]].float().cpu().numpy()

"""NetDissect-style agreement between a unit's activation maps and binary concept masks.

Network dissection (Bau et al., CVPR 2017) binarises a unit's activation
map at a high quantile of its activations over the probe set (the top 0.5%
by default, ``quantile = 0.995``), upsamples it to the mask's size and
scores the unit against a concept by the intersection over union of the
binarised maps and the concept's masks, summed over all images.  Here a
mask is, for example, the pectoral-muscle pixels of a DDSM-66 tissue label
image (:func:`label_mask`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np


logger = logging.getLogger(__name__)


def label_mask(labels: np.ndarray, values: int | Iterable[int]) -> np.ndarray:
    """Return a boolean mask of the pixels of ``labels`` equal to ``values`` (one value or several)."""
    wanted = [values] if isinstance(values, (int, np.integer)) else list(values)
    return np.isin(np.asarray(labels), wanted)


def upsample(activation_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize activation maps [H', W'] or [N, H', W'] to ``size`` = (H, W) with bilinear interpolation."""
    import torch
    import torch.nn.functional as functional

    maps = np.asarray(activation_map, dtype=np.float32)
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    tensor = torch.from_numpy(np.ascontiguousarray(maps))
    batched = tensor.reshape(-1, 1, *tensor.shape[-2:])
    resized = functional.interpolate(batched, size=tuple(size), mode="bilinear", align_corners=False)
    return resized.reshape(*maps.shape[:-2], *size).numpy()


def activation_threshold(activation_maps: np.ndarray, quantile: float) -> float:
    """Return the ``quantile`` of all values of ``activation_maps`` (the unit's threshold over the probe set)."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be between 0 and 1 (exclusive), got {quantile}; NetDissect uses 0.995")
    return float(np.quantile(np.asarray(activation_maps, dtype=np.float64), quantile))


def mask_iou(
    activation_map: np.ndarray,
    mask: np.ndarray,
    quantile: float = 0.995,
    threshold: float | None = None,
) -> float:
    """Return the IoU of a unit's binarised activation maps with a concept's masks, over all images.

    ``activation_map`` is [H', W'] for one image or [N, H', W'] for N
    images; ``mask`` is boolean [H, W] or [N, H, W] with the same N.  The
    maps are upsampled to the mask size (bilinear) and thresholded at
    ``threshold``, or, when it is None, at the ``quantile`` of the given
    activations before upsampling.  Pass the threshold computed over the
    whole probe set when scoring images one at a time.  The IoU is the
    summed intersection over the summed union; it is 0 when both are empty.
    """
    maps = np.asarray(activation_map, dtype=np.float32)
    masks = np.asarray(mask).astype(bool)
    if maps.ndim not in (2, 3) or masks.ndim != maps.ndim:
        raise ValueError(
            f"activation_map and mask must both be [H, W] or both [N, H, W], got shapes {maps.shape} and {masks.shape}"
        )
    if maps.ndim == 3 and maps.shape[0] != masks.shape[0]:
        raise ValueError(f"activation_map has {maps.shape[0]} images but mask has {masks.shape[0]}; pass one mask per map")
    cut = activation_threshold(maps, quantile) if threshold is None else float(threshold)
    active = upsample(maps, masks.shape[-2:]) > cut
    intersection = np.logical_and(active, masks).sum()
    union = np.logical_or(active, masks).sum()
    return float(intersection / union) if union else 0.0

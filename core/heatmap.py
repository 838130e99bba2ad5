"""Activation-map overlays for report thumbnails.

A unit's activation map on one image is its spatial output before pooling
(``height x width`` of the layer).  :func:`overlay_heatmap` scales it to
[0, 1], resizes it to the thumbnail and blends it in over the grey image, so
the brightest colour marks where the unit responds most.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


#: Colour ramp from low to high activation (dark blue, purple, orange, yellow), as RGB in [0, 255].
COLOUR_RAMP = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float32,
)


def apply_colour_ramp(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB colours of :data:`COLOUR_RAMP` by linear interpolation (uint8, ... x 3)."""
    clipped = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    position = clipped * (len(COLOUR_RAMP) - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, len(COLOUR_RAMP) - 1)
    weight = (position - low)[..., None]
    colours = COLOUR_RAMP[low] * (1.0 - weight) + COLOUR_RAMP[high] * weight
    return np.round(colours).astype(np.uint8)


def normalise_map(activation_map: np.ndarray) -> np.ndarray:
    """Scale a 2-D map to [0, 1] by its own minimum and maximum; a constant map becomes zeros.

    :raises ValueError: when the map is not 2-D, is empty or contains NaN or Inf.
    """
    values = np.asarray(activation_map, dtype=np.float32)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(
            f"activation map has shape {values.shape}; expected a non-empty 2-D array (height x width)"
        )
    if not np.isfinite(values).all():
        raise ValueError("activation map contains NaN or Inf values; store finite activations")
    low = float(values.min())
    high = float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def overlay_heatmap(image: Image.Image, activation_map: np.ndarray, opacity: float = 0.5) -> Image.Image:
    """Return an RGB copy of ``image`` with ``activation_map`` blended in as a colour heatmap.

    :param image: the thumbnail (any PIL mode; grey images are shown in grey).
    :param activation_map: the unit's 2-D activations on this image, any size;
        it is resized to the image with bilinear interpolation.
    :param opacity: weight of the heatmap at the highest activation, in [0, 1].
        The weight falls with the activation, so weak regions keep the image visible.
    :raises ValueError: for an invalid map or an opacity outside [0, 1].
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity {opacity} is outside [0, 1]")
    normalised = normalise_map(activation_map)
    base = image.convert("RGB")
    scaled = Image.fromarray(normalised, mode="F").resize(base.size, Image.Resampling.BILINEAR)
    values = np.clip(np.asarray(scaled, dtype=np.float32), 0.0, 1.0)
    colours = apply_colour_ramp(values).astype(np.float32)
    weight = (opacity * values)[..., None]
    pixels = np.asarray(base, dtype=np.float32) * (1.0 - weight) + colours * weight
    return Image.fromarray(np.round(pixels).astype(np.uint8), mode="RGB")

"""Mammography preprocessing steps that a probe-set reader applies while decoding.

Each step is a small object that turns a decoded image (float32 in [0, 1],
[H, W] or [H, W, 3]) into another one, given the image's metadata.  Steps
are composable (:class:`PreprocessingPipeline`) and serialisable: each
``describe()`` returns plain data, and :func:`steps_from_config` rebuilds the
steps from that data, so a run can store exactly what was done to its pixels.

Built-in steps, by the ``step`` name used in configuration files:

=====================  ==============================================================
step                   what it does
=====================  ==============================================================
``breast_crop``        crops to the breast: the longest run of rows and the longest
                       run of columns whose fraction of pixels above ``threshold``
                       is at least ``min_fraction``, plus ``margin`` pixels
``flip_laterality``    mirrors images left-right so that every breast lies on the
                       same side (``target`` ``L`` or ``R``: the side of the image
                       where the chest wall is, as with a left breast in a standard
                       display); laterality comes from ``metadata["laterality"]``,
                       or from the image's brighter half when ``fallback`` is
                       ``image``
``resize``             resizes to ``size`` = [height, width] with area
                       interpolation (pixel averaging), or bilinear
``replicate_channels`` turns a grey image into ``channels`` identical channels
=====================  ==============================================================

A reader declares the steps in its ``preprocessing`` option, for example
``preprocessing = [{step = "breast_crop"}, {step = "flip_laterality", target = "L"}]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from typing import ClassVar

import numpy as np

from mammo_dissect.core.errors import ConfigError


logger = logging.getLogger(__name__)


class PreprocessingStep:
    """One preprocessing step: ``step(image, metadata) -> image``, described by plain data."""

    #: Name used in configuration files (the ``step`` key).
    name: ClassVar[str] = ""

    def __call__(self, image: np.ndarray, metadata: Mapping[str, Any]) -> np.ndarray:
        raise NotImplementedError

    def parameters(self) -> dict[str, Any]:
        """Return the step's parameters as plain data (JSON types only)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Return the step as plain data: ``{"step": name, **parameters}``."""
        return {"step": self.name, **self.parameters()}


def _longest_true_run(flags: np.ndarray) -> tuple[int, int] | None:
    """Return ``(start, stop)`` of the longest run of True values, or None when there is none."""
    best: tuple[int, int] | None = None
    start: int | None = None
    for index, flag in enumerate([*flags.tolist(), False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            if best is None or index - start > best[1] - best[0]:
                best = (start, index)
            start = None
    return best


class BreastCrop(PreprocessingStep):
    """Crop to the breast region, dropping the dark background and isolated labels at the edges.

    A pixel is foreground when its grey value is above ``threshold``.  A row
    (column) is foreground when at least ``min_fraction`` of its pixels are.
    The crop keeps the longest run of foreground rows and the longest run of
    foreground columns, so a film label separated from the breast by
    background is cut away.  An image without foreground is returned unchanged.
    """

    name = "breast_crop"

    def __init__(self, threshold: float = 0.05, min_fraction: float = 0.01, margin: int = 0) -> None:
        if not 0.0 <= threshold < 1.0:
            raise ConfigError(f"breast_crop threshold must be in [0, 1), got {threshold}; use for example 0.05")
        if not 0.0 <= min_fraction <= 1.0:
            raise ConfigError(f"breast_crop min_fraction must be in [0, 1], got {min_fraction}")
        if margin < 0:
            raise ConfigError(f"breast_crop margin must be 0 or more pixels, got {margin}")
        self.threshold = float(threshold)
        self.min_fraction = float(min_fraction)
        self.margin = int(margin)

    def box(self, image: np.ndarray) -> tuple[int, int, int, int] | None:
        """Return the crop box ``(top, bottom, left, right)`` (exclusive ends), or None without foreground."""
        grey = image if image.ndim == 2 else image.mean(axis=2)
        foreground = grey > self.threshold
        rows = _longest_true_run(foreground.mean(axis=1) >= max(self.min_fraction, 1e-12))
        columns = _longest_true_run(foreground.mean(axis=0) >= max(self.min_fraction, 1e-12))
        if rows is None or columns is None:
            return None
        height, width = grey.shape
        return (
            max(rows[0] - self.margin, 0),
            min(rows[1] + self.margin, height),
            max(columns[0] - self.margin, 0),
            min(columns[1] + self.margin, width),
        )

    def __call__(self, image: np.ndarray, metadata: Mapping[str, Any]) -> np.ndarray:
        box = self.box(image)
        if box is None:
            logger.debug("breast_crop: no pixel above %.3f in image %s; kept it whole",
                         self.threshold, metadata.get("image_id"))
            return image
        top, bottom, left, right = box
        return np.ascontiguousarray(image[top:bottom, left:right])

    def parameters(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "min_fraction": self.min_fraction, "margin": self.margin}


_LATERALITY_WORDS = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}


def normalise_laterality(value: Any) -> str | None:
    """Return ``L`` or ``R`` for the usual spellings of a laterality (L, LEFT, r, ...), else None."""
    if value is None:
        return None
    return _LATERALITY_WORDS.get(str(value).strip().upper())


def chest_wall_side(image: np.ndarray) -> str:
    """Return ``L`` when the left half of the image is brighter than the right half, else ``R``.

    In a mammogram the chest wall is on the side where the breast is widest,
    which is the brighter half.
    """
    grey = image if image.ndim == 2 else image.mean(axis=2)
    middle = grey.shape[1] // 2
    return "L" if float(grey[:, :middle].sum()) >= float(grey[:, grey.shape[1] - middle:].sum()) else "R"


class FlipLaterality(PreprocessingStep):
    """Mirror images left-right so that every chest wall lies on the ``target`` side.

    In the standard display of a mammogram, the chest wall of a left breast
    (laterality ``L``) is on the image's left and that of a right breast on
    its right.  ``target = "L"`` therefore mirrors right breasts.  Laterality
    comes from ``metadata["laterality"]``.  When it is missing, ``fallback``
    decides: ``image`` finds the chest-wall side from the image itself
    (:func:`chest_wall_side`), ``keep`` leaves the image as it is, and
    ``error`` raises.
    """

    name = "flip_laterality"

    def __init__(self, target: str = "L", fallback: str = "image", source: str = "metadata") -> None:
        normalised = normalise_laterality(target)
        if normalised is None:
            raise ConfigError(f"flip_laterality target must be 'L' or 'R', got {target!r}")
        if fallback not in ("image", "keep", "error"):
            raise ConfigError(f"flip_laterality fallback must be 'image', 'keep' or 'error', got {fallback!r}")
        if source not in ("metadata", "image"):
            raise ConfigError(f"flip_laterality source must be 'metadata' or 'image', got {source!r}")
        self.target = normalised
        self.fallback = fallback
        self.source = source

    def side(self, image: np.ndarray, metadata: Mapping[str, Any]) -> str | None:
        """Return the chest-wall side of ``image`` (``L``/``R``), or None when it stays unknown."""
        if self.source == "image":
            return chest_wall_side(image)
        side = normalise_laterality(metadata.get("laterality"))
        if side is not None:
            return side
        if self.fallback == "image":
            return chest_wall_side(image)
        if self.fallback == "error":
            raise ConfigError(
                f"flip_laterality: image {metadata.get('image_id')!r} has no laterality in its metadata "
                f"(got {metadata.get('laterality')!r}); set fallback = 'image' or 'keep', or fix the manifest"
            )
        return None

    def __call__(self, image: np.ndarray, metadata: Mapping[str, Any]) -> np.ndarray:
        side = self.side(image, metadata)
        if side is None or side == self.target:
            return image
        return np.ascontiguousarray(image[:, ::-1])

    def parameters(self) -> dict[str, Any]:
        return {"target": self.target, "fallback": self.fallback, "source": self.source}


class Resize(PreprocessingStep):
    """Resize to ``size`` = (height, width); ``area`` averages pixels, as downsampling a mammogram needs."""

    name = "resize"

    def __init__(self, size: Sequence[int], interpolation: str = "area") -> None:
        if len(size) != 2 or any(int(value) < 1 for value in size):
            raise ConfigError(f"resize size must be [height, width] with positive integers, got {list(size)}")
        if interpolation not in ("area", "bilinear", "nearest"):
            raise ConfigError(
                f"resize interpolation must be 'area', 'bilinear' or 'nearest', got {interpolation!r}"
            )
        self.size = (int(size[0]), int(size[1]))
        self.interpolation = interpolation

    def __call__(self, image: np.ndarray, metadata: Mapping[str, Any]) -> np.ndarray:
        import torch
        import torch.nn.functional as functional

        if tuple(image.shape[:2]) == self.size:
            return image
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        kwargs: dict[str, Any] = {}
        if self.interpolation == "bilinear":
            kwargs = {"align_corners": False, "antialias": True}
        resized = functional.interpolate(tensor.unsqueeze(0), size=self.size, mode=self.interpolation, **kwargs)[0]
        array = resized[0] if image.ndim == 2 else resized.permute(1, 2, 0)
        return np.ascontiguousarray(np.clip(array.numpy(), 0.0, 1.0), dtype=np.float32)

    def parameters(self) -> dict[str, Any]:
        return {"size": list(self.size), "interpolation": self.interpolation}


class ReplicateChannels(PreprocessingStep):
    """Repeat a grey image into ``channels`` identical channels ([H, W] -> [H, W, C]).

    Colour images are left as they are.  With ``channels = 1`` a grey image
    is also left as it is.
    """

    name = "replicate_channels"

    def __init__(self, channels: int = 3) -> None:
        if channels not in (1, 3):
            raise ConfigError(f"replicate_channels channels must be 1 or 3, got {channels}")
        self.channels = int(channels)

    def __call__(self, image: np.ndarray, metadata: Mapping[str, Any]) -> np.ndarray:
        if image.ndim != 2 or self.channels == 1:
            return image
        return np.ascontiguousarray(np.repeat(image[:, :, None], self.channels, axis=2))

    def parameters(self) -> dict[str, Any]:
        return {"channels": self.channels}


class MammoClipOffline(PreprocessingStep):
    """The offline DICOM-to-PNG steps of Mammo-CLIP's training data, for raw DICOM probe sets.

    In order: drop a ``border``-pixel frame, min-max the image to 8-bit levels,
    set pixels at or below ``dark_level`` (of 255) to 0, keep the longest run
    of columns whose standard deviation is non-zero within the middle 80% of
    rows, then the same for rows, and resize with area interpolation to
    ``size`` (height, width; Mammo-CLIP used 1520 x 912).  The result stays
    grey in [0, 1]; the dissector's own load-time steps (channel replication,
    per-image min-max, mean and std) follow in its preprocessing.
    """

    name = "mammo_clip_offline"

    def __init__(self, border: int = 5, dark_level: int = 40, size: Sequence[int] = (1520, 912)) -> None:
        if border < 0 or not 0 <= dark_level < 255 or len(size) != 2 or min(size) < 1:
            raise ConfigError(
                f"mammo_clip_offline: border must be >= 0, dark_level 0 to 254 and size two positive sides; "
                f"got border={border}, dark_level={dark_level}, size={list(size)}"
            )
        self.border = int(border)
        self.dark_level = int(dark_level)
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, image: np.ndarray, metadata: Mapping[str, Any]) -> np.ndarray:
        grey = image.mean(axis=2) if image.ndim == 3 else image
        if self.border and min(grey.shape) > 2 * self.border:
            grey = grey[self.border : -self.border, self.border : -self.border]
        low, high = float(grey.min()), float(grey.max())
        levels = np.zeros_like(grey) if high <= low else np.round((grey - low) / (high - low) * 255.0)
        levels[levels <= self.dark_level] = 0
        rows = levels.shape[0]
        middle = levels[int(rows * 0.1) : max(int(rows * 0.9), int(rows * 0.1) + 1)]
        columns = _longest_true_run(middle.std(axis=0) > 0)
        if columns is not None:
            levels = levels[:, columns[0] : columns[1]]
        width = levels.shape[1]
        middle = levels[:, int(width * 0.1) : max(int(width * 0.9), int(width * 0.1) + 1)]
        kept_rows = _longest_true_run(middle.std(axis=1) > 0)
        if kept_rows is not None:
            levels = levels[kept_rows[0] : kept_rows[1]]
        return Resize(self.size, "area")((levels / 255.0).astype(np.float32), metadata)

    def parameters(self) -> dict[str, Any]:
        return {"border": self.border, "dark_level": self.dark_level, "size": list(self.size)}


#: Step classes by their configuration name.
STEP_TYPES: dict[str, type[PreprocessingStep]] = {
    step.name: step for step in (BreastCrop, FlipLaterality, Resize, ReplicateChannels, MammoClipOffline)
}


def step_from_config(config: Mapping[str, Any]) -> PreprocessingStep:
    """Build one step from ``{"step": name, **parameters}`` (the output of ``describe()``)."""
    if "step" not in config:
        raise ConfigError(
            f"preprocessing step {dict(config)} has no 'step' key; write for example {{step = \"breast_crop\"}} "
            f"(known steps: {', '.join(STEP_TYPES)})"
        )
    parameters = dict(config)
    name = str(parameters.pop("step"))
    step_type = STEP_TYPES.get(name)
    if step_type is None:
        raise ConfigError(f"unknown preprocessing step {name!r}; known steps: {', '.join(STEP_TYPES)}")
    try:
        return step_type(**parameters)
    except TypeError as exc:
        raise ConfigError(f"invalid parameters {parameters} for preprocessing step {name!r}: {exc}") from None


def steps_from_config(configs: Sequence[Mapping[str, Any]]) -> list[PreprocessingStep]:
    """Build a list of steps from their plain-data descriptions, in order."""
    return [step_from_config(config) for config in configs]


class PreprocessingPipeline:
    """Steps applied in order; ``describe()`` lists each step's description."""

    def __init__(self, steps: Sequence[PreprocessingStep]) -> None:
        self.steps = list(steps)

    def __call__(self, image: np.ndarray, metadata: Mapping[str, Any] | None = None) -> np.ndarray:
        metadata = metadata or {}
        for step in self.steps:
            image = step(image, metadata)
        return image

    def describe(self) -> list[dict[str, Any]]:
        return [step.describe() for step in self.steps]


class PreprocessingDecoder:
    """Decoder for :attr:`ProbeSet.decoder`: decode a path, then run the pipeline with that image's metadata.

    ``metadata_by_path`` maps each probe image's resolved path to its metadata
    (with ``image_id`` added), because a decoder receives only the path.
    """

    def __init__(
        self,
        pipeline: PreprocessingPipeline,
        metadata_by_path: dict[Path, dict[str, Any]],
        base: Callable[[Path], np.ndarray] | None = None,
    ) -> None:
        from mammo_dissect.core.images import read_image

        self.pipeline = pipeline
        self.metadata_by_path = metadata_by_path
        self.base = base or read_image

    def __call__(self, path: Path) -> np.ndarray:
        image = self.base(path)
        metadata = self.metadata_by_path.get(Path(path).resolve(), {})
        return self.pipeline(image, metadata)

    def describe(self) -> list[dict[str, Any]]:
        return self.pipeline.describe()


def apply_preprocessing(probe_set: Any, configs: Sequence[Mapping[str, Any]]) -> Any:
    """Attach the steps in ``configs`` to ``probe_set``'s decoder and record them; returns the probe set.

    Does nothing when ``configs`` is empty, so readers can pass their option through.
    """
    if not configs:
        return probe_set
    pipeline = PreprocessingPipeline(steps_from_config(configs))
    metadata_by_path = {
        Path(image.path).resolve(): {**image.metadata, "image_id": image.image_id} for image in probe_set.images
    }
    probe_set.decoder = PreprocessingDecoder(pipeline, metadata_by_path, probe_set.decoder)
    probe_set.preprocessing = pipeline.describe()
    probe_set.decoding = {**probe_set.decoding, "preprocessing": pipeline.describe()}
    logger.info("probe set %s: preprocessing steps %s", probe_set.reader, [s["step"] for s in pipeline.describe()])
    return probe_set


def describe_preprocess(preprocess: Any) -> Any:
    """Return ``preprocess.describe()`` for cache keys and records, or its ``repr`` when it has no describe()."""
    return preprocess.describe() if hasattr(preprocess, "describe") else repr(preprocess)

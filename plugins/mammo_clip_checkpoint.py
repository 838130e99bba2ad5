"""Reading Mammo-CLIP checkpoints and building their EfficientNet image encoder.

Shared by the ``mammo_clip`` dissector and the ``mammo-clip-encoder`` and
``mammo-clip-classifier`` target loaders.

Mammo-CLIP's image encoder is lukemelas' EfficientNet (PyPI
``efficientnet_pytorch`` 0.7.1), not timm's: its convolutions use TF "SAME"
padding computed once for the native resolution (456 for B5, 260 for B2) and
kept for every input size.  A timm ``tf_efficientnet`` recomputes the padding
for the actual input and gives different features at 1520 x 912, so the
encoder is built with ``EfficientNet.from_name``, which reads the
checkpoint's ``image_encoder.*`` keys unchanged.

A checkpoint is either an original file (a ``torch.save`` zip named
``.tar`` or ``.pth``, read with :mod:`mammo_dissect.core.safe_pickle`) or a
slim copy written by :func:`mammo_dissect.core.convert.convert_checkpoint`:
a ``.safetensors`` file with a JSON sidecar of the same stem.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.images import ImagePreprocess
from mammo_dissect.core.safe_pickle import load_checkpoint
from mammo_dissect.core.weights import check_local_file
from mammo_dissect.core.weights import read_state_dict
from mammo_dissect.core.weights import sha256_file
from mammo_dissect.core.weights import strip_prefixes


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

#: Input height and width of Mammo-CLIP (912 wide, 1520 high).
INPUT_SIZE_HW = (1520, 912)
#: Mean and standard deviation applied after per-image min-max scaling to [0, 1].
PIXEL_MEAN = 0.3089279
PIXEL_STD = 0.25053555408335154

#: lukemelas model name, number of ``_blocks`` and head width of each released encoder.
VARIANTS: dict[str, tuple[str, int, int]] = {
    "b5": ("efficientnet-b5", 39, 2048),
    "b2": ("efficientnet-b2", 23, 1408),
}
IMAGE_PREFIX = "image_encoder."
SIDECAR_FORMAT = "mammo-dissect/mammo-clip-weights"


@dataclass
class MammoClipCheckpoint:
    """The weights of one Mammo-CLIP file and what is known about them."""

    path: Path
    sha256: str
    #: The ``model`` state dict with wrapper prefixes (``module.``) removed.
    state: dict[str, torch.Tensor]
    #: ``"b5"`` or ``"b2"``.
    variant: str
    #: Training configuration as plain data (``None`` when the file has none).
    config: dict[str, Any] | None = None
    #: Other top-level entries with plain values (``epoch``, ``auroc``, ...).
    metadata: dict[str, Any] = field(default_factory=dict)

    def image_encoder_state(self) -> dict[str, torch.Tensor]:
        """Return the ``image_encoder.*`` weights with that prefix removed."""
        return {key[len(IMAGE_PREFIX):]: value for key, value in self.state.items() if key.startswith(IMAGE_PREFIX)}


def read_mammo_clip_checkpoint(value: str, option: str) -> MammoClipCheckpoint:
    """Read an original Mammo-CLIP file or a converted ``.safetensors`` copy named by ``option``."""
    import torch

    path = check_local_file(value, "Mammo-CLIP checkpoint", option)
    config: dict[str, Any] | None = None
    metadata: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        state = read_state_dict(path)
        sidecar = read_sidecar(path)
        config = sidecar.get("config")
        metadata = dict(sidecar.get("metadata") or {})
        variant_hint = sidecar.get("image_encoder")
    else:
        loaded = load_checkpoint(path, "Mammo-CLIP checkpoint")
        if not isinstance(loaded, Mapping) or not isinstance(loaded.get("model"), Mapping):
            found = sorted(loaded) if isinstance(loaded, Mapping) else type(loaded).__name__
            raise ModelLoadError(
                f"{option}={value!r} is not a Mammo-CLIP checkpoint: expected a dict with a 'model' state "
                f"dict, found {found}"
            )
        state = dict(loaded["model"])
        config = loaded.get("config") if isinstance(loaded.get("config"), Mapping) else None
        metadata = {key: plain_metadata(item) for key, item in loaded.items() if key not in ("model", "optimizer", "scheduler", "config")}
        variant_hint = None
    not_tensors = sorted(key for key, item in state.items() if not isinstance(item, torch.Tensor))
    if not_tensors:
        raise ModelLoadError(f"{option}={value!r}: 'model' entries that are not tensors: {', '.join(not_tensors[:10])}")
    # Keys are stripped against the official layout, whose names never start with a wrapper prefix.
    state = strip_prefixes(state, [IMAGE_PREFIX])
    variant = image_encoder_variant(state, config, variant_hint, path)
    return MammoClipCheckpoint(
        path=path,
        sha256=sha256_file(path),
        state=state,
        variant=variant,
        config=config,
        metadata=metadata,
    )


def read_sidecar(path: Path) -> dict[str, Any]:
    """Read the JSON sidecar (same stem, ``.json``) of a converted ``.safetensors`` checkpoint."""
    sidecar_path = path.with_suffix(".json")
    if not sidecar_path.is_file():
        logger.info("no sidecar %s; the encoder size is inferred from the weights", sidecar_path)
        return {}
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read the sidecar {sidecar_path} of {path}: {exc}") from exc
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise ModelLoadError(
            f"{sidecar_path} is not a mammo-dissect weights sidecar (expected \"format\": \"{SIDECAR_FORMAT}\"); "
            f"write the .safetensors file and its sidecar with mammo_dissect.core.convert.convert_checkpoint"
        )
    return sidecar


def plain_metadata(value: Any) -> Any:
    """Turn numpy scalars and small arrays into Python values; describe other values by type."""
    import numpy as np
    import torch

    # numpy.float64 subclasses float, so numpy scalars are converted first.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.ndarray):
        return {"numpy_array": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else {"tensor": list(value.shape)}
    return type(value).__name__


def image_encoder_variant(
    state: Mapping[str, Any],
    config: Mapping[str, Any] | None,
    hint: str | None,
    path: Path,
) -> str:
    """Return ``"b5"`` or ``"b2"`` from the weights, checked against the configuration's encoder name.

    The number of ``_blocks`` and the head width decide; the configuration
    name (``tf_efficientnet_b5_ns-detect`` for B5, ``tf_efficientnetv2-detect``
    for the B2 release) must agree with them when present.
    """
    block_ids = {key.split(".")[2] for key in state if key.startswith(IMAGE_PREFIX + "_blocks.")}
    head = state.get(IMAGE_PREFIX + "_conv_head.weight")
    from_weights = None
    for variant, (_name, blocks, width) in VARIANTS.items():
        if len(block_ids) == blocks and head is not None and int(head.shape[0]) == width:
            from_weights = variant
    from_config = variant_from_config_name(config_encoder_name(config)) if config else None
    declared = from_config or hint
    if from_weights is None:
        shown = f"head {tuple(head.shape)}" if head is not None else "no image_encoder._conv_head.weight"
        raise ModelLoadError(
            f"{path}: the image encoder weights have {len(block_ids)} _blocks and {shown}, which matches "
            f"neither Mammo-CLIP encoder (B5: 39 blocks, head 2048; B2: 23 blocks, head 1408). Check that the "
            f"file is a Mammo-CLIP checkpoint with keys image_encoder._blocks.N..."
        )
    if declared is not None and declared != from_weights:
        raise ModelLoadError(
            f"{path}: the configuration names an EfficientNet-{declared.upper()} image encoder but the weights "
            f"are EfficientNet-{from_weights.upper()}; the file is inconsistent, so download it again"
        )
    return from_weights


def config_encoder_name(config: Mapping[str, Any] | None) -> str | None:
    """Return ``config["model"]["image_encoder"]["name"]`` or ``None``."""
    try:
        name = config["model"]["image_encoder"]["name"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None


def variant_from_config_name(name: str | None) -> str | None:
    """Map a Mammo-CLIP encoder name to ``"b5"`` or ``"b2"``; ``None`` for an unknown name."""
    if name is None:
        return None
    lowered = name.lower()
    if "b5" in lowered:
        return "b5"
    # The B2 release names its encoder tf_efficientnetv2-detect, but it is EfficientNet-B2.
    if "b2" in lowered or "efficientnetv2" in lowered:
        return "b2"
    logger.warning("unknown Mammo-CLIP image encoder name %r; the size is inferred from the weights", name)
    return None


# ---------------------------------------------------------------- image encoder


@functools.lru_cache(maxsize=1)
def efficientnet_class() -> type:
    """Return the lukemelas EfficientNet subclass whose forward gives the pooled global feature."""
    from efficientnet_pytorch import EfficientNet

    class MammoClipEfficientNet(EfficientNet):
        """lukemelas EfficientNet without ``_fc``: forward returns the average-pooled head features [B, C].

        A fine-tuned classifier has a ``classifier`` module, applied to the pooled features.
        """

        def forward(self, inputs: Any) -> Any:
            features = self.extract_features(inputs)
            pooled = self._avg_pooling(features).flatten(1)
            head = getattr(self, "classifier", None)
            return pooled if head is None else head(pooled)

    return MammoClipEfficientNet


def build_image_encoder(variant: str) -> torch.nn.Module:
    """Build the EfficientNet-B5 or -B2 image encoder with padding frozen at its native resolution."""
    model_name = VARIANTS[variant][0]
    return efficientnet_class().from_name(model_name, include_top=False)


def build_preprocess(variant: str) -> ImagePreprocess:
    """Return Mammo-CLIP's evaluation preprocessing (1520 x 912, grey to 3 channels, min-max, mean/std)."""
    return ImagePreprocess(
        size=INPUT_SIZE_HW,
        mean=(PIXEL_MEAN,) * 3,
        std=(PIXEL_STD,) * 3,
        channels=3,
        interpolation="area",
        per_image_minmax=True,
        source=(
            f"Mammo-CLIP EfficientNet-{variant.upper()} evaluation transform: area resize to 1520 x 912 "
            f"(H x W), grey replicated to 3 channels, per-image min-max to [0, 1], then "
            f"(x - {PIXEL_MEAN}) / {PIXEL_STD}; no flip. The official offline breast crop is not applied"
        ),
    )

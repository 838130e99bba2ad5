"""Target loaders for Mammo-CLIP's image encoder and its fine-tuned classifiers.

Both build lukemelas' EfficientNet exactly as Mammo-CLIP does (see
:mod:`mammo_dissect.plugins.mammo_clip_checkpoint`), so layer names are
lukemelas' names: ``_conv_stem``, ``_bn0``, ``_blocks.0`` to ``_blocks.38``
(B5) or ``_blocks.22`` (B2), ``_conv_head``, ``_bn1``, ``_avg_pooling``.
The classifier adds ``classifier`` (its head, ``classifier.classification_head``).

- ``mammo-clip-encoder``: the image encoder of a Mammo-CLIP checkpoint; the
  model's output is the pooled global feature.
- ``mammo-clip-classifier``: a fine-tuned file (``model`` with
  ``image_encoder.*`` and ``classifier.classification_head.weight/bias``, plus
  ``predictions``, ``epoch`` and ``auroc`` or ``accuracy``/``f1``); the number
  of classes is read from the head's weight.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from typing import Any

from pydantic import Field

from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.types import LoadedTarget
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import TargetLoader
from mammo_dissect.core.weights import load_weights_strict
from mammo_dissect.plugins.mammo_clip_checkpoint import build_image_encoder
from mammo_dissect.plugins.mammo_clip_checkpoint import build_preprocess
from mammo_dissect.plugins.mammo_clip_checkpoint import read_mammo_clip_checkpoint


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

HEAD_PREFIX = "classifier.classification_head."


class MammoClipTargetOptions(Options):
    """Options of the ``mammo-clip-encoder`` and ``mammo-clip-classifier`` target loaders."""

    checkpoint: str = Field(
        description=(
            "path of the local checkpoint: an original Mammo-CLIP .tar or fine-tuned .pth file exactly as "
            "downloaded, or a .safetensors copy written by convert_checkpoint with its .json sidecar"
        ),
    )


class MammoClipEncoderLoader(TargetLoader):
    """Loads the EfficientNet image encoder of a Mammo-CLIP checkpoint."""

    name = "mammo-clip-encoder"
    description = "Mammo-CLIP's EfficientNet-B5/B2 image encoder from a local checkpoint (lukemelas layer names)"
    Options = MammoClipTargetOptions

    def load(self, options: Options) -> LoadedTarget:
        assert isinstance(options, MammoClipTargetOptions)
        checkpoint = read_mammo_clip_checkpoint(options.checkpoint, "target.options.checkpoint")
        model = build_image_encoder(checkpoint.variant)
        state = checkpoint.image_encoder_state()
        if not state:
            raise ModelLoadError(
                f"target.options.checkpoint={options.checkpoint!r} has no image_encoder.* weights; "
                f"is it a Mammo-CLIP checkpoint?"
            )
        load_weights_strict(model, state, f"{str(checkpoint.path)!r} (image_encoder.*)")
        model.eval()
        logger.info("loaded the Mammo-CLIP EfficientNet-%s image encoder from %s", checkpoint.variant.upper(), checkpoint.path)
        return LoadedTarget(
            model=model,
            preprocess=build_preprocess(checkpoint.variant),
            spec=f"mammo-clip-encoder EfficientNet-{checkpoint.variant.upper()} ({checkpoint.path.name})",
            weights_path=str(checkpoint.path),
            weights_sha256=checkpoint.sha256,
        )


class MammoClipClassifierLoader(TargetLoader):
    """Loads a classifier fine-tuned from Mammo-CLIP's image encoder (density, mass, calcification, cancer)."""

    name = "mammo-clip-classifier"
    description = "a Mammo-CLIP image encoder fine-tuned with a linear head, from a local .pth file"
    Options = MammoClipTargetOptions

    def load(self, options: Options) -> LoadedTarget:
        assert isinstance(options, MammoClipTargetOptions)
        checkpoint = read_mammo_clip_checkpoint(options.checkpoint, "target.options.checkpoint")
        head_weight = checkpoint.state.get(HEAD_PREFIX + "weight")
        if head_weight is None or head_weight.ndim != 2:
            raise ModelLoadError(
                f"target.options.checkpoint={options.checkpoint!r} has no 2-D {HEAD_PREFIX}weight; for a "
                f"Mammo-CLIP checkpoint without a classification head use the loader mammo-clip-encoder"
            )
        n_class, features = (int(size) for size in head_weight.shape)
        model = build_classifier(checkpoint.variant, features, n_class, bias=HEAD_PREFIX + "bias" in checkpoint.state)
        state = {
            (key[len("image_encoder."):] if key.startswith("image_encoder.") else key): value
            for key, value in checkpoint.state.items()
        }
        load_weights_strict(model, state, f"{str(checkpoint.path)!r} (Mammo-CLIP classifier)")
        model.eval()
        scores = {key: checkpoint.metadata[key] for key in ("epoch", "auroc", "accuracy", "f1") if key in checkpoint.metadata}
        logger.info(
            "loaded a Mammo-CLIP EfficientNet-%s classifier with %d output(s) from %s (%s)",
            checkpoint.variant.upper(),
            n_class,
            checkpoint.path,
            scores,
        )
        return LoadedTarget(
            model=model,
            preprocess=build_preprocess(checkpoint.variant),
            spec=f"mammo-clip-classifier EfficientNet-{checkpoint.variant.upper()}, {n_class} output(s) ({checkpoint.path.name})",
            weights_path=str(checkpoint.path),
            weights_sha256=checkpoint.sha256,
        )


def build_classifier(variant: str, features: int, n_class: int, bias: bool = True) -> torch.nn.Module:
    """Build the encoder with a ``classifier`` module whose ``classification_head`` maps pooled features to logits."""
    import torch

    class ClassificationHead(torch.nn.Module):
        """Linear head applied to the pooled global feature, named as in the fine-tuned files."""

        def __init__(self) -> None:
            super().__init__()
            self.classification_head = torch.nn.Linear(features, n_class, bias=bias)

        def forward(self, pooled: torch.Tensor) -> torch.Tensor:
            return self.classification_head(pooled)

    encoder = build_image_encoder(variant)
    head_width = int(encoder._conv_head.weight.shape[0])
    if head_width != features:
        raise ModelLoadError(
            f"the classification head takes {features} features but the EfficientNet-{variant.upper()} "
            f"encoder gives {head_width}; the file is inconsistent"
        )
    encoder.classifier = ClassificationHead()
    return encoder


@hookimpl
def register_target_loaders(register: Any) -> None:
    """Register the ``mammo-clip-encoder`` and ``mammo-clip-classifier`` loaders."""
    register(MammoClipEncoderLoader())
    register(MammoClipClassifierLoader())

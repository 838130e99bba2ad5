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
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from pydantic import Field

from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.safe_pickle import allowed_globals
from mammo_dissect.core.safe_pickle import check_checkpoint_file
from mammo_dissect.core.safe_pickle import to_plain
from mammo_dissect.core.types import LoadedTarget
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import TargetDescription
from mammo_dissect.core.types import TargetLoader
from mammo_dissect.core.weights import check_local_file
from mammo_dissect.core.weights import load_weights_strict
from mammo_dissect.core.weights import sniff_format
from mammo_dissect.core.weights import strip_prefixes
from mammo_dissect.plugins.mammo_clip_checkpoint import IMAGE_PREFIX
from mammo_dissect.plugins.mammo_clip_checkpoint import VARIANTS
from mammo_dissect.plugins.mammo_clip_checkpoint import build_image_encoder
from mammo_dissect.plugins.mammo_clip_checkpoint import build_preprocess
from mammo_dissect.plugins.mammo_clip_checkpoint import image_encoder_variant
from mammo_dissect.plugins.mammo_clip_checkpoint import read_mammo_clip_checkpoint
from mammo_dissect.plugins.mammo_clip_checkpoint import read_sidecar
from mammo_dissect.plugins.targets.local_weights import described_target


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

    def describe(self, options: Options, file_sha256: Callable[[Path], str]) -> TargetDescription | None:
        assert isinstance(options, MammoClipTargetOptions)
        layout = read_checkpoint_layout(options.checkpoint, "target.options.checkpoint")
        if layout is None:
            return None
        spec = encoder_spec(layout.variant, layout.path)
        return described_target(build_preprocess(layout.variant), spec, layout.path, file_sha256)

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
            spec=encoder_spec(checkpoint.variant, checkpoint.path),
            weights_path=str(checkpoint.path),
            weights_sha256=checkpoint.sha256,
        )


class MammoClipClassifierLoader(TargetLoader):
    """Loads a classifier fine-tuned from Mammo-CLIP's image encoder (density, mass, calcification, cancer)."""

    name = "mammo-clip-classifier"
    description = "a Mammo-CLIP image encoder fine-tuned with a linear head, from a local .pth file"
    Options = MammoClipTargetOptions

    def describe(self, options: Options, file_sha256: Callable[[Path], str]) -> TargetDescription | None:
        assert isinstance(options, MammoClipTargetOptions)
        layout = read_checkpoint_layout(options.checkpoint, "target.options.checkpoint")
        if layout is None:
            return None
        n_class, features = classification_head_shape(layout.state, options)
        if features != VARIANTS[layout.variant][2]:
            # build_classifier rejects this file in load(), with the reason.
            return None
        spec = classifier_spec(layout.variant, n_class, layout.path)
        return described_target(build_preprocess(layout.variant), spec, layout.path, file_sha256)

    def load(self, options: Options) -> LoadedTarget:
        assert isinstance(options, MammoClipTargetOptions)
        checkpoint = read_mammo_clip_checkpoint(options.checkpoint, "target.options.checkpoint")
        n_class, features = classification_head_shape(checkpoint.state, options)
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
            spec=classifier_spec(checkpoint.variant, n_class, checkpoint.path),
            weights_path=str(checkpoint.path),
            weights_sha256=checkpoint.sha256,
        )


def encoder_spec(variant: str, path: Path) -> str:
    return f"mammo-clip-encoder EfficientNet-{variant.upper()} ({path.name})"


def classifier_spec(variant: str, n_class: int, path: Path) -> str:
    return f"mammo-clip-classifier EfficientNet-{variant.upper()}, {n_class} output(s) ({path.name})"


def classification_head_shape(state: Mapping[str, Any], options: MammoClipTargetOptions) -> tuple[int, int]:
    """Return (outputs, input features) of the fine-tuned head's weight, or raise when there is no 2-D head weight."""
    head_weight = state.get(HEAD_PREFIX + "weight")
    if head_weight is None or head_weight.ndim != 2:
        raise ModelLoadError(
            f"target.options.checkpoint={options.checkpoint!r} has no 2-D {HEAD_PREFIX}weight; for a "
            f"Mammo-CLIP checkpoint without a classification head use the loader mammo-clip-encoder"
        )
    n_class, features = (int(size) for size in head_weight.shape)
    return n_class, features


@dataclass
class CheckpointLayout:
    """The weight names and shapes of a Mammo-CLIP file and its image encoder variant, read without the weights."""

    path: Path
    #: ``"b5"`` or ``"b2"``, decided as :func:`read_mammo_clip_checkpoint` decides it.
    variant: str
    #: The ``model`` entries with wrapper prefixes removed, as tensors whose values are not read
    #: (memory-mapped, or on the meta device for ``.safetensors`` files).
    state: dict[str, torch.Tensor]


def read_checkpoint_layout(value: str, option: str) -> CheckpointLayout | None:
    """Read what :func:`read_mammo_clip_checkpoint` reads, except the weights' values.

    A ``torch.save`` zip file is loaded memory-mapped, so its tensors are
    not read, and a ``.safetensors`` file gives names and shapes in its
    header.  Returns None when the layout cannot be read this way: a file
    written by the legacy (non-zip) ``torch.save`` or one that
    :func:`read_mammo_clip_checkpoint` would reject.  The model is then
    built, and loading it reports any problem.  Raises the errors of
    :func:`read_mammo_clip_checkpoint` for a missing file, an invalid
    sidecar, and weights that match neither encoder.
    """
    import torch

    path = check_local_file(value, "Mammo-CLIP checkpoint", option)
    if path.suffix == ".safetensors":
        state = safetensors_shapes(path)
        if state is None:
            return None
        sidecar = read_sidecar(path)
        config = sidecar.get("config")
        hint = sidecar.get("image_encoder")
    else:
        check_checkpoint_file(path, "Mammo-CLIP checkpoint")
        if sniff_format(path) != "torch-zip":
            return None
        loaded = load_mapped(path)
        if not isinstance(loaded, Mapping) or not isinstance(loaded.get("model"), Mapping):
            return None
        state = dict(loaded["model"])
        config = to_plain(loaded.get("config"))
        config = config if isinstance(config, Mapping) else None
        hint = None
    if not all(isinstance(item, torch.Tensor) for item in state.values()):
        return None
    state = strip_prefixes(state, [IMAGE_PREFIX])
    return CheckpointLayout(path=path, variant=image_encoder_variant(state, config, hint, path), state=state)


def load_mapped(path: Path) -> Any:
    """Load a ``torch.save`` zip file memory-mapped with the restricted unpickler, or return None on any error."""
    import torch

    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # load() reads the file again and reports the error
        logger.info("cannot read %s memory-mapped (%s: %s), so the model is built", path, type(exc).__name__, exc)
        return None


def safetensors_shapes(path: Path) -> dict[str, torch.Tensor] | None:
    """Return a meta-device tensor of each entry's shape from a ``.safetensors`` header, or None when it cannot be read."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types, and load() reports them
        logger.info("cannot read the header of %s (%s: %s), so the model is built", path, type(exc).__name__, exc)
        return None
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


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

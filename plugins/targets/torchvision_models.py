"""Target loader for torchvision classification models, built by name with weights from a local file."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated
from typing import Any

from pydantic import Field

from mammo_dissect.core.errors import UnknownNameError
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.images import ImagePreprocess
from mammo_dissect.core.types import LoadedTarget
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import TargetDescription
from mammo_dissect.core.types import TargetLoader
from mammo_dissect.plugins.targets.local_weights import build_with_local_weights
from mammo_dissect.plugins.targets.local_weights import described_target
from mammo_dissect.plugins.targets.local_weights import local_weights_path
from mammo_dissect.plugins.targets.local_weights import model_spec
from mammo_dissect.plugins.targets.local_weights import named_loaded_target


logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchvisionOptions(Options):
    """Options of the ``torchvision`` target loader."""

    #: torchvision model name, for example ``resnet50`` (see ``torchvision.models.list_models()``).
    model: str
    #: Local weights file (a state dict saved with ``torch.save``, or ``.safetensors``).
    weights: str | None = None
    #: Number of classifier outputs; default: the architecture's default (1000 for ImageNet models).
    num_classes: int | None = Field(default=None, ge=1)
    #: Input size (height, width); default: the crop size of the architecture's published weights.
    input_size: tuple[Annotated[int, Field(ge=8, le=8192)], Annotated[int, Field(ge=8, le=8192)]] | None = None
    #: Build the model with random weights (a null baseline) instead of loading ``weights``.
    random_init: bool = False
    seed: int = 0
    #: Allow a partial load (missing or unexpected keys are then only logged).
    allow_partial: bool = False


class TorchvisionLoader(TargetLoader):
    """Builds a torchvision classification model by name and loads its weights from a local file."""

    name = "torchvision"
    description = "torchvision classification models by name, weights from a local file (never downloaded)"
    Options = TorchvisionOptions

    def describe(self, options: Options, file_sha256: Callable[[Path], str]) -> TargetDescription:
        assert isinstance(options, TorchvisionOptions)
        check_model_name(options.model)
        weights_path = local_weights_path(options, "torchvision")
        return described_target(torchvision_preprocess(options), model_spec(options), weights_path, file_sha256)

    def load(self, options: Options) -> LoadedTarget:
        assert isinstance(options, TorchvisionOptions)
        import torchvision

        check_model_name(options.model)
        kwargs: dict[str, Any] = {}
        if options.num_classes is not None:
            kwargs["num_classes"] = options.num_classes
        # weights=None builds the architecture only; torchvision downloads nothing then.
        model, weights_path, sha = build_with_local_weights(
            options, "torchvision", lambda: torchvision.models.get_model(options.model, weights=None, **kwargs)
        )
        logger.info("loaded torchvision %s from %s", options.model, weights_path or "random init")
        return named_loaded_target(model, torchvision_preprocess(options), options, weights_path, sha)


def check_model_name(name: str) -> None:
    """Raise :class:`UnknownNameError` unless ``name`` is a torchvision classification model."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise UnknownNameError("torchvision classification model", name, known)


def torchvision_preprocess(options: TorchvisionOptions) -> ImagePreprocess:
    """Return the preprocessing of the architecture's published weights, with the options' input size."""
    size, mean, std = published_transform(options.model)
    if options.input_size is not None:
        size = (int(options.input_size[0]), int(options.input_size[1]))
    return ImagePreprocess(
        size=size,
        mean=mean,
        std=std,
        channels=3,
        interpolation="bilinear",
        source=f"torchvision {options.model}: crop size, mean and std of its published weights; whole image resized, no centre crop",
    )


def published_transform(name: str) -> tuple[tuple[int, int], tuple[float, ...], tuple[float, ...]]:
    """Return (size, mean, std) of the architecture's default published weights, without downloading them."""
    import torchvision

    try:
        transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError) as exc:
        logger.info("no published transform for %s (%s); using 224 x 224 and ImageNet mean and std", name, exc)
        return (224, 224), IMAGENET_MEAN, IMAGENET_STD
    crop = transform.crop_size
    size = (int(crop[0]), int(crop[-1])) if isinstance(crop, (list, tuple)) else (int(crop), int(crop))
    return size, tuple(transform.mean), tuple(transform.std)


@hookimpl
def register_target_loaders(register: Any) -> None:
    """Register the ``torchvision`` loader."""
    register(TorchvisionLoader())

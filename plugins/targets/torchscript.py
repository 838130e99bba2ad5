"""Target loader for TorchScript files (``torch.jit.save``).

A TorchScript file is a program, not just weights: loading it runs no
arbitrary Python, but its forward() is whatever code its author compiled
into it, and torch.jit.load deserialises that code.  Load only files from
sources you trust; the loader requires ``trust_torchscript = true`` to say so.

TorchScript modules do not accept forward hooks, so the only layer is
``output``, the model's output.  For intermediate layers, load the model
from its Python source with another loader (``timm``, ``torchvision``) or a
plugin.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Annotated
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
from mammo_dissect.core.weights import sha256_file
from mammo_dissect.plugins.targets.local_weights import described_target


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)


class TorchscriptOptions(Options):
    """Options of the ``torchscript`` target loader."""

    #: Local file written by ``torch.jit.save``.
    path: str
    #: Must be true: a TorchScript file contains code, so load only files you trust.
    trust_torchscript: bool = False
    #: Input size (height, width) the model expects.
    input_size: tuple[Annotated[int, Field(ge=8, le=8192)], Annotated[int, Field(ge=8, le=8192)]]
    #: Number of input channels (1 keeps grey images grey; 3 replicates them).
    channels: Literal[1, 3] = 3
    #: Per-channel mean and standard deviation applied after scaling to [0, 1]; default: ImageNet's.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    #: Scale each image to [0, 1] by its own minimum and maximum before normalising.
    per_image_minmax: bool = False


class TorchscriptLoader(TargetLoader):
    """Loads a TorchScript model; its output is the one dissectable layer."""

    name = "torchscript"
    description = "a TorchScript file (torch.jit.save), only with trust_torchscript = true; layer: output"
    Options = TorchscriptOptions

    def describe(self, options: Options, file_sha256: Callable[[Path], str]) -> TargetDescription:
        """Describe the target from the options alone.  The TorchScript file is hashed but never loaded.

        The preprocessing comes from the options, and the one layer
        ``output`` is the model's output, so there is no token layout.
        """
        assert isinstance(options, TorchscriptOptions)
        path = trusted_path(options)
        return described_target(torchscript_preprocess(options), torchscript_spec(path), path, file_sha256)

    def load(self, options: Options) -> LoadedTarget:
        assert isinstance(options, TorchscriptOptions)
        import torch

        path = trusted_path(options)
        preprocess = torchscript_preprocess(options)
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot load {str(path)!r} with torch.jit.load: {exc}; is it a file written by torch.jit.save?"
            ) from exc
        logger.warning("loaded TorchScript %s (trusted by option trust_torchscript)", path)
        return LoadedTarget(
            model=wrap_scripted(scripted),
            preprocess=preprocess,
            spec=torchscript_spec(path),
            weights_path=str(path),
            weights_sha256=sha256_file(path),
        )


def trusted_path(options: TorchscriptOptions) -> Path:
    """Return the TorchScript file as a checked local path, or raise unless ``trust_torchscript`` is set."""
    path = check_local_file(options.path, "TorchScript", "target.options.path")
    if not options.trust_torchscript:
        raise ModelLoadError(
            f"target.options.path={options.path!r} is a TorchScript file, which contains code that runs when "
            f"the model runs. Set target.options.trust_torchscript = true only if you trust its source"
        )
    return path


def torchscript_preprocess(options: TorchscriptOptions) -> ImagePreprocess:
    """Return the preprocessing that the options set; mean and std default to ImageNet's."""
    channels = options.channels
    mean = options.mean or ((0.485, 0.456, 0.406) if channels == 3 else (0.449,))
    std = options.std or ((0.229, 0.224, 0.225) if channels == 3 else (0.226,))
    if len(mean) != channels or len(std) != channels:
        raise ModelLoadError(f"target.options.mean and std need {channels} value(s) each, got {mean} and {std}")
    return ImagePreprocess(
        size=(int(options.input_size[0]), int(options.input_size[1])),
        mean=mean,
        std=std,
        channels=channels,
        interpolation="bilinear",
        per_image_minmax=options.per_image_minmax,
        source="torchscript loader options (input_size, channels, mean, std)",
    )


def torchscript_spec(path: Path) -> str:
    return f"torchscript {path.name}"


def wrap_scripted(scripted: Any) -> torch.nn.Module:
    """Wrap a TorchScript module so that its output is the hookable layer ``output``.

    The scripted module is kept out of the module tree, so layer listings do
    not offer its submodules, whose hooks TorchScript would reject.
    """
    import torch

    class TorchscriptTarget(torch.nn.Module):
        """Runs the TorchScript module, then ``output`` (an identity) on its result."""

        def __init__(self) -> None:
            super().__init__()
            object.__setattr__(self, "scripted", scripted)
            self.output = torch.nn.Identity()

        def forward(self, inputs: torch.Tensor) -> Any:
            return self.output(self.scripted(inputs))

        def _apply(self, fn: Any, recurse: bool = True) -> Any:
            self.scripted._apply(fn)
            return super()._apply(fn, recurse)

        def train(self, mode: bool = True) -> Any:
            self.scripted.train(mode)
            return super().train(mode)

    return TorchscriptTarget().eval()


@hookimpl
def register_target_loaders(register: Any) -> None:
    """Register the ``torchscript`` loader."""
    register(TorchscriptLoader())

"""Python entry points to load a dissector or a target by plugin name, outside a run.

``load_dissector("mammo_clip", checkpoint=..., tokenizer=...)`` and
``load_target("mammo-clip-encoder", checkpoint=...)`` validate the options
with the plugin's Options model, so errors read as in a run configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.extraction import pool_output
from mammo_dissect.core.extraction import resolve_layers
from mammo_dissect.core.types import EmbeddingDissector
from mammo_dissect.core.types import LoadedDissector
from mammo_dissect.core.types import LoadedTarget
from mammo_dissect.core.types import validate_options


if TYPE_CHECKING:
    import torch


@dataclass
class DissectorHandle:
    """A loaded embedding dissector whose encoders return L2-normalised rows."""

    loaded: LoadedDissector
    name: str

    @property
    def preprocess(self) -> Any:
        """Image preprocessing: decoded image (float32 [H, W] or [H, W, 3] in [0, 1]) to [C, H, W]."""
        return self.loaded.preprocess

    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        """Return the normalised image embeddings [B x D] (float32) of a preprocessed batch."""
        import torch

        with torch.no_grad():
            return torch.nn.functional.normalize(self.loaded.encode_images(batch).float(), dim=1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Return the normalised text embeddings [T x D] (float32); over-long texts follow the plugin's rule."""
        import torch

        texts = list(texts)
        if self.loaded.check_texts is not None:
            self.loaded.check_texts(texts)
        with torch.no_grad():
            return torch.nn.functional.normalize(self.loaded.encode_texts(texts).float(), dim=1)

    def to(self, device: str) -> DissectorHandle:
        """Move the model to ``device`` and return self."""
        if self.loaded.to is not None:
            self.loaded.to(device)
        return self


@dataclass
class TargetHandle:
    """A loaded target model with layer listing and pooled activations."""

    loaded: LoadedTarget
    name: str

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def preprocess(self) -> Any:
        return self.loaded.preprocess

    def layer_names(self) -> list[str]:
        """Return the qualified names of all submodules, in module order."""
        return [name for name, _module in self.loaded.model.named_modules() if name]

    def activations(self, batch: torch.Tensor, layers: Sequence[str], pooling: str = "avg") -> dict[str, torch.Tensor]:
        """Run one forward pass and return each layer's pooled output [B x K], keyed by the requested name.

        Pooling is the pipeline's: spatial mean or max of 4-D maps, the
        declared token of 3-D outputs, 2-D outputs as they are.  Each output is
        reduced inside its hook, before a later in-place operation can change it.
        """
        import torch

        if pooling not in ("avg", "max"):
            raise ConfigError(f"pooling must be 'avg' or 'max', got {pooling!r}")
        resolved = resolve_layers(self.loaded.model, list(layers))
        pooled: dict[str, torch.Tensor] = {}
        handles = []
        for layer in resolved:
            layout = self.loaded.token_layout.get(layer.name, self.loaded.token_layout.get("*"))

            def hook(module: Any, inputs: Any, output: Any, _key: str = layer.requested, _layout: Any = layout) -> None:
                pooled[_key] = pool_output(output, pooling, _layout)

            handles.append(layer.module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                self.loaded.model(batch)
        finally:
            for handle in handles:
                handle.remove()
        missing = [layer.requested for layer in resolved if layer.requested not in pooled]
        if missing:
            raise ConfigError(f"layer(s) {', '.join(missing)} were not called in the forward pass; choose other layers")
        return {layer.requested: pooled[layer.requested] for layer in resolved}


def load_dissector(name: str, **options: Any) -> DissectorHandle:
    """Load the embedding dissector plugin ``name`` with ``options`` (validated like a run configuration)."""
    from mammo_dissect.core.plugins import get_registry

    dissector = get_registry().get("dissector", name)
    if not isinstance(dissector, EmbeddingDissector):
        raise ConfigError(
            f"dissector {name!r} does not embed images and texts (it computes P from the probe set directly), "
            f"so it cannot be loaded on its own; use an embedding dissector such as mammo_clip or open_clip"
        )
    validated = validate_options(dissector.Options, options, f"dissector {name} options")
    return DissectorHandle(loaded=dissector.load(validated), name=name)


def load_target(name: str, **options: Any) -> TargetHandle:
    """Load the target with loader plugin ``name`` and ``options`` (validated like a run configuration)."""
    from mammo_dissect.core.plugins import get_registry

    loader = get_registry().get("target loader", name)
    validated = validate_options(loader.Options, options, f"target {name} options")
    return TargetHandle(loaded=loader.load(validated), name=name)

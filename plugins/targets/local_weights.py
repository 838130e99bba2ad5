"""Loading steps shared by the target loaders that build a model by name (``timm`` and ``torchvision``).

Both loaders take the options ``model``, ``weights``, ``random_init``,
``seed`` and ``allow_partial``, build the architecture without weights,
then load a local weights file strictly or keep the seeded random weights.
:func:`described_target` serves every built-in loader's ``describe``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import Protocol

from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.types import LoadedTarget
from mammo_dissect.core.types import TargetDescription
from mammo_dissect.core.weights import check_local_file
from mammo_dissect.core.weights import load_weights_strict
from mammo_dissect.core.weights import read_state_dict
from mammo_dissect.core.weights import sha256_file


if TYPE_CHECKING:
    import torch


class ModelNameOptions(Protocol):
    """Options that name a model and may request random weights."""

    model: str
    random_init: bool


class NamedModelOptions(Protocol):
    """Options of a loader that builds a model by name and reads its weights from a local file."""

    model: str
    weights: str | None
    random_init: bool
    seed: int
    allow_partial: bool


def local_weights_path(options: NamedModelOptions, library: str) -> Path | None:
    """Return the checked local weights file, or None when ``random_init`` is set.

    Raises :class:`ModelLoadError` when neither ``weights`` nor ``random_init``
    is set. The message names the model's library, ``library``.
    """
    if options.random_init:
        return None
    if options.weights is None:
        raise ModelLoadError(
            f"{library} model {options.model!r} needs target.options.weights, the path of a local weights "
            f"file (mammo-dissect never downloads weights), or random_init = true"
        )
    return check_local_file(options.weights, "weights", "target.options.weights")


def build_with_local_weights(
    options: NamedModelOptions, library: str, build: Callable[[], torch.nn.Module]
) -> tuple[torch.nn.Module, Path | None, str | None]:
    """Seed torch, call ``build``, load the local weights strictly and switch the model to eval mode.

    Returns the model, the weights file (None for random weights) and the file's SHA-256 (None likewise).
    """
    import torch

    weights_path = local_weights_path(options, library)
    torch.manual_seed(options.seed)
    model = build()
    sha = None
    if weights_path is not None:
        state = read_state_dict(weights_path)
        load_weights_strict(model, state, str(weights_path), allow_partial=options.allow_partial)
        sha = sha256_file(weights_path)
    model.eval()
    return model, weights_path, sha


def named_loaded_target(
    model: torch.nn.Module,
    preprocess: Any,
    options: NamedModelOptions,
    weights_path: Path | None,
    weights_sha256: str | None,
    **fields: Any,
) -> LoadedTarget:
    """Wrap a model built by :func:`build_with_local_weights` in a :class:`LoadedTarget`.

    The spec is the model name, marked " (random init)" for random weights.
    ``fields`` sets further :class:`LoadedTarget` fields such as ``token_layout``.
    """
    return LoadedTarget(
        model=model,
        preprocess=preprocess,
        spec=model_spec(options),
        weights_path=str(weights_path) if weights_path else None,
        weights_sha256=weights_sha256,
        **fields,
    )


def model_spec(options: ModelNameOptions) -> str:
    """Return the model name, marked " (random init)" for random weights."""
    return options.model + (" (random init)" if options.random_init else "")


def described_target(
    preprocess: Any,
    spec: str,
    weights_path: Path | None,
    file_sha256: Callable[[Path], str],
    **fields: Any,
) -> TargetDescription:
    """Return a :class:`TargetDescription` whose weights file (None for random weights) is hashed by ``file_sha256``.

    ``fields`` sets further fields such as ``token_layout``.
    """
    return TargetDescription(
        preprocess=preprocess,
        spec=spec,
        weights_path=str(weights_path) if weights_path else None,
        weights_sha256=file_sha256(weights_path) if weights_path else None,
        **fields,
    )

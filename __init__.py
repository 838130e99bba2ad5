"""mammo-dissect: label the units of mammography vision models with textual concepts."""

from __future__ import annotations

from typing import TYPE_CHECKING


__version__ = "0.1.0"

if TYPE_CHECKING:
    from mammo_dissect.core.types import SimilarityFunction

__all__ = ["__version__", "load_dissector", "load_target", "similarity_function"]


def similarity_function(name: str) -> SimilarityFunction:
    """Return the registered similarity function called ``name``.

    The result is callable as ``fn(P, A, **params) -> S`` on torch tensors:
    P [N x M] (images x concepts), A [N x K] (images x units), S [K x M].
    Unknown parameters raise :class:`mammo_dissect.core.errors.ConfigError`.
    """
    from mammo_dissect.core.plugins import get_registry

    return get_registry().get("similarity function", name)  # type: ignore[no-any-return]


def load_dissector(name: str, **options: object) -> object:
    """Load a registered dissector by name for notebook use.

    Returns an object with ``encode_images(batch)`` and ``encode_texts(texts)``
    (row-normalised torch tensors) and ``preprocess``.  Options are the same
    fields as ``[dissector.options]`` in a run configuration.
    """
    from mammo_dissect.core.api import load_dissector as load

    return load(name, **options)


def load_target(name: str, **options: object) -> object:
    """Load a registered target model by loader name for notebook use.

    Returns an object with ``model``, ``preprocess``, ``layer_names()`` and
    ``activations(batch, layers, pooling="avg")``.  Options are the same
    fields as ``[target.options]`` in a run configuration.
    """
    from mammo_dissect.core.api import load_target as load

    return load(name, **options)

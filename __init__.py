"""mammo-dissect: label the units of mammography vision models with textual concepts."""

from __future__ import annotations

from typing import TYPE_CHECKING


__version__ = "0.1.0"

if TYPE_CHECKING:
    from mammo_dissect.core.types import SimilarityFunction

__all__ = ["__version__", "similarity_function"]


def similarity_function(name: str) -> SimilarityFunction:
    """Return the registered similarity function called ``name``.

    The result is callable as ``fn(P, A, **params) -> S`` on torch tensors:
    P [N x M] (images x concepts), A [N x K] (images x units), S [K x M].
    Unknown parameters raise :class:`mammo_dissect.core.errors.ConfigError`.
    """
    from mammo_dissect.core.plugins import get_registry

    return get_registry().get("similarity function", name)  # type: ignore[no-any-return]

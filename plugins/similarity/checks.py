"""Input checks and unit chunking shared by the similarity functions.

Every similarity function validates P [N x M] and A [N x K] before any
compute.  A bad input then fails with a message naming the value and the
fix, not with NaN scores or a shape error deep inside torch.
Functions that build a temporary tensor per unit ([images x units x concepts])
score the units in chunks sized by :func:`unit_chunks`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from mammo_dissect.core.errors import SimilarityError


if TYPE_CHECKING:
    import torch


def check_finite(P: torch.Tensor, A: torch.Tensor) -> None:
    """Raise :class:`SimilarityError` naming the first image and column holding NaN or Inf."""
    import torch

    for label, matrix, column_kind in (("P", P, "concept"), ("A", A, "unit")):
        bad = ~torch.isfinite(matrix)
        if bool(bad.any()):
            rows, columns = torch.nonzero(bad, as_tuple=True)
            count = int(bad.sum())
            pairs = ", ".join(
                f"(image {int(row)}, {column_kind} {int(column)})"
                for row, column in zip(rows[:5].tolist(), columns[:5].tolist())
            )
            raise SimilarityError(
                f"{label} contains {count} NaN or Inf value(s), first at {pairs}; "
                f"check the model outputs for those images"
            )


def check_matrix_shapes(P: torch.Tensor, A: torch.Tensor) -> None:
    """Raise :class:`SimilarityError` unless P and A are 2-D with the same number of images (rows)."""
    if P.ndim != 2 or A.ndim != 2:
        raise SimilarityError(f"P and A must be 2-D, got shapes {tuple(P.shape)} and {tuple(A.shape)}")
    if P.shape[0] != A.shape[0]:
        raise SimilarityError(
            f"P has {P.shape[0]} images but A has {A.shape[0]}; both must cover the same probe images"
        )


def check_shapes(P: torch.Tensor, A: torch.Tensor, top_k: int) -> None:
    """Validate the matrix shapes and ``top_k`` before any compute."""
    check_matrix_shapes(P, A)
    check_top_k(A.shape[0], top_k)


def check_top_k(n_images: int, top_k: int) -> None:
    """Raise :class:`SimilarityError` unless 1 <= ``top_k`` <= ``n_images``."""
    if top_k < 1:
        raise SimilarityError(f"top_k must be at least 1, got {top_k}")
    if n_images < top_k:
        raise SimilarityError(
            f"top_k={top_k} is larger than the number of probe images ({n_images}); "
            f"lower similarity.params.top_k or add probe images"
        )


#: Largest number of elements of one per-chunk temporary tensor (for example
#: [top images x units x concepts]).  With the few such temporaries a function
#: keeps alive, peak extra memory is a few hundred MB at most.
MAX_CHUNK_ELEMENTS = 1 << 22


def unit_chunks(n_units: int, elements_per_unit: int) -> Iterator[slice]:
    """Yield slices of unit indices whose temporaries have at most MAX_CHUNK_ELEMENTS elements.

    A chunk contains at least one unit, so a single unit larger than the
    limit is still scored (in one chunk of its own).
    """
    units_per_chunk = max(1, MAX_CHUNK_ELEMENTS // max(1, elements_per_unit))
    for start in range(0, n_units, units_per_chunk):
        yield slice(start, min(start + units_per_chunk, n_units))

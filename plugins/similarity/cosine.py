"""Cosine scores of CLIP-Dissect: ``cos_similarity`` and ``cos_similarity_cubed``.

Both compare unit k's activation column A[:, k] with concept m's column
P[:, m] over the N probe images:

* cos_similarity: S[k, m] = cos(A[:, k], P[:, m]), with no centring;
* cos_similarity_cubed: every column of A and P is centred (its mean over
  images subtracted), cubed elementwise and divided by max(||column||_2, 1e-3);
  then S = A'.T @ P'.  Cubing stresses each column's extreme images.

Each unit's row depends only on its own column, so a layer may be scored in
any split of units.  The streaming forms (from image and text embeddings)
accumulate the same dot products and column norms over chunks of images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.types import SimilarityFunction
from mammo_dissect.plugins.similarity import streaming
from mammo_dissect.plugins.similarity.checks import check_finite
from mammo_dissect.plugins.similarity.checks import check_matrix_shapes


if TYPE_CHECKING:
    import torch


#: Lower bound on a cubed column's norm in cos_similarity_cubed, as in CLIP-Dissect.
CUBED_NORM_FLOOR = 1e-3


def normalise_columns(matrix: torch.Tensor) -> torch.Tensor:
    """Divide each column by its L2 norm over images, leaving an all-zero column zero.

    CLIP-Dissect divides by the norm unconditionally, so a dead unit (an
    all-zero column) gets NaN scores there.  Here its cosine with every
    concept is 0 instead.
    """
    import torch

    norms = torch.linalg.vector_norm(matrix, dim=0, keepdim=True)
    safe_norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    return matrix / safe_norms


def cos_similarity(P: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Compute S [K x M], the cosine of each activation column with each concept column.

    Values lie in [-1, 1] (in [0, 1] for non-negative A and P).  A column of
    A or P that is zero on every image scores 0 against everything.
    """
    import torch

    check_matrix_shapes(P, A)
    check_finite(P, A)
    P = P.float()
    A = A.to(device=P.device, dtype=torch.float32)
    return normalise_columns(A).T @ normalise_columns(P)


def centred_cubed_columns(matrix: torch.Tensor) -> torch.Tensor:
    """Centre each column over images, cube it and divide it by max(||column||_2, CUBED_NORM_FLOOR)."""
    import torch

    cubed = (matrix - matrix.mean(dim=0, keepdim=True)) ** 3
    norms = torch.linalg.vector_norm(cubed, dim=0, keepdim=True).clamp(min=CUBED_NORM_FLOOR)
    return cubed / norms


def cos_similarity_cubed(P: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Compute S [K x M] from centred, cubed and norm-scaled columns of A and P.

    Values lie in [-1, 1].  A column whose cubed norm is under the 1e-3
    floor is divided by the floor, so its scores shrink towards 0.  That is
    the case for most concepts of dissector cosines, which vary by about
    0.02 over images.  A constant column (a dead unit, or a concept equal on
    every image) is zero after centring and scores 0 against everything.
    """
    import torch

    check_matrix_shapes(P, A)
    check_finite(P, A)
    P = P.float()
    A = A.to(device=P.device, dtype=torch.float32)
    return centred_cubed_columns(A).T @ centred_cubed_columns(P)


def stream_cos_similarity(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, A: torch.Tensor, budget_bytes: int
) -> torch.Tensor:
    """Compute :func:`cos_similarity` from embeddings, summing over image chunks (one pass)."""
    import torch

    source = streaming.prepare_source(image_embeddings, text_embeddings, A, budget_bytes)
    scores = torch.empty(A.shape[1], source.n_concepts, device=source.device, dtype=torch.float32)
    for sums in streaming.column_products(source, A, budget_bytes, transform="none"):
        unit_norms = sums.unit_squares.sqrt()
        concept_norms = sums.concept_squares.sqrt()
        # A zero column has a zero cross sum, so dividing it by 1 scores it 0.
        unit_norms = torch.where(unit_norms > 0, unit_norms, torch.ones_like(unit_norms))
        concept_norms = torch.where(concept_norms > 0, concept_norms, torch.ones_like(concept_norms))
        scores[sums.units] = (sums.cross / unit_norms.unsqueeze(1) / concept_norms.unsqueeze(0)).float()
    return scores


def stream_cos_similarity_cubed(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, A: torch.Tensor, budget_bytes: int
) -> torch.Tensor:
    """Compute :func:`cos_similarity_cubed` from embeddings: a pass for the means, then one for the sums."""
    import torch

    source = streaming.prepare_source(image_embeddings, text_embeddings, A, budget_bytes)
    scores = torch.empty(A.shape[1], source.n_concepts, device=source.device, dtype=torch.float32)
    for sums in streaming.column_products(source, A, budget_bytes, transform="centre_cube"):
        unit_norms = sums.unit_squares.sqrt().clamp(min=CUBED_NORM_FLOOR)
        concept_norms = sums.concept_squares.sqrt().clamp(min=CUBED_NORM_FLOOR)
        scores[sums.units] = (sums.cross / unit_norms.unsqueeze(1) / concept_norms.unsqueeze(0)).float()
    return scores


@hookimpl
def register_similarity_functions(register: Any) -> None:
    register(
        SimilarityFunction(
            name="cos_similarity",
            fn=cos_similarity,
            stream_fn=stream_cos_similarity,
            description="cosine of each unit's activations with each concept's column of P",
            value_range="[-1, 1]; 0 for an all-zero activation or concept column",
        )
    )
    register(
        SimilarityFunction(
            name="cos_similarity_cubed",
            fn=cos_similarity_cubed,
            stream_fn=stream_cos_similarity_cubed,
            description="cosine of the centred, cubed columns of A and P (CLIP-Dissect)",
            value_range="[-1, 1]; 0 for a constant activation or concept column",
        )
    )

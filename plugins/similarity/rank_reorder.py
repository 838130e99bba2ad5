"""The ``rank_reorder`` score of CLIP-Dissect.

For unit k, take its n = int(top_fraction * N) most activating images
(activations t, descending) and the concept values C = P[those images]
[n x M].  If the unit's activations were perfectly explained by concept m,
reordering the same activations by the rank of C[:, m] would reproduce t.
The score measures how far that reordering lands from t:

    reorg[j, m] = s[R[j, m]]   (s = t ascending, R = rank of C[j, m] in its column)
    error[m]    = mean_j |t_j - reorg[j, m]|^p
    baseline    = mean over all pairs (i, j) of |s_i - s_j|^p
    S[k, m]     = -(error[m] / baseline) / avg[m]^scale_p,  avg[m] = mean_j C[j, m]

The baseline is the exact expected error of a uniformly random reordering,
so it is deterministic; CLIP-Dissect averages 5 random permutations instead.
Either way it is a positive per-unit scalar that rescales a row without
changing the order of its concepts.

Choices this module makes where the formula is undefined:

* tied concept values: images whose C[:, m] values are equal share the mean
  of the activations at their ranks.  The order of the ties then neither
  rewards nor punishes a concept that is constant over the top images.
* baseline 0 (all top activations equal): error / baseline is taken as 1,
  the value of a random reordering.
* avg[m] <= 0: the score is one below the lowest score among the row's
  concepts with a positive mean, or -1 when the row has none.  Such concepts
  rank last and every stored score stays finite.

Each unit's row depends only on its own column of A, so units are scored in
chunks (see ``checks.unit_chunks``) without changing the result.  The
streaming form (from image and text embeddings) computes P only on each
unit's top images, a block of concepts at a time.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING
from typing import Any

from mammo_dissect.core.errors import SimilarityError
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.types import SimilarityFunction
from mammo_dissect.plugins.similarity import checks
from mammo_dissect.plugins.similarity import streaming


if TYPE_CHECKING:
    import torch


VALUE_RANGE = (
    "(-inf, 0]; 0 when the concept orders the top images exactly as the unit does; "
    "concepts with a non-positive mean over the top images score below every other concept of the row"
)


def top_image_count(n_images: int, top_fraction: float) -> int:
    """Return n = int(top_fraction * n_images), the number of top images scored per unit."""
    return int(top_fraction * n_images)


def minimum_images(params: dict[str, Any]) -> int:
    """Return the smallest number of probe images that gives at least one top image per unit."""
    top_fraction = float(params["top_fraction"])
    if not 0.0 < top_fraction <= 1.0:
        # rank_reorder itself rejects this value with a clearer message.
        return 1
    needed = max(1, math.ceil(1.0 / top_fraction))
    while top_image_count(needed, top_fraction) < 1:
        needed += 1
    while needed > 1 and top_image_count(needed - 1, top_fraction) >= 1:
        needed -= 1
    return needed


def _check_params(n_images: int, p: float, top_fraction: float, scale_p: float) -> int:
    if not 0.0 < top_fraction <= 1.0:
        raise SimilarityError(
            f"top_fraction={top_fraction} is invalid; it must be in (0, 1], for example 0.05 for the top 5% of images"
        )
    if not p > 0.0:
        raise SimilarityError(f"p={p} is invalid; the error exponent must be positive, for example 3")
    if not scale_p >= 0.0:
        raise SimilarityError(f"scale_p={scale_p} is invalid; it must be 0 or more, for example 0.5")
    n_top = top_image_count(n_images, top_fraction)
    if n_top < 1:
        needed = minimum_images({"top_fraction": top_fraction})
        raise SimilarityError(
            f"rank_reorder with top_fraction={top_fraction} needs at least {needed} probe images, "
            f"but there are {n_images}; add probe images or raise similarity.params.top_fraction"
        )
    return n_top


def reorganised_activations(concept_values: torch.Tensor, ascending: torch.Tensor) -> torch.Tensor:
    """Return reorg [n x units x M]: each image gets the activation at its concept value's rank.

    ``concept_values`` is C [n x units x M]; ``ascending`` is s [n x units],
    each unit's top activations in ascending order.  Images whose concept
    values tie share the mean of the activations at the ranks they occupy.
    """
    import torch

    n_top = concept_values.shape[0]
    sorted_values, order = torch.sort(concept_values, dim=0, stable=True)
    positions = torch.arange(n_top, device=concept_values.device).view(n_top, 1, 1).expand_as(sorted_values)

    # First and last sorted position of the run of equal values each position belongs to.
    starts_run = torch.ones_like(sorted_values, dtype=torch.bool)
    starts_run[1:] = sorted_values[1:] != sorted_values[:-1]
    ends_run = torch.ones_like(starts_run)
    ends_run[:-1] = starts_run[1:]
    run_start = torch.where(starts_run, positions, torch.zeros_like(positions)).cummax(dim=0).values
    run_end = torch.where(ends_run, positions, torch.full_like(positions, n_top))
    run_end = run_end.flip(0).cummin(dim=0).values.flip(0)

    # Mean of s over ranks run_start..run_end from a prefix sum (float64 keeps it exact for single ranks).
    prefix = torch.zeros(n_top + 1, ascending.shape[1], dtype=torch.float64, device=ascending.device)
    prefix[1:] = ascending.double().cumsum(dim=0)
    prefix = prefix.unsqueeze(2).expand(-1, -1, concept_values.shape[2])
    run_sum = torch.gather(prefix, 0, run_end + 1) - torch.gather(prefix, 0, run_start)
    run_mean = (run_sum / (run_end - run_start + 1)).to(ascending.dtype)

    # Back from sorted positions to the images' own positions.
    return torch.empty_like(run_mean).scatter_(0, order, run_mean)


def _top_activations(A: torch.Tensor, n_top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return t [n x units] (each unit's top activations, descending) and their image indices."""
    import torch

    # Stable sort so that tied activations keep image order on every device.
    sorted_activations, top_images = torch.sort(A, dim=0, descending=True, stable=True)
    return sorted_activations[:n_top], top_images[:n_top]


def _pairwise_baseline(ascending: torch.Tensor, p: float) -> torch.Tensor:
    """Return the mean over all pairs (i, j) of |s_i - s_j|^p for each unit [units]."""
    return (ascending.unsqueeze(0) - ascending.unsqueeze(1)).abs().pow(p).mean(dim=(0, 1))


def _concept_scores(
    concept_values: torch.Tensor,
    top: torch.Tensor,
    ascending: torch.Tensor,
    baseline: torch.Tensor,
    p: float,
    scale_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the scores [units x M] and whether each concept's mean over the top images is positive.

    Scores where the mean is not positive are placeholders; :func:`_apply_row_floor` replaces them.
    """
    import torch

    reorg = reorganised_activations(concept_values, ascending)
    error = (top.unsqueeze(2) - reorg).abs().pow(p).mean(dim=0)  # [units x M]

    constant_top = baseline <= 0
    relative_error = error / torch.where(constant_top, torch.ones_like(baseline), baseline).unsqueeze(1)
    relative_error = torch.where(constant_top.unsqueeze(1), torch.ones_like(relative_error), relative_error)

    average = concept_values.mean(dim=0)  # [units x M]
    positive = average > 0
    safe_average = torch.where(positive, average, torch.ones_like(average))
    scores = -relative_error / safe_average.pow(scale_p)
    return scores, positive


def _apply_row_floor(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Replace scores of concepts without a positive mean by one below the row's lowest valid score (or -1)."""
    import torch

    valid_scores = torch.where(positive, scores, torch.full_like(scores, math.inf))
    row_floor = valid_scores.min(dim=1, keepdim=True).values
    row_floor = torch.where(torch.isfinite(row_floor), row_floor, torch.zeros_like(row_floor))
    return torch.where(positive, scores, row_floor - 1.0)


def _score_chunk(P: torch.Tensor, A: torch.Tensor, n_top: int, p: float, scale_p: float) -> torch.Tensor:
    top, top_images = _top_activations(A, n_top)  # t [n x units], descending
    concept_values = P[top_images]  # C [n x units x M]
    ascending = top.flip(0)  # s
    baseline = _pairwise_baseline(ascending, p)
    scores, positive = _concept_scores(concept_values, top, ascending, baseline, p, scale_p)
    return _apply_row_floor(scores, positive)


def rank_reorder(
    P: torch.Tensor,
    A: torch.Tensor,
    *,
    p: float = 3.0,
    top_fraction: float = 0.05,
    scale_p: float = 0.5,
) -> torch.Tensor:
    """Compute rank-reorder scores S [K x M] from P [N x M] and A [N x K]."""
    import torch

    checks.check_matrix_shapes(P, A)
    n_top = _check_params(A.shape[0], p, top_fraction, scale_p)
    checks.check_finite(P, A)
    P = P.float()
    A = A.to(device=P.device, dtype=torch.float32)

    n_units = A.shape[1]
    n_concepts = P.shape[1]
    scores = torch.empty(n_units, n_concepts, device=P.device, dtype=torch.float32)
    elements_per_unit = n_top * max(n_concepts, n_top)
    for units in checks.unit_chunks(n_units, elements_per_unit):
        scores[units] = _score_chunk(P, A[:, units], n_top, p, scale_p)
    return scores


#: Estimated peak bytes per (top image, unit, concept) element of :func:`_concept_scores`
#: (the sort, run bounds in int64, the float64 prefix gather and the error terms).
SCORE_ELEMENT_BYTES = 96


def _chunked_pairwise_baseline(ascending: torch.Tensor, p: float, budget_bytes: int) -> torch.Tensor:
    """Return :func:`_pairwise_baseline`, summing blocks of rows when the n x n x units tensor exceeds the budget."""
    import torch

    n_top, n_units = ascending.shape
    element_bytes = 3 * streaming.FLOAT_BYTES
    if element_bytes * n_top * n_top * n_units <= budget_bytes:
        return _pairwise_baseline(ascending, p)
    rows_per_chunk = streaming.chunk_length(budget_bytes, element_bytes * n_top * n_units, n_top)
    total = torch.zeros(n_units, dtype=torch.float64, device=ascending.device)
    for rows in streaming.chunks(n_top, rows_per_chunk):
        differences = ascending[rows].unsqueeze(1) - ascending.unsqueeze(0)
        total += differences.abs().pow(p).sum(dim=(0, 1)).double()
    return (total / (n_top * n_top)).to(ascending.dtype)


def stream_rank_reorder(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    A: torch.Tensor,
    budget_bytes: int,
    *,
    p: float = 3.0,
    top_fraction: float = 0.05,
    scale_p: float = 0.5,
) -> torch.Tensor:
    """Compute :func:`rank_reorder` from embeddings, computing P only on each unit's top images.

    Units are taken a chunk at a time; for each chunk, the rows of P on its
    top images are computed a block of concepts at a time.
    NOTE: the baseline costs O(n^2) per unit (n = top_fraction * N), which
    dominates the time for large probe sets (n = 50,000 at N = 1,000,000).
    """
    import torch

    source = streaming.prepare_source(image_embeddings, text_embeddings, A, budget_bytes)
    n_images, n_units = A.shape
    n_concepts = source.n_concepts
    n_top = _check_params(n_images, p, top_fraction, scale_p)
    budget = max(1, budget_bytes - source.fixed_bytes)

    # Half the budget for a unit chunk's sort and top-image embeddings, half for one concept block.
    unit_bytes = 4 * streaming.FLOAT_BYTES * n_images + n_top * source.image_row_bytes
    units_per_chunk = streaming.chunk_length(budget // 2, unit_bytes, n_units)
    scores = torch.empty(n_units, n_concepts, device=source.device, dtype=torch.float32)
    for units in streaming.chunks(n_units, units_per_chunk):
        width = units.stop - units.start
        activations = A[:, units].to(device=source.device, dtype=torch.float32)
        top, top_images = _top_activations(activations, n_top)  # [n x units]
        del activations
        ascending = top.flip(0)
        baseline = _chunked_pairwise_baseline(ascending, p, budget // 2)
        unit_images = source.unit_images(top_images.reshape(-1))  # row j * width + k is (rank j, unit k)

        positive = torch.empty(width, n_concepts, dtype=torch.bool, device=source.device)
        concepts_per_chunk = streaming.chunk_length(budget // 2, SCORE_ELEMENT_BYTES * n_top * width, n_concepts)
        for concepts in streaming.chunks(n_concepts, concepts_per_chunk):
            concept_values = source.rows_from_unit_images(unit_images, concepts).view(n_top, width, -1)
            block_scores, block_positive = _concept_scores(concept_values, top, ascending, baseline, p, scale_p)
            scores[units, concepts] = block_scores
            positive[:, concepts] = block_positive
        scores[units] = _apply_row_floor(scores[units], positive)
    return scores


@hookimpl
def register_similarity_functions(register: Any) -> None:
    register(
        SimilarityFunction(
            name="rank_reorder",
            fn=rank_reorder,
            stream_fn=stream_rank_reorder,
            description="how well each concept's order of a unit's top images reproduces their activations",
            value_range=VALUE_RANGE,
            min_images=minimum_images,
        )
    )

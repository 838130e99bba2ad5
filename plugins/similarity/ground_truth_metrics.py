"""Scores that pass the missing-label and extra-label sanity tests: correlation, AUPRC, IoU and F1.

Oikarinen, Yan & Weng, "Evaluating Neuron Explanations: A Unified Framework
with Sanity Checks" (ICML 2025) compared neuron-explanation metrics by
whether a unit's score for its true concept drops when positive labels of
that concept are removed ("missing labels") or added on other images
("extra labels").  Pearson correlation, cosine similarity, AUPRC, F1 and IoU
passed both tests.  ``mammo_dissect.core.sanity`` reruns both tests on
synthetic units for any registered similarity function.

* correlation: Pearson correlation of A[:, k] and P[:, m] over images.  It
  works on any P, continuous or binary.
* auprc, iou and f1 treat P as labels: concept m is present on image i when
  P[i, m] >= ``threshold``.  They suit binary concept matrices such as the
  annotation dissector's.  Dissector cosines (about 0.15 to 0.35) fall below
  the default threshold 0.5 everywhere, which leaves every concept absent.
* auprc: average precision of unit k's activations ranking the images where
  concept m is present.  It is the area under the precision-recall curve
  with ties in activation counted as one threshold.
* iou and f1: unit k is active on image i when A[i, k] is above the unit's
  ``quantile`` of activations over the probe images (0.995 as in Network
  Dissection).  Then IoU = |active and present| / |active or present|, and
  F1 = 2 |active and present| / (|active| + |present|).

Every unit's row depends only on its own column of A.  Units are scored in
chunks (see ``checks.unit_chunks``) so that temporaries stay bounded, and
the result does not depend on the chunking.  The streaming forms (from image
and text embeddings) compute blocks of P, binarised where needed, on the fly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING
from typing import Any

from mammo_dissect.core.errors import SimilarityError
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.types import SimilarityFunction
from mammo_dissect.plugins.similarity import checks
from mammo_dissect.plugins.similarity import streaming
from mammo_dissect.plugins.similarity.cosine import normalise_columns


if TYPE_CHECKING:
    import torch


#: Largest input torch.quantile accepts (torch 2.x raises above 2^24 elements).
QUANTILE_MAX_ELEMENTS = 1 << 24

def _prepare(P: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    checks.check_matrix_shapes(P, A)
    checks.check_finite(P, A)
    P = P.float()
    A = A.to(device=P.device, dtype=torch.float32)
    return P, A


def _check_threshold(threshold: float) -> None:
    import math

    if not math.isfinite(threshold):
        raise SimilarityError(f"threshold={threshold} is invalid; it must be a finite number, for example 0.5")


def concept_labels(P: torch.Tensor, threshold: float) -> torch.Tensor:
    """Return P >= threshold as float32 labels (1 where the concept is present)."""
    import torch

    return (P >= threshold).to(torch.float32)


def centred_unit_columns(matrix: torch.Tensor) -> torch.Tensor:
    """Centre each column over images and scale it to unit norm; constant columns become zero.

    A constant column is detected exactly (maximum equals minimum) because
    subtracting a rounded mean leaves float noise that normalisation would
    blow up to a meaningless direction.
    """
    import torch

    centred = matrix - matrix.mean(dim=0, keepdim=True)
    constant = matrix.amax(dim=0, keepdim=True) == matrix.amin(dim=0, keepdim=True)
    centred = torch.where(constant, torch.zeros_like(centred), centred)
    return normalise_columns(centred)


def correlation(P: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Compute S [K x M], the Pearson correlation of each unit's activations with each concept column.

    Values lie in [-1, 1].  A constant unit or concept column (zero variance)
    scores 0 against everything, where Pearson's formula divides 0 by 0.
    """
    import torch

    P, A = _prepare(P, A)
    concepts = centred_unit_columns(P)
    scores = torch.empty(A.shape[1], P.shape[1], device=P.device, dtype=torch.float32)
    for units in checks.unit_chunks(A.shape[1], A.shape[0]):
        scores[units] = centred_unit_columns(A[:, units]).T @ concepts
    return scores


def _average_precision_chunk(labels: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    import torch

    n_images = activations.shape[0]
    sorted_activations, order = torch.sort(activations, dim=0, descending=True, stable=True)
    ranked_labels = labels[order]  # [N x units x M], row r = image with the r-th largest activation
    true_positives = ranked_labels.cumsum(dim=0)

    # Images with equal activations pass a threshold together: each position
    # takes the precision at the last position of its run of equal values.
    positions = torch.arange(n_images, device=activations.device).view(n_images, 1).expand_as(sorted_activations)
    ends_run = torch.ones_like(sorted_activations, dtype=torch.bool)
    ends_run[:-1] = sorted_activations[:-1] != sorted_activations[1:]
    run_end = torch.where(ends_run, positions, torch.full_like(positions, n_images))
    run_end = run_end.flip(0).cummin(dim=0).values.flip(0)  # [N x units]

    index = run_end.unsqueeze(2).expand_as(true_positives)
    precision = torch.gather(true_positives, 0, index) / (index + 1).to(torch.float32)
    positives = labels.sum(dim=0)  # [M]
    summed = (ranked_labels * precision).sum(dim=0)  # [units x M]
    safe_positives = torch.where(positives > 0, positives, torch.ones_like(positives))
    return torch.where(positives > 0, summed / safe_positives, torch.zeros_like(summed))


def auprc(P: torch.Tensor, A: torch.Tensor, *, threshold: float = 0.5) -> torch.Tensor:
    """Compute S [K x M], the average precision of each unit's activations for each concept's labels.

    Values lie in [0, 1]; a unit unrelated to concept m scores about the
    concept's prevalence, and a constant unit scores exactly that.  A concept
    present on no image scores 0.
    """
    import torch

    _check_threshold(threshold)
    P, A = _prepare(P, A)
    labels = concept_labels(P, threshold)
    scores = torch.empty(A.shape[1], P.shape[1], device=P.device, dtype=torch.float32)
    for units in checks.unit_chunks(A.shape[1], A.shape[0] * max(1, P.shape[1])):
        scores[units] = _average_precision_chunk(labels, A[:, units])
    return scores


def _check_quantile(quantile: float) -> None:
    if not 0.0 <= quantile < 1.0:
        raise SimilarityError(
            f"quantile={quantile} is invalid; it must be in [0, 1), for example 0.995 to mark "
            f"the top 0.5% of each unit's activations as active"
        )


def _overlap_counts(
    P: torch.Tensor, A: torch.Tensor, quantile: float, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return |active and present| [K x M], |active| [K x 1] and |present| [1 x M]."""
    import torch

    labels = concept_labels(P, threshold)
    present = labels.sum(dim=0, keepdim=True)
    overlap = torch.empty(A.shape[1], P.shape[1], device=P.device, dtype=torch.float32)
    active_count = torch.empty(A.shape[1], 1, device=P.device, dtype=torch.float32)
    for units in checks.unit_chunks(A.shape[1], A.shape[0]):
        chunk = A[:, units]
        cutoff = torch.quantile(chunk, quantile, dim=0, keepdim=True)
        active = (chunk > cutoff).to(torch.float32)
        overlap[units] = active.T @ labels
        active_count[units] = active.sum(dim=0).unsqueeze(1)
    return overlap, active_count, present


def iou(P: torch.Tensor, A: torch.Tensor, *, quantile: float = 0.995, threshold: float = 0.5) -> torch.Tensor:
    """Compute S [K x M], the intersection over union of each unit's active images and each concept's images.

    A unit is active on the images where its activation is strictly above
    its ``quantile`` over the probe images (linear interpolation), so a
    constant unit is active nowhere.  Values lie in [0, 1]; an empty union
    scores 0.
    """
    _check_quantile(quantile)
    _check_threshold(threshold)
    P, A = _prepare(P, A)
    return _iou_from_counts(*_overlap_counts(P, A, quantile, threshold))


def _iou_from_counts(overlap: torch.Tensor, active_count: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    import torch

    union = active_count + present - overlap
    return torch.where(union > 0, overlap / union.clamp(min=1.0), torch.zeros_like(overlap))


def f1(P: torch.Tensor, A: torch.Tensor, *, quantile: float = 0.995, threshold: float = 0.5) -> torch.Tensor:
    """Compute S [K x M], the F1 score of each unit's active images as a detector of each concept.

    Active images are defined as in :func:`iou`.  Values lie in [0, 1]; a
    unit active nowhere, paired with a concept present nowhere, scores 0.
    """
    _check_quantile(quantile)
    _check_threshold(threshold)
    P, A = _prepare(P, A)
    return _f1_from_counts(*_overlap_counts(P, A, quantile, threshold))


def _f1_from_counts(overlap: torch.Tensor, active_count: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    import torch

    total = active_count + present
    return torch.where(total > 0, 2.0 * overlap / total.clamp(min=1.0), torch.zeros_like(overlap))


# ---------------------------------------------------------------- streaming forms


def stream_correlation(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, A: torch.Tensor, budget_bytes: int
) -> torch.Tensor:
    """Compute :func:`correlation` from embeddings: a pass for the column means, then one for the sums."""
    import torch

    source = streaming.prepare_source(image_embeddings, text_embeddings, A, budget_bytes)
    scores = torch.empty(A.shape[1], source.n_concepts, device=source.device, dtype=torch.float32)
    for sums in streaming.column_products(source, A, budget_bytes, transform="centre"):
        unit_norms = sums.unit_squares.sqrt()
        concept_norms = sums.concept_squares.sqrt()
        unit_zero = sums.unit_constant | (unit_norms == 0)
        concept_zero = sums.concept_constant | (concept_norms == 0)
        unit_norms = torch.where(unit_zero, torch.ones_like(unit_norms), unit_norms)
        concept_norms = torch.where(concept_zero, torch.ones_like(concept_norms), concept_norms)
        block = sums.cross / unit_norms.unsqueeze(1) / concept_norms.unsqueeze(0)
        zero = unit_zero.unsqueeze(1) | concept_zero.unsqueeze(0)
        scores[sums.units] = torch.where(zero, torch.zeros_like(block), block).float()
    return scores


def _stream_labels(
    source: streaming.EmbeddingSource, concepts: slice, threshold: float, budget_bytes: int
) -> torch.Tensor:
    """Return the labels P[:, concepts] >= threshold [N x concepts] as float32, computed a block of images at a time."""
    import torch

    width = concepts.stop - concepts.start
    labels = torch.empty(source.n_images, width, device=source.device, dtype=torch.float32)
    row_bytes = source.image_row_bytes + 2 * streaming.FLOAT_BYTES * width
    rows_per_chunk = streaming.chunk_length(budget_bytes, row_bytes, source.n_images)
    for images in streaming.chunks(source.n_images, rows_per_chunk):
        labels[images] = concept_labels(source.rows(images, concepts), threshold)
    return labels


def stream_auprc(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    A: torch.Tensor,
    budget_bytes: int,
    *,
    threshold: float = 0.5,
) -> torch.Tensor:
    """Compute :func:`auprc` from embeddings, binarising P a block of concepts at a time.

    NOTE: the work is O(N x K x M) as in the full-P path; a small budget
    adds passes over the image embeddings, one per block of concepts.
    """
    import torch

    _check_threshold(threshold)
    source = streaming.prepare_source(image_embeddings, text_embeddings, A, budget_bytes)
    n_images, n_units = A.shape
    n_concepts = source.n_concepts
    budget = max(1, budget_bytes - source.fixed_bytes)

    # Per (image, unit, concept) the ranking keeps about 10 float32-sized temporaries
    # (ranked labels, cumsum, gathered precision and an int64 index); per (image, unit)
    # the sort and the run bounds about 12.
    element_bytes = 10 * streaming.FLOAT_BYTES
    unit_image_bytes = 12 * streaming.FLOAT_BYTES
    concepts_per_chunk = streaming.chunk_length(
        budget, n_images * (element_bytes + streaming.FLOAT_BYTES) + n_images * unit_image_bytes, n_concepts
    )
    scores = torch.empty(n_units, n_concepts, device=source.device, dtype=torch.float32)
    for concepts in streaming.chunks(n_concepts, concepts_per_chunk):
        width = concepts.stop - concepts.start
        labels = _stream_labels(source, concepts, threshold, budget)
        remaining = max(1, budget - streaming.FLOAT_BYTES * n_images * width)
        units_per_chunk = streaming.chunk_length(remaining, n_images * (element_bytes * width + unit_image_bytes), n_units)
        for units in streaming.chunks(n_units, units_per_chunk):
            activations = A[:, units].to(device=source.device, dtype=torch.float32)
            scores[units, concepts] = _average_precision_chunk(labels, activations)
        del labels
    return scores


def _stream_overlap_counts(
    source: streaming.EmbeddingSource, A: torch.Tensor, quantile: float, threshold: float, budget_bytes: int
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (units, overlap, active count, present count) per chunk of units, as :func:`_overlap_counts`."""
    import torch

    n_images, n_units = A.shape
    n_concepts = source.n_concepts
    # Per unit: its column for torch.quantile (a copy and a sorted copy) and the overlap sums.
    unit_bytes = 3 * streaming.FLOAT_BYTES * n_images + 2 * streaming.FLOAT_BYTES * n_concepts
    units_per_chunk = streaming.chunk_length(budget_bytes // 2, unit_bytes, n_units)
    # torch.quantile accepts at most 2^24 elements.
    units_per_chunk = max(1, min(units_per_chunk, QUANTILE_MAX_ELEMENTS // max(1, n_images)))
    for units in streaming.chunks(n_units, units_per_chunk):
        width = units.stop - units.start
        activations = A[:, units].to(device=source.device, dtype=torch.float32)
        cutoff = torch.quantile(activations, quantile, dim=0, keepdim=True)
        del activations
        row_bytes = source.image_row_bytes + streaming.FLOAT_BYTES * (3 * n_concepts + 3 * width)
        rows_per_chunk = streaming.chunk_length(budget_bytes // 2, row_bytes, n_images)
        overlap = torch.zeros(width, n_concepts, device=source.device, dtype=torch.float32)
        active_count = torch.zeros(width, 1, device=source.device, dtype=torch.float32)
        present = torch.zeros(1, n_concepts, device=source.device, dtype=torch.float32)
        for images in streaming.chunks(n_images, rows_per_chunk):
            labels = concept_labels(source.rows(images), threshold)
            active = (A[images, units].to(device=source.device, dtype=torch.float32) > cutoff).to(torch.float32)
            # Counts are integers below 2^24, so float32 sums are exact and equal the full-P path's.
            overlap += active.T @ labels
            active_count += active.sum(dim=0).unsqueeze(1)
            present += labels.sum(dim=0, keepdim=True)
        yield units, overlap, active_count, present


def _stream_counts_score(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    A: torch.Tensor,
    budget_bytes: int,
    quantile: float,
    threshold: float,
    score_from_counts: Any,
) -> torch.Tensor:
    import torch

    _check_quantile(quantile)
    _check_threshold(threshold)
    source = streaming.prepare_source(image_embeddings, text_embeddings, A, budget_bytes)
    budget = max(1, budget_bytes - source.fixed_bytes)
    scores = torch.empty(A.shape[1], source.n_concepts, device=source.device, dtype=torch.float32)
    for units, overlap, active_count, present in _stream_overlap_counts(source, A, quantile, threshold, budget):
        scores[units] = score_from_counts(overlap, active_count, present)
    return scores


def stream_iou(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    A: torch.Tensor,
    budget_bytes: int,
    *,
    quantile: float = 0.995,
    threshold: float = 0.5,
) -> torch.Tensor:
    """Compute :func:`iou` from embeddings, counting overlaps over blocks of images."""
    return _stream_counts_score(
        image_embeddings, text_embeddings, A, budget_bytes, quantile, threshold, _iou_from_counts
    )


def stream_f1(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    A: torch.Tensor,
    budget_bytes: int,
    *,
    quantile: float = 0.995,
    threshold: float = 0.5,
) -> torch.Tensor:
    """Compute :func:`f1` from embeddings, counting overlaps over blocks of images."""
    return _stream_counts_score(
        image_embeddings, text_embeddings, A, budget_bytes, quantile, threshold, _f1_from_counts
    )


@hookimpl
def register_similarity_functions(register: Any) -> None:
    register(
        SimilarityFunction(
            name="correlation",
            fn=correlation,
            stream_fn=stream_correlation,
            description="Pearson correlation of each unit's activations with each concept's column of P",
            value_range="[-1, 1]; 0 for a constant activation or concept column",
        )
    )
    register(
        SimilarityFunction(
            name="auprc",
            fn=auprc,
            stream_fn=stream_auprc,
            description="average precision of a unit's activations for images with P >= threshold",
            value_range="[0, 1]; an unrelated unit scores about the concept's prevalence",
        )
    )
    register(
        SimilarityFunction(
            name="iou",
            fn=iou,
            stream_fn=stream_iou,
            description="IoU of a unit's top-quantile images with the images where P >= threshold",
            value_range="[0, 1]",
        )
    )
    register(
        SimilarityFunction(
            name="f1",
            fn=f1,
            stream_fn=stream_f1,
            description="F1 of a unit's top-quantile images as a detector of the images where P >= threshold",
            value_range="[0, 1]",
        )
    )

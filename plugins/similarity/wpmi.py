"""Weighted pointwise mutual information scores of CLIP-Dissect: ``soft_wpmi`` and ``wpmi``.

Both follow Oikarinen & Weng, "CLIP-Dissect" (ICLR 2023), with that paper's
code defaults.  With Q = softmax(a * P) over concepts and topk_k the indices
of unit k's ``top_k`` most activating images (descending):

* soft_wpmi: L[k, m] = sum_j log(p_j * Q[topk_k[j], m] + (1 - p_j) + min_prob),
  where p_j falls linearly from ``p_start`` to ``p_end`` over the ranks;
* wpmi: L[k, m] = sum_j log(Q[topk_k[j], m] + min_prob);

and in both S[k, m] = L[k, m] - lam * (logsumexp_k L[k, m] - log K).  The
second term normalises over all K units passed in one call, so a layer must
be scored whole.  The streaming forms (from image and text embeddings)
compute L a chunk of units and images at a time and normalise over all
units only at the end, so their chunking does not change S.  Scores are log-probability ratios, comparable only within
one setup (same concept set, dissector and probe set).  Since L[k, m] is at
most logsumexp_k L[k, m], soft_wpmi's default lam = 1 caps every score at
ln K, and units whose top images all carry one concept sit near that cap.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING
from typing import Any

from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.types import SimilarityFunction
from mammo_dissect.plugins.similarity import checks
from mammo_dissect.plugins.similarity import streaming
from mammo_dissect.plugins.similarity.checks import check_finite
from mammo_dissect.plugins.similarity.checks import check_shapes


if TYPE_CHECKING:
    import torch


SOFT_WPMI_RANGE = (
    "log-probability ratio, not bounded below; at most ln K (K = units of the layer) when lam = 1, "
    "so values above 1 are normal; comparable only within one concept set, dissector and probe set"
)
WPMI_RANGE = (
    "sum of log-probabilities minus lam times a log prior, not bounded below; comparable only "
    "within one concept set, dissector and probe set"
)


def _normalise_over_units(log_likelihood: torch.Tensor, lam: float) -> torch.Tensor:
    import torch

    n_units = log_likelihood.shape[0]
    log_prior = torch.logsumexp(log_likelihood, dim=0, keepdim=True) - math.log(n_units)
    return log_likelihood - lam * log_prior


def _concept_probabilities_and_top_images(
    P: torch.Tensor, A: torch.Tensor, top_k: int, a: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the inputs; return Q = softmax(a * P) over concepts and each unit's top images [top_k x K]."""
    import torch

    check_shapes(P, A, top_k)
    check_finite(P, A)
    P = P.float()
    A = A.to(device=P.device, dtype=torch.float32)
    return torch.softmax(a * P, dim=1), torch.topk(A, k=top_k, dim=0).indices


def soft_wpmi(
    P: torch.Tensor,
    A: torch.Tensor,
    *,
    top_k: int = 100,
    a: float = 10.0,
    lam: float = 1.0,
    min_prob: float = 1e-7,
    p_start: float = 0.998,
    p_end: float = 0.97,
) -> torch.Tensor:
    """Compute soft-WPMI scores S [K x M] from P [N x M] and A [N x K]."""
    import torch

    probabilities, top_images = _concept_probabilities_and_top_images(P, A, top_k, a)
    ranks = torch.arange(top_k, device=P.device, dtype=torch.float32)
    weights = p_start - ranks / top_k * (p_start - p_end)
    log_likelihood = torch.zeros(A.shape[1], P.shape[1], device=P.device, dtype=torch.float32)
    # One rank at a time: peak extra memory is K x M, never top_k x K x M.
    for rank in range(top_k):
        rows = probabilities[top_images[rank]]  # [K x M]
        weight = weights[rank]
        log_likelihood += torch.log(weight * rows + (1.0 - weight) + min_prob)
    return _normalise_over_units(log_likelihood, lam)


def wpmi(
    P: torch.Tensor,
    A: torch.Tensor,
    *,
    top_k: int = 28,
    a: float = 2.0,
    lam: float = 0.6,
    min_prob: float = 1e-7,
) -> torch.Tensor:
    """Compute WPMI scores S [K x M] from P [N x M] and A [N x K]."""
    import torch

    probabilities, top_images = _concept_probabilities_and_top_images(P, A, top_k, a)
    log_likelihood = torch.zeros(A.shape[1], P.shape[1], device=P.device, dtype=torch.float32)
    for rank in range(top_k):
        log_likelihood += torch.log(probabilities[top_images[rank]] + min_prob)
    return _normalise_over_units(log_likelihood, lam)


def _top_images_by_unit_chunks(A: torch.Tensor, top_k: int, budget_bytes: int, device: torch.device) -> torch.Tensor:
    """Return the indices of each unit's top_k images [top_k x K], selecting a chunk of units at a time."""
    import torch

    n_images, n_units = A.shape
    # A float32 copy of the chunk, topk's working copy and its outputs: about 16 bytes per element.
    units_per_chunk = streaming.chunk_length(budget_bytes, 16 * n_images, n_units)
    top_images = torch.empty(top_k, n_units, dtype=torch.long, device=device)
    for units in streaming.chunks(n_units, units_per_chunk):
        activations = A[:, units].to(device=device, dtype=torch.float32)
        top_images[:, units] = torch.topk(activations, k=top_k, dim=0).indices
    return top_images


#: Elements of one step's temporaries in :func:`stream_log_likelihood` (about 4 MB of float32).
#: Steps this small stay in cache; one step over all pairs measured slower.
PAIR_STEP_ELEMENTS = 1 << 20


def stream_log_likelihood(
    source: streaming.EmbeddingSource,
    top_images: torch.Tensor,
    weights: torch.Tensor | None,
    a: float,
    min_prob: float,
    budget_bytes: int,
) -> torch.Tensor:
    """Return L [K x M] = sum over each unit's top images of log(w * Q + (1 - w) + min_prob).

    ``top_images`` is [top_k x K]; ``weights`` [top_k] gives w per rank, or
    None for w = 1 (wpmi).  Q = softmax(a * P) over concepts needs the full
    row of P for each top image, so only the rows of top images are
    computed.  The (rank, unit) pairs are taken in rank order, in segments
    as long as the budget allows, and each segment computes the rows of its
    distinct images once.  Each unit's terms are therefore added in rank
    order, the full-P path's order of summation: float32 sums of 100 terms
    of about -3 differ by about 1e-4 when added in another order.
    """
    import torch

    top_k, n_units = top_images.shape
    n_concepts = source.n_concepts
    # Pair r * K + k is (rank r, unit k).
    pair_images = top_images.reshape(-1)
    pair_units = torch.arange(n_units, device=source.device).repeat(top_k)
    pair_ranks = torch.arange(top_k, device=source.device).repeat_interleave(n_units)
    n_pairs = pair_images.numel()

    step_pairs = max(1, PAIR_STEP_ELEMENTS // max(1, n_concepts))
    # One step: a block of P rows, a * P and softmax output while Q is built, or the
    # gathered rows and two log temporaries while terms are added.
    step_bytes = 4 * streaming.FLOAT_BYTES * min(step_pairs, n_pairs) * n_concepts
    # Per pair of a segment, at most one distinct image, whose Q row is kept.
    image_bytes = streaming.FLOAT_BYTES * n_concepts
    pairs_per_segment = streaming.chunk_length(budget_bytes - step_bytes, image_bytes, n_pairs)

    log_likelihood = torch.zeros(n_units, n_concepts, device=source.device, dtype=torch.float32)
    for segment in streaming.chunks(n_pairs, pairs_per_segment):
        images, segment_rows = torch.unique(pair_images[segment], return_inverse=True)
        probabilities = torch.empty(images.numel(), n_concepts, device=source.device, dtype=torch.float32)
        for block in streaming.chunks(images.numel(), step_pairs):
            probabilities[block] = torch.softmax(a * source.rows(images[block]), dim=1)
        for step in streaming.chunks(segment.stop - segment.start, step_pairs):
            pairs = slice(segment.start + step.start, segment.start + step.stop)
            gathered = torch.index_select(probabilities, 0, segment_rows[step])  # [pairs x M]
            if weights is None:
                terms = torch.log(gathered + min_prob)
            else:
                weight = weights[pair_ranks[pairs]].unsqueeze(1)
                terms = torch.log(weight * gathered + (1.0 - weight) + min_prob)
            log_likelihood.index_add_(0, pair_units[pairs], terms)
        del probabilities
    return log_likelihood


def normalise_over_units_in_place(log_likelihood: torch.Tensor, lam: float, budget_bytes: int) -> torch.Tensor:
    """Subtract lam * (logsumexp over ALL units - log K) from L [K x M], a chunk of concepts at a time.

    Each concept's column is normalised over every unit of the layer, so
    the result equals :func:`_normalise_over_units` on the whole L.
    """
    import torch

    n_units, n_concepts = log_likelihood.shape
    # logsumexp keeps a few [K x concepts] float32 temporaries.
    concepts_per_chunk = streaming.chunk_length(budget_bytes, 4 * streaming.FLOAT_BYTES * n_units, n_concepts)
    for concepts in streaming.chunks(n_concepts, concepts_per_chunk):
        block = log_likelihood[:, concepts]
        log_prior = torch.logsumexp(block, dim=0, keepdim=True) - math.log(n_units)
        log_likelihood[:, concepts] = block - lam * log_prior
    return log_likelihood


def _stream_wpmi_scores(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    A: torch.Tensor,
    budget_bytes: int,
    top_k: int,
    a: float,
    lam: float,
    min_prob: float,
    weights_of: Any,
) -> torch.Tensor:
    import torch

    checks.check_top_k(A.shape[0], top_k)
    source = streaming.prepare_source(image_embeddings, text_embeddings, A, budget_bytes)
    budget = max(1, budget_bytes - source.fixed_bytes)
    top_images = _top_images_by_unit_chunks(A, top_k, budget, source.device)
    weights = None
    if weights_of is not None:
        weights = weights_of(torch.arange(top_k, device=source.device, dtype=torch.float32))
    log_likelihood = stream_log_likelihood(source, top_images, weights, a, min_prob, budget)
    return normalise_over_units_in_place(log_likelihood, lam, budget)


def stream_soft_wpmi(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    A: torch.Tensor,
    budget_bytes: int,
    *,
    top_k: int = 100,
    a: float = 10.0,
    lam: float = 1.0,
    min_prob: float = 1e-7,
    p_start: float = 0.998,
    p_end: float = 0.97,
) -> torch.Tensor:
    """Compute :func:`soft_wpmi` from embeddings, computing P rows only for each unit's top images."""

    def rank_weights(ranks: torch.Tensor) -> torch.Tensor:
        return p_start - ranks / top_k * (p_start - p_end)

    return _stream_wpmi_scores(
        image_embeddings, text_embeddings, A, budget_bytes, top_k, a, lam, min_prob, rank_weights
    )


def stream_wpmi(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    A: torch.Tensor,
    budget_bytes: int,
    *,
    top_k: int = 28,
    a: float = 2.0,
    lam: float = 0.6,
    min_prob: float = 1e-7,
) -> torch.Tensor:
    """Compute :func:`wpmi` from embeddings, computing P rows only for each unit's top images."""
    return _stream_wpmi_scores(image_embeddings, text_embeddings, A, budget_bytes, top_k, a, lam, min_prob, None)


def _top_k_needed(params: dict[str, Any]) -> int:
    return int(params["top_k"])


@hookimpl
def register_similarity_functions(register: Any) -> None:
    register(
        SimilarityFunction(
            name="soft_wpmi",
            fn=soft_wpmi,
            stream_fn=stream_soft_wpmi,
            description="soft weighted pointwise mutual information (CLIP-Dissect default)",
            value_range=SOFT_WPMI_RANGE,
            min_images=_top_k_needed,
        )
    )
    register(
        SimilarityFunction(
            name="wpmi",
            fn=wpmi,
            stream_fn=stream_wpmi,
            description="weighted pointwise mutual information over each unit's top images",
            value_range=WPMI_RANGE,
            min_images=_top_k_needed,
        )
    )

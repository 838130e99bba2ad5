"""Weighted pointwise mutual information scores of CLIP-Dissect: ``soft_wpmi`` and ``wpmi``.

Both follow Oikarinen & Weng, "CLIP-Dissect" (ICLR 2023), with that paper's
code defaults.  With Q = softmax(a * P) over concepts and topk_k the indices
of unit k's ``top_k`` most activating images (descending):

* soft_wpmi: L[k, m] = sum_j log(p_j * Q[topk_k[j], m] + (1 - p_j) + min_prob),
  where p_j falls linearly from ``p_start`` to ``p_end`` over the ranks;
* wpmi: L[k, m] = sum_j log(Q[topk_k[j], m] + min_prob);

and in both S[k, m] = L[k, m] - lam * (logsumexp_k L[k, m] - log K).  The
second term normalises over all K units passed in one call, so a layer must
be scored whole.  Scores are log-probability ratios, comparable only within
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

    check_shapes(P, A, top_k)
    check_finite(P, A)
    P = P.float()
    A = A.to(device=P.device, dtype=torch.float32)
    probabilities = torch.softmax(a * P, dim=1)
    top_images = torch.topk(A, k=top_k, dim=0).indices  # [top_k x K]
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

    check_shapes(P, A, top_k)
    check_finite(P, A)
    P = P.float()
    A = A.to(device=P.device, dtype=torch.float32)
    probabilities = torch.softmax(a * P, dim=1)
    top_images = torch.topk(A, k=top_k, dim=0).indices
    log_likelihood = torch.zeros(A.shape[1], P.shape[1], device=P.device, dtype=torch.float32)
    for rank in range(top_k):
        log_likelihood += torch.log(probabilities[top_images[rank]] + min_prob)
    return _normalise_over_units(log_likelihood, lam)


def _top_k_needed(params: dict[str, Any]) -> int:
    return int(params["top_k"])


@hookimpl
def register_similarity_functions(register: Any) -> None:
    register(
        SimilarityFunction(
            name="soft_wpmi",
            fn=soft_wpmi,
            description="soft weighted pointwise mutual information (CLIP-Dissect default)",
            value_range=SOFT_WPMI_RANGE,
            min_images=_top_k_needed,
        )
    )
    register(
        SimilarityFunction(
            name="wpmi",
            fn=wpmi,
            description="weighted pointwise mutual information over each unit's top images",
            value_range=WPMI_RANGE,
            min_images=_top_k_needed,
        )
    )

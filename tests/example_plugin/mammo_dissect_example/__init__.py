"""A third-party plugin: one similarity function and one concept set.

``top_mean_contrast`` scores a concept for a unit by how much higher the
concept's mean P is over the unit's ``top_k`` most activating images than
over all images.
"""

from __future__ import annotations

from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.types import ConceptSetSource
from mammo_dissect.core.types import SimilarityFunction


def top_mean_contrast(P, A, *, top_k: int = 5):
    import torch

    top_images = torch.topk(A, k=top_k, dim=0).indices  # [top_k x K]
    return P[top_images].mean(dim=0) - P.mean(dim=0, keepdim=True)


class LightConcepts(ConceptSetSource):
    name = "example-light"
    description = "brightness words and two distractors"

    def load(self, options, probe_set=None):
        return ["bright", "dark", "aircraft", "water"]


@hookimpl
def register_similarity_functions(register):
    register(
        SimilarityFunction(
            name="top_mean_contrast",
            fn=top_mean_contrast,
            description="mean P over a unit's top images minus mean P over all images",
            value_range="[-1, 1] for P in [0, 1]",
            min_images=lambda params: params["top_k"],
        )
    )


@hookimpl
def register_concept_sets(register):
    register(LightConcepts())

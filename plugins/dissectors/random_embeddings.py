"""The random dissector: seeded random image and concept embeddings, a null control.

Its P = I @ T.T carries no information about the images or the concepts, so
the labels it produces show what the pipeline does by chance: which concepts
win without evidence, and which validity a label reaches without evidence.
Image i's embedding depends only on the seed and i; a concept's embedding
depends only on the seed and the concept's text, so the same concept gets
the same embedding in every concept set.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

import numpy as np
from pydantic import Field

from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.types import EmbeddingDissector
from mammo_dissect.core.types import LoadedDissector
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import Runtime


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)


class RandomOptions(Options):
    """Options of the random dissector."""

    #: Seed of the embeddings; each seed is one independent null dissector.
    seed: int = Field(default=0, ge=0)
    #: Length of every embedding.
    dimension: int = Field(default=512, ge=1)


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def random_image_embeddings(seed: int, n_images: int, dimension: int) -> np.ndarray:
    """Return L2-normalised standard-normal embeddings [n_images x dimension] for ``seed``."""
    generator = np.random.default_rng([seed, 0])
    return _unit_rows(generator.standard_normal((n_images, dimension)))


def random_text_embeddings(seed: int, texts: Sequence[str], dimension: int) -> np.ndarray:
    """Return one L2-normalised standard-normal embedding per text, seeded by ``seed`` and the text."""
    rows = []
    for text in texts:
        digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
        rows.append(np.random.default_rng([seed, 1, digest]).standard_normal(dimension))
    return _unit_rows(np.array(rows, dtype=np.float64).reshape(len(rows), dimension))


class RandomEmbeddingDissector(EmbeddingDissector):
    """Seeded random embeddings; P is their cosine, independent of images and concepts."""

    name = "random"
    description = "seeded random image and concept embeddings (a null control with no information)"
    Options = RandomOptions

    def load(self, options: Options) -> LoadedDissector:
        """Raise, because the random dissector has no model; use :meth:`embeddings`."""
        raise NotImplementedError("the random dissector has no model; call embeddings() or image_concept_matrix()")

    def embeddings(
        self,
        options: Options,
        probe_set: ProbeSet,
        concepts: Sequence[str],
        runtime: Runtime,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return random image embeddings [N x D] and concept embeddings [M x D], rows of length 1."""
        import torch

        assert isinstance(options, RandomOptions)
        images = random_image_embeddings(options.seed, len(probe_set), options.dimension)
        texts = random_text_embeddings(options.seed, list(concepts), options.dimension)
        return torch.from_numpy(images.astype(np.float32)), torch.from_numpy(texts.astype(np.float32))

    def image_concept_matrix(
        self,
        options: Options,
        probe_set: ProbeSet,
        concepts: Sequence[str],
        runtime: Runtime,
    ) -> torch.Tensor:
        """Return P = I @ T.T of the random embeddings [N x M]."""
        images, texts = self.embeddings(options, probe_set, concepts, runtime)
        return images @ texts.T

    def describe(self, options: Options) -> dict[str, Any]:
        return {"plugin": self.name, "spec": "random", "options": options.model_dump(mode="json")}


@hookimpl
def register_dissectors(register: Any) -> None:
    register(RandomEmbeddingDissector())

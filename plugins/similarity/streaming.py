"""Blocks and rows of P computed on the fly from embeddings, for the streaming similarity path.

With image embeddings I [N x D] and text embeddings T [M x D], the
image-concept matrix is P = normalise(I) @ normalise(T).T, rows L2-normalised
as :func:`mammo_dissect.core.embedding.embed_and_compare` does.  A streaming
similarity function never builds P.  It gets the rows of chosen images, or
one block of images and concepts, from :class:`EmbeddingSource`.  It sizes
each block with :func:`chunk_length` so that its temporaries fit a memory
budget in bytes.

The budget covers memory a call allocates beyond its inputs (I, T, A) and
its output S [K x M].  Block sizes come from per-element byte estimates in
each function, so the budget is a target, not an allocator limit.
NOTE: soft_wpmi at N = 1,000,000, M = 20,000 measured 5% above a 1 GiB
budget (benchmarks/similarity.py).  A block always holds at least one
image, unit or concept, so a budget smaller than one row is exceeded by
that row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mammo_dissect.core.errors import SimilarityError


if TYPE_CHECKING:
    import torch


#: Bytes of one float32 element.
FLOAT_BYTES = 4

#: Minimum number of rows in one product of image and text embeddings (see ``rows_from_unit_images``).
MIN_PRODUCT_ROWS = 8


def chunk_length(budget_bytes: int, bytes_per_item: int, total: int) -> int:
    """Return how many items of ``bytes_per_item`` fit in ``budget_bytes``, between 1 and ``total``."""
    return max(1, min(max(total, 1), budget_bytes // max(1, bytes_per_item)))


def chunks(total: int, length: int) -> Iterator[slice]:
    """Yield consecutive slices of ``length`` items (the last may be shorter) covering ``range(total)``."""
    for start in range(0, total, length):
        yield slice(start, min(start + length, total))


def check_finite_rows(label: str, matrix: torch.Tensor, column_kind: str, rows_per_chunk: int) -> None:
    """Raise :class:`SimilarityError` naming the first positions of NaN or Inf, checking a row chunk at a time."""
    import torch

    count = 0
    positions: list[str] = []
    for rows in chunks(matrix.shape[0], rows_per_chunk):
        bad = ~torch.isfinite(matrix[rows])
        # count_nonzero, because sum() of a bool tensor makes an int64 copy of it.
        chunk_count = int(torch.count_nonzero(bad))
        if chunk_count == 0:
            continue
        count += chunk_count
        if len(positions) < 5:
            found_rows, found_columns = torch.nonzero(bad, as_tuple=True)
            for row, column in zip(found_rows[: 5 - len(positions)].tolist(), found_columns.tolist()):
                positions.append(f"(image {rows.start + int(row)}, {column_kind} {int(column)})")
    if count:
        raise SimilarityError(
            f"{label} contains {count} NaN or Inf value(s), first at {', '.join(positions)}; "
            f"check the model outputs for those images"
        )


def check_embedding_inputs(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, A: torch.Tensor, budget_bytes: int
) -> None:
    """Validate shapes and values of I [N x D], T [M x D] and A [N x K] before any compute."""
    shapes = (tuple(image_embeddings.shape), tuple(text_embeddings.shape), tuple(A.shape))
    if image_embeddings.ndim != 2 or text_embeddings.ndim != 2 or A.ndim != 2:
        raise SimilarityError(
            f"image_embeddings, text_embeddings and A must be 2-D, got shapes {shapes[0]}, {shapes[1]} "
            f"and {shapes[2]}"
        )
    if image_embeddings.shape[0] != A.shape[0]:
        raise SimilarityError(
            f"image_embeddings has {image_embeddings.shape[0]} images but A has {A.shape[0]}; "
            f"both must cover the same probe images"
        )
    if image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise SimilarityError(
            f"image_embeddings have dimension {image_embeddings.shape[1]} but text_embeddings have "
            f"{text_embeddings.shape[1]}; both must come from the same joint embedding space"
        )
    if text_embeddings.shape[0] == 0:
        raise SimilarityError("text_embeddings has no rows; the image-concept matrix needs at least one concept")

    for label, matrix, column_kind in (
        ("image_embeddings", image_embeddings, "dimension"),
        ("text_embeddings", text_embeddings, "dimension"),
        ("A", A, "unit"),
    ):
        # isfinite of float32 makes an abs() copy and bool masks: measured about 8 bytes per
        # element at peak (torch 2.14.1, CPU); 12 leaves room for a cast of other dtypes.
        rows = chunk_length(budget_bytes, 12 * max(1, matrix.shape[1]), matrix.shape[0])
        check_finite_rows(label, matrix, column_kind, rows)


class EmbeddingSource:
    """Compute rows and blocks of P = normalise(I) @ normalise(T).T on demand, in float32."""

    def __init__(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> None:
        import torch

        self.images = image_embeddings
        self.device = image_embeddings.device
        self.texts = torch.nn.functional.normalize(
            text_embeddings.to(device=self.device, dtype=torch.float32), dim=1
        )
        self.n_images = image_embeddings.shape[0]
        self.n_concepts = text_embeddings.shape[0]
        self.dim = image_embeddings.shape[1]

    @property
    def fixed_bytes(self) -> int:
        """Bytes held for the whole call: the normalised text embeddings."""
        return FLOAT_BYTES * self.n_concepts * self.dim

    @property
    def image_row_bytes(self) -> int:
        """Bytes of temporaries per image while normalising image embeddings (a copy and the result)."""
        return 2 * FLOAT_BYTES * self.dim

    def unit_images(self, images: slice | torch.Tensor) -> torch.Tensor:
        """Return the L2-normalised image embeddings of ``images`` (a slice or an index tensor)."""
        import torch

        rows = self.images[images].to(device=self.device, dtype=torch.float32)
        return torch.nn.functional.normalize(rows, dim=1)

    def rows(self, images: slice | torch.Tensor, concepts: slice | None = None) -> torch.Tensor:
        """Return P[images, concepts] [n x Mc] (all concepts when ``concepts`` is None)."""
        return self.rows_from_unit_images(self.unit_images(images), concepts)

    def rows_from_unit_images(self, unit_images: torch.Tensor, concepts: slice | None = None) -> torch.Tensor:
        """Return P rows for already normalised image embeddings [n x D]."""
        import torch

        texts = self.texts if concepts is None else self.texts[concepts]
        n_rows = unit_images.shape[0]
        if 0 < n_rows < MIN_PRODUCT_ROWS:
            # A product of 1 to 3 rows rounds differently from the full product, by about 1e-7
            # (measured with torch 2.14.1 and MKL on CPU).  Padding keeps each row bit-identical
            # to the same row of the full P there.
            padding = unit_images[:1].expand(MIN_PRODUCT_ROWS - n_rows, -1)
            return (torch.cat([unit_images, padding]) @ texts.T)[:n_rows]
        return unit_images @ texts.T

    def column_means(self, rows_per_chunk: int) -> torch.Tensor:
        """Return the mean of each column of P over images [M], in float64.

        The mean of P's column m is mean_i(normalise(I_i)) . normalise(T_m),
        so it needs only a sum of normalised image rows, not P itself.
        """
        import torch

        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        for images in chunks(self.n_images, rows_per_chunk):
            total += self.unit_images(images).double().sum(dim=0)
        return (self.texts.double() @ total) / self.n_images


@dataclass
class ColumnProducts:
    """Sums over all images for one chunk of units, from :func:`column_products`."""

    #: Unit indices these sums belong to.
    units: slice
    #: sum_i a'[i, k] * p'[i, m] [units x M], float64.
    cross: torch.Tensor
    #: sum_i a'[i, k]^2 [units], float64.
    unit_squares: torch.Tensor
    #: sum_i p'[i, m]^2 [M], float64.
    concept_squares: torch.Tensor
    #: Whether each unit's raw column is constant (max == min) [units].
    unit_constant: torch.Tensor
    #: Whether each concept's raw column is constant (max == min) [M].
    concept_constant: torch.Tensor


def column_products(
    source: EmbeddingSource, A: torch.Tensor, budget_bytes: int, transform: str
) -> Iterator[ColumnProducts]:
    """Yield, per chunk of units, the sums that cosine-type scores need over transformed columns.

    ``transform`` is applied to every column of A and of P before the sums:
    ``"none"`` leaves it as is, ``"centre"`` subtracts the column mean over
    images, and ``"centre_cube"`` subtracts the mean and cubes.  The means
    take one pass over images first, then each chunk of units takes one pass
    over image chunks that computes the blocks of P it needs.
    """
    import torch

    if transform not in ("none", "centre", "centre_cube"):
        raise ValueError(f"transform={transform!r} is invalid; use none, centre or centre_cube")
    n_images, n_units = A.shape
    n_concepts = source.n_concepts
    budget = max(1, budget_bytes - source.fixed_bytes - 8 * 8 * n_concepts)

    # Half the budget for the per-unit-chunk sums (float64 cross plus one float32 matmul result).
    units_per_chunk = chunk_length(budget // 2, 12 * n_concepts + 64, n_units)
    # The other half for one image chunk: embeddings, the P block and its transformed copies, A's block.
    row_bytes = source.image_row_bytes + FLOAT_BYTES * (4 * n_concepts + 4 * units_per_chunk)
    rows_per_chunk = chunk_length(budget // 2, row_bytes, n_images)

    centre = transform != "none"
    concept_means = unit_means = None
    if centre:
        concept_means = source.column_means(rows_per_chunk).float()
        unit_sums = torch.zeros(n_units, dtype=torch.float64, device=source.device)
        for images in chunks(n_images, rows_per_chunk):
            unit_sums += A[images].to(device=source.device, dtype=torch.float64).sum(dim=0)
        unit_means = (unit_sums / n_images).float()

    def transformed(block: torch.Tensor, means: torch.Tensor | None) -> torch.Tensor:
        if means is None:
            return block
        centred = block - means
        return centred**3 if transform == "centre_cube" else centred

    for units in chunks(n_units, units_per_chunk):
        width = units.stop - units.start
        cross = torch.zeros(width, n_concepts, dtype=torch.float64, device=source.device)
        unit_squares = torch.zeros(width, dtype=torch.float64, device=source.device)
        concept_squares = torch.zeros(n_concepts, dtype=torch.float64, device=source.device)
        unit_max = torch.full((width,), -math.inf, device=source.device)
        unit_min = torch.full((width,), math.inf, device=source.device)
        concept_max = torch.full((n_concepts,), -math.inf, device=source.device)
        concept_min = torch.full((n_concepts,), math.inf, device=source.device)
        for images in chunks(n_images, rows_per_chunk):
            block = source.rows(images)
            activations = A[images, units].to(device=source.device, dtype=torch.float32)
            if transform == "centre":
                concept_max = torch.maximum(concept_max, block.amax(dim=0))
                concept_min = torch.minimum(concept_min, block.amin(dim=0))
                unit_max = torch.maximum(unit_max, activations.amax(dim=0))
                unit_min = torch.minimum(unit_min, activations.amin(dim=0))
            block = transformed(block, concept_means)
            activations = transformed(activations, None if unit_means is None else unit_means[units])
            cross += (activations.T @ block).double()
            concept_squares += block.square().sum(dim=0).double()
            unit_squares += activations.square().sum(dim=0).double()
        yield ColumnProducts(
            units=units,
            cross=cross,
            unit_squares=unit_squares,
            concept_squares=concept_squares,
            unit_constant=unit_max == unit_min,
            concept_constant=concept_max == concept_min,
        )


def prepare_source(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, A: torch.Tensor, budget_bytes: int
) -> EmbeddingSource:
    """Validate the inputs of a streaming call and return the source of P's blocks."""
    check_embedding_inputs(image_embeddings, text_embeddings, A, budget_bytes)
    return EmbeddingSource(image_embeddings, text_embeddings)

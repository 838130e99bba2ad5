"""The streaming path of every similarity function: fn(None, A, image_embeddings=I, text_embeddings=T).

It must equal the full-P path on P = normalise(I) @ normalise(T).T, with
any memory budget: a budget of a few kilobytes forces many chunks of images,
units, concepts or pairs, and a budget of 1 byte one item per chunk.
"""

from __future__ import annotations

import math

import pytest
import torch

import mammo_dissect
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.errors import PluginError
from mammo_dissect.core.errors import SimilarityError
from mammo_dissect.core.types import SimilarityFunction
from mammo_dissect.plugins.similarity import streaming
from mammo_dissect.plugins.similarity import wpmi


NAMES = [
    "soft_wpmi",
    "wpmi",
    "cos_similarity",
    "cos_similarity_cubed",
    "rank_reorder",
    "correlation",
    "auprc",
    "iou",
    "f1",
]
#: Parameters that make the binarised scores non-trivial on cosines of about 0.4 to 0.9.
PARAMS = {
    "soft_wpmi": {"top_k": 20},
    "wpmi": {"top_k": 10},
    "auprc": {"threshold": 0.7},
    "iou": {"threshold": 0.7, "quantile": 0.8},
    "f1": {"threshold": 0.7, "quantile": 0.8},
}
#: Absolute tolerance per function; rank_reorder is compared relative to its scale instead.
TOLERANCE = {"soft_wpmi": 1e-4, "wpmi": 1e-4}
#: None: the default 1 GiB, one chunk.  4,000 bytes: a few images, units or concepts per chunk.
BUDGETS = [None, 4_000]


def embeddings(n_images: int = 240, n_concepts: int = 17, n_units: int = 9, dim: int = 12, seed: int = 0):
    """Return I, T and A; I and T share a direction so that all cosines are positive, like a dissector's."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(dim, generator=generator) * 2.0
    images = torch.randn(n_images, dim, generator=generator) + shared
    texts = torch.randn(n_concepts, dim, generator=generator) + shared
    activations = torch.rand(n_images, n_units, generator=generator)
    return images, texts, activations


def full_p(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(images, dim=1) @ torch.nn.functional.normalize(texts, dim=1).T


def assert_matches_full(name: str, streamed: torch.Tensor, full: torch.Tensor) -> None:
    assert streamed.shape == full.shape
    assert streamed.dtype == torch.float32
    if name == "rank_reorder":
        torch.testing.assert_close(streamed, full, rtol=1e-5, atol=0)
    else:
        torch.testing.assert_close(streamed, full, rtol=0, atol=TOLERANCE.get(name, 1e-5))


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", NAMES)
def test_streaming_matches_full_p(name, budget):
    images, texts, activations = embeddings()
    function = mammo_dissect.similarity_function(name)
    params = PARAMS.get(name, {})
    full = function(full_p(images, texts), activations, **params)
    streamed = function(
        None, activations, image_embeddings=images, text_embeddings=texts, memory_budget_bytes=budget, **params
    )
    assert_matches_full(name, streamed, full)


@pytest.mark.parametrize("name", NAMES)
def test_streaming_constant_columns_match(name):
    images, texts, activations = embeddings(seed=1)
    activations[:, 0] = 0.0
    activations[:, 1] = 0.5
    function = mammo_dissect.similarity_function(name)
    params = PARAMS.get(name, {})
    full = function(full_p(images, texts), activations, **params)
    streamed = function(
        None, activations, image_embeddings=images, text_embeddings=texts, memory_budget_bytes=4_000, **params
    )
    assert bool(torch.isfinite(streamed).all())
    if name in ("soft_wpmi", "wpmi", "rank_reorder"):
        # Which of the tied images a constant unit's top images are is unspecified; compare the other units.
        assert_matches_full(name, streamed[2:], full[2:])
    else:
        assert_matches_full(name, streamed, full)


def test_streaming_binary_scores_not_trivial():
    images, texts, activations = embeddings()
    P = full_p(images, texts)
    labels = P >= PARAMS["auprc"]["threshold"]
    assert 0.05 < float(labels.float().mean()) < 0.95


@pytest.mark.parametrize("name", ["soft_wpmi", "wpmi"])
def test_wpmi_unit_chunks_normalise_over_all_units(name, monkeypatch):
    # A budget of 1 byte selects top images one unit at a time and adds one
    # pair per segment.  The logsumexp over units must still cover all units.
    images, texts, activations = embeddings(n_units=13)
    function = mammo_dissect.similarity_function(name)
    params = PARAMS[name]
    one_call = function(None, activations, image_embeddings=images, text_embeddings=texts, **params)

    unit_chunk_sizes = []
    original = streaming.chunk_length

    def recording_chunk_length(budget_bytes: int, bytes_per_item: int, total: int) -> int:
        length = original(budget_bytes, bytes_per_item, total)
        if total == activations.shape[1]:
            unit_chunk_sizes.append(length)
        return length

    monkeypatch.setattr(streaming, "chunk_length", recording_chunk_length)
    chunked = function(None, activations, image_embeddings=images, text_embeddings=texts, memory_budget_bytes=1, **params)
    assert unit_chunk_sizes and max(unit_chunk_sizes) == 1
    torch.testing.assert_close(chunked, one_call, rtol=0, atol=1e-4)


def test_wpmi_normalising_unit_groups_separately_differs():
    # The invariant above can fail: normalising two groups of units on their own gives another S.
    images, texts, activations = embeddings(n_units=13)
    function = mammo_dissect.similarity_function("soft_wpmi")
    whole = function(None, activations, image_embeddings=images, text_embeddings=texts, top_k=20)
    parts = torch.cat(
        [
            function(None, activations[:, :6], image_embeddings=images, text_embeddings=texts, top_k=20),
            function(None, activations[:, 6:], image_embeddings=images, text_embeddings=texts, top_k=20),
        ]
    )
    assert float((parts - whole).abs().max()) > 1e-2


def test_wpmi_log_likelihood_in_unit_groups_then_normalised():
    # L may be computed for groups of units; normalising once over all of them gives the one-call S.
    images, texts, activations = embeddings(n_units=13)
    source = streaming.EmbeddingSource(images, texts)
    top_images = torch.topk(activations, k=10, dim=0).indices
    groups = [slice(0, 5), slice(5, 13)]
    log_likelihood = torch.cat(
        [wpmi.stream_log_likelihood(source, top_images[:, units], None, 2.0, 1e-7, 1 << 20) for units in groups]
    )
    S = wpmi.normalise_over_units_in_place(log_likelihood, 0.6, budget_bytes=1)
    expected = mammo_dissect.similarity_function("wpmi")(full_p(images, texts), activations, top_k=10)
    torch.testing.assert_close(S, expected, rtol=0, atol=1e-4)


def test_streaming_accepts_float64_and_unnormalised_rows():
    images, texts, activations = embeddings()
    function = mammo_dissect.similarity_function("cos_similarity")
    full = function(full_p(images, texts), activations)
    streamed = function(
        None, activations.double(), image_embeddings=images.double() * 7.0, text_embeddings=texts.double() * 0.1
    )
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- argument checks


def test_p_and_embeddings_together_rejected():
    images, texts, activations = embeddings()
    with pytest.raises(SimilarityError) as error:
        mammo_dissect.similarity_function("correlation")(
            full_p(images, texts), activations, image_embeddings=images, text_embeddings=texts
        )
    assert "got both P and embeddings" in str(error.value)


def test_missing_text_embeddings_rejected():
    images, _, activations = embeddings()
    with pytest.raises(SimilarityError) as error:
        mammo_dissect.similarity_function("correlation")(None, activations, image_embeddings=images)
    assert "text_embeddings is missing" in str(error.value)


def test_budget_with_full_p_rejected():
    images, texts, activations = embeddings()
    with pytest.raises(SimilarityError) as error:
        mammo_dissect.similarity_function("correlation")(full_p(images, texts), activations, memory_budget_bytes=1000)
    assert "memory_budget_bytes=1000 has no effect" in str(error.value)


@pytest.mark.parametrize("budget", [0, -5, 1.5, True])
def test_invalid_budget_rejected(budget):
    images, texts, activations = embeddings()
    with pytest.raises(SimilarityError) as error:
        mammo_dissect.similarity_function("correlation")(
            None, activations, image_embeddings=images, text_embeddings=texts, memory_budget_bytes=budget
        )
    assert "memory_budget_bytes" in str(error.value)


def test_streaming_unknown_parameter_rejected():
    images, texts, activations = embeddings()
    with pytest.raises(ConfigError) as error:
        mammo_dissect.similarity_function("soft_wpmi")(
            None, activations, image_embeddings=images, text_embeddings=texts, topk=3
        )
    assert "unknown parameter(s) topk" in str(error.value)


def test_streaming_too_few_images_rejected():
    images, texts, activations = embeddings(n_images=50)
    with pytest.raises(ConfigError) as error:
        mammo_dissect.similarity_function("soft_wpmi")(None, activations, image_embeddings=images, text_embeddings=texts)
    assert "needs at least 100 probe images" in str(error.value)


def test_embedding_row_mismatch_rejected():
    images, texts, activations = embeddings()
    with pytest.raises(SimilarityError) as error:
        mammo_dissect.similarity_function("cos_similarity")(
            None, activations[:-1], image_embeddings=images, text_embeddings=texts
        )
    assert "image_embeddings has 240 images but A has 239" in str(error.value)


def test_embedding_dimension_mismatch_rejected():
    images, texts, activations = embeddings()
    with pytest.raises(SimilarityError) as error:
        mammo_dissect.similarity_function("cos_similarity")(
            None, activations, image_embeddings=images, text_embeddings=texts[:, :-1]
        )
    assert "dimension 12 but text_embeddings have 11" in str(error.value)


def test_streaming_nan_position_reported():
    images, texts, activations = embeddings()
    images[37, 4] = math.nan
    with pytest.raises(SimilarityError) as error:
        mammo_dissect.similarity_function("soft_wpmi")(
            None, activations, image_embeddings=images, text_embeddings=texts, memory_budget_bytes=1, top_k=20
        )
    assert "image_embeddings contains 1 NaN or Inf value(s), first at (image 37, dimension 4)" in str(error.value)


def test_reserved_parameter_name_rejected():
    def scores(P, A, *, memory_budget_bytes: int = 1):
        return P

    with pytest.raises(PluginError) as error:
        SimilarityFunction(name="bad", fn=scores)
    assert "reserved parameter(s) memory_budget_bytes" in str(error.value)


def test_stream_fn_parameters_must_match():
    def scores(P, A, *, top_k: int = 3):
        return P

    def streamed(I, T, A, budget_bytes, *, top_k: int = 4):
        return I

    with pytest.raises(PluginError) as error:
        SimilarityFunction(name="bad", fn=scores, stream_fn=streamed)
    assert "same keyword-only parameters" in str(error.value)


def test_function_without_streaming_rejected():
    def scores(P, A):
        return P.T @ A

    images, texts, activations = embeddings()
    function = SimilarityFunction(name="plain", fn=scores)
    with pytest.raises(SimilarityError) as error:
        function(None, activations, image_embeddings=images, text_embeddings=texts)
    assert "has no streaming implementation" in str(error.value)


def test_every_registered_function_streams():
    for name in NAMES:
        assert mammo_dissect.similarity_function(name).stream_fn is not None, name


def test_chunk_length_bounds():
    assert streaming.chunk_length(100, 30, 7) == 3
    assert streaming.chunk_length(1, 30, 7) == 1
    assert streaming.chunk_length(10**9, 30, 7) == 7
    assert list(streaming.chunks(7, 3)) == [slice(0, 3), slice(3, 6), slice(6, 7)]

"""cos_similarity, cos_similarity_cubed, rank_reorder, correlation, auprc, iou and f1.

Checked against the CLIP-Dissect reference outputs where they exist, against
small computations written out by hand, and for their guards, parameter
checks and unit chunking.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.errors import SimilarityError
from mammo_dissect.core.types import SimilarityFunction
from mammo_dissect.plugins.similarity import checks
from mammo_dissect.plugins.similarity import cosine
from mammo_dissect.plugins.similarity import ground_truth_metrics
from mammo_dissect.plugins.similarity import rank_reorder as rank_reorder_module
from mammo_dissect.tests.shared_data import SHARED_DATA_ROOT
from mammo_dissect.tests.shared_data import running_in_ci


REFERENCE_DIR = SHARED_DATA_ROOT.parent / "reference" / "similarity"
NAMES = ["cos_similarity", "cos_similarity_cubed", "rank_reorder", "correlation", "auprc", "iou", "f1"]


def registered() -> dict[str, SimilarityFunction]:
    """Return the functions the three plugin modules register, by name."""
    functions: dict[str, SimilarityFunction] = {}

    def register(function: SimilarityFunction) -> None:
        functions[function.name] = function

    for module in (cosine, rank_reorder_module, ground_truth_metrics):
        module.register_similarity_functions(register)
    return functions


FUNCTIONS = registered()


def reference_cases() -> list:
    files = sorted(REFERENCE_DIR.glob("*.npz"))
    if not files:
        reason = f"reference outputs not found in {REFERENCE_DIR}"
        mark = pytest.mark.xfail(reason=reason, strict=True) if running_in_ci() else pytest.mark.skip(reason=reason)
        return [pytest.param(None, marks=mark, id="missing")]
    return [pytest.param(path, id=path.stem) for path in files]


def load_reference(path) -> tuple[torch.Tensor, torch.Tensor, np.lib.npyio.NpzFile]:
    data = np.load(path)
    return torch.from_numpy(data["P"]), torch.from_numpy(data["A"]), data


def top_image_ties(P: np.ndarray, A: np.ndarray, top_fraction: float = 0.05) -> np.ndarray:
    """Return [K x M]: whether concept m has tied values among unit k's top images."""
    n_top = int(top_fraction * P.shape[0])
    top_images = np.argsort(-A, axis=0, kind="stable")[:n_top]
    sorted_values = np.sort(P[top_images], axis=0)
    return (np.diff(sorted_values, axis=0) == 0).any(axis=0)


# ---------------------------------------------------------------- reference outputs


@pytest.mark.parametrize("name", ["cos_similarity", "cos_similarity_cubed"])
@pytest.mark.parametrize("path", reference_cases())
def test_cosine_matches_reference(path, name):
    P, A, data = load_reference(path)
    S = FUNCTIONS[name](P, A).numpy()
    expected = data[f"S_{name}"]
    assert np.abs(S - expected).max() < 1e-5
    assert (S.argmax(axis=1) == expected.argmax(axis=1)).all()


@pytest.mark.parametrize("path", reference_cases())
def test_rank_reorder_matches_reference_up_to_scale(path):
    # The reference divides each row by a random baseline and ranks tied
    # concept values in argsort order.  Here the baseline is exact and ties
    # share their mean rank, so rows off ties agree up to one positive factor.
    P, A, data = load_reference(path)
    S = FUNCTIONS["rank_reorder"](P, A).numpy().astype(np.float64)
    expected = data["S_rank_reorder"].astype(np.float64)
    ties = top_image_ties(data["P"], data["A"])
    assert ties.mean() < 0.01

    ratio = expected / S
    for unit in range(S.shape[0]):
        untied = ratio[unit][~ties[unit]]
        scale = np.median(untied)
        assert scale > 0
        assert np.abs(untied / scale - 1).max() < 1e-3, f"unit {unit}"


@pytest.mark.parametrize("path", reference_cases())
def test_rank_reorder_matches_reference_top_concepts(path):
    P, A, data = load_reference(path)
    S = FUNCTIONS["rank_reorder"](P, A).numpy()
    expected = data["S_rank_reorder"]
    ours = S.argmax(axis=1)
    theirs = expected.argmax(axis=1)
    for unit in np.nonzero(ours != theirs)[0]:
        # Allowed only at a near-tie of the two candidates in the reference row.
        gap = expected[unit, theirs[unit]] - expected[unit, ours[unit]]
        assert gap <= 1e-4 * abs(expected[unit, theirs[unit]]), f"unit {unit}"


# ---------------------------------------------------------------- common contract


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_dtype_device(name):
    generator = torch.Generator().manual_seed(1)
    P = torch.rand(120, 7, generator=generator, dtype=torch.float64)
    A = torch.rand(120, 5, generator=generator, dtype=torch.float64)
    S = FUNCTIONS[name](P, A)
    assert S.shape == (5, 7)
    assert S.dtype == torch.float32
    assert S.device == P.device


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter_rejected(name):
    with pytest.raises(ConfigError) as error:
        FUNCTIONS[name](torch.rand(120, 3), torch.rand(120, 2), topk=3)
    assert "unknown parameter(s) topk" in str(error.value)


@pytest.mark.parametrize("name", NAMES)
def test_constant_and_zero_columns_finite(name):
    generator = torch.Generator().manual_seed(2)
    P = (torch.rand(200, 6, generator=generator) < 0.3).float()
    P[:, 0] = 0.0
    P[:, 1] = 1.0
    A = torch.rand(200, 5, generator=generator)
    A[:, 0] = 0.0
    A[:, 1] = 0.7
    S = FUNCTIONS[name](P, A)
    assert bool(torch.isfinite(S).all())


@pytest.mark.parametrize("name", NAMES)
def test_nan_position_reported(name):
    A = torch.rand(120, 4)
    A[17, 2] = float("nan")
    with pytest.raises(SimilarityError) as error:
        FUNCTIONS[name](torch.rand(120, 3), A)
    assert "(image 17, unit 2)" in str(error.value)


@pytest.mark.parametrize("name", NAMES)
def test_image_count_mismatch(name):
    with pytest.raises(SimilarityError) as error:
        FUNCTIONS[name](torch.rand(120, 3), torch.rand(121, 4))
    assert "P has 120 images but A has 121" in str(error.value)


@pytest.mark.parametrize("name", NAMES)
def test_unit_split_matches_whole(name):
    generator = torch.Generator().manual_seed(3)
    P = (torch.rand(300, 9, generator=generator) < 0.2).float() * 0.6 + torch.rand(300, 9, generator=generator) * 0.1
    A = torch.rand(300, 11, generator=generator)
    whole = FUNCTIONS[name](P, A)
    parts = torch.cat([FUNCTIONS[name](P, A[:, :4]), FUNCTIONS[name](P, A[:, 4:])])
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_internal_chunking_matches_one_chunk(name, monkeypatch):
    generator = torch.Generator().manual_seed(4)
    P = (torch.rand(400, 9, generator=generator) < 0.2).float() * 0.6 + torch.rand(400, 9, generator=generator) * 0.1
    A = torch.rand(400, 13, generator=generator)
    one_chunk = FUNCTIONS[name](P, A)
    monkeypatch.setattr(checks, "MAX_CHUNK_ELEMENTS", 1)
    one_unit_per_chunk = FUNCTIONS[name](P, A)
    torch.testing.assert_close(one_unit_per_chunk, one_chunk, rtol=0, atol=1e-6)


def test_unit_chunks_cover_all_units(monkeypatch):
    monkeypatch.setattr(checks, "MAX_CHUNK_ELEMENTS", 100)
    chunks = list(checks.unit_chunks(n_units=7, elements_per_unit=30))
    assert chunks == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert list(checks.unit_chunks(n_units=2, elements_per_unit=1000)) == [slice(0, 1), slice(1, 2)]


# ---------------------------------------------------------------- cosine variants


def test_cos_similarity_zero_column_scores_zero():
    P = torch.rand(50, 3)
    P[:, 2] = 0.0
    A = torch.rand(50, 2)
    A[:, 0] = 0.0
    S = FUNCTIONS["cos_similarity"](P, A)
    assert bool((S[0] == 0).all())
    assert bool((S[:, 2] == 0).all())


def test_cos_similarity_hand_example():
    P = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    A = torch.tensor([[2.0], [2.0], [0.0]])
    S = FUNCTIONS["cos_similarity"](P, A)
    torch.testing.assert_close(S, torch.tensor([[1.0, 0.5]]))


def test_cos_similarity_cubed_constant_column_scores_zero():
    P = torch.rand(50, 3)
    P[:, 1] = 0.25
    A = torch.rand(50, 2)
    A[:, 1] = 3.0
    S = FUNCTIONS["cos_similarity_cubed"](P, A)
    assert bool((S[1] == 0).all())
    assert bool((S[:, 1] == 0).all())


def test_cos_similarity_cubed_hand_example():
    P = torch.tensor([[0.0], [0.0], [3.0]])  # centred: -1, -1, 2; cubed: -1, -1, 8
    A = torch.tensor([[1.0], [2.0], [3.0]])  # centred: -1, 0, 1; cubed: -1, 0, 1
    expected = (1.0 + 0.0 + 8.0) / (np.sqrt(66.0) * np.sqrt(2.0))
    S = FUNCTIONS["cos_similarity_cubed"](P, A)
    assert abs(float(S[0, 0]) - expected) < 1e-6


# ---------------------------------------------------------------- rank_reorder


def rank_reorder_by_loops(P: np.ndarray, A: np.ndarray, p: float, top_fraction: float, scale_p: float) -> np.ndarray:
    """Return rank_reorder written one unit and one concept at a time (no ties in P)."""
    n_top = int(top_fraction * P.shape[0])
    scores = np.zeros((A.shape[1], P.shape[1]))
    for unit in range(A.shape[1]):
        top_images = np.argsort(-A[:, unit], kind="stable")[:n_top]
        top = A[top_images, unit]
        ascending = np.sort(top)
        pairs = [abs(a - b) ** p for a, b in itertools.product(ascending, ascending)]
        baseline = sum(pairs) / len(pairs)
        for concept in range(P.shape[1]):
            values = P[top_images, concept]
            ranks = np.argsort(np.argsort(values))
            error = np.mean([abs(top[j] - ascending[ranks[j]]) ** p for j in range(n_top)])
            scores[unit, concept] = -(error / baseline) / values.mean() ** scale_p
    return scores


@pytest.mark.parametrize("params", [{}, {"p": 2.0, "top_fraction": 0.2, "scale_p": 1.0}])
def test_rank_reorder_matches_loops(params):
    generator = np.random.default_rng(5)
    P = generator.uniform(0.1, 0.3, size=(100, 6)).astype(np.float32)
    A = generator.uniform(0.0, 5.0, size=(100, 4)).astype(np.float32)
    resolved = FUNCTIONS["rank_reorder"].resolve_params(params)
    expected = rank_reorder_by_loops(P.astype(np.float64), A.astype(np.float64), **resolved)
    S = FUNCTIONS["rank_reorder"](torch.from_numpy(P), torch.from_numpy(A), **params).numpy()
    np.testing.assert_allclose(S, expected, rtol=1e-4)


def test_rank_reorder_perfect_concept_scores_zero():
    A = torch.linspace(0.0, 1.0, 40).unsqueeze(1)
    P = torch.stack([A[:, 0] * 2 + 1, torch.rand(40)], dim=1)
    S = FUNCTIONS["rank_reorder"](P, A, top_fraction=0.25)
    assert float(S[0, 0]) == 0.0
    assert float(S[0, 1]) < 0.0


def test_rank_reorder_tied_concept_uses_mean_rank():
    # A concept constant over the top images maps every image to the mean activation.
    A = torch.tensor([[4.0], [3.0], [1.0], [0.0]])
    P = torch.tensor([[1.0], [1.0], [1.0], [1.0]])
    S = FUNCTIONS["rank_reorder"](P, A, top_fraction=0.75, p=2.0)
    top = np.array([4.0, 3.0, 1.0])
    error = np.mean((top - top.mean()) ** 2)
    baseline = np.mean([(a - b) ** 2 for a, b in itertools.product(top, top)])
    assert abs(float(S[0, 0]) + error / baseline) < 1e-6


def test_rank_reorder_non_positive_mean_ranks_last():
    generator = torch.Generator().manual_seed(6)
    P = torch.rand(100, 5, generator=generator) + 0.1
    P[:, 3] = -0.2
    P[:, 4] = 0.0
    A = torch.rand(100, 3, generator=generator)
    S = FUNCTIONS["rank_reorder"](P, A)
    assert bool(torch.isfinite(S).all())
    lowest_valid = S[:, :3].min(dim=1).values
    torch.testing.assert_close(S[:, 3], lowest_valid - 1.0)
    torch.testing.assert_close(S[:, 4], lowest_valid - 1.0)


def test_rank_reorder_no_positive_mean_gives_minus_one():
    P = torch.zeros(40, 3)
    S = FUNCTIONS["rank_reorder"](P, torch.rand(40, 2))
    assert bool((S == -1.0).all())


def test_rank_reorder_constant_top_activations():
    # Baseline 0: the relative error is 1, so the score is -1 / mean^scale_p.
    A = torch.zeros(40, 1)
    P = torch.full((40, 2), 0.25)
    P[:, 1] = 0.04
    S = FUNCTIONS["rank_reorder"](P, A)
    torch.testing.assert_close(S, torch.tensor([[-2.0, -5.0]]))


def test_rank_reorder_too_few_images_config_error():
    with pytest.raises(ConfigError) as error:
        FUNCTIONS["rank_reorder"](torch.rand(19, 3), torch.rand(19, 2))
    assert "needs at least 20 probe images" in str(error.value)


def test_rank_reorder_too_few_images_direct_call():
    with pytest.raises(SimilarityError) as error:
        rank_reorder_module.rank_reorder(torch.rand(19, 3), torch.rand(19, 2))
    assert "needs at least 20 probe images, but there are 19" in str(error.value)


def test_rank_reorder_minimum_images():
    assert rank_reorder_module.minimum_images({"top_fraction": 0.05}) == 20
    assert rank_reorder_module.minimum_images({"top_fraction": 0.1}) == 10
    assert rank_reorder_module.minimum_images({"top_fraction": 1.0}) == 1
    FUNCTIONS["rank_reorder"](torch.rand(20, 3), torch.rand(20, 2))


@pytest.mark.parametrize("params", [{"top_fraction": 0.0}, {"top_fraction": 1.5}, {"p": 0.0}, {"scale_p": -1.0}])
def test_rank_reorder_invalid_parameters(params):
    with pytest.raises(SimilarityError):
        FUNCTIONS["rank_reorder"](torch.rand(100, 3), torch.rand(100, 2), **params)


# ---------------------------------------------------------------- correlation, auprc, iou, f1


def test_correlation_hand_example():
    A = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    P = torch.tensor([[0.0, 4.0, 1.0], [0.0, 3.0, 1.0], [1.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    # Centred A: -1.5, -0.5, 0.5, 1.5 (norm sqrt 5); centred column 0: -0.5, -0.5, 0.5, 0.5 (norm 1).
    expected_first = (0.75 + 0.25 + 0.25 + 0.75) / np.sqrt(5.0)
    S = FUNCTIONS["correlation"](P, A)
    assert abs(float(S[0, 0]) - expected_first) < 1e-6
    assert abs(float(S[0, 1]) + 1.0) < 1e-6
    assert float(S[0, 2]) == 0.0


def test_correlation_constant_unit_scores_zero():
    A = torch.full((30, 1), 0.1)
    S = FUNCTIONS["correlation"](torch.rand(30, 4), A)
    assert bool((S == 0).all())


def test_auprc_hand_example():
    # Ranking by activation: images 0, 1, 2, 3, 4; labels 1, 0, 1, 0, 1.
    # Precision at each positive: 1/1, 2/3, 3/5, so AP = (1 + 2/3 + 3/5) / 3.
    A = torch.tensor([[5.0], [4.0], [3.0], [2.0], [1.0]])
    P = torch.tensor([[0.9], [0.1], [0.7], [0.2], [0.5]])
    S = FUNCTIONS["auprc"](P, A)
    assert abs(float(S[0, 0]) - (1 + 2 / 3 + 3 / 5) / 3) < 1e-6


def test_auprc_ties_count_as_one_threshold():
    # Images 1 and 2 tie; at that threshold 3 images are retrieved, 2 of them positive.
    # Recall steps: 1/3 at precision 1, then 1/3 at precision 2/3, then 1/3 at precision 3/4.
    A = torch.tensor([[3.0], [2.0], [2.0], [1.0]])
    P = torch.tensor([[1.0], [0.0], [1.0], [1.0]])
    S = FUNCTIONS["auprc"](P, A)
    expected = (1.0 + 2 / 3 + 3 / 4) / 3
    assert abs(float(S[0, 0]) - expected) < 1e-6


def test_auprc_constant_unit_scores_prevalence():
    P = torch.zeros(40, 1)
    P[:10] = 1.0
    S = FUNCTIONS["auprc"](P, torch.zeros(40, 1))
    assert abs(float(S[0, 0]) - 0.25) < 1e-6


def test_auprc_absent_concept_scores_zero():
    S = FUNCTIONS["auprc"](torch.zeros(30, 2), torch.rand(30, 3))
    assert bool((S == 0).all())


def test_auprc_threshold_binarises_p():
    A = torch.tensor([[3.0], [2.0], [1.0]])
    P = torch.tensor([[0.2], [0.3], [0.1]])
    at_default = FUNCTIONS["auprc"](P, A)
    at_low = FUNCTIONS["auprc"](P, A, threshold=0.25)  # only image 1 is positive: AP = 1/2
    assert float(at_default[0, 0]) == 0.0
    assert abs(float(at_low[0, 0]) - 0.5) < 1e-6


def iou_f1_example() -> tuple[torch.Tensor, torch.Tensor]:
    # quantile 0.5 of 10 values 0..9 is 4.5: images 5-9 are active.
    A = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    P = torch.zeros(10, 3)
    P[6:10, 0] = 1.0  # 4 of 5 active images, no inactive ones
    P[0:3, 1] = 1.0  # no active image
    P[3:8, 2] = 1.0  # 3 active (5, 6, 7), 2 inactive (3, 4)
    return P, A


def test_iou_hand_example():
    P, A = iou_f1_example()
    S = FUNCTIONS["iou"](P, A, quantile=0.5)
    expected = torch.tensor([[4 / 5, 0 / 8, 3 / 7]])
    torch.testing.assert_close(S, expected)


def test_f1_hand_example():
    P, A = iou_f1_example()
    S = FUNCTIONS["f1"](P, A, quantile=0.5)
    expected = torch.tensor([[2 * 4 / (5 + 4), 0.0, 2 * 3 / (5 + 5)]])
    torch.testing.assert_close(S, expected)


def test_iou_default_quantile_keeps_top_half_percent():
    # 400 images at quantile 0.995: the 2 largest activations are active.
    A = torch.arange(400, dtype=torch.float32).unsqueeze(1)
    P = torch.zeros(400, 1)
    P[398:] = 1.0
    assert float(FUNCTIONS["iou"](P, A)[0, 0]) == 1.0


@pytest.mark.parametrize("name", ["iou", "f1"])
def test_constant_unit_active_nowhere(name):
    P = torch.zeros(20, 1)
    S = FUNCTIONS[name](P, torch.ones(20, 1))
    assert float(S[0, 0]) == 0.0


@pytest.mark.parametrize("name", ["iou", "f1"])
@pytest.mark.parametrize("quantile", [-0.1, 1.0])
def test_invalid_quantile_rejected(name, quantile):
    with pytest.raises(SimilarityError) as error:
        FUNCTIONS[name](torch.rand(20, 2), torch.rand(20, 2), quantile=quantile)
    assert f"quantile={quantile} is invalid" in str(error.value)


@pytest.mark.parametrize("name", ["auprc", "iou", "f1"])
def test_non_finite_threshold_rejected(name):
    with pytest.raises(SimilarityError):
        FUNCTIONS[name](torch.rand(20, 2), torch.rand(20, 2), threshold=float("nan"))


def test_wrong_parameter_type_rejected():
    with pytest.raises(ConfigError):
        FUNCTIONS["iou"](torch.rand(20, 2), torch.rand(20, 2), quantile="high")

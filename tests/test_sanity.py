"""The missing-label and extra-label sanity tests on synthetic units."""

from __future__ import annotations

import pytest
import torch

from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.sanity import EXTRA_LABEL
from mammo_dissect.core.sanity import MISSING_LABEL
from mammo_dissect.core.sanity import N_BASE_CONCEPTS
from mammo_dissect.core.sanity import N_IMAGES
from mammo_dissect.core.sanity import SanityResult
from mammo_dissect.core.sanity import format_sanity_table
from mammo_dissect.core.sanity import run_sanity_checks
from mammo_dissect.core.sanity import synthetic_ground_truth
from mammo_dissect.core.types import SimilarityFunction
from mammo_dissect.plugins.similarity.ground_truth_metrics import correlation
from mammo_dissect.plugins.similarity.ground_truth_metrics import iou
from mammo_dissect.plugins.similarity.rank_reorder import rank_reorder


def by_test(results: list[SanityResult]) -> dict[str, SanityResult]:
    return {result.test: result for result in results}


def test_synthetic_data_shapes_and_prevalence():
    data = synthetic_ground_truth(seed=0)
    assert data.P.shape == (N_IMAGES, 2 * N_BASE_CONCEPTS)
    assert data.A.shape == (N_IMAGES, N_BASE_CONCEPTS + N_BASE_CONCEPTS // 2)
    counts = data.P[:, :N_BASE_CONCEPTS].sum(dim=0)
    assert int(counts[0]) == 20
    assert int(counts[-1]) == 120
    assert len(data.comparisons[MISSING_LABEL]) == 20
    assert len(data.comparisons[EXTRA_LABEL]) == 20


def test_synthetic_unions_contain_their_parts():
    data = synthetic_ground_truth(seed=0)
    for _unit, complete, altered in data.comparisons[MISSING_LABEL]:
        assert bool((data.P[:, altered] <= data.P[:, complete]).all())
        assert bool((data.P[:, altered] < data.P[:, complete]).any())
    for _unit, complete, altered in data.comparisons[EXTRA_LABEL]:
        assert bool((data.P[:, complete] <= data.P[:, altered]).all())


def test_synthetic_data_depends_only_on_seed():
    first = synthetic_ground_truth(seed=3)
    second = synthetic_ground_truth(seed=3)
    assert torch.equal(first.A, second.A)
    assert torch.equal(first.P, second.P)
    assert not torch.equal(first.A, synthetic_ground_truth(seed=4).A)


def test_correlation_passes_both_tests():
    results = by_test(run_sanity_checks(SimilarityFunction(name="correlation", fn=correlation)))
    missing = results[MISSING_LABEL]
    extra = results[EXTRA_LABEL]
    assert missing.passed
    assert extra.passed
    assert missing.held == missing.comparisons == 20
    assert extra.held == extra.comparisons == 20
    assert missing.mean_complete > missing.mean_altered


def test_rank_reorder_fails_extra_label_test():
    # Only the top 5% of images count, and those all carry concept c, so extra
    # labels elsewhere leave the score unchanged: every comparison ties.
    results = by_test(run_sanity_checks(SimilarityFunction(name="rank_reorder", fn=rank_reorder)))
    extra = results[EXTRA_LABEL]
    assert not extra.passed
    assert extra.held == 0
    assert extra.mean_complete == extra.mean_altered
    assert results[MISSING_LABEL].passed


def test_iou_default_quantile_fails_missing_label_test():
    # At quantile 0.995 only 2 of 400 images are active, too few to tell a
    # union of concepts from one of its parts.
    function = SimilarityFunction(name="iou", fn=iou)
    default = by_test(run_sanity_checks(function))
    assert not default[MISSING_LABEL].passed
    assert default[EXTRA_LABEL].passed
    wider = by_test(run_sanity_checks(function, {"quantile": 0.75}))
    assert wider[MISSING_LABEL].passed
    assert wider[EXTRA_LABEL].passed


def test_unknown_parameter_rejected():
    with pytest.raises(ConfigError):
        run_sanity_checks(SimilarityFunction(name="correlation", fn=correlation), {"quantile": 0.9})


def test_format_table_rows():
    results = run_sanity_checks(SimilarityFunction(name="rank_reorder", fn=rank_reorder), {"p": 3.0})
    lines = format_sanity_table(results).splitlines()
    assert lines[0].startswith("| function | params | test | held |")
    assert len(lines) == 4
    assert lines[2].startswith("| rank_reorder | p=3.0 | missing label | 20/20 |")
    assert lines[2].endswith("| pass |")
    assert lines[3].startswith("| rank_reorder | p=3.0 | extra label | 0/20 |")
    assert lines[3].endswith("| FAIL |")


def test_result_without_comparisons_fails():
    result = SanityResult(
        function="f", params={}, test=MISSING_LABEL, comparisons=0, held=0, mean_complete=0.0, mean_altered=0.0, seed=0
    )
    assert not result.passed
    assert result.fraction == 0.0

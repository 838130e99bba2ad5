"""The annotation dissector: ground-truth P and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mammo_dissect.core.errors import ConceptSetError
from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.types import ProbeImage
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import Runtime
from mammo_dissect.plugins.dissectors.annotation import AnnotationDissector
from mammo_dissect.plugins.dissectors.annotation import AnnotationOptions


def probe(annotations: list[tuple[str, ...]]) -> ProbeSet:
    images = [ProbeImage(image_id=f"i{n}", path=Path(f"/nonexistent/i{n}.png"), annotations=a)
              for n, a in enumerate(annotations)]
    return ProbeSet(reader="test", root=Path("/nonexistent"), images=images, annotation_vocabulary=["mass", "calcification"])


def matrix(probe_set: ProbeSet, concepts: list[str], **options) -> list[list[float]]:
    P = AnnotationDissector().image_concept_matrix(AnnotationOptions(**options), probe_set, concepts, Runtime())
    return P.tolist()


def test_ones_where_annotated():
    P = matrix(probe([("mass",), ("calcification", "mass"), ()]), ["mass", "calcification"])
    assert P == [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]


def test_matching_ignores_case_and_spaces():
    P = matrix(probe([("Spiculated  mass",)]), ["spiculated mass"])
    assert P == [[1.0]]


def test_unannotated_concept_gets_zero_column():
    P = matrix(probe([("mass",), ()]), ["mass", "aircraft"])
    assert [row[1] for row in P] == [0.0, 0.0]


def test_require_annotated_rejects_unannotated():
    with pytest.raises(ConceptSetError) as error:
        matrix(probe([("mass",)]), ["mass", "aircraft"], require_annotated=True)
    assert "aircraft" in str(error.value)


def test_no_matching_concept_lists_vocabulary():
    with pytest.raises(ConceptSetError) as error:
        matrix(probe([("mass",)]), ["aircraft"])
    assert "mass, calcification" in str(error.value)


def test_probe_set_without_annotations():
    with pytest.raises(ProbeSetError) as error:
        matrix(probe([(), ()]), ["mass"])
    assert "has no annotations" in str(error.value)

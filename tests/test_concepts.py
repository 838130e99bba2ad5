"""Concept-list cleaning and the built-in concept sets."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mammo_dissect.concept_sets.builtin import AnnotationConcepts
from mammo_dissect.concept_sets.builtin import MammographyBasicConcepts
from mammo_dissect.concept_sets.builtin import read_concept_lines
from mammo_dissect.core.concepts import clean_text
from mammo_dissect.core.concepts import normalise_concepts
from mammo_dissect.core.errors import ConceptSetError
from mammo_dissect.core.types import NoOptions
from mammo_dissect.core.types import ProbeImage
from mammo_dissect.core.types import ProbeSet


def lines_of(tmp_path: Path, data: bytes) -> list[str]:
    path = tmp_path / "concepts.txt"
    path.write_bytes(data)
    return read_concept_lines(path)


def test_final_newline_is_not_a_blank_line(tmp_path):
    assert normalise_concepts(lines_of(tmp_path, b"mass\ncalcification\n"), "t").blank_lines == 0


def test_blank_line_in_middle_counted_once(tmp_path):
    assert normalise_concepts(lines_of(tmp_path, b"mass\n\ncalcification\n"), "t").blank_lines == 1


def test_crlf_and_lone_cr(tmp_path):
    assert lines_of(tmp_path, b"a\r\nb\rc") == ["a", "b", "c"]


def test_bom_removed(tmp_path):
    assert normalise_concepts(lines_of(tmp_path, b"\xef\xbb\xbfmass\n"), "t").texts == ["mass"]


def test_non_utf8_file_rejected(tmp_path):
    with pytest.raises(ConceptSetError) as error:
        lines_of(tmp_path, b"caf\xe9\n")
    assert "not valid UTF-8" in str(error.value)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  spiculated \t mass  ", "spiculated mass"),
        ("benign\u200b", "benign"),
        ("mal\x00ignant", "mal ignant"),
        ("cafe\u0301", "caf\u00e9"),
    ],
)
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_duplicates_merged_and_listed(caplog):
    caplog.set_level(logging.WARNING)
    result = normalise_concepts(["Mass", "mass ", "MASS", "calcification"], "t")
    assert result.texts == ["Mass", "calcification"]
    assert [d["dropped"] for d in result.duplicates] == ["mass", "MASS"]
    assert "dropped 2 duplicate(s)" in caplog.text


def test_long_concept_shortened_in_log(caplog):
    caplog.set_level(logging.WARNING)
    normalise_concepts(["x" * 10_000, "x" * 10_000], "t")
    assert max(len(record.getMessage()) for record in caplog.records) < 400


def test_only_blank_lines_rejected():
    with pytest.raises(ConceptSetError):
        normalise_concepts(["", "  ", "\t"], "t")


def test_annotations_leave_out_absent_concepts():
    images = [ProbeImage(image_id="a", path=Path("a.png"), annotations=("mass",))]
    probe = ProbeSet(reader="t", root=Path("."), images=images, annotation_vocabulary=["mass", "calcification"])
    assert AnnotationConcepts().load(NoOptions(), probe) == ["mass"]


def test_mammography_basic_categories():
    concepts = MammographyBasicConcepts().load(NoOptions())
    assert len(concepts) == 67
    assert {c.broad_category for c in concepts} == {
        "breast anatomy or structure",
        "breast locations",
        "findings and characterisations",
        "interpretations",
        "action or follow-up",
        "non-mammography",
    }

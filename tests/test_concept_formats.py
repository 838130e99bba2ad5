"""Concept tables, category workbooks, the built-in mammography set and the ``concepts check`` function."""

from __future__ import annotations

from pathlib import Path

import pytest

from mammo_dissect.concept_sets.formats import MammographyConcepts
from mammo_dissect.concept_sets.formats import TableConcepts
from mammo_dissect.concept_sets.formats import WorkbookConcepts
from mammo_dissect.concept_sets.formats import load_workbook_concepts
from mammo_dissect.concept_sets.formats import read_table
from mammo_dissect.concept_sets.tools import check_concept_file
from mammo_dissect.core.concepts import normalise_concepts
from mammo_dissect.core.concepts import over_long_concepts
from mammo_dissect.core.errors import ConceptSetError
from mammo_dissect.core.types import NoOptions
from mammo_dissect.tests.shared_data import SHARED_DATA_ROOT
from mammo_dissect.tests.shared_data import shared_data_dir


def test_csv_table_with_synonyms(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text(
        "concept,category,broad category,synonyms,prompt_template\n"
        "spiculated mass,mass,findings,stellate lesion|spiculated lesion,a mammogram showing {}\n"
        "aircraft,objects,non-mammography,,\n",
        encoding="utf-8",
    )
    entries = read_table(path)
    assert entries[0].synonyms == ("stellate lesion", "spiculated lesion")
    assert entries[0].prompt_template == "a mammogram showing {}"
    assert entries[1].broad_category == "non-mammography"
    expanded = TableConcepts().load(TableConcepts.Options(path=str(path), include_synonyms=True))
    assert [concept.text for concept in expanded] == ["spiculated mass", "stellate lesion", "spiculated lesion",
                                                      "aircraft"]
    assert expanded[1].category == "mass"


def test_toml_table(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[concept]]\nconcept = "oval mass"\ncategory = "mass"\nsynonyms = ["ovoid mass"]\n')
    assert read_table(path)[0].synonyms == ("ovoid mass",)
    path.write_text('[[concept]]\nconcept = "oval mass"\ncolour = "red"\n')
    with pytest.raises(ConceptSetError, match="unknown key"):
        read_table(path)


def test_table_rejects_template_without_slot(tmp_path: Path) -> None:
    path = tmp_path / "c.tsv"
    path.write_text("concept\tprompt_template\nmass\ta mammogram\n")
    with pytest.raises(ConceptSetError, match="no {}"):
        read_table(path)


def test_builtin_mammography_set() -> None:
    concepts = MammographyConcepts().load(NoOptions())
    normalised = normalise_concepts(concepts, "mammography")
    assert len(normalised.concepts) == len(concepts) == 210
    broad = {concept.broad_category for concept in normalised.concepts}
    assert broad == {"breast anatomy or structure", "breast locations", "findings and characterisations",
                     "interpretations", "action or follow-up", "non-mammography"}


def test_over_long_concepts() -> None:
    assert over_long_concepts(["a b c", "a"], None, 2) == [("a b c", 3)]
    assert over_long_concepts(["abc"], len, 2) == [("abc", 3)]


def test_check_reports_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("mass\n\nMass\n" + " ".join(["word"] * 80) + "\n")
    report = check_concept_file(path)
    assert report["concepts"] == 2
    assert report["blank_lines"] == 1
    assert report["duplicates"] == [{"kept": "mass", "dropped": "Mass"}]
    assert len(report["over_long"]) == 1


def test_study_workbook_counts() -> None:
    shared_data_dir()
    folder = SHARED_DATA_ROOT.parent / "reference" / "mammo-clip-dissect-concepts"
    if not folder.exists():
        pytest.skip(f"reference concept set not found: {folder}")
    workbook = folder / "Extended_Breast_text_categories.xlsx"
    concepts = folder / "Specific_concepts_sorted.txt"
    match = load_workbook_concepts(workbook, concepts, "first")
    assert len(match.concepts) == 763
    assert match.missing_from_scheme == []
    assert match.missing_from_list == []
    assert [cell.raw for cell in match.cleaned_matches] == ["questionable mass "]
    assert len(match.several_cells) == 10
    counts = match.counts_by_broad_category()
    assert counts == {
        "Breast_anatomy_or_structure": 32, "Breast_locations": 52, "Findings and characterizations": 140,
        "Interpretations": 137, "Action or follow up": 9, "Environmental_and_Natural": 393,
    }
    last = load_workbook_concepts(workbook, concepts).counts_by_broad_category()
    assert last["Environmental_and_Natural"] == 394
    assert sum(last.values()) - last["Environmental_and_Natural"] == 369
    loaded = WorkbookConcepts().load(WorkbookConcepts.Options(workbook=str(workbook), concepts=str(concepts)))
    assert len(loaded) == 763

"""Concept-set file formats: tables (CSV, TSV, TOML) and category workbooks, with their plugins.

Table format (``table`` concept set): one concept per row with the columns

==================  ==========================================================
column              meaning
==================  ==========================================================
``concept``         the concept text (required)
``category``        fine category, for example "calcification morphology"
``broad_category``  broad category, for example "findings and characterisations"
``synonyms``        other wordings, separated by ``|``
``prompt_template`` a template with ``{}`` for the concept, for example
                    "a mammogram showing {}"
==================  ==========================================================

CSV and TSV files need a header row with these names (``broad category``
with a space is accepted).  A TOML file has an array of tables
``[[concept]]`` with the same keys, where ``synonyms`` is a list of strings.

Workbook format (``workbook`` concept set): an ``.xlsx`` file with one sheet
per broad category and one column per category (header in the first row,
one concept per cell below), plus a concept list (one concept per line).
Each listed concept takes the category of the last cell that names it
(or the first, with ``cell_priority = "first"``), in the order sheet, column, row; the last reproduces the
counts the Mammo-CLIP Dissect study reports.  Cells and list entries are compared after
:func:`~mammo_dissect.core.concepts.clean_text`.  :func:`match_workbook`
reports list entries without a cell, cells without a list entry, and
concepts named by several cells.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any
from typing import Literal

from mammo_dissect.concept_sets.builtin import read_concept_lines
from mammo_dissect.core.concepts import clean_text
from mammo_dissect.core.errors import ConceptSetError
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.types import Concept
from mammo_dissect.core.types import ConceptSetSource
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import ProbeSet


logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"

#: The shipped mammography vocabulary with categories (see ``data/SOURCES.md``).
MAMMOGRAPHY_TABLE = DATA_DIR / "mammography_extended.tsv"

TABLE_COLUMNS = ("concept", "category", "broad_category", "synonyms", "prompt_template")

#: Separator of synonyms in CSV and TSV cells.
SYNONYM_SEPARATOR = "|"


@dataclass(frozen=True)
class ConceptEntry:
    """One row of a concept table: the concept and its optional categories, synonyms and prompt template."""

    text: str
    category: str | None = None
    broad_category: str | None = None
    synonyms: tuple[str, ...] = ()
    prompt_template: str | None = None

    def concept(self) -> Concept:
        return Concept(text=self.text, category=self.category, broad_category=self.broad_category)


def _column_key(name: str) -> str:
    return "_".join(name.strip().lower().split())


def _optional(value: Any) -> str | None:
    text = clean_text(str(value)) if value is not None else ""
    return text or None


def _entry(values: dict[str, Any], where: str) -> ConceptEntry:
    synonyms = values.get("synonyms") or ()
    if isinstance(synonyms, str):
        synonyms = synonyms.split(SYNONYM_SEPARATOR)
    template = _optional(values.get("prompt_template"))
    if template is not None and "{}" not in template:
        raise ConceptSetError(f"{where}: prompt_template {template!r} has no {{}} where the concept goes; add one")
    return ConceptEntry(
        text=str(values.get("concept") or ""),
        category=_optional(values.get("category")),
        broad_category=_optional(values.get("broad_category")),
        synonyms=tuple(text for text in (clean_text(str(item)) for item in synonyms) if text),
        prompt_template=template,
    )


def read_table(path: Path) -> list[ConceptEntry]:
    """Read a concept table from a ``.csv``, ``.tsv`` or ``.toml`` file.

    Lines starting with ``#`` before the header of a CSV or TSV file are
    comments.  Raises :class:`ConceptSetError` naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise ConceptSetError(f"concept table not found: {path}; set concept_set.options.path")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return _read_toml_table(path)
    if suffix not in (".csv", ".tsv", ".txt"):
        raise ConceptSetError(f"concept table {path} has suffix {suffix!r}; use .csv, .tsv or .toml")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConceptSetError(f"concept table {path} is not valid UTF-8 (byte {exc.start}); save it as UTF-8") from None
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    delimiter = "\t" if suffix == ".tsv" or (lines and "\t" in lines[0]) else ","
    reader = csv.DictReader(lines, delimiter=delimiter)
    columns = [_column_key(name) for name in reader.fieldnames or []]
    if "concept" not in columns:
        raise ConceptSetError(
            f"concept table {path} has no 'concept' column; the header must name the columns "
            f"{', '.join(TABLE_COLUMNS)} (only 'concept' is required); found {', '.join(columns) or 'no header'}"
        )
    unknown = [name for name in columns if name not in TABLE_COLUMNS]
    if unknown:
        raise ConceptSetError(f"concept table {path} has unknown column(s) {', '.join(unknown)}; allowed: "
                              f"{', '.join(TABLE_COLUMNS)}")
    reader.fieldnames = columns
    entries = []
    for number, row in enumerate(reader, start=2):
        if None in row:
            raise ConceptSetError(f"{path}: data row {number - 1} has more fields than the header; check the quoting")
        entries.append(_entry(row, f"{path}: data row {number - 1}"))
    return entries


def _read_toml_table(path: Path) -> list[ConceptEntry]:
    import tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConceptSetError(f"concept table {path} is not valid TOML: {exc}") from None
    rows = data.get("concept")
    if not isinstance(rows, list):
        raise ConceptSetError(
            f"concept table {path} needs an array of tables [[concept]], each with concept = \"...\" and optional "
            f"{', '.join(TABLE_COLUMNS[1:])}"
        )
    entries = []
    for number, row in enumerate(rows, start=1):
        unknown = [key for key in row if key not in TABLE_COLUMNS]
        if unknown:
            raise ConceptSetError(f"{path}: [[concept]] number {number} has unknown key(s) {', '.join(unknown)}")
        entries.append(_entry(row, f"{path}: [[concept]] number {number}"))
    return entries


def expand_synonyms(entries: list[ConceptEntry]) -> list[Concept]:
    """Return each entry's concept followed by its synonyms, with the entry's categories."""
    concepts = []
    for entry in entries:
        concepts.append(entry.concept())
        concepts += [Concept(text, entry.category, entry.broad_category) for text in entry.synonyms]
    return concepts


# ---------------------------------------------------------------- workbooks


@dataclass(frozen=True)
class WorkbookCell:
    """One concept cell of a category workbook."""

    text: str
    #: The cell as written (before cleaning), to report cells that only match after cleaning.
    raw: str
    category: str
    broad_category: str
    sheet: str
    cell: str


def read_workbook(path: Path) -> list[WorkbookCell]:
    """Read every concept cell of a category workbook, in the order sheet, column, row.

    Sheet names are broad categories and first-row headers are categories,
    both cleaned with :func:`clean_text` (so ``' Findings'`` becomes
    ``'Findings'``).  Empty cells and columns without a header are skipped.
    """
    try:
        import openpyxl
    except ModuleNotFoundError:
        raise ConceptSetError("reading a workbook needs the package openpyxl; pip install openpyxl") from None
    from openpyxl.utils import get_column_letter

    path = Path(path)
    if not path.is_file():
        raise ConceptSetError(f"category workbook not found: {path}; set concept_set.options.workbook")
    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises zipfile, KeyError and its own errors for broken files
        raise ConceptSetError(f"cannot read category workbook {path}: {type(exc).__name__}: {exc}") from None
    cells = []
    try:
        for sheet in workbook.worksheets:
            rows = list(sheet.iter_rows(values_only=True))
            if not rows:
                continue
            header = rows[0]
            for column_index, heading in enumerate(header):
                category = clean_text(str(heading)) if heading is not None else ""
                if not category:
                    continue
                for row_index, row in enumerate(rows[1:], start=2):
                    value = row[column_index] if column_index < len(row) else None
                    if value is None or not clean_text(str(value)):
                        continue
                    cells.append(
                        WorkbookCell(
                            text=clean_text(str(value)),
                            raw=str(value),
                            category=category,
                            broad_category=clean_text(sheet.title),
                            sheet=sheet.title,
                            cell=f"{get_column_letter(column_index + 1)}{row_index}",
                        )
                    )
    finally:
        workbook.close()
    return cells


@dataclass
class WorkbookMatch:
    """Concepts of a list with their workbook categories, and what did not match."""

    concepts: list[Concept]
    #: List entries that no cell names.
    missing_from_scheme: list[str] = field(default_factory=list)
    #: Cells whose text is not in the list.
    missing_from_list: list[WorkbookCell] = field(default_factory=list)
    #: Concept text -> every cell naming it, for concepts named by more than one cell.
    several_cells: dict[str, list[WorkbookCell]] = field(default_factory=dict)
    #: Cells that match a list entry only after whitespace and Unicode cleaning.
    cleaned_matches: list[WorkbookCell] = field(default_factory=list)

    def counts_by_broad_category(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for concept in self.concepts:
            key = concept.broad_category or "(none)"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def report(self) -> dict[str, Any]:
        """Return the match as plain data, for logs and ``concepts check``."""
        return {
            "concepts": len(self.concepts),
            "by_broad_category": self.counts_by_broad_category(),
            "missing_from_scheme": list(self.missing_from_scheme),
            "missing_from_list": [f"{cell.sheet}!{cell.cell}: {cell.raw!r}" for cell in self.missing_from_list],
            "several_cells": {
                text: [f"{cell.sheet}!{cell.cell} ({cell.category})" for cell in cells]
                for text, cells in self.several_cells.items()
            },
            "cleaned_matches": [f"{cell.sheet}!{cell.cell}: {cell.raw!r}" for cell in self.cleaned_matches],
        }


def match_workbook(concept_lines: list[str], cells: list[WorkbookCell], cell_priority: str = "last") -> WorkbookMatch:
    """Give each listed concept the categories of one of its workbook cells and report every mismatch.

    ``cell_priority`` picks the cell of a concept named by several cells:
    ``first`` or ``last`` in the order sheet, column, row.
    """
    if cell_priority not in ("first", "last"):
        raise ConceptSetError(f"cell_priority must be 'first' or 'last', got {cell_priority!r}")
    listed = [clean_text(line) for line in concept_lines]
    listed = [text for text in listed if text]
    listed_keys = {text.casefold() for text in listed}
    cells_by_key: dict[str, list[WorkbookCell]] = {}
    for cell in cells:
        cells_by_key.setdefault(cell.text.casefold(), []).append(cell)

    match = WorkbookMatch(concepts=[])
    for text in listed:
        found = cells_by_key.get(text.casefold())
        if not found:
            match.missing_from_scheme.append(text)
            match.concepts.append(Concept(text=text))
            continue
        chosen = found[0] if cell_priority == "first" else found[-1]
        match.concepts.append(Concept(text=text, category=chosen.category, broad_category=chosen.broad_category))
        if len(found) > 1:
            match.several_cells[text] = found
    for cell in cells:
        if cell.text.casefold() not in listed_keys:
            match.missing_from_list.append(cell)
        elif cell.raw != cell.text:
            match.cleaned_matches.append(cell)
    return match


def load_workbook_concepts(workbook: Path, concepts: Path, cell_priority: str = "last") -> WorkbookMatch:
    """Read a category workbook and a concept list and match them (see :func:`match_workbook`)."""
    return match_workbook(read_concept_lines(Path(concepts)), read_workbook(Path(workbook)), cell_priority)


# ---------------------------------------------------------------- plugins


class TableOptions(Options):
    """Options of the ``table`` concept set."""

    #: A .csv, .tsv or .toml concept table.
    path: str
    #: Add each concept's synonyms as concepts of their own, with the same categories.
    include_synonyms: bool = False


class TableConcepts(ConceptSetSource):
    name = "table"
    description = "a CSV, TSV or TOML table: concept, category, broad_category, synonyms, prompt_template"
    Options = TableOptions

    def load(self, options: Options, probe_set: ProbeSet | None = None) -> list[Concept | str]:
        assert isinstance(options, TableOptions)
        entries = read_table(Path(options.path))
        if options.include_synonyms:
            return list(expand_synonyms(entries))
        return [entry.concept() for entry in entries]

    def source_description(self, options: Options) -> str:
        assert isinstance(options, TableOptions)
        return options.path


class WorkbookOptions(Options):
    """Options of the ``workbook`` concept set."""

    #: The .xlsx category workbook (one sheet per broad category, one column per category).
    workbook: str
    #: The concept list, one concept per line.
    concepts: str
    #: Whether listed concepts missing from the workbook are an error (else they are kept without categories).
    require_categories: bool = False
    #: Which cell gives the category of a concept named by several cells (order: sheet, column, row).
    cell_priority: Literal["first", "last"] = "last"


class WorkbookConcepts(ConceptSetSource):
    name = "workbook"
    description = "a concept list categorised by an .xlsx workbook (sheet = broad category, column = category)"
    Options = WorkbookOptions

    def load(self, options: Options, probe_set: ProbeSet | None = None) -> list[Concept | str]:
        assert isinstance(options, WorkbookOptions)
        match = load_workbook_concepts(Path(options.workbook), Path(options.concepts), options.cell_priority)
        if match.missing_from_scheme:
            message = (
                f"{len(match.missing_from_scheme)} concept(s) of {options.concepts} have no cell in "
                f"{options.workbook}: {', '.join(match.missing_from_scheme[:20])}"
            )
            if options.require_categories:
                raise ConceptSetError(message + "; add them to the workbook or set require_categories = false")
            logger.warning("%s; they are kept without a category", message)
        if match.missing_from_list:
            logger.warning(
                "%d workbook cell(s) name no concept of the list: %s",
                len(match.missing_from_list),
                ", ".join(f"{cell.sheet}!{cell.cell} {cell.raw!r}" for cell in match.missing_from_list[:20]),
            )
        if match.several_cells:
            logger.info("%d concept(s) are in several workbook cells; each takes its first cell's category: %s",
                        len(match.several_cells), ", ".join(match.several_cells))
        return list(match.concepts)

    def source_description(self, options: Options) -> str:
        assert isinstance(options, WorkbookOptions)
        return f"{options.concepts} categorised by {options.workbook}"


class MammographyConcepts(ConceptSetSource):
    name = "mammography"
    description = "the built-in mammography vocabulary with categories and distractors (see data/SOURCES.md)"

    def load(self, options: Options, probe_set: ProbeSet | None = None) -> list[Concept | str]:
        return [entry.concept() for entry in read_table(MAMMOGRAPHY_TABLE)]

    def source_description(self, options: Options) -> str:
        return "built-in mammography_extended.tsv"


@hookimpl
def register_concept_sets(register: Any) -> None:
    """Register the ``table``, ``workbook`` and ``mammography`` concept sets."""
    register(TableConcepts())
    register(WorkbookConcepts())
    register(MammographyConcepts())

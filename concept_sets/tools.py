"""Functions behind ``mammo-dissect concepts list`` and ``mammo-dissect concepts check FILE``.

``list_concept_sets`` describes the registered concept sets;
``check_concept_file`` reads a concept file of any supported format and
returns plain data: counts per broad category and category, duplicates,
dropped blank lines and over-long concepts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mammo_dissect.concept_sets.builtin import read_concept_lines
from mammo_dissect.concept_sets.formats import load_workbook_concepts
from mammo_dissect.concept_sets.formats import read_table
from mammo_dissect.core.concepts import normalise_concepts
from mammo_dissect.core.concepts import over_long_concepts
from mammo_dissect.core.types import Concept


logger = logging.getLogger(__name__)

#: Token limit used by ``concepts check`` when the caller gives none (CLIP's context length).
DEFAULT_TOKEN_LIMIT = 77


def list_concept_sets(sources: dict[str, Any]) -> list[dict[str, str]]:
    """Return name, description and options of each registered concept set, sorted by name.

    ``sources`` maps names to :class:`~mammo_dissect.core.types.ConceptSetSource`
    objects, as the plugin registry stores them.
    """
    rows = []
    for name in sorted(sources):
        source = sources[name]
        fields = getattr(source.Options, "model_fields", {})
        rows.append(
            {
                "name": name,
                "description": source.description,
                "options": ", ".join(fields) if fields else "none",
            }
        )
    return rows


def read_concept_file(path: Path, workbook: Path | None = None) -> list[Concept | str]:
    """Read a concept file by its suffix: ``.csv``/``.tsv``/``.toml`` tables, anything else one concept per line.

    With ``workbook``, the lines of ``path`` are categorised by that workbook.
    """
    path = Path(path)
    if workbook is not None:
        return list(load_workbook_concepts(workbook, path).concepts)
    if path.suffix.lower() in (".csv", ".tsv", ".toml"):
        return [entry.concept() for entry in read_table(path)]
    return list(read_concept_lines(path))


def check_concept_file(
    path: Path,
    workbook: Path | None = None,
    count_tokens: Callable[[str], int] | None = None,
    token_limit: int = DEFAULT_TOKEN_LIMIT,
) -> dict[str, Any]:
    """Check a concept file and return what ``concepts check`` prints.

    The result has the raw and kept counts, counts per broad category and
    per (broad category, category), the dropped duplicates and blank lines,
    the over-long concepts for ``token_limit`` (counted with
    ``count_tokens``, or in words when it is None) and, with ``workbook``,
    the workbook match report.
    """
    raw = read_concept_file(path, workbook)
    normalised = normalise_concepts(raw, str(path))
    by_broad: dict[str, int] = {}
    by_category: dict[str, int] = {}
    for concept in normalised.concepts:
        broad = concept.broad_category or "(none)"
        by_broad[broad] = by_broad.get(broad, 0) + 1
        key = f"{broad} / {concept.category or '(none)'}"
        by_category[key] = by_category.get(key, 0) + 1
    long_ones = over_long_concepts(normalised.texts, count_tokens, token_limit)
    result: dict[str, Any] = {
        "file": str(path),
        "raw_entries": len(raw),
        "concepts": len(normalised.concepts),
        "by_broad_category": by_broad,
        "by_category": by_category,
        "duplicates": normalised.duplicates,
        "blank_lines": normalised.blank_lines,
        "over_long": [{"concept": text, "tokens": count} for text, count in long_ones],
        "token_limit": token_limit,
        "token_counter": "tokenizer" if count_tokens is not None else "words (an underestimate of BPE tokens)",
        "sha256": normalised.sha256(),
    }
    if workbook is not None:
        result["workbook"] = load_workbook_concepts(workbook, path).report()
    return result

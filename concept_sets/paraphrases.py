"""Paraphrases of concept texts, for checking that an aligned head's labels survive rewording.

A paraphrase file is UTF-8 text with one concept per line: the concept,
then its paraphrases, separated by tabs.  Lines starting with ``#`` and
blank lines are skipped.  ``data/paraphrases.tsv`` covers the annotation
concepts of the built-in probe sets.
"""

from __future__ import annotations

from pathlib import Path

from mammo_dissect.core.errors import ConceptSetError


BUILTIN_FILE = Path(__file__).resolve().parent / "data" / "paraphrases.tsv"


def read_paraphrases(path: str | Path) -> dict[str, list[str]]:
    """Return {concept: paraphrases} from a paraphrase file.

    :raises ConceptSetError: when the file is missing or not UTF-8, when a
        concept appears twice, or when a line has no paraphrase or an empty one.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "not found"
        raise ConceptSetError(f"paraphrase file {file} {what}; pass the path of a tab-separated file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConceptSetError(f"paraphrase file {file} is not UTF-8 ({exc}); save it as UTF-8") from None
    except OSError as exc:
        raise ConceptSetError(f"paraphrase file {file} cannot be read ({exc}); check its permissions") from None
    table: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [field.strip() for field in line.split("\t")]
        concept, paraphrases = fields[0], fields[1:]
        where = f"{file} line {number}"
        if not concept:
            raise ConceptSetError(f"{where}: the concept field is empty; put the concept before the first tab")
        if not paraphrases:
            raise ConceptSetError(f"{where}: concept {concept!r} has no paraphrase; add tab-separated paraphrases")
        if any(not item for item in paraphrases):
            raise ConceptSetError(f"{where}: concept {concept!r} has an empty paraphrase; remove the extra tab")
        if concept in table:
            raise ConceptSetError(f"{where}: concept {concept!r} appears a second time; merge its lines")
        table[concept] = paraphrases
    return table


def builtin_paraphrases() -> dict[str, list[str]]:
    """Return the paraphrases shipped with mammo-dissect."""
    return read_paraphrases(BUILTIN_FILE)

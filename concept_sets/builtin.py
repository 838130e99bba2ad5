"""Built-in concept sets: plain-text files, the probe set's own annotations and a shipped vocabulary.

* ``text``: a user's file with one concept per line (UTF-8; CRLF, blank lines
  and duplicates are handled by the core's normalisation).
* ``annotations``: the concept texts the probe set annotates, in the reader's
  documented order (pairs with the annotation dissector).
* ``mammography-basic``: 67 concepts shipped with mammo-dissect, with a
  category and a broad category each (see ``data/mammography_basic.tsv``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mammo_dissect.core.errors import ConceptSetError
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.types import Concept
from mammo_dissect.core.types import ConceptSetSource
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import ProbeSet


logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"


class TextFileOptions(Options):
    """Options of the ``text`` concept set."""

    #: Path of a UTF-8 text file with one concept per line.
    path: str


def read_concept_lines(path: Path) -> list[str]:
    """Read a concept file; decoding errors and missing files raise :class:`ConceptSetError`."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConceptSetError(f"concept file not found: {path}; set concept_set.options.path") from None
    except IsADirectoryError:
        raise ConceptSetError(f"concept file {path} is a directory; point concept_set.options.path at a file") from None
    except OSError as exc:
        raise ConceptSetError(f"cannot read concept file {path}: {exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConceptSetError(
            f"concept file {path} is not valid UTF-8 (byte {exc.start}); save it as UTF-8"
        ) from None
    # A concept file is line-based, so only \n, \r\n and a lone \r end a line.
    # str.splitlines() would also split on \x0b, \x1c and other separators.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":
        # The newline that ends the last line does not start a blank line.
        lines.pop()
    return lines


class TextFileConcepts(ConceptSetSource):
    name = "text"
    description = "a text file with one concept per line"
    Options = TextFileOptions

    def load(self, options: Options, probe_set: ProbeSet | None = None) -> list[Concept | str]:
        assert isinstance(options, TextFileOptions)
        return list(read_concept_lines(Path(options.path)))

    def source_description(self, options: Options) -> str:
        assert isinstance(options, TextFileOptions)
        return options.path


class AnnotationConcepts(ConceptSetSource):
    name = "annotations"
    description = "the concept texts annotated on at least one probe image (use with the annotation dissector)"

    def load(self, options: Options, probe_set: ProbeSet | None = None) -> list[Concept | str]:
        if probe_set is None or not probe_set.annotation_vocabulary:
            reader = probe_set.reader if probe_set is not None else "none"
            raise ConceptSetError(
                f"concept set 'annotations' needs a probe set with an annotation vocabulary, "
                f"but probe set reader {reader!r} has none; use concept set 'text' with a file"
            )
        present = {annotation for image in probe_set.images for annotation in image.annotations}
        concepts = [text for text in probe_set.annotation_vocabulary if text in present]
        absent = [text for text in probe_set.annotation_vocabulary if text not in present]
        if absent:
            logger.info(
                "concept set 'annotations': left out %d concept(s) that no probe image carries: %s",
                len(absent), ", ".join(absent),
            )
        return concepts

    def source_description(self, options: Options) -> str:
        return "probe-set annotation vocabulary"


def read_concept_table(path: Path) -> list[Concept]:
    """Read a tab-separated table: concept, category, broad category; ``#`` starts a comment line."""
    concepts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ConceptSetError(f"{path}:{number}: expected 3 tab-separated fields, got {len(fields)}")
        concepts.append(Concept(text=fields[0], category=fields[1] or None, broad_category=fields[2] or None))
    return concepts


class MammographyBasicConcepts(ConceptSetSource):
    name = "mammography-basic"
    description = "67 mammography concepts and distractors with categories, shipped with mammo-dissect"

    def load(self, options: Options, probe_set: ProbeSet | None = None) -> list[Concept | str]:
        return list(read_concept_table(DATA_DIR / "mammography_basic.tsv"))

    def source_description(self, options: Options) -> str:
        return "built-in mammography_basic.tsv"


@hookimpl
def register_concept_sets(register: Any) -> None:
    register(TextFileConcepts())
    register(AnnotationConcepts())
    register(MammographyBasicConcepts())

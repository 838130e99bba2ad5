"""Normalisation of concept lists: one cleaned list serves both encoding and label look-up."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from mammo_dissect.core.errors import ConceptSetError
from mammo_dissect.core.types import Concept


logger = logging.getLogger(__name__)

_SPACES = re.compile(r"\s+")


@dataclass
class NormalisedConcepts:
    """The cleaned concept list and what was dropped on the way."""

    concepts: list[Concept]
    blank_lines: int = 0
    duplicates: list[dict[str, str]] = field(default_factory=list)

    @property
    def texts(self) -> list[str]:
        return [concept.text for concept in self.concepts]

    def sha256(self) -> str:
        """Return a hash of the cleaned texts and categories, in order."""
        payload = [[c.text, c.category, c.broad_category] for c in self.concepts]
        return hashlib.sha256(json.dumps(payload).encode("utf-8")).hexdigest()

    def dropped(self) -> dict[str, Any]:
        return {"blank_lines": self.blank_lines, "duplicates": self.duplicates}


def clean_text(text: str) -> str:
    """Normalise a concept text: NFC form, no invisible characters, single spaces, no surrounding spaces.

    Control characters (NUL, line endings, tabs) become spaces and format
    characters (zero-width spaces and joiners, byte-order marks) are removed,
    so two texts that look the same compare equal.
    """
    text = unicodedata.normalize("NFC", text)
    kept = []
    for character in text:
        category = unicodedata.category(character)
        if category == "Cc":
            kept.append(" ")
        elif category != "Cf":
            kept.append(character)
    return _SPACES.sub(" ", "".join(kept)).strip()


def shorten(text: str, width: int = 80) -> str:
    """Return ``text`` cut to ``width`` characters for log messages, marking the cut."""
    return text if len(text) <= width else text[: width - 3] + "..."


def normalise_concepts(raw: Iterable[Concept | str], source: str) -> NormalisedConcepts:
    """Clean a raw concept list.

    Blank entries are dropped and counted.  Entries equal after cleaning and
    case-folding are duplicates: the first one is kept and the others are
    listed in the warning and in the run record.  Raises
    :class:`ConceptSetError` when nothing is left.
    """
    result = NormalisedConcepts(concepts=[])
    seen: dict[str, str] = {}
    for item in raw:
        concept = item if isinstance(item, Concept) else Concept(text=str(item))
        text = clean_text(concept.text)
        if not text:
            result.blank_lines += 1
            continue
        key = text.casefold()
        if key in seen:
            result.duplicates.append({"kept": seen[key], "dropped": text})
            continue
        seen[key] = text
        result.concepts.append(Concept(text=text, category=concept.category, broad_category=concept.broad_category))
    if result.blank_lines:
        logger.info("concept set %s: dropped %d blank line(s)", source, result.blank_lines)
    if result.duplicates:
        listed = "; ".join(
            f"{shorten(d['dropped'])!r} (same as {shorten(d['kept'])!r})" for d in result.duplicates[:20]
        )
        logger.warning("concept set %s: dropped %d duplicate(s): %s", source, len(result.duplicates), listed)
    if not result.concepts:
        raise ConceptSetError(
            f"concept set {source} is empty after dropping blank lines and duplicates; "
            f"put one concept per line"
        )
    return result


def over_long_concepts(
    texts: Iterable[str],
    count_tokens: Callable[[str], int] | None,
    limit: int,
) -> list[tuple[str, int]]:
    """Return ``(text, token count)`` for every text longer than ``limit`` tokens.

    ``count_tokens`` is the dissector's tokenizer (for CLIP's BPE the limit
    is 77 including the start and end tokens).  Without a tokenizer, words
    separated by spaces are counted, which underestimates BPE token counts.
    """
    if limit < 1:
        raise ConceptSetError(f"token limit must be at least 1, got {limit}")
    counter = count_tokens or (lambda text: len(text.split()))
    found = []
    for text in texts:
        count = int(counter(text))
        if count > limit:
            found.append((text, count))
    return found

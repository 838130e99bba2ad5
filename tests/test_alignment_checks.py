"""Tests of the alignment card's extra checks: shortcuts, unseen paraphrases, leave-concept-out, symmetric loss."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mammo_dissect.concept_sets.paraphrases import builtin_paraphrases
from mammo_dissect.concept_sets.paraphrases import read_paraphrases
from mammo_dissect.core.alignment import Pairs
from mammo_dissect.core.alignment import TrainingConfig
from mammo_dissect.core.alignment import build_pairs
from mammo_dissect.core.alignment import contrastive_loss
from mammo_dissect.core.alignment import fold_heads
from mammo_dissect.core.alignment import multi_positive_loss
from mammo_dissect.core.alignment import patient_folds
from mammo_dissect.core.alignment import text_to_image_loss
from mammo_dissect.core.alignment import without_concept
from mammo_dissect.core.alignment_checks import concept_warnings
from mammo_dissect.core.alignment_checks import leave_out_choice
from mammo_dissect.core.alignment_checks import leave_out_section
from mammo_dissect.core.alignment_checks import paraphrase_checks
from mammo_dissect.core.alignment_checks import paraphrase_table
from mammo_dissect.core.alignment_checks import paraphrase_variants
from mammo_dissect.core.alignment_checks import shortcut_checks
from mammo_dissect.core.alignment_data import Sample
from mammo_dissect.core.alignment_data import SourceSamples
from mammo_dissect.core.alignment_data import shortcut_values
from mammo_dissect.core.errors import ConceptSetError
from mammo_dissect.core.errors import ConfigError


def two_concept_pairs(n: int = 40) -> Pairs:
    """Return pairs of one source: samples alternate between concept "mass" and concept "normal", one patient each."""
    captions = [("mass",) if index % 2 == 0 else ("normal",) for index in range(n)]
    samples = [Sample("crops", index, f"i{index}", f"p{index}", caption) for index, caption in enumerate(captions)]
    source = SourceSamples("crops", "lesions", SimpleNamespace(reader="r"), samples, ["mass", "normal"])  # type: ignore[arg-type]
    return build_pairs([source])


def record(concept: str, ci_low: float | None, gated: bool = True) -> dict:
    return {"source": "crops", "concept": concept, "auroc": 0.8, "ci_low": ci_low, "gated": gated,
            "random_head_p95": 0.6, "reason": "passes"}


# ---------------------------------------------------------------- shortcuts


def test_predictive_crop_size_is_flagged() -> None:
    pairs = two_concept_pairs()
    is_mass = pairs.targets[:, 0] == 1
    values = np.column_stack([np.where(is_mass, 96.0, 64.0), np.full(len(is_mass), 0.25)])
    records = [record("mass", 0.7), record("normal", 0.7)]
    shortcut_checks(records, pairs, values, gate_on_flags=False)
    mass = records[0]
    assert mass["shortcuts"]["crop_side"] == {"auroc": 1.0, "strength": 1.0, "constant": False}
    assert mass["shortcuts"]["background_fraction"]["constant"] is True
    assert mass["shortcut_flags"] == ["crop_side"]
    # Smaller crops predict "normal": the AUROC is 0, the strength still 1.
    assert records[1]["shortcuts"]["crop_side"]["auroc"] == 0.0
    assert records[1]["shortcut_flags"] == ["crop_side"]
    assert mass["gated"] is True
    warnings = concept_warnings(records)
    assert "crop side alone reaches AUROC 1.000" in warnings["mass"][0]


def test_weak_shortcut_not_flagged_strong_ungated() -> None:
    pairs = two_concept_pairs()
    rng = np.random.default_rng(0)
    values = np.column_stack([rng.normal(size=40), rng.normal(size=40)])
    weak = [record("mass", 0.95)]
    shortcut_checks(weak, pairs, values, gate_on_flags=True)
    assert weak[0]["shortcut_flags"] == []
    assert weak[0]["gated"] is True

    is_mass = pairs.targets[:, 0] == 1
    strong = [record("mass", 0.7)]
    shortcut_checks(strong, pairs, np.column_stack([is_mass * 1.0, is_mass * 1.0]), gate_on_flags=True)
    assert strong[0]["gated"] is False
    assert "shortcuts_gate" in strong[0]["reason"]


def test_shortcut_values_side_and_background() -> None:
    image = np.zeros((64, 64), dtype=np.float32)
    image[:, :32] = 0.8  # the breast fills the left half
    probe_set = SimpleNamespace(reader="r", read=lambda index: image)
    samples = [
        Sample("s", 0, "a", "p", ("x",), box=(0, 0, 32)),  # inside the breast
        Sample("s", 0, "a", "p", ("x",), box=(0, 16, 32)),  # half breast, half background
        Sample("s", 0, "a", "p", ("x",), box=(-16, 48, 32)),  # background and padding
        Sample("s", 0, "a", "p", ("x",)),  # whole image
    ]
    source = SourceSamples("s", "lesions", probe_set, samples, ["x"])  # type: ignore[arg-type]
    values = shortcut_values(source, 0.1, cache=None)
    assert values[:, 0].tolist() == [32, 32, 32, 64]
    assert values[:, 1].tolist() == pytest.approx([0.0, 0.5, 1.0, 0.5])


# ---------------------------------------------------------------- paraphrases


def test_paraphrase_table_merge_order() -> None:
    table = paraphrase_table(
        ["mass"],
        builtin={"mass": ["lump", "nodule"]},
        from_file={"mass": ["lesion", "lump"]},
        configured={"mass": ["tumour"]},
        minimum=2,
    )
    assert table == {"mass": ["tumour", "lesion", "lump", "nodule"]}


def test_paraphrase_table_rejects_bad_lists() -> None:
    with pytest.raises(ConfigError, match="'Normal' of concept 'mass' is itself a training concept"):
        paraphrase_table(["mass", "normal"], {"mass": ["Normal", "lump"], "normal": ["a", "b"]}, {}, {}, 2)
    with pytest.raises(ConfigError, match=r"2 concept\(s\) have fewer than 2 paraphrases: 'mass' \(1\), 'aircraft' \(0\)"):
        paraphrase_table(["mass", "aircraft"], {"mass": ["lump"]}, {}, {}, 2)


def test_paraphrase_checks_worst_and_fragile() -> None:
    pairs = two_concept_pairs()
    is_mass = pairs.targets[:, 0]
    good = np.column_stack([is_mass, 1 - is_mass])
    reversed_scores = 1 - good
    variants = paraphrase_variants(["mass", "normal"], {"mass": ["lump", "nodule"], "normal": ["healthy"]})
    assert variants == [["lump", "healthy"], ["nodule", None]]
    records = [record("mass", 0.7), record("normal", 0.7)]
    paraphrase_checks(records, pairs, variants, [good, reversed_scores])
    mass, normal = records
    assert [item["text"] for item in mass["paraphrases"]] == ["lump", "nodule"]
    assert mass["paraphrase_worst_text"] == "nodule"
    assert mass["paraphrase_worst_auroc"] == 0.0
    assert mass["paraphrase_fragile"] is True
    assert normal["paraphrases"] == [{"text": "healthy", "auroc": 1.0}]
    assert normal["paraphrase_fragile"] is False
    assert "'nodule' scores AUROC 0.000" in concept_warnings(records)["mass"][0]


def test_builtin_paraphrases_cover_probe_sets() -> None:
    from mammo_dissect.plugins.probe_sets import cbis_ddsm_csv
    from mammo_dissect.plugins.probe_sets import ddsm_seg66
    from mammo_dissect.plugins.probe_sets import mini_mias
    from mammo_dissect.plugins.probe_sets import rsna_screening
    from mammo_dissect.plugins.probe_sets import vindr_mammo
    from mammo_dissect.plugins.probe_sets.manifest import BIRADS_VOCABULARY

    vocabulary = {
        *mini_mias.ANNOTATION_VOCABULARY,
        *ddsm_seg66.TISSUE_CONCEPTS.values(),
        *ddsm_seg66.VOLUME_CONCEPTS.values(),
        *cbis_ddsm_csv.DENSITY_CONCEPTS.values(),
        *cbis_ddsm_csv.PATHOLOGY_CONCEPTS.values(),
        *vindr_mammo.DENSITY_LETTER_CONCEPTS.values(),
        *vindr_mammo.FINDING_CONCEPTS.values(),
        *(text for table in rsna_screening.FLAG_CONCEPTS.values() for text in table.values()),
        *BIRADS_VOCABULARY,
    }
    table = paraphrase_table(sorted(vocabulary), builtin_paraphrases(), {}, {}, 2)
    assert set(table) == vocabulary


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("mass\n", "has no paraphrase"),
        ("mass\tlump\t\tnodule\n", "empty paraphrase"),
        ("mass\tlump\nmass\tnodule\n", "appears a second time"),
    ],
)
def test_invalid_paraphrase_files_rejected(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "paraphrases.tsv"
    path.write_text("# concept\tparaphrases\n" + content, encoding="utf-8")
    with pytest.raises(ConceptSetError, match=message):
        read_paraphrases(path)


def test_paraphrase_file_missing_or_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConceptSetError, match="not found"):
        read_paraphrases(tmp_path / "none.tsv")
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("tumeur\tl\xe9sion\tnodule\n".encode("latin-1"))
    with pytest.raises(ConceptSetError, match="not UTF-8"):
        read_paraphrases(latin)


# ---------------------------------------------------------------- leave-concept-out


def test_without_concept_clears_column() -> None:
    pairs = two_concept_pairs(6)
    left = without_concept(pairs, 0)
    assert left.targets[:, 0].sum() == 0
    assert not left.allowed[:, 0].any()
    assert (left.targets[:, 1] == pairs.targets[:, 1]).all()
    assert pairs.targets[:, 0].sum() == 3  # the original is untouched


def test_leave_out_choice_order() -> None:
    records = [
        {"concept": "a", "auroc": 0.9}, {"concept": "b", "auroc": 0.8}, {"concept": "c", "auroc": None},
    ]
    assert leave_out_choice(records, ["b"], []) == ["b"]
    assert leave_out_choice(records, [], []) == ["a"]
    assert leave_out_choice(records, ["b"], ["c"]) == ["c"]
    assert leave_out_choice([{"concept": "c", "auroc": None}], [], []) == []


def test_leave_out_section_scores_concept() -> None:
    import torch

    rng = np.random.default_rng(0)
    pairs = two_concept_pairs(60)
    is_mass = pairs.targets[:, 0]
    features = (rng.normal(size=(60, 8)) + np.outer(is_mass, np.eye(8)[0]) * 3).astype(np.float32)
    text = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(2, 16)).astype(np.float32)), dim=1)
    settings = TrainingConfig(folds=3, epochs=30, bootstrap=100)
    folds = patient_folds(pairs.patients.tolist(), 3, 0)
    trained = fold_heads(features, pairs, folds, text, settings, 0).scores(features, text)
    left = fold_heads(features, without_concept(pairs, 0), folds, text, settings, 0).scores(features, text)
    records = [{"source": "crops", "concept": "mass", "auroc": 0.99}]
    random_heads = [rng.normal(size=(60, 2)) for _ in range(10)]
    section = leave_out_section(pairs, 0, left, random_heads, records, settings)
    assert section["concept"] == "mass"
    (result,) = section["sources"]
    assert result["trained_auroc"] == 0.99
    assert 0.0 <= result["ci_low"] <= result["auroc"] <= result["ci_high"] <= 1.0
    assert isinstance(result["would_pass_gate"], bool)
    # Trained and left-out heads differ: the left-out run saw no "mass" caption.
    assert not np.allclose(trained[:, 0], left[:, 0])


# ---------------------------------------------------------------- symmetric loss


def test_text_to_image_loss_formula() -> None:
    import torch

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    allowed = torch.tensor([[True, True], [True, True], [False, True]])
    first = -torch.log_softmax(torch.tensor([2.0, 0.0]), dim=0)[0]
    second_terms = torch.log_softmax(torch.tensor([0.0, 1.0, 3.0]), dim=0)
    second = -(second_terms[1] + second_terms[2]) / 2
    assert torch.isclose(text_to_image_loss(logits, targets, allowed), (first + second) / 2)
    symmetric = contrastive_loss(logits, targets, allowed, "symmetric")
    assert torch.isclose(symmetric, (multi_positive_loss(logits, targets, allowed) + (first + second) / 2) / 2)
    assert torch.isclose(contrastive_loss(logits, targets, allowed, "image_to_text"),
                         multi_positive_loss(logits, targets, allowed))


def test_text_to_image_loss_without_positives() -> None:
    import torch

    logits = torch.ones(3, 2, requires_grad=True)
    loss = text_to_image_loss(logits, torch.zeros(3, 2), torch.ones(3, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


def test_chance_heads_get_no_flags() -> None:
    pairs = two_concept_pairs()
    is_mass = pairs.targets[:, 0] == 1
    records = [record("mass", 0.45)]
    shortcut_checks(records, pairs, np.column_stack([is_mass * 1.0, is_mass * 1.0]), gate_on_flags=False)
    assert records[0]["shortcuts"]["crop_side"]["strength"] == 1.0
    assert records[0]["shortcut_flags"] == []
    records[0].update(paraphrase_fragile=True, paraphrase_worst_text="lump", paraphrase_worst_auroc=0.4)
    assert concept_warnings(records) == {}


def test_paraphrase_table_rejects_unknown_configured_key() -> None:
    with pytest.raises(ConfigError, match="names 'fatty tisue', which is not a concept of the vocabulary"):
        paraphrase_table(["fatty tissue"], {"fatty tissue": ["fat", "adipose"]}, {}, {"fatty tisue": ["fat"]}, 2)


def test_paraphrase_file_checks_folder_and_empty_concept(tmp_path: Path) -> None:
    with pytest.raises(ConceptSetError, match="is a folder"):
        read_paraphrases(tmp_path)
    path = tmp_path / "paraphrases.tsv"
    path.write_text("\tadipose tissue\tfat\n", encoding="utf-8")
    with pytest.raises(ConceptSetError, match="line 1: the concept field is empty"):
        read_paraphrases(path)


@pytest.mark.parametrize(
    ("text_encoder", "message"),
    [
        ({"paraphrases": {"fatty tissue": ["adipose tissue", " "]}}, "contain an empty string"),
        ({"paraphrase_file": ""}, "paraphrase_file is empty"),
        ({"min_paraphrases": 1}, "greater than or equal to 2"),
    ],
)
def test_text_encoder_options_rejected(text_encoder: dict, message: str) -> None:
    from mammo_dissect.core.alignment import read_config

    config = {"sources": [{"name": "s", "kind": "whole", "probe_set": "mini-mias"}], "text_encoder": text_encoder}
    with pytest.raises(ConfigError, match=message):
        read_config(config)


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"leave_out": ["normal", "normal"]}, "listed more than once: normal"),
        ({"shortcuts_gate": "yes"}, "valid boolean"),
        ({"min_positive_patients": 0}, "greater than or equal to 1"),
    ],
)
def test_training_options_rejected(training: dict, message: str) -> None:
    from mammo_dissect.core.alignment import read_config

    config = {"sources": [{"name": "s", "kind": "whole", "probe_set": "mini-mias"}], "training": training}
    with pytest.raises(ConfigError, match=message):
        read_config(config)


def test_leave_out_unknown_concept_hints_case() -> None:
    from mammo_dissect.core.alignment_pipeline import check_leave_out

    with pytest.raises(ConfigError, match=r"'Pectoral Muscle'.*did you mean 'pectoral muscle' for 'Pectoral Muscle'"):
        check_leave_out(["Pectoral Muscle"], ["pectoral muscle", "fatty tissue"])
    check_leave_out(["fatty tissue"], ["pectoral muscle", "fatty tissue"])


def test_gate_needs_enough_positive_patients() -> None:
    from mammo_dissect.core.alignment import evaluate

    captions = [("mass",) if index < 3 else ("normal",) for index in range(30)]
    samples = [Sample("crops", index, f"i{index}", f"p{index}", caption) for index, caption in enumerate(captions)]
    source = SourceSamples("crops", "lesions", SimpleNamespace(reader="r"), samples, ["mass", "normal"])  # type: ignore[arg-type]
    pairs = build_pairs([source])
    perfect = pairs.targets.copy()
    rng = np.random.default_rng(0)
    random_heads = [rng.normal(size=perfect.shape) for _ in range(10)]
    for minimum, gated in ((3, True), (4, False)):
        settings = TrainingConfig(bootstrap=100, min_positive_patients=minimum)
        mass = evaluate(pairs, perfect, random_heads, random_heads[:3], perfect, settings)[0]
        assert mass["concept"] == "mass"
        assert mass["gated"] is gated, mass["reason"]
    assert "only 3 patient(s) with the concept" in mass["reason"]


def test_failed_training_leaves_no_output(tmp_path: Path, synthetic_probe: Path, tiny_registry: object) -> None:
    from mammo_dissect.core.alignment import train_alignment

    config = {
        "cache_dir": str(tmp_path / "cache"),
        "sources": [{"name": "s", "kind": "whole", "probe_set": "synthetic", "options": {"root": str(synthetic_probe)}}],
    }
    with pytest.raises(ConfigError, match="fewer than 2 paraphrases"):
        train_alignment(config, tmp_path / "card")
    assert not (tmp_path / "card").exists()

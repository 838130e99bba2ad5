"""Python API (load_dissector, load_target) and the dissector check (AUROC per annotated concept)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mammo_dissect.core.api import load_dissector
from mammo_dissect.core.api import load_target
from mammo_dissect.core.check_dissector import auroc
from mammo_dissect.core.check_dissector import check_dissector
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.tests import mammo_clip_files as files


@pytest.fixture(autouse=True)
def registry_with_new_plugins(monkeypatch):
    """A registry that includes this change's plugins, whether or not DEFAULT_PLUGINS lists them yet."""
    from mammo_dissect.core import plugins

    modules = [
        "mammo_dissect.plugins.dissectors.mammo_clip",
        "mammo_dissect.plugins.targets.mammo_clip",
        "mammo_dissect.plugins.targets.torchvision_models",
    ]
    extra = [module for module in modules if module not in plugins.DEFAULT_PLUGINS]
    monkeypatch.setattr(plugins, "DEFAULT_PLUGINS", (*plugins.DEFAULT_PLUGINS, *extra))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    plugins.set_registry(None)


def test_load_dissector_returns_unit_rows(tmp_path):
    state = files.build_clip_state("b2")
    checkpoint = files.save_official(tmp_path / "b2.tar", "b2", state)
    tokenizer = files.write_tokenizer_dir(tmp_path / "tokenizer")
    dissector = load_dissector("mammo_clip", checkpoint=str(checkpoint), tokenizer=str(tokenizer))
    images = dissector.encode_images(torch.randn(2, 3, 64, 48))
    texts = dissector.encode_texts(["mass", "dense tissue"])
    assert torch.allclose(images.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(texts.norm(dim=1), torch.ones(2), atol=1e-5)
    assert dissector.preprocess.describe()["size_hw"] == [1520, 912]


def test_load_dissector_rejects_annotation():
    with pytest.raises(ConfigError, match="cannot be loaded on its own"):
        load_dissector("annotation")


def test_load_dissector_validates_options():
    with pytest.raises(ConfigError, match="checkpoint: required field is missing"):
        load_dissector("mammo_clip", tokenizer="/tmp")


def test_load_target_activations(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(num_classes=3).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), path)
    target = load_target("torchvision", model="resnet18", weights=str(path), num_classes=3)
    assert "layer4.1" in target.layer_names()
    batch = torch.randn(2, 3, 64, 64)
    pooled = target.activations(batch, ["layer4[1]", "fc"])
    assert pooled["layer4[1]"].shape == (2, 512)
    with torch.no_grad():
        assert torch.allclose(pooled["fc"], model(batch), atol=1e-6)


def brute_force_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    positives = scores[labels == 1]
    negatives = scores[labels == 0]
    wins = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    return float(wins / (positives.size * negatives.size))


def test_auroc_matches_pair_count_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=50).astype(float)
    labels = rng.integers(0, 2, size=50)
    assert auroc(scores, labels) == pytest.approx(brute_force_auroc(scores, labels))


def test_auroc_extremes():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5


def test_auroc_needs_both_classes():
    with pytest.raises(ConfigError, match="positive and negative"):
        auroc([0.1, 0.2], [1, 1])


def test_check_dissector_flags_near_chance():
    rng = np.random.default_rng(1)
    labels = np.zeros((80, 3))
    labels[:40, 0] = 1
    labels[::2, 1] = 1
    similarity = rng.normal(size=(80, 2))
    similarity[:, 0] += labels[:, 0] * 3
    results = check_dissector(
        similarity, ["Mass", "calcification"], labels, ["mass", "calcification", "architectural distortion"], resamples=200
    )
    by_concept = {result.concept: result for result in results}
    assert set(by_concept) == {"mass", "calcification"}
    assert by_concept["mass"].status == "ok"
    assert by_concept["mass"].auroc > 0.9
    assert by_concept["calcification"].near_chance
    assert by_concept["calcification"].ci_low < 0.5 < by_concept["calcification"].ci_high


def test_check_dissector_undefined_without_negatives():
    labels = np.ones((10, 1))
    results = check_dissector(np.random.default_rng(0).normal(size=(10, 1)), ["mass"], labels, ["mass"])
    assert results[0].status == "undefined"
    assert results[0].auroc is None

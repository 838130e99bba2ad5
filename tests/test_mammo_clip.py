"""Mammo-CLIP dissector: files in the official format load strictly and embed like an independent build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mammo_dissect.core.errors import ConceptSetError
from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.plugins.dissectors.mammo_clip import MammoClipDissector
from mammo_dissect.plugins.dissectors.mammo_clip import MammoClipOptions
from mammo_dissect.tests import mammo_clip_files as files


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def b2_files(tmp_path_factory) -> tuple[Path, Path, dict]:
    directory = tmp_path_factory.mktemp("mammo_clip")
    state = files.build_clip_state("b2")
    checkpoint = files.save_official(directory / "b2-model-best-epoch-10.tar", "b2", state)
    tokenizer = files.write_tokenizer_dir(directory / "Bio_ClinicalBERT")
    return checkpoint, tokenizer, state


def load(checkpoint: Path, tokenizer: Path, **options):
    return MammoClipDissector().load(MammoClipOptions(checkpoint=str(checkpoint), tokenizer=str(tokenizer), **options))


def save_variant(tmp_path: Path, state: dict, name: str = "changed.tar") -> Path:
    return files.save_official(tmp_path / name, "b2", state)


def test_image_embeddings_match_reference(b2_files):
    checkpoint, tokenizer, state = b2_files
    loaded = load(checkpoint, tokenizer)
    images = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    expected = files.reference_image_embedding(state, "b2", images)
    actual = loaded.encode_images(images)
    assert loaded.variant == "b2"
    assert actual.shape == (2, 16)
    assert torch.allclose(actual, expected, atol=1e-5)
    assert float(actual.std()) > 1e-3


def test_text_embeddings_match_reference(b2_files):
    checkpoint, tokenizer, state = b2_files
    loaded = load(checkpoint, tokenizer)
    texts = ["spiculated mass", "dense tissue of the breast"]
    tokens = loaded.tokenizer(texts, padding="max_length", max_length=256, truncation=True, return_tensors="pt")
    expected = files.reference_text_embedding(state, tokens["input_ids"], tokens["attention_mask"])
    assert torch.allclose(loaded.encode_texts(texts), expected, atol=1e-5)


def test_tokenizer_uses_directory_vocabulary(b2_files):
    checkpoint, tokenizer, _state = b2_files
    loaded = load(checkpoint, tokenizer)
    vocabulary = files.VOCAB_WORDS
    ids = loaded.tokenizer("spiculated mass")["input_ids"]
    assert ids == [vocabulary.index("[CLS]"), vocabulary.index("spiculated"), vocabulary.index("mass"), vocabulary.index("[SEP]")]
    assert len(loaded.tokenizer) == len(vocabulary)


def test_sentence_token_is_last_sep(b2_files):
    checkpoint, tokenizer, _state = b2_files
    loaded = load(checkpoint, tokenizer)
    short = loaded.encode_texts(["mass"])
    padded_batch = loaded.encode_texts(["mass", "a dense mass of the breast"])
    assert torch.allclose(short[0], padded_batch[0], atol=1e-5)


def test_prompt_template_applied(b2_files):
    checkpoint, tokenizer, _state = b2_files
    plain = load(checkpoint, tokenizer)
    templated = load(checkpoint, tokenizer, prompt_template="mammogram showing {}")
    assert torch.allclose(templated.encode_texts(["mass"]), plain.encode_texts(["mammogram showing mass"]), atol=1e-6)


def test_preprocess_is_official(b2_files):
    checkpoint, tokenizer, _state = b2_files
    description = load(checkpoint, tokenizer).preprocess.describe()
    assert description["size_hw"] == [1520, 912]
    assert description["per_image_minmax"] is True
    assert description["mean"] == [0.3089279] * 3
    assert description["std"] == [0.25053555408335154] * 3
    assert description["grey_to_rgb"] == "replicate"


def test_long_concept_rejected_or_truncated(b2_files, caplog):
    checkpoint, tokenizer, _state = b2_files
    long_concept = " ".join(["mass"] * 300)
    with pytest.raises(ConceptSetError, match="256 tokens"):
        load(checkpoint, tokenizer).check_texts([long_concept])
    truncating = load(checkpoint, tokenizer, truncate_long_concepts=True)
    truncating.check_texts([long_concept])
    assert "truncated" in caplog.text
    assert truncating.encode_texts([long_concept]).shape == (1, 16)


def test_vocabulary_mismatch_rejected(b2_files, tmp_path):
    checkpoint, _tokenizer, _state = b2_files
    other = files.write_tokenizer_dir(tmp_path / "other")
    (other / "vocab.txt").write_text("\n".join([*files.VOCAB_WORDS, "extra"]) + "\n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="word embeddings have"):
        load(checkpoint, other)


def test_tokenizer_path_missing(b2_files, tmp_path):
    checkpoint, _tokenizer, _state = b2_files
    with pytest.raises(ModelLoadError, match="Bio_ClinicalBERT directory"):
        load(checkpoint, tmp_path / "absent")


def test_missing_key_listed(b2_files, tmp_path):
    _checkpoint, tokenizer, state = b2_files
    changed = dict(state)
    del changed["image_encoder._blocks.3._bn1.weight"]
    with pytest.raises(ModelLoadError, match=r"missing keys \(1\): image_encoder._blocks.3._bn1.weight"):
        load(save_variant(tmp_path, changed), tokenizer)


def test_extra_key_listed(b2_files, tmp_path):
    _checkpoint, tokenizer, state = b2_files
    changed = dict(state)
    changed["image_encoder._fc.weight"] = torch.zeros(3, 1408)
    with pytest.raises(ModelLoadError, match=r"unexpected keys \(1\): image_encoder._fc.weight"):
        load(save_variant(tmp_path, changed), tokenizer)


def test_position_ids_tolerated(b2_files, tmp_path):
    _checkpoint, tokenizer, state = b2_files
    changed = dict(state)
    changed["text_encoder.text_encoder.embeddings.position_ids"] = torch.arange(300).unsqueeze(0)
    assert load(save_variant(tmp_path, changed), tokenizer).variant == "b2"


def test_module_prefix_stripped(b2_files, tmp_path):
    _checkpoint, tokenizer, state = b2_files
    prefixed = {f"module.{key}": value for key, value in state.items()}
    loaded = load(save_variant(tmp_path, prefixed), tokenizer)
    images = torch.randn(1, 3, 64, 48)
    assert torch.allclose(loaded.encode_images(images), files.reference_image_embedding(state, "b2", images), atol=1e-5)


def test_wrong_shape_listed(b2_files, tmp_path):
    _checkpoint, tokenizer, state = b2_files
    changed = dict(state)
    changed["text_projection.projection.bias"] = torch.zeros(17)
    with pytest.raises(ModelLoadError, match=r"shape mismatches \(1\): text_projection.projection.bias"):
        load(save_variant(tmp_path, changed), tokenizer)


def test_config_disagreeing_with_weights_rejected(b2_files, tmp_path):
    _checkpoint, tokenizer, state = b2_files
    path = tmp_path / "mislabelled.tar"
    with files.fake_omegaconf() as omegaconf:
        torch.save({"model": dict(state), "config": files.training_config("b5", omegaconf)}, path)
    with pytest.raises(ModelLoadError, match="names an EfficientNet-B5"):
        load(path, tokenizer)


def test_hostile_checkpoint_rejected(b2_files, tmp_path):
    from mammo_dissect.tests.test_safe_pickle import CallsMarkerFunction

    _checkpoint, tokenizer, state = b2_files
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.tar"
    torch.save({"model": dict(state), "config": CallsMarkerFunction(str(marker))}, path)
    with pytest.raises(ModelLoadError, match="may be hostile"):
        load(path, tokenizer)
    assert not marker.exists()


def test_converted_copy_embeds_the_same(b2_files, tmp_path):
    from mammo_dissect.core.convert import convert_checkpoint

    checkpoint, tokenizer, _state = b2_files
    sidecar = convert_checkpoint(checkpoint, tmp_path / "b2.safetensors")
    content = json.loads(sidecar.read_text())
    assert content["image_encoder"] == "b2"
    assert content["kind"] == "clip"
    assert content["config"]["model"]["image_encoder"]["name"] == "tf_efficientnetv2-detect"
    assert content["metadata"]["epoch"] == 7
    original = load(checkpoint, tokenizer)
    converted = load(tmp_path / "b2.safetensors", tokenizer)
    images = torch.randn(1, 3, 64, 48)
    assert torch.equal(original.encode_images(images), converted.encode_images(images))
    assert torch.equal(original.encode_texts(["mass"]), converted.encode_texts(["mass"]))


def test_image_concept_matrix_shape(b2_files, tmp_path):
    from PIL import Image

    from mammo_dissect.core.types import ProbeImage
    from mammo_dissect.core.types import ProbeSet
    from mammo_dissect.core.types import Runtime

    checkpoint, tokenizer, _state = b2_files
    images = []
    for index in range(2):
        path = tmp_path / f"image{index}.png"
        Image.fromarray((np.random.default_rng(index).random((40, 24)) * 255).astype(np.uint8)).save(path)
        images.append(ProbeImage(image_id=f"image{index}", path=path))
    probe_set = ProbeSet(reader="test", root=tmp_path, images=images)
    dissector = MammoClipDissector()
    options = MammoClipOptions(checkpoint=str(checkpoint), tokenizer=str(tokenizer))
    # A 64 x 48 input keeps the test fast; the official size is checked in test_preprocess_is_official.
    loaded = dissector.load(options)
    loaded.preprocess.size = (64, 48)
    from mammo_dissect.core.embedding import embed_and_compare

    matrix = embed_and_compare(loaded, probe_set, ["mass", "dense tissue"], Runtime(batch_size=2, progress=False))
    assert matrix.shape == (2, 2)
    assert float(matrix.abs().max()) <= 1.0 + 1e-6


@pytest.mark.slow
def test_b5_encoder_full_size_matches_reference(tmp_path):
    from mammo_dissect.plugins.targets.mammo_clip import MammoClipEncoderLoader
    from mammo_dissect.plugins.targets.mammo_clip import MammoClipTargetOptions

    encoder = files.build_reference_encoder("b5", seed=2)
    state = {f"image_encoder.{key}": value for key, value in encoder.state_dict().items()}
    path = files.save_official(tmp_path / "b5-model-best-epoch-7.tar", "b5", {**state, "text_projection.projection.weight": torch.zeros(2, 2)})
    target = MammoClipEncoderLoader().load(MammoClipTargetOptions(checkpoint=str(path)))
    assert len(target.model._blocks) == 39
    image = target.preprocess(np.random.default_rng(0).random((1520, 912)).astype(np.float32)).unsqueeze(0)
    assert image.shape == (1, 3, 1520, 912)
    with torch.no_grad():
        expected = torch.nn.functional.adaptive_avg_pool2d(encoder.extract_features(image), 1).flatten(1)
        actual = target.model(image)
    assert actual.shape == (1, 2048)
    assert torch.allclose(actual, expected, atol=1e-5)

"""Tests of the open_clip dissector plugin and of embed_and_compare, on a tiny model built offline."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mammo_dissect.core.embedding import embed_and_compare
from mammo_dissect.core.errors import ConceptSetError
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.errors import MammoDissectError
from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.types import LoadedDissector
from mammo_dissect.core.types import ProbeImage
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import Runtime
from mammo_dissect.core.types import validate_options
from mammo_dissect.plugins.dissectors.open_clip import OpenClipDissector
from mammo_dissect.plugins.dissectors.open_clip import OpenClipOptions


ARCHITECTURE = "mammo-dissect-test-tiny"
CONTEXT_LENGTH = 16
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CONCEPTS = ["mass", "calcification", "architectural distortion", "dense breast tissue", "skin thickening"]
RUNTIME = Runtime(batch_size=2, device="cpu", num_workers=0, progress=False)
HOW_TO_PASS = "path of a local checkpoint file"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put Hugging Face libraries offline and make every IP connection raise.

    Unix-domain sockets stay allowed because DataLoader workers use them.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    connect = socket.socket.connect

    def connect_locally(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"test tried to open a network connection to {address}")
        connect(self, address)

    def refuse(address: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"test tried to open a network connection to {address}")

    monkeypatch.setattr(socket.socket, "connect", connect_locally)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def tiny_files(tmp_path: Path) -> dict[str, Any]:
    """Write the tiny model config and its randomly initialised weights; return paths and model."""
    import open_clip

    config_path = tmp_path / f"{ARCHITECTURE}.json"
    config_path.write_text(json.dumps(TINY_CONFIG), encoding="utf-8")
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model = open_clip.create_model(ARCHITECTURE, pretrained=None)
    model.eval()
    weights_path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights_path)
    return {"config": config_path, "weights": weights_path, "model": model, "tmp_path": tmp_path}


@pytest.fixture
def probe_set(tmp_path: Path) -> ProbeSet:
    """Write five non-square synthetic images (grey and colour) and return them as a probe set."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "probes"
    folder.mkdir()
    images = []
    for index in range(5):
        shape = (48, 30) if index % 2 == 0 else (40, 56, 3)
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        path = folder / f"img{index}.png"
        Image.fromarray(pixels).save(path)
        images.append(ProbeImage(image_id=f"img{index}", path=path))
    return ProbeSet(reader="test", root=folder, images=images)


def make_options(files: dict[str, Any], **overrides: Any) -> OpenClipOptions:
    """Validate open_clip options for the tiny model, with ``overrides`` applied."""
    values: dict[str, Any] = {
        "architecture": ARCHITECTURE,
        "weights": str(files["weights"]),
        "model_config": str(files["config"]),
    }
    values.update(overrides)
    options = validate_options(OpenClipOptions, values, "dissector.options")
    assert isinstance(options, OpenClipOptions)
    return options


def load_error(files: dict[str, Any], **overrides: Any) -> str:
    """Return the ModelLoadError message that loading with ``overrides`` raises."""
    with pytest.raises(ModelLoadError) as caught:
        OpenClipDissector().load(make_options(files, **overrides))
    return str(caught.value)


def test_image_and_text_embeddings_match_model(tiny_files: dict[str, Any], probe_set: ProbeSet) -> None:
    loaded = OpenClipDissector().load(make_options(tiny_files))
    model = tiny_files["model"]
    import open_clip

    pixels = torch.stack([loaded.preprocess(probe_set.read(index)) for index in range(len(probe_set))])
    assert pixels.shape == (5, 3, 32, 32)
    with torch.no_grad():
        expected_images = model.encode_image(pixels)
        tokens = open_clip.get_tokenizer(ARCHITECTURE)(CONCEPTS)
        expected_texts = model.encode_text(tokens)

    torch.testing.assert_close(loaded.encode_images(pixels), expected_images, atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded.encode_texts(CONCEPTS), expected_texts, atol=1e-6, rtol=0)
    assert loaded.max_text_tokens == CONTEXT_LENGTH
    assert loaded.weights_sha256 == hashlib.sha256(tiny_files["weights"].read_bytes()).hexdigest()


def test_embed_and_compare_equals_manual_cosine(tiny_files: dict[str, Any], probe_set: ProbeSet) -> None:
    loaded = OpenClipDissector().load(make_options(tiny_files))
    similarity = embed_and_compare(loaded, probe_set, CONCEPTS, RUNTIME)

    model = tiny_files["model"]
    pixels = torch.stack([loaded.preprocess(probe_set.read(index)) for index in range(len(probe_set))])
    with torch.no_grad():
        images = torch.nn.functional.normalize(model.encode_image(pixels), dim=1)
        texts = torch.nn.functional.normalize(loaded.encode_texts(CONCEPTS), dim=1)
    assert similarity.dtype == torch.float32
    assert similarity.device.type == "cpu"
    assert similarity.shape == (len(probe_set), len(CONCEPTS))
    torch.testing.assert_close(similarity, images @ texts.T, atol=1e-6, rtol=0)


def test_image_concept_matrix_through_plugin(tiny_files: dict[str, Any], probe_set: ProbeSet) -> None:
    dissector = OpenClipDissector()
    options = make_options(tiny_files)
    similarity = dissector.image_concept_matrix(options, probe_set, CONCEPTS, RUNTIME)
    direct = embed_and_compare(dissector.load(options), probe_set, CONCEPTS, RUNTIME)
    torch.testing.assert_close(similarity, direct, atol=0, rtol=0)


def test_batch_size_does_not_change_matrix(tiny_files: dict[str, Any], probe_set: ProbeSet) -> None:
    loaded = OpenClipDissector().load(make_options(tiny_files))
    one_batch = embed_and_compare(loaded, probe_set, CONCEPTS, Runtime(batch_size=64, progress=False))
    small_batches = embed_and_compare(loaded, probe_set, CONCEPTS, Runtime(batch_size=1, progress=False))
    torch.testing.assert_close(one_batch, small_batches, atol=1e-6, rtol=0)


def test_worker_processes_give_same_matrix(tiny_files: dict[str, Any], probe_set: ProbeSet) -> None:
    loaded = OpenClipDissector().load(make_options(tiny_files))
    in_process = embed_and_compare(loaded, probe_set, CONCEPTS, RUNTIME)
    workers = Runtime(batch_size=2, num_workers=2, progress=False)
    torch.testing.assert_close(embed_and_compare(loaded, probe_set, CONCEPTS, workers), in_process, atol=0, rtol=0)


@pytest.mark.parametrize("prefix", ["module.", "model."])
def test_wrapper_prefix_is_stripped(tiny_files: dict[str, Any], probe_set: ProbeSet, prefix: str) -> None:
    state_dict = torch.load(tiny_files["weights"], weights_only=True)
    prefixed = tiny_files["tmp_path"] / "wrapped.pt"
    torch.save({"state_dict": {f"{prefix}{key}": value for key, value in state_dict.items()}}, prefixed)

    loaded = OpenClipDissector().load(make_options(tiny_files, weights=str(prefixed)))
    plain = OpenClipDissector().load(make_options(tiny_files))
    pixels = loaded.preprocess(probe_set.read(0)).unsqueeze(0)
    torch.testing.assert_close(loaded.encode_images(pixels), plain.encode_images(pixels), atol=0, rtol=0)


def test_safetensors_weights_load(tiny_files: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state_dict = torch.load(tiny_files["weights"], weights_only=True)
    path = tiny_files["tmp_path"] / "tiny.safetensors"
    save_file({key: value.contiguous() for key, value in state_dict.items()}, str(path))

    loaded = OpenClipDissector().load(make_options(tiny_files, weights=str(path)))
    plain = OpenClipDissector().load(make_options(tiny_files))
    torch.testing.assert_close(loaded.encode_texts(CONCEPTS), plain.encode_texts(CONCEPTS), atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_loads(tiny_files: dict[str, Any]) -> None:
    path = tiny_files["tmp_path"] / "scripted.pt"
    torch.jit.save(torch.jit.script(tiny_files["model"]), str(path))

    loaded = OpenClipDissector().load(make_options(tiny_files, weights=str(path)))
    plain = OpenClipDissector().load(make_options(tiny_files))
    torch.testing.assert_close(loaded.encode_texts(CONCEPTS), plain.encode_texts(CONCEPTS), atol=0, rtol=0)


def test_missing_key_is_named(tiny_files: dict[str, Any]) -> None:
    state_dict = torch.load(tiny_files["weights"], weights_only=True)
    del state_dict["text_projection"]
    path = tiny_files["tmp_path"] / "missing.pt"
    torch.save(state_dict, path)

    message = load_error(tiny_files, weights=str(path))
    assert "missing keys (1): text_projection" in message
    assert "unexpected" not in message


def test_unexpected_key_is_named(tiny_files: dict[str, Any]) -> None:
    state_dict = torch.load(tiny_files["weights"], weights_only=True)
    state_dict["extra_head.weight"] = torch.zeros(2, 2)
    path = tiny_files["tmp_path"] / "unexpected.pt"
    torch.save(state_dict, path)

    message = load_error(tiny_files, weights=str(path))
    assert "unexpected keys (1): extra_head.weight" in message
    assert "missing" not in message


def test_unknown_prefix_is_not_stripped(tiny_files: dict[str, Any]) -> None:
    state_dict = torch.load(tiny_files["weights"], weights_only=True)
    path = tiny_files["tmp_path"] / "wrapped.pt"
    torch.save({f"clip.{key}": value for key, value in state_dict.items()}, path)

    message = load_error(tiny_files, weights=str(path))
    assert "clip.text_projection" in message
    assert "missing keys" in message


def test_shape_mismatch_is_named(tiny_files: dict[str, Any]) -> None:
    state_dict = torch.load(tiny_files["weights"], weights_only=True)
    state_dict["text_projection"] = torch.zeros(32, 8)
    path = tiny_files["tmp_path"] / "mismatch.pt"
    torch.save(state_dict, path)

    message = load_error(tiny_files, weights=str(path))
    assert "text_projection: file (32, 8) vs model (32, 16)" in message


def test_pickled_object_is_rejected(tiny_files: dict[str, Any]) -> None:
    path = tiny_files["tmp_path"] / "whole_model.pt"
    torch.save(tiny_files["model"], path)

    message = load_error(tiny_files, weights=str(path))
    assert "weights_only=True" in message
    assert "whole_model.pt" in message


def test_truncated_file_is_rejected(tiny_files: dict[str, Any]) -> None:
    path = tiny_files["tmp_path"] / "truncated.pt"
    path.write_bytes(tiny_files["weights"].read_bytes()[:1000])

    message = load_error(tiny_files, weights=str(path))
    assert "may be truncated" in message
    assert "truncated.pt" in message


@pytest.mark.parametrize(
    "weights",
    [
        "https://example.org/open_clip_pytorch_model.bin",
        "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
    ],
)
def test_url_weights_are_rejected(tiny_files: dict[str, Any], weights: str) -> None:
    message = load_error(tiny_files, weights=weights)
    assert "never downloaded" in message
    assert HOW_TO_PASS in message


def test_missing_weights_file_is_rejected(tiny_files: dict[str, Any]) -> None:
    missing = str(tiny_files["tmp_path"] / "nowhere" / "model.pt")
    message = load_error(tiny_files, weights=missing)
    assert "file not found" in message
    assert missing in message
    assert HOW_TO_PASS in message


def test_pretrained_tag_gets_hint(tiny_files: dict[str, Any]) -> None:
    message = load_error(tiny_files, architecture="ViT-B-32", model_config=None, weights="openai")
    assert "pretrained tag" in message
    assert HOW_TO_PASS in message


def test_tilde_path_is_not_expanded(tiny_files: dict[str, Any]) -> None:
    message = load_error(tiny_files, weights="~/models/tiny.pt")
    assert "'~' is not expanded" in message


def test_weights_directory_is_rejected(tiny_files: dict[str, Any]) -> None:
    message = load_error(tiny_files, weights=str(tiny_files["tmp_path"]))
    assert "is a directory" in message
    assert "tiny.pt" in message
    assert HOW_TO_PASS in message


def test_hf_hub_architecture_is_rejected(tiny_files: dict[str, Any]) -> None:
    message = load_error(tiny_files, architecture="hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", model_config=None)
    assert "'hf-hub:'" in message
    assert HOW_TO_PASS in message


def test_hf_text_tower_is_rejected(tiny_files: dict[str, Any]) -> None:
    config = json.loads(json.dumps(TINY_CONFIG))
    config["text_cfg"]["hf_tokenizer_name"] = "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract"
    path = tiny_files["tmp_path"] / "mammo-dissect-test-hf.json"
    path.write_text(json.dumps(config), encoding="utf-8")

    message = load_error(tiny_files, architecture="mammo-dissect-test-hf", model_config=str(path))
    assert "cannot be loaded offline" in message
    assert "BiomedNLP" in message


def test_model_config_stem_must_match(tiny_files: dict[str, Any]) -> None:
    message = load_error(tiny_files, architecture="other-name")
    assert f"set architecture = {ARCHITECTURE!r}" in message


def test_unknown_architecture_lists_close_names(tiny_files: dict[str, Any]) -> None:
    with pytest.raises(MammoDissectError) as caught:
        OpenClipDissector().load(make_options(tiny_files, architecture="ViT-B-23", model_config=None))
    assert "ViT-B-32" in str(caught.value)


def test_long_concept_is_rejected(tiny_files: dict[str, Any], probe_set: ProbeSet) -> None:
    long_concept = " ".join(["spiculated"] * 20)
    loaded = OpenClipDissector().load(make_options(tiny_files))
    with pytest.raises(ConceptSetError) as caught:
        embed_and_compare(loaded, probe_set, [*CONCEPTS, long_concept], RUNTIME)
    message = str(caught.value)
    assert repr(long_concept) in message
    assert f"text limit of {CONTEXT_LENGTH} tokens" in message
    assert "truncate_long_concepts" in message
    assert "'mass'" not in message


def test_long_concept_truncated_when_allowed(
    tiny_files: dict[str, Any],
    probe_set: ProbeSet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    long_concept = " ".join(["spiculated"] * 20)
    loaded = OpenClipDissector().load(make_options(tiny_files, truncate_long_concepts=True))
    with caplog.at_level(logging.WARNING):
        similarity = embed_and_compare(loaded, probe_set, [*CONCEPTS, long_concept], RUNTIME)
    assert similarity.shape == (len(probe_set), len(CONCEPTS) + 1)
    assert torch.isfinite(similarity).all()
    assert any(repr(long_concept) in record.getMessage() for record in caplog.records)


def test_prompt_template_changes_matrix(tiny_files: dict[str, Any], probe_set: ProbeSet) -> None:
    template = "a mammogram showing {}"
    dissector = OpenClipDissector()
    bare = dissector.image_concept_matrix(make_options(tiny_files), probe_set, CONCEPTS, RUNTIME)
    templated_options = make_options(tiny_files, prompt_template=template)
    templated = dissector.image_concept_matrix(templated_options, probe_set, CONCEPTS, RUNTIME)
    assert not torch.allclose(bare, templated)

    loaded = dissector.load(templated_options)
    plain = dissector.load(make_options(tiny_files))
    expected = plain.encode_texts([template.format(concept) for concept in CONCEPTS])
    torch.testing.assert_close(loaded.encode_texts(CONCEPTS), expected, atol=0, rtol=0)
    assert dissector.describe(templated_options)["prompt_template"] == template
    assert dissector.describe(make_options(tiny_files))["prompt_template"] is None


@pytest.mark.parametrize("template", ["no placeholder", "{} and {}", "{name} {}"])
def test_invalid_prompt_template_is_rejected(tiny_files: dict[str, Any], template: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_options(tiny_files, prompt_template=template)
    assert "prompt_template" in str(caught.value)


def test_unknown_option_is_rejected(tiny_files: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        make_options(tiny_files, pretrained="openai")
    assert "dissector.options.pretrained" in str(caught.value)


def test_describe_records_weights_and_preprocessing(tiny_files: dict[str, Any]) -> None:
    options = make_options(tiny_files)
    description = OpenClipDissector().describe(options)
    assert description["architecture"] == ARCHITECTURE
    assert description["weights_path"] == str(tiny_files["weights"])
    assert description["weights_sha256"] == hashlib.sha256(tiny_files["weights"].read_bytes()).hexdigest()
    assert description["options"]["model_config"] == str(tiny_files["config"])
    assert "centre-crops" in description["preprocessing_note"]


def test_preprocess_resizes_whole_image(tiny_files: dict[str, Any]) -> None:
    import open_clip

    loaded = OpenClipDissector().load(make_options(tiny_files))
    steps = loaded.preprocess.describe()
    assert steps["size_hw"] == [32, 32]
    assert steps["interpolation"] == "bicubic"
    assert steps["mean"] == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))
    assert steps["std"] == pytest.approx(list(open_clip.OPENAI_DATASET_STD))
    assert "centre-crops" in steps["source"]


def test_non_finite_embeddings_name_images(probe_set: ProbeSet) -> None:
    def encode_images(batch: torch.Tensor) -> torch.Tensor:
        embeddings = torch.ones(batch.shape[0], 4)
        embeddings[0, 0] = float("nan")
        return embeddings

    loaded = LoadedDissector(
        encode_images=encode_images,
        encode_texts=lambda texts: torch.ones(len(texts), 4),
        preprocess=lambda image: torch.zeros(3, 8, 8),
        spec="fake",
    )
    with pytest.raises(MammoDissectError) as caught:
        embed_and_compare(loaded, probe_set, CONCEPTS, RUNTIME)
    message = str(caught.value)
    assert "'img0'" in message
    assert "'img2'" in message
    assert "'img1'" not in message


def test_non_finite_embeddings_name_concepts(probe_set: ProbeSet) -> None:
    def encode_texts(texts: list[str]) -> torch.Tensor:
        embeddings = torch.ones(len(texts), 4)
        for row, text in enumerate(texts):
            if text == "mass":
                embeddings[row, 1] = float("inf")
        return embeddings

    loaded = LoadedDissector(
        encode_images=lambda batch: torch.ones(batch.shape[0], 4),
        encode_texts=encode_texts,
        preprocess=lambda image: torch.zeros(3, 8, 8),
        spec="fake",
    )
    with pytest.raises(MammoDissectError) as caught:
        embed_and_compare(loaded, probe_set, CONCEPTS, RUNTIME)
    assert "'mass'" in str(caught.value)
    assert "'calcification'" not in str(caught.value)


def test_embedding_dimensions_must_match(probe_set: ProbeSet) -> None:
    loaded = LoadedDissector(
        encode_images=lambda batch: torch.ones(batch.shape[0], 8),
        encode_texts=lambda texts: torch.ones(len(texts), 4),
        preprocess=lambda image: torch.zeros(3, 8, 8),
        spec="fake",
    )
    with pytest.raises(ModelLoadError) as caught:
        embed_and_compare(loaded, probe_set, CONCEPTS, RUNTIME)
    assert "dimension 8" in str(caught.value)
    assert "dimension 4" in str(caught.value)


def test_pipeline_run_with_open_clip(tiny_files: dict[str, Any], tmp_path: Path, tiny_registry) -> None:
    """A whole run: folder probe set, tiny CNN target, tiny open_clip dissector, a concept file."""
    import duckdb

    from mammo_dissect.core.config import load_config
    from mammo_dissect.core.pipeline import run

    folder = tmp_path / "run-probes"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for index in range(12):
        Image.fromarray(rng.integers(0, 256, size=(40, 32), dtype=np.uint8)).save(folder / f"m{index:02d}.png")
    concept_file = tmp_path / "concepts.txt"
    concept_file.write_text("\n".join(CONCEPTS) + "\n", encoding="utf-8")
    config = load_config(None, data={
        "probe_set": {"name": "folder", "options": {"root": str(folder)}},
        "target": {"loader": "tiny-cnn", "layers": ["features.2"]},
        "dissector": {"name": "open_clip", "options": {
            "architecture": ARCHITECTURE,
            "weights": str(tiny_files["weights"]),
            "model_config": str(tiny_files["config"]),
        }},
        "concept_set": {"name": "text", "options": {"path": str(concept_file)}},
        "similarity": {"name": "soft_wpmi", "params": {"top_k": 5}},
        "top_n": 2,
        "top_k_images": 3,
        "permutations": 3,
        "cache_dir": str(tmp_path / "cache"),
        "database": str(tmp_path / "clip.duckdb"),
    })
    outcome = run(config, progress=False)
    with duckdb.connect(str(outcome.database), read_only=True) as con:
        labels = con.execute("SELECT count(*) FROM unit_labels").fetchone()[0]
        dissector = con.execute("SELECT plugin, weights_sha256 FROM models WHERE role = 'dissector'").fetchone()
    assert labels == 6 * 2
    assert dissector[0] == "open_clip"
    assert dissector[1] is not None


def test_streaming_pipeline_matches_full_p(tiny_files: dict[str, Any], tmp_path: Path, tiny_registry, monkeypatch) -> None:
    """Runs with an embedding dissector score from embeddings; labels equal the full-P path."""
    import duckdb

    from mammo_dissect.core.config import load_config
    from mammo_dissect.core.pipeline import run

    folder = tmp_path / "probes-stream"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for index in range(12):
        Image.fromarray(rng.integers(0, 256, size=(40, 32), dtype=np.uint8)).save(folder / f"m{index:02d}.png")
    concept_file = tmp_path / "concepts.txt"
    concept_file.write_text("\n".join(CONCEPTS) + "\n", encoding="utf-8")

    def config(name: str) -> Any:
        return load_config(None, data={
            "probe_set": {"name": "folder", "options": {"root": str(folder)}},
            "target": {"loader": "tiny-cnn", "layers": ["features.2", "head"]},
            "dissector": {"name": "open_clip", "options": {
                "architecture": ARCHITECTURE, "weights": str(tiny_files["weights"]),
                "model_config": str(tiny_files["config"]),
            }},
            "concept_set": {"name": "text", "options": {"path": str(concept_file)}},
            "similarity": {"name": "soft_wpmi", "params": {"top_k": 5}},
            "permutations": 2,
            "similarity_memory_mib": 16,
            "cache_dir": str(tmp_path / f"cache-{name}"),
            "database": str(tmp_path / f"{name}.duckdb"),
        })

    streamed = run(config("stream"), progress=False)
    monkeypatch.setattr(tiny_registry.get("similarity function", "soft_wpmi"), "stream_fn", None)
    full = run(config("full"), progress=False)
    query = "SELECT layer_id, unit, rank, concept_id, round(score, 3) FROM unit_labels ORDER BY ALL"
    with duckdb.connect(str(streamed.database), read_only=True) as con:
        first = con.execute(query).fetchall()
    with duckdb.connect(str(full.database), read_only=True) as con:
        second = con.execute(query).fetchall()
    assert first == second

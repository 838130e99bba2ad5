"""hf_clip dissector: a tiny transformers CLIP saved with save_pretrained, loaded offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mammo_dissect.core.errors import ConceptSetError
from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.plugins.dissectors.hf_clip import HfClipDissector
from mammo_dissect.plugins.dissectors.hf_clip import HfClipOptions


CONTEXT_LENGTH = 16


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def write_bpe_tokenizer(directory: Path) -> dict[str, int]:
    """Write vocab.json and merges.txt of a BPE vocabulary of lower-case letters and three merges."""
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    merges = ["m a", "s s</w>", "ma ss</w>"]
    tokens = [*letters, *[f"{letter}</w>" for letter in letters], *[merge.replace(" ", "") for merge in merges]]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return vocab


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig
    from transformers import CLIPImageProcessor
    from transformers import CLIPModel

    directory = tmp_path_factory.mktemp("tiny_clip")
    vocab = write_bpe_tokenizer(directory)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": CONTEXT_LENGTH,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def load(directory: Path, **options):
    return HfClipDissector().load(HfClipOptions(model_dir=str(directory), **options))


def test_embeddings_match_clip_model(clip_dir):
    from transformers import AutoTokenizer
    from transformers import CLIPModel

    loaded = load(clip_dir)
    model = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
    images = torch.randn(2, 3, 32, 32)
    tokens = tokenizer(["mass", "a mass"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected_images = model.vision_model(pixel_values=images).pooler_output @ model.visual_projection.weight.T
        expected_texts = model.text_model(**tokens).pooler_output @ model.text_projection.weight.T
    assert torch.allclose(loaded.encode_images(images), expected_images, atol=1e-5)
    assert torch.allclose(loaded.encode_texts(["mass", "a mass"]), expected_texts, atol=1e-5)


def test_preprocess_from_processor_config(clip_dir):
    description = load(clip_dir).preprocess.describe()
    assert description["size_hw"] == [32, 32]
    assert description["interpolation"] == "bicubic"
    assert description["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_long_concept_rejected_or_truncated(clip_dir):
    long_concept = " ".join(["mass"] * 20)
    assert load(clip_dir).max_text_tokens == CONTEXT_LENGTH
    with pytest.raises(ConceptSetError, match="text limit of 16 tokens"):
        load(clip_dir).check_texts([long_concept])
    truncating = load(clip_dir, truncate_long_concepts=True)
    truncating.check_texts([long_concept])
    assert truncating.encode_texts([long_concept]).shape == (1, 16)


def test_missing_directory_says_how(tmp_path):
    with pytest.raises(ModelLoadError, match="--local-dir"):
        load(tmp_path / "absent")


def test_hub_name_rejected():
    with pytest.raises(ValueError, match="local directory"):
        HfClipOptions(model_dir="hf-hub:openai/clip-vit-base-patch32")


def test_prompt_template_with_extra_field_rejected():
    from pydantic import ValidationError

    from mammo_dissect.plugins.dissectors.hf_clip import HfClipDissector

    with pytest.raises(ValidationError, match="not a valid format string"):
        HfClipDissector.Options(model_dir="/local/clip", prompt_template="{region}: {}")

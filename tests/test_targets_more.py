"""Target loaders: Mammo-CLIP encoder and classifier, torchvision, TorchScript and timm ViT token layout."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mammo_dissect.core.api import TargetHandle
from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.errors import UnknownNameError
from mammo_dissect.plugins.targets.mammo_clip import MammoClipClassifierLoader
from mammo_dissect.plugins.targets.mammo_clip import MammoClipEncoderLoader
from mammo_dissect.plugins.targets.mammo_clip import MammoClipTargetOptions
from mammo_dissect.plugins.targets.torchscript import TorchscriptLoader
from mammo_dissect.plugins.targets.torchscript import TorchscriptOptions
from mammo_dissect.plugins.targets.torchvision_models import TorchvisionLoader
from mammo_dissect.plugins.targets.torchvision_models import TorchvisionOptions
from mammo_dissect.tests import mammo_clip_files as files


def direct_output(model: torch.nn.Module, layer: str, batch: torch.Tensor) -> torch.Tensor:
    """Call ``layer`` on the input it receives in a forward pass, outside any hook on its output."""
    module = dict(model.named_modules())[layer]
    captured = {}
    handle = module.register_forward_pre_hook(lambda _module, inputs: captured.setdefault("inputs", tuple(x.clone() for x in inputs)))
    with torch.no_grad():
        model(batch)
        handle.remove()
        return module(*captured["inputs"])


@pytest.fixture(scope="module")
def b2_state() -> dict:
    return files.build_clip_state("b2")


@pytest.fixture(scope="module")
def b2_checkpoint(tmp_path_factory, b2_state) -> Path:
    return files.save_official(tmp_path_factory.mktemp("encoder") / "b2.tar", "b2", b2_state)


def test_mammo_clip_encoder_layers(b2_checkpoint):
    target = MammoClipEncoderLoader().load(MammoClipTargetOptions(checkpoint=str(b2_checkpoint)))
    names = TargetHandle(target, "mammo-clip-encoder").layer_names()
    assert "_blocks.0" in names
    assert "_blocks.22" in names
    assert "_blocks.23" not in names
    assert "_fc" not in names
    assert target.preprocess.describe()["size_hw"] == [1520, 912]


def test_mammo_clip_encoder_output_matches_reference(b2_checkpoint, b2_state):
    target = MammoClipEncoderLoader().load(MammoClipTargetOptions(checkpoint=str(b2_checkpoint)))
    encoder = files.build_reference_encoder("b2")
    batch = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        expected = torch.nn.functional.adaptive_avg_pool2d(encoder.extract_features(batch), 1).flatten(1)
        assert torch.allclose(target.model(batch), expected, atol=1e-5)


def test_mammo_clip_encoder_hook_equals_direct_call(b2_checkpoint):
    target = MammoClipEncoderLoader().load(MammoClipTargetOptions(checkpoint=str(b2_checkpoint)))
    handle = TargetHandle(target, "mammo-clip-encoder")
    batch = torch.randn(2, 3, 64, 48)
    pooled = handle.activations(batch, ["_blocks.5", "_bn1"])
    for layer in ("_blocks.5", "_bn1"):
        assert torch.allclose(pooled[layer], direct_output(target.model, layer, batch).mean(dim=(2, 3)), atol=1e-6)


def write_classifier(path: Path, state: dict, n_class: int, scores: dict) -> Path:
    torch.manual_seed(5)
    head = torch.nn.Linear(1408, n_class)
    model_state = {key: value for key, value in state.items() if key.startswith("image_encoder.")}
    model_state["classifier.classification_head.weight"] = head.weight.detach().clone()
    model_state["classifier.classification_head.bias"] = head.bias.detach().clone()
    torch.save({"model": model_state, "predictions": np.random.default_rng(0).random((10, n_class)), "epoch": 3, **scores}, path)
    return path


def test_classifier_density_four_classes(tmp_path, b2_state):
    path = write_classifier(tmp_path / "b2_best_acc_density.pth", b2_state, 4, {"accuracy": np.float64(0.8), "f1": 0.7})
    target = MammoClipClassifierLoader().load(MammoClipTargetOptions(checkpoint=str(path)))
    batch = torch.randn(2, 3, 64, 48)
    encoder = files.build_reference_encoder("b2")
    state = torch.load(path, weights_only=False)["model"]
    with torch.no_grad():
        pooled = torch.nn.functional.adaptive_avg_pool2d(encoder.extract_features(batch), 1).flatten(1)
        expected = pooled @ state["classifier.classification_head.weight"].T + state["classifier.classification_head.bias"]
        assert torch.allclose(target.model(batch), expected, atol=1e-5)
    logits = TargetHandle(target, "mammo-clip-classifier").activations(batch, ["classifier"])["classifier"]
    assert logits.shape == (2, 4)
    assert "4 output(s)" in target.spec


def test_classifier_binary_reads_auroc(tmp_path, b2_state):
    from mammo_dissect.plugins.mammo_clip_checkpoint import read_mammo_clip_checkpoint

    path = write_classifier(tmp_path / "b2_Mass.pth", b2_state, 1, {"auroc": np.float64(0.71)})
    target = MammoClipClassifierLoader().load(MammoClipTargetOptions(checkpoint=str(path)))
    assert target.model(torch.randn(1, 3, 64, 48)).shape == (1, 1)
    metadata = read_mammo_clip_checkpoint(str(path), "checkpoint").metadata
    assert metadata["auroc"] == 0.71
    assert type(metadata["auroc"]) is float
    assert metadata["predictions"] == {"numpy_array": [10, 1], "dtype": "float64"}


def test_classifier_needs_head(b2_checkpoint):
    with pytest.raises(ModelLoadError, match="mammo-clip-encoder"):
        MammoClipClassifierLoader().load(MammoClipTargetOptions(checkpoint=str(b2_checkpoint)))


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path_factory.mktemp("torchvision") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_torchvision_loads_local_weights(resnet_file):
    path, model = resnet_file
    target = TorchvisionLoader().load(TorchvisionOptions(model="resnet18", weights=str(path), num_classes=10))
    batch = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(target.model(batch), model(batch))
    assert target.preprocess.describe()["size_hw"] == [224, 224]


def test_torchvision_hook_before_inplace_relu(resnet_file):
    path, _model = resnet_file
    target = TorchvisionLoader().load(TorchvisionOptions(model="resnet18", weights=str(path), num_classes=10))
    batch = torch.randn(2, 3, 64, 64)
    # layer1.0.bn1 is followed by ReLU(inplace=True), which overwrites its output tensor.
    pooled = TargetHandle(target, "torchvision").activations(batch, ["layer1.0.bn1"], pooling="max")["layer1.0.bn1"]
    direct = direct_output(target.model, "layer1.0.bn1", batch)
    assert float(direct.min()) < 0
    assert torch.allclose(pooled, direct.amax(dim=(2, 3)), atol=1e-6)


def test_torchvision_errors(resnet_file):
    with pytest.raises(UnknownNameError, match="resnet18"):
        TorchvisionLoader().load(TorchvisionOptions(model="resnet19", random_init=True))
    with pytest.raises(ModelLoadError, match="target.options.weights"):
        TorchvisionLoader().load(TorchvisionOptions(model="resnet18"))
    path, _model = resnet_file
    with pytest.raises(ModelLoadError, match="shape mismatches"):
        TorchvisionLoader().load(TorchvisionOptions(model="resnet18", weights=str(path)))


@pytest.fixture(scope="module")
def scripted_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    path = tmp_path_factory.mktemp("torchscript") / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 16, 16)), str(path))
    return path, model


def test_torchscript_requires_trust(scripted_file):
    path, _model = scripted_file
    with pytest.raises(ModelLoadError, match="trust_torchscript = true"):
        TorchscriptLoader().load(TorchscriptOptions(path=str(path), input_size=(16, 16)))


def test_torchscript_output_layer(scripted_file):
    path, model = scripted_file
    target = TorchscriptLoader().load(TorchscriptOptions(path=str(path), input_size=(16, 16), trust_torchscript=True))
    handle = TargetHandle(target, "torchscript")
    assert handle.layer_names() == ["output"]
    batch = torch.randn(2, 3, 16, 16)
    target.model.to("cpu")
    with torch.no_grad():
        expected = model(batch)
    assert torch.allclose(handle.activations(batch, ["output"])["output"], expected, atol=1e-6)


def test_timm_vit_declares_token_layout():
    from mammo_dissect.plugins.targets.timm_models import TimmLoader
    from mammo_dissect.plugins.targets.timm_models import TimmOptions

    target = TimmLoader().load(TimmOptions(model="test_vit", random_init=True))
    assert target.token_layout["*"]["cls_index"] == 0
    assert target.token_layout["*"]["num_prefix_tokens"] == target.model.num_prefix_tokens
    batch = torch.randn(1, 3, 160, 160)
    pooled = TargetHandle(target, "timm").activations(batch, ["blocks.0"])["blocks.0"]
    assert torch.allclose(pooled, direct_output(target.model, "blocks.0", batch)[:, 0], atol=1e-6)


def test_pooling_without_class_token_skips_prefix():
    from mammo_dissect.core.extraction import pool_output

    tokens = torch.zeros(1, 5, 2)
    tokens[0, :2] = 100.0
    tokens[0, 2:] = torch.tensor([1.0, 2.0])
    pooled = pool_output(tokens, "avg", {"cls_index": None, "num_prefix_tokens": 2})
    assert torch.equal(pooled, torch.tensor([[1.0, 2.0]]))

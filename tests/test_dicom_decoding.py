"""Synthetic DICOM files decoded by ``read_dicom`` and described by ``dicom_metadata``, against hand-computed values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from mammo_dissect.core.images import dicom_metadata
from mammo_dissect.core.images import read_dicom
from mammo_dissect.plugins.probe_sets.dicom import DicomFolderReader


def write_dicom(path: Path, pixels: np.ndarray, bits_stored: int, signed: bool = False, **tags: Any) -> Path:
    """Write a single-frame grey mammogram with the given pixels and extra tags."""
    dataset = Dataset()
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = pydicom.uid.DigitalMammographyXRayImageStorageForPresentation
    dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    allocated = 8 if bits_stored <= 8 else 16
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = allocated, bits_stored, bits_stored - 1
    dataset.PixelRepresentation = 1 if signed else 0
    for keyword, value in tags.items():
        setattr(dataset, keyword, value)
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(allocated, signed)]
    dataset.PixelData = pixels.astype(dtype).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_dicom_12bit_scaled_by_bits_stored(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "a.dcm", np.array([[0, 1365, 4095]]), bits_stored=12)
    np.testing.assert_allclose(read_dicom(path), [[0.0, 1365 / 4095, 1.0]], atol=1e-6)


def test_dicom_8bit(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "a.dcm", np.array([[0, 51, 255]]), bits_stored=8)
    np.testing.assert_allclose(read_dicom(path), [[0.0, 0.2, 1.0]], atol=1e-6)


def test_dicom_monochrome1_inverted(tmp_path: Path) -> None:
    path = write_dicom(
        tmp_path / "a.dcm", np.array([[0, 1023, 4095]]), bits_stored=12, PhotometricInterpretation="MONOCHROME1"
    )
    np.testing.assert_allclose(read_dicom(path), [[1.0, 1 - 1023 / 4095, 0.0]], atol=1e-6)


def test_dicom_signed_pixels_with_rescale(tmp_path: Path) -> None:
    # Stored range -2048..2047 maps through slope 1 and intercept 2048 onto 0..4095.
    path = write_dicom(
        tmp_path / "a.dcm", np.array([[-2048, 0, 2047]]), bits_stored=12, signed=True,
        RescaleSlope=1, RescaleIntercept=2048,
    )
    np.testing.assert_allclose(read_dicom(path), [[0.0, 2048 / 4095, 1.0]], atol=1e-6)


def test_dicom_voi_lut_sequence(tmp_path: Path) -> None:
    # A 4-entry 8-bit LUT starting at stored value 100: 100->0, 101->85, 102->170, 103->255.
    item = Dataset()
    item.LUTDescriptor = [4, 100, 8]
    item.LUTData = np.array([0, 85, 170, 255], dtype=np.uint16).tobytes()
    path = write_dicom(
        tmp_path / "a.dcm", np.array([[50, 101, 102, 400]]), bits_stored=12, VOILUTSequence=Sequence([item])
    )
    np.testing.assert_allclose(read_dicom(path), [[0.0, 85 / 255, 170 / 255, 1.0]], atol=1e-6)


def test_dicom_window_center_width(tmp_path: Path) -> None:
    # Window 1000 +- 200 (linear, DICOM PS3.3 C.11.2.1.2): below 800.5 -> 0, above 1199.5 -> max.
    path = write_dicom(
        tmp_path / "a.dcm", np.array([[500, 1000, 1500]]), bits_stored=12, WindowCenter=1000, WindowWidth=400
    )
    expected_middle = ((1000 - 999.5) / 399 + 0.5)
    np.testing.assert_allclose(read_dicom(path), [[0.0, expected_middle, 1.0]], atol=2e-3)


def test_dicom_jpeg2000_needs_handler(tmp_path: Path) -> None:
    pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg is not installed")
    pixels = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7) % 4096
    path = write_dicom(tmp_path / "a.dcm", pixels, bits_stored=12)
    dataset = pydicom.dcmread(path)
    dataset.compress(pydicom.uid.JPEG2000Lossless, encoding_plugin="pylibjpeg")
    dataset.save_as(tmp_path / "j2k.dcm")
    np.testing.assert_allclose(read_dicom(tmp_path / "j2k.dcm"), pixels / 4095, atol=1e-6)


def test_dicom_metadata_fields(tmp_path: Path) -> None:
    view = Dataset()
    view.CodeMeaning = "medio-lateral oblique"
    path = write_dicom(
        tmp_path / "a.dcm", np.zeros((2, 2)), bits_stored=12,
        PatientID="P1", StudyInstanceUID="1.2.3", ImageLaterality="R",
        ViewCodeSequence=Sequence([view]), ImagerPixelSpacing=[0.07, 0.07],
    )
    metadata = dicom_metadata(path)
    assert metadata["patient_id"] == "P1"
    assert metadata["study_id"] == "1.2.3"
    assert metadata["laterality"] == "R"
    assert metadata["view"] == "MLO"
    assert metadata["pixel_spacing"] == [0.07, 0.07]
    assert metadata["bits_stored"] == 12
    assert metadata["transfer_syntax"] == "Explicit VR Little Endian"


def test_dicom_reader_filters_views(tmp_path: Path) -> None:
    write_dicom(tmp_path / "cc.dcm", np.zeros((2, 2)), bits_stored=12, ViewPosition="CC", PatientID="P1")
    (tmp_path / "sub").mkdir()
    write_dicom(tmp_path / "sub" / "mlo.dcm", np.zeros((2, 2)), bits_stored=12, ViewPosition="MLO", PatientID="P1")
    everything = DicomFolderReader().load(DicomFolderReader.Options(root=tmp_path))
    assert [image.image_id for image in everything.images] == ["cc", "sub/mlo"]
    only_cc = DicomFolderReader().load(DicomFolderReader.Options(root=tmp_path, views=["cc"]))
    assert [image.image_id for image in only_cc.images] == ["cc"]
    assert only_cc.images[0].metadata["patient_id"] == "P1"

"""Manifest readers on small synthetic tables in each data set's column layout."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.plugins.probe_sets.cbis_ddsm_csv import CbisDdsmCsvReader
from mammo_dissect.plugins.probe_sets.embed import EmbedReader
from mammo_dissect.plugins.probe_sets.manifest import CsvManifestReader
from mammo_dissect.plugins.probe_sets.rsna_screening import RsnaScreeningReader
from mammo_dissect.plugins.probe_sets.vindr_mammo import VindrMammoReader


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_png(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 6), value, dtype=np.uint8)).save(path)


VINDR_IMAGE = ["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width"]


def test_vindr_findings_collapse_per_image(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "finding_annotations.csv",
        [*VINDR_IMAGE, "breast_birads", "breast_density", "finding_categories", "finding_birads",
         "xmin", "ymin", "xmax", "ymax", "split"],
        [
            ["s1", "r1", "i1", "L", "CC", 8, 6, "BI-RADS 4", "DENSITY C", "['Mass']", "BI-RADS 4", 1, 2, 3, 4, "training"],
            ["s1", "r1", "i1", "L", "CC", 8, 6, "BI-RADS 4", "DENSITY C",
             "['Suspicious Calcification', 'Architectural Distortion']", "BI-RADS 4", 2, 2, 5, 5, "training"],
            ["s1", "r1", "i2", "R", "MLO", 8, 6, "BI-RADS 1", "DENSITY C", "['No Finding']", "", "", "", "", "", "test"],
        ],
    )
    write_png(tmp_path / "images" / "s1" / "i1.png")
    write_png(tmp_path / "images" / "s1" / "i2.png")
    options = VindrMammoReader.Options(root=tmp_path, finding_csv="finding_annotations.csv", extension=".png")
    probe_set = VindrMammoReader().load(options)
    assert [image.image_id for image in probe_set.images] == ["i1", "i2"]
    first = probe_set.images[0]
    assert first.metadata["manifest_rows"] == 2
    assert len(first.metadata["findings"]) == 2
    assert first.metadata["findings"][0]["box_xyxy"] == [1.0, 2.0, 3.0, 4.0]
    assert first.metadata["density"] == "C"
    assert first.metadata["laterality"] == "L"
    assert first.metadata["split"] == "training"
    assert set(first.annotations) == {
        "heterogeneously dense breast", "BI-RADS 4", "mass", "suspicious calcification", "architectural distortion"
    }
    assert "normal" in probe_set.images[1].annotations
    assert probe_set.images[1].metadata["findings"] == []


def test_vindr_breast_level_split_filter(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "breast-level_annotations.csv",
        [*VINDR_IMAGE, "breast_birads", "breast_density", "split"],
        [["s1", "r1", "i1", "L", "CC", 8, 6, "BI-RADS 2", "DENSITY A", "training"],
         ["s2", "r2", "i2", "R", "CC", 8, 6, "BI-RADS 1", "DENSITY B", "test"]],
    )
    write_png(tmp_path / "images" / "s2" / "i2.png")
    options = VindrMammoReader.Options(
        root=tmp_path, breast_csv="breast-level_annotations.csv", extension=".png", split="test"
    )
    probe_set = VindrMammoReader().load(options)
    assert [image.image_id for image in probe_set.images] == ["i2"]
    assert probe_set.images[0].annotations == ("scattered fibroglandular densities", "BI-RADS 1")


RSNA_HEADER = ["site_id", "patient_id", "image_id", "laterality", "view", "age", "cancer", "biopsy", "invasive",
               "BIRADS", "implant", "density", "machine_id", "difficult_negative_case"]


def test_rsna_reads_train_layout(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "train.csv",
        RSNA_HEADER,
        [[2, 10006, 462822612, "L", "CC", 61.0, 0, 0, 0, "", 0, "", 29, "False"],
         [2, 10006, 1459541791, "R", "MLO", 61.0, 1, 1, 1, 0, 1, "B", 29, "False"]],
    )
    write_png(tmp_path / "train_images" / "10006" / "462822612.png")
    write_png(tmp_path / "train_images" / "10006" / "1459541791.png")
    probe_set = RsnaScreeningReader().load(RsnaScreeningReader.Options(root=tmp_path, extension=".png"))
    first, second = probe_set.images
    assert first.metadata["patient_id"] == "10006"
    assert first.metadata["age"] == 61
    assert first.annotations == ("no cancer",)
    assert set(second.annotations) == {
        "scattered fibroglandular densities", "BI-RADS 0", "malignant", "invasive cancer", "biopsied", "breast implant"
    }
    assert second.metadata["view"] == "MLO"
    assert second.metadata["density"] == "B"


def test_manifest_missing_images_one_error(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", RSNA_HEADER,
              [[1, 1, 11, "L", "CC", 50, 0, 0, 0, 1, 0, "A", 1, "False"],
               [1, 1, 12, "L", "MLO", 50, 0, 0, 0, 1, 0, "A", 1, "False"],
               [1, 2, 21, "R", "CC", 50, 0, 0, 0, 1, 0, "A", 1, "False"]])
    write_png(tmp_path / "train_images" / "1" / "11.png")
    with pytest.raises(ProbeSetError) as error:
        RsnaScreeningReader().load(RsnaScreeningReader.Options(root=tmp_path, extension=".png"))
    message = str(error.value)
    assert "2 of 3 image(s)" in message
    assert "12.png" in message
    assert "21.png" in message
    skipped = RsnaScreeningReader().load(RsnaScreeningReader.Options(root=tmp_path, extension=".png", missing="skip"))
    assert [image.image_id for image in skipped.images] == ["11"]
    assert skipped.decoding["missing_skipped"] == 2


def test_manifest_rejects_root_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_png(tmp_path / "outside.png")
    write_png(root / "inside.png")
    write_csv(root / "m.csv", ["path"], [["inside.png"], ["../outside.png"]])
    with pytest.raises(ProbeSetError, match="outside the probe-set root"):
        CsvManifestReader().load(CsvManifestReader.Options(root=root, csv="m.csv", image_column="path"))
    write_csv(root / "m.csv", ["path"], [["inside.png"], [str(tmp_path / "outside.png")]])
    with pytest.raises(ProbeSetError, match="allow_outside_root"):
        CsvManifestReader().load(CsvManifestReader.Options(root=root, csv="m.csv", image_column="path"))
    allowed = CsvManifestReader().load(
        CsvManifestReader.Options(root=root, csv="m.csv", image_column="path", allow_outside_root=True)
    )
    assert len(allowed) == 2


def test_csv_reader_column_mapping(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "m.csv",
        ["patient", "image", "side", "finding", "dens"],
        [["p1", "a", "LEFT", "mass;calc", "3"], ["p1", "a", "LEFT", "other", "3"], ["p2", "b", "right", "", "1"]],
    )
    write_png(tmp_path / "p1" / "a.png")
    write_png(tmp_path / "p2" / "b.png")
    options = CsvManifestReader.Options(
        root=tmp_path,
        csv="m.csv",
        path_template="{patient}/{image}.png",
        id_column="image",
        columns={"patient_id": "patient", "laterality": "side", "density": "dens"},
        annotations={"finding": {"Mass": "mass", "calc": "calcification"}},
    )
    probe_set = CsvManifestReader().load(options)
    first, second = probe_set.images
    assert first.annotations == ("mass", "calcification")
    assert first.metadata["laterality"] == "L"
    assert first.metadata["density"] == "C"
    assert first.metadata["manifest_rows"] == 2
    assert second.metadata["laterality"] == "R"
    assert probe_set.annotation_vocabulary == ["mass", "calcification"]
    with pytest.raises(ProbeSetError, match="other"):
        CsvManifestReader().load(options.model_copy(update={"unmapped": "error"}))


def test_csv_reader_needs_one_path_source(tmp_path: Path) -> None:
    write_csv(tmp_path / "m.csv", ["path"], [["a.png"]])
    with pytest.raises(ProbeSetError, match="exactly one of image_column and path_template"):
        CsvManifestReader().load(CsvManifestReader.Options(root=tmp_path, csv="m.csv"))


CBIS_HEADER = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
               "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
               "image file path", "cropped image file path", "ROI mask file path"]


def test_cbis_csv_path_column_and_series_folder(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "mass.csv",
        CBIS_HEADER,
        [["P_00001", 3, "LEFT", "CC", 1, "mass", "IRREGULAR-ARCHITECTURAL_DISTORTION", "SPICULATED", 4, "MALIGNANT",
          4, "Mass-Training_P_00001_LEFT_CC/1.2/1.3/000000.dcm\n", "x", "y"],
         ["P_00001", 3, "LEFT", "CC", 2, "mass", "OVAL", "CIRCUMSCRIBED", 3, "BENIGN",
          3, "Mass-Training_P_00001_LEFT_CC/1.2/1.3/000000.dcm", "x", "y"]],
    )
    write_png(tmp_path / "Mass-Training_P_00001_LEFT_CC" / "1.2" / "1.3" / "000000.png")
    options = CbisDdsmCsvReader.Options(root=tmp_path, descriptions=["mass.csv"], extension=".png")
    probe_set = CbisDdsmCsvReader().load(options)
    assert len(probe_set) == 1
    image = probe_set.images[0]
    assert image.image_id == "Mass-Training_P_00001_LEFT_CC"
    assert len(image.metadata["findings"]) == 2
    assert image.metadata["split"] == "train"
    assert image.metadata["density"] == "C"
    assert {"irregular mass", "architectural distortion", "spiculated margin", "oval mass", "malignant",
            "benign", "BI-RADS 4", "BI-RADS 3"} <= set(image.annotations)
    (tmp_path / "Mass-Training_P_00001_LEFT_CC" / "other" / "1-1.dcm").parent.mkdir(parents=True)
    (tmp_path / "Mass-Training_P_00001_LEFT_CC" / "other" / "1-1.dcm").write_bytes(b"")
    folder_layout = CbisDdsmCsvReader().load(
        CbisDdsmCsvReader.Options(root=tmp_path, descriptions=["mass.csv"], layout="series_folder")
    )
    assert folder_layout.images[0].path.name == "1-1.dcm"


def test_embed_joins_findings_by_side(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "meta.csv",
        ["empi_anon", "acc_anon", "anon_dicom_path", "ImageLaterality", "ViewPosition", "FinalImageType"],
        [[1, 10, "/server/data/1/a.png", "L", "CC", "2D"], [1, 10, "/server/data/1/b.png", "R", "CC", "2D"],
         [1, 10, "/server/data/1/c.png", "R", "CC", "cview"]],
    )
    write_csv(
        tmp_path / "clinical.csv",
        ["empi_anon", "acc_anon", "side", "asses", "tissueden", "massshape"],
        [[1, 10, "L", "S", 2, "R"], [1, 10, "B", "N", 2, ""]],
    )
    write_png(tmp_path / "1" / "a.png")
    write_png(tmp_path / "1" / "b.png")
    options = EmbedReader.Options(
        root=tmp_path, metadata_csv="meta.csv", clinical_csv="clinical.csv", strip_prefix="/server/data/",
        value_concepts={"massshape": {"R": "round mass"}},
    )
    probe_set = EmbedReader().load(options)
    left, right = probe_set.images
    assert set(left.annotations) == {"scattered fibroglandular densities", "BI-RADS 4", "round mass", "BI-RADS 1"}
    assert set(right.annotations) == {"scattered fibroglandular densities", "BI-RADS 1"}
    assert left.metadata["patient_id"] == "1"
    assert len(left.metadata["findings"]) == 2

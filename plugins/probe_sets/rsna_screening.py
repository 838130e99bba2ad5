"""Probe set reader ``rsna-screening``: the RSNA Screening Mammography Breast Cancer Detection data.

``train.csv`` has one row per image with the columns site_id, patient_id,
image_id, laterality (L/R), view (CC, MLO, ML, LM, AT, LMO), age, cancer,
biopsy, invasive, BIRADS (0, 1, 2 or empty), implant, density (A-D or
empty), machine_id and difficult_negative_case.  ``test.csv`` has only some
of these; the reader needs patient_id, image_id, laterality and view, and
uses the others when they are present.  Images are found at
``<root>/<image_folder>/<patient_id>/<image_id><extension>``
(``train_images/<patient_id>/<image_id>.dcm`` in the competition data);
set ``extension = ".png"`` for converted copies.

Annotations:

=======================  ====================================================
column                   concept text
=======================  ====================================================
density A-D              :data:`~mammo_dissect.plugins.probe_sets.manifest.DENSITY_LETTER_CONCEPTS`
BIRADS 0, 1, 2           "BI-RADS 0", "BI-RADS 1", "BI-RADS 2"
cancer 1 / 0             "malignant" / "no cancer"
invasive 1               "invasive cancer"
biopsy 1                 "biopsied"
implant 1                "breast implant"
=======================  ====================================================

The binary columns map through :data:`FLAG_CONCEPTS`; a 0 gives a concept
only where the table has one (``cancer`` 0 -> "no cancer").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mammo_dissect.core.hookspecs import Register
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import ProbeSetReader
from mammo_dissect.plugins.probe_sets.folder import check_root_folder
from mammo_dissect.plugins.probe_sets.manifest import DENSITY_LETTER_CONCEPTS
from mammo_dissect.plugins.probe_sets.manifest import ManifestOptions
from mammo_dissect.plugins.probe_sets.manifest import RecordCollector
from mammo_dissect.plugins.probe_sets.manifest import birads_concept
from mammo_dissect.plugins.probe_sets.manifest import birads_number
from mammo_dissect.plugins.probe_sets.manifest import build_probe_set
from mammo_dissect.plugins.probe_sets.manifest import density_letter
from mammo_dissect.plugins.probe_sets.manifest import is_empty
from mammo_dissect.plugins.probe_sets.manifest import read_manifest
from mammo_dissect.plugins.probe_sets.manifest import resolve_manifest_file


logger = logging.getLogger(__name__)

#: Concept text of each binary column's value ``1`` and, where one exists, ``0``.
FLAG_CONCEPTS: dict[str, dict[str, str]] = {
    "cancer": {"1": "malignant", "0": "no cancer"},
    "invasive": {"1": "invasive cancer"},
    "biopsy": {"1": "biopsied"},
    "implant": {"1": "breast implant"},
}

REQUIRED_COLUMNS = ("patient_id", "image_id", "laterality", "view")

#: Columns copied into the metadata as integers when present.
INTEGER_COLUMNS = ("site_id", "machine_id", "cancer", "biopsy", "invasive", "implant", "difficult_negative_case")


class RsnaScreeningOptions(ManifestOptions):
    """Options of the ``rsna-screening`` reader."""

    #: train.csv or test.csv (absolute, or relative to root).
    csv: Path = Path("train.csv")
    #: Folder under root with one folder per patient.
    image_folder: str = "train_images"
    #: Suffix of the image files: ``.dcm`` in the competition data, ``.png`` for converted copies.
    extension: str = ".dcm"


def _integer(value: str) -> int | None:
    if is_empty(value):
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def _flag_text(value: str) -> str:
    # Flags are written 0/1 in the competition CSV, but 0.0/1.0 after a pandas round trip.
    number = _integer(value)
    return "" if number is None else str(number)


class RsnaScreeningReader(ProbeSetReader):
    """Reads the RSNA screening mammography images with density, BI-RADS and outcome annotations."""

    name = "rsna-screening"
    description = "RSNA Screening Mammography (train.csv + <patient_id>/<image_id>.dcm) with outcome annotations."
    Options = RsnaScreeningOptions

    def load(self, options: RsnaScreeningOptions) -> ProbeSet:  # type: ignore[override]
        """Read the table and check every image file."""
        root = check_root_folder(options.root, "the RSNA folder with train.csv and train_images/<patient_id>/")
        manifest = resolve_manifest_file(options.csv, root, "RSNA screening table")
        collector = RecordCollector(manifest)
        for row in read_manifest(manifest, REQUIRED_COLUMNS, "RSNA screening table"):
            self._add_row(collector, row, options)
        collector.check()
        vocabulary = [
            *DENSITY_LETTER_CONCEPTS.values(),
            "BI-RADS 0",
            "BI-RADS 1",
            "BI-RADS 2",
            *(text for table in FLAG_CONCEPTS.values() for text in table.values()),
        ]
        return build_probe_set(self.name, root, list(collector.records.values()), options, manifest, vocabulary)

    def _add_row(self, collector: RecordCollector, row: dict[str, str], options: RsnaScreeningOptions) -> None:
        density = density_letter(row.get("density"))
        metadata: dict[str, Any] = {
            "patient_id": row["patient_id"],
            # NOTE: the table has no exam id; the competition data holds one screening exam per patient.
            "study_id": row["patient_id"],
            "breast_id": row.get("prediction_id") or f"{row['patient_id']}_{row['laterality'].upper()}",
            "laterality": row["laterality"].upper() or None,
            "view": row["view"].upper() or None,
            "density": density,
            "birads": birads_number(row.get("BIRADS")),
            "age": _integer(row.get("age", "")),
            "split": "test" if "cancer" not in row else "train",
        }
        for column in INTEGER_COLUMNS:
            if column in row:
                metadata[column] = _integer(row[column])
        texts = [DENSITY_LETTER_CONCEPTS.get(density or ""), birads_concept(row.get("BIRADS"))]
        for column, table in FLAG_CONCEPTS.items():
            texts.append(table.get(_flag_text(row.get(column, ""))))
        raw_path = f"{options.image_folder}/{row['patient_id']}/{row['image_id']}{options.extension}"
        collector.add(row["image_id"], raw_path, metadata, texts)


@hookimpl
def register_probe_sets(register: Register) -> None:
    """Register the ``rsna-screening`` probe set reader."""
    register(RsnaScreeningReader())

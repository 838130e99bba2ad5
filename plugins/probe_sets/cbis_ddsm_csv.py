"""Probe set reader ``cbis-ddsm-csv``: CBIS-DDSM full mammograms located through the case description CSVs.

Unlike ``cbis-ddsm-dicom``, which scans a folder and reads each DICOM's
PatientID, this reader starts from the description tables
(``mass_case_description_train_set.csv`` and the other three) and finds
each row's full mammogram in one of two layouts (option ``layout``):

``path_column`` (default)
    ``<root>/<image file path>``: the ``image file path`` column as written,
    for example ``Mass-Training_P_00001_LEFT_CC/1.3.6.../1.3.6.../000000.dcm``.
    Converted copies keep this layout when ``extension`` replaces the suffix
    (``extension = ".png"``).
``series_folder``
    the first ``.dcm`` file anywhere under ``<root>/<series>``, where
    ``<series>`` is the first component of ``image file path``
    (``Mass-Training_P_00001_LEFT_CC``).  This fits the TCIA download, whose
    inner folder names differ from those in the tables.

The image id is that series name, so the rows of one mammogram (one per
abnormality) merge into one probe image, whose ``metadata["findings"]``
lists each abnormality.  Annotations and their mapping are those of
``cbis-ddsm-dicom`` (:func:`~mammo_dissect.plugins.probe_sets.cbis_ddsm_dicom.row_concepts`):
density 1-4, abnormality type, mass shape and margins, calcification type
and distribution, pathology and BI-RADS assessment.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from typing import Literal

from pydantic import Field

from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.hookspecs import Register
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import ProbeSetReader
from mammo_dissect.plugins.probe_sets.cbis_ddsm_dicom import DENSITY_CONCEPTS
from mammo_dissect.plugins.probe_sets.cbis_ddsm_dicom import PATHOLOGY_CONCEPTS
from mammo_dissect.plugins.probe_sets.cbis_ddsm_dicom import REQUIRED_COLUMNS
from mammo_dissect.plugins.probe_sets.cbis_ddsm_dicom import _abnormality
from mammo_dissect.plugins.probe_sets.cbis_ddsm_dicom import normalise_column_name
from mammo_dissect.plugins.probe_sets.cbis_ddsm_dicom import row_concepts
from mammo_dissect.plugins.probe_sets.folder import check_root_folder
from mammo_dissect.plugins.probe_sets.folder import find_image_files
from mammo_dissect.plugins.probe_sets.manifest import ManifestOptions
from mammo_dissect.plugins.probe_sets.manifest import RecordCollector
from mammo_dissect.plugins.probe_sets.manifest import build_probe_set
from mammo_dissect.plugins.probe_sets.manifest import density_letter
from mammo_dissect.plugins.probe_sets.manifest import read_manifest
from mammo_dissect.plugins.probe_sets.manifest import resolve_inside_root
from mammo_dissect.plugins.probe_sets.manifest import resolve_manifest_file


logger = logging.getLogger(__name__)

IMAGE_PATH_COLUMN = "image_file_path"


class CbisDdsmCsvOptions(ManifestOptions):
    """Options of the ``cbis-ddsm-csv`` reader."""

    #: CBIS-DDSM case description CSVs (absolute, or relative to root).
    descriptions: list[Path] = Field(min_length=1)
    #: How image paths are found: ``path_column`` or ``series_folder`` (see the module documentation).
    layout: Literal["path_column", "series_folder"] = "path_column"
    #: Replace the suffix of ``image file path`` (``path_column`` layout only), for example ``.png``.
    extension: str | None = None


def _normalised_rows(path: Path) -> list[dict[str, str]]:
    rows = read_manifest(path, (), "CBIS-DDSM description table")
    normalised = [{normalise_column_name(key): value for key, value in row.items()} for row in rows]
    missing = [column for column in (*REQUIRED_COLUMNS, IMAGE_PATH_COLUMN) if column not in normalised[0]]
    if missing:
        raise ProbeSetError(
            f"CBIS-DDSM description table {path} lacks the column(s) {', '.join(missing)}; "
            "it must be a mass or calc case description CSV of CBIS-DDSM"
        )
    return normalised


class CbisDdsmCsvReader(ProbeSetReader):
    """Reads CBIS-DDSM mammograms listed in the case description CSVs."""

    name = "cbis-ddsm-csv"
    description = "CBIS-DDSM full mammograms found through the case description CSVs (BI-RADS terms)."
    Options = CbisDdsmCsvOptions

    def load(self, options: CbisDdsmCsvOptions) -> ProbeSet:  # type: ignore[override]
        """Read the tables, locate each mammogram and merge the rows of each image."""
        root = check_root_folder(options.root, "the CBIS-DDSM folder with one folder per series")
        manifests = [resolve_manifest_file(path, root, "CBIS-DDSM description table") for path in options.descriptions]
        collector = RecordCollector(manifests[0])
        for manifest in manifests:
            for row in _normalised_rows(manifest):
                self._add_row(collector, row, manifest, root, options)
        collector.check()
        vocabulary = sorted(set(DENSITY_CONCEPTS.values()) | set(PATHOLOGY_CONCEPTS.values()))
        return build_probe_set(self.name, root, list(collector.records.values()), options, manifests[-1], vocabulary)

    def _add_row(
        self,
        collector: RecordCollector,
        row: dict[str, str],
        manifest: Path,
        root: Path,
        options: CbisDdsmCsvOptions,
    ) -> None:
        image_path = row[IMAGE_PATH_COLUMN].strip()
        series = image_path.split("/")[0]
        parts = series.split("_")
        split = "test" if "-Test" in series else ("train" if "-Training" in series else None)
        metadata: dict[str, Any] = {
            "patient_id": row["patient_id"],
            "study_id": series.rsplit("_", 2)[0] if len(parts) >= 3 else None,
            "laterality": row["left_or_right_breast"].upper()[:1] or None,
            "view": row["image_view"].upper() or None,
            "density": density_letter(row["breast_density"]),
            "breast_density": int(row["breast_density"]) if row["breast_density"].isdigit() else None,
            "split": split,
            "source_file": manifest.name,
        }
        raw_path = self._raw_path(image_path, series, root, options)
        collector.add(series, raw_path, metadata, row_concepts(row), _abnormality(row))

    def _raw_path(self, image_path: str, series: str, root: Path, options: CbisDdsmCsvOptions) -> str:
        if options.layout == "path_column":
            if options.extension:
                return Path(image_path).with_suffix(options.extension).as_posix()
            return image_path
        folder = resolve_inside_root(series, root, options.allow_outside_root)
        found = find_image_files(folder, (".dcm",), recursive=True) if folder.is_dir() else []
        if len(found) > 1:
            logger.warning("series folder %s holds %d DICOM files; using %s", folder, len(found), found[0])
        # A missing series folder gives the folder itself, so the missing-image check lists it.
        return str(found[0]) if found else str(folder / "(no .dcm file)")


@hookimpl
def register_probe_sets(register: Register) -> None:
    """Register the ``cbis-ddsm-csv`` probe set reader."""
    register(CbisDdsmCsvReader())

"""Probe set reader ``embed``: EMBED-style image metadata joined to exam-level clinical findings.

The Emory Breast Imaging Dataset (EMBED) ships an image table and a
clinical table.  The reader supports these columns (names as in the EMBED
open-data release; others are ignored):

image table (``metadata_csv``), one row per image:
    ``empi_anon`` (patient), ``acc_anon`` (exam), ``anon_dicom_path`` (the
    DICOM path; option ``path_column``), ``ImageLaterality`` (L/R),
    ``ViewPosition`` (CC, MLO, ...), and optionally ``FinalImageType``
    (``2D``, ``cview``; filtered by option ``image_types``).
clinical table (``clinical_csv``, optional), one row per finding:
    ``empi_anon``, ``acc_anon``, ``side`` (L, R or B for both), and
    optionally ``tissueden`` (1-4 = BI-RADS A-D, 5 = male breast),
    ``asses`` (assessment letter, :data:`ASSESSMENT_BIRADS`),
    ``path_severity``, ``massshape``, ``massmargin``, ``massdens``,
    ``calcfind``, ``calcdistri``, ``otherfind``, ``implanfind``.

A finding row joins every image of the same patient and exam whose
laterality equals ``side`` (``B`` joins both sides).  Paths in the image
table are absolute paths on the data provider's server, so
``strip_prefix`` removes that prefix and the rest is taken relative to
``root``.

Annotations: ``tissueden`` through
:data:`~mammo_dissect.plugins.probe_sets.manifest.DENSITY_LETTER_CONCEPTS`,
``asses`` as "BI-RADS N", and the finding columns through the
``value_concepts`` option (column -> {code -> concept text}).  Every raw
code is kept in ``metadata["findings"]``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from mammo_dissect.core.hookspecs import Register
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import ProbeSetReader
from mammo_dissect.plugins.probe_sets.folder import check_root_folder
from mammo_dissect.plugins.probe_sets.manifest import BIRADS_VOCABULARY
from mammo_dissect.plugins.probe_sets.manifest import DENSITY_LETTER_CONCEPTS
from mammo_dissect.plugins.probe_sets.manifest import ManifestOptions
from mammo_dissect.plugins.probe_sets.manifest import RecordCollector
from mammo_dissect.plugins.probe_sets.manifest import build_probe_set
from mammo_dissect.plugins.probe_sets.manifest import density_letter
from mammo_dissect.plugins.probe_sets.manifest import is_empty
from mammo_dissect.plugins.probe_sets.manifest import read_manifest
from mammo_dissect.plugins.probe_sets.manifest import resolve_manifest_file


logger = logging.getLogger(__name__)

#: BI-RADS assessment of each EMBED ``asses`` letter.
ASSESSMENT_BIRADS: dict[str, str] = {
    "A": "0",  # additional evaluation needed
    "N": "1",  # negative
    "B": "2",  # benign
    "P": "3",  # probably benign
    "S": "4",  # suspicious
    "M": "5",  # highly suggestive of malignancy
    "K": "6",  # known biopsy-proven malignancy
}

#: Clinical columns kept in each finding of ``metadata["findings"]`` when present.
FINDING_COLUMNS = (
    "side",
    "asses",
    "path_severity",
    "massshape",
    "massmargin",
    "massdens",
    "calcfind",
    "calcdistri",
    "otherfind",
    "implanfind",
)

IMAGE_COLUMNS = ("empi_anon", "acc_anon", "ImageLaterality", "ViewPosition")
CLINICAL_COLUMNS = ("empi_anon", "acc_anon", "side")


class EmbedOptions(ManifestOptions):
    """Options of the ``embed`` reader."""

    #: The image table (absolute, or relative to root).
    metadata_csv: Path
    #: The clinical table (absolute, or relative to root); without it the images carry no annotations.
    clinical_csv: Path | None = None
    #: Column of the image table with each image's path.
    path_column: str = "anon_dicom_path"
    #: Prefix removed from every path before it is taken relative to root.
    strip_prefix: str = ""
    #: Keep only images whose FinalImageType is one of these; empty keeps all.
    image_types: list[str] = Field(default_factory=lambda: ["2D"])
    #: Clinical column -> {code -> concept text} for the finding columns (massshape, calcfind, ...).
    value_concepts: dict[str, dict[str, str]] = Field(default_factory=dict)


def _strip(path: str, prefix: str) -> str:
    return path[len(prefix):].lstrip("/") if prefix and path.startswith(prefix) else path


class EmbedReader(ProbeSetReader):
    """Reads EMBED-style image and clinical tables."""

    name = "embed"
    description = "EMBED-style image table joined to the exam-level clinical table (density, BI-RADS, findings)."
    Options = EmbedOptions

    def load(self, options: EmbedOptions) -> ProbeSet:  # type: ignore[override]
        """Read both tables, join findings to images by patient, exam and side, and check every image."""
        root = check_root_folder(options.root, "a folder that holds the EMBED images")
        manifest = resolve_manifest_file(options.metadata_csv, root, "EMBED image table")
        image_rows = read_manifest(manifest, (*IMAGE_COLUMNS, options.path_column), "EMBED image table")
        findings = self._findings(options, root)

        collector = RecordCollector(manifest)
        skipped_types = 0
        for row in image_rows:
            image_type = row.get("FinalImageType", "")
            if options.image_types and "FinalImageType" in row and image_type not in options.image_types:
                skipped_types += 1
                continue
            self._add_image(collector, row, findings, options)
        if skipped_types:
            logger.info("embed: left out %d image(s) whose FinalImageType is not in %s",
                        skipped_types, options.image_types)
        collector.check()
        vocabulary = [
            *DENSITY_LETTER_CONCEPTS.values(),
            *BIRADS_VOCABULARY,
            *(text for mapping in options.value_concepts.values() for text in mapping.values()),
        ]
        return build_probe_set(self.name, root, list(collector.records.values()), options, manifest, vocabulary)

    def _findings(self, options: EmbedOptions, root: Path) -> dict[tuple[str, str], list[dict[str, str]]]:
        if options.clinical_csv is None:
            return {}
        path = resolve_manifest_file(options.clinical_csv, root, "EMBED clinical table")
        grouped: dict[tuple[str, str], list[dict[str, str]]] = {}
        for row in read_manifest(path, CLINICAL_COLUMNS, "EMBED clinical table"):
            grouped.setdefault((row["empi_anon"], row["acc_anon"]), []).append(row)
        return grouped

    def _add_image(
        self,
        collector: RecordCollector,
        row: dict[str, str],
        findings: dict[tuple[str, str], list[dict[str, str]]],
        options: EmbedOptions,
    ) -> None:
        laterality = row["ImageLaterality"].upper() or None
        exam_rows = findings.get((row["empi_anon"], row["acc_anon"]), [])
        matching = [finding for finding in exam_rows if finding["side"].upper() in (laterality, "B")]
        density = next(
            (letter for letter in (density_letter(finding.get("tissueden")) for finding in exam_rows) if letter),
            None,
        )
        raw_path = _strip(row[options.path_column], options.strip_prefix)
        metadata: dict[str, Any] = {
            "patient_id": row["empi_anon"],
            "study_id": row["acc_anon"],
            "laterality": laterality,
            "view": row["ViewPosition"].upper() or None,
            "density": density,
            "image_type": row.get("FinalImageType") or None,
            "split": None,
        }
        record = collector.add(Path(raw_path).with_suffix("").as_posix(), raw_path, metadata,
                               [DENSITY_LETTER_CONCEPTS.get(density or "")])
        for finding in matching:
            kept = {column: finding[column] for column in FINDING_COLUMNS if not is_empty(finding.get(column))}
            if kept and kept not in record.metadata["findings"]:
                record.metadata["findings"].append(kept)
            record.add_annotations(self._finding_concepts(finding, options))

    def _finding_concepts(self, finding: dict[str, str], options: EmbedOptions) -> list[str | None]:
        texts: list[str | None] = []
        birads = ASSESSMENT_BIRADS.get(finding.get("asses", "").strip().upper())
        if birads is not None:
            texts.append(f"BI-RADS {birads}")
        for column, mapping in options.value_concepts.items():
            value = finding.get(column, "")
            if not is_empty(value):
                texts.append(mapping.get(value.strip()))
        return texts


@hookimpl
def register_probe_sets(register: Register) -> None:
    """Register the ``embed`` probe set reader."""
    register(EmbedReader())

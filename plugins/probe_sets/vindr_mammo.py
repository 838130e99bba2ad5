"""Probe set reader ``vindr-mammo``: VinDr-Mammo images with breast-level and finding annotations.

VinDr-Mammo (PhysioNet) ships two tables:

* ``breast-level_annotations.csv``: one row per image with study_id,
  series_id, image_id, laterality (L/R), view_position (CC/MLO),
  height, width, breast_birads (``BI-RADS 1``..``BI-RADS 5``),
  breast_density (``DENSITY A``..``DENSITY D``) and split
  (``training``/``test``);
* ``finding_annotations.csv``: the same image columns plus
  finding_categories (a Python-style list such as ``['Mass',
  'Suspicious Calcification']`` or ``['No Finding']``), finding_birads and
  the box xmin, ymin, xmax, ymax.  An image appears once per finding.

Give either table or both (``breast_csv``, ``finding_csv``).  Rows of one
image merge into one probe image; its ``metadata["findings"]`` lists every
finding with its categories, BI-RADS and box (pixels, top-left origin).
Images are found at ``<root>/<image_folder>/<study_id>/<image_id><extension>``
(``images/<study_id>/<image_id>.dicom`` in the PhysioNet release); set
``extension = ".png"`` for converted copies.

Annotations:

=========================  ==================================================
column                     concept text
=========================  ==================================================
breast_density             :data:`~mammo_dissect.plugins.probe_sets.manifest.DENSITY_LETTER_CONCEPTS`
breast_birads              "BI-RADS N"
finding_categories         :data:`FINDING_CONCEPTS` ("mass", "suspicious calcification", ...)
finding_birads             "BI-RADS N" of the finding
=========================  ==================================================
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.hookspecs import Register
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import ProbeSetReader
from mammo_dissect.plugins.probe_sets.folder import check_root_folder
from mammo_dissect.plugins.probe_sets.manifest import BIRADS_VOCABULARY
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

#: Concept text of each VinDr-Mammo finding category ("No Finding" gives "normal").
FINDING_CONCEPTS: dict[str, str] = {
    "Mass": "mass",
    "Suspicious Calcification": "suspicious calcification",
    "Asymmetry": "asymmetry",
    "Focal Asymmetry": "focal asymmetry",
    "Global Asymmetry": "global asymmetry",
    "Architectural Distortion": "architectural distortion",
    "Skin Thickening": "skin thickening",
    "Skin Retraction": "skin retraction",
    "Nipple Retraction": "nipple retraction",
    "Suspicious Lymph Node": "suspicious lymph node",
    "No Finding": "normal",
}

#: Columns both tables share and the reader needs.
IMAGE_COLUMNS = ("study_id", "image_id", "laterality", "view_position")

BOX_COLUMNS = ("xmin", "ymin", "xmax", "ymax")


class VindrMammoOptions(ManifestOptions):
    """Options of the ``vindr-mammo`` reader."""

    #: breast-level_annotations.csv (absolute, or relative to root).
    breast_csv: Path | None = None
    #: finding_annotations.csv (absolute, or relative to root).
    finding_csv: Path | None = None
    #: Folder under root that holds one folder per study.
    image_folder: str = "images"
    #: Suffix of the image files: ``.dicom`` in the release, ``.png`` for converted copies.
    extension: str = ".dicom"
    #: Keep only rows of this split (``training`` or ``test``); default: all.
    split: str | None = None


def parse_categories(cell: str) -> list[str]:
    """Parse a finding_categories cell (``['Mass', 'Asymmetry']``) into a list of category names."""
    if is_empty(cell):
        return []
    text = cell.strip()
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ProbeSetError(
                f"finding_categories value {cell!r} is not a list such as ['Mass', 'Asymmetry']"
            ) from None
        return [str(item).strip() for item in value if str(item).strip()]
    return [part.strip() for part in text.split(",") if part.strip()]


def category_concept(category: str) -> str:
    """Return the concept text of a finding category; unknown ones become lower-case words."""
    text = FINDING_CONCEPTS.get(category)
    if text is None:
        text = " ".join(category.lower().split())
        logger.debug("VinDr finding category %r is not in FINDING_CONCEPTS; using %r", category, text)
    return text


def _float_or_none(value: str) -> float | None:
    if is_empty(value):
        return None
    try:
        return float(value)
    except ValueError:
        return None


class VindrMammoReader(ProbeSetReader):
    """Reads VinDr-Mammo images with density, BI-RADS and finding annotations."""

    name = "vindr-mammo"
    description = "VinDr-Mammo (breast-level and finding CSVs) with density, BI-RADS and finding annotations."
    Options = VindrMammoOptions

    def load(self, options: VindrMammoOptions) -> ProbeSet:  # type: ignore[override]
        """Read the tables, merge the rows of each image and check every image file."""
        if options.breast_csv is None and options.finding_csv is None:
            raise ProbeSetError(
                "the vindr-mammo reader needs breast_csv (breast-level_annotations.csv), "
                "finding_csv (finding_annotations.csv) or both"
            )
        root = check_root_folder(options.root, "the VinDr-Mammo folder with images/<study_id>/<image_id>.dicom")
        collector: RecordCollector | None = None
        manifests = []
        for path, with_findings in ((options.breast_csv, False), (options.finding_csv, True)):
            if path is None:
                continue
            manifest = resolve_manifest_file(path, root, "VinDr-Mammo table")
            manifests.append(manifest)
            collector = collector or RecordCollector(manifest)
            required = [*IMAGE_COLUMNS, *(("finding_categories",) if with_findings else ())]
            for row in read_manifest(manifest, required, "VinDr-Mammo table"):
                if options.split is not None and row.get("split", "") != options.split:
                    continue
                self._add_row(collector, row, options, with_findings)
        assert collector is not None
        collector.check()
        if not collector.records:
            raise ProbeSetError(f"no VinDr-Mammo row has split {options.split!r} in {', '.join(map(str, manifests))}")
        vocabulary = [*DENSITY_LETTER_CONCEPTS.values(), *BIRADS_VOCABULARY, *dict.fromkeys(FINDING_CONCEPTS.values())]
        return build_probe_set(self.name, root, list(collector.records.values()), options, manifests[-1], vocabulary)

    def _add_row(
        self, collector: RecordCollector, row: dict[str, str], options: VindrMammoOptions, with_findings: bool
    ) -> None:
        density = density_letter(row.get("breast_density"))
        metadata: dict[str, Any] = {
            # NOTE: the tables have no patient id; each VinDr-Mammo study is one patient's exam.
            "patient_id": row["study_id"],
            "study_id": row["study_id"],
            "series_id": row.get("series_id") or None,
            "laterality": row["laterality"].upper() or None,
            "view": row["view_position"].upper() or None,
            "density": density,
            "breast_birads": birads_number(row.get("breast_birads")),
            "split": row.get("split") or None,
        }
        texts = [DENSITY_LETTER_CONCEPTS.get(density or ""), birads_concept(row.get("breast_birads"))]
        finding = None
        if with_findings:
            categories = parse_categories(row["finding_categories"])
            texts += [category_concept(category) for category in categories]
            texts.append(birads_concept(row.get("finding_birads")))
            box = [_float_or_none(row.get(column, "")) for column in BOX_COLUMNS]
            finding = {
                "categories": categories,
                "birads": birads_number(row.get("finding_birads")),
                "box_xyxy": box if all(value is not None for value in box) else None,
            }
            if categories == ["No Finding"]:
                finding = None
        raw_path = f"{options.image_folder}/{row['study_id']}/{row['image_id']}{options.extension}"
        collector.add(row["image_id"], raw_path, metadata, texts, finding)


@hookimpl
def register_probe_sets(register: Register) -> None:
    """Register the ``vindr-mammo`` probe set reader."""
    register(VindrMammoReader())

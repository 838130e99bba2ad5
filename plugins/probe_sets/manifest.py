"""Shared machinery of manifest-based probe-set readers, and the generic ``csv`` reader.

A manifest is a CSV table with one or more rows per image.  Every manifest
reader (``csv``, ``vindr-mammo``, ``rsna-screening``, ``cbis-ddsm-csv``,
``embed``) goes through the same steps here:

1. read the rows (:func:`read_manifest`), with column names stripped;
2. turn each row into a :class:`ImageRecord` and merge the rows of one image
   (:class:`RecordCollector`): a data set that repeats an image once per
   finding gives one probe image with all its findings;
3. resolve every image path inside the declared root
   (:func:`resolve_inside_root`): ``..`` escapes and absolute paths outside
   the root are rejected unless ``allow_outside_root`` is true;
4. check that the files exist (:func:`build_probe_set`): all missing files
   are listed in one error, or skipped with a count when ``missing = "skip"``;
5. attach the preprocessing steps of the ``preprocessing`` option.

The generic ``csv`` reader takes the column names from its options:

.. code-block:: toml

    [probe_set]
    name = "csv"
    [probe_set.options]
    csv = "manifest.csv"            # relative paths are taken from root
    root = "/data/my-mammograms"
    image_column = "path"           # or path_template = "{patient}/{image}.png"
    id_column = "image"             # default: the image path without suffix
    columns = { patient_id = "patient", laterality = "side", view = "view" }
    annotations = { finding = { mass = "mass", calc = "calcification" } }
"""

from __future__ import annotations

import csv
import logging
import string
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any
from typing import Literal

from pydantic import Field

from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.hookspecs import Register
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.images import read_image
from mammo_dissect.core.preprocessing import apply_preprocessing
from mammo_dissect.core.preprocessing import normalise_laterality
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import ProbeImage
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import ProbeSetReader
from mammo_dissect.plugins.probe_sets.folder import DECODING
from mammo_dissect.plugins.probe_sets.folder import check_root_folder
from mammo_dissect.plugins.probe_sets.folder import check_unique_ids


logger = logging.getLogger(__name__)

#: Metadata keys every manifest reader fills when its data set has them.
STANDARD_METADATA = ("patient_id", "study_id", "laterality", "view", "density", "findings", "split")

#: Values that mean "no value" in the manifests of the supported data sets.
EMPTY_VALUES = frozenset({"", "na", "nan", "none", "null", "n/a"})


def is_empty(value: Any) -> bool:
    """Return whether a manifest cell holds no value (empty, NA, nan, None)."""
    return value is None or str(value).strip().lower() in EMPTY_VALUES


class ManifestOptions(Options):
    """Options shared by every manifest reader."""

    #: Folder the image paths are relative to; no image may lie outside it
    #: unless ``allow_outside_root`` is true.
    root: Path
    #: What to do with images the manifest names but the disk lacks: ``error``
    #: lists them all in one error, ``skip`` leaves them out and logs the count.
    missing: Literal["error", "skip"] = "error"
    #: Accept image paths that resolve outside ``root`` (absolute paths or ``..``).
    allow_outside_root: bool = False
    #: Read only the first ``limit`` images (in manifest order).
    limit: int | None = Field(default=None, ge=1)
    #: Preprocessing steps applied after decoding, each ``{step = name, ...}``
    #: (see :mod:`mammo_dissect.core.preprocessing`).
    preprocessing: list[dict[str, Any]] = Field(default_factory=list)


@dataclass
class ImageRecord:
    """One probe image being assembled from one or more manifest rows."""

    image_id: str
    #: Path as written in the manifest (or built from a template), not yet resolved.
    raw_path: str
    metadata: dict[str, Any] = field(default_factory=dict)
    annotations: list[str] = field(default_factory=list)
    rows: int = 0

    def add_annotations(self, texts: Iterable[str | None]) -> None:
        """Append concept texts that the image does not carry yet, keeping their order."""
        for text in texts:
            if text and text not in self.annotations:
                self.annotations.append(text)


class RecordCollector:
    """Merges manifest rows by image id, in first-seen order.

    The first row of an image sets its path and metadata; every row appends
    its findings (``metadata["findings"]``) and annotations.  A later row
    that gives the same image another path is an error, because the
    manifest would then name two files for one image id.
    """

    def __init__(self, manifest: Path) -> None:
        self.manifest = manifest
        self.records: dict[str, ImageRecord] = {}
        self.conflicts: list[str] = []

    def add(
        self,
        image_id: str,
        raw_path: str,
        metadata: dict[str, Any],
        annotations: Iterable[str | None] = (),
        finding: dict[str, Any] | None = None,
    ) -> ImageRecord:
        record = self.records.get(image_id)
        if record is None:
            record = ImageRecord(image_id=image_id, raw_path=raw_path, metadata=dict(metadata))
            record.metadata.setdefault("findings", [])
            self.records[image_id] = record
        elif record.raw_path != raw_path:
            self.conflicts.append(f"{image_id}: {record.raw_path} and {raw_path}")
        record.rows += 1
        if finding is not None and finding not in record.metadata["findings"]:
            record.metadata["findings"].append(finding)
        record.add_annotations(annotations)
        return record

    def check(self) -> None:
        """Raise :class:`ProbeSetError` when one image id was given several paths."""
        if self.conflicts:
            raise ProbeSetError(
                f"manifest {self.manifest} gives {len(self.conflicts)} image id(s) more than one file; "
                "make each image id name one file:\n  " + "\n  ".join(self.conflicts[:50])
            )


def resolve_manifest_file(path: Path, root: Path, what: str) -> Path:
    """Return the manifest ``path`` (relative paths are taken from ``root``), checking that it is a file."""
    path = Path(path).expanduser()
    if not path.is_absolute():
        path = root / path
    if not path.is_file():
        raise ProbeSetError(f"{what} not found: {path}; set the option to the CSV file (absolute or relative to root)")
    return path


def read_manifest(path: Path, required: Iterable[str] = (), what: str = "manifest") -> list[dict[str, str]]:
    """Read a CSV manifest into rows of stripped strings, checking the ``required`` columns.

    Column names are stripped of surrounding spaces and a UTF-8 byte-order
    mark.  Raises :class:`ProbeSetError` naming the file and the missing columns.
    """
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
            missing = [name for name in required if name not in reader.fieldnames]
            if missing:
                raise ProbeSetError(
                    f"{what} {path} lacks the column(s) {', '.join(missing)}; found "
                    f"{', '.join(reader.fieldnames) or 'no header'}"
                )
            rows = [
                {key: (value or "").strip() for key, value in row.items() if key is not None} for row in reader
            ]
    except UnicodeDecodeError as exc:
        raise ProbeSetError(f"{what} {path} is not valid UTF-8 (byte {exc.start}); save it as UTF-8") from None
    if not rows:
        raise ProbeSetError(f"{what} {path} has a header but no rows")
    logger.debug("read %d row(s) from %s", len(rows), path)
    return rows


def resolve_inside_root(raw_path: str, root: Path, allow_outside_root: bool) -> Path:
    """Return the absolute path of ``raw_path`` (relative to ``root``), rejecting escapes from the root.

    ``..`` components and absolute paths that end up outside ``root`` raise
    :class:`ProbeSetError` unless ``allow_outside_root`` is true.  Symbolic
    links are resolved before the check, so a link cannot smuggle a file in.
    """
    path = Path(raw_path).expanduser()
    if not path.is_absolute():
        path = root / path
    resolved = path.resolve()
    if not allow_outside_root and not resolved.is_relative_to(root.resolve()):
        raise ProbeSetError(
            f"image path {raw_path!r} resolves to {resolved}, outside the probe-set root {root}; "
            "move the image under the root, fix the manifest, or set allow_outside_root = true"
        )
    return resolved


def build_probe_set(
    reader: str,
    root: Path,
    records: list[ImageRecord],
    options: ManifestOptions,
    manifest: Path,
    vocabulary: Iterable[str],
) -> ProbeSet:
    """Resolve and check every image path, then return the probe set with its preprocessing attached.

    ``vocabulary`` lists the concept texts the reader's mappings can produce,
    in the documented order; texts that only images carry are appended.
    """
    if options.limit is not None:
        records = records[: options.limit]
    escapes = []
    images = []
    for record in records:
        try:
            path = resolve_inside_root(record.raw_path, root, options.allow_outside_root)
        except ProbeSetError as exc:
            escapes.append(f"{record.image_id}: {exc}")
            continue
        images.append(
            ProbeImage(
                image_id=record.image_id,
                path=path,
                metadata={**record.metadata, "manifest_rows": record.rows},
                annotations=tuple(record.annotations),
            )
        )
    if escapes:
        raise ProbeSetError(
            f"{len(escapes)} image path(s) in {manifest} lie outside the root {root}:\n  " + "\n  ".join(escapes[:50])
        )

    missing = [image for image in images if not image.path.is_file()]
    if missing and options.missing == "error":
        listed = "\n  ".join(f"{image.image_id}: {image.path}" for image in missing[:200])
        more = f"\n  ... and {len(missing) - 200} more" if len(missing) > 200 else ""
        raise ProbeSetError(
            f"{len(missing)} of {len(images)} image(s) named in {manifest} are missing under {root}; "
            f"copy them there, fix the paths, or set missing = \"skip\":\n  {listed}{more}"
        )
    if missing:
        logger.warning("%s: skipped %d of %d image(s) named in %s that are missing on disk",
                       reader, len(missing), len(images), manifest)
        absent = {id(image) for image in missing}
        images = [image for image in images if id(image) not in absent]
    if not images:
        raise ProbeSetError(f"no image of {manifest} is left to read under {root}; check root and the manifest")
    check_unique_ids([(image.image_id, image.path) for image in images])

    ordered = list(dict.fromkeys(vocabulary))
    for image in images:
        for text in image.annotations:
            if text not in ordered:
                ordered.append(text)
    decoding = {**DECODING, "manifest": str(manifest), "missing_skipped": len(missing)}
    probe_set = ProbeSet(
        reader=reader,
        root=root,
        images=images,
        annotation_vocabulary=ordered,
        decoding=decoding,
        decoder=read_image,
    )
    logger.info("%s probe set: %d image(s) from %s", reader, len(images), manifest)
    return apply_preprocessing(probe_set, options.preprocessing)


def template_fields(template: str) -> list[str]:
    """Return the field names of a ``str.format`` template such as ``{patient_id}/{image_id}.dcm``."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def format_template(template: str, row: dict[str, str], manifest: Path) -> str:
    """Fill ``template`` from ``row``, naming the missing column when the row lacks one."""
    try:
        return template.format(**row)
    except KeyError as exc:
        raise ProbeSetError(
            f"path template {template!r} names column {exc.args[0]!r}, which {manifest} lacks; "
            f"columns: {', '.join(row)}"
        ) from None


def density_letter(value: Any) -> str | None:
    """Return a BI-RADS density letter A-D from ``A``, ``DENSITY C``, ``2`` or ``3.0``, else None.

    Numbers 1-4 map to A-D, as in the CBIS-DDSM, EMBED and RSNA tables.
    """
    if is_empty(value):
        return None
    text = str(value).strip().upper().replace("DENSITY", "").strip()
    if text in ("A", "B", "C", "D"):
        return text
    try:
        number = float(text)
    except ValueError:
        return None
    return {1.0: "A", 2.0: "B", 3.0: "C", 4.0: "D"}.get(number)


#: BI-RADS breast composition (5th edition letters) as concept texts; the same
#: words as the CBIS-DDSM reader's numeric density concepts.
DENSITY_LETTER_CONCEPTS: dict[str, str] = {
    "A": "almost entirely fatty breast",
    "B": "scattered fibroglandular densities",
    "C": "heterogeneously dense breast",
    "D": "extremely dense breast",
}


def birads_number(value: Any) -> str | None:
    """Return a BI-RADS assessment as text (``4``, ``4A``) from ``BI-RADS 4``, ``4.0`` or ``4a``, else None."""
    if is_empty(value):
        return None
    text = str(value).strip().upper().replace("BI-RADS", "").replace("BIRADS", "").strip()
    if text.endswith(".0"):
        text = text[:-2]
    if text and text[0] in "0123456" and (len(text) == 1 or text[1:] in ("A", "B", "C")):
        return text
    return None


def birads_concept(value: Any) -> str | None:
    """Return the concept text ``BI-RADS N`` of an assessment value, or None when it is empty or unknown."""
    number = birads_number(value)
    return f"BI-RADS {number}" if number is not None else None


#: Concept texts every BI-RADS assessment can give, in order.
BIRADS_VOCABULARY: tuple[str, ...] = tuple(f"BI-RADS {number}" for number in range(7))


# ---------------------------------------------------------------- generic csv reader

#: Standard metadata keys the generic reader accepts in its ``columns`` option.
CSV_METADATA_KEYS = ("patient_id", "study_id", "laterality", "view", "density", "split", "age")


class CsvManifestOptions(ManifestOptions):
    """Options of the generic ``csv`` reader."""

    #: The manifest CSV (absolute, or relative to ``root``).
    csv: Path
    #: Column with each image's path relative to ``root``; or use ``path_template``.
    image_column: str | None = None
    #: ``str.format`` template over the columns, for example ``{patient_id}/{image_id}.png``.
    path_template: str | None = None
    #: Column with each image's id; default: the image path without its suffix.
    id_column: str | None = None
    #: Metadata key -> column, for the keys patient_id, study_id, laterality, view,
    #: density, split and age; other keys are copied under their own name.
    columns: dict[str, str] = Field(default_factory=dict)
    #: Annotation column -> {cell value -> concept text}; a cell may hold several
    #: values separated by ``separator``.  Values are matched case-insensitively.
    annotations: dict[str, dict[str, str]] = Field(default_factory=dict)
    #: Separator of several values in one annotation cell; empty for none.
    separator: str = ";"
    #: What to do with an annotation value missing from its mapping.
    unmapped: Literal["ignore", "error"] = "ignore"


def _parse_annotation_values(cell: str, separator: str) -> list[str]:
    parts = cell.split(separator) if separator else [cell]
    return [part.strip() for part in parts if not is_empty(part)]


class CsvManifestReader(ProbeSetReader):
    """Reads any CSV manifest whose columns are declared in the options."""

    name = "csv"
    description = "Images listed in a CSV manifest, with declared metadata columns and annotation mappings."
    Options = CsvManifestOptions

    def load(self, options: CsvManifestOptions) -> ProbeSet:  # type: ignore[override]
        """Read the manifest, map its columns and annotations, and check every image."""
        if (options.image_column is None) == (options.path_template is None):
            raise ProbeSetError(
                "the csv reader needs exactly one of image_column and path_template; got "
                f"image_column={options.image_column!r}, path_template={options.path_template!r}"
            )
        root = check_root_folder(options.root, "a folder with the images named in the manifest")
        manifest = resolve_manifest_file(options.csv, root, "CSV manifest")
        required = [options.image_column] if options.image_column else template_fields(options.path_template or "")
        required += [options.id_column] if options.id_column else []
        required += list(options.columns.values()) + list(options.annotations)
        rows = read_manifest(manifest, dict.fromkeys(required), "CSV manifest")

        mappings = {
            column: {key.strip().casefold(): text for key, text in mapping.items()}
            for column, mapping in options.annotations.items()
        }
        collector = RecordCollector(manifest)
        unmapped: dict[str, set[str]] = {}
        for row in rows:
            raw_path = row[options.image_column] if options.image_column else format_template(
                options.path_template or "", row, manifest
            )
            if is_empty(raw_path):
                raise ProbeSetError(f"CSV manifest {manifest} has a row without an image path: {row}")
            image_id = row[options.id_column] if options.id_column else Path(raw_path).with_suffix("").as_posix()
            metadata = self._metadata(row, options)
            texts = []
            values = {}
            for column, mapping in mappings.items():
                cell_values = _parse_annotation_values(row[column], options.separator)
                values[column] = cell_values
                for value in cell_values:
                    text = mapping.get(value.casefold())
                    if text is None:
                        unmapped.setdefault(column, set()).add(value)
                    else:
                        texts.append(text)
            finding = {column: cell for column, cell in values.items() if cell} or None
            collector.add(image_id, raw_path, metadata, texts, finding)
        collector.check()
        if unmapped:
            listed = "; ".join(f"{column}: {', '.join(sorted(found))}" for column, found in unmapped.items())
            if options.unmapped == "error":
                raise ProbeSetError(
                    f"CSV manifest {manifest} has annotation values without a concept in the annotations "
                    f"option: {listed}; add them to the mapping or set unmapped = \"ignore\""
                )
            logger.info("csv reader: annotation values without a concept were ignored: %s", listed)
        vocabulary = [text for mapping in options.annotations.values() for text in mapping.values()]
        return build_probe_set(self.name, root, list(collector.records.values()), options, manifest, vocabulary)

    def _metadata(self, row: dict[str, str], options: CsvManifestOptions) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        for key, column in options.columns.items():
            value = None if is_empty(row[column]) else row[column]
            if key == "laterality":
                value = normalise_laterality(value) or value
            elif key == "density":
                value = density_letter(value) or value
            metadata[key] = value
        return metadata


@hookimpl
def register_probe_sets(register: Register) -> None:
    """Register the generic ``csv`` probe set reader."""
    register(CsvManifestReader())

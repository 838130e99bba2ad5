"""Probe set reader ``folder``: every image file under a local folder.

The reader needs no labels, so the probe set has no annotations.  Images are
ordered by their path relative to the root (POSIX form), and each image id is
that relative path without its suffix (``benign/case_01``).  Files and
folders whose names start with a dot are skipped, because they are hidden
files such as macOS ``._name.png`` resource forks, which are not images.
DICOM files get patient, laterality and view metadata from their header.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic import field_validator

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


logger = logging.getLogger(__name__)

#: Suffixes the reader looks for when the ``extensions`` option is not set.
DEFAULT_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")

#: Description of the pixel decoding done by
#: :func:`mammo_dissect.core.images.read_image`, stored with each run.
DECODING: dict[str, Any] = {
    "decoder": "mammo_dissect.core.images.read_image",
    "output": "float32 in [0, 1]; [H, W] for grey images, [H, W, 3] for colour images",
    "integer_images": "divided by the maximum of the pixel type (255 for 8-bit, 65535 for 16-bit)",
    "dicom": "modality LUT, then VOI LUT or window if present, MONOCHROME1 inverted, "
    "scaled by the output range of the last LUT",
}


class FolderOptions(Options):
    """Options of the ``folder`` reader."""

    #: Folder that contains the images, directly or in sub-folders.
    root: Path
    #: Whether to look into sub-folders.
    recursive: bool = True
    #: File suffixes to read, case-insensitive, with or without the leading dot.
    extensions: list[str] = Field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    #: Read only the first ``limit`` images (in path order).
    limit: int | None = Field(default=None, ge=1)
    #: Preprocessing steps applied after decoding, each ``{step = name, ...}``
    #: (see :mod:`mammo_dissect.core.preprocessing`).
    preprocessing: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, value: list[str]) -> list[str]:
        normalised = []
        for extension in value:
            extension = extension.strip().lower()
            if not extension or extension == ".":
                raise ValueError("an extension must not be empty; write for example '.png'")
            if not extension.startswith("."):
                extension = "." + extension
            if extension not in normalised:
                normalised.append(extension)
        if not normalised:
            raise ValueError("the list of extensions is empty; give at least one, for example ['.png']")
        return normalised


def find_image_files(root: Path, extensions: list[str] | tuple[str, ...], recursive: bool = True) -> list[Path]:
    """Find the files under ``root`` whose suffix is one of ``extensions``.

    Returns paths sorted by their POSIX path relative to ``root``, skipping
    hidden files and folders (names starting with a dot).  Symbolic links to
    folders are not followed, so a link loop cannot make the search endless.
    """
    wanted = {extension.lower() for extension in extensions}
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        if not recursive:
            subfolders.clear()
        for name in files:
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in wanted:
                found.append(Path(folder) / name)
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def image_id_for(path: Path, root: Path) -> str:
    """Return the id of an image: its POSIX path relative to ``root`` without the suffix."""
    return path.relative_to(root).with_suffix("").as_posix()


def check_root_folder(root: Path, layout: str) -> Path:
    """Return ``root`` made absolute, or raise :class:`ProbeSetError` if it is not a folder.

    ``layout`` describes the files the reader expects, for the error message.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise ProbeSetError(f"probe set folder not found: {root}. Expected layout: {layout}")
    if not root.is_dir():
        raise ProbeSetError(f"probe set root {root} is a file, but it must be a folder. Expected layout: {layout}")
    return root.resolve()


def check_unique_ids(ids_and_paths: list[tuple[str, Path]]) -> None:
    """Raise :class:`ProbeSetError` listing every image id shared by several files."""
    paths_by_id: dict[str, list[Path]] = {}
    for image_id, path in ids_and_paths:
        paths_by_id.setdefault(image_id, []).append(path)
    clashes = {image_id: paths for image_id, paths in paths_by_id.items() if len(paths) > 1}
    if clashes:
        lines = [f"{image_id}: {', '.join(str(path) for path in paths)}" for image_id, paths in clashes.items()]
        raise ProbeSetError(
            f"{len(clashes)} image id(s) are shared by several files, but image ids must be unique; "
            "rename the files or restrict the extensions:\n  " + "\n  ".join(lines)
        )


class FolderReader(ProbeSetReader):
    """Reads every PNG, JPEG, TIFF or DICOM file under a folder, without labels."""

    name = "folder"
    description = "Every image file (PNG, JPEG, TIFF, DICOM) under a local folder, without labels."
    Options = FolderOptions

    def load(self, options: FolderOptions) -> ProbeSet:  # type: ignore[override]
        """Find the images under ``options.root`` and return them as a probe set."""
        layout = (
            f"a folder of image files ({', '.join(options.extensions)})"
            + (", optionally in sub-folders" if options.recursive else " directly inside it")
            + "; set the reader's root option to that folder"
        )
        root = check_root_folder(options.root, layout)
        paths = find_image_files(root, options.extensions, options.recursive)
        if not paths:
            where = "under" if options.recursive else "directly in"
            raise ProbeSetError(
                f"no images found {where} {root}: looked for files ending in {', '.join(options.extensions)} "
                "(case-insensitive, hidden files skipped); add images or change the extensions option"
            )
        if options.limit is not None:
            paths = paths[: options.limit]

        ids_and_paths = [(image_id_for(path, root), path) for path in paths]
        check_unique_ids(ids_and_paths)
        images = [
            ProbeImage(image_id=image_id, path=path, metadata=self._metadata(path, root))
            for image_id, path in ids_and_paths
        ]
        logger.info("folder probe set: %d image(s) under %s", len(images), root)
        probe_set = ProbeSet(reader=self.name, root=root, images=images, decoding=dict(DECODING), decoder=read_image)
        return apply_preprocessing(probe_set, options.preprocessing)

    def _metadata(self, path: Path, root: Path) -> dict[str, Any]:
        metadata: dict[str, Any] = {"relative_path": path.relative_to(root).as_posix()}
        if path.suffix.lower() in DICOM_SUFFIXES:
            metadata.update(dicom_metadata(path))
        return metadata


@hookimpl
def register_probe_sets(register: Register) -> None:
    """Register the ``folder`` probe set reader."""
    register(FolderReader())

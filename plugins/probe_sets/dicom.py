"""Probe set reader ``dicom``: every DICOM file under a folder, with metadata from the headers.

Image ids are the paths relative to the root without the suffix, as in the
``folder`` reader.  Each image's metadata comes from
:func:`mammo_dissect.core.images.dicom_metadata`: patient and study ids,
laterality, view, pixel spacing, bit depth and transfer syntax.  The reader
has no annotations.  Compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000)
need pydicom's optional decoders (see
:data:`mammo_dissect.core.images.DICOM_HANDLER_PACKAGES`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

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

LAYOUT = "a folder of DICOM files (.dcm or .dicom), optionally in sub-folders"


class DicomFolderOptions(Options):
    """Options of the ``dicom`` reader."""

    #: Folder searched for .dcm and .dicom files.
    root: Path
    #: Whether to look into sub-folders.
    recursive: bool = True
    #: Keep only images whose ViewPosition is one of these (for example ``["CC", "MLO"]``); empty keeps all.
    views: list[str] = Field(default_factory=list)
    #: Read only the first ``limit`` images (in path order, after the view filter).
    limit: int | None = Field(default=None, ge=1)
    #: Preprocessing steps applied after decoding (see :mod:`mammo_dissect.core.preprocessing`).
    preprocessing: list[dict[str, Any]] = Field(default_factory=list)


class DicomFolderReader(ProbeSetReader):
    """Reads every DICOM file under a folder, taking metadata from the headers."""

    name = "dicom"
    description = "Every DICOM file under a folder, with patient, study, laterality and view from the headers."
    Options = DicomFolderOptions

    def load(self, options: DicomFolderOptions) -> ProbeSet:  # type: ignore[override]
        """Find the DICOM files, read their headers and return them as a probe set."""
        root = check_root_folder(options.root, LAYOUT)
        paths = find_image_files(root, DICOM_SUFFIXES, options.recursive)
        if not paths:
            raise ProbeSetError(f"no DICOM files (.dcm, .dicom) found under {root}. Expected layout: {LAYOUT}")
        wanted_views = {view.upper() for view in options.views}
        images = []
        for path in paths:
            metadata = {"relative_path": path.relative_to(root).as_posix(), **dicom_metadata(path)}
            if wanted_views and (metadata.get("view") or "").upper() not in wanted_views:
                continue
            images.append(ProbeImage(image_id=image_id_for(path, root), path=path, metadata=metadata))
            if options.limit is not None and len(images) >= options.limit:
                break
        if not images:
            raise ProbeSetError(
                f"none of the {len(paths)} DICOM file(s) under {root} has a ViewPosition in {sorted(wanted_views)}; "
                "change the views option or leave it empty"
            )
        check_unique_ids([(image.image_id, image.path) for image in images])
        logger.info("dicom probe set: %d image(s) under %s", len(images), root)
        probe_set = ProbeSet(reader=self.name, root=root, images=images, decoding=dict(DECODING), decoder=read_image)
        return apply_preprocessing(probe_set, options.preprocessing)


@hookimpl
def register_probe_sets(register: Register) -> None:
    """Register the ``dicom`` probe set reader."""
    register(DicomFolderReader())

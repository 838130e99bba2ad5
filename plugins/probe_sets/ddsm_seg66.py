"""Probe set reader ``ddsm-seg66``: 66 DDSM mammograms with tissue segmentation masks.

Expected layout of the root folder (the data set of Tiryaki and Kaplanoglu,
IRBM 2022)::

    train_valid/fgt_seg/A_0002_1.RIGHT_MLO.png          mammogram, 8-bit grey, 480 x 960
    train_valid/fgt_seg_labels/A_0002_1.RIGHT_MLO_LI.png  its label image, same size
    test/fgt_seg/...                                    same, for the test split
    test/fgt_seg_labels/...

Label image values (:data:`TISSUE_LABELS`): 64 background, 128 fat
(adipose tissue), 192 fibroglandular tissue, 255 pectoral muscle.  Each
probe image's ``metadata["mask_path"]`` is its label image, for mask-based
scores such as :func:`mammo_dissect.core.masks.mask_iou`, and
``metadata["tissue_fractions"]`` gives each tissue's share of the image's
pixels, plus ``fibroglandular_of_breast`` = fibroglandular / (fat +
fibroglandular).

The file name gives the DDSM volume (``A`` normal, ``B`` benign, ``D``
benign without callback), the case, the laterality and the view.  Per-image
ACR density is not part of the data set.  Annotations:

==============================================  =========================
source                                          concept text
==============================================  =========================
label 255 covers >= ``min_fraction`` of pixels  "pectoral muscle"
label 192 covers >= ``min_fraction``            "fibroglandular tissue"
label 128 covers >= ``min_fraction``            "fatty tissue"
volume A / B / D                                "normal" / "benign" / "benign"
==============================================  =========================
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
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

#: Tissue of each label image value.
TISSUE_LABELS: dict[int, str] = {64: "background", 128: "fat", 192: "fibroglandular", 255: "pectoral muscle"}

#: Concept text of each tissue label that gives an annotation.
TISSUE_CONCEPTS: dict[int, str] = {255: "pectoral muscle", 192: "fibroglandular tissue", 128: "fatty tissue"}

#: Concept text of each DDSM volume letter.
VOLUME_CONCEPTS: dict[str, str] = {"A": "normal", "B": "benign", "C": "malignant", "D": "benign"}

SPLITS = ("train_valid", "test")

LAYOUT = "train_valid/ and test/, each with fgt_seg/<name>.png and fgt_seg_labels/<name>_LI.png"

_NAME_PATTERN = re.compile(r"^(?P<volume>[A-D])_(?P<case>\d+)_\d+\.(?P<side>LEFT|RIGHT)_(?P<view>CC|MLO)$")


class DdsmSeg66Options(Options):
    """Options of the ``ddsm-seg66`` reader."""

    #: Folder with train_valid/ and test/.
    root: Path
    #: Splits to read, in this order.
    splits: list[str] = Field(default_factory=lambda: list(SPLITS))
    #: Smallest share of an image's pixels a tissue must cover to be annotated.
    min_fraction: float = Field(default=0.001, ge=0.0, le=1.0)
    #: Read only the first ``limit`` images.
    limit: int | None = Field(default=None, ge=1)
    #: Preprocessing steps applied after decoding (see :mod:`mammo_dissect.core.preprocessing`).
    preprocessing: list[dict[str, Any]] = Field(default_factory=list)


def read_labels(mask_path: Path) -> np.ndarray:
    """Read a label image as uint8 [H, W], checking that it holds only the four tissue values."""
    from PIL import Image

    with Image.open(mask_path) as image:
        labels = np.asarray(image.convert("L"), dtype=np.uint8)
    unknown = sorted(set(np.unique(labels).tolist()) - set(TISSUE_LABELS))
    if unknown:
        raise ProbeSetError(
            f"label image {mask_path} has values {unknown}, but only {sorted(TISSUE_LABELS)} are tissue labels"
        )
    return labels


def tissue_fractions(labels: np.ndarray) -> dict[str, float]:
    """Return each tissue's share of the pixels, and the fibroglandular share of the breast (fat + fibroglandular)."""
    total = labels.size
    fractions = {name: float((labels == value).sum() / total) for value, name in TISSUE_LABELS.items()}
    breast = fractions["fat"] + fractions["fibroglandular"]
    fractions["fibroglandular_of_breast"] = fractions["fibroglandular"] / breast if breast else 0.0
    return fractions


class DdsmSeg66Reader(ProbeSetReader):
    """Reads the DDSM-66 mammograms with tissue annotations and label-image paths."""

    name = "ddsm-seg66"
    description = "66 DDSM mammograms with fat, fibroglandular and pectoral-muscle masks (Tiryaki and Kaplanoglu)."
    Options = DdsmSeg66Options

    def load(self, options: DdsmSeg66Options) -> ProbeSet:  # type: ignore[override]
        """Pair every mammogram with its label image and derive the tissue annotations."""
        root = check_root_folder(options.root, LAYOUT)
        images: list[ProbeImage] = []
        missing_masks = []
        for split in options.splits:
            folder = root / split / "fgt_seg"
            if not folder.is_dir():
                raise ProbeSetError(f"DDSM-66 split folder not found: {folder}. Expected layout: {LAYOUT}")
            for path in sorted(folder.glob("*.png")):
                mask_path = root / split / "fgt_seg_labels" / f"{path.stem}_LI.png"
                if not mask_path.is_file():
                    missing_masks.append(f"{path} (expected {mask_path})")
                    continue
                images.append(self._image(path, mask_path, split, options))
        if missing_masks:
            raise ProbeSetError(
                f"{len(missing_masks)} DDSM-66 mammogram(s) have no label image; restore them:\n  "
                + "\n  ".join(missing_masks)
            )
        if not images:
            raise ProbeSetError(f"no mammograms found under {root}. Expected layout: {LAYOUT}")
        if options.limit is not None:
            images = images[: options.limit]
        vocabulary = [*TISSUE_CONCEPTS.values(), *dict.fromkeys(VOLUME_CONCEPTS.values())]
        probe_set = ProbeSet(
            reader=self.name,
            root=root,
            images=images,
            annotation_vocabulary=vocabulary,
            decoding=dict(DECODING),
            decoder=read_image,
        )
        logger.info("DDSM-66 probe set: %d image(s) under %s", len(images), root)
        return apply_preprocessing(probe_set, options.preprocessing)

    def _image(self, path: Path, mask_path: Path, split: str, options: DdsmSeg66Options) -> ProbeImage:
        labels = read_labels(mask_path)
        fractions = tissue_fractions(labels)
        annotations = [
            text for value, text in TISSUE_CONCEPTS.items() if fractions[TISSUE_LABELS[value]] >= options.min_fraction
        ]
        match = _NAME_PATTERN.match(path.stem)
        metadata: dict[str, Any] = {
            "patient_id": None,
            "laterality": None,
            "view": None,
            "split": split,
            "mask_path": str(mask_path),
            "mask_shape": list(labels.shape),
            "tissue_labels": {str(value): name for value, name in TISSUE_LABELS.items()},
            "tissue_fractions": fractions,
        }
        if match is not None:
            volume = match.group("volume")
            metadata.update(
                patient_id=f"{volume}_{match.group('case')}",
                laterality=match.group("side")[0],
                view=match.group("view"),
                ddsm_volume=volume,
            )
            annotations.append(VOLUME_CONCEPTS[volume])
        else:
            logger.debug("DDSM-66 file name %s does not have the form A_0002_1.RIGHT_MLO", path.name)
        return ProbeImage(image_id=path.stem, path=path, metadata=metadata, annotations=tuple(annotations))


@hookimpl
def register_probe_sets(register: Register) -> None:
    """Register the ``ddsm-seg66`` probe set reader."""
    register(DdsmSeg66Reader())

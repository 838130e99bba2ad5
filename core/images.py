"""Decoding of probe images and the preprocessing that turns them into model inputs.

Decoded images are float32 numpy arrays in [0, 1], shape [H, W] for grey
images and [H, W, 3] for colour ones.  Mammograms are grey; colour files are
kept as they are and converted by each model's preprocessing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mammo_dissect.core.errors import ProbeSetError


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm")
DICOM_SUFFIXES = (".dcm", ".dicom")


def read_image(path: Path) -> np.ndarray:
    """Decode an image file (PNG, JPEG, TIFF, 16-bit PNG or DICOM) to float32 in [0, 1].

    Integer pixels are divided by the maximum of their type (255 for 8-bit,
    65535 for 16-bit).  DICOM files go through :func:`read_dicom`.
    Raises :class:`ProbeSetError` naming the file when it is missing or
    cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise ProbeSetError(f"probe image not found: {path}")
    if path.suffix.lower() in DICOM_SUFFIXES:
        return read_dicom(path)
    from PIL import Image
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return pil_to_array(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ProbeSetError(f"cannot decode probe image {path}: {exc}") from exc


def pil_to_array(image: Any) -> np.ndarray:
    """Convert a Pillow image to float32 in [0, 1] ([H, W] or [H, W, 3])."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.uint16).astype(np.float32) / 65535.0
    elif mode == "I":
        raw = np.asarray(image, dtype=np.int64)
        # 16-bit PNGs often open as mode "I"; values above 65535 mean 32-bit data.
        scale = 65535.0 if raw.max(initial=0) <= 65535 else float(np.iinfo(np.int32).max)
        array = raw.astype(np.float32) / scale
    elif mode == "F":
        raw = np.asarray(image, dtype=np.float32)
        low, high = float(raw.min()), float(raw.max())
        array = (raw - low) / (high - low) if high > low else np.zeros_like(raw)
    elif mode in ("L", "1", "LA"):
        array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    elif mode in ("P", "PA"):
        # A palette may hold colours, so expand it to RGB and keep one
        # channel only when the palette is grey.
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        is_grey = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        array = rgb[..., 0] if is_grey else rgb
    else:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(np.clip(array, 0.0, 1.0), dtype=np.float32)


def read_dicom(path: Path) -> np.ndarray:
    """Decode a DICOM image to float32 in [0, 1], bright tissue on dark background.

    Applies the modality LUT, then the VOI LUT or window when the header has
    one, and inverts MONOCHROME1.  Values are scaled by the full output range
    of the last LUT applied: the stored bit depth through the rescale, or the
    VOI LUT's bit depth.  The image's own minimum and maximum are never used,
    so 8-, 12- and 16-bit data land in [0, 1] and images stay comparable.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut
    from pydicom.pixels import apply_voi_lut

    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
    except Exception as exc:  # pydicom raises many types for broken files
        raise ProbeSetError(_decode_error_message(path, exc)) from exc
    samples_per_pixel = int(dataset.get("SamplesPerPixel", 1))
    if pixels.ndim == 4 or (pixels.ndim == 3 and samples_per_pixel == 1):
        raise ProbeSetError(
            f"DICOM file {path} contains {pixels.shape[0]} frames, but probe images must be single frames; "
            f"export one frame per file"
        )
    modality = apply_modality_lut(pixels, dataset)
    data = modality.astype(np.float64)
    low, high = _modality_output_range(dataset)
    if "VOILUTSequence" in dataset or "WindowCenter" in dataset:
        if "VOILUTSequence" in dataset and np.issubdtype(modality.dtype, np.floating):
            # A VOI LUT is indexed by integer values; pydicom warns that float input may give wrong
            # results, so a rescale that produced whole numbers is turned back into integers.
            rounded = np.round(modality)
            if np.array_equal(rounded, modality):
                modality = rounded.astype(np.int64)
        data = apply_voi_lut(modality if "VOILUTSequence" in dataset else data, dataset, index=0).astype(np.float64)
        if "VOILUTSequence" in dataset:
            # NOTE: some files declare 16-bit LUT entries but store 12-bit
            # values; such images come out darker than their window intends.
            low, high = 0.0, float(2 ** int(dataset.VOILUTSequence[0].LUTDescriptor[2]) - 1)
        # A window maps onto the same range as the modality output (pydicom's
        # apply_windowing), so low and high stay as they are.
    scaled = (data - low) / (high - low) if high > low else np.zeros_like(data)
    if dataset.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.ascontiguousarray(np.clip(scaled, 0.0, 1.0), dtype=np.float32)


def _decode_error_message(path: Path, exc: Exception) -> str:
    """Return the message for a DICOM file that pydicom cannot decode, naming the missing plugins if any."""
    message = f"cannot decode DICOM file {path}: {type(exc).__name__}: {exc}"
    text = str(exc).lower()
    if "plugin" in text or "missing" in text or "dependencies" in text:
        packages = sorted({name for names in DICOM_HANDLER_PACKAGES.values() for name in names})
        message += (
            f"; compressed transfer syntaxes need pydicom's optional decoders: pip install {' '.join(packages)}"
        )
    return message


def _modality_output_range(dataset: Any) -> tuple[float, float]:
    """Return the lowest and highest value the modality LUT or rescale can output.

    The rules follow pydicom 3's ``apply_windowing``: a Modality LUT Sequence
    outputs ``0 .. 2**bits - 1`` with ``bits`` from its descriptor, otherwise
    the stored range (unsigned or two's complement ``BitsStored``) goes through
    RescaleSlope and RescaleIntercept.
    """
    if "ModalityLUTSequence" in dataset:
        bits = int(dataset.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    bits = int(dataset.get("BitsStored", 16))
    if int(dataset.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope = dataset.get("RescaleSlope")
    intercept = dataset.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = sorted((low * float(slope) + float(intercept), high * float(slope) + float(intercept)))
    return low, high


#: Optional pydicom 3 decoding plugins by transfer syntax family: the pip
#: packages that let ``pixel_array`` decode compressed DICOM files.  RLE
#: Lossless and uncompressed files need none of them.
DICOM_HANDLER_PACKAGES: dict[str, tuple[str, ...]] = {
    "JPEG baseline, extended and lossless": ("pylibjpeg", "pylibjpeg-libjpeg"),
    "JPEG-LS": ("pylibjpeg", "pylibjpeg-libjpeg"),
    "JPEG 2000": ("pylibjpeg", "pylibjpeg-openjpeg"),
    "RLE Lossless (faster than pydicom's own decoder)": ("pylibjpeg", "pylibjpeg-rle"),
}

#: ViewPosition values for the code meanings of a ViewCodeSequence (DICOM CID 4014).
_VIEW_CODE_MEANINGS: dict[str, str] = {
    "cranio-caudal": "CC",
    "medio-lateral oblique": "MLO",
    "medio-lateral": "ML",
    "latero-medial": "LM",
    "latero-medial oblique": "LMO",
    "caudo-cranial (from below)": "FB",
    "exaggerated cranio-caudal": "XCCL",
    "cranio-caudal exaggerated laterally": "XCCL",
    "cranio-caudal exaggerated medially": "XCCM",
    "superolateral to inferomedial oblique": "SIO",
}


def _view_from_code_sequence(dataset: Any) -> str | None:
    """Return the view of a ViewCodeSequence as a ViewPosition value (``MLO``), or None."""
    sequence = dataset.get("ViewCodeSequence")
    if not sequence:
        return None
    meaning = str(sequence[0].get("CodeMeaning", "")).strip().lower()
    return _VIEW_CODE_MEANINGS.get(meaning) or (meaning or None)


def _text(dataset: Any, keyword: str) -> str | None:
    value = dataset.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


def dicom_metadata(path: Path) -> dict[str, Any]:
    """Read patient, study, laterality, view, pixel spacing and pixel format from a DICOM header.

    Laterality is ImageLaterality, else the series' Laterality (CBIS-DDSM
    files carry only the latter), as ``L``/``R``/``B``/``U``.  View is
    ViewPosition, else the code meaning of ViewCodeSequence mapped to a
    ViewPosition value.  Pixel spacing is PixelSpacing, else
    ImagerPixelSpacing, in millimetres as [row, column].  ``study_id`` is the
    StudyInstanceUID.  Raises :class:`ProbeSetError` naming the file when it
    is not a readable DICOM file.
    """
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for broken files
        raise ProbeSetError(f"cannot read the DICOM header of {path}: {type(exc).__name__}: {exc}") from exc
    laterality = _text(dataset, "ImageLaterality") or _text(dataset, "Laterality")
    spacing = dataset.get("PixelSpacing") or dataset.get("ImagerPixelSpacing")
    file_meta = getattr(dataset, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    return {
        "patient_id": _text(dataset, "PatientID"),
        "study_id": _text(dataset, "StudyInstanceUID"),
        "series_id": _text(dataset, "SeriesInstanceUID"),
        "sop_instance_uid": _text(dataset, "SOPInstanceUID"),
        "accession_number": _text(dataset, "AccessionNumber"),
        "laterality": laterality.upper() if laterality else None,
        "view": _text(dataset, "ViewPosition") or _view_from_code_sequence(dataset),
        "pixel_spacing": [float(value) for value in spacing] if spacing else None,
        "rows": int(dataset.get("Rows", 0)) or None,
        "columns": int(dataset.get("Columns", 0)) or None,
        "photometric_interpretation": _text(dataset, "PhotometricInterpretation"),
        "bits_stored": int(dataset.get("BitsStored", 0)) or None,
        "bits_allocated": int(dataset.get("BitsAllocated", 0)) or None,
        "pixel_representation": int(dataset.get("PixelRepresentation", 0)),
        "transfer_syntax": transfer_syntax.name if transfer_syntax else None,
        "manufacturer": _text(dataset, "Manufacturer"),
        "modality": _text(dataset, "Modality"),
    }


class ImagePreprocess:
    """Resize, channel handling and normalisation of a decoded image for one model.

    Calling the object on a decoded image returns a float32 tensor [C, H, W].
    :meth:`describe` returns the steps as plain data, stored with the run.
    """

    def __init__(
        self,
        size: tuple[int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        channels: int = 3,
        interpolation: str = "area",
        per_image_minmax: bool = False,
        source: str = "",
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values each, got {mean} and {std}")
        self.size = (int(size[0]), int(size[1]))
        self.mean = tuple(float(value) for value in mean)
        self.std = tuple(float(value) for value in std)
        self.channels = channels
        self.interpolation = interpolation
        self.per_image_minmax = per_image_minmax
        self.source = source

    def __call__(self, image: np.ndarray) -> Any:
        import torch
        import torch.nn.functional as functional

        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        if tensor.ndim == 2:
            tensor = tensor.unsqueeze(0)
        else:
            tensor = tensor.permute(2, 0, 1)
        if self.channels == 1 and tensor.shape[0] == 3:
            # ITU-R BT.601 luma, as Pillow's "L" conversion uses.
            weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
            tensor = (tensor * weights).sum(0, keepdim=True)
        if tuple(tensor.shape[1:]) != self.size:
            mode = self.interpolation
            kwargs: dict[str, Any] = {}
            if mode in ("bilinear", "bicubic"):
                kwargs = {"align_corners": False, "antialias": True}
            tensor = functional.interpolate(tensor.unsqueeze(0), size=self.size, mode=mode, **kwargs)[0]
        if self.per_image_minmax:
            low, high = tensor.min(), tensor.max()
            tensor = (tensor - low) / (high - low) if high > low else torch.zeros_like(tensor)
        if self.channels == 3 and tensor.shape[0] == 1:
            tensor = tensor.expand(3, -1, -1)
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return ((tensor - mean) / std).contiguous()

    def describe(self) -> dict[str, Any]:
        """Return the preprocessing steps as plain data."""
        return {
            "size_hw": list(self.size),
            "interpolation": self.interpolation,
            "channels": self.channels,
            "grey_to_rgb": "replicate" if self.channels == 3 else "none",
            "per_image_minmax": self.per_image_minmax,
            "mean": list(self.mean),
            "std": list(self.std),
            "source": self.source,
        }

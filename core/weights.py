"""Safe, strict loading of weight files for target and dissector plugins."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from mammo_dissect.core.errors import ModelLoadError


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

#: Prefixes added by wrappers (DataParallel, Lightning, EMA) that are stripped before matching keys.
KNOWN_PREFIXES = ("module.", "model.", "_orig_mod.")
URL_PATTERN = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Return the SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def check_local_file(value: str | Path, what: str, option: str) -> Path:
    """Return ``value`` as a path to an existing local file, or raise a clear error.

    URLs and hub names are rejected: weights never come from the network.
    """
    text = str(value)
    if URL_PATTERN.match(text) or text.startswith("hf-hub:"):
        raise ModelLoadError(
            f"{option}={text!r} is a URL or hub name, but mammo-dissect never downloads "
            f"{what}; download the file yourself and set {option} to its local path"
        )
    path = Path(text).expanduser()
    if path.is_dir():
        raise ModelLoadError(f"{option}={text!r} is a directory; set it to the {what} file inside it")
    if not path.is_file():
        raise ModelLoadError(f"{option}={text!r}: {what} file not found; set {option} to an existing local file")
    return path


def sniff_format(path: Path) -> str:
    """Classify a file by its leading bytes: torch-zip, pickle, tar, html or unknown."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head[257:262] == b"ustar":
        return "tar"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "pickle"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html", b"<?xml")):
        return "html"
    return "unknown"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file (PyTorch zip or pickle with ``weights_only=True``, or safetensors).

    Unwraps a top-level ``state_dict`` or ``model`` entry.  A file that is not a
    weights file (an HTML page, a re-packed tar archive, a truncated download)
    fails with a message that names the file and the expected format.
    """
    import torch

    if path.stat().st_size == 0:
        raise ModelLoadError(f"weights file {path} is empty (0 bytes); download it again")
    kind = sniff_format(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(f"cannot read safetensors file {path}: {exc}") from exc
    if kind == "html":
        raise ModelLoadError(
            f"{path} is an HTML or XML page, not a PyTorch weights file (a failed download?); "
            f"download the weights again and check the file size"
        )
    if kind == "tar":
        raise ModelLoadError(
            f"{path} is a tar archive, not a PyTorch weights file; PyTorch checkpoints are zip "
            f"files even when named .tar, so use the file exactly as downloaded (never untar it)"
        )
    if kind not in ("torch-zip", "pickle"):
        raise ModelLoadError(
            f"{path} is not a PyTorch weights file (expected a torch.save zip or pickle, or .safetensors)"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise ModelLoadError(
            f"cannot load weights from {path} with weights_only=True: {type(exc).__name__}: {exc}; "
            f"the file may be truncated or hold objects other than tensors"
        ) from exc
    return unwrap_state_dict(loaded, path)


def unwrap_state_dict(loaded: Any, path: Path | str) -> dict[str, torch.Tensor]:
    """Return the tensor mapping inside a loaded checkpoint."""
    import torch

    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = loaded.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        if loaded and all(isinstance(value, torch.Tensor) for value in loaded.values()):
            return dict(loaded)
    raise ModelLoadError(
        f"{path} contains no state dict (a mapping of parameter names to tensors); "
        f"top-level type {type(loaded).__name__}"
    )


def strip_prefixes(state_dict: Mapping[str, Any], expected: Iterable[str]) -> dict[str, Any]:
    """Strip wrapper prefixes such as ``module.`` when the model's keys lack them."""
    expected_keys = set(expected)
    result = dict(state_dict)
    for prefix in KNOWN_PREFIXES:
        if any(key.startswith(prefix) for key in expected_keys):
            continue
        if result and all(key.startswith(prefix) for key in result):
            result = {key[len(prefix):]: value for key, value in result.items()}
            logger.info("stripped prefix %r from all weight names", prefix)
    return result


def load_weights_strict(
    model: torch.nn.Module,
    state_dict: Mapping[str, Any],
    source: str,
    ignore_unexpected: Iterable[str] = (),
    allow_partial: bool = False,
) -> None:
    """Load ``state_dict`` into ``model``; every missing, unexpected or misshapen key is an error.

    ``ignore_unexpected`` lists key suffixes that may be present without a
    parameter (for example ``position_ids`` buffers of older checkpoints).
    ``allow_partial`` turns the error into a logged warning; it is the
    user's explicit opt-in, never a default.
    """
    model_state = model.state_dict()
    state = strip_prefixes(state_dict, model_state)
    ignored = tuple(ignore_unexpected)
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(key for key in set(state) - set(model_state) if not (ignored and key.endswith(ignored)))
    mismatched = sorted(
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(model_state[key].shape)}"
        for key in set(state) & set(model_state)
        if tuple(state[key].shape) != tuple(model_state[key].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_shorten(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_shorten(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_shorten(mismatched)}")
    if problems and not allow_partial:
        raise ModelLoadError(
            f"weights in {source} do not match the model: " + "; ".join(problems)
            + ". Check that the file belongs to this architecture"
        )
    if problems:
        logger.warning("partial load of %s (allowed by option): %s", source, "; ".join(problems))
    mismatched_keys = {entry.split(":")[0] for entry in mismatched}
    usable = {key: value for key, value in state.items() if key in model_state and key not in mismatched_keys}
    model.load_state_dict(usable, strict=not allow_partial)


def _shorten(items: list[str], count: int = 10) -> str:
    shown = ", ".join(items[:count])
    return shown + (f", ... ({len(items) - count} more)" if len(items) > count else "")

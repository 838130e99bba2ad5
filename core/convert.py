"""Conversion of full Mammo-CLIP checkpoints to slim, code-free weight files.

The original files hold optimizer and scheduler state and a pickled
configuration; a ``.safetensors`` copy holds only the ``model`` tensors and
cannot run code when read.  A JSON sidecar with the same stem keeps what is
needed to rebuild the model (the encoder size) and the source file's hash.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mammo_dissect.core.errors import ModelLoadError


logger = logging.getLogger(__name__)


def convert_checkpoint(src: str | Path, dst_safetensors: str | Path) -> Path:
    """Write the ``model`` weights of ``src`` to ``dst_safetensors`` and a ``.json`` sidecar beside it.

    ``src`` is read with the restricted unpickler, so a hostile file is
    rejected.  Returns the sidecar path.  Raises :class:`ModelLoadError` when
    ``dst_safetensors`` does not end in ``.safetensors``.
    """
    from safetensors.torch import save_file

    from mammo_dissect.core.weights import sha256_file
    from mammo_dissect.plugins.mammo_clip_checkpoint import SIDECAR_FORMAT
    from mammo_dissect.plugins.mammo_clip_checkpoint import read_mammo_clip_checkpoint

    destination = Path(dst_safetensors)
    if destination.suffix != ".safetensors":
        raise ModelLoadError(f"destination {destination} must end in .safetensors")
    checkpoint = read_mammo_clip_checkpoint(str(src), "source checkpoint")
    # safetensors refuses tensors that share memory, so every tensor gets its own contiguous copy.
    tensors = {key: value.detach().contiguous().clone() for key, value in checkpoint.state.items()}
    destination.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(destination), metadata={"format": "pt"})
    sidecar: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "image_encoder": checkpoint.variant,
        "kind": "classifier" if "classifier.classification_head.weight" in tensors else "clip",
        "source_file": checkpoint.path.name,
        "source_sha256": checkpoint.sha256,
        "weights_sha256": sha256_file(destination),
        "config": json_safe(checkpoint.config),
        "metadata": json_safe(checkpoint.metadata),
    }
    sidecar_path = destination.with_suffix(".json")
    sidecar_path.write_text(json.dumps(sidecar, indent=2, sort_keys=True), encoding="utf-8")
    logger.info("converted %s to %s (%d tensors) and %s", src, destination, len(tensors), sidecar_path)
    return sidecar_path


def json_safe(value: Any) -> Any:
    """Return ``value`` with numpy scalars as Python values and anything else non-JSON as its repr."""
    import numpy as np

    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)

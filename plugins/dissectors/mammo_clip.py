"""Dissector plugin for Mammo-CLIP, rebuilt from its checkpoint without downloading anything.

Mammo-CLIP pairs a lukemelas EfficientNet-B5 or -B2 image encoder with a
Bio_ClinicalBERT text encoder (a transformers ``BertModel``), each followed
by a linear projection.  Every weight, BERT's included, is in the
checkpoint; only the tokenizer files come from a local Bio_ClinicalBERT
directory.

- Image embedding: ``extract_features`` (stem, blocks, head convolution,
  batch norm, swish), average pooling, ``image_projection.projection``.
- Text embedding: BERT's last hidden state at index
  ``attention_mask.sum(-1) - 1`` (the final ``[SEP]`` token, not ``[CLS]``),
  then ``text_projection.projection``.  Texts are tokenized to 256 tokens
  with padding and truncation.
- ``logit_scale`` is loaded (the strict key check needs it) but unused.
"""

from __future__ import annotations

import json
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
from mammo_dissect.core.types import EmbeddingDissector
from mammo_dissect.core.types import LoadedDissector
from mammo_dissect.core.types import Options
from mammo_dissect.core.weights import load_weights_strict
from mammo_dissect.plugins.dissectors.clip_common import PromptTemplate
from mammo_dissect.plugins.dissectors.clip_common import check_local_path
from mammo_dissect.plugins.dissectors.clip_common import encoder_fields
from mammo_dissect.plugins.dissectors.clip_common import require_options
from mammo_dissect.plugins.dissectors.clip_common import transformers_token_count
from mammo_dissect.plugins.dissectors.clip_common import transformers_tokens
from mammo_dissect.plugins.mammo_clip_checkpoint import MammoClipCheckpoint
from mammo_dissect.plugins.mammo_clip_checkpoint import build_image_encoder
from mammo_dissect.plugins.mammo_clip_checkpoint import build_preprocess
from mammo_dissect.plugins.mammo_clip_checkpoint import read_mammo_clip_checkpoint


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

#: Token limit of Mammo-CLIP's text encoder, counting [CLS] and [SEP].
MAX_TEXT_TOKENS = 256
TEXT_PREFIX = "text_encoder.text_encoder."
#: Keys that files written with an older transformers carry and current BertModel lacks.
TOLERATED_KEY_SUFFIXES = ("position_ids",)


class MammoClipOptions(Options):
    """Options of the ``mammo_clip`` dissector."""

    checkpoint: str = Field(
        description=(
            "path of the local Mammo-CLIP checkpoint: the original b5/b2 .tar file exactly as downloaded, "
            "or a .safetensors copy written by convert_checkpoint with its .json sidecar"
        ),
    )
    tokenizer: str = Field(
        description=(
            "path of a local Bio_ClinicalBERT directory with its tokenizer files (vocab.txt and "
            "config.json or tokenizer_config.json); never downloaded"
        ),
    )
    prompt_template: PromptTemplate = None
    truncate_long_concepts: bool = Field(
        default=False,
        description=f"truncate concepts longer than {MAX_TEXT_TOKENS} tokens with a warning instead of failing",
    )

    @field_validator("checkpoint", "tokenizer")
    @classmethod
    def check_not_blank(cls, value: str) -> str:
        """Reject empty values, URLs and Hub names."""
        return check_local_path(value, "a local path")


@dataclass
class MammoClipLoadedDissector(LoadedDissector):
    """A loaded Mammo-CLIP model with its tokenizer."""

    model: Any = None
    tokenizer: Any = None
    variant: str = ""


class MammoClipDissector(EmbeddingDissector):
    """Embeds probe images and concepts with Mammo-CLIP (EfficientNet + Bio_ClinicalBERT)."""

    name = "mammo_clip"
    description = "Mammo-CLIP (EfficientNet-B5/B2 + Bio_ClinicalBERT) from a local checkpoint and tokenizer directory"
    Options = MammoClipOptions

    def load(self, options: Options) -> MammoClipLoadedDissector:
        """Build Mammo-CLIP from the checkpoint, load it strictly and return its encoders.

        Raises :class:`ModelLoadError` for a missing, damaged or hostile
        checkpoint, keys that do not match the official layout, or a tokenizer
        whose vocabulary does not match the checkpoint's word embeddings.
        """
        options = as_mammo_clip_options(options)
        checkpoint = read_mammo_clip_checkpoint(options.checkpoint, "dissector.options.checkpoint")
        tokenizer = load_bert_tokenizer(options.tokenizer, "dissector.options.tokenizer")
        model = build_mammo_clip(checkpoint, tokenizer_dir=Path(options.tokenizer))
        check_vocabulary(tokenizer, model, options.tokenizer)
        logger.info(
            "loaded Mammo-CLIP EfficientNet-%s from %s (sha256 %s)",
            checkpoint.variant.upper(),
            checkpoint.path,
            checkpoint.sha256,
        )
        return make_loaded_dissector(model, tokenizer, checkpoint, options)

    def describe(self, options: Options) -> dict[str, Any]:
        """Return the options, the checkpoint's hash and the preprocessing."""
        options = as_mammo_clip_options(options)
        from mammo_dissect.core.weights import check_local_file
        from mammo_dissect.core.weights import sha256_file

        path = check_local_file(options.checkpoint, "Mammo-CLIP checkpoint", "dissector.options.checkpoint")
        return {
            "plugin": self.name,
            "options": options.model_dump(mode="json"),
            "weights_sha256": sha256_file(path),
            "text_embedding": "last hidden state at attention_mask.sum(-1) - 1, max_length 256",
        }


@hookimpl
def register_dissectors(register: Register) -> None:
    """Register the ``mammo_clip`` dissector."""
    register(MammoClipDissector())


def as_mammo_clip_options(options: Options) -> MammoClipOptions:
    """Return ``options`` as :class:`MammoClipOptions` or raise :class:`ConfigError`."""
    return require_options(options, MammoClipOptions, MammoClipDissector)


# ---------------------------------------------------------------- tokenizer


def load_bert_tokenizer(directory: str, option: str) -> Any:
    """Load a BERT tokenizer from a local directory with ``AutoTokenizer``, offline.

    ``AutoTokenizer.from_pretrained`` is used because, with transformers 5.x,
    ``BertTokenizer(vocab_file=...)`` returns a 5-token vocabulary that maps
    every word to ``[UNK]``.
    """
    from transformers import AutoTokenizer

    path = Path(directory)
    if not path.is_dir():
        what = "is a file" if path.is_file() else "does not exist"
        raise ModelLoadError(
            f"{option}={directory!r} {what}; set it to a local Bio_ClinicalBERT directory containing "
            f"vocab.txt and config.json (download it once, for example with huggingface-cli download "
            f"emilyalsentzer/Bio_ClinicalBERT --local-dir DIR, on a machine with network access)"
        )
    if not (path / "vocab.txt").is_file() and not (path / "tokenizer.json").is_file():
        raise ModelLoadError(f"{option}={directory!r} contains neither vocab.txt nor tokenizer.json")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"cannot load a tokenizer from {option}={directory!r}: {exc}. The directory needs vocab.txt and "
            f"config.json (model_type bert) or tokenizer_config.json"
        ) from exc


def check_vocabulary(tokenizer: Any, model: torch.nn.Module, directory: str) -> None:
    """Raise unless the tokenizer's vocabulary size equals the checkpoint's word-embedding rows."""
    rows = int(model.text_encoder.text_encoder.embeddings.word_embeddings.weight.shape[0])
    size = len(tokenizer)
    if size != rows:
        raise ModelLoadError(
            f"the tokenizer in {directory!r} has {size} tokens but the checkpoint's word embeddings have {rows} "
            f"rows, so token ids would index the wrong embeddings. Point the option at the Bio_ClinicalBERT "
            f"directory (28,996 tokens for the published Mammo-CLIP files) with vocab.txt and config.json"
        )


# ---------------------------------------------------------------- model


def bert_config_from_state(state: dict[str, torch.Tensor], tokenizer_dir: Path | None) -> Any:
    """Infer the BertConfig (sizes, layers, vocabulary) from the checkpoint's text-encoder weights.

    The number of attention heads cannot be read from weight shapes: it comes
    from ``config.json`` in the tokenizer directory when present, otherwise
    hidden size / 64 (BERT's head size).
    """
    from transformers import BertConfig

    def shape(key: str) -> tuple[int, ...]:
        tensor = state.get(TEXT_PREFIX + key)
        if tensor is None:
            raise ModelLoadError(
                f"the checkpoint has no text-encoder weight {TEXT_PREFIX + key}; is it a Mammo-CLIP "
                f"checkpoint (not a fine-tuned image classifier)?"
            )
        return tuple(tensor.shape)

    vocab_size, hidden_size = shape("embeddings.word_embeddings.weight")
    layer_ids = {key[len(TEXT_PREFIX):].split(".")[2] for key in state if key.startswith(TEXT_PREFIX + "encoder.layer.")}
    settings: dict[str, Any] = {}
    config_file = tokenizer_dir / "config.json" if tokenizer_dir is not None else None
    if config_file is not None and config_file.is_file():
        try:
            settings = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read {config_file}: {exc}") from exc
    heads = int(settings.get("num_attention_heads", hidden_size // 64))
    if hidden_size % heads:
        raise ModelLoadError(f"hidden size {hidden_size} is not divisible by {heads} attention heads ({config_file})")
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=len(layer_ids),
        num_attention_heads=heads,
        intermediate_size=shape("encoder.layer.0.intermediate.dense.weight")[0],
        max_position_embeddings=shape("embeddings.position_embeddings.weight")[0],
        type_vocab_size=shape("embeddings.token_type_embeddings.weight")[0],
        hidden_act=settings.get("hidden_act", "gelu"),
        layer_norm_eps=float(settings.get("layer_norm_eps", 1e-12)),
        pad_token_id=int(settings.get("pad_token_id", 0)),
    )


def build_mammo_clip(checkpoint: MammoClipCheckpoint, tokenizer_dir: Path | None = None) -> torch.nn.Module:
    """Build Mammo-CLIP in the checkpoint's key layout and load every weight strictly."""
    import torch
    from transformers import BertModel

    state = checkpoint.state
    model = torch.nn.Module()
    model.image_encoder = build_image_encoder(checkpoint.variant)
    model.text_encoder = torch.nn.Module()
    model.text_encoder.text_encoder = BertModel(
        bert_config_from_state(state, tokenizer_dir),
        add_pooling_layer=any(key.startswith(TEXT_PREFIX + "pooler.") for key in state),
    )
    model.image_projection = torch.nn.Module()
    model.image_projection.projection = projection_from_state(state, "image_projection.projection.")
    model.text_projection = torch.nn.Module()
    model.text_projection.projection = projection_from_state(state, "text_projection.projection.")
    if "logit_scale" in state:
        model.logit_scale = torch.nn.Parameter(torch.zeros_like(state["logit_scale"]))
    load_weights_strict(
        model,
        state,
        f"{str(checkpoint.path)!r} (Mammo-CLIP EfficientNet-{checkpoint.variant.upper()})",
        ignore_unexpected=TOLERATED_KEY_SUFFIXES,
    )
    return model.eval()


def projection_from_state(state: dict[str, torch.Tensor], prefix: str) -> torch.nn.Module:
    """Build the ``nn.Linear`` projection whose weight is ``prefix + "weight"``."""
    import torch

    weight = state.get(prefix + "weight")
    if weight is None or weight.ndim != 2:
        raise ModelLoadError(
            f"the checkpoint has no 2-D projection weight {prefix}weight; is it a Mammo-CLIP checkpoint?"
        )
    out_features, in_features = (int(size) for size in weight.shape)
    return torch.nn.Linear(in_features, out_features, bias=prefix + "bias" in state)


def sentence_embeddings(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Return the projected last hidden state at each text's final non-padding token."""
    import torch

    hidden = model.text_encoder.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = attention_mask.sum(dim=-1) - 1
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return model.text_projection.projection(hidden[rows, last])


def make_loaded_dissector(
    model: torch.nn.Module,
    tokenizer: Any,
    checkpoint: MammoClipCheckpoint,
    options: MammoClipOptions,
) -> MammoClipLoadedDissector:
    """Wrap the encoders, the tokenizer and the preprocessing in a loaded dissector."""

    def image_features(pixels: torch.Tensor) -> torch.Tensor:
        return model.image_projection.projection(model.image_encoder(pixels))

    def text_features(prompts: list[str], device: torch.device) -> torch.Tensor:
        input_ids, attention_mask = transformers_tokens(
            tokenizer, prompts, device, padding="max_length", max_length=MAX_TEXT_TOKENS
        )
        return sentence_embeddings(model, input_ids, attention_mask)

    return MammoClipLoadedDissector(
        **encoder_fields(
            model,
            template=options.prompt_template,
            image_features=image_features,
            text_features=text_features,
            count_tokens=transformers_token_count(tokenizer),
            context_length=MAX_TEXT_TOKENS,
            text_encoder_name="Mammo-CLIP's text encoder",
            truncate_long_concepts=options.truncate_long_concepts,
            model_name="Mammo-CLIP",
        ),
        preprocess=build_preprocess(checkpoint.variant),
        spec=f"mammo_clip EfficientNet-{checkpoint.variant.upper()} ({checkpoint.path.name})",
        weights_path=str(checkpoint.path),
        weights_sha256=checkpoint.sha256,
        max_text_tokens=MAX_TEXT_TOKENS,
        model=model,
        tokenizer=tokenizer,
        variant=checkpoint.variant,
    )

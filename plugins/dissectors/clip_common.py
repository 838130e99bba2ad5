"""Option checks and encoder wrappers shared by the CLIP-style dissectors.

The ``hf_clip``, ``mammo_clip`` and ``open_clip`` dissectors differ in how
they build a model and tokenise text, but put concepts into a prompt
template, check prompt lengths, encode without gradients on the model's
device and move the model the same way.  Each plugin passes its own
image and text feature functions to :func:`encoder_fields`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from typing import Annotated
from typing import Any
from typing import TypeVar

from pydantic import AfterValidator
from pydantic import Field

from mammo_dissect.core.embedding import check_concept_lengths
from mammo_dissect.core.embedding import validate_prompt_template
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.types import Options
from mammo_dissect.core.weights import URL_PATTERN


if TYPE_CHECKING:
    import torch


OptionsT = TypeVar("OptionsT", bound=Options)

#: Option ``prompt_template``: None, or a format string with exactly one ``{}``.
PromptTemplate = Annotated[
    str | None,
    Field(description="template with one {} that each concept is put into before encoding; default: the bare concept"),
    AfterValidator(validate_prompt_template),
]

#: Option ``truncate_long_concepts`` of a dissector whose context length comes from its model.
TruncateLongConcepts = Annotated[
    bool,
    Field(description="truncate concepts longer than the text context length with a warning instead of failing"),
]


def is_remote_address(value: str) -> bool:
    """Return whether ``value`` is a URL or a Hugging Face Hub name with the ``hf-hub:`` prefix."""
    return bool(URL_PATTERN.match(value)) or value.startswith("hf-hub:")


def check_not_blank(value: str) -> str:
    """Return ``value``, or raise ValueError (for pydantic validators) when it is empty or only white space."""
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def check_local_path(value: str, expected: str) -> str:
    """Return ``value``, or raise ValueError when it is blank, a URL or a Hub name.

    ``expected`` completes the message "must be ...", for example "a local directory".
    """
    check_not_blank(value)
    if is_remote_address(value):
        raise ValueError(f"must be {expected}; mammo-dissect never downloads models")
    return value


def require_options(options: Options, expected: type[OptionsT], dissector: type[Any]) -> OptionsT:
    """Return ``options`` if it is an ``expected`` instance, or raise :class:`ConfigError`.

    The message names the plugin class ``dissector`` by its ``name`` and its class name.
    """
    if not isinstance(options, expected):
        raise ConfigError(
            f"the {dissector.name} dissector needs {expected.__name__}, got {type(options).__name__}; "
            f"validate the options with {dissector.__name__}.Options first"
        )
    return options


def transformers_token_count(tokenizer: Any) -> Callable[[str], int]:
    """Return a function that counts a prompt's tokens with a transformers tokenizer, special tokens included."""
    return lambda prompt: len(tokenizer(prompt, truncation=False)["input_ids"])


def transformers_tokens(
    tokenizer: Any, prompts: list[str], device: torch.device, *, padding: bool | str, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise ``prompts`` with a transformers tokenizer, truncating to ``max_length`` tokens.

    Returns the input ids and the attention mask, both on ``device``.
    ``padding`` is passed on: True pads to the longest prompt, "max_length" to ``max_length``.
    """
    tokens = tokenizer(prompts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)


def encoder_fields(
    model: torch.nn.Module,
    *,
    template: str | None,
    image_features: Callable[[torch.Tensor], torch.Tensor],
    text_features: Callable[[list[str], torch.device], torch.Tensor],
    count_tokens: Callable[[str], int],
    context_length: int,
    text_encoder_name: str,
    truncate_long_concepts: bool,
    model_name: str,
) -> dict[str, Callable[..., Any]]:
    """Build the ``encode_images``, ``encode_texts``, ``check_texts`` and ``to`` fields of a loaded dissector.

    ``image_features(batch)`` receives the batch already on the model's
    device, and ``text_features(prompts, device)`` the concepts put into
    ``template``.  Both run without gradients.  ``count_tokens`` and
    ``context_length`` drive the length check, whose message names
    ``text_encoder_name``.  ``model_name`` names the model when moving it to
    a device fails.
    """
    import torch

    def device_of_model() -> torch.device:
        return next(model.parameters()).device

    def to_prompts(concepts: list[str]) -> list[str]:
        return [template.format(concept) for concept in concepts] if template else list(concepts)

    def encode_images(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return image_features(batch.to(device_of_model()))

    def encode_texts(concepts: list[str]) -> torch.Tensor:
        prompts = to_prompts(concepts)
        device = device_of_model()
        with torch.no_grad():
            return text_features(prompts, device)

    def check_texts(concepts: list[str]) -> None:
        check_concept_lengths(
            concepts, to_prompts(concepts), count_tokens, context_length, text_encoder_name, truncate_long_concepts
        )

    def move_to(device: str) -> None:
        try:
            model.to(device)
        except (RuntimeError, AssertionError) as exc:
            raise ConfigError(
                f"cannot move {model_name} to device {device!r}: {exc}; use 'cpu' or an available device"
            ) from exc

    return {"encode_images": encode_images, "encode_texts": encode_texts, "check_texts": check_texts, "to": move_to}

"""Dissector plugin ``aligned``: a closed-vocabulary dissector built from a trained alignment card.

The card (``card.json`` with ``head.pt`` beside it, written by
:func:`mammo_dissect.core.alignment.train_alignment`) names a frozen target
layer, a frozen sentence encoder and a linear head from the layer's pooled
features into the sentence encoder's space.  An image embedding is
head(features), a concept embedding is the sentence encoder's embedding of
the concept in the card's prompt template; the core normalises both.

The head was trained and checked on a closed vocabulary only.  Concepts
that the card did not gate in (see ``gated_concepts`` in the card) are
rejected unless ``allow_ungated = true``.  Use the ``correlation``
similarity function with this dissector (the default when a run sets no
``[similarity]``): its cosines are not calibrated probabilities, which
soft_wpmi assumes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from pydantic import Field

from mammo_dissect.core.alignment import close_matches
from mammo_dissect.core.alignment import load_card
from mammo_dissect.core.errors import ConceptSetError
from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.hookspecs import Register
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.types import EmbeddingDissector
from mammo_dissect.core.types import LoadedDissector
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.weights import sha256_file


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)


class AlignedOptions(Options):
    """Options of the ``aligned`` dissector."""

    card: str = Field(description="path of the card.json written by alignment training; head.pt lies beside it")
    allow_ungated: bool = Field(
        default=False,
        description="accept concepts that the card did not gate in (their labels are not supported by its checks)",
    )


def read_card(path: str) -> dict[str, Any]:
    """Read an alignment card and check that its head file exists and has the hash the card records."""
    card_path = Path(path).expanduser()
    card = load_card(card_path, "set dissector.options.card to the card.json written by alignment training")
    head_path = card_path.parent / card["head_file"]
    if not head_path.is_file():
        raise ModelLoadError(f"head file {head_path} named by alignment card {card_path} not found; train it again")
    expected = card.get("head_sha256")
    if expected is not None:
        found = sha256_file(head_path)
        if found != expected:
            raise ModelLoadError(
                f"head file {head_path} has sha256 {found}, but alignment card {card_path} records {expected}: "
                f"the head belongs to another training run or is damaged; train the card again"
            )
    card["_head_path"] = str(head_path)
    card["_card_path"] = str(card_path)
    return card


def log_card_warnings(card: dict[str, Any], concepts: Sequence[str]) -> None:
    """Log the card's warnings (shortcut flags, fragile paraphrases) about each concept in ``concepts``."""
    warned = card.get("concept_warnings") or {}
    for text in concepts:
        for message in warned.get(text, ()):
            logger.warning("aligned dissector: card %s warns about concept %r: %s", card["_card_path"], text, message)


def check_gated(card: dict[str, Any], concepts: Sequence[str], allow_ungated: bool) -> None:
    """Raise :class:`ConceptSetError` listing the concepts the card did not gate in, unless allowed.

    The message separates concepts the head was never trained on from
    concepts it was trained on that failed the gate.
    """
    gated = set(card["gated_concepts"])
    trained = set(card["vocabulary"])
    ungated = [text for text in concepts if text not in gated]
    if not ungated:
        return
    failed = [text for text in ungated if text in trained]
    untrained = [text for text in ungated if text not in trained]
    parts = []
    if untrained:
        parts.append(f"never trained on {', '.join(repr(text) for text in untrained)}")
        hints = close_matches(untrained, sorted(trained))
        if hints:
            parts[-1] += f" (did you mean {hints}?)"
    if failed:
        parts.append(f"trained on but not gated in: {', '.join(repr(text) for text in failed)}")
    found = "; ".join(parts)
    if allow_ungated:
        logger.warning(
            "aligned dissector: card %s gives no support to %d concept(s), used anyway (allow_ungated): %s",
            card["_card_path"], len(ungated), found,
        )
        return
    raise ConceptSetError(
        f"the aligned dissector's card {card['_card_path']} does not support {len(ungated)} concept(s): {found}. "
        f"Gated in: {', '.join(sorted(gated)) or 'none'}. Use only gated concepts, or set "
        f"dissector.options.allow_ungated = true to use them without support"
    )


def load_head(card: dict[str, Any]) -> torch.nn.Module:
    """Load the card's linear head; raise :class:`ModelLoadError` when the file is not a head state."""
    import pickle
    import zipfile

    import torch

    from mammo_dissect.core.alignment import make_head

    path = card["_head_path"]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        head = make_head(
            state["feature_mean"].numpy(), state["feature_std"].numpy(), state["linear.weight"].shape[0], seed=0
        )
        head.load_state_dict(state, strict=True)
    except (OSError, RuntimeError, KeyError, AttributeError, TypeError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile) as exc:
        raise ModelLoadError(
            f"head file {path} of alignment card {card['_card_path']} is not a readable head "
            f"({type(exc).__name__}: {exc}); train the card again"
        ) from None
    return head


class AlignedDissector(EmbeddingDissector):
    """Projects a frozen target layer's features into a sentence encoder's space with a trained linear head."""

    name = "aligned"
    description = "closed-vocabulary dissector: frozen image features, linear head, frozen sentence encoder"
    Options = AlignedOptions
    # The head's cosines are not calibrated probabilities, which soft_wpmi assumes.
    default_similarity = "correlation"

    def check(self, options: Options, probe_set: ProbeSet, concepts: Sequence[str]) -> None:
        """Reject concepts that the card did not gate in, before any model runs."""
        assert isinstance(options, AlignedOptions)
        card = read_card(options.card)
        check_gated(card, concepts, options.allow_ungated)
        log_card_warnings(card, concepts)

    def load(self, options: Options) -> LoadedDissector:
        """Load the target, the head and the sentence encoder named by the card."""
        import torch

        from mammo_dissect.core.api import load_target
        from mammo_dissect.core.sentence_encoder import SentenceEncoder

        assert isinstance(options, AlignedOptions)
        card = read_card(options.card)
        encoder = card["encoder"]
        target = load_target(encoder["loader"], **encoder["options"])
        if target.loaded.weights_sha256 != encoder["weights_sha256"]:
            raise ModelLoadError(
                f"the target weights of {encoder['spec']} have sha256 {target.loaded.weights_sha256}, but card "
                f"{card['_card_path']} was trained on {encoder['weights_sha256']}; install the same weights or "
                f"train the card again"
            )
        head = load_head(card)
        head.eval()
        text_config = card["text_encoder"]
        text_encoder = SentenceEncoder(text_config.get("configured_path"), int(text_config.get("max_tokens", 128)))
        if text_encoder.weights_sha256 != text_config.get("weights_sha256"):
            raise ModelLoadError(
                f"the sentence encoder in {text_encoder.folder} has weights sha256 {text_encoder.weights_sha256}, but "
                f"card {card['_card_path']} was trained with {text_config.get('weights_sha256')}; install the same "
                f"encoder or train the card again"
            )
        template = text_config["prompt_template"]

        def encode_images(batch: torch.Tensor) -> torch.Tensor:
            features = target.activations(batch, [encoder["layer"]], encoder["pooling"])[encoder["layer"]]
            with torch.no_grad():
                return head(features.float())

        def encode_texts(texts: list[str]) -> torch.Tensor:
            return text_encoder.encode([template.format(text) for text in texts])

        def move(device: str) -> None:
            target.loaded.model.to(device)
            head.to(device)

        def check_texts(texts: list[str]) -> None:
            check_gated(card, texts, options.allow_ungated)

        return LoadedDissector(
            encode_images=encode_images,
            encode_texts=encode_texts,
            preprocess=target.preprocess,
            spec=f"aligned head on {encoder['spec']} {encoder['layer']} ({card.get('name', 'aligned')})",
            weights_path=card["_head_path"],
            weights_sha256=sha256_file(Path(card["_head_path"])),
            max_text_tokens=text_encoder.max_tokens,
            to=move,
            check_texts=check_texts,
        )

    def describe(self, options: Options) -> dict[str, Any]:
        """Return the card path, the head's hash and the encoders, which determine the output."""
        assert isinstance(options, AlignedOptions)
        card = read_card(options.card)
        return {
            "plugin": self.name,
            "options": options.model_dump(mode="json"),
            "head_sha256": sha256_file(Path(card["_head_path"])),
            "encoder": card["encoder"],
            "text_encoder": card["text_encoder"],
            "gated_concepts": card["gated_concepts"],
            "card": {key: value for key, value in card.items() if not key.startswith("_")},
        }


@hookimpl
def register_dissectors(register: Register) -> None:
    """Register the ``aligned`` dissector."""
    register(AlignedDissector())

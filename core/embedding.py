"""Image-concept matrix P of an embedding dissector.

P[i, j] is the cosine similarity between the embedding of probe image ``i``
and the embedding of concept ``j``: both sets of embeddings are
L2-normalised row by row and multiplied in float32, with no logit scale or
temperature.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

import numpy as np

from mammo_dissect.core.errors import ConceptSetError
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.errors import MammoDissectError
from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.fingerprint import image_order
from mammo_dissect.core.preprocessing import describe_preprocess
from mammo_dissect.core.types import LoadedDissector
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import Runtime


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

#: Number of image ids or concept texts shown in one error message.
MAX_LISTED = 20


class ProbeImageDataset:
    """Map-style dataset that decodes and preprocesses one probe image per item.

    Items are ``(tensor [C, H, W], index)``.  The class is defined at module
    level so that DataLoader worker processes can pickle it.
    """

    def __init__(self, probe_set: ProbeSet, preprocess: Callable[[Any], torch.Tensor]) -> None:
        self.probe_set = probe_set
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.probe_set)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.preprocess(self.probe_set.read(index)), index


def embed_and_compare(
    loaded: LoadedDissector,
    probe_set: ProbeSet,
    concepts: list[str],
    runtime: Runtime,
    cache_parts: dict[str, Any] | None = None,
    return_embeddings: bool = False,
) -> Any:
    """Encode every probe image and concept and return P [N x M] in float32 on the CPU.

    With ``return_embeddings`` the result is instead the pair of L2-normalised
    embeddings (I [N x D], T [M x D]), from which P = I @ T.T; similarity
    functions can then score without building P.

    With ``runtime.cache`` and ``cache_parts`` (what identifies the
    dissector's output, from its ``describe``), image and concept
    embeddings are cached separately: a new concept list reuses the image
    embeddings, and a second target on the same probe set reuses both.

    Concepts are checked and encoded before any image is decoded, so a bad
    concept fails the run early.  When the dissector sets
    ``max_text_tokens``, its optional ``check_texts(texts)`` callable decides
    what to do with over-long concepts (raise or truncate with a warning).

    Raises :class:`ConfigError` for a batch size below 1,
    :class:`ConceptSetError` or :class:`ProbeSetError` for an empty input,
    :class:`ModelLoadError` when the image and text embedding dimensions
    differ, and :class:`MammoDissectError` naming the image ids or concept
    texts whose embeddings contain NaN or infinite values.
    """
    import torch

    if runtime.batch_size < 1:
        raise ConfigError(f"runtime.batch_size must be at least 1, got {runtime.batch_size}")
    if not concepts:
        raise ConceptSetError("the concept list is empty; the image-concept matrix needs at least one concept")
    if len(probe_set) == 0:
        raise ProbeSetError(f"probe set from reader {probe_set.reader!r} contains no images")

    check_texts_before_encoding(loaded, concepts)
    if loaded.to is not None and runtime.device:
        loaded.to(runtime.device)

    # no_grad rather than inference_mode: inference tensors would make later
    # in-place updates of P fail outside inference mode.
    with torch.no_grad():
        texts = _cached(
            runtime, cache_parts, "text_embeddings", {"concepts": list(concepts)},
            f"concept embeddings of {loaded.spec}",
            lambda: encode_concepts(loaded, concepts, runtime),
        )
        preprocessing = describe_preprocess(loaded.preprocess)
        images = _cached(
            runtime, cache_parts, "image_embeddings",
            {
                "probe_fingerprint": runtime.probe_fingerprint,
                "image_order": image_order(probe_set),
                "preprocessing": preprocessing,
            },
            f"image embeddings of {loaded.spec}",
            lambda: encode_probe_images(loaded, probe_set, runtime, text_dim=texts.shape[1]),
        )

    image_unit = torch.nn.functional.normalize(images, dim=1)
    text_unit = torch.nn.functional.normalize(texts, dim=1)
    if return_embeddings:
        logger.info(
            "embeddings of %s: %d images and %d concepts (dimension %d)",
            loaded.spec, image_unit.shape[0], text_unit.shape[0], image_unit.shape[1],
        )
        return image_unit.contiguous(), text_unit.contiguous()
    similarity = image_unit @ text_unit.T
    logger.info(
        "image-concept matrix of %s: %d images x %d concepts (embedding dimension %d)",
        loaded.spec,
        similarity.shape[0],
        similarity.shape[1],
        images.shape[1],
    )
    return similarity.contiguous()


def _cached(
    runtime: Runtime,
    cache_parts: dict[str, Any] | None,
    kind: str,
    parts: dict[str, Any],
    what: str,
    compute: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """Return ``compute()``, through the runtime's array cache when there is one."""
    import torch

    if runtime.cache is None or cache_parts is None or (kind == "image_embeddings" and not runtime.probe_fingerprint):
        return compute()
    from mammo_dissect.core.cache import cache_key

    key = cache_key({"kind": kind, "dissector": cache_parts, **parts})
    hit = runtime.cache.load(kind, key, what)
    if hit is not None:
        return torch.from_numpy(np.array(hit[0], dtype=np.float32))
    value = compute()
    runtime.cache.store(kind, key, value.cpu().numpy().astype(np.float32), {"description": what})
    return value


def validate_prompt_template(value: str | None) -> str | None:
    """Return ``value`` if it is None or a format string with exactly one ``{}`` and no other fields.

    Raises ValueError (for pydantic validators) with the fix in the message.
    """
    if value is None:
        return value
    if value.count("{}") != 1:
        raise ValueError("must contain exactly one {} where the concept goes, for example 'a mammogram showing {}'")
    try:
        value.format("concept")
    except (IndexError, KeyError, ValueError) as exc:
        raise ValueError(f"is not a valid format string ({exc}); write literal braces as {{{{ and }}}}") from None
    return value


def check_concept_lengths(
    concepts: Sequence[str],
    prompts: Sequence[str],
    count_tokens: Callable[[str], int],
    limit: int,
    model: str,
    truncate: bool,
) -> None:
    """Reject, or warn about, concepts whose prompt has more than ``limit`` tokens.

    ``count_tokens(prompt)`` counts the tokens the text encoder receives,
    special tokens included.  ``model`` names the encoder in the message.
    Raises :class:`ConceptSetError` listing every over-long concept unless
    ``truncate`` is set; then a warning lists them and the encoder truncates.
    """
    too_long = []
    for concept, prompt in zip(concepts, prompts, strict=True):
        count = count_tokens(prompt)
        if count > limit:
            too_long.append(f"{concept!r} ({count} tokens)")
    if not too_long:
        return
    summary = (
        f"{len(too_long)} concept(s) exceed the text limit of {limit} tokens of {model}, counting the "
        f"start and end tokens: {', '.join(too_long)}"
    )
    if not truncate:
        raise ConceptSetError(
            f"{summary}. Shorten them, or set the dissector option truncate_long_concepts = true to truncate them"
        )
    logger.warning("%s. They are truncated to %d tokens before encoding.", summary, limit)


def check_texts_before_encoding(loaded: LoadedDissector, concepts: list[str]) -> None:
    """Call the dissector's ``check_texts`` on all concepts at once, if it has one."""
    if loaded.check_texts is not None:
        loaded.check_texts(list(concepts))
    elif loaded.max_text_tokens is not None:
        logger.debug(
            "dissector %s sets max_text_tokens=%d but has no check_texts; concepts are not checked for length",
            loaded.spec,
            loaded.max_text_tokens,
        )


def encode_concepts(loaded: LoadedDissector, concepts: list[str], runtime: Runtime) -> torch.Tensor:
    """Encode ``concepts`` in batches; return float32 embeddings [M x D] on the CPU."""
    import torch

    batches = []
    for start in range(0, len(concepts), runtime.batch_size):
        batch = concepts[start : start + runtime.batch_size]
        embeddings = as_embedding_matrix(loaded.encode_texts(batch), len(batch), "text", loaded.spec)
        batches.append(embeddings)
    texts = torch.cat(batches)
    raise_for_non_finite(texts, concepts, "concept")
    return texts


def encode_probe_images(
    loaded: LoadedDissector,
    probe_set: ProbeSet,
    runtime: Runtime,
    text_dim: int,
) -> torch.Tensor:
    """Encode every probe image in batches; return float32 embeddings [N x D] on the CPU.

    The embedding dimension is compared with ``text_dim`` after the first
    batch, so a mismatched model fails before the whole probe set is encoded.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    loader = DataLoader(
        ProbeImageDataset(probe_set, loaded.preprocess),
        batch_size=runtime.batch_size,
        shuffle=False,
        num_workers=runtime.num_workers,
    )
    batches = []
    indices = []
    progress = tqdm(
        loader,
        desc=f"encoding probe images with {loaded.spec}",
        unit="batch",
        disable=not runtime.progress,
    )
    # A dissector without ``to`` stays where it was built, so its inputs stay on the CPU.
    device = runtime.device if loaded.to is not None and runtime.device else "cpu"
    for pixels, batch_indices in progress:
        embeddings = loaded.encode_images(pixels.to(device))
        embeddings = as_embedding_matrix(embeddings, len(batch_indices), "image", loaded.spec)
        if not batches and embeddings.shape[1] != text_dim:
            raise ModelLoadError(
                f"dissector {loaded.spec}: image embeddings have dimension {embeddings.shape[1]} but text "
                f"embeddings have dimension {text_dim}; the two encoders must share one embedding space, "
                f"so check that the weights match the architecture"
            )
        batches.append(embeddings)
        indices.extend(int(index) for index in batch_indices)

    images = torch.cat(batches)
    image_ids = [probe_set.images[index].image_id for index in indices]
    raise_for_non_finite(images, image_ids, "probe image")
    return images


def as_embedding_matrix(embeddings: Any, expected_rows: int, kind: str, spec: str) -> torch.Tensor:
    """Check that an encoder returned a [rows x D] tensor; return it as float32 on the CPU."""
    import torch

    if not isinstance(embeddings, torch.Tensor):
        raise ModelLoadError(
            f"dissector {spec}: the {kind} encoder returned {type(embeddings).__name__}, expected a tensor "
            f"[{expected_rows} x D]; fix the dissector plugin's encode function"
        )
    if embeddings.ndim != 2 or embeddings.shape[0] != expected_rows:
        raise ModelLoadError(
            f"dissector {spec}: the {kind} encoder returned shape {tuple(embeddings.shape)}, expected "
            f"[{expected_rows} x D]; fix the dissector plugin's encode function"
        )
    return embeddings.detach().to(device="cpu", dtype=torch.float32)


def raise_for_non_finite(embeddings: torch.Tensor, names: Sequence[str], kind: str) -> None:
    """Raise :class:`MammoDissectError` listing the rows that contain NaN or infinite values.

    Rows with a zero norm are only logged: they give a cosine of 0 with everything.
    """
    import torch

    finite = torch.isfinite(embeddings).all(dim=1)
    bad = [names[row] for row in torch.nonzero(~finite).flatten().tolist()]
    if bad:
        raise MammoDissectError(
            f"the dissector returned NaN or infinite embeddings for {len(bad)} {kind}(s): "
            f"{format_names(bad)}; check those inputs and the dissector weights"
        )
    zero = [names[row] for row in torch.nonzero(embeddings.norm(dim=1) == 0).flatten().tolist()]
    if zero:
        logger.warning(
            "the dissector returned all-zero embeddings for %d %s(s), so their similarities are 0: %s",
            len(zero),
            kind,
            format_names(zero),
        )


def format_names(names: Sequence[str]) -> str:
    """Join up to :data:`MAX_LISTED` quoted names and count the rest."""
    listed = ", ".join(repr(name) for name in names[:MAX_LISTED])
    if len(names) > MAX_LISTED:
        listed += f" (and {len(names) - MAX_LISTED} more)"
    return listed

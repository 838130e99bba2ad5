"""Base types that plugins implement and the pipeline consumes.

These classes are the public contract for plugin authors, together with
:mod:`mammo_dissect.core.hookspecs`.  They import no heavy library at module
level except numpy and pydantic; torch is imported where it is needed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import ClassVar

import numpy as np
from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import ValidationError

from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.errors import PluginError
from mammo_dissect.core.errors import SimilarityError


if TYPE_CHECKING:
    import torch


class Options(BaseModel):
    """Base class of every plugin's options: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(Options):
    """Options of a plugin that takes none."""


def validate_options(options_model: type[Options], values: dict[str, Any], where: str) -> Options:
    """Validate ``values`` against a plugin's options model.

    Raises :class:`ConfigError` naming each invalid field as ``where.field``.
    """
    try:
        return options_model.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


def format_validation_error(exc: ValidationError, where: str) -> str:
    """Turn a pydantic error into one message with one line per field."""
    lines = []
    for error in exc.errors():
        location = ".".join(str(part) for part in (where, *error["loc"]) if part != "")
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field; remove it or check its spelling"
        if error["type"] == "missing":
            message = "required field is missing"
        value = error.get("input")
        shown = "" if error["type"] == "missing" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{location}: {message}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


class Plugin:
    """Common attributes of everything a plugin registers."""

    #: Public name used in configuration files and on the command line.
    name: ClassVar[str] = ""
    #: One sentence shown by ``mammo-dissect plugins``.
    description: ClassVar[str] = ""
    #: Pydantic model of the options this object accepts.
    Options: ClassVar[type[Options]] = NoOptions


# ---------------------------------------------------------------- probe sets


@dataclass(frozen=True)
class ProbeImage:
    """One probing image and what is known about it."""

    #: Identifier unique within the probe set (for example ``mdb001``).
    image_id: str
    #: Absolute path of the image file.
    path: Path
    #: Clinical and data-set metadata (patient_id, laterality, view, ...).
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Concept texts annotated on this image (ground truth), if any.
    annotations: tuple[str, ...] = ()


@dataclass
class ProbeSet:
    """An ordered list of probe images; the order is fixed for a whole run."""

    #: Name of the reader that produced it.
    reader: str
    #: Folder the images were read from.
    root: Path
    images: list[ProbeImage]
    #: Concept texts the data set can annotate, in a documented order.
    annotation_vocabulary: list[str] = field(default_factory=list)
    #: How pixel values were read (stored with the run).
    decoding: dict[str, Any] = field(default_factory=dict)
    #: Function that decodes one image path to a float32 array in [0, 1],
    #: shape [H, W] (grey) or [H, W, 3].
    decoder: Callable[[Path], np.ndarray] | None = None
    #: Preprocessing steps the decoder applies after decoding, each as plain
    #: data (see :mod:`mammo_dissect.core.preprocessing`); empty when none.
    preprocessing: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int) -> np.ndarray:
        """Decode image ``index`` to a float32 array in [0, 1]."""
        from mammo_dissect.core.images import read_image

        image = self.images[index]
        decode = self.decoder or read_image
        return decode(image.path)

    def limit(self, count: int | None) -> ProbeSet:
        """Return a probe set with only the first ``count`` images."""
        if count is None or count >= len(self.images):
            return self
        return ProbeSet(
            reader=self.reader,
            root=self.root,
            images=self.images[:count],
            annotation_vocabulary=self.annotation_vocabulary,
            decoding=self.decoding,
            decoder=self.decoder,
            preprocessing=self.preprocessing,
        )


class ProbeSetReader(Plugin):
    """Reads a probe set from local files.  Subclasses implement :meth:`load`."""

    def load(self, options: Options) -> ProbeSet:
        raise NotImplementedError


# ---------------------------------------------------------------- concepts


@dataclass(frozen=True)
class Concept:
    """One concept text with its optional categories."""

    text: str
    category: str | None = None
    broad_category: str | None = None


class ConceptSetSource(Plugin):
    """Provides concept texts.  Subclasses implement :meth:`load`."""

    def load(self, options: Options, probe_set: ProbeSet | None = None) -> list[Concept | str]:
        """Return the raw concept list (the core normalises it).

        ``probe_set`` is passed so that a source can derive concepts from the
        probe set's annotation vocabulary; most sources ignore it.
        """
        raise NotImplementedError

    def source_description(self, options: Options) -> str:
        """Return where the concepts came from, for the run record."""
        return self.name


# ---------------------------------------------------------------- targets


@dataclass
class LoadedTarget:
    """A target model ready for activation extraction."""

    #: The model in evaluation mode.
    model: torch.nn.Module
    #: Callable turning a decoded image (float32 [H, W] or [H, W, 3] in [0, 1])
    #: into the model's input tensor [C, H, W]; ``preprocess.describe()``
    #: returns the steps as plain data.
    preprocess: Any
    #: Model specification as the user wrote it (for example ``efficientnet-lite0``).
    spec: str
    weights_path: str | None = None
    weights_sha256: str | None = None
    #: For 3-D (token) outputs: index of the CLS token and whether the layout
    #: is token-first ([T, B, D]).  Keys are layer names; ``"*"`` is the default.
    token_layout: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class TargetDescription:
    """Identity of a target, known without building its model.

    Every field must equal the same field of the :class:`LoadedTarget` that
    :meth:`TargetLoader.load` returns for the same options.
    """

    preprocess: Any
    spec: str
    weights_path: str | None = None
    weights_sha256: str | None = None
    token_layout: dict[str, dict[str, Any]] = field(default_factory=dict)


class TargetLoader(Plugin):
    """Builds a target model.  Subclasses implement :meth:`load`, and may implement :meth:`describe`."""

    def load(self, options: Options) -> LoadedTarget:
        raise NotImplementedError

    def describe(self, options: Options, file_sha256: Callable[[Path], str]) -> TargetDescription | None:
        """Return the target's identity without building the model, or None when this loader cannot.

        A run whose layers are all in the activation cache then skips building
        the model.  Hash a weights file with ``file_sha256``, which remembers
        hashes by file identity, instead of reading the file.  The pipeline
        checks the description against :meth:`load` whenever it builds the
        model after all.  The default returns None: the model is always built.
        """
        return None


# ---------------------------------------------------------------- dissectors


@dataclass
class Runtime:
    """Execution settings shared by the pipeline's stages."""

    batch_size: int = 16
    device: str = "cpu"
    num_workers: int = 0
    progress: bool = True
    #: Content-addressed cache for embeddings (a :class:`mammo_dissect.core.cache.ArrayCache`), if any.
    cache: Any = None
    #: Fingerprint of the probe set (image ids and file hashes), part of cache keys.
    probe_fingerprint: str = ""
    #: "float32", or "bfloat16" for mixed-precision forward passes (torch.autocast).
    precision: str = "float32"
    #: Keep extracting when activations are NaN or Inf (the pipeline then drops those images).
    allow_nonfinite: bool = False


class Dissector(Plugin):
    """Produces the image-concept matrix P [N x M] for a probe set."""

    #: Similarity function a run uses with this dissector when its configuration has no
    #: ``[similarity]`` table; None keeps the run configuration's default (soft_wpmi).
    default_similarity: str | None = None

    def image_concept_matrix(
        self,
        options: Options,
        probe_set: ProbeSet,
        concepts: Sequence[str],
        runtime: Runtime,
    ) -> torch.Tensor:
        raise NotImplementedError

    def check(self, options: Options, probe_set: ProbeSet, concepts: Sequence[str]) -> None:
        """Raise if this dissector cannot work on ``probe_set`` and ``concepts``.

        Called before any model runs, so a mismatch costs no compute.  The
        default accepts everything.
        """

    def describe(self, options: Options) -> dict[str, Any]:
        """Return what identifies this dissector's output, for the run record."""
        return {"plugin": self.name, "options": options.model_dump(mode="json")}


@dataclass
class LoadedDissector:
    """A vision-language model with a joint image-text embedding space."""

    #: ``encode_images(batch [B, C, H, W]) -> [B, D]`` (not yet normalised).
    encode_images: Callable[[torch.Tensor], torch.Tensor]
    #: ``encode_texts(list of str) -> [len, D]`` (not yet normalised).
    encode_texts: Callable[[list[str]], torch.Tensor]
    #: Image preprocessing, like :attr:`LoadedTarget.preprocess`.
    preprocess: Any
    spec: str
    weights_path: str | None = None
    weights_sha256: str | None = None
    #: Maximum number of text tokens the text encoder accepts.
    max_text_tokens: int | None = None
    #: Move the model to a device: ``to(device)``.
    to: Callable[[str], Any] | None = None
    #: Check all concept texts before encoding (for example against the
    #: tokenizer's context length); raises for texts the encoder cannot take.
    check_texts: Callable[[list[str]], None] | None = None


class EmbeddingDissector(Dissector):
    """A dissector that embeds images and texts; P is the cosine of the two.

    Subclasses implement :meth:`load`; :meth:`image_concept_matrix` then
    encodes every probe image and every concept, L2-normalises each row and
    returns ``P = I @ T.T`` in float32.
    """

    def load(self, options: Options) -> LoadedDissector:
        raise NotImplementedError

    def image_concept_matrix(
        self,
        options: Options,
        probe_set: ProbeSet,
        concepts: Sequence[str],
        runtime: Runtime,
    ) -> torch.Tensor:
        from mammo_dissect.core.embedding import embed_and_compare

        return embed_and_compare(
            self.load(options), probe_set, list(concepts), runtime, cache_parts=self.describe(options)
        )

    def embeddings(
        self,
        options: Options,
        probe_set: ProbeSet,
        concepts: Sequence[str],
        runtime: Runtime,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return L2-normalised image embeddings [N x D] and concept embeddings [M x D].

        P is their product; the pipeline passes them to similarity functions,
        which then compute only the parts of P they need.
        """
        from mammo_dissect.core.embedding import embed_and_compare

        return embed_and_compare(  # type: ignore[no-any-return]
            self.load(options), probe_set, list(concepts), runtime,
            cache_parts=self.describe(options), return_embeddings=True,
        )


# ---------------------------------------------------------------- similarity


#: Default bound on the extra memory of one streaming similarity call (1 GiB).
DEFAULT_MEMORY_BUDGET_BYTES = 1 << 30

#: Keyword arguments of :meth:`SimilarityFunction.__call__` that are not
#: function parameters; a similarity function may not declare them.
RESERVED_SIMILARITY_ARGUMENTS = ("image_embeddings", "text_embeddings", "memory_budget_bytes")


@dataclass
class SimilarityFunction:
    """A pure tensor function S = fn(P, A, **params) with declared parameters.

    ``stream_fn(I, T, A, memory_budget_bytes, **params)`` computes the same S
    from image embeddings I [N x D] and text embeddings T [M x D] without
    building P = normalise(I) @ normalise(T).T: it computes only the blocks
    or rows of P it needs, with extra memory bounded by the budget.  It
    takes the same keyword-only parameters as ``fn``.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    description: str = ""
    #: Range of the scores in words (stored with the run).
    value_range: str = ""
    #: Returns the smallest number of probe images the parameters allow.
    min_images: Callable[[dict[str, Any]], int] | None = None
    #: Streaming implementation from embeddings; None when the function has none.
    stream_fn: Callable[..., torch.Tensor] | None = None

    def __post_init__(self) -> None:
        reserved = sorted(set(self.defaults()) & set(RESERVED_SIMILARITY_ARGUMENTS))
        if reserved:
            raise PluginError(
                f"similarity function {self.name!r} declares reserved parameter(s) {', '.join(reserved)}; "
                f"rename them, because SimilarityFunction.__call__ takes these names itself"
            )
        if self.stream_fn is not None:
            streamed = self._keyword_only(self.stream_fn)
            if streamed != self.defaults():
                raise PluginError(
                    f"similarity function {self.name!r}: stream_fn declares parameters {streamed} but fn "
                    f"declares {self.defaults()}; give both the same keyword-only parameters and defaults"
                )

    @staticmethod
    def _keyword_only(function: Callable[..., Any]) -> dict[str, Any]:
        signature = inspect.signature(function)
        return {
            name: parameter.default
            for name, parameter in signature.parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        }

    def defaults(self) -> dict[str, Any]:
        """Return the declared keyword-only parameters and their defaults."""
        return self._keyword_only(self.fn)

    def resolve_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Merge ``params`` into the defaults; unknown or mistyped ones are errors."""
        defaults = self.defaults()
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            allowed = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(
                f"similarity.params: unknown parameter(s) {', '.join(unknown)} for "
                f"similarity function {self.name!r}; allowed: {allowed}"
            )
        resolved = dict(defaults)
        for key, value in params.items():
            default = defaults[key]
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ConfigError(f"similarity.params.{key}: expected true or false, got {value!r}")
            if isinstance(default, int) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"similarity.params.{key}: expected an integer, got {value!r}")
            if isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"similarity.params.{key}: expected a number, got {value!r}")
                value = float(value)
            resolved[key] = value
        return resolved

    def check_inputs(self, n_images: int, params: dict[str, Any]) -> None:
        """Raise :class:`ConfigError` when ``n_images`` is too few for ``params``."""
        if self.min_images is None:
            return
        needed = self.min_images(params)
        if n_images < needed:
            raise ConfigError(
                f"similarity function {self.name!r} with {params} needs at least {needed} "
                f"probe images (rows of P and A), but got {n_images}; add probe images or lower "
                f"the parameter (in a run configuration: similarity.params.top_k)"
            )

    def __call__(
        self,
        P: torch.Tensor | None,
        A: torch.Tensor,
        *,
        image_embeddings: torch.Tensor | None = None,
        text_embeddings: torch.Tensor | None = None,
        memory_budget_bytes: int | None = None,
        **params: Any,
    ) -> torch.Tensor:
        """Compute S [K x M] from P [N x M], or from embeddings when P is None.

        ``fn(P, A, **params)`` scores a full P.  ``fn(None, A,
        image_embeddings=I, text_embeddings=T)`` scores
        P = normalise(I) @ normalise(T).T without building it, with extra
        memory bounded by ``memory_budget_bytes`` (default
        :data:`DEFAULT_MEMORY_BUDGET_BYTES`).  Raises :class:`ConfigError`
        for unknown or mistyped parameters and too few images, and
        :class:`SimilarityError` for an invalid combination of arguments.
        """
        resolved = self.resolve_params(params)
        embeddings_given = image_embeddings is not None or text_embeddings is not None
        if P is not None:
            if embeddings_given:
                raise SimilarityError(
                    f"similarity function {self.name!r} got both P and embeddings; pass P, or pass None "
                    f"for P with image_embeddings and text_embeddings"
                )
            if memory_budget_bytes is not None:
                raise SimilarityError(
                    f"memory_budget_bytes={memory_budget_bytes} has no effect when P is given, because P "
                    f"itself is already in memory; drop it, or pass None for P with the embeddings"
                )
            self.check_inputs(P.shape[0], resolved)
            return self.fn(P, A, **resolved)

        if image_embeddings is None or text_embeddings is None:
            missing = "image_embeddings" if image_embeddings is None else "text_embeddings"
            raise SimilarityError(
                f"P is None and {missing} is missing; pass P, or pass both image_embeddings [N x D] "
                f"and text_embeddings [M x D]"
            )
        if self.stream_fn is None:
            raise SimilarityError(
                f"similarity function {self.name!r} has no streaming implementation; pass the full P instead"
            )
        budget = check_memory_budget(memory_budget_bytes)
        self.check_inputs(A.shape[0], resolved)
        return self.stream_fn(image_embeddings, text_embeddings, A, budget, **resolved)


def check_memory_budget(memory_budget_bytes: int | None) -> int:
    """Return the budget in bytes, the default for None; raise :class:`SimilarityError` if it is not a positive integer."""
    if memory_budget_bytes is None:
        return DEFAULT_MEMORY_BUDGET_BYTES
    if isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, int) or memory_budget_bytes < 1:
        raise SimilarityError(
            f"memory_budget_bytes={memory_budget_bytes!r} is invalid; it must be a positive integer number "
            f"of bytes, for example {DEFAULT_MEMORY_BUDGET_BYTES} for 1 GiB"
        )
    return memory_budget_bytes

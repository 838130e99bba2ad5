"""The dissection pipeline: validate everything, extract, score, store.

    probe set -> target activations A (per layer, streamed to disk)
              -> dissector P (images x concepts)
              -> S = similarity(P, A) per layer
              -> top-n concepts and top-k images per unit, null baseline per layer
              -> one transaction in the DuckDB store

Every input is validated before the first forward pass, so a typo in a layer
name or a too-large ``top_k`` costs seconds, not hours.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import secrets
import shutil
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import numpy as np

from mammo_dissect import __version__
from mammo_dissect.core.cache import ArrayCache
from mammo_dissect.core.cache import cache_key
from mammo_dissect.core.concepts import NormalisedConcepts
from mammo_dissect.core.concepts import normalise_concepts
from mammo_dissect.core.config import RunConfig
from mammo_dissect.core.config import SimilarityConfig
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.errors import MammoDissectError
from mammo_dissect.core.errors import PluginError
from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.errors import Terminated
from mammo_dissect.core.extraction import LayerActivations
from mammo_dissect.core.extraction import NonFiniteActivationError
from mammo_dissect.core.extraction import ResolvedLayer
from mammo_dissect.core.extraction import canonical_layer_name
from mammo_dissect.core.extraction import extract_activations
from mammo_dissect.core.extraction import resolve_layers
from mammo_dissect.core.file_hashes import FileHashes
from mammo_dissect.core.fingerprint import probe_fingerprint
from mammo_dissect.core.plugins import Registry
from mammo_dissect.core.plugins import get_registry
from mammo_dissect.core.results import ConceptRecord
from mammo_dissect.core.results import ImageRecord
from mammo_dissect.core.results import LayerRecord
from mammo_dissect.core.results import ModelRecord
from mammo_dissect.core.results import RunResults
from mammo_dissect.core.results import UnitTables
from mammo_dissect.core.types import Dissector
from mammo_dissect.core.types import EmbeddingDissector
from mammo_dissect.core.types import LoadedTarget
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import Runtime
from mammo_dissect.core.types import SimilarityFunction
from mammo_dissect.core.types import validate_options
from mammo_dissect.core.weights import sha256_file


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

#: Bump when the layout or meaning of cached layer scores changes (see :func:`score_key`).
SCORE_CACHE_FORMAT = 1


class UnbuiltModel:
    """Stands in for a target model that was not built because every layer it is needed for is cached.

    :func:`ensure_target` builds the real model; any use of this object before that is a bug.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise MammoDissectError(
            f"the target model was not built (its activations were all cached), so {name!r} is not "
            f"available; this is a bug in mammo-dissect: call ensure_target(plan) before using the model"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__getattr__("forward")


UNBUILT = UnbuiltModel()


@dataclass
class Plan:
    """A validated run: every plugin resolved, every input loaded and checked."""

    config: RunConfig
    registry: Registry
    run_id: str
    probe_set: ProbeSet
    concepts: NormalisedConcepts
    concept_source: str
    target: LoadedTarget
    layers: list[ResolvedLayer]
    dissector: Dissector
    dissector_options: Options
    #: Validated options of every plugin, defaults filled in, by configuration section.
    plugin_options: dict[str, Options]
    similarity: SimilarityFunction
    similarity_params: dict[str, Any]
    runtime: Runtime
    cache: ArrayCache
    images: list[ImageRecord]
    probe_fingerprint: str
    #: Activation files of the run, by layer name; filled in by :func:`execute`.
    activation_files: dict[str, Path] = field(default_factory=dict)


@dataclass
class RunOutcome:
    """Summary of a finished run for its caller."""

    run_id: str
    database: Path
    n_images: int
    n_concepts: int
    layers: list[tuple[str, int]]
    #: Cached pooled activations [N x K] (float32 .npy) of each layer.
    activation_files: dict[str, Path]


def new_run_id() -> str:
    """Return a time-ordered, globally unique run id such as ``20261204T210713-3fa9c2``."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def with_dissector_similarity(config: RunConfig, dissector: Any) -> RunConfig:
    """Return ``config`` with the dissector's default similarity function when the configuration sets none."""
    preferred = getattr(dissector, "default_similarity", None)
    if not preferred or "similarity" in config.model_fields_set:
        return config
    logger.info(
        "similarity: %s, the default of dissector %r (set [similarity] to choose another)", preferred, dissector.name
    )
    return config.model_copy(update={"similarity": SimilarityConfig(name=preferred)})


def prepare(
    config: RunConfig,
    registry: Registry | None = None,
    progress: bool = True,
    recompute: bool = False,
    lazy_target: bool = False,
) -> Plan:
    """Resolve plugins and load and check every input; no forward pass happens here.

    With ``lazy_target``, a target loader that implements
    :meth:`~mammo_dissect.core.types.TargetLoader.describe` is only described
    (its weights file hashed, through the remembered file hashes), and the
    model is built only when a requested layer is not in the activation cache;
    :func:`ensure_target` builds it later when a step needs it after all.
    """
    registry = registry or get_registry()
    reader = registry.get("probe set", config.probe_set.name)
    target_loader = registry.get("target loader", config.target.loader)
    dissector = registry.get("dissector", config.dissector.name)
    concept_source = registry.get("concept set", config.concept_set.name)
    config = with_dissector_similarity(config, dissector)
    similarity = registry.get("similarity function", config.similarity.name)

    reader_options = validate_options(reader.Options, config.probe_set.options, "probe_set.options")
    target_options = validate_options(target_loader.Options, config.target.options, "target.options")
    dissector_options = validate_options(dissector.Options, config.dissector.options, "dissector.options")
    concept_options = validate_options(concept_source.Options, config.concept_set.options, "concept_set.options")
    similarity_params = similarity.resolve_params(config.similarity.params)

    probe_set = reader.load(reader_options).limit(config.probe_set.limit)
    if len(probe_set) == 0:
        raise ProbeSetError(f"probe set {config.probe_set.name!r} has no images")
    check_images_exist(probe_set)
    n_images = len(probe_set)
    similarity.check_inputs(n_images, similarity_params)
    if config.top_k_images > n_images:
        raise ConfigError(
            f"top_k_images={config.top_k_images} is larger than the probe set ({n_images} images); "
            f"lower top_k_images or add images"
        )
    if config.permutations and n_images < 2:
        raise ConfigError("the null baseline needs at least 2 probe images; set permutations = 0")

    source = concept_source.source_description(concept_options)
    concepts = normalise_concepts(concept_source.load(concept_options, probe_set), source)

    dissector.check(dissector_options, probe_set, concepts.texts)
    if config.top_n > len(concepts.concepts):
        logger.info(
            "top_n=%d is more than the %d concepts; every unit keeps all %d",
            config.top_n, len(concepts.concepts), len(concepts.concepts),
        )
    check_device(config.device)

    cache_root = Path(config.cache_dir)
    description = None
    if lazy_target and not recompute:
        weight_hashes = FileHashes(cache_root, "weights files")
        description = target_loader.describe(target_options, weight_hashes.sha256)
        weight_hashes.save()
    if description is None:
        target = target_loader.load(target_options)
        layers = resolve_layers(target.model, config.target.layers)
    else:
        target = LoadedTarget(
            model=UNBUILT,
            preprocess=description.preprocess,
            spec=description.spec,
            weights_path=description.weights_path,
            weights_sha256=description.weights_sha256,
            token_layout=description.token_layout,
        )
        layers = [
            ResolvedLayer(requested=name, name=canonical_layer_name(name), module=UNBUILT, depth=-1)
            for name in config.target.layers
        ]

    run_id = new_run_id()
    probe_hashes = FileHashes(cache_root, f"probe set {probe_set.reader} {probe_set.root}", recompute=recompute)
    images, fingerprint = image_records(probe_set, probe_hashes)
    probe_hashes.save()
    cache = ArrayCache(cache_root, recompute=recompute)
    runtime = Runtime(
        batch_size=config.batch_size,
        device=config.device,
        num_workers=config.num_workers,
        progress=progress,
        cache=cache,
        probe_fingerprint=fingerprint,
        precision=config.precision,
        allow_nonfinite=config.nonfinite == "drop",
    )
    plan = Plan(
        config=config,
        registry=registry,
        run_id=run_id,
        probe_set=probe_set,
        concepts=concepts,
        concept_source=source,
        target=target,
        layers=layers,
        dissector=dissector,
        dissector_options=dissector_options,
        plugin_options={
            "probe_set": reader_options,
            "target": target_options,
            "dissector": dissector_options,
            "concept_set": concept_options,
        },
        similarity=similarity,
        similarity_params=similarity_params,
        runtime=runtime,
        cache=cache,
        images=images,
        probe_fingerprint=fingerprint,
    )
    if description is not None:
        cached_depths = cached_layer_depths(plan)
        if cached_depths is None:
            ensure_target(plan)
        else:
            for layer in plan.layers:
                layer.depth = cached_depths[layer.name]
            logger.info("every layer of %s is cached: the model is not built", target.spec)
    return plan


def cached_layer_depths(plan: Plan) -> dict[str, int] | None:
    """Return each requested layer's depth from its activation cache entry, or None unless all are cached.

    Only entries that record the layer's depth count.  Names that would
    resolve to the same module also give None, so the model is built and the
    layers are resolved as usual.  The arrays themselves are checked
    when :func:`cached_activations` loads them; an invalid one makes the
    model be built then.
    """
    names = [layer.name for layer in plan.layers]
    if len(set(names)) != len(names) or any(not name for name in names):
        return None
    base = activation_key_parts(plan)
    depths: dict[str, int] = {}
    for name in names:
        key = cache_key({**base, "layer": name})
        meta = plan.cache.peek_meta("activations", key)
        if meta is None or not isinstance(meta.get("layer_depth"), int):
            return None
        depths[name] = meta["layer_depth"]
    return depths


def _describe_preprocess(preprocess: Any) -> Any:
    return preprocess.describe() if hasattr(preprocess, "describe") else repr(preprocess)


def ensure_target(plan: Plan) -> None:
    """Build the target model of a plan prepared with ``lazy_target``, if it was not built yet.

    The built target must match the loader's description in every field that
    the cache keys and the stored run use.  A mismatch is a bug in the loader,
    so it stops the run.  The layers are resolved on the built model.
    """
    if plan.target.model is not UNBUILT:
        return
    loader = plan.registry.get("target loader", plan.config.target.loader)
    logger.info("building target %s", plan.target.spec)
    target = loader.load(plan.plugin_options["target"])
    described = {
        "spec": plan.target.spec,
        "weights_path": plan.target.weights_path,
        "weights_sha256": plan.target.weights_sha256,
        "preprocessing": _describe_preprocess(plan.target.preprocess),
        "token_layout": plan.target.token_layout,
    }
    loaded = {
        "spec": target.spec,
        "weights_path": target.weights_path,
        "weights_sha256": target.weights_sha256,
        "preprocessing": _describe_preprocess(target.preprocess),
        "token_layout": target.token_layout,
    }
    for field_name, value in described.items():
        if loaded[field_name] != value:
            raise PluginError(
                f"target loader {plan.config.target.loader!r}: describe() gives {field_name} = {value!r} but "
                f"load() gives {loaded[field_name]!r}; this is a bug in the loader plugin, report it to its "
                f"authors; until it is fixed, run with --recompute, which always builds the model"
            )
    layers = resolve_layers(target.model, plan.config.target.layers)
    for assumed, resolved in zip(plan.layers, layers):
        if assumed.depth >= 0 and assumed.depth != resolved.depth:
            raise MammoDissectError(
                f"layer {resolved.name!r} has depth {resolved.depth} in the built model but its cached "
                f"activations record depth {assumed.depth}; the cache entry does not belong to this model: "
                f"remove it with 'mammo-dissect cache rm --kind activations' and run again"
            )
    plan.target = target
    plan.layers = layers


def check_images_exist(probe_set: ProbeSet) -> None:
    """Raise :class:`ProbeSetError` listing every probe image file that does not exist."""
    missing = [str(image.path) for image in probe_set.images if not Path(image.path).is_file()]
    if missing:
        shown = "\n  ".join(missing[:50])
        more = f"\n  ... and {len(missing) - 50} more" if len(missing) > 50 else ""
        raise ProbeSetError(
            f"{len(missing)} probe image file(s) of probe set {probe_set.reader!r} not found:\n  {shown}{more}\n"
            f"restore the files or remove them from the probe set"
        )


def resolved_config(plan: Plan) -> dict[str, Any]:
    """Return the run configuration with every plugin's options and parameters filled in."""
    data = plan.config.as_json_dict()
    for section, options in plan.plugin_options.items():
        data[section]["options"] = options.model_dump(mode="json", by_alias=True)
    data["similarity"]["params"] = json.loads(json.dumps(plan.similarity_params, default=str))
    return data


def check_device(device: str) -> None:
    """Raise :class:`ConfigError` unless ``device`` names a torch device that is available here."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"device={device!r} is not a valid torch device ({exc}); use cpu, cuda or cuda:N") from None
    available = {
        "cpu": lambda: True,
        "cuda": torch.cuda.is_available,
        "mps": lambda: torch.backends.mps.is_available(),
        "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
    }
    if not available.get(parsed.type, lambda: False)():
        raise ConfigError(f"device={device!r} is not available on this machine; use device = \"cpu\"")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
            f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )


def torch_index(rows: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.asarray(rows, dtype=np.int64))


def finite_images(plan: Plan, layer_activations: list[LayerActivations]) -> np.ndarray:
    """Return the indices of probe images whose activations are finite in every layer.

    With ``nonfinite = "fail"`` any other image stops the run with its id
    and layer; with ``"drop"`` those images are left out of scoring and
    logged (their ids are stored with the run).
    """
    finite = np.ones(len(plan.probe_set), dtype=bool)
    for activations in layer_activations:
        array = activations.load()
        bad = ~np.isfinite(array).all(axis=1)
        if bad.any() and plan.config.nonfinite == "fail":
            ids = [plan.images[int(index)].image_id for index in np.nonzero(bad)[0][:10]]
            raise NonFiniteActivationError(
                f"layer {activations.layer.name!r} has NaN or Inf activations for {int(bad.sum())} image(s): "
                f"{', '.join(ids)}; check those images and the model weights, or set nonfinite = \"drop\""
            )
        finite &= ~bad
    dropped = np.nonzero(~finite)[0]
    if len(dropped):
        ids = [plan.images[int(index)].image_id for index in dropped[:20]]
        logger.warning(
            "left out %d image(s) with NaN or Inf activations (nonfinite = \"drop\"): %s",
            len(dropped), ", ".join(ids),
        )
    keep = np.nonzero(finite)[0]
    needed = max(plan.config.top_k_images, plan.similarity.min_images(plan.similarity_params) if plan.similarity.min_images else 1)
    if len(keep) < needed:
        raise NonFiniteActivationError(
            f"only {len(keep)} image(s) have finite activations, fewer than the {needed} the run needs"
        )
    return keep


@dataclass
class ConceptEvidence:
    """The dissector's output: P itself, or the embeddings whose product is P."""

    P: torch.Tensor | None = None
    image_embeddings: torch.Tensor | None = None
    text_embeddings: torch.Tensor | None = None

    def restricted_to(self, rows: np.ndarray) -> ConceptEvidence:
        """Return the evidence for the probe images ``rows`` only (all of them: no copy)."""
        if self.P is not None and len(rows) == self.P.shape[0]:
            return self
        if self.P is None and self.image_embeddings is not None and len(rows) == self.image_embeddings.shape[0]:
            return self
        index = torch_index(rows)
        if self.P is not None:
            return ConceptEvidence(P=self.P[index])
        return ConceptEvidence(image_embeddings=self.image_embeddings[index], text_embeddings=self.text_embeddings)

    def sha256(self) -> str:
        """Return a hash of the evidence's arrays (kind, dtype, shape and values)."""
        digest = hashlib.sha256()
        for name, tensor in (("P", self.P), ("image_embeddings", self.image_embeddings), ("text_embeddings", self.text_embeddings)):
            if tensor is None:
                digest.update(f"{name}:none;".encode())
                continue
            array = np.ascontiguousarray(tensor.detach().cpu().numpy())
            digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
            digest.update(array.view(np.uint8).reshape(-1) if array.size else b"")
        return digest.hexdigest()

    def score(self, plan: Plan, A: torch.Tensor) -> torch.Tensor:
        """Return S for activations A with the plan's similarity function."""
        if self.P is not None:
            return plan.similarity(self.P, A, **plan.similarity_params)
        return plan.similarity(
            None,
            A,
            image_embeddings=self.image_embeddings,
            text_embeddings=self.text_embeddings,
            memory_budget_bytes=plan.config.similarity_memory_mib * 1024 * 1024,
            **plan.similarity_params,
        )


def compute_layer_scores(
    plan: Plan,
    evidence: ConceptEvidence,
    activations: np.ndarray,
    layer_id: int,
    generator_seed: int,
) -> LayerScores:
    """Score one layer: top concepts and images per unit, and the permutation null."""
    import torch

    A = torch.from_numpy(np.array(activations, dtype=np.float32))
    n_images, n_units = A.shape
    S = evidence.score(plan, A)
    if not bool(torch.isfinite(S).all()):
        raise MammoDissectError(
            f"similarity {plan.similarity.name!r} produced NaN or Inf for layer {layer_id}; "
            f"this is a bug in the similarity function"
        )
    top_n = min(plan.config.top_n, S.shape[1])
    scores, concept_ids = torch.topk(S, k=top_n, dim=1)
    top_k = plan.config.top_k_images
    if plan.config.top_images_per_patient is None:
        image_activation, image_index = torch.topk(A, k=top_k, dim=0)  # [top_k x K]
    else:
        image_activation, image_index = top_images_per_patient(
            A, top_k, plan.config.top_images_per_patient, [record.patient_id for record in plan.images]
        )
    top_scores = scores[:, 0].numpy().astype(np.float64)

    ranks = np.argsort(np.argsort(top_scores, kind="stable"), kind="stable")
    percentile = 100.0 * (ranks + 1) / n_units

    null_stats: dict[str, Any] = {"null_mean": None, "null_p95": None, "null_max": None, "permutations": 0}
    p_value = np.full(n_units, np.nan)
    if plan.config.permutations:
        generator = torch.Generator().manual_seed(generator_seed)
        null_tops = []
        for _ in range(plan.config.permutations):
            order = torch.randperm(n_images, generator=generator)
            null_tops.append(evidence.score(plan, A[order]).max(dim=1).values)
        null = torch.cat(null_tops).numpy().astype(np.float64)
        null_sorted = np.sort(null)
        at_least = len(null_sorted) - np.searchsorted(null_sorted, top_scores, side="left")
        p_value = (1.0 + at_least) / (1.0 + len(null_sorted))
        null_stats = {
            "null_mean": float(null.mean()),
            "null_p95": float(np.percentile(null, 95)),
            "null_max": float(null.max()),
            "permutations": plan.config.permutations,
        }

    return LayerScores(
        concept_ids=concept_ids.numpy().astype(np.int32),
        label_scores=scores.numpy().astype(np.float32),
        image_index=image_index.T.numpy().astype(np.int32),
        image_activation=image_activation.T.numpy().astype(np.float32),
        top=top_scores.astype(np.float32),
        percentile=percentile.astype(np.float32),
        p_value=p_value.astype(np.float32),
        null_stats=null_stats,
    )


def score_layer(
    plan: Plan,
    evidence: ConceptEvidence,
    activations: np.ndarray,
    layer_id: int,
    generator_seed: int,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Score one layer and return its result columns and null statistics (no cache)."""
    scores = compute_layer_scores(plan, evidence, activations, layer_id, generator_seed)
    return scores.tables(layer_id), scores.null_stats


@dataclass
class LayerScores:
    """Scoring results of one layer: per-unit rows for the store, and the layer's null statistics."""

    #: [units x top_n] concept ids and scores, best first.
    concept_ids: np.ndarray
    label_scores: np.ndarray
    #: [units x top_k] rows of the scored activations (not yet probe-set indices) and activations.
    image_index: np.ndarray
    image_activation: np.ndarray
    #: [units] top score, its within-layer percentile and its p-value (NaN without a null).
    top: np.ndarray
    percentile: np.ndarray
    p_value: np.ndarray
    null_stats: dict[str, Any]

    def tables(self, layer_id: int) -> dict[str, np.ndarray]:
        """Return the result columns of the layer in the layout of :class:`UnitTables`."""
        n_units, top_n = self.concept_ids.shape
        top_k = self.image_index.shape[1]
        units = np.arange(n_units, dtype=np.int32)
        return {
            "label_layer_id": np.full(n_units * top_n, layer_id, dtype=np.int32),
            "label_unit": np.repeat(units, top_n),
            "label_rank": np.tile(np.arange(top_n, dtype=np.int16), n_units),
            "label_concept_id": self.concept_ids.reshape(-1),
            "label_score": self.label_scores.reshape(-1),
            "image_layer_id": np.full(n_units * top_k, layer_id, dtype=np.int32),
            "image_unit": np.repeat(units, top_k),
            "image_rank": np.tile(np.arange(top_k, dtype=np.int16), n_units),
            "image_index": self.image_index.reshape(-1),
            "image_activation": self.image_activation.reshape(-1),
            "score_layer_id": np.full(n_units, layer_id, dtype=np.int32),
            "score_unit": units,
            "score_top": self.top,
            "score_percentile": self.percentile,
            "score_p_value": self.p_value,
        }

    def to_array(self) -> np.ndarray:
        """Pack every column into one float64 array [units x (2 top_n + 2 top_k + 3)].

        float64 represents every int32 and float32 value exactly, NaN included.
        """
        return np.concatenate(
            [
                self.concept_ids.astype(np.float64),
                self.label_scores.astype(np.float64),
                self.image_index.astype(np.float64),
                self.image_activation.astype(np.float64),
                np.stack([self.top, self.percentile, self.p_value], axis=1).astype(np.float64),
            ],
            axis=1,
        )

    @classmethod
    def from_array(cls, array: np.ndarray, top_n: int, top_k: int, null_stats: dict[str, Any]) -> LayerScores:
        """Unpack :meth:`to_array`; raise ValueError when the array's shape does not fit ``top_n`` and ``top_k``."""
        if array.ndim != 2 or array.shape[1] != 2 * top_n + 2 * top_k + 3:
            raise ValueError(f"shape {array.shape} does not fit top_n={top_n} and top_k={top_k}")
        columns = np.cumsum([top_n, top_n, top_k, top_k])
        concept_ids, label_scores, image_index, image_activation, rest = np.split(array, columns, axis=1)
        return cls(
            concept_ids=concept_ids.astype(np.int32),
            label_scores=label_scores.astype(np.float32),
            image_index=image_index.astype(np.int32),
            image_activation=image_activation.astype(np.float32),
            top=np.ascontiguousarray(rest[:, 0], dtype=np.float32),
            percentile=np.ascontiguousarray(rest[:, 1], dtype=np.float32),
            p_value=np.ascontiguousarray(rest[:, 2], dtype=np.float32),
            null_stats=dict(null_stats),
        )


def score_key_parts(plan: Plan, evidence: ConceptEvidence, keep: np.ndarray) -> dict[str, Any]:
    """Return everything that determines a layer's scores, except the layer's activations and seed.

    :func:`score_key` adds the layer's activation cache key (weights, layer,
    pooling, preprocessing, probe images), the checksum of the activation
    array, and the layer's generator seed.
    """
    import torch

    config = plan.config
    patients = None
    if config.top_images_per_patient is not None:
        patients = _sha256_json([record.patient_id for record in plan.images])
    return {
        "kind": "scores",
        "score_format": SCORE_CACHE_FORMAT,
        "tool_version": __version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "evidence": evidence.sha256(),
        "images_scored": hashlib.sha256(np.ascontiguousarray(keep, dtype=np.int64).tobytes()).hexdigest(),
        "concept_texts": _sha256_json(plan.concepts.texts),
        "similarity": plan.similarity.name,
        "similarity_plugin_version": plan.registry.plugin_version("similarity function", plan.similarity.name),
        "similarity_params": json.loads(json.dumps(plan.similarity_params, sort_keys=True, default=str)),
        "similarity_memory_mib": config.similarity_memory_mib if evidence.P is None else None,
        "permutations": config.permutations,
        "top_n": config.top_n,
        "top_k_images": config.top_k_images,
        "top_images_per_patient": config.top_images_per_patient,
        "patients": patients,
    }


def score_key(base: dict[str, Any], activation_key: str, activation_sha256: str | None, generator_seed: int) -> str:
    """Return the cache key of one layer's scores (see :func:`score_key_parts`).

    ``activation_sha256`` is the checksum of the cached activation array, so
    activations that were computed again with other values also miss.
    """
    return cache_key({
        **base, "activations": activation_key, "activations_sha256": activation_sha256, "generator_seed": generator_seed,
    })


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def cached_layer_scores(
    plan: Plan,
    key: str,
    evidence: ConceptEvidence,
    activations: LayerActivations,
    keep: np.ndarray,
    layer_id: int,
    generator_seed: int,
) -> LayerScores:
    """Return one layer's scores from the score cache, or score the layer and cache the result."""
    name = activations.layer.name
    hit = plan.cache.load("scores", key, f"scores of layer {name}")
    if hit is not None:
        array, meta = hit
        try:
            scores = LayerScores.from_array(
                np.asarray(array), int(meta["top_n"]), int(meta["top_k"]), dict(meta["null_stats"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("cached scores of layer %s do not fit (%s); scoring the layer again", name, exc)
        else:
            if scores.concept_ids.shape[0] == activations.load().shape[1]:
                return scores
            logger.warning("cached scores of layer %s have the wrong number of units; scoring it again", name)
    scores = compute_layer_scores(plan, evidence, activations.load()[keep], layer_id, generator_seed)
    try:
        plan.cache.store(
            "scores",
            key,
            scores.to_array(),
            {
                "description": f"scores of {plan.target.spec} layer {name} ({plan.similarity.name}, "
                f"{plan.config.permutations} permutations)",
                "top_n": int(scores.concept_ids.shape[1]),
                "top_k": int(scores.image_index.shape[1]),
                "null_stats": scores.null_stats,
            },
        )
    except OSError as exc:
        logger.warning("could not cache the scores of layer %s (%s); the next run scores it again", name, exc)
    return scores


def activation_key_parts(plan: Plan) -> dict[str, Any]:
    """Return everything that determines a layer's pooled activations, except the layer itself."""
    options = plan.plugin_options["target"].model_dump(mode="json")
    # The weights file's hash identifies the weights; its path does not.
    options.pop("weights", None)
    preprocess = plan.target.preprocess
    return {
        "kind": "activations",
        "target_loader": plan.config.target.loader,
        "target_options": options,
        "target_spec": plan.target.spec,
        "weights_sha256": plan.target.weights_sha256,
        "preprocessing": preprocess.describe() if hasattr(preprocess, "describe") else repr(preprocess),
        "token_layout": plan.target.token_layout,
        "pooling": plan.config.target.pooling,
        "precision": plan.config.precision,
        "probe_fingerprint": plan.probe_fingerprint,
        "probe_decoding": plan.probe_set.decoding,
    }


def run_executor(plan: Plan, layers: list[ResolvedLayer], out_dir: Path) -> list[LayerActivations]:
    """Extract ``layers`` into ``out_dir`` with the configured executor.

    The built-in ``local`` executor runs :func:`extract_activations` in this
    process.  An executor plugin gets the plan, the layers and the folder and
    must return the same: one ``.npy`` file [N x K] per layer in ``out_dir``
    with rows in probe-set order.
    """
    choice = plan.config.executor
    if choice.name == "local":
        if choice.options:
            raise ConfigError(f"executor 'local' takes no options, got {sorted(choice.options)}")
        return extract_activations(plan.target, layers, plan.probe_set, plan.runtime, plan.config.target.pooling, out_dir)
    executor = plan.registry.get("executor", choice.name)
    options = validate_options(executor.Options, choice.options, "executor.options")
    return executor.extract(options, plan, layers, out_dir)  # type: ignore[no-any-return]


def cached_activations(plan: Plan) -> list[LayerActivations]:
    """Return every layer's pooled activations, from the cache or from one forward pass.

    Layers found in the cache are reused; the others are extracted together
    into a partial folder (resumable after a crash) and then moved into the
    cache.
    """
    base = activation_key_parts(plan)
    keys = {layer.name: cache_key({**base, "layer": layer.name}) for layer in plan.layers}
    hits = {
        layer.name: plan.cache.load("activations", keys[layer.name], f"activations of layer {layer.name}")
        for layer in plan.layers
    }
    if any(hit is None for hit in hits.values()):
        ensure_target(plan)
    found: dict[str, LayerActivations] = {}
    missing = []
    for layer in plan.layers:
        hit = hits[layer.name]
        if hit is None:
            missing.append(layer)
            continue
        array, meta = hit
        found[layer.name] = LayerActivations(
            layer=layer, path=plan.cache.entry_dir("activations", keys[layer.name]) / "array.npy",
            output_shape=list(meta.get("output_shape", [])),
        )
    if missing:
        group = cache_key({"layers": sorted(keys[layer.name] for layer in missing)})
        partial = plan.cache.root / "partial" / group
        if plan.cache.recompute and partial.exists():
            shutil.rmtree(partial)
        extracted = run_executor(plan, missing, partial)
        for activations in extracted:
            name = activations.layer.name
            path = plan.cache.store_file(
                "activations",
                keys[name],
                activations.path,
                {
                    "description": f"{plan.target.spec} layer {name}, {len(plan.probe_set)} images",
                    "output_shape": activations.output_shape,
                    "layer_depth": activations.layer.depth,
                },
            )
            found[name] = LayerActivations(layer=activations.layer, path=path, output_shape=activations.output_shape)
        shutil.rmtree(partial, ignore_errors=True)
    return [found[layer.name] for layer in plan.layers]


def dissector_check(
    config: RunConfig, registry: Registry | None = None, progress: bool = True
) -> list[Any]:
    """Measure how well the configured dissector detects the probe set's annotated concepts.

    Computes the dissector's P for the configured concept set and the
    annotation dissector's ground truth for the probe set's annotation
    vocabulary, then the AUROC of each annotated concept the dissector also
    scores (:func:`mammo_dissect.core.check_dissector.check_dissector`).
    The target section of the configuration is not used.
    """
    from mammo_dissect.core.check_dissector import check_dissector

    registry = registry or get_registry()
    reader = registry.get("probe set", config.probe_set.name)
    dissector = registry.get("dissector", config.dissector.name)
    concept_source = registry.get("concept set", config.concept_set.name)
    annotation = registry.get("dissector", "annotation")
    probe_set = reader.load(validate_options(reader.Options, config.probe_set.options, "probe_set.options"))
    probe_set = probe_set.limit(config.probe_set.limit)
    check_images_exist(probe_set)
    if not any(image.annotations for image in probe_set.images):
        raise ProbeSetError(
            f"probe set {config.probe_set.name!r} has no annotations; check-dissector needs a labelled probe set"
        )
    concept_options = validate_options(concept_source.Options, config.concept_set.options, "concept_set.options")
    concepts = normalise_concepts(
        concept_source.load(concept_options, probe_set), concept_source.source_description(concept_options)
    )
    dissector_options = validate_options(dissector.Options, config.dissector.options, "dissector.options")
    check_device(config.device)
    _, fingerprint = image_records(probe_set)
    runtime = Runtime(
        batch_size=config.batch_size, device=config.device, num_workers=config.num_workers, progress=progress,
        cache=ArrayCache(Path(config.cache_dir)), probe_fingerprint=fingerprint, precision=config.precision,
    )
    P = dissector.image_concept_matrix(dissector_options, probe_set, concepts.texts, runtime)
    vocabulary = [text for text in probe_set.annotation_vocabulary
                  if any(text in image.annotations for image in probe_set.images)]
    truth = annotation.image_concept_matrix(annotation.Options(), probe_set, vocabulary, runtime)
    return check_dissector(P.numpy(), concepts.texts, truth.numpy(), vocabulary, seed=config.seed)


def plan_summary(plan: Plan) -> dict[str, Any]:
    """Describe what a run would do, without extracting anything.

    One forward pass on the first probe image gives each layer's output
    shape and number of units; sizes are those of the float32 arrays the run
    keeps (activations on disk and in memory per layer, P in memory).
    """
    import torch

    ensure_target(plan)
    shapes: dict[str, list[int]] = {}
    handles = []
    for layer in plan.layers:
        def hook(module: Any, inputs: Any, output: Any, _name: str = layer.name) -> None:
            first = output[0] if isinstance(output, (tuple, list)) else output
            shapes.setdefault(_name, list(first.shape[1:]))

        handles.append(layer.module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            plan.target.model(plan.target.preprocess(plan.probe_set.read(0)).unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
    n_images = len(plan.probe_set)
    n_concepts = len(plan.concepts.concepts)
    base = activation_key_parts(plan)
    layers = []
    for layer in plan.layers:
        shape = shapes.get(layer.name, [])
        units = 0
        if len(shape) == 3:
            units = shape[0]
        elif shape:
            units = shape[-1]
        key = cache_key({**base, "layer": layer.name})
        layers.append({
            "name": layer.name,
            "output_shape": shape,
            "units": units,
            "activations_bytes": n_images * units * 4,
            "cached": plan.cache.entry_dir("activations", key).exists(),
        })
    return {
        "target": plan.target.spec,
        "dissector": plan.dissector.name,
        "similarity": plan.similarity.name,
        "images": n_images,
        "concepts": n_concepts,
        "layers": layers,
        "p_bytes": n_images * n_concepts * 4,
        "label_rows": sum(layer["units"] for layer in layers) * min(plan.config.top_n, n_concepts),
        "permutations": plan.config.permutations,
        "database": str(plan.config.database),
        "cache_dir": str(plan.cache.root),
    }


def top_images_per_patient(
    A: torch.Tensor, top_k: int, per_patient: int, patients: list[str | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return each unit's ``top_k`` most activating images with at most ``per_patient`` per patient.

    Images without a patient id count as patients of their own.  When the
    probe set has too few patients, the remaining ranks repeat nothing: they
    are filled with the next images regardless of patient, so every unit
    keeps ``top_k`` rows.
    """
    import torch

    order = torch.argsort(A, dim=0, descending=True, stable=True).numpy()
    values = A.numpy()
    indices = np.empty((top_k, A.shape[1]), dtype=np.int64)
    for unit in range(A.shape[1]):
        chosen: list[int] = []
        skipped: list[int] = []
        counts: dict[str, int] = {}
        for image in order[:, unit]:
            patient = patients[image] or f"image-{image}"
            if counts.get(patient, 0) < per_patient:
                counts[patient] = counts.get(patient, 0) + 1
                chosen.append(int(image))
                if len(chosen) == top_k:
                    break
            else:
                skipped.append(int(image))
        chosen += skipped[: top_k - len(chosen)]
        indices[:, unit] = chosen
    activations = np.take_along_axis(values, indices, axis=0)
    return torch.from_numpy(activations), torch.from_numpy(indices)


def concept_evidence(plan: Plan) -> ConceptEvidence:
    """Run the dissector: embeddings for embedding dissectors (P is never built), else P."""
    n_images, n_concepts = len(plan.probe_set), len(plan.concepts.concepts)
    if isinstance(plan.dissector, EmbeddingDissector) and plan.similarity.stream_fn is not None:
        images, texts = plan.dissector.embeddings(
            plan.dissector_options, plan.probe_set, plan.concepts.texts, plan.runtime
        )
        if images.shape[0] != n_images or texts.shape[0] != n_concepts:
            raise MammoDissectError(
                f"dissector {plan.dissector.name!r} returned {images.shape[0]} image and {texts.shape[0]} "
                f"concept embeddings, expected {n_images} and {n_concepts}"
            )
        return ConceptEvidence(image_embeddings=images.float().cpu(), text_embeddings=texts.float().cpu())
    P = plan.dissector.image_concept_matrix(
        plan.dissector_options, plan.probe_set, plan.concepts.texts, plan.runtime
    )
    if tuple(P.shape) != (n_images, n_concepts):
        raise MammoDissectError(
            f"dissector {plan.dissector.name!r} returned P of shape {tuple(P.shape)}, expected "
            f"{(n_images, n_concepts)} (images x concepts)"
        )
    return ConceptEvidence(P=P.float().cpu())


def collect_activation_maps(
    plan: Plan, layer_activations: list[LayerActivations], columns: dict[str, list[np.ndarray]]
) -> dict[int, np.ndarray]:
    """Return each spatial layer's unit maps on the unit's top images, [units x top_k x h x w].

    A second forward pass over the union of all units' top images records
    each layer's output, average-pooled to at most ``activation_map_size``
    on each side.  The maps are cached like activations, keyed by the
    layer's activation key and the top-image indices.
    """
    import torch
    import torch.nn.functional as functional

    size = plan.config.activation_map_size
    top_k = plan.config.top_k_images
    spatial = [
        (layer_id, activations) for layer_id, activations in enumerate(layer_activations)
        if len(activations.output_shape) == 3
    ]
    if not spatial:
        return {}
    base = activation_key_parts(plan)
    top: dict[int, np.ndarray] = {}
    keys: dict[int, str] = {}
    maps: dict[int, np.ndarray] = {}
    for layer_id, activations in spatial:
        indices = columns["image_index"][layer_id].reshape(-1, top_k)  # [units x top_k]
        top[layer_id] = indices
        keys[layer_id] = cache_key({
            **base, "kind": "activation_maps", "layer": activations.layer.name, "size": size,
            "top_images": hashlib.sha256(indices.astype(np.int64).tobytes()).hexdigest(),
        })
    missing = []
    for layer_id, activations in spatial:
        hit = plan.cache.load("activation_maps", keys[layer_id], f"activation maps of layer {activations.layer.name}")
        if hit is None:
            missing.append((layer_id, activations))
        else:
            maps[layer_id] = np.array(hit[0])
    if not missing:
        return maps

    ensure_target(plan)
    modules = {layer.name: layer.module for layer in plan.layers}
    images = sorted({int(index) for layer_id, _ in missing for index in np.unique(top[layer_id])})
    outputs: dict[int, torch.Tensor] = {}
    shapes = {}
    handles = []
    for layer_id, activations in missing:
        _, height, width = activations.output_shape
        shapes[layer_id] = (min(height, size), min(width, size))
        maps[layer_id] = np.zeros((top[layer_id].shape[0], top_k, *shapes[layer_id]), dtype=np.float32)

        def hook(module: Any, inputs: Any, output: Any, _id: int = layer_id) -> None:
            first = output[0] if isinstance(output, (tuple, list)) else output
            outputs[_id] = functional.adaptive_avg_pool2d(first.detach().float(), shapes[_id]).cpu()

        handles.append(modules[activations.layer.name].register_forward_hook(hook))
    model = plan.target.model.to(plan.runtime.device).eval()
    device_type = torch.device(plan.runtime.device).type
    try:
        batch_size = plan.runtime.batch_size
        start = 0
        with torch.inference_mode():
            while start < len(images):
                chunk = images[start : start + batch_size]
                batch = torch.stack([plan.target.preprocess(plan.probe_set.read(index)) for index in chunk])
                try:
                    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=plan.runtime.precision == "bfloat16"):
                        model(batch.to(plan.runtime.device))
                except (RuntimeError, MemoryError) as exc:
                    if "out of memory" not in str(exc).lower() or batch_size == 1:
                        raise
                    batch_size = max(1, batch_size // 2)
                    logger.warning("out of memory in the activation-map pass; retrying with batch size %d", batch_size)
                    continue
                start += len(chunk)
                for layer_id, _ in missing:
                    pooled = outputs[layer_id].numpy()
                    for position, image in enumerate(chunk):
                        units, ranks = np.nonzero(top[layer_id] == image)
                        maps[layer_id][units, ranks] = pooled[position, units]
    finally:
        for handle in handles:
            handle.remove()
    for layer_id, activations in missing:
        plan.cache.store(
            "activation_maps", keys[layer_id], maps[layer_id],
            {"description": f"activation maps of {plan.target.spec} layer {activations.layer.name}"},
        )
    return maps


def execute(plan: Plan) -> RunResults:
    """Run extraction, the dissector and scoring for a prepared plan."""
    config = plan.config
    logger.info(
        "run %s: %d images, %d concepts, %d layer(s) of %s",
        plan.run_id, len(plan.probe_set), len(plan.concepts.concepts), len(plan.layers), plan.target.spec,
    )
    layer_activations = cached_activations(plan)
    plan.activation_files = {activations.layer.name: activations.path for activations in layer_activations}
    keep = finite_images(plan, layer_activations)
    evidence = concept_evidence(plan).restricted_to(keep)

    columns: dict[str, list[np.ndarray]] = {}
    layer_records = []
    from tqdm import tqdm

    score_base = score_key_parts(plan, evidence, keep)
    activation_base = activation_key_parts(plan)
    for layer_id, activations in enumerate(
        tqdm(layer_activations, desc="scoring layers", unit="layer", disable=not plan.runtime.progress)
    ):
        seed = config.seed + layer_id
        activation_key = cache_key({**activation_base, "layer": activations.layer.name})
        activation_meta = plan.cache.peek_meta("activations", activation_key) or {}
        key = score_key(score_base, activation_key, activation_meta.get("sha256"), seed)
        scores = cached_layer_scores(plan, key, evidence, activations, keep, layer_id, seed)
        tables, null_stats = scores.tables(layer_id), scores.null_stats
        # Scoring saw only the kept images: map their row numbers back to probe-set indices.
        tables["image_index"] = keep[tables["image_index"]].astype(np.int32)
        for key, value in tables.items():
            columns.setdefault(key, []).append(value)
        layer_records.append(_layer_record(layer_id, activations, config.target.pooling, null_stats))
        logger.info("layer %s: %d units scored", activations.layer.name, layer_records[-1].n_units)
    units = UnitTables(**{key: np.concatenate(parts) for key, parts in columns.items()})
    maps = collect_activation_maps(plan, layer_activations, columns) if config.activation_map_size else {}
    return RunResults(
        probe_set_reader=plan.probe_set.reader,
        probe_set_root=str(plan.probe_set.root),
        probe_fingerprint="",
        similarity=plan.similarity.name,
        similarity_params=plan.similarity_params,
        similarity_range=plan.similarity.value_range,
        concept_set_name=config.concept_set.name,
        concept_set_source=plan.concept_source,
        concept_set_sha256=plan.concepts.sha256(),
        concept_set_dropped=plan.concepts.dropped(),
        models=_model_records(plan),
        layers=layer_records,
        images=[],
        concepts=[
            ConceptRecord(concept_id=index, text=c.text, category=c.category, broad_category=c.broad_category)
            for index, c in enumerate(plan.concepts.concepts)
        ],
        units=units,
        extra={
            "probe_decoding": plan.probe_set.decoding,
            "dropped_images": [plan.images[index].image_id for index in np.setdiff1d(np.arange(len(plan.images)), keep)],
        },
        activation_maps=maps,
    )


def _layer_record(layer_id: int, activations: LayerActivations, pooling: str, null_stats: dict[str, Any]) -> LayerRecord:
    shape = activations.output_shape
    return LayerRecord(
        layer_id=layer_id,
        model_id=0,
        name=activations.layer.name,
        depth=activations.layer.depth,
        n_units=int(activations.load().shape[1]),
        output_shape=shape,
        pooling=_pooling_used(shape, pooling),
        **null_stats,
    )


def _pooling_used(shape: list[int], pooling: str) -> str:
    """Return how a layer's output of per-image ``shape`` was reduced to one value per unit."""
    if len(shape) == 3:
        return pooling
    if len(shape) == 2:
        return "cls"
    return "none"


def _model_records(plan: Plan) -> list[ModelRecord]:
    registry = plan.registry
    target = plan.target
    preprocess = target.preprocess.describe() if hasattr(target.preprocess, "describe") else {}
    described = plan.dissector.describe(plan.dissector_options)
    return [
        ModelRecord(
            model_id=0,
            role="target",
            plugin=plan.config.target.loader,
            plugin_version=registry.plugin_version("target loader", plan.config.target.loader),
            spec=target.spec,
            weights_path=target.weights_path,
            weights_sha256=target.weights_sha256,
            preprocessing=preprocess,
        ),
        ModelRecord(
            model_id=1,
            role="dissector",
            plugin=plan.dissector.name,
            plugin_version=registry.plugin_version("dissector", plan.dissector.name),
            spec=str(described.get("spec") or described.get("architecture") or plan.dissector.name),
            weights_path=described.get("weights") or described.get("weights_path"),
            weights_sha256=described.get("weights_sha256"),
            preprocessing=described,
        ),
    ]


def image_records(probe_set: ProbeSet, hashes: FileHashes | None = None) -> tuple[list[ImageRecord], str]:
    """Hash every probe image and return the records and the probe-set fingerprint.

    The fingerprint is the SHA-256 of the sorted (image id, file SHA-256)
    pairs and the probe set's preprocessing steps.  With ``hashes``, a file
    whose identity (path, size, times, inode) is unchanged since it was last
    hashed is not read again; the caller saves ``hashes`` afterwards.
    """
    sha256 = hashes.sha256 if hashes is not None else sha256_file
    records = []
    for index, image in enumerate(probe_set.images):
        metadata = dict(image.metadata)
        records.append(
            ImageRecord(
                image_index=index,
                image_id=image.image_id,
                path=str(Path(image.path).resolve()),
                sha256=sha256(image.path),
                patient_id=_text_or_none(metadata.get("patient_id")),
                laterality=_text_or_none(metadata.get("laterality")),
                view=_text_or_none(metadata.get("view")),
                metadata=json.loads(json.dumps(metadata, default=str)),
                annotations=list(image.annotations),
            )
        )
    fingerprint = probe_fingerprint(probe_set, {record.image_id: record.sha256 for record in records})
    return records, fingerprint


def _mark_failed(store: Any, run_id: str, message: str, status: str) -> None:
    """Record a failed run; a failure to record it is logged so the original error still surfaces."""
    from mammo_dissect.core.errors import StoreError

    try:
        store.mark_failed(run_id, message, status=status)
    except StoreError as exc:
        logger.error("could not mark run %s as %s: %s", run_id, status, exc)


def _text_or_none(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def run(
    config: RunConfig,
    registry: Registry | None = None,
    progress: bool = True,
    recompute: bool = False,
    wait_seconds: float = 0.0,
) -> RunOutcome:
    """Validate, run and store one dissection.

    Every input is validated and the models are loaded before the database is
    opened, so bad input leaves no trace in the store (not even a new empty
    file).  The database is then opened before any forward pass, so one held
    by another process fails at once.  A failure after the run row is written
    leaves the run with status ``failed`` (``interrupted`` on Ctrl-C or
    SIGTERM) and no label rows.  Pooled activations and dissector embeddings
    go through the content-addressed cache in ``cache_dir``; an interrupted
    extraction continues from its last finished batch when the same
    configuration runs again, and ``recompute`` ignores cached arrays.
    """
    from mammo_dissect.core.store import Store

    plan = prepare(config, registry, progress=progress, recompute=recompute, lazy_target=True)
    with Store(Path(config.database), wait_seconds=wait_seconds) as store:
        store.mark_abandoned_runs()
        stored_config = resolved_config(plan)
        store.begin_run(
            plan.run_id,
            config.name,
            stored_config,
            hashlib.sha256(json.dumps(stored_config, sort_keys=True).encode()).hexdigest(),
            __version__,
        )
        try:
            results = execute(plan)
            results.images = plan.images
            results.probe_fingerprint = plan.probe_fingerprint
            store.write_results(plan.run_id, results)
        except (KeyboardInterrupt, Terminated) as exc:
            reason = "interrupted by the user" if isinstance(exc, KeyboardInterrupt) else str(exc)
            _mark_failed(store, plan.run_id, reason, "interrupted")
            raise
        except BaseException as exc:
            _mark_failed(store, plan.run_id, f"{type(exc).__name__}: {exc}", "failed")
            raise
    return RunOutcome(
        run_id=plan.run_id,
        database=Path(config.database),
        n_images=len(plan.probe_set),
        n_concepts=len(plan.concepts.concepts),
        layers=[(record.name, record.n_units) for record in results.layers],
        activation_files=dict(plan.activation_files),
    )

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
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np

from mammo_dissect import __version__
from mammo_dissect.core.activations import UNBUILT
from mammo_dissect.core.activations import activation_key_parts
from mammo_dissect.core.activations import cached_activations
from mammo_dissect.core.activations import cached_layer_depths
from mammo_dissect.core.activations import collect_activation_maps
from mammo_dissect.core.activations import ensure_target
from mammo_dissect.core.cache import ArrayCache
from mammo_dissect.core.cache import cache_key
from mammo_dissect.core.concepts import NormalisedConcepts
from mammo_dissect.core.concepts import normalise_concepts
from mammo_dissect.core.config import RunConfig
from mammo_dissect.core.config import SimilarityConfig
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.errors import Terminated
from mammo_dissect.core.extraction import LayerActivations
from mammo_dissect.core.extraction import ResolvedLayer
from mammo_dissect.core.extraction import canonical_layer_name
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
from mammo_dissect.core.scoring import cached_layer_scores
from mammo_dissect.core.scoring import concept_evidence
from mammo_dissect.core.scoring import finite_images
from mammo_dissect.core.scoring import score_key
from mammo_dissect.core.scoring import score_key_parts
from mammo_dissect.core.types import Dissector
from mammo_dissect.core.types import LoadedTarget
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import Runtime
from mammo_dissect.core.types import SimilarityFunction
from mammo_dissect.core.types import validate_options
from mammo_dissect.core.weights import sha256_file


logger = logging.getLogger(__name__)


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
    :func:`~mammo_dissect.core.activations.ensure_target` builds it later when a step needs it after all.
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

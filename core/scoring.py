"""Score each layer's units against the dissector's concept evidence.

Runs the dissector to get P (or its embeddings), computes S = similarity(P, A)
per layer, picks each unit's top concepts and top images, and adds the
permutation null.  Layer scores go through the ``scores`` cache under keys
that cover every input that changes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

import numpy as np

from mammo_dissect import __version__
from mammo_dissect.core.cache import cache_key
from mammo_dissect.core.cache import sha256_json
from mammo_dissect.core.errors import MammoDissectError
from mammo_dissect.core.extraction import LayerActivations
from mammo_dissect.core.extraction import NonFiniteActivationError
from mammo_dissect.core.types import EmbeddingDissector


if TYPE_CHECKING:
    import torch

    from mammo_dissect.core.pipeline import Plan


logger = logging.getLogger(__name__)

#: Bump when the layout or meaning of cached layer scores changes (see :func:`score_key`).
SCORE_CACHE_FORMAT = 1


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
        patients = sha256_json([record.patient_id for record in plan.images])
    return {
        "kind": "scores",
        "score_format": SCORE_CACHE_FORMAT,
        "tool_version": __version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "evidence": evidence.sha256(),
        "images_scored": hashlib.sha256(np.ascontiguousarray(keep, dtype=np.int64).tobytes()).hexdigest(),
        "concept_texts": sha256_json(plan.concepts.texts),
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

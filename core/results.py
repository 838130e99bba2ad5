"""The results of one run, as the pipeline hands them to the store.

Per-unit tables are columns of numpy arrays so that the store can write them
through Arrow in one bulk insert each.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from typing import Any

import numpy as np


@dataclass
class ModelRecord:
    """A model taking part in a run: the target or the dissector."""

    model_id: int
    role: str  # "target" or "dissector"
    plugin: str
    plugin_version: str | None
    spec: str
    weights_path: str | None
    weights_sha256: str | None
    preprocessing: dict[str, Any]


@dataclass
class LayerRecord:
    """A dissected layer of the target and the null baseline of its top scores."""

    layer_id: int
    model_id: int
    name: str
    depth: int  # position among the model's modules (0 = first module)
    n_units: int
    output_shape: list[int]  # shape of one image's output, without the batch axis
    pooling: str
    #: Top scores of all units after shuffling the image order of A, over all
    #: permutations: mean, 95th percentile and maximum.  None when no
    #: permutation was run.
    null_mean: float | None = None
    null_p95: float | None = None
    null_max: float | None = None
    permutations: int = 0


@dataclass
class ImageRecord:
    """One probe image in run order."""

    image_index: int
    image_id: str
    path: str
    sha256: str
    patient_id: str | None
    laterality: str | None
    view: str | None
    metadata: dict[str, Any]
    annotations: list[str]


@dataclass
class ConceptRecord:
    """One concept after normalisation; ``concept_id`` is its index in the cleaned list."""

    concept_id: int
    text: str
    category: str | None = None
    broad_category: str | None = None


@dataclass
class UnitTables:
    """Per-unit rows of all layers, as parallel numpy columns."""

    # unit_labels: one row per (layer, unit, rank) for the top-n concepts
    label_layer_id: np.ndarray
    label_unit: np.ndarray
    label_rank: np.ndarray
    label_concept_id: np.ndarray
    label_score: np.ndarray
    # unit_top_images: one row per (layer, unit, rank) for the top-k images
    image_layer_id: np.ndarray
    image_unit: np.ndarray
    image_rank: np.ndarray
    image_index: np.ndarray
    image_activation: np.ndarray
    # unit_scores: one row per (layer, unit)
    score_layer_id: np.ndarray
    score_unit: np.ndarray
    score_top: np.ndarray  # the unit's top score (rank 0)
    score_percentile: np.ndarray  # within-layer percentile of the top score, 0..100
    score_p_value: np.ndarray  # empirical p-value against the layer's null; NaN if none


@dataclass
class RunResults:
    """Everything one finished run stores."""

    probe_set_reader: str
    probe_set_root: str
    probe_fingerprint: str
    similarity: str
    similarity_params: dict[str, Any]
    similarity_range: str
    concept_set_name: str
    concept_set_source: str
    concept_set_sha256: str
    concept_set_dropped: dict[str, Any]
    models: list[ModelRecord]
    layers: list[LayerRecord]
    images: list[ImageRecord]
    concepts: list[ConceptRecord]
    units: UnitTables
    extra: dict[str, Any] = field(default_factory=dict)
    #: Spatial activation maps of each unit on its top images, by layer id:
    #: float32 [units x top_k_images x height x width], ranks as in the top images.
    activation_maps: dict[int, np.ndarray] = field(default_factory=dict)

"""Label stability: how often a unit's top label changes under small perturbations.

Three perturbations, each compared with the unperturbed top labels:

* ``bootstrap``: the probe images resampled with replacement (same size), the
  activations and the dissector's evidence taken for the same resample.
* ``noise``: Gaussian noise of a given standard deviation added to the
  target's normalised input tensor (after resizing and mean/std
  normalisation), so the activations are extracted again; the dissector's
  evidence stays that of the clean images.
* ``synonyms``: each concept text replaced by one of its synonyms (from a
  ``table`` concept set), one trial per synonym position.

``unit_stability.label_changed_share`` is the share of a perturbation's
trials in which the unit's top concept differs from the unperturbed one: 0
means the label never changed.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import numpy as np
import pyarrow as pa

from mammo_dissect.core.chance import ControlContext
from mammo_dissect.core.chance import control_context
from mammo_dissect.core.chance import evidence_for_texts
from mammo_dissect.core.chance import image_subset_evidence
from mammo_dissect.core.chance import study_run_id
from mammo_dissect.core.chance import top_concepts
from mammo_dissect.core.concepts import clean_text
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.validity import write_rows


if TYPE_CHECKING:
    from mammo_dissect.core.config import RunConfig
    from mammo_dissect.core.plugins import Registry
    from mammo_dissect.core.scoring import ConceptEvidence


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerStability:
    """Stability of one layer's top labels under one perturbation."""

    layer_id: int
    layer: str
    perturbation: str
    n_trials: int
    #: Mean over units of the share of trials that changed the unit's label.
    mean_label_changed_share: float
    #: Share of units whose label changed in at least one trial.
    share_units_changed: float


class NoisyPreprocess:
    """A target preprocessing followed by Gaussian noise on the normalised tensor.

    The noise of an image is seeded by ``seed`` and the CRC-32 of the decoded
    image's bytes, so it is the same on every call and in every worker.
    """

    def __init__(self, preprocess: Any, std: float, seed: int = 0) -> None:
        if not std >= 0:
            raise ConfigError(f"noise std={std!r} is invalid; give a standard deviation of 0 or more")
        self.preprocess = preprocess
        self.std = float(std)
        self.seed = int(seed)

    def __call__(self, image: np.ndarray) -> Any:
        import torch

        tensor = self.preprocess(image)
        digest = zlib.crc32(np.ascontiguousarray(image).tobytes())
        noise = np.random.default_rng([self.seed, digest]).standard_normal(tuple(tensor.shape))
        return tensor + torch.from_numpy(noise.astype(np.float32)) * self.std

    def describe(self) -> dict[str, Any]:
        """Return the wrapped steps plus the noise, which makes the activation cache key differ."""
        inner = self.preprocess.describe() if hasattr(self.preprocess, "describe") else {"steps": repr(self.preprocess)}
        return {**inner, "gaussian_noise": {"std": self.std, "seed": self.seed}}


def changed_shares(base: list[np.ndarray], trials: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Return per layer the share of ``trials`` whose top concept differs from ``base``, per unit."""
    if not trials:
        return [np.zeros(top.size) for top in base]
    return [
        np.mean([trial[layer] != top for trial in trials], axis=0).astype(np.float64)
        for layer, top in enumerate(base)
    ]


def bootstrap_trials(
    context: ControlContext, evidence: ConceptEvidence, resamples: int, seed: int = 0
) -> list[list[np.ndarray]]:
    """Return the top concepts of every layer for ``resamples`` bootstrap resamples of the probe images."""
    generator = np.random.default_rng([seed, 4])
    n_images = len(context.plan.probe_set)
    trials = []
    for _ in range(resamples):
        rows = generator.integers(0, n_images, size=n_images)
        subset = image_subset_evidence(evidence, rows)
        trials.append([top_concepts(context.plan, subset, activations[rows]) for activations in context.activations])
    return trials


def noise_trials(
    context: ControlContext, evidence: ConceptEvidence, std: float, repeats: int = 1, seed: int = 0
) -> list[list[np.ndarray]]:
    """Return the top concepts of every layer with activations extracted from noisy inputs, ``repeats`` times."""
    from mammo_dissect.core.activations import cached_activations

    plan = context.plan
    trials = []
    for repeat in range(repeats):
        noisy_target = dataclasses.replace(plan.target, preprocess=NoisyPreprocess(plan.target.preprocess, std, seed + repeat))
        noisy_plan = dataclasses.replace(plan, target=noisy_target)
        layers = cached_activations(noisy_plan)
        trials.append([top_concepts(plan, evidence, np.asarray(item.load())) for item in layers])
        logger.info("noise std %g repeat %d extracted", std, repeat)
    return trials


def synonym_texts(config: RunConfig, texts: list[str]) -> list[list[str]]:
    """Return concept lists with synonyms in place of the texts, one per synonym position.

    Trial j replaces every concept that has more than j synonyms by its j-th
    synonym and keeps the others.  Empty when the concept set is not a
    ``table`` or has no synonyms, or when it already adds the synonyms as
    concepts of their own (``include_synonyms``).
    """
    from mammo_dissect.concept_sets.formats import read_table

    if config.concept_set.name != "table":
        return []
    options = config.concept_set.options
    if options.get("include_synonyms"):
        logger.info("concept set includes synonyms as concepts; no synonym trials")
        return []
    synonyms = {clean_text(entry.text).casefold(): entry.synonyms for entry in read_table(Path(options["path"]))}
    positions = max((len(found) for found in synonyms.values()), default=0)
    variants = []
    for position in range(positions):
        variant = []
        for text in texts:
            found = synonyms.get(clean_text(text).casefold(), ())
            variant.append(found[position] if position < len(found) else text)
        variants.append(variant)
    return variants


def stability(
    config: RunConfig,
    bootstrap: int = 20,
    noise: float | None = 0.02,
    *,
    noise_repeats: int = 1,
    synonyms: bool = True,
    seed: int = 0,
    registry: Registry | None = None,
    progress: bool = False,
    run_id: str | None = None,
) -> list[LayerStability]:
    """Run the study, measure label stability and store it per unit in ``unit_stability``.

    :param bootstrap: bootstrap resamples of the probe images (0 for none).
    :param noise: standard deviation of the input noise, None or 0 for no noise trials.
    :param noise_repeats: noise trials, each a full extraction of the layers.
    :param synonyms: run the synonym trials when the concept set has synonyms.
    :param run_id: attach the results to this stored run of ``config`` instead of running the study first.
    Earlier stability rows of the run are replaced.
    """
    from mammo_dissect.core.chance import trial_tops
    from mammo_dissect.core.scoring import concept_evidence

    if bootstrap < 0 or noise_repeats < 0:
        raise ConfigError(f"bootstrap={bootstrap} and noise_repeats={noise_repeats}: both must be 0 or more")
    run_id = study_run_id(config, registry, progress, run_id)
    context = control_context(config, run_id, registry, progress)
    evidence = concept_evidence(context.plan)
    base = trial_tops(context, evidence)

    perturbations: dict[str, list[list[np.ndarray]]] = {}
    if bootstrap:
        perturbations["bootstrap"] = bootstrap_trials(context, evidence, bootstrap, seed)
    if noise:
        perturbations["noise"] = noise_trials(context, evidence, noise, noise_repeats, seed)
    if synonyms:
        variants = synonym_texts(config, context.plan.concepts.texts)
        if variants:
            perturbations["synonyms"] = [
                trial_tops(context, evidence_for_texts(context.plan, texts)) for texts in variants
            ]

    results, parts = [], []
    for perturbation, trials in perturbations.items():
        for layer_id, share in enumerate(changed_shares(base, trials)):
            results.append(LayerStability(
                layer_id=layer_id,
                layer=context.layer_names[layer_id],
                perturbation=perturbation,
                n_trials=len(trials),
                mean_label_changed_share=float(share.mean()),
                share_units_changed=float((share > 0).mean()),
            ))
            parts.append(pa.table({
                "layer_id": pa.array(np.full(share.size, layer_id, dtype=np.int32)),
                "unit": pa.array(np.arange(share.size, dtype=np.int32)),
                "perturbation": pa.array([perturbation] * share.size, type=pa.string()),
                "label_changed_share": pa.array(share),
                "n_trials": pa.array(np.full(share.size, len(trials), dtype=np.int32)),
            }))
    from mammo_dissect.core.store import Store

    tables = {"unit_stability": pa.concat_tables(parts)} if parts else {}
    with Store(Path(config.database)) as store:
        write_rows(store, run_id, tables, {"unit_stability": "true"})
    return results

"""End-to-end training of an aligned head: samples, features, checks, card and head files."""

from __future__ import annotations

import hashlib
import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from mammo_dissect.core.alignment import CARD_FILE
from mammo_dissect.core.alignment import CARD_FORMAT
from mammo_dissect.core.alignment import HEAD_FILE
from mammo_dissect.core.alignment import AlignmentConfig
from mammo_dissect.core.alignment import SourceConfig
from mammo_dissect.core.alignment import build_pairs
from mammo_dissect.core.alignment import card_timestamp
from mammo_dissect.core.alignment import close_matches
from mammo_dissect.core.alignment import evaluate
from mammo_dissect.core.alignment import fold_heads
from mammo_dissect.core.alignment import gated_concepts
from mammo_dissect.core.alignment import linear_probe_scores
from mammo_dissect.core.alignment import patient_folds
from mammo_dissect.core.alignment import random_head_scores
from mammo_dissect.core.alignment import shuffle_captions
from mammo_dissect.core.alignment import train_head
from mammo_dissect.core.alignment import without_concept
from mammo_dissect.core.alignment import write_card
from mammo_dissect.core.alignment_checks import SHORTCUTS
from mammo_dissect.core.alignment_checks import concept_warnings
from mammo_dissect.core.alignment_checks import leave_out_choice
from mammo_dissect.core.alignment_checks import leave_out_section
from mammo_dissect.core.alignment_checks import paraphrase_checks
from mammo_dissect.core.alignment_checks import paraphrase_table
from mammo_dissect.core.alignment_checks import paraphrase_variants
from mammo_dissect.core.alignment_checks import shortcut_checks
from mammo_dissect.core.alignment_data import SourceSamples
from mammo_dissect.core.alignment_data import check_lesion_centres
from mammo_dissect.core.alignment_data import encoder_description
from mammo_dissect.core.alignment_data import lesion_samples
from mammo_dissect.core.alignment_data import shortcut_values
from mammo_dissect.core.alignment_data import source_features
from mammo_dissect.core.alignment_data import tissue_patch_samples
from mammo_dissect.core.alignment_data import whole_samples
from mammo_dissect.core.cache import ArrayCache
from mammo_dissect.core.cache import write_bytes_atomic
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import validate_options


logger = logging.getLogger(__name__)

#: Option keys of probe sets whose values are paths, resolved against the configuration's folder.
PATH_OPTIONS = ("root",)


def load_probe_set(source: SourceConfig, base: Path) -> ProbeSet:
    """Load the source's probe set with its options, resolving a relative ``root`` against ``base``."""
    from mammo_dissect.core.plugins import get_registry

    reader = get_registry().get("probe set", source.probe_set)
    values = dict(source.options)
    for key in PATH_OPTIONS:
        if key in values and not Path(str(values[key])).expanduser().is_absolute():
            values[key] = str((base / str(values[key])).resolve())
    options = validate_options(reader.Options, values, f"sources.{source.name}.options")
    return reader.load(options)  # type: ignore[no-any-return]


def build_source(source: SourceConfig, probe_set: ProbeSet, seed: int) -> tuple[SourceSamples, list[dict[str, Any]]]:
    """Return the samples of one source and the bad labels found while building them."""
    if source.kind == "whole":
        return whole_samples(source.name, probe_set, source.concepts or None), []
    if source.kind == "lesions":
        bad = check_lesion_centres(probe_set, source.mask_threshold)
        excluded = {(item["image_id"], item["x"], item["y_top_left"]) for item in bad} if source.exclude_bad_labels else set()
        samples = lesion_samples(
            source.name, probe_set, source.context, source.min_side, source.normal_crops, excluded, seed,
            source.mask_threshold,
        )
        for item in bad:
            item["source"] = source.name
            item["excluded_from_training"] = source.exclude_bad_labels
        return samples, bad
    samples = tissue_patch_samples(
        source.name, probe_set, source.patch_size, source.patches_per_tissue, source.min_purity, seed
    )
    return samples, []


def paraphrases_for(settings: AlignmentConfig, base: Path, vocabulary: list[str]) -> dict[str, list[str]]:
    """Return the unseen paraphrases of the vocabulary: configured, then from the file, then built-in.

    A relative ``paraphrase_file`` is resolved against ``base``.
    """
    from mammo_dissect.concept_sets.paraphrases import builtin_paraphrases
    from mammo_dissect.concept_sets.paraphrases import read_paraphrases

    text = settings.text_encoder
    from_file = read_paraphrases(base / Path(text.paraphrase_file).expanduser()) if text.paraphrase_file else {}
    builtin = builtin_paraphrases() if text.builtin_paraphrases else {}
    return paraphrase_table(vocabulary, builtin, from_file, text.paraphrases, text.min_paraphrases)


def check_leave_out(names: list[str], vocabulary: list[str]) -> None:
    """Raise :class:`ConfigError` naming the ``training.leave_out`` concepts that no source labels."""
    unknown = [name for name in names if name not in vocabulary]
    if not unknown:
        return
    hints = close_matches(unknown, vocabulary)
    hint = f" (did you mean {hints}?)" if hints else ""
    raise ConfigError(
        f"training.leave_out names {', '.join(repr(name) for name in unknown)}, which no source labels{hint}; "
        f"use concepts of the vocabulary {vocabulary}"
    )


def run_training(settings: AlignmentConfig, base: Path, out_dir: Path) -> Path:
    """Train, check and write the card and head; return the card's path."""
    import torch

    from mammo_dissect.core.api import load_target
    from mammo_dissect.core.sentence_encoder import DEFAULT_PACKAGE
    from mammo_dissect.core.sentence_encoder import SentenceEncoder

    started = time.perf_counter()
    training = settings.training
    cache = ArrayCache(Path(settings.cache_dir)) if settings.cache_dir else None

    sources: list[SourceSamples] = []
    bad_labels: list[dict[str, Any]] = []
    for source in settings.sources:
        samples, bad = build_source(source, load_probe_set(source, base), training.seed)
        sources.append(samples)
        bad_labels.extend(bad)
        logger.info("source %s: %d samples, vocabulary %s", source.name, len(samples.samples), samples.vocabulary)

    pairs = build_pairs(sources)
    paraphrases = paraphrases_for(settings, base, pairs.vocabulary)
    check_leave_out(training.leave_out, pairs.vocabulary)

    target = load_target(settings.encoder.loader, **settings.encoder.options)
    encoder = encoder_description(
        target, settings.encoder.loader, settings.encoder.options, settings.encoder.layer, settings.encoder.pooling
    )
    features = np.concatenate(
        [source_features(target, encoder, source, cache, settings.encoder.batch_size) for source in sources], axis=0
    )
    shortcuts = np.concatenate(
        [
            shortcut_values(source, config.mask_threshold, cache)
            for source, config in zip(sources, settings.sources, strict=True)
        ],
        axis=0,
    )
    feature_seconds = time.perf_counter() - started

    text_encoder = SentenceEncoder(settings.text_encoder.path, settings.text_encoder.max_tokens)
    template = settings.text_encoder.prompt_template
    text_embeddings = text_encoder.encode([template.format(text) for text in pairs.vocabulary])

    training_started = time.perf_counter()
    folds = patient_folds(pairs.patients.tolist(), training.folds, training.seed)
    heads = fold_heads(features, pairs, folds, text_embeddings, training, training.seed)
    aligned = heads.scores(features, text_embeddings)
    random_heads = [
        random_head_scores(features, text_embeddings.shape[1], text_embeddings, training.seed + 1000 + index)
        for index in range(training.random_heads)
    ]
    shuffled_heads = [
        fold_heads(
            features, shuffle_captions(pairs, training.seed + 2000 + index), folds, text_embeddings, training,
            training.seed + 2000 + index,
        ).scores(features, text_embeddings)
        for index in range(training.shuffled_heads)
    ]
    probe = linear_probe_scores(features, pairs, folds, training, training.seed)
    records = evaluate(pairs, aligned, random_heads, shuffled_heads, probe, training)

    shortcut_checks(records, pairs, shortcuts, training.shortcuts_gate)
    variants = paraphrase_variants(pairs.vocabulary, paraphrases)
    variant_scores = [
        heads.scores(
            features,
            text_encoder.encode(
                [template.format(text if replaced is None else replaced) for text, replaced in zip(pairs.vocabulary, texts, strict=True)]
            ),
        )
        for texts in variants
    ]
    paraphrase_checks(records, pairs, variants, variant_scores)
    gated = gated_concepts(records)
    leave_out_runs = []
    for concept in leave_out_choice(records, gated, training.leave_out):
        column = pairs.vocabulary.index(concept)
        left_out_scores = fold_heads(
            features, without_concept(pairs, column), folds, text_embeddings, training, training.seed + 3000
        ).scores(features, text_embeddings)
        leave_out_runs.append(leave_out_section(pairs, column, left_out_scores, random_heads, records, training))

    final_head = train_head(features, pairs, np.arange(len(pairs.patients)), text_embeddings, training, training.seed)
    training_seconds = time.perf_counter() - training_started

    buffer = io.BytesIO()
    torch.save({key: value.detach().cpu() for key, value in final_head.state_dict().items()}, buffer)
    head_bytes = buffer.getvalue()
    card = {
        "card_format": CARD_FORMAT,
        "name": settings.name,
        "created_at": card_timestamp(),
        "configuration": settings.model_dump(mode="json"),
        "encoder": encoder,
        "feature_dim": int(features.shape[1]),
        "text_encoder": {
            **text_encoder.describe(),
            "package": DEFAULT_PACKAGE if settings.text_encoder.path is None else None,
            "configured_path": settings.text_encoder.path,
            "prompt_template": settings.text_encoder.prompt_template,
            "dim": int(text_embeddings.shape[1]),
        },
        "head_file": HEAD_FILE,
        "head_sha256": hashlib.sha256(head_bytes).hexdigest(),
        "vocabulary": pairs.vocabulary,
        "gated_concepts": gated,
        "concept_warnings": concept_warnings(records),
        "gate_rule": (
            "a concept is gated in when, in every source that labels it, the lower bound of its patient-cluster "
            f"bootstrap {training.level:.0%} interval of the held-out AUROC is above 0.5 and above the 95th "
            f"percentile of the untrained heads' AUROCs, with at least {training.min_positive_patients} patients "
            "with the concept"
        ),
        "sources": [
            {
                "name": source.name,
                "kind": source.kind,
                "probe_set": source.probe_set.reader,
                "n_samples": len(source.samples),
                "n_images": len({sample.image_index for sample in source.samples}),
                "vocabulary": source.vocabulary,
                "spec": source.spec,
            }
            for source in sources
        ],
        "n_patients": int(np.unique(pairs.patients).size),
        "folds": training.folds,
        "concepts": records,
        "shortcuts": SHORTCUTS,
        "paraphrases": paraphrases,
        "leave_concept_out": leave_out_runs,
        "bad_labels": bad_labels,
        "timings_seconds": {"features": round(feature_seconds, 2), "training_and_checks": round(training_seconds, 2)},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    card_path = out_dir / CARD_FILE
    # Each file is renamed into place whole. A run killed between the two renames leaves the old card
    # beside the new head, which the dissector rejects because the hashes differ.
    write_bytes_atomic(out_dir / HEAD_FILE, head_bytes)
    write_card(card_path, card)
    logger.info(
        "wrote alignment card %s: %d of %d concepts gated in (%s)",
        card_path, len(card["gated_concepts"]), len(pairs.vocabulary), ", ".join(card["gated_concepts"]) or "none",
    )
    return card_path

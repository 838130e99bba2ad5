"""Tests of the DuckDB store: round trip, transactions, locking, queries and schema docs."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mammo_dissect.core.errors import StoreError
from mammo_dissect.core.errors import UnknownNameError
from mammo_dissect.core.store import MIGRATIONS
from mammo_dissect.core.store import Store
from mammo_dissect.core.store import read_only_query
from mammo_dissect.tests.store_fixtures import HOSTILE_CONCEPT
from mammo_dissect.tests.store_fixtures import LAYER3_NULL_P95
from mammo_dissect.tests.store_fixtures import LAYER3_TOP_SCORES
from mammo_dissect.tests.store_fixtures import RUN_CONFIG
from mammo_dissect.tests.store_fixtures import TOP_CONCEPTS
from mammo_dissect.tests.store_fixtures import TOP_IMAGES
from mammo_dissect.tests.store_fixtures import UNITS_PER_LAYER
from mammo_dissect.tests.store_fixtures import make_database
from mammo_dissect.tests.store_fixtures import make_results
from mammo_dissect.tests.store_fixtures import write_probe_images
from mammo_dissect.tests.store_fixtures import write_run


SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "schema.md"
N_UNITS = sum(UNITS_PER_LAYER)


@pytest.fixture
def image_paths(tmp_path: Path) -> list[Path]:
    return write_probe_images(tmp_path / "probe")


@pytest.fixture
def database(tmp_path: Path, image_paths: list[Path]) -> Path:
    return make_database(tmp_path / "results.duckdb", image_paths)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "results.duckdb") as opened:
        yield opened


def count_rows(path: Path, table: str) -> int:
    _, rows = read_only_query(path, f"SELECT count(*) FROM {table}")
    return int(rows[0][0])


# ---------------------------------------------------------------- round trip


def test_round_trip_unit_labels_count(database: Path) -> None:
    assert count_rows(database, "unit_labels") == N_UNITS * TOP_CONCEPTS


def test_round_trip_unit_top_images_count(database: Path) -> None:
    assert count_rows(database, "unit_top_images") == N_UNITS * TOP_IMAGES


def test_round_trip_unit_scores_count(database: Path) -> None:
    assert count_rows(database, "unit_scores") == N_UNITS


def test_round_trip_dimension_counts(database: Path) -> None:
    assert count_rows(database, "models") == 2
    assert count_rows(database, "layers") == 2
    assert count_rows(database, "probe_images") == 6
    assert count_rows(database, "concepts") == 4
    assert count_rows(database, "concept_sets") == 1


def test_round_trip_run_completed(database: Path) -> None:
    with Store(database, read_only=True) as store:
        run = store.get_run("run-a")
    assert run["status"] == "completed"
    assert run["finished_at"] is not None
    assert run["error"] is None


def test_round_trip_run_json_columns(database: Path) -> None:
    with Store(database, read_only=True) as store:
        run = store.get_run("run-a")
    assert run["config"] == RUN_CONFIG
    assert run["similarity_params"] == {"lam": 1.0}
    assert run["concept_set_dropped"] == {"duplicates": 0}
    assert run["n_concepts"] == 4


def test_round_trip_label_values(database: Path, image_paths: list[Path]) -> None:
    units = make_results(image_paths).units
    _, rows = read_only_query(
        database,
        "SELECT layer_id, unit, rank, concept_id, score FROM unit_labels ORDER BY layer_id, unit, rank",
    )
    stored = np.array(rows, dtype=np.float64)
    assert np.array_equal(stored[:, 0], units.label_layer_id)
    assert np.array_equal(stored[:, 3], units.label_concept_id)
    assert np.allclose(stored[:, 4], units.label_score)


def test_round_trip_image_metadata(database: Path) -> None:
    _, rows = read_only_query(
        database,
        "SELECT patient_id, view, metadata->>'age', annotations FROM probe_images WHERE image_index = 3",
    )
    assert rows == [("P1", "MLO", "53", ["mass"])]


def test_round_trip_output_shape(database: Path) -> None:
    _, rows = read_only_query(database, "SELECT output_shape FROM layers WHERE name = 'layer4'")
    assert rows == [([4, 7, 7],)]


def test_round_trip_nan_p_value_is_null(database: Path) -> None:
    _, rows = read_only_query(
        database, "SELECT count(*) FROM unit_scores WHERE layer_id = 1 AND p_value IS NULL"
    )
    assert rows[0][0] == UNITS_PER_LAYER[1]


def test_labels_view_has_concept_text(database: Path) -> None:
    _, rows = read_only_query(
        database, "SELECT concept FROM labels WHERE layer = 'layer3' AND unit = 2 AND rank = 0"
    )
    assert rows == [(HOSTILE_CONCEPT,)]


def test_top_labels_view_one_row_per_unit(database: Path) -> None:
    assert count_rows(database, "top_labels") == N_UNITS


def test_top_labels_view_beats_null(database: Path) -> None:
    _, rows = read_only_query(
        database,
        "SELECT count(*) FROM top_labels JOIN layers USING (run_id, layer_id) "
        "WHERE score > null_p95",
    )
    assert rows[0][0] == sum(score > LAYER3_NULL_P95 for score in LAYER3_TOP_SCORES)


def test_store_contains_several_runs(tmp_path: Path, image_paths: list[Path]) -> None:
    path = make_database(tmp_path / "two.duckdb", image_paths, run_ids=("run-a", "run-b"))
    assert count_rows(path, "unit_labels") == 2 * N_UNITS * TOP_CONCEPTS


# ---------------------------------------------------------------- transactions


def test_write_results_failure_rolls_back(
    store: Store, image_paths: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Store._insert_arrow

    def fail_on_scores(self: Store, table: str, run_id: str, rows: object) -> None:
        if table == "unit_scores":
            raise RuntimeError("disk full")
        original(self, table, run_id, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "_insert_arrow", fail_on_scores)
    store.begin_run("run-x", "broken", {}, "0" * 64, "0.1.0")
    with pytest.raises(StoreError, match="unit_scores") as error:
        store.write_results("run-x", make_results(image_paths))
    assert "rolled back" in str(error.value)
    assert store.query("SELECT count(*) FROM unit_labels")[1][0][0] == 0
    assert store.query("SELECT count(*) FROM layers")[1][0][0] == 0
    assert store.get_run("run-x")["status"] == "failed"
    assert "disk full" in store.get_run("run-x")["error"]


def test_write_results_interrupt_propagates(
    store: Store, image_paths: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(self: Store, table: str, run_id: str, rows: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Store, "_insert_arrow", interrupt)
    store.begin_run("run-x", None, {}, "0" * 64, "0.1.0")
    with pytest.raises(KeyboardInterrupt):
        store.write_results("run-x", make_results(image_paths))
    assert store.get_run("run-x")["status"] == "running"


def test_write_results_unequal_columns(store: Store, image_paths: list[Path]) -> None:
    results = make_results(image_paths)
    results.units.label_score = results.units.label_score[:-1]
    store.begin_run("run-x", None, {}, "0" * 64, "0.1.0")
    with pytest.raises(StoreError, match="unit_labels.*different lengths"):
        store.write_results("run-x", results)
    assert store.query("SELECT count(*) FROM concepts")[1][0][0] == 0


def test_write_results_unknown_concept_id(store: Store, image_paths: list[Path]) -> None:
    results = make_results(image_paths)
    results.units.label_concept_id[0] = 99
    store.begin_run("run-x", None, {}, "0" * 64, "0.1.0")
    with pytest.raises(StoreError, match="label_concept_id.*99"):
        store.write_results("run-x", results)


def test_write_results_twice_rejected(store: Store, image_paths: list[Path]) -> None:
    write_run(store, "run-a", image_paths)
    with pytest.raises(StoreError, match="already completed"):
        store.write_results("run-a", make_results(image_paths))


def test_write_results_without_begin_run(store: Store, image_paths: list[Path]) -> None:
    with pytest.raises(UnknownNameError, match="begin_run"):
        store.write_results("run-x", make_results(image_paths))


def test_begin_run_duplicate_id(store: Store) -> None:
    store.begin_run("run-a", None, {}, "0" * 64, "0.1.0")
    with pytest.raises(StoreError, match="already in"):
        store.begin_run("run-a", None, {}, "0" * 64, "0.1.0")


def test_begin_run_status_running(store: Store) -> None:
    store.begin_run("run-a", "first", {"a": 1}, "0" * 64, "0.1.0")
    assert store.get_run("run-a")["status"] == "running"


def test_mark_failed_records_error(store: Store) -> None:
    store.begin_run("run-a", None, {}, "0" * 64, "0.1.0")
    store.mark_failed("run-a", "out of memory")
    run = store.get_run("run-a")
    assert run["status"] == "failed"
    assert run["error"] == "out of memory"


def test_mark_failed_interrupted(store: Store) -> None:
    store.begin_run("run-a", None, {}, "0" * 64, "0.1.0")
    store.mark_failed("run-a", "KeyboardInterrupt", status="interrupted")
    assert store.get_run("run-a")["status"] == "interrupted"


def test_mark_failed_invalid_status(store: Store) -> None:
    store.begin_run("run-a", None, {}, "0" * 64, "0.1.0")
    with pytest.raises(StoreError, match="invalid status 'done'"):
        store.mark_failed("run-a", "x", status="done")


def test_mark_failed_keeps_completed(store: Store, image_paths: list[Path]) -> None:
    write_run(store, "run-a", image_paths)
    store.mark_failed("run-a", "report failed")
    assert store.get_run("run-a")["status"] == "completed"


# ---------------------------------------------------------------- opening and locking


HOLD_LOCK_SCRIPT = """
import sys
from mammo_dissect.core.store import Store
store = Store(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
store.close()
"""


@pytest.fixture
def locked_database(tmp_path: Path) -> Iterator[Path]:
    """Yield a database file that a child process keeps open for writing."""
    path = tmp_path / "locked.duckdb"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK_SCRIPT, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        yield path
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
        assert child.stdout is not None
        child.stdout.close()


def test_open_writer_locked_by_other_process(locked_database: Path) -> None:
    with pytest.raises(StoreError) as error:
        Store(locked_database)
    message = str(error.value)
    assert str(locked_database) in message
    assert "another process holds a lock" in message
    assert "Conflicting lock" in message
    assert "--database" in message


def test_open_reader_locked_by_other_process(locked_database: Path) -> None:
    with pytest.raises(StoreError, match="a run in another process is writing to it"):
        Store(locked_database, read_only=True)


def test_open_reader_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.duckdb"
    with pytest.raises(StoreError, match="not found"):
        Store(missing, read_only=True)
    assert not missing.exists()


def test_open_reader_foreign_database(tmp_path: Path) -> None:
    import duckdb

    path = tmp_path / "other.duckdb"
    duckdb.connect(str(path)).close()
    with pytest.raises(StoreError, match="not a mammo-dissect results database"):
        Store(path, read_only=True)


def test_open_writer_creates_parent_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "results.duckdb"
    Store(path).close()
    assert path.is_file()


def test_reader_rejects_begin_run(database: Path) -> None:
    with Store(database, read_only=True) as store:
        with pytest.raises(StoreError, match="open read-only"):
            store.begin_run("run-z", None, {}, "0" * 64, "0.1.0")


# ---------------------------------------------------------------- migrations


def test_migrations_recorded(store: Store) -> None:
    assert store.applied_migrations() == [migration.__name__ for migration in MIGRATIONS]


def test_migrations_applied_once(tmp_path: Path) -> None:
    path = tmp_path / "results.duckdb"
    Store(path).close()
    Store(path).close()
    assert count_rows(path, "schema_migrations") == len(MIGRATIONS)


def test_migrations_unknown_rejected(tmp_path: Path) -> None:
    path = tmp_path / "results.duckdb"
    with Store(path) as store:
        store.query("INSERT INTO schema_migrations VALUES (99, 'm099_future', now()::TIMESTAMP)")
    with pytest.raises(StoreError, match="m099_future"):
        Store(path)


# ---------------------------------------------------------------- reading


def test_read_only_query_rejects_delete(database: Path) -> None:
    with pytest.raises(StoreError, match="statement rejected.*read-only"):
        read_only_query(database, "DELETE FROM unit_labels")
    assert count_rows(database, "unit_labels") == N_UNITS * TOP_CONCEPTS


def test_read_only_query_syntax_error(database: Path) -> None:
    with pytest.raises(StoreError, match="invalid SQL"):
        read_only_query(database, "SELEC 1")


def test_read_only_query_rejects_copy(database: Path, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="only SELECT and EXPLAIN"):
        read_only_query(database, f"COPY unit_labels TO '{tmp_path / 'out.csv'}'")
    assert not (tmp_path / "out.csv").exists()


def test_read_only_query_blocks_file_reads(database: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    with pytest.raises(StoreError, match="disabled by configuration"):
        read_only_query(database, f"SELECT * FROM read_csv('{secret}')")


def test_read_only_query_rejects_two_statements(database: Path) -> None:
    with pytest.raises(StoreError, match="exactly one SQL statement"):
        read_only_query(database, "SELECT 1; SELECT 2")


def test_read_only_query_columns(database: Path) -> None:
    columns, rows = read_only_query(database, "SELECT run_id, status FROM runs")
    assert columns == ["run_id", "status"]
    assert rows == [("run-a", "completed")]


def test_get_run_unique_prefix(database: Path) -> None:
    with Store(database, read_only=True) as store:
        assert store.get_run("run-")["run_id"] == "run-a"


def test_get_run_unknown_lists_ids(database: Path) -> None:
    with Store(database, read_only=True) as store:
        with pytest.raises(UnknownNameError, match="run-a"):
            store.get_run("zzz")


def test_get_run_ambiguous_prefix(tmp_path: Path, image_paths: list[Path]) -> None:
    path = make_database(tmp_path / "two.duckdb", image_paths, run_ids=("run-a", "run-b"))
    with Store(path, read_only=True) as store:
        with pytest.raises(StoreError, match="ambiguous: it starts 2 run ids"):
            store.get_run("run-")


def test_latest_run_id(tmp_path: Path, image_paths: list[Path]) -> None:
    path = make_database(tmp_path / "two.duckdb", image_paths, run_ids=("run-a", "run-b"))
    with Store(path) as store:
        store.begin_run("run-c", None, {}, "0" * 64, "0.1.0")
        assert store.latest_run_id() == "run-c"
        assert store.latest_run_id(status="completed") == "run-b"


def test_latest_run_id_empty(store: Store) -> None:
    assert store.latest_run_id() is None


def test_list_runs_fields(database: Path) -> None:
    with Store(database, read_only=True) as store:
        runs = store.list_runs()
    assert [run["run_id"] for run in runs] == ["run-a"]
    assert runs[0]["n_layers"] == 2
    assert runs[0]["status"] == "completed"


# ---------------------------------------------------------------- schema docs


def schema_doc_queries() -> list[str]:
    text = SCHEMA_DOC.read_text(encoding="utf-8")
    return re.findall(r"```sql\n(.*?)```", text, flags=re.DOTALL)


def test_schema_doc_has_examples() -> None:
    assert len(schema_doc_queries()) >= 6


@pytest.fixture(scope="module")
def docs_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("docs")
    images = write_probe_images(folder / "probe")
    return make_database(folder / "docs.duckdb", images, run_ids=("run-a", "run-b"))


@pytest.mark.parametrize(
    "query",
    schema_doc_queries(),
    ids=[f"example-{number}" for number in range(len(schema_doc_queries()))],
)
def test_schema_doc_query_runs(docs_database: Path, query: str) -> None:
    columns, rows = read_only_query(docs_database, query)
    assert columns
    assert rows, "the example returned no rows on the synthetic database"

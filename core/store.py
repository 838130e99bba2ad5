"""The DuckDB store: bulk writers, run records and read-only queries (schema migrations are in core/migrations.py).

One database file contains any number of runs, and every table has a
``run_id`` column.  A run is written in two steps: :meth:`Store.begin_run`
records it as ``running`` before any work starts, and
:meth:`Store.write_results` inserts all of its rows and marks it
``completed`` in one transaction, so a run is either complete or has no
result rows at all.

Bulk rows go through Arrow tables (``INSERT ... SELECT`` from a registered
table) because DuckDB's ``executemany`` inserts about a thousand rows per
second, which is far too slow for one row per unit, rank and layer.

Only one process can hold a DuckDB file for writing, and while it does no
other process can open the file at all, not even read-only.  Several
processes can read a file at the same time when no writer holds it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from mammo_dissect.core import arrow_columns
from mammo_dissect.core.errors import StoreError
from mammo_dissect.core.errors import UnknownNameError
from mammo_dissect.core.migrations import ANALYSIS_OBJECTS  # noqa: F401 - part of this module's API
from mammo_dissect.core.migrations import MIGRATIONS
from mammo_dissect.core.migrations import MIGRATIONS_TABLE
from mammo_dissect.core.migrations import VALIDITY_VIEWS  # noqa: F401 - part of this module's API
from mammo_dissect.core.migrations import _applied_migrations
from mammo_dissect.core.migrations import _has_table
from mammo_dissect.core.migrations import _utc_now
from mammo_dissect.core.migrations import create_analysis_objects
from mammo_dissect.core.migrations import m001_initial  # noqa: F401 - part of this module's API
from mammo_dissect.core.migrations import m002_analyses
from mammo_dissect.core.migrations import m003_validity
from mammo_dissect.core.migrations import m004_mask_iou
from mammo_dissect.core.migrations import migrate
from mammo_dissect.core.results import RunResults
from mammo_dissect.core.results import UnitTables


logger = logging.getLogger(__name__)

#: Storage format written by this store.  DuckDB 2.0 would otherwise write a
#: format that the DuckDB 1.x command-line tool cannot open.
STORAGE_COMPATIBILITY_VERSION = "v1.2.0"

RUN_STATUSES = ("running", "completed", "failed", "interrupted")

#: Columns of ``runs`` with JSON text, which :meth:`Store.get_run` parses.
JSON_RUN_COLUMNS = ("config", "similarity_params", "concept_set_dropped", "extra")

# ---------------------------------------------------------------- helpers


def _json_default(value: Any) -> Any:
    """Convert numpy scalars and arrays, paths and sets for :func:`json.dumps`."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, (Path, datetime)):
        return str(value)
    raise TypeError(f"value of type {type(value).__name__} cannot be stored as JSON: {value!r}")


def to_json(value: Any) -> str | None:
    """Serialise ``value`` as JSON text for a JSON column (None stays NULL)."""
    if value is None:
        return None
    return json.dumps(value, default=_json_default)


def _from_json(text: Any) -> Any:
    if text is None or not isinstance(text, str):
        return text
    return json.loads(text)


def _lock_message(path: str, exc: duckdb.Error, read_only: bool) -> str:
    if read_only:
        return (
            f"cannot open the results database {path} to read it: a run in another process is "
            f"writing to it ({exc}). Wait for that run to finish, then try again."
        )
    return (
        f"cannot open the results database {path} to write to it: another process holds a lock "
        f"on it ({exc}). Wait for that run to finish, or pass another --database file."
    )


def _column(values: np.ndarray, dtype: Any, *, nan_to_null: bool = False) -> pa.Array:
    """Build an Arrow column from a numpy column; NaN becomes NULL when asked."""
    return arrow_columns.numbers(np.asarray(values), dtype, nan_to_null=nan_to_null)


def _check_lengths(table: str, columns: dict[str, np.ndarray]) -> int:
    """Check that the numpy columns of one table are 1-D and equally long."""
    lengths = {}
    for name, values in columns.items():
        array = np.asarray(values)
        if array.ndim != 1:
            raise StoreError(
                f"cannot write table {table}: column {name} has shape {array.shape}, "
                "expected a 1-D array"
            )
        lengths[name] = array.shape[0]
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name}={length}" for name, length in lengths.items())
        raise StoreError(
            f"cannot write table {table}: its columns have different lengths ({shown}). "
            "The pipeline built inconsistent UnitTables."
        )
    return next(iter(lengths.values()), 0)


def _check_ids(
    table: str, column: str, values: np.ndarray, known: Sequence[int], what: str
) -> None:
    """Check that every id in ``values`` is one of ``known``."""
    values = np.asarray(values)
    if values.size == 0:
        return
    missing = np.setdiff1d(np.unique(values), np.asarray(list(known), dtype=values.dtype))
    if missing.size:
        shown = ", ".join(str(value) for value in missing[:10].tolist())
        raise StoreError(
            f"cannot write table {table}: column {column} refers to {what} that the run "
            f"does not have ({shown}). The pipeline built inconsistent results."
        )


def _unit_arrow_tables(results: RunResults) -> dict[str, pa.Table]:
    """Check the per-unit columns and convert them to Arrow tables."""
    units: UnitTables = results.units
    layer_ids = [layer.layer_id for layer in results.layers]
    concept_ids = [concept.concept_id for concept in results.concepts]
    image_indices = [image.image_index for image in results.images]

    label_columns = {
        "label_layer_id": units.label_layer_id,
        "label_unit": units.label_unit,
        "label_rank": units.label_rank,
        "label_concept_id": units.label_concept_id,
        "label_score": units.label_score,
    }
    image_columns = {
        "image_layer_id": units.image_layer_id,
        "image_unit": units.image_unit,
        "image_rank": units.image_rank,
        "image_index": units.image_index,
        "image_activation": units.image_activation,
    }
    score_columns = {
        "score_layer_id": units.score_layer_id,
        "score_unit": units.score_unit,
        "score_top": units.score_top,
        "score_percentile": units.score_percentile,
        "score_p_value": units.score_p_value,
    }
    _check_lengths("unit_labels", label_columns)
    _check_lengths("unit_top_images", image_columns)
    _check_lengths("unit_scores", score_columns)
    _check_ids("unit_labels", "label_layer_id", units.label_layer_id, layer_ids, "layers")
    _check_ids("unit_labels", "label_concept_id", units.label_concept_id, concept_ids, "concepts")
    _check_ids("unit_top_images", "image_layer_id", units.image_layer_id, layer_ids, "layers")
    _check_ids("unit_top_images", "image_index", units.image_index, image_indices, "probe images")
    _check_ids("unit_scores", "score_layer_id", units.score_layer_id, layer_ids, "layers")

    return {
        "unit_labels": pa.table(
            {
                "layer_id": _column(units.label_layer_id, np.int32),
                "unit": _column(units.label_unit, np.int32),
                "rank": _column(units.label_rank, np.int16),
                "concept_id": _column(units.label_concept_id, np.int32),
                "score": _column(units.label_score, np.float32),
            }
        ),
        "unit_top_images": pa.table(
            {
                "layer_id": _column(units.image_layer_id, np.int32),
                "unit": _column(units.image_unit, np.int32),
                "rank": _column(units.image_rank, np.int16),
                "image_index": _column(units.image_index, np.int32),
                "activation": _column(units.image_activation, np.float32),
            }
        ),
        "unit_scores": pa.table(
            {
                "layer_id": _column(units.score_layer_id, np.int32),
                "unit": _column(units.score_unit, np.int32),
                "top_score": _column(units.score_top, np.float32),
                "percentile": _column(units.score_percentile, np.float32),
                # NaN means "no null baseline". NULL marks that in SQL, and it
                # keeps comparisons such as p_value < 0.05 from matching the row.
                "p_value": _column(units.score_p_value, np.float32, nan_to_null=True),
            }
        ),
    }


def _dimension_arrow_tables(results: RunResults) -> dict[str, pa.Table]:
    """Convert the models, layers, images and concepts of a run to Arrow tables."""
    models = pa.table(
        {
            "model_id": arrow_columns.numbers([model.model_id for model in results.models], np.int32),
            "role": arrow_columns.strings([model.role for model in results.models]),
            "plugin": arrow_columns.strings([model.plugin for model in results.models]),
            "plugin_version": arrow_columns.strings([model.plugin_version for model in results.models]),
            "spec": arrow_columns.strings([model.spec for model in results.models]),
            "weights_path": arrow_columns.strings([model.weights_path for model in results.models]),
            "weights_sha256": arrow_columns.strings([model.weights_sha256 for model in results.models]),
            "preprocessing": arrow_columns.strings([to_json(model.preprocessing) for model in results.models]),
        }
    )
    layers = pa.table(
        {
            "layer_id": arrow_columns.numbers([layer.layer_id for layer in results.layers], np.int32),
            "model_id": arrow_columns.numbers([layer.model_id for layer in results.layers], np.int32),
            "name": arrow_columns.strings([layer.name for layer in results.layers]),
            "depth": arrow_columns.numbers([layer.depth for layer in results.layers], np.int32),
            "n_units": arrow_columns.numbers([layer.n_units for layer in results.layers], np.int32),
            "output_shape": arrow_columns.lists(
                [[int(size) for size in layer.output_shape] for layer in results.layers],
                lambda sizes: arrow_columns.numbers(sizes, np.int32),
            ),
            "pooling": arrow_columns.strings([layer.pooling for layer in results.layers]),
            "null_mean": arrow_columns.numbers([layer.null_mean for layer in results.layers], np.float64),
            "null_p95": arrow_columns.numbers([layer.null_p95 for layer in results.layers], np.float64),
            "null_max": arrow_columns.numbers([layer.null_max for layer in results.layers], np.float64),
            "permutations": arrow_columns.numbers([layer.permutations for layer in results.layers], np.int32),
        }
    )
    images = pa.table(
        {
            "image_index": arrow_columns.numbers([image.image_index for image in results.images], np.int32),
            "image_id": arrow_columns.strings([image.image_id for image in results.images]),
            "path": arrow_columns.strings([str(image.path) for image in results.images]),
            "sha256": arrow_columns.strings([image.sha256 for image in results.images]),
            "patient_id": arrow_columns.strings([image.patient_id for image in results.images]),
            "laterality": arrow_columns.strings([image.laterality for image in results.images]),
            "view": arrow_columns.strings([image.view for image in results.images]),
            "metadata": arrow_columns.strings([to_json(image.metadata) for image in results.images]),
            "annotations": arrow_columns.lists(
                [list(image.annotations) for image in results.images], arrow_columns.strings
            ),
        }
    )
    concept_sets = pa.table(
        {
            "name": arrow_columns.strings([results.concept_set_name]),
            "source": arrow_columns.strings([results.concept_set_source]),
            "sha256": arrow_columns.strings([results.concept_set_sha256]),
            "n_concepts": arrow_columns.numbers([len(results.concepts)], np.int32),
            "dropped": arrow_columns.strings([to_json(results.concept_set_dropped)]),
        }
    )
    concepts = pa.table(
        {
            "concept_id": arrow_columns.numbers([c.concept_id for c in results.concepts], np.int32),
            "text": arrow_columns.strings([c.text for c in results.concepts]),
            "category": arrow_columns.strings([c.category for c in results.concepts]),
            "broad_category": arrow_columns.strings([c.broad_category for c in results.concepts]),
        }
    )
    return {
        "models": models,
        "layers": layers,
        "probe_images": images,
        "concept_sets": concept_sets,
        "concepts": concepts,
    }


def _arrow_tables(results: RunResults) -> dict[str, pa.Table]:
    """Build every result table of a run, dimension tables first.

    :raises StoreError: naming the table when its rows are inconsistent or a
        value cannot be converted.
    """
    tables: dict[str, pa.Table] = {}
    try:
        tables.update(_dimension_arrow_tables(results))
    except (TypeError, ValueError, pa.ArrowException) as exc:
        raise StoreError(
            f"cannot convert the models, layers, images or concepts to rows: {exc}"
        ) from exc
    try:
        tables.update(_unit_arrow_tables(results))
    except (TypeError, ValueError, pa.ArrowException) as exc:
        raise StoreError(f"cannot convert the per-unit results to rows: {exc}") from exc
    if results.activation_maps:
        try:
            tables["unit_activation_maps"] = _activation_map_table(results.activation_maps)
        except (TypeError, ValueError, pa.ArrowException) as exc:
            raise StoreError(f"cannot convert the activation maps to rows: {exc}") from exc
    return tables


def _activation_map_table(maps: dict[int, np.ndarray]) -> pa.Table:
    """Flatten [units x ranks x height x width] arrays into one row per (layer, unit, rank)."""
    parts = []
    for layer_id, array in sorted(maps.items()):
        units, ranks, height, width = array.shape
        flat = np.ascontiguousarray(array, dtype=np.float32).reshape(units * ranks, height * width)
        values = arrow_columns.numbers(flat.reshape(-1), np.float32)
        offsets = arrow_columns.numbers(np.arange(0, flat.size + 1, height * width, dtype=np.int32), np.int32)
        parts.append(
            pa.table(
                {
                    "layer_id": arrow_columns.numbers(np.full(units * ranks, layer_id, dtype=np.int32), np.int32),
                    "unit": arrow_columns.numbers(np.repeat(np.arange(units, dtype=np.int32), ranks), np.int32),
                    "rank": arrow_columns.numbers(np.tile(np.arange(ranks, dtype=np.int16), units), np.int16),
                    "height": arrow_columns.numbers(np.full(units * ranks, height, dtype=np.int16), np.int16),
                    "width": arrow_columns.numbers(np.full(units * ranks, width, dtype=np.int16), np.int16),
                    "activation_map": pa.ListArray.from_arrays(offsets, values),
                }
            )
        )
    return pa.concat_tables(parts)


# ---------------------------------------------------------------- the store


def _check_is_duckdb_file(path: Path) -> None:
    """Raise :class:`StoreError` when ``path`` exists but is not a DuckDB database file."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head[8:12] == b"DUCK":
        return
    kind = "an SQLite database" if head.startswith(b"SQLite format 3") else "not a DuckDB database"
    raise StoreError(
        f"{path} is {kind}; mammo-dissect stores results in DuckDB files. "
        f"Choose another --database path"
    )


#: DuckDB would otherwise download and load extensions on demand, for example
#: sqlite_scanner when pointed at an SQLite file: never reach the network.
NO_EXTENSION_DOWNLOADS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}


class Store:
    """A DuckDB results database containing any number of runs.

    :param path: the database file.  Writers create it and its parent folders.
    :param read_only: open read-only.  Readers never change the file, do not
        apply migrations, and require the file to exist.
    :raises StoreError: when the file is missing (readers), held by another
        process, or not a mammo-dissect database.
    """

    def __init__(
        self, path: str | Path, read_only: bool = False, sandbox: bool = False, wait_seconds: float = 0.0
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.sandbox = sandbox
        self._con = self._connect_waiting(wait_seconds)
        try:
            if read_only:
                self._check_schema_for_reading()
            else:
                migrate(self._con, str(self.path))
        except BaseException:
            self._con.close()
            raise

    def _connect_waiting(self, wait_seconds: float) -> duckdb.DuckDBPyConnection:
        """Connect, retrying for up to ``wait_seconds`` while another process holds the lock."""
        deadline = time.monotonic() + max(0.0, wait_seconds)
        announced = False
        while True:
            try:
                return self._connect()
            except StoreError as exc:
                locked = isinstance(exc.__cause__, duckdb.IOException) and "lock" in str(exc.__cause__).lower()
                if not locked or time.monotonic() >= deadline:
                    if locked and wait_seconds > 0:
                        raise StoreError(f"timed out after waiting {wait_seconds:g} s: {exc}") from exc.__cause__
                    raise
                if not announced:
                    logger.info("%s is locked by another process; waiting up to %g s", self.path, wait_seconds)
                    announced = True
                time.sleep(0.5)

    def _connect(self) -> duckdb.DuckDBPyConnection:
        path = str(self.path)
        _check_is_duckdb_file(self.path)
        if self.read_only:
            if not self.path.is_file():
                raise StoreError(
                    f"results database not found: {path}. Check the --database path, "
                    "or run a dissection first to create it."
                )
            config: dict[str, Any] = dict(NO_EXTENSION_DOWNLOADS)
            if self.sandbox:
                # User SQL may not read or write other files, attach databases or load extensions.
                config = {
                    "enable_external_access": False,
                    "autoload_known_extensions": False,
                    "autoinstall_known_extensions": False,
                }
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the folder of the results database {path}: {exc.strerror or exc}; "
                    f"choose a --database path in a writable folder"
                ) from exc
            config = {"storage_compatibility_version": STORAGE_COMPATIBILITY_VERSION, **NO_EXTENSION_DOWNLOADS}
        try:
            return duckdb.connect(path, read_only=self.read_only, config=config)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise StoreError(_lock_message(path, exc, self.read_only)) from exc
            raise StoreError(f"cannot open the results database {path}: {exc}") from exc
        except duckdb.ConnectionException as exc:
            # DuckDB shares one database instance per file within a process, and
            # refuses a second connection whose settings differ (read-only or not).
            raise StoreError(
                f"cannot open the results database {path}: this process already has it open "
                f"with other settings ({exc}). Close the other Store on this file first."
            ) from exc
        except duckdb.Error as exc:
            raise StoreError(
                f"cannot open the results database {path}: {exc}. Check that it is a DuckDB "
                "file written by mammo-dissect."
            ) from exc

    def _check_schema_for_reading(self) -> None:
        if not _has_table(self._con, MIGRATIONS_TABLE):
            raise StoreError(
                f"{self.path} is not a mammo-dissect results database (it has no "
                f"{MIGRATIONS_TABLE} table). Check the --database path."
            )
        applied = _applied_migrations(self._con)
        pending = [m.__name__ for m in MIGRATIONS if m.__name__ not in applied]
        if m002_analyses.__name__ in pending:
            # The analysis views are missing: create session-only copies,
            # which leave the file unchanged.
            create_analysis_objects(self._con, temporary=True)
            logger.info(
                "results database %s lacks schema migration %s; using temporary analysis views",
                self.path,
                m002_analyses.__name__,
            )
            pending.remove(m002_analyses.__name__)
        optional = {m003_validity.__name__, m004_mask_iou.__name__}
        if pending and set(pending) <= optional:
            # These migrations only add tables of results that a writer stores
            # later (validity, chance, stability, mask IoU), so readers of an
            # older file see those tables as absent.
            logger.info(
                "results database %s lacks schema migration(s) %s: it has none of their result tables",
                self.path,
                ", ".join(pending),
            )
            return
        if pending:
            logger.warning(
                "results database %s lacks schema migrations %s; open it once for writing "
                "(any new run does) to upgrade it, queries may fail until then",
                self.path,
                ", ".join(pending),
            )

    # -------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the connection; closing twice is harmless."""
        self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def applied_migrations(self) -> list[str]:
        """Return the names of the schema migrations recorded in the database, in order."""
        return _applied_migrations(self._con)

    # -------------------------------------------------------------- writing

    def _require_writer(self, action: str) -> None:
        if self.read_only:
            raise StoreError(
                f"cannot {action}: the results database {self.path} is open read-only. "
                "Open the Store with read_only=False."
            )

    def begin_run(
        self,
        run_id: str,
        name: str | None,
        config: dict[str, Any],
        config_sha256: str,
        tool_version: str,
    ) -> None:
        """Insert the row of a new run with status ``running`` and commit it.

        :raises StoreError: when ``run_id`` is already in the database.
        """
        self._require_writer(f"begin run {run_id}")
        if self._find_run_ids(run_id, prefix=False):
            raise StoreError(
                f"run id {run_id!r} is already in {self.path}, and run ids must be unique. "
                "Start the run with a new id."
            )
        try:
            self._con.execute(
                """
                INSERT INTO runs (run_id, name, created_at, status, tool_version, config, config_sha256)
                VALUES (?, ?, ?, 'running', ?, ?, ?)
                """,
                [run_id, name, _utc_now(), tool_version, to_json(config), config_sha256],
            )
        except (duckdb.Error, TypeError) as exc:
            raise StoreError(f"cannot record run {run_id} in {self.path}: {exc}") from exc
        logger.info("run %s started in %s", run_id, self.path)

    def _insert_arrow(self, table: str, run_id: str, rows: pa.Table) -> None:
        """Insert an Arrow table into ``table``, adding the ``run_id`` column."""
        view_name = f"_mammo_dissect_{table}_rows"
        self._con.register(view_name, rows)
        try:
            self._con.execute(
                f"INSERT INTO {table} BY NAME SELECT ? AS run_id, * FROM {view_name}",
                [run_id],
            )
        finally:
            self._con.unregister(view_name)

    def write_results(self, run_id: str, results: RunResults) -> None:
        """Write all rows of a run and mark it ``completed``, in one transaction.

        On any error the transaction is rolled back, so the run has no result
        rows, and the run is marked ``failed`` with the error message.  A
        ``KeyboardInterrupt`` rolls back too and propagates unchanged.

        :raises StoreError: naming the table whose rows could not be built or
            inserted, or when the run is unknown or already completed.
        """
        self._require_writer(f"write the results of run {run_id}")
        status = self._run_status(run_id)
        if status == "completed":
            raise StoreError(
                f"run {run_id} in {self.path} is already completed, so its results cannot be "
                "written again. Start a new run."
            )
        tables = _arrow_tables(results)

        table = "runs"
        self._con.begin()
        try:
            for table, rows in tables.items():
                self._insert_arrow(table, run_id, rows)
            table = "runs"
            self._update_finished_run(run_id, results)
            self._con.commit()
        except BaseException as exc:
            self._rollback(run_id)
            if not isinstance(exc, Exception):
                raise
            message = (
                f"writing table {table} of run {run_id} to {self.path} failed: {exc}. "
                "The transaction was rolled back, so no result row of this run was stored."
            )
            self._mark_failed_quietly(run_id, message)
            raise StoreError(message) from exc
        logger.info(
            "run %s completed: %d layers, %d label rows written to %s",
            run_id,
            len(results.layers),
            tables["unit_labels"].num_rows,
            self.path,
        )

    def _update_finished_run(self, run_id: str, results: RunResults) -> None:
        self._con.execute(
            """
            UPDATE runs SET
                status = 'completed',
                finished_at = ?,
                error = NULL,
                probe_set_reader = ?,
                probe_set_root = ?,
                probe_fingerprint = ?,
                similarity = ?,
                similarity_params = ?,
                similarity_range = ?,
                concept_set_name = ?,
                concept_set_source = ?,
                concept_set_sha256 = ?,
                n_concepts = ?,
                concept_set_dropped = ?,
                extra = ?
            WHERE run_id = ?
            """,
            [
                _utc_now(),
                results.probe_set_reader,
                str(results.probe_set_root),
                results.probe_fingerprint,
                results.similarity,
                to_json(results.similarity_params),
                results.similarity_range,
                results.concept_set_name,
                results.concept_set_source,
                results.concept_set_sha256,
                len(results.concepts),
                to_json(results.concept_set_dropped),
                to_json(results.extra),
                run_id,
            ],
        )

    def _rollback(self, run_id: str) -> None:
        try:
            self._con.rollback()
        except duckdb.Error as exc:
            logger.error("rolling back the results of run %s in %s failed: %s", run_id, self.path, exc)

    def _mark_failed_quietly(self, run_id: str, message: str) -> None:
        try:
            self.mark_failed(run_id, message)
        except (StoreError, duckdb.Error) as exc:
            logger.error("cannot mark run %s as failed in %s: %s", run_id, self.path, exc)

    def mark_failed(self, run_id: str, error: str, status: str = "failed") -> None:
        """Set the status of a run to ``failed`` or ``interrupted`` with its error message.

        A completed run keeps its status: its results are stored in full, so a
        later error (a report that failed, say) is only logged.

        :raises StoreError: when ``status`` is not ``failed`` or ``interrupted``.
        :raises UnknownNameError: when the run is not in the database.
        """
        self._require_writer(f"mark run {run_id} as {status}")
        if status not in ("failed", "interrupted"):
            raise StoreError(
                f"invalid status {status!r} for mark_failed: use 'failed' or 'interrupted'"
            )
        current = self._run_status(run_id)
        if current == "completed":
            logger.warning(
                "run %s is completed; keeping that status and ignoring the error: %s", run_id, error
            )
            return
        try:
            self._con.execute(
                "UPDATE runs SET status = ?, error = ?, finished_at = ? WHERE run_id = ?",
                [status, error, _utc_now(), run_id],
            )
        except duckdb.Error as exc:
            raise StoreError(f"cannot mark run {run_id} as {status} in {self.path}: {exc}") from exc
        logger.info("run %s marked %s in %s", run_id, status, self.path)

    def mark_abandoned_runs(self) -> list[str]:
        """Mark runs still ``running`` as ``interrupted``; return their ids.

        Only one process can open the file for writing, so when this writer
        holds it, any run still marked running belongs to a process that
        ended without finishing (killed with SIGKILL, or crashed).
        """
        self._require_writer("mark abandoned runs")
        rows = self._con.execute("SELECT run_id FROM runs WHERE status = 'running'").fetchall()
        abandoned = [str(row[0]) for row in rows]
        for run_id in abandoned:
            self._con.execute(
                "UPDATE runs SET status = 'interrupted', error = ? WHERE run_id = ?",
                ["the process ended before the run finished (killed or crashed)", run_id],
            )
            logger.warning("run %s was left running by a process that ended; marked interrupted", run_id)
        return abandoned

    # -------------------------------------------------------------- reading

    def _find_run_ids(self, text: str, *, prefix: bool) -> list[str]:
        if prefix:
            sql = "SELECT run_id FROM runs WHERE starts_with(run_id, ?) ORDER BY run_id"
        else:
            sql = "SELECT run_id FROM runs WHERE run_id = ?"
        return [row[0] for row in self._con.execute(sql, [text]).fetchall()]

    def _known_run_ids(self) -> list[str]:
        return [row[0] for row in self._con.execute("SELECT run_id FROM runs").fetchall()]

    def resolve_run_id(self, run_id: str) -> str:
        """Return the full run id for ``run_id`` or for a unique prefix of one.

        :raises UnknownNameError: when no run id equals or starts with
            ``run_id``, or when the prefix fits several runs.
        """
        if self._find_run_ids(run_id, prefix=False):
            return run_id
        matches = self._find_run_ids(run_id, prefix=True) if run_id else []
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise StoreError(
                f"run id prefix {run_id!r} is ambiguous: it starts {len(matches)} run ids "
                f"({', '.join(matches[:5])}{', ...' if len(matches) > 5 else ''}); give more characters"
            )
        raise UnknownNameError(
            "run",
            run_id,
            self._known_run_ids(),
            hint=f"list the runs with `mammo-dissect runs {self.path}`",
        )

    def _run_status(self, run_id: str) -> str:
        row = self._con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchone()
        if row is None:
            raise UnknownNameError(
                "run", run_id, self._known_run_ids(), hint="call begin_run before writing results"
            )
        return str(row[0])

    def list_runs(self) -> list[dict[str, Any]]:
        """Return one summary dict per run, oldest first.

        Keys: ``run_id``, ``name``, ``status``, ``created_at``, ``finished_at``,
        ``tool_version``, ``similarity``, ``concept_set_name``, ``n_concepts``,
        ``n_layers`` and ``error``.
        """
        columns, rows = self.query(
            """
            SELECT r.run_id, r.name, r.status, r.created_at, r.finished_at, r.tool_version,
                   r.similarity, r.concept_set_name, r.n_concepts,
                   (SELECT count(*) FROM layers AS l WHERE l.run_id = r.run_id) AS n_layers,
                   r.error
            FROM runs AS r
            ORDER BY r.created_at, r.run_id
            """
        )
        return [dict(zip(columns, row)) for row in rows]

    def get_run(self, run_id: str) -> dict[str, Any]:
        """Return every column of one run, with JSON columns parsed.

        :param run_id: a run id or a unique prefix of one.
        :raises UnknownNameError: listing the known run ids when none fits.
        """
        full_id = self.resolve_run_id(run_id)
        columns, rows = self.query("SELECT * FROM runs WHERE run_id = ?", [full_id])
        run = dict(zip(columns, rows[0]))
        for column in JSON_RUN_COLUMNS:
            run[column] = _from_json(run.get(column))
        return run

    def latest_run_id(self, status: str | None = None) -> str | None:
        """Return the id of the most recently created run, or None for an empty database.

        :param status: consider only runs with this status (e.g. ``completed``).
        """
        sql = "SELECT run_id FROM runs"
        params: list[Any] = []
        if status is not None:
            sql += " WHERE status = ?"
            params.append(status)
        sql += " ORDER BY created_at DESC, run_id DESC LIMIT 1"
        row = self._con.execute(sql, params).fetchone()
        return None if row is None else str(row[0])

    def query(
        self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run one SQL statement and return its column names and rows.

        :raises StoreError: with DuckDB's message when the statement fails, or
            when it would write to a database opened read-only.
        """
        try:
            if params is None:
                cursor = self._con.execute(sql)
            else:
                cursor = self._con.execute(sql, params)
            description = cursor.description
            if description is None:
                return [], []
            columns = [column[0] for column in description]
            return columns, cursor.fetchall()
        except duckdb.Error as exc:
            if self.read_only and "read-only mode" in str(exc):
                raise StoreError(
                    f"statement rejected: the results database {self.path} is open read-only, "
                    f"and this statement would change it ({exc}). Only queries that read are "
                    "allowed here."
                ) from exc
            raise StoreError(f"query on {self.path} failed: {exc}") from exc


def read_only_query(
    path: str | Path, sql: str, params: Sequence[Any] | dict[str, Any] | None = None
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Open ``path`` read-only, run one SQL query and return its columns and rows.

    Only one ``SELECT`` (including ``WITH``, ``DESCRIBE``, ``SHOW`` and
    ``SUMMARIZE``) or ``EXPLAIN`` statement is accepted.  The connection has
    external access switched off, so a query cannot read or write other
    files, attach databases or load extensions.

    :raises StoreError: when the file is missing or held by a writer, when the
        statement is not a single query, or when it fails.
    """
    try:
        statements = duckdb.connect(":memory:").extract_statements(sql)
    except duckdb.Error as exc:
        raise StoreError(f"invalid SQL: {exc}") from exc
    if len(statements) != 1:
        raise StoreError(f"expected exactly one SQL statement, got {len(statements)}; run them one at a time")
    kind = statements[0].type
    if kind not in (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN):
        raise StoreError(
            f"statement rejected: only SELECT and EXPLAIN queries are allowed here, got "
            f"{kind.name}; the database is opened read-only"
        )
    with Store(path, read_only=True, sandbox=True) as store:
        return store.query(sql, params)

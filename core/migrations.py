"""Schema migrations of the DuckDB store, applied in order and recorded in ``schema_migrations``.

Each migration is a plain function ``mNNN_name(con)`` run in its own
transaction.  Append new ones to :data:`MIGRATIONS`; never edit or reorder
one that has been released.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from datetime import timezone

import duckdb

from mammo_dissect.core.errors import StoreError


logger = logging.getLogger(__name__)

MIGRATIONS_TABLE = "schema_migrations"


def _utc_now() -> datetime:
    """Return the current time in UTC without a time zone, as TIMESTAMP columns store it."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def m001_initial(con: duckdb.DuckDBPyConnection) -> None:
    """Create the first schema: runs, their inputs, per-unit results and views."""
    con.execute(
        """
        CREATE TABLE runs (
            run_id VARCHAR NOT NULL,
            name VARCHAR,
            created_at TIMESTAMP NOT NULL,
            finished_at TIMESTAMP,
            status VARCHAR NOT NULL,
            error VARCHAR,
            tool_version VARCHAR,
            config JSON,
            config_sha256 VARCHAR,
            probe_set_reader VARCHAR,
            probe_set_root VARCHAR,
            probe_fingerprint VARCHAR,
            similarity VARCHAR,
            similarity_params JSON,
            similarity_range VARCHAR,
            concept_set_name VARCHAR,
            concept_set_source VARCHAR,
            concept_set_sha256 VARCHAR,
            n_concepts INTEGER,
            concept_set_dropped JSON,
            extra JSON
        )
        """
    )

    con.execute(
        """
        CREATE TABLE models (
            run_id VARCHAR NOT NULL,
            model_id INTEGER NOT NULL,
            role VARCHAR NOT NULL,
            plugin VARCHAR,
            plugin_version VARCHAR,
            spec VARCHAR,
            weights_path VARCHAR,
            weights_sha256 VARCHAR,
            preprocessing JSON
        )
        """
    )

    con.execute(
        """
        CREATE TABLE layers (
            run_id VARCHAR NOT NULL,
            layer_id INTEGER NOT NULL,
            model_id INTEGER NOT NULL,
            name VARCHAR NOT NULL,
            depth INTEGER,
            n_units INTEGER,
            output_shape INTEGER[],
            pooling VARCHAR,
            null_mean DOUBLE,
            null_p95 DOUBLE,
            null_max DOUBLE,
            permutations INTEGER
        )
        """
    )

    con.execute(
        """
        CREATE TABLE probe_images (
            run_id VARCHAR NOT NULL,
            image_index INTEGER NOT NULL,
            image_id VARCHAR,
            path VARCHAR,
            sha256 VARCHAR,
            patient_id VARCHAR,
            laterality VARCHAR,
            view VARCHAR,
            metadata JSON,
            annotations VARCHAR[]
        )
        """
    )

    con.execute(
        """
        CREATE TABLE concept_sets (
            run_id VARCHAR NOT NULL,
            name VARCHAR,
            source VARCHAR,
            sha256 VARCHAR,
            n_concepts INTEGER,
            dropped JSON
        )
        """
    )

    con.execute(
        """
        CREATE TABLE concepts (
            run_id VARCHAR NOT NULL,
            concept_id INTEGER NOT NULL,
            text VARCHAR NOT NULL,
            category VARCHAR,
            broad_category VARCHAR
        )
        """
    )

    # The three per-unit tables are the large ones: no key constraints,
    # because constraints slow bulk inserts down and the writer checks ids.
    con.execute(
        """
        CREATE TABLE unit_labels (
            run_id VARCHAR,
            layer_id INTEGER,
            unit INTEGER,
            rank SMALLINT,
            concept_id INTEGER,
            score FLOAT
        )
        """
    )

    con.execute(
        """
        CREATE TABLE unit_top_images (
            run_id VARCHAR,
            layer_id INTEGER,
            unit INTEGER,
            rank SMALLINT,
            image_index INTEGER,
            activation FLOAT
        )
        """
    )

    con.execute(
        """
        CREATE TABLE unit_scores (
            run_id VARCHAR,
            layer_id INTEGER,
            unit INTEGER,
            top_score FLOAT,
            percentile FLOAT,
            p_value FLOAT
        )
        """
    )

    con.execute(
        """
        CREATE VIEW labels AS
        SELECT
            ul.run_id,
            ul.layer_id,
            l.name AS layer,
            ul.unit,
            ul.rank,
            ul.concept_id,
            c.text AS concept,
            c.category,
            ul.score
        FROM unit_labels AS ul
        JOIN layers AS l ON l.run_id = ul.run_id AND l.layer_id = ul.layer_id
        JOIN concepts AS c ON c.run_id = ul.run_id AND c.concept_id = ul.concept_id
        """
    )

    con.execute(
        """
        CREATE VIEW top_labels AS
        SELECT
            lb.run_id,
            lb.layer_id,
            lb.layer,
            lb.unit,
            lb.concept_id,
            lb.concept,
            lb.category,
            lb.score,
            s.percentile,
            s.p_value
        FROM labels AS lb
        LEFT JOIN unit_scores AS s
            ON s.run_id = lb.run_id AND s.layer_id = lb.layer_id AND s.unit = lb.unit
        WHERE lb.rank = 0
        """
    )


#: Views and table macros of the study's analyses, created by
#: :func:`m002_analyses`.  ``docs/analyses.md`` documents each with an example.
#: A unit's top concept is its rank-0 label.  ``is_mammography`` is true when
#: the concept's broad category is set and is not ``non-mammography``.  It is
#: false for ``non-mammography``, and NULL (unknown) when the concept has no
#: broad category.  Layers of different runs are matched by
#: name.  The macros take ``run_list`` (a list of run ids),
#: ``threshold_mode`` ('local', 'global' or 'none') and ``null_alpha`` (NULL
#: for no null-baseline filter).
ANALYSIS_OBJECTS: tuple[tuple[str, str], ...] = (
    (
        "VIEW",
        """
        unit_tops AS
        WITH base AS (
            SELECT
                s.run_id,
                s.layer_id,
                l.name AS layer,
                l.depth,
                l.n_units,
                s.unit,
                ul.concept_id,
                c.text AS concept,
                c.category,
                c.broad_category,
                s.top_score,
                s.percentile,
                s.p_value,
                l.null_p95
            FROM unit_scores AS s
            JOIN layers AS l ON l.run_id = s.run_id AND l.layer_id = s.layer_id
            LEFT JOIN unit_labels AS ul
                ON ul.run_id = s.run_id AND ul.layer_id = s.layer_id AND ul.unit = s.unit AND ul.rank = 0
            LEFT JOIN concepts AS c ON c.run_id = ul.run_id AND c.concept_id = ul.concept_id
        )
        SELECT
            *,
            CASE
                WHEN broad_category IS NULL THEN NULL
                WHEN broad_category = 'non-mammography' THEN false
                ELSE true
            END AS is_mammography,
            avg(top_score) OVER (PARTITION BY run_id, layer_id) AS layer_mean,
            top_score >= avg(top_score) OVER (PARTITION BY run_id, layer_id) AS passes_local,
            top_score > null_p95 AS above_null_p95
        FROM base
        """,
    ),
    (
        "VIEW",
        """
        layer_summary AS
        SELECT
            run_id,
            layer_id,
            layer,
            depth,
            any_value(n_units) AS n_units,
            count(*) AS n_scored,
            avg(top_score) AS mean_top_score,
            min(top_score) AS min_top_score,
            quantile_cont(top_score, 0.25) AS q25_top_score,
            quantile_cont(top_score, 0.5) AS median_top_score,
            quantile_cont(top_score, 0.75) AS q75_top_score,
            max(top_score) AS max_top_score,
            count(DISTINCT concept_id) AS n_distinct_concepts,
            count(*) FILTER (WHERE is_mammography) AS n_mammography,
            count(*) FILTER (WHERE NOT is_mammography) AS n_non_mammography,
            count(*) FILTER (WHERE is_mammography IS NULL) AS n_unknown_category,
            count(*) FILTER (WHERE is_mammography) / count(*) AS mammography_share,
            count(*) FILTER (WHERE passes_local) AS n_passing_local,
            any_value(null_p95) AS null_p95,
            CASE WHEN any_value(null_p95) IS NULL THEN NULL
                 ELSE count(*) FILTER (WHERE above_null_p95) END AS n_above_null_p95
        FROM unit_tops
        GROUP BY run_id, layer_id, layer, depth
        """,
    ),
    (
        "VIEW",
        """
        layer_categories AS
        SELECT run_id, layer_id, layer, depth, broad_category, category, count(*) AS n_units
        FROM unit_tops
        GROUP BY run_id, layer_id, layer, depth, broad_category, category
        """,
    ),
    (
        "MACRO",
        """
        passing_units(run_list, threshold_mode := 'global', null_alpha := NULL) AS TABLE
        WITH selected AS (
            SELECT * FROM unit_tops WHERE list_contains(run_list, run_id)
        ),
        layer_means AS (
            SELECT DISTINCT run_id, layer, layer_mean FROM selected
        ),
        global_thresholds AS (
            SELECT layer, max(layer_mean) AS global_threshold FROM layer_means GROUP BY layer
        ),
        thresholds AS (
            SELECT
                selected.*,
                g.global_threshold,
                CASE threshold_mode
                    WHEN 'local' THEN selected.layer_mean
                    WHEN 'global' THEN g.global_threshold
                    WHEN 'none' THEN NULL
                    ELSE error('invalid threshold_mode ' || threshold_mode || ': use local, global or none')
                END AS threshold,
                CASE
                    WHEN null_alpha IS NULL THEN NULL
                    WHEN selected.p_value IS NULL AND selected.null_p95 IS NULL THEN NULL
                    ELSE coalesce(selected.p_value < null_alpha, false)
                        OR coalesce(selected.top_score > selected.null_p95, false)
                END AS passes_null
            FROM selected
            JOIN global_thresholds AS g USING (layer)
        )
        SELECT
            *,
            (threshold IS NULL OR top_score >= threshold) AND coalesce(passes_null, true) AS passes
        FROM thresholds
        """,
    ),
    (
        "MACRO",
        """
        passing_layer_summary(run_list, threshold_mode := 'global', null_alpha := NULL) AS TABLE
        SELECT
            run_id,
            layer_id,
            layer,
            depth,
            count(*) AS n_units,
            any_value(threshold) AS threshold,
            count(*) FILTER (WHERE passes) AS n_passing,
            count(*) FILTER (WHERE passes AND is_mammography) AS n_mammography,
            count(*) FILTER (WHERE passes AND NOT is_mammography) AS n_non_mammography,
            count(*) FILTER (WHERE passes AND is_mammography IS NULL) AS n_unknown_category,
            CASE WHEN count(*) FILTER (WHERE passes) = 0 THEN NULL
                 ELSE count(*) FILTER (WHERE passes AND is_mammography) / count(*) FILTER (WHERE passes)
            END AS mammography_share
        FROM passing_units(run_list, threshold_mode := threshold_mode, null_alpha := null_alpha)
        GROUP BY run_id, layer_id, layer, depth
        """,
    ),
    (
        "MACRO",
        """
        passing_categories(run_list, threshold_mode := 'global', null_alpha := NULL) AS TABLE
        SELECT run_id, layer_id, layer, depth, broad_category, category, count(*) AS n_units
        FROM passing_units(run_list, threshold_mode := threshold_mode, null_alpha := null_alpha)
        WHERE passes
        GROUP BY run_id, layer_id, layer, depth, broad_category, category
        """,
    ),
    (
        "MACRO",
        """
        passing_broad_categories(run_list, threshold_mode := 'global', null_alpha := NULL) AS TABLE
        WITH counts AS (
            SELECT run_id, layer_id, layer, depth, broad_category, count(*) AS n_units
            FROM passing_units(run_list, threshold_mode := threshold_mode, null_alpha := null_alpha)
            WHERE passes
            GROUP BY run_id, layer_id, layer, depth, broad_category
        )
        SELECT
            *,
            n_units / sum(n_units) OVER (PARTITION BY run_id, layer_id) AS share,
            rank() OVER (PARTITION BY run_id, layer_id ORDER BY n_units DESC) AS category_rank
        FROM counts
        """,
    ),
    (
        "MACRO",
        """
        concept_changes(run_a, run_b, threshold_mode := 'global', null_alpha := NULL) AS TABLE
        WITH passing AS (
            SELECT run_id, layer, concept, category, broad_category, count(*) AS n_units
            FROM passing_units([run_a, run_b], threshold_mode := threshold_mode, null_alpha := null_alpha)
            WHERE passes
            GROUP BY run_id, layer, concept, category, broad_category
        ),
        a AS (SELECT * FROM passing WHERE run_id = run_a),
        b AS (SELECT * FROM passing WHERE run_id = run_b)
        SELECT
            coalesce(a.layer, b.layer) AS layer,
            coalesce(a.concept, b.concept) AS concept,
            coalesce(a.category, b.category) AS category,
            coalesce(a.broad_category, b.broad_category) AS broad_category,
            coalesce(a.n_units, 0) AS n_units_a,
            coalesce(b.n_units, 0) AS n_units_b,
            CASE WHEN a.n_units IS NULL THEN 'gained'
                 WHEN b.n_units IS NULL THEN 'lost'
                 ELSE 'kept' END AS change
        FROM a
        FULL OUTER JOIN b ON a.layer = b.layer AND a.concept = b.concept
        """,
    ),
    (
        "MACRO",
        """
        label_changes(run_a, run_b, threshold_mode := 'global', null_alpha := NULL) AS TABLE
        WITH units AS (
            SELECT * FROM passing_units([run_a, run_b], threshold_mode := threshold_mode, null_alpha := null_alpha)
        ),
        a AS (SELECT * FROM units WHERE run_id = run_a),
        b AS (SELECT * FROM units WHERE run_id = run_b)
        SELECT
            a.layer,
            a.depth,
            a.unit,
            a.concept AS concept_a,
            b.concept AS concept_b,
            a.broad_category AS broad_category_a,
            b.broad_category AS broad_category_b,
            a.top_score AS score_a,
            b.top_score AS score_b,
            a.passes AS passes_a,
            b.passes AS passes_b
        FROM a
        JOIN b ON a.layer = b.layer AND a.unit = b.unit
        WHERE a.concept IS DISTINCT FROM b.concept
        """,
    ),
    (
        "MACRO",
        """
        concept_coverage(run_list, threshold_mode := 'global', null_alpha := NULL) AS TABLE
        WITH passing AS (
            SELECT run_id, concept_id, count(*) AS n_passing_units
            FROM passing_units(run_list, threshold_mode := threshold_mode, null_alpha := null_alpha)
            WHERE passes
            GROUP BY run_id, concept_id
        )
        SELECT
            c.run_id,
            c.concept_id,
            c.text AS concept,
            c.category,
            c.broad_category,
            coalesce(p.n_passing_units, 0) AS n_passing_units
        FROM concepts AS c
        LEFT JOIN passing AS p ON p.run_id = c.run_id AND p.concept_id = c.concept_id
        WHERE list_contains(run_list, c.run_id)
        """,
    ),
    (
        "MACRO",
        """
        category_coverage(run_list, threshold_mode := 'global', null_alpha := NULL) AS TABLE
        SELECT
            run_id,
            broad_category,
            category,
            count(*) AS n_concepts,
            count(*) FILTER (WHERE n_passing_units > 0) AS n_concepts_covered,
            sum(n_passing_units) AS n_passing_units
        FROM concept_coverage(run_list, threshold_mode := threshold_mode, null_alpha := null_alpha)
        GROUP BY run_id, broad_category, category
        """,
    ),
)


def create_analysis_objects(con: duckdb.DuckDBPyConnection, *, temporary: bool = False) -> None:
    """Create the analysis views and macros; ``temporary`` makes session-only copies.

    Temporary copies let a read-only connection to a database without
    :func:`m002_analyses` run the same queries without changing the file.
    """
    prefix = "CREATE OR REPLACE TEMPORARY" if temporary else "CREATE"
    for kind, body in ANALYSIS_OBJECTS:
        con.execute(f"{prefix} {kind} {body}")


def m002_analyses(con: duckdb.DuckDBPyConnection) -> None:
    """Add the analysis views and table macros, and the table of per-unit activation maps.

    ``unit_activation_maps`` holds, for each unit and each of its top images
    (``rank`` as in ``unit_top_images``), the unit's spatial activations on
    that image as a row-major ``height x width`` list.  The report overlays
    them on the thumbnails.
    """
    con.execute(
        """
        CREATE TABLE unit_activation_maps (
            run_id VARCHAR,
            layer_id INTEGER,
            unit INTEGER,
            rank SMALLINT,
            height SMALLINT,
            width SMALLINT,
            activation_map FLOAT[]
        )
        """
    )
    create_analysis_objects(con)


#: Views of the label-validity, chance-control and stability tables, created by
#: :func:`m003_validity`.  ``docs/validity.md`` documents each.
VALIDITY_VIEWS: tuple[tuple[str, str], ...] = (
    (
        "VIEW",
        """
        layer_validity AS
        SELECT
            l.run_id,
            l.layer_id,
            l.name AS layer,
            l.n_units,
            count(v.unit) AS n_labels_checked,
            count(v.auroc) AS n_auroc,
            avg(v.auroc) AS mean_auroc,
            quantile_cont(v.auroc, 0.5) AS median_auroc,
            count(*) FILTER (WHERE v.auroc > 0.5) / nullif(count(v.auroc), 0) AS share_above_half
        FROM layers AS l
        JOIN unit_validity AS v ON v.run_id = l.run_id AND v.layer_id = l.layer_id
        GROUP BY l.run_id, l.layer_id, l.name, l.n_units
        """,
    ),
    (
        "VIEW",
        """
        chance_summary AS
        SELECT
            run_id,
            layer_id,
            layer,
            control,
            count(*) AS n_trials,
            avg(n_mammography) AS mean_n_mammography,
            avg(n_distractor) AS mean_n_distractor,
            avg(n_mammography / nullif(n_mammography + n_distractor, 0)) AS mean_mammography_share,
            avg(mean_auroc) AS mean_auroc,
            quantile_cont(mean_auroc, 0.05) AS p05_auroc,
            quantile_cont(mean_auroc, 0.95) AS p95_auroc
        FROM chance_counts
        GROUP BY run_id, layer_id, layer, control
        """,
    ),
    (
        "VIEW",
        """
        layer_stability AS
        SELECT
            s.run_id,
            s.layer_id,
            l.name AS layer,
            s.perturbation,
            count(*) AS n_units,
            avg(s.label_changed_share) AS mean_label_changed_share,
            count(*) FILTER (WHERE s.label_changed_share > 0) / count(*) AS share_units_changed
        FROM unit_stability AS s
        JOIN layers AS l ON l.run_id = s.run_id AND l.layer_id = s.layer_id
        GROUP BY s.run_id, s.layer_id, l.name, s.perturbation
        """,
    ),
)


def m003_validity(con: duckdb.DuckDBPyConnection) -> None:
    """Add the tables of label validity, chance controls and label stability, and their views.

    ``unit_validity`` has one row per unit whose top label is an annotated
    concept: the AUROC of the unit's pooled activations for images with that
    concept against images without it (NULL when a class is empty).
    ``chance_counts`` has one row per layer and control trial (the run itself,
    a random dissector seed, a shuffle of the concept texts, the annotation
    dissector), ``concept_null_wins`` how often each concept was a top label
    under a control, and ``unit_stability`` the share of perturbation trials
    that changed a unit's top label.
    """
    con.execute(
        """
        CREATE TABLE unit_validity (
            run_id VARCHAR,
            layer_id INTEGER,
            unit INTEGER,
            concept_id INTEGER,
            auroc DOUBLE,
            n_positive INTEGER,
            n_negative INTEGER
        )
        """
    )
    con.execute(
        """
        CREATE TABLE chance_counts (
            run_id VARCHAR,
            layer_id INTEGER,
            layer VARCHAR,
            control VARCHAR,
            seed BIGINT,
            n_units INTEGER,
            n_mammography INTEGER,
            n_distractor INTEGER,
            n_unknown_category INTEGER,
            n_auroc INTEGER,
            mean_auroc DOUBLE
        )
        """
    )
    con.execute(
        """
        CREATE TABLE concept_null_wins (
            run_id VARCHAR,
            control VARCHAR,
            concept_id INTEGER,
            wins BIGINT,
            trials BIGINT
        )
        """
    )
    con.execute(
        """
        CREATE TABLE unit_stability (
            run_id VARCHAR,
            layer_id INTEGER,
            unit INTEGER,
            perturbation VARCHAR,
            label_changed_share DOUBLE,
            n_trials INTEGER
        )
        """
    )
    for kind, body in VALIDITY_VIEWS:
        con.execute(f"CREATE {kind} {body}")


def m004_mask_iou(con: duckdb.DuckDBPyConnection) -> None:
    """Add the table of per-unit mask IoU with segmentation concepts, and the view of each unit's best concept.

    ``unit_mask_iou`` has one row per unit and mask concept: the summed
    intersection over summed union of the unit's binarised maps (``map >
    threshold``, the activation ``quantile`` over the probe set) with the
    concept's masks (see :mod:`mammo_dissect.core.mask_dissection`).
    ``top_mask_labels`` keeps each unit's row with the highest IoU, ties
    broken by concept text.
    """
    con.execute(
        """
        CREATE TABLE unit_mask_iou (
            run_id VARCHAR,
            layer_id INTEGER,
            unit INTEGER,
            concept VARCHAR,
            iou DOUBLE,
            threshold DOUBLE,
            quantile DOUBLE
        )
        """
    )
    con.execute(
        """
        CREATE VIEW top_mask_labels AS
        SELECT
            m.run_id,
            m.layer_id,
            l.name AS layer,
            m.unit,
            m.concept,
            m.iou,
            m.threshold,
            m.quantile
        FROM unit_mask_iou AS m
        JOIN layers AS l ON l.run_id = m.run_id AND l.layer_id = m.layer_id
        QUALIFY row_number() OVER (PARTITION BY m.run_id, m.layer_id, m.unit ORDER BY m.iou DESC, m.concept) = 1
        """
    )


#: Schema migrations in the order they are applied.  Append new ones, and
#: never edit or reorder a migration that has been released.
MIGRATIONS: tuple[Callable[[duckdb.DuckDBPyConnection], None], ...] = (
    m001_initial,
    m002_analyses,
    m003_validity,
    m004_mask_iou,
)


def _create_migrations_table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} "
        "(version INTEGER, name VARCHAR, applied_at TIMESTAMP)"
    )


def _applied_migrations(con: duckdb.DuckDBPyConnection) -> list[str]:
    rows = con.execute(f"SELECT name FROM {MIGRATIONS_TABLE} ORDER BY version").fetchall()
    return [row[0] for row in rows]


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    row = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND schema_name = 'main'",
        [name],
    ).fetchone()
    return bool(row and row[0])


def migrate(con: duckdb.DuckDBPyConnection, path: str) -> list[str]:
    """Apply the pending migrations in order, each in its own transaction.

    :param con: a read-write connection.
    :param path: the database path, for error messages.
    :returns: the names of the migrations applied now.
    :raises StoreError: when the database records a migration this version of
        mammo-dissect does not know, or when a migration fails.
    """
    _create_migrations_table(con)
    applied = _applied_migrations(con)
    known = [migration.__name__ for migration in MIGRATIONS]
    unknown = [name for name in applied if name not in known]
    if unknown:
        raise StoreError(
            f"the results database {path} has schema migrations that this version of "
            f"mammo-dissect does not know ({', '.join(unknown)}); it was written by a newer "
            "version. Upgrade mammo-dissect, or write to another --database file."
        )
    done_now = []
    for version, migration in enumerate(MIGRATIONS, start=1):
        if migration.__name__ in applied:
            continue
        con.begin()
        try:
            migration(con)
            con.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} VALUES (?, ?, ?)",
                [version, migration.__name__, _utc_now()],
            )
            con.commit()
        except duckdb.Error as exc:
            con.rollback()
            raise StoreError(
                f"schema migration {migration.__name__} failed on {path}: {exc}"
            ) from exc
        logger.info("applied schema migration %s to %s", migration.__name__, path)
        done_now.append(migration.__name__)
    return done_now

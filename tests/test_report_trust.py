"""Tests of the validity, chance-control and stability results in the single-run and comparison reports."""

from __future__ import annotations

import re
from html import unescape
from pathlib import Path

import duckdb
import pytest

from mammo_dissect.core.report import render_comparison
from mammo_dissect.core.report import render_report
from mammo_dissect.core.report_charts import BAND_HALF_WIDTH
from mammo_dissect.core.report_charts import line_chart
from mammo_dissect.tests.analysis_fixtures import make_comparison_database
from mammo_dissect.tests.store_fixtures import make_database
from mammo_dissect.tests.store_fixtures import write_probe_images
from mammo_dissect.tests.test_report import parse


ESCAPED_HOSTILE = "&lt;script&gt;alert(1)&lt;/script&gt;"

#: (layer_id, unit, concept_id, auroc, n_positive, n_negative) of run-a.  Concept 0 is "mass".
VALIDITY_ROWS = (
    (0, 0, 0, 0.875, 2, 4),
    (0, 1, 1, 0.375, 2, 4),
    (1, 0, 1, None, 0, 6),
)
#: (layer_id, unit, perturbation, label_changed_share, n_trials) of run-a.
STABILITY_ROWS = (
    (0, 0, "bootstrap", 0.15, 20),
    (0, 0, "noise", 0.4, 5),
    (0, 1, "bootstrap", 0.0, 20),
)
#: n_mammography of the five random-control trials of layer3 (3 units): mean 1.4, 5th to 95th percentile 0.2 to 2.8.
RANDOM_COUNTS = (0, 1, 1, 2, 3)
RANDOM_AUROCS = (0.5, 0.6, 0.4, 0.7, 0.3)
#: (control, concept_id, wins, trials) of run-a.  Concept 2 is the hostile concept.
NULL_WIN_ROWS = (
    ("random", 2, 9, 15),
    ("random", 0, 3, 15),
    ("random", 1, 0, 15),
)
#: Concept ids without a concept row, which the table shows as "concept N".  Only the 10 with the most wins are listed.
SURPLUS_CONCEPTS = range(100, 112)
TRUST_TABLES = ("unit_validity", "chance_counts", "concept_null_wins", "unit_stability")
TRUST_VIEWS = ("layer_validity", "chance_summary", "layer_stability")


def insert_chance_trials(con: duckdb.DuckDBPyConnection, run_id: str, layer_id: int, layer: str, n_units: int) -> None:
    """Insert one observed trial and the five random-control trials of one layer."""
    con.execute(
        "INSERT INTO chance_counts VALUES (?, ?, ?, 'observed', NULL, ?, ?, 0, 0, 2, 0.625)",
        [run_id, layer_id, layer, n_units, n_units],
    )
    for seed, (count, auroc) in enumerate(zip(RANDOM_COUNTS, RANDOM_AUROCS)):
        con.execute(
            "INSERT INTO chance_counts VALUES (?, ?, ?, 'random', ?, ?, ?, ?, 0, 2, ?)",
            [run_id, layer_id, layer, seed, n_units, count, n_units - count, auroc],
        )


def insert_trust_rows(path: Path) -> None:
    """Insert validity, stability, chance and null-win rows for run-a of the store fixture."""
    with duckdb.connect(str(path)) as con:
        for row in VALIDITY_ROWS:
            con.execute("INSERT INTO unit_validity VALUES ('run-a', ?, ?, ?, ?, ?, ?)", list(row))
        for row in STABILITY_ROWS:
            con.execute("INSERT INTO unit_stability VALUES ('run-a', ?, ?, ?, ?, ?)", list(row))
        insert_chance_trials(con, "run-a", 0, "layer3", 3)
        for row in NULL_WIN_ROWS:
            con.execute("INSERT INTO concept_null_wins VALUES ('run-a', ?, ?, ?, ?)", list(row))
        for wins, concept_id in enumerate(SURPLUS_CONCEPTS, start=1):
            con.execute("INSERT INTO concept_null_wins VALUES ('run-a', 'shuffled_concepts', ?, ?, 100)", [concept_id, wins])


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_probe_images(tmp_path_factory.mktemp("probe"))


@pytest.fixture(scope="module")
def trust_report(tmp_path_factory: pytest.TempPathFactory, image_paths: list[Path]) -> Path:
    folder = tmp_path_factory.mktemp("trust")
    database = make_database(folder / "results.duckdb", image_paths)
    insert_trust_rows(database)
    return render_report(database, "run-a", folder / "report")


@pytest.fixture(scope="module")
def plain_report(tmp_path_factory: pytest.TempPathFactory, image_paths: list[Path]) -> Path:
    folder = tmp_path_factory.mktemp("plain")
    database = make_database(folder / "results.duckdb", image_paths)
    return render_report(database, "run-a", folder / "report")


def table_html(html: str, css_class: str) -> str:
    match = re.search(rf'<table class="{css_class}">.*?</table>', html, flags=re.DOTALL)
    assert match is not None, f"no table of class {css_class}"
    return match.group(0)


def unit_row(html: str, unit: int) -> str:
    match = re.search(rf'<tr id="unit-{unit}".*?</tr>', html, flags=re.DOTALL)
    assert match is not None, f"no row of unit {unit}"
    return match.group(0)


def cells(row_html: str) -> list[str]:
    """Return the text of the row's numeric cells, with tags removed and entities decoded."""
    found = re.findall(r'<td class="num">(.*?)</td>', row_html, flags=re.DOTALL)
    return [unescape(re.sub(r"<[^>]+>", "", cell)).strip() for cell in found]


# ---------------------------------------------------------------- single-run report


def test_index_layer_validity_columns(trust_report: Path) -> None:
    text = " ".join(parse(trust_report).text)
    assert "Labels checked" in text
    assert "Mean validity AUROC" in text
    html = trust_report.read_text(encoding="utf-8")
    layer3 = re.search(r'<a href="layer-0.html">layer3</a>.*?</tr>', html, flags=re.DOTALL)
    assert layer3 is not None
    assert cells(layer3.group(0))[-3:] == ["2", "0.625", "50.0 %"]


def test_index_layer_without_auroc(trust_report: Path) -> None:
    html = trust_report.read_text(encoding="utf-8")
    layer4 = re.search(r'<a href="layer-1.html">layer4</a>.*?</tr>', html, flags=re.DOTALL)
    assert layer4 is not None
    assert cells(layer4.group(0))[-3:] == ["1", "\u2013", "\u2013"]


def test_layer_page_unit_validity(trust_report: Path) -> None:
    html = (trust_report.parent / "layer-0.html").read_text(encoding="utf-8")
    assert "Validity AUROC" in html
    assert "0.875" in cells(unit_row(html, 0))
    assert "0.375" in cells(unit_row(html, 1))
    assert 'title="mass: 2 images with the concept, 4 without"' in unit_row(html, 0)


def test_layer_page_unit_stability(trust_report: Path) -> None:
    html = (trust_report.parent / "layer-0.html").read_text(encoding="utf-8")
    assert "Label changed (bootstrap)" in html
    assert "Label changed (noise)" in html
    assert html.index("Label changed (bootstrap)") < html.index("Label changed (noise)")
    assert cells(unit_row(html, 0))[-3:] == ["0.875", "15.0 %", "40.0 %"]
    assert cells(unit_row(html, 1))[-3:] == ["0.375", "0.0 %", "\u2013"]
    assert cells(unit_row(html, 2))[-3:] == ["\u2013", "\u2013", "\u2013"]


def test_index_chance_summary(trust_report: Path) -> None:
    table = table_html(trust_report.read_text(encoding="utf-8"), "chance")
    random_row = re.search(r"<td>random</td>.*?</tr>", table, flags=re.DOTALL)
    assert random_row is not None
    assert cells(random_row.group(0)) == ["5", "3", "1.4", "0.2\u20132.8", "0.500"]
    assert table.index("<td>observed</td>") < table.index("<td>random</td>")


def test_index_null_wins_escaped(trust_report: Path) -> None:
    table = table_html(trust_report.read_text(encoding="utf-8"), "null-wins")
    assert ESCAPED_HOSTILE in table
    assert "60.0 %" in table
    assert "20.0 %" in table
    assert "<td>calcification</td>" not in table  # no wins


def test_index_null_wins_top_ten(trust_report: Path) -> None:
    table = table_html(trust_report.read_text(encoding="utf-8"), "null-wins")
    assert table.count("<td>shuffled_concepts</td>") == 10
    assert "concept 111" in table
    assert "concept 101" not in table


def test_trust_report_no_raw_hostile_text(trust_report: Path) -> None:
    for page in trust_report.parent.glob("*.html"):
        assert "<script>alert(1)</script>" not in page.read_text(encoding="utf-8"), page.name


def test_trust_report_shades_own_band(trust_report: Path) -> None:
    tags = [name for name, _ in parse(trust_report).tags]
    assert tags.count("polygon") == 1


def test_plain_report_no_trust_sections(plain_report: Path) -> None:
    index = plain_report.read_text(encoding="utf-8")
    layer = (plain_report.parent / "layer-0.html").read_text(encoding="utf-8")
    assert "Chance controls" not in index
    assert "Labels checked" not in index
    assert "<polygon" not in index
    assert "Validity AUROC" not in layer
    assert "Label changed" not in layer


def test_report_without_trust_tables(tmp_path: Path, image_paths: list[Path]) -> None:
    database = make_database(tmp_path / "old.duckdb", image_paths)
    with duckdb.connect(str(database)) as con:
        for view in TRUST_VIEWS:
            con.execute(f"DROP VIEW {view}")
        for table in TRUST_TABLES:
            con.execute(f"DROP TABLE {table}")
        con.execute("DELETE FROM schema_migrations WHERE name = 'm003_validity'")
    index = render_report(database, "run-a", tmp_path / "report")
    assert "Chance controls" not in index.read_text(encoding="utf-8")
    assert "Validity AUROC" not in (index.parent / "layer-0.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------- comparison chart


@pytest.fixture(scope="module")
def band_comparison(tmp_path_factory: pytest.TempPathFactory, image_paths: list[Path]) -> Path:
    """A comparison of run-a and run-b where only run-a has random-control trials, of layer ``early``."""
    folder = tmp_path_factory.mktemp("bands")
    database = make_comparison_database(folder / "runs.duckdb", image_paths)
    with duckdb.connect(str(database)) as con:
        insert_chance_trials(con, "run-a", 0, "early", 4)
    return render_comparison(database, ["run-a", "run-b"], folder / "report")


def share_chart_svg(html: str) -> str:
    charts = re.findall(r"<svg .*?</svg>", html, flags=re.DOTALL)
    shares = [chart for chart in charts if "mammography concept" in chart]
    assert len(shares) == 1
    return shares[0]


def test_comparison_band_behind_line(band_comparison: Path) -> None:
    svg = share_chart_svg(band_comparison.read_text(encoding="utf-8"))
    assert svg.count("<polygon") == 1
    assert svg.index("<polygon") < svg.index("<polyline")


def test_comparison_band_legend(band_comparison: Path) -> None:
    text = " ".join(parse(band_comparison).text)
    assert "1: run-a model: random control, 5th\u201395th percentile" in text
    assert "2: run-b model: random control" not in text


def test_comparison_band_spans_percentiles(band_comparison: Path) -> None:
    svg = share_chart_svg(band_comparison.read_text(encoding="utf-8"))
    points = re.search(r'<polygon points="([^"]+)"', svg)
    assert points is not None
    ys = sorted({float(pair.split(",")[1]) for pair in points.group(1).split()})
    top, bottom = 16, 300 - 64
    # The random trials' shares are 0, 0.25, 0.25, 0.5 and 0.75: 5th percentile 0.05, 95th percentile 0.7.
    assert ys[0] == pytest.approx(bottom - 0.7 * (bottom - top), abs=0.2)
    assert ys[1] == pytest.approx(bottom - 0.05 * (bottom - top), abs=0.2)


def test_comparison_without_band(tmp_path: Path, image_paths: list[Path]) -> None:
    database = make_comparison_database(tmp_path / "runs.duckdb", image_paths)
    index = render_comparison(database, ["run-a", "run-b"], tmp_path / "report")
    html = index.read_text(encoding="utf-8")
    assert "<polygon" not in html
    assert "random control" not in html


def test_line_chart_band_breaks_at_missing() -> None:
    chart = line_chart(
        ["a", "b", "c", "d"],
        [{"name": "r", "colour": "#000", "values": [0.5, 0.5, 0.5, 0.5]}],
        y_range=(0.0, 1.0),
        bands=[{"name": "band", "colour": "#000", "low": [0.1, 0.2, None, 0.3], "high": [0.4, 0.5, 0.6, 0.7]}],
    )
    polygons = chart["bands"][0]["polygons"]
    assert len(polygons) == 2
    assert len(polygons[0].split()) == 4


def test_line_chart_single_point_band_visible() -> None:
    chart = line_chart(
        ["a"],
        [{"name": "r", "colour": "#000", "values": [0.5]}],
        y_range=(0.0, 1.0),
        bands=[{"name": "band", "colour": "#000", "low": [0.2], "high": [0.6]}],
    )
    xs = sorted({float(pair.split(",")[0]) for pair in chart["bands"][0]["polygons"][0].split()})
    assert xs[1] - xs[0] == pytest.approx(2 * BAND_HALF_WIDTH)

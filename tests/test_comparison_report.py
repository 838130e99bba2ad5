"""Tests of the comparison report, the SVG charts, activation-map overlays and a tiny end-to-end comparison."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mammo_dissect.core.analyses import ComparisonError
from mammo_dissect.core.heatmap import normalise_map
from mammo_dissect.core.heatmap import overlay_heatmap
from mammo_dissect.core.report import render_comparison
from mammo_dissect.core.report import render_report
from mammo_dissect.core.report_charts import line_chart
from mammo_dissect.core.report_charts import nice_ticks
from mammo_dissect.core.report_charts import stacked_bar_chart
from mammo_dissect.core.store import Store
from mammo_dissect.tests.analysis_fixtures import HOSTILE_CONCEPT
from mammo_dissect.tests.analysis_fixtures import make_comparison_database
from mammo_dissect.tests.analysis_fixtures import write_comparison_run
from mammo_dissect.tests.store_fixtures import write_probe_images
from mammo_dissect.tests.test_report import parse


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_probe_images(tmp_path_factory.mktemp("probe"))


@pytest.fixture(scope="module")
def shared_database(tmp_path_factory: pytest.TempPathFactory, image_paths: list[Path]) -> Path:
    """The two-run database shared by the tests that only read it."""
    return make_comparison_database(tmp_path_factory.mktemp("runs") / "runs.duckdb", image_paths)


@pytest.fixture
def database(tmp_path: Path, shared_database: Path) -> Path:
    """A copy of the two-run database that a test may change."""
    copy = tmp_path / "runs.duckdb"
    copy.write_bytes(shared_database.read_bytes())
    return copy


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory, shared_database: Path) -> Path:
    return render_comparison(shared_database, ["run-a", "run-b"], tmp_path_factory.mktemp("report") / "report")


def all_pages(index: Path) -> list[Path]:
    return sorted(index.parent.rglob("*.html"))


# ---------------------------------------------------------------- comparison pages


def test_comparison_writes_run_reports(comparison: Path) -> None:
    names = sorted(str(page.relative_to(comparison.parent)) for page in all_pages(comparison))
    assert names == [
        "index.html",
        "run-1/index.html",
        "run-1/layer-0.html",
        "run-1/layer-1.html",
        "run-2/index.html",
        "run-2/layer-0.html",
        "run-2/layer-1.html",
    ]


def test_comparison_links_resolve(comparison: Path) -> None:
    for page in all_pages(comparison):
        parser = parse(page)
        for link in parser.attribute_values("a", "href") + parser.attribute_values("img", "src"):
            target = link.split("#")[0]
            assert (page.parent / target).is_file(), f"{page}: {link}"


def test_comparison_no_external_reference(comparison: Path) -> None:
    for page in all_pages(comparison):
        html = page.read_text(encoding="utf-8")
        assert "http://" not in html, page
        assert "https://" not in html, page
        for link in parse(page).all_links():
            assert not link.startswith(("http:", "https:", "//")), f"{page}: {link}"


def test_comparison_scripts_inline_only(comparison: Path) -> None:
    for page in all_pages(comparison):
        for name, attrs in parse(page).tags:
            assert name != "link", page
            if name == "script":
                assert "src" not in attrs, page


def test_comparison_escapes_hostile_concept(comparison: Path) -> None:
    for page in all_pages(comparison):
        assert HOSTILE_CONCEPT not in page.read_text(encoding="utf-8"), page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in comparison.read_text(encoding="utf-8")


def test_comparison_has_three_charts(comparison: Path) -> None:
    tags = [name for name, _ in parse(comparison).tags]
    assert tags.count("svg") == 3
    assert tags.count("polyline") == 4  # 2 runs x (mean line + mammography share line)


def test_comparison_lists_runs_and_fingerprints(comparison: Path) -> None:
    text = " ".join(parse(comparison).text)
    for fact in ("run-a model", "run-b model", "f" * 12, "soft_wpmi", "analysis-test"):
        assert fact in text, fact


def test_comparison_gained_and_lost(comparison: Path) -> None:
    html = comparison.read_text(encoding="utf-8")
    assert 'class="pill lost">aircraft (1)' in html
    assert 'class="pill gained">fatty tissue (1)' in html


def test_comparison_changed_units_linked(comparison: Path) -> None:
    hrefs = parse(comparison).attribute_values("a", "href")
    assert "run-1/layer-1.html#unit-3" in hrefs
    assert "run-2/layer-1.html#unit-3" in hrefs
    assert "run-1/layer-1.html#unit-2" not in hrefs  # unit 2 of late keeps its label


def test_comparison_coverage_never_list(comparison: Path) -> None:
    html = comparison.read_text(encoding="utf-8")
    never = re.search(r"Never the top concept.*?</p>", html, flags=re.DOTALL)
    assert never is not None
    assert "spiculated mass" in never.group(0)
    assert "calcification" in never.group(0)
    assert "fatty tissue" not in never.group(0)


def test_comparison_mismatch_rejected(tmp_path: Path, database: Path, image_paths: list[Path]) -> None:
    with Store(database) as store:
        write_comparison_run(store, "run-p", image_paths, source="run-b", probe_fingerprint="0" * 64)
    with pytest.raises(ComparisonError, match="probe"):
        render_comparison(database, ["run-a", "run-p"], tmp_path / "out")


def test_comparison_mismatch_warning_shown(tmp_path: Path, database: Path, image_paths: list[Path]) -> None:
    with Store(database) as store:
        write_comparison_run(store, "run-p", image_paths, source="run-b", probe_fingerprint="0" * 64)
    index = render_comparison(database, ["run-a", "run-p"], tmp_path / "out", strict=False)
    html = index.read_text(encoding="utf-8")
    assert 'class="warnings"' in html
    assert "different probe sets" in html


def test_comparison_similarity_warning(tmp_path: Path, database: Path, image_paths: list[Path]) -> None:
    with Store(database) as store:
        write_comparison_run(store, "run-w", image_paths, source="run-b", similarity="wpmi")
    index = render_comparison(database, ["run-a", "run-w"], tmp_path / "out")
    assert "different similarity functions" in index.read_text(encoding="utf-8")


def test_render_report_list_compares(tmp_path: Path, database: Path) -> None:
    index = render_report(database, ["run-a", "run-b"], tmp_path / "out")
    assert (index.parent / "run-2" / "index.html").is_file()


def test_render_report_single_has_charts(tmp_path: Path, database: Path) -> None:
    index = render_report(database, "run-a", tmp_path / "out")
    tags = [name for name, _ in parse(index).tags]
    assert tags.count("svg") == 3


def test_comparison_leaves_database_unchanged(tmp_path: Path, database: Path) -> None:
    before = hashlib.sha256(database.read_bytes()).hexdigest()
    render_comparison(database, ["run-a", "run-b"], tmp_path / "out")
    assert hashlib.sha256(database.read_bytes()).hexdigest() == before


def test_layer_page_data_attributes(comparison: Path) -> None:
    rows = [attrs for name, attrs in parse(comparison.parent / "run-1" / "layer-0.html").tags if name == "tr" and "data-unit" in attrs]
    assert [row["data-concept"] for row in rows] == ["aircraft", "fatty tissue", HOSTILE_CONCEPT, "spiculated mass"]
    assert [row["data-score"] for row in rows] == ["0.75", "0.5", "0.5", "0.25"]


def test_layer_page_filters_hidden_without_script(comparison: Path) -> None:
    forms = [attrs for name, attrs in parse(comparison.parent / "run-1" / "layer-0.html").tags if name == "form"]
    assert forms and "hidden" in forms[0]


# ---------------------------------------------------------------- activation maps


def add_activation_maps(database: Path, run_id: str) -> None:
    """Create the activation-map table if needed and store a 4 x 4 map for every top image of layer 0."""
    with Store(database) as store:
        _, rows = store.query(
            "SELECT layer_id, unit, rank FROM unit_top_images WHERE run_id = ? AND layer_id = 0", [run_id]
        )
        for layer_id, unit, rank in rows:
            values = [float(index) for index in range(16)]
            store.query(
                "INSERT INTO unit_activation_maps VALUES (?, ?, ?, ?, ?, ?, ?)",
                [run_id, layer_id, unit, rank, 4, 4, values],
            )


def test_overlay_images_written(tmp_path: Path, database: Path) -> None:
    add_activation_maps(database, "run-a")
    index = render_report(database, "run-a", tmp_path / "out")
    overlays = sorted((index.parent / "overlays").glob("*.png"))
    assert len(overlays) == 8  # 4 units x 2 top images of layer 0
    sources = parse(index.parent / "layer-0.html").attribute_values("img", "src")
    assert all(source.startswith("overlays/") for source in sources)


def test_overlay_absent_plain_thumbnails(tmp_path: Path, database: Path) -> None:
    add_activation_maps(database, "run-a")
    index = render_report(database, "run-a", tmp_path / "out")
    sources = parse(index.parent / "layer-1.html").attribute_values("img", "src")
    assert sources
    assert all(source.startswith("images/") for source in sources)


def test_overlay_heatmap_size_and_mode() -> None:
    image = Image.fromarray(np.full((20, 16), 100, dtype=np.uint8))
    result = overlay_heatmap(image, np.arange(6, dtype=np.float32).reshape(2, 3))
    assert result.mode == "RGB"
    assert result.size == (16, 20)


def test_overlay_heatmap_hot_region_coloured() -> None:
    image = Image.fromarray(np.full((8, 8), 100, dtype=np.uint8))
    activation = np.zeros((2, 2), dtype=np.float32)
    activation[0, 0] = 1.0
    pixels = np.asarray(overlay_heatmap(image, activation, opacity=1.0)).astype(int)
    hot = pixels[0, 0]
    cold = pixels[7, 7]
    assert hot[0] > 200 and hot[1] > 200  # the ramp's pale yellow end
    assert (cold == 100).all()  # zero activation leaves the image unchanged


def test_overlay_constant_map_unchanged() -> None:
    image = Image.fromarray(np.full((4, 4), 50, dtype=np.uint8))
    pixels = np.asarray(overlay_heatmap(image, np.ones((3, 3))))
    assert (pixels == 50).all()


def test_overlay_rejects_bad_maps() -> None:
    image = Image.new("L", (4, 4))
    with pytest.raises(ValueError, match="2-D"):
        overlay_heatmap(image, np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        normalise_map(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="opacity"):
        overlay_heatmap(image, np.zeros((2, 2)), opacity=2.0)


# ---------------------------------------------------------------- chart geometry


def test_nice_ticks_cover_range() -> None:
    ticks = nice_ticks(0.31, 0.69)
    assert ticks[0] <= 0.31
    assert ticks[-1] >= 0.69
    assert len(ticks) <= 7


def test_line_chart_breaks_at_missing() -> None:
    chart = line_chart(["a", "b", "c"], [{"name": "r", "colour": "#000", "values": [1.0, None, 2.0]}])
    assert len(chart["lines"][0]["segments"]) == 2
    assert len(chart["lines"][0]["points"]) == 2


def test_line_chart_higher_value_higher_point() -> None:
    chart = line_chart(["a", "b"], [{"name": "r", "colour": "#000", "values": [0.2, 0.8]}])
    first, second = chart["lines"][0]["points"]
    assert second["y"] < first["y"]


def test_stacked_bars_fill_plot() -> None:
    chart = stacked_bar_chart(["l1"], ["run"], {("l1", "run"): [("x", 1), ("y", 3)]}, {"x": "#111", "y": "#222"})
    rects = chart["bars"][0]["rects"]
    plot = chart["plot"]
    assert sum(rect["height"] for rect in rects) == pytest.approx(plot["bottom"] - plot["top"], abs=0.2)
    assert rects[1]["height"] == pytest.approx(3 * rects[0]["height"], abs=0.2)


def test_stacked_bars_empty_bar() -> None:
    chart = stacked_bar_chart(["l1"], ["a", "b"], {("l1", "a"): [("x", 2)]}, {"x": "#111"})
    assert chart["bars"][1]["rects"] == []
    assert chart["bars"][1]["total"] == 0


# ---------------------------------------------------------------- end to end


def test_two_tiny_runs_compared(tiny_registry: object, tiny_config: dict, tmp_path: Path) -> None:
    from mammo_dissect.core.config import load_config
    from mammo_dissect.core.pipeline import run

    first = run(load_config(None, data=dict(tiny_config)), registry=tiny_registry, progress=False)
    second_config = dict(tiny_config, name="tiny, other seed", seed=7)
    second = run(load_config(None, data=second_config), registry=tiny_registry, progress=False)
    index = render_comparison(Path(tiny_config["database"]), [first.run_id, second.run_id], tmp_path / "report")
    parser = parse(index)
    assert [name for name, _ in parser.tags].count("svg") == 3
    for page in all_pages(index):
        for source in parse(page).attribute_values("img", "src"):
            assert (page.parent / source).is_file(), f"{page}: {source}"

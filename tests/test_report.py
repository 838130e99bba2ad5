"""Tests of the HTML report: content, escaping, offline links, thumbnails and pages."""

from __future__ import annotations

import hashlib
import logging
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mammo_dissect.core.errors import StoreError
from mammo_dissect.core.errors import UnknownNameError
from mammo_dissect.core.report import THUMBNAIL_SIZE
from mammo_dissect.core.report import render_report
from mammo_dissect.tests.store_fixtures import HOSTILE_CONCEPT
from mammo_dissect.tests.store_fixtures import LAYER_NAMES
from mammo_dissect.tests.store_fixtures import UNITS_PER_LAYER
from mammo_dissect.tests.store_fixtures import make_database
from mammo_dissect.tests.store_fixtures import write_probe_images


class PageParser(HTMLParser):
    """Collect the tags with their attributes and the text of one HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def attribute_values(self, tag: str, attribute: str) -> list[str]:
        return [attrs[attribute] or "" for name, attrs in self.tags if name == tag and attribute in attrs]

    def all_links(self) -> list[str]:
        return [
            value or ""
            for _, attrs in self.tags
            for key, value in attrs.items()
            if key in ("src", "href", "srcset", "action", "data")
        ]


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


@pytest.fixture
def image_paths(tmp_path: Path) -> list[Path]:
    return write_probe_images(tmp_path / "probe")


@pytest.fixture
def database(tmp_path: Path, image_paths: list[Path]) -> Path:
    return make_database(tmp_path / "results.duckdb", image_paths)


@pytest.fixture
def report(tmp_path: Path, database: Path) -> Path:
    return render_report(database, "run-a", tmp_path / "report")


def pages(index: Path) -> list[Path]:
    return sorted(index.parent.glob("*.html"))


def test_report_returns_index(report: Path) -> None:
    assert report.name == "index.html"
    assert report.is_file()


def test_report_one_page_per_layer(report: Path) -> None:
    assert len(pages(report)) == 1 + len(LAYER_NAMES)


def test_report_links_no_external_url(report: Path) -> None:
    for page in pages(report):
        for link in parse(page).all_links():
            assert not link.startswith(("http:", "https:", "//")), f"{page.name} links to {link}"


def test_report_text_no_external_url(report: Path) -> None:
    for page in pages(report):
        html = page.read_text(encoding="utf-8")
        assert "http://" not in html, page.name
        assert "https://" not in html, page.name


def test_report_no_script_or_stylesheet_link(report: Path) -> None:
    for page in pages(report):
        parser = parse(page)
        assert "link" not in {name for name, _ in parser.tags}, page.name
        assert parser.attribute_values("script", "src") == [], page.name


def test_report_escapes_concept_text(report: Path) -> None:
    for page in pages(report):
        assert HOSTILE_CONCEPT not in page.read_text(encoding="utf-8"), page.name


def test_report_shows_escaped_concept(report: Path) -> None:
    html = (report.parent / "layer-0.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_report_img_sources_exist(report: Path) -> None:
    sources = [
        (page, source) for page in pages(report) for source in parse(page).attribute_values("img", "src")
    ]
    assert sources
    for page, source in sources:
        assert (page.parent / source).is_file(), f"{page.name}: missing {source}"


def test_report_one_thumbnail_per_image(report: Path, image_paths: list[Path]) -> None:
    assert len(list((report.parent / "images").glob("*.png"))) == len(image_paths)


def test_report_thumbnail_max_side(tmp_path: Path, image_paths: list[Path], database: Path) -> None:
    Image.fromarray(np.zeros((400, 300), dtype=np.uint8)).save(image_paths[0])
    index = render_report(database, "run-a", tmp_path / "report")
    with Image.open(index.parent / "images" / "image-000000.png") as thumbnail:
        assert max(thumbnail.size) == THUMBNAIL_SIZE


def test_report_index_lists_each_layer(report: Path) -> None:
    parser = parse(report)
    links = parser.attribute_values("a", "href")
    text = " ".join(parser.text)
    for layer_id, name in enumerate(LAYER_NAMES):
        assert f"layer-{layer_id}.html" in links, name
        assert name in text, name


def test_report_layer_pages_list_units(report: Path) -> None:
    for layer_id, n_units in enumerate(UNITS_PER_LAYER):
        rows = [
            attrs for tag, attrs in parse(report.parent / f"layer-{layer_id}.html").tags
            if tag == "tr" and (attrs.get("id") or "").startswith("unit-")
        ]
        assert len(rows) == n_units, f"layer {layer_id}"


def test_report_captions_show_patient_and_view(report: Path) -> None:
    text = " ".join(parse(report.parent / "layer-0.html").text)
    assert "P0 · L CC" in text


def test_report_summary_facts(report: Path) -> None:
    text = " ".join(parse(report).text)
    facts = (
        "run-a",
        "completed",
        "f" * 64,
        "wpmi",
        "higher is more similar",
        "synthetic (4 concepts)",
        "timm:resnet18",
        "annotation",
        "224",
    )
    for fact in facts:
        assert fact in text, fact


def test_report_layer_share_above_null(report: Path) -> None:
    text = " ".join(parse(report).text)
    assert "66.7 %" in text


def test_report_missing_image_placeholder(
    tmp_path: Path, image_paths: list[Path], database: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image_paths[0].unlink()
    with caplog.at_level(logging.WARNING, logger="mammo_dissect.core.report"):
        index = render_report(database, "run-a", tmp_path / "report")
    assert "image file missing" in (index.parent / "layer-0.html").read_text(encoding="utf-8")
    assert str(image_paths[0]) in caplog.text


def test_report_missing_image_no_broken_img(tmp_path: Path, image_paths: list[Path], database: Path) -> None:
    image_paths[0].unlink()
    index = render_report(database, "run-a", tmp_path / "report")
    for page in pages(index):
        for source in parse(page).attribute_values("img", "src"):
            assert (page.parent / source).is_file(), f"{page.name}: missing {source}"


def test_report_paginates_long_layers(tmp_path: Path, database: Path) -> None:
    index = render_report(database, "run-a", tmp_path / "report", units_per_page=2)
    assert (index.parent / "layer-1-page-2.html").is_file()
    assert not (index.parent / "layer-1-page-3.html").exists()


def test_report_pages_split_units(tmp_path: Path, database: Path) -> None:
    index = render_report(database, "run-a", tmp_path / "report", units_per_page=3)
    first = parse(index.parent / "layer-1.html")
    second = parse(index.parent / "layer-1-page-2.html")
    rows = [
        attrs["id"] for parser in (first, second) for tag, attrs in parser.tags
        if tag == "tr" and (attrs.get("id") or "").startswith("unit-")
    ]
    assert rows == [f"unit-{unit}" for unit in range(UNITS_PER_LAYER[1])]


def test_report_leaves_database_unchanged(tmp_path: Path, database: Path) -> None:
    before = hashlib.sha256(database.read_bytes()).hexdigest()
    render_report(database, "run-a", tmp_path / "report")
    assert hashlib.sha256(database.read_bytes()).hexdigest() == before


def test_report_latest_run_default(tmp_path: Path, image_paths: list[Path]) -> None:
    path = make_database(tmp_path / "two.duckdb", image_paths, run_ids=("run-a", "run-b"))
    index = render_report(path, None, tmp_path / "report")
    assert "run-b" in " ".join(parse(index).text)


def test_report_unknown_run(tmp_path: Path, database: Path) -> None:
    with pytest.raises(UnknownNameError, match="run-a"):
        render_report(database, "nope", tmp_path / "report")


def test_report_missing_database(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not found"):
        render_report(tmp_path / "none.duckdb", "run-a", tmp_path / "report")

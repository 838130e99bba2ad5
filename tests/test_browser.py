"""Open the rendered reports in headless Chromium, offline, and check what a reader sees.

These tests need Debian's ``chromium`` (``/usr/bin/chromium``) and the Python
package ``playwright``; the browser that ``playwright install`` would download
is never used.  They are marked ``browser`` and skip when either is missing,
except under ``CI=true``, where they fail instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from mammo_dissect.core.report import render_comparison
from mammo_dissect.core.report import render_report
from mammo_dissect.tests.analysis_fixtures import HOSTILE_CONCEPT
from mammo_dissect.tests.analysis_fixtures import make_comparison_database
from mammo_dissect.tests.store_fixtures import write_probe_images


pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def require_browser() -> Any:
    """Return playwright's sync API, or skip (fail under CI=true) when it or Chromium is missing."""
    in_ci = os.environ.get("CI", "").lower() == "true"
    missing = []
    if not CHROMIUM.is_file() and shutil.which("chromium") is None:
        missing.append("Debian chromium (apt-get install -y chromium)")
    try:
        from playwright import sync_api
    except ImportError:
        sync_api = None
        missing.append("the Python package playwright (pip install playwright)")
    if missing:
        message = "browser tests need " + " and ".join(missing)
        if in_ci:
            pytest.fail(message + "; CI=true, so this is an error")
        pytest.skip(message)
    return sync_api


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Any:
    sync_api = require_browser()
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("browser-report")
    images = write_probe_images(folder / "probe")
    database = make_comparison_database(folder / "runs.duckdb", images)
    return render_comparison(database, ["run-a", "run-b"], folder / "report")


class OfflinePage:
    """A page whose requests other than file: and data: are recorded and aborted."""

    def __init__(self, context: Any) -> None:
        self.blocked: list[str] = []
        self.page = context.new_page()
        self.page.route("**/*", self._route)

    def _route(self, route: Any) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def open(self, path: Path) -> Any:
        self.page.goto(path.as_uri())
        self.page.wait_for_load_state("load")
        return self.page


def broken_images(page: Any) -> list[str]:
    return page.eval_on_selector_all(
        "img", "images => images.filter(image => !(image.complete && image.naturalWidth > 0)).map(image => image.src)"
    )


def test_comparison_page_offline(browser: Any, comparison: Path) -> None:
    offline = OfflinePage(browser)
    page = offline.open(comparison)
    assert page.locator("svg").count() == 3
    assert offline.blocked == []
    offline.page.close()


def test_comparison_page_screenshot(browser: Any, comparison: Path, tmp_path: Path) -> None:
    offline = OfflinePage(browser)
    page = offline.open(comparison)
    screenshot = tmp_path / "comparison.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"comparison report screenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000
    offline.page.close()


def test_comparison_escapes_hostile_concept(browser: Any, comparison: Path) -> None:
    offline = OfflinePage(browser)
    page = offline.open(comparison)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.reload()
    assert HOSTILE_CONCEPT in page.inner_text("body")
    assert dialogs == []
    offline.page.close()


@pytest.mark.parametrize("run_folder", ["run-1", "run-2"])
def test_layer_pages_images_load(browser: Any, comparison: Path, run_folder: str, tmp_path: Path) -> None:
    offline = OfflinePage(browser)
    for layer_page in sorted((comparison.parent / run_folder).glob("layer-*.html")):
        page = offline.open(layer_page)
        assert page.locator("img").count() > 0, layer_page.name
        assert broken_images(page) == [], layer_page.name
    screenshot = tmp_path / f"{run_folder}-layer.png"
    offline.page.screenshot(path=str(screenshot), full_page=True)
    print(f"layer page screenshot: {screenshot}")
    assert offline.blocked == []
    offline.page.close()


def test_layer_page_filter_script(browser: Any, comparison: Path) -> None:
    offline = OfflinePage(browser)
    page = offline.open(comparison.parent / "run-1" / "layer-0.html")
    assert page.locator("#filters").is_visible()
    page.fill("#filters input[name=concept]", "aircraft")
    visible = page.eval_on_selector_all("tr[data-unit]", "rows => rows.filter(row => !row.hidden).length")
    assert visible == 1
    page.select_option("#filters select[name=sort]", "score")
    page.fill("#filters input[name=concept]", "")
    order = page.eval_on_selector_all("tr[data-unit]", "rows => rows.map(row => row.dataset.unit)")
    assert order[0] == "0"
    offline.page.close()


def test_single_run_report_offline(browser: Any, comparison: Path, tmp_path: Path) -> None:
    database = comparison.parent.parent / "runs.duckdb"
    index = render_report(database, "run-b", tmp_path / "single")
    offline = OfflinePage(browser)
    page = offline.open(index)
    assert broken_images(page) == []
    assert page.locator("svg").count() == 3
    assert offline.blocked == []
    offline.page.close()

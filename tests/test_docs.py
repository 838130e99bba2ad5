"""Documentation that names tests or files must not drift from the code."""

from __future__ import annotations

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_failure_case_tests_exist():
    text = (ROOT / "docs" / "failure-cases.md").read_text()
    references = re.findall(r"`(test_[a-z0-9_]+\.py)::(test_[a-z0-9_]+)`", text)
    assert references
    for file_name, test_name in references:
        source = (ROOT / "tests" / file_name).read_text()
        assert f"def {test_name}(" in source, f"{file_name}::{test_name}"


def test_readme_docs_links_exist():
    text = (ROOT / "README.md").read_text()
    for path in re.findall(r"`(docs/[a-z-]+\.md)`", text):
        assert (ROOT / path).is_file(), path

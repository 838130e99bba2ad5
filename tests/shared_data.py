"""Locate the data sets kept next to the repository in ``../shared/data``.

The folder is not part of the repository.  Tests that need it call
:func:`shared_data_dir`: on a developer machine without it they are skipped,
but when the environment variable ``CI`` is ``true`` they fail, so that a CI
job cannot pass by skipping every real-data test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


#: ``../shared/data`` next to the repository root.
SHARED_DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def running_in_ci() -> bool:
    """Return whether the environment variable ``CI`` is ``true`` (any case)."""
    return os.environ.get("CI", "").strip().lower() == "true"


def shared_data_dir(*parts: str) -> Path:
    """Return ``../shared/data/<parts>``, or skip the calling test when it does not exist.

    When ``CI=true`` a missing folder fails the test instead of skipping it.
    """
    path = SHARED_DATA_ROOT.joinpath(*parts)
    if path.exists():
        return path
    message = (
        f"shared test data not found: {path}; these tests need the data sets that sit next to the "
        "repository in ../shared/data"
    )
    if running_in_ci():
        pytest.fail(f"{message} (CI=true, so a missing folder is a failure, not a skip)")
    pytest.skip(message)

"""Shared fixtures: plugin loading switched off, tiny models and synthetic probe sets."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Entry-point plugins are not loaded under tests, so the suite never
    # depends on what else is installed in the environment.
    sys._called_from_test = True  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    if hasattr(sys, "_called_from_test"):
        del sys._called_from_test


@pytest.fixture(autouse=True)
def fresh_registry():
    """Give every test a registry built from scratch and forget it afterwards."""
    from mammo_dissect.core import plugins

    plugins.set_registry(None)
    yield
    plugins.set_registry(None)


@pytest.fixture
def tiny_registry():
    """A registry with the built-ins plus the tiny test plugins, installed process-wide."""
    from mammo_dissect.core import plugins
    from mammo_dissect.tests import tiny_plugins

    registry = plugins.Registry(plugins.create_manager(extra_plugins=[tiny_plugins], load_entry_points=False))
    plugins.set_registry(registry)
    return registry


@pytest.fixture
def synthetic_probe(tmp_path: Path) -> Path:
    """Write 40 labelled 24x24 grey PNGs: bright images are 'bright', others 'dark'.

    Half of the images also carry a 'striped' pattern.  Labels go to labels.json.
    """
    from mammo_dissect.tests.tiny_plugins import write_synthetic_probe_set

    return write_synthetic_probe_set(tmp_path / "probe", count=40, seed=0)


@pytest.fixture
def tiny_config(tmp_path: Path, synthetic_probe: Path) -> dict:
    """A raw run configuration for the tiny target on the synthetic probe set."""
    return {
        "name": "tiny",
        "probe_set": {"name": "synthetic", "options": {"root": str(synthetic_probe)}},
        "target": {"loader": "tiny-cnn", "layers": ["features.0", "features[2]", "head"]},
        "dissector": {"name": "annotation"},
        "concept_set": {"name": "annotations"},
        "similarity": {"name": "soft_wpmi", "params": {"top_k": 10}},
        "top_n": 3,
        "top_k_images": 4,
        "permutations": 5,
        "batch_size": 7,
        "cache_dir": str(tmp_path / "cache"),
        "database": str(tmp_path / "runs.duckdb"),
    }


def random_matrix(rows: int, columns: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, columns)).astype(np.float32)

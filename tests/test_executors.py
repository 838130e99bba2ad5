"""Executors and sharding: the Ray executor and sharded runs give the labels of a local run."""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import duckdb
import numpy as np
import pytest

from mammo_dissect.core import plugins
from mammo_dissect.core.config import load_config
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.pipeline import run
from mammo_dissect.core.sharding import ShardError
from mammo_dissect.core.sharding import extract_shard
from mammo_dissect.core.sharding import ingest
from mammo_dissect.core.sharding import parse_shard
from mammo_dissect.core.sharding import shard_range
from mammo_dissect.tests.shared_data import running_in_ci


LABELS_QUERY = "SELECT layer_id, unit, rank, concept_id, score FROM unit_labels ORDER BY ALL"
IMAGES_QUERY = "SELECT layer_id, unit, rank, image_index FROM unit_top_images ORDER BY ALL"


def run_config(config: dict, registry: plugins.Registry, **changes: object):
    data = copy.deepcopy(config)
    data.update(changes)
    return run(load_config(None, data=data), registry, progress=False)


def rows(database: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(database), read_only=True) as con:
        return con.execute(sql).fetchall()


def activations(outcome) -> dict[str, np.ndarray]:
    return {name: np.load(path) for name, path in outcome.activation_files.items()}


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize(("text", "expected"), [("1/1", (1, 1)), ("2/8", (2, 8)), (" 8 / 8 ", (8, 8))])
def test_parse_shard_accepts(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("0/8", "between 1 and 8"),
    ("9/8", "between 1 and 8"),
    ("1/0", "at least 1"),
    ("2-8", "INDEX/COUNT"),
    ("a/b", "INDEX/COUNT"),
    ("", "INDEX/COUNT"),
])
def test_parse_shard_rejects(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_shard(text)


def test_shard_ranges_cover_images_once():
    for n_images in (1, 7, 40, 41):
        for count in range(1, min(n_images, 9) + 1):
            ranges = [shard_range(index, count, n_images) for index in range(1, count + 1)]
            assert ranges[0][0] == 0
            assert ranges[-1][1] == n_images
            assert all(previous[1] == current[0] for previous, current in zip(ranges, ranges[1:]))
            assert all(stop > start for start, stop in ranges)


def test_sharded_run_matches_unsharded(tiny_config, tiny_registry, tmp_path):
    plain = run_config(tiny_config, tiny_registry, cache_dir=str(tmp_path / "plain-cache"),
                       database=str(tmp_path / "plain.duckdb"))
    config = load_config(None, data=copy.deepcopy(tiny_config))
    for index in (1, 2, 3):
        extract_shard(config, index, 3, tiny_registry, progress=False)
    ingested = ingest(config, tiny_registry, progress=False)
    sharded = run_config(tiny_config, tiny_registry)

    assert [layer.layer.name for layer in ingested] == list(plain.activation_files)
    assert rows(sharded.database, LABELS_QUERY) == rows(plain.database, LABELS_QUERY)
    assert rows(sharded.database, IMAGES_QUERY) == rows(plain.database, IMAGES_QUERY)
    expected = activations(plain)
    for name, array in activations(sharded).items():
        np.testing.assert_array_equal(array, expected[name])


def test_run_after_ingest_extracts_nothing(tiny_config, tiny_registry, monkeypatch):
    config = load_config(None, data=copy.deepcopy(tiny_config))
    for index in (1, 2):
        extract_shard(config, index, 2, tiny_registry, progress=False)
    ingest(config, tiny_registry, progress=False)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run extracted activations although ingest cached every layer")

    monkeypatch.setattr("mammo_dissect.core.activations.extract_activations", fail)
    outcome = run_config(tiny_config, tiny_registry)
    assert rows(outcome.database, "SELECT count(*) FROM runs WHERE status = 'completed'") == [(1,)]


def test_ingest_lists_missing_shards(tiny_config, tiny_registry):
    config = load_config(None, data=copy.deepcopy(tiny_config))
    extract_shard(config, 2, 4, tiny_registry, progress=False)
    with pytest.raises(ShardError, match=r"3 of 4 shards are missing or unfinished .*: 1/4, 3/4, 4/4"):
        ingest(config, tiny_registry, progress=False)


def test_ingest_without_shards(tiny_config, tiny_registry):
    config = load_config(None, data=copy.deepcopy(tiny_config))
    with pytest.raises(ShardError, match="no finished shards"):
        ingest(config, tiny_registry, progress=False)


def test_ingest_rejects_mixed_shard_counts(tiny_config, tiny_registry):
    config = load_config(None, data=copy.deepcopy(tiny_config))
    extract_shard(config, 1, 2, tiny_registry, progress=False)
    extract_shard(config, 1, 3, tiny_registry, progress=False)
    with pytest.raises(ShardError, match="2 different shard counts"):
        ingest(config, tiny_registry, progress=False)


def test_more_shards_than_images(tiny_config, tiny_registry):
    config = load_config(None, data=copy.deepcopy(tiny_config))
    with pytest.raises(ConfigError, match="at most 40 shards"):
        extract_shard(config, 1, 41, tiny_registry, progress=False)


# ---------------------------------------------------------------- Ray executor


def require_ray() -> None:
    """Skip the calling test when Ray Data is missing; fail instead when ``CI=true``."""
    if importlib.util.find_spec("ray") is not None:
        return
    message = 'Ray is not installed; install it with pip install "mammo-dissect[ray]" to run the Ray executor tests'
    if running_in_ci():
        pytest.fail(f"{message} (CI=true, so a missing Ray is a failure, not a skip)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray with 2 CPUs bound to 127.0.0.1, shut down after this module's tests."""
    require_ray()
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_registry():
    """A registry with the built-ins (the ray executor among them) and the tiny test plugins."""
    from mammo_dissect.tests import tiny_plugins

    registry = plugins.Registry(plugins.create_manager(extra_plugins=[tiny_plugins], load_entry_points=False))
    plugins.set_registry(registry)
    return registry


RAY_EXECUTOR = {"name": "ray", "options": {"num_cpus": 2, "concurrency": 1}}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_ray_executor_matches_local(local_ray, tiny_config, ray_registry, tmp_path):
    local = run_config(tiny_config, ray_registry, cache_dir=str(tmp_path / "local-cache"),
                       database=str(tmp_path / "local.duckdb"))
    distributed = run_config(tiny_config, ray_registry, executor=RAY_EXECUTOR, batch_size=5)

    assert rows(distributed.database, LABELS_QUERY) == rows(local.database, LABELS_QUERY)
    assert rows(distributed.database, IMAGES_QUERY) == rows(local.database, IMAGES_QUERY)
    expected = activations(local)
    for name, array in activations(distributed).items():
        np.testing.assert_array_equal(array, expected[name])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_ray_worker_error_reaches_driver(local_ray, tiny_config, ray_registry, synthetic_probe):
    (synthetic_probe / "img007.png").write_bytes(b"not a png at all")
    with pytest.raises(ProbeSetError) as error:
        run_config(tiny_config, ray_registry, executor=RAY_EXECUTOR)
    assert "img007.png" in str(error.value)
    assert rows(Path(tiny_config["database"]), "SELECT status FROM runs") == [("failed",)]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_ray_executor_rejects_unknown_option(local_ray, tiny_config, ray_registry):
    executor = {"name": "ray", "options": {"actors": 2}}
    with pytest.raises(ConfigError, match="executor.options.actors: unknown field"):
        run_config(tiny_config, ray_registry, executor=executor)


def test_ray_actors_need_spare_cpu(tiny_config, ray_registry):
    require_ray()
    executor = {"name": "ray", "options": {"num_cpus": 2, "concurrency": 2}}
    with pytest.raises(ConfigError, match="leave at least one CPU"):
        run_config(tiny_config, ray_registry, executor=executor)


def test_ray_missing_names_install_command(monkeypatch):
    import builtins

    from mammo_dissect.plugins.executors.ray_executor import RayExecutorError
    from mammo_dissect.plugins.executors.ray_executor import import_ray

    real_import = builtins.__import__

    def no_ray(name: str, *args: object, **kwargs: object) -> object:
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(RayExecutorError, match=r'pip install "mammo-dissect\[ray\]"'):
        import_ray()


def tiny_actor(tiny_registry, synthetic_probe):
    """Return a Ray extraction actor built in this process (no Ray needed) for the tiny CNN."""
    from mammo_dissect.core.types import validate_options
    from mammo_dissect.plugins.executors.ray_executor import ExtractionActor

    reader = tiny_registry.get("probe set", "synthetic")
    probe_set = reader.load(validate_options(reader.Options, {"root": str(synthetic_probe)}, "probe_set.options"))
    return ExtractionActor(
        ["mammo_dissect.tests.tiny_plugins"], "tiny-cnn", {}, ["features.0", "head"], probe_set, "avg", "cpu", "float32"
    )


def test_ray_actor_halves_batch_on_oom(tiny_registry, synthetic_probe):
    import torch

    actor = tiny_actor(tiny_registry, synthetic_probe)
    batch = {"id": np.arange(8)}
    expected = actor(batch)
    original = actor.model
    sizes = []

    def limited(images):
        sizes.append(images.shape[0])
        if images.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(images)

    actor.model = limited
    split = actor(batch)
    assert sizes == [8, 4, 2, 2, 4, 2, 2]
    for column, values in expected.items():
        assert list(split[column]) == list(values), column


def test_ray_actor_oom_on_one_image_raises(tiny_registry, synthetic_probe):
    import torch

    actor = tiny_actor(tiny_registry, synthetic_probe)

    def no_memory(images):
        raise torch.OutOfMemoryError("CUDA out of memory")

    actor.model = no_memory
    with pytest.raises(torch.OutOfMemoryError):
        actor({"id": np.arange(2)})


def test_ray_actor_other_errors_not_retried(tiny_registry, synthetic_probe):
    actor = tiny_actor(tiny_registry, synthetic_probe)
    sizes = []

    def broken(images):
        sizes.append(images.shape[0])
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    actor.model = broken
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        actor({"id": np.arange(4)})
    assert sizes == [4]

"""Content-addressed caches, resuming after a crash, and batch-size fallback on out-of-memory."""

from __future__ import annotations

import copy
import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

from mammo_dissect.core.cache import ArrayCache
from mammo_dissect.core.config import load_config
from mammo_dissect.core.pipeline import run


LABELS = "SELECT layer_id, unit, rank, concept_id, score FROM unit_labels ORDER BY ALL"


def run_tiny(config: dict, registry, **kwargs):
    return run(load_config(None, data=copy.deepcopy(config)), registry, progress=False, **kwargs)


def labels(database) -> list[tuple]:
    with duckdb.connect(str(database), read_only=True) as con:
        return con.execute(LABELS).fetchall()


def with_database(config: dict, path: Path) -> dict:
    return dict(config, database=str(path))


def test_second_run_reuses_activations(tiny_config, tiny_registry, tmp_path, caplog):
    first = run_tiny(tiny_config, tiny_registry)
    caplog.set_level(logging.INFO, logger="mammo_dissect")
    second = run_tiny(with_database(tiny_config, tmp_path / "second.duckdb"), tiny_registry)
    assert caplog.text.count("reusing cached activations") == 3
    assert labels(first.database) == labels(second.database)


def test_changed_pooling_recomputes(tiny_config, tiny_registry, tmp_path, caplog):
    run_tiny(tiny_config, tiny_registry)
    config = copy.deepcopy(tiny_config)
    config["target"]["pooling"] = "max"
    caplog.set_level(logging.INFO, logger="mammo_dissect")
    run_tiny(with_database(config, tmp_path / "max.duckdb"), tiny_registry)
    assert "reusing cached activations" not in caplog.text


def test_changed_image_recomputes(tiny_config, tiny_registry, synthetic_probe, tmp_path, caplog):
    from PIL import Image

    run_tiny(tiny_config, tiny_registry)
    Image.new("L", (24, 24), color=200).save(synthetic_probe / "img003.png")
    caplog.set_level(logging.INFO, logger="mammo_dissect")
    run_tiny(with_database(tiny_config, tmp_path / "changed.duckdb"), tiny_registry)
    assert "reusing cached activations" not in caplog.text


def test_changed_concepts_reuse_activations(tiny_config, tiny_registry, tmp_path, caplog):
    run_tiny(tiny_config, tiny_registry)
    concept_file = tmp_path / "c.txt"
    concept_file.write_text("bright\ndark\n")
    config = dict(tiny_config, concept_set={"name": "text", "options": {"path": str(concept_file)}})
    caplog.set_level(logging.INFO, logger="mammo_dissect")
    run_tiny(with_database(config, tmp_path / "c.duckdb"), tiny_registry)
    assert caplog.text.count("reusing cached activations") == 3


def test_corrupt_entry_recomputed(tiny_config, tiny_registry, tmp_path, caplog):
    first = run_tiny(tiny_config, tiny_registry)
    array_file = first.activation_files["features.2"]
    data = bytearray(array_file.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"
    array_file.write_bytes(bytes(data))
    caplog.set_level(logging.INFO, logger="mammo_dissect")
    second = run_tiny(with_database(tiny_config, tmp_path / "second.duckdb"), tiny_registry)
    assert "checksum mismatch" in caplog.text
    assert labels(first.database) == labels(second.database)


def test_truncated_entry_recomputed(tiny_config, tiny_registry, tmp_path, caplog):
    first = run_tiny(tiny_config, tiny_registry)
    array_file = first.activation_files["head"]
    array_file.write_bytes(array_file.read_bytes()[:100])
    caplog.set_level(logging.INFO, logger="mammo_dissect")
    run_tiny(with_database(tiny_config, tmp_path / "second.duckdb"), tiny_registry)
    assert "is invalid (size" in caplog.text


def test_recompute_flag_ignores_cache(tiny_config, tiny_registry, tmp_path, caplog):
    run_tiny(tiny_config, tiny_registry)
    caplog.set_level(logging.INFO, logger="mammo_dissect")
    run_tiny(with_database(tiny_config, tmp_path / "second.duckdb"), tiny_registry, recompute=True)
    assert "reusing cached" not in caplog.text
    assert "(--recompute)" in caplog.text


def test_cache_entries_listed_and_removed(tiny_config, tiny_registry):
    run_tiny(tiny_config, tiny_registry)
    cache = ArrayCache(Path(tiny_config["cache_dir"]))
    entries = cache.entries()
    assert sorted(entry.kind for entry in entries) == ["activation_maps"] * 2 + ["activations"] * 3 + ["scores"] * 3
    assert all(entry.valid for entry in entries)
    assert len(cache.remove(kind="activations")) == 3
    assert len(cache.remove(kind="activation_maps")) == 2
    assert len(cache.remove(kind="scores")) == 3
    assert cache.entries() == []


def test_out_of_memory_halves_batch(tiny_config, tiny_registry, tmp_path, caplog, monkeypatch):
    import torch

    from mammo_dissect.tests import tiny_plugins

    original = tiny_plugins.build_tiny_cnn

    def fragile_cnn(seed: int = 0):
        model = original(seed)
        forward = model.forward

        def limited(x):
            if x.shape[0] > 4:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return forward(x)

        model.forward = limited
        return model

    reference = run_tiny(dict(tiny_config, batch_size=4, cache_dir=str(tmp_path / "c1")), tiny_registry)
    monkeypatch.setattr(tiny_plugins, "build_tiny_cnn", fragile_cnn)
    caplog.set_level(logging.WARNING, logger="mammo_dissect")
    config = dict(tiny_config, batch_size=16, cache_dir=str(tmp_path / "c2"), database=str(tmp_path / "oom.duckdb"))
    outcome = run_tiny(config, tiny_registry)
    assert "retrying with batch size 8" in caplog.text
    assert "retrying with batch size 4" in caplog.text
    assert labels(outcome.database) == labels(reference.database)


SLOW_RUN = """
import sys, time
sys._called_from_test = True
from mammo_dissect.core import plugins, cli
from mammo_dissect.tests import tiny_plugins
plugins.set_registry(plugins.Registry(plugins.create_manager(extra_plugins=[tiny_plugins])))
original = tiny_plugins.SyntheticReader.load
def slow_load(self, options):
    probe = original(self, options)
    read = probe.read
    def slow_read(index):
        if index == 12:
            print("past first batches", flush=True)
        time.sleep({delay})
        return read(index)
    probe.read = slow_read
    return probe
tiny_plugins.SyntheticReader.load = slow_load
cli.main(["-v", "run", {config!r}])
"""


def write_config(tmp_path: Path, config: dict) -> Path:
    from mammo_dissect.tests.test_cli import write_toml

    return write_toml(tmp_path / "run.toml", config)


def test_kill_9_resumes_and_matches(tiny_config, tiny_registry, tmp_path):
    """A run killed with SIGKILL mid-extraction continues from its last batch; labels equal an uninterrupted run."""
    reference = run_tiny(dict(tiny_config, cache_dir=str(tmp_path / "reference-cache"),
                              database=str(tmp_path / "reference.duckdb")), tiny_registry)
    config_path = write_config(tmp_path, tiny_config)
    script = tmp_path / "slow.py"
    script.write_text(textwrap.dedent(SLOW_RUN.format(delay=0.3, config=str(config_path))))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "past first batches"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
    partial = list((Path(tiny_config["cache_dir"]) / "partial").glob("*/progress.json"))
    assert len(partial) == 1, "the killed run left no progress file"

    resumed = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ},
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming extraction at image" in resumed.stderr
    with duckdb.connect(tiny_config["database"], read_only=True) as con:
        statuses = [status for (status,) in con.execute("SELECT status FROM runs ORDER BY created_at").fetchall()]
        resumed_labels = con.execute(
            "SELECT layer_id, unit, rank, concept_id, score FROM unit_labels "
            "WHERE run_id = (SELECT run_id FROM runs WHERE status = 'completed') ORDER BY ALL"
        ).fetchall()
    assert statuses == ["interrupted", "completed"]
    assert resumed_labels == labels(reference.database)


def test_nan_activations_stop_run(tiny_config, tiny_registry, monkeypatch):
    from mammo_dissect.core.extraction import NonFiniteActivationError
    from mammo_dissect.tests import tiny_plugins

    original = tiny_plugins.build_tiny_cnn

    def nan_cnn(seed: int = 0):
        model = original(seed)
        conv = model.features[0]
        forward = conv.forward

        def poisoned(x):
            out = forward(x)
            out[1] = float("nan")  # the second image of every batch
            return out

        conv.forward = poisoned
        return model

    monkeypatch.setattr(tiny_plugins, "build_tiny_cnn", nan_cnn)
    with pytest.raises(NonFiniteActivationError) as error:
        run_tiny(tiny_config, tiny_registry)
    assert "img001" in str(error.value)
    assert "features.0" in str(error.value)
    with duckdb.connect(tiny_config["database"], read_only=True) as con:
        assert con.execute("SELECT status FROM runs").fetchall() == [("failed",)]
        assert con.execute("SELECT count(*) FROM unit_labels").fetchone()[0] == 0


def test_nan_images_dropped_when_configured(tiny_config, tiny_registry, monkeypatch):
    import json

    from mammo_dissect.tests import tiny_plugins

    original = tiny_plugins.build_tiny_cnn

    def nan_cnn(seed: int = 0):
        model = original(seed)
        conv = model.features[0]
        forward = conv.forward

        def poisoned(x):
            out = forward(x)
            if x.shape[0] > 1:
                out[1] = float("nan")  # the second image of every batch of 7
            return out

        conv.forward = poisoned
        return model

    monkeypatch.setattr(tiny_plugins, "build_tiny_cnn", nan_cnn)
    outcome = run_tiny(dict(tiny_config, nonfinite="drop"), tiny_registry)
    with duckdb.connect(str(outcome.database), read_only=True) as con:
        status, extra = con.execute("SELECT status, extra FROM runs").fetchone()
        top_ids = {row[0] for row in con.execute(
            "SELECT p.image_id FROM unit_top_images t JOIN probe_images p USING (run_id, image_index)"
        ).fetchall()}
        finite_scores = con.execute("SELECT count(*) FROM unit_labels WHERE NOT isfinite(score)").fetchone()[0]
    dropped = set(json.loads(extra)["dropped_images"])
    assert status == "completed"
    assert dropped == {"img001", "img008", "img015", "img022", "img029", "img036"}
    assert not dropped & top_ids
    assert finite_scores == 0

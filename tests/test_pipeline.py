"""End-to-end runs of the pipeline on the tiny target and the synthetic probe set."""

from __future__ import annotations

import copy
from pathlib import Path

import duckdb
import numpy as np
import pytest

from mammo_dissect.core.config import load_config
from mammo_dissect.core.errors import ConceptSetError
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.errors import LayerError
from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.errors import UnknownNameError
from mammo_dissect.core.pipeline import run


def run_tiny(config: dict, registry) -> object:
    return run(load_config(None, data=copy.deepcopy(config)), registry, progress=False)


def rows(database: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(database), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_run_stores_top_n_for_every_unit(tiny_config, tiny_registry):
    outcome = run_tiny(tiny_config, tiny_registry)
    counts = rows(outcome.database, "SELECT layer_id, count(*) FROM unit_labels GROUP BY 1 ORDER BY 1")
    # features.0: 4 units, features.2: 6 units, head: 3 units; top_n = 3
    assert counts == [(0, 12), (1, 18), (2, 9)]


def test_run_stores_top_images_in_activation_order(tiny_config, tiny_registry):
    outcome = run_tiny(tiny_config, tiny_registry)
    activations = rows(
        outcome.database,
        "SELECT activation FROM unit_top_images WHERE layer_id = 1 AND unit = 0 ORDER BY rank",
    )
    values = [value for (value,) in activations]
    assert len(values) == 4
    assert values == sorted(values, reverse=True)


def test_run_top_images_match_activations(tiny_config, tiny_registry):
    outcome = run_tiny(tiny_config, tiny_registry)
    stored = np.load(outcome.activation_files["features.2"])
    expected = np.argsort(-stored[:, 3], kind="stable")[:4]
    found = [index for (index,) in rows(
        outcome.database, "SELECT image_index FROM unit_top_images WHERE layer_id = 1 AND unit = 3 ORDER BY rank"
    )]
    assert sorted(found) == sorted(expected.tolist())


def test_run_status_completed(tiny_config, tiny_registry):
    outcome = run_tiny(tiny_config, tiny_registry)
    assert rows(outcome.database, "SELECT status FROM runs") == [("completed",)]


def test_run_records_config_and_similarity(tiny_config, tiny_registry):
    outcome = run_tiny(tiny_config, tiny_registry)
    (similarity, params, n_concepts), = rows(
        outcome.database, "SELECT similarity, similarity_params, n_concepts FROM runs"
    )
    assert similarity == "soft_wpmi"
    assert '"top_k": 10' in params
    assert n_concepts == 4


def test_run_scores_are_finite(tiny_config, tiny_registry):
    outcome = run_tiny(tiny_config, tiny_registry)
    (bad,), = rows(outcome.database, "SELECT count(*) FROM unit_labels WHERE NOT isfinite(score)")
    assert bad == 0


def test_run_keeps_probe_metadata(tiny_config, tiny_registry):
    outcome = run_tiny(tiny_config, tiny_registry)
    (count, patients), = rows(outcome.database, "SELECT count(*), count(DISTINCT patient_id) FROM probe_images")
    assert count == 40
    assert patients == 20


def test_run_p_values_in_unit_interval(tiny_config, tiny_registry):
    outcome = run_tiny(tiny_config, tiny_registry)
    (low, high), = rows(outcome.database, "SELECT min(p_value), max(p_value) FROM unit_scores")
    assert 0 < low <= high <= 1


def test_run_is_deterministic(tiny_config, tiny_registry, tmp_path):
    first = run_tiny(tiny_config, tiny_registry)
    second_config = dict(tiny_config, database=str(tmp_path / "second.duckdb"))
    second = run_tiny(second_config, tiny_registry)
    query = "SELECT layer_id, unit, rank, concept_id, score FROM unit_labels ORDER BY ALL"
    assert rows(first.database, query) == rows(second.database, query)


def test_batch_size_does_not_change_labels(tiny_config, tiny_registry, tmp_path):
    results = []
    for batch_size in (1, 7, 64):
        config = dict(tiny_config, batch_size=batch_size, database=str(tmp_path / f"b{batch_size}.duckdb"))
        outcome = run_tiny(config, tiny_registry)
        results.append(rows(outcome.database, "SELECT layer_id, unit, rank, concept_id FROM unit_labels ORDER BY ALL"))
    assert results[0] == results[1] == results[2]


def test_bright_unit_labelled_bright(tiny_config, tiny_registry):
    # The head's inputs are pooled ReLU features: some unit of features.2 must follow
    # image brightness, and with ground-truth P its top label is 'bright' or 'dark'.
    outcome = run_tiny(tiny_config, tiny_registry)
    labels = rows(
        outcome.database,
        "SELECT DISTINCT concept FROM labels WHERE layer = 'features.2' AND rank = 0",
    )
    assert {"bright", "dark"} & {label for (label,) in labels}


def test_two_runs_share_one_database(tiny_config, tiny_registry):
    run_tiny(tiny_config, tiny_registry)
    outcome = run_tiny(tiny_config, tiny_registry)
    assert rows(outcome.database, "SELECT count(*) FROM runs") == [(2,)]


def test_unknown_layer_lists_close_names(tiny_config, tiny_registry):
    config = copy.deepcopy(tiny_config)
    config["target"]["layers"] = ["features.9", "heda"]
    with pytest.raises(LayerError) as error:
        run_tiny(config, tiny_registry)
    assert "'heda' (closest: head" in str(error.value)


def test_unknown_layer_creates_no_database(tiny_config, tiny_registry):
    config = copy.deepcopy(tiny_config)
    config["target"]["layers"] = ["nope"]
    with pytest.raises(LayerError):
        run_tiny(config, tiny_registry)
    assert not Path(config["database"]).exists()


def test_unknown_plugin_name_lists_known(tiny_config, tiny_registry):
    config = copy.deepcopy(tiny_config)
    config["similarity"]["name"] = "soft-wpmi"
    with pytest.raises(UnknownNameError) as error:
        run_tiny(config, tiny_registry)
    assert "closest: soft_wpmi" in str(error.value)


def test_top_k_larger_than_probe_set(tiny_config, tiny_registry):
    config = copy.deepcopy(tiny_config)
    config["similarity"]["params"]["top_k"] = 100
    with pytest.raises(ConfigError) as error:
        run_tiny(config, tiny_registry)
    assert "needs at least 100 probe images" in str(error.value)


def test_top_k_images_larger_than_probe_set(tiny_config, tiny_registry):
    config = dict(tiny_config, top_k_images=41)
    with pytest.raises(ConfigError) as error:
        run_tiny(config, tiny_registry)
    assert "top_k_images=41" in str(error.value)


def test_unknown_similarity_param(tiny_config, tiny_registry):
    config = copy.deepcopy(tiny_config)
    config["similarity"]["params"]["topk"] = 5
    with pytest.raises(ConfigError) as error:
        run_tiny(config, tiny_registry)
    assert "unknown parameter(s) topk" in str(error.value)


def test_empty_concept_file(tiny_config, tiny_registry, tmp_path):
    concept_file = tmp_path / "empty.txt"
    concept_file.write_text("\n \r\n\n")
    config = dict(tiny_config, concept_set={"name": "text", "options": {"path": str(concept_file)}})
    with pytest.raises(ConceptSetError) as error:
        run_tiny(config, tiny_registry)
    assert "empty" in str(error.value)


def test_missing_image_fails_before_run(tiny_config, tiny_registry, synthetic_probe):
    (synthetic_probe / "img005.png").unlink()
    with pytest.raises(ProbeSetError) as error:
        run_tiny(tiny_config, tiny_registry)
    assert "img005.png" in str(error.value)


def test_unreadable_image_marks_run_failed(tiny_config, tiny_registry, synthetic_probe):
    (synthetic_probe / "img007.png").write_bytes(b"not a png at all")
    with pytest.raises(ProbeSetError) as error:
        run_tiny(tiny_config, tiny_registry)
    assert "img007.png" in str(error.value)
    database = Path(tiny_config["database"])
    assert rows(database, "SELECT status FROM runs") == [("failed",)]
    assert rows(database, "SELECT count(*) FROM unit_labels") == [(0,)]


def test_concept_file_blank_line_does_not_shift_labels(tiny_config, tiny_registry, tmp_path):
    concept_file = tmp_path / "concepts.txt"
    concept_file.write_bytes(b"bright\r\n\r\ndark\r\nstriped\r\nBright\r\nplain\r\n")
    config = dict(tiny_config, concept_set={"name": "text", "options": {"path": str(concept_file)}})
    outcome = run_tiny(config, tiny_registry)
    texts = rows(outcome.database, "SELECT text FROM concepts ORDER BY concept_id")
    assert texts == [("bright",), ("dark",), ("striped",), ("plain",)]


def test_shared_module_called_twice_is_rejected(tiny_config, tiny_registry):
    import torch

    from mammo_dissect.core.extraction import extract_activations
    from mammo_dissect.core.extraction import resolve_layers
    from mammo_dissect.core.pipeline import prepare

    plan = prepare(load_config(None, data=copy.deepcopy(tiny_config)), tiny_registry, progress=False)
    shared = torch.nn.Identity()
    original = plan.target.model.forward
    plan.target.model.shared = shared
    plan.target.model.forward = lambda x: original(shared(shared(x)))
    with pytest.raises(LayerError) as error:
        extract_activations(plan.target, resolve_layers(plan.target.model, ["shared"]), plan.probe_set,
                            plan.runtime, "avg", plan.cache.root / "test-extract")
    assert "more than once per forward pass" in str(error.value)


def test_every_config_field_documented():
    from mammo_dissect.core.config import RunConfig
    from mammo_dissect.core.config import TargetConfig

    docs = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    for field in RunConfig.model_fields:
        assert f"`{field}`" in docs or f"## [{field}]" in docs, field
    for field in TargetConfig.model_fields:
        assert f"`{field}`" in docs, field


def test_stored_config_has_plugin_defaults(tiny_config, tiny_registry):
    import json

    outcome = run_tiny(tiny_config, tiny_registry)
    (config,), = rows(outcome.database, "SELECT config FROM runs")
    stored = json.loads(config)
    assert stored["target"]["options"] == {"seed": 0, "size": 16}
    assert stored["similarity"]["params"]["p_start"] == 0.998
    assert stored["dissector"]["options"] == {"require_annotated": False}


def test_config_file_paths_relative_to_file(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "run.toml").write_text(
        'database = "out/db.duckdb"\n'
        '[probe_set]\nname = "folder"\noptions = { root = "images" }\n'
        '[target]\nloader = "timm"\nlayers = ["a"]\n'
        '[dissector]\nname = "annotation"\n[concept_set]\nname = "annotations"\n'
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(folder / "run.toml", ['probe_set.options.root="elsewhere"'])
    assert config.database == folder / "out" / "db.duckdb"
    assert config.probe_set.options["root"] == str(tmp_path / "elsewhere")


def test_folder_probe_with_annotation_dissector_rejected_early(tiny_config, tiny_registry, synthetic_probe):
    config = dict(tiny_config, probe_set={"name": "folder", "options": {"root": str(synthetic_probe)}})
    config["concept_set"] = {"name": "mammography-basic"}
    with pytest.raises(ProbeSetError) as error:
        run_tiny(config, tiny_registry)
    assert "has no annotations" in str(error.value)
    assert not Path(tiny_config["database"]).exists()


def test_bfloat16_labels_agree_with_float32(tiny_config, tiny_registry, tmp_path):
    exact = run_tiny(tiny_config, tiny_registry)
    mixed = run_tiny(dict(tiny_config, precision="bfloat16", database=str(tmp_path / "bf16.duckdb")), tiny_registry)
    query = "SELECT layer_id, unit, concept_id FROM unit_labels WHERE rank = 0 ORDER BY layer_id, unit"
    first, second = rows(exact.database, query), rows(mixed.database, query)
    agreement = sum(a == b for a, b in zip(first, second)) / len(first)
    assert agreement >= 0.9
    assert exact.activation_files["head"] != mixed.activation_files["head"], "precision must be part of the cache key"


def test_top_images_per_patient_limit(tiny_config, tiny_registry):
    outcome = run_tiny(dict(tiny_config, top_images_per_patient=1), tiny_registry)
    (worst,), = rows(
        outcome.database,
        """
        SELECT max(n) FROM (
            SELECT t.layer_id, t.unit, p.patient_id, count(*) AS n
            FROM unit_top_images t JOIN probe_images p USING (run_id, image_index)
            GROUP BY ALL
        )
        """,
    )
    assert worst == 1


def test_top_images_per_patient_fills_when_few_patients():
    import torch

    from mammo_dissect.core.scoring import top_images_per_patient

    A = torch.tensor([[5.0], [4.0], [3.0], [2.0]])
    values, indices = top_images_per_patient(A, 3, 1, ["p1", "p1", "p2", "p2"])
    assert indices[:, 0].tolist() == [0, 2, 1]
    assert values[:, 0].tolist() == [5.0, 3.0, 4.0]


def test_activation_maps_stored_for_top_images(tiny_config, tiny_registry):
    import torch

    outcome = run_tiny(tiny_config, tiny_registry)
    (count, height, width), = rows(
        outcome.database,
        "SELECT count(*), max(height), max(width) FROM unit_activation_maps WHERE layer_id = 1",
    )
    assert count == 6 * 4
    assert (height, width) == (16, 16)
    (index,), = rows(outcome.database,
                     "SELECT image_index FROM unit_top_images WHERE layer_id = 1 AND unit = 2 AND rank = 0")
    (stored,), = rows(outcome.database,
                      "SELECT activation_map FROM unit_activation_maps WHERE layer_id = 1 AND unit = 2 AND rank = 0")
    from mammo_dissect.core.config import load_config
    from mammo_dissect.core.pipeline import prepare

    plan = prepare(load_config(None, data=copy.deepcopy(tiny_config)), tiny_registry, progress=False)
    image = plan.target.preprocess(plan.probe_set.read(index)).unsqueeze(0)
    with torch.no_grad():
        features = plan.target.model.features[:3](image)[0, 2]
    assert np.allclose(np.array(stored).reshape(16, 16), features.numpy(), atol=1e-5)


def test_no_activation_maps_when_disabled(tiny_config, tiny_registry):
    outcome = run_tiny(dict(tiny_config, activation_map_size=0), tiny_registry)
    assert rows(outcome.database, "SELECT count(*) FROM unit_activation_maps") == [(0,)]


def test_run_config_rejects_duplicate_layers(tiny_config):
    from mammo_dissect.core.config import load_config
    from mammo_dissect.core.errors import ConfigError

    tiny_config["target"]["layers"] = ["head", "features.0", "head"]
    with pytest.raises(ConfigError, match="layers listed more than once: head"):
        load_config(None, data=tiny_config)

"""Mask IoU of units with segmentation masks: synthetic units equal to masks, errors, and a small DDSM-66 run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest

from mammo_dissect.core.config import load_config
from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.images import ImagePreprocess
from mammo_dissect.core.mask_dissection import MASK_CONCEPTS
from mammo_dissect.core.mask_dissection import mask_iou_run
from mammo_dissect.core.mask_dissection import new_sampler
from mammo_dissect.core.masks import activation_threshold
from mammo_dissect.core.masks import label_mask
from mammo_dissect.core.masks import mask_iou
from mammo_dissect.core.pipeline import run
from mammo_dissect.core.types import LoadedTarget
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import ProbeImage
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import ProbeSetReader
from mammo_dissect.core.types import TargetLoader
from mammo_dissect.tests.shared_data import shared_data_dir


SIZE = 64
POOL = 4
N_IMAGES = 6
#: Label value of each mask unit of the synthetic model, in unit order.
UNIT_LABELS = (255, 192, 128)


# ---------------------------------------------------------------- synthetic plugins


def synthetic_labels(index: int) -> np.ndarray:
    """Return a 64 x 64 label image whose regions lie on 4-pixel blocks and shift with ``index``."""
    labels = np.full((SIZE, SIZE), 128, dtype=np.uint8)
    labels[:, 52:] = 64
    shift = 4 * index
    labels[0:24, shift : shift + 24] = 255
    labels[32:56, 8:40] = 192
    return labels


def build_mask_model() -> Any:
    """A model whose layer ``full`` has one unit per tissue, equal to that tissue's mask, plus a grey-value unit.

    ``pooled`` is ``full`` averaged over 4 x 4 blocks, so its maps need upsampling.
    """
    import torch
    from torch import nn

    class MaskUnits(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            values = torch.round(x * 255)
            units = [(values == label).float() for label in UNIT_LABELS]
            return torch.cat([*units, x], dim=1)

    class MaskModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.full = MaskUnits()
            self.pooled = nn.AvgPool2d(POOL)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pooled(self.full(x)).mean(dim=(2, 3))

    return MaskModel().eval()


class MaskModelLoader(TargetLoader):
    name = "mask-model"
    description = "units equal to tissue masks (tests only)"
    Options = Options

    def load(self, options: Options) -> LoadedTarget:
        return LoadedTarget(
            model=build_mask_model(),
            preprocess=ImagePreprocess(size=(SIZE, SIZE), mean=(0.0,), std=(1.0,), channels=1),
            spec="mask-model",
        )


class MaskedOptions(Options):
    root: str


class MaskedReader(ProbeSetReader):
    """Reads PNG images with label images, listed in ``root/images.json``."""

    name = "masked-synthetic"
    description = "PNG images with label images (tests only)"
    Options = MaskedOptions

    def load(self, options: Options) -> ProbeSet:
        assert isinstance(options, MaskedOptions)
        root = Path(options.root)
        listing = json.loads((root / "images.json").read_text())
        images = [
            ProbeImage(
                image_id=name,
                path=root / f"{name}.png",
                metadata={"patient_id": name, "mask_path": str(root / f"{name}_LI.png")},
                annotations=("pectoral muscle", "fatty tissue") if index % 2 else ("fibroglandular tissue",),
            )
            for index, name in enumerate(listing)
        ]
        return ProbeSet(reader=self.name, root=root, images=images, annotation_vocabulary=list(MASK_CONCEPTS.values()))


@hookimpl
def register_target_loaders(register: Any) -> None:
    register(MaskModelLoader())


@hookimpl
def register_probe_sets(register: Any) -> None:
    register(MaskedReader())


@pytest.fixture
def mask_registry() -> Any:
    from mammo_dissect.core import plugins

    manager = plugins.create_manager(extra_plugins=[sys.modules[__name__]], load_entry_points=False)
    registry = plugins.Registry(manager)
    plugins.set_registry(registry)
    return registry


def write_masked_probe_set(root: Path) -> list[np.ndarray]:
    """Write the images (grey value = label value) and their label images; return the label images."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    names = []
    all_labels = []
    for index in range(N_IMAGES):
        labels = synthetic_labels(index)
        name = f"img{index}"
        Image.fromarray(labels).save(root / f"{name}.png")
        Image.fromarray(labels).save(root / f"{name}_LI.png")
        names.append(name)
        all_labels.append(labels)
    (root / "images.json").write_text(json.dumps(names))
    return all_labels


def masked_config(tmp_path: Path, root: Path) -> dict[str, Any]:
    return {
        "name": "masks",
        "probe_set": {"name": "masked-synthetic", "options": {"root": str(root)}},
        "target": {"loader": "mask-model", "layers": ["full", "pooled"]},
        "dissector": {"name": "annotation"},
        "concept_set": {"name": "annotations"},
        "similarity": {"name": "soft_wpmi", "params": {"top_k": 3}},
        "top_n": 2,
        "top_k_images": 2,
        "permutations": 0,
        "batch_size": 4,
        "cache_dir": str(tmp_path / "cache"),
        "database": str(tmp_path / "runs.duckdb"),
    }


def stored_rows(database: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(database, read_only=True) as con:
        return con.execute(
            "SELECT layer_id, unit, concept, iou, threshold, quantile FROM unit_mask_iou ORDER BY layer_id, unit, concept"
        ).fetchall()


# ---------------------------------------------------------------- tests


def test_unit_equal_to_mask_scores_one(tmp_path: Path, mask_registry: Any) -> None:
    root = tmp_path / "probe"
    write_masked_probe_set(root)
    config = load_config(None, data=masked_config(tmp_path, root))
    outcome = run(config, mask_registry, progress=False)

    # Quantile 0.4: each tissue covers less than 60 % of the pixels, so the threshold
    # of a mask unit is 0 and the binarised map is the mask itself.
    summaries = mask_iou_run(config.database, outcome.run_id, quantile=0.4, registry=mask_registry)

    assert [summary["layer"] for summary in summaries] == ["full", "pooled"]
    assert summaries[0]["n_units"] == 4
    assert summaries[0]["n_images"] == N_IMAGES
    with duckdb.connect(str(config.database), read_only=True) as con:
        full = dict(
            ((unit, concept), iou)
            for unit, concept, iou in con.execute(
                "SELECT unit, concept, iou FROM unit_mask_iou WHERE layer_id = 0"
            ).fetchall()
        )
        top = con.execute(
            "SELECT layer, unit, concept, iou FROM top_mask_labels WHERE layer_id = 1 ORDER BY unit"
        ).fetchall()
    for unit, label in enumerate(UNIT_LABELS):
        concept = MASK_CONCEPTS[label]
        assert full[(unit, concept)] == pytest.approx(1.0)
        others = [iou for (row_unit, other), iou in full.items() if row_unit == unit and other != concept]
        assert max(others) < 0.3
    for unit, label in enumerate(UNIT_LABELS):
        assert top[unit][0] == "pooled"
        assert top[unit][2] == MASK_CONCEPTS[label]
        assert top[unit][3] > 0.7


def test_pooled_layer_matches_reference_iou(tmp_path: Path, mask_registry: Any) -> None:
    import torch

    root = tmp_path / "probe"
    all_labels = write_masked_probe_set(root)
    config = load_config(None, data=masked_config(tmp_path, root))
    outcome = run(config, mask_registry, progress=False)
    quantile = 0.9
    mask_iou_run(config.database, outcome.run_id, quantile=quantile, registry=mask_registry)

    images = torch.from_numpy(np.stack(all_labels).astype(np.float32) / 255.0).unsqueeze(1)
    model = build_mask_model()
    maps = model.pooled(model.full(images)).numpy()  # [N, units, 16, 16]
    rows = [row for row in stored_rows(str(config.database)) if row[0] == 1]
    assert len(rows) == 4 * len(MASK_CONCEPTS)
    for _, unit, concept, iou, threshold, stored_quantile in rows:
        label = next(value for value, text in MASK_CONCEPTS.items() if text == concept)
        masks = np.stack([label_mask(labels, label) for labels in all_labels])
        expected_threshold = activation_threshold(maps[:, unit], quantile)
        assert threshold == pytest.approx(expected_threshold, abs=1e-6)
        assert iou == pytest.approx(mask_iou(maps[:, unit], masks, threshold=expected_threshold), abs=1e-9)
        assert stored_quantile == quantile


def test_rerun_replaces_rows(tmp_path: Path, mask_registry: Any) -> None:
    root = tmp_path / "probe"
    write_masked_probe_set(root)
    config = load_config(None, data=masked_config(tmp_path, root))
    outcome = run(config, mask_registry, progress=False)
    mask_iou_run(config.database, outcome.run_id, quantile=0.4, registry=mask_registry)
    mask_iou_run(config.database, outcome.run_id[:10], quantile=0.9, registry=mask_registry)
    rows = stored_rows(str(config.database))
    assert len(rows) == 2 * 4 * len(MASK_CONCEPTS)
    assert {row[5] for row in rows} == {0.9}


def test_probe_set_without_masks_rejected(tiny_config: dict, tiny_registry: Any) -> None:
    config = load_config(None, data=tiny_config)
    outcome = run(config, tiny_registry, progress=False)
    with pytest.raises(ProbeSetError, match=r"without metadata\['mask_path'\].*ddsm-seg66"):
        mask_iou_run(config.database, outcome.run_id, registry=tiny_registry)


@pytest.mark.parametrize("quantile", [0.0, 1.0, 1.5])
def test_invalid_quantile_rejected(tmp_path: Path, quantile: float) -> None:
    from mammo_dissect.core.errors import ConfigError

    with pytest.raises(ConfigError, match="quantile must be between 0 and 1"):
        mask_iou_run(tmp_path / "none.duckdb", "x", quantile=quantile)


def test_sampler_exact_within_budget() -> None:
    import torch

    maps = torch.from_numpy(np.random.default_rng(0).standard_normal((10, 3, 8, 8)).astype(np.float32))
    sampler = new_sampler(0.995, 10, 3, 8, 8, budget_bytes=1 << 20, device="cpu")
    assert not sampler.sampled
    sampler.add(maps[:4])
    sampler.add(maps[4:])
    for unit, threshold in enumerate(sampler.thresholds()):
        assert threshold == pytest.approx(activation_threshold(maps[:, unit].numpy(), 0.995), abs=1e-6)


def test_sampler_over_budget_samples_positions() -> None:
    import torch

    maps = torch.from_numpy(np.random.default_rng(1).random((200, 2, 32, 32)).astype(np.float32))
    # 200 * 1024 values at quantile 0.9 need 20480 kept per unit; 4 KiB for 2 units keeps 512.
    sampler = new_sampler(0.9, 200, 2, 32, 32, budget_bytes=4096, device="cpu")
    assert sampler.sampled
    assert sampler.keep <= 512
    sampler.add(maps)
    for unit, threshold in enumerate(sampler.thresholds()):
        assert threshold == pytest.approx(activation_threshold(maps[:, unit].numpy(), 0.9), abs=0.02)


def test_ddsm_seg66_efficientnet_lite0(tmp_path: Path) -> None:
    root = shared_data_dir("ddsm-seg66")
    config = load_config(None, data={
        "name": "ddsm mask iou",
        "probe_set": {"name": "ddsm-seg66", "options": {"root": str(root), "splits": ["test"]}},
        "target": {"loader": "efficientnet-lite", "options": {"model": "efficientnet-lite0"}, "layers": ["_blocks.4"]},
        "dissector": {"name": "annotation"},
        "concept_set": {"name": "annotations"},
        "similarity": {"name": "soft_wpmi", "params": {"top_k": 3}},
        "top_n": 2,
        "top_k_images": 2,
        "permutations": 0,
        "batch_size": 6,
        "cache_dir": str(tmp_path / "cache"),
        "database": str(tmp_path / "runs.duckdb"),
    })
    outcome = run(config, progress=False)
    assert outcome.n_images == 6
    started = time.monotonic()
    summaries = mask_iou_run(config.database, outcome.run_id)
    elapsed = time.monotonic() - started

    assert len(summaries) == 1
    summary = summaries[0]
    assert summary["layer"] == "_blocks.4"
    assert summary["n_units"] == 40
    assert 0.0 < summary["mean_best_iou"] <= 1.0
    assert 0 <= summary["n_units_above_cut"] <= 40
    assert sum(summary["best_concept_units"].values()) == 40
    rows = stored_rows(str(config.database))
    assert len(rows) == 40 * 3
    assert {row[2] for row in rows} == set(MASK_CONCEPTS.values())
    assert all(0.0 <= row[3] <= 1.0 for row in rows)
    with duckdb.connect(str(config.database), read_only=True) as con:
        best = con.execute("SELECT avg(iou), count(*) FROM top_mask_labels").fetchone()
    assert best[1] == 40
    assert best[0] == pytest.approx(summary["mean_best_iou"])
    assert elapsed < 20, f"mask IoU of 6 images took {elapsed:.1f} s"


def test_mask_iou_command(tmp_path: Path, capsys) -> None:
    from mammo_dissect.core import cli

    root = shared_data_dir("ddsm-seg66")
    config = load_config(None, data={
        "probe_set": {"name": "ddsm-seg66", "options": {"root": str(root), "splits": ["test"]}},
        "target": {"loader": "efficientnet-lite", "options": {"model": "efficientnet-lite0"}, "layers": ["_blocks.2"]},
        "dissector": {"name": "annotation"},
        "concept_set": {"name": "annotations"},
        "similarity": {"name": "soft_wpmi", "params": {"top_k": 3}},
        "top_k_images": 2,
        "permutations": 0,
        "activation_map_size": 0,
        "cache_dir": str(tmp_path / "cache"),
        "database": str(tmp_path / "runs.duckdb"),
    })
    outcome = run(config, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["-q", "mask-iou", str(config.database), "--run", outcome.run_id])
        raise SystemExit(0)
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "layer _blocks.2: 24 units over 6 images" in out
    assert "table unit_mask_iou" in out

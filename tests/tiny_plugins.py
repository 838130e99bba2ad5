"""Tiny plugins used by the test suite: a small CNN target and a synthetic labelled probe set.

They are registered through the same hooks as built-in and third-party
plugins, which also exercises the plugin contract.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.images import ImagePreprocess
from mammo_dissect.core.types import LoadedTarget
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import ProbeImage
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import ProbeSetReader
from mammo_dissect.core.types import TargetDescription
from mammo_dissect.core.types import TargetLoader


SYNTHETIC_CONCEPTS = ["bright", "dark", "striped", "plain"]


BUILD_LOCK = threading.Lock()


def build_tiny_cnn(seed: int = 0) -> Any:
    """A 1-channel CNN: conv, in-place ReLU, conv, ReLU, pool, linear head (3 outputs)."""
    import torch
    from torch import nn

    # The lock keeps the seeded global generator to one builder, so runs in threads get the same weights.
    with BUILD_LOCK:
        torch.manual_seed(seed)
        model = nn.Module()
        model.features = nn.Sequential(
            nn.Conv2d(1, 4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(4, 6, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )
        model.pool = nn.AdaptiveAvgPool2d(1)
        model.head = nn.Linear(6, 3)

    def forward(x: Any) -> Any:
        return model.head(model.pool(model.features(x)).flatten(1))

    model.forward = forward
    return model.eval()


class TinyOptions(Options):
    seed: int = 0
    size: int = 16


class TinyCnnLoader(TargetLoader):
    name = "tiny-cnn"
    description = "a 1-channel CNN with seeded random weights (tests only)"
    Options = TinyOptions

    def load(self, options: Options) -> LoadedTarget:
        assert isinstance(options, TinyOptions)
        return LoadedTarget(
            model=build_tiny_cnn(options.seed),
            preprocess=ImagePreprocess(size=(options.size, options.size), mean=(0.5,), std=(0.25,), channels=1),
            spec=f"tiny-cnn seed {options.seed}",
        )

    def describe(self, options: Options, file_sha256: Any) -> TargetDescription:
        assert isinstance(options, TinyOptions)
        return TargetDescription(
            preprocess=ImagePreprocess(size=(options.size, options.size), mean=(0.5,), std=(0.25,), channels=1),
            spec=f"tiny-cnn seed {options.seed}",
        )


class SyntheticOptions(Options):
    root: str


class SyntheticReader(ProbeSetReader):
    """Reads PNGs from ``root`` with their labels from ``root/labels.json``."""

    name = "synthetic"
    description = "PNG files with labels.json (tests only)"
    Options = SyntheticOptions

    def load(self, options: Options) -> ProbeSet:
        assert isinstance(options, SyntheticOptions)
        root = Path(options.root)
        labels = json.loads((root / "labels.json").read_text())
        images = [
            ProbeImage(
                image_id=name.rsplit(".", 1)[0],
                path=root / name,
                metadata={"patient_id": f"p{index // 2}", "view": "CC", "laterality": "L" if index % 2 else "R"},
                annotations=tuple(labels[name]),
            )
            for index, name in enumerate(sorted(labels))
        ]
        return ProbeSet(reader=self.name, root=root, images=images, annotation_vocabulary=list(SYNTHETIC_CONCEPTS))


def write_synthetic_probe_set(root: Path, count: int, seed: int) -> Path:
    """Write ``count`` 24x24 grey PNGs with known labels and return ``root``."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = {}
    for index in range(count):
        bright = index % 2 == 0
        striped = (index // 2) % 2 == 0
        base = 0.75 if bright else 0.25
        image = base + 0.05 * rng.standard_normal((24, 24))
        if striped:
            image[::4] += 0.2
        pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
        name = f"img{index:03d}.png"
        Image.fromarray(pixels).save(root / name)
        labels[name] = ["bright" if bright else "dark", "striped" if striped else "plain"]
    (root / "labels.json").write_text(json.dumps(labels))
    return root


@hookimpl
def register_target_loaders(register: Any) -> None:
    register(TinyCnnLoader())


@hookimpl
def register_probe_sets(register: Any) -> None:
    register(SyntheticReader())

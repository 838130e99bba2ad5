"""The study's setups G, M and C ship as configuration presets that validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from mammo_dissect.core.config import load_config
from mammo_dissect.core.errors import MammoDissectError
from mammo_dissect.core.plugins import get_registry
from mammo_dissect.core.types import validate_options


PRESETS = sorted((Path(__file__).resolve().parents[1] / "examples" / "presets").glob("*.toml"))
SECTIONS = {
    "probe_set": "probe set",
    "dissector": "dissector",
    "concept_set": "concept set",
}


@pytest.mark.parametrize("path", PRESETS, ids=[path.stem for path in PRESETS])
def test_preset_options_validate(path):
    config = load_config(path)
    registry = get_registry()
    for section, kind in SECTIONS.items():
        choice = getattr(config, section)
        plugin = registry.get(kind, choice.name)
        validate_options(plugin.Options, choice.options, f"{section}.options")
    loader = registry.get("target loader", config.target.loader)
    validate_options(loader.Options, config.target.options, "target.options")
    assert config.dissector.name == "mammo_clip"


@pytest.mark.parametrize("path", PRESETS, ids=[path.stem for path in PRESETS])
def test_preset_placeholder_paths_fail_clearly(path):
    from mammo_dissect.core.pipeline import prepare

    with pytest.raises(MammoDissectError) as error:
        prepare(load_config(path, ['device="cpu"']), progress=False)
    assert "PATH" in str(error.value)


def test_three_presets_present():
    assert [path.stem for path in PRESETS] == ["c-classifier", "g-imagenet-b5", "m-mammo-clip"]

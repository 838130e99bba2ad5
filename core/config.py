"""Run configuration: pydantic models loaded from TOML with command-line overrides."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from typing import Literal

import tomllib
from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import ValidationError
from pydantic import field_validator

from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.types import format_validation_error


DEFAULT_CACHE_DIR = Path("~/.cache/mammo-dissect")


class Section(BaseModel):
    """Base of every configuration section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class PluginChoice(Section):
    """A plugin chosen by name, with the options that plugin declares."""

    name: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)


class ProbeSetConfig(PluginChoice):
    """The probe set: reader name and its options (usually ``root``)."""

    #: Use only the first N images (for smoke runs).
    limit: int | None = Field(default=None, ge=1)


class TargetConfig(Section):
    """The target model, the layers to dissect and how their outputs are pooled."""

    loader: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)
    layers: list[str] = Field(min_length=1)
    #: Spatial pooling of 4-D outputs: mean ("avg", CLIP-Dissect's default) or maximum ("max").
    pooling: Literal["avg", "max"] = "avg"

    @field_validator("layers")
    @classmethod
    def _no_duplicate_layers(cls, layers: list[str]) -> list[str]:
        duplicates = sorted({layer for layer in layers if layers.count(layer) > 1})
        if duplicates:
            raise ValueError(f"layers listed more than once: {', '.join(duplicates)}")
        return layers


class SimilarityConfig(Section):
    """The similarity function and the parameters it declares."""

    name: str = "soft_wpmi"
    params: dict[str, Any] = Field(default_factory=dict)


class RunConfig(Section):
    """Everything that defines one dissection run."""

    #: Free-text name shown in reports.
    name: str | None = None
    probe_set: ProbeSetConfig
    target: TargetConfig
    dissector: PluginChoice
    concept_set: PluginChoice
    similarity: SimilarityConfig = Field(default_factory=SimilarityConfig)
    #: Number of top concepts kept per unit.
    top_n: int = Field(default=10, ge=1)
    #: Number of most activating probe images kept per unit.
    top_k_images: int = Field(default=5, ge=1)
    #: Permutations of the image order of A for each layer's null baseline (0 = none).
    permutations: int = Field(default=10, ge=0, le=1000)
    seed: int = 0
    batch_size: int = Field(default=16, ge=1)
    #: Background workers that decode images (0 = decode in the main process).
    num_workers: int = Field(default=0, ge=0)
    #: torch device, for example "cpu", "cuda" or "cuda:1".
    device: str = "cpu"
    cache_dir: Path = DEFAULT_CACHE_DIR
    database: Path = Path("mammo-dissect.duckdb")

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        kind = device.split(":")[0]
        if kind not in ("cpu", "cuda", "mps", "xpu"):
            raise ValueError("device must be cpu, cuda, cuda:N, mps or xpu")
        return device

    def resolved_paths(self, base: Path) -> RunConfig:
        """Return a copy whose relative paths are made absolute against ``base``."""
        data = self.model_dump()
        for key in ("cache_dir", "database"):
            path = Path(data[key]).expanduser()
            data[key] = path if path.is_absolute() else (base / path).resolve()
        for section in ("probe_set", "concept_set", "dissector"):
            _resolve_option_paths(data[section]["options"], base)
        _resolve_option_paths(data["target"]["options"], base)
        return RunConfig.model_validate(data)

    def as_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json_dict(), sort_keys=True).encode()).hexdigest()


#: Option names whose values are file or folder paths, resolved against the config file's folder.
PATH_OPTIONS = ("root", "path", "weights", "descriptions", "model_config", "tokenizer")


def _resolve_option_paths(options: dict[str, Any], base: Path) -> None:
    for key in PATH_OPTIONS:
        value = options.get(key)
        if isinstance(value, str) and value and "://" not in value and not value.startswith("hf-hub:"):
            path = Path(value).expanduser()
            options[key] = str(path if path.is_absolute() else (base / path).resolve())
        elif isinstance(value, list):
            options[key] = [
                str((base / Path(item).expanduser()).resolve()) if isinstance(item, str) and not Path(item).expanduser().is_absolute() else item
                for item in value
            ]


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as TOML when it parses, else as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value, for example similarity.params.top_k=50")
    key, raw = text.split("=", 1)
    parts = [part.strip() for part in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part; write key.path=value")
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a raw configuration dict (in place)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a table in the configuration")
            node = child
        node[parts[-1]] = value
    return data


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, raising :class:`ConfigError` with the position of a syntax error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML in {path}: {exc}") from None


def load_config(path: Path | None, overrides: list[str] | None = None, data: dict[str, Any] | None = None) -> RunConfig:
    """Load and validate a run configuration.

    Relative paths, in the file and in overrides alike, are resolved against
    the file's folder, or against the current directory when there is no file.
    """
    raw = read_toml(path) if path is not None else dict(data or {})
    apply_overrides(raw, list(overrides or []))
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "")) from None
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    return config.resolved_paths(base)

"""Run configuration: pydantic models loaded from TOML with command-line overrides."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any
from typing import Literal

import tomllib
from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import StrictInt
from pydantic import ValidationError
from pydantic import field_validator

from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.types import format_validation_error


DEFAULT_CACHE_DIR = Path("~/.cache/mammo-dissect")


def listed_once(values: list[str], what: str) -> list[str]:
    """Return ``values``, or raise ValueError (for pydantic validators) naming the ones listed twice."""
    duplicates = sorted({value for value in values if values.count(value) > 1})
    if duplicates:
        raise ValueError(f"{what} listed more than once: {', '.join(duplicates)}")
    return values


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
    limit: StrictInt | None = Field(default=None, ge=1)


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
        return listed_once(layers, "layers")


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
    top_n: StrictInt = Field(default=10, ge=1)
    #: Number of most activating probe images kept per unit.
    top_k_images: StrictInt = Field(default=5, ge=1)
    #: Side of the stored activation maps of each unit on its top images (0 = store none).
    activation_map_size: StrictInt = Field(default=16, ge=0, le=64)
    #: Keep at most this many of a unit's top images per patient (None = no limit).
    top_images_per_patient: StrictInt | None = Field(default=None, ge=1)
    #: Permutations of the image order of A for each layer's null baseline (0 = none).
    permutations: StrictInt = Field(default=10, ge=0, le=1000)
    #: Seed of the permutations; layer i uses seed + i (0 to 2**62).
    seed: StrictInt = Field(default=0, ge=0, le=2**62)
    batch_size: StrictInt = Field(default=16, ge=1)
    #: Background workers that decode images (0 = decode in the main process).
    num_workers: StrictInt = Field(default=0, ge=0)
    #: torch device, for example "cpu", "cuda" or "cuda:1".
    device: str = "cpu"
    #: Executor that extracts activations: "local" (in this process) or a plugin's (for example "ray").
    executor: PluginChoice = Field(default_factory=lambda: PluginChoice(name="local"))
    #: Extra memory one similarity call may use when it scores from embeddings, in MiB.
    similarity_memory_mib: StrictInt = Field(default=1024, ge=16)
    #: What to do with images whose activations contain NaN or Inf: stop the run ("fail")
    #: or leave those images out of scoring and record them ("drop").
    nonfinite: Literal["fail", "drop"] = "fail"
    #: Precision of the target's forward passes: "float32" or mixed "bfloat16" (autocast).
    precision: Literal["float32", "bfloat16"] = "float32"
    cache_dir: Path = DEFAULT_CACHE_DIR
    database: Path = Path("mammo-dissect.duckdb")

    @field_validator("cache_dir", "database", mode="before")
    @classmethod
    def _non_empty_path(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty; give a file or folder path")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        kind = device.split(":")[0]
        if kind not in ("cpu", "cuda", "mps", "xpu"):
            raise ValueError("device must be cpu, cuda, cuda:N, mps or xpu")
        return device

    def as_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json_dict(), sort_keys=True).encode()).hexdigest()


#: Option names whose values are file or folder paths.
PATH_OPTIONS = ("root", "path", "weights", "descriptions", "model_config", "tokenizer")
#: Top-level fields that are paths.
PATH_FIELDS = ("cache_dir", "database")
PLUGIN_SECTIONS = ("probe_set", "target", "dissector", "concept_set")


def _resolve_path(value: Any, base: Path) -> Any:
    """Make a relative local path absolute against ``base``; leave URLs and non-strings alone."""
    if not isinstance(value, str) or not value or "://" in value or value.startswith("hf-hub:"):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _resolve_value(key: str, value: Any, base: Path) -> Any:
    if isinstance(value, list) and key in PATH_OPTIONS:
        return [_resolve_path(item, base) for item in value]
    return _resolve_path(value, base)


def resolve_raw_paths(data: dict[str, Any], base: Path) -> None:
    """Resolve the path fields of a raw configuration dict against ``base`` (in place).

    Values of the wrong type are left as they are for validation to report.
    """
    for key in PATH_FIELDS:
        if key in data:
            data[key] = _resolve_path(data[key], base)
    for section in PLUGIN_SECTIONS:
        body = data.get(section)
        options = body.get("options") if isinstance(body, dict) else None
        if isinstance(options, dict):
            for key in PATH_OPTIONS:
                if key in options:
                    options[key] = _resolve_value(key, options[key], base)


def _is_path_key(parts: list[str]) -> bool:
    if len(parts) == 1:
        return parts[0] in PATH_FIELDS
    return len(parts) == 3 and parts[0] in PLUGIN_SECTIONS and parts[1] == "options" and parts[2] in PATH_OPTIONS


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


def apply_overrides(data: dict[str, Any], overrides: list[str], base: Path | None = None) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a raw configuration dict (in place).

    Relative paths given for path fields are resolved against ``base``
    (the current directory when it is None).
    """
    base = base or Path.cwd()
    for text in overrides:
        parts, value = parse_override(text)
        if _is_path_key(parts):
            value = _resolve_value(parts[-1], value, base)
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
        text = Path(path).read_text(encoding="utf-8-sig")
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

    Relative paths in the file are resolved against the file's folder; those
    in ``data`` and in overrides, against the current directory.
    """
    if path is not None:
        raw = read_toml(path)
        resolve_raw_paths(raw, Path(path).resolve().parent)
    else:
        raw = copy.deepcopy(dict(data or {}))
        resolve_raw_paths(raw, Path.cwd())
    apply_overrides(raw, list(overrides or []))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "")) from None

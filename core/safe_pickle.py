"""Restricted loading of full training checkpoints (Mammo-CLIP ``.tar`` and ``.pth`` files).

The published Mammo-CLIP checkpoints are ordinary ``torch.save`` zip files
that hold more than tensors: the optimizer and scheduler state, numpy
arrays and scalars, and the training configuration with omegaconf
``ListConfig`` and ``DictConfig`` objects.  Plain ``torch.load`` would need
omegaconf installed and would run whatever code the pickle names.

:func:`load_checkpoint` uses torch's own ``weights_only=True`` unpickler and
allows, on top of torch's defaults (tensor rebuild functions, storages,
``collections.OrderedDict``, plain builtins), exactly:

- numpy arrays, dtypes and scalars (object arrays are rejected);
- the omegaconf classes, mapped to plain-data stand-ins defined here, so
  omegaconf is never imported;
- ``typing`` and ``builtins`` type names that omegaconf stores as metadata,
  mapped to inert :class:`TypeName` markers;
- ``collections.defaultdict``, mapped to a function that returns a plain dict.

Any other global (``posix.system``, a training script's class, ...) stops
the load with :class:`ModelLoadError` naming it, before anything it names
is called.
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mammo_dissect.core.errors import ModelLoadError
from mammo_dissect.core.weights import sniff_format


logger = logging.getLogger(__name__)

_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")

#: omegaconf value-node classes (omegaconf 2.0 to 2.3); all map to :class:`ConfigValueNode`.
OMEGACONF_NODE_CLASSES = (
    "AnyNode",
    "StringNode",
    "IntegerNode",
    "FloatNode",
    "BooleanNode",
    "EnumNode",
    "PathNode",
    "BytesNode",
    "ValueNode",
    "InterpolationResultNode",
)

#: Type names that omegaconf metadata refers to (``ref_type``, ``object_type``, ``key_type``).
TYPE_NAMES = (
    "typing.Any",
    "typing.List",
    "typing.Dict",
    "typing.Tuple",
    "typing.Optional",
    "typing.Union",
    "builtins.dict",
    "builtins.list",
    "builtins.tuple",
    "builtins.int",
    "builtins.float",
    "builtins.str",
    "builtins.bool",
    "builtins.bytes",
    "builtins.object",
)


# ---------------------------------------------------------------- stand-ins


class TypeName:
    """Inert marker for a type named in a pickle (``typing.Any``, ``builtins.dict``); it cannot be called."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"TypeName({self.name!r})"


class ConfigMetadata:
    """Stand-in for ``omegaconf.base.Metadata`` and ``ContainerMetadata``; the state is dropped."""

    def __setstate__(self, state: Any) -> None:
        # Metadata holds flags, type markers and a back-reference; none of it is configuration data.
        pass


class ConfigValueNode:
    """Stand-in for omegaconf value nodes (``AnyNode``, ``StringNode``, ...); keeps ``_val`` only."""

    value: Any = None

    def __setstate__(self, state: Any) -> None:
        self.value = state.get("_val") if isinstance(state, Mapping) else None


def _plain_value(value: Any) -> Any:
    """Return the configuration value inside a stand-in node, or ``value`` itself."""
    if isinstance(value, ConfigValueNode):
        return value.value
    return value


class ConfigList(list):
    """Stand-in for ``omegaconf.listconfig.ListConfig``: a plain list of its values."""

    def __setstate__(self, state: Any) -> None:
        content = state.get("_content") if isinstance(state, Mapping) else None
        # A missing (``???``) or interpolated list stores a string instead of a list.
        if isinstance(content, list):
            self.extend(_plain_value(item) for item in content)


class ConfigDict(dict):
    """Stand-in for ``omegaconf.dictconfig.DictConfig``: a plain dict of its values."""

    def __setstate__(self, state: Any) -> None:
        content = state.get("_content") if isinstance(state, Mapping) else None
        if isinstance(content, Mapping):
            for key, value in content.items():
                self[key] = _plain_value(value)


def _plain_defaultdict(*args: Any) -> dict:
    """Replace ``collections.defaultdict(factory)`` by an empty dict; the factory is never called."""
    return {}


def _subscript_type(origin: Any, args: Any) -> TypeName:
    """Replace ``operator.getitem(typing.List, (int,))`` by a marker; only markers are accepted."""
    if not isinstance(origin, TypeName):
        raise ModelLoadError(f"unexpected subscript of {origin!r} in a pickled type annotation")
    return TypeName(f"{origin.name}[...]")


def _numpy_dtype(*args: Any) -> Any:
    """Build a numpy dtype, rejecting the object dtype, whose arrays hold pickled objects."""
    import numpy as np

    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise ModelLoadError("the file contains a numpy array of Python objects, which mammo-dissect does not load")
    return dtype


def allowed_globals() -> list[tuple[Any, str]]:
    """Return the ``(object, "module.name")`` pairs added to torch's weights-only allow-list."""
    import numpy as np

    pairs: list[tuple[Any, str]] = [
        (ConfigList, "omegaconf.listconfig.ListConfig"),
        (ConfigDict, "omegaconf.dictconfig.DictConfig"),
        (ConfigMetadata, "omegaconf.base.Metadata"),
        (ConfigMetadata, "omegaconf.base.ContainerMetadata"),
        (_plain_defaultdict, "collections.defaultdict"),
        (_subscript_type, "operator.getitem"),
        (_numpy_dtype, "numpy.dtype"),
        (np.ndarray, "numpy.ndarray"),
    ]
    pairs.extend((ConfigValueNode, f"omegaconf.nodes.{name}") for name in OMEGACONF_NODE_CLASSES)
    pairs.extend((TypeName(name), name) for name in TYPE_NAMES)
    # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core.
    multiarray = _numpy_multiarray()
    _reconstruct = multiarray._reconstruct
    scalar = multiarray.scalar
    for package in ("numpy.core", "numpy._core"):
        pairs.append((_reconstruct, f"{package}.multiarray._reconstruct"))
        pairs.append((scalar, f"{package}.multiarray.scalar"))
    # BUILD on a dtype needs its class (for example numpy.dtypes.Float32DType) allowed.
    for name in dir(np.dtypes):
        cls = getattr(np.dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype) and cls is not np.dtypes.ObjectDType:
            pairs.append((cls, f"numpy.dtypes.{name}"))
    return pairs


def _numpy_multiarray() -> Any:
    """Return numpy's ``multiarray`` module (``numpy._core`` from numpy 2, ``numpy.core`` before)."""
    import importlib

    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


# ---------------------------------------------------------------- loading


def load_checkpoint(path: Path | str, what: str = "checkpoint") -> Any:
    """Load a ``torch.save`` file with the restricted unpickler and return plain data.

    omegaconf containers come back as dicts and lists, numpy values as numpy
    objects, tensors on the CPU.  Raises :class:`ModelLoadError` for an empty,
    truncated, re-packed (tar) or HTML file, and for any global outside the
    allow-list, naming the global.
    """
    import torch

    path = Path(path)
    check_checkpoint_file(path, what)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except ModelLoadError as exc:
        raise ModelLoadError(f"cannot load {what} {path}: {exc}") from exc
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        rejected = rejected_globals(path, exc)
        if rejected:
            raise ModelLoadError(
                f"{what} {path} names Python object(s) that mammo-dissect does not load: "
                f"{', '.join(rejected)}. A weights file needs none of them, so the file may be hostile "
                f"(crafted to run code when unpickled) or written by code other than the model's trainer. "
                f"Nothing from the file was run; do not open it with plain torch.load"
            ) from exc
        raise ModelLoadError(
            f"cannot load {what} {path}: {type(exc).__name__}: {exc}; the file may be truncated or "
            f"damaged, so download it again and compare its size and SHA-256 with the published ones"
        ) from exc
    return to_plain(loaded)


def check_checkpoint_file(path: Path, what: str) -> None:
    """Reject files that are not ``torch.save`` files, by their leading bytes and zip directory."""
    if not path.is_file():
        raise ModelLoadError(f"{what} file not found: {path}; set the option to an existing local file")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{what} {path} is empty (0 bytes); download it again")
    kind = sniff_format(path)
    if kind == "html":
        raise ModelLoadError(
            f"{what} {path} is an HTML or XML page, not a PyTorch checkpoint (a failed download?); "
            f"download it again and check its size ({size} bytes now)"
        )
    if kind == "tar":
        raise ModelLoadError(
            f"{what} {path} is a tar archive, not a PyTorch checkpoint. Mammo-CLIP's .tar files are "
            f"torch.save zip files despite their name and must be used exactly as downloaded; a file "
            f"that was unpacked and packed again cannot be read, so download the original again"
        )
    if kind == "pickle":
        return
    if kind != "torch-zip":
        raise ModelLoadError(
            f"{what} {path} is not a PyTorch checkpoint (it starts with neither a zip nor a pickle "
            f"header); download it again"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(
            f"{what} {path} is a damaged or truncated zip file ({size} bytes): {exc}; download it "
            f"again and compare its size with the published one"
        ) from exc
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        raise ModelLoadError(
            f"{what} {path} is a zip file but not a torch.save checkpoint (no data.pkl inside); use "
            f"the file exactly as downloaded"
        )


def rejected_globals(path: Path, exc: BaseException) -> list[str]:
    """Return the globals of ``path`` outside the allow-list, or those named in ``exc``."""
    import torch

    names: set[str] = set(_GLOBAL_IN_MESSAGE.findall(str(exc)))
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            names.update(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as scan_error:  # a damaged file can fail the scan too
        logger.debug("could not list the globals of %s: %s", path, scan_error)
    return sorted(names)


def to_plain(value: Any) -> Any:
    """Turn stand-in containers into plain dicts and lists, recursively; other values are kept."""
    if isinstance(value, ConfigDict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, ConfigList):
        return [to_plain(item) for item in value]
    if isinstance(value, ConfigValueNode):
        return value.value
    if isinstance(value, dict):
        converted = {key: to_plain(item) for key, item in value.items()}
        return type(value)(converted) if type(value) is not dict else converted
    if isinstance(value, list):
        return [to_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(to_plain(item) for item in value)
    return value

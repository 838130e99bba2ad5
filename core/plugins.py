"""Plugin manager: registers built-in and third-party plugins and collects what they register.

Built-in plugins are listed in :data:`DEFAULT_PLUGINS` and registered exactly
as third-party plugins are; third-party plugins come from the entry-point
group ``mammo_dissect``.  Entry points are not loaded while the test suite
runs (``sys._called_from_test``) so that tests never depend on what happens
to be installed.  ``MAMMO_DISSECT_LOAD_PLUGINS`` restricts loading to a
comma-separated list of entry-point names (an empty value loads none).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import pluggy

from mammo_dissect.core import hookspecs
from mammo_dissect.core.errors import PluginError
from mammo_dissect.core.errors import UnknownNameError


logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
LOAD_PLUGINS_ENV = "MAMMO_DISSECT_LOAD_PLUGINS"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "mammo_dissect.plugins.similarity.wpmi",
    "mammo_dissect.plugins.similarity.cosine",
    "mammo_dissect.plugins.similarity.rank_reorder",
    "mammo_dissect.plugins.similarity.ground_truth_metrics",
    "mammo_dissect.plugins.targets.efficientnet_lite",
    "mammo_dissect.plugins.targets.timm_models",
    "mammo_dissect.plugins.dissectors.annotation",
    "mammo_dissect.plugins.dissectors.open_clip",
    "mammo_dissect.plugins.dissectors.mammo_clip",
    "mammo_dissect.plugins.dissectors.hf_clip",
    "mammo_dissect.plugins.dissectors.aligned",
    "mammo_dissect.plugins.dissectors.random_embeddings",
    "mammo_dissect.plugins.targets.mammo_clip",
    "mammo_dissect.plugins.targets.torchvision_models",
    "mammo_dissect.plugins.targets.torchscript",
    "mammo_dissect.plugins.probe_sets.folder",
    "mammo_dissect.plugins.probe_sets.mini_mias",
    "mammo_dissect.plugins.probe_sets.cbis_ddsm_dicom",
    "mammo_dissect.plugins.probe_sets.dicom",
    "mammo_dissect.plugins.probe_sets.manifest",
    "mammo_dissect.plugins.probe_sets.vindr_mammo",
    "mammo_dissect.plugins.probe_sets.rsna_screening",
    "mammo_dissect.plugins.probe_sets.cbis_ddsm_csv",
    "mammo_dissect.plugins.probe_sets.embed",
    "mammo_dissect.plugins.probe_sets.ddsm_seg66",
    "mammo_dissect.plugins.executors.ray_executor",
    "mammo_dissect.concept_sets.builtin",
    "mammo_dissect.concept_sets.formats",
)

#: Registration hooks and the kind of object each contributes.
KINDS: dict[str, str] = {
    "register_dissectors": "dissector",
    "register_target_loaders": "target loader",
    "register_similarity_functions": "similarity function",
    "register_concept_sets": "concept set",
    "register_probe_sets": "probe set",
    "register_report_sections": "report section",
    "register_executors": "executor",
}


@dataclass
class PluginInfo:
    """A plugin's name, version and origin, and the objects it registered."""

    name: str
    version: str | None
    source: str
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "hooks": self.hooks,
            "registered": self.registered,
        }


class Registry:
    """Objects registered by plugins, by kind and name, with their origin."""

    def __init__(self, manager: pluggy.PluginManager) -> None:
        self.manager = manager
        self.objects: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS.values()}
        self.origins: dict[str, dict[str, str]] = {kind: {} for kind in KINDS.values()}
        self.plugins: dict[str, PluginInfo] = {}
        self._collect()

    def _plugin_info(self, plugin: object) -> PluginInfo:
        name = self.manager.get_name(plugin) or repr(plugin)
        if name not in self.plugins:
            version = None
            source = "built-in" if name in DEFAULT_PLUGINS else "registered"
            distribution = _distributions(self.manager).get(name)
            if distribution is not None:
                source = f"distribution {distribution[0]}"
                version = distribution[1]
            if source == "built-in":
                from mammo_dissect import __version__

                version = __version__
            hooks = sorted(
                caller.name
                for caller in self.manager.get_hookcallers(plugin) or []
            )
            self.plugins[name] = PluginInfo(name=name, version=version, source=source, hooks=hooks)
        return self.plugins[name]

    def _collect(self) -> None:
        for plugin in self.manager.get_plugins():
            self._plugin_info(plugin)
        for hook_name, kind in KINDS.items():
            hook = getattr(self.manager.hook, hook_name)
            # Call each implementation on its own so every object is traced
            # to the plugin that registered it.
            for impl in reversed(hook.get_hookimpls()):
                info = self._plugin_info(impl.plugin)

                def register(obj: Any, _kind: str = kind, _info: PluginInfo = info) -> None:
                    self._add(_kind, obj, _info)

                impl.function(register=register)

    def _add(self, kind: str, obj: Any, info: PluginInfo) -> None:
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(
                f"plugin {info.name!r} registered a {kind} without a name: {obj!r}; "
                f"give the object a non-empty string attribute 'name'"
            )
        if name in self.objects[kind]:
            first = self.origins[kind][name]
            raise PluginError(
                f"{kind} name {name!r} is registered twice: by plugin {first!r} and by "
                f"plugin {info.name!r}; uninstall or block one of them "
                f"(see {LOAD_PLUGINS_ENV})"
            )
        self.objects[kind][name] = obj
        self.origins[kind][name] = info.name
        info.registered.setdefault(kind, []).append(name)

    def get(self, kind: str, name: str) -> Any:
        """Return the object of ``kind`` called ``name`` or raise :class:`UnknownNameError`."""
        try:
            return self.objects[kind][name]
        except KeyError:
            raise UnknownNameError(
                kind,
                name,
                self.objects[kind],
                hint="Run 'mammo-dissect plugins' to list what is installed",
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self.objects[kind])

    def origin(self, kind: str, name: str) -> str:
        return self.origins[kind][name]

    def plugin_version(self, kind: str, name: str) -> str | None:
        return self.plugins[self.origins[kind][name]].version


def _distributions(manager: pluggy.PluginManager) -> dict[str, tuple[str, str]]:
    """Return the (distribution name, version) of each entry-point plugin, by plugin name."""
    if not hasattr(manager, "mammo_dissect_distributions"):
        manager.mammo_dissect_distributions = {}  # type: ignore[attr-defined]
    return manager.mammo_dissect_distributions  # type: ignore[attr-defined,no-any-return]


def _called_from_test() -> bool:
    return bool(getattr(sys, "_called_from_test", False))


def _allowed_entry_points() -> set[str] | None:
    value = os.environ.get(LOAD_PLUGINS_ENV)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def create_manager(
    extra_plugins: Iterable[object] = (),
    load_entry_points: bool | None = None,
) -> pluggy.PluginManager:
    """Build a plugin manager with the built-ins, entry points and ``extra_plugins``.

    ``load_entry_points`` defaults to true except under the test suite.
    A hook implementation whose name matches no specification (a typo such as
    ``register_similarity_function``) raises :class:`PluginError`.
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        manager.register(module, name=module_name)
    if load_entry_points is None:
        load_entry_points = not _called_from_test()
    if load_entry_points:
        _load_entry_points(manager)
    for plugin in extra_plugins:
        manager.register(plugin)
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"plugin {exc.plugin!r} has a hook implementation that matches no hook: {exc}; "
            f"known hooks: {', '.join(sorted(KINDS) + ['register_commands'])}"
        ) from None
    return manager


def _load_entry_points(manager: pluggy.PluginManager) -> None:
    allowed = _allowed_entry_points()
    found: set[str] = set()
    for dist in importlib.metadata.distributions():
        for entry_point in dist.entry_points:
            if entry_point.group != ENTRY_POINT_GROUP:
                continue
            found.add(entry_point.name)
            if allowed is not None and entry_point.name not in allowed:
                logger.debug("plugin %s not loaded: not in %s", entry_point.name, LOAD_PLUGINS_ENV)
                continue
            if manager.get_plugin(entry_point.name) is not None or manager.is_blocked(entry_point.name):
                continue
            try:
                plugin = entry_point.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {entry_point.name!r} from distribution {dist.metadata['Name']!r} "
                    f"failed to import: {type(exc).__name__}: {exc}; fix or uninstall it, or "
                    f"exclude it with {LOAD_PLUGINS_ENV}"
                ) from exc
            try:
                manager.register(plugin, name=entry_point.name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"plugin {entry_point.name!r} is invalid: {exc}") from None
            _distributions(manager)[entry_point.name] = (dist.metadata["Name"], dist.version)
    unknown = sorted((allowed or set()) - found)
    if unknown:
        logger.warning(
            "%s names plugin(s) that are not installed: %s; installed: %s",
            LOAD_PLUGINS_ENV, ", ".join(unknown), ", ".join(sorted(found)) or "none",
        )
    logger.debug("plugins loaded: %s", [name for name, _ in manager.list_name_plugin()])


_registry: Registry | None = None


def get_registry() -> Registry:
    """Return the process-wide registry, building it on first use."""
    global _registry
    if _registry is None:
        _registry = Registry(create_manager())
    return _registry


def set_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (tests and embedding applications)."""
    global _registry
    _registry = registry

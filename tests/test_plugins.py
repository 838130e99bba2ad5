"""The plugin manager: built-ins, collisions, hook typos, entry points and an installed plugin."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pytest

from mammo_dissect.core import plugins
from mammo_dissect.core.errors import PluginError
from mammo_dissect.core.hookspecs import hookimpl


EXAMPLE_PLUGIN = Path(__file__).resolve().parent / "example_plugin"
CLI = [sys.executable, "-m", "mammo_dissect"]


def build_registry(*extra: object) -> plugins.Registry:
    return plugins.Registry(plugins.create_manager(extra_plugins=extra, load_entry_points=False))


def test_builtins_registered_like_plugins():
    registry = build_registry()
    assert registry.origin("similarity function", "soft_wpmi") == "mammo_dissect.plugins.similarity.wpmi"


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("dissector", "annotation"),
        ("dissector", "open_clip"),
        ("target loader", "efficientnet-lite"),
        ("target loader", "timm"),
        ("similarity function", "soft_wpmi"),
        ("concept set", "text"),
        ("probe set", "folder"),
        ("probe set", "mini-mias"),
        ("probe set", "cbis-ddsm-dicom"),
    ],
)
def test_builtin_names_present(kind, name):
    assert name in build_registry().names(kind)


def test_name_collision_names_both_plugins():
    class Duplicate:
        @hookimpl
        def register_similarity_functions(self, register):
            register(SimpleNamespace(name="soft_wpmi"))

    with pytest.raises(PluginError) as error:
        build_registry(Duplicate())
    message = str(error.value)
    assert "'soft_wpmi' is registered twice" in message
    assert "mammo_dissect.plugins.similarity.wpmi" in message


def test_hook_name_typo_fails_at_start():
    class Typo:
        @hookimpl
        def register_similarity_function(self, register):
            pass

    with pytest.raises(PluginError) as error:
        build_registry(Typo())
    assert "matches no hook" in str(error.value)


def test_registered_object_without_name():
    class Nameless:
        @hookimpl
        def register_concept_sets(self, register):
            register(object())

    with pytest.raises(PluginError) as error:
        build_registry(Nameless())
    assert "without a name" in str(error.value)


def test_register_commands_hook_adds_command():
    import click
    from click.testing import CliRunner

    from mammo_dissect.core import cli as cli_module

    class Command:
        @hookimpl
        def register_commands(self, cli):
            @cli.command(name="hello-test")
            def hello():
                click.echo("hello from a plugin")

    registry = build_registry(Command())
    plugins.set_registry(registry)
    registry.manager.hook.register_commands(cli=cli_module.cli)
    try:
        result = CliRunner().invoke(cli_module.cli, ["hello-test"])
        assert result.output.strip() == "hello from a plugin"
    finally:
        cli_module.cli.commands.pop("hello-test", None)


def test_entry_points_skipped_under_tests():
    assert plugins._called_from_test()


def test_plugins_json_lists_builtins():
    result = subprocess.run([*CLI, "plugins", "--json"], capture_output=True, text=True, check=True)
    names = {info["name"]: info for info in json.loads(result.stdout)}
    assert names["mammo_dissect.plugins.similarity.wpmi"]["registered"] == {"similarity function": ["soft_wpmi", "wpmi"]}


def test_plugins_text_lists_version():
    result = subprocess.run([*CLI, "plugins"], capture_output=True, text=True, check=True)
    assert "mammo_dissect.plugins.similarity.wpmi 0.1.0 (built-in)" in result.stdout


@pytest.fixture(scope="module")
def installed_example_plugin():
    """pip-install the example plugin distribution into this environment; uninstall afterwards."""
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
               "--quiet", str(EXAMPLE_PLUGIN)]
    subprocess.run(install, check=True, capture_output=True, text=True)
    try:
        yield
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet", "mammo-dissect-example"],
                       check=True, capture_output=True, text=True)


def test_installed_plugin_listed_with_version(installed_example_plugin):
    result = subprocess.run([*CLI, "plugins", "--json"], capture_output=True, text=True, check=True)
    names = {info["name"]: info for info in json.loads(result.stdout)}
    assert names["example"]["version"] == "0.3.1"
    assert names["example"]["source"] == "distribution mammo-dissect-example"
    assert names["example"]["registered"] == {
        "similarity function": ["top_mean_contrast"],
        "concept set": ["example-light"],
    }


def test_load_plugins_env_excludes_plugin(installed_example_plugin):
    env = dict(os.environ, MAMMO_DISSECT_LOAD_PLUGINS="")
    result = subprocess.run([*CLI, "plugins", "--json"], capture_output=True, text=True, check=True, env=env)
    assert "example" not in {info["name"] for info in json.loads(result.stdout)}


def test_installed_plugin_used_in_run(installed_example_plugin, tiny_config, monkeypatch):
    from mammo_dissect.core.config import load_config
    from mammo_dissect.core.pipeline import run
    from mammo_dissect.tests import tiny_plugins

    monkeypatch.delattr(sys, "_called_from_test")
    registry = plugins.Registry(plugins.create_manager(extra_plugins=[tiny_plugins]))
    config = copy.deepcopy(tiny_config)
    config["similarity"] = {"name": "top_mean_contrast", "params": {"top_k": 5}}
    config["concept_set"] = {"name": "example-light"}
    outcome = run(load_config(None, data=config), registry, progress=False)
    with duckdb.connect(str(outcome.database), read_only=True) as con:
        similarity = con.execute("SELECT similarity FROM runs").fetchone()[0]
        concepts = con.execute("SELECT text FROM concepts ORDER BY concept_id").fetchall()
    assert similarity == "top_mean_contrast"
    assert concepts == [("bright",), ("dark",), ("aircraft",), ("water",)]


def test_every_hook_documented_with_arguments():
    import inspect

    from mammo_dissect.core import hookspecs

    docs = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    manager = plugins.create_manager(load_entry_points=False)
    for name in sorted(vars(manager.hook)):
        if name.startswith("_"):
            continue
        arguments = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"### {name}({arguments})" in docs, name

"""Hook specifications: the contract between mammo-dissect and its plugins.

A plugin is a module (or object) with functions decorated by
:data:`hookimpl` whose names match the specifications below.  Built-in
features are plugins of exactly this kind.  Third-party plugins are found
through the entry-point group ``mammo_dissect``::

    [project.entry-points.mammo_dissect]
    my_plugin = "my_package.my_module"

Every ``register_*`` hook receives a ``register`` callback.  Call it once per
object you contribute: ``register(obj)``.  The object's ``name`` attribute
is its public name; two plugins registering the same name is an error that
names both plugins.  The base classes the objects derive from are in
:mod:`mammo_dissect.core.types`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from typing import Any

import pluggy


if TYPE_CHECKING:
    import click


PROJECT_NAME = "mammo_dissect"

#: Marker for hook specifications (used only by mammo-dissect itself).
hookspec = pluggy.HookspecMarker(PROJECT_NAME)

#: Marker plugins put on their hook implementations.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[[Any], None]


@hookspec
def register_dissectors(register: Register) -> None:
    """Register dissectors: objects that produce the image-concept matrix P.

    :param register: call ``register(dissector)`` once per dissector, where
        ``dissector`` is an instance of
        :class:`mammo_dissect.core.types.Dissector`.  Vision-language
        dissectors derive from :class:`~mammo_dissect.core.types.EmbeddingDissector`
        and implement ``load`` returning an object with ``encode_images`` and
        ``encode_texts``; dissectors that do not embed (such as the annotation
        dissector) implement ``image_concept_matrix`` directly.

    Called once at start-up.  Registration must be cheap: import heavy
    libraries inside ``load``, not at module level.
    """


@hookspec
def register_target_loaders(register: Register) -> None:
    """Register target loaders: objects that build the model whose units are labelled.

    :param register: call ``register(loader)`` once per loader, an instance of
        :class:`mammo_dissect.core.types.TargetLoader`.  ``loader.load(options)``
        returns a :class:`~mammo_dissect.core.types.LoadedTarget` with the
        ``torch.nn.Module`` in evaluation mode, its preprocessing (which is
        stored with the run) and the SHA-256 of its weights file.

    A loader never downloads weights: a model named without a local weights
    file must fail with a message that says how to pass one.
    """


@hookspec
def register_similarity_functions(register: Register) -> None:
    """Register similarity functions that turn P and A into S.

    :param register: call ``register(similarity)`` once per function, an
        instance of :class:`mammo_dissect.core.types.SimilarityFunction`
        wrapping a pure tensor function ``fn(P, A, *, param=default, ...)``
        with P [N x M] (images x concepts), A [N x K] (images x units) and
        the result S [K x M].  Every tunable parameter is a keyword-only
        argument with a default; callers can pass only those parameters.

    Similarity functions never read files, models or the database.
    """


@hookspec
def register_concept_sets(register: Register) -> None:
    """Register concept-set sources.

    :param register: call ``register(source)`` once per source, an instance of
        :class:`mammo_dissect.core.types.ConceptSetSource`.  A source either
        ships a fixed list (a built-in vocabulary) or reads a user's file
        (its options then name the path).  The core normalises the texts it
        returns (line endings, spaces, blank lines, duplicates) and logs what
        it dropped.
    """


@hookspec
def register_probe_sets(register: Register) -> None:
    """Register probe-set readers.

    :param register: call ``register(reader)`` once per reader, an instance of
        :class:`mammo_dissect.core.types.ProbeSetReader`.  ``reader.load(options)``
        returns a :class:`~mammo_dissect.core.types.ProbeSet`: an ordered list of
        images with metadata and, where the data set has labels, the concept
        texts annotated on each image.  Readers check that every image exists
        and report all missing paths in one error.
    """


@hookspec
def register_report_sections(register: Register) -> None:
    """Register extra report sections (reserved; no built-in uses it yet).

    :param register: call ``register(section)`` with an object that has a
        ``name``, a ``template`` (a Jinja template name) and a
        ``context(store, run_id)`` method returning the template variables.
    """


@hookspec
def register_executors(register: Register) -> None:
    """Register extraction executors (reserved; the built-in loop is local).

    :param register: call ``register(executor)`` with an object that has a
        ``name`` and runs activation extraction for a plan.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``mammo-dissect`` command line.

    :param cli: the root :class:`click.Group`; add commands with
        ``@cli.command()``.
    """

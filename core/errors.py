"""Exception classes of mammo-dissect.

Library code raises these; only the command-line layer turns them into
one-line messages and exit codes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MammoDissectError(Exception):
    """Base class of every error that mammo-dissect reports to its user."""


class ConfigError(MammoDissectError):
    """A run configuration or a plugin option is invalid."""


class PluginError(MammoDissectError):
    """A plugin failed to load, or two plugins registered the same name."""


class UnknownNameError(MammoDissectError, KeyError):
    """A name (plugin, layer, concept set, ...) is not known.

    The message lists the closest known names, so a typo is easy to fix.
    """

    def __init__(self, kind: str, name: str, known: Iterable[str], hint: str = "") -> None:
        known = sorted(known)
        self.kind = kind
        self.name = name
        self.known = known
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.4)
        message = f"unknown {kind} {name!r}"
        if close:
            message += f"; closest: {', '.join(close)}"
        elif known:
            shown = ", ".join(known[:20])
            more = f" (and {len(known) - 20} more)" if len(known) > 20 else ""
            message += f"; known: {shown}{more}"
        else:
            message += f"; no {kind} is registered"
        if hint:
            message += f". {hint}"
        super().__init__(message)

    def __str__(self) -> str:
        # KeyError.__str__ would wrap the message in quotes.
        return str(self.args[0])


class ProbeSetError(MammoDissectError):
    """Probe images are missing, unreadable or inconsistent."""


class ConceptSetError(MammoDissectError):
    """A concept set is empty, unreadable or inconsistent."""


class ModelLoadError(MammoDissectError):
    """A target or dissector model could not be built or its weights loaded."""


class LayerError(MammoDissectError):
    """A requested layer does not exist or its output cannot be pooled."""


class SimilarityError(MammoDissectError):
    """A similarity function received inputs it cannot score."""


class StoreError(MammoDissectError):
    """The DuckDB store could not be opened, read or written."""


class Terminated(BaseException):  # noqa: N818 - named like KeyboardInterrupt, its sibling
    """The process received SIGTERM; like KeyboardInterrupt, it is not an ordinary error."""


def close_matches(name: str, known: Iterable[str], n: int = 5) -> list[str]:
    """Return up to ``n`` names from ``known`` that look like ``name``."""
    return difflib.get_close_matches(name, list(known), n=n, cutoff=0.4)

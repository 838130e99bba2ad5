"""The ``mammo-dissect`` command line: the root group and the mapping of errors to exit codes.

The commands live in the ``cli_*`` modules next to this one, and ``_add_commands``
adds them to the root group.  The helpers they share are in ``cli_common``.  The
command line is the only part of the package that prints.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import click

from mammo_dissect import __version__
from mammo_dissect.core import cli_align
from mammo_dissect.core import cli_cache
from mammo_dissect.core import cli_inputs
from mammo_dissect.core import cli_results
from mammo_dissect.core import cli_run
from mammo_dissect.core import cli_trust
from mammo_dissect.core.cli_common import CliState
from mammo_dissect.core.cli_common import format_table
from mammo_dissect.core.cli_run import DEMO_LAYERS
from mammo_dissect.core.cli_run import demo_config
from mammo_dissect.core.errors import MammoDissectError
from mammo_dissect.core.errors import Terminated


# format_table, demo_config and DEMO_LAYERS are defined in cli_common and cli_run.
# Callers may still import them from here.
__all__ = [
    "DEMO_LAYERS", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_TERMINATED",
    "build_cli", "cli", "demo_config", "format_table", "main", "setup_logging",
]

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def setup_logging(verbose: int, quiet: bool) -> None:
    """Send log records to stderr at INFO (default), DEBUG (-v) or WARNING (--quiet)."""
    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    if quiet:
        level = logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("mammo_dissect")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    CliState.progress = not quiet and sys.stderr.isatty()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mammo-dissect")
@click.option("-v", "--verbose", count=True, help="Show debug messages.")
@click.option("-q", "--quiet", is_flag=True, help="Show only warnings and errors; no progress bars.")
@click.option("--progress/--no-progress", default=None, help="Force progress bars on or off.")
def cli(verbose: int, quiet: bool, progress: bool | None) -> None:
    """Label the units of mammography vision models with textual concepts."""
    setup_logging(verbose, quiet)
    if progress is not None:
        CliState.progress = progress


def _add_commands(group: click.Group) -> None:
    """Add the built-in commands to ``group``.  Plugin commands are added later, by ``build_cli``."""
    for command in (
        cli_run.run, cli_run.ingest, cli_run.demo,
        cli_results.report, cli_results.runs, cli_results.sql,
        cli_inputs.plugins, cli_inputs.layers, cli_inputs.concepts, cli_inputs.convert,
        cli_trust.check_dissector_command, cli_trust.validate, cli_trust.chance, cli_trust.stability,
        cli_trust.sanity, cli_trust.mask_iou,
        cli_cache.cache,
        cli_align.align,
    ):
        group.add_command(command)


_add_commands(cli)


def build_cli() -> click.Group:
    """Return the command group with plugin commands added."""
    from mammo_dissect.core.plugins import get_registry

    registry = get_registry()
    if not getattr(cli, "_plugin_commands_added", False):
        registry.manager.hook.register_commands(cli=cli)
        cli._plugin_commands_added = True  # type: ignore[attr-defined]
    return cli


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated("terminated by SIGTERM")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; maps errors to one-line messages and exit codes."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> None:
    try:
        group = build_cli()
        group.main(args=argv, prog_name="mammo-dissect", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MammoDissectError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Terminated:
        click.echo("terminated by SIGTERM", err=True)
        sys.exit(EXIT_TERMINATED)
    except OSError as exc:
        # File-system errors outside the library's own checks (a report folder
        # below a file, a read-only disk) still get one line, not a traceback.
        target = f" {exc.filename}" if exc.filename else ""
        click.echo(f"error: {exc.strerror or exc}:{target}", err=True)
        sys.exit(EXIT_ERROR)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)

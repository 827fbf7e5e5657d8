"""``tlsmitm ...`` (also ``python -m tlsmitm ...``): the command line.

Each command group lives in its own module with a ``register(subparsers)`` function that adds its
sub-parser and sets ``func`` (a callable taking the parsed namespace and returning an exit code).

Errors a user can cause are one line on stderr that names the problem and the fix: exit status 2
for usage errors (found while the arguments are parsed, before anything starts), 1 for runtime
ones (:class:`~tlsmitm.ConfigurationError`, a port in use...). ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ._errors import ConfigurationError

__all__ = ["EXIT_RUNTIME", "EXIT_USAGE", "UsageError", "build_parser", "default_state_dir", "main"]

EXIT_RUNTIME = 1
EXIT_USAGE = 2

_COMMAND_MODULES = ("_cli_ca", "_cli_check", "_cli_serve", "_cli_ops", "_cli_passwd")


def default_state_dir() -> Path:
    """Where tlsmitm keeps its CA and state by default: ``$XDG_DATA_HOME/tlsmitm``.

    ``TLSMITM_STATE_DIR`` overrides it; without ``XDG_DATA_HOME`` it is
    ``~/.local/share/tlsmitm``.
    """
    explicit = os.environ.get("TLSMITM_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tlsmitm"


class UsageError(ConfigurationError):
    """The command line itself is wrong (exit status 2); the message says what to write."""

    def __init__(self, message: str, *, reason: str = "usage") -> None:
        super().__init__(message, reason=reason)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: the problem, and where help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def _add_debug(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on ``parser`` and on every sub-command below it."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks and debug logs",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _add_debug(sub)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every command registered."""
    parser = _Parser(
        prog="tlsmitm",
        description="TLS interception that never leaves its users less safe.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        qualified = f"{__package__}.{name}"
        if importlib.util.find_spec(qualified) is None:
            continue
        module = importlib.import_module(qualified)
        module.register(subparsers)
    _add_debug(parser)
    return parser


def fail(message: str, status: int = EXIT_RUNTIME) -> int:
    """Print ``tlsmitm: message`` as one line on stderr; returns ``status``."""
    print(f"tlsmitm: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # serve --workers re-runs it
    debug = bool(getattr(args, "debug", False))
    if debug:
        logging.getLogger("tlsmitm").setLevel(logging.DEBUG)
    try:
        result: int = args.func(args)
    except UsageError as exc:
        if debug:
            raise
        return fail(str(exc), EXIT_USAGE)
    except ConfigurationError as exc:
        if debug:
            raise
        return fail(str(exc))
    except KeyboardInterrupt:
        if debug:
            raise
        return fail("interrupted", 130)
    except Exception as exc:
        if debug:
            raise
        return fail(
            f"unexpected {type(exc).__name__}: {exc}; please report it with the output of the "
            "same command with --debug"
        )
    sys.stdout.flush()
    return result

"""``python -m tlsmitm ...``: the command line.

Each command group lives in its own module with a ``register(subparsers)`` function that adds its
sub-parser and sets ``func`` (a callable taking the parsed namespace and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "default_state_dir", "main"]

_COMMAND_MODULES = ("_cli_ca", "_cli_check", "_cli_serve")


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


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every command registered."""
    parser = argparse.ArgumentParser(
        prog="python -m tlsmitm",
        description="TLS interception that never leaves its users less safe.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        qualified = f"{__package__}.{name}"
        if importlib.util.find_spec(qualified) is None:
            continue
        module = importlib.import_module(qualified)
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    sys.stdout.flush()
    return result

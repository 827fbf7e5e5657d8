"""``tlsmitm passwd USER``: a line for the ``serve --auth-file`` credentials file.

The password is read from the terminal (twice, not echoed) or, when stdin is not a terminal, from
its first line; the line printed is ``USER:$scrypt$...`` -- the password itself is never written.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from ._cli import UsageError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``passwd`` command."""
    parser = subparsers.add_parser(
        "passwd",
        help="print a credentials line for serve --auth-file",
        description="Hash a proxy user's password (scrypt) and print USER:HASH for the file "
        "given to `tlsmitm serve --auth-file`. Append it: tlsmitm passwd alice >> users.txt",
    )
    parser.add_argument("user", help="the proxy user name (no colon)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Read the password, print the line."""
    from ._access import hash_password

    user: str = args.user
    if not user or ":" in user or user != user.strip() or not user.isprintable():
        raise UsageError(f"user name {user!r}: printable, no colon, no surrounding spaces")
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {user}: ")
        if getpass.getpass("again: ") != password:
            raise UsageError("the two passwords differ; nothing written")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise UsageError("an empty password; nothing written")
    print(f"{user}:{hash_password(password)}", flush=True)
    return 0

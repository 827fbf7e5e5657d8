"""A private SoftHSM2 token for one test: its own token directory, an EC P-256 key made in it.

SoftHSM2 reads ``SOFTHSM2_CONF`` when a process initialises the module, so the test points it
(with ``monkeypatch.setenv``, inherited by the subprocesses it starts) at a configuration naming
a token directory of its own: nothing outside the test's directory is touched. A process
initialises a module once (python-pkcs11 keeps it loaded), so the tests that open keys in the
test process share one token per module (a module-scoped fixture), each with its own keys.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import require_tool

TOKEN = "tlsmitm-test"
PIN = "4711-test"
SO_PIN = "0815-so"
MODULE_NAME = "softhsm2"


@dataclass(frozen=True)
class SoftToken:
    """One initialised token and the files around it."""

    directory: Path
    conf: Path
    pin_file: Path
    label: str = TOKEN

    def uri(self, key: str) -> str:
        """The RFC 7512 URI of the key labelled ``key``, the module found by name."""
        return f"pkcs11:token={self.label};object={key};type=private?module-name={MODULE_NAME}"

    def generate_ec_key(self, label: str, key_id: str) -> None:
        """An EC P-256 key pair made inside the token (the private key is never outside it)."""
        self.generate_key(label, key_id, "EC:prime256v1")

    def generate_key(self, label: str, key_id: str, key_type: str) -> None:
        """A key pair of ``key_type`` (pkcs11-tool's: ``EC:prime256v1``, ``rsa:2048``) made
        inside the token."""
        tool = require_tool("pkcs11-tool")
        subprocess.run(
            [
                tool,
                "--module",
                str(module_path()),
                "--token-label",
                self.label,
                "--login",
                "--pin",
                PIN,
                "--keypairgen",
                "--key-type",
                key_type,
                "--label",
                label,
                "--id",
                key_id,
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def import_key(self, private_der: Path, public_der: Path, label: str, key_id: str) -> None:
        """Write an existing key pair into the token (PKCS #8 and SubjectPublicKeyInfo DER), as
        an operator moving a key off the disk does."""
        tool = require_tool("pkcs11-tool")
        login = [tool, "--module", str(module_path()), "--token-label", self.label, "--login"]
        for path, kind in ((private_der, "privkey"), (public_der, "pubkey")):
            write = ["--write-object", str(path), "--type", kind, "--label", label, "--id", key_id]
            subprocess.run(
                [*login, "--pin", PIN, *write],
                check=True,
                capture_output=True,
                timeout=60,
            )


def module_path() -> Path:
    """SoftHSM2's module, found the way tlsmitm finds it (p11-kit registry, library dirs)."""
    from tlsmitm._pkcs11 import Pkcs11Uri, find_module

    return find_module(Pkcs11Uri(path={"object": "x"}, query={"module-name": MODULE_NAME}))


def make_token(directory: Path, monkeypatch: pytest.MonkeyPatch) -> SoftToken:
    """Initialise a fresh token in ``directory`` and point ``SOFTHSM2_CONF`` at it."""
    util = require_tool("softhsm2-util")
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    subprocess.run(
        [util, "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", SO_PIN],
        check=True,
        capture_output=True,
        timeout=60,
    )
    pin_file = directory / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    return SoftToken(directory=directory, conf=conf, pin_file=pin_file)

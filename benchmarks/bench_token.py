"""The issuing key in a PKCS#11 token against in memory: what each cold mint costs.

Run ``python -m benchmarks.bench_token [seconds]``. :func:`run` returns the figures as a dict.
It makes a private SoftHSM2 token (Debian ``softhsm2``; ``SOFTHSM2_CONF`` points at a token
directory in a temporary directory), generates a P-256 key in it, and measures in one process:

* ``memory_sign_per_s`` / ``token_sign_per_s`` -- ECDSA P-256 signatures over a 400-byte
  message with an in-memory key, and through the token (``CKM_ECDSA`` on a SHA-256 digest).
* ``memory_cold_mint_per_s`` / ``token_cold_mint_per_s`` -- :meth:`~tlsmitm.CertForge.leaf_for`
  for distinct hosts with the intermediate's key in memory, and in the token.
* ``token_vs_memory_mint_ratio`` -- ``token_cold_mint_per_s / memory_cold_mint_per_s``.
* ``us_token_sign_overhead`` -- microseconds a token signature adds to each cold mint.

SoftHSM2 is a software token: a hardware HSM or a smart card is slower per signature (a USB
smart card signs a few to a few tens of times a second), which is the figure to compare with
the new-host rate the proxy must sustain. Cache hits never touch the key.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from tlsmitm._ca import CertificateAuthority
from tlsmitm._forge import CertForge
from tlsmitm._pkcs11 import Pkcs11Uri, TokenAccess, find_module, open_token_key

from ._measure import component_main, rate

__all__ = ["run"]

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
PIN = "1234-bench"
_rate = functools.partial(rate, batch=50, rounds=3)


def _token(directory: Path) -> str:
    """A SoftHSM2 token with one P-256 key in ``directory``; returns the key's URI."""
    util, tool = shutil.which("softhsm2-util"), shutil.which("pkcs11-tool")
    if util is None or tool is None:
        raise RuntimeError("needs softhsm2-util and pkcs11-tool (Debian softhsm2, opensc)")
    tokens = directory / "tokens"
    tokens.mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        [util, "--init-token", "--free", "--label", "bench", "--pin", PIN, "--so-pin", "0000"],
        check=True,
        capture_output=True,
    )
    module = find_module(Pkcs11Uri(path={"object": "k"}, query={"module-name": "softhsm2"}))
    login = [tool, "--module", str(module), "--token-label", "bench", "--login", "--pin", PIN]
    keygen = ["--keypairgen", "--key-type", "EC:prime256v1", "--label", "issuing", "--id", "01"]
    subprocess.run([*login, *keygen], check=True, capture_output=True)
    return "pkcs11:token=bench;object=issuing;type=private?module-name=softhsm2"


def run(seconds: float = 2.0) -> dict[str, float]:
    """Measure every figure for about ``seconds`` each; returns them (see the module doc)."""
    figures: dict[str, float] = {}
    message = b"\x5a" * 400
    scheme = ec.ECDSA(hashes.SHA256())
    with tempfile.TemporaryDirectory(prefix="tlsmitm-bench-token-") as tmp:
        uri = _token(Path(tmp))
        access = TokenAccess(pin=PIN.encode())
        token_key = open_token_key(uri, access)
        memory_key = ec.generate_private_key(ec.SECP256R1())
        figures["memory_sign_per_s"] = _rate(lambda: memory_key.sign(message, scheme), seconds)
        figures["token_sign_per_s"] = _rate(lambda: token_key.sign(message, scheme), seconds)

        memory_ca = CertificateAuthority.create(Path(tmp) / "memory", now=NOW)
        token_ca = CertificateAuthority.create(
            Path(tmp) / "token", now=NOW, intermediate_key=uri, token=access
        )
        for name, ca in (("memory", memory_ca), ("token", token_ca)):
            forge = CertForge(ca, max_cache_entries=0)
            counter = itertools.count()
            figures[f"{name}_cold_mint_per_s"] = _rate(
                lambda forge=forge, counter=counter: forge.leaf_for(
                    f"h{next(counter)}.example.com", now=NOW
                ),
                seconds,
            )
        token_key.close()
    figures["token_vs_memory_mint_ratio"] = (
        figures["token_cold_mint_per_s"] / figures["memory_cold_mint_per_s"]
    )
    figures["us_token_sign_overhead"] = 1e6 / figures["token_sign_per_s"] - (
        1e6 / figures["memory_sign_per_s"]
    )
    return figures


def main(argv: list[str]) -> int:
    """Print the figures as a table."""
    return component_main(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

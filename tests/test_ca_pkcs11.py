"""Issuing keys in a PKCS#11 token: RFC 7512 URIs, a real SoftHSM2 token, leaves signed through
it, and ``serve --ca-key`` answering curl.

The token is made by the test (``tests/softhsm.py``): a private token directory, keys generated
inside the token by ``pkcs11-tool``. The private keys never exist outside it.
"""

from __future__ import annotations

import json
import os
import pickle
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from ca_tls import handshake
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509.oid import ExtendedKeyUsageOID
from origin import OriginStats, serve_tls, server_ssl_context
from pki import DAY, NOW, good_hierarchy, issue, make_root
from serve_process import curl, serve, start_origin, upstream_args
from softhsm import PIN, SoftToken, make_token, module_path

from tlsmitm import ConfigurationError
from tlsmitm._ca import CertificateAuthority
from tlsmitm._cli import main
from tlsmitm._forge import CertForge
from tlsmitm._hsts import HstsStore, PreloadList
from tlsmitm._pkcs11 import (
    MODULE_ENV,
    Pkcs11Uri,
    TokenAccess,
    TokenKey,
    TokenRsaKey,
    find_module,
    open_token_key,
    parse_uri,
    pin_from_file,
)
from tlsmitm._relay import Interceptor
from tlsmitm._verify import TrustConfig, UpstreamVerifier

REPO = Path(__file__).resolve().parent.parent
HOST = "www.example.test"
PEM = serialization.Encoding.PEM

# -- RFC 7512 URIs (pure) -----------------------------------------------------------------------

VALID = [
    (
        "pkcs11:token=tlsmitm;object=issuing",
        {"token": "tlsmitm", "object": "issuing"},
        {},
    ),
    (
        "PKCS11:object=my%20key;id=%01%a2;type=private?module-name=softhsm2&pin-source=/etc/pin",
        {"object": "my key", "id": "01a2", "type": "private"},
        {"module-name": "softhsm2", "pin-source": "/etc/pin"},
    ),
    (  # RFC 7512 §3: "&" may appear in the path, "/" and "?" in the query
        "pkcs11:token=A&B;object=k;x-vendor=1?module-path=/usr/lib/p11/x.so",
        {"token": "A&B", "object": "k", "x-vendor": "1"},
        {"module-path": "/usr/lib/p11/x.so"},
    ),
    (
        "pkcs11:manufacturer=SoftHSM%20project;serial=66697b06;slot-id=3;id=%ff",
        {"manufacturer": "SoftHSM project", "serial": "66697b06", "slot-id": "3", "id": "ff"},
        {},
    ),
]

INVALID = [
    ("token=a;object=b", "must start with 'pkcs11:'"),
    ("pkcs11:object=a;object=b", "appears twice"),
    ("pkcs11:object=a;colour=blue", "unknown attribute"),
    ("pkcs11:object=a%2", "two hex digits"),
    ("pkcs11:object=a%zz", "two hex digits"),
    ("pkcs11:object=a b", "must be percent-encoded"),
    ("pkcs11:object=a/b", "must be percent-encoded"),
    ("pkcs11:object", "is not NAME=VALUE"),
    ("pkcs11:token=t", "name the key"),
    ("pkcs11:object=a;type=secret", "type must be one of"),
    ("pkcs11:object=a;slot-id=x", "slot-id must be"),
    ("pkcs11:object=%ff%fe", "not UTF-8"),
    ("pkcs11:object=a?pin-value=1234", "would be visible in ps"),
]


@pytest.mark.parametrize(("text", "path", "query"), VALID)
def test_uri_parses(text: str, path: dict[str, str], query: dict[str, str]) -> None:
    uri = parse_uri(text)
    assert uri.path == path
    assert uri.query == query
    assert str(uri) == text


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_bad_uris_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        parse_uri(text)
    assert excinfo.value.reason == "pkcs11_uri"
    assert message in str(excinfo.value)
    assert "1234" not in str(excinfo.value)  # a PIN is never echoed


def test_the_module_is_found_by_name_path_directory_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MODULE_ENV, raising=False)
    found = module_path()  # module-name=softhsm2: p11-kit's registry, then library dirs
    assert found.is_file()
    assert "softhsm2" in found.name
    by_dir = Pkcs11Uri(
        path={"object": "k"}, query={"module-name": "softhsm2", "module-path": str(found.parent)}
    )
    assert find_module(by_dir) == found
    assert find_module(Pkcs11Uri(path={"object": "k"}), explicit=found) == found
    monkeypatch.setenv(MODULE_ENV, str(found))
    assert find_module(Pkcs11Uri(path={"object": "k"})) == found
    monkeypatch.delenv(MODULE_ENV)
    for uri, explicit in (
        (Pkcs11Uri(path={"object": "k"}), tmp_path / "missing.so"),
        (Pkcs11Uri(path={"object": "k"}, query={"module-name": "no-such-module"}), None),
    ):
        with pytest.raises(ConfigurationError) as excinfo:
            find_module(uri, explicit)
        assert excinfo.value.reason == "pkcs11_module"


# -- a real token -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftToken]:
    """One SoftHSM2 token for this module (a process initialises the module once)."""
    with pytest.MonkeyPatch.context() as patch:
        made = make_token(tmp_path_factory.mktemp("softhsm"), patch)
        made.generate_ec_key("issuing", "01")
        made.generate_ec_key("second", "02")
        made.generate_ec_key("org", "03")
        made.generate_ec_key("node", "04")
        made.generate_key("rsa", "06", "rsa:2048")
        yield made


@pytest.fixture
def access(token: SoftToken) -> TokenAccess:
    return TokenAccess(pin=pin_from_file(token.pin_file))


def test_a_token_key_signs_and_never_leaves_the_token(
    token: SoftToken, access: TokenAccess
) -> None:
    key = open_token_key(token.uri("issuing"), access)
    assert isinstance(key, TokenKey)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert key.key_size == 256
    for data in (b"", b"x" * 1000):
        signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
        key.public_key().verify(signature, data, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(TypeError):
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    with pytest.raises(TypeError):
        key.private_numbers()
    with pytest.raises(TypeError):
        pickle.dumps(key)
    assert PIN not in repr(key)
    other = open_token_key(token.uri("second"), access)  # the same token, already logged in
    assert other.public_key() != key.public_key()
    for uri, reason in (
        (token.uri("absent"), "pkcs11_key"),
        ("pkcs11:token=elsewhere;object=issuing?module-name=softhsm2", "pkcs11_token"),
        (
            f"pkcs11:token={token.label};object=issuing;type=public?module-name=softhsm2",
            "pkcs11_key",
        ),
    ):
        with pytest.raises(ConfigurationError) as excinfo:
            open_token_key(uri, access)
        assert excinfo.value.reason == reason


def test_a_lost_session_is_reopened_and_a_closed_key_stays_closed(
    token: SoftToken, access: TokenAccess
) -> None:
    key = open_token_key(token.uri("second"), access)
    key._token._session.close()  # what a restarted HSM or a re-inserted card does to it
    signature = key.sign(b"after", ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(signature, b"after", ec.ECDSA(hashes.SHA256()))
    key.close()
    with pytest.raises(ConfigurationError) as excinfo:
        key.sign(b"closed", ec.ECDSA(hashes.SHA256()))
    assert excinfo.value.reason == "pkcs11_token"


def test_an_rsa_issuing_key_in_the_token_signs_leaves_too(
    token: SoftToken, access: TokenAccess, tmp_path: Path
) -> None:
    key = open_token_key(token.uri("rsa"), access)
    assert isinstance(key, TokenRsaKey)
    assert key.key_size == 2048
    with pytest.raises(TypeError):
        key.sign(b"x", padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    ca = CertificateAuthority.create(
        tmp_path / "state", now=NOW, intermediate_key=token.uri("rsa"), token=access
    )
    assert ca.signs_in_token
    leaf = CertForge(ca).leaf_for(HOST, now=NOW)
    leaf.certificate.verify_directly_issued_by(ca.intermediate_certificate)  # RSA, by the token
    handshake(leaf, ca.root_certificate, HOST, tmp_path)


def test_leaves_minted_through_the_token_are_accepted_by_a_client_trusting_the_root(
    token: SoftToken, access: TokenAccess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    uri = token.uri("issuing")
    ca = CertificateAuthority.create(state, now=NOW, intermediate_key=uri, token=access)
    assert ca.intermediate_key_uri == uri
    token_key = open_token_key(uri, access)
    assert ca.intermediate_certificate.public_key() == token_key.public_key()
    assert not list((state / "ca").glob("intermediate-*.key"))  # no key file: it is in the token
    metadata = json.loads((state / "ca" / "ca.json").read_text())
    assert metadata["intermediate"]["key"] == uri
    assert PIN not in (state / "ca" / "ca.json").read_text()

    forge = CertForge(ca)
    leaf = forge.leaf_for(HOST, now=NOW)
    leaf.certificate.verify_directly_issued_by(ca.intermediate_certificate)
    assert leaf.certificate.public_key() != token_key.public_key()  # leaves get their own keys
    handshake(leaf, ca.root_certificate, HOST, tmp_path)
    assert forge.leaf_for("other.example.test", now=NOW).host == "other.example.test"

    # Loaded again: the key is opened in the token again; `ca show` material says where it is.
    reloaded = CertificateAuthority.load(state, token=access)
    (status,) = [s for s in reloaded.key_files() if s.role == "intermediate"]
    assert status.token_uri == uri
    show = ["ca", "show", "--state-dir", str(state), "--pin-file", str(token.pin_file)]
    assert main(show) == 0
    assert f"in the PKCS#11 token {uri} (never leaves it)" in capsys.readouterr().out
    assert not status.present
    handshake(CertForge(reloaded).leaf_for(HOST, now=NOW), ca.root_certificate, HOST, tmp_path)

    # The key stays in the token across rotations: a URI is required, and another token key
    # gets a new intermediate under the same root.
    with pytest.raises(ConfigurationError) as excinfo:
        reloaded.rotate_intermediate(now=NOW)
    assert excinfo.value.reason == "token_key"
    second = token.uri("second")
    reloaded.rotate_intermediate(now=NOW, intermediate_key=second, token=access)
    assert reloaded.intermediate_key_uri == second
    assert reloaded.root_certificate == ca.root_certificate
    handshake(CertForge(reloaded).leaf_for(HOST, now=NOW), ca.root_certificate, HOST, tmp_path)
    # load_or_create with a key that is not the CA's says how to move to it.
    with pytest.raises(ConfigurationError) as excinfo:
        CertificateAuthority.load_or_create(state, now=NOW, intermediate_key=uri, token=access)
    assert excinfo.value.reason == "key_mismatch"
    assert "ca rotate --ca-key" in str(excinfo.value)
    assert (
        CertificateAuthority.load_or_create(
            state, now=NOW, intermediate_key=second, token=access
        ).intermediate_key_uri
        == second
    )


def test_an_org_intermediate_and_a_node_intermediate_can_keep_their_keys_in_the_token(
    token: SoftToken, access: TokenAccess, tmp_path: Path
) -> None:
    # The organisation's PKI certified the public key of a key made in the token.
    org_key = open_token_key(token.uri("org"), access)
    root = make_root("ACME Root CA")
    intermediate = issue(
        subject_cn="ACME Proxy Issuing CA",
        issuer=root,
        key=org_key,  # only its public key is used: the root signs
        ca=True,
        path_length=0,
        eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
        not_after=NOW + 365 * DAY,
    )
    ca = CertificateAuthority.import_intermediate(
        tmp_path / "org",
        certificates=[intermediate.cert, root.cert],
        key=token.uri("org"),
        now=NOW,
        token=access,
    )
    assert ca.intermediate_key_uri == token.uri("org")
    handshake(CertForge(ca).leaf_for(HOST, now=NOW), root.cert, HOST, tmp_path)
    reloaded = CertificateAuthority.load(tmp_path / "org", token=access)
    handshake(CertForge(reloaded).leaf_for(HOST, now=NOW), root.cert, HOST, tmp_path)

    # This installation's root certifies a node's token key; the node imports it by URI.
    installation = CertificateAuthority.create(tmp_path / "installation", now=NOW)
    node_key = open_token_key(token.uri("node"), access)
    node, generated = installation.issue_node_intermediate(
        "node-a", now=NOW, public_key=node_key.public_key()
    )
    assert generated is None
    assert node.certificate.public_key() == node_key.public_key()
    node_ca = CertificateAuthority.import_intermediate(
        tmp_path / "node-a",
        certificates=[node.certificate, installation.root_certificate],
        key=token.uri("node"),
        now=NOW,
        token=access,
    )
    handshake(
        CertForge(node_ca).leaf_for(HOST, now=NOW), installation.root_certificate, HOST, tmp_path
    )


def test_a_root_key_moved_into_the_token_signs_node_intermediates_crls_and_rotations(
    token: SoftToken,
    access: TokenAccess,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = tmp_path / "state"
    root = CertificateAuthority.create(state, now=NOW).root_certificate
    # The operator moves the root key into the token and off the disk.
    root_key_file = state / "ca" / "root.key"
    root_key = serialization.load_pem_private_key(root_key_file.read_bytes(), None)
    private_der, public_der = tmp_path / "root.p8", tmp_path / "root.spki"
    private_der.write_bytes(
        root_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_der.write_bytes(
        root_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    token.import_key(private_der, public_der, "root", "05")
    root_key_file.unlink()
    private_der.unlink()
    uri = token.uri("root")

    ca = CertificateAuthority.load(state, token=access)
    with pytest.raises(ConfigurationError) as excinfo:
        ca.issue_node_intermediate("node-a", now=NOW)
    assert excinfo.value.reason == "root_key_unavailable"
    with pytest.raises(ConfigurationError) as excinfo:  # another key of the token
        ca.issue_node_intermediate("node-a", now=NOW, root_key_file=token.uri("second"))
    assert excinfo.value.reason == "key_mismatch"
    node, _ = ca.issue_node_intermediate("node-a", now=NOW, root_key_file=uri)
    node.certificate.verify_directly_issued_by(root)  # signed through the token

    # The command line: revoke the node; the new CRL is signed through the token.
    pin = ["--pin-file", str(token.pin_file)]
    revoke = ["ca", "revoke-node-intermediate", "node-a", "--state-dir", str(state)]
    assert main([*revoke, "--root-key", uri, *pin]) == 0, capsys.readouterr().err
    reloaded = CertificateAuthority.load(state, token=access)
    crl = reloaded.stored_crl
    assert crl is not None
    assert crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
    serial = node.certificate.serial_number
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    reloaded.rotate_intermediate(now=NOW, root_key_file=uri)
    reloaded.intermediate_certificate.verify_directly_issued_by(root)
    handshake(CertForge(reloaded).leaf_for(HOST, now=NOW), root, HOST, tmp_path)


async def test_the_proxy_mints_through_a_token_off_the_event_loop(
    nursery: trio.Nursery,
    token: SoftToken,
    access: TokenAccess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A smart card takes tens of milliseconds a signature: the relay must not wait for it on
    the event loop. Every signature the token makes is recorded with the thread it ran in."""
    ca = CertificateAuthority.create(
        tmp_path / "state", now=NOW, intermediate_key=token.uri("issuing"), token=access
    )
    assert ca.signs_in_token
    upstream = good_hierarchy(HOST)
    origin_context = server_ssl_context(upstream.leaf, tmp_path)

    async def connector(host: str, port: int) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(serve_tls, theirs, origin_context, OriginStats())
        return ours

    interceptor = Interceptor(
        ca=ca,
        verifier=UpstreamVerifier(
            TrustConfig(
                replace_bundle=(upstream.root.cert,), own_certificates=ca.own_certificates()
            )
        ),
        hsts=HstsStore(preload=PreloadList.empty()),
        connector=connector,
    )
    signed_in: list[int] = []
    sign = TokenKey.sign

    def recording_sign(self: TokenKey, data: bytes, algorithm: object) -> bytes:
        signed_in.append(threading.get_ident())
        return sign(self, data, algorithm)  # type: ignore[arg-type]

    monkeypatch.setattr(TokenKey, "sign", recording_sign)
    client_end, proxy_end = trio.testing.memory_stream_pair()
    nursery.start_soon(lambda: interceptor.handle(proxy_end, client=("192.0.2.7", 5555)))
    await client_end.send_all(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
    assert (await client_end.receive_some(1024)).startswith(b"HTTP/1.1 200")
    client_context = ssl.create_default_context(cadata=ca.export_root().decode())
    tls = trio.SSLStream(client_end, client_context, server_hostname=HOST)
    await tls.do_handshake()  # the client accepted a leaf the token signed
    await tls.send_all(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    answer = b""
    with trio.fail_after(30):
        while not answer.endswith(b"hello from origin"):
            answer += await tls.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 200")
    await tls.aclose()
    assert signed_in  # the leaf was minted through the token...
    assert threading.get_ident() not in signed_in  # ...and never on the event loop's thread


def _env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TLSMITM_STATE_DIR", "TLSMITM_PKCS11_PIN", "XDG_DATA_HOME")
    }
    env["HOME"] = str(tmp_path)
    env["PYTHONPATH"] = str(REPO)
    return env


def test_cli_refuses_a_wrong_pin_a_missing_one_and_one_in_the_uri(
    token: SoftToken,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = tmp_path / "state"
    init = ["ca", "init", "--state-dir", str(state), "--ca-key"]
    # A wrong PIN, in a process of its own (this one is logged in to the token already, and
    # PKCS#11 logins belong to the process).
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("0000\n")
    result = subprocess.run(
        [sys.executable, "-m", "tlsmitm", *init, token.uri("issuing"), "--pin-file", str(wrong)],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "refused the PIN" in result.stderr
    assert result.stderr.count("\n") == 1
    monkeypatch.delenv("TLSMITM_PKCS11_PIN", raising=False)
    for uri, message in (
        (token.uri("issuing") + "&pin-value=" + PIN, "would be visible in ps"),
        (token.uri("issuing"), "TLSMITM_PKCS11_PIN"),  # no PIN given at all
    ):
        assert main([*init, uri]) == 1
        err = capsys.readouterr().err
        assert message in err
        assert err.count("\n") == 1
        assert PIN not in err
    assert not (state / "ca" / "ca.json").exists()


async def test_serve_with_the_issuing_key_in_the_token_is_trusted_by_curl(
    nursery: trio.Nursery, token: SoftToken, tmp_path: Path
) -> None:
    upstream = good_hierarchy(HOST)
    port, _ = await start_origin(nursery, tmp_path, upstream)
    state = tmp_path / "state"
    env = _env(tmp_path)
    env["TLSMITM_PKCS11_PIN"] = PIN  # the environment variable, the other PIN source
    args = [*upstream_args(tmp_path, upstream, HOST), "--ca-key", token.uri("issuing")]
    args += ["--workers", "2"]  # each worker process logs in to the token itself
    async with serve(state, *args, env=env) as served:
        # curl trusts the installation's root only
        result = await curl(
            "--proxy", served.proxy, "--cacert", str(state / "ca" / "root.pem"),
            f"https://{HOST}:{port}/",
        )  # fmt: skip
        await served.stop()
    assert result.stdout == b"hello from origin"
    assert b"exited with code" not in served.stderr  # no worker failed to open the token
    assert not list((state / "ca").glob("intermediate-*.key"))
    root = x509.load_pem_x509_certificate((state / "ca" / "root.pem").read_bytes())
    intermediate = x509.load_pem_x509_certificate(
        (state / "ca" / "intermediate-1.pem").read_bytes()
    )
    intermediate.verify_directly_issued_by(root)
    token_key = open_token_key(token.uri("issuing"), TokenAccess(pin=PIN.encode()))
    assert intermediate.public_key() == token_key.public_key()


def test_a_process_without_token_keys_never_loads_the_pkcs11_library() -> None:
    check = "import sys, tlsmitm, tlsmitm._cli_ca; assert 'pkcs11' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60, cwd=REPO)

"""TLS for the API, with a CA made here: the client refuses a server certificate from
another CA; with client certificates required, a caller without one is refused."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control.client import Client, ClientSettings
from control.errors import ServiceUnavailable
from tests.console_session import csrf_of
from tests.harness import REPO, Stack, free_port, wait_for

pytestmark = pytest.mark.integration


class Authority:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, where: Path, name: str, *, server: bool) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = where / f"{name}.pem", where / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path

    def save(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def serve_api(stack: Stack, tmp: Path, **tls: Path) -> Iterator[str]:
    port = free_port()
    env = dict(stack.env, TOOLPLANE_API_BIND=f"127.0.0.1:{port}")
    env.update({f"TOOLPLANE_API_{k.upper()}": str(v) for k, v in tls.items()})
    log = open(tmp / f"api-{port}.log", "wb")  # noqa: SIM115 - the child's
    proc = subprocess.Popen(
        [sys.executable, "-m", "control.cli", "api"], env=env, cwd=REPO, stdout=log, stderr=log
    )
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, timeout=60, what="the TLS API")
        assert proc.poll() is None, (tmp / f"api-{port}.log").read_text()
        yield f"https://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ours, theirs = Authority("toolplane test CA"), Authority("someone else's CA")
    server_cert, server_key = ours.issue(tmp_path, "server", server=True)
    forged_cert, forged_key = theirs.issue(tmp_path, "forged-server", server=True)
    client_cert, client_key = ours.issue(tmp_path, "caller", server=False)
    stranger_cert, stranger_key = theirs.issue(tmp_path, "stranger", server=False)
    return {
        "ca": ours.save(tmp_path / "ca.pem"),
        "other_ca": theirs.save(tmp_path / "other-ca.pem"),
        "server_cert": server_cert,
        "server_key": server_key,
        "forged_cert": forged_cert,
        "forged_key": forged_key,
        "client_cert": client_cert,
        "client_key": client_key,
        "stranger_cert": stranger_cert,
        "stranger_key": stranger_key,
    }


def client(url: str, token: str, **files: Path) -> Client:
    return Client(settings=ClientSettings(url=url, token=token, **files))


def test_the_client_verifies_the_server_against_its_ca(
    stack: Stack, tmp_path: Path, pki: dict[str, Path]
) -> None:
    token = stack.tenant()
    with serve_api(stack, tmp_path, cert=pki["server_cert"], key=pki["server_key"]) as url:
        with client(url, token, ca_bundle=pki["ca"]) as good:
            assert good.policy().version
            assert good.call("search_docs", {"query": "tls"}, wait=True).status == "completed"
        with client(url, token, ca_bundle=pki["other_ca"]) as wary:
            with pytest.raises(ServiceUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                wary.policy()
    # a server whose certificate another CA signed (an impostor) is refused
    with serve_api(stack, tmp_path, cert=pki["forged_cert"], key=pki["forged_key"]) as url:
        with client(url, token, ca_bundle=pki["ca"]) as wary:
            with pytest.raises(ServiceUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                wary.policy()


def test_client_certificates_required(stack: Stack, tmp_path: Path, pki: dict[str, Path]) -> None:
    token = stack.tenant()
    with serve_api(
        stack,
        tmp_path,
        cert=pki["server_cert"],
        key=pki["server_key"],
        client_ca=pki["ca"],
    ) as url:
        with client(url, token, ca_bundle=pki["ca"]) as anonymous:
            with pytest.raises(ServiceUnavailable):
                anonymous.policy()
        with client(
            url,
            token,
            ca_bundle=pki["ca"],
            client_cert=pki["stranger_cert"],
            client_key=pki["stranger_key"],
        ) as stranger:
            with pytest.raises(ServiceUnavailable):
                stranger.policy()
        with client(
            url,
            token,
            ca_bundle=pki["ca"],
            client_cert=pki["client_cert"],
            client_key=pki["client_key"],
        ) as known:
            assert known.policy().tenant
            # the certificate opens the door; the token still decides who you are
        with client(
            url,
            "tp_" + "x" * 43,
            ca_bundle=pki["ca"],
            client_cert=pki["client_cert"],
            client_key=pki["client_key"],
        ) as no_token:
            from control.errors import AuthError

            with pytest.raises(AuthError):
                no_token.policy()


def test_client_ca_without_tls_is_refused_at_start(stack: Stack, tmp_path: Path) -> None:
    env = dict(stack.env, TOOLPLANE_API_CLIENT_CA=str(tmp_path / "ca.pem"))
    env["TOOLPLANE_API_BIND"] = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "control.cli", "api"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: TOOLPLANE_API_CLIENT_CA: client certificates need TLS: set TOOLPLANE_API_CERT "
        "and TOOLPLANE_API_KEY"
    )


def test_the_consoles_cookie_is_secure_under_tls(
    stack: Stack, tmp_path: Path, pki: dict[str, Path]
) -> None:
    token = stack.tenant()
    with serve_api(stack, tmp_path, cert=pki["server_cert"], key=pki["server_key"]) as url:
        trusted = ssl.create_default_context(cafile=str(pki["ca"]))
        with httpx.Client(base_url=url, verify=trusted, timeout=30) as browser:
            page = browser.get("/console/sign-in")
            done = browser.post(
                "/console/sign-in", data={"csrf": csrf_of(page.text), "token": token}
            )
            assert done.status_code == 303, done.text
            cookie = next(
                c for c in done.headers.get_list("set-cookie") if c.startswith("tp_console=")
            )
            flags = [f.strip().lower() for f in cookie.split(";")]
            assert {"secure", "httponly", "samesite=strict"} <= set(flags)
            assert browser.get("/console/inbox").status_code == 200

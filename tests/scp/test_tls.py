"""TLS on the listener: server certificate, and client certificates when a CA is configured."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.scp.conftest import Running, associate


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(directory: Path, name: str, extension: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
    (directory / f"{name}.ext").write_text(extension)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require_tool("openssl")
    directory = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca",
             cwd=directory)
    _issue(directory, "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _issue(directory, "client", "extendedKeyUsage=clientAuth\n")
    return Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key",
               directory / "client.pem", directory / "client.key")


def _client(pki: Pki, with_certificate: bool) -> tuple[ssl.SSLContext, str]:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if with_certificate:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context, "127.0.0.1"


def test_tls_listener_serves_tls_and_refuses_plain_tcp(
    start_scp_sqlite: Callable[..., Running], pki: Pki
) -> None:
    scp = start_scp_sqlite(tls_cert=pki.server_cert, tls_key=pki.server_key)
    with associate(scp.port, tls_args=_client(pki, with_certificate=False)) as assoc:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
    with associate(scp.port) as plain:
        assert not plain.is_established


def test_client_certificate_required_when_a_ca_is_configured(
    start_scp_sqlite: Callable[..., Running], pki: Pki
) -> None:
    scp = start_scp_sqlite(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_ca=pki.ca)
    with associate(scp.port, tls_args=_client(pki, with_certificate=False)) as anonymous:
        assert not anonymous.is_established
    with associate(scp.port, tls_args=_client(pki, with_certificate=True)) as assoc:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000

"""Our pynetdicom plumbing is really in use (a pynetdicom upgrade must not silently drop it)."""

from __future__ import annotations

from scp.transport import ReceivingSocket
from tests.scp.conftest import Running, associate, wait_for


def test_associations_read_with_the_receiving_socket(scp_sqlite: Running) -> None:
    server = scp_sqlite.service.listener._server
    assert server is not None
    with associate(scp_sqlite.port) as assoc:
        assert assoc.send_c_echo().Status == 0x0000
        active = wait_for(lambda: server.active_associations, timeout=10, message="acceptor")
        assert all(type(a.dul.socket) is ReceivingSocket for a in active)  # type: ignore[union-attr]

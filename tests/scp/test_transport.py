"""Our pynetdicom plumbing is really in use (a pynetdicom upgrade must not silently drop it)."""

from __future__ import annotations

from ctdx.scp.transport import EventDrivenAssociation, EventDrivenDUL, ReceivingSocket
from tests.scp.conftest import Running, associate, wait_for


def test_associations_read_with_the_receiving_socket(scp_sqlite: Running) -> None:
    server = scp_sqlite.service.listener._server
    assert server is not None
    with associate(scp_sqlite.port) as assoc:
        assert assoc.send_c_echo().Status == 0x0000
        active = wait_for(lambda: server.active_associations, timeout=10, message="acceptor")
        assert all(type(a.dul.socket) is ReceivingSocket for a in active)  # type: ignore[union-attr]
        # both threads of the association wait for work instead of sleep-polling
        assert all(type(a) is EventDrivenAssociation for a in active)
        assert all(type(a.dul) is EventDrivenDUL for a in active)
        import pynetdicom.association
        import pynetdicom.dul

        assert pynetdicom.dul.time.__class__.__name__ == "_Clock"
        assert pynetdicom.association.time.__class__.__name__ == "_Clock"


def _command_set(message_class: type, primitive: object) -> object:
    message = message_class()
    message.primitive_to_message(primitive)
    return message.command_set


def test_command_set_encoder_matches_pydicom_for_what_the_listener_sends() -> None:
    from pynetdicom.dimse_messages import (
        C_ECHO_RSP,
        C_STORE_RQ,
        C_STORE_RSP,
        N_CREATE_RSP,
        N_SET_RSP,
    )
    from pynetdicom.dimse_primitives import C_ECHO, C_STORE, N_CREATE, N_SET
    from pynetdicom.dsutils import encode

    from ctdx.scp.command_set import encode_command_set

    store = C_STORE()
    store.MessageIDBeingRespondedTo = 7
    store.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    store.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1055868216598829884275730475571"
    store.Status = 0x0000
    refused = C_STORE()
    refused.MessageIDBeingRespondedTo = 65535
    refused.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    refused.AffectedSOPInstanceUID = "1.2.3"
    refused.Status = 0xA901
    refused.ErrorComment = "Pixel Data length 131071, header implies 131072"
    request = C_STORE()
    request.MessageID = 3
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    request.AffectedSOPInstanceUID = "1.2.34"
    request.Priority = 2
    request.MoveOriginatorApplicationEntityTitle = "MOVER"
    request.MoveOriginatorMessageID = 9
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    echo.Status = 0
    created = N_CREATE()
    created.MessageIDBeingRespondedTo = 2
    created.AffectedSOPClassUID = "1.2.840.10008.3.1.2.3.3"
    created.AffectedSOPInstanceUID = "1.2.3.4.5"
    created.Status = 0x0111
    created.ErrorComment = "MPPS instance already exists"
    updated = N_SET()
    updated.MessageIDBeingRespondedTo = 4
    updated.AffectedSOPClassUID = "1.2.840.10008.3.1.2.3.3"
    updated.AffectedSOPInstanceUID = "1.2.3.4.5"
    updated.Status = 0
    cases = [(C_STORE_RSP, store), (C_STORE_RSP, refused), (C_STORE_RQ, request),
             (C_ECHO_RSP, echo), (N_CREATE_RSP, created), (N_SET_RSP, updated)]
    for message_class, primitive in cases:
        command_set = _command_set(message_class, primitive)
        fast = encode_command_set(command_set)  # type: ignore[arg-type]
        assert fast is not None
        assert fast == encode(command_set, True, True)  # type: ignore[arg-type]


def test_command_set_encoder_declines_what_it_does_not_know() -> None:
    from pydicom import Dataset

    from ctdx.scp.command_set import encode_command_set

    not_a_command = Dataset()
    not_a_command.PatientID = "X"
    assert encode_command_set(not_a_command) is None
    odd_vr = Dataset()
    odd_vr.OffendingElement = [0x00100010]  # AT: left to pydicom
    assert encode_command_set(odd_vr) is None


def test_ended_associations_give_their_descriptors_back(scp_sqlite: Running) -> None:
    """Each association's wake-up pipe is closed when it ends, not when the GC gets to it."""
    import gc
    import os

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    for _ in range(3):  # warm up: pools, logging, first-use allocations
        with associate(scp_sqlite.port) as assoc:
            assert assoc.send_c_echo().Status == 0x0000
    server = scp_sqlite.service.listener._server
    assert server is not None
    wait_for(lambda: not server.active_associations, timeout=10, message="associations ended")
    before = open_fds()
    gc.disable()  # the descriptors must come back without a collection
    try:
        for _ in range(30):
            with associate(scp_sqlite.port) as assoc:
                assert assoc.send_c_echo().Status == 0x0000
        wait_for(lambda: not server.active_associations, timeout=10,
                 message="associations ended")
        wait_for(lambda: open_fds() <= before + 4, timeout=10,
                 message=f"descriptors back (before {before}, now {open_fds()})")
    finally:
        gc.enable()

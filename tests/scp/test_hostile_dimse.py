"""Hostile or broken peers at the DIMSE and data set level: never a wrong success.

Each class of bad input is sent on a real association (pynetdicom as the
requestor; raw P-DATA-TF PDUs where pynetdicom would never produce the
framing), on the listener's fast path and on pynetdicom's receive path, with
a good instance after it on the same association: the good one must be
stored byte for byte and recorded, the bad one answered with the status
``docs/dicom-conformance.md`` gives it, and nothing of it left in the spool.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    Verification,
)
from sqlalchemy import select

from ctdx.db.models import Instance
from ctdx.db.session import session_scope
from tests.conftest import wait_for
from tests.scp.conftest import Running, associate, chunked_send, phantom, status_of

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

CT = str(CTImageStorage)


# --- building data sets and commands by hand ---------------------------------------------------

def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (long form for the VRs that need it)."""
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV"):
        return struct.pack("<HH", group, element) + vr + b"\x00\x00" + struct.pack(
            "<L", len(value)) + value
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value


def _data_set_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file (explicit VR little endian File Meta), as it is on disk."""
    raw = path.read_bytes()
    group_length = struct.unpack_from("<L", raw, 140)[0]
    return raw[144 + group_length:]


def _pixel_data_offset(data_set: bytes) -> int:
    offset = data_set.find(b"\xe0\x7f\x10\x00OW")
    assert offset > 0
    return offset


def _with_file_meta(path: Path, data_set: bytes, sop_instance_uid: str,
                    syntax: str = ExplicitVRLittleEndian, sop_class_uid: str = CT) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    path.write_bytes(buffer.getvalue() + data_set)
    return path


def _nested(depth: int, defined: bool) -> bytes:
    """Referenced Image Sequence items nested ``depth`` deep (well formed)."""
    inner = _element(0x0008, 0x1150, b"UI", b"1.2.3\x00")
    for _ in range(depth):
        if defined:
            item = struct.pack("<HHL", 0xFFFE, 0xE000, len(inner)) + inner
            inner = _element(0x0008, 0x1140, b"SQ", item)
        else:
            item = (struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner
                    + struct.pack("<HHL", 0xFFFE, 0xE00D, 0))
            inner = (struct.pack("<HH", 0x0008, 0x1140) + b"SQ\x00\x00"
                     + struct.pack("<L", 0xFFFFFFFF) + item
                     + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    return inner


def _command(fields: list[tuple[int, bytes]]) -> bytes:
    """An implicit VR little endian command set with its group length."""
    body = b"".join(struct.pack("<HHL", 0x0000, element, len(value)) + value
                    for element, value in fields)
    return struct.pack("<HHL", 0, 0, 4) + struct.pack("<L", len(body)) + body


def _uid_value(uid: bytes) -> bytes:
    return uid + b"\x00" if len(uid) % 2 else uid


def _store_command(sop_class: bytes | None, sop_instance: bytes | None,
                   message_id: int = 1) -> bytes:
    fields: list[tuple[int, bytes]] = []
    if sop_class is not None:
        fields.append((0x0002, _uid_value(sop_class)))
    fields += [(0x0100, struct.pack("<H", 0x0001)), (0x0110, struct.pack("<H", message_id)),
               (0x0700, struct.pack("<H", 2)), (0x0800, struct.pack("<H", 0x0000))]
    if sop_instance is not None:
        fields.append((0x1000, _uid_value(sop_instance)))
    return _command(fields)


def _echo_command(message_id: int = 1) -> bytes:
    return _command([(0x0002, _uid_value(str(Verification).encode())),
                     (0x0100, struct.pack("<H", 0x0030)),
                     (0x0110, struct.pack("<H", message_id)),
                     (0x0800, struct.pack("<H", 0x0101))])


def _pdu(*pdvs: tuple[int, int, bytes]) -> bytes:
    items = b"".join(struct.pack(">LBB", len(data) + 2, cid, control) + data
                     for cid, control, data in pdvs)
    return struct.pack(">BBL", 0x04, 0x00, len(items)) + items


# --- the listener side ------------------------------------------------------------------------

def _rows(running: Running) -> dict[str, tuple[str, str]]:
    with session_scope(running.engine) as s:
        return {i.sop_instance_uid: (i.path, i.sha256) for i in s.scalars(select(Instance))}


def _assert_stored_exactly(running: Running, sent: dict[str, bytes]) -> None:
    """Every instance in ``sent`` (SOP Instance UID -> data set bytes) and nothing else is in
    the spool and the database, the spool file holding exactly the data set sent."""
    wait_for(lambda: len(_rows(running)) == len(sent), timeout=30, message="rows written")
    rows = _rows(running)
    assert set(rows) == set(sent)
    for uid, data_set in sent.items():
        relative, sha256 = rows[uid]
        stored = (running.spool / relative).read_bytes()
        assert stored.endswith(data_set)
        assert _data_set_bytes(running.spool / relative) == data_set
        assert hashlib.sha256(stored).hexdigest() == sha256
    assert len(running.spool_files()) == len(sent)


def _no_leftovers(running: Running) -> None:
    wait_for(lambda: running.incoming_files() == [], timeout=20,
             message=".incoming empty once the association ended")


class RawPeer:
    """Raw PDUs on an established association; the statuses of the responses it gets."""

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc
        self.statuses: list[int] = []
        self.comments: list[str] = []
        self.context_ids = {str(c.abstract_syntax): int(c.context_id or 0)
                            for c in assoc.accepted_contexts}

    def on_message(self, event: evt.Event) -> None:
        command_set = event.message.command_set
        if command_set.CommandField & 0x8000:
            self.statuses.append(int(command_set.Status))
            self.comments.append(str(command_set.get("ErrorComment", "")))

    def send(self, data: bytes) -> None:
        self.assoc.dul.socket.send(data)  # type: ignore[union-attr]

    def request(self, command: bytes, data_set: bytes | None, sop_class: str = CT) -> int:
        """One request in one PDU; its response status."""
        cid = self.context_ids[sop_class]
        pdvs = [(cid, 0x03, command)]
        if data_set is not None:
            pdvs.append((cid, 0x02, data_set))
        before = len(self.statuses)
        self.send(_pdu(*pdvs))
        wait_for(lambda: len(self.statuses) > before or not self.assoc.is_established,
                 timeout=30, message="a response")
        assert self.assoc.is_established, "the listener ended the association"
        return self.statuses[before]


@contextmanager
def raw_peer(running: Running, syntax: str = ExplicitVRLittleEndian) -> Iterator[RawPeer]:
    holder: list[RawPeer] = []

    def on_message(event: evt.Event) -> None:
        holder[0].on_message(event)

    with associate(running.port, [syntax],
                   evt_handlers=[(evt.EVT_DIMSE_RECV, on_message)]) as assoc:
        assert assoc.is_established
        holder.append(RawPeer(assoc))
        yield holder[0]


@pytest.fixture(params=[True, False], ids=["fast-path", "pynetdicom-path"])
def listener(request: pytest.FixtureRequest,
             start_scp_sqlite: Callable[..., Running]) -> Running:
    return start_scp_sqlite(fast_receive=request.param)


@pytest.fixture
def good(tmp_path: Path) -> Callable[[], tuple[str, bytes]]:
    """Fresh good instances: (SOP Instance UID, data set bytes)."""
    series = phantom(tmp_path, "good", n_slices=8, size=32)
    taken = iter(range(8))

    def next_good() -> tuple[str, bytes]:
        i = next(taken)
        return series.sop_instance_uids[i], _data_set_bytes(series.paths[i])

    return next_good


@pytest.fixture
def template(tmp_path: Path) -> tuple[str, bytes]:
    """One more good instance to spoil: (SOP Instance UID, data set bytes)."""
    series = phantom(tmp_path, "template", n_slices=1, size=32)
    return series.sop_instance_uids[0], _data_set_bytes(series.paths[0])


# --- DIMSE: the command against its presentation context ------------------------------------

@pytest.mark.parametrize("sop_class", [MRImageStorage, EnhancedCTImageStorage],
                         ids=["MR", "Enhanced-CT"])
def test_store_whose_sop_class_is_not_the_contexts_is_refused(
    listener: Running, good: Callable[[], tuple[str, bytes]], sop_class: str
) -> None:
    uid, data_set = good()
    if sop_class == MRImageStorage:  # the data set says MR too: only the context disagrees
        data_set = data_set.replace(CT.encode() + b"\x00", str(sop_class).encode() + b"\x00", 1)
    with raw_peer(listener) as peer:
        status = peer.request(_store_command(str(sop_class).encode(), uid.encode()), data_set)
        assert status == 0x0122
        assert "SOP class" in peer.comments[-1]
        good_uid, good_set = good()
        assert peer.request(_store_command(CT.encode(), good_uid.encode()), good_set) == 0
    _assert_stored_exactly(listener, {good_uid: good_set})
    _no_leftovers(listener)


def test_verification_on_a_storage_context_is_not_a_success(
    listener: Running, good: Callable[[], tuple[str, bytes]]
) -> None:
    with raw_peer(listener) as peer:
        assert peer.request(_echo_command(), None) == 0x0122
        assert peer.request(_echo_command(2), None, sop_class=str(Verification)) == 0x0000
        good_uid, good_set = good()
        assert peer.request(_store_command(CT.encode(), good_uid.encode(), 3), good_set) == 0
    _assert_stored_exactly(listener, {good_uid: good_set})


BAD_COMMAND_UIDS = [
    ("missing", None, 0xC220),
    ("empty", b"", 0xC220),
    ("nul", b"\x00", 0xC220),
    ("spaces", b"  ", 0xC220),
    ("backslash", b"1.2\\3.4", 0xC221),
    ("binary", b"\xff\xfe\x00\x01", 0xC221),
    ("70-characters", b"1.2." + b"3" * 66, 0xC221),
    ("non-ascii", "1.2.3.\u00e9".encode(), 0xC221),
    ("path", b"1.2.3/../../x", 0xC221),
]


@pytest.mark.parametrize(("name", "uid", "status"), BAD_COMMAND_UIDS,
                         ids=[c[0] for c in BAD_COMMAND_UIDS])
def test_store_without_a_valid_affected_sop_instance_uid_gets_its_status(
    listener: Running, good: Callable[[], tuple[str, bytes]], template: tuple[str, bytes],
    name: str, uid: bytes | None, status: int,
) -> None:
    with raw_peer(listener) as peer:
        assert peer.request(_store_command(CT.encode(), uid), template[1]) == status
        good_uid, good_set = good()
        assert peer.request(_store_command(CT.encode(), good_uid.encode(), 2), good_set) == 0
    _assert_stored_exactly(listener, {good_uid: good_set})
    _no_leftovers(listener)


# --- the data set's structure -----------------------------------------------------------------

def _trailing_garbage(data_set: bytes) -> bytes:
    return data_set + b"\x01\x02\x03 these bytes are no element"


def _trailing_short(data_set: bytes) -> bytes:
    return data_set + b"\x00\x00\x00"


def _wrong_item_tag(data_set: bytes) -> bytes:
    inner = _element(0x0008, 0x1150, b"UI", b"1.2.3\x00")
    bad_item = struct.pack("<HHL", 0x0008, 0x0016, len(inner)) + inner
    at = _pixel_data_offset(data_set)
    return data_set[:at] + _element(0x0008, 0x1140, b"SQ", bad_item) + data_set[at:]


def _two_pixel_data(data_set: bytes) -> bytes:
    at = _pixel_data_offset(data_set)
    return data_set + data_set[at:]


def _frames(value: bytes) -> Callable[[bytes], bytes]:
    def spoil(data_set: bytes) -> bytes:
        at = _pixel_data_offset(data_set)
        # (0028,0008) belongs before (0028,0010) Rows
        rows = data_set.find(b"\x28\x00\x10\x00US")
        assert 0 < rows < at
        padded = value + b" " if len(value) % 2 else value
        return data_set[:rows] + _element(0x0028, 0x0008, b"IS", padded) + data_set[rows:]
    return spoil


def _random_bytes(data_set: bytes) -> bytes:
    return hashlib.sha512(b"random").digest() * 40


def _random_bytes_high_tag(data_set: bytes) -> bytes:
    """Random bytes whose first "tag" sorts after Pixel Data (a walk that stops there sees an
    empty data set and would call it a missing UID)."""
    return b"\xf0\xff\x10\x00" + hashlib.sha512(b"other").digest() * 40


def _nesting(depth: int, defined: bool) -> Callable[[bytes], bytes]:
    def spoil(data_set: bytes) -> bytes:
        at = _pixel_data_offset(data_set)
        return data_set[:at] + _nested(depth, defined) + data_set[at:]
    return spoil


STRUCTURE_CASES: list[tuple[str, Callable[[bytes], bytes], int, str]] = [
    ("trailing-garbage", _trailing_garbage, 0xC210, "cannot be parsed"),
    ("trailing-3-bytes", _trailing_short, 0xC210, "cannot be parsed"),
    ("item-tag-not-item", _wrong_item_tag, 0xC210, "cannot be parsed"),
    ("two-pixel-data", _two_pixel_data, 0xC210, "cannot be parsed"),
    ("frames-1.5", _frames(b"1.5"), 0xA901, "Number of Frames"),
    ("frames-abc", _frames(b"abc"), 0xA901, "Number of Frames"),
    ("frames-0", _frames(b"0"), 0xA901, "Number of Frames"),
    ("random-bytes", _random_bytes, 0xC210, "cannot be parsed"),
    ("random-bytes-high-tag", _random_bytes_high_tag, 0xC210, "cannot be parsed"),
    ("nested-200-undefined", _nesting(200, defined=False), 0xC210, "nested deeper"),
    ("nested-3000-undefined", _nesting(3000, defined=False), 0xC210, "nested deeper"),
    ("nested-200-defined", _nesting(200, defined=True), 0xC210, "nested deeper"),
]


@pytest.mark.parametrize(("name", "spoil", "status", "reason"), STRUCTURE_CASES,
                         ids=[c[0] for c in STRUCTURE_CASES])
def test_structurally_broken_data_set_is_refused(
    listener: Running, tmp_path: Path, good: Callable[[], tuple[str, bytes]],
    template: tuple[str, bytes], name: str, spoil: Callable[[bytes], bytes], status: int,
    reason: str,
) -> None:
    uid, data_set = template
    bad = _with_file_meta(tmp_path / f"{name}.dcm", spoil(data_set), uid)
    good_uid, good_set = good()
    good_file = _with_file_meta(tmp_path / "good.dcm", good_set, good_uid)
    with chunked_send(), associate(listener.port, [ExplicitVRLittleEndian]) as assoc:
        response = assoc.send_c_store(bad)
        assert (status_of(response), name) == (status, name)
        assert reason in response.ErrorComment
        assert status_of(assoc.send_c_store(good_file)) == 0x0000
    _assert_stored_exactly(listener, {good_uid: good_set})
    _no_leftovers(listener)


def test_nesting_within_the_limit_is_stored(
    scp_sqlite: Running, tmp_path: Path, template: tuple[str, bytes]
) -> None:
    uid, data_set = template
    nested = data_set[:_pixel_data_offset(data_set)] + _nested(8, False) + _nested(
        8, True).replace(b"\x08\x00\x40\x11", b"\x08\x00\x41\x11", 1) + data_set[
        _pixel_data_offset(data_set):]
    path = _with_file_meta(tmp_path / "nested.dcm", nested, uid)
    with chunked_send(), associate(scp_sqlite.port, [ExplicitVRLittleEndian]) as assoc:
        assert status_of(assoc.send_c_store(path)) == 0x0000
    _assert_stored_exactly(scp_sqlite, {uid: nested})


# --- deflated data sets -----------------------------------------------------------------------

def _deflate(data_set: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(data_set) + compressor.flush()
    return deflated + b"\x00" if len(deflated) % 2 else deflated


def test_deflated_data_set_is_inflated_to_disk_and_stored_as_sent(
    scp_sqlite: Running, tmp_path: Path, template: tuple[str, bytes]
) -> None:
    uid, data_set = template
    deflated = _deflate(data_set)
    path = _with_file_meta(tmp_path / "deflated.dcm", deflated, uid,
                           syntax=DeflatedExplicitVRLittleEndian)
    with chunked_send(), associate(scp_sqlite.port, [DeflatedExplicitVRLittleEndian]) as assoc:
        assert status_of(assoc.send_c_store(path)) == 0x0000
    _assert_stored_exactly(scp_sqlite, {uid: deflated})
    assert pydicom.dcmread(next(iter(scp_sqlite.spool_files()))).PixelData == pydicom.dcmread(
        _with_file_meta(tmp_path / "plain.dcm", data_set, uid)).PixelData


def test_deflated_data_set_over_the_limit_is_refused(
    scp_sqlite: Running, tmp_path: Path, template: tuple[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ctdx.scp import deflate

    monkeypatch.setattr(deflate, "MAX_INFLATED_BYTES", 1 << 20)
    uid, data_set = template
    at = _pixel_data_offset(data_set)
    padding = _element(0x0009, 0x0010, b"LO", b"BOMB") + _element(
        0x0009, 0x1000, b"OB", b"\x00" * (4 << 20))  # a private 4 MiB of zeros
    bomb = _deflate(data_set[:at] + padding + data_set[at:])
    assert len(bomb) < 64_000
    path = _with_file_meta(tmp_path / "bomb.dcm", bomb, uid, syntax=DeflatedExplicitVRLittleEndian)
    with chunked_send(), associate(scp_sqlite.port, [DeflatedExplicitVRLittleEndian]) as assoc:
        response = assoc.send_c_store(path)
        assert status_of(response) == 0xA700
        assert "inflates to more than" in response.ErrorComment
    assert scp_sqlite.instance_count() == 0 and scp_sqlite.spool_files() == []
    _no_leftovers(scp_sqlite)


# --- generated input ----------------------------------------------------------------------------

_VRS = [b"AE", b"CS", b"DS", b"IS", b"LO", b"OB", b"OW", b"SH", b"SQ", b"UI", b"UL", b"UN", b"US",
        b"XX", b"\x00\x00"]


@st.composite
def _spoiled(draw: st.DrawFn, data_set: bytes) -> bytes:
    """A data set with generated elements inserted, bytes flipped, cut or appended."""
    kind = draw(st.sampled_from(["insert", "flip", "cut", "append", "element-bytes"]))
    at = draw(st.integers(0, len(data_set)))
    if kind == "flip":
        at = min(at, len(data_set) - 1)
        value = draw(st.integers(0, 255))
        return data_set[:at] + bytes([value]) + data_set[at + 1:]
    if kind == "cut":
        return data_set[:at]
    if kind == "append":
        return data_set + draw(st.binary(min_size=1, max_size=64))
    group = draw(st.sampled_from([0x0008, 0x0010, 0x0020, 0x0028, 0x7FE0, 0xFFFE, 0x0009]))
    element = draw(st.integers(0, 0xFFFF))
    vr = draw(st.sampled_from(_VRS))
    value = draw(st.binary(max_size=40))
    if kind == "element-bytes":
        raw = struct.pack("<HH", group, element) + vr + draw(st.binary(min_size=2, max_size=6))
    else:
        raw = _element(group, element, vr if len(vr) == 2 else b"UN", value)
    return data_set[:at] + raw + data_set[at:]


_ALLOWED = {0x0000, 0xA900, 0xA901, 0xA902, 0xC210, 0xC220, 0xC221, 0x0111}


def _parses_whole(path: Path) -> bool:
    """pydicom reads every element (sequences included) and the pixel data length fits."""
    try:
        ds = pydicom.dcmread(path)
        for element in ds.iterall():
            _ = element.value
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                    * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) // 8)
        return len(ds.PixelData) in (expected, expected + 1)
    except Exception:
        return False


def test_generated_data_sets_never_get_a_wrong_success(
    listener: Running, tmp_path: Path, good: Callable[[], tuple[str, bytes]],
    template: tuple[str, bytes],
) -> None:
    """A few hundred generated data sets (inserted elements, flipped, cut or appended
    bytes): each is answered with a documented status on an association that goes on; one
    answered 0x0000 is a whole instance pydicom reads; good instances between them are stored
    byte for byte."""
    uid, data_set = template
    outcomes: dict[int, int] = {}
    with chunked_send(), associate(listener.port, [ExplicitVRLittleEndian]) as assoc:

        @settings(max_examples=150, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(spoiled=_spoiled(data_set))
        def one(spoiled: bytes) -> None:
            path = _with_file_meta(tmp_path / "generated.dcm", spoiled, uid)
            response = assoc.send_c_store(path)
            status = status_of(response)
            assert assoc.is_established
            assert status in _ALLOWED, hex(status)
            outcomes[status] = outcomes.get(status, 0) + 1
            if status == 0x0000:
                assert _parses_whole(path)
                # stored, or an identical duplicate of what is stored: the same bytes either way
                (stored,) = [p for p in listener.spool_files() if p.stem == uid]
                assert _data_set_bytes(stored) == spoiled

        one()
        good_uid, good_set = good()
        good_file = _with_file_meta(tmp_path / "good.dcm", good_set, good_uid)
        assert status_of(assoc.send_c_store(good_file)) == 0x0000
    assert outcomes.get(0xC210, 0) > 0
    _no_leftovers(listener)
    wait_for(lambda: good_uid in _rows(listener), timeout=30, message="good row")
    relative, sha256 = _rows(listener)[good_uid]
    assert _data_set_bytes(listener.spool / relative) == good_set
    assert hashlib.sha256((listener.spool / relative).read_bytes()).hexdigest() == sha256


def test_generated_affected_sop_instance_uids(
    listener: Running, template: tuple[str, bytes], good: Callable[[], tuple[str, bytes]]
) -> None:
    """Generated Affected SOP Instance UIDs in the command: success only for the data set's
    own UID, a documented status otherwise, the association always going on."""
    uid, data_set = template
    with raw_peer(listener) as peer:
        counter = iter(range(2, 100_000))

        @settings(max_examples=150, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(candidate=st.one_of(
            st.binary(max_size=80),
            st.from_regex(rb"[0-9]{1,10}(\.[0-9]{1,20}){0,8}", fullmatch=True),
            st.text(max_size=70).map(lambda t: t.encode("utf-8")),
        ))
        def one(candidate: bytes) -> None:
            status = peer.request(_store_command(CT.encode(), candidate, next(counter)), data_set)
            assert status in {0x0000, 0xA902, 0xC220, 0xC221}, hex(status)
            if status == 0x0000:
                assert candidate.rstrip(b"\x00 ") == uid.encode()

        one()
        good_uid, good_set = good()
        assert peer.request(_store_command(CT.encode(), good_uid.encode(), 1), good_set) == 0
    _assert_stored_exactly(listener, {good_uid: good_set})
    _no_leftovers(listener)


# --- association end ----------------------------------------------------------------------------

def test_a_data_set_cut_off_by_an_abort_leaves_nothing_in_incoming(
    listener: Running, template: tuple[str, bytes]
) -> None:
    uid, data_set = template
    with raw_peer(listener) as peer:
        cid = peer.context_ids[CT]
        peer.send(_pdu((cid, 0x03, _store_command(CT.encode(), uid.encode()))))
        peer.send(_pdu((cid, 0x00, data_set[:500])))
        wait_for(lambda: listener.incoming_files(), timeout=10, message="partial file")
        peer.assoc.abort()
    _no_leftovers(listener)


def test_implicit_vr_structure_is_walked(scp_sqlite: Running, tmp_path: Path) -> None:
    series = phantom(tmp_path, "implicit", n_slices=2, size=32,
                     transfer_syntax_uid=None)
    ds = pydicom.dcmread(series.paths[0])
    ds.ReferencedImageSequence = pydicom.Sequence([Dataset()])
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    good_path = tmp_path / "implicit-good.dcm"
    ds.save_as(good_path, enforce_file_format=True)
    bad = good_path.read_bytes() + b"\x10\x00\x10\x00\xff\x00\x00\x00"
    bad_path = tmp_path / "implicit-bad.dcm"
    bad_path.write_bytes(bad)
    with chunked_send(), associate(scp_sqlite.port, [ImplicitVRLittleEndian]) as assoc:
        assert status_of(assoc.send_c_store(bad_path)) == 0xC210
        assert status_of(assoc.send_c_store(good_path)) == 0x0000
    _assert_stored_exactly(scp_sqlite, {str(ds.SOPInstanceUID): _data_set_bytes(good_path)})


# --- MPPS (PS3.4 Annex F) ------------------------------------------------------------------------

def _step(status: str | None) -> Dataset:
    ds = Dataset()
    if status is not None:
        ds.PerformedProcedureStepStatus = status
    step = Dataset()
    step.StudyInstanceUID = generate_uid()
    ds.ScheduledStepAttributesSequence = pydicom.Sequence([step])
    ds.Modality = "CT"
    return ds


N_CREATE_STATUSES = [
    ("IN PROGRESS", 0x0000),
    ("COMPLETED", 0x0106),
    ("DISCONTINUED", 0x0106),
    ("in progress", 0x0106),
    ("In Progress", 0x0106),
    ("SCHEDULED", 0x0106),
    ("IN PROGRESS\\COMPLETED", 0x0106),
    ("", 0x0120),
    (None, 0x0120),
]


def test_mpps_statuses_follow_annex_f(scp_sqlite: Running) -> None:
    """N-CREATE must start IN PROGRESS (F.7.2.1: else 0x0106, absent 0x0120); N-SET may only
    set the three Defined Terms (else 0x0106) and only while IN PROGRESS (0x0110)."""
    from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

    previous = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        with associate(scp_sqlite.port) as assoc:
            for value, expected in N_CREATE_STATUSES:
                status, _ = assoc.send_n_create(_step(value), ModalityPerformedProcedureStep,
                                                generate_uid())
                assert (value, int(status.Status)) == (value, expected)
            uid = generate_uid()
            assert assoc.send_n_create(_step("IN PROGRESS"), ModalityPerformedProcedureStep,
                                       uid)[0].Status == 0x0000
            for value in ("completed", "SCHEDULED", "IN PROGRESS\\COMPLETED"):
                status, _ = assoc.send_n_set(_step(value), ModalityPerformedProcedureStep, uid)
                assert (value, int(status.Status)) == (value, 0x0106)
            assert assoc.send_n_set(_step("DISCONTINUED"), ModalityPerformedProcedureStep,
                                    uid)[0].Status == 0x0000
            assert assoc.send_n_set(_step("IN PROGRESS"), ModalityPerformedProcedureStep,
                                    uid)[0].Status == 0x0110
            assert assoc.is_established
    finally:
        pydicom.config.settings.writing_validation_mode = previous


def test_mpps_on_a_storage_context_is_refused(scp_sqlite: Running) -> None:
    """pynetdicom picks the service by the command's SOP class; the context must agree."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, _step("IN PROGRESS"))
    encoded = buffer.getvalue()
    mpps_class = str(ModalityPerformedProcedureStep).encode()
    n_create = _command([(0x0002, _uid_value(mpps_class)),
                         (0x0100, struct.pack("<H", 0x0140)),
                         (0x0110, struct.pack("<H", 1)),
                         (0x0800, struct.pack("<H", 0x0000)),
                         (0x1000, _uid_value(generate_uid().encode()))])
    with raw_peer(scp_sqlite) as peer:
        assert peer.request(n_create, encoded) == 0x0122
        assert peer.request(_echo_command(2), None, sop_class=str(Verification)) == 0x0000


def test_inflating_streams_with_bounded_memory(tmp_path: Path) -> None:
    """A data set that inflates to 64 MiB is inflated to disk, never whole in memory."""
    import tracemalloc

    from ctdx.scp.deflate import inflated

    meta_only = _with_file_meta(tmp_path / "meta.dcm", b"", "1.2.3",
                                syntax=DeflatedExplicitVRLittleEndian).read_bytes()
    big = _element(0x0009, 0x1000, b"OB", b"\x00" * (64 << 20))
    received = tmp_path / "received.dcm"
    received.write_bytes(meta_only + _deflate(big))
    tracemalloc.start()
    try:
        with inflated(received) as plain:
            _, peak = tracemalloc.get_traced_memory()
            assert plain.stat().st_size == len(meta_only) + len(big)
            with plain.open("rb") as copy:
                copy.seek(len(meta_only))
                assert copy.read(12) == big[:12]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    assert not plain.exists()

"""Files prepared for receiving (``ctdx.scp.prepared``): unnamed until linked, nothing left
behind by a closed listener or a killed process, named where ``O_TMPFILE`` is missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from ctdx.scp import prepared
from ctdx.scp.prepared import PreparedFiles, hard_link, is_unnamed
from ctdx.scp.receive import ReceivedFile, take_digest
from tests.conftest import wait_for
from tests.scp.conftest import unnamed_files_in

pytestmark = pytest.mark.skipif(not prepared.unnamed_supported(Path.cwd()),
                                reason="the file system of the checkout has no O_TMPFILE")


def _preparing_threads() -> int:
    return sum(t.name == "ctdx-prepared-files" for t in threading.enumerate())


def _held(folder: Path) -> int:
    """Descriptors of this process on unnamed files in ``folder``, empty or not."""
    return len(unnamed_files_in(folder, empty_too=True))


def test_files_are_ready_unnamed_and_named_only_where_the_store_links_them(
    tmp_path: Path,
) -> None:
    threads = _preparing_threads()  # other tests' listeners may hold theirs
    files = PreparedFiles(tmp_path, depth=3)
    try:
        assert files.unnamed and _preparing_threads() == threads + 1
        assert _held(tmp_path) == 3 and list(tmp_path.iterdir()) == []
        received = ReceivedFile(files, hashing=True)
        assert is_unnamed(received.path) and not received.named
        received.write(b"DICM" * 1000)
        received.flush()
        assert unnamed_files_in(tmp_path) != []  # a transfer in progress, seen by the tests
        # the one taken is replaced by the preparing thread
        wait_for(lambda: _held(tmp_path) == 4, timeout=10, message="a new file prepared")
        target = tmp_path / "kept.dcm"
        hard_link(received.path, target)
        with pytest.raises(FileExistsError):
            hard_link(received.path, target)
        digest = take_digest(received.path)
        received.discard()
        assert [p.name for p in tmp_path.iterdir()] == ["kept.dcm"]
        assert target.read_bytes() == b"DICM" * 1000
        assert digest is not None and digest.size_bytes == 4000
    finally:
        files.close()
    assert _held(tmp_path) == 0 and _preparing_threads() == threads  # descriptors, thread


def test_a_file_never_linked_is_gone_when_closed(tmp_path: Path) -> None:
    files = PreparedFiles(tmp_path, depth=1)
    try:
        received = ReceivedFile(files)
        received.write(b"\x00" * 65_536)
        received.discard()
    finally:
        files.close()
    assert list(tmp_path.iterdir()) == [] and _held(tmp_path) == 0


def test_a_killed_receiver_leaves_nothing_to_sweep(tmp_path: Path) -> None:
    """SIGKILL in the middle of a data set: no name was ever made, so nothing remains."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from ctdx.scp.prepared import PreparedFiles
        from ctdx.scp.receive import ReceivedFile
        files = PreparedFiles(Path({str(tmp_path)!r}))
        received = ReceivedFile(files)
        received.write(b"\\x00" * 1_000_000)
        received.flush()
        print("written", flush=True)
        sys.stdin.read()
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "written\n"
        assert list(tmp_path.iterdir()) == []
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert list(tmp_path.iterdir()) == []


def test_without_o_tmpfile_files_are_named_and_removed_after_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on NFS: no thread, a named ``rx-`` file per transfer, deleted by ``discard``."""
    monkeypatch.delattr(os, "O_TMPFILE")
    threads = _preparing_threads()
    files = PreparedFiles(tmp_path)
    try:
        assert not files.unnamed and _preparing_threads() == threads
        received = ReceivedFile(files)
        assert received.named and received.path.parent == tmp_path
        assert received.path.name.startswith("rx-") and received.path.exists()
        received.write(b"x")
        received.discard()
        assert list(tmp_path.iterdir()) == []
    finally:
        files.close()

"""A damaged or foreign checkpoint file is named as such, in ctdx's words: never torch's
advice to load with ``weights_only=False`` (which would run the file's code) or to file an
issue with PyTorch."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from ctdx.model_train.method.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint_meta,
)
from ctdx.model_train.method.networks import build_resnet

TORCH_ADVICE = ("weights_only", "file an issue", "PyTorch", "arbitrary code")


def _message(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, task="recognition")
    text = str(info.value)
    assert str(path) in text
    for advice in TORCH_ADVICE:
        assert advice not in text, text
    return text


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A file as torch.save writes it (zip archive), with real tensor data."""
    path = tmp_path_factory.mktemp("ckpt") / "state.pt"
    torch.save(build_resnet("resnet18").state_dict(), path)
    return path.read_bytes()


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"")
    assert "empty (0 bytes)" in _message(path)


def test_truncated_copy(tmp_path: Path, saved: bytes) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(saved[: len(saved) // 3])  # an interrupted download or copy
    assert "truncated or damaged" in _message(path)


def test_flipped_bytes_in_the_weights(tmp_path: Path, saved: bytes) -> None:
    data = bytearray(saved)
    with zipfile.ZipFile(_write(tmp_path / "ok.pt", saved)) as archive:
        member = max(archive.infolist(), key=lambda i: i.file_size)
        offset = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    data[offset + member.file_size // 2] ^= 0xFF  # inside the largest tensor's bytes
    path = _write(tmp_path / "model.pt", bytes(data))
    text = _message(path)
    assert "damaged" in text and "CRC-32" in text and member.filename in text


def test_text_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "model.pt", b"not a checkpoint\n")
    assert "not a zip archive as written by torch.save" in _message(path)


def test_legacy_pickle(tmp_path: Path) -> None:
    path = _write(tmp_path / "model.pt", pickle.dumps({"state_dict": {}}, protocol=2))
    assert "legacy format" in _message(path)


class _Evil:
    def __reduce__(self) -> tuple[object, ...]:
        return (print, ("code ran",))


def test_pickled_objects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.pt"
    torch.save({"model": nn.Linear(2, 2), "evil": _Evil()}, path)
    text = _message(path)
    assert "Python objects" in text and "ctdx train export" in text
    assert "code ran" not in capsys.readouterr().out


def test_read_meta_says_the_same(tmp_path: Path) -> None:
    path = _write(tmp_path / "model.pt", b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint_meta(path)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path

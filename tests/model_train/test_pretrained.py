"""P- networks without a local weights file on a machine that cannot download: one message
before any work, naming the file and the option; the packaged smoke config needs nothing."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctdx.cli import app
from ctdx.model_train.config import load_config
from ctdx.model_train.pretrained import needed_archs


@pytest.fixture(autouse=True)
def _no_logging_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI configures logging on stderr, which the CLI runner swaps and closes."""
    monkeypatch.setattr("ctdx.model_train.cli._configure_logging", lambda: None)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No cached weights, and every HTTPS request goes to a proxy port nobody listens on."""
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    # urllib builds its process-wide opener, proxies included, on the first urlopen: one built
    # here would send every later test's requests (Orthanc's REST API on 127.0.0.1) to the dead
    # proxy. Start from none and put back whatever was there before.
    monkeypatch.setattr(urllib.request, "_opener", None)
    return tmp_path / "torch-home"


def test_the_smoke_config_needs_no_download() -> None:
    assert needed_archs(load_config(Path("smoke"))) == []
    assert needed_archs(load_config(Path("paper"))) == ["resnet18", "resnet50"]


def _manifest(tmp_path: Path) -> Path:
    path = tmp_path / "m.csv"
    path.write_text("subject,study,path,class\n")
    return path


def test_reproduce_offline_stops_before_any_work(offline: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line, as on a wide terminal
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["train", "reproduce", "paper", "--manifest",
                                      str(_manifest(tmp_path)), "--out", str(out)])
    assert result.exit_code == 2, result.output
    text = result.output
    assert "Traceback" not in text and "URLError" in text
    for name in ("resnet18-f37072fd.pth", "resnet50-11ad3fa6.pth"):
        assert name in text
    assert "--pretrained resnet18=PATH/resnet18-f37072fd.pth" in text
    assert "--pretrained resnet50=PATH/resnet50-11ad3fa6.pth" in text
    assert "P-ResNet18 and P-ResNet50" in text and "'smoke'" in text
    assert not out.exists()  # nothing was started
    assert not list(offline.rglob("*.pth"))


def test_a_given_weights_file_is_not_downloaded(offline: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    weights = tmp_path / "r18.pth"
    weights.write_bytes(b"")  # only its presence matters to this check
    result = CliRunner().invoke(app, ["train", "train", "paper", "--network", "P-ResNet18",
                                      "--manifest", str(_manifest(tmp_path)),
                                      "--pretrained", f"resnet18={weights}",
                                      "--out", str(tmp_path / "runs")])
    # past the weights check: the empty manifest is what stops it
    assert result.exit_code == 2, result.output
    assert "m.csv: no rows" in result.output
    assert "resnet18-f37072fd" not in result.output and "URLError" not in result.output


def test_train_one_p_network_offline_names_only_its_file(offline: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    result = CliRunner().invoke(app, ["train", "train", "paper", "--network", "P-ResNet18",
                                      "--manifest", str(_manifest(tmp_path)),
                                      "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert "resnet18-f37072fd.pth" in result.output
    assert "resnet50" not in result.output

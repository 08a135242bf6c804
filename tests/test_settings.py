"""Settings: environment, config file, overrides, and the README's table kept complete."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from ctdx.db.settings import Settings, load_settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_is_documented_in_the_readme() -> None:
    text = README.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\|\s*`(CTDX_[A-Z0-9_]+)`", text, flags=re.MULTILINE))
    expected = {f"CTDX_{name.upper()}" for name in Settings.model_fields} | {"CTDX_CONFIG_FILE"}
    assert expected - documented == set(), "settings missing from the README's table"
    assert documented - expected == set(), "README documents settings that do not exist"


def test_every_setting_has_a_description() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description and len(field.description) > 10, name


def test_environment_file_and_override_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "ctdx.toml"
    config.write_text('port = 4000\nae_title = "FROMFILE"\nquiet_seconds = 7\n')
    monkeypatch.setenv("CTDX_CONFIG_FILE", str(config))
    monkeypatch.setenv("CTDX_AE_TITLE", "FROMENV")
    monkeypatch.setenv("CTDX_ALLOWED_CALLING_AES", "SCANNER1, PACS2")
    settings = load_settings(quiet_seconds=None, port=5000)
    assert settings.ae_title == "FROMENV"  # environment beats the file
    assert settings.quiet_seconds == 7  # file beats the default; None override ignored
    assert settings.port == 5000  # explicit override beats everything
    assert settings.allowed_calling_aes == ("SCANNER1", "PACS2")
    assert settings.allows_calling_ae("PACS2") and not settings.allows_calling_ae("OTHER")


def test_defaults_and_derived_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("CTDX_"):
            monkeypatch.delenv(key)
    settings = load_settings(data_dir=tmp_path)
    assert settings.ae_title == "CTDX" and settings.port == 11112
    assert settings.allows_calling_ae("ANYONE")
    assert settings.resolved_database_url == f"sqlite:///{(tmp_path / 'ctdx.sqlite3').absolute()}"
    assert settings.spool_dir == tmp_path / "spool"


def test_settings_are_frozen_and_validated() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Settings(port=70000)
    with pytest.raises(ValidationError):
        Settings(ae_title="X" * 17)

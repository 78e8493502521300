"""Settings: TOML file, SEGNODE_* environment, one-line errors, masked secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, load_settings, masked_dict

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_example_config_is_valid_and_matches_defaults() -> None:
    settings = load_settings(REPO / "configs/node.toml")
    assert settings.dicom.ae_title == "SEGNODE"
    assert settings.dicom.port == 11112
    assert settings.queue.backend == "sqlite"


def test_environment_overrides_file_key_by_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[dicom]\nport = 4242\nae_title = "FROMFILE"\n')
    monkeypatch.setenv("SEGNODE_DICOM__PORT", "11113")
    settings = load_settings(path)
    assert settings.dicom.port == 11113
    assert settings.dicom.ae_title == "FROMFILE"


@pytest.mark.parametrize(
    "text, message",
    [
        ('[dicom]\nport = "abc"\n', "dicom.port = 'abc': Input should be a valid integer"),
        ("[dicom]\nport = 70000\n", "dicom.port = 70000: Input should be less than or equal to 65535"),
        ("[dicom]\nprot = 1\n", "unknown key 'dicom.prot'"),
        ('[queue]\nbackend = "kafka"\n', "queue.backend = 'kafka': Input should be 'sqlite' or 'redis'"),
        ('[dicom]\nae_title = "A_TITLE_LONGER_THAN_16"\n', "dicom.ae_title = 'A_TITLE_LONGER_THAN_16'"),
    ],
)
def test_invalid_values_name_key_and_value(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert str(info.value).startswith(f"{tmp_path / 'node.toml'}: {message}")
    assert "\n" not in str(info.value)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 1"):
        load_settings(write(tmp_path, "[dicom\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_settings(tmp_path / "absent.toml")


def test_secrets_are_masked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGNODE_QUEUE__REDIS_URL", "redis://:hunter2@127.0.0.1:6379/0")
    path = write(
        tmp_path,
        '[http.tokens]\nalice = "tok-alice"\n\n[[destinations]]\nname = "pacs"\nkind = "stowrs"\n'
        'url = "http://127.0.0.1:8042/dicom-web"\nusername = "u"\npassword = "p4ss"\n',
    )
    data = masked_dict(load_settings(path))
    assert data["queue"]["redis_url"] == "********"
    assert data["http"]["tokens"] == {"alice": "********"}
    assert data["destinations"][0]["password"] == "********"
    assert data["destinations"][0]["token"] == ""
    assert "hunter2" not in repr(data) and "p4ss" not in repr(data) and "tok-alice" not in repr(data)

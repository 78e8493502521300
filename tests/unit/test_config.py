"""Settings: TOML file, SEGNODE_* environment, one-line errors, masked secrets."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from node import config
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
        ('[[destinations]]\nname = "tps"\nkind = "folder"\naccepts = ["rtstruct", "rtplan"]\n',
         "destinations.0.accepts.1 = 'rtplan': Input should be 'seg', 'rtstruct', 'sr', 'review' or 'dicom_mesh'"),
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


# --- where the settings come from (issue 17: config that cannot be silently wrong) --------------

def segnode(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``segnode ARGS`` in ``cwd`` with only ``env``'s SEGNODE_* variables, as a process would run it,
    but in this one (the CLI's imports once): returncode, stdout and stderr as a process gives them."""
    from typer.testing import CliRunner

    from node.cli import app
    from node.cli.common import _State

    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("SEGNODE_")}
    here = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, list(args), env={**unset, **(env or {})})
    finally:
        os.chdir(here)
        _State.config_path = None
    code = result.exit_code if result.exception is None or isinstance(result.exception, SystemExit) else 99
    return subprocess.CompletedProcess(args, code, result.stdout, result.stderr)


def segnode_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SEGNODE_")}
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=cwd, capture_output=True, text=True,
                          env={**environ, "PYTHONPATH": str(REPO)})


def test_config_is_found_by_option_anywhere_then_variable_then_working_dir(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    first = write(tmp_path / "a", '[node]\ndata_dir = "data"\n[dicom]\nhost = "127.0.0.1"\n')
    (tmp_path / "b").mkdir()
    second = (tmp_path / "b" / "other.toml")
    second.write_text('[node]\ndata_dir = "/srv/segnode"\n[dicom]\nhost = "127.0.0.1"\n')
    (tmp_path / "cwd" / "configs").mkdir(parents=True)
    write(tmp_path / "cwd" / "configs", '[node]\ndata_dir = "../var"\n[dicom]\nhost = "::1"\n')
    cwd = tmp_path / "cwd"
    ok = "config ok: {} (found by {}); data_dir {}\n"
    for args in (["--config", str(first), "config", "check"], ["config", "check", "--config", str(first)],
                 ["config", f"--config={first}", "check"]):
        result = segnode(*args, cwd=cwd, env={"SEGNODE_CONFIG": str(second)})
        assert (result.returncode, result.stdout, result.stderr) == (
            0, ok.format(first, "--config", tmp_path / "a" / "data"), ""), args
    result = segnode("config", "check", cwd=cwd, env={"SEGNODE_CONFIG": str(second)})
    assert result.stdout == ok.format(second, "SEGNODE_CONFIG", "/srv/segnode")
    result = segnode("config", "check", cwd=cwd)
    assert result.stdout == ok.format(cwd / "configs" / "node.toml", "./configs/node.toml", cwd / "var")
    shown = segnode("config", "show", cwd=tmp_path)
    assert shown.stdout.startswith("# config: built-in defaults, no file\n")
    assert f'data_dir = "{tmp_path / "var"}"' in shown.stdout
    missing = segnode("config", "check", cwd=cwd, env={"SEGNODE_CONFIG": str(tmp_path / "gone.toml")})
    assert (missing.returncode, missing.stderr) == (
        2, f"config error: {tmp_path / 'gone.toml'}: no such config file (SEGNODE_CONFIG)\n")
    twice = segnode("--config", str(first), "config", "check", "--config", str(second), cwd=cwd)
    assert twice.returncode == 2 and "--config" in twice.stderr and "more than once" in twice.stderr
    real = segnode_process("config", "check", "--config", str(first), cwd=cwd)  # the entry point too
    assert (real.returncode, real.stdout) == (0, ok.format(first, "--config", tmp_path / "a" / "data"))


def test_system_config_is_last_and_no_file_means_built_in_defaults(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("SEGNODE_")]:
        monkeypatch.delenv(name)
    system = tmp_path / "etc" / "node.toml"
    monkeypatch.setattr(config, "SYSTEM_CONFIG", system)
    settings = load_settings()
    assert (settings.source.path, settings.source.describe()) == (None, "built-in defaults, no file")
    assert settings.node.data_dir == tmp_path / "var"
    assert config.config_warnings(settings)[0].startswith("[node] data_dir is not set: the built-in default")
    system.parent.mkdir()
    system.write_text('[node]\ndata_dir = "state"\nrules = "rules.toml"\n')
    settings = load_settings()
    assert (settings.source.path, settings.source.how) == (system, str(system))
    assert settings.node.data_dir == tmp_path / "etc" / "state"
    assert settings.node.rules == tmp_path / "etc" / "rules.toml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "node.toml").write_text("")
    assert load_settings().source.how == "./configs/node.toml"


def test_relative_paths_in_a_file_follow_the_file_and_from_variables_the_working_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc", '[node]\ndata_dir = "../lib/segnode"\n[dicom]\ntls_cert = "tls/cert.pem"\n'
                                    '[[destinations]]\nname = "f"\nkind = "folder"\npath = "out"\n')
    monkeypatch.setenv("SEGNODE_SEGMENTATION__WEIGHTS_DIR", "weights")
    settings = load_settings(path)
    assert settings.node.data_dir == tmp_path / "lib" / "segnode"
    assert settings.dicom.tls_cert == tmp_path / "etc" / "tls" / "cert.pem"
    assert settings.destinations[0].path == tmp_path / "etc" / "out"
    assert settings.segmentation.weights_dir == tmp_path / "weights"
    assert settings.node.rules == tmp_path / "configs" / "rules.toml"  # the built-in default, unset
    assert "SEGNODE_SEGMENTATION__WEIGHTS_DIR" in settings.source.variables


@pytest.mark.parametrize("name, message", [
    ("SEGNODE_DICOMM__PORT", "SEGNODE_DICOMM__PORT: unknown variable; no setting or tool reads it "
                             "(did you mean SEGNODE_DICOM__PORT?)"),
    ("SEGNODE_NODE_DATA_DIR", "SEGNODE_NODE_DATA_DIR: unknown variable; no setting or tool reads it "
                              "(did you mean SEGNODE_NODE__DATA_DIR?)"),
    ("SEGNODE_COLOUR", "SEGNODE_COLOUR: unknown variable; no setting or tool reads it"),
])
def test_an_unknown_variable_is_an_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   name: str, message: str) -> None:
    monkeypatch.setenv(name, "104")
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, ""))
    assert str(info.value) == message


def test_a_bad_value_from_the_environment_names_the_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGNODE_DICOM__PORT", "abc")
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "[dicom]\nport = 104\n"))
    assert str(info.value) == ("SEGNODE_DICOM__PORT = 'abc': dicom.port: Input should be a valid integer, "
                               "unable to parse string as an integer")
    monkeypatch.delenv("SEGNODE_DICOM__PORT")
    monkeypatch.setenv("SEGNODE_HTTP__TOKENS", "alice:secret")
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, ""))
    assert str(info.value) == "SEGNODE_HTTP__TOKENS: cannot parse the value (a table or list needs JSON)"
    monkeypatch.setenv("SEGNODE_HTTP__TOKENS", '{"alice": "secret"}')
    monkeypatch.setenv("SEGNODE_QUEUE__REDIS_URL", "{}")
    assert load_settings(write(tmp_path, "")).http.tokens["alice"].get_secret_value() == "secret"


def test_unknown_keys_in_the_file_get_the_nearest_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "[dicom]\nallowed_calling_aet = [\"CT\"]\n"))
    assert str(info.value) == (f"{tmp_path / 'node.toml'}: unknown key 'dicom.allowed_calling_aet' "
                               "(did you mean 'dicom.allowed_calling_aets'?)")
    with pytest.raises(ConfigError, match=r"unknown key 'dicomm' \(did you mean 'dicom'\?\)$"):
        load_settings(write(tmp_path, "[dicomm]\nport = 1\n"))


def test_config_check_warns_about_a_listener_open_to_anyone(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\ndata_dir = "d"\n[dicom]\nhost = "0.0.0.0"\nport = 11112\n')
    result = segnode("config", "check", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr == ("warning: [dicom] the listener on 0.0.0.0:11112 accepts any calling AE title "
                             "from any address: set allowed_calling_aets and/or allowed_sources (or host = "
                             "\"127.0.0.1\")\n")
    for fix in ('allowed_calling_aets = ["CT1"]', 'allowed_sources = ["10.0.0.0/8"]'):
        path.write_text(f'[node]\ndata_dir = "d"\n[dicom]\nhost = "0.0.0.0"\n{fix}\n')
        assert config.config_warnings(load_settings(path)) == []
    path.write_text('[node]\ndata_dir = "d"\n[dicom]\nhost = "127.0.0.1"\n')
    assert config.config_warnings(load_settings(path)) == []
    path.write_text('[node]\ndata_dir = "d"\n[dicom]\nhost = "::1"\n[http]\nhost = "0.0.0.0"\nport = 8080\n')
    assert config.config_warnings(load_settings(path)) == [
        "[http] the API on 0.0.0.0:8080 has no tokens: serve refuses to start so; set tokens "
        "(SEGNODE_HTTP__TOKENS) or host = \"127.0.0.1\""]


def test_every_segnode_variable_the_project_uses_is_known() -> None:
    """One list of the non-setting SEGNODE_* variables: whatever the code, scripts and docs name must
    be a setting or in it, or a user setting it would be refused."""
    pattern = re.compile(r"\bSEGNODE_[A-Z0-9_]*[A-Z0-9](?![A-Za-z0-9_])")
    names: set[str] = set()
    for folder in ("node", "orthanc", "scripts", "docker", "tests", "docs", "configs"):
        for file in (REPO / folder).rglob("*"):
            suffixes = {".py", ".sh", ".md", ".toml", ".yaml", ".json", ".template", ""}
            if file.is_file() and file.suffix in suffixes:
                names |= set(pattern.findall(file.read_text(errors="replace")))
    names |= set(pattern.findall((REPO / "README.md").read_text()))
    assert {"SEGNODE_VENV", "SEGNODE_BLENDER", "SEGNODE_DICOM__PORT", "SEGNODE_INGEST__JOURNAL_MB"} <= names
    names -= {"SEGNODE_DICOMM__PORT", "SEGNODE_NODE_DATA_DIR", "SEGNODE_COLOUR"}  # this file's typos
    for name in sorted(names):
        config.check_environment({name: "1"})  # raises ConfigError for an unknown one


def test_a_relative_log_file_follows_the_rule_of_every_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc", '[node]\ndata_dir = "data"\nlog_file = "log/node.log"\n')
    assert load_settings(path).node.log_file == tmp_path / "etc" / "log" / "node.log"
    monkeypatch.setenv("SEGNODE_NODE__LOG_FILE", "other.log")
    assert load_settings(path).node.log_file == tmp_path / "other.log"

"""``segnode install-service``: the units it renders pass ``systemd-analyze verify`` (offline: no systemd
needs to run; ``--man=no --generators=no``, and no ``--root``, which wants a whole OS tree) and its
offline security scan; the starter config is valid; ``--dry-run`` writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner, Result

from node.config import Settings, config_warnings, load_settings
from node.service import plan
from tests.servers import require_program

REPO = Path(__file__).resolve().parents[2]
SEGNODE = Path(sys.executable).parent / "segnode"


def install_service(*args: str) -> Result:
    """In this process (the CLI's imports once, not per call), as ``segnode install-service ARGS``."""
    from node.cli import app
    from node.cli.common import _State

    try:
        return CliRunner().invoke(
            app, ["install-service", *args], env={k: None for k in os.environ if k.startswith("SEGNODE_")}
        )
    finally:
        _State.config_path = None


def unit_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def verify(*units: Path) -> None:
    analyze = require_program("systemd-analyze")
    result = subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", *map(str, units)], capture_output=True, text=True
    )
    # verify exits 0 on unknown keys and bad values, but says so: nothing may be said
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result.stderr
    for unit in units:
        scan = subprocess.run(
            [analyze, "security", "--offline=true", "--threshold=40", str(unit)],
            capture_output=True,
            text=True,
        )
        assert scan.returncode == 0, scan.stdout[-600:]  # exposure at most 4.0 ("OK")


def test_units_for_a_node_on_port_104_with_a_folder_destination(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[node]\ndata_dir = "/var/lib/segnode"\n[dicom]\nport = 104\n[queue]\nstop_grace_s = 45\n'
        '[[destinations]]\nname = "share"\nkind = "folder"\npath = "/srv/segnode-results"\n'
    )
    result = install_service("--root", str(tmp_path / "root"), "--config", str(config), "--user", "segnode")
    assert result.exit_code == 0, result.output
    units = tmp_path / "root" / "etc" / "systemd" / "system"
    serve, worker = units / "segnode.service", units / "segnode-worker@.service"
    assert sorted(p.name for p in units.iterdir()) == ["segnode-worker@.service", "segnode.service"]
    lines = unit_lines(serve)
    assert f"ExecStart={SEGNODE} --config {config} serve" in lines
    assert {
        "Type=exec",
        "User=segnode",
        "Group=segnode",
        "WorkingDirectory=/var/lib/segnode",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=85",
        "StateDirectory=segnode",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "ReadWritePaths=/var/lib/segnode",
        "ReadWritePaths=-/srv/segnode-results",
        "NoNewPrivileges=yes",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        'Environment="HOME=/var/lib/segnode"',
        "WantedBy=multi-user.target",
    } <= set(lines)
    assert not {line for line in lines if line.startswith(("PrivateDevices", "DevicePolicy", "ProtectClock"))}
    worker_lines = unit_lines(worker)
    assert f"ExecStart={SEGNODE} --config {config} worker" in worker_lines
    assert {'Environment="CUDA_VISIBLE_DEVICES=%i"', "CapabilityBoundingSet=", "TimeoutStopSec=85"} <= set(
        worker_lines
    )
    assert not [line for line in worker_lines if line.startswith("AmbientCapabilities")]
    verify(serve, units / "segnode-worker@0.service")  # the template, instantiated
    assert not (tmp_path / "root" / "etc" / "segnode").exists()  # the config given exists: not written


def test_without_a_config_a_starter_is_written_and_dry_run_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    dry = install_service("--root", str(root), "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert not root.exists()
    assert f"ExecStart={SEGNODE} --config /etc/segnode/node.toml serve" in dry.stdout
    assert f"would: write the starter config {root}/etc/segnode/node.toml (0640)" in dry.stdout
    result = install_service("--root", str(root))
    assert result.exit_code == 0, result.output
    assert f"not creating user segnode or changing owners (--root {root})" in result.stdout
    starter = root / "etc" / "segnode" / "node.toml"
    assert oct(starter.stat().st_mode & 0o777) == "0o640"
    settings = load_settings(starter)
    assert (settings.node.data_dir, settings.dicom.host, settings.queue.stop_grace_s) == (
        Path("/var/lib/segnode"),
        "127.0.0.1",
        30.0,
    )
    assert config_warnings(settings) == []
    assert (root / "var" / "lib" / "segnode").is_dir()
    units = root / "etc" / "systemd" / "system"
    assert "TimeoutStopSec=70" in unit_lines(units / "segnode.service")
    verify(units / "segnode.service", units / "segnode-worker@3.service")
    before = starter.read_text()
    again = install_service("--root", str(root))  # an existing config is read, never overwritten
    assert again.exit_code == 0 and "starter config" not in again.stdout and starter.read_text() == before


def test_home_trees_are_read_only_rather_than_hidden_when_the_node_lives_there() -> None:
    settings = Settings(node={"data_dir": "/var/lib/segnode"})
    assert (
        plan(settings, Path("/etc/segnode/node.toml"), command=("/opt/segnode/bin/segnode",)).protect_home
        == "yes"
    )
    assert (
        plan(
            settings, Path("/etc/segnode/node.toml"), command=("/home/pacs/segnode/.venv/bin/segnode",)
        ).protect_home
        == "read-only"
    )
    inside = plan(
        Settings(node={"data_dir": "/var/lib/segnode"}, segmentation={"weights_dir": "/var/lib/segnode/w"}),
        Path("/etc/segnode/node.toml"),
        command=("/usr/bin/segnode",),
    )
    assert inside.writable == ()  # already inside the data folder

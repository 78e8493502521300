"""``segnode doctor`` on a healthy node: a running ``serve`` (TLS on its DICOM port), a real Orthanc with
the segnode plugin handing off to it, STOW-RS, C-STORE and folder destinations, TotalSegmentator
weights for a rule that needs them: every line ok, exit 0. Then each check made to fail, one by one,
against real servers (or closed ports): a fail line with its fix, and exit 1 from the command."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from node import doctor
from node.config import Settings
from tests.servers import REPO, OrthancServer, RedisServer, SegnodeServe, free_port, self_signed_cert

pytestmark = pytest.mark.integration

PLUGIN = REPO / "orthanc" / "segnode_plugin.py"
TOKEN = "doctor-token"


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    return self_signed_cert(folder, name, days=365)  # doctor warns about one that expires within 30 days


def rules(blender: bool) -> str:
    outputs = '["seg", "blender"]' if blender else '["seg"]'
    return f"""
[[rule]]
name = "ct-threshold"
[rule.match]
modality = ["CT"]
[rule.pipeline]
engine = "threshold"
outputs = {outputs}

[[rule]]
name = "mr-total"
[rule.match]
modality = ["MR"]
[rule.pipeline]
engine = "totalsegmentator"
task = "total"
fast = true
"""


def test_doctor_on_a_healthy_node_says_ok_to_everything(
    orthanc_factory: Callable[..., OrthancServer], tmp_path: Path
) -> None:
    from node.artifacts.blender import find_blender
    from tests.totalseg_weights import install_for_task

    cert, key = self_signed(tmp_path, "dicom")
    weights = tmp_path / "weights"
    install_for_task(weights, "total", fast=True)
    (tmp_path / "out").mkdir()
    node = SegnodeServe(tmp_path, rules=rules(blender=find_blender() is not None), token=TOKEN)
    orthanc = orthanc_factory(
        python_script=PLUGIN,
        extra_config={"Segnode": {"NodeUrl": node.url, "NodeToken": TOKEN}},
        env={"SEGNODE_VENV": str(REPO / ".venv")},
    )
    node.config.write_text(
        node.config.read_text().replace("[dicom]\n", f'[dicom]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
        + f"""
[segmentation]
weights_dir = "{weights}"
[orthanc]
url = "{orthanc.http_url}"
[[destinations]]
name = "orthanc-web"
kind = "stowrs"
url = "{orthanc.dicomweb_url}"
[[destinations]]
name = "orthanc-dimse"
kind = "cstore"
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
[[destinations]]
name = "share"
kind = "folder"
path = "{tmp_path / "out"}"
"""
    )
    os.chmod(node.config, 0o640)  # it holds a token
    node.start()
    try:
        result = doctor_cli("--json", "--config", str(node.config))
    finally:
        node.stop()
    findings = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(f["check"], f["status"]) for f in findings if f["status"] != "ok"] == [], result.stdout
    assert result.exit_code == 0, result.output
    by_check = {f["check"]: f["detail"] for f in findings}
    assert list(by_check) == [
        "config",
        "data folder",
        "disk",
        "dicom port",
        "http port",
        "tls",
        "destination orthanc-web",
        "destination orthanc-dimse",
        "destination share",
        "orthanc",
        "orthanc plugin",
        "redis",
        "rules",
        "weights rule mr-total",
        "torch",
        "blender",
    ]
    assert by_check["config"] == f"{node.config} (found by --config)"
    assert by_check["data folder"].startswith(f"{node.data_dir}: writable, ")
    pid = node.data_dir.joinpath("serve.lock").read_text().strip()
    assert (
        by_check["dicom port"]
        == f"127.0.0.1:{node.dicom_port} in use by this node (segnode serve, pid {pid})"
    )
    assert (
        by_check["http port"] == f"127.0.0.1:{node.http_port} in use by this node (segnode serve, pid {pid})"
    )
    assert by_check["tls"] == f"{cert} and {key} readable, the key matches"
    assert by_check["destination orthanc-dimse"] == (
        f"C-ECHO SEGNODE -> ORTHANC@127.0.0.1:{orthanc.dicom_port}: success"
    )
    assert by_check["destination orthanc-web"] == f"QIDO-RS {orthanc.dicomweb_url}/studies: HTTP 200"
    assert (
        by_check["orthanc plugin"] == f"loaded, hands off to {node.url}/api/orthanc/series (0 series so far)"
    )
    assert by_check["weights rule mr-total"].startswith("task total (fast): 1 dataset(s) present in ")


@pytest.fixture
def base(tmp_path: Path) -> Settings:
    """A healthy minimal node (threshold rule, no destinations needed for these checks)."""
    (tmp_path / "rules.toml").write_text(rules(blender=False))
    return Settings(
        node={"data_dir": tmp_path / "data", "rules": tmp_path / "rules.toml"},
        dicom={"host": "127.0.0.1", "port": free_port()},
        http={"port": free_port()},
        segmentation={"weights_dir": tmp_path / "no-weights"},
    )


def only(findings: list[doctor.Finding]) -> doctor.Finding:
    assert len(findings) == 1, findings
    return findings[0]


def test_each_check_made_to_fail_says_why_and_how_to_fix_it(
    base: Settings,
    tmp_path: Path,
    orthanc: OrthancServer,
    orthanc_factory: Callable[..., OrthancServer],
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    closed = free_port()

    def fails(check, **changes) -> doctor.Finding:  # type: ignore[no-untyped-def]
        data = base.model_dump()
        for section, values in changes.items():
            data[section].update(values)
        settings = Settings(**data)
        found = [f for f in check(settings) if f.status == "fail"]
        assert found and found[0].fix, check(settings)
        return found[0]

    assert fails(doctor.check_data_dir, node={"data_dir": blocker / "data"}).detail.startswith(
        f"{blocker / 'data'} does not exist and cannot be made"
    )
    assert "ingest refuses every instance" in fails(doctor.check_disk, ingest={"min_free_mb": 10**9}).detail
    with socket.socket() as other:
        other.bind(("127.0.0.1", base.dicom.port))
        other.listen()
        port = fails(doctor.check_ports)
    assert (port.check, port.detail) == (
        "dicom port",
        f"127.0.0.1:{base.dicom.port} is in use by another program",
    )
    assert (
        fails(doctor.check_ports, dicom={"host": "192.0.2.1"}).detail
        == "192.0.2.1 is not an address of this machine"
    )
    cert, _ = self_signed(tmp_path, "a")
    _, other_key = self_signed(tmp_path, "b")
    assert fails(
        doctor.check_tls, dicom={"tls_cert": tmp_path / "gone.pem", "tls_key": other_key}
    ).detail.startswith(f"{tmp_path / 'gone.pem'} / {other_key}: No such file or directory")
    assert (
        "KEY_VALUES_MISMATCH"
        in fails(doctor.check_tls, dicom={"tls_cert": cert, "tls_key": other_key}).detail
    )
    destinations = [
        {"name": "dimse", "kind": "cstore", "ae_title": "PACS", "host": "127.0.0.1", "port": closed},
        {"name": "web", "kind": "stowrs", "url": f"http://127.0.0.1:{closed}/dicom-web"},
        {"name": "wrong-root", "kind": "stowrs", "url": f"{orthanc.http_url}/not-dicom-web"},
        {"name": "share", "kind": "folder", "path": str(blocker / "out")},
    ]
    found = doctor.check_destinations(Settings(destinations=destinations))
    assert [(f.status, f.check) for f in found] == [
        ("fail", "destination dimse"),
        ("fail", "destination web"),
        ("fail", "destination wrong-root"),
        ("fail", "destination share"),
    ]
    assert found[0].detail == (
        f"C-ECHO SEGNODE -> PACS@127.0.0.1:{closed}: no association (connection refused, "
        "aborted or timed out)"
    )
    assert found[2].detail == f"QIDO-RS {orthanc.http_url}/not-dicom-web/studies: HTTP 404"
    no_plugin = doctor.check_orthanc(Settings(orthanc={"url": orthanc.http_url}))
    assert [(f.status, f.check) for f in no_plugin] == [("ok", "orthanc"), ("fail", "orthanc plugin")]
    assert no_plugin[1].detail == "the segnode plugin is not loaded in this Orthanc: no hand-off"
    elsewhere = orthanc_factory(
        python_script=PLUGIN,
        extra_config={"Segnode": {"NodeUrl": "http://127.0.0.1:9"}},
        env={"SEGNODE_VENV": str(REPO / ".venv")},
    )
    wrong = doctor.check_orthanc(Settings(orthanc={"url": elsewhere.http_url}, http={"port": 8080}))
    assert wrong[-1].detail == "hands off to http://127.0.0.1:9, but this node listens on 127.0.0.1:8080"
    assert fails(doctor.check_orthanc, orthanc={"url": f"http://127.0.0.1:{closed}"}).check == "orthanc"
    assert fails(
        doctor.check_redis, queue={"backend": "redis", "redis_url": f"redis://127.0.0.1:{closed}/0"}
    ).detail.startswith(f"redis://127.0.0.1:{closed}/0: ConnectionError")
    healthy = only(doctor.check_redis(Settings(queue={"backend": "redis", "redis_url": redis_server.url})))
    assert healthy.status == "ok" and "PING answered" in healthy.detail
    weights = fails(doctor.check_weights)
    assert (weights.check, weights.fix) == (
        "weights rule mr-total",
        "run `segnode weights import ZIP|DIR` with the zips TotalSegmentator distributes",
    )
    assert "task total (fast): missing Dataset" in weights.detail
    import torch

    if not torch.cuda.is_available():
        assert fails(doctor.check_torch, segmentation={"device": "gpu"}).detail.startswith(
            "device gpu, but torch sees 0 GPU(s)"
        )
    (tmp_path / "rules.toml").write_text(rules(blender=True))
    monkeypatch.setenv("SEGNODE_BLENDER", str(tmp_path / "no-blender"))
    assert fails(doctor.check_blender).detail.startswith("rule(s) ct-threshold ask for the Blender scene")
    (tmp_path / "rules.toml").write_text("[[rule]]\nname = 3\n")
    assert fails(doctor.check_rules).check == "rules"
    broken = doctor.run_checks(base, [lambda s: 1 / 0])  # type: ignore[list-item,operator]
    assert (broken[0].status, broken[0].detail) == (
        "fail",
        "the check itself failed: ZeroDivisionError: division by zero",
    )


def doctor_cli(*args: str) -> Result:
    """``segnode doctor ARGS`` in this process (the CLI's imports once), without our SEGNODE_* variables."""
    from node.cli import app
    from node.cli.common import _State

    try:
        return CliRunner().invoke(
            app, ["doctor", *args], env={k: None for k in os.environ if k.startswith("SEGNODE_")}
        )
    finally:
        _State.config_path = None


def test_the_command_exits_1_on_a_fail_and_names_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "node.toml"
    bad.write_text("[dicom]\nport = 'abc'\n")
    result = doctor_cli("--config", str(bad))
    assert result.exit_code == 1
    assert result.stdout.split()[:2] == ["fail", "config"]
    assert f"{bad}: dicom.port = 'abc'" in result.stdout

"""``segnode serve`` started the way ``segnode install-service``'s unit starts it (its ExecStart
command line, Environment and WorkingDirectory, parsed from the rendered unit; systemd's PATH and
nothing else of ours but PYTHONPATH, so that this checkout's code is the one run), stopped the way
systemd stops it (SIGTERM to the main process): the job in flight is requeued, the journal closed,
and after a restart the job completes once, its cut-off attempt not counted."""

from __future__ import annotations

import getpass
import os
import shlex
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from node.service import SYSTEMD_PATH
from tests.integration.test_serve import RULES, TOKEN, phantom
from tests.servers import SegnodeServe, storescu

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def unit_start(unit: Path) -> tuple[list[str], dict[str, str], Path]:
    """ExecStart as argv, the environment systemd would give (PATH + Environment=), WorkingDirectory."""
    command: list[str] = []
    env = {"PATH": SYSTEMD_PATH}
    cwd = Path("/")
    for line in unit.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "ExecStart":
            command = shlex.split(value.replace("%%", "%"))
        elif key == "Environment":
            name, _, setting = shlex.split(value)[0].partition("=")
            env[name] = setting
        elif key == "WorkingDirectory":
            cwd = Path(value)
    return command, env, cwd


def test_serve_as_the_unit_starts_it_drains_on_sigterm(tmp_path: Path) -> None:
    node = SegnodeServe(
        tmp_path, rules=RULES, token=TOKEN, ingest="journal_mb = 16", extra="[queue]\nstop_grace_s = 0\n"
    )
    from node.cli import app
    from node.cli.common import _State

    try:
        result = CliRunner().invoke(
            app,
            [
                "install-service",
                "--root",
                str(tmp_path / "root"),
                "--config",
                str(node.config),
                "--user",
                getpass.getuser(),
            ],
        )
    finally:
        _State.config_path = None
    assert result.exit_code == 0, result.output
    command, env, cwd = unit_start(tmp_path / "root/etc/systemd/system/segnode.service")
    assert command[1:] == ["--config", str(node.config), "serve"] and os.access(command[0], os.X_OK)
    assert (env["HOME"], cwd) == (str(node.data_dir), node.data_dir)
    node.data_dir.mkdir()  # what the installer (or StateDirectory=) does for real
    env["PYTHONPATH"] = str(REPO)
    series = phantom(tmp_path, (128, 128, 64), seed=3)  # a job of a second or more: SIGTERM comes in it
    try:
        node.start(command, env=env, cwd=cwd)
        storescu([series], "127.0.0.1", node.dicom_port, "SEGNODE", calling_aet="CT_SCANNER")
        running = node.wait_job(lambda j: j["state"] == "running")
        assert node.stop(signal.SIGTERM) == 0
        first = node.log(tail=None)
        assert f"config: {node.config} (found by --config); data in {node.data_dir}" in first
        assert (
            f"job {running['id']}: requeued: node stopping: still running 0 s after the stop signal" in first
        )
        assert "journal closed: every acknowledged instance is in the spool by itself" in first
        assert first.rstrip().endswith("INFO node.serve: stopped")
        node.start(command, env=env, cwd=cwd)
        done = node.wait_job(lambda j: j["id"] == running["id"] and j["state"] in ("done", "failed"))
        assert (done["state"], done["attempts"], done["error"]) == ("done", 1, None)
        assert [e["event"] for e in done["history"]] == ["queued", "running", "requeued", "running", "done"]
        assert len(node.api("/api/jobs")) == 1
        assert list((node.data_dir / "results" / done["id"]).iterdir()) == [Path(done["results"])]
        second = node.log(tail=None)[len(first) :]
        assert "jobs at start: 0 requeued (worker gone), 0 failed (no attempts left), 1 queued" in second
        assert "written again from records" not in second  # the journal had nothing to replay
    finally:
        node.stop()

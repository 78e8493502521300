"""The test servers themselves: each starts, answers, and is gone after stop (PID and ports)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from node.dicom.writer import SeriesInfo, write_series
from node.volume import Geometry, Volume
from tests.servers import (
    HOST,
    ORTHANC_BINARY,
    OrthancServer,
    RedisServer,
    ServerError,
    StoreSCP,
    echoscu,
    free_port,
    port_is_open,
    require_program,
    storescu,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def assert_gone(pid: int, *ports: int) -> None:
    """The process no longer exists and nothing listens on its ports; a new server could bind them."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not Path(f"/proc/{pid}").exists()
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, port), timeout=2).close()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT may linger
            s.bind((HOST, port))
            s.listen()


def orthanc_version() -> str:
    """The version the installed binary reports, e.g. "1.10.1" (first line: "<argv[0]> 1.10.1")."""
    binary = require_program(ORTHANC_BINARY)
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    name, version = out.stdout.splitlines()[0].split()
    assert name == binary
    return version


def test_free_port_is_free_and_on_loopback() -> None:
    port = free_port()
    assert 1024 < port < 65536
    assert not port_is_open(port)


def test_orthanc_starts_answers_and_stops(tmp_path: Path) -> None:
    with OrthancServer(aet="SEGNODE-PACS", workdir=tmp_path) as orthanc:
        pid, http_port, dicom_port = orthanc.pid, orthanc.http_port, orthanc.dicom_port
        assert http_port != dicom_port
        assert orthanc.http_url == f"http://127.0.0.1:{http_port}"

        system = orthanc.rest_get("/system")
        assert system["Version"] == orthanc_version()
        assert system["DicomAet"] == "SEGNODE-PACS"
        assert (system["HttpPort"], system["DicomPort"]) == (http_port, dicom_port)
        assert sorted(orthanc.rest_get("/plugins")) == ["dicom-web", "explorer.js", "python"]
        assert orthanc.rest_get("/plugins/python")["ID"] == "python"
        assert orthanc.rest_get("/plugins/dicom-web")["ID"] == "dicom-web"
        assert orthanc.instance_count() == 0
        assert orthanc.rest_get("/dicom-web/studies") == []

        echo = echoscu(HOST, dicom_port, "SEGNODE-PACS")
        assert echo.returncode == 0

        config = json.loads(orthanc.config_path.read_text())
        assert config["StableAge"] == 2
        assert config["Plugins"] == ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                                     "/usr/share/orthanc/plugins/libOrthancPython.so"]  # fmt: skip
        assert "PythonScript" not in config
        assert (tmp_path / "storage" / "index").is_file()
        assert b"TCP_NODELAY=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert orthanc.process is None
    assert_gone(pid, http_port, dicom_port)
    # A workdir we passed in is ours to keep, with the log.
    assert "Orthanc has stopped" in (tmp_path / "server.log").read_text()


def test_a_workdir_we_did_not_pass_in_is_removed_after_stop() -> None:
    redis = RedisServer()  # the life cycle is shared by all servers; Redis stops fastest
    workdir = redis.workdir
    assert workdir.name.startswith("segnode-redis-")
    with redis:
        assert (workdir / "server.log").is_file()
    assert not workdir.exists()


def test_orthanc_runs_a_plugin_script_in_debian_python_311(orthanc_factory, tmp_path: Path) -> None:
    report = tmp_path / "plugin-report.json"
    script = tmp_path / "probe_plugin.py"
    script.write_text(
        "import json, os, sys\n"
        "import orthanc\n"
        "def ping(output, uri, **request):\n"
        "    output.AnswerBuffer(b'pong', 'text/plain')\n"
        "orthanc.RegisterRestCallback('/segnode-test/ping', ping)\n"
        "with open(os.environ['SEGNODE_TEST_REPORT'], 'w') as f:\n"
        "    json.dump({'version': list(sys.version_info[:2]), 'executable': sys.executable,\n"
        "               'nodelay': os.environ.get('TCP_NODELAY')}, f)\n"
    )
    orthanc = orthanc_factory(python_script=script, env={"SEGNODE_TEST_REPORT": str(report)})

    assert orthanc.request("GET", "/segnode-test/ping") == ("text/plain", b"pong")
    expected = {"version": [3, 11], "executable": ORTHANC_BINARY, "nodelay": "1"}
    assert json.loads(report.read_text()) == expected
    assert json.loads(orthanc.config_path.read_text())["PythonScript"] == str(script)


def test_orthanc_that_fails_to_start_shows_its_log(tmp_path: Path) -> None:
    # A plugin script that raises at load stops Orthanc (DESIGN.md): the error carries the traceback.
    script = tmp_path / "broken_plugin.py"
    script.write_text("raise RuntimeError('segnode-test: plugin import failed')\n")
    orthanc = OrthancServer(python_script=script, workdir=tmp_path / "orthanc")
    with pytest.raises(ServerError) as failure:
        orthanc.start()
    message = str(failure.value)
    assert re.match(r"orthanc exited \(code \d+\) before it was ready; the end of its log:\n", message)
    assert "RuntimeError" in message
    assert "segnode-test: plugin import failed" in message
    assert orthanc.process is None


def test_a_server_never_ready_is_stopped_after_its_start_timeout(tmp_path: Path) -> None:
    seen_pids: list[int] = []

    class NeverReady(RedisServer):
        start_timeout = 0.5

        def _ready(self) -> bool:
            seen_pids.append(self.pid)
            return False

    server = NeverReady(workdir=tmp_path)
    with pytest.raises(ServerError, match=r"^redis was not ready after 0.5 s; the end of its log:\n"):
        server.start()
    assert server.process is None
    assert_gone(seen_pids[0], server.port)


def test_storescp_starts_answers_and_stops(tmp_path: Path) -> None:
    with StoreSCP(aet="SEGNODE-SCP", workdir=tmp_path) as scp:
        pid, port = scp.pid, scp.port
        echo = echoscu(HOST, port, "SEGNODE-SCP", calling_aet="ECHO-TEST")
        assert echo.returncode == 0
        assert scp.output_dir == tmp_path / "received"
        assert scp.received_files() == []
        assert b"TCP_NODELAY=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert_gone(pid, port)
    assert "Received Echo Request" in (tmp_path / "server.log").read_text()


def test_echoscu_failure_raises_with_dcmtk_output() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(ServerError, match=r"echoscu .* failed \(exit \d+\):\n") as failure:
        echoscu(HOST, port, "NOBODY", timeout=2)
    assert f"127.0.0.1 {port}" in str(failure.value)


def test_storescu_refused_by_orthanc_raises_with_dcmtk_output(orthanc_factory, tmp_path: Path) -> None:
    # Only known modalities may store or echo: Orthanc refuses an unknown calling AE title.
    orthanc = orthanc_factory(extra_config={"DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False})
    one_slice = Volume(array=np.zeros((1, 4, 4), dtype=np.int16), geometry=Geometry((0, 0, 0), (1, 1, 1)))
    paths = write_series(one_slice, tmp_path / "series", SeriesInfo(uid_seed="refused"))
    with pytest.raises(ServerError, match="Calling AE Title Not Recognized") as failure:
        storescu(paths, HOST, orthanc.dicom_port, orthanc.aet, calling_aet="STRANGER")
    assert "-aet STRANGER -aec ORTHANC" in str(failure.value)
    assert orthanc.instance_count() == 0


def test_redis_starts_answers_and_stops(tmp_path: Path) -> None:
    with RedisServer(workdir=tmp_path) as redis:
        pid, port = redis.pid, redis.port
        assert redis.url == f"redis://127.0.0.1:{port}/0"
        assert redis.ping() == "PONG"
        assert redis.command("SET", "segnode-test", "1") == "OK"
        with pytest.raises(ServerError, match="unknown command"):
            redis.command("NO-SUCH-COMMAND")
    assert_gone(pid, port)
    assert list(tmp_path.glob("*.rdb")) == []  # --save '': nothing persisted


def test_fixtures_run_side_by_side(orthanc, storescp, redis_server) -> None:
    ports = {orthanc.http_port, orthanc.dicom_port, storescp.port, redis_server.port}
    assert len(ports) == 4
    assert orthanc.rest_get("/system")["DicomAet"] == "ORTHANC"
    assert echoscu(HOST, storescp.port, "STORESCP").returncode == 0
    assert redis_server.ping() == "PONG"


class DevScriptOrthanc(OrthancServer):
    """Orthanc as orthanc/start-orthanc.sh starts it, with this class's random ports."""

    name = "start-orthanc.sh"
    program = str(REPO / "orthanc" / "start-orthanc.sh")

    def _command(self) -> list[str]:
        return [self.program, str(self.workdir / "state")]

    def _environment(self) -> dict[str, str]:
        ports = {"ORTHANC_HTTP_PORT": str(self.http_port), "ORTHANC_DICOM_PORT": str(self.dicom_port)}
        return {**super()._environment(), **ports, "ORTHANC_AET": self.aet}


def test_dev_script_starts_orthanc_from_the_template(tmp_path: Path) -> None:
    with DevScriptOrthanc(aet="SEGNODE-DEV", workdir=tmp_path) as orthanc:
        pid = orthanc.pid
        system = orthanc.rest_get("/system")
        assert (system["Name"], system["DicomAet"]) == ("segnode-dev", "SEGNODE-DEV")
        assert (system["HttpPort"], system["DicomPort"]) == (orthanc.http_port, orthanc.dicom_port)
        assert sorted(orthanc.rest_get("/plugins")) == ["dicom-web", "explorer.js", "python"]
        assert echoscu(HOST, orthanc.dicom_port, "SEGNODE-DEV").returncode == 0
        # The script execs Orthanc: the PID we started is Orthanc's, with TCP_NODELAY=1.
        assert Path(f"/proc/{pid}/exe").resolve() == Path(ORTHANC_BINARY).resolve()
        assert b"TCP_NODELAY=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rendered = (tmp_path / "state" / "orthanc.json").read_text()
        assert "@" not in rendered.split("*/", 1)[1]  # every placeholder after the header is filled
        assert (tmp_path / "state" / "storage" / "index").is_file()
        if not (REPO / "orthanc" / "segnode_plugin.py").exists():
            assert '"PythonScript"' not in rendered.split("*/", 1)[1]
        # The node's LABELMAP SEGs (Label Map Segmentation Storage, unknown to Orthanc 1.10's DCMTK) are
        # taken over C-STORE too (UnknownSopClassAccepted).
        labelmap = labelmap_seg(tmp_path)
        ae = AE(ae_title="SEGNODE")
        ae.add_requested_context(labelmap.SOPClassUID, ExplicitVRLittleEndian)
        assoc = ae.associate(HOST, orthanc.dicom_port, ae_title="SEGNODE-DEV")
        assert assoc.is_established
        try:
            assert assoc.send_c_store(labelmap).Status == 0
        finally:
            assoc.release()
        (found,) = orthanc.rest_post("/tools/lookup", labelmap.SOPInstanceUID)
        assert found["Type"] == "Instance"
    assert_gone(pid, orthanc.http_port, orthanc.dicom_port)


def labelmap_seg(tmp_path: Path):
    """A LABELMAP SEG as the node writes it for a grid whose frames are not whole bytes (13 x 7)."""
    from node.classes import LabelClass, LabelVolume
    from node.dicom.seg import build_seg
    from node.dicom.series import read_series

    ct = Volume(np.zeros((3, 13, 7), np.int16), Geometry(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 2.0)))
    write_series(ct, tmp_path / "odd", SeriesInfo(uid_seed="odd grid for orthanc"))
    ct = read_series(tmp_path / "odd")
    array = np.zeros(ct.array.shape, np.uint8)
    array[:, 3:9, 2:5] = 1
    seg = build_seg(LabelVolume(array, ct.geometry, source=ct.source, classes={1: LabelClass(1, "liver")}),
                    tmp_path / "odd")
    assert seg.SegmentationType == "LABELMAP"
    return seg

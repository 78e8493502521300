"""The node's main job end to end, with real Orthanc, dcmtk and ``segnode serve`` (a subprocess):

(a) storescu -> Orthanc -> plugin (STABLE_SERIES) -> node (WADO-RS fetch) -> threshold engine -> SEG
    STOWed back -> QIDO-RS finds it in the same study; it decodes to exactly the job's labels; the SEG,
    stable in its turn, is not handed over again;
(b) storescu -> the node's listener -> SEG C-STOREd to Orthanc;
(c) Orthanc down while the result waits (and the node restarted meanwhile) -> delivered once Orthanc
    is back, exactly once.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest

from node.dicom.seg import read_seg
from node.nifti import read_nifti
from node.phantom import TINY, write_phantom
from tests.integration.test_outbox import PASSWORD, USER, SecureOrthanc
from tests.servers import THRESHOLD_SEG_RULES, SegnodeServe, parse_multipart_related, storescu, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "orthanc" / "segnode_plugin.py"
TOKEN = "e2e-token"
RULES = THRESHOLD_SEG_RULES


def make_node(workdir: Path, extra: str = "") -> SegnodeServe:
    """A node for these tests: no fsync (speed), a quick outbox retry, and ``extra`` tables."""
    outbox = "[outbox]\ninitial_delay_s = 0.2\nmax_delay_s = 0.5\npoll_s = 0.2\n"
    return SegnodeServe(workdir, rules=RULES, token=TOKEN, ingest="fsync = false", extra=outbox + extra)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[[str], SegnodeServe]]:
    nodes: list[SegnodeServe] = []

    def make(extra: str = "") -> SegnodeServe:
        folder = tmp_path / f"node{len(nodes)}"
        folder.mkdir()
        nodes.append(make_node(folder, extra))
        return nodes[-1]

    yield make
    for node in nodes:
        node.stop()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> dict[str, Path]:
    return write_phantom(TINY, tmp_path_factory.mktemp("phantom"))


@pytest.fixture
def secure_orthanc(tmp_path_factory, _exiting_servers) -> Iterator[Callable[..., SecureOrthanc]]:
    started: list[SecureOrthanc] = []

    def start(**kwargs: Any) -> SecureOrthanc:
        kwargs.setdefault("workdir", tmp_path_factory.mktemp("orthanc"))
        started.append(SecureOrthanc(**kwargs))
        return started[-1].start()

    yield start
    for server in started:
        _exiting_servers.add(server)


def stow_destination(orthanc: SecureOrthanc) -> str:
    return f"""
[[destinations]]
name = "orthanc"
kind = "stowrs"
url = "{orthanc.dicomweb_url}"
username = "{USER}"
password = "{PASSWORD}"
"""


def source_uids(phantom: dict[str, Path]) -> tuple[str, str]:
    first = pydicom.dcmread(min(phantom["dicom"].iterdir()), stop_before_pixels=True)
    return str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


def assert_seg_is_the_jobs_labels(
    seg_bytes: bytes, job: dict, phantom: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "retrieved-seg.dcm"
    path.write_bytes(seg_bytes)
    decoded = read_seg(path, phantom["dicom"])
    produced = read_nifti(Path(job["results"]) / "labels.nii.gz")
    assert decoded.array.shape == produced.array.shape
    assert np.array_equal(decoded.array, produced.array.astype(decoded.array.dtype))
    assert decoded.array.any()


def test_a_series_stored_into_orthanc_comes_back_as_a_seg_through_the_plugin(
    secure_orthanc, node_factory, phantom, tmp_path: Path
) -> None:
    node = node_factory("")
    orthanc = secure_orthanc(
        python_script=PLUGIN,
        stable_age=1,
        env={"SEGNODE_VENV": str(REPO / ".venv")},
        extra_config={"Segnode": {"NodeUrl": node.url, "NodeToken": TOKEN, "FirstRetrySeconds": 0.2}},
    )
    with open(node.config, "a") as config:
        config.write(
            stow_destination(orthanc)
            + f"""
[orthanc]
url = "{orthanc.http_url}"
username = "{USER}"
password = "{PASSWORD}"
"""
        )
    node.start()
    study, series = source_uids(phantom)
    unauthenticated = httpx.post(
        f"{node.url}/api/orthanc/series", json={"study_uid": study, "series_uid": series}, trust_env=False
    )
    assert unauthenticated.status_code == 401  # the hand-off route is behind the node's tokens

    storescu([phantom["dicom"]], "127.0.0.1", orthanc.dicom_port, orthanc.aet)

    segs = wait_for(
        lambda: orthanc.qido(f"/studies/{study}/series?Modality=SEG"),
        what="a SEG series in the study (QIDO-RS)",
        logs=lambda: node.log() + orthanc.log_tail(),
    )
    job = node.wait_job(  # the SEG goes out while the job still writes its other results: wait for both
        lambda j: j["state"] == "done" and j["destinations"].get("orthanc", {}).get("state") == "delivered"
    )
    assert (job["state"], job["series_uid"], job["study_uid"], job["sender"]["via"]) == (
        "done",
        series,
        study,
        "orthanc",
    )
    assert job["instance_count"] == 40
    delivered = job["destinations"]["orthanc"]
    assert (delivered["instances"], delivered["delivered"], delivered["attempts"]) == (1, 1, 1)
    assert len(segs) == 1
    seg_series = segs[0]["0020000E"]["Value"][0]
    instances = orthanc.qido(f"/studies/{study}/series/{seg_series}/instances")
    assert len(instances) == 1
    sop = instances[0]["00080018"]["Value"][0]
    content_type, body = orthanc.request(
        "GET",
        f"/dicom-web/studies/{study}/series/{seg_series}/instances/{sop}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
    )
    ((_, seg_part),) = parse_multipart_related(content_type, body)
    seg = pydicom.dcmread(io.BytesIO(seg_part))
    assert (seg.Modality, seg.Manufacturer, list(seg.ImageType)) == ("SEG", "segnode", ["DERIVED", "PRIMARY"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert_seg_is_the_jobs_labels(seg_part, job, phantom, tmp_path)
    # The SEG became a stable series in Orthanc too: the plugin saw it and kept it from the node.
    status = wait_for(
        lambda: (s := orthanc.rest_get("/segnode/status"))["skipped"] and s,
        what="the plugin's decision on the SEG series",
    )
    assert (status["handed_off"], status["skipped"], status["failed"]) == (1, 1, 0)
    skipped = next(e for e in status["recent"] if e["outcome"] == "skipped")
    assert (skipped["series_uid"], skipped["reason"]) == (
        seg_series,
        "Modality SEG is not an image to segment",
    )
    handed = next(e for e in status["recent"] if e["outcome"] == "handed_off")
    assert {k: handed["node"][k] for k in ("instances", "stored", "duplicates", "refused")} == {
        "instances": 40,
        "stored": 40,
        "duplicates": 0,
        "refused": 0,
    }
    assert [s["series_uid"] for s in node.api("/api/series")] == [series]


def test_a_series_sent_to_the_node_is_c_stored_to_orthanc_as_a_seg(orthanc, node_factory, phantom) -> None:
    node = node_factory(f"""
[[destinations]]
name = "pacs"
kind = "cstore"
host = "127.0.0.1"
port = {orthanc.dicom_port}
ae_title = "{orthanc.aet}"
""").start()
    study, series = source_uids(phantom)

    storescu([phantom["dicom"]], "127.0.0.1", node.dicom_port, "SEGNODE")

    job = node.wait_job(  # the SEG goes out while the job still writes its other results: wait for both
        lambda j: j["state"] == "done" and j["destinations"].get("pacs", {}).get("state") == "delivered"
    )
    assert job["sender"]["via"] == "dimse"
    segs = [s for s in orthanc.rest_get("/series?expand") if s["MainDicomTags"].get("Modality") == "SEG"]
    assert len(segs) == 1 and len(segs[0]["Instances"]) == 1
    seg = pydicom.dcmread(io.BytesIO(orthanc.request("GET", f"/instances/{segs[0]['Instances'][0]}/file")[1]))
    assert (seg.StudyInstanceUID, seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == (study, series)
    assert str(seg.SOPInstanceUID) == str(pydicom.dcmread(Path(job["results"]) / "seg.dcm").SOPInstanceUID)


def test_a_result_waiting_for_orthanc_is_delivered_once_it_is_back_exactly_once(
    secure_orthanc, node_factory, phantom
) -> None:
    orthanc = secure_orthanc()
    orthanc.process.kill()  # down before the result exists (kill -9: no 3.5 s shutdown)
    orthanc.stop()
    node = node_factory(stow_destination(orthanc)).start()
    study, _ = source_uids(phantom)

    storescu([phantom["dicom"]], "127.0.0.1", node.dicom_port, "SEGNODE")
    waiting = node.wait_job(
        lambda j: j["state"] == "done" and j["destinations"].get("orthanc", {}).get("attempts", 0) >= 2
    )
    state = waiting["destinations"]["orthanc"]
    assert (waiting["state"], state["state"], state["delivered"]) == ("done", "pending", 0)
    assert "Connection" in state["last_error"]
    node.stop()  # the node goes down too, and comes back with its outbox
    node.start()
    orthanc.start()

    job = node.wait_job(  # the SEG goes out while the job still writes its other results: wait for both
        lambda j: j["state"] == "done" and j["destinations"].get("orthanc", {}).get("state") == "delivered"
    )
    assert job["id"] == waiting["id"]
    assert job["destinations"]["orthanc"]["attempts"] > state["attempts"]
    segs = orthanc.qido(f"/studies/{study}/series?Modality=SEG")
    assert len(segs) == 1
    seg_series = segs[0]["0020000E"]["Value"][0]
    assert len(orthanc.qido(f"/studies/{study}/series/{seg_series}/instances")) == 1
    assert orthanc.instance_count() == 1

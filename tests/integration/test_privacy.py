"""No patient name, ID or birth date in any output of the node: a series with distinctive values goes through
every command (each a real process) and through the whole serve path (C-STORE by ``segnode send``, STOW-RS,
job, SEG, outbox delivery, the editor's save through the API), and none of the three values, in any case or
spelling, is in stdout, stderr or the log files. Control runs with ``log_phi = true`` (a ``run``, and the
same serve node after SIGHUP) show the same search finds them, so the test cannot pass for want of them.

The name has a single component on purpose: highdicom then warns with it in the text (the reported leak).
The serve node logs JSON lines to a file rotated at 0.008 MiB: every line parses, job lines carry their
ids."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from node.phantom import PhantomSpec, write_phantom
from tests.servers import REPO, SegnodeServe, free_port

pytestmark = pytest.mark.integration

NAME, PATIENT_ID, BIRTH = "QUENZORBLATT", "PX-99173Q", "19370215"
#: Every spelling the scrub must have removed (the search is case-insensitive).
SPELLINGS = ("quenzorblatt", "px-99173q", "px99173q", "19370215", "1937-02-15", "15.02.1937", "1937/02/15")
TOKEN = "privacy-token"
RULES = """
[[rule]]
name = "ct"
destinations = ["*"]
[rule.match]
modality = ["CT"]
[rule.pipeline]
engine = "threshold"
outputs = ["seg"]
"""


def leaks(text: str) -> list[str]:
    low = text.lower()
    return sorted({s for s in SPELLINGS if s in low})


def patient_series(folder: Path, seed: int, name: str = NAME) -> Path:
    """A 64x64x40 phantom whose every instance names the distinctive patient."""
    spec = PhantomSpec(size=(64, 64, 40), spacing=(3.2, 3.2, 6.0), seed=seed)
    dicom = write_phantom(spec, folder)["dicom"]
    rewrite(dicom, name)
    return dicom


def rewrite(folder: Path, name: str = NAME) -> None:
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path)
        except Exception:
            continue
        if "PatientName" in ds or ds.get("Modality") in ("CT", "SEG"):
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, PATIENT_ID, BIRTH
            ds.save_as(path)


def segnode(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "node", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def line_within(stream, seconds: float) -> str:
    """The next line of a child's pipe, waiting at most ``seconds`` for it to start."""
    import select

    readable, _, _ = select.select([stream], [], [], seconds)
    assert readable, f"no line within {seconds} s"
    return stream.readline()


def finish(process: subprocess.Popen[str], timeout: float = 180) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("privacy")
    from tests.xnat_fixtures import build_phantom_case

    build_phantom_case(root / "xnat")
    rewrite(root / "xnat")
    config = root / "node.toml"
    (root / "rules.toml").write_text(RULES)
    config.write_text(f'[node]\ndata_dir = "{root / "var"}"\nrules = "{root / "rules.toml"}"\n'
                      f'log_file = "log/cli.log"\n[ingest]\nquiet_seconds = 2\n')
    dicom = patient_series(root / "ct", seed=11)
    return {"root": root, "dicom": dicom, "xnat": root / "xnat", "config": config}


def test_every_command_keeps_patient_data_out_of_its_output(data: dict[str, Path]) -> None:
    root, dicom, c = data["root"], data["dicom"], ["--config", str(data["config"])]
    outputs: dict[str, tuple[int, str]] = {}
    port = free_port()
    listener = segnode(*c, "listen", "--port", str(port))  # started first: it overlaps the others
    first = {
        "run": segnode(*c, "run", str(dicom), str(root / "run"), "--engine", "threshold",
                       "--output-kind", "seg"),
        "volume-info": segnode(*c, "volume-info", str(dicom)),
        "convert": segnode(*c, "convert", str(dicom), str(root / "ct.nii.gz")),
        "rules test": segnode(*c, "rules", "test", str(dicom)),
        "xnat to-seg": segnode(*c, "xnat", "to-seg", str(data["xnat"]), str(root / "xnat-out"),
                               "--name", "verified"),
    }
    # The listener: a series sent to it is reported ready; its own output and log stay clean.
    try:
        assert "listening as" in line_within(listener.stderr, 120)
        sent = finish(segnode(*c, "send", str(dicom), "--to", f"127.0.0.1:{port}"))
        outputs["send"] = sent
        ready = json.loads(line_within(listener.stdout, 60))
    finally:
        listener.send_signal(signal.SIGTERM)
    outputs["listen"] = finish(listener, 30)
    outputs["listen"] = (outputs["listen"][0], json.dumps(ready) + outputs["listen"][1])
    outputs.update({name: finish(p) for name, p in first.items()})
    assert outputs["run"][0] == 0, outputs["run"][1]
    assert outputs["xnat to-seg"][0] == 0 and len(list((root / "xnat-out").rglob("*.dcm"))) == 1, \
        outputs["xnat to-seg"][1]
    seg, labels = root / "run" / "seg.dcm", root / "run" / "labels.nii.gz"
    second = {
        "seg info": segnode(*c, "seg", "info", str(seg)),
        "seg to-nifti": segnode(*c, "seg", "to-nifti", str(seg), str(root / "back.nii.gz"),
                                "--source", str(dicom)),
        "mesh": segnode(*c, "mesh", str(labels), str(root / "meshes"), "--mesh-smooth-iters", "0"),
        "slices": segnode(*c, "slices", str(dicom), str(root / "slices"), "--labels", str(labels),
                          "--planes", "axial", "--every", "10"),
        "control": segnode(*c, "run", str(dicom), str(root / "control"), "--engine", "threshold",
                           "--output-kind", "seg", env={"SEGNODE_NODE__LOG_PHI": "true",
                                                        "SEGNODE_NODE__LOG_FILE": str(root / "control.log")}),
    }
    outputs.update({name: finish(p) for name, p in second.items()})
    assert ready["ready"]["instance_count"] == 40
    assert sent[0] == 0 and "0x0000 success  40" in sent[1], sent[1]
    for name, (code, text) in outputs.items():
        if name != "control":
            assert leaks(text) == [], f"{name} (exit {code}) shows patient data:\n{text[-3000:]}"
    logs = "".join(p.read_text() for p in (root / "log").glob("cli.log*"))  # relative to the config's folder
    assert leaks(logs) == []
    assert 'UserWarning: The string "[redacted]" is unlikely to represent the intended person name' in logs
    # Control: with log_phi the same search finds the name (highdicom's warning) in the same command.
    control = outputs["control"][1] + (root / "control.log").read_text()
    assert outputs["control"][0] == 0 and leaks(control) == ["quenzorblatt"]


@pytest.fixture
def node(data: dict[str, Path], tmp_path: Path) -> Iterator[SegnodeServe]:
    extra = f'[[destinations]]\nname = "archive"\nkind = "folder"\npath = "{tmp_path / "archive"}"\n' \
            '[outbox]\npoll_s = 0.2\n'
    node = SegnodeServe(tmp_path, rules=RULES, token=TOKEN, ingest="", extra=extra)
    logging = 'log_file = "log/node.log"\nlog_format = "json"\nlog_max_mb = 0.008\nlog_backups = 200\n'
    text = node.config.read_text().replace("[node]\n", "[node]\n" + logging, 1)
    text = text.replace("[http]\n", '[http]\nadmin_users = ["test"]\n', 1)
    node.config.write_text(text.replace("quiet_seconds = 30", "quiet_seconds = 2"))
    yield node
    node.stop()


def archived(folder: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(list(folder.rglob("*.dcm"))) < count:
        time.sleep(0.2)
    assert len(list(folder.rglob("*.dcm"))) == count


def wait_done(node: SegnodeServe, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = node.api("/api/jobs")
        if len([j for j in jobs if j["state"] == "done"]) >= count:
            return
        assert not [j for j in jobs if j["state"] == "failed"], jobs
        time.sleep(0.2)
    raise AssertionError(f"not {count} jobs done: {node.api('/api/jobs')}")


def stow(node: SegnodeServe, folder: Path) -> None:
    from dicomweb_client import DICOMwebClient
    import requests

    session = requests.Session()
    session.trust_env = False
    client = DICOMwebClient(f"{node.url}/dicomweb", session=session,
                            headers={"Authorization": f"Bearer {TOKEN}"})
    client.store_instances([pydicom.dcmread(p) for p in sorted(folder.iterdir())])


def test_the_serve_path_keeps_patient_data_out_of_its_logs(node: SegnodeServe, data: dict[str, Path],
                                                           tmp_path: Path) -> None:
    node.start()
    by_cstore = finish(segnode("send", str(data["dicom"]), "--to", f"127.0.0.1:{node.dicom_port}"))
    assert by_cstore[0] == 0 and leaks(by_cstore[1]) == [], by_cstore[1]
    stow(node, patient_series(tmp_path / "stow", seed=12))
    wait_done(node, 2)
    jobs = node.api("/api/jobs")
    assert sorted(j["state"] for j in jobs) == ["done", "done"], jobs
    archived(tmp_path / "archive", 2)  # both SEGs delivered by the outbox
    # The editor: open the C-STORE series and save a correction through the API.
    series_uid = pydicom.dcmread(next(data["dicom"].iterdir()), stop_before_pixels=True).SeriesInstanceUID
    with httpx.Client(base_url=node.url, headers={"Authorization": f"Bearer {TOKEN}"}, trust_env=False,
                      timeout=60) as http:
        info = http.get(f"/api/edit/{series_uid}").json()
        plane = np.zeros((info["rows"], info["columns"]), "<u2")
        plane[20:30, 20:30] = 5
        payload = {"base_version": info["version"], "token": info["token"], "encoding": "zlib",
                   "slices": {"7": base64.b64encode(zlib.compress(plane.tobytes())).decode()}}
        saved = http.post(f"/api/edit/{series_uid}/save", json=payload)
        level = http.put("/api/log-level", json={"level": "DEBUG"})
    assert saved.status_code == 201, saved.text
    assert level.json() == {"level": "DEBUG"}
    archived(tmp_path / "archive", 3)  # the correction too
    folder = node.workdir / "log"  # relative to the config file's folder
    text_before = "".join(p.read_text() for p in folder.glob("node.log*"))
    assert leaks(text_before + node.log(tail=None)) == [], "patient data in the serve log"
    # Control: log_phi on by SIGHUP (the config read again), one more series: now the search finds the name.
    # (Its spelling differs in case: Python shows a warning once per text, and the search ignores case.)
    node.config.write_text(node.config.read_text().replace("[node]\n", "[node]\nlog_phi = true\n", 1))
    assert node.process is not None
    node.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "config reloaded: log level INFO, log_phi True" not in "".join(
            p.read_text() for p in folder.glob("node.log*")):
        time.sleep(0.1)
    stow(node, patient_series(tmp_path / "after", seed=13, name=NAME.title()))
    wait_done(node, 3)
    text_after = "".join(p.read_text() for p in folder.glob("node.log*"))
    assert "quenzorblatt" in leaks(text_after)
    # The file: rotated at its size, every line JSON, every line of a job with its job id and series UID.
    assert (folder / "node.log.1").is_file() and (folder / "node.log.1").stat().st_size <= 0.008 * 2**20
    entries = [json.loads(line) for p in folder.glob("node.log*") for line in p.read_text().splitlines()]
    job_lines = [e for e in entries if e["job_id"]]
    assert {j["id"] for j in node.api("/api/jobs")} <= {e["job_id"] for e in job_lines}
    worker_lines = [e for e in job_lines if e["logger"] == "node.jobs.worker"]
    assert worker_lines and all(re.fullmatch(r"[0-9.]+", e["series_uid"]) for e in worker_lines)
    assert any("unlikely to represent" in e["message"] for e in entries)  # highdicom's warning, scrubbed
    assert node.stop() == 0

"""node.logs: the scrub (registered values and known shapes, warnings and library loggers included),
file rotation, JSON lines, job context and level changes without a restart."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset

from node import logs
from node.config import Settings

NAME, PID, BIRTH = "Zorblatt^Quennifer", "PX-99173Q", "19370215"


def forbidden(text: str) -> list[str]:
    """Every spelling of the three values found in ``text`` (case-insensitive)."""
    low = text.lower()
    parts = ["zorblatt", "quennifer", "px-99173q", "19370215", "1937-02-15", "15.02.1937"]
    return [p for p in parts if p in low]


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    logs.SCRUBBER.clear()
    yield
    logs.SCRUBBER.clear()
    logs.setup(None, console=False)
    logging.captureWarnings(False)


def settings(tmp_path: Path, **node: object) -> Settings:
    return Settings(node={"data_dir": str(tmp_path), "log_file": "log/node.log", **node})


def write_dicom(path: Path, name: str = NAME, pid: str = PID, birth: str = BIRTH) -> None:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = pydicom.uid.CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, birth
    ds.OtherPatientIDs = ["OLD-77X1"]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_registered_values_are_scrubbed_in_every_spelling() -> None:
    logs.SCRUBBER.register([NAME, PID, BIRTH])
    text = ("ZORBLATT^QUENNIFER zorblatt Quennifer_x px-99173q 19370215 1937-02-15 15.02.1937 1937/02/15 "
            "uid 1.2.826.19370215.9 Zorblattian tests/unit quenniferx")
    scrubbed = logs.SCRUBBER.scrub(text)
    assert scrubbed == ("[redacted] [redacted] [redacted]_x [redacted] [redacted] [redacted] [redacted] "
                        "[redacted] uid 1.2.826.[redacted].9 Zorblattian tests/unit quenniferx")


def test_known_shapes_are_scrubbed_without_registration() -> None:
    cases = {
        'UserWarning: The string "Grobnik" is unlikely to represent the intended person name':
            'UserWarning: The string "[redacted]" is unlikely to represent the intended person name',
        "(0010,0010) Patient's Name                      PN: 'Doe^John'":
            "(0010,0010) Patient's Name                      PN: [redacted]",
        "PatientName='Smith^Anna', PatientID=12345, Modality=CT":
            "PatientName=[redacted], PatientID=[redacted], Modality=CT",
        "storing Mueller^Hans^^Dr failed": "storing [redacted] failed",
        "GET /dicom-web/studies?PatientName=Smi*&00100020=A77&limit=25 200":
            "GET /dicom-web/studies?PatientName=[redacted]&00100020=[redacted]&limit=25 200",
        "series 1.2.3 ready: complete, 40 instance(s)": "series 1.2.3 ready: complete, 40 instance(s)",
    }
    for given, expected in cases.items():
        assert logs.SCRUBBER.scrub(given) == expected


def test_warnings_and_library_records_reach_the_file_scrubbed(tmp_path: Path) -> None:
    logs.setup(settings(tmp_path), console=False)
    logs.SCRUBBER.register([NAME, PID, BIRTH])
    # highdicom's exact warning, for a single-component name it never saw registered
    from highdicom.valuerep import check_person_name

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        unseen = "Vexhollow"  # a name nobody registered
        check_person_name(unseen)
    logging.getLogger("pydicom").warning("bad value for %s in %s", "PatientID", PID)
    logging.getLogger("pynetdicom.events").info("peer sent Zorblatt^Quennifer born %s", BIRTH)
    try:
        raise ValueError(f"cannot parse {NAME!r}")
    except ValueError:
        logging.getLogger("highdicom.seg.sop").exception("request failed")
    text = (tmp_path / "log" / "node.log").read_text()
    assert "py.warnings" in text and "unlikely to represent" in text and "Vexhollow" not in text
    assert "pydicom: bad value for PatientID in [redacted]" in text
    assert "Traceback" in text and "ValueError: cannot parse '[redacted]'" in text
    assert forbidden(text) == []


def test_log_phi_true_shows_the_values_so_the_scrub_is_what_hides_them(tmp_path: Path) -> None:
    logs.setup(settings(tmp_path, log_phi=True), console=False)
    logs.SCRUBBER.register([NAME, PID, BIRTH])
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f'The string "{NAME}" is unlikely to represent', UserWarning, stacklevel=1)
    logging.getLogger("x").warning("id %s born %s", PID, BIRTH)
    text = (tmp_path / "log" / "node.log").read_text()
    assert sorted(forbidden(text)) == ["19370215", "px-99173q", "quennifer", "zorblatt"]


def test_values_are_read_from_dicom_files_one_per_folder(tmp_path: Path) -> None:
    write_dicom(tmp_path / "cases" / "a" / "scans" / "1.dcm")
    write_dicom(tmp_path / "cases" / "b" / "2.dcm", name="Ombrecht^Tyll", pid="ZZ-5150", birth="20011224")
    (tmp_path / "cases" / "b" / "notes.txt").write_text("not DICOM")
    logs.register_path(tmp_path / "cases")
    line = "Zorblatt Quennifer PX-99173Q OLD-77X1 1937-02-15 Ombrecht Tyll ZZ-5150 24.12.2001 kept"
    assert logs.SCRUBBER.scrub(line) == " ".join(["[redacted]"] * 9 + ["kept"])


def test_the_log_file_rotates_at_its_size_and_keeps_its_backups(tmp_path: Path) -> None:
    logs.setup(settings(tmp_path, log_max_mb=0.002, log_backups=2), console=False)  # ~2 KiB
    log = logging.getLogger("segnode.test")
    for n in range(200):
        log.info("line %03d %s", n, "x" * 40)
    folder = tmp_path / "log"
    assert sorted(p.name for p in folder.iterdir()) == ["node.log", "node.log.1", "node.log.2"]
    assert all(p.stat().st_size <= 2098 for p in folder.iterdir())
    assert "line 199" in (folder / "node.log").read_text()


def test_json_lines_parse_and_carry_job_and_series(tmp_path: Path) -> None:
    logs.setup(settings(tmp_path, log_format="json"), console=False)
    logs.SCRUBBER.register([NAME])
    log = logging.getLogger("node.jobs.worker")
    log.info("before")
    with logs.job_context("job-1", "1.2.3.4"):
        log.warning("inside, patient %s", NAME)
    log.info("after")
    lines = [json.loads(line) for line in (tmp_path / "log" / "node.log").read_text().splitlines()]
    assert [(e["message"], e["job_id"], e["series_uid"], e["level"], e["logger"]) for e in lines] == [
        ("before", "", "", "INFO", "node.jobs.worker"),
        ("inside, patient [redacted]", "job-1", "1.2.3.4", "WARNING", "node.jobs.worker"),
        ("after", "", "", "INFO", "node.jobs.worker"),
    ]
    assert lines[0]["time"].endswith("Z")


def test_text_lines_carry_job_and_series(tmp_path: Path) -> None:
    logs.setup(settings(tmp_path), console=False)
    with logs.job_context("job-7", "9.8.7"):
        logging.getLogger("node.pipeline").info("stage load done")
    (line,) = (tmp_path / "log" / "node.log").read_text().splitlines()
    assert line.endswith(" INFO node.pipeline [job=job-7 series=9.8.7]: stage load done")


def test_the_level_changes_by_reload_and_by_call(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path}"\nlog_file = "node.log"\nlog_level = "WARNING"\n')
    from node.config import load_settings

    logs.setup(load_settings(config), reload_settings=lambda: load_settings(config), console=False)
    log = logging.getLogger("segnode.level")
    log.info("hidden 1")
    config.write_text(config.read_text().replace('"WARNING"', '"DEBUG"'))
    assert logs.reload() == "DEBUG"
    log.debug("shown 1")
    assert logs.set_level("error") == "ERROR"
    log.warning("hidden 2")
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        logs.set_level("loud")
    config.write_text("[node]\nlog_level = 3\n")  # invalid now: nothing changes
    assert logs.reload() is None
    assert logs.current_level() == "ERROR"
    text = (tmp_path / "node.log").read_text()
    assert "shown 1" in text and "hidden" not in text and "config not reloaded" in text


def test_console_output_is_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    logs.SCRUBBER.register([PID])
    stream = logs.ScrubbedStream(sys.stdout)
    print(f"id {PID} and px-99173q", file=stream)
    assert capsys.readouterr().out == "id [redacted] and [redacted]\n"

"""The DICOM listener against real senders: dcmtk storescu/echoscu and pynetdicom, on loopback."""

from __future__ import annotations

import os
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dimse_messages import C_ECHO_RQ as DimseEchoRequest
from pynetdicom.dimse_messages import C_FIND_RQ as DimseFindRequest
from pynetdicom.dimse_messages import C_STORE_RQ as DimseStoreRequest
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_STORE
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification
from typer.testing import CliRunner

from node.cli import app
from node.config import Settings
from node.dicom.series import read_series
from node.dicom.writer import SeriesInfo, series_datasets, write_series
from node.ingest import SeriesReady
from node.ingest.instance import encode_instance, file_meta
from node.ingest.scp import Listener, start_listener
from node.ingest.send import handle_open
from node.ingest.spool import Spool
from tests.servers import (
    HOST, ServerError, echoscu, free_port, large_instance, port_is_open, require_program, self_signed_cert,
    storescu, wait_for,
)
from tests.unit.test_series import ramp_volume
from tests.unit.test_spool import bare

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


class Events:
    """SeriesReady events as the callback receives them, with a wait for the expected number."""

    def __init__(self) -> None:
        self.items: list[SeriesReady] = []
        self._changed = threading.Condition()

    def __call__(self, ready: SeriesReady) -> None:
        with self._changed:
            self.items.append(ready)
            self._changed.notify_all()

    def wait(self, count: int, timeout: float = 20) -> list[SeriesReady]:
        with self._changed:
            self._changed.wait_for(lambda: len(self.items) >= count, timeout)
            assert len(self.items) >= count, f"{len(self.items)} SeriesReady, expected {count}"
            return list(self.items)


@pytest.fixture
def listen(tmp_path: Path) -> Iterator[Callable[..., tuple[Listener, Events]]]:
    """Start in-process listeners (AE title SEGNODE, port chosen by the kernel) on tmp_path/data."""
    started: list[Listener] = []

    def start(*, fsync: bool = True, quiet: float = 3600, **dicom: object) -> tuple[Listener, Events]:
        settings = Settings(
            node={"data_dir": tmp_path / "data"},
            ingest={"fsync": fsync, "quiet_seconds": quiet},
            dicom={"ae_title": "SEGNODE", "host": HOST, **dicom},
        )
        events = Events()
        listener = start_listener(settings, events, port=0)
        started.append(listener)
        return listener, events

    yield start
    for listener in started:
        listener.stop()
        listener.receiver.close()


def scu(port: int, calling_aet: str = "TESTSCU", contexts=(CTImageStorage,), called_aet: str = "SEGNODE", **kwargs):
    ae = AE(ae_title=calling_aet)
    for context in contexts:
        ae.add_requested_context(context, ExplicitVRLittleEndian)
    return ae.associate(HOST, port, ae_title=called_aet, evt_handlers=[(evt.EVT_CONN_OPEN, handle_open)], **kwargs)


def spool_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.dcm"))


# --- real senders --------------------------------------------------------------------------------


def test_storescu_series_is_spooled_valid_and_ready_at_release(listen, tmp_path: Path) -> None:
    volume = ramp_volume(shape=(12, 32, 32))
    sent = write_series(volume, tmp_path / "sent", SeriesInfo(uid_seed="dcmtk"))
    listener, events = listen()
    storescu([tmp_path / "sent"], HOST, listener.port, "SEGNODE")
    [ready] = events.wait(1)  # quiet is an hour: only release + geometry can have made it ready
    assert (ready.reason, ready.instance_count, ready.generation, ready.is_image, ready.modality) == (
        "complete", 12, 1, True, "CT")
    assert (ready.sender.via, ready.sender.calling_aet, ready.sender.address) == ("dimse", "SEGNODE-TEST", HOST)
    stored = sorted(ready.folder.glob("*.dcm"))
    assert [p.name for p in stored] == sorted(f"{pydicom.dcmread(p).SOPInstanceUID}.dcm" for p in sent)
    check = subprocess.run([require_program("dcmftest"), *map(str, stored)], capture_output=True, text=True, check=False)
    assert [line.split(":")[0] for line in check.stdout.splitlines()] == ["yes"] * 12
    got = read_series(ready.folder)
    np.testing.assert_array_equal(got.array, volume.array)
    np.testing.assert_allclose(got.geometry.affine, volume.geometry.affine, atol=1e-5)
    for original in sent:
        a = pydicom.dcmread(original)
        b = pydicom.dcmread(ready.folder / f"{a.SOPInstanceUID}.dcm")
        assert (b.PixelData, b.ImagePositionPatient, b.SeriesInstanceUID) == (
            a.PixelData, a.ImagePositionPatient, a.SeriesInstanceUID)
        assert b.file_meta.SourceApplicationEntityTitle == "SEGNODE-TEST"


def test_eight_concurrent_associations_of_a_hundred(listen, tmp_path: Path) -> None:
    folders = []
    for n in range(8):
        folder = tmp_path / f"series{n}"
        info = SeriesInfo(uid_seed=f"concurrent{n}", series_number=n + 1)
        write_series(ramp_volume(shape=(100, 32, 32)), folder, info)
        folders.append(folder)
    listener, events = listen()
    with ThreadPoolExecutor(8) as pool:
        sends = [pool.submit(storescu, [f], HOST, listener.port, "SEGNODE", f"SCU{n}") for n, f in enumerate(folders)]
        for send in sends:
            send.result()
    ready = events.wait(8)
    assert sorted((r.reason, r.instance_count, r.generation) for r in ready) == [("complete", 100, 1)] * 8
    assert sorted(r.sender.calling_aet for r in ready) == [f"SCU{n}" for n in range(8)]
    assert len(spool_files(tmp_path / "data" / "spool")) == 800
    for r in ready:
        assert len(listener.receiver.spool.instances(r.series_uid)) == 100


def test_echoscu(listen) -> None:
    listener, _ = listen()
    echoscu(HOST, listener.port, "SEGNODE")


@pytest.mark.filterwarnings("ignore:.*VR UI")
def test_a_bad_instance_gets_its_status_and_the_association_goes_on(listen, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)  # files go as their raw bytes
    good1, good2, evil, cut, other = series_datasets(ramp_volume(shape=(5, 16, 16)), SeriesInfo(uid_seed="bad"))
    evil.SeriesInstanceUID = "../../../../tmp/segnode-evil"
    cut.save_as(tmp_path / "cut.dcm", enforce_file_format=True)
    (tmp_path / "truncated.dcm").write_bytes((tmp_path / "cut.dcm").read_bytes()[:-100])
    other.SOPClassUID = MRImageStorage  # the file meta (so the request) still says CT
    meta = file_meta(CTImageStorage, other.SOPInstanceUID, ExplicitVRLittleEndian)
    (tmp_path / "mismatch.dcm").write_bytes(meta + bare(other))
    listener, _ = listen()
    assoc = scu(listener.port)
    assert assoc.is_established
    statuses = []
    try:
        for item in (good1, evil, tmp_path / "truncated.dcm", tmp_path / "mismatch.dcm", good2):
            rsp = assoc.send_c_store(item)
            statuses.append((rsp.Status, str(rsp.get("ErrorComment", ""))[:30]))
        assert assoc.is_established
    finally:
        assoc.release()
    assert [s for s, _ in statuses] == [0x0000, 0xC010, 0xC000, 0xA900, 0x0000]
    assert statuses[1][1].startswith("SeriesInstanceUID is not a val")
    assert statuses[2][1].startswith("dataset is truncated or malfor")
    assert sorted(p.name for p in spool_files(tmp_path / "data" / "spool")) == sorted(
        f"{ds.SOPInstanceUID}.dcm" for ds in (good1, good2))
    assert not Path("/tmp/segnode-evil").exists()
    listener.receiver.poll()
    wait_for(lambda: listener.receiver.tracker.state(good1.SeriesInstanceUID, 0).open_sessions == 0)
    assert listener.receiver.tracker.state(good1.SeriesInstanceUID, 0).instance_count == 2


def test_duplicates_are_idempotent(listen, tmp_path: Path) -> None:
    series = series_datasets(ramp_volume(shape=(6, 16, 16)), SeriesInfo(uid_seed="dup"))
    listener, events = listen()
    for _ in range(2):
        assoc = scu(listener.port)
        assert [assoc.send_c_store(ds).Status for ds in series + series[:2]] == [0] * 8
        assoc.release()
    uid = series[0].SeriesInstanceUID
    wait_for(lambda: (s := listener.receiver.tracker.state(uid, 0)) is not None and s.open_sessions == 0)
    assert len(spool_files(tmp_path / "data" / "spool")) == 6
    assert len(listener.receiver.spool.instances(uid)) == 6
    assert [(r.instance_count, r.generation) for r in events.wait(1)] == [(6, 1)]
    assert listener.receiver.tracker.state(uid, 0).generation == 1  # the resend brought nothing new


# --- who may send ----------------------------------------------------------------------------------


def test_unknown_calling_aet_is_rejected_at_association(listen) -> None:
    listener, _ = listen(allowed_calling_aets=["TESTSCU"])
    assoc = scu(listener.port, calling_aet="INTRUDER")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)  # permanent, user, calling AE
    with pytest.raises(ServerError, match="Association Rejected"):
        echoscu(HOST, listener.port, "SEGNODE", calling_aet="INTRUDER")
    allowed = scu(listener.port, calling_aet="TESTSCU")
    assert allowed.is_established
    allowed.release()


def test_unknown_source_address_is_rejected_at_association(listen) -> None:
    listener, _ = listen(allowed_sources=["10.0.0.0/8", "192.168.1.7"])
    assoc = scu(listener.port)
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x01)  # permanent, user, no reason
    open_listener, _ = listen(allowed_sources=["127.0.0.0/8"])
    echoscu(HOST, open_listener.port, "SEGNODE")


def test_tls(listen, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    listener, events = listen(tls_cert=cert, tls_key=key)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    client.check_hostname = False
    series = series_datasets(ramp_volume(shape=(3, 8, 8)), SeriesInfo(uid_seed="tls"))
    assoc = scu(listener.port, tls_args=(client, None))
    assert [assoc.send_c_store(ds).Status for ds in series] == [0, 0, 0]
    assoc.release()
    assert [r.instance_count for r in events.wait(1)] == [3]
    plain = scu(listener.port)
    assert not plain.is_established


# --- the CLI ----------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*VR UI")
def test_segnode_send_counts_statuses(listen, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", False)  # the command changes it
    files = write_series(ramp_volume(shape=(4, 8, 8)), tmp_path / "src", SeriesInfo(uid_seed="cli"))
    bad = series_datasets(ramp_volume(shape=(1, 8, 8)), SeriesInfo(uid_seed="cli-bad"))[0]
    bad.StudyInstanceUID = "not-a-uid"
    bad.save_as(tmp_path / "src" / "bad.dcm", enforce_file_format=True)
    (tmp_path / "src" / "README").write_text("not DICOM")
    with zipfile.ZipFile(tmp_path / "series.zip", "w") as archive:
        for path in files:
            archive.write(path, path.name)
    listener, events = listen()
    runner = CliRunner()
    to = ["--to", f"{HOST}:{listener.port}", "--aet", "SEGNODE"]
    result = runner.invoke(app, ["send", str(tmp_path / "src"), *to])
    assert result.exit_code == 1, result.output
    assert "0x0000 success  4" in result.output
    assert "0xC010 failure  1" in result.output
    assert "skipped, not DICOM: 1" in result.output
    zipped = runner.invoke(app, ["send", str(tmp_path / "series.zip"), *to])
    assert zipped.exit_code == 0, zipped.output
    assert "0x0000 success  4" in zipped.output
    assert [r.instance_count for r in events.wait(1)] == [4]
    refused = runner.invoke(app, ["send", str(tmp_path / "src"), "--to", f"{HOST}:{free_port()}"])
    assert refused.exit_code == 1 and "association failed" in refused.output


def test_segnode_send_fails_within_its_timeout_when_the_receiver_stops_reading(
    storescp, tmp_path: Path, monkeypatch
) -> None:
    """storescp is suspended (SIGSTOP) right after it accepts the association, with a 24 MB request to
    come: ``segnode send --timeout 1.5`` fails with its error instead of blocking in a socket write for
    ever (pynetdicom clears the socket's timeout after connect; :mod:`node.scu` sets it again)."""
    import node.ingest.send as send_module

    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", False)  # the command changes it
    large_instance(tmp_path / "src", 24)
    bound, suspended = send_module.bound_socket_writes, []

    def bound_then_stop(assoc, timeout: float) -> None:
        bound(assoc, timeout)
        os.kill(storescp.pid, signal.SIGSTOP)
        suspended.append(storescp.pid)

    monkeypatch.setattr(send_module, "bound_socket_writes", bound_then_stop)
    results = []
    command = ["send", str(tmp_path / "src"), "--to", f"{HOST}:{storescp.port}", "--aet", storescp.aet,
               "--timeout", "1.5"]
    sending = threading.Thread(target=lambda: results.append(CliRunner().invoke(app, command)), daemon=True)
    try:
        sending.start()
        sending.join(15)
        assert not sending.is_alive(), "segnode send hangs on a receiver that stopped reading"
    finally:
        for pid in suspended:
            os.kill(pid, signal.SIGCONT)
    assert suspended == [storescp.pid]
    result = results[0]
    assert result.exit_code == 1, result.output
    assert ("association aborted during transfer: no C-STORE response to file 1 of 1, or the peer took none "
            "of it for 1.5 s") in " ".join(result.output.split())


# --- crash safety -------------------------------------------------------------------------------------


def _start_node(data: Path, port: int, quiet: float) -> subprocess.Popen[str]:
    env = {**os.environ, "SEGNODE_NODE__DATA_DIR": str(data), "SEGNODE_DICOM__HOST": HOST,
           "SEGNODE_INGEST__QUIET_SECONDS": str(quiet), "SEGNODE_NODE__LOG_LEVEL": "WARNING",
           "PYTHONPATH": str(REPO)}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "node", "listen", "--port", str(port), "--aet", "SEGNODE"],
        cwd=data.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    deadline = time.monotonic() + 30
    while not port_is_open(port):
        assert process.poll() is None, "the listener exited"
        assert time.monotonic() < deadline, "the listener did not open its port"
        time.sleep(0.05)
    return process


def test_sigkill_during_ingest_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    series = series_datasets(ramp_volume(shape=(400, 32, 32)), SeriesInfo(uid_seed="crash"))
    node = _start_node(data, port, quiet=3600)
    acknowledged: list[str] = []

    def send() -> None:
        assoc = scu(port)
        for ds in series:
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError:  # the association is gone
                return
            if status.get("Status") != 0x0000:
                return
            acknowledged.append(ds.SOPInstanceUID)

    sender = threading.Thread(target=send)
    sender.start()
    wait_for(lambda: len(acknowledged) >= 50)
    node.send_signal(signal.SIGKILL)
    node.wait()
    sender.join(30)
    assert 50 <= len(acknowledged) < len(series)

    # Restart: the spool is reconciled, and the interrupted series is handed on by the quiet period.
    node = _start_node(data, port, quiet=0.5)
    line, deadline = "", time.monotonic() + 60
    try:  # the first "ready" line, whatever else the listener prints first
        while '"ready"' not in line and time.monotonic() < deadline:
            readable, _, _ = select.select([node.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = node.stdout.readline() if readable else ""
            if readable and not line:  # stdout closed: the listener exited
                break
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(30)
    assert '"reason": "quiet"' in line and series[0].SeriesInstanceUID in line
    spool = Spool(data)
    rows = {r.info.sop_instance_uid: r for r in spool.instances(series[0].SeriesInstanceUID)}
    assert set(acknowledged) <= set(rows)
    for uid in acknowledged:
        assert encode_instance(rows[uid].path.read_bytes()).info.sop_instance_uid == uid
    assert list(data.rglob("*.tmp")) == []
    spool.close()


# --- the Upper Layer itself, with a raw peer ------------------------------------------------------


class RawPeer:
    """A DICOM peer over a plain socket, built from pynetdicom's PDU and DIMSE classes (not ours):
    it sends exactly what a test asks, malformed or not, and reads back whole PDUs."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=20)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def pdu(self) -> tuple[int, bytes]:
        """(type, whole PDU); (0, b"") when the connection was closed."""
        header = self._exactly(6)
        if not header:
            return 0, b""
        pdu_type, length = struct.unpack(">BxI", header)
        return pdu_type, header + self._exactly(length)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                return data
            data += chunk
        return data

    def associate(self, contexts, *, max_pdu: int = 16384, called: str = "SEGNODE") -> A_ASSOCIATE:
        """Propose ``contexts`` [(abstract syntax, [transfer syntaxes])] as IDs 1, 3, 5...; the answer."""
        rq = A_ASSOCIATE()
        rq.application_context_name = "1.2.840.10008.3.1.1.1"
        rq.calling_ae_title, rq.called_ae_title = "RAWPEER", called
        proposed = []
        for n, (abstract, syntaxes) in enumerate(contexts):
            context = build_context(abstract, syntaxes)
            context.context_id = 2 * n + 1
            proposed.append(context)
        rq.presentation_context_definition_list = proposed
        length = MaximumLengthNotification()
        length.maximum_length_received = max_pdu
        uid = ImplementationClassUIDNotification()
        uid.implementation_class_uid = "1.2.826.0.1.3680043.8.498.1"
        rq.user_information = [length, uid]
        self.sock.sendall(A_ASSOCIATE_RQ(rq).encode())
        pdu_type, raw = self.pdu()
        answer = {0x02: A_ASSOCIATE_AC, 0x03: A_ASSOCIATE_RJ}[pdu_type]()
        answer.decode(raw)
        return answer.to_primitive()

    def send(self, message, context_id: int, max_pdu: int = 16384) -> None:
        for primitive in message.encode_msg(context_id, max_pdu):
            self.sock.sendall(P_DATA_TF(primitive).encode())

    def message(self, *, pdu_lengths: list[int] | None = None) -> DIMSEMessage:
        """The next DIMSE message, from as many P-DATA-TF PDUs as it takes."""
        message = DIMSEMessage()
        while True:
            pdu_type, raw = self.pdu()
            assert pdu_type == 0x04, f"PDU type 0x{pdu_type:02X} where P-DATA-TF was expected: {raw!r}"
            if pdu_lengths is not None:
                pdu_lengths.append(len(raw) - 6)
            pdu = P_DATA_TF()
            pdu.decode(raw)
            if message.decode_msg(pdu.to_primitive()):
                return message

    def release(self) -> int:
        self.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        return self.pdu()[0]


def store_message(ds, message_id: int = 1) -> DimseStoreRequest:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = ds.SOPClassUID
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 0x0002
    primitive.DataSet = BytesIO(bare(ds))
    message = DimseStoreRequest()
    message.primitive_to_message(primitive)
    return message


def test_a_context_for_an_unsupported_abstract_syntax_is_rejected(listen) -> None:
    listener, _ = listen()
    peer = RawPeer(listener.port)
    ac = peer.associate([(StudyRootQueryRetrieveInformationModelFind, [ImplicitVRLittleEndian]),
                         (CTImageStorage, ["1.2.3.999"]), (CTImageStorage, [ExplicitVRLittleEndian])])  # fmt: skip
    assert ac.result == 0x00
    results = [(cx.context_id, cx.result) for cx in ac.presentation_context_definition_results_list]
    # abstract syntax not supported, transfer syntax not supported, acceptance (PS3.8 Table 9-18)
    assert results == [(1, 0x03), (3, 0x04), (5, 0x00)]
    assert peer.release() == 0x06
    peer.close()


def test_a_c_find_gets_a_failure_status_and_the_association_goes_on(listen) -> None:
    listener, _ = listen()
    first, second = series_datasets(ramp_volume(shape=(2, 8, 8)), SeriesInfo(uid_seed="find"))
    peer = RawPeer(listener.port)
    ac = peer.associate([(CTImageStorage, [ExplicitVRLittleEndian]), (Verification, [ImplicitVRLittleEndian])])
    assert [cx.result for cx in ac.presentation_context_definition_results_list] == [0, 0]
    peer.send(store_message(first, message_id=1), 1)
    assert peer.message().command_set.Status == 0x0000
    find = C_FIND()
    find.MessageID, find.AffectedSOPClassUID, find.Priority = 2, StudyRootQueryRetrieveInformationModelFind, 0
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientID = "STUDY", ""
    find.Identifier = BytesIO(bare(query, ImplicitVRLittleEndian))
    find_message = DimseFindRequest()
    find_message.primitive_to_message(find)
    peer.send(find_message, 1)
    rsp = peer.message().command_set
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status, rsp.CommandDataSetType) == (
        0x8020, 2, 0x0211, 0x0101)  # fmt: skip
    assert rsp.AffectedSOPClassUID == StudyRootQueryRetrieveInformationModelFind
    echo = C_ECHO()
    echo.MessageID, echo.AffectedSOPClassUID = 3, Verification
    echo_message = DimseEchoRequest()
    echo_message.primitive_to_message(echo)
    peer.send(echo_message, 3)
    rsp = peer.message().command_set
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8030, 3, 0x0000)
    peer.send(echo_message, 1)  # C-ECHO in the CT Image Storage context: not that context's SOP class
    assert peer.message().command_set.Status == 0x0122
    peer.send(store_message(second, message_id=4), 1)
    rsp = peer.message().command_set
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8001, 4, 0x0000)
    assert rsp.AffectedSOPInstanceUID == second.SOPInstanceUID
    assert peer.release() == 0x06
    peer.close()
    assert sorted(p.name for p in spool_files(listener.receiver.spool.root)) == sorted(
        f"{ds.SOPInstanceUID}.dcm" for ds in (first, second))  # fmt: skip


@pytest.mark.parametrize(
    ("after_association", "garbage", "reason"),
    [
        (False, b"\x09\x00\x00\x00\x00\x02\x00\x00", 0x01),  # unrecognized PDU type
        (False, b"\x04\x00\x00\x00\x00\x02\x00\x00", 0x02),  # P-DATA-TF before any association
        (True, b"\x04\x00\x00\x00\x00\x07\x00\x00\x00\x09\x01\x03\x00", 0x06),  # PDV longer than its PDU
        (True, b"\x04\x00\x00\x00\x00\x08\x00\x00\x00\x04\x07\x03\x00\x00", 0x06),  # context 7 not accepted
        (True, b"\x01\x00\x00\x00\x00\x04\x00\x01\x00\x00", 0x02),  # a second A-ASSOCIATE-RQ
    ],
)
def test_a_malformed_pdu_is_aborted_and_others_go_on(listen, after_association: bool, garbage: bytes,
                                                     reason: int) -> None:  # fmt: skip
    listener, events = listen()
    series = series_datasets(ramp_volume(shape=(3, 8, 8)), SeriesInfo(uid_seed=f"abort{reason}{after_association}"))
    good = scu(listener.port)
    assert good.is_established and good.send_c_store(series[0]).Status == 0x0000
    peer = RawPeer(listener.port)
    if after_association:
        assert peer.associate([(CTImageStorage, [ExplicitVRLittleEndian])]).result == 0x00
    peer.sock.sendall(garbage)
    pdu_type, raw = peer.pdu()
    assert (pdu_type, raw) == (0x07, b"\x07\x00\x00\x00\x00\x04\x00\x00\x02" + bytes([reason]))
    assert peer.pdu() == (0, b"")  # and the connection is closed
    peer.close()
    assert [good.send_c_store(ds).Status for ds in series[1:]] == [0x0000, 0x0000]
    good.release()
    assert [r.instance_count for r in events.wait(1)] == [3]
    echoscu(HOST, listener.port, "SEGNODE")


def test_responses_fit_the_peers_maximum_pdu(listen) -> None:
    listener, _ = listen()
    ds = series_datasets(ramp_volume(shape=(1, 512, 512)), SeriesInfo(uid_seed="maxpdu"))[0]
    assoc = scu(listener.port, max_pdu=16384)  # pynetdicom fragments its data set to what we allow
    assert assoc.is_established and assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    peer = RawPeer(listener.port)
    assert peer.associate([(CTImageStorage, [ExplicitVRLittleEndian])], max_pdu=64).result == 0x00
    peer.send(store_message(ds, message_id=9), 1, max_pdu=16384)
    lengths: list[int] = []
    rsp = peer.message(pdu_lengths=lengths).command_set
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8001, 9, 0x0000)
    assert rsp.AffectedSOPInstanceUID == ds.SOPInstanceUID
    assert len(lengths) > 1 and max(lengths) <= 64  # a ~150-byte response in PDUs of at most 64
    assert peer.release() == 0x06
    peer.close()
    stored = pydicom.dcmread(listener.receiver.spool.instance(ds.SOPInstanceUID).path)
    assert stored.PixelData == ds.PixelData


def test_max_associations(listen) -> None:
    listener, _ = listen(max_associations=2)
    first, second = scu(listener.port), scu(listener.port)
    assert first.is_established and second.is_established
    third = scu(listener.port)
    assert third.is_rejected
    rj = third.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit
    first.release()
    wait_for(lambda: listener._counted == 1)
    fourth = scu(listener.port)
    assert fourth.is_established
    second.release()
    fourth.release()


def test_called_ae_title(listen) -> None:
    listener, _ = listen()
    anyone = scu(listener.port, called_aet="ANY-SCP")  # any called AE title unless required
    assert anyone.is_established
    anyone.release()
    strict, _ = listen(require_called_aet=True)
    wrong = scu(strict.port, called_aet="ANY-SCP")
    assert wrong.is_rejected
    rj = wrong.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)  # called AE not recognized
    with pytest.raises(ServerError, match="Association Rejected"):
        echoscu(HOST, strict.port, "OTHER")
    echoscu(HOST, strict.port, "SEGNODE")


def test_silent_connections_are_closed(listen) -> None:
    listener, _ = listen(network_timeout=0.5)
    silent = RawPeer(listener.port)  # no A-ASSOCIATE-RQ: closed (ARTIM)
    assert silent.pdu() == (0, b"")
    idle = RawPeer(listener.port)  # an association that goes quiet: A-ABORT, then closed
    assert idle.associate([(CTImageStorage, [ExplicitVRLittleEndian])]).result == 0x00
    assert idle.pdu() == (0x07, b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00")
    assert idle.pdu() == (0, b"")
    silent.close()
    idle.close()
    echoscu(HOST, listener.port, "SEGNODE")  # and the listener serves on

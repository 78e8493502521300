"""The outbox's senders against real Orthanc: STOW-RS with basic auth and TLS verification, C-STORE,
superseded results deleted, an interrupted delivery found by QIDO-RS instead of sent twice.

``SecureOrthanc`` (also used by the end-to-end tests) is Orthanc with ``RegisteredUsers`` and ports
kept across a restart (so a node can find it again after it was down)."""

from __future__ import annotations

import base64
import io
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest

from node.config import Destination, OutboxSection
from node.dicom.writer import SeriesInfo, write_series
from node.export.outbox import Outbox
from node.export.senders import make_sender
from node.phantom import TINY, make_phantom
from tests.servers import OrthancServer, ServerError, large_instance, self_signed_cert

pytestmark = pytest.mark.integration

USER, PASSWORD = "segnode", "outbox-test-password"


class SecureOrthanc(OrthancServer):
    """Orthanc with authentication (``RegisteredUsers``) that keeps its ports across a restart."""

    def __init__(self, *, user: str = USER, password: str = PASSWORD, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.user, self.password = user, password

    def config(self) -> dict[str, Any]:
        config = super().config()
        config.update(AuthenticationEnabled=True, RegisteredUsers={self.user: self.password})
        return config

    def _pick_ports(self) -> None:
        if not (self.http_port and self.dicom_port):  # a restart keeps its ports
            super()._pick_ports()

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Any = None, timeout: float = 60
    ) -> tuple[str, bytes]:
        url = path if path.startswith("http") else self.http_url + path
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req = urllib.request.Request(
            url, data=body, method=method, headers={**dict(headers or {}), "Authorization": f"Basic {token}"}
        )
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                req, timeout=timeout
            ) as response:
                return response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as error:
            raise ServerError(
                f"{method} {url} -> HTTP {error.code}: {error.read().decode(errors='replace')}"
            ) from None

    def destination(self, name: str = "orthanc", **overrides: Any) -> Destination:
        values = {
            "name": name,
            "kind": "stowrs",
            "url": self.dicomweb_url,
            "username": self.user,
            "password": self.password,
        }
        values.update(overrides)
        return Destination(**values)

    def qido(self, path: str) -> list[dict]:
        return json.loads(
            self.request("GET", "/dicom-web" + path, headers={"Accept": "application/dicom+json"})[1] or b"[]"
        )

    def sop_uids(self, study_uid: str, modality: str | None = None) -> list[str]:
        query = f"/studies/{study_uid}/instances" + (f"?Modality={modality}" if modality else "")
        return sorted(i["00080018"]["Value"][0] for i in self.qido(query))


@pytest.fixture
def secure_orthanc(tmp_path_factory, _exiting_servers) -> Iterator[Callable[..., SecureOrthanc]]:
    """Start SecureOrthancs; each gets SIGTERM after the test and is reaped later (see conftest)."""
    started: list[SecureOrthanc] = []

    def start(**kwargs: Any) -> SecureOrthanc:
        kwargs.setdefault("workdir", tmp_path_factory.mktemp("orthanc"))
        server = SecureOrthanc(**kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        _exiting_servers.add(server)


@pytest.fixture(scope="module")
def seg_files(tmp_path_factory) -> SimpleNamespace:
    """A TINY phantom CT series and a real SEG of its labels (two generations, two SOP UIDs)."""
    from node.dicom.seg_write import SegOptions, write_seg

    root = tmp_path_factory.mktemp("seg")
    phantom = make_phantom(TINY)
    ct = write_series(phantom.ct, root / "ct", SeriesInfo(uid_seed="outbox-it"))
    (root / "v1").mkdir()
    (root / "v2").mkdir()
    first = write_seg(phantom.labels, root / "ct", root / "v1" / "seg.dcm")
    second = write_seg(phantom.labels, root / "ct", root / "v2" / "seg.dcm", options=SegOptions(version=2))
    study = str(pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    series = str(pydicom.dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID)
    return SimpleNamespace(
        ct=ct, v1=first, v2=second, study=study, series=series, uid1=_sop(first), uid2=_sop(second)
    )


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _job(job_id: str, series: str, study: str, destinations=("orthanc",)) -> SimpleNamespace:
    return SimpleNamespace(
        id=job_id, destinations={d: {} for d in destinations}, series_uid=series, study_uid=study
    )


class Counting:
    """A real sender that counts what it sends."""

    def __init__(self, sender) -> None:
        self.sender, self.sent = sender, []

    def send(self, items):
        self.sent.extend(i.sop_uid for i in items)
        return self.sender.send(items)

    def present(self, items):
        return self.sender.present(items)

    def delete(self, uids):
        return self.sender.delete(uids)

    def close(self):
        self.sender.close()


def test_stow_rs_with_basic_auth_delivers_once_and_a_wrong_password_fails_permanently(
    secure_orthanc, seg_files, tmp_path: Path
) -> None:
    orthanc = secure_orthanc()
    good, bad = orthanc.destination(), orthanc.destination("wrong-password", password="nope")
    outbox = Outbox(tmp_path, [good, bad], OutboxSection())
    results = seg_files.v1.parent

    outbox.enqueue_results(
        _job("j1", seg_files.series, seg_files.study, ["orthanc", "wrong-password"]), results
    )
    assert outbox.run_once() == 2
    states = outbox.job_destinations("j1")
    assert states["orthanc"]["state"] == "delivered" and states["orthanc"]["attempts"] == 1
    assert states["wrong-password"]["state"] == "failed" and states["wrong-password"]["attempts"] == 1
    assert states["wrong-password"]["last_error"].startswith("HTTP 401")
    assert orthanc.sop_uids(seg_files.study, "SEG") == [seg_files.uid1]
    # The same instance again (the job's hook twice, another job): nothing is sent.
    outbox.enqueue_results(_job("j1", seg_files.series, seg_files.study), results)
    outbox.enqueue_results(_job("j1-again", seg_files.series, seg_files.study), results)
    assert outbox.run_once() == 0
    assert outbox.job_destinations("j1-again")["orthanc"]["state"] == "delivered"
    assert orthanc.instance_count() == 1
    outbox.close()


def test_c_store_delivers_a_seg_to_orthanc(orthanc_factory, seg_files, tmp_path: Path) -> None:
    orthanc = orthanc_factory()
    destination = Destination(
        name="pacs", kind="cstore", host="127.0.0.1", port=orthanc.dicom_port, ae_title=orthanc.aet
    )
    outbox = Outbox(tmp_path, [destination], OutboxSection(), calling_aet="SEGNODE")
    outbox.enqueue_results(_job("j", seg_files.series, seg_files.study, ["pacs"]), seg_files.v1.parent)
    assert outbox.run_once() == 1
    assert outbox.job_destinations("j")["pacs"]["state"] == "delivered"
    stored = orthanc.rest_get("/instances?expand")
    assert [i["MainDicomTags"]["SOPInstanceUID"] for i in stored] == [seg_files.uid1]
    # exactly the file we sent, byte for byte in its dataset
    sent = pydicom.dcmread(seg_files.v1)
    got = pydicom.dcmread(io.BytesIO(orthanc.request("GET", f"/instances/{stored[0]['ID']}/file")[1]))
    assert got.PixelData == sent.PixelData and got.SegmentSequence == sent.SegmentSequence
    outbox.close()


def test_an_unreachable_c_store_peer_is_retried_and_a_rejecting_one_fails(tmp_path: Path, seg_files) -> None:
    from tests.servers import free_port

    down = Destination(name="down", kind="cstore", host="127.0.0.1", port=free_port(), ae_title="NOBODY")
    outbox = Outbox(tmp_path, [down], OutboxSection(initial_delay_s=7))
    outbox.enqueue_results(_job("j", seg_files.series, seg_files.study, ["down"]), seg_files.v1.parent)
    assert outbox.run_once() == 1
    state = outbox.job_destinations("j")["down"]
    assert (state["state"], state["attempts"]) == ("pending", 1)
    assert "no association" in state["last_error"] or "cannot connect" in state["last_error"]
    outbox.close()


def test_the_older_seg_is_deleted_from_orthanc_when_a_newer_one_is_delivered(
    secure_orthanc, seg_files, tmp_path: Path
) -> None:
    orthanc = secure_orthanc()
    outbox = Outbox(tmp_path, [orthanc.destination(delete_superseded=True)], OutboxSection())
    outbox.enqueue_results(_job("gen1", seg_files.series, seg_files.study), seg_files.v1.parent)
    outbox.run_once()
    assert orthanc.sop_uids(seg_files.study, "SEG") == [seg_files.uid1]
    outbox.enqueue_results(_job("gen2", seg_files.series, seg_files.study), seg_files.v2.parent)
    outbox.run_once()
    assert orthanc.sop_uids(seg_files.study, "SEG") == [seg_files.uid2]
    assert outbox.job_destinations("gen1")["orthanc"]["removed_superseded"] == 1
    assert outbox.job_destinations("gen2")["orthanc"]["state"] == "delivered"
    outbox.close()


def test_an_interrupted_stow_that_reached_orthanc_is_not_sent_again(
    secure_orthanc, seg_files, tmp_path: Path
) -> None:
    orthanc = secure_orthanc()
    first = Outbox(tmp_path, [orthanc.destination()], OutboxSection())
    first.enqueue_results(_job("j", seg_files.series, seg_files.study), seg_files.v1.parent)
    # The process sent the SEG and died before recording it: Orthanc has it, the outbox says delivering.
    make_sender(orthanc.destination()).send([first._item(seg_files.uid1)])
    first._claim("orthanc", first._db().execute("select * from deliveries").fetchall())
    del first

    counting: list[Counting] = []
    second = Outbox(
        tmp_path,
        [orthanc.destination()],
        OutboxSection(),
        senders=lambda d: counting.append(Counting(make_sender(d))) or counting[-1],
    )
    assert second.recovered == 1
    assert second.run_once() == 1
    assert counting[0].sent == []  # QIDO-RS found it
    state = second.job_destinations("j")["orthanc"]
    assert state["state"] == "delivered"
    assert state["last_error"] is None
    assert orthanc.sop_uids(seg_files.study) == [seg_files.uid1]
    second.close()


class TlsRelay:
    """A TLS-terminating TCP relay on 127.0.0.1 in front of a plain-HTTP server (as a hospital's reverse
    proxy in front of Orthanc). Debian's Orthanc 1.10.1 cannot be the TLS end itself: with
    ``SslEnabled`` it dies (SIGSEGV) on the first HTTPS request."""

    def __init__(self, cert: Path, key: Path, target_port: int) -> None:
        import socket
        import threading

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                tls = self.context.wrap_socket(client, server_side=True)
            except (OSError, ssl.SSLError):  # a client that refused our certificate
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((tls, upstream), (upstream, tls)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        try:
            while chunk := source.recv(1 << 16):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_stow_rs_over_https_verifies_the_certificate_as_configured(
    secure_orthanc, seg_files, tls_files, tmp_path: Path
) -> None:
    cert, key = tls_files
    orthanc = secure_orthanc()
    relay = TlsRelay(cert, key, orthanc.http_port)
    url = f"https://127.0.0.1:{relay.port}/dicom-web"
    destinations = [
        orthanc.destination("system-cas", url=url),  # a self-signed certificate is not trusted by default
        orthanc.destination("ca-bundle", url=url, ca_bundle=cert),
        orthanc.destination("no-verify", url=url, verify_tls=False),
    ]
    outbox = Outbox(tmp_path, destinations, OutboxSection(initial_delay_s=60))
    outbox.enqueue_results(
        _job("j", seg_files.series, seg_files.study, [d.name for d in destinations]), seg_files.v1.parent
    )
    try:
        assert outbox.run_once() == 3
        states = outbox.job_destinations("j")
    finally:
        outbox.close()
        relay.close()
    assert states["ca-bundle"]["state"] == "delivered" and states["no-verify"]["state"] == "delivered"
    assert states["system-cas"]["state"] == "pending"  # retried later: a certificate can be fixed
    assert "certificate verify failed" in states["system-cas"]["last_error"].lower()
    assert orthanc.sop_uids(seg_files.study, "SEG") == [seg_files.uid1]


def test_a_c_store_peer_that_stops_reading_mid_request_is_a_failed_attempt_retried(
    storescp, tmp_path: Path
) -> None:
    """storescp is suspended (SIGSTOP) right after it accepts the association, with a 24 MB request
    under way: the attempt fails within the timeout (pynetdicom alone would block in its socket write
    for ever), and once the peer runs again the next attempt delivers."""
    import os
    import signal
    import threading

    from node.export.senders import CStoreSender

    path = large_instance(tmp_path / "results", 24)
    destination = Destination(
        name="scp", kind="cstore", host="127.0.0.1", port=storescp.port, ae_title=storescp.aet
    )
    suspended: list[int] = []

    def suspending_sender(d: Destination) -> CStoreSender:
        sender = CStoreSender(d, timeout=1.5)
        associate = sender._associate

        def associate_then_stop(ae):
            assoc = associate(ae)
            if not suspended:  # the first association only
                os.kill(storescp.pid, signal.SIGSTOP)
                suspended.append(storescp.pid)
            return assoc

        sender._associate = associate_then_stop  # type: ignore[method-assign]
        return sender

    section = OutboxSection(initial_delay_s=0)
    outbox = Outbox(tmp_path / "outbox", [destination], section, senders=suspending_sender)
    study = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    try:
        outbox.enqueue("j", ["scp"], [path], source_series_uid="1.2.3", study_uid=study)
        attempt = threading.Thread(target=outbox.run_once, daemon=True)
        attempt.start()
        attempt.join(15)
        assert not attempt.is_alive(), "the C-STORE attempt hangs on a peer that stopped reading"
        state = outbox.job_destinations("j")["scp"]
        assert suspended and (state["state"], state["attempts"]) == ("pending", 1)
        assert "no C-STORE response" in state["last_error"]
    finally:
        for pid in suspended:
            os.kill(pid, signal.SIGCONT)
    assert outbox.run_once() == 1
    state = outbox.job_destinations("j")["scp"]
    assert (state["state"], state["attempts"]) == ("delivered", 2)
    received = storescp.received_files()
    assert len(received) == 1
    assert pydicom.dcmread(received[0]).PixelData == pydicom.dcmread(path).PixelData
    outbox.close()

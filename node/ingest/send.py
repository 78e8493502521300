"""A C-STORE SCU for people and tests: send a folder, zip or file of DICOM to a listener (PS3.4 B.2).

Files are sent in their own transfer syntax: one presentation context is proposed per (SOP class,
transfer syntax) pair found, so nothing is decompressed or re-encoded on the way. A bare data set (no
preamble, no file meta: old exports) is sent in the little endian encoding pydicom finds in it, as
dcmtk's storescu does.
"""

from __future__ import annotations

import io
import socket
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from node.scu import bound_socket_writes

#: pynetdicom (and PS3.8) allow at most 128 presentation contexts per association.
MAX_CONTEXTS = 128


def handle_open(event: evt.Event) -> None:
    """EVT_CONN_OPEN: turn off Nagle's algorithm. pynetdicom writes a PDU header and its data in
    separate sends; with Nagle each C-STORE waits for a delayed ACK (~40 ms)."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


@dataclass
class SendReport:
    """What happened to each file: DIMSE status counts, and files that were not sent."""

    statuses: Counter[int] = field(default_factory=Counter)
    not_dicom: list[str] = field(default_factory=list)
    #: Files whose SOP class / transfer syntax the receiver did not accept (or past 128 pairs).
    not_accepted: list[str] = field(default_factory=list)
    #: Files that cannot make a C-STORE request (no SOP Class/Instance UID in the data set, unreadable).
    unsendable: list[str] = field(default_factory=list)
    #: Set when the association could not be made (rejected, refused, aborted).
    error: str = ""

    @property
    def succeeded(self) -> int:
        return sum(n for status, n in self.statuses.items() if status == 0x0000)

    @property
    def failed(self) -> int:
        return (sum(n for status, n in self.statuses.items() if status != 0x0000) + len(self.not_accepted)
                + len(self.unsendable))


@dataclass(frozen=True)
class _Item:
    name: str
    sop_class: str
    syntax: str
    load: Callable[[], Dataset | Path]


def collect(path: Path) -> tuple[list[_Item], list[str]]:
    """Every DICOM Part 10 file under ``path`` (folder, zip or file), and the names of the rest."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    items, not_dicom = [], []
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = [
                (f"{path.name}:{i.filename}", archive.read(i)) for i in archive.infolist() if not i.is_dir()
            ]
        sources = [(name, lambda data=data: io.BytesIO(data), True) for name, data in members]
    else:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        sources = [(str(f), lambda f=f: f, False) for f in files]
    for name, opener, in_zip in sources:
        try:
            source = opener()
            if isinstance(source, Path):
                meta = pydicom.filereader.read_file_meta_info(source)
            else:
                header = pydicom.dcmread(source, stop_before_pixels=True, specific_tags=["SOPClassUID"])
                meta = header.file_meta
            sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        except Exception:  # noqa: BLE001 (whatever pydicom cannot read is "not DICOM")
            bare = _bare_dataset(opener)
            if bare is None:
                not_dicom.append(name)
            else:
                items.append(_Item(name, *bare))
            continue
        if in_zip:
            load: Callable[[], Dataset | Path] = lambda opener=opener: pydicom.dcmread(opener())
        else:
            load = lambda opener=opener: Path(opener())  # sent as a path: pynetdicom reads it itself
        items.append(_Item(name, sop_class, syntax, load))
    return items, not_dicom


def _bare_dataset(opener: Callable[[], object]) -> tuple[str, str, Callable[[], Dataset]] | None:
    """(SOP class, transfer syntax, loader) of a data set without preamble and file meta (PS3.10 7.1 not
    followed: old exports, ACR-NEMA style files), as dcmtk's storescu sends them; None if it is not DICOM.
    Its encoding is what pydicom detects (implicit or explicit VR little endian)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    def load() -> Dataset:
        source = opener()
        ds = pydicom.dcmread(source, force=True)
        implicit = ds.original_encoding[0] if ds.original_encoding else True
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        ds.file_meta = meta
        return ds

    try:
        ds = load()
        return str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID), load
    except Exception:  # noqa: BLE001 (not DICOM at all)
        return None


def send(
    path: Path,
    host: str,
    port: int,
    *,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "SEGNODE",
    progress: Callable[[int, int], None] | None = None,
    dimse_timeout: float = 30.0,
) -> SendReport:
    """Send every DICOM file under ``path`` in one association; count the statuses that come back.
    ``dimse_timeout``: seconds to wait for each response, and for a peer that stops reading to take
    more of a request, before the association is aborted."""
    items, not_dicom = collect(path)
    report = SendReport(not_dicom=not_dicom)
    if not items:
        return report
    pairs = list(dict.fromkeys((i.sop_class, i.syntax) for i in items))
    proposed = set(pairs[:MAX_CONTEXTS])
    ae = AE(ae_title=calling_aet)
    ae.dimse_timeout = dimse_timeout
    ae.requested_contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in proposed]
    assoc = ae.associate(host, port, ae_title=called_aet, evt_handlers=[(evt.EVT_CONN_OPEN, handle_open)])
    if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
        # Accepted, but no presentation context was (pynetdicom then aborts): nothing can be sent.
        report.not_accepted = [item.name for item in items]
        return report
    if not assoc.is_established:
        rejected = assoc.is_rejected
        report.error = "association rejected" if rejected else "association failed (refused or aborted)"
        return report
    bound_socket_writes(assoc, dimse_timeout)
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    try:
        for done, item in enumerate(items, 1):
            if (item.sop_class, item.syntax) not in accepted:
                report.not_accepted.append(item.name)
            else:
                try:
                    status = assoc.send_c_store(item.load())
                except RuntimeError:  # the association is no longer established
                    status = Dataset()
                except (AttributeError, ValueError, OSError, pydicom.errors.InvalidDicomError):
                    # pynetdicom found no SOP Class/Instance UID in the data set, or could not read it
                    report.unsendable.append(item.name)
                    continue
                if "Status" not in status:  # no response: the association went away
                    report.error = (f"association aborted during transfer: no C-STORE response to file "
                                    f"{done} of {len(items)}, or the peer took none of it for "
                                    f"{dimse_timeout:g} s")
                    break
                report.statuses[int(status.Status)] += 1
            if progress:
                progress(done, len(items))
    finally:
        if assoc.is_established:
            assoc.release()
    return report

"""The node on the network: ``send``, ``listen``, ``serve``, ``worker`` and ``viewer``.

Top-level commands: ``node/cli/__init__.py`` registers them on the app, in ``--help``'s order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from node.cli.common import _start_logging, fail, out, progress_bar, settings


def send_command(
    path: Annotated[Path, typer.Argument(help="A folder, zip or file of DICOM.")],
    to: Annotated[str, typer.Option("--to", help="The receiving C-STORE SCP as HOST:PORT.")],
    aet: Annotated[str, typer.Option("--aet", help="Called AE title (the receiver's).")] = "ANY-SCP",
    calling_aet: Annotated[str, typer.Option("--calling-aet", help="Our AE title.")] = "SEGNODE",
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for each response, or "
                                           "for a receiver that stops reading, before giving up.")] = 30.0,
) -> None:
    """Send DICOM files to a C-STORE SCP (this node, a PACS, Orthanc) and print the status counts."""
    from pynetdicom import _config as pynetdicom_config
    from pynetdicom.status import code_to_category

    from node.ingest.send import send
    from node.logs import register_path

    register_path(path)
    host, _, port = to.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise fail(f"--to must be HOST:PORT, got {to!r}", 2)
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # send each file's bytes as they are
    try:
        with progress_bar(f"Sending to {to}") as update:
            report = send(path, host, int(port), called_aet=aet, calling_aet=calling_aet, progress=update,
                          dimse_timeout=timeout)
    except FileNotFoundError as exc:
        raise fail(str(exc), 2) from None
    for status, count in sorted(report.statuses.items()):
        out.print(f"0x{status:04X} {code_to_category(status).lower():<8} {count}", highlight=False)
    if report.not_accepted:
        out.print(f"not accepted by the receiver (SOP class/transfer syntax): {len(report.not_accepted)}")
    if report.not_dicom:
        out.print(f"skipped, not DICOM: {len(report.not_dicom)}")
    if report.unsendable:
        out.print(f"not sent, no SOP Class/Instance UID in the data set: {len(report.unsendable)}")
    if report.error:
        raise fail(f"{to}: {report.error}")
    if report.failed:
        raise typer.Exit(1)


def listen_command(
    port: Annotated[Optional[int], typer.Option(help="Port (default: \\[dicom] port; 0 = any free one).")] = None,
    aet: Annotated[Optional[str], typer.Option("--aet", help="Our AE title (default: \\[dicom] ae_title).")] = None,
) -> None:
    """Run the DICOM listener in the foreground: store into the spool, print each series that is ready."""
    import signal
    import threading

    from node.ingest.scp import serve_forever, start_listener

    config = settings()
    if aet:
        config.dicom.ae_title = aet
    _start_logging(config)

    def ready(event) -> None:
        fields = ("series_uid", "reason", "instance_count", "generation", "modality", "is_image")
        typer.echo(json.dumps({"ready": {k: getattr(event, k) for k in fields}, "folder": str(event.folder)}))

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        listener = start_listener(config, ready, port=port)
    except (OSError, ValueError) as exc:
        raise fail(f"cannot listen: {exc}") from None
    typer.echo(f"listening as {config.dicom.ae_title} on {config.dicom.host}:{listener.port}", err=True)
    serve_forever(listener, stop)


def serve_command() -> None:
    """Run the node: DICOM listener, HTTP API with STOW-RS, and job workers (until Ctrl-C/SIGTERM)."""
    from node.rules import RulesError
    from node.serve import ServeError, serve

    config = settings()
    _start_logging(config)
    try:
        left = serve(config)
    except (ServeError, RulesError) as exc:
        raise fail(str(exc), 2) from None
    except OSError as exc:  # a port in use, an unwritable data folder
        raise fail(f"cannot start: {exc}") from None
    _end(left)


def _end(cut_off: int) -> None:
    """After a drain that left runs behind (already requeued, owning nothing): end now, not when
    their threads would (Python waits for non-daemon threads, e.g. a library's thread pool)."""
    if cut_off:
        import logging
        import os
        import sys

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def worker_command(
    node: Annotated[Optional[str], typer.Option(
        "--node", help="The node's HTTP root (http(s)://host:port): inputs and results travel over HTTP, no "
                       "shared folder (default: \\[worker] node_url).")] = None,
    token: Annotated[Optional[str], typer.Option(
        "--token", help="This worker's token (one of the node's \\[http] worker_tokens; default: "
                        "\\[worker] token, SEGNODE_WORKER__TOKEN).", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="cpu, gpu or gpu:N: a GPU worker also takes GPU jobs (default: \\[worker] device, "
                         "else \\[segmentation] device).")] = None,
) -> None:
    """Run job workers on the Redis queue, e.g. on a GPU machine: with --node, a remote worker that needs
    no shared folder; without, a worker that reads the node's spool (a shared mount)."""
    import re

    from pydantic import SecretStr

    from node.serve import ServeError, work

    config = settings()
    if node is not None:
        if not re.match(r"^https?://[^/\s]+", node):
            raise fail(f"--node must be http(s)://host:port, got {node!r}", 2)
        config.worker.node_url = node
    if token is not None:
        config.worker.token = SecretStr(token)
    if device is not None:
        if not re.match(r"^(cpu|gpu|gpu:\d+|mps)$", device):
            raise fail(f"--device must be cpu, gpu, gpu:N or mps, got {device!r}", 2)
        config.worker.device = device
    _start_logging(config)
    try:
        left = work(config)
    except ServeError as exc:
        raise fail(str(exc), 2) from None
    _end(left)


def viewer_command(
    dicomweb: Annotated[Optional[str], typer.Option(
        help="DICOMweb root to review (default: \\[orthanc] url + dicomweb_root, with its credentials).")] = None,
    ohif_dist: Annotated[Optional[Path], typer.Option(help="OHIF's dist/ (default: what make setup fetched).")] = None,
    username: Annotated[str, typer.Option(help="Basic user for --dicomweb.")] = "",
    password: Annotated[str, typer.Option(envvar="SEGNODE_VIEWER_PASSWORD", show_default=False)] = "",
    host: str = "127.0.0.1",
    port: int = 3000,
) -> None:
    """Review results in OHIF: its viewer, with a DICOMweb server behind a same-origin proxy (no CORS)."""
    from node.web.viewer import DEFAULT_DIST, ViewerError, serve_viewer

    if dicomweb is None:
        orthanc = settings().orthanc
        if not orthanc.url:
            raise fail("no DICOMweb server: give --dicomweb, or set [orthanc] url", 2)
        dicomweb = orthanc.url.rstrip("/") + orthanc.dicomweb_root
        username, password = orthanc.username, orthanc.password.get_secret_value()
    try:
        serve_viewer(ohif_dist or DEFAULT_DIST, dicomweb, host=host, port=port, username=username,
                     password=password)
    except ViewerError as exc:
        raise fail(str(exc), 2) from None

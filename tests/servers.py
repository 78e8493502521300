"""Real servers for integration tests: Orthanc, dcmtk storescp, Redis (and dcmtk SCU helpers).

Every server runs as a child process on 127.0.0.1 with free random ports, in its own working
folder, writing its output to ``server.log`` there. It is stopped by the PID we started
(SIGTERM, then SIGKILL after a timeout); nothing here looks processes up by name.

    with OrthancServer() as orthanc, StoreSCP() as scp:
        storescu(paths, "127.0.0.1", orthanc.dicom_port, orthanc.aet)
        assert orthanc.instance_count() == len(paths)

A missing program skips the test (naming it); in CI every program is installed, so nothing skips.

Orthanc facts (Debian bookworm: Orthanc 1.10.1, DICOMweb plugin 1.7, Python plugin 4.0):

* The binary is ``/usr/sbin/Orthanc``; plugins are symlinked into ``/usr/share/orthanc/plugins``
  (``orthanc/start-orthanc.sh`` uses the same paths; both honour ``ORTHANC_BINARY`` and
  ``ORTHANC_PLUGIN_DIR``). Loading that whole folder would also load ModalityWorklists and
  ServeFolders, so we name the two plugins we want.
* The Python plugin embeds Debian's ``libpython3.11`` (3.11.2, Debian's ``sys.path``), not the
  venv's interpreter. Without ``PythonScript`` it loads and stays idle.
* Orthanc 1.10.1 has no bind-address option: both ports listen on 0.0.0.0. With
  ``RemoteAccessAllowed: false`` the HTTP side refuses non-loopback clients; we only ever
  connect to 127.0.0.1.
* DCMTK programs and Orthanc's DICOM side get ``TCP_NODELAY=1`` (without it every C-STORE
  waits on Nagle's algorithm).
"""

from __future__ import annotations

import ctypes
import email.message
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import pytest

HOST = "127.0.0.1"

# Debian's paths (packages orthanc, orthanc-dicomweb, orthanc-python); see the module docstring.
ORTHANC_BINARY = os.environ.get("ORTHANC_BINARY", "/usr/sbin/Orthanc")
ORTHANC_PLUGIN_DIR = Path(os.environ.get("ORTHANC_PLUGIN_DIR", "/usr/share/orthanc/plugins"))
DICOMWEB_PLUGIN = ORTHANC_PLUGIN_DIR / "libOrthancDicomWeb.so"
PYTHON_PLUGIN = ORTHANC_PLUGIN_DIR / "libOrthancPython.so"

#: What DCMTK programs and Orthanc need in their environment (see DESIGN.md, Conventions).
NODELAY_ENV = {"TCP_NODELAY": "1"}

#: Log lines that mean "the port we picked was taken meanwhile": worth one more try.
_PORT_TAKEN = re.compile(r"address already in use|already in use|cannot listen|bind\(\)", re.IGNORECASE)

# urllib without proxies: test traffic must never leave 127.0.0.1, whatever *_proxy says.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """A server did not start, or a client program or request failed; the message says why."""


def wait_for(
    probe: Callable[[], Any], timeout: float = 60.0, what: str = "a condition", logs: Callable[[], str] = str
) -> Any:
    """``probe()``'s first truthy value, polled every 50 ms. After ``timeout`` seconds an AssertionError
    names ``what`` and appends ``logs()``: a guard against a hang, never a timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s\n{logs()}")


def stop_child(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> int:
    """Send ``sig`` to a child we started (by its PID) and return its exit status, SIGKILL after 30 s;
    0 when there is none."""
    if process is None:
        return 0
    if process.poll() is None:
        os.kill(process.pid, sig)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_is_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_program(path_or_name: str | os.PathLike[str]) -> str:
    """The full path of a program or file we need; skips the calling test when it is absent."""
    text = os.fspath(path_or_name)
    found = text if os.path.isabs(text) and os.path.exists(text) else shutil.which(text)
    if not found:
        pytest.skip(f"{text} is not installed")
    return found


def self_signed_cert(folder: Path, name: str = "tls", days: int = 2) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its CN and subjectAltName) valid ``days`` days, and its
    key, made by openssl in ``folder``: ``(<name>.pem, <name>.key)``."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        [require_program("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", str(days), "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def large_instance(folder: Path, megabytes: int, name: str = "large.dcm") -> Path:
    """A Secondary Capture of ``megabytes`` of pixel data: more than loopback's socket buffers hold, so
    a peer that stops reading leaves the sender's writes blocked mid-request."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    side = int((megabytes * 1024 * 1024 / 2) ** 0.5)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "OT"
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(side * side * 2)
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the test process dies without stopping us.

    Linux ties this to the thread that started the child: start servers from the main thread
    (or one that outlives them).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# --- DCMTK clients ----------------------------------------------------------------------------


def _run_dcmtk(args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    program = require_program(args[0])
    done = subprocess.run(
        [program, *args[1:]],
        env={**os.environ, **NODELAY_ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    # dcmtk 3.6.7 exits non-zero for a refused association, an abort, and a C-STORE failure
    # status (storescu exits 167 for 0xA700, printing nothing unless verbose: hence its -v).
    if done.returncode != 0:
        output = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
        raise ServerError(f"{' '.join(args)} failed (exit {done.returncode}):\n{output}".rstrip())
    return done


def echoscu(
    host: str, port: int, called_aet: str, calling_aet: str = "SEGNODE-TEST", timeout: float = 10
) -> subprocess.CompletedProcess[str]:
    """C-ECHO with dcmtk ``echoscu``; raises :class:`ServerError` (with its output) on failure."""
    t = str(max(1, int(timeout)))
    args = ["echoscu", "-aet", calling_aet, "-aec", called_aet, "-to", t, "-ta", t, "-td", t, host, str(port)]
    return _run_dcmtk(args, timeout=timeout + 5)


def storescu(
    paths: Iterable[str | os.PathLike[str]],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "SEGNODE-TEST",
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """C-STORE files (or folders, scanned recursively) with dcmtk ``storescu`` in one association.

    Raises :class:`ServerError` with storescu's output when it fails or any store is refused.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("storescu needs at least one file or folder")
    scan = ["+sd", "+r"] if any(os.path.isdir(p) for p in paths) else []
    t = str(max(1, int(timeout)))
    args = ["storescu", "-v", "-aet", calling_aet, "-aec", called_aet, "-to", t, "-ta", t, "-td", t, *scan]
    return _run_dcmtk([*args, host, str(port), *paths], timeout=timeout + 5)


# --- the common life cycle --------------------------------------------------------------------


class ServerProcess:
    """A server we start as a child process and stop by its PID.

    Subclasses say which program runs (:meth:`_command`) and when it is ready (:meth:`_ready`);
    :meth:`_pick_ports` is called before every attempt so a port taken meanwhile can be replaced.
    """

    name = "server"
    program = ""
    #: Seconds to wait for readiness before giving up.
    start_timeout = 30.0
    #: Seconds between SIGTERM and SIGKILL.
    stop_timeout = 15.0

    def __init__(self, workdir: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None):
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"segnode-{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "server.log"
        self.extra_env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self._terminated = False
        #: Seconds from spawn to readiness of the last successful start.
        self.startup_seconds: float | None = None

    # What subclasses provide.
    def _pick_ports(self) -> None:
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _environment(self) -> dict[str, str]:
        return {**os.environ, **self.extra_env}

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ServerError(f"{self.name} is not started")
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> Self:
        """Start the server with fresh free ports; raises :class:`ServerError` with its log tail."""
        if self.process is not None:
            raise ServerError(f"{self.name} is already running (PID {self.process.pid})")
        require_program(self.program)
        exit_code = None
        for attempt in range(3):
            self._pick_ports()
            exit_code = self._spawn_and_wait()
            if exit_code is None:
                return self
            if attempt == 2 or not _PORT_TAKEN.search(self.log_tail(200)):
                break
        tail = self.log_tail()
        self.stop()
        raise ServerError(
            f"{self.name} exited (code {exit_code}) before it was ready; the end of its log:\n{tail}"
        )

    def _spawn_and_wait(self) -> int | None:
        """Start the program; None once ready, its exit code if it exited first. Raises on timeout."""
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self._command(),
                cwd=self.workdir,
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = started + self.start_timeout
        while time.monotonic() < deadline:
            exit_code = self.process.poll()
            if exit_code is not None:
                self.process = None
                return exit_code
            if self._ready():
                self.startup_seconds = time.monotonic() - started
                return None
            time.sleep(0.05)
        tail = self.log_tail()
        self.stop()
        raise ServerError(
            f"{self.name} was not ready after {self.start_timeout:g} s; the end of its log:\n{tail}"
        )

    def terminate(self) -> None:
        """Send SIGTERM to our PID and return at once; :meth:`stop` then waits for the exit."""
        if self.process is not None and self.process.poll() is None and not self._terminated:
            self.process.terminate()
            self._terminated = True

    def stop(self) -> None:
        """SIGTERM our PID, wait, SIGKILL after :attr:`stop_timeout`; idempotent."""
        self.terminate()
        process, self.process = self.process, None
        if process is not None:
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._terminated = False
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- Orthanc ----------------------------------------------------------------------------------


class OrthancServer(ServerProcess):
    """Debian's Orthanc with the DICOMweb and Python plugins, no authentication, on loopback.

    ``python_script``: a Python plugin script (``PythonScript``); None loads the plugin idle.
    ``modalities``: ``DicomModalities``, e.g. ``{"scp": ["STORESCP", "127.0.0.1", 11112]}``,
    so Orthanc can C-STORE to a peer (``POST /modalities/scp/store``).
    ``extra_config``: more top-level configuration keys, applied last.
    ``env``: more environment variables for Orthanc (and so for the Python plugin).
    """

    name = "orthanc"
    program = ORTHANC_BINARY

    def __init__(
        self,
        *,
        aet: str = "ORTHANC",
        python_script: str | os.PathLike[str] | None = None,
        modalities: Mapping[str, Any] | None = None,
        stable_age: int = 2,
        extra_config: Mapping[str, Any] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ):
        super().__init__(workdir, env)
        self.aet = aet
        self.python_script = Path(python_script).resolve() if python_script else None
        self.modalities = dict(modalities or {})
        self.stable_age = stable_age
        self.extra_config = dict(extra_config or {})
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "orthanc.json"
        self.http_port = 0
        self.dicom_port = 0

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    def config(self) -> dict[str, Any]:
        """The configuration written to ``orthanc.json`` (see the Orthanc Book for each key)."""
        config: dict[str, Any] = {
            "Name": f"segnode-test-{self.http_port}",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StableAge": self.stable_age,
            "DicomModalities": self.modalities,
            "DicomScuTimeout": 30,
            "SaveJobs": False,
            "Plugins": [str(DICOMWEB_PLUGIN), str(PYTHON_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado"},
        }
        if self.python_script is not None:
            config["PythonScript"] = str(self.python_script)
            config["PythonVerbose"] = False
        config.update(self.extra_config)
        return config

    def _pick_ports(self) -> None:
        self.http_port = free_port()
        self.dicom_port = free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()

    def _command(self) -> list[str]:
        for plugin in (DICOMWEB_PLUGIN, PYTHON_PLUGIN):
            require_program(plugin)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        return [ORTHANC_BINARY, str(self.config_path)]

    def _environment(self) -> dict[str, str]:
        return {**super()._environment(), **NODELAY_ENV}

    def _ready(self) -> bool:
        # Orthanc opens its DICOM port before its HTTP port; check both anyway.
        try:
            system = self.rest_get("/system", timeout=1)
        except (OSError, ServerError):
            return False
        return system.get("HttpPort") == self.http_port and port_is_open(self.dicom_port)

    # REST, stdlib only.
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 60,
    ) -> tuple[str, bytes]:
        """One HTTP request to Orthanc; returns ``(content_type, body)``, raises on status >= 400."""
        url = path if path.startswith("http") else self.http_url + path
        req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
        try:
            with _HTTP.open(req, timeout=timeout) as response:
                return response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise ServerError(f"{method} {url} -> HTTP {error.code}: {detail}") from None

    def rest_get(self, path: str, timeout: float = 60) -> Any:
        """GET a JSON resource of the REST API, e.g. ``rest_get("/system")``."""
        return json.loads(self.request("GET", path, timeout=timeout)[1])

    def rest_post(self, path: str, body: Any = None, timeout: float = 120) -> Any:
        """POST ``body`` (JSON-encoded unless bytes or str); returns the answer, parsed if JSON."""
        if isinstance(body, bytes):
            data, content_type = body, "application/octet-stream"
        elif isinstance(body, str):
            data, content_type = body.encode(), "text/plain"
        else:
            data, content_type = json.dumps(body if body is not None else {}).encode(), "application/json"
        answer_type, answer = self.request("POST", path, data, {"Content-Type": content_type}, timeout)
        return json.loads(answer) if answer_type.startswith("application/json") else answer

    def rest_delete(self, path: str) -> None:
        self.request("DELETE", path)

    def instance_count(self) -> int:
        """How many instances Orthanc stores (``/statistics``)."""
        return int(self.rest_get("/statistics")["CountInstances"])

    def wado_rs_series(self, study_uid: str, series_uid: str, out_dir: str | os.PathLike[str]) -> list[Path]:
        """Retrieve a series over DICOMweb (WADO-RS) into ``out_dir``; one ``.dcm`` per part."""
        content_type, body = self.request(
            "GET",
            f"/dicom-web/studies/{study_uid}/series/{series_uid}",
            headers={"Accept": 'multipart/related; type="application/dicom"'},
        )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for n, (headers, content) in enumerate(parse_multipart_related(content_type, body), start=1):
            part_type = headers.get("content-type", "")
            if not part_type.startswith("application/dicom"):
                raise ServerError(f"WADO-RS part {n} is {part_type!r}, not application/dicom")
            path = out / f"part{n:05d}.dcm"
            path.write_bytes(content)
            paths.append(path)
        return paths


def parse_multipart_related(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Split a ``multipart/related`` body (RFC 2046 5.1) into ``(headers, content)`` parts.

    Header names are lower-cased. Content is returned byte for byte (DICOM is binary, so we
    split on the delimiter ``CRLF--boundary`` ourselves instead of using an email parser).
    """
    header = email.message.Message()
    header["Content-Type"] = content_type
    if header.get_content_type() != "multipart/related":
        raise ServerError(f"expected multipart/related, got {content_type!r}")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ServerError(f"no boundary in {content_type!r}")
    delimiter = b"\r\n--" + boundary.encode()
    chunks = (b"\r\n" + body).split(delimiter)
    parts = []
    for chunk in chunks[1:]:  # chunks[0] is the preamble
        if chunk.startswith(b"--"):  # the close delimiter
            break
        head, separator, content = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise ServerError("a multipart part has no blank line after its headers")
        headers = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:  # [0]: transport padding after the boundary
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers and int(headers["content-length"]) != len(content):
            length = headers["content-length"]
            raise ServerError(f"a part says Content-Length {length} but has {len(content)} bytes")
        parts.append((headers, content))
    else:
        raise ServerError("multipart body has no close delimiter")
    return parts


# --- dcmtk storescp ---------------------------------------------------------------------------


class StoreSCP(ServerProcess):
    """dcmtk ``storescp`` writing every received instance into :attr:`output_dir`."""

    name = "storescp"
    program = "storescp"

    def __init__(
        self,
        *,
        aet: str = "STORESCP",
        workdir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        options: Sequence[str] = (),
    ):
        """``options``: more storescp options, e.g. ``+uf`` (a file per instance received, even one
        received twice: to count them), ``-pm`` (SOP classes dcmtk does not know, as SEG in 3.6.7)."""
        super().__init__(workdir, env)
        self.aet = aet
        self.options = tuple(options)
        self.output_dir = self.workdir / "received"
        self.output_dir.mkdir(exist_ok=True)
        self.port = 0

    def _pick_ports(self) -> None:
        self.port = free_port()

    def _command(self) -> list[str]:
        return ["storescp", "-v", "--output-directory", str(self.output_dir), "-aet", self.aet,
                *self.options, str(self.port)]  # fmt: skip

    def _environment(self) -> dict[str, str]:
        return {**super()._environment(), **NODELAY_ENV}

    def _ready(self) -> bool:
        if not port_is_open(self.port):
            return False
        try:
            echoscu(HOST, self.port, self.aet, timeout=5)
        except ServerError:
            return False
        return True

    def received_files(self) -> list[Path]:
        """The files storescp has written, sorted by name."""
        return sorted(p for p in self.output_dir.iterdir() if p.is_file())


# --- Redis ------------------------------------------------------------------------------------


class RedisServer(ServerProcess):
    """``redis-server`` on loopback, nothing persisted, its folder as working directory."""

    name = "redis"
    program = "redis-server"

    def __init__(
        self, *, workdir: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
    ):
        super().__init__(workdir, env)
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _pick_ports(self) -> None:
        self.port = free_port()

    def _command(self) -> list[str]:
        return [
            "redis-server", "--port", str(self.port), "--bind", HOST, "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir),
        ]  # fmt: skip

    def _ready(self) -> bool:
        try:
            return self.ping() == "PONG"
        except OSError:
            return False

    def ping(self) -> str:
        """Send PING over a raw socket (RESP inline command); returns the reply without '+'."""
        return self.command("PING")

    def command(self, *words: str) -> str:
        """Send one inline command and return the first reply line (simple strings and errors)."""
        with socket.create_connection((HOST, self.port), timeout=2) as s:
            s.sendall(" ".join(words).encode() + b"\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        line = reply.decode(errors="replace").strip()
        if line.startswith("-"):
            raise ServerError(f"redis {' '.join(words)}: {line[1:]}")
        return line.lstrip("+")


REPO = Path(__file__).resolve().parents[1]


#: A node's rules.toml for the tests that run whole jobs: every original CT, the threshold engine, a SEG.
THRESHOLD_SEG_RULES = """
[[rule]]
name = "ct-seg"
destinations = ["*"]
[rule.match]
modality = ["CT"]
image_type = ["ORIGINAL"]
[rule.pipeline]
engine = "threshold"
outputs = ["seg"]
"""


class SegnodeServe:
    """``segnode serve`` as a subprocess on free loopback ports with a temporary config; stopped by its PID.

    ``ingest`` and ``http`` add keys to ``[ingest]`` and ``[http]`` (a TOML table may be written once);
    ``extra`` is appended as
    TOML tables (``[queue]``, ``[outbox]``, ``[[destinations]]`` ...).
    """

    def __init__(self, workdir: Path, *, rules: str, token: str, ingest: str = "", extra: str = "",
                 http: str = "", quiet_seconds: float = 30) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.token = token
        self.http_port, self.dicom_port = free_port(), free_port()
        (workdir / "rules.toml").write_text(rules)
        self.config = workdir / "node.toml"
        self.config.write_text(f"""
[node]
data_dir = "{self.data_dir}"
rules = "{workdir / "rules.toml"}"
[dicom]
host = "127.0.0.1"
port = {self.dicom_port}
[http]
port = {self.http_port}
tokens = {{ test = "{token}" }}
{http}
[ingest]
quiet_seconds = {quiet_seconds}
{ingest}
{extra}
""")
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        #: With ``tls_cert`` in ``http``: the node serves HTTPS; this CA bundle verifies it.
        self.ca_bundle: Path | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_bundle else 'http'}://127.0.0.1:{self.http_port}"

    def _verify(self) -> Any:
        import ssl

        return ssl.create_default_context(cafile=str(self.ca_bundle)) if self.ca_bundle else True

    def start(self, command: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> SegnodeServe:
        """Start ``segnode --config CONFIG serve`` (or ``command``, e.g. a systemd unit's, in ``env``
        and ``cwd``) and wait for ``/healthz``."""
        import httpx

        self.starts += 1
        with open(self.workdir / f"serve-{self.starts}.log", "wb") as log:
            self.process = subprocess.Popen(
                list(command or [sys.executable, "-m", "node", "--config", str(self.config), "serve"]),
                cwd=cwd or REPO, env=None if env is None else dict(env), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"segnode serve exited:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", trust_env=False, timeout=1,
                             verify=self._verify()).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"segnode serve did not start:\n{self.log()}")

    def log(self, tail: int | None = 3000) -> str:
        """The logs of every start, each cut to its last ``tail`` characters (None: whole)."""
        texts = (self.workdir / f"serve-{n}.log" for n in range(1, self.starts + 1))
        return "\n".join(t.read_text(errors="replace")[-tail if tail else 0:] for t in texts)

    def api(self, path: str) -> Any:
        import httpx

        response = httpx.get(
            self.url + path, headers={"Authorization": f"Bearer {self.token}"}, trust_env=False, timeout=10,
            verify=self._verify(),
        )
        response.raise_for_status()
        return response.json()

    def wait_job(self, predicate: Callable[[dict], bool], timeout: float = 60) -> dict:
        """The detail (``/api/jobs/{id}``) of the first job whose summary satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for job in self.api("/api/jobs"):
                if predicate(job):
                    return self.api(f"/api/jobs/{job['id']}")
            time.sleep(0.02)
        raise AssertionError(f"no job as expected within {timeout} s: {self.api('/api/jobs')}\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` to the PID we started and return its exit status (0 if it was not running)."""
        process, self.process = self.process, None
        return stop_child(process, sig)


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread; yields the base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            thread.join(0.01)
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


class SegnodeWorker:
    """``segnode worker --node URL --token T`` as a subprocess with its own data folder (no shared
    folder with the node); stopped by its PID."""

    def __init__(self, workdir: Path, *, node_url: str, token: str, redis_url: str, device: str = "cpu",
                 env: Mapping[str, str] | None = None, extra: str = "") -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.node_url, self.token, self.device = node_url, token, device
        self.env = dict(env or {})
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "worker.toml"
        self.config.write_text(f'[node]\ndata_dir = "{self.data_dir}"\n'
                               f'[queue]\nbackend = "redis"\nredis_url = "{redis_url}"\n{extra}\n')
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> SegnodeWorker:
        self.starts += 1
        env = {**os.environ, **self.env, "SEGNODE_WORKER__TOKEN": self.token}
        with open(self.workdir / f"worker-{self.starts}.log", "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "node", "--config", str(self.config), "worker", "--node", self.node_url,
                 "--device", self.device], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, env=env,
            )
        return self

    def wait_ready(self, timeout: float = 60) -> SegnodeWorker:
        """Until it logs that it takes jobs from the queue."""
        deadline = time.monotonic() + timeout
        current = self.workdir / f"worker-{self.starts}.log"
        while " thread(s) on the Redis queue" not in current.read_text(errors="replace"):
            assert self.process is not None
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"segnode worker did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self, tail: int | None = None) -> str:
        texts = (self.workdir / f"worker-{n}.log" for n in range(1, self.starts + 1))
        return "\n".join(t.read_text(errors="replace")[-tail if tail else 0:] for t in texts if t.exists())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        process, self.process = self.process, None
        return stop_child(process, sig)

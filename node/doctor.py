"""``segnode doctor``: what an administrator would check, each as ok / warn / fail with the fix.

One function per check, each taking the settings and returning :class:`Finding` lines; a check that
raises becomes a ``fail`` naming the exception (the doctor itself never stops half-way). The checks
look, they do not change anything: the data folder's probe file is deleted again, ports are bound
and released at once, a destination gets a C-ECHO (PS3.7 9.1.5) or a QIDO-RS search (PS3.18 10.6)
for one study, never a store.

Order: config, data folder (writable, file system), free disk, ports, TLS files, destinations,
Orthanc (its DICOMweb and the segnode plugin's hand-off route), Redis, TotalSegmentator weights per
rule, torch's device, Blender for the scene output.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from node.config import Destination, Settings, config_warnings

Status = Literal["ok", "warn", "fail"]
#: Seconds for each network probe (a destination, Orthanc, Redis).
TIMEOUT_S = 10.0
#: File systems the spool and journal are meant for; others get a warning saying why.
_LOCAL_FS = {"ext4", "ext3", "xfs", "btrfs", "zfs", "f2fs", "overlay", "bcachefs"}
_NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "sshfs", "fuse.sshfs", "glusterfs", "ceph", "9p"}


@dataclass(frozen=True)
class Finding:
    status: Status
    check: str
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"status": self.status, "check": self.check, "detail": self.detail, "fix": self.fix}


def ok(check: str, detail: str) -> Finding:
    return Finding("ok", check, detail)


def warn(check: str, detail: str, fix: str) -> Finding:
    return Finding("warn", check, detail, fix)


def fail(check: str, detail: str, fix: str) -> Finding:
    return Finding("fail", check, detail, fix)


# --- config, data folder, disk -------------------------------------------------------------------


def check_config(settings: Settings) -> list[Finding]:
    source = settings.source
    found: list[Finding] = []
    if source.path is None:
        found.append(
            warn(
                "config",
                source.describe(),
                "write /etc/segnode/node.toml (segnode install-service writes a starter) or pass --config",
            )
        )
    else:
        found.append(ok("config", source.describe()))
        if source.path.stat().st_mode & 0o004 and _holds_secrets(source.path):
            found.append(
                warn(
                    "config",
                    f"{source.path} holds secrets and every user can read it",
                    f"chmod 640 {source.path} (owner root, group of the node's user)",
                )
            )
    for text in config_warnings(settings):
        found.append(warn("config", text.split(": ", 1)[0], text.split(": ", 1)[-1]))
    return found


def _holds_secrets(path: Path) -> bool:
    """Whether the file sets a password, a token or a Redis URL with a password."""
    import tomllib

    def walk(value: object, key: str = "") -> bool:
        if isinstance(value, dict):
            if key == "tokens" and value:
                return True
            return any(walk(v, k) for k, v in value.items())
        if isinstance(value, list):
            return any(walk(v, key) for v in value)
        if key in ("password", "token") and value:
            return True
        return key == "redis_url" and "@" in str(value)

    return walk(tomllib.loads(path.read_text(encoding="utf-8")))


def _mount_of(path: Path) -> tuple[str, str]:
    """(mount point, file system type) holding ``path``, from /proc/self/mountinfo."""
    best, fstype = "/", "?"
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            fs = fields[fields.index("-") + 1]
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, fstype = point, fs
    return best, fstype


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_data_dir(settings: Settings) -> list[Finding]:
    data = Path(settings.node.data_dir)
    name = "data folder"
    if data.exists() and not data.is_dir():
        return [fail(name, f"{data} is not a folder", "set [node] data_dir to a folder")]
    if not data.exists():
        parent = _existing(data.parent)
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return [
                fail(
                    name,
                    f"{data} does not exist and cannot be made ({parent} is not a writable folder)",
                    f"mkdir -p {data} and give it to the node's user (segnode install-service does)",
                )
            ]
        return [
            warn(
                name,
                f"{data} does not exist yet (serve makes it)",
                f"mkdir -p {data} owned by the node's user, or let serve make it",
            )
        ]
    probe = data / f".doctor-{os.getpid()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"segnode doctor\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        return [
            fail(
                name,
                f"{data} is not writable: {exc.strerror}",
                f"chown -R <node user> {data}; chmod 750 {data}",
            )
        ]
    finally:
        probe.unlink(missing_ok=True)
    point, fstype = _mount_of(data)
    where = f"{data}: writable, {fstype} (mounted at {point})"
    if fstype == "tmpfs":
        return [
            warn(name, f"{where}: lost at every reboot", "put data_dir on a disk (e.g. /var/lib/segnode)")
        ]
    if fstype in _NETWORK_FS or fstype.startswith("fuse"):
        return [
            warn(
                name,
                f"{where}: a network or FUSE file system (locks, direct I/O and fsync are the "
                "journal's and SQLite's guarantees)",
                "put data_dir on a local disk",
            )
        ]
    return [ok(name, where)]


def check_disk(settings: Settings) -> list[Finding]:
    data = _existing(Path(settings.node.data_dir))
    usage = shutil.disk_usage(data)
    free_mb = usage.free // 2**20
    need = settings.ingest.min_free_mb
    detail = f"{free_mb} MB free on {data} (min_free_mb {need})"
    if free_mb < need:
        return [
            fail(
                "disk",
                f"{detail}: ingest refuses every instance (C-STORE 0xA700)",
                "free space or lower [ingest] min_free_mb",
            )
        ]
    headroom = need * 2 + settings.ingest.journal_mb
    if free_mb < headroom:
        return [
            warn(
                "disk",
                f"{detail}: less than {headroom} MB (twice min_free_mb plus the journal)",
                "free space, or shorten [ingest] retention_days",
            )
        ]
    return [ok("disk", detail)]


# --- ports, TLS ----------------------------------------------------------------------------------


def _serve_pid(settings: Settings) -> int | None:
    """The pid of a ``segnode serve`` holding this data folder's lock, if one does."""
    lock = Path(settings.node.data_dir) / "serve.lock"
    try:
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                text = handle.read().strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:  # no lock file, or not ours to read
        return None
    return None


def _port_owner_is(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` has a listening socket on ``port`` (from /proc); None when this user
    may not look (another user's process)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except PermissionError:
        return None
    except OSError:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows)
                for row in rows:
                    fields = row.split()
                    if (
                        int(fields[1].rsplit(":", 1)[1], 16) == port
                        and fields[3] == "0A"
                        and fields[9] in inodes
                    ):
                        return True
        except OSError:
            continue
    return False


def _check_port(check: str, host: str, port: int, key: str, serve_pid: int | None) -> Finding:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            owner = _port_owner_is(serve_pid, port) if serve_pid and serve_pid > 0 else False
            if owner:
                return ok(check, f"{host}:{port} in use by this node (segnode serve, pid {serve_pid})")
            if owner is None:
                return warn(
                    check,
                    f"{host}:{port} in use, by this node's serve (pid {serve_pid}) unless another "
                    "program holds it",
                    "run doctor as the node's user to tell",
                )
            return fail(
                check,
                f"{host}:{port} is in use by another program",
                f"stop that program (ss -ltnp 'sport = :{port}') or change {key}",
            )
        if exc.errno == errno.EACCES:
            return warn(
                check,
                f"{host}:{port}: binding needs a privilege this user lacks",
                "run as the systemd unit (it grants CAP_NET_BIND_SERVICE for ports below 1024)",
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return fail(check, f"{host} is not an address of this machine", f"change the host of {key}")
        return fail(check, f"{host}:{port}: {exc.strerror}", f"check {key}")
    finally:
        sock.close()
    return ok(check, f"{host}:{port} free")


def check_ports(settings: Settings) -> list[Finding]:
    pid = _serve_pid(settings)
    return [
        _check_port("dicom port", settings.dicom.host, settings.dicom.port, "[dicom] port", pid),
        _check_port("http port", settings.http.host, settings.http.port, "[http] port", pid),
    ]


def _certificate_expiry(path: Path) -> float | None:
    try:
        import ssl

        decoded = ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]
        return ssl.cert_time_to_seconds(decoded["notAfter"])
    except Exception:
        return None


def check_tls(settings: Settings) -> list[Finding]:
    import ssl

    found: list[Finding] = []
    cert, key = settings.dicom.tls_cert, settings.dicom.tls_key
    if cert is None and key is None:
        found.append(ok("tls", "DICOM TLS not used ([dicom] tls_cert and tls_key unset)"))
    elif cert is None or key is None:
        found.append(fail("tls", "[dicom] needs both tls_cert and tls_key", "set both, or neither"))
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            found.append(
                fail(
                    "tls",
                    f"{cert} / {key}: {getattr(exc, 'strerror', None) or exc}",
                    "make both files readable by the node's user and check that the key matches",
                )
            )
        else:
            expiry = _certificate_expiry(Path(cert))
            if expiry is not None and expiry < time.time():
                found.append(
                    fail(
                        "tls",
                        f"{cert} expired on {time.strftime('%Y-%m-%d', time.gmtime(expiry))}",
                        "renew the certificate",
                    )
                )
            elif expiry is not None and expiry < time.time() + 30 * 86400:
                found.append(
                    warn(
                        "tls",
                        f"{cert} expires on {time.strftime('%Y-%m-%d', time.gmtime(expiry))}",
                        "renew the certificate",
                    )
                )
            else:
                found.append(ok("tls", f"{cert} and {key} readable, the key matches"))
    bundles = [(f"destination {d.name}", d.ca_bundle) for d in settings.destinations if d.ca_bundle]
    if settings.orthanc.ca_bundle:
        bundles.append(("[orthanc]", settings.orthanc.ca_bundle))
    for owner, bundle in bundles:
        try:
            ssl.create_default_context(cafile=str(bundle))
            found.append(ok("tls", f"{owner}: CA bundle {bundle} readable"))
        except (OSError, ssl.SSLError) as exc:
            found.append(
                fail(
                    "tls",
                    f"{owner}: CA bundle {bundle}: {getattr(exc, 'strerror', None) or exc}",
                    "make it a readable PEM file",
                )
            )
    return found


# --- the network: destinations, Orthanc, Redis ----------------------------------------------------


def c_echo(calling_aet: str, host: str, port: int, called_aet: str, timeout: float = TIMEOUT_S) -> str | None:
    """A Verification (C-ECHO) round trip; None on success, else why not."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    try:
        assoc = ae.associate(host, port, ae_title=called_aet)
    except Exception as exc:  # noqa: BLE001 - socket errors surface here on some platforms
        return f"cannot connect: {exc}"
    if assoc.is_rejected:
        return "association rejected (the PACS does not know our AE title, or not its called one)"
    if not assoc.is_established:
        return "no association (connection refused, aborted or timed out)"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or status.get("Status") != 0x0000:
        return f"C-ECHO status {status.get('Status') if status else 'none'}"
    return None


def _qido(section, url: str) -> tuple[int | None, str]:  # type: ignore[no-untyped-def]
    """GET ``{url}/studies?limit=1`` with the section's credentials: (HTTP status, problem or '')."""
    from node.http import session_for

    session = session_for(section)
    try:
        response = session.get(
            f"{url.rstrip('/')}/studies",
            params={"limit": "1"},
            headers={"Accept": "application/dicom+json"},
            timeout=TIMEOUT_S,
        )
    except Exception as exc:  # noqa: BLE001 - connection refused, TLS, DNS, timeout
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        session.close()
    if response.status_code in (200, 204):
        return response.status_code, ""
    return response.status_code, f"HTTP {response.status_code}"


def _check_destination(settings: Settings, d: Destination) -> Finding:
    check = f"destination {d.name}"
    if d.kind == "cstore":
        problem = c_echo(settings.dicom.ae_title, d.host, d.port, d.ae_title)
        if problem is None:
            return ok(check, f"C-ECHO {settings.dicom.ae_title} -> {d.ae_title}@{d.host}:{d.port}: success")
        return fail(
            check,
            f"C-ECHO {settings.dicom.ae_title} -> {d.ae_title}@{d.host}:{d.port}: {problem}",
            f"check host, port and ae_title, and that the PACS accepts {settings.dicom.ae_title} "
            "from this address",
        )
    if d.kind == "stowrs":
        status, problem = _qido(d, d.url)
        if not problem:
            return ok(check, f"QIDO-RS {d.url}/studies: HTTP {status}")
        fix = (
            "check username/password or token"
            if status in (401, 403)
            else "check url (the DICOMweb root) and that the server runs"
        )
        return fail(check, f"QIDO-RS {d.url}/studies: {problem}", fix)
    path = Path(d.path) if d.path else None
    if path is None:
        return fail(check, "kind folder without a path", "set path")
    target = _existing(path)
    if target.is_dir() and os.access(target, os.W_OK | os.X_OK):
        return ok(check, f"{path} writable" + ("" if path.exists() else " (made at the first delivery)"))
    return fail(
        check, f"{path} is not writable by this user", f"mkdir -p {path} and give it to the node's user"
    )


def check_destinations(settings: Settings) -> list[Finding]:
    if not settings.destinations:
        return [
            warn(
                "destinations",
                "none configured: results stay in the data folder",
                "add [[destinations]] (stowrs, cstore or folder)",
            )
        ]
    return [_check_destination(settings, d) for d in settings.destinations]


def check_orthanc(settings: Settings) -> list[Finding]:
    section = settings.orthanc
    if not section.url:
        return [ok("orthanc", "plugin hand-off not used ([orthanc] url is empty)")]
    root = section.url.rstrip("/")
    found: list[Finding] = []
    status, problem = _qido(section, root + section.dicomweb_root)
    if problem:
        found.append(
            fail(
                "orthanc",
                f"DICOMweb {root}{section.dicomweb_root}/studies: {problem} (the node fetches "
                "handed-off series there by WADO-RS)",
                "check [orthanc] url, dicomweb_root and credentials; orthanc-dicomweb installed?",
            )
        )
        return found
    found.append(ok("orthanc", f"DICOMweb {root}{section.dicomweb_root}: HTTP {status}"))
    from node.http import session_for

    session = session_for(section)
    try:
        response = session.get(f"{root}/segnode/status", timeout=TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001
        return [*found, fail("orthanc plugin", f"{root}/segnode/status: {exc}", "check [orthanc] url")]
    finally:
        session.close()
    if response.status_code == 404:
        return [
            *found,
            fail(
                "orthanc plugin",
                "the segnode plugin is not loaded in this Orthanc: no hand-off",
                '"PythonScript": ".../orthanc/segnode_plugin.py" in Orthanc\'s config '
                "(orthanc/README.md), orthanc-python installed",
            ),
        ]
    if response.status_code != 200:
        return [
            *found,
            fail(
                "orthanc plugin",
                f"{root}/segnode/status: HTTP {response.status_code}",
                "check [orthanc] credentials",
            ),
        ]
    status_body = response.json()
    node_url = str(status_body.get("node_url", ""))
    parts = urlsplit(node_url)
    if not status_body.get("worker_alive"):
        found.append(
            fail(
                "orthanc plugin",
                "the plugin's hand-off thread is not running",
                "restart Orthanc; its log says why the thread stopped",
            )
        )
    elif parts.port != settings.http.port:
        found.append(
            fail(
                "orthanc plugin",
                f"hands off to {node_url}, but this node listens on "
                f"{settings.http.host}:{settings.http.port}",
                'set "Segnode": {"NodeUrl": ...} in Orthanc\'s config (or SEGNODE_NODE_URL)',
            )
        )
    else:
        found.append(
            ok(
                "orthanc plugin",
                f"loaded, hands off to {node_url}/api/orthanc/series "
                f"({status_body.get('handed_off', 0)} series so far)",
            )
        )
    if status_body.get("venv_error"):
        found.append(
            warn(
                "orthanc plugin",
                f"the node's venv did not load in Orthanc: {status_body['venv_error']} "
                "(the plugin uses its built-in rules)",
                "set Segnode.Venv (SEGNODE_VENV) to the node's virtual environment",
            )
        )
    return found


def check_redis(settings: Settings) -> list[Finding]:
    if settings.queue.backend != "redis":
        return [ok("redis", f"not used (queue backend {settings.queue.backend})")]
    import redis

    url = settings.queue.redis_url.get_secret_value()
    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"  # no password
    try:
        client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        client.ping()
        version = client.info("server").get("redis_version", "?")
        client.close()
    except Exception as exc:  # noqa: BLE001
        return [
            fail(
                "redis",
                f"{shown}: {type(exc).__name__}: {exc}",
                "start redis-server, or fix [queue] redis_url (SEGNODE_QUEUE__REDIS_URL)",
            )
        ]
    return [ok("redis", f"{shown}: PING answered (Redis {version})")]


# --- what the rules need: weights, torch, Blender -------------------------------------------------


def _rules(settings: Settings):  # type: ignore[no-untyped-def]
    from node.rules import load_rules

    return load_rules(settings.node.rules, [d.name for d in settings.destinations])


def check_rules(settings: Settings) -> list[Finding]:
    from node.rules import RulesError

    try:
        rules = _rules(settings)
    except RulesError as exc:
        return [fail("rules", str(exc), "fix the rules file")]
    if not Path(settings.node.rules).exists():
        return [
            warn(
                "rules",
                f"{settings.node.rules} not found: the built-in default rule applies "
                "(every CT and MR series, the [segmentation] engine, every destination)",
                "write the rules file, or set [node] rules",
            )
        ]
    return [ok("rules", f"{settings.node.rules}: {len(rules)} rule(s): {', '.join(r.name for r in rules)}")]


def _totalseg_rules(settings: Settings) -> list[tuple[str, str, bool, bool]]:
    """(rule, task, fast, fastest) of each rule that runs TotalSegmentator."""
    seg, out = settings.segmentation, []
    for rule in _rules(settings):
        spec = rule.pipeline
        if (spec.engine or seg.engine) != "totalsegmentator":
            continue
        fast = seg.fast if spec.fast is None else spec.fast
        out.append((rule.name, spec.task or seg.task, fast, seg.fastest and not fast))
    return out


def check_weights(settings: Settings) -> list[Finding]:
    from node.segment import weights as W

    rules = _totalseg_rules(settings)
    if not rules:
        return [ok("weights", "no rule runs TotalSegmentator")]
    home = W.home_dir(settings)
    found: list[Finding] = []
    for rule, task, fast, fastest in rules:
        mode = "fast" if fast else "fastest" if fastest else "full"
        check = f"weights rule {rule}"
        try:
            ids = W.required_datasets(task, fast=fast, fastest=fastest)
            missing = W.missing_folders(home, ids)
        except W.WeightsError as exc:
            found.append(fail(check, f"task {task} ({mode}): {exc}", "fix the rule's task"))
            continue
        except ImportError as exc:
            found.append(
                fail(check, f"TotalSegmentator cannot be imported: {exc}", "pip install TotalSegmentator")
            )
            continue
        if missing:
            found.append(
                fail(
                    check,
                    f"task {task} ({mode}): missing {', '.join(missing)} under {W.results_dir(home)}",
                    W.import_hint(),
                )
            )
        else:
            found.append(
                ok(check, f"task {task} ({mode}): {len(ids)} dataset(s) present in {W.results_dir(home)}")
            )
    return found


def check_torch(settings: Settings) -> list[Finding]:
    device = settings.segmentation.device
    needed = bool(_totalseg_rules(settings))
    try:
        import torch
    except ImportError as exc:
        if needed:
            return [fail("torch", f"cannot be imported: {exc}", "pip install torch==2.13.0 (see README)")]
        return [
            warn("torch", f"cannot be imported ({exc}); no rule needs it now", "pip install torch==2.13.0")
        ]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus))
    build = f"torch {torch.__version__}" + (
        f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU build"
    )
    if device.startswith("gpu"):
        index = int(device.split(":")[1]) if ":" in device else 0
        if index < gpus:
            return [ok("torch", f"device {device}: {torch.cuda.get_device_name(index)} ({build})")]
        return [
            fail(
                "torch",
                f"device {device}, but torch sees {gpus} GPU(s) ({build})",
                "install a CUDA build of torch 2.13.0 and the NVIDIA driver, check CUDA_VISIBLE_DEVICES, "
                'or set [segmentation] device = "cpu"',
            )
        ]
    if device == "mps":
        if torch.backends.mps.is_available():
            return [ok("torch", f"device mps ({build})")]
        return [
            fail(
                "torch", f"device mps, but it is not available ({build})", 'set [segmentation] device = "cpu"'
            )
        ]
    if gpus:
        return [
            warn(
                "torch",
                f"device cpu, but {gpus} GPU(s) visible: {names} ({build})",
                'set [segmentation] device = "gpu" to use them',
            )
        ]
    return [ok("torch", f"device cpu, {settings.segmentation.threads} thread(s); no GPU visible ({build})")]


def check_blender(settings: Settings) -> list[Finding]:
    from node.artifacts.blender import find_blender, no_blender_message

    needing = [r.name for r in _rules(settings) if "blender" in r.pipeline.outputs]
    found = find_blender()
    if found is not None:
        return [
            ok(
                "blender",
                f"{found.kind} {found.executable}"
                + (
                    f" (for rule(s) {', '.join(needing)})"
                    if needing
                    else "; no rule asks for the scene output"
                ),
            )
        ]
    if needing:
        return [
            fail(
                "blender",
                f"rule(s) {', '.join(needing)} ask for the Blender scene; {no_blender_message()}",
                "run scripts/setup.sh, or set SEGNODE_BLENDER",
            )
        ]
    return [ok("blender", "not found, and no rule asks for the Blender scene")]


CHECKS: tuple[Callable[[Settings], list[Finding]], ...] = (
    check_config,
    check_data_dir,
    check_disk,
    check_ports,
    check_tls,
    check_destinations,
    check_orthanc,
    check_redis,
    check_rules,
    check_weights,
    check_torch,
    check_blender,
)


def run_checks(
    settings: Settings, checks: Iterable[Callable[[Settings], list[Finding]]] = CHECKS
) -> list[Finding]:
    """Every check's findings, in order; a check that raises is a ``fail`` naming the exception."""
    findings: list[Finding] = []
    for check in checks:
        name = check.__name__.removeprefix("check_").replace("_", " ")
        try:
            findings += check(settings)
        except Exception as exc:  # noqa: BLE001 - the doctor reports, it never stops half-way
            findings.append(
                fail(
                    name,
                    f"the check itself failed: {type(exc).__name__}: {exc}",
                    "see the message; the other checks ran",
                )
            )
    return findings

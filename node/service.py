"""``segnode install-service``: systemd units for ``serve`` and per-GPU ``worker@N``, a dedicated user,
the data folder, a starter config.

Two units, rendered from the node's config (:func:`plan`):

* ``segnode.service`` runs ``segnode --config FILE serve`` (listener, HTTP, workers);
* ``segnode-worker@.service`` runs ``segnode --config FILE worker`` with ``CUDA_VISIBLE_DEVICES=N``
  for ``segnode-worker@N`` (extra workers on the Redis queue, one per GPU; each sees its GPU as the
  first, so ``[segmentation] device = "gpu"`` picks it).

Both run as the dedicated user, in the data folder (``/var/lib/segnode`` by default, systemd's
``StateDirectory`` when it is under ``/var/lib``), restart on failure (not after exit status 2: a
config error does not heal by restarting), and stop by draining: SIGTERM to the main process only
(``KillMode=mixed``: nnU-Net's and Blender's child processes are not killed under a running job),
running jobs get ``[queue] stop_grace_s`` and are requeued after it (:mod:`node.serve`), and
``TimeoutStopSec`` leaves :data:`node.serve.STOP_MARGIN_S` beyond that for HTTP, the listener, the
outbox and the journal. Hardening keeps what the node needs: the data folder, folder destinations,
the log file's folder and an outside weights folder writable; the GPU device nodes visible (no
``PrivateDevices``, ``DevicePolicy`` or ``ProtectClock``, which would hide ``/dev/nvidia*``); no
W^X memory rule (torch and Blender generate code); ``CAP_NET_BIND_SERVICE`` only when a port is
below 1024 (DICOM's 104).

Run for real (as root, ``--root /``) it also makes the system user and group, the data folder (owned
by the user, 0750), ``/etc/segnode`` (root:segnode, 0750), a starter ``node.toml`` if there is none
(0640), and reloads systemd; it never enables or starts a unit (it prints the commands). With
``--root DIR`` (packaging, tests) it only writes the files under ``DIR``; ``--dry-run`` writes nothing.
"""

from __future__ import annotations

import math
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from node.config import Settings

UNIT_DIR = Path("etc/systemd/system")
SERVE_UNIT = "segnode.service"
WORKER_UNIT = "segnode-worker@.service"
DEFAULT_USER = "segnode"
DEFAULT_CONFIG = Path("/etc/segnode/node.toml")
DEFAULT_DATA_DIR = Path("/var/lib/segnode")
#: systemd's PATH for services (``systemd.exec(5)``, "Environment variables in spawned processes").
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_HOME_TREES = (Path("/home"), Path("/root"), Path("/run/user"))

STARTER_CONFIG = """\
# segnode, installed as a service (`segnode install-service`). Every key: configs/node.toml in the
# source tree; `segnode config check` validates this file, `segnode doctor` checks the machine.
# Relative paths are relative to this file's folder.

[node]
data_dir = "{data_dir}"
rules = "rules.toml"          # routing rules; missing: the built-in default rule

[dicom]
ae_title = "SEGNODE"
# Loopback until you open it: to accept modalities, set host = "0.0.0.0" together with
# allowed_calling_aets and/or allowed_sources (`segnode config check` warns otherwise).
host = "127.0.0.1"
port = 11112

[http]
host = "127.0.0.1"
port = 8080
# tokens = {{ orthanc = "..." }}   # required off loopback; better: SEGNODE_HTTP__TOKENS in a drop-in

[queue]
stop_grace_s = 30             # at stop, running jobs get this long; then they are requeued
"""


class ServiceError(Exception):
    """The service cannot be installed, as one line for people."""


@dataclass(frozen=True)
class ServicePlan:
    """What the units say: who runs what, where, and what it may write."""

    user: str
    config: Path
    data_dir: Path
    #: The command that starts the node: ``[segnode]`` or ``[python, -m, node]``.
    command: tuple[str, ...]
    stop_timeout_s: int
    low_port: bool
    #: Writable besides the data folder (``-`` prefixed in the unit: missing is not an error).
    writable: tuple[Path, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def state_directory(self) -> str | None:
        """``StateDirectory=`` when the data folder is under ``/var/lib`` (systemd makes it, owned by
        the user, before each start)."""
        try:
            return str(self.data_dir.relative_to("/var/lib"))
        except ValueError:
            return None

    @property
    def protect_home(self) -> str:
        """``yes`` hides /home, /root and /run/user; ``read-only`` when the node needs something there."""
        paths = (Path(self.command[0]), self.config, self.data_dir, *self.writable)
        inside = any(p == tree or tree in p.parents for p in paths for tree in _HOME_TREES)
        return "read-only" if inside else "yes"


def segnode_command() -> tuple[str, ...]:
    """The ``segnode`` beside this Python (its venv), else on PATH, else ``python -m node``."""
    beside = Path(sys.executable).parent / "segnode"
    if beside.is_file() and os.access(beside, os.X_OK):
        return (str(beside),)
    found = shutil.which("segnode")
    if found:
        return (str(Path(found).absolute()),)
    return (str(Path(sys.executable).absolute()), "-m", "node")


def plan(
    settings: Settings, config: Path, *, user: str = DEFAULT_USER, command: tuple[str, ...] | None = None
) -> ServicePlan:
    """The units' contents for the node ``settings`` describe, read from ``config``."""
    data_dir = Path(settings.node.data_dir)
    if not data_dir.is_absolute():
        raise ServiceError(f"data_dir {data_dir} is not absolute")
    writable: list[Path] = []
    for destination in settings.destinations:
        if destination.kind == "folder" and destination.path is not None:
            writable.append(Path(destination.path))
    log_file = getattr(settings.node, "log_file", None)  # [node] log_file, where the logs helper set one
    if log_file:
        writable.append(Path(log_file).parent)
    weights = settings.segmentation.weights_dir
    if weights is not None:
        writable.append(Path(weights))  # TotalSegmentator writes its config.json there
    writable = [p for p in dict.fromkeys(writable) if p != data_dir and data_dir not in p.parents]
    low = min(settings.dicom.port, settings.http.port) < 1024
    grace = settings.queue.stop_grace_s
    from node.serve import STOP_MARGIN_S

    return ServicePlan(
        user=user,
        config=config,
        data_dir=data_dir,
        command=command or segnode_command(),
        stop_timeout_s=math.ceil(grace) + STOP_MARGIN_S,
        low_port=low,
        writable=tuple(writable),
        environment={"PYTHONUNBUFFERED": "1", "HOME": str(data_dir)},
    )


def _quote(word: str) -> str:
    """A word of an ``ExecStart=`` line (systemd.syntax: C-style quotes; ``%`` is a specifier)."""
    word = word.replace("%", "%%")
    if word and not any(c in word for c in " \t\"'\\;$"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$") + '"'


def _service_section(p: ServicePlan, subcommand: str, extra_env: dict[str, str]) -> list[str]:
    exec_start = " ".join(_quote(w) for w in (*p.command, "--config", str(p.config), subcommand))
    lines = [
        "[Service]",
        "Type=exec",
        f"User={p.user}",
        f"Group={p.user}",
        f"ExecStart={exec_start}",
        "# systemctl reload: the log level and log_phi read again from the config (node/logs.py).",
        "ExecReload=/bin/kill -HUP $MAINPID",
        f"WorkingDirectory={p.data_dir}",
    ]
    for key, value in {**p.environment, **extra_env}.items():
        lines.append(f'Environment="{key}={value}"')
    lines += [
        "Restart=on-failure",
        "RestartSec=5",
        "# Exit status 2: a config error or a refusal (another serve on the folder): no restart heals it.",
        "RestartPreventExitStatus=2",
        "# Stopping drains: SIGTERM to the node only (its nnU-Net and Blender children finish or are",
        "# killed with it at the end); running jobs get [queue] stop_grace_s, then are requeued; the rest",
        "# is for HTTP, the DICOM listener, the outbox and the ingest journal.",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={p.stop_timeout_s}",
        "UMask=0027",
        "LimitNOFILE=65536",
    ]
    if p.state_directory:
        lines += [f"StateDirectory={p.state_directory}", "StateDirectoryMode=0750"]
    lines += [
        "# Hardening that keeps the node working: no PrivateDevices/DevicePolicy/ProtectClock (they hide",
        "# /dev/nvidia*), no MemoryDenyWriteExecute (torch and Blender generate code).",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ReadWritePaths={p.data_dir}",
    ]
    lines += [f"ReadWritePaths=-{path}" for path in p.writable]
    lines += [
        f"ProtectHome={p.protect_home}",
        "PrivateTmp=yes",
        "PrivateMounts=yes",
        "RemoveIPC=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectHostname=yes",
        "RestrictSUIDSGID=yes",
        "RestrictRealtime=yes",
        "RestrictNamespaces=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    ]
    if p.low_port and subcommand == "serve":
        lines += [
            "# A port below 1024 (DICOM's 104): the one capability the node gets.",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
            "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        ]
    else:
        lines.append("CapabilityBoundingSet=")
    return lines


def render_serve(p: ServicePlan) -> str:
    lines = [
        "# segnode serve: DICOM listener, HTTP API (STOW-RS, Orthanc hand-off), job workers.",
        "# Written by `segnode install-service`; local changes belong in a drop-in (systemctl edit segnode).",
        "[Unit]",
        "Description=segnode DICOM segmentation node",
        "Wants=network-online.target",
        "After=network-online.target redis-server.service orthanc.service",
        "StartLimitIntervalSec=300",
        "StartLimitBurst=5",
        "",
        *_service_section(p, "serve", {}),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def render_worker(p: ServicePlan) -> str:
    lines = [
        '# segnode worker on GPU %i: jobs from the Redis queue ([queue] backend = "redis").',
        "# Written by `segnode install-service`; enable one per GPU: systemctl enable --now segnode-worker@0",
        "[Unit]",
        "Description=segnode worker on GPU %i",
        "Wants=network-online.target",
        "After=network-online.target redis-server.service segnode.service",
        "StartLimitIntervalSec=300",
        "StartLimitBurst=5",
        "",
        *_service_section(p, "worker", {"CUDA_VISIBLE_DEVICES": "%i"}),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


# --- installing ----------------------------------------------------------------------------------


def _under(root: Path, path: Path) -> Path:
    return root / path.relative_to(path.anchor)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def install(p: ServicePlan, root: Path, *, starter_config: str | None, dry_run: bool = False) -> list[str]:
    """Write the units (and the starter config when given) under ``root``; for ``root`` ``/`` as root,
    also the user, the folders and a systemd reload. Returns what was (or would be) done, one line each."""
    real = root == Path("/")
    units = _under(root, Path("/") / UNIT_DIR)
    done: list[str] = []

    def act(line: str, action=None) -> None:  # type: ignore[no-untyped-def]
        done.append(("would: " if dry_run else "") + line)
        if not dry_run and action is not None:
            action()

    if real and os.geteuid() != 0 and not dry_run:
        raise ServiceError("installing for real needs root (or give --root DIR, or --dry-run)")
    if real and not _user_exists(p.user):
        nologin = shutil.which("nologin") or "/usr/sbin/nologin"
        command = [
            "useradd",
            "--system",
            "--user-group",
            "--home-dir",
            str(p.data_dir),
            "--no-create-home",
            "--shell",
            nologin,
            p.user,
        ]
        act(" ".join(command), lambda: subprocess.run(command, check=True))
    elif not real:
        done.append(f"not creating user {p.user} or changing owners (--root {root})")
    data_dir = _under(root, p.data_dir)

    def make_data() -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(data_dir, 0o750)
        if real:
            shutil.chown(data_dir, p.user, p.user)

    act(f"make {data_dir} (0750{', owner ' + p.user if real else ''})", make_data)
    config = _under(root, p.config)
    if starter_config is not None:

        def write_config() -> None:
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(starter_config, encoding="utf-8")
            os.chmod(config, 0o640)
            if real:
                os.chmod(config.parent, 0o750)
                shutil.chown(config.parent, "root", p.user)
                shutil.chown(config, "root", p.user)

        act(f"write the starter config {config} (0640{', root:' + p.user if real else ''})", write_config)
    for name, text in ((SERVE_UNIT, render_serve(p)), (WORKER_UNIT, render_worker(p))):
        target = units / name

        def write_unit(target: Path = target, text: str = text) -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            os.chmod(target, 0o644)

        act(f"write {target}", write_unit)
    if real and Path("/run/systemd/system").is_dir():
        act("systemctl daemon-reload", lambda: subprocess.run(["systemctl", "daemon-reload"], check=True))
    return done


def next_steps(p: ServicePlan) -> list[str]:
    return [
        f"check the config: segnode --config {p.config} config check; and the machine: segnode --config "
        f"{p.config} doctor",
        "start the node now and at boot: systemctl enable --now segnode.service",
        "workers on GPUs (Redis queue only): systemctl enable --now segnode-worker@0.service (one per GPU)",
        "logs: journalctl -u segnode -f",
    ]

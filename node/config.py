"""The node's one settings model: a TOML file, overridden by ``SEGNODE_*`` environment variables.

Nested keys use ``__`` in the environment: ``SEGNODE_DICOM__PORT=11112`` sets ``[dicom] port``.
Secrets are :class:`pydantic.SecretStr`, masked wherever the settings are shown.

Which file (:func:`find_config`), in order: ``--config`` (anywhere on the command line), then
``SEGNODE_CONFIG``, then ``./configs/node.toml``, then ``/etc/segnode/node.toml``; none of them:
the built-in defaults, and every command that shows the settings says so. A file named by
``--config`` or ``SEGNODE_CONFIG`` must exist.

Nothing is silently ignored: an unknown key in the file and an unknown ``SEGNODE_*`` variable are
errors naming it (with the nearest known name); a bad value from the environment names the variable.
The ``SEGNODE_*`` variables that are not settings are listed once, in :data:`OTHER_VARIABLES`.

Relative paths: written in a file, they are relative to that file's folder (``data_dir = "../var"``
in ``configs/node.toml`` is the repository's ``var``); from a variable, or a built-in default, to the
working directory. Every path in a loaded :class:`Settings` is absolute.
"""

from __future__ import annotations

import difflib
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

#: The config file looked for in the working directory, then the system's (see :func:`find_config`).
DEFAULT_CONFIG = Path("configs/node.toml")
SYSTEM_CONFIG = Path("/etc/segnode/node.toml")
CONFIG_VARIABLE = "SEGNODE_CONFIG"
ENV_PREFIX = "SEGNODE_"

#: Every ``SEGNODE_*`` variable the project reads that is not a setting, and who reads it. Any other
#: ``SEGNODE_*`` name that is not a setting is refused (a test keeps this list in line with the code).
OTHER_VARIABLES: dict[str, str] = {
    CONFIG_VARIABLE: "the config file, when --config is not given",
    "SEGNODE_BLENDER": "a Blender >= 4.2, a Python with bpy or its venv, for the scene output",
    "SEGNODE_VIEWER_PASSWORD": "segnode viewer: the password for --dicomweb",
    "SEGNODE_VENV": "the Orthanc plugin: the node's virtual environment",
    "SEGNODE_NODE_URL": "the Orthanc plugin: the node's HTTP root",
    "SEGNODE_NODE_TOKEN": "the Orthanc plugin: one of the node's [http] tokens",
    "SEGNODE_TOKEN": "docker/compose.yaml: the Orthanc plugin's token",
    "SEGNODE_ENGINE": "docker/compose.yaml: the segmentation engine",
    "SEGNODE_SKIP_BLENDER": "scripts/setup.sh: do not make .venv-blender",
    "SEGNODE_SAMPLE_DIR": "tests: TotalSegmentator's sample data",
    "SEGNODE_OHIF_DIST": "tests: the OHIF build",
    "SEGNODE_TEST_OUTPUT": "tests: where screenshots go",
    "SEGNODE_TEST_REPORT": "tests: a report file written inside Orthanc",
    "SEGNODE_TEST_HOLD_SEGMENT": "tests: a remote worker's run waits at its segment stage until this file exists",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeSection(_Section):
    name: str = "segnode"
    #: Where the spool, job database, outbox and artifacts live.
    data_dir: Path = Path("var")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Patient names, IDs and birth dates appear in logs and console output only when this is true
    #: (:mod:`node.logs` scrubs them otherwise, from every logger, Python warnings included).
    log_phi: bool = False
    #: Log to this file instead of stderr, rotated by size (relative, as every path in the file: to its folder).
    log_file: Path | None = None
    #: Size at which the log file is rotated (``node.log`` -> ``node.log.1`` ...).
    log_max_mb: float = Field(default=10.0, gt=0)
    #: Rotated files kept beside the log file.
    log_backups: int = Field(default=5, ge=0)
    #: ``text``: one line per record; ``json``: one JSON object per line (for a log collector).
    log_format: Literal["text", "json"] = "text"
    #: Routing rules (see configs/rules.toml); a missing file means the built-in default rule.
    rules: Path = Path("configs/rules.toml")


class DicomSection(_Section):
    ae_title: str = Field(default="SEGNODE", min_length=1, max_length=16, pattern=r"^[ -~]*[!-~][ -~]*$")
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    #: Empty list = any calling AE title is accepted.
    allowed_calling_aets: list[str] = []
    #: Refuse associations whose called AE title is not ``ae_title`` (false: any called title, as before).
    require_called_aet: bool = False
    #: Empty list = any source address is accepted.
    allowed_sources: list[str] = []
    max_associations: int = Field(default=10, ge=1)
    max_pdu: int = Field(default=0, ge=0)  # 0 = unlimited, fastest for large series
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Seconds a connection may stay silent (waiting for its A-ASSOCIATE-RQ or its next PDU) before
    #: it is aborted and closed (PS3.8 ARTIM).
    network_timeout: float = Field(default=60.0, gt=0)


class IngestSection(_Section):
    #: A series with no new instance for this long is handed on, complete-looking or not.
    quiet_seconds: float = Field(default=60.0, gt=0)
    #: Make each spooled instance durable before acknowledging it (off only for tests/benchmarks).
    fsync: bool = True
    #: Size of the ingest journal (``<data_dir>/journal``, made at the first start): an instance is
    #: acknowledged after one flush of its journal record, and its spool file is fsynced in the
    #: background, once half the journal is in use or ingest is idle: a burst of half this size (a
    #: 500-slice CT is 256 MiB) is taken at full speed. 0 = fsync each file and its folder before
    #: acknowledging it instead (about twice the flushes).
    journal_mb: int = Field(default=512, ge=0)
    #: Refuse instances (C-STORE 0xA700) when the spool's disk has less free space than this.
    min_free_mb: int = Field(default=100, ge=0)
    #: Retention: series handed on and idle for this many days are deleted from the spool (0 = keep).
    retention_days: float = Field(default=7.0, ge=0)


class HttpSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    max_upload_mb: int = Field(default=2048, ge=1)
    #: API tokens by user name; empty = no authentication (loopback use only).
    tokens: dict[str, SecretStr] = {}
    #: Users (names in ``tokens``) allowed the administrative API (``PUT /api/log-level``).
    admin_users: list[str] = ["admin"]
    #: Tokens of remote workers (``segnode worker --node``) by name: their own role, which may only
    #: use ``/api/worker/...`` (fetch the inputs of the jobs it holds, upload their results), and is
    #: the only role those routes accept.
    worker_tokens: dict[str, SecretStr] = {}
    #: Serve HTTPS (uvicorn's own TLS) with this certificate chain and key (PEM); remote workers then
    #: use ``https://`` and verify it (``[worker] ca_bundle`` for a self-signed or private CA).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Where readers review results: the root of ``segnode viewer`` (OHIF). The dashboard links each job
    #: to ``<viewer_url>/viewer?StudyInstanceUIDs=<study>``; empty = no link.
    viewer_url: str = "http://127.0.0.1:3000"


class VolumeSection(_Section):
    #: Allowed deviation of a slice step from the median step, as a fraction of it.
    spacing_tolerance: float = Field(default=0.01, ge=0, le=0.5)


class QueueSection(_Section):
    backend: Literal["sqlite", "redis"] = "sqlite"
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    #: Worker threads in ``segnode serve`` (0: the node runs no jobs itself; Redis queue and
    #: ``segnode worker`` elsewhere) and in ``segnode worker``.
    workers: int = Field(default=1, ge=0)
    #: Runs of a job that fails for a transient reason (bad input is never retried).
    max_attempts: int = Field(default=3, ge=1)
    #: Delay before the first retry; doubled for each further one.
    retry_delay_s: float = Field(default=30.0, ge=0)
    #: The lease: a running job whose worker sent no heartbeat for this long is run again (by another
    #: worker); the late worker's uploads and its "done" are refused from then on.
    stale_after_s: float = Field(default=300.0, gt=0)
    #: At SIGTERM, running jobs get this long to finish; those still running then are put back in
    #: the queue (the cut-off attempt not counted) and run again at the next start or by another
    #: worker. ``segnode install-service`` sets the unit's TimeoutStopSec above it.
    stop_grace_s: float = Field(default=30.0, ge=0)


class WorkerSection(_Section):
    """``segnode worker`` on a machine without the node's folders: inputs and results travel over the
    node's HTTP API (``/api/worker``); jobs still come from the Redis queue."""

    #: The node's HTTP root, e.g. ``https://node.example:8080``; empty: a worker that shares the node's
    #: data folder (reads the spool, writes its own outbox), as before.
    node_url: str = ""
    #: One of the node's ``[http] worker_tokens``; better from the environment: ``SEGNODE_WORKER__TOKEN``.
    token: SecretStr = SecretStr("")
    #: The device this worker runs on (``cpu``, ``gpu``, ``gpu:N``): a GPU worker takes GPU jobs
    #: (``[rule.pipeline] device = "gpu"``) before any others; a CPU worker never takes them.
    #: Empty: ``[segmentation] device``.
    device: str | None = Field(default=None, pattern=r"^(cpu|gpu|gpu:\d+|mps)$")
    verify_tls: bool = True
    #: A CA bundle (PEM) to verify the node's certificate with (a self-signed node), instead of the system's.
    ca_bundle: Path | None = None
    #: Seconds per HTTP request to the node (connect, or silence within a transfer).
    timeout_s: float = Field(default=60.0, gt=0)
    #: Retries back off from 0.2 s, doubling, up to this many seconds between tries; a worker keeps
    #: retrying while its lease lasts (or, for a job's "done", until the node answers).
    max_backoff_s: float = Field(default=10.0, gt=0)


class SegmentationSection(_Section):
    engine: Literal["totalsegmentator", "threshold", "labelmap"] = "threshold"
    task: str = "total"
    device: str = Field(default="cpu", pattern=r"^(cpu|gpu|gpu:\d+|mps)$")
    threads: int = Field(default=2, ge=1)
    fast: bool = False
    #: TotalSegmentator's 6 mm model (``--fastest``); not together with ``fast``.
    fastest: bool = False
    #: Keep only these TotalSegmentator classes (``--roi_subset``); empty = all of the task's.
    roi_subset: list[str] = []
    #: Crop with TotalSegmentator's 3 mm model instead of its 6 mm one (``--robust_crop``).
    robust_crop: bool = False
    #: TotalSegmentator's home (weights and its config.json); default: <data_dir>/totalsegmentator.
    weights_dir: Path | None = None
    #: TotalSegmentator's pipeline in the worker process on predictors kept loaded (warm inference,
    #: node.segment.resident); false: its python_api per job (new predictor, temp files, processes).
    resident: bool = True
    #: Predictors a worker process keeps loaded (least recently used evicted): 7 holds `total`'s five
    #: parts, its 6 mm crop model and the 3 mm --fast model.
    cache_models: int = Field(default=7, ge=1)
    #: Budget for the cached weights in MB (one copy per fold plus the network's); 0 = count only.
    cache_memory_mb: int = Field(default=0, ge=0)
    #: Tasks whose models a worker loads when it starts, in the background; /healthz says "warming"
    #: until they are loaded, and a job that needs one meanwhile waits for that load.
    preload: list[str] = []
    #: `segnode serve`: one resident worker per device, each taking the next job (e.g. ["gpu:0", "gpu:1"]);
    #: empty = one per [queue] workers on `device`.
    devices: list[str] = []
    #: Body envelope: nnU-Net's sliding window runs only over the body's bounding box plus this margin
    #: (mm); the rest is background. 0 = off.
    envelope_mm: float = Field(default=20.0, ge=0)
    #: torch.compile the networks (nnU-Net's nnUNet_compile); pays off on GPUs for long-running workers.
    compile: bool = False

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: list[str]) -> list[str]:
        import re

        bad = [d for d in value if not re.fullmatch(r"cpu|gpu|gpu:\d+|mps", d)]
        if bad:
            raise ValueError(f"devices must be cpu, gpu, gpu:N or mps, got {bad}")
        return value


class Destination(_Section):
    name: str
    kind: Literal["stowrs", "cstore", "folder"]
    url: str = ""
    ae_title: str = ""
    host: str = ""
    port: int = Field(default=104, ge=1, le=65535)
    path: Path | None = None
    username: str = ""
    password: SecretStr = SecretStr("")
    token: SecretStr = SecretStr("")
    verify_tls: bool = True
    #: A CA bundle (PEM) to verify the server's certificate against, instead of the system's.
    ca_bundle: Path | None = None
    #: Orthanc only: after a newer job's result for the same series is delivered here, delete the
    #: older one from Orthanc (REST ``DELETE /instances/{id}``).
    delete_superseded: bool = False
    #: Orthanc's REST root for ``delete_superseded``; empty: ``url`` without its ``/dicom-web`` end.
    orthanc_url: str = ""
    #: The outputs this destination receives (``["rtstruct"]`` for a treatment-planning system);
    #: empty: every DICOM output of the jobs routed to it.
    accepts: list[Literal["seg", "rtstruct", "sr", "review", "dicom_mesh"]] = []


class OutboxSection(_Section):
    """Delivery of results to ``[[destinations]]``: durable, retried with exponential backoff."""

    #: Delay before the second attempt; doubled for each further one, up to ``max_delay_s``.
    initial_delay_s: float = Field(default=5.0, ge=0)
    max_delay_s: float = Field(default=300.0, ge=0)
    #: Attempts per instance and destination before it is marked failed (``segnode outbox retry``).
    max_attempts: int = Field(default=50, ge=1)
    #: Seconds per network operation (connect, a STOW-RS request, a C-STORE association).
    timeout_s: float = Field(default=60.0, gt=0)
    #: How often the delivery loop looks for due deliveries.
    poll_s: float = Field(default=1.0, gt=0)


class OrthancSection(_Section):
    """Plugin mode: the Orthanc whose segnode plugin hands series over (``POST /api/orthanc/series``);
    the node fetches them by WADO-RS. Empty ``url``: hand-offs are refused."""

    #: Orthanc's HTTP root, e.g. ``http://127.0.0.1:8042``.
    url: str = ""
    dicomweb_root: str = "/dicom-web"
    username: str = ""
    password: SecretStr = SecretStr("")
    token: SecretStr = SecretStr("")
    verify_tls: bool = True
    ca_bundle: Path | None = None
    #: Seconds for one WADO-RS retrieval of a whole series.
    timeout_s: float = Field(default=300.0, gt=0)


class Settings(BaseSettings):
    """Everything the node reads at start. See ``configs/node.toml`` for a commented example."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    #: Where these settings came from (:func:`load_settings` sets it; None: made in code).
    _source: ConfigSource | None = PrivateAttr(default=None)

    @property
    def source(self) -> ConfigSource:
        return self._source or ConfigSource(None, "code")

    node: NodeSection = NodeSection()
    dicom: DicomSection = DicomSection()
    ingest: IngestSection = IngestSection()
    http: HttpSection = HttpSection()
    volume: VolumeSection = VolumeSection()
    queue: QueueSection = QueueSection()
    segmentation: SegmentationSection = SegmentationSection()
    worker: WorkerSection = WorkerSection()
    destinations: list[Destination] = []
    outbox: OutboxSection = OutboxSection()
    orthanc: OrthancSection = OrthancSection()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file contents, which arrive as init arguments.
        return env_settings, init_settings


class ConfigError(Exception):
    """An unreadable or invalid configuration, as one line for people."""


@dataclass(frozen=True)
class ConfigSource:
    """The file the settings were read from (None: built-in defaults) and how it was found."""

    path: Path | None
    #: ``--config``, ``SEGNODE_CONFIG``, ``./configs/node.toml``, ``/etc/segnode/node.toml``, ``none``
    #: or ``code``.
    how: str
    #: The ``SEGNODE_*`` setting variables that took part.
    variables: tuple[str, ...] = ()

    def describe(self) -> str:
        where = f"{self.path} (found by {self.how})" if self.path else "built-in defaults, no file"
        if self.variables:
            where += " + environment " + ", ".join(self.variables)
        return where


def find_config(explicit: Path | None = None, environ: Mapping[str, str] | None = None) -> ConfigSource:
    """The config file to read: ``--config``, ``SEGNODE_CONFIG``, ``./configs/node.toml``,
    ``/etc/segnode/node.toml``, the first that applies. A named file that does not exist is an error."""
    environ = os.environ if environ is None else environ
    if explicit is not None:
        if not Path(explicit).is_file():
            raise ConfigError(f"{explicit}: no such config file (--config)")
        return ConfigSource(Path(explicit).absolute(), "--config")
    named = environ.get(CONFIG_VARIABLE, "")
    if named:
        if not Path(named).is_file():
            raise ConfigError(f"{named}: no such config file ({CONFIG_VARIABLE})")
        return ConfigSource(Path(named).absolute(), CONFIG_VARIABLE)
    if DEFAULT_CONFIG.is_file():
        return ConfigSource(DEFAULT_CONFIG.absolute(), f"./{DEFAULT_CONFIG}")
    if SYSTEM_CONFIG.is_file():
        return ConfigSource(SYSTEM_CONFIG, str(SYSTEM_CONFIG))
    return ConfigSource(None, "none")


# --- what the model knows: keys, variables, paths ---------------------------------------------

def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model class inside ``annotation`` (``Section``, ``list[Section]``, ``Section | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _is_path(annotation: Any) -> bool:
    if annotation is Path:
        return True
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and Path in typing.get_args(annotation)


def _is_mapping(annotation: Any) -> bool:
    return typing.get_origin(annotation) is dict


def setting_variables() -> list[str]:
    """Every ``SEGNODE_<SECTION>__<KEY>`` the settings read (and each section's, for JSON)."""
    names = []
    for section, field in Settings.model_fields.items():
        names.append(f"{ENV_PREFIX}{section.upper()}")
        model = _model_of(field.annotation)
        if model is not None and typing.get_origin(field.annotation) is not list:
            names += [f"{ENV_PREFIX}{section.upper()}__{key.upper()}" for key in model.model_fields]
    return names


def _is_setting_variable(name: str) -> bool:
    parts = name[len(ENV_PREFIX):].lower().split("__")
    model: type[BaseModel] | None = Settings
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return False
        if depth == len(parts) - 1:
            return True
        if _is_mapping(field.annotation):
            return True  # SEGNODE_HTTP__TOKENS__ALICE: a key of a table
        model = _model_of(field.annotation) if typing.get_origin(field.annotation) is not list else None
    return True


def _suggest(name: str, candidates: list[str]) -> str:
    """" (did you mean X?)" for the nearest variable, compared without the shared prefix."""
    bare = {c[len(ENV_PREFIX):]: c for c in candidates}
    close = difflib.get_close_matches(name[len(ENV_PREFIX):], list(bare), n=1, cutoff=0.75)
    return f" (did you mean {bare[close[0]]}?)" if close else ""


def check_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """The ``SEGNODE_*`` setting variables in ``environ``; raises :class:`ConfigError` on one that
    is neither a setting nor in :data:`OTHER_VARIABLES`."""
    environ = os.environ if environ is None else environ
    used = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() in OTHER_VARIABLES:
            continue
        if not _is_setting_variable(name.upper()):
            hint = _suggest(name.upper(), setting_variables() + list(OTHER_VARIABLES))
            raise ConfigError(f"{name}: unknown variable; no setting or tool reads it{hint}")
        used.append(name)
    return used


def _resolve_file_paths(data: dict[str, Any], model: type[BaseModel], folder: Path) -> None:
    """Relative paths written in a file are relative to its folder (in place)."""
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        if _is_path(field.annotation) and isinstance(value, str) and value and not Path(value).is_absolute():
            data[key] = os.path.normpath(folder / value)
            continue
        inner = _model_of(field.annotation)
        if inner is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                _resolve_file_paths(item, inner, folder)


def _absolute_paths(model: BaseModel, base: Path) -> None:
    """Every relative path left (from a variable or a default) made absolute against ``base``."""
    for key, field in type(model).model_fields.items():
        value = getattr(model, key)
        if isinstance(value, Path) and not value.is_absolute():
            model.__dict__[key] = Path(os.path.normpath(base / value))  # not counted as "set"
        elif isinstance(value, BaseModel):
            _absolute_paths(value, base)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    _absolute_paths(item, base)


# --- loading --------------------------------------------------------------------------------------

_SECRET_PARTS = ("password", "token", "redis_url")


def _variable_of(loc: tuple[Any, ...], environ: Mapping[str, str]) -> str | None:
    """The ``SEGNODE_*`` variable that set the value at ``loc``, if one did."""
    names = {name.upper(): name for name in environ}
    for depth in range(len(loc), 0, -1):
        if not all(isinstance(part, str) for part in loc[:depth]):
            continue
        candidate = ENV_PREFIX + "__".join(str(part).upper() for part in loc[:depth])
        if candidate in names:
            return names[candidate]
    return None


def _describe(error: dict[str, Any], source: Path | None, environ: Mapping[str, str]) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(part) for part in loc)
    variable = _variable_of(loc, environ)
    if variable is None:
        where = str(source or "built-in defaults")
    else:
        secret = any(s in variable.lower() for s in _SECRET_PARTS)
        where = f"{variable} = {'********' if secret else repr(environ[variable])}"
    if error["type"] == "extra_forbidden":
        model: type[BaseModel] | None = Settings
        for part in loc[:-1]:
            field = model.model_fields.get(str(part)) if model is not None else None
            model = _model_of(field.annotation) if field is not None else None
        known = list(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f" (did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))!r}?)" if close else ""
        return f"{where}: unknown key {key!r}{hint}"
    if variable is not None:
        return f"{where}: {key}: {error['msg']}"
    shown = "********" if any(s in key for s in _SECRET_PARTS) else repr(error.get("input"))
    return f"{where}: {key} = {shown}: {error['msg']}"


class _FileSettings(Settings):
    """The settings a file alone gives (what a service started with only that file will see)."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):  # type: ignore[no-untyped-def,override]
        return (init_settings,)


def load_settings(path: Path | None = None, *, environment: bool = True) -> Settings:
    """Settings from the config file (``path``, else :func:`find_config`'s) and the environment
    (``environment=False``: the file alone)."""
    environ: Mapping[str, str] = os.environ if environment else {}
    source = find_config(Path(path) if path is not None else None, environ)
    variables = tuple(check_environment(environ))
    data: dict[str, Any] = {}
    if source.path is not None:
        try:
            data = tomllib.loads(source.path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source.path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{source.path}: cannot read: {exc.strerror}") from None
        _resolve_file_paths(data, Settings, source.path.parent)
    try:
        settings = (Settings if environment else _FileSettings)(**data)
    except ValidationError as exc:
        problems = [_describe(e, source.path, environ) for e in exc.errors()]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{problems[0]}{more}") from None
    except SettingsError as exc:  # a variable pydantic-settings cannot parse (JSON for a table or list)
        section = str(exc).split('"')[1] if '"' in str(exc) else ""
        prefix = f"{ENV_PREFIX}{section.upper()}"
        named = [v for v in variables if v.upper().startswith(prefix)] or list(variables)
        message = "cannot parse the value (a table or list needs JSON)"
        raise ConfigError(f"{', '.join(named)}: {message}") from None
    _absolute_paths(settings, Path.cwd())
    settings._source = ConfigSource(source.path, source.how, variables)
    return settings


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def config_warnings(settings: Settings) -> list[str]:
    """What ``config check`` warns about without refusing: a data folder that depends on the working
    directory, a DICOM listener open to anyone, an API that ``serve`` would refuse to open."""
    dicom, http, warnings = settings.dicom, settings.http, []
    if "data_dir" not in settings.node.model_fields_set:
        warnings.append(f"[node] data_dir is not set: the built-in default, ./var in the working directory "
                        f"({settings.node.data_dir}); set it in the config file")
    if not _loopback(http.host) and not http.tokens:
        warnings.append(f"[http] the API on {http.host}:{http.port} has no tokens: serve refuses to start "
                        "so; set tokens (SEGNODE_HTTP__TOKENS) or host = \"127.0.0.1\"")
    if not _loopback(dicom.host) and not dicom.allowed_calling_aets and not dicom.allowed_sources:
        warnings.append(
            f"[dicom] the listener on {dicom.host}:{dicom.port} accepts any calling AE title from any "
            "address: set allowed_calling_aets and/or allowed_sources (or host = \"127.0.0.1\")")
    return warnings


def masked_dict(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with every secret shown as ``********`` (or empty)."""

    def walk(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return "********" if value.get_secret_value() else ""
        if isinstance(value, BaseModel):
            return {k: walk(getattr(value, k)) for k in type(value).model_fields}
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return walk(settings)

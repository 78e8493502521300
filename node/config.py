"""The node's one settings model: a TOML file, overridden by ``SEGNODE_*`` environment variables.

Nested keys use ``__`` in the environment: ``SEGNODE_DICOM__PORT=11112`` sets ``[dicom] port``.
Secrets are :class:`pydantic.SecretStr`, masked wherever the settings are shown.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG = Path("configs/node.toml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeSection(_Section):
    name: str = "segnode"
    #: Where the spool, job database, outbox and artifacts live.
    data_dir: Path = Path("var")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Patient names and IDs appear in logs only when this is true.
    log_phi: bool = False
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


class VolumeSection(_Section):
    #: Allowed deviation of a slice step from the median step, as a fraction of it.
    spacing_tolerance: float = Field(default=0.01, ge=0, le=0.5)


class QueueSection(_Section):
    backend: Literal["sqlite", "redis"] = "sqlite"
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    workers: int = Field(default=1, ge=1)
    #: Runs of a job that fails for a transient reason (bad input is never retried).
    max_attempts: int = Field(default=3, ge=1)
    #: Delay before the first retry; doubled for each further one.
    retry_delay_s: float = Field(default=30.0, ge=0)
    #: A running job whose worker sent no heartbeat for this long is run again.
    stale_after_s: float = Field(default=300.0, gt=0)


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

    model_config = SettingsConfigDict(env_prefix="SEGNODE_", env_nested_delimiter="__", extra="forbid")

    node: NodeSection = NodeSection()
    dicom: DicomSection = DicomSection()
    ingest: IngestSection = IngestSection()
    http: HttpSection = HttpSection()
    volume: VolumeSection = VolumeSection()
    queue: QueueSection = QueueSection()
    segmentation: SegmentationSection = SegmentationSection()
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


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    value = error.get("input")
    shown = "********" if any(s in key for s in ("password", "token", "redis_url")) else repr(value)
    return f"{key} = {shown}: {error['msg']}"


def load_settings(path: Path | None = None) -> Settings:
    """Settings from ``path`` (default ``configs/node.toml`` if it exists) and the environment."""
    explicit = path is not None
    path = Path(path) if explicit else DEFAULT_CONFIG
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    elif explicit:
        raise ConfigError(f"{path}: no such config file")
    try:
        return Settings(**data)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{path}: {problems[0]}{more}") from None


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

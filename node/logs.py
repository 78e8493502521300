"""The node's logging, for every command: where lines go, how they look, and that they carry no
patient data.

* **Where:** stderr by default; a file with size-based rotation when ``[node] log_file`` is set
  (``log_max_mb``, ``log_backups``; the config makes it absolute; a relative one given to
  :func:`setup` directly is under ``data_dir``).
* **How:** ``log_format = "text"`` (one line: time, level, logger, ``[job=… series=…]``, message) or
  ``"json"`` (one JSON object a line, for a log collector). While a job runs, every line of its thread
  carries its job id and series UID (:func:`job_context`, :mod:`contextvars`).
* **No patient data** unless ``[node] log_phi = true``: Python warnings are routed through logging
  (:func:`logging.captureWarnings`; highdicom warns with the patient's name in the text), and every
  record, ours or a library's (highdicom, pydicom, pynetdicom, uvicorn, huey), is scrubbed where it
  is made (a log record factory), so that no handler sees it unscrubbed. The scrub removes the values
  of the series the node handles (registered from their headers by :func:`register_path` and
  :func:`register_dataset` wherever a series is read: CLI commands, jobs, the outbox, the editor; name
  and its ``^`` parts, IDs, birth date in the usual spellings, case-insensitive; the most recent ones
  stay known) and, for data it was never told, the known shapes: highdicom's "The string … is unlikely
  to represent" warning, DICOM person names (``Family^Given``), pydicom's element listings of group
  0010 and ``PatientName=…``-style pairs. The CLI's own stdout and stderr pass the same scrub
  (:func:`scrub_console`).
* **Level without a restart:** :func:`reload` (``segnode serve`` calls it on SIGHUP) reads the config
  again; :func:`set_level` backs ``PUT /api/log-level``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

#: Job id and series UID of the job the current thread runs (empty outside jobs).
JOB_ID: contextvars.ContextVar[str] = contextvars.ContextVar("segnode_job_id", default="")
SERIES_UID: contextvars.ContextVar[str] = contextvars.ContextVar("segnode_series_uid", default="")

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
REDACTED = "[redacted]"

#: Attributes of the Patient module (and the accession number) whose values are patient data, PS3.15
#: Annex E table E.1-1 "Basic Profile".
PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers",
    "MedicalRecordLocator", "AccessionNumber", "ResponsiblePerson",
)
_PHI_TAGS = ("00100010", "00100020", "00100030", "00101000", "00101001", "00101005", "00101060",
             "00101040", "00102154", "00101090", "00080050", "00102297")

# --- the scrub ------------------------------------------------------------------------------------

_NAME_CHARS = r"[^\W_]"  # a letter or digit, any script
#: Shapes of patient data in messages nobody registered values for.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # highdicom.valuerep.check_person_name's UserWarning quotes the name it doubts.
    (re.compile(r'(The string ")(.*?)(" is unlikely to represent)', re.S), rf"\1{REDACTED}\3"),
    # pydicom's element listing: "(0010,0010) Patient's Name   PN: 'DOE^JOHN'"
    (re.compile(r"(\(0010,\s?[0-9A-Fa-f]{4}\)[^\n:]*:)[^\n]*"), rf"\1 {REDACTED}"),
    # keyword = value / keyword: value pairs of the Patient module, and QIDO-RS query parameters by
    # keyword or tag (OHIF's study list searches ?PatientName=... or ?00100010=...)
    (re.compile(r"(\b(?:" + "|".join(PHI_KEYWORDS + _PHI_TAGS)
                + r"|Patient's (?:Name|Birth Date)|Patient ID)['\"]?\s*(?:=|:|PN:|LO:|DA:)\s*)"
                r"(?!\[redacted\])"
                r"(?:'[^'\n]*'|\"[^\"\n]*\"|[^\s,;&)}\]]+)"), rf"\1{REDACTED}"),
    # DICOM person names: Family^Given^Middle^Prefix^Suffix (PS3.5 6.2.1.2)
    (re.compile(rf"(?<!{_NAME_CHARS})[^\W\d_][\w'.\-]*\^[\w'.\-^=]*"), REDACTED),
)


def _date_spellings(value: str) -> list[str]:
    """A DA value (YYYYMMDD) as people and programs write it."""
    m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})", value.strip())
    if not m:
        return [value]
    y, mo, d = m.groups()
    return [value, f"{y}-{mo}-{d}", f"{y}/{mo}/{d}", f"{y}.{mo}.{d}", f"{d}.{mo}.{y}", f"{d}/{mo}/{y}",
            f"{mo}/{d}/{y}", f"{d}-{mo}-{y}"]


def phi_strings(values: Iterable[Any]) -> set[str]:
    """The strings to scrub for some attribute values: each whole, each person name's parts
    (split at ``^``, ``=`` and spaces), each date in its usual spellings."""
    found: set[str] = set()
    for value in values:
        if value is None:
            continue
        many = isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"
        items = list(value) if many else [value]
        for item in items:
            text = str(item).strip()
            if not text:
                continue
            candidates = {text, text.strip("^= ")}
            candidates.update(re.split(r"[\^=\s,]+", text))
            candidates.update(_date_spellings(text))
            found.update(c.strip() for c in candidates if len(c.strip()) >= 2)
    return found


def _trie_pattern(words: Iterable[str]) -> str:
    """One regular expression for many literal strings, as a trie (``ab|ac`` -> ``a(?:b|c)``): Python's
    ``re`` tries a flat alternation string by string at every position (3.9 ms a line for 2000
    patients' values on this machine), the trie once (0.04 ms, recompiled in 0.3 s when values are added)."""
    trie: dict[str, dict] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def build(node: dict[str, dict]) -> str:
        branches = [re.escape(char) + build(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(trie)


class PhiScrubber:
    """Known patient values (most recent first, at most ``capacity`` strings) plus the known shapes."""

    def __init__(self, capacity: int = 20000) -> None:
        self.capacity = capacity
        self._values: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._regex: re.Pattern[str] | None = None

    def register(self, values: Iterable[Any]) -> None:
        strings = phi_strings(values)
        if not strings:
            return
        with self._lock:
            changed = False
            for s in strings:
                key = s.lower()
                if key in self._values:
                    self._values.move_to_end(key)
                else:
                    self._values[key] = None
                    changed = True
            while len(self._values) > self.capacity:
                self._values.popitem(last=False)
                changed = True
            if changed:
                self._regex = None

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._regex = None

    def _compiled(self) -> re.Pattern[str] | None:
        with self._lock:
            if self._regex is None and self._values:
                pattern = _trie_pattern(self._values)
                self._regex = re.compile(rf"(?<!{_NAME_CHARS})(?:{pattern})(?!{_NAME_CHARS})", re.IGNORECASE)
            return self._regex

    def scrub(self, text: str) -> str:
        if not text:
            return text
        regex = self._compiled()
        if regex is not None:
            text = regex.sub(REDACTED, text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text


SCRUBBER = PhiScrubber()


class _State:
    log_phi = False
    handlers: list[logging.Handler] = []
    reload_settings: Callable[[], Any] | None = None


def scrub(text: str) -> str:
    """``text`` without patient data (unchanged when ``log_phi`` is on)."""
    return text if _State.log_phi else SCRUBBER.scrub(text)


def _dataset_values(ds: Any) -> list[Any]:
    values = [ds.get(k) for k in PHI_KEYWORDS]
    for item in ds.get("OtherPatientIDsSequence") or []:
        values.append(item.get("PatientID"))
    return values


def register_dataset(ds: Any) -> None:
    """Make the patient values of a pydicom dataset known to the scrub."""
    try:
        SCRUBBER.register(_dataset_values(ds))
    except Exception:  # a malformed element: the patterns still apply
        pass


_NOT_DICOM = (".nii", ".gz", ".json", ".csv", ".txt", ".xml")


def _headers(path: Path, max_folders: int) -> Iterator[Any]:
    """The first readable DICOM header (no pixels) of each folder under ``path`` (a file, a folder
    tree or a zip), at most ``max_folders`` of them: a series folder has one patient, a tree of cases
    one per case folder."""
    import os
    import zipfile

    import pydicom

    kwargs: dict[str, Any] = dict(stop_before_pixels=True, force=True,
                                  specific_tags=[int(t, 16) for t in _PHI_TAGS] + ["OtherPatientIDsSequence"])

    def first_of(opens: Iterable[Callable[[], Any]]) -> Any:
        for tries, open_one in enumerate(opens):
            if tries >= 3:
                return None
            try:
                with open_one() as handle:
                    ds = pydicom.dcmread(handle, **kwargs)
                if len(ds) or ds.get("PatientName") is not None:
                    return ds
            except Exception:
                continue
        return None

    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            folders: dict[str, list[str]] = {}
            for name in archive.namelist():
                if not name.endswith("/"):
                    folders.setdefault(name.rpartition("/")[0], []).append(name)
            for names in list(folders.values())[:max_folders]:
                ds = first_of(lambda n=n: archive.open(n) for n in sorted(names))
                if ds is not None:
                    yield ds
        return
    if path.is_file():
        ds = first_of([lambda: open(path, "rb")])
        if ds is not None:
            yield ds
        return
    for count, (folder, _dirs, files) in enumerate(os.walk(path)):
        if count >= max_folders:
            return
        candidates = [f for f in sorted(files) if not f.endswith(_NOT_DICOM)]
        ds = first_of(lambda f=f: open(os.path.join(folder, f), "rb") for f in candidates)
        if ds is not None:
            yield ds


def register_path(path: Path | str | None, max_folders: int = 1000) -> None:
    """Make known the patient values of the DICOM under ``path`` (a series folder, a tree of cases,
    a zip, a SEG file): one header per folder."""
    if path is None:
        return
    path = Path(path)
    if not path.exists() or path.name.endswith((".nii", ".nii.gz", ".json", ".stl", ".obj", ".ply")):
        return
    try:
        for ds in _headers(path, max_folders):
            register_dataset(ds)
    except OSError:
        pass


@contextmanager
def patient_data(path: Path | str | None = None, dataset: Any = None) -> Iterator[None]:
    """Register the patient values of the series at ``path`` (or of ``dataset``) while it is handled.
    They stay known afterwards too (the most recent ones, see :class:`PhiScrubber`): a late line
    about the same series is scrubbed as well."""
    if dataset is not None:
        register_dataset(dataset)
    if path is not None:
        register_path(path)
    yield


@contextmanager
def job_context(job_id: str, series_uid: str = "") -> Iterator[None]:
    """Every log line of this thread (and of contexts copied from it) names the job and series."""
    tokens = JOB_ID.set(job_id), SERIES_UID.set(series_uid)
    try:
        yield
    finally:
        SERIES_UID.reset(tokens[1])
        JOB_ID.reset(tokens[0])


# --- records --------------------------------------------------------------------------------------

def _prepare(record: logging.LogRecord) -> None:
    """Job context and scrub, once, where the record is made: every handler gets the clean record,
    ours, a library's, pytest's. Message and arguments are replaced only when the scrub changed
    something (formatters that read ``args``, as uvicorn's do, keep working otherwise)."""
    record.job_id = JOB_ID.get()
    record.series_uid = SERIES_UID.get()
    if _State.log_phi:
        return
    try:
        message = record.getMessage()
    except Exception:  # a library's bad format string: logging reports it when it formats
        message = None
    if message is not None:
        clean = SCRUBBER.scrub(message)
        if clean != message:
            record.msg, record.args = clean, ()
    if record.exc_info and not record.exc_text:
        text = logging.Formatter().formatException(record.exc_info)
        clean = SCRUBBER.scrub(text)
        if clean != text:
            record.exc_text = clean
    if record.stack_info:
        record.stack_info = SCRUBBER.scrub(record.stack_info)


def _install_record_factory() -> None:
    current = logging.getLogRecordFactory()
    if getattr(current, "_segnode", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        _prepare(record)
        return record

    factory._segnode = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        job, series = getattr(record, "job_id", ""), getattr(record, "series_uid", "")
        parts = ([f"job={job}"] if job else []) + ([f"series={series}"] if series else [])
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, job_id, series_uid,
    and ``exception`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", ""),
            "series_uid": getattr(record, "series_uid", ""),
            "process": record.process,
            "thread": record.threadName,
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False)


# --- consoles -------------------------------------------------------------------------------------

class ScrubbedStream:
    """A text stream that scrubs what is written to it, for the CLI's stdout and stderr."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(scrub(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _CurrentStderr:
    """Whatever ``sys.stderr`` is when a line is written (a test runner may swap it after set-up)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def scrub_console() -> None:
    """Route ``sys.stdout``/``sys.stderr`` through the scrub (once per stream)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, ScrubbedStream):
            setattr(sys, name, ScrubbedStream(stream))


# --- set-up ---------------------------------------------------------------------------------------

def log_path(settings: Any) -> Path | None:
    """The log file (absolute, or under ``data_dir`` when relative), or None for stderr."""
    node = settings.node
    if not getattr(node, "log_file", None):
        return None
    path = Path(node.log_file).expanduser()
    return path if path.is_absolute() else Path(node.data_dir) / path


def setup(settings: Any = None, *, reload_settings: Callable[[], Any] | None = None,
          console: bool = True, least: str | None = None) -> None:
    """Configure the root logger from ``[node]`` (defaults when ``settings`` is None); may be called
    again (each call replaces the handlers it made before). ``reload_settings`` reads the config
    again for :func:`reload`; ``console``: scrub this process's stdout/stderr too; ``least``: a floor
    for the level (the one-shot commands show warnings and errors, not the libraries' INFO lines)."""
    node = getattr(settings, "node", None)
    level = getattr(node, "log_level", "INFO")
    if least is not None and logging.getLevelName(least) > logging.getLevelName(level):
        level = least
    _State.log_phi = bool(getattr(node, "log_phi", False))
    if reload_settings is not None:
        _State.reload_settings = reload_settings
    root = logging.getLogger()
    for handler in _State.handlers:
        root.removeHandler(handler)
        handler.close()
    if console:
        scrub_console()
    path = log_path(settings) if settings is not None else None
    handler: logging.Handler
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        max_bytes = int(float(getattr(node, "log_max_mb", 10)) * 1024 * 1024)
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes,
                                                       backupCount=int(getattr(node, "log_backups", 5)),
                                                       encoding="utf-8")
    else:
        handler = logging.StreamHandler(_CurrentStderr())  # type: ignore[arg-type]
    json_lines = getattr(node, "log_format", "text") == "json"
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root.addHandler(handler)
    _State.handlers = [handler]
    root.setLevel(level)
    _install_record_factory()  # every record, whichever handler takes it
    logging.captureWarnings(True)  # warnings become records of "py.warnings"


def set_level(level: str) -> str:
    """Change the root level now; returns the level set. ``ValueError`` for an unknown one."""
    level = str(level).upper()
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; one of {', '.join(LEVELS)}")
    logging.getLogger().setLevel(level)
    return level


def current_level() -> str:
    return logging.getLevelName(logging.getLogger().level)


def reload() -> str | None:
    """Read the config again and apply its ``log_level`` and ``log_phi`` (SIGHUP). Returns the level,
    or None when there is nothing to read or the config is now invalid (then nothing changes)."""
    if _State.reload_settings is None:
        return None
    try:
        settings = _State.reload_settings()
    except Exception as exc:
        logging.getLogger(__name__).error("config not reloaded: %s", exc)
        return None
    _State.log_phi = bool(settings.node.log_phi)
    level = set_level(settings.node.log_level)
    logging.getLogger(__name__).warning("config reloaded: log level %s, log_phi %s", level, _State.log_phi)
    return level

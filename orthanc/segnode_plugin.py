"""segnode's Orthanc plugin: when a series is stable, hand it to the segmentation node.

Runs inside Orthanc's Python plugin (Debian: orthanc-python 4.0, embedded Python 3.11.2), configured
by Orthanc's configuration file::

    "PythonScript" : "/path/to/segnode/orthanc/segnode_plugin.py",
    "Segnode" : {
      "NodeUrl"   : "http://127.0.0.1:8080",   // the node's HTTP API          (env SEGNODE_NODE_URL)
      "NodeToken" : "...",                     // one of the node's [http] tokens (env SEGNODE_NODE_TOKEN)
      "Venv"      : "/path/to/segnode/.venv",  // optional, see below            (env SEGNODE_VENV)
      "MaxAttempts" : 20,                      // hand-off attempts per series (backoff 2 s .. 5 min)
      "Timeout"   : 600                        // seconds the node may take to fetch a series
    }

What it does, and nothing more (the node does the work):

* ``STABLE_SERIES`` -> the series' Orthanc id goes into a queue. The change callback does nothing
  else: calling Orthanc's REST API from inside it can deadlock Orthanc, so one worker thread reads
  the series (``orthanc.RestApiGet``), decides, and hands it over.
* Never handed over: SEG, SR, RTSTRUCT, PR, KO and other non-image objects, and the node's own
  outputs (Manufacturer ``segnode`` with ImageType ``DERIVED``) — a SEG stored back into Orthanc is
  a stable series like any other. The rules are the node's own (``node.rules``) when the node's venv
  can be imported, else the same lists built in here.
* The hand-off: ``POST {NodeUrl}/api/orthanc/series`` with ``{orthanc_series_id, study_uid,
  series_uid, modality, instances, aet}``. The node answers once it has fetched the series from
  Orthanc's DICOMweb (WADO-RS) into its spool; then its rules, queue and workers take over, and the
  SEG comes back by STOW-RS (an outbox destination). A failed hand-off (node down, fetch failed) is
  tried again with exponential backoff.
* ``GET /segnode/status`` (inside Orthanc, with Orthanc's authentication): what the plugin did.

Why the node pulls instead of the plugin pushing the instances (STOW-RS to the node): a notification
is one small JSON request, so the plugin stays small and uses only the standard library; no byte of
a series passes through the Python interpreter inside the PACS process (its GIL is shared with every
other Python callback, and its memory is the archive's); the node reads at its own pace and retries
on its own terms, and reuses the spool, series completion and routing of its other ways in
(``Sender.via == "orthanc"``); and no disk needs to be shared — the node only needs Orthanc's DICOMweb.

The plugin must never stop Orthanc: every import beyond the standard library is guarded, every
callback catches its errors, and the worker thread survives anything one series does. The node's
venv (``SEGNODE_VENV``) is added with ``site.addsitedir`` and moved to the *front* of ``sys.path``:
appended, Debian's older numpy would win.
"""

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

try:
    import orthanc

    if not hasattr(orthanc, "RegisterOnChangeCallback"):  # e.g. this folder, as a namespace package
        orthanc = None
except ImportError:  # imported outside Orthanc (a syntax check, a test of the pure parts)
    orthanc = None

VERSION = "1"
CONFIG_KEY = "Segnode"
STATUS_ROUTE = "/segnode/status"

# Built-in copies of node.rules' guard (used when the node's venv cannot be imported).
NEVER_MODALITIES = {"SEG", "SR", "RTSTRUCT", "PR", "KO", "RTPLAN", "RTDOSE", "RTRECORD", "DOC", "REG"}
NEVER_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66.",
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.481.",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.104.",
)
OWN_MANUFACTURER = "segnode"


def _log(level, message):
    if orthanc is not None:
        getattr(orthanc, level)("segnode: " + message)


def _config():
    config = {}
    try:
        config = json.loads(orthanc.GetConfiguration()).get(CONFIG_KEY, {}) or {}
    except Exception as exc:  # noqa: BLE001 - a bad configuration must not stop Orthanc
        _log("LogError", f"cannot read the {CONFIG_KEY!r} configuration: {exc}")
    env = os.environ
    return {
        "node_url": (env.get("SEGNODE_NODE_URL") or config.get("NodeUrl") or "http://127.0.0.1:8080").rstrip(
            "/"
        ),
        "token": env.get("SEGNODE_NODE_TOKEN") or config.get("NodeToken") or "",
        "venv": env.get("SEGNODE_VENV") or config.get("Venv") or "",
        "max_attempts": int(config.get("MaxAttempts", 20)),
        "timeout": float(config.get("Timeout", 600)),
        "first_retry": float(config.get("FirstRetrySeconds", 2)),
    }


def add_venv(venv):
    """The venv's site-packages (and its .pth entries) at the front of sys.path; returns the error."""
    import site

    version = "python{}.{}".format(*sys.version_info[:2])
    packages = os.path.join(venv, "lib", version, "site-packages")
    if not os.path.isdir(packages):
        return f"{packages} not found (a venv of another Python than {version}?)"
    before = list(sys.path)
    site.addsitedir(packages)
    added = [p for p in sys.path if p not in before]
    # The standard library stays first: a venv may hold a backport that shadows it (rt-utils pulls
    # PyPI's `dataclasses` 0.6, whose dataclass() has no `slots`), and only Debian's site packages
    # (an older numpy) must lose to the venv.
    import sysconfig

    stdlib = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
    first = [p for p in sys.path if p not in added and (
        os.path.realpath(p) in stdlib or os.path.dirname(os.path.realpath(p)) in stdlib or p.endswith(".zip"))]
    sys.path[:] = first + added + [p for p in sys.path if p not in added and p not in first]
    return None


class Plugin:
    def __init__(self, config):
        self.config = config
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.queue = []  # [due (monotonic), orthanc series id, attempt]
        self.queued = set()
        self.counts = {"handed_off": 0, "skipped": 0, "failed": 0, "retries": 0}
        self.recent = []
        self.guard = "built-in"
        self.venv_error = None
        self.numpy = None  # where the numpy the node's rules imported comes from
        self.thread = None

    # --- callbacks (Orthanc's threads: quick, never raise) -----------------------------------
    def on_change(self, change_type, level, resource_id):
        try:
            if change_type == orthanc.ChangeType.STABLE_SERIES:
                self.submit(resource_id)
            elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
                self.stop()
        except Exception as exc:  # noqa: BLE001
            _log("LogError", f"change callback failed: {exc}")

    def submit(self, series_id, attempt=1, delay=0.0):
        with self.lock:
            if attempt == 1 and series_id in self.queued:
                return
            self.queued.add(series_id)
            self.queue.append((time.monotonic() + delay, series_id, attempt))
        self.wake.set()

    def status(self, output, uri, **request):
        try:
            if request.get("method") != "GET":
                output.SendMethodNotAllowed("GET")
                return
            with self.lock:
                body = {
                    "plugin": VERSION,
                    "node_url": self.config["node_url"],
                    "python": sys.version.split()[0],
                    "venv": self.config["venv"] or None,
                    "venv_error": self.venv_error,
                    "guard": self.guard,
                    "numpy": self.numpy,
                    "queued": len(self.queue),
                    **self.counts,
                    "recent": list(self.recent),
                    "worker_alive": bool(self.thread and self.thread.is_alive()),
                }
            output.AnswerBuffer(json.dumps(body, indent=1), "application/json")
        except Exception as exc:  # noqa: BLE001
            _log("LogError", f"status route failed: {exc}")

    # --- the worker thread -------------------------------------------------------------------
    def start(self):
        self.thread = threading.Thread(target=self.run, name="segnode-handoff", daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping.set()
        self.wake.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(5)

    def run(self):
        self.load_guard()
        while not self.stopping.is_set():
            item = self.next_due()
            if item is None:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            _, series_id, attempt = item
            try:
                self.handle(series_id, attempt)
            except Exception as exc:  # noqa: BLE001 - one series never stops the thread
                self.retry_or_fail(series_id, attempt, f"{type(exc).__name__}: {exc}", {})

    def next_due(self):
        now = time.monotonic()
        with self.lock:
            due = [item for item in self.queue if item[0] <= now]
            if not due:
                return None
            item = min(due)
            self.queue.remove(item)
            return item

    def load_guard(self):
        """The node's own guard from its venv, when there is one; else the built-in lists."""
        global NEVER_MODALITIES, NEVER_SOP_PREFIXES, OWN_MANUFACTURER
        if not self.config["venv"]:
            return
        try:
            self.venv_error = add_venv(self.config["venv"])
            if self.venv_error is None:
                from node import rules  # numpy, pydicom, pydantic: from the venv, at the front of sys.path

                NEVER_MODALITIES = set(rules.NEVER_MODALITIES)
                NEVER_SOP_PREFIXES = tuple(rules.NEVER_SOP_PREFIXES)
                OWN_MANUFACTURER = rules.OWN_MANUFACTURER
                self.guard = "node.rules"
                self.numpy = getattr(sys.modules.get("numpy"), "__file__", None)
        except Exception as exc:  # noqa: BLE001 - an import must never stop Orthanc
            self.venv_error = f"{type(exc).__name__}: {exc}"
        if self.venv_error:
            _log("LogWarning", f"node venv not used ({self.venv_error}); built-in rules")

    def handle(self, series_id, attempt):
        started = time.monotonic()
        series = json.loads(orthanc.RestApiGet(f"/series/{series_id}"))
        tags = series.get("MainDicomTags", {})
        study = json.loads(orthanc.RestApiGet(f"/studies/{series['ParentStudy']}"))
        instances = series.get("Instances", [])
        event = {
            "orthanc_series_id": series_id,
            "series_uid": tags.get("SeriesInstanceUID", ""),
            "study_uid": study.get("MainDicomTags", {}).get("StudyInstanceUID", ""),
            "modality": tags.get("Modality", ""),
            "instances": len(instances),
            "attempt": attempt,
        }
        reason = self.refusal(tags, instances)
        if reason:
            self.finish(series_id, "skipped", dict(event, reason=reason))
            return
        payload = dict(event, aet=self.orthanc_aet())
        payload.pop("attempt")
        request = urllib.request.Request(
            self.config["node_url"] + "/api/orthanc/series",
            data=json.dumps(payload).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        if self.config["token"]:
            request.add_header("Authorization", "Bearer " + self.config["token"])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=self.config["timeout"]) as response:
                answer = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            self.retry_or_fail(series_id, attempt, f"node answered HTTP {exc.code}: {detail}", event)
            return
        except (OSError, ValueError) as exc:
            self.retry_or_fail(series_id, attempt, f"node unreachable: {exc}", event)
            return
        event.update(node=answer, seconds=round(time.monotonic() - started, 3))
        self.finish(series_id, "handed_off", event)

    def refusal(self, tags, instances):
        modality = (tags.get("Modality") or "").upper()
        if modality in NEVER_MODALITIES:
            return f"Modality {modality} is not an image to segment"
        if not instances:
            return "no instances"
        first = instances[0]
        sop_class = self.instance_value(f"/instances/{first}/metadata/SopClassUid")
        if sop_class.startswith(NEVER_SOP_PREFIXES):
            return f"SOP class {sop_class} is not an image to segment"
        manufacturer = tags.get("Manufacturer") or self.instance_value(
            f"/instances/{first}/content/0008-0070"
        )
        if manufacturer.strip().lower() == OWN_MANUFACTURER:
            image_type = self.instance_value(f"/instances/{first}/content/0008-0008").upper().split("\\")
            if "DERIVED" in [v.strip() for v in image_type]:
                return "a segnode output (Manufacturer segnode, ImageType DERIVED)"
        return None

    @staticmethod
    def instance_value(uri):
        try:
            value = orthanc.RestApiGet(uri)
        except Exception:  # noqa: BLE001 - a missing tag or metadata
            return ""
        return value.decode("utf-8", "replace").strip("\x00 ") if isinstance(value, bytes) else str(value)

    @staticmethod
    def orthanc_aet():
        try:
            return json.loads(orthanc.GetConfiguration()).get("DicomAet", "ORTHANC")
        except Exception:  # noqa: BLE001
            return "ORTHANC"

    def retry_or_fail(self, series_id, attempt, error, event):
        if attempt < self.config["max_attempts"] and not self.stopping.is_set():
            delay = min(300.0, self.config["first_retry"] * 2 ** (attempt - 1))
            with self.lock:
                self.counts["retries"] += 1
            _log(
                "LogWarning",
                f"series {series_id}: hand-off attempt {attempt} failed ({error}); again in {delay:g} s",
            )
            self.submit(series_id, attempt + 1, delay)
            self.note(dict(event, outcome="retry", error=error))
            return
        self.finish(series_id, "failed", dict(event, error=error))

    def finish(self, series_id, outcome, event):
        with self.lock:
            self.counts[outcome] += 1
            self.queued.discard(series_id)
        self.note(dict(event, outcome=outcome))
        level = "LogError" if outcome == "failed" else "LogInfo"
        what = event.get("series_uid") or series_id
        detail = event.get("reason") or event.get("error") or ""
        _log(level, f"series {what}: {outcome.replace('_', ' ')} {detail}")

    def note(self, event):
        with self.lock:
            self.recent.append(dict(event, at=round(time.time(), 3)))
            del self.recent[:-50]


def _register():
    plugin = Plugin(_config())
    orthanc.RegisterOnChangeCallback(plugin.on_change)
    orthanc.RegisterRestCallback(STATUS_ROUTE, plugin.status)
    plugin.start()
    _log("LogWarning", f"plugin {VERSION} loaded; hands stable series to {plugin.config['node_url']}")
    return plugin


if orthanc is not None:
    try:
        PLUGIN = _register()
    except Exception as _exc:  # noqa: BLE001 - never stop Orthanc
        try:
            orthanc.LogError(f"segnode: plugin not started: {_exc}")
        except Exception:  # noqa: BLE001
            pass

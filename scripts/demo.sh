#!/usr/bin/env bash
# `make demo`: the node's main job on its embedded defaults (SQLite queue, local spool), end to end.
# With Orthanc installed (Debian's orthanc, orthanc-dicomweb, orthanc-python): a phantom CT series is
# C-STOREd into a local Orthanc; the segnode plugin hands the stable series to `segnode serve`, which
# fetches it by WADO-RS, segments it, writes a DICOM-SEG and STOWs it back into the same study.
# Without Orthanc (or with DEMO_ORTHANC=0): the series goes into `segnode serve` by C-STORE and the
# results stay in the node's folder. Everything runs on 127.0.0.1 and stops by the PID it started.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo-out}
SEGNODE=.venv/bin/segnode
PY=.venv/bin/python
rm -rf "$OUT/var" "$OUT/phantom" "$OUT/orthanc"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: relative paths in node.toml would be relative to its own folder
ORTHANC=0
if [[ "${DEMO_ORTHANC:-1}" != 0 && -x "${ORTHANC_BINARY:-/usr/sbin/Orthanc}" \
      && -e "${ORTHANC_PLUGIN_DIR:-/usr/share/orthanc/plugins}/libOrthancPython.so" \
      && -e "${ORTHANC_PLUGIN_DIR:-/usr/share/orthanc/plugins}/libOrthancDicomWeb.so" ]]; then
  ORTHANC=1
fi

echo "== 1. a synthetic portal-venous abdominal CT with ground truth"
$SEGNODE phantom "$OUT/phantom"
$SEGNODE volume-info "$OUT/phantom/dicom"

read -r DICOM_PORT HTTP_PORT ORTHANC_HTTP ORTHANC_DICOM < <($PY -c 'import socket
ports=[]
for _ in range(4):
    s=socket.socket(); s.bind(("127.0.0.1",0)); ports.append(s.getsockname()[1]); s.close()
print(*ports)')
ORTHANC_USER=segnode
ORTHANC_PASSWORD=$($PY -c 'import secrets; print(secrets.token_urlsafe(12))')
cat > "$OUT/node.toml" <<TOML
[node]
data_dir = "$OUT/var"
rules = "$OUT/rules.toml"
[dicom]
host = "127.0.0.1"
port = $DICOM_PORT
[http]
port = $HTTP_PORT
[ingest]
quiet_seconds = 30
TOML
OUTPUTS="[]"
if ((ORTHANC)); then
  OUTPUTS='["seg", "rtstruct", "sr", "review"]'
  cat >> "$OUT/node.toml" <<TOML
[outbox]
initial_delay_s = 1
[orthanc]
url = "http://127.0.0.1:$ORTHANC_HTTP"
username = "$ORTHANC_USER"
password = "$ORTHANC_PASSWORD"
[[destinations]]
name = "orthanc"
kind = "stowrs"
url = "http://127.0.0.1:$ORTHANC_HTTP/dicom-web"
username = "$ORTHANC_USER"
password = "$ORTHANC_PASSWORD"
TOML
  chmod 600 "$OUT/node.toml"
fi
cat > "$OUT/rules.toml" <<TOML
[[rule]]
name = "demo-ct"
destinations = ["*"]
[rule.match]
modality = ["CT"]
image_type = ["ORIGINAL"]
[rule.pipeline]
engine = "threshold"
post = ${DEMO_POST:-[]}
outputs = $OUTPUTS
TOML

ORTHANC_PID=""
if ((ORTHANC)); then
  echo "== 2a. Orthanc with the segnode plugin (HTTP on $ORTHANC_HTTP, DICOM on $ORTHANC_DICOM)"
  # start-orthanc.sh execs Orthanc: $! is Orthanc's PID.
  ORTHANC_HTTP_PORT=$ORTHANC_HTTP ORTHANC_DICOM_PORT=$ORTHANC_DICOM ORTHANC_STABLE_AGE=2 \
    ORTHANC_USERNAME=$ORTHANC_USER ORTHANC_PASSWORD=$ORTHANC_PASSWORD \
    SEGNODE_NODE_URL="http://127.0.0.1:$HTTP_PORT" orthanc/start-orthanc.sh "$OUT/orthanc" \
    > "$OUT/orthanc.log" 2>&1 &
  ORTHANC_PID=$!
fi
echo "== 2. segnode serve (DICOM on $DICOM_PORT, HTTP on $HTTP_PORT)"
$SEGNODE -c "$OUT/node.toml" serve > "$OUT/serve.log" 2>&1 &
SERVE_PID=$!
trap 'kill -TERM $SERVE_PID $ORTHANC_PID 2>/dev/null; wait $SERVE_PID $ORTHANC_PID 2>/dev/null || true' EXIT
if ((ORTHANC)); then
  for _ in $(seq 100); do
    curl -fsS -u "$ORTHANC_USER:$ORTHANC_PASSWORD" "http://127.0.0.1:$ORTHANC_HTTP/system" >/dev/null 2>&1 && break
    kill -0 $ORTHANC_PID 2>/dev/null || { cat "$OUT/orthanc.log"; exit 1; }
    sleep 0.2
  done
fi
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1 && break
  kill -0 $SERVE_PID 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 0.2
done

if ((ORTHANC)); then
  echo "== 3. C-STORE the series to Orthanc (the plugin hands it to the node once it is stable, ~2 s)"
  if command -v storescu >/dev/null; then
    TCP_NODELAY=1 storescu -aec ORTHANC +sd +r 127.0.0.1 "$ORTHANC_DICOM" "$OUT/phantom/dicom"
  else
    $SEGNODE send "$OUT/phantom/dicom" --to "127.0.0.1:$ORTHANC_DICOM" --aet ORTHANC
  fi
else
  echo "== 3. C-STORE the series to the node"
  $SEGNODE send "$OUT/phantom/dicom" --to "127.0.0.1:$DICOM_PORT" --aet SEGNODE
fi

echo "== 4. the job (GET /api/jobs)"
$PY - "$HTTP_PORT" "$OUT" <<'PY'
import json, sys, time, urllib.request
port, out = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    jobs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs"))
    if jobs and jobs[0]["state"] in ("done", "failed"):
        break
    time.sleep(0.5)
else:
    sys.exit("demo: no finished job within 300 s (see serve.log)")
job = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/{jobs[0]['id']}"))
print(json.dumps({k: job.get(k) for k in ("id", "state", "rule", "engine", "instance_count", "timings", "error",
                                          "results")}, indent=2))
if job["state"] != "done":
    sys.exit(1)
report = json.load(open(f"{job['results']}/report.json"))
print("structures:")
for s in report.get("structures", [])[:12]:
    print(f"  {s.get('name', '?'):<28} {s.get('volume_ml', 0):>9.1f} ml")
print(f"results: {job['results']}")
PY

if ((ORTHANC)); then
  echo "== 4b. the DICOM-SEG, RTSTRUCT, measurements SR and review sheet, back in Orthanc"
  $PY - "$HTTP_PORT" "$ORTHANC_HTTP" "$ORTHANC_USER" "$ORTHANC_PASSWORD" <<'PY'
import base64, json, sys, time, urllib.request
port, orthanc, user, password = sys.argv[1:5]
auth = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
def get(url, headers=None):
    return json.load(urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})))
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    job = get(f"http://127.0.0.1:{port}/api/jobs/{get(f'http://127.0.0.1:{port}/api/jobs')[0]['id']}")
    state = job["destinations"].get("orthanc", {})
    if state.get("state") in ("failed", "skipped") or (  # every output queued (job done) and delivered
            job["state"] == "done" and state.get("state") == "delivered" and state.get("instances", 0) >= 4):
        break
    time.sleep(0.3)
print(f"delivery to Orthanc: {json.dumps(state)}")
if state.get("state") != "delivered":
    sys.exit("demo: the SEG was not delivered (see serve.log)")
base = f"http://127.0.0.1:{orthanc}"
seg = [s for s in get(f"{base}/series?expand", auth) if s["MainDicomTags"].get("Modality") == "SEG"][0]
tags = seg["MainDicomTags"]
study = get(f"{base}/studies/{seg['ParentStudy']}", auth)
report = json.load(open(f"{job['results']}/report.json"))
seg_stage = (report.get("qc") or {}).get("seg", {})
status = get(f"{base}/segnode/status", auth)
handed = next((e for e in status["recent"] if e.get("outcome") == "handed_off"), {})
print(f"SEG series {tags['SeriesInstanceUID']} ({tags.get('SeriesDescription', '')}), "
      f"{len(seg['Instances'])} instance, in study {study['MainDicomTags']['StudyInstanceUID']}")
print(f"SEG instance {seg_stage.get('sop_instance_uid', '?')}: {seg_stage.get('type', '?')}, "
      f"{seg_stage.get('segments', '?')} segments, {seg_stage.get('frames', '?')} frames, "
      f"{seg_stage.get('bytes', 0) / 1e6:.1f} MB")
print("segments: " + ", ".join(s.get("name", "?") for s in report.get("structures", [])))
kinds = {"SEG": "DICOM-SEG", "RTSTRUCT": "RT Structure Set", "SR": "measurements SR (TID 1500)",
         "DOC": "review sheet (Encapsulated PDF)"}
for s in get(f"{base}/studies/{seg['ParentStudy']}/series", auth):
    modality = s["MainDicomTags"].get("Modality")
    if modality in kinds:
        print(f"  in the study: {kinds[modality]:<32} series {s['MainDicomTags'].get('SeriesNumber', '?'):>5}, "
              f"{len(s['Instances'])} instance(s): {s['MainDicomTags'].get('SeriesDescription', '')}")
rt = (report.get("qc") or {}).get("rtstruct", {})
print(f"RTSTRUCT: {rt.get('rois', '?')} ROIs, contours within {rt.get('tolerance_px', '?')} pixel, "
      f"{rt.get('bytes', 0) / 1e3:.0f} kB; review sheet: {job['results']}/review.png")
print(f"plugin: handed over after Orthanc's stable age; node fetched {handed.get('node', {}).get('instances', '?')} "
      f"instances by WADO-RS in {handed.get('node', {}).get('seconds', '?')} s")
print("job timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in job["timings"].items()))
delivered = state.get("delivered_at") or 0
print(f"delivered {delivered - job['finished']:.2f} s after the job finished")
print(f"results: {job['results']} (seg.dcm, rtstruct.dcm, sr.dcm, review.dcm/.png/.pdf, labels.nii.gz, "
      "report.json)")
print(f"look at it: Orthanc Explorer {base}/app/explorer.html#series?uuid={seg['ID']} (user {user}, password "
      f"{password}, while the demo runs: DEMO_HOLD=1 keeps it up);")
print("  OHIF: docker compose -f docker/compose.yaml up, then http://localhost:3000 (OHIF on Orthanc's DICOMweb)")
PY
  if [[ "${DEMO_HOLD:-0}" == 1 ]]; then
    echo "== Orthanc and the node keep running until Ctrl-C"
    wait $ORTHANC_PID || true
  fi
fi

echo "== 5. liver vessels: found in the CT, split into portal and hepatic trees, scored against ground truth"
# Organ labels as TotalSegmentator gives them (the liver includes its vessels), without the answer.
$PY - "$OUT" <<'PY'
import json, sys
import numpy as np
from node.nifti import read_nifti, write_nifti
out = sys.argv[1]
truth = read_nifti(f"{out}/phantom/labels.nii.gz")
support = truth.array.copy()
support[np.isin(support, [201, 202])] = 5
write_nifti(truth.with_array(support), f"{out}/organs.nii.gz")
classes = [c for c in json.load(open(f"{out}/phantom/classes.json")) if c["id"] not in (201, 202)]
json.dump(classes, open(f"{out}/organs.json", "w"))
PY
$SEGNODE run "$OUT/phantom/dicom" "$OUT/vessels" --engine labelmap --labels "$OUT/organs.nii.gz" \
  --split_portal_hepatic > "$OUT/vessels.log"
$PY - "$OUT" <<'PY'
import sys
import numpy as np
from node.nifti import read_nifti
out = sys.argv[1]
truth = read_nifti(f"{out}/phantom/labels.nii.gz").array
found = read_nifti(f"{out}/vessels/labels.nii.gz").array
vessels = np.isin(truth, [201, 202])
both = vessels & np.isin(found, [201, 202])
print(f"  intrahepatic vessel voxels found: {both.sum() / vessels.sum():.1%} of {vessels.sum()}")
print(f"  of those, assigned to the right tree: {(found[both] == truth[both]).mean():.1%}")
print(f"  outputs: {out}/vessels/ (portal_vein_branches.nii.gz, hepatic_veins.nii.gz, report.json)")
PY


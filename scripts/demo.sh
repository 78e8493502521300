#!/usr/bin/env bash
# `make demo`: the node's main job on its embedded defaults (SQLite queue, local spool), end to end.
# A phantom CT series goes into `segnode serve` by C-STORE; the node completes the series, routes it,
# segments it and writes the results. Everything runs on 127.0.0.1 and stops by the PID it started.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo-out}
SEGNODE=.venv/bin/segnode
PY=.venv/bin/python
rm -rf "$OUT/var" "$OUT/phantom"
mkdir -p "$OUT"

echo "== 1. a synthetic portal-venous abdominal CT with ground truth"
$SEGNODE phantom "$OUT/phantom"
$SEGNODE volume-info "$OUT/phantom/dicom"

read -r DICOM_PORT HTTP_PORT < <($PY -c 'import socket
ports=[]
for _ in range(2):
    s=socket.socket(); s.bind(("127.0.0.1",0)); ports.append(s.getsockname()[1]); s.close()
print(*ports)')
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
cat > "$OUT/rules.toml" <<TOML
[[rule]]
name = "demo-ct"
[rule.match]
modality = ["CT"]
[rule.pipeline]
engine = "threshold"
post = ${DEMO_POST:-[]}
TOML

echo "== 2. segnode serve (DICOM on $DICOM_PORT, HTTP on $HTTP_PORT)"
$SEGNODE -c "$OUT/node.toml" serve > "$OUT/serve.log" 2>&1 &
SERVE_PID=$!
trap 'kill -TERM $SERVE_PID 2>/dev/null; wait $SERVE_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1 && break
  kill -0 $SERVE_PID 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 0.2
done

echo "== 3. C-STORE the series to the node"
$SEGNODE send "$OUT/phantom/dicom" --to "127.0.0.1:$DICOM_PORT" --aet SEGNODE

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


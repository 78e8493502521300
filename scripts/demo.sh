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

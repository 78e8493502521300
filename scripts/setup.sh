#!/usr/bin/env bash
# Idempotent setup: Debian packages the node and its tests use, then the .venv.
# A second run only checks (dpkg-query, a stamp newer than pyproject.toml) and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real servers and tools: Orthanc with its Python and DICOMweb plugins, dcmtk (storescu/storescp),
# dicom3tools (dciodvfy), Redis, dcm2niix (independent geometry check in the tests).
# Chromium: the browser tests (tests/browser) drive it through Playwright; no browser is downloaded,
# and without /usr/bin/chromium those tests are skipped with that reason.
DEBS=(orthanc orthanc-python orthanc-dicomweb dcmtk dicom3tools redis-server dcm2niix chromium systemd)
PYTHON=${PYTHON:-python3.11}

missing=()
for pkg in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ! command -v "$PYTHON" >/dev/null; then missing+=(python3.11 python3.11-venv); fi
if command -v "$PYTHON" >/dev/null && ! "$PYTHON" -c "import ensurepip, venv" 2>/dev/null; then
  missing+=(python3.11-venv)
fi
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # Debian starts packaged services on install; the node and its tests start their own on loopback.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

stamp=.venv/.segnode-installed
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # torch first, pinned: the CPU wheel on these machines; any other spec pulls GBs of CUDA packages.
  # (pip's find-links/index warnings about absent local folders are noise on these machines.)
  .venv/bin/pip install -q torch==2.13.0 2>&1 | { grep -v "^WARNING: Location" || true; }
  .venv/bin/pip install -q -e ".[test,seg]" torch==2.13.0 2>&1 | { grep -v "^WARNING: Location" || true; }
  touch "$stamp"
fi
# dcmjs (the DICOM library OHIF builds on) for the DICOM-SEG conformance test, pinned by
# tests/js/package-lock.json; skipped while the lock file is older than the stamp.
js_stamp=tests/js/node_modules/.segnode-installed
if command -v npm >/dev/null; then
  if [ ! -f "$js_stamp" ] || [ tests/js/package-lock.json -nt "$js_stamp" ]; then
    npm ci --prefix tests/js --no-audit --no-fund --loglevel=error
    touch "$js_stamp"
  fi
else
  echo "setup: npm not found: the dcmjs check in tests/integration/test_seg_conformance.py will be skipped"
fi
# The OHIF viewer (npm @ohif/app, its prebuilt static dist/) for tests/browser/test_ohif.py and
# `segnode viewer`: `npm pack` only (no dependencies), the tarball checked against the pinned sha512,
# dist/ kept in .cache/ohif/<version>/ (about 200 MB), the tarball removed.
OHIF_VERSION=3.13.2
OHIF_INTEGRITY=sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==
ohif_dir=.cache/ohif/$OHIF_VERSION
if [ ! -f "$ohif_dir/.segnode-installed" ]; then
  if command -v npm >/dev/null; then
    echo "setup: fetching OHIF $OHIF_VERSION (npm pack @ohif/app, about 50 MB)"
    rm -rf "$ohif_dir" && mkdir -p "$ohif_dir"
    npm pack "@ohif/app@$OHIF_VERSION" --pack-destination "$ohif_dir" --loglevel=error >/dev/null
    ohif_tgz="$ohif_dir/ohif-app-$OHIF_VERSION.tgz"
    got=$(.venv/bin/python -c 'import base64, hashlib, sys
print("sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$ohif_tgz")
    if [ "$got" != "$OHIF_INTEGRITY" ]; then
      echo "setup: $ohif_tgz is $got, not the pinned $OHIF_INTEGRITY" >&2; exit 1
    fi
    tar -xzf "$ohif_tgz" -C "$ohif_dir" --strip-components=1 package/dist
    rm "$ohif_tgz"
    touch "$ohif_dir/.segnode-installed"
  else
    echo "setup: npm not found: the OHIF browser test (tests/browser/test_ohif.py) will be skipped"
  fi
fi
# Blender for the scene builder (node/artifacts/blender_scene.py): pip's bpy 5.0.1 (cp311, a 374 MB
# wheel, about 1 GB installed) needs numpy < 2, so it gets its own venv. SEGNODE_SKIP_BLENDER=1 skips it
# (the Blender tests then skip; SEGNODE_BLENDER may point at a Blender >= 4.2 binary instead).
blender_stamp=.venv-blender/.segnode-installed
if [ "${SEGNODE_SKIP_BLENDER:-0}" != 1 ] && [ ! -f "$blender_stamp" ]; then
  echo "setup: creating .venv-blender (bpy 5.0.1)"
  "$PYTHON" -m venv .venv-blender
  printf '*\n' > .venv-blender/.gitignore  # python3.11's venv does not write one
  if .venv-blender/bin/pip install -q bpy==5.0.1 "numpy<2" 2>&1 | { grep -v "^WARNING: Location" || true; } \
      && .venv-blender/bin/python -c "import bpy" 2>/dev/null; then
    touch "$blender_stamp"
  else
    echo "setup: bpy 5.0.1 did not install: the Blender scene output and its tests will be skipped"
  fi
fi
echo "setup: ok"

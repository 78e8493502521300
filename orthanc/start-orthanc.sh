#!/usr/bin/env bash
# Start a local Orthanc for segnode development, in the foreground (Ctrl-C stops it).
#
#   orthanc/start-orthanc.sh [STATE_DIR]
#
# STATE_DIR (default $ORTHANC_STATE_DIR, else ~/.local/state/segnode/orthanc) keeps the
# rendered orthanc.json and the storage, so stored series survive a restart (e.g. after
# editing the plugin). Use a fresh folder, or delete this one, to start empty.
#
# Environment (defaults in brackets):
#   ORTHANC_HTTP_PORT [8042]  ORTHANC_DICOM_PORT [4242]  ORTHANC_AET [ORTHANC]
#   ORTHANC_BINARY [/usr/sbin/Orthanc]  ORTHANC_PLUGIN_DIR [/usr/share/orthanc/plugins]
# The paths are those of Debian's orthanc, orthanc-dicomweb and orthanc-python packages;
# tests/servers.py uses the same defaults and the same two variables.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state_dir="${1:-${ORTHANC_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/segnode/orthanc}}"
binary="${ORTHANC_BINARY:-/usr/sbin/Orthanc}"
plugin_dir="${ORTHANC_PLUGIN_DIR:-/usr/share/orthanc/plugins}"
plugin_script="$here/segnode_plugin.py"

for needed in "$binary" "$plugin_dir/libOrthancDicomWeb.so" "$plugin_dir/libOrthancPython.so"; do
  if [[ ! -e "$needed" ]]; then
    echo "start-orthanc: $needed is missing (apt-get install orthanc orthanc-dicomweb orthanc-python)" >&2
    exit 1
  fi
done

mkdir -p "$state_dir/storage"
state_dir="$(cd "$state_dir" && pwd)"
config="$state_dir/orthanc.json"

sed -e "s|@HTTP_PORT@|${ORTHANC_HTTP_PORT:-8042}|g" \
    -e "s|@DICOM_PORT@|${ORTHANC_DICOM_PORT:-4242}|g" \
    -e "s|@AET@|${ORTHANC_AET:-ORTHANC}|g" \
    -e "s|@STORAGE_DIR@|$state_dir/storage|g" \
    -e "s|@PLUGIN_DIR@|$plugin_dir|g" \
    -e "s|@PYTHON_SCRIPT@|$plugin_script|g" \
    "$here/orthanc.json.template" > "$config"

if [[ ! -e "$plugin_script" ]]; then
  # The segnode plugin comes with a later issue; until then the Python plugin loads idle.
  echo "start-orthanc: $plugin_script not found; starting without a Python plugin script" >&2
  sed -i -e '/^ *"PythonScript" *:/d' "$config"
fi

echo "start-orthanc: http://127.0.0.1:${ORTHANC_HTTP_PORT:-8042}/ (DICOM port ${ORTHANC_DICOM_PORT:-4242}," \
     "AE title ${ORTHANC_AET:-ORTHANC}); configuration and storage in $state_dir" >&2

# DCMTK, inside Orthanc, waits on Nagle's algorithm for every C-STORE without this.
export TCP_NODELAY=1
exec "$binary" "$config"

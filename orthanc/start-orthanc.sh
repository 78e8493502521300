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
#   ORTHANC_STABLE_AGE [10]  seconds without a new instance before a series is handed to the node
#   ORTHANC_PASSWORD [none: no authentication]  ORTHANC_USERNAME [segnode]  HTTP Basic auth
#   SEGNODE_NODE_URL [http://127.0.0.1:8080]  SEGNODE_NODE_TOKEN [none]  SEGNODE_VENV [<repo>/.venv]
#     the segnode plugin's node and the venv it imports the node's rules from
# Values are pasted into JSON: no double quotes or backslashes in them.
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

# sed replacement text: escape its special characters (&, the | delimiter, backslash).
esc() { printf '%s' "$1" | sed -e 's/[&|\\]/\\&/g'; }
auth=false users=""
if [[ -n "${ORTHANC_PASSWORD:-}" ]]; then
  auth=true users="\"${ORTHANC_USERNAME:-segnode}\" : \"$ORTHANC_PASSWORD\""
fi
venv="${SEGNODE_VENV:-}"
if [[ -z "$venv" && -d "$here/../.venv" ]]; then venv="$(cd "$here/../.venv" && pwd)"; fi

sed -e "s|@HTTP_PORT@|${ORTHANC_HTTP_PORT:-8042}|g" \
    -e "s|@DICOM_PORT@|${ORTHANC_DICOM_PORT:-4242}|g" \
    -e "s|@AET@|$(esc "${ORTHANC_AET:-ORTHANC}")|g" \
    -e "s|@STORAGE_DIR@|$(esc "$state_dir/storage")|g" \
    -e "s|@PLUGIN_DIR@|$(esc "$plugin_dir")|g" \
    -e "s|@PYTHON_SCRIPT@|$(esc "$plugin_script")|g" \
    -e "s|@AUTH_ENABLED@|$auth|g" \
    -e "s|@REGISTERED_USERS@|$(esc "$users")|g" \
    -e "s|@STABLE_AGE@|${ORTHANC_STABLE_AGE:-10}|g" \
    -e "s|@NODE_URL@|$(esc "${SEGNODE_NODE_URL:-http://127.0.0.1:8080}")|g" \
    -e "s|@NODE_TOKEN@|$(esc "${SEGNODE_NODE_TOKEN:-}")|g" \
    -e "s|@SEGNODE_VENV@|$(esc "$venv")|g" \
    "$here/orthanc.json.template" > "$config"
chmod 600 "$config"  # it may hold a password and the node's token

if [[ ! -e "$plugin_script" ]]; then
  # Without the segnode plugin the Python plugin loads idle.
  echo "start-orthanc: $plugin_script not found; starting without a Python plugin script" >&2
  sed -i -e '/^ *"PythonScript" *:/d' "$config"
fi

echo "start-orthanc: http://127.0.0.1:${ORTHANC_HTTP_PORT:-8042}/ (DICOM port ${ORTHANC_DICOM_PORT:-4242}," \
     "AE title ${ORTHANC_AET:-ORTHANC}, authentication $auth); stable series go to" \
     "${SEGNODE_NODE_URL:-http://127.0.0.1:8080}; configuration and storage in $state_dir" >&2

# DCMTK, inside Orthanc, waits on Nagle's algorithm for every C-STORE without this.
export TCP_NODELAY=1
exec "$binary" "$config"

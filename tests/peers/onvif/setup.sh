#!/bin/sh
# Prepares the ONVIF test peers; safe to run again (CI runs every tests/peers/*/setup.sh).
#   - a venv with ipycam (virtual ONVIF camera) and WSDiscovery at $HOME/.cache/verge/venv-onvif
# ipycam streams RTSP through ffmpeg (Debian package, installed by CI).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
venv="$HOME/.cache/verge/venv-onvif"
stamp="$venv/.requirements"
if ! cmp -s "$here/requirements.txt" "$stamp" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    cp "$here/requirements.txt" "$stamp"
fi
echo "onvif peers ready: $venv"

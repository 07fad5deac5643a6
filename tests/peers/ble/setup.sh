#!/usr/bin/env bash
# Creates the BLE peer's venv (python-dbusmock with its bluez5 template) at
# $HOME/.cache/verge/venv-ble. Idempotent: a venv whose packages already match
# requirements.txt is left alone. The tests find it there, or through VERGE_BLE_VENV.
#
# dbus-python is taken from Debian (python3-dbus) rather than built from PyPI:
# its source build needs the GLib development headers and meson.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${VERGE_BLE_VENV:-$HOME/.cache/verge/venv-ble}"
stamp="$venv/.requirements"
if [ -x "$venv/bin/python" ] && cmp -s "$here/requirements.txt" "$stamp"; then
    exit 0
fi
need=()
command -v dbus-daemon >/dev/null || need+=(dbus)
command -v gdbus >/dev/null || need+=(libglib2.0-bin)
/usr/bin/python3 -c 'import dbus' 2>/dev/null || need+=(python3-dbus)
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import venv' 2>/dev/null || need+=(python3-venv)
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup.sh: missing Debian packages ${need[*]} (run as root to install them)" >&2
        exit 1
    fi
    apt-get install -y --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
fi
rm -rf "$venv"
/usr/bin/python3 -m venv --system-site-packages "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
"$venv/bin/python" -c 'import dbusmock, dbus'
cp "$here/requirements.txt" "$stamp"

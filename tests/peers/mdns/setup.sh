#!/bin/sh
# Prepares the mDNS test peers; safe to run again (CI runs every tests/peers/*/setup.sh).
#   - a venv with python zeroconf at $HOME/.cache/verge/venv-mdns (short TTLs, SIGKILL, IPv6-only, TXT changes)
#   - avahi (avahi-daemon, avahi-publish) and dbus come from Debian: avahi-daemon avahi-utils dbus
set -eu
here=$(cd "$(dirname "$0")" && pwd)
venv="$HOME/.cache/verge/venv-mdns"

stamp="$venv/.requirements"
if ! cmp -s "$here/requirements.txt" "$stamp" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    cp "$here/requirements.txt" "$stamp"
fi
for tool in avahi-daemon avahi-publish dbus-daemon; do
    command -v "$tool" >/dev/null 2>&1 || echo "mdns peers: $tool missing (apt-get install avahi-daemon avahi-utils dbus)" >&2
done
echo "mdns peers ready: $venv"

#!/bin/sh
# Prepares the Modbus test peers; safe to run again (CI runs every tests/peers/*/setup.sh).
#   - a venv with pymodbus at $HOME/.cache/verge/venv-modbus
#   - the libmodbus server (no Read Device Identification) at $HOME/.cache/verge/peers/modbus-libmodbus-server
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cache="$HOME/.cache/verge"
venv="$cache/venv-modbus"
peers="$cache/peers"
mkdir -p "$peers"

stamp="$venv/.requirements"
if ! cmp -s "$here/requirements.txt" "$stamp" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    cp "$here/requirements.txt" "$stamp"
fi

bin="$peers/modbus-libmodbus-server"
src="$here/libmodbus_server.c"
if [ ! -x "$bin" ] || [ "$src" -nt "$bin" ]; then
    cc -O2 -Wall -Wextra -o "$bin.tmp" "$src" $(pkg-config --cflags --libs libmodbus)
    mv "$bin.tmp" "$bin"
fi
echo "modbus peers ready: $venv, $bin"

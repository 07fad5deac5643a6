#!/usr/bin/env bash
# Creates (or reuses) the Python venv of the example handler: ~/.cache/verge/venv
# with grpcio and grpcio-tools from PyPI. Idempotent: a second run changes nothing.
# Override the location with VERGE_VENV.
set -euo pipefail
venv="${VERGE_VENV:-$HOME/.cache/verge/venv}"
here="$(cd "$(dirname "$0")" && pwd)"
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import grpc, grpc_tools' 2>/dev/null; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
fi
"$venv/bin/python" -c 'import grpc, grpc_tools; print("venv ready:", grpc.__version__)'

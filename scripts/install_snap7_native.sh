#!/usr/bin/env bash
# A second, independent S7 peer for the PLC tests: the native Snap7 C++ server shipped inside
# python-snap7 2.1 (the project itself uses python-snap7 3.x, pure Python). 2.1 and 3.x cannot
# share a venv, so it lives in .venv-snap7-native (about 2 MB). Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-snap7-native"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import snap7, sys; sys.exit(snap7.__version__ != "2.1.0")' 2>/dev/null; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet "python-snap7==2.1.0"
"$venv/bin/python" -c 'import snap7.server; print("native Snap7", __import__("snap7").__version__, "ready")'

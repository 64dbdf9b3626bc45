#!/usr/bin/env bash
# First command of the README: set up the runtime and run the demo line on embedded defaults.
#   scripts/demo.sh                 # runs until Ctrl-C
#   scripts/demo.sh --duration 20   # any `edge run` option
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup.sh" runtime
exec "$root/.venv/bin/edge" run "$@"

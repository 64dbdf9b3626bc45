#!/usr/bin/env bash
# Soak the demo line under a schedule of faults (see scripts/soak.py for what it asserts).
#   scripts/soak.sh --duration 1800 --out soak-out   # 30 minutes: the README's figures
#   scripts/soak.sh --duration 180                   # the CI version
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup.sh" test >/dev/null
exec "$root/.venv/bin/python" "$root/scripts/soak.py" "$@"

#!/usr/bin/env bash
# Second command of the README: set up everything the tests need and run the whole suite.
#   scripts/test.sh            # all tests, plus ruff and mypy
#   scripts/test.sh -k modbus  # any pytest option (lint is skipped when options are given)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh test
if [ $# -eq 0 ]; then
  .venv/bin/ruff check .
  .venv/bin/mypy edge camera plc models uplink
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"

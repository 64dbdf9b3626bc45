#!/usr/bin/env bash
# Set up this checkout: a virtual environment in .venv with the project installed.
#   scripts/setup.sh runtime   # the daemon only (what a line PC needs)
#   scripts/setup.sh test      # + test peers (apt) and the test/train/bench extras
# Idempotent and quick when nothing changed (a stamp records what was installed).
set -euo pipefail
mode="${1:-runtime}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

apt_test_packages=(
  mbpoll              # independent Modbus client that reads back what the daemon wrote
  kcat                # independent Kafka consumer that reads back what the uplink produced
  libmodbus-dev       # independent Modbus TCP server (a small C program built by a fixture)
  aravis-tools        # arv-fake-gv-camera-0.8: a real GigE Vision camera emulator
  gir1.2-aravis-0.8 python3-gi
  libgirepository1.0-dev libcairo2-dev pkg-config  # to build PyGObject (the aravis extra)
  iproute2 util-linux # ip, unshare: private network namespaces for GigE Vision tests
  systemd             # systemd-analyze verify for the unit file
  prometheus          # promtool: check and unit-test the alert rules (configs/monitoring)
  chromium            # headless browser that loads the operator page in its test
  shellcheck          # lints scripts/gpu_check.sh in its test
  gcc
)

if [ "$mode" = test ]; then
  missing=()
  for p in "${apt_test_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

case "$mode" in
  runtime) extras="" ;;
  test) extras="[test,train,opcua,bench,aravis]" ;;
  *) echo "usage: $0 runtime|test" >&2; exit 2 ;;
esac

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.edge-setup-$mode"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e ".$extras"
  echo "$want" > "$stamp"
fi
if [ "$mode" = test ]; then
  scripts/install_snap7_native.sh   # the native Snap7 server: an independent S7 peer for tests
fi

#!/usr/bin/env bash
# Install the edge daemon on a line PC as a systemd service.
#   sudo scripts/install.sh [--gpu] [--prefix /opt/edge] [--config path/to/line.yaml]
# Idempotent: re-running upgrades the code in place and keeps /etc/edge/line.yaml.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
prefix=/opt/edge
config=""
extras=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --gpu) extras="[gpu]"; shift ;;
    -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "run as root (sudo)" >&2; exit 1; }

id edge >/dev/null 2>&1 || useradd --system --home /var/lib/edge --shell /usr/sbin/nologin edge
install -d -m 0755 "$prefix"
rm -rf "$prefix/src.new" && cp -a "$here" "$prefix/src.new"
rm -rf "$prefix/src.new/.venv" "$prefix/src.new/.git" "$prefix/src.new/var"
rm -rf "$prefix/src" && mv "$prefix/src.new" "$prefix/src"
[ -x "$prefix/venv/bin/python" ] || python3 -m venv "$prefix/venv"
"$prefix/venv/bin/pip" install --quiet --upgrade pip
"$prefix/venv/bin/pip" install --quiet "$prefix/src$extras"

install -d -m 0750 -o root -g edge /etc/edge
if [ -n "$config" ]; then
  install -m 0640 -o root -g edge "$config" /etc/edge/line.yaml
elif [ ! -f /etc/edge/line.yaml ]; then
  install -m 0640 -o root -g edge "$here/configs/line.example.yaml" /etc/edge/line.yaml
  echo "installed an EXAMPLE config at /etc/edge/line.yaml: edit it, then run"
  echo "  $prefix/venv/bin/edge config check /etc/edge/line.yaml"
fi
[ -f /etc/edge/edge.env ] || install -m 0600 -o root -g root /dev/null /etc/edge/edge.env
"$prefix/venv/bin/edge" config check /etc/edge/line.yaml || echo "fix the config before starting"

# The daemon's PM QoS request (pipeline.cpu_latency_us) needs write access to this device.
cat > /etc/udev/rules.d/60-edge-cpu-latency.rules <<'RULE'
KERNEL=="cpu_dma_latency", GROUP="edge", MODE="0660"
RULE
if [ -c /dev/cpu_dma_latency ]; then chgrp edge /dev/cpu_dma_latency && chmod 0660 /dev/cpu_dma_latency; fi

sed "s#/opt/edge#$prefix#g" "$here/systemd/edge.service" > /etc/systemd/system/edge.service
systemctl daemon-reload
systemctl enable edge.service
echo "installed; start with: systemctl start edge && journalctl -fu edge"

"""Keep the CPUs out of deep idle states while the line runs (Linux PM QoS, /dev/cpu_dma_latency).

At 60 fps an inference worker sleeps ~12 ms between frames; waking a core from an idle state
cost ~210 µs per hop here (daemon -> worker, worker -> daemon, daemon -> PLC, PLC -> daemon), four
times per part: about 0.8 ms of every part's latency spent waking up. Holding the PM QoS request
at 0 µs for the daemon's lifetime brought one hop to ~30 µs (measured with scripts in the README's
performance section). The kernel honours the request only while the file stays open, so it ends
with the process. Writing it needs root or a udev rule (scripts/install.sh adds one for the
service's group); without it the daemon logs once and runs as before.
"""

from __future__ import annotations

import os
import struct

import structlog

log = structlog.get_logger(__name__)

PATH = "/dev/cpu_dma_latency"


class CpuLatencyHint:
    def __init__(self, max_us: int | None) -> None:
        self.max_us = max_us
        self._fd: int | None = None

    def start(self) -> bool:
        if self.max_us is None:
            return False
        try:
            fd = os.open(PATH, os.O_WRONLY)
        except OSError as exc:
            log.info("cpu_latency_hint_unavailable", path=PATH, error=exc.strerror,
                     fix="run scripts/install.sh (udev rule for the service group), or set "
                         "pipeline.cpu_latency_us: null")
            return False
        try:
            os.write(fd, struct.pack("i", self.max_us))
        except OSError as exc:
            os.close(fd)
            log.info("cpu_latency_hint_unavailable", path=PATH, error=exc.strerror)
            return False
        self._fd = fd
        log.info("cpu_latency_hint", max_us=self.max_us)
        return True

    def stop(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

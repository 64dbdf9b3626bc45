"""Child process for the kill -9 test: submits events forever, reports each committed batch.

Runs as `python -m tests.uplink.spool_child SPOOL_DIR`; prints one committed event id per line on
stdout (flushed after each commit), so the parent knows exactly what became durable.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.uplink.helpers import make_event, make_image
from uplink.config import UplinkSettings
from uplink.spool import Spool


def main() -> None:
    out = sys.stdout

    def report(ids: list[str]) -> None:
        out.write("".join(f"{i}\n" for i in ids))
        out.flush()

    settings = UplinkSettings(spool_dir=Path(sys.argv[1]), batch_max_events=64,
                              batch_max_delay_ms=5, ok_image_sample_rate=0.05)
    spool = Spool(settings, "L1", on_commit=report)
    spool.open()
    image = make_image(1, 64, 80)
    part = 0
    while True:
        for _ in range(50):
            verdict = "DEFECT" if part % 7 == 0 else "OK"
            while not spool.submit(make_event("L1", f"cam{part % 4}", part, verdict), image):
                spool.flush(1.0)
            part += 1
        spool.flush(5.0)


if __name__ == "__main__":
    main()

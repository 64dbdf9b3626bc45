"""Child process for the kill -9 tests: submits events forever, reports each committed batch.

`python -m tests.uplink.spool_child SPOOL_DIR [KAFKA_PORT]` prints one committed event id per
line on stdout (flushed after each commit), so the parent knows exactly what became durable.
With a Kafka port it also runs the Forwarder, like the daemon does.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import structlog

from tests.uplink.helpers import make_event, make_image
from uplink.config import UplinkSettings
from uplink.forwarder import Forwarder
from uplink.spool import Spool


async def main() -> None:
    out = sys.stdout
    # stdout is the report channel: logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

    def report(ids: list[str]) -> None:
        out.write("".join(f"{i}\n" for i in ids))
        out.flush()

    cfg: dict[str, object] = {"spool_dir": Path(sys.argv[1]), "batch_max_events": 64,
                              "batch_max_delay_ms": 5, "ok_image_sample_rate": 0.05}
    if len(sys.argv) > 2:
        cfg["kafka"] = {"bootstrap_servers": [f"127.0.0.1:{sys.argv[2]}"],
                        "events_topic": "edge.events", "linger_ms": 5}
    spool = Spool(UplinkSettings.model_validate(cfg), "L1", on_commit=report)
    spool.open()
    forwarder = Forwarder(spool)
    task = asyncio.create_task(forwarder.run())
    image = make_image(1, 64, 80)
    part = 0
    while not task.done():
        for _ in range(50):
            verdict = "DEFECT" if part % 7 == 0 else "OK"
            if spool.submit(make_event("L1", f"cam{part % 4}", part, verdict), image):
                part += 1
        await asyncio.sleep(0.005)  # ~ a few thousand events/s, forwarded concurrently


if __name__ == "__main__":
    asyncio.run(main())

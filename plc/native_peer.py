"""A Modbus TCP server in C (libmodbus) to play the PLC where its own cost must not count.

`edge bench` measures the box: capture to the PLC's acknowledgement, against bare inference. A
PLC answers a write within its own cycle, on its own CPU. The project's simulator
(`python -m plc.sim`) is a pymodbus server in Python on the box's own cores: at 60 fps on the
2-vCPU bench VM it added ~0.2-0.3 ms at p50 and ~0.5 ms at p99 to every part's PLC write (0.37-0.50
against 0.17 ms p50 with this server). The tests use the same server as an independent peer that
the project did not write: the protocol is libmodbus's, only the 30-line main is ours.

It is built from source on first use (gcc and libmodbus-dev, both installed by scripts/setup.sh);
where either is missing `PeerUnavailable` says what to install.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).parent / "peers" / "libmodbus_server.c"
"""usage: libmodbus_server PORT; prints READY once listening on 127.0.0.1:PORT."""


class PeerUnavailable(RuntimeError):
    """The native server cannot be built here (the message says what is missing)."""


def build(out_dir: Path) -> Path:
    """Compile the server into `out_dir` (once per source version); returns the binary."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    binary = out_dir / f"libmodbus_server-{digest}"
    if binary.exists():
        return binary
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise PeerUnavailable("no C compiler (apt-get install gcc)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    r = subprocess.run(
        [cc, "-O2", "-o", str(tmp), str(SOURCE), "-I/usr/include/modbus", "-lmodbus"],
        capture_output=True, text=True, check=False,
    )
    if r.returncode != 0:
        raise PeerUnavailable(
            f"cannot build {SOURCE.name} (apt-get install libmodbus-dev): {r.stderr.strip()[-300:]}"
        )
    tmp.replace(binary)
    return binary

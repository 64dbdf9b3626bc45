"""An S7 server for the link tests: python-snap7's own (pure Python in 3.x) or, run with the
python of a venv holding python-snap7 2.1, the native Snap7 C++ server (an independent peer).

usage: s7_server.py PORT DB_NUMBER DB_SIZE ; prints READY; runs until SIGTERM.
Each stdin line "dump OFFSET SIZE" is answered with the DB bytes in hex: the PLC memory as the
server holds it, read without any S7 client; "set OFFSET HEX" writes it as the PLC program would.
"""

import ctypes
import signal
import sys

import snap7
from snap7.server import Server

try:
    from snap7.type import SrvArea  # 2.x and 3.x
except ImportError:  # pragma: no cover
    from snap7.types import SrvArea  # type: ignore[no-redef]

port, db_number, size = (int(a) for a in sys.argv[1:4])
native = snap7.__version__.startswith(("1.", "2."))
server = Server(log=False)
if native:
    mem = (ctypes.c_ubyte * size)()  # Snap7 reads and writes this buffer in place
    server.register_area(SrvArea.DB, db_number, mem)  # type: ignore[arg-type]

    def dump(off: int, n: int) -> bytes:
        return bytes(mem[off : off + n])

    def put(off: int, data: bytes) -> None:
        ctypes.memmove(ctypes.addressof(mem) + off, data, len(data))  # one copy, like a PLC
else:
    db = bytearray(size)
    server.register_area(SrvArea.DB, db_number, db)

    def dump(off: int, n: int) -> bytes:
        return bytes(db[off : off + n])

    def put(off: int, data: bytes) -> None:
        db[off : off + len(data)] = data


server.start_to("127.0.0.1", tcp_port=port)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print(f"READY {'native' if native else 'python'} {snap7.__version__}", flush=True)
try:
    for line in sys.stdin:
        parts = line.split()
        if parts and parts[0] == "dump":
            print(dump(int(parts[1]), int(parts[2])).hex(), flush=True)
        elif parts and parts[0] == "set":
            put(int(parts[1]), bytes.fromhex(parts[2]))
            print("OK", flush=True)
finally:
    server.stop()

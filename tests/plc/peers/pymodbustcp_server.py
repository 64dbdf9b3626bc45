"""pyModbusTCP's server (an implementation independent of pymodbus) for the link tests."""

import sys

from pyModbusTCP.server import ModbusServer

server = ModbusServer(host="127.0.0.1", port=int(sys.argv[1]), no_block=True)
server.start()
print("READY", flush=True)
try:
    sys.stdin.read()  # runs until the fixture stops it by PID
finally:
    server.stop()

"""pyModbusTCP's server (an implementation independent of pymodbus): "the PLC" for link and
daemon tests.

usage: pymodbustcp_server.py PORT ; prints READY; runs until SIGTERM or stdin closes.
Stdin side channel (the PLC program's own memory access, no Modbus client involved), one reply
line per command:
  get ADDR N               -> N holding registers, space separated
  set ADDR V1 [V2 ...]     -> OK   (one atomic update of consecutive registers)
  trigger PID_ADDR CNT_ADDR PART_ID
                           -> the new count: writes the part id (uint32, high word first),
                              THEN increments the uint16 counter (the documented PLC order)
  play PID_ADDR CNT_ADDR N -> OK at once; a thread then announces parts 1..N as `trigger` does,
                              back to back (a PLC racing the reader)
  wait                     -> DONE when the `play` thread has finished
"""

import sys
import threading

from pyModbusTCP.server import DataBank, ModbusServer

bank = DataBank()
server = ModbusServer(host="127.0.0.1", port=int(sys.argv[1]), no_block=True, data_bank=bank)
server.start()
player: threading.Thread | None = None


def trigger(pid_addr: int, cnt_addr: int, part_id: int) -> int:
    bank.set_holding_registers(pid_addr, [part_id >> 16 & 0xFFFF, part_id & 0xFFFF])
    count = ((bank.get_holding_registers(cnt_addr, 1) or [0])[0] + 1) & 0xFFFF
    bank.set_holding_registers(cnt_addr, [count])
    return count


def play(pid_addr: int, cnt_addr: int, n: int) -> None:
    for part in range(1, n + 1):
        trigger(pid_addr, cnt_addr, 0x10000 * part + part)  # both words change every part


print("READY", flush=True)
try:
    for line in sys.stdin:
        cmd, *args = line.split()
        a = [int(x) for x in args]
        if cmd == "get":
            print(" ".join(map(str, bank.get_holding_registers(a[0], a[1]) or [])), flush=True)
        elif cmd == "set":
            bank.set_holding_registers(a[0], a[1:])
            print("OK", flush=True)
        elif cmd == "trigger":
            print(trigger(*a), flush=True)
        elif cmd == "play":
            player = threading.Thread(target=play, args=a, daemon=True)
            player.start()
            print("OK", flush=True)
        elif cmd == "wait":
            if player is not None:
                player.join()
            print("DONE", flush=True)
finally:
    server.stop()

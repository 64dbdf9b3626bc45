"""An emulated PLC task that scans one camera's results every SCAN_MS through pyModbusTCP's
client (independent of the project's code: its own decoding of docs/plc-register-map.md).

usage: ring_scanner.py PORT MODE BASE RING_SIZE SCAN_MS ACK_ADDR
  Record: part id words 0-1, verdict word 2, sequence words 8-9 (v1 position), recipe word 10.
  MODE slot: the record (12 registers) at BASE; a new sequence = a new record.
  MODE ring: head (uint32) at BASE, slot k at BASE + 2 + 12k; walks every sequence from the last
             consumed + 1 to the head; slot (s - 1) mod RING_SIZE must hold sequence s.
  ACK_ADDR >= 0: writes the last consumed sequence there (uint32, high word first) after a scan.
Prints READY, then "SCAN <monotonic_ns>" per scan, "REC <seq> <part_id> <verdict> <recipe>" per
record consumed, "LOST <seq>" per sequence it could not read. Stops when stdin closes.
"""

import sys
import threading
import time

from pyModbusTCP.client import ModbusClient

port, mode, base, ring_size, scan_ms, ack_addr = sys.argv[1:7]
BASE, N, SCAN_S, ACK = int(base), int(ring_size), float(scan_ms) / 1e3, int(ack_addr)
c = ModbusClient(host="127.0.0.1", port=int(port), unit_id=1, timeout=2.0, auto_open=True)


def u32(hi: int, lo: int) -> int:
    return hi << 16 | lo


def after(s: int) -> int:
    return s % 0xFFFFFFFF + 1


stop = threading.Event()


def watch_stdin() -> None:
    sys.stdin.read()  # the test closes it (or stops us by PID)
    stop.set()


threading.Thread(target=watch_stdin, daemon=True).start()


def read(addr: int, n: int) -> list[int]:
    while True:
        r = c.read_holding_registers(addr, n)
        if r is not None:
            return r


first = read(BASE, 2 if mode == "ring" else 12)
last = u32(first[0], first[1]) if mode == "ring" else u32(first[8], first[9])
print("READY", flush=True)
nxt = time.monotonic()
while not stop.is_set():
    nxt += SCAN_S
    out = [f"SCAN {time.monotonic_ns()}"]
    if mode == "ring":
        w = read(BASE, 2 + 12 * N)
        head = u32(w[0], w[1])
        if head != 0 and 0 < (head - last) % 0xFFFFFFFF < 1 << 31:  # newer, wrap-aware
            s = after(last)
            while True:
                k = (s - 1) % N
                r = w[2 + 12 * k : 2 + 12 * (k + 1)]
                if u32(r[8], r[9]) == s:
                    out.append(f"REC {s} {u32(r[0], r[1])} {r[2]} {r[10]}")
                else:
                    out.append(f"LOST {s}")
                if s == head:
                    break
                s = after(s)
            last = head
            if ACK >= 0:
                c.write_multiple_registers(ACK, [last >> 16, last & 0xFFFF])
    else:
        r = read(BASE, 12)
        s = u32(r[8], r[9])
        if s != last and s != 0:
            out.append(f"REC {s} {u32(r[0], r[1])} {r[2]} {r[10]}")
            last = s
            if ACK >= 0:
                c.write_multiple_registers(ACK, [last >> 16, last & 0xFFFF])
    print("\n".join(out), flush=True)
    time.sleep(max(0.0, nxt - time.monotonic()))
    if nxt < time.monotonic() - SCAN_S:
        nxt = time.monotonic()  # starved: do not fire a burst of catch-up scans

"""`edge plc test|watch|map`: check a line's PLC link from a shell, without the daemon.

`test` writes test records and reads them back (round-trip latency); `watch` shows the records,
heartbeat and alarms live; `map` prints the addresses the config resolves to. With no config and
no target they run against the embedded Modbus simulator, so a newcomer sees them work at once.

A test record is a FAIL-SAFE REJECT with reason 65535 ("test") for part id 0: if a PLC acts on it,
it rejects a part, never passes one. Do not run `test` while the daemon writes to the same PLC:
both would advance the same sequence strobe.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from pathlib import Path
from typing import Annotated, Any, Protocol

import typer
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.live import Live
from rich.table import Table
from ruamel.yaml import YAML, YAMLError

from plc.config import ModbusSettings, OpcUaSettings, PlcSettings, S7Settings
from plc.factory import create_link, simulated_settings
from plc.layout import RECORD_BYTES, RECORD_WORDS, DecodedRecord
from plc.record import Alarm, DecisionRecord, Verdict, WriteOutcome
from plc.sim import ModbusPlcSimulator

app = typer.Typer(help="Check the PLC link: write/read-back test records, watch the live record.",
                  no_args_is_help=True)
console = Console()

TEST_REASON = 0xFFFF

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", help="Line config YAML (its `plc:` and `cameras:` sections are used).")]
ModbusOpt = Annotated[str | None, typer.Option(
    "--modbus", help="HOST:PORT of a Modbus TCP PLC (default map; overrides the config's plc).")]
S7Opt = Annotated[str | None, typer.Option(
    "--s7", help="HOST[:PORT] of an S7 PLC (rack 0, slot 1, DB100; overrides the config's plc).")]
OpcUaOpt = Annotated[str | None, typer.Option(
    "--opcua", help="opc.tcp:// endpoint of an OPC UA PLC (overrides the config's plc).")]


class _Readable(Protocol):
    """What every backend offers besides PlcLink (used only by these tools)."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def wait_connected(self, timeout_s: float) -> bool: ...
    async def write_decision(self, record: DecisionRecord, deadline_ns: int) -> Any: ...
    async def read_record(self, camera_index: int, deadline_ns: int) -> DecodedRecord | None: ...
    async def read_status(self, deadline_ns: int) -> tuple[int, Alarm] | None: ...
    def health(self) -> Any: ...


def _fail(msg: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code)


def _host_port(value: str, default_port: int, flag: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":") if ":" in value else (value, "", "")
    try:
        return host or "127.0.0.1", int(port) if port else default_port
    except ValueError as exc:
        raise _fail(f"{flag} {value!r}: expected HOST:PORT") from exc


def load_target(config: Path | None, modbus: str | None, s7: str | None, opcua: str | None,
                cameras: int | None) -> tuple[PlcSettings, int]:
    """PLC settings and the number of camera slots, from a config file and/or a target flag."""
    doc: dict[str, Any] = {}
    if config is not None:
        try:
            loaded = YAML(typ="safe").load(config.read_text())
        except (OSError, YAMLError) as exc:
            raise _fail(f"cannot read {config}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise _fail(f"{config} is not a YAML mapping")
        doc = loaded
    settings: PlcSettings
    if sum(x is not None for x in (modbus, s7, opcua)) > 1:
        raise _fail("give at most one of --modbus, --s7, --opcua")
    if modbus is not None:
        host, port = _host_port(modbus, 502, "--modbus")
        settings = ModbusSettings(host=host, port=port)
    elif s7 is not None:
        host, port = _host_port(s7, 102, "--s7")
        settings = S7Settings(host=host, port=port)
    elif opcua is not None:
        try:
            settings = OpcUaSettings(endpoint=opcua)
        except ValidationError as exc:
            raise _fail(f"--opcua {opcua!r}: {exc.errors()[0]['msg']}") from exc
    elif "plc" in doc:
        try:
            settings = TypeAdapter(PlcSettings).validate_python(doc["plc"])
        except ValidationError as exc:
            lines = [f"  plc.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
            raise _fail(f"{config}: invalid plc section:\n" + "\n".join(lines)) from exc
    else:
        settings = ModbusSettings(port=0, simulator=True)
    if cameras is None:
        cams = doc.get("cameras") or []
        slots = [c.get("plc_slot", i) for i, c in enumerate(cams) if isinstance(c, dict)]
        cameras = max((int(s) for s in slots), default=0) + 1
    return settings, max(1, cameras)


@contextlib.asynccontextmanager
async def _open(settings: PlcSettings, slots: int, timeout_s: float) -> Any:
    sim: ModbusPlcSimulator | None = None
    if isinstance(settings, ModbusSettings) and settings.simulator:
        sim = ModbusPlcSimulator(settings, slots)
        port = await asyncio.to_thread(sim.start)
        console.print(f"[dim]embedded Modbus PLC simulator on 127.0.0.1:{port}[/dim]")
        settings = simulated_settings(settings, port)
    link: _Readable = create_link(settings, slots)  # type: ignore[assignment]
    await link.start()
    try:
        if not await link.wait_connected(timeout_s):
            raise _fail(f"cannot reach the PLC: {link.health().last_error}", 3)
        yield link
    finally:
        await link.close()
        if sim is not None:
            await asyncio.to_thread(sim.stop)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


@app.command("test")
def test_command(
    config: ConfigOpt = None, modbus: ModbusOpt = None, s7: S7Opt = None, opcua: OpcUaOpt = None,
    camera: Annotated[int, typer.Option("--camera", help="Camera slot to write.")] = 0,
    count: Annotated[int, typer.Option(min=1, max=100_000, help="Test records to write.")] = 20,
    budget_ms: Annotated[float, typer.Option(help="Deadline of each write, ms.")] = 100.0,
    connect_s: Annotated[float, typer.Option(help="How long to wait for the connection.")] = 5.0,
) -> None:
    """Write test records (FAIL-SAFE REJECT, reason 65535), read each back, print round trips."""
    settings, slots = load_target(config, modbus, s7, opcua, None)
    if not 0 <= camera < slots:
        slots = camera + 1
    raise typer.Exit(asyncio.run(_test(settings, slots, camera, count, budget_ms, connect_s)))


async def _test(settings: PlcSettings, slots: int, camera: int, count: int, budget_ms: float,
                connect_s: float) -> int:
    budget_ns = int(budget_ms * 1e6)
    async with _open(settings, slots, connect_s) as link:
        before = await link.read_record(camera, time.monotonic_ns() + budget_ns)
        seq = (before.sequence if before else 0) % 0xFFFF_FFFF
        write_ms: list[float] = []
        both_ms: list[float] = []
        failures: list[str] = []
        for i in range(count):
            seq = seq % 0xFFFF_FFFF + 1
            rec = DecisionRecord(camera, seq, 0, Verdict.FAILSAFE_REJECT, 0, 0, i % 65536, 0,
                                 TEST_REASON)
            t0 = time.monotonic_ns()
            r = await link.write_decision(rec, t0 + budget_ns)
            if r.outcome is not WriteOutcome.ACKED:
                failures.append(f"#{i + 1} seq {seq}: {r.outcome.value} {r.detail}")
                continue
            write_ms.append((r.acked_ns - t0) / 1e6)
            back = await link.read_record(camera, time.monotonic_ns() + budget_ns)
            both_ms.append((time.monotonic_ns() - t0) / 1e6)
            if back is None or (back.sequence, back.verdict, back.reason, back.latency_ms) != (
                seq, int(Verdict.FAILSAFE_REJECT), TEST_REASON, i % 65536
            ):
                failures.append(f"#{i + 1} seq {seq}: read back {back}")
        t = Table(title=f"edge plc test: {link.health().backend} {link.health().target}, "
                        f"camera slot {camera}, {count} record(s)")
        for col in ("", "n", "p50 ms", "p99 ms", "max ms"):
            t.add_column(col, justify="right")
        for name, vals in (("write (acked)", write_ms), ("write + read-back", both_ms)):
            if vals:
                t.add_row(name, str(len(vals)), f"{statistics.median(vals):.3f}",
                          f"{_pct(vals, 0.99):.3f}", f"{max(vals):.3f}")
        console.print(t)
        for f in failures[:20]:
            console.print(f"[red]{f}[/red]")
        if failures:
            console.print(f"[red]FAILED: {len(failures)} of {count}[/red]")
            return 1
        console.print(f"[green]OK[/green]: {count} record(s) written and read back "
                      f"(last sequence {seq})")
        return 0


@app.command("watch")
def watch_command(
    config: ConfigOpt = None, modbus: ModbusOpt = None, s7: S7Opt = None, opcua: OpcUaOpt = None,
    cameras: Annotated[int | None, typer.Option(help="Camera slots to show (default: config).")]
    = None,
    interval: Annotated[float, typer.Option(min=0.05, help="Poll period, s.")] = 0.25,
    duration: Annotated[float | None, typer.Option(help="Stop after this many s.")] = None,
    stale_s: Annotated[float, typer.Option(help="Heartbeat older than this shows STALE.")] = 2.0,
) -> None:
    """Live view of each camera's record, the heartbeat and the alarm bits (Ctrl-C to stop)."""
    settings, slots = load_target(config, modbus, s7, opcua, cameras)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_watch(settings, slots, interval, duration, stale_s))


async def _watch(settings: PlcSettings, slots: int, interval: float, duration: float | None,
                 stale_s: float) -> None:
    end = None if duration is None else time.monotonic() + duration
    last_hb: tuple[int, float] | None = None
    seen: dict[int, tuple[int, float, float]] = {}  # slot -> (seq, t, rate)
    async with _open(settings, slots, 5.0) as link:
        with Live(console=console, refresh_per_second=8) as live:
            while end is None or time.monotonic() < end:
                dl = time.monotonic_ns() + int(interval * 1e9)
                status = await link.read_status(dl)
                now = time.monotonic()
                h = link.health()
                up = "[green]up[/green]" if h.connected else "[red]down[/red]"
                t = Table(title=f"{h.backend} {h.target}  {up}")
                for col in ("slot", "sequence", "rec/s", "part id", "verdict", "class", "score‰",
                            "latency ms", "model", "reason"):
                    t.add_column(col, justify="right")
                for cam in range(slots):
                    r = await link.read_record(cam, time.monotonic_ns() + int(interval * 1e9))
                    if r is None:
                        t.add_row(str(cam), "[red]read failed[/red]", *[""] * 8)
                        continue
                    prev = seen.get(cam)
                    rate = prev[2] if prev else 0.0
                    if prev and r.sequence != prev[0] and now > prev[1]:
                        rate = ((r.sequence - prev[0]) % 2**32) / (now - prev[1])
                    if not prev or r.sequence != prev[0]:
                        seen[cam] = (r.sequence, now, rate)
                    verdict = {0: "-", 1: "OK", 2: "[yellow]DEFECT", 3: "[red]FAIL-SAFE"}.get(
                        r.verdict, f"? {r.verdict}")
                    t.add_row(str(cam), str(r.sequence), f"{rate:.1f}", str(r.part_id), verdict,
                              str(r.defect_class), str(r.score_permille), str(r.latency_ms),
                              str(r.model_id), str(r.reason))
                if status is None:
                    t.caption = "[red]heartbeat/alarms: read failed[/red]"
                else:
                    hb, alarms = status
                    if last_hb is None or hb != last_hb[0]:
                        last_hb = (hb, now)
                    age = now - last_hb[1]
                    hb_txt = f"heartbeat {hb}" + (f" [red]STALE {age:.1f}s[/red]"
                                                  if age > stale_s else "")
                    names = [a.name for a in Alarm if a in alarms and a.name] or ["none"]
                    t.caption = f"{hb_txt}   alarms: {', '.join(names)}"
                live.update(t)
                await asyncio.sleep(interval)


@app.command("map")
def map_command(
    config: ConfigOpt = None, modbus: ModbusOpt = None, s7: S7Opt = None, opcua: OpcUaOpt = None,
    cameras: Annotated[int | None, typer.Option(help="Camera slots (default: config).")] = None,
) -> None:
    """Print the addresses this config writes (see docs/plc-register-map.md)."""
    settings, slots = load_target(config, modbus, s7, opcua, cameras)
    t = Table(title=f"PLC map ({settings.type}, {slots} camera slot(s))")
    for col in ("what", "where", "size"):
        t.add_column(col)
    if isinstance(settings, ModbusSettings):
        from plc.modbus import ModbusMap

        try:
            m = ModbusMap(settings, slots)
        except ValueError as exc:
            raise _fail(str(exc)) from exc
        t.add_row("heartbeat (uint16)", f"holding register {settings.heartbeat_register}", "1")
        t.add_row("alarms (uint16 bits)", f"holding register {settings.alarm_register}", "1")
        for i in range(slots):
            a = m.record_address(i)
            t.add_row(f"camera {i} record (seq at +8..9)", f"holding registers {a}..{a + 9}",
                      str(RECORD_WORDS))
            p = m.part_id_address(i)
            t.add_row(f"camera {i} PLC part id (uint32)", f"holding registers {p}..{p + 1}", "2")
        t.caption = f"word order {settings.word_order}, byte order {settings.byte_order}, " \
                    f"unit {settings.device_id}"
    elif isinstance(settings, S7Settings):
        from plc.s7 import S7Map

        try:
            s = S7Map(settings, slots)
        except ValueError as exc:
            raise _fail(str(exc)) from exc
        db = f"DB{settings.db_number}"
        t.add_row("heartbeat WORD, alarms WORD", f"{db}.DBW{settings.status_offset}, "
                  f"{db}.DBW{settings.status_offset + 2}", "4")
        for i in range(slots):
            o = s.record_offset(i)
            t.add_row(f"camera {i} record (seq DWORD at +16)", f"{db}.DBB{o}..{o + 19}",
                      str(RECORD_BYTES))
            t.add_row(f"camera {i} PLC part id DWORD", f"{db}.DBD{s.part_id_offset(i)}", "4")
        t.caption = f"DB needs >= {s.size} bytes, optimized access OFF, PUT/GET allowed"
    else:
        from plc.opcua import PLC_PART_ID, RECORD_FIELDS

        pre = settings.node_prefix
        t.add_row("heartbeat, alarms (UInt16)",
                  f"ns=<{settings.namespace_uri}>;s={pre}.Heartbeat, {pre}.Alarms", "2")
        fields = ", ".join(f for f, _ in RECORD_FIELDS)
        for i in range(slots):
            t.add_row(f"camera {i} record", f"s={pre}.Camera{i}.{{{fields}}}",
                      str(len(RECORD_FIELDS)))
            t.add_row(f"camera {i} PLC part id (UInt32)", f"s={pre}.Camera{i}.{PLC_PART_ID}", "1")
    console.print(t)

"""`edge plc test|watch|map`: check a line's PLC link from a shell, without the daemon.

`test` writes test records (record v2) and reads them back (round-trip latency); `watch` shows
live what both sides write: trigger counters, PLC part ids, the recipe and acknowledgements, the
records (and in ring mode the head and newest slots), heartbeat and alarms; `map` prints every
address the config resolves to. With no config and
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
from plc.layout import (
    RECIPE_BYTE,
    RECIPE_WORD,
    RECORD_BYTES,
    RECORD_WORDS,
    RING_HEAD_BYTES,
    RING_HEAD_WORDS,
    SEQUENCE_BYTE,
    SEQUENCE_WORD,
    DecodedRecord,
    ring_block_bytes,
    ring_block_words,
)
from plc.linkbase import RingView
from plc.record import Alarm, DecisionRecord, PlcInputs, Verdict, WriteOutcome, next_sequence
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
    async def read_sequences(self, deadline_ns: int) -> list[int] | None: ...
    async def read_ring(self, camera_index: int, deadline_ns: int) -> RingView | None: ...
    async def read_inputs(self, deadline_ns: int, *, triggers: bool = True,
                          recipe: bool = False, acks: bool = False) -> PlcInputs | None: ...
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
    recipe: Annotated[int, typer.Option(min=0, max=65535, help="Recipe field of the records.")]
    = 0,
    budget_ms: Annotated[float, typer.Option(help="Deadline of each write, ms.")] = 100.0,
    connect_s: Annotated[float, typer.Option(help="How long to wait for the connection.")] = 5.0,
) -> None:
    """Write test records (FAIL-SAFE REJECT, reason 65535), read each back, print round trips."""
    settings, slots = load_target(config, modbus, s7, opcua, None)
    if not 0 <= camera < slots:
        slots = camera + 1
    raise typer.Exit(asyncio.run(_test(settings, slots, camera, count, budget_ms, connect_s,
                                       recipe)))


async def _test(settings: PlcSettings, slots: int, camera: int, count: int, budget_ms: float,
                connect_s: float, recipe: int = 0) -> int:
    budget_ns = int(budget_ms * 1e6)
    async with _open(settings, slots, connect_s) as link:
        held = await link.read_sequences(time.monotonic_ns() + budget_ns)
        seq = held[camera] if held else 0  # continue from what the PLC holds, like the daemon
        write_ms: list[float] = []
        both_ms: list[float] = []
        failures: list[str] = []
        for i in range(count):
            seq = next_sequence(seq)
            rec = DecisionRecord(camera, seq, 0, Verdict.FAILSAFE_REJECT, 0, 0, i % 65536, 0,
                                 TEST_REASON, recipe)
            t0 = time.monotonic_ns()
            r = await link.write_decision(rec, t0 + budget_ns)
            if r.outcome is not WriteOutcome.ACKED:
                failures.append(f"#{i + 1} seq {seq}: {r.outcome.value} {r.detail}")
                continue
            write_ms.append((r.acked_ns - t0) / 1e6)
            back = await link.read_record(camera, time.monotonic_ns() + budget_ns)
            both_ms.append((time.monotonic_ns() - t0) / 1e6)
            if back is None or (back.sequence, back.verdict, back.reason, back.latency_ms,
                                back.recipe) != (
                seq, int(Verdict.FAILSAFE_REJECT), TEST_REASON, i % 65536, recipe
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
    """Live view of both directions: trigger counters, PLC part ids, recipe and acks (PLC ->
    appliance); each camera's record, ring, heartbeat and alarms (appliance -> PLC)."""
    settings, slots = load_target(config, modbus, s7, opcua, cameras)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_watch(settings, slots, interval, duration, stale_s))


_VERDICTS = {0: "-", 1: "OK", 2: "[yellow]DEFECT", 3: "[red]FAIL-SAFE"}


def _ring_cell(view: RingView | None) -> str:
    """`head 42 @slot 1: 42 41 40` (the newest three the ring holds, newest first)."""
    if view is None:
        return "[red]read failed[/red]"
    if view.head == 0:
        return "empty"
    n = len(view.records)
    k = (view.head - 1) % n
    seqs = [view.records[(k - j) % n].sequence for j in range(min(3, n))]
    return f"head {view.head} @slot {k}: " + " ".join(map(str, seqs))


async def _watch(settings: PlcSettings, slots: int, interval: float, duration: float | None,
                 stale_s: float) -> None:
    end = None if duration is None else time.monotonic() + duration
    last_hb: tuple[int, float] | None = None
    seen: dict[int, tuple[int, float, float]] = {}  # slot -> (seq, t, rate)
    ring = settings.results.mode == "ring"
    async with _open(settings, slots, 5.0) as link:
        with Live(console=console, refresh_per_second=8) as live:
            while end is None or time.monotonic() < end:
                budget = int(interval * 1e9)
                status = await link.read_status(time.monotonic_ns() + budget)
                inputs = await link.read_inputs(time.monotonic_ns() + budget, recipe=True,
                                                acks=True)
                now = time.monotonic()
                h = link.health()
                up = "[green]up[/green]" if h.connected else "[red]down[/red]"
                t = Table(title=f"{h.backend} {h.target}  {up}  results: {settings.results.mode}"
                                + (" acknowledged" if settings.results.acknowledged else ""))
                cols = ["slot", "trigger", "PLC part id", "ack", "sequence", "rec/s", "part id",
                        "verdict", "class", "score‰", "latency ms", "model", "recipe", "reason"]
                if ring:
                    cols.append("ring (newest first)")
                for col in cols:
                    t.add_column(col, justify="right")
                for cam in range(slots):
                    if inputs is not None and inputs.trigger_counts and inputs.part_ids:
                        trig, pid = str(inputs.trigger_counts[cam]), str(inputs.part_ids[cam])
                    else:
                        trig = pid = "[red]?[/red]"
                    ack = str(inputs.acked_sequences[cam]) if inputs is not None and \
                        inputs.acked_sequences else "[red]?[/red]"
                    view = await link.read_ring(cam, time.monotonic_ns() + budget) if ring \
                        else None
                    r = view.newest() if view is not None else None
                    if not ring:
                        r = await link.read_record(cam, time.monotonic_ns() + budget)
                    extra = [_ring_cell(view)] if ring else []
                    if r is None:
                        what = "empty" if ring and view is not None else "[red]read failed[/red]"
                        t.add_row(str(cam), trig, pid, ack, what, *[""] * 9, *extra)
                        continue
                    prev = seen.get(cam)
                    rate = prev[2] if prev else 0.0
                    if prev and r.sequence != prev[0] and now > prev[1]:
                        rate = ((r.sequence - prev[0]) % 2**32) / (now - prev[1])
                    if not prev or r.sequence != prev[0]:
                        seen[cam] = (r.sequence, now, rate)
                    verdict = _VERDICTS.get(r.verdict, f"? {r.verdict}")
                    t.add_row(str(cam), trig, pid, ack, str(r.sequence), f"{rate:.1f}",
                              str(r.part_id), verdict, str(r.defect_class), str(r.score_permille),
                              str(r.latency_ms), str(r.model_id), str(r.recipe), str(r.reason),
                              *extra)
                recipe = "?" if inputs is None else str(inputs.recipe)
                if status is None:
                    t.caption = f"[red]heartbeat/alarms: read failed[/red]   recipe {recipe}"
                else:
                    hb, alarms = status
                    if last_hb is None or hb != last_hb[0]:
                        last_hb = (hb, now)
                    age = now - last_hb[1]
                    hb_txt = f"heartbeat {hb}" + (f" [red]STALE {age:.1f}s[/red]"
                                                  if age > stale_s else "")
                    names = [a.name for a in Alarm if a in alarms and a.name] or ["none"]
                    t.caption = f"{hb_txt}   alarms: {', '.join(names)}   recipe {recipe}"
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
    ring = settings.results.mode == "ring"
    n_ring = settings.results.ring_size
    if isinstance(settings, ModbusSettings):
        from plc.modbus import ModbusMap

        try:
            m = ModbusMap(settings, slots)
        except ValueError as exc:
            raise _fail(str(exc)) from exc
        t.add_row("heartbeat (uint16) ->PLC", f"holding register {settings.heartbeat_register}",
                  "1")
        t.add_row("alarms (uint16 bits) ->PLC", f"holding register {settings.alarm_register}",
                  "1")
        t.add_row("recipe (uint16) <-PLC", f"holding register {m.recipe_address}", "1")
        for i in range(slots):
            a = m.record_address(i)
            if ring:
                t.add_row(f"camera {i} ring head (uint32) ->PLC",
                          f"holding registers {a}..{a + 1}", str(RING_HEAD_WORDS))
                s0 = m.ring_slot_address(i, 0)
                t.add_row(f"camera {i} ring: {n_ring} records, slot k at {s0} + 12k ->PLC",
                          f"holding registers {s0}..{a + ring_block_words(n_ring) - 1}",
                          str(n_ring * RECORD_WORDS))
            else:
                q = a + SEQUENCE_WORD
                t.add_row(f"camera {i} record (sequence {q}..{q + 1}, recipe "
                          f"{a + RECIPE_WORD}) ->PLC",
                          f"holding registers {a}..{a + RECORD_WORDS - 1}", str(RECORD_WORDS))
            p = m.part_id_address(i)
            t.add_row(f"camera {i} part id (uint32) <-PLC", f"holding registers {p}..{p + 1}",
                      "2")
            t.add_row(f"camera {i} trigger counter (uint16) <-PLC",
                      f"holding register {m.trigger_address(i)}", "1")
            k = m.ack_address(i)
            t.add_row(f"camera {i} ack sequence (uint32) <-PLC", f"holding registers {k}..{k + 1}",
                      "2")
        t.caption = f"word order {settings.word_order}, byte order {settings.byte_order}, " \
                    f"unit {settings.device_id}; ->PLC written by the appliance, <-PLC by the PLC"
    elif isinstance(settings, S7Settings):
        from plc.s7 import S7Map

        try:
            s = S7Map(settings, slots)
        except ValueError as exc:
            raise _fail(str(exc)) from exc
        db = f"DB{settings.db_number}"
        t.add_row("heartbeat WORD, alarms WORD ->PLC", f"{db}.DBW{settings.status_offset}, "
                  f"{db}.DBW{settings.status_offset + 2}", "4")
        t.add_row("recipe WORD <-PLC", f"{db}.DBW{settings.recipe_offset}", "2")
        for i in range(slots):
            o = s.record_offset(i)
            if ring:
                t.add_row(f"camera {i} ring head DWORD ->PLC", f"{db}.DBD{o}", str(RING_HEAD_BYTES))
                s0 = s.ring_slot_offset(i, 0)
                t.add_row(f"camera {i} ring: {n_ring} records, slot k at +4 + 24k ->PLC",
                          f"{db}.DBB{s0}..{o + ring_block_bytes(n_ring) - 1}",
                          str(n_ring * RECORD_BYTES))
            else:
                t.add_row(f"camera {i} record (sequence {db}.DBD{o + SEQUENCE_BYTE}, recipe "
                          f"{db}.DBW{o + RECIPE_BYTE}) ->PLC",
                          f"{db}.DBB{o}..{o + RECORD_BYTES - 1}", str(RECORD_BYTES))
            t.add_row(f"camera {i} part id DWORD <-PLC", f"{db}.DBD{s.part_id_offset(i)}", "4")
            t.add_row(f"camera {i} trigger counter WORD <-PLC", f"{db}.DBW{s.trigger_offset(i)}",
                      "2")
            t.add_row(f"camera {i} ack sequence DWORD <-PLC", f"{db}.DBD{s.ack_offset(i)}", "4")
        t.caption = f"DB needs >= {s.size} bytes, optimized access OFF, PUT/GET allowed"
    else:
        from plc.opcua import (
            ACK_SEQUENCE,
            PLC_PART_ID,
            RECIPE,
            RECORD_FIELDS,
            RING_HEAD,
            TRIGGER_COUNT,
        )

        pre = settings.node_prefix
        t.add_row("heartbeat, alarms (UInt16) ->PLC",
                  f"ns=<{settings.namespace_uri}>;s={pre}.Heartbeat, {pre}.Alarms", "2")
        t.add_row("recipe (UInt16) <-PLC", f"s={pre}.{RECIPE}", "1")
        fields = ", ".join(f for f, _ in RECORD_FIELDS)
        for i in range(slots):
            if ring:
                t.add_row(f"camera {i} ring head (UInt32) ->PLC", f"s={pre}.Camera{i}.{RING_HEAD}",
                          "1")
                t.add_row(f"camera {i} ring: {n_ring} records ->PLC",
                          f"s={pre}.Camera{i}.Ring<k>.{{{fields}}}",
                          str(n_ring * len(RECORD_FIELDS)))
            else:
                t.add_row(f"camera {i} record ->PLC", f"s={pre}.Camera{i}.{{{fields}}}",
                          str(len(RECORD_FIELDS)))
            for what, node, typ in ((PLC_PART_ID, "part id", "UInt32"),
                                    (TRIGGER_COUNT, "trigger counter", "UInt16"),
                                    (ACK_SEQUENCE, "ack sequence", "UInt32")):
                t.add_row(f"camera {i} {node} ({typ}) <-PLC", f"s={pre}.Camera{i}.{what}", "1")
    if settings.results.acknowledged:
        t.title = f"{t.title}, acknowledged"
    if ring:
        t.title = f"{t.title}, ring of {n_ring} (plc_scan_ms {settings.results.plc_scan_ms:g})"
    console.print(t)

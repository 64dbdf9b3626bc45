"""Typed PLC settings, one discriminated union so a line's YAML picks its protocol with `type:`.

Timeouts and backoffs are in milliseconds because the whole budget is 348 ms: the library
defaults (pymodbus: 3 s timeout, 3 retries, 300 s reconnect ceiling) are two orders of magnitude
too slow, so every knob that matters for the deadline is explicit here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from plc.layout import (
    RECORD_BYTES,
    RECORD_WORDS,
    ring_block_bytes,
    ring_block_words,
    round_up,
)

ByteOrder = Literal["big", "little"]


class _LinkTiming(BaseModel):
    """Connection timing shared by every backend."""

    model_config = ConfigDict(extra="forbid")

    connect_timeout_ms: int = Field(default=500, ge=10, le=30_000)
    reconnect_backoff_min_ms: int = Field(default=50, ge=1, le=60_000)
    reconnect_backoff_max_ms: int = Field(
        default=250,
        ge=1,
        le=60_000,
        description="Ceiling of the reconnect backoff. Keep it below 1 s: writes resume at most "
        "this long after the PLC comes back.",
    )
    min_request_ms: float = Field(
        default=1.0,
        ge=0.0,
        le=1000.0,
        description="A request with less budget than this (or than the measured round trip, "
        "whichever is larger) is not sent: it is reported DROPPED_LATE.",
    )
    readback_timeout_ms: float = Field(
        default=50.0,
        ge=1.0,
        le=5000.0,
        description="Budget of the read that settles an outcome-unknown write (and of the probe "
        "that proves a reconnected PLC answers). Its own budget, not the waiting write's: a "
        "read-back answered in < 1 ms used to time out on a write's last milliseconds.",
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> _LinkTiming:
        if self.reconnect_backoff_min_ms > self.reconnect_backoff_max_ms:
            raise ValueError(
                "reconnect_backoff_min_ms must be <= reconnect_backoff_max_ms "
                f"(got {self.reconnect_backoff_min_ms} > {self.reconnect_backoff_max_ms})"
            )
        return self


class ResultsSettings(BaseModel):
    """How records reach the PLC (shared by Modbus, S7 and OPC UA; see the map page).

    slot: one record per camera, overwritten by the next (simple; the PLC must scan faster than
    records arrive). ring: per camera a head + `ring_size` slots, so a burst (EDF catch-up after an
    outage) is not overwritten before the PLC's next scan. acknowledged: the PLC writes back the
    last sequence it consumed; the daemon counts what is outstanding (metric + alarm bit) and, in
    ring mode, never overwrites a slot the PLC has not acknowledged.
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["slot", "ring"] = "slot"
    ring_size: int = Field(default=8, ge=2, le=64, description="Records per camera ring")
    acknowledged: bool = False
    plc_scan_ms: float = Field(
        default=20.0,
        ge=1.0,
        le=10_000.0,
        description="Ring mode: the longest time between two scans of the ring by the PLC "
        "program. A slot is overwritten only this long after it was written (or, acknowledged, "
        "once the PLC acknowledged it), so a burst waits instead of overwriting unread records.",
    )


class SimProgramSettings(BaseModel):
    """A PLC program the embedded simulator plays (demo, tests): it triggers parts, switches
    recipes, scans the results like a PLC task and counts what it got. Off unless given."""

    model_config = ConfigDict(extra="forbid")

    trigger_rate_hz: float = Field(
        default=10.0, ge=0.0, le=1000.0, description="Parts per second per slot; 0 = none"
    )
    slots: list[int] | None = Field(
        default=None, description="Camera slots that get triggers (default: all)"
    )
    part_id_start: int = Field(default=1, ge=0, le=0xFFFF_FFFF)
    max_parts: int | None = Field(
        default=None, ge=0, description="Stop triggering a slot after this many parts"
    )
    recipes: list[Annotated[int, Field(ge=0, le=0xFFFF)]] = Field(
        default_factory=list,
        description="Recipe numbers to cycle through; empty = the recipe register is left alone",
    )
    recipe_switch_every_parts: int = Field(
        default=0, ge=0, description="Switch to the next recipe after this many parts (0 = never)"
    )
    scan_ms: float = Field(
        default=10.0, ge=1.0, le=10_000.0, description="Period of the PLC task reading results"
    )
    acknowledge: bool = Field(
        default=False, description="Write the last consumed sequence back (acknowledged mode)"
    )
    answer_timeout_ms: float = Field(
        default=350.0,
        ge=1.0,
        description="A part with no record this long after its trigger counts as unanswered "
        "(the per-part watchdog of the documented PLC program)",
    )


class ModbusSettings(_LinkTiming):
    """Modbus TCP PLC. Addresses are 0-based holding-register (4x) addresses as sent on the wire.

    See docs/plc-register-map.md for the layout a PLC programmer implements.
    """

    type: Literal["modbus"] = "modbus"
    host: str = "127.0.0.1"
    port: int = Field(
        default=502, ge=0, le=65535, description="0 only with simulator: pick a free port"
    )
    device_id: int = Field(default=1, ge=0, le=255, description="Modbus unit / device id")
    record_base: int = Field(
        default=1000, ge=0, le=65535, description="Address of camera 0's record"
    )
    record_stride: int = Field(
        default=16,
        ge=RECORD_WORDS,
        le=4096,
        description="Registers between consecutive cameras' records (ring mode: between their "
        "rings; unset, it defaults to 16 for slots and to the ring size rounded up to 16)",
    )
    heartbeat_register: int = Field(default=100, ge=0, le=65535)
    alarm_register: int = Field(default=101, ge=0, le=65535)
    part_id_base: int = Field(
        default=200,
        ge=0,
        le=65535,
        description="Address of the PLC-announced part id (uint32) of camera 0",
    )
    part_id_stride: int = Field(default=2, ge=2, le=1024)
    trigger_base: int = Field(
        default=300,
        ge=0,
        le=65535,
        description="Address of camera 0's trigger counter (uint16, incremented by the PLC "
        "after it wrote the part id)",
    )
    trigger_stride: int = Field(default=1, ge=1, le=1024)
    recipe_register: int = Field(
        default=299,
        ge=0,
        le=65535,
        description="Recipe number selected by the PLC (uint16). Default 299: inside the "
        "part-id/trigger block, so one read takes recipe, part ids and trigger counters together",
    )
    ack_base: int = Field(
        default=400,
        ge=0,
        le=65535,
        description="Acknowledged mode: last sequence the PLC consumed, camera 0 (uint32)",
    )
    ack_stride: int = Field(default=2, ge=2, le=1024)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    word_order: ByteOrder = Field(
        default="big", description="Order of the two registers of a uint32: big = high word first"
    )
    byte_order: ByteOrder = Field(
        default="big",
        description="Byte order inside each register: big = Modbus standard (high first)",
    )
    simulator: bool = Field(
        default=False,
        description="Start the embedded Modbus PLC simulator on 127.0.0.1 and write to it "
        "(the demo). host is then ignored.",
    )
    sim_program: SimProgramSettings | None = Field(
        default=None,
        description="With simulator: true, the PLC program the simulator plays (triggers, "
        "recipes, result scans). Off by default.",
    )

    @model_validator(mode="after")
    def _check(self) -> ModbusSettings:
        if self.port == 0 and not self.simulator:
            raise ValueError(
                "port 0 is only allowed with simulator: true (it means 'pick a free port')"
            )
        if self.heartbeat_register == self.alarm_register:
            raise ValueError("heartbeat_register and alarm_register must differ")
        if self.sim_program is not None and not self.simulator:
            raise ValueError("sim_program needs simulator: true (it is played by the simulator)")
        if self.results.mode == "ring":
            block = ring_block_words(self.results.ring_size)
            if "record_stride" not in self.model_fields_set:
                self.record_stride = round_up(block, 16)
            elif self.record_stride < block:
                raise ValueError(
                    f"record_stride {self.record_stride} is too small for results.mode ring with "
                    f"ring_size {self.results.ring_size}: each camera's ring takes {block} "
                    f"registers (head 2 + {self.results.ring_size} x {RECORD_WORDS})"
                )
        return self


class S7Settings(_LinkTiming):
    """Siemens S7 PLC (S7-300/400/1200/1500 via PUT/GET). Offsets are bytes inside the DB.

    On S7-1200/1500 the DB must be a global DB with "optimized block access" OFF and PUT/GET
    allowed in the CPU's protection settings.
    """

    type: Literal["s7"] = "s7"
    host: str = "127.0.0.1"
    port: int = Field(default=102, ge=1, le=65535)
    rack: int = Field(default=0, ge=0, le=7)
    slot: int = Field(default=1, ge=0, le=31, description="1 for S7-1200/1500, 2 for S7-300")
    db_number: int = Field(default=100, ge=1, le=65535)
    record_offset: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Byte offset of camera 0's record in the DB (ring mode, unset: 1024)",
    )
    record_stride: int = Field(
        default=32,
        ge=RECORD_BYTES,
        le=16384,
        description="Bytes between records (ring mode, unset: the ring rounded up to 32)",
    )
    status_offset: int = Field(
        default=512,
        ge=0,
        le=65535,
        description="Byte offset of the heartbeat WORD; the alarm WORD follows at +2",
    )
    part_id_offset: int = Field(
        default=520,
        ge=0,
        le=65535,
        description="Byte offset of camera 0's PLC-announced part id (DWORD)",
    )
    part_id_stride: int = Field(default=4, ge=4, le=4096)
    trigger_offset: int = Field(
        default=584,
        ge=0,
        le=65535,
        description="Byte offset of camera 0's trigger counter (WORD); default right after 16 "
        "part ids, so one read takes part ids, trigger counters and the recipe",
    )
    trigger_stride: int = Field(default=2, ge=2, le=4096)
    recipe_offset: int = Field(
        default=616, ge=0, le=65535, description="Byte offset of the recipe number (WORD)"
    )
    ack_offset: int = Field(
        default=620,
        ge=0,
        le=65535,
        description="Acknowledged mode: camera 0's last consumed sequence (DWORD)",
    )
    ack_stride: int = Field(default=4, ge=4, le=4096)
    results: ResultsSettings = Field(default_factory=ResultsSettings)

    @model_validator(mode="after")
    def _ring(self) -> S7Settings:
        if self.results.mode == "ring":
            block = ring_block_bytes(self.results.ring_size)
            if "record_offset" not in self.model_fields_set:
                self.record_offset = 1024
            if "record_stride" not in self.model_fields_set:
                self.record_stride = round_up(block, 32)
            elif self.record_stride < block:
                raise ValueError(
                    f"record_stride {self.record_stride} is too small for results.mode ring with "
                    f"ring_size {self.results.ring_size}: each camera's ring takes {block} bytes "
                    f"(head 4 + {self.results.ring_size} x {RECORD_BYTES})"
                )
        return self


class OpcUaSettings(_LinkTiming):
    """OPC UA server on the PLC. Variables are addressed by string node ids (see the map page)."""

    type: Literal["opcua"] = "opcua"
    endpoint: str = Field(default="opc.tcp://127.0.0.1:4840", pattern=r"^opc\.tcp://")
    namespace_uri: str = Field(
        default="urn:edge-inspect:plc",
        description="Namespace holding the nodes (resolved at connect)",
    )
    node_prefix: str = Field(
        default="Inspection", description="Node ids are ns=<ns>;s=<prefix>.Camera<i>.<Field> etc."
    )
    username: str | None = None
    password: SecretStr | None = None
    connect_timeout_ms: int = Field(default=2000, ge=10, le=30_000)
    results: ResultsSettings = Field(default_factory=ResultsSettings)


PlcSettings = Annotated[ModbusSettings | S7Settings | OpcUaSettings, Field(discriminator="type")]

"""Typed PLC settings, one discriminated union so a line's YAML picks its protocol with `type:`.

Timeouts and backoffs are in milliseconds because the whole budget is 348 ms: the library
defaults (pymodbus: 3 s timeout, 3 retries, 300 s reconnect ceiling) are two orders of magnitude
too slow, so every knob that matters for the deadline is explicit here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from plc.layout import RECORD_BYTES, RECORD_WORDS

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

    @model_validator(mode="after")
    def _backoff_order(self) -> _LinkTiming:
        if self.reconnect_backoff_min_ms > self.reconnect_backoff_max_ms:
            raise ValueError(
                "reconnect_backoff_min_ms must be <= reconnect_backoff_max_ms "
                f"(got {self.reconnect_backoff_min_ms} > {self.reconnect_backoff_max_ms})"
            )
        return self


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
        le=1024,
        description="Registers between consecutive cameras' records",
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

    @model_validator(mode="after")
    def _check(self) -> ModbusSettings:
        if self.port == 0 and not self.simulator:
            raise ValueError(
                "port 0 is only allowed with simulator: true (it means 'pick a free port')"
            )
        if self.heartbeat_register == self.alarm_register:
            raise ValueError("heartbeat_register and alarm_register must differ")
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
        default=0, ge=0, description="Byte offset of camera 0's record in the DB"
    )
    record_stride: int = Field(
        default=32, ge=RECORD_BYTES, le=4096, description="Bytes between records"
    )
    status_offset: int = Field(
        default=512,
        ge=0,
        description="Byte offset of the heartbeat WORD; the alarm WORD follows at +2",
    )
    part_id_offset: int = Field(
        default=520, ge=0, description="Byte offset of camera 0's PLC-announced part id (DWORD)"
    )
    part_id_stride: int = Field(default=4, ge=4, le=4096)


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


PlcSettings = Annotated[ModbusSettings | S7Settings | OpcUaSettings, Field(discriminator="type")]

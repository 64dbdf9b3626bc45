"""Build the configured PLC link. Optional protocol libraries are imported only when selected, so
a line without OPC UA never needs asyncua installed."""

from __future__ import annotations

from plc.config import ModbusSettings, OpcUaSettings, PlcSettings, S7Settings
from plc.record import PlcLink


def create_link(settings: PlcSettings, camera_slots: int) -> PlcLink:
    """A link for `camera_slots` cameras (their records must fit the configured map).

    With ModbusSettings.simulator the caller starts plc.sim.ModbusPlcSimulator first and passes
    settings with host/port pointing at it (see `simulated_settings`).
    """
    if isinstance(settings, ModbusSettings):
        from plc.modbus import ModbusLink

        return ModbusLink(settings, camera_slots)
    if isinstance(settings, S7Settings):
        try:
            from plc.s7 import S7Link
        except ImportError as exc:
            raise RuntimeError(
                f"plc.type 's7' needs python-snap7 (pip install 'python-snap7>=3'): {exc}"
            ) from exc
        return S7Link(settings, camera_slots)
    if isinstance(settings, OpcUaSettings):
        try:
            from plc.opcua import OpcUaLink
        except ImportError as exc:
            raise RuntimeError(
                f"plc.type 'opcua' needs asyncua (pip install 'edge-inspect[opcua]'): {exc}"
            ) from exc
        return OpcUaLink(settings, camera_slots)
    raise TypeError(f"unknown PLC settings type {type(settings).__name__}")


def check_map(settings: PlcSettings, camera_slots: int) -> None:
    """Raise ValueError (naming the keys to change) when the configured map cannot hold
    `camera_slots` cameras: areas that overlap, or run past register 65535 / DB byte 65535.

    For `edge config check` and the daemon's start (exit 2, not 3). Needs no connection and, for
    OPC UA, no asyncua.
    """
    if camera_slots < 1:
        raise ValueError(f"camera_slots must be >= 1, got {camera_slots}")
    if isinstance(settings, ModbusSettings):
        from plc.modbus import ModbusMap

        ModbusMap(settings, camera_slots)
    elif isinstance(settings, S7Settings):
        from plc.s7 import S7Map

        S7Map(settings, camera_slots)


def simulated_settings(settings: ModbusSettings, port: int) -> ModbusSettings:
    """The settings a link uses to reach the embedded simulator listening on `port`."""
    return settings.model_copy(update={"host": "127.0.0.1", "port": port})

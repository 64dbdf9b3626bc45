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


def simulated_settings(settings: ModbusSettings, port: int) -> ModbusSettings:
    """The settings a link uses to reach the embedded simulator listening on `port`."""
    return settings.model_copy(update={"host": "127.0.0.1", "port": port})

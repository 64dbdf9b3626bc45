"""The documented record layout and the settings' validation (pure functions, no peers)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from plc import layout
from plc.config import ModbusSettings, OpcUaSettings, PlcSettings, S7Settings
from plc.modbus import ModbusMap
from plc.record import DecisionRecord, Verdict

REC = DecisionRecord(
    camera_index=0,
    sequence=0x01020304,
    part_id=0xA1B2C3D4,
    verdict=Verdict.DEFECT,
    defect_class=3,
    score_permille=875,
    latency_ms=42,
    model_id=7,
    reason=0,
)


def test_record_bytes_match_the_documented_table() -> None:
    b = layout.record_bytes(REC)
    assert b.hex() == (
        "a1b2c3d4"  # part_id
        "0002"
        "0003"
        "036b"
        "002a"
        "0007"
        "0000"  # verdict class score latency model reason
        "01020304"  # sequence, last
    )


@pytest.mark.parametrize(
    ("word_order", "byte_order", "first_words", "seq_words"),
    [
        ("big", "big", [0xA1B2, 0xC3D4], [0x0102, 0x0304]),
        ("little", "big", [0xC3D4, 0xA1B2], [0x0304, 0x0102]),
        ("big", "little", [0xB2A1, 0xD4C3], [0x0201, 0x0403]),
        ("little", "little", [0xD4C3, 0xB2A1], [0x0403, 0x0201]),
    ],
)
def test_word_and_byte_order(
    word_order: str, byte_order: str, first_words: list[int], seq_words: list[int]
) -> None:
    words = layout.record_words(REC, word_order=word_order, byte_order=byte_order)  # type: ignore[arg-type]
    assert len(words) == layout.RECORD_WORDS
    assert words[0:2] == first_words
    assert words[8:10] == seq_words
    verdict = words[2]
    assert verdict == (0x0200 if byte_order == "little" else 0x0002)
    back = layout.decode_record_words(words, word_order=word_order, byte_order=byte_order)  # type: ignore[arg-type]
    assert back.sequence == REC.sequence and back.part_id == REC.part_id
    assert back.score_permille == 875 and back.verdict == Verdict.DEFECT


def test_out_of_range_values_saturate_or_wrap_instead_of_crashing() -> None:
    r = DecisionRecord(
        0,
        sequence=2**32 + 5,
        part_id=-1,
        verdict=Verdict.OK,
        defect_class=0,
        score_permille=5000,
        latency_ms=10**6,
        model_id=70000,
    )
    d = layout.decode_record_bytes(layout.record_bytes(r))
    assert d.sequence == 5  # uint32 wraps, like the PLC's counter
    assert d.part_id == 0xFFFFFFFF
    assert d.score_permille == 1000
    assert d.latency_ms == 65535  # saturates: a huge latency never reads as a small one
    assert d.model_id == 65535


def test_settings_union_picks_backend_by_type() -> None:
    ta: TypeAdapter[PlcSettings] = TypeAdapter(PlcSettings)
    assert isinstance(ta.validate_python({"type": "modbus", "host": "10.0.0.5"}), ModbusSettings)
    assert isinstance(ta.validate_python({"type": "s7", "db_number": 5}), S7Settings)
    assert isinstance(ta.validate_python({"type": "opcua"}), OpcUaSettings)
    with pytest.raises(ValidationError, match=r"union_tag_invalid|does not match"):
        ta.validate_python({"type": "profinet"})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"type": "modbus", "prot": 502}, "Extra inputs are not permitted"),
        ({"type": "modbus", "port": 0}, "port 0 is only allowed with simulator"),
        ({"type": "modbus", "record_stride": 4}, "greater than or equal to 10"),
        ({"type": "modbus", "word_order": "middle"}, "'big' or 'little'"),
        (
            {"type": "modbus", "reconnect_backoff_min_ms": 900, "reconnect_backoff_max_ms": 100},
            "reconnect_backoff_min_ms must be <=",
        ),
        ({"type": "modbus", "heartbeat_register": 5, "alarm_register": 5}, "must differ"),
        ({"type": "opcua", "endpoint": "http://x"}, "opc"),
    ],
)
def test_bad_settings_are_named(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TypeAdapter(PlcSettings).validate_python(data)


def test_map_rejects_overlap_and_overflow_for_the_camera_count() -> None:
    s = ModbusSettings(record_base=90, record_stride=10)
    with pytest.raises(ValueError, match="overlap: decision records"):
        ModbusMap(s, camera_slots=2)  # 90..109 covers heartbeat 100
    with pytest.raises(ValueError, match="beyond 65535"):
        ModbusMap(ModbusSettings(record_base=65530), camera_slots=1)
    m = ModbusMap(ModbusSettings(), camera_slots=4)
    assert [m.record_address(i) for i in range(4)] == [1000, 1016, 1032, 1048]
    with pytest.raises(ValueError, match="camera_index 4 outside"):
        m.record_address(4)


def test_the_register_map_page_example_is_what_the_code_writes() -> None:
    """docs/plc-register-map.md is what PLC programmers implement: its worked example must hold."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "plc-register-map.md").read_text()
    m = re.search(r"`((?:[0-9A-F]{4} ){9}[0-9A-F]{4})`", doc)
    assert m, "worked Modbus example missing from docs/plc-register-map.md"
    example = [int(w, 16) for w in m.group(1).split()]
    rec = DecisionRecord(2, 0x00012345, 0xA1B2C3D4, Verdict.DEFECT, 3, 875, 42, 7, 0)
    assert layout.record_words(rec) == example
    for order in ("big", "little"):
        for border in ("big", "little"):
            row = f"| {order} | {border} | 0x"
            line = next(x for x in doc.splitlines() if x.startswith(row))
            regs = [int(v, 16) for v in re.findall(r"0x([0-9A-F]{4})", line)]
            assert layout.u32_words(0xA1B2C3D4, word_order=order, byte_order=border) == regs

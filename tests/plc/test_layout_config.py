"""The documented record layout and the settings' validation (pure functions, no peers)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from plc import layout
from plc.config import ModbusSettings, OpcUaSettings, PlcSettings, S7Settings
from plc.modbus import ModbusMap
from plc.record import DecisionRecord, Verdict, next_sequence, unacked_count
from plc.s7 import S7Map

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
    recipe=9,
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
        "01020304"  # sequence: words 8-9 / bytes 16-19, the v1 position
        "0009"  # recipe (appended in v2, word 10)
        "0000"  # reserved
    )
    assert len(b) == layout.RECORD_BYTES == 24
    assert layout.decode_record_bytes(b).recipe == 9


def test_v2_keeps_every_v1_word_in_place() -> None:
    """A PLC program written against record v1 (10 words: sequence at words 8-9 / DBD+16) reads
    a v2 record unchanged: the first 20 bytes decode exactly as v1 did, the recipe is appended."""
    b = layout.record_bytes(REC)
    v1 = struct.unpack(">IHHHHHHI", b[: 2 * layout.RECORD_V1_WORDS])  # record v1, as documented
    assert v1 == (REC.part_id, REC.verdict, 3, 875, 42, 7, 0, REC.sequence)
    assert (layout.SEQUENCE_WORD, layout.SEQUENCE_BYTE) == (8, 16)
    assert (layout.RECIPE_WORD, layout.RECIPE_BYTE) == (10, 20)
    assert int.from_bytes(b[20:22], "big") == 9 and b[22:24] == b"\0\0"


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
    assert words[8:10] == seq_words  # the strobe at its v1 words
    assert words[10] == (0x0900 if byte_order == "little" else 0x0009)  # recipe: plain uint16
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
        ({"type": "modbus", "record_stride": 4}, "greater than or equal to 12"),
        ({"type": "s7", "record_stride": 20}, "greater than or equal to 24"),
        (
            {"type": "modbus", "results": {"mode": "ring"}, "record_stride": 50},
            "record_stride 50 is too small for results.mode ring with ring_size 8: each camera's "
            "ring takes 98 registers",
        ),
        (
            {"type": "s7", "results": {"mode": "ring", "ring_size": 4}, "record_stride": 64},
            "takes 100 bytes",
        ),
        ({"type": "modbus", "results": {"mode": "fifo"}}, "'slot' or 'ring'"),
        ({"type": "modbus", "results": {"ring_size": 1}}, "greater than or equal to 2"),
        ({"type": "modbus", "sim_program": {}}, "sim_program needs simulator: true"),
        (
            {"type": "modbus", "simulator": True, "port": 0, "sim_program": {"recipes": [70000]}},
            "less than or equal to 65535",
        ),
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
    s = ModbusSettings(record_base=90, record_stride=12)
    with pytest.raises(ValueError, match="overlap: decision records"):
        ModbusMap(s, camera_slots=2)  # 90..113 covers heartbeat 100
    with pytest.raises(ValueError, match="beyond 65535"):
        ModbusMap(ModbusSettings(record_base=65530), camera_slots=1)
    m = ModbusMap(ModbusSettings(), camera_slots=4)
    assert [m.record_address(i) for i in range(4)] == [1000, 1016, 1032, 1048]
    with pytest.raises(ValueError, match="camera_index 4 outside"):
        m.record_address(4)


def test_the_register_map_page_example_is_what_the_code_writes() -> None:
    """docs/plc-register-map.md is what PLC programmers implement: its worked example must hold."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "plc-register-map.md").read_text()
    m = re.search(r"`((?:[0-9A-F]{4} ){11}[0-9A-F]{4})`", doc)
    assert m, "worked Modbus example missing from docs/plc-register-map.md"
    example = [int(w, 16) for w in m.group(1).split()]
    rec = DecisionRecord(2, 0x00012345, 0xA1B2C3D4, Verdict.DEFECT, 3, 875, 42, 7, 0, recipe=2)
    assert layout.record_words(rec) == example
    for order in ("big", "little"):
        for border in ("big", "little"):
            row = f"| {order} | {border} | 0x"
            line = next(x for x in doc.splitlines() if x.startswith(row))
            regs = [int(v, 16) for v in re.findall(r"0x([0-9A-F]{4})", line)]
            assert layout.u32_words(0xA1B2C3D4, word_order=order, byte_order=border) == regs


def test_next_sequence_skips_zero_on_wrap() -> None:
    assert next_sequence(0) == 1  # nothing held: start at 1
    assert next_sequence(5000) == 5001
    assert next_sequence(0xFFFF_FFFE) == 0xFFFF_FFFF
    assert next_sequence(0xFFFF_FFFF) == 1  # 0 means "never written": skipped


@pytest.mark.parametrize(
    ("last", "acked", "expected"),
    [
        (0, 0, 0),  # nothing written
        (7, 0, 7),  # never acknowledged: everything outstanding
        (7, 7, 0),
        (7, 4, 3),
        (2, 0xFFFF_FFFE, 3),  # across the wrap: 0xFFFFFFFF, 1, 2 (0 is skipped)
        (1, 0xFFFF_FFFF, 1),
        (4, 7, 0),  # an ack "ahead" (daemon restarted from an older number): nothing known due
    ],
)
def test_unacked_count_is_wrap_aware(last: int, acked: int, expected: int) -> None:
    assert unacked_count(last, acked) == expected


def test_ring_slot_follows_the_sequence_and_the_wrap() -> None:
    assert [layout.ring_slot(s, 8) for s in range(1, 11)] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    # after 2^32-1 comes 1: the PLC computes (s - 1) MOD N with the same formula
    assert layout.ring_slot(0xFFFF_FFFF, 8) == 6 and layout.ring_slot(1, 8) == 0


def test_default_maps_fit_and_inputs_are_one_read() -> None:
    """Defaults: part ids, trigger counters and the recipe in one Modbus read (<= 125 regs) /
    one S7 GET (<= 200 bytes), for the documented camera counts."""
    m = ModbusMap(ModbusSettings(), camera_slots=8)
    spans = [(m.part_id_address(i), m.part_id_address(i) + 2) for i in range(8)]
    spans += [(m.trigger_address(i), m.trigger_address(i) + 1) for i in range(8)]
    spans.append((m.recipe_address, m.recipe_address + 1))
    assert layout.plan_reads(spans, 125) == [(200, 108)]
    assert (m.trigger_address(3), m.recipe_address, m.ack_address(3)) == (303, 299, 406)
    s = S7Map(S7Settings(), camera_slots=16)
    spans = [(s.part_id_offset(i), s.part_id_offset(i) + 4) for i in range(16)]
    spans += [(s.trigger_offset(i), s.trigger_offset(i) + 2) for i in range(16)]
    spans.append((616, 618))
    assert layout.plan_reads(spans, 200) == [(520, 98)]
    assert s.size == 620 + 16 * 4


def test_ring_mode_defaults_place_the_rings_without_overlap() -> None:
    m = ModbusMap(ModbusSettings(results={"mode": "ring"}), camera_slots=4)  # type: ignore[arg-type]
    assert m.s.record_stride == 112  # 2 + 8 x 12 = 98, rounded up to 16
    assert [m.record_address(i) for i in range(2)] == [1000, 1112]
    assert m.ring_slot_address(1, 3) == 1112 + 2 + 36
    assert m.record_write_address(1, 12) == 1112 + 2 + 3 * 12  # (12 - 1) mod 8 = 3
    assert m.sequence_address(1) == 1112  # the head
    s = S7Map(S7Settings(results={"mode": "ring"}), camera_slots=4)  # type: ignore[arg-type]
    assert (s.s.record_offset, s.s.record_stride) == (1024, 224)  # 4 + 8 x 24 = 196 -> 224
    assert s.ring_slot_offset(0, 7) == 1024 + 4 + 7 * 24
    assert s.size == 1024 + 3 * 224 + 196


@pytest.mark.parametrize(
    ("kw", "slots", "message"),
    [
        ({"trigger_base": 201}, 1, r"part ids \(part_id_base, part_id_stride\) \[200..201\] and "
                                   r"trigger counters \(trigger_base, trigger_stride\)"),
        ({"recipe_register": 1003}, 1, r"decision records \(record_base, record_stride\) "
                                       r"\[1000..1011\] and recipe_register"),
        ({"ack_base": 101}, 1, r"alarm_register \[101..101\] and acks \(ack_base, ack_stride\)"),
        ({"trigger_base": 65534}, 4, r"plc.trigger counters \(trigger_base, trigger_stride\) "
                                     r"ends at register 65537, beyond 65535"),
        ({"record_base": 65000, "results": {"mode": "ring"}}, 6, r"result rings .* beyond 65535"),
        ({}, 50, r"part ids .* \[298..299\] and recipe_register"),  # 50 cameras reach 299
    ],
)
def test_modbus_map_errors_name_the_keys(kw: dict[str, object], slots: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModbusMap(ModbusSettings(**kw), camera_slots=slots)  # type: ignore[arg-type]


def test_s7_map_errors_name_the_keys() -> None:
    with pytest.raises(ValueError, match=r"DB100 map overlap: part ids .* and trigger counters"):
        S7Map(S7Settings(trigger_offset=542), camera_slots=8)
    with pytest.raises(ValueError, match=r"acks \(ack_offset, ack_stride\) ends at byte 65539, "
                                         r"beyond 65535"):
        S7Map(S7Settings(ack_offset=65532), camera_slots=2)
    with pytest.raises(ValidationError, match="less than or equal to 65535"):
        S7Settings(recipe_offset=70000)


def test_check_map_for_config_check() -> None:
    from plc.factory import check_map

    check_map(ModbusSettings(), 4)
    check_map(OpcUaSettings(), 4)  # node ids: nothing to overlap
    with pytest.raises(ValueError, match=r"acks \(ack_base, ack_stride\)"):
        check_map(ModbusSettings(ack_base=1004), 1)
    with pytest.raises(ValueError, match=r"DB100 map overlap: result rings"):
        check_map(S7Settings(results={"mode": "ring"}, record_offset=0), 3)  # type: ignore[arg-type]

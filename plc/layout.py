"""The decision record's wire layout, shared by every backend and documented in
docs/plc-register-map.md (keep the two in step).

The record is 10 16-bit words / 20 bytes. The sequence number comes LAST on purpose: a PLC (or
Modbus server) that applies a multi-register write in address order sees the strobe change only
after every other field of the record is in place.

    word  byte  field            type
    0-1   0-3   part_id          uint32
    2     4     verdict          uint16  (1 OK, 2 DEFECT, 3 FAIL-SAFE REJECT; 0 never written)
    3     6     defect_class     uint16  (class id + 1; 0 = none)
    4     8     score_permille   uint16  (0..1000)
    5     10    latency_ms       uint16  (capture -> decision, saturates at 65535)
    6     12    model_id         uint16
    7     14    reason           uint16  (fail-safe reason code; 0 for real verdicts)
    8-9   16-19 sequence         uint32  (the "new result" strobe, +1 per record per camera)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

from plc.record import DecisionRecord

RECORD_WORDS = 10
RECORD_BYTES = 2 * RECORD_WORDS
SEQUENCE_WORD = 8
"""Word offset of the sequence (strobe) inside the record."""
SEQUENCE_BYTE = 2 * SEQUENCE_WORD

_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_BIG = struct.Struct(">IHHHHHHI")
assert _BIG.size == RECORD_BYTES

Order = Literal["big", "little"]


def _u16(value: int) -> int:
    """Saturate into uint16: a huge latency must read as 'very late', not wrap to a small one."""
    return max(0, min(_U16, int(value)))


def record_bytes(record: DecisionRecord) -> bytes:
    """The record as the 20 bytes an S7 DB (big-endian) or a big/big Modbus map holds."""
    return _BIG.pack(
        int(record.part_id) & _U32,
        _u16(record.verdict),
        _u16(record.defect_class),
        max(0, min(1000, int(record.score_permille))),
        _u16(record.latency_ms),
        _u16(record.model_id),
        _u16(record.reason),
        int(record.sequence) & _U32,
    )


@dataclass(frozen=True, slots=True)
class DecodedRecord:
    part_id: int
    verdict: int
    defect_class: int
    score_permille: int
    latency_ms: int
    model_id: int
    reason: int
    sequence: int

    def as_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.__slots__}


def decode_record_bytes(data: bytes) -> DecodedRecord:
    if len(data) < RECORD_BYTES:
        raise ValueError(f"record needs {RECORD_BYTES} bytes, got {len(data)}")
    return DecodedRecord(*_BIG.unpack_from(data))


def _swap16(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)


def bytes_to_words(
    data: bytes,
    *,
    word_order: Order = "big",
    byte_order: Order = "big",
    u32_word_offsets: tuple[int, ...] = (0, SEQUENCE_WORD),
) -> list[int]:
    """Big-endian bytes -> Modbus register values in the configured word/byte order.

    ``u32_word_offsets`` says where the 32-bit fields start: only those pairs get their words
    swapped for word_order=little.
    """
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if word_order == "little":
        for off in u32_word_offsets:
            words[off], words[off + 1] = words[off + 1], words[off]
    if byte_order == "little":
        words = [_swap16(w) for w in words]
    return words


def words_to_bytes(
    words: list[int],
    *,
    word_order: Order = "big",
    byte_order: Order = "big",
    u32_word_offsets: tuple[int, ...] = (0, SEQUENCE_WORD),
) -> bytes:
    """Inverse of bytes_to_words."""
    w = list(words)
    if byte_order == "little":
        w = [_swap16(x) for x in w]
    if word_order == "little":
        for off in u32_word_offsets:
            w[off], w[off + 1] = w[off + 1], w[off]
    return b"".join(int(x).to_bytes(2, "big") for x in w)


def record_words(
    record: DecisionRecord, *, word_order: Order = "big", byte_order: Order = "big"
) -> list[int]:
    """The 10 register values of one Modbus write_registers request."""
    return bytes_to_words(record_bytes(record), word_order=word_order, byte_order=byte_order)


def decode_record_words(
    words: list[int], *, word_order: Order = "big", byte_order: Order = "big"
) -> DecodedRecord:
    if len(words) < RECORD_WORDS:
        raise ValueError(f"record needs {RECORD_WORDS} registers, got {len(words)}")
    return decode_record_bytes(
        words_to_bytes(words[:RECORD_WORDS], word_order=word_order, byte_order=byte_order)
    )


def u32_words(value: int, *, word_order: Order = "big", byte_order: Order = "big") -> list[int]:
    return bytes_to_words(
        (int(value) & _U32).to_bytes(4, "big"),
        word_order=word_order,
        byte_order=byte_order,
        u32_word_offsets=(0,),
    )


def u32_from_words(
    words: list[int], *, word_order: Order = "big", byte_order: Order = "big"
) -> int:
    return int.from_bytes(
        words_to_bytes(
            words[:2], word_order=word_order, byte_order=byte_order, u32_word_offsets=(0,)
        ),
        "big",
    )


def u16_word(value: int, *, byte_order: Order = "big") -> int:
    v = int(value) & _U16
    return _swap16(v) if byte_order == "little" else v


def u16_from_word(word: int, *, byte_order: Order = "big") -> int:
    return _swap16(word) if byte_order == "little" else word

"""The decision record's wire layout, shared by every backend and documented in
docs/plc-register-map.md (keep the two in step).

Record v2 is 12 16-bit words / 24 bytes. Words 0-9 are EXACTLY record v1 (10 words / 20 bytes):
PLC programs written against v1, and acceptance checks that read the sequence at record+8..9
(Modbus 1008-1009, S7 DBD16), keep working unchanged. v2 only APPENDS the recipe at word 10.

    word  byte  field            type
    0-1   0-3   part_id          uint32
    2     4     verdict          uint16  (1 OK, 2 DEFECT, 3 FAIL-SAFE REJECT; 0 never written)
    3     6     defect_class     uint16  (class id + 1; 0 = none)
    4     8     score_permille   uint16  (0..1000)
    5     10    latency_ms       uint16  (capture -> decision, saturates at 65535)
    6     12    model_id         uint16
    7     14    reason           uint16  (fail-safe reason code; 0 for real verdicts)
    8-9   16-19 sequence         uint32  (the "new result" strobe, +1 per record per camera)
    10    20    recipe           uint16  (v2: recipe / product type the part was judged under)
    11    22    reserved         uint16  (always 0)

Why the strobe may sit before the recipe: v1 put the sequence last so that a PLC (or Modbus
server) applying a multi-register write in address order sees the strobe change only after every
other field is in place; that still holds for every v1 field. The recipe comes after the strobe
but travels in the SAME single request (Modbus FC16 write_registers / S7 PUT of all 24 bytes),
which a PLC applies between two scans of its program, i.e. atomically as far as the program can
tell: a program never sees the new sequence with the old recipe. Moving the strobe to the end
instead would have broken every v1 program for no gain on a PLC. OPC UA has no memory order: its
Write call lists the nodes with `Sequence` as the LAST value (node order), so a server that
applies the values in order exposes the strobe last there too.

Ring mode (results.mode: ring) keeps per camera a HEAD (uint32: the sequence of the newest record
written, 0 = none) followed by N record slots of this layout; the record with sequence s lives in
slot (s - 1) mod N, and the head is written in a request AFTER the record, so a PLC that reads the
head and then the slots never sees a half-written record.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

from plc.record import DecisionRecord

RECORD_VERSION = 2
RECORD_WORDS = 12
RECORD_BYTES = 2 * RECORD_WORDS
RECORD_V1_WORDS = 10
"""Words 0..9 are record v1 unchanged; v2 appends the recipe and a reserved word."""
SEQUENCE_WORD = 8
"""Word offset of the sequence (strobe) inside the record: v1's position, kept in v2."""
SEQUENCE_BYTE = 2 * SEQUENCE_WORD
RECIPE_WORD = 10
"""Word offset of the recipe (appended in v2, after the strobe, same request)."""
RECIPE_BYTE = 2 * RECIPE_WORD

RING_HEAD_WORDS = 2
"""Modbus ring block: head (uint32) at +0..1, slot k at +2 + 12k."""
RING_HEAD_BYTES = 4
"""S7 ring block: head (UDInt) at +0, slot k at +4 + 24k."""

_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_BIG = struct.Struct(">IHHHHHHIHH")
assert _BIG.size == RECORD_BYTES

Order = Literal["big", "little"]


def _u16(value: int) -> int:
    """Saturate into uint16: a huge latency must read as 'very late', not wrap to a small one."""
    return max(0, min(_U16, int(value)))


def record_bytes(record: DecisionRecord) -> bytes:
    """The record as the 24 bytes an S7 DB (big-endian) or a big/big Modbus map holds."""
    return _BIG.pack(
        int(record.part_id) & _U32,
        _u16(record.verdict),
        _u16(record.defect_class),
        max(0, min(1000, int(record.score_permille))),
        _u16(record.latency_ms),
        _u16(record.model_id),
        _u16(record.reason),
        int(record.sequence) & _U32,
        _u16(record.recipe),
        0,
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
    recipe: int
    sequence: int

    def as_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.__slots__}


def decode_record_bytes(data: bytes) -> DecodedRecord:
    if len(data) < RECORD_BYTES:
        raise ValueError(f"record needs {RECORD_BYTES} bytes, got {len(data)}")
    part_id, verdict, cls, score, latency, model, reason, seq, recipe, _reserved = (
        _BIG.unpack_from(data)
    )
    return DecodedRecord(part_id, verdict, cls, score, latency, model, reason, recipe, seq)


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
    """The 12 register values of one Modbus write_registers request."""
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


def ring_block_words(ring_size: int) -> int:
    """Registers one camera's ring takes in the Modbus map (head + slots)."""
    return RING_HEAD_WORDS + ring_size * RECORD_WORDS


def ring_block_bytes(ring_size: int) -> int:
    """Bytes one camera's ring takes in the S7 DB (head + slots)."""
    return RING_HEAD_BYTES + ring_size * RECORD_BYTES


def ring_slot(sequence: int, ring_size: int) -> int:
    """The slot the record with `sequence` (1..2^32-1) occupies: (sequence - 1) mod ring_size.

    At the uint32 wrap (2^32-1 -> 1, 0 is skipped) the slot index jumps; a PLC that computes the
    slot with the same formula, as the documented program does, never notices.
    """
    return ((int(sequence) & _U32) - 1) % ring_size


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True, slots=True)
class Area:
    """A per-camera (or single) block of a map, for overlap/limit checks and read planning."""

    key: str
    """What the user sets to move it, e.g. "trigger counters (trigger_base, trigger_stride)"."""
    start: int
    size: int
    """Units (registers or bytes) per element."""
    count: int = 1
    stride: int = 0

    def spans(self) -> list[tuple[int, int]]:
        return [(self.start + i * self.stride, self.start + i * self.stride + self.size)
                for i in range(self.count)]

    @property
    def end(self) -> int:
        """One past the last unit of the last element."""
        return self.start + (self.count - 1) * self.stride + self.size


def check_areas(areas: list[Area], limit: int, unit: str, prefix: str) -> None:
    """Raise ValueError naming the keys when an area runs past `limit` or two areas overlap."""
    for a in areas:
        if a.end > limit:
            raise ValueError(
                f"{prefix}{a.key} ends at {unit} {a.end - 1}, beyond {limit - 1}: lower the "
                "address or the stride"
            )
    spans = sorted((lo, hi, a.key) for a in areas for lo, hi in a.spans())
    reach_hi, reach_key, reach_lo = -1, "", -1
    for lo, hi, key in spans:
        if lo < reach_hi and key != reach_key:
            raise ValueError(
                f"{prefix}map overlap: {reach_key} [{reach_lo}..{reach_hi - 1}] and {key} "
                f"[{lo}..{hi - 1}]: move one of them"
            )
        if hi > reach_hi:
            reach_hi, reach_key, reach_lo = hi, key, lo


def plan_reads(spans: list[tuple[int, int]], max_span: int) -> list[tuple[int, int]]:
    """Group [lo, hi) spans into as few reads as possible, each covering at most `max_span`
    units: (start, count) per read, in address order. Gaps inside a read are read and ignored."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if out:
            g_lo, g_n = out[-1]
            if max(g_lo + g_n, hi) - g_lo <= max_span:
                out[-1] = (g_lo, max(g_lo + g_n, hi) - g_lo)
                continue
        out.append((lo, hi - lo))
    return out

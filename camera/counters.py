"""Device counters that wrap: frame ids and timestamps turned into ever-growing numbers.

Cameras count in fixed-width registers: a GigE Vision block id is 16 bits and skips 0
(65535 -> 1), TLSimu's timestamp is only the sub-second part (wraps every 1e9 ns). Missed-frame
counts and latency figures must survive those wraps instead of reporting a 65 534-frame loss.
"""

from __future__ import annotations


class FrameIdUnwrapper:
    """Raw device frame ids -> a monotonically growing id whose gaps are real losses.

    A decrease is a wrap when the previous id sat in the top quarter of the counter's range and
    the new one in the bottom quarter; any other decrease is a device restart, which is re-based
    (the id continues +1) rather than counted as a huge gap.
    """

    def __init__(self, modulus: int = 1 << 64, skip_zero: bool = False) -> None:
        self.modulus = modulus
        self.skip_zero = skip_zero
        self._last_raw: int | None = None
        self._last: int = -1
        self.wraps = 0
        self.restarts = 0

    def __call__(self, raw: int) -> int:
        last_raw = self._last_raw
        self._last_raw = raw
        if last_raw is None:
            self._last = raw
            return raw
        if raw > last_raw:
            step = raw - last_raw
        elif raw == last_raw:
            step = 1  # duplicate id: treat as the next frame rather than going backwards
        else:
            span = self.modulus - (1 if self.skip_zero else 0)
            if last_raw >= self.modulus * 3 // 4 and raw < self.modulus // 4:
                self.wraps += 1
                first = 1 if self.skip_zero else 0
                step = (self.modulus - 1 - last_raw) + (raw - first) + 1
                step = min(step, span)
            else:
                self.restarts += 1
                step = 1
        self._last += step
        return self._last

    def next(self) -> int:
        """An id for a buffer that carries none (the source counts for it)."""
        self._last += 1
        return self._last


class TimestampUnwrapper:
    """Device timestamps (ns) that wrap every ``period_ns`` -> a continuous device time.

    The host's monotonic clock tells how many whole periods passed between two frames, so even a
    gap longer than one period (a slow trigger) unwraps correctly, which counting backward steps
    alone cannot do.
    """

    def __init__(self, period_ns: int | None) -> None:
        self.period_ns = period_ns
        self._last_raw: int | None = None
        self._last_host: int = 0
        self._offset = 0

    def __call__(self, raw: int | None, host_ns: int) -> int | None:
        if raw is None:
            return None
        if self.period_ns is None:
            return raw
        p = self.period_ns
        if self._last_raw is not None:
            host_delta = host_ns - self._last_host
            raw_delta = (raw - self._last_raw) % p  # device time elapsed, modulo one period
            whole = round((host_delta - raw_delta) / p)
            self._offset += (max(whole, 0) * p) + (p if raw < self._last_raw else 0)
        self._last_raw, self._last_host = raw, host_ns
        return raw + self._offset


def part_id_of(frame_id: int, first_frame_id: int, part_base: int, triggered: bool) -> int:
    """The part a frame belongs to, as far as the device can tell.

    Triggered: the device counts one frame per trigger, so the frame-id delta maps frames to
    triggers even when a frame is lost in between (hardware ``part_id: count``). Software
    triggers get their real part id from the worker (camera.triggerq), which replaces this
    count. Free run: every frame is its own part.
    """
    if triggered:
        return part_base + (frame_id - first_frame_id) + 1
    return frame_id

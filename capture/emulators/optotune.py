"""An Optotune Lens Driver 4 on a pseudo-terminal (``python -m capture.emulators optotune``).

Speaks the LD4 binary protocol of :mod:`capture.ld4_protocol`: frames are recognised by
opcode and their known fixed length (partial frames stay buffered), each frame's CRC is
checked (a bad one gets the unsolicited reply ``E`` + 1 and the command is ignored), an
unknown opcode gets ``E`` + 3 and the receive buffer is dropped, queries are answered with
payload + CRC + CRLF in the layouts of HARDWARE_NOTES §1.4, and set commands stay silent.

State: raw set current, mode, signal generator (upper/lower raw current, frequency in mHz),
software current limits, temperature limits, focal power. The lens itself is modelled as a
first-order response (time constant :attr:`OptotuneEmulator.time_constant_s`) to the commanded
current, readable with :meth:`OptotuneEmulator.optical_current_ma`; like the real driver,
``Ar`` returns the *set* value, not the lens's state.

Choices where the real device is not documented (see HARDWARE_NOTES open questions):
reply header bytes repeat the opcode letters without the ``r``/``w`` (``Ar`` -> ``A``,
``CrMA`` -> ``CMA``, ``PwTA`` -> ``PT``, ``PrDA`` -> ``PD``, ``MwCA`` -> ``MCA``; ``TA``, the St Andrews
form of ``TCA``, is answered exactly like ``TCA``); error replies carry a
CRC (``E`` + code + CRC + CRLF); ``Sr`` answers ``S`` + a 32-bit bitfield (always 0 here);
``Start`` also returns the driver to current mode; ``Aw`` is ignored outside current mode
and clamped to the software limits; ``PrUA``/``PrLA``/``PrFA`` are not emulated.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time

from capture import ld4_protocol as ld4
from capture.emulators.pty_server import PtyEmulator

logger = logging.getLogger(__name__)

__all__ = ["OptotuneEmulator"]

#: modes as the ``MMA`` reply numbers them
MODE_CURRENT, MODE_SINE, MODE_TRIANGLE, MODE_RECTANGLE, MODE_FOCAL_POWER = 1, 2, 3, 4, 5

_MODE_COMMANDS = {b"MwDA": MODE_CURRENT, b"MwSA": MODE_SINE, b"MwTA": MODE_TRIANGLE, b"MwQA": MODE_RECTANGLE}


class OptotuneEmulator(PtyEmulator):
    """An LD4 with a lens attached, served on a pseudo-terminal.

    Args:
        fault, fault_after: see :class:`~capture.emulators.pty_server.PtyEmulator`.
        max_current_ma: the driver's maximum output current (``CrMA``), mA.
        temperature_c: the lens temperature reported by ``TCA``, °C (writable attribute).
        firmware_type: the ``H`` letter; 'A' offsets the focal-power encoding by 5 dpt.
        serial_number: the lens serial number (``X``), at most 8 ASCII characters.

    Attributes tests may set while it runs:
        error_replies: opcode (bytes, e.g. ``b"TCA"``) -> error code answered instead of the
            normal reply (set commands then answer too, as an unsolicited error).
        crc_error_reply: what a bad-CRC frame gets: ``b"E"`` (``E`` + 1, default) or ``b"N"``
            (``N\\r\\n``, old firmware).
        time_constant_s: the lens's first-order time constant (default 5 ms).
    """

    device_name = "optotune"

    #: lens model for focal-power mode: power = offset + gain * current
    FOCAL_POWER_OFFSET_DPT = -0.5
    FOCAL_POWER_DPT_PER_MA = 0.0165
    #: reachable focal-power range reported by ``PwTA`` / ``MwCA``, dpt
    FOCAL_POWER_RANGE_DPT = (-2.0, 3.0)

    def __init__(
        self,
        *,
        fault: str | None = None,
        fault_after: int = 0,
        max_current_ma: float = 292.84,
        temperature_c: float = 31.5,
        firmware_type: str = "A",
        serial_number: str = "EMU00001",
    ) -> None:
        super().__init__(fault=fault, fault_after=fault_after)
        if not (max_current_ma > 0 and round(max_current_ma * 100) <= 32767):
            raise ValueError(f"max_current_ma {max_current_ma} must be in (0, 327.67]")
        if len(firmware_type) != 1 or not firmware_type.isalpha():
            raise ValueError(f"firmware_type {firmware_type!r} must be one letter")
        if len(serial_number.encode("ascii")) > 8:
            raise ValueError(f"serial_number {serial_number!r} is longer than 8 ASCII characters")
        self.max_current_ma = round(max_current_ma * 100) / 100.0
        self.temperature_c = float(temperature_c)
        self.firmware_type = firmware_type
        self.serial_number = serial_number
        self.firmware_version = (1, 2, 3, 4)
        self.device_id = "EMULD4  "
        self.error_replies: dict[bytes, int] = {}
        self.crc_error_reply = b"E"
        self.time_constant_s = 0.005
        self._state_lock = threading.RLock()
        self._buffer = bytearray()
        # device state (raw units as on the wire)
        self.mode = MODE_CURRENT
        self.current_raw = 0
        self.upper_limit_raw = ld4.CURRENT_FULL_SCALE
        self.lower_limit_raw = -ld4.CURRENT_FULL_SCALE
        self.signal_upper_raw = 0
        self.signal_lower_raw = 0
        self.signal_frequency_mhz = 0
        self.temperature_limits_c: tuple[float, float] | None = None  # (lower, upper)
        self.focal_power_raw = ld4.focal_power_to_raw(0.0, firmware_type)
        self.handshakes = 0
        # first-order lens response: from -> to since t0
        self._optical_from_ma = 0.0
        self._optical_to_ma = 0.0
        self._optical_t0 = time.monotonic()
        self._signal_t0 = time.monotonic()

    # ------------------------------------------------------------------ readable state
    @property
    def commanded_at_s(self) -> float:
        """Host-monotonic time of the last change of the commanded current, seconds (the
        start of the lens's first-order response)."""
        return self._optical_t0

    @property
    def current_ma(self) -> float:
        """The set current (what ``Ar`` reports), mA."""
        return ld4.raw_to_current(self.current_raw, self.max_current_ma)

    @property
    def focal_power_dpt(self) -> float:
        """The set focal power (what ``PrDA`` reports), dpt."""
        return ld4.raw_to_focal_power(self.focal_power_raw, self.firmware_type)

    @property
    def signal_parameters(self) -> dict[str, float]:
        """The signal generator's settings: lower/upper current in mA, frequency in Hz."""
        with self._state_lock:
            return {
                "lower_ma": ld4.raw_to_current(self.signal_lower_raw, self.max_current_ma),
                "upper_ma": ld4.raw_to_current(self.signal_upper_raw, self.max_current_ma),
                "frequency_hz": self.signal_frequency_mhz / 1000.0,
            }

    def commanded_current_ma(self, t_s: float | None = None) -> float:
        """The current the driver outputs at host-monotonic time ``t_s`` (now if None), mA:
        the set value, or the signal generator's waveform in a signal mode."""
        t = time.monotonic() if t_s is None else t_s
        with self._state_lock:
            if self.mode not in (MODE_SINE, MODE_TRIANGLE, MODE_RECTANGLE) or self.signal_frequency_mhz <= 0:
                return self._optical_to_ma
            lo = ld4.raw_to_current(self.signal_lower_raw, self.max_current_ma)
            hi = ld4.raw_to_current(self.signal_upper_raw, self.max_current_ma)
            phase = ((t - self._signal_t0) * self.signal_frequency_mhz / 1000.0) % 1.0
            mode = self.mode
        if mode == MODE_TRIANGLE:
            frac = 2 * phase if phase < 0.5 else 2 - 2 * phase
        elif mode == MODE_SINE:
            frac = 0.5 - 0.5 * math.cos(2 * math.pi * phase)
        else:
            frac = 1.0 if phase < 0.5 else 0.0
        return lo + frac * (hi - lo)

    def optical_current_ma(self, t_s: float | None = None) -> float:
        """The current the lens has *optically* reached at host-monotonic time ``t_s`` (now if
        None), mA: a first-order response with :attr:`time_constant_s` to each set command.
        In the signal modes the waveform is returned unfiltered."""
        t = time.monotonic() if t_s is None else t_s
        with self._state_lock:
            if self.mode in (MODE_SINE, MODE_TRIANGLE, MODE_RECTANGLE):
                return self.commanded_current_ma(t)
            start, end, t0, tau = self._optical_from_ma, self._optical_to_ma, self._optical_t0, self.time_constant_s
        if tau <= 0:
            return end
        return end + (start - end) * math.exp(-max(0.0, t - t0) / tau)

    # ------------------------------------------------------------------ state changes
    def _command_current(self, current_ma: float) -> None:
        now = time.monotonic()
        optical = self.optical_current_ma(now)
        self._optical_from_ma, self._optical_to_ma, self._optical_t0 = optical, current_ma, now

    def _set_current_raw(self, raw: int) -> None:
        raw = max(self.lower_limit_raw, min(self.upper_limit_raw, raw))
        self.current_raw = raw
        self._command_current(ld4.raw_to_current(raw, self.max_current_ma))

    def _focal_power_range_raw(self) -> tuple[int, int]:
        lo_dpt, hi_dpt = self.FOCAL_POWER_RANGE_DPT
        return ld4.focal_power_to_raw(hi_dpt, self.firmware_type), ld4.focal_power_to_raw(lo_dpt, self.firmware_type)

    def _focal_power_status(self) -> int:
        status = 0
        if self.temperature_limits_c is None:
            status |= 0x04  # no temperature limits received
        else:
            lower, upper = self.temperature_limits_c
            if not lower <= self.temperature_c <= upper:
                status |= 0x80  # temperature outside the user limits
        return status

    # ------------------------------------------------------------------ protocol
    def handle(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Split ``data`` (plus what was buffered) into frames and answer each."""
        out: list[tuple[bytes, bytes]] = []
        with self._state_lock:
            self._buffer += data
            while self._buffer:
                length = self._frame_length(bytes(self._buffer))
                if length is None:  # an incomplete frame: wait for more bytes
                    break
                if length == 0:  # unknown opcode: E3, drop everything received so far
                    request = bytes(self._buffer)
                    self._buffer.clear()
                    logger.debug("optotune emulator: unknown command %s", request.hex(" "))
                    out.append((request, ld4.error_reply(3)))
                    break
                request = bytes(self._buffer[:length])
                del self._buffer[:length]
                out.append((request, self._answer(request)))
        return out

    def _frame_length(self, buf: bytes) -> int | None:
        """Length of the frame at the start of ``buf``; None = need more bytes; 0 = unknown."""
        if buf[:1] == b"V":  # both V+CRC (3 bytes) and V+00+CRC (4 bytes) are in use
            if len(buf) >= 3 and ld4.check_frame(buf[:3]):
                return 3
            return 4 if len(buf) >= 4 else None
        for opcode, length in ld4.FRAME_LENGTHS.items():
            if buf.startswith(opcode):
                return length if len(buf) >= length else None
            if opcode.startswith(buf):
                return None  # a prefix of a known opcode
        return 0

    def _answer(self, request: bytes) -> bytes:
        if request == ld4.HANDSHAKE:
            self.handshakes += 1
            self.mode = MODE_CURRENT
            self._set_current_raw(0)
            return ld4.HANDSHAKE_REPLY
        if not ld4.check_frame(request):
            logger.debug("optotune emulator: bad CRC in %s", request.hex(" "))
            return b"N\r\n" if self.crc_error_reply == b"N" else ld4.error_reply(1)
        opcode = next(op for op in ld4.FRAME_LENGTHS if request.startswith(op))
        if opcode in self.error_replies:
            return ld4.error_reply(self.error_replies[opcode])
        data = request[len(opcode) : -2]
        handler = getattr(self, "_op_" + opcode.decode("ascii"), None)
        if handler is None:  # known frame length but not emulated
            return ld4.error_reply(3)
        return handler(data)

    # one method per opcode: data bytes (after the opcode, before the CRC) -> reply bytes
    def _op_Aw(self, data: bytes) -> bytes:
        if self.mode == MODE_CURRENT:
            self._set_current_raw(struct.unpack(">h", data)[0])
        return b""

    def _op_Ar(self, data: bytes) -> bytes:
        return ld4.reply(b"A" + struct.pack(">h", self.current_raw))

    def _op_CrMA(self, data: bytes) -> bytes:
        return ld4.reply(b"CMA" + struct.pack(">h", round(self.max_current_ma * 100)))

    def _op_CrUA(self, data: bytes) -> bytes:
        return ld4.reply(b"CUA" + struct.pack(">h", self.upper_limit_raw))

    def _op_CrLA(self, data: bytes) -> bytes:
        return ld4.reply(b"CLA" + struct.pack(">h", self.lower_limit_raw))

    def _op_CwUA(self, data: bytes) -> bytes:
        self.upper_limit_raw = struct.unpack(">h", data)[0]
        return ld4.reply(b"CUA" + data)

    def _op_CwLA(self, data: bytes) -> bytes:
        self.lower_limit_raw = struct.unpack(">h", data)[0]
        return ld4.reply(b"CLA" + data)

    def _op_TCA(self, data: bytes) -> bytes:
        return ld4.reply(b"TCA" + struct.pack(">h", ld4.temperature_to_raw(self.temperature_c)))

    def _op_TA(self, data: bytes) -> bytes:
        # the St Andrews form of TCA (HARDWARE_NOTES §1.4 [?]); the real header is not
        # documented, so it answers exactly like TCA (3 header bytes, then the value)
        return self._op_TCA(data)

    def _op_H(self, data: bytes) -> bytes:
        return ld4.reply(b"H" + self.firmware_type.encode("ascii"))

    def _op_V(self, data: bytes) -> bytes:
        return ld4.reply(b"V" + struct.pack(">BBHH", *self.firmware_version))

    def _op_X(self, data: bytes) -> bytes:
        return ld4.reply(b"X" + self.serial_number.encode("ascii").ljust(8, b"\x00"))

    def _op_IR(self, data: bytes) -> bytes:
        return ld4.reply(b"IR" + self.device_id.encode("ascii").ljust(8, b"\x00")[:8])

    def _mode_change(self, opcode: bytes) -> bytes:
        mode = _MODE_COMMANDS[opcode]
        if mode != self.mode:
            if mode in (MODE_SINE, MODE_TRIANGLE, MODE_RECTANGLE):
                self._signal_t0 = time.monotonic()
            elif self.mode in (MODE_SINE, MODE_TRIANGLE, MODE_RECTANGLE):
                # leaving a signal mode: the lens is wherever the waveform left it
                now = time.monotonic()
                self._optical_from_ma, self._optical_t0 = self.commanded_current_ma(now), now
            self.mode = mode
            if mode == MODE_CURRENT:
                self._command_current(self.current_ma)
        return ld4.reply(b"M" + opcode[2:])

    def _op_MwDA(self, data: bytes) -> bytes:
        return self._mode_change(b"MwDA")

    def _op_MwSA(self, data: bytes) -> bytes:
        return self._mode_change(b"MwSA")

    def _op_MwTA(self, data: bytes) -> bytes:
        return self._mode_change(b"MwTA")

    def _op_MwQA(self, data: bytes) -> bytes:
        return self._mode_change(b"MwQA")

    def _op_MwCA(self, data: bytes) -> bytes:
        if self.mode in (MODE_SINE, MODE_TRIANGLE, MODE_RECTANGLE):
            self._mode_change(b"MwDA")
        self.mode = MODE_FOCAL_POWER
        self._op_PwDA(struct.pack(">h", self.focal_power_raw) + b"\x00\x00")
        fp_max, fp_min = self._focal_power_range_raw()
        return ld4.reply(b"MCA" + struct.pack(">Bhh", self._focal_power_status(), fp_max, fp_min))

    def _op_MMA(self, data: bytes) -> bytes:
        return ld4.reply(b"MMA" + bytes([self.mode]))

    def _op_PwTA(self, data: bytes) -> bytes:
        upper_raw, lower_raw = struct.unpack(">hh", data)
        self.temperature_limits_c = (ld4.raw_to_temperature(lower_raw), ld4.raw_to_temperature(upper_raw))
        fp_max, fp_min = self._focal_power_range_raw()
        return ld4.reply(b"PT" + struct.pack(">Bhh", self._focal_power_status(), fp_max, fp_min))

    def _op_PwDA(self, data: bytes) -> bytes:
        fp_max, fp_min = self._focal_power_range_raw()
        raw = max(fp_min, min(fp_max, struct.unpack(">h", data[:2])[0]))
        self.focal_power_raw = raw
        if self.mode == MODE_FOCAL_POWER:
            power_dpt = ld4.raw_to_focal_power(raw, self.firmware_type)
            current_ma = (power_dpt - self.FOCAL_POWER_OFFSET_DPT) / self.FOCAL_POWER_DPT_PER_MA
            self.current_raw = ld4.current_to_raw(current_ma, self.max_current_ma)
            self._command_current(current_ma)
        return b""

    def _op_PrDA(self, data: bytes) -> bytes:
        return ld4.reply(b"PD" + struct.pack(">h", self.focal_power_raw))

    def _op_PwUA(self, data: bytes) -> bytes:
        self.signal_upper_raw = struct.unpack(">h", data[:2])[0]
        return b""

    def _op_PwLA(self, data: bytes) -> bytes:
        self.signal_lower_raw = struct.unpack(">h", data[:2])[0]
        return b""

    def _op_PwFA(self, data: bytes) -> bytes:
        self.signal_frequency_mhz = struct.unpack(">I", data)[0]
        return b""

    def _op_Sr(self, data: bytes) -> bytes:
        return ld4.reply(b"S" + struct.pack(">I", 0))

    # ------------------------------------------------------------------ faults
    def corrupt(self, reply: bytes) -> bytes:
        """Break the CRC of a reply (invert its low CRC byte); ``Ready`` loses its last letter."""
        if reply == ld4.HANDSHAKE_REPLY or reply == b"N\r\n":
            return super().corrupt(reply)
        if len(reply) >= 5 and reply.endswith(ld4.CRLF):
            return reply[:-4] + bytes([reply[-4] ^ 0xFF]) + reply[-3:]
        return super().corrupt(reply)

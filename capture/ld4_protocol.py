"""Optotune Lens Driver 4 (LD4 / LD4i) serial protocol: frames, CRC, scaling, reply parsing.

Pure functions, no I/O (see HARDWARE_NOTES.md §1.1–1.4). The driver
(:mod:`capture.optotune`) and the emulator (:mod:`capture.emulators.optotune`) share it.

Wire format:

- a command is ASCII opcode letters + big-endian data bytes + CRC-16/ARC of those bytes,
  **low byte first**; the handshake ``Start`` is the one command without a CRC;
- a reply is payload + CRC-16/ARC of the payload (low byte first) + ``\\r\\n``, with a fixed
  length per command, so replies are read by length (binary payloads may contain ``0D 0A``);
- set commands (``Aw``, ``PwDA``, ``PwUA``, ``PwLA``, ``PwFA``) get no reply on success;
- an error reply is ``E`` + code byte (1 CRC failed, 2 not available in this firmware
  type, 3 not recognised, 4 lens not compatible), here taken to carry a CRC + CRLF like
  every other reply (6 bytes; the 4-byte form without CRC is accepted too); old firmware
  answers ``N\\r\\n`` to a CRC error.

Each builder returns a :class:`Command`: its complete frame, the opcode, a human label for
messages, and the fixed length of its reply in bytes (0 = no reply).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

__all__ = [
    "CRLF",
    "ERROR_MEANINGS",
    "FRAME_LENGTHS",
    "HANDSHAKE_REPLY",
    "MODE_NAMES",
    "Command",
    "LD4ErrorReply",
    "LD4ReplyError",
    "ReplyCRCError",
    "ReplyFormatError",
    "check_frame",
    "check_handshake",
    "crc16_arc",
    "current_to_raw",
    "error_reply",
    "focal_power_to_raw",
    "frame",
    "frequency_to_mhz",
    "get_active_mode",
    "get_current",
    "get_device_id",
    "get_firmware_type",
    "get_firmware_version",
    "get_firmware_version_short",
    "get_focal_power",
    "get_lower_limit",
    "get_max_current",
    "get_serial_number",
    "get_status",
    "get_temperature",
    "get_temperature_ta",
    "get_upper_limit",
    "handshake",
    "parse_active_mode",
    "parse_current_raw",
    "parse_device_id",
    "parse_error_reply",
    "parse_firmware_type",
    "parse_firmware_version",
    "parse_focal_power_range",
    "parse_focal_power_raw",
    "parse_limit_raw",
    "parse_max_current_ma",
    "parse_mode_ack",
    "parse_serial_number",
    "parse_status",
    "parse_temperature_c",
    "payload_of",
    "raw_to_current",
    "raw_to_focal_power",
    "raw_to_temperature",
    "reply",
    "set_current",
    "set_focal_power",
    "set_mode_current",
    "set_mode_focal_power",
    "set_mode_rectangular",
    "set_mode_sinusoidal",
    "set_mode_triangular",
    "set_signal_frequency",
    "set_signal_lower",
    "set_signal_upper",
    "set_temperature_limits",
    "temperature_to_raw",
]

CRLF = b"\r\n"
HANDSHAKE = b"Start"
HANDSHAKE_REPLY = b"Ready\r\n"
#: raw full scale of the current DAC (public implementations disagree: 4095 vs 4096; we use 4095)
CURRENT_FULL_SCALE = 4095
#: temperature and temperature-limit raw units per °C
TEMPERATURE_RAW_PER_C = 16
#: focal-power raw units per diopter
FOCAL_POWER_RAW_PER_DPT = 200
#: firmware type A encodes focal power with this offset (range -5 ... +15.48 dpt)
FOCAL_POWER_OFFSET_TYPE_A_DPT = 5.0
#: the lowest signal-generator frequency, Hz
MIN_FREQUENCY_HZ = 0.1

ERROR_MEANINGS = {
    1: "CRC failed (the device received a corrupted frame)",
    2: "command not available in this firmware type",
    3: "command not recognised",
    4: "lens not compatible with the firmware",
}

#: ``MMA`` reply byte -> mode name
MODE_NAMES = {
    1: "current",
    2: "sinusoidal",
    3: "triangular",
    4: "rectangular",
    5: "focal power",
    6: "analog",
    7: "position controlled",
}

#: opcode -> length of the complete command frame in bytes (data + CRC), for frame parsers.
#: ``V`` is special: ``V`` + CRC (3 bytes) and ``V`` + 00 + CRC (4 bytes) are both in use.
FRAME_LENGTHS: dict[bytes, int] = {
    HANDSHAKE: 5,  # no CRC
    b"Aw": 6,
    b"Ar": 6,
    b"CrMA": 8,
    b"CrUA": 8,
    b"CrLA": 8,
    b"CwUA": 8,
    b"CwLA": 8,
    b"TCA": 5,
    b"TA": 4,
    b"H": 3,
    b"F": 3,
    b"J": 3,
    b"V": 4,
    b"X": 3,
    b"IR": 12,
    b"MwDA": 6,
    b"MwSA": 6,
    b"MwTA": 6,
    b"MwQA": 6,
    b"MwCA": 6,
    b"MwAA": 6,
    b"MMA": 5,
    b"PwTA": 10,
    b"PwDA": 10,
    b"PrDA": 10,
    b"PwUA": 10,
    b"PwLA": 10,
    b"PwFA": 10,
    b"Sr": 4,
}


# ---------------------------------------------------------------------------------- errors
class LD4ReplyError(ValueError):
    """A reply the protocol does not allow; the driver turns it into a ProtocolError naming
    the device, port and command. ``retryable`` says whether sending again may help."""

    retryable = False


class ReplyCRCError(LD4ReplyError):
    """The reply's CRC does not match its payload (a transmission error)."""

    retryable = True


class ReplyFormatError(LD4ReplyError):
    """The reply is short, lacks its CRLF, or its payload cannot be decoded."""

    retryable = True


class LD4ErrorReply(LD4ReplyError):
    """The device answered ``E`` + code (or ``N``): it refused the command."""

    def __init__(self, code: int | None, raw: bytes) -> None:
        self.code = code
        self.raw = raw
        if code is None:
            meaning = "N (CRC failed, old firmware)"
        else:
            meaning = f"E{code}: " + ERROR_MEANINGS.get(code, "unknown error code")
        self.meaning = meaning
        super().__init__(f"device replied {meaning}")

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        """A CRC failure on the device's side is a transmission error: send again."""
        return self.code in (None, 1)


# ---------------------------------------------------------------------------------- CRC
def crc16_arc(data: bytes) -> int:
    """CRC-16/ARC (reflected poly 0xA001, init 0, no final XOR): check("123456789") = 0xBB3D.

    The CRC of a frame *including* its own CRC (low byte first) is 0.
    """
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def frame(payload: bytes) -> bytes:
    """``payload`` + its CRC-16/ARC, low byte first (a command frame)."""
    return bytes(payload) + crc16_arc(payload).to_bytes(2, "little")


def reply(payload: bytes) -> bytes:
    """A device reply: ``payload`` + CRC (low byte first) + CRLF (used by the emulator)."""
    return frame(payload) + CRLF


def error_reply(code: int) -> bytes:
    """The device's error reply ``E`` + code + CRC + CRLF."""
    return reply(b"E" + bytes([code & 0xFF]))


def check_frame(data: bytes) -> bool:
    """True when ``data`` (payload + CRC low byte first) carries a valid CRC."""
    return len(data) >= 3 and crc16_arc(data) == 0


# ---------------------------------------------------------------------------------- scaling
def _int16(value: int, what: str) -> int:
    if not -32768 <= value <= 32767:
        raise ValueError(f"{what}: raw value {value} does not fit an int16")
    return value


def current_to_raw(current_ma: float, max_current_ma: float) -> int:
    """Current in mA -> raw int16: round(I_mA * 4095 / I_max_mA)."""
    if not (math.isfinite(current_ma) and max_current_ma > 0):
        raise ValueError(f"current {current_ma} mA with I_max {max_current_ma} mA cannot be encoded")
    return _int16(round(current_ma * CURRENT_FULL_SCALE / max_current_ma), "current")


def raw_to_current(raw: int, max_current_ma: float) -> float:
    """Raw int16 current -> mA: raw * I_max_mA / 4095."""
    return raw * max_current_ma / CURRENT_FULL_SCALE


def focal_power_to_raw(power_dpt: float, firmware_type: str) -> int:
    """Focal power in diopters -> raw int16: (dpt + 5) * 200 on firmware type A, else dpt * 200."""
    if not math.isfinite(power_dpt):
        raise ValueError(f"focal power {power_dpt} dpt cannot be encoded")
    offset = FOCAL_POWER_OFFSET_TYPE_A_DPT if firmware_type == "A" else 0.0
    return _int16(round((power_dpt + offset) * FOCAL_POWER_RAW_PER_DPT), "focal power")


def raw_to_focal_power(raw: int, firmware_type: str) -> float:
    """Raw int16 focal power -> diopters (inverse of :func:`focal_power_to_raw`)."""
    offset = FOCAL_POWER_OFFSET_TYPE_A_DPT if firmware_type == "A" else 0.0
    return raw / FOCAL_POWER_RAW_PER_DPT - offset


def temperature_to_raw(temperature_c: float) -> int:
    """°C -> raw int16 in 1/16 °C."""
    if not math.isfinite(temperature_c):
        raise ValueError(f"temperature {temperature_c} °C cannot be encoded")
    return _int16(round(temperature_c * TEMPERATURE_RAW_PER_C), "temperature")


def raw_to_temperature(raw: int) -> float:
    """Raw int16 in 1/16 °C (0.0625 °C per unit) -> °C."""
    return raw / TEMPERATURE_RAW_PER_C


def frequency_to_mhz(frequency_hz: float) -> int:
    """Signal-generator frequency in Hz -> uint32 in millihertz (minimum 0.1 Hz)."""
    if not (math.isfinite(frequency_hz) and frequency_hz >= MIN_FREQUENCY_HZ):
        raise ValueError(f"frequency {frequency_hz} Hz: must be finite and >= {MIN_FREQUENCY_HZ} Hz")
    mhz = round(frequency_hz * 1000)
    if mhz > 0xFFFFFFFF:
        raise ValueError(f"frequency {frequency_hz} Hz does not fit a uint32 in mHz")
    return mhz


# ---------------------------------------------------------------------------------- commands
@dataclass(frozen=True)
class Command:
    """One command: the complete frame to write and the fixed length of its reply.

    Attributes:
        opcode: the ASCII opcode, e.g. ``"Ar"``.
        label: what it does, for messages, e.g. ``"get current"``.
        frame: the bytes to write, CRC included.
        reply_len: the reply's length in bytes including CRC and CRLF; 0 = no reply.
    """

    opcode: str
    label: str
    frame: bytes
    reply_len: int

    @property
    def description(self) -> str:
        """``"Ar (get current)"``: how messages name the command."""
        return f"{self.opcode} ({self.label})"


def _cmd(opcode: str, label: str, data: bytes, reply_payload_len: int) -> Command:
    payload = opcode.encode("ascii") + data
    reply_len = reply_payload_len + 4 if reply_payload_len else 0
    return Command(opcode, label, frame(payload), reply_len)


def handshake() -> Command:
    """``Start`` (no CRC, no terminator) -> ``Ready\\r\\n``; also resets the current to 0."""
    return Command("Start", "handshake", HANDSHAKE, len(HANDSHAKE_REPLY))


def set_current(raw: int) -> Command:
    """``Aw`` + int16 raw current (see :func:`current_to_raw`); no reply."""
    return _cmd("Aw", "set current", struct.pack(">h", _int16(raw, "current")), 0)


def get_current() -> Command:
    """``Ar`` + 00 00 -> ``x h``: the set current, raw (see :func:`raw_to_current`)."""
    return _cmd("Ar", "get current", b"\x00\x00", 3)


def get_max_current() -> Command:
    """``CrMA`` + 00 00 -> ``xxx h``: the maximum output current in 1/100 mA."""
    return _cmd("CrMA", "get maximum current", b"\x00\x00", 5)


def get_upper_limit() -> Command:
    """``CrUA`` + 00 00 -> ``xxx h``: the upper software current limit, raw current units."""
    return _cmd("CrUA", "get upper current limit", b"\x00\x00", 5)


def get_lower_limit() -> Command:
    """``CrLA`` + 00 00 -> ``xxx h``: the lower software current limit, raw current units."""
    return _cmd("CrLA", "get lower current limit", b"\x00\x00", 5)


def get_temperature() -> Command:
    """``TCA`` -> ``xxx h``: the lens temperature in 1/16 °C."""
    return _cmd("TCA", "get temperature", b"", 5)


def get_temperature_ta() -> Command:
    """``TA`` -> ``xxx h``: the lens temperature in 1/16 °C, the form the St Andrews MATLAB
    class sends (HARDWARE_NOTES §1.4, uncertain); it reads the value at the same offset as the
    ``TCA`` reply, so :func:`parse_temperature_c` decodes it. A fallback for ``TCA``."""
    return _cmd("TA", "get temperature, TA form", b"", 5)


def get_firmware_type() -> Command:
    """``H`` -> ``x c``: firmware type letter ('A', 'B', ...; sets the focal-power scaling)."""
    return _cmd("H", "get firmware type", b"", 2)


def get_firmware_version() -> Command:
    """``V`` + 00 -> ``x B B H H``: major, minor, build, revision."""
    return _cmd("V", "get firmware version", b"\x00", 7)


def get_firmware_version_short() -> Command:
    """``V`` alone (``56 80 3E``, the ``opto`` package's form) -> the same reply as
    :func:`get_firmware_version`; which form is canonical is uncertain (HARDWARE_NOTES §1.4),
    so the driver falls back to this one."""
    return _cmd("V", "get firmware version, short form", b"", 7)


def get_serial_number() -> Command:
    """``X`` -> ``x 8s``: the lens serial number, ASCII."""
    return _cmd("X", "get lens serial number", b"", 9)


def get_device_id() -> Command:
    """``IR`` + 8×00 -> ``xx 8s``: the driver's device ID, ASCII."""
    return _cmd("IR", "get device id", b"\x00" * 8, 10)


def set_mode_current() -> Command:
    """``MwDA`` -> ``MDA``: current (DC) mode."""
    return _cmd("MwDA", "set current mode", b"", 3)


def set_mode_sinusoidal() -> Command:
    """``MwSA`` -> ``MSA``: sinusoidal signal-generator mode."""
    return _cmd("MwSA", "set sinusoidal mode", b"", 3)


def set_mode_triangular() -> Command:
    """``MwTA`` -> ``MTA``: triangular signal-generator mode."""
    return _cmd("MwTA", "set triangular mode", b"", 3)


def set_mode_rectangular() -> Command:
    """``MwQA`` -> ``MQA``: rectangular signal-generator mode."""
    return _cmd("MwQA", "set rectangular mode", b"", 3)


def set_mode_focal_power() -> Command:
    """``MwCA`` -> ``xxx B h h``: focal-power (controlled) mode; status, FPmax, FPmin (raw)."""
    return _cmd("MwCA", "set focal-power mode", b"", 8)


def get_active_mode() -> Command:
    """``MMA`` -> ``xxx B``: the active mode (see :data:`MODE_NAMES`)."""
    return _cmd("MMA", "get active mode", b"", 4)


def set_temperature_limits(upper_c: float, lower_c: float) -> Command:
    """``PwTA`` + int16 T_up·16 + int16 T_low·16 -> ``xx B h h``: status, FPmax, FPmin (raw)."""
    data = struct.pack(">hh", temperature_to_raw(upper_c), temperature_to_raw(lower_c))
    return _cmd("PwTA", "set temperature limits", data, 7)


def set_focal_power(raw: int) -> Command:
    """``PwDA`` + int16 raw focal power + 00 00 (see :func:`focal_power_to_raw`); no reply."""
    return _cmd("PwDA", "set focal power", struct.pack(">h", _int16(raw, "focal power")) + b"\x00\x00", 0)


def get_focal_power() -> Command:
    """``PrDA`` + 4×00 -> ``xx h``: the focal power, raw (see :func:`raw_to_focal_power`)."""
    return _cmd("PrDA", "get focal power", b"\x00" * 4, 4)


def set_signal_upper(raw: int) -> Command:
    """``PwUA`` + int16 raw current + 00 00: signal-generator upper current; no reply."""
    return _cmd("PwUA", "set signal upper current", struct.pack(">h", _int16(raw, "current")) + b"\x00\x00", 0)


def set_signal_lower(raw: int) -> Command:
    """``PwLA`` + int16 raw current + 00 00: signal-generator lower current; no reply."""
    return _cmd("PwLA", "set signal lower current", struct.pack(">h", _int16(raw, "current")) + b"\x00\x00", 0)


def set_signal_frequency(frequency_mhz: int) -> Command:
    """``PwFA`` + uint32 BE frequency in **mHz** (see :func:`frequency_to_mhz`); no reply."""
    if not 0 <= frequency_mhz <= 0xFFFFFFFF:
        raise ValueError(f"frequency {frequency_mhz} mHz does not fit a uint32")
    return _cmd("PwFA", "set signal frequency", struct.pack(">I", frequency_mhz), 0)


def get_status() -> Command:
    """``Sr`` -> ``x I``: the status bitfield. The layout is unverified (HARDWARE_NOTES
    open question 3); we take 'S' + a 32-bit big-endian bitfield."""
    return _cmd("Sr", "get status", b"", 5)


# ---------------------------------------------------------------------------------- replies
def parse_error_reply(data: bytes) -> LD4ErrorReply | None:
    """The error carried by ``data`` when it is an error reply (``E`` + code [+ CRC] + CRLF,
    or ``N\\r\\n``), else None. The code byte may be binary (1..4) or ASCII ('1'..'4')."""
    if data == b"N\r\n":
        return LD4ErrorReply(None, data)
    if data[:1] != b"E" or not data.endswith(CRLF) or len(data) not in (4, 6):
        return None
    if len(data) == 6 and crc16_arc(data[:4]) != 0:
        return None
    code = data[1]
    if 0x30 <= code <= 0x39:
        code -= 0x30
    return LD4ErrorReply(code, data)


def payload_of(data: bytes, expected_len: int) -> bytes:
    """Check a reply's length, CRLF and CRC; return its payload (without CRC and CRLF).

    Raises:
        LD4ErrorReply: the device answered with an error reply.
        ReplyFormatError: wrong length or no CRLF.
        ReplyCRCError: the CRC does not match.
    """
    error = parse_error_reply(data)
    if error is not None:
        raise error
    if len(data) != expected_len:
        raise ReplyFormatError(f"short reply: {len(data)} of {expected_len} bytes ({data.hex(' ')})")
    if not data.endswith(CRLF):
        raise ReplyFormatError(f"reply does not end with CRLF ({data.hex(' ')})")
    body = data[:-2]
    if crc16_arc(body) != 0:
        got = int.from_bytes(body[-2:], "little")
        raise ReplyCRCError(f"reply CRC mismatch (got {got:04X}, expected {crc16_arc(body[:-2]):04X})")
    return body[:-2]


def check_handshake(data: bytes) -> None:
    """Accept exactly ``Ready\\r\\n``.

    Raises:
        LD4ErrorReply / ReplyFormatError: anything else.
    """
    if data == HANDSHAKE_REPLY:
        return
    error = parse_error_reply(data)
    if error is not None:
        raise error
    if len(data) < len(HANDSHAKE_REPLY):
        raise ReplyFormatError(f"short reply: {len(data)} of {len(HANDSHAKE_REPLY)} bytes ({data!r})")
    raise ReplyFormatError(f"expected {HANDSHAKE_REPLY!r}, got {data!r}")


def _unpack(fmt: str, payload: bytes) -> tuple:
    try:
        return struct.unpack(fmt, payload)
    except struct.error as exc:  # cannot happen after a length check; kept as a guard
        raise ReplyFormatError(f"cannot decode payload {payload.hex(' ')} as {fmt}: {exc}") from exc


def parse_current_raw(data: bytes) -> int:
    """``Ar`` reply -> raw int16 current."""
    return _unpack(">xh", payload_of(data, get_current().reply_len))[0]


def parse_max_current_ma(data: bytes) -> float:
    """``CrMA`` reply -> maximum output current in mA (raw / 100)."""
    raw = _unpack(">xxxh", payload_of(data, get_max_current().reply_len))[0]
    if raw <= 0:
        raise ReplyFormatError(f"maximum current {raw / 100:g} mA is not positive")
    return raw / 100.0


def parse_limit_raw(data: bytes) -> int:
    """``CrUA`` / ``CrLA`` reply -> raw int16 software current limit."""
    return _unpack(">xxxh", payload_of(data, get_upper_limit().reply_len))[0]


def parse_temperature_c(data: bytes) -> float:
    """``TCA`` (or ``TA``) reply -> lens temperature in °C (raw * 0.0625)."""
    return raw_to_temperature(_unpack(">xxxh", payload_of(data, get_temperature().reply_len))[0])


def parse_firmware_type(data: bytes) -> str:
    """``H`` reply -> the firmware type letter."""
    letter = payload_of(data, get_firmware_type().reply_len)[1:2]
    if not letter.isalpha():
        raise ReplyFormatError(f"firmware type {letter!r} is not a letter")
    return letter.decode("ascii")


def parse_firmware_version(data: bytes) -> str:
    """``V`` reply -> ``"major.minor.build.revision"``."""
    major, minor, build, revision = _unpack(">xBBHH", payload_of(data, get_firmware_version().reply_len))
    return f"{major}.{minor}.{build}.{revision}"


def _ascii(raw: bytes) -> str:
    return raw.rstrip(b"\x00").decode("ascii", errors="replace").strip()


def parse_serial_number(data: bytes) -> str:
    """``X`` reply -> the lens serial number."""
    return _ascii(payload_of(data, get_serial_number().reply_len)[1:])


def parse_device_id(data: bytes) -> str:
    """``IR`` reply -> the driver's device ID."""
    return _ascii(payload_of(data, get_device_id().reply_len)[2:])


def parse_active_mode(data: bytes) -> int:
    """``MMA`` reply -> mode number (see :data:`MODE_NAMES`)."""
    return _unpack(">xxxB", payload_of(data, get_active_mode().reply_len))[0]


def parse_mode_ack(data: bytes, command: Command) -> None:
    """Check the 3-byte acknowledgement (``MDA``, ``MTA``, ...) of a mode command."""
    payload = payload_of(data, command.reply_len)
    expected = b"M" + command.opcode.encode("ascii")[2:]
    if payload != expected:
        raise ReplyFormatError(f"expected acknowledgement {expected!r}, got {payload!r}")


def parse_focal_power_range(data: bytes, command: Command) -> tuple[int, int, int]:
    """``PwTA`` or ``MwCA`` reply -> (status bitfield, FPmax raw, FPmin raw).

    Status bits (manual, unverified): b7 temperature outside the user limits, b6 focal power
    outside the guaranteed range, b5 temperature outside the product spec, b4 FP inversion,
    b3 FP unreachable, b2 no temperature limits received, b1 EEPROM missing or faulty,
    b0 not all hardware available.
    """
    payload = payload_of(data, command.reply_len)
    return _unpack(">Bhh", payload[-5:])


def parse_focal_power_raw(data: bytes) -> int:
    """``PrDA`` reply -> raw int16 focal power."""
    return _unpack(">xxh", payload_of(data, get_focal_power().reply_len))[0]


def parse_status(data: bytes) -> int:
    """``Sr`` reply -> the status bitfield (layout unverified, see :func:`get_status`)."""
    return _unpack(">xI", payload_of(data, get_status().reply_len))[0]

"""A GRBL 1.1 or Marlin 2 controller driving a focus rail, on a pseudo-terminal
(``python -m capture.emulators grbl [--flavor marlin]``).

Protocol (HARDWARE_NOTES §2.4): newline-terminated lines (CR or LF), each answered with
``ok`` once it is *queued*, not once the motion is done. Motion is modelled in time: a move
of distance *d* at feed *F* (mm/min, capped at ``max_rate_mm_min``) takes ``60 d / F``
seconds (at least :attr:`GcodeEmulator.MIN_MOVE_S`), the position is interpolated linearly,
and moves queue behind each other like a planner. Commands that wait for the motion
(``G4`` / ``M400``, ``$H`` / ``G28``) answer ``ok`` only once it has finished; their reply is
released from :meth:`poll`, never by blocking the serving thread, and lines received in the
meantime are held and executed afterwards, as the firmware's serial buffer would.

GRBL flavour:

- boot banner ``Grbl 1.1h ['$' for help]``; with ``needs_homing`` it starts in the alarm
  state (homing enabled, power-up lock) and prints ``[MSG:'$H'|'$X' to unlock]``;
- real-time bytes are picked out of the stream at once: ``?`` answers
  ``<Idle|MPos:x,y,z|FS:f,0>`` (state ``Run`` while moving, ``Hold:0`` after ``!``, ``Home``
  while homing, ``Alarm`` when locked), ``!`` holds the motion, ``~`` resumes it, 0x18 is a
  soft reset (a reset during motion or homing raises ``ALARM:3`` / ``ALARM:6`` and locks; the
  banner is printed again; the parser state returns to its defaults, feed rate unset);
- an empty line gets ``ok``, like GRBL 1.1 (so a client should end lines with LF only);
- machine coordinates as stock GRBL 1.1 keeps them (no ``HOMING_FORCE_SET_ORIGIN``): the
  position is 0 at power-up, ``$H`` leaves it at ``-pulloff`` (``$27``, 1 mm) and the travel
  is ``[-max_travel_mm, 0]``;
- soft limits are on: a target outside ``[-max_travel_mm, 0]`` on any axis stops the motion
  and answers ``ALARM:2`` *instead of* ``ok``; the controller then stays locked: G-code lines
  get ``error:9`` until ``$X`` (``[MSG:Caution: Unlocked]``) or ``$H``. (Real GRBL 1.1 also
  waits for a soft reset after a limit alarm; here the reset is optional.)
- ``$H`` homes all axes in ``homing_time_s`` (position ``-pulloff``, alarm cleared), ``$$`` lists a few
  settings, ``$I`` the build info, ``$G`` the parser state, ``$X`` unlocks, ``$<n>=<v>`` stores
  a setting; an unknown ``$`` command gets ``error:3``, ``$$``/``$H`` while moving ``error:8``;
- G-code subset: ``G0 G1 G4 G17 G20 G21 G54 G90 G91 G94``, ``M5 M9``, words ``X Y Z F P N``;
  other G/M codes or letters get ``error:20``, a bad number ``error:2``, a line starting with a
  non-letter ``error:1``, a repeated word ``error:25``, a negative feed or dwell ``error:4``,
  ``G4`` without ``P`` ``error:28``, ``G1`` with no feed rate set ``error:22``.

Marlin flavour:

- boot banner ``start`` plus an ``echo:`` line; lines end with LF; empty lines are ignored;
  ``N<n>`` line numbers and ``*<checksum>`` suffixes are accepted and not checked;
- ``G0/G1`` (soft endstops *clamp* the target to ``[0, max_travel_mm]`` silently and answer
  ``ok``, as Marlin does), ``G4 P<ms>/S<s>``, ``G20/G21``, ``G90/G91``, ``G28 [X Y Z]``
  (blocking, ``ok`` after ``homing_time_s``), ``M400`` (``ok`` once the moves are done),
  ``M114`` (``X:.. Y:.. Z:.. E:0.00 Count X:.. Y:.. Z:..``, the interpolated position),
  ``M115`` (``FIRMWARE_NAME:...``), ``M211`` (the soft endstops, ``[0, max_travel_mm]``),
  ``M17 M18 M84 M110``; anything else gets
  ``echo:Unknown command: "<line>"`` then ``ok``;
- with ``needs_homing`` a move of an axis that was never homed gets ``echo:Home Z First``
  then ``ok`` and does not move (Marlin's ``NO_MOTION_BEFORE_HOMING``);
- while a command blocks for longer than 2 s it prints ``echo:busy: processing`` (host
  keepalive).

Faults (see :mod:`capture.emulators.pty_server`): G-code has no checksum, so
``corrupt_crc`` garbles the first byte of every reply line (``ok`` becomes ``nk``) and the
client sees an unparseable line; the faults also apply to the delayed replies released
from :meth:`poll` (``stall`` holds them back). :attr:`PtyEmulator.requests_served` counts
lines and real-time bytes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass

from capture.emulators.pty_server import PtyEmulator

logger = logging.getLogger(__name__)

__all__ = ["FLAVORS", "GcodeEmulator"]

FLAVORS = ("grbl", "marlin")
AXES = "XYZ"

_GRBL_BANNER = b"\r\nGrbl 1.1h ['$' for help]\r\n"
_GRBL_UNLOCK_MSG = b"[MSG:'$H'|'$X' to unlock]\r\n"
_GRBL_REALTIME = frozenset(b"?!~\x18")
_MARLIN_BANNER = b"start\necho:Marlin 2.1.2 (DualFocus emulator)\n"
_WORD = re.compile(r"([A-Z])([-+]?(?:\d+\.?\d*|\.\d+))")


@dataclass
class _Move:
    """One queued straight move, in host-monotonic time."""

    t0_s: float
    t1_s: float
    start_mm: tuple[float, float, float]
    end_mm: tuple[float, float, float]
    rate_mm_min: float


@dataclass
class _Pending:
    """A reply that waits: for the motion queue to drain, then ``dwell_s``, or until ``until_s``."""

    reply: bytes
    after_motion: bool
    dwell_s: float = 0.0
    until_s: float | None = None


class GcodeEmulator(PtyEmulator):
    """A GRBL (default) or Marlin controller with a focus rail, on a pseudo-terminal.

    Args:
        fault, fault_after: see :class:`~capture.emulators.pty_server.PtyEmulator`.
        flavor: ``"grbl"`` or ``"marlin"``.
        max_travel_mm: machine travel of every axis: ``[-max_travel_mm, 0]`` (GRBL), ``[0,
            max_travel_mm]`` (Marlin).
        max_rate_mm_min: the fastest feed (and the ``G0`` rate), mm/min.
        homing_time_s: how long ``$H`` / ``G28`` takes.
        needs_homing: GRBL starts locked in the alarm state until ``$H`` (or ``$X``); Marlin
            refuses moves of axes not yet homed.
    """

    device_name = "grbl"

    #: shortest modelled move (acceleration and step latency), s
    MIN_MOVE_S = 0.005
    #: steps per mm reported by ``$100..$102`` and used for Marlin's ``Count``
    STEPS_PER_MM = 800.0
    #: Marlin's host keepalive interval while a command blocks, s
    BUSY_INTERVAL_S = 2.0
    #: GRBL's homing pull-off (``$27``): where ``$H`` leaves the machine position, negated, mm
    PULLOFF_MM = 1.0

    def __init__(
        self,
        *,
        fault: str | None = None,
        fault_after: int = 0,
        flavor: str = "grbl",
        max_travel_mm: float = 50.0,
        max_rate_mm_min: float = 1200.0,
        homing_time_s: float = 0.2,
        needs_homing: bool = False,
    ) -> None:
        super().__init__(fault=fault, fault_after=fault_after)
        if flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {flavor!r}; valid: {', '.join(FLAVORS)}")
        if not (math.isfinite(max_travel_mm) and max_travel_mm > 0):
            raise ValueError(f"max_travel_mm must be finite and > 0, got {max_travel_mm}")
        if not (math.isfinite(max_rate_mm_min) and max_rate_mm_min > 0):
            raise ValueError(f"max_rate_mm_min must be finite and > 0, got {max_rate_mm_min}")
        if not (math.isfinite(homing_time_s) and homing_time_s >= 0):
            raise ValueError(f"homing_time_s must be finite and >= 0, got {homing_time_s}")
        self.flavor = flavor
        self.max_travel_mm = float(max_travel_mm)
        self.max_rate_mm_min = float(max_rate_mm_min)
        self.homing_time_s = float(homing_time_s)
        self.needs_homing = bool(needs_homing)
        self._eol = b"\r\n" if flavor == "grbl" else b"\n"
        self._state_lock = threading.RLock()
        self._buffer = bytearray()
        self._rest_mm = [0.0, 0.0, 0.0]  # position once every finished move is applied
        self._moves: deque[_Move] = deque()
        self._hold_since_s: float | None = None
        self._homing_until_s: float | None = None
        self._homing_axes = ""
        self._homed_axes: set[str] = set()
        #: GRBL: what the user's startup blocks (``$N0=...``) print after a reset and after homing,
        #: e.g. ``b">G54:ok\r\n"`` (none by default)
        self.startup_echo = b""
        #: Marlin: False answers G20/G21 with "Unknown command" (a build without INCH_MODE_SUPPORT)
        self.inch_support = True
        self._locked = flavor == "grbl" and self.needs_homing
        self.alarm_code: int | None = None  # the last GRBL alarm raised (None = none)
        self._blocked: _Pending | None = None
        self._held: deque[bytes] = deque()
        self._busy_since_s = 0.0
        self.settings: dict[int, float] = {
            20: 1.0,  # soft limits on
            21: 0.0,  # hard limits off
            22: 1.0,  # homing on
            23: 0.0,  # homing direction mask: every axis homes toward positive (the stock default)
            27: self.PULLOFF_MM,
            100: self.STEPS_PER_MM,
            101: self.STEPS_PER_MM,
            102: self.STEPS_PER_MM,
            110: self.max_rate_mm_min,
            111: self.max_rate_mm_min,
            112: self.max_rate_mm_min,
            130: self.max_travel_mm,
            131: self.max_travel_mm,
            132: self.max_travel_mm,
        }
        self._reset_parser()

    def _reset_parser(self) -> None:
        """The G-code parser's power-up state."""
        self._absolute = True
        self._mm_per_unit = 1.0
        self._motion_mode = 0
        # GRBL starts with the feed rate unset; Marlin has a default feed rate
        self._feed_mm_min: float | None = None if self.flavor == "grbl" else min(3000.0, self.max_rate_mm_min)

    def start(self) -> GcodeEmulator:
        """Open the pseudo-terminal and print the boot banner, as a board does on power-up
        (before any client opens the port; pyserial drops it on open, a reader sees it)."""
        super().start()
        banner = _GRBL_BANNER + (_GRBL_UNLOCK_MSG if self._locked else b"") if self.flavor == "grbl" else _MARLIN_BANNER
        with self._lock:
            fd = self._master_fd
            if fd is not None:
                try:
                    os.write(fd, banner)
                except OSError as exc:
                    logger.debug("%s emulator: banner not written: %s", self.flavor, exc)
        return self

    # ------------------------------------------------------------------ readable state
    @property
    def position_mm(self) -> tuple[float, float, float]:
        """Where the axes (X, Y, Z) are now, mm."""
        with self._state_lock:
            return self._position_at(time.monotonic())

    @property
    def state(self) -> str:
        """The GRBL state name (``Idle``, ``Run``, ``Hold:0``, ``Home``, ``Alarm``)."""
        with self._state_lock:
            return self._state(time.monotonic())

    @property
    def homed(self) -> bool:
        """Whether every axis has been homed since start."""
        with self._state_lock:
            return set(AXES) <= self._homed_axes

    # ------------------------------------------------------------------ motion model
    def _position_at(self, t_s: float) -> tuple[float, float, float]:
        if self._hold_since_s is not None:
            t_s = min(t_s, self._hold_since_s)
        pos = tuple(self._rest_mm)
        for move in self._moves:
            if t_s >= move.t1_s:
                pos = move.end_mm
                continue
            if t_s > move.t0_s:
                f = (t_s - move.t0_s) / (move.t1_s - move.t0_s)
                pos = tuple(a + f * (b - a) for a, b in zip(move.start_mm, move.end_mm))
            break
        return pos  # type: ignore[return-value]

    def _advance(self, now_s: float) -> None:
        """Retire the moves that have finished by ``now_s``."""
        t_s = now_s if self._hold_since_s is None else self._hold_since_s
        while self._moves and self._moves[0].t1_s <= t_s:
            self._rest_mm = list(self._moves.popleft().end_mm)

    def _planned_mm(self) -> tuple[float, float, float]:
        """The position once every queued move is done."""
        return self._moves[-1].end_mm if self._moves else tuple(self._rest_mm)  # type: ignore[return-value]

    def _motion_end_s(self, now_s: float) -> float:
        return max(now_s, self._moves[-1].t1_s) if self._moves else now_s

    def _stop_motion(self, now_s: float) -> None:
        """Stop dead where the axes are (reset, limit alarm); the queue is dropped."""
        self._rest_mm = list(self._position_at(now_s))
        self._moves.clear()
        self._hold_since_s = None

    def _queue_move(self, target_mm: tuple[float, float, float], rate_mm_min: float, now_s: float) -> None:
        start = self._planned_mm()
        distance_mm = math.dist(start, target_mm)
        if distance_mm <= 0.0:
            return
        rate = min(rate_mm_min, self.max_rate_mm_min)
        duration_s = max(distance_mm / (rate / 60.0), self.MIN_MOVE_S)
        t0 = self._motion_end_s(now_s)
        self._moves.append(_Move(t0, t0 + duration_s, start, target_mm, rate))

    def _current_rate(self, now_s: float) -> float:
        if self._hold_since_s is not None:
            return 0.0
        for move in self._moves:
            if move.t0_s <= now_s < move.t1_s:
                return move.rate_mm_min
        return 0.0

    def _state(self, now_s: float) -> str:
        self._advance(now_s)
        if self._homing_until_s is not None:
            return "Home"
        if self._locked:
            return "Alarm"
        if self._hold_since_s is not None:
            return "Hold:0"
        return "Run" if self._moves else "Idle"

    def _start_homing(self, axes: str, now_s: float) -> None:
        """Home ``axes`` once the queued motion is done; ``ok`` when homing ends."""
        start_s = self._motion_end_s(now_s)
        self._homing_until_s = start_s + self.homing_time_s
        self._homing_axes = axes
        echo = self.startup_echo if self.flavor == "grbl" else b""  # GRBL runs its startup blocks after homing
        self._block(_Pending(echo + b"ok" + self._eol, after_motion=False, until_s=self._homing_until_s), now_s)

    def _finish_homing(self) -> None:
        self._moves.clear()
        for axis in self._homing_axes:
            self._rest_mm[AXES.index(axis)] = -self.PULLOFF_MM if self.flavor == "grbl" else 0.0
            self._homed_axes.add(axis)
        self._homing_until_s = None
        self._homing_axes = ""
        self._locked = False
        logger.debug("%s emulator: homed, position %s", self.flavor, self._rest_mm)

    def _block(self, pending: _Pending, now_s: float) -> None:
        self._blocked = pending
        self._busy_since_s = now_s

    # ------------------------------------------------------------------ serving hooks
    def handle(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Split ``data`` into lines (and GRBL real-time bytes) and answer each."""
        out: list[tuple[bytes, bytes]] = []
        with self._state_lock:
            now = time.monotonic()
            self._advance(now)
            for byte in data:
                if self.flavor == "grbl" and byte in _GRBL_REALTIME:
                    out.append((bytes([byte]), self._realtime(byte, now)))
                    continue
                if self.flavor == "grbl" and byte >= 0x80:
                    continue  # GRBL 1.1 extended real-time commands (overrides): ignored
                if byte not in (0x0A, 0x0D):
                    self._buffer.append(byte)
                    continue
                line = bytes(self._buffer)
                self._buffer.clear()
                if self.flavor == "marlin" and not line.strip():
                    continue  # Marlin ignores empty lines
                if self._blocked is not None or self._held:
                    self._held.append(line)  # the firmware is busy: executed once it is done
                    out.append((line, b""))
                else:
                    out.append((line, self._execute(line, now)))
        return out

    def poll(self) -> bytes:
        """The delayed replies whose motion, homing or dwell is done; Marlin's keepalives."""
        with self._state_lock:
            now = time.monotonic()
            self._advance(now)
            if self._homing_until_s is not None and now >= self._homing_until_s:
                self._finish_homing()
            out = bytearray()
            fault = self._active_fault()
            if fault != "stall":
                released = self._release(now)
                if released and fault == "corrupt_crc":
                    released = self.corrupt(released)
                elif released and fault == "drop_bytes":
                    released = released[:-1]
                out += released
            # a stalled (hung) firmware sends nothing, its busy keepalive included
            if fault != "stall" and self.flavor == "marlin" and self._blocked is not None and now - self._busy_since_s >= self.BUSY_INTERVAL_S:
                out += b"echo:busy: processing\n"
                self._busy_since_s = now
            return bytes(out)

    def _release(self, now_s: float) -> bytes:
        out = bytearray()
        while self._blocked is not None:
            pending = self._blocked
            if pending.until_s is None:
                if pending.after_motion and (self._moves or self._hold_since_s is not None):
                    break
                pending.until_s = now_s + pending.dwell_s
            if now_s < pending.until_s:
                break
            out += pending.reply
            self._blocked = None
            while self._held and self._blocked is None:
                out += self._execute(self._held.popleft(), now_s)
        return bytes(out)

    def corrupt(self, reply: bytes) -> bytes:
        """G-code has no checksum: flip a bit of the first byte of every reply line, so that
        ``ok`` reads ``nk`` and ``<Idle|...>`` reads ``=Idle|...>``."""
        lines = reply.split(b"\n")
        garbled = []
        for line in lines:
            body = line.lstrip(b"\r")
            lead = line[: len(line) - len(body)]
            if body and body != b"\r":
                body = bytes([body[0] ^ 0x01]) + body[1:]
            garbled.append(lead + body)
        return b"\n".join(garbled)

    # ------------------------------------------------------------------ GRBL
    def _realtime(self, byte: int, now_s: float) -> bytes:
        if byte == ord("?"):
            return self._status_report(now_s)
        if byte == ord("!"):
            if self._moves and self._hold_since_s is None and self._homing_until_s is None:
                self._hold_since_s = now_s
            return b""
        if byte == ord("~"):
            if self._hold_since_s is not None:
                delta = now_s - self._hold_since_s
                for move in self._moves:
                    move.t0_s += delta
                    move.t1_s += delta
                self._hold_since_s = None
            return b""
        return self._soft_reset(now_s)

    def _status_report(self, now_s: float) -> bytes:
        state = self._state(now_s)
        x, y, z = self._position_at(now_s)
        rate = self._current_rate(now_s)
        return f"<{state}|MPos:{x:.3f},{y:.3f},{z:.3f}|FS:{rate:.0f},0>".encode() + self._eol

    def _soft_reset(self, now_s: float) -> bytes:
        out = bytearray()
        if self._homing_until_s is not None:
            self._homing_until_s = None
            self._homing_axes = ""
            self._stop_motion(now_s)
            self._locked = True
            self.alarm_code = 6
            out += b"ALARM:6\r\n"
        elif self._moves:
            self._stop_motion(now_s)
            self._locked = True
            self.alarm_code = 3
            out += b"ALARM:3\r\n"
        self._hold_since_s = None
        self._blocked = None
        self._held.clear()
        self._buffer.clear()
        self._reset_parser()
        out += _GRBL_BANNER + self.startup_echo
        if self._locked:
            out += _GRBL_UNLOCK_MSG
        return bytes(out)

    def _execute(self, raw: bytes, now_s: float) -> bytes:
        text = raw.decode("ascii", errors="replace")
        logger.debug("%s emulator <- %r", self.flavor, text)
        if self.flavor == "grbl":
            return self._execute_grbl(text, now_s)
        return self._execute_marlin(text, now_s)

    def _ok(self) -> bytes:
        return b"ok" + self._eol

    @staticmethod
    def _error(code: int) -> bytes:
        return f"error:{code}\r\n".encode()

    def _execute_grbl(self, text: str, now_s: float) -> bytes:
        line = re.sub(r"\([^)]*\)", "", text.split(";", 1)[0])
        line = "".join(line.split()).upper()
        if not line:
            return self._ok()
        if line.startswith("$"):
            return self._grbl_system(line, now_s)
        if self._locked:
            return self._error(9)
        return self._grbl_gcode(line, now_s)

    def _grbl_system(self, line: str, now_s: float) -> bytes:
        eol = self._eol
        moving = bool(self._moves) and not self._locked
        if line == "$":
            return b"[HLP:$$ $# $G $I $N $x=val $Nx=line $J=line $SLP $C $X $H ~ ! ? ctrl-x]" + eol + self._ok()
        if line == "$$":
            if moving:
                return self._error(8)
            body = b"".join(f"${key}={value:.3f}".encode() + eol if key >= 100 else f"${key}={value:.0f}".encode() + eol for key, value in sorted(self.settings.items()))
            return body + self._ok()
        if line == "$I":
            return b"[VER:1.1h.20190825:DualFocus emulator]" + eol + b"[OPT:V,15,128]" + eol + self._ok()
        if line == "$G":
            units = "G21" if self._mm_per_unit == 1.0 else "G20"
            dist = "G90" if self._absolute else "G91"
            feed = 0.0 if self._feed_mm_min is None else self._feed_mm_min / self._mm_per_unit
            return f"[GC:G{self._motion_mode} G54 G17 {units} {dist} G94 M5 M9 T0 F{feed:g} S0]".encode() + eol + self._ok()
        if line == "$N":
            return b"$N0=" + eol + b"$N1=" + eol + self._ok()
        if line == "$X":
            if self._locked:
                self._locked = False
                return b"[MSG:Caution: Unlocked]" + eol + self._ok()
            return self._ok()
        if line == "$H":
            if self.settings.get(22, 1.0) == 0:
                return self._error(5)
            if moving:
                return self._error(8)
            self._start_homing(AXES, now_s)
            return b""
        match = re.fullmatch(r"\$(\d+)=(.*)", line)
        if match:
            key = int(match.group(1))
            if key not in self.settings:
                return self._error(3)
            try:
                value = float(match.group(2))
            except ValueError:
                return self._error(2)
            if value < 0:
                return self._error(4)
            self.settings[key] = value
            return self._ok()
        return self._error(3)

    def _grbl_gcode(self, line: str, now_s: float) -> bytes:
        words: list[tuple[str, float]] = []
        pos = 0
        while pos < len(line):
            match = _WORD.match(line, pos)
            if match is None:
                return self._error(2 if line[pos].isalpha() else 1)
            words.append((match.group(1), float(match.group(2))))
            pos = match.end()
        motion: int | None = None
        dwell = False
        values: dict[str, float] = {}
        units, absolute = self._mm_per_unit, self._absolute
        for letter, number in words:
            if letter == "G":
                if number in (0.0, 1.0):
                    motion = int(number)
                elif number == 4.0:
                    dwell = True
                elif number in (20.0, 21.0):
                    units = 25.4 if number == 20.0 else 1.0
                elif number in (90.0, 91.0):
                    absolute = number == 90.0
                elif number not in (17.0, 54.0, 94.0):
                    return self._error(20)
            elif letter == "M":
                if number not in (5.0, 9.0):
                    return self._error(20)
            elif letter in "XYZFPN":
                if letter in values:
                    return self._error(25)
                values[letter] = number
            else:
                return self._error(20)
        axis_words = {a: values[a] for a in AXES if a in values}
        if dwell and axis_words:
            return self._error(24)
        if "F" in values and values["F"] < 0:
            return self._error(4)
        # execution order of a block: feed, units, distance mode, dwell, motion
        feed = self._feed_mm_min if "F" not in values else values["F"] * units
        if dwell:
            if "P" not in values:
                return self._error(28)
            if values["P"] < 0:
                return self._error(4)
        if axis_words:
            mode = self._motion_mode if motion is None else motion
            if mode == 1 and not feed:
                return self._error(22)
            planned = self._planned_mm()
            target = tuple(
                (axis_words[a] * units if absolute else planned[i] + axis_words[a] * units) if a in axis_words else planned[i]
                for i, a in enumerate(AXES)
            )
            eps = 1e-6
            if any(not (-self.max_travel_mm - eps <= v <= eps) for v in target):
                self._stop_motion(now_s)
                self._locked = True
                self.alarm_code = 2
                logger.debug("grbl emulator: soft limit, target %s", target)
                return b"ALARM:2\r\n"
        # the block is valid: apply it
        self._mm_per_unit, self._absolute, self._feed_mm_min = units, absolute, feed
        if motion is not None:
            self._motion_mode = motion
        if dwell:
            self._block(_Pending(self._ok(), after_motion=True, dwell_s=values["P"]), now_s)
            return b""
        if axis_words:
            rate = self.max_rate_mm_min if self._motion_mode == 0 else float(feed)  # type: ignore[arg-type]
            self._queue_move(target, rate, now_s)  # type: ignore[arg-type]
        return self._ok()

    # ------------------------------------------------------------------ Marlin
    def _execute_marlin(self, text: str, now_s: float) -> bytes:
        line = text.split(";", 1)[0].strip()
        line = re.sub(r"^N\d+\s*", "", line, flags=re.IGNORECASE)
        line = re.sub(r"\*\d+$", "", line).strip()
        if not line:
            return b""
        tokens = line.split()
        command = tokens[0].upper()
        params: dict[str, float | None] = {}
        for token in tokens[1:]:
            letter, rest = token[0].upper(), token[1:]
            try:
                params[letter] = float(rest) if rest else None
            except ValueError:
                params[letter] = None
        ok = self._ok()
        if command in ("G0", "G1"):
            return self._marlin_move(command, params, now_s)
        if command == "G4":
            dwell_s = (params.get("P") or 0.0) / 1000.0 + (params.get("S") or 0.0)
            self._block(_Pending(ok, after_motion=True, dwell_s=max(0.0, dwell_s)), now_s)
            return b""
        if command in ("G20", "G21") and not self.inch_support:  # Marlin 1.1 without INCH_MODE_SUPPORT
            return f'echo:Unknown command: "{line}"\n'.encode() + ok
        if command in ("G20", "G21"):
            self._mm_per_unit = 25.4 if command == "G20" else 1.0
            return ok
        if command in ("G90", "G91"):
            self._absolute = command == "G90"
            return ok
        if command == "G28":
            axes = "".join(a for a in AXES if a in params) or AXES
            self._start_homing(axes, now_s)
            return b""
        if command == "M400":
            self._block(_Pending(ok, after_motion=True), now_s)
            return b""
        if command == "M114":
            x, y, z = self._position_at(now_s)
            counts = " ".join(f"{a}:{round(v * self.STEPS_PER_MM)}" for a, v in zip(AXES, (x, y, z)))
            return f"X:{x:.2f} Y:{y:.2f} Z:{z:.2f} E:0.00 Count {counts}\n".encode() + ok
        if command == "M115":
            return (
                b"FIRMWARE_NAME:Marlin 2.1.2 (DualFocus emulator) SOURCE_CODE_URL:none PROTOCOL_VERSION:1.0 "
                b"MACHINE_TYPE:focus rail EXTRUDER_COUNT:0\nCap:EMERGENCY_PARSER:0\nCap:AUTOREPORT_POS:0\n" + ok
            )
        if command == "M211":
            m = self.max_travel_mm
            return (f"echo:Soft endstops: On   Min:  X0.00 Y0.00 Z0.00   Max:  X{m:.2f} Y{m:.2f} Z{m:.2f}\n").encode() + ok
        if command in ("M17", "M18", "M84", "M110"):
            return ok
        return f'echo:Unknown command: "{line}"\n'.encode() + ok

    def _marlin_move(self, command: str, params: dict[str, float | None], now_s: float) -> bytes:
        ok = self._ok()
        if params.get("F") is not None and params["F"] > 0:  # type: ignore[operator]
            self._feed_mm_min = float(params["F"]) * self._mm_per_unit  # type: ignore[arg-type]
        axis_words = {a: params[a] for a in AXES if params.get(a) is not None}
        if not axis_words:
            return ok
        if self.needs_homing:
            unhomed = "".join(a for a in axis_words if a not in self._homed_axes)
            if unhomed:
                return f"echo:Home {unhomed} First\n".encode() + ok
        planned = self._planned_mm()
        target = []
        for i, a in enumerate(AXES):
            if a not in axis_words:
                target.append(planned[i])
                continue
            value = float(axis_words[a]) * self._mm_per_unit  # type: ignore[arg-type]
            value = value if self._absolute else planned[i] + value
            target.append(min(max(value, 0.0), self.max_travel_mm))  # soft endstops clamp
        rate = self.max_rate_mm_min if command == "G0" else float(self._feed_mm_min or self.max_rate_mm_min)
        self._queue_move(tuple(target), rate, now_s)  # type: ignore[arg-type]
        return ok

"""A motorised focus stage on a G-code controller (GRBL 1.1 or Marlin 2) over a serial port.

Protocol (HARDWARE_NOTES §2.4): one line at a time, each answered with ``ok`` (queued, not
finished) or refused with ``error:N`` (GRBL) / ``echo:Unknown command`` or ``Error:`` then
``ok`` (Marlin); GRBL may print ``ALARM:N`` at any time. The driver never has more than one
line outstanding, ends lines with LF only (GRBL acks an empty line, so CRLF would produce a
second ``ok``), and every read has a finite deadline.

Life cycle of :meth:`GcodeFocusStage.open`:

1. open the port (or start an in-process :class:`~capture.emulators.gcode.GcodeEmulator` for
   ``port="emulator"``) and drop stale input;
2. wake and identify: GRBL gets a soft reset (0x18; the stage is not moving at this point)
   and must answer with its ``Grbl x.y`` banner, then ``$I`` (build info, logged); Marlin gets
   ``M115`` (``FIRMWARE_NAME``, logged). Each is tried twice, since a board that resets when
   the port opens (DTR) can miss the first one while its boot loader runs;
3. GRBL: ``?``; in the alarm state (homing required at power-up, or a limit alarm) the open
   fails with a message that says to home, unless ``home_on_start`` is set. The driver never
   sends ``$X`` by itself (that would trust a position nobody checked); :meth:`unlock` does it
   when the caller asks;
4. home if ``home_on_start`` (``$H`` / ``G28 <axis>``, waiting up to ``move_timeout_s``);
5. ``G21`` and ``G90`` (Marlin builds without inch support answer "Unknown command" to
   ``G21``; they are always in millimetres, so that is accepted);
6. the travel: GRBL's ``$$`` (max travel ``$130..$135``, homing ``$22``, homing direction
   ``$23``) and the build options of ``$I`` (``Z``: ``HOMING_FORCE_SET_ORIGIN``) give the axis's
   machine travel: ``[-max_travel, 0]`` (stock GRBL: homing leaves the machine position at
   ``-pulloff``, and soft limits allow ``[-max_travel, 0]`` whatever the homing direction), or
   ``[0, max_travel]`` when the origin is forced and the axis homes toward negative. Given
   ``limits_mm`` must lie inside it (in work coordinates), or the open fails naming the
   travel: a stage told ``[0, 50]`` on a stock GRBL would drive past its home switch. Without
   ``limits_mm`` the limits are that travel, up to the homed position at the switch's end.
   Marlin: ``M211`` reports the soft endstops, used the same way (Marlin homes to its
   minimum, travel ``[0, max]``). A controller that reports no travel (homing off, or no
   ``M211``) needs ``limits_mm``.

Moves are absolute ``G1 <axis><mm> F<feed>``. Settling: GRBL polls the real-time ``?``
status until ``Idle`` and then confirms with ``G4 P0`` (GRBL can still report ``Idle`` for
an instant after acking a move it has not started; a dwell waits for the planner to
drain), Marlin sends ``M400``. Either wait is bounded by ``move_timeout_s`` and, inside
:meth:`wait_settled`, by its ``timeout_s``; a sync line still outstanding when that expires
is awaited before the next line is sent. :meth:`wait_settled` returns the time the ``ok``
of the sync line arrived (not the time the last poll started).

Errors: ``error:N`` -> :class:`ProtocolError` with the line and the code's meaning;
``ALARM:N`` -> :class:`DeviceError` with the alarm's meaning; silence ->
:class:`DeviceTimeout`; an unparseable line -> :class:`ProtocolError`; the port vanishing
-> :class:`DeviceError`. Every message names the port and the line sent.

Marlin has no real-time status: :meth:`status` sends ``M114`` and reports the state
``Idle`` once an ``M400`` has completed since the last move, else ``Unknown``. Marlin's
soft endstops clamp a target silently; the driver's ``limits_mm`` are the protection.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Literal

from capture.devices import FocusActuator, SettleTimeout
from capture.errors import DeviceError, DeviceTimeout, InputError, ProtocolError

logger = logging.getLogger(__name__)

__all__ = ["GRBL_ALARMS", "GRBL_ERRORS", "GcodeFocusStage", "StageStatus"]

#: GRBL 1.1 ``error:N`` codes -> meaning (our wording)
GRBL_ERRORS: dict[int, str] = {
    1: "expected a command letter (a G-code word must start with a letter)",
    2: "bad number format (a word's value is missing or malformed)",
    3: "'$' system command not recognised or not supported",
    4: "a negative value was given where a positive one is required",
    5: "homing is not enabled in the settings ($22)",
    6: "step pulse time must be at least 3 us",
    7: "EEPROM read failed; settings were restored to defaults",
    8: "'$' command refused unless the controller is idle",
    9: "G-code locked out during an alarm or jog (home with $H or unlock with $X)",
    10: "soft limits need homing to be enabled",
    11: "line too long; it was not executed",
    12: "setting exceeds the maximum step rate",
    13: "safety door opened",
    14: "build info or startup line too long for the EEPROM",
    15: "jog target exceeds the machine travel",
    16: "invalid jog command",
    17: "laser mode needs PWM output",
    20: "unsupported or invalid G-code command",
    21: "two G-code commands of the same modal group in one line",
    22: "feed rate not set",
    23: "the G-code command needs an integer value",
    24: "two G-code commands in one line both need the axis words",
    25: "a G-code word is repeated in the line",
    26: "the G-code command needs axis words but has none",
    27: "line number out of range",
    28: "the G-code command is missing a required P or L value",
    29: "unsupported work coordinate system",
    30: "G53 needs G0 or G1 motion mode",
    31: "unused axis words with motion mode G80",
    32: "arc without axis words in the selected plane",
    33: "invalid motion target",
    34: "arc radius definition failed",
    35: "arc offset definition is missing its offset words",
    36: "unused G-code words left in the line",
    37: "tool length offset on an axis other than the configured one",
    38: "tool number too large",
}

#: GRBL 1.1 ``ALARM:N`` codes -> meaning (our wording)
GRBL_ALARMS: dict[int, str] = {
    1: "hard limit: a limit switch was hit during motion; the position is likely lost, home again",
    2: "soft limit: the motion target is outside the machine travel; the position is kept, unlock to continue",
    3: "reset while in motion: the position is lost, home again",
    4: "probe fail: the probe was not in its expected state before probing",
    5: "probe fail: the probe made no contact within the programmed travel",
    6: "homing fail: the homing cycle was reset",
    7: "homing fail: the safety door opened during homing",
    8: "homing fail: could not pull off the limit switch (check the pull-off distance and wiring)",
    9: "homing fail: limit switch not found within the search distance (check the switch and wiring)",
    10: "homing fail: the second switch of a dual-motor axis was not found",
}

_AXES = "XYZABC"
_READ_SLICE_S = 0.01  # pyserial read timeout; every wait loops on its own deadline
_QUIET_S = 0.05  # silence that ends a drain of stale input
STATUS_POLL_S = 0.1  # between two status queries while a move runs (GRBL: 5-10 Hz at most)
_FAST_STATUS_POLL_S = 0.02  # ... for the first _FAST_STATUS_WINDOW_S after the move's expected end at its feed rate
_FAST_STATUS_WINDOW_S = 0.1
def _plain_number(value: float) -> str:
    """``value`` as G-code takes it: fixed point, no exponent (``{:g}`` writes 2e+06, which
    GRBL refuses with error:20), trailing zeros dropped: 600 -> "600", 2.5 -> "2.5"."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


#: Marlin answers M400 only when the moves are done, and meanwhile sends "echo:busy: processing"
#: every 2 s (HOST_KEEPALIVE_FEATURE, on by default): this long (or 4x the move's duration at its
#: feed rate, if longer) without a byte while waiting, and as long past the move's expected end,
#: it is taken as silent (hung, unplugged)
MARLIN_SILENCE_S = 5.0
_CHECK_S = 0.01  # wait_settled's own loop (abort checks, the sync ok read in slices)
_SYNC_LINE = {"grbl": "G4 P0", "marlin": "M400"}
_MARLIN_POSITION = re.compile(r"([XYZE]):\s*(-?\d+(?:\.\d*)?)")


@dataclass(frozen=True)
class StageStatus:
    """One status reading.

    Attributes:
        state: GRBL's state (``Idle``, ``Run``, ``Hold:0``, ``Home``, ``Alarm`` ...); for
            Marlin ``Idle`` (an ``M400`` completed since the last move) or ``Unknown``.
        position_mm: the stage axis in work coordinates (what ``G1`` targets), mm.
        machine_mm: every reported axis in machine coordinates (GRBL ``MPos``; Marlin the
            ``X Y Z`` of ``M114``), mm.
        raw: the line it was parsed from.
    """

    state: str
    position_mm: float
    machine_mm: tuple[float, ...]
    raw: str


class GcodeFocusStage(FocusActuator):
    """A focus rail driven by GRBL or Marlin; positions in mm.

    Args:
        port: serial device (``/dev/ttyUSB0``, ``/dev/serial/by-id/...``, ``COM3``), or
            ``"emulator"`` to start an in-process emulator (:attr:`emulator`).
        flavor: ``"grbl"`` or ``"marlin"``.
        axis: the axis letter the focus rail is on.
        home_on_start: home during :meth:`open` (required when GRBL boots locked).
        limits_mm: soft limits checked before any line is sent, mm (absolute, work
            coordinates; a stock GRBL machine's travel is negative, ``[-max_travel, 0]``).
            None: the controller's own travel, read on open (see the module doc).
        feed_mm_min: feed rate of every move, mm/min.
        timeout_s: longest wait for the reply to an ordinary line.
        move_timeout_s: longest wait for homing or for a move to finish.
        baudrate: serial speed (115200 for GRBL 1.1 and most Marlin boards).
        name: device name used in logs and errors (default names flavor, axis and port).
    """

    unit = "mm"

    def __init__(
        self,
        port: str,
        *,
        flavor: Literal["grbl", "marlin"] = "grbl",
        axis: str = "Z",
        home_on_start: bool = True,
        limits_mm: tuple[float, float] | None = None,
        feed_mm_min: float = 600.0,
        timeout_s: float = 2.0,
        move_timeout_s: float = 30.0,
        baudrate: int = 115200,
        name: str | None = None,
    ) -> None:
        if flavor not in _SYNC_LINE:
            raise InputError(f"gcode stage: flavor must be 'grbl' or 'marlin', got {flavor!r}")
        axis = str(axis).upper()
        allowed_axes = _AXES if flavor == "grbl" else "XYZ"
        if len(axis) != 1 or axis not in allowed_axes:
            raise InputError(f"gcode stage: axis must be one of {', '.join(allowed_axes)}, got {axis!r}")
        if limits_mm is not None:
            lo, hi = (float(v) for v in limits_mm)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise InputError(f"gcode stage: limits_mm must be finite with low < high, got {limits_mm}")
        for what, value in (("feed_mm_min", feed_mm_min), ("timeout_s", timeout_s), ("move_timeout_s", move_timeout_s)):
            if not (math.isfinite(value) and value > 0):
                raise InputError(f"gcode stage: {what} must be finite and > 0, got {value}")
        if feed_mm_min < 0.01:
            raise InputError(f"gcode stage: feed_mm_min must be at least 0.01 mm/min (written with 3 decimals), got {feed_mm_min}")
        if int(baudrate) <= 0:
            raise InputError(f"gcode stage: baudrate must be > 0, got {baudrate}")
        if not port:
            raise InputError("gcode stage: port is empty (give a serial device path or 'emulator')")
        super().__init__(name=name or f"{flavor} {axis}-axis focus stage")
        self.port = port
        self.flavor = flavor
        self.axis = axis
        self.home_on_start = bool(home_on_start)
        #: the limits given, or None: the controller's travel, read on open
        self.limits_given: tuple[float, float] | None = None if limits_mm is None else (lo, hi)
        self._limits = self.limits_given or (0.0, 0.0)
        self._force_origin = False  # GRBL built with HOMING_FORCE_SET_ORIGIN ($I option Z)
        self.feed_mm_min = float(feed_mm_min)
        self.timeout_s = float(timeout_s)
        self.move_timeout_s = float(move_timeout_s)
        self.baudrate = int(baudrate)
        #: the in-process emulator when ``port == "emulator"`` (started on open, stopped on close)
        self.emulator = None
        #: firmware identification read on open (banner / ``$I`` / ``M115``)
        self.firmware = ""
        self._port_path = port
        self._serial = None
        self._rx = bytearray()
        self._io_lock = threading.RLock()
        self._target_mm = self._limits[0]
        self._synced = True  # no move since the last confirmed sync
        self._sync: tuple[str, float] | None = None  # (sync line, deadline) awaiting its ok
        self._settled_at_s: float | None = None
        self._last_status: StageStatus | None = None  # the last status report seen while waiting to settle
        self._next_status_s = -math.inf  # no '?' before this (host monotonic): the move cannot have ended yet
        self._expect_done_s = -math.inf  # when the last move would end at its feed rate
        self._expect_duration_s = 0.0  # how long the last move takes at its feed rate
        self._sync_sent_s = -math.inf  # when the outstanding sync line was sent
        self._last_rx_s = -math.inf  # when the last bytes came in
        self._settle_deadline_s: float | None = None
        self._dirty = False  # an exchange failed: drop stale input before the next line
        self._wco_mm: tuple[float, ...] | None = None

    # ------------------------------------------------------------------ role properties
    @property
    def limits(self) -> tuple[float, float]:
        """The soft limits in force, mm: those given, or (once open) the controller's travel."""
        if self.limits_given is None and not self.is_open:
            raise DeviceError(f"{self._label()}: the limits come from the controller's travel, read on open; open the stage first")
        return self._limits

    @property
    def target(self) -> float:
        return self._target_mm

    @property
    def port_path(self) -> str:
        """The device path in use (the emulator's pseudo-terminal for ``port="emulator"``)."""
        return self._port_path

    def _label(self) -> str:
        return self.name if self._port_path in self.name else f"{self.name} on {self._port_path}"

    # ------------------------------------------------------------------ life cycle
    def _do_open(self) -> None:
        try:
            if self.port == "emulator":
                from capture.emulators.gcode import GcodeEmulator

                self.emulator = GcodeEmulator(flavor=self.flavor).start()
                self._port_path = self.emulator.port
            self._serial = self._open_serial()
            self._rx.clear()
            self._synced, self._sync, self._dirty, self._wco_mm = True, None, False, None
            homed = False
            if self.flavor == "grbl":
                self._wake_grbl()
                state = self._status().state
                if state.startswith("Alarm") and not self.home_on_start:
                    raise DeviceError(
                        f"{self._label()}: GRBL is locked in the alarm state after reset (homing required at power-up, "
                        f"or a limit alarm); home it: set focus.home_on_start: true (home_on_start=True in Python), or send $H from a terminal. "
                        f"($X would unlock it without checking the position.)"
                    )
                if self.home_on_start:
                    self._home()
                    homed = True
            else:
                self._wake_marlin()
                if self.home_on_start:
                    self._home()
                    homed = True
            self._millimetres()
            self._transact("G90")
            self._target_mm = self._do_position()
            self._limits = self._checked_limits(self._travel_mm(), homed=homed)
            logger.info("%s: open (%s), %s at %.4f mm", self._label(), self.firmware or self.flavor, self.axis, self._target_mm)
        except BaseException:
            self._release()
            raise

    def _do_close(self) -> None:
        if self._serial is not None and not self._synced:
            self._stop_motion()
        self._release()

    def _stop_motion(self) -> None:
        """On close with a move not confirmed finished (Ctrl-C or an error mid-sweep): stop the
        axis instead of letting it run on unattended. GRBL: a feed hold (``!``) decelerates and
        keeps the position; the controller is left held (the next open's reset clears it).
        Marlin: ``M410`` (quick stop; immediate where the firmware has its emergency parser).
        Best effort: a port that is gone is only logged."""
        try:
            if self.flavor == "grbl":
                if not self._grbl_status().state.startswith(("Run", "Jog")):
                    return  # finished, or never started: nothing to stop
                self._write(b"!", "feed hold (!)")
                deadline = time.monotonic() + max(1.0, self.timeout_s)  # deceleration to a stop
                state = ""
                while time.monotonic() < deadline:
                    state = self._grbl_status().state
                    if not state.startswith(("Run", "Jog", "Hold:1")):
                        break
                    time.sleep(STATUS_POLL_S / 2)
                logger.warning("%s: the stage was still moving (to %.4f mm) at close: feed hold sent, now %s",
                               self._label(), self._target_mm, state or "unknown")
            else:
                self._write(b"M410\n", "M410 (quick stop)")
                logger.warning("%s: the stage may still have been moving (to %.4f mm) at close: M410 (quick stop) sent; "
                               "home it before trusting its position", self._label(), self._target_mm)
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            logger.warning("%s: could not stop the stage at close (%s): it may still be moving", self._label(), exc)

    def _millimetres(self) -> None:
        """``G21``; a Marlin built without inch support answers "Unknown command" (it is always
        in millimetres), which is accepted."""
        try:
            self._transact("G21")
        except ProtocolError as exc:
            if self.flavor != "marlin" or "unknown command" not in str(exc).lower():
                raise
            logger.info("%s: no G21 in this Marlin build (millimetres only)", self._label())

    # ------------------------------------------------------------------ travel
    def _travel_mm(self) -> tuple[float, float] | None:
        """The axis's travel in work coordinates as the controller reports it, or None."""
        if self.flavor == "marlin":
            try:
                lines = self._transact("M211")
            except ProtocolError as exc:
                logger.info("%s: no soft endstops report (M211): %s", self._label(), exc)
                return None
            for text in lines:
                match = re.search(r"Min:\s*(.*?)\s+Max:\s*(.*)$", text)
                if match:
                    ends = [re.search(self.axis + r"\s*(-?[\d.]+)", part) for part in match.groups()]
                    if all(ends):
                        return float(ends[0].group(1)), float(ends[1].group(1))
            logger.info("%s: M211 did not report the %s soft endstops", self._label(), self.axis)
            return None
        settings = self._grbl_settings()
        index = _AXES.index(self.axis)
        max_travel = settings.get(130 + index)
        if not settings.get(22) or not max_travel:
            logger.info("%s: GRBL reports no travel for %s (homing $22=%s, $%d=%s)", self._label(), self.axis,
                        settings.get(22), 130 + index, max_travel)
            return None
        status = self._status()
        offset = status.machine_mm[index] - status.position_mm  # the work coordinate offset
        toward_negative = int(settings.get(23, 0)) >> index & 1
        lo_m, hi_m = (0.0, max_travel) if self._force_origin and toward_negative else (-max_travel, 0.0)
        return lo_m - offset, hi_m - offset

    def _grbl_settings(self) -> dict[int, float]:
        settings: dict[int, float] = {}
        for text in self._transact("$$"):
            match = re.match(r"^\$(\d+)=(-?[\d.]+)", text)
            if match:
                settings[int(match.group(1))] = float(match.group(2))
        return settings

    def _checked_limits(self, travel: tuple[float, float] | None, *, homed: bool) -> tuple[float, float]:
        """The limits to use: those given, checked against ``travel``; or the travel itself."""
        eps = 1e-3
        if self.limits_given is not None:
            lo, hi = self.limits_given
            if travel is not None and (lo < travel[0] - eps or hi > travel[1] + eps):
                raise InputError(
                    f"{self._label()}: focus.limits_mm [{lo:g}, {hi:g}] lie outside the controller's {self.axis} travel "
                    f"[{travel[0]:g}, {travel[1]:g}] mm (work coordinates{'; stock GRBL travel is negative' if self.flavor == 'grbl' else ''}); "
                    f"a move there would hit an end of the rail: set focus.limits_mm inside it, or leave it out to use the travel"
                )
            return lo, hi
        if travel is None:
            raise InputError(
                f"{self._label()}: limits_mm not given and the controller reports no travel for {self.axis} "
                f"({'homing is off ($22=0) or no max travel' if self.flavor == 'grbl' else 'no M211 soft endstops'}); set limits_mm"
            )
        lo, hi = travel
        if homed:  # stay on the rail's side of the homed position (the switch is beyond it)
            here = self._target_mm
            if travel[0] <= here <= travel[1]:
                lo, hi = (lo, here) if hi - here < here - lo else (here, hi)
        logger.info("%s: limits %g..%g mm from the controller's travel", self._label(), lo, hi)
        return lo, hi

    def _release(self) -> None:
        """Close the port and stop our emulator; never raises, never waits long."""
        ser, self._serial = self._serial, None
        if ser is not None:
            try:
                ser.close()
            except Exception as exc:  # noqa: BLE001 - closing is best effort
                logger.debug("%s: closing the port failed: %s", self._label(), exc)
        if self.emulator is not None and self.port == "emulator":
            self.emulator.stop()
        self._sync = None

    def _open_serial(self):  # -> serial.Serial
        import serial

        kwargs = {"exclusive": True} if os.name == "posix" else {}
        try:
            ser = serial.Serial(
                self._port_path,
                baudrate=self.baudrate,
                bytesize=serial.EIGHTBITS,
                parity=serial.PARITY_NONE,
                stopbits=serial.STOPBITS_ONE,
                timeout=_READ_SLICE_S,
                write_timeout=self.timeout_s,
                **kwargs,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DeviceError(
                f"{self.name}: cannot open serial port {self._port_path!r}: {exc}. Check the path "
                f"(ls /dev/ttyUSB* /dev/ttyACM* /dev/serial/by-id/), that no other program holds it, and on "
                f"Linux that your user is in the 'dialout' group"
            ) from exc
        try:
            ser.reset_input_buffer()
        except Exception as exc:  # noqa: BLE001 - a port that cannot flush fails on first use anyway
            logger.debug("%s: flushing the input failed: %s", self.name, exc)
        return ser

    def _wait_while_moving(self) -> None:
        """Before the soft reset that opens a GRBL: a stage still running a move (left by a
        process that died) would lose its position to a reset in motion (ALARM:3). Ask its state
        and wait, up to ``move_timeout_s``, while it runs or homes; no answer is fine (the reset
        wakes a controller in any state)."""
        deadline = time.monotonic() + self.move_timeout_s
        state = ""
        try:
            while time.monotonic() < deadline:
                self._write(b"?", "?")
                state = ""
                for text in self._drain():
                    if text.startswith("<"):
                        state = self._parse_grbl_status(text).state
                if not state.startswith(("Run", "Home", "Jog", "Hold:1")):
                    return
                logger.info("%s: the stage is still moving (%s) from before: waiting before the reset", self._label(), state)
                time.sleep(STATUS_POLL_S)
        except DeviceError:
            return  # a port that does not answer '?' yet: the reset below will tell
        logger.warning("%s: still %s after %g s (focus.move_timeout_s): resetting anyway", self._label(), state, self.move_timeout_s)

    def _wake_grbl(self) -> None:
        self._wait_while_moving()
        banner = None
        for attempt in range(2):
            self._write(b"\x18", "soft reset (0x18)")
            deadline = time.monotonic() + self.timeout_s
            while banner is None:
                text = self._readline(deadline, "soft reset (0x18)")
                if text is None:
                    break
                if text.startswith("Grbl"):
                    banner = text
                elif text.startswith("ALARM:"):
                    logger.warning("%s: %s during reset: %s", self._label(), text, self._alarm_meaning(text))
                elif text:
                    logger.debug("%s: before the banner: %r", self._label(), text)
            if banner is not None:
                break
            logger.debug("%s: no banner after soft reset (attempt %d)", self._label(), attempt + 1)
        if banner is None:
            raise DeviceTimeout(
                f"{self._label()}: no GRBL banner within {self.timeout_s:g} s after a soft reset (0x18), twice; check the "
                f"port, the baud rate ({self.baudrate}; focus.baudrate) and the flavor (a Marlin board needs focus.flavor: marlin)"
            )
        self.firmware = banner.split("[", 1)[0].strip()
        for text in self._drain():
            if text.startswith("[MSG:"):
                logger.info("%s: %s", self._label(), text)
        try:
            info = self._transact("$I")
        except ProtocolError as exc:
            logger.info("%s: no build info ($I): %s", self._label(), exc)
        else:
            version = next((t for t in info if t.startswith("[VER:")), "")
            if version:
                self.firmware = f"{self.firmware} ({version[1:-1]})"
            options = next((t for t in info if t.startswith("[OPT:")), "")
            self._force_origin = "Z" in options[5:-1].split(",")[0]
        logger.info("%s: firmware %s", self._label(), self.firmware)

    def _wake_marlin(self) -> None:
        # an empty line first: it ends whatever an earlier program left in Marlin's line buffer
        # (a GRBL attempt's 0x18 and '?' bytes made the next M115 "Unknown command"); Marlin
        # ignores empty lines, and what it answers meanwhile is dropped
        self._write(b"\n", "(empty line)")
        self._drain()
        for attempt in range(2):
            try:
                lines = self._transact("M115", allow_banner=True)
                break
            except ProtocolError as exc:
                if attempt or "unknown command" not in str(exc).lower():
                    raise
                logger.info("%s: M115 refused as %s; asking again", self._label(), exc)
            except DeviceTimeout:
                if attempt:
                    raise DeviceTimeout(
                        f"{self._label()}: no reply to 'M115' within {self.timeout_s:g} s, twice; check the port, the "
                        f"baud rate ({self.baudrate}; focus.baudrate) and the flavor (a GRBL board needs focus.flavor: grbl)"
                    ) from None
        name = next((t for t in lines if t.startswith("FIRMWARE_NAME:")), "")
        match = re.match(r"FIRMWARE_NAME:(.*?)(?:\s+[A-Z_]+:|$)", name)
        self.firmware = match.group(1).strip() if match else "Marlin (no M115 identification)"
        logger.info("%s: firmware %s", self._label(), self.firmware)

    # ------------------------------------------------------------------ public extras
    def home(self) -> None:
        """Home the stage (GRBL ``$H``, all axes; Marlin ``G28 <axis>``), waiting up to
        ``move_timeout_s``; afterwards the target is the homed position."""
        self._require_open("home")
        with self._io_lock:
            self._home()
            self._target_mm = self._do_position()

    def _home(self) -> None:
        line = "$H" if self.flavor == "grbl" else f"G28 {self.axis}"
        logger.info("%s: homing (%s)", self._label(), line)
        with self._io_lock:
            self._synced, self._settled_at_s = False, None
            self._transact(line, wait_s=self.move_timeout_s)
            self._synced, self._settled_at_s = True, time.monotonic()

    def unlock(self) -> None:
        """GRBL: clear an alarm lock without homing (soft reset, then ``$X``). Only when the
        position is known to be right: a hard-limit or reset alarm has lost it."""
        if self.flavor != "grbl":
            raise InputError(f"{self._label()}: unlock is GRBL only (Marlin has no alarm lock)")
        self._require_open("unlock")
        with self._io_lock:
            if not self._status().state.startswith("Alarm"):
                return
            self._wake_grbl()
            logger.warning("%s: unlocking with $X without homing", self._label())
            self._transact("$X")

    def command(self, line: str, *, timeout_s: float | None = None) -> list[str]:
        """Send one raw line, wait for its ``ok``; return the lines printed before it.

        Raises:
            ProtocolError: refused (``error:N``, unknown command).
            DeviceError / DeviceTimeout: alarm, port failure, no reply.
        """
        self._require_open("command")
        if not line.strip() or any(c in line for c in "\r\n") or (self.flavor == "grbl" and any(c in line for c in "?!~\x18")):
            raise InputError(f"{self._label()}: command must be one non-empty line without real-time characters, got {line!r}")
        if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s > 0):
            raise InputError(f"{self._label()}: command timeout_s must be finite and > 0, got {timeout_s}")
        return self._transact(line.strip(), wait_s=timeout_s)

    def status(self) -> StageStatus:
        """Parsed state and position (GRBL real-time ``?``; Marlin ``M114``)."""
        self._require_open("status")
        return self._status()

    def _status(self) -> StageStatus:
        with self._io_lock:
            if self.flavor == "grbl":
                return self._grbl_status()
            lines = self._transact("M114")
            for text in lines:
                if text.startswith("X:"):
                    values = dict(_MARLIN_POSITION.findall(text.split("Count", 1)[0]))
                    if self.axis not in values:
                        raise ProtocolError(f"{self._label()}: M114 reply {text!r} has no {self.axis} position")
                    machine = tuple(float(values[a]) for a in "XYZ" if a in values)
                    return StageStatus("Idle" if self._synced else "Unknown", float(values[self.axis]), machine, text)
            raise ProtocolError(f"{self._label()}: M114 answered no position line (got {lines!r})")

    # ------------------------------------------------------------------ role hooks
    def _do_move(self, value: float) -> None:
        line = f"G1 {self.axis}{value:.4f} F{_plain_number(self.feed_mm_min)}"
        with self._io_lock:
            try:
                self._transact(line)
            except DeviceTimeout:
                self._synced, self._settled_at_s = False, None  # no answer: it may be moving
                raise
            # refused (error:N, a Marlin refusal) moves nothing: still synced; accepted, it runs
            self._synced, self._settled_at_s = False, None
            now = time.monotonic()
            # when the move would end at its feed rate: status queries at 10 Hz until then (GRBL's docs:
            # '?' costs the controller; an unplugged cable is still seen within 0.1 s), briefly faster after
            self._expect_duration_s = abs(value - self._target_mm) / self.feed_mm_min * 60.0
            self._expect_done_s = now + self._expect_duration_s
            self._next_status_s = min(self._expect_done_s, now + STATUS_POLL_S)
            self._target_mm = value

    def wait_settled(self, *, timeout_s: float, poll_s: float = 0.002) -> float:
        """Block until the stage has finished its moves (see the module doc); returns the
        host-monotonic time it was seen finished.

        Raises:
            DeviceTimeout: not finished within ``timeout_s``.
            DeviceError: an alarm while waiting.
        """
        self._last_status = None
        try:
            self._settle_deadline_s = time.monotonic() + float(timeout_s)
        except (TypeError, ValueError):
            self._settle_deadline_s = None
        if self._settle_deadline_s is not None and not math.isfinite(self._settle_deadline_s):
            self._settle_deadline_s = None
        try:
            # checks every 10 ms; the status queries themselves are spaced in _do_is_settled
            seen_s = super().wait_settled(timeout_s=timeout_s, poll_s=max(poll_s, _CHECK_S))
        except SettleTimeout as exc:  # other timeouts (no status report) keep their own message
            last = self._last_status
            if last is not None and not last.state.startswith(("Idle", "Run", "Home", "Jog")):
                # the controller answered, in a state in which it does not move on by itself
                hint = " (a feed hold or an open safety door: resume with '~' or close the door)" if last.state.startswith(("Hold", "Door")) else ""
                raise DeviceTimeout(
                    f"{self._label()}: not settled within {float(timeout_s):g} s (target {self._target_mm:.4g} mm): the controller "
                    f"reports {last.state}{hint} ({last.raw})"
                ) from exc
            # the device, its port and the command it did not answer in time (the generic
            # message named the stage alone), and what to change
            waiting = self._sync[0] if self._sync is not None else "?" if self.flavor == "grbl" else _SYNC_LINE[self.flavor]
            overdue_s = time.monotonic() - self._expect_done_s
            advice = (
                f"a long move at focus.feed_mm_min {self.feed_mm_min:g} needs a larger focus.move_timeout_s"
                if overdue_s < 1.0
                else f"the move should have ended {overdue_s:.1f} s ago at focus.feed_mm_min {self.feed_mm_min:g}: "
                "a controller that stays busy that long is stuck (or its feed rate is capped far lower)"
            )
            raise DeviceTimeout(
                f"{self._label()}: not settled within {float(timeout_s):g} s (target {self._target_mm:.4g} mm; no answer to {waiting!r} "
                f"saying the move finished); {advice}"
            ) from exc
        finally:
            self._settle_deadline_s = None
        return max(seen_s, self._settled_at_s or seen_s)

    def _do_is_settled(self) -> bool:
        with self._io_lock:
            if self._synced:
                return True
            if self._sync is None:
                if self.flavor == "grbl":
                    now = time.monotonic()
                    if now < self._next_status_s:
                        return False
                    status = self._grbl_status()
                    if status.state.startswith("Alarm"):
                        raise DeviceError(f"{self._label()}: controller in the alarm state while moving to {self._target_mm:.4f} mm ({status.raw})")
                    if not status.state.startswith("Idle"):
                        # at 10 Hz, up to the move's expected end; just after it (acceleration) every 20 ms for a moment
                        if now < self._expect_done_s:
                            self._next_status_s = min(now + STATUS_POLL_S, self._expect_done_s)
                        elif now - self._expect_done_s < _FAST_STATUS_WINDOW_S:
                            self._next_status_s = now + _FAST_STATUS_POLL_S
                        else:
                            self._next_status_s = now + STATUS_POLL_S
                        return False
                self._start_sync()
            # in slices of STATUS_POLL_S, so that wait_settled sees an abort while a long move drains
            chunk_s = time.monotonic() + STATUS_POLL_S
            return self._await_sync(chunk_s if self._settle_deadline_s is None else min(chunk_s, self._settle_deadline_s))

    def _do_position(self) -> float:
        return self._status().position_mm

    # ------------------------------------------------------------------ sync lines
    def _start_sync(self) -> None:
        line = _SYNC_LINE[self.flavor]
        if self._dirty:
            self._resync()
        self._send_line(line)
        self._sync_sent_s = time.monotonic()
        self._sync = (line, self._sync_sent_s + self.move_timeout_s)

    def _await_sync(self, soft_deadline_s: float | None) -> bool:
        """Wait for the outstanding sync line's ``ok``; False if ``soft_deadline_s`` came first."""
        assert self._sync is not None
        line, deadline = self._sync
        try:
            lines = self._await_ok(line, deadline, wait_s=self.move_timeout_s, soft_deadline_s=soft_deadline_s)
        except BaseException:
            self._sync = None
            raise
        if lines is None:
            self._check_silence(line)
            return False
        self._sync_done()
        return True

    def _check_silence(self, line: str) -> None:
        """Marlin: raise once the controller has sent nothing at all (not even its busy
        keepalive) for :data:`MARLIN_SILENCE_S` while a move should long be over, instead of
        waiting out ``move_timeout_s`` (GRBL's status queries catch silence within seconds)."""
        if self.flavor != "marlin":
            return
        now = time.monotonic()
        quiet_s = now - max(self._last_rx_s, self._sync_sent_s)
        # longer moves get a longer grace: a firmware built without HOST_KEEPALIVE_FEATURE is silent
        # for a whole move, and one whose max feed rate (M203) is below feed_mm_min moves slower
        limit_s = max(MARLIN_SILENCE_S, 4.0 * self._expect_duration_s)
        if quiet_s < limit_s or now < self._expect_done_s + limit_s:
            return
        self._sync, self._dirty = None, True
        raise DeviceTimeout(
            f"{self._label()}: no reply and no busy keepalive to {line!r} for {quiet_s:.1f} s, although the move to "
            f"{self._target_mm:.4g} mm should have ended {now - self._expect_done_s:.1f} s ago; "
            "is the controller hung, powered off or unplugged?"
        )

    def _sync_done(self) -> None:
        self._sync = None
        self._synced = True
        self._settled_at_s = time.monotonic()

    # ------------------------------------------------------------------ line exchange
    def _transact(self, line: str, *, wait_s: float | None = None, allow_banner: bool = False) -> list[str]:
        """Send ``line`` and wait for its ``ok`` (``wait_s``, default ``timeout_s``)."""
        with self._io_lock:
            if self._sync is not None:
                self._await_sync(None)  # a move is still draining: its sync ok comes first
            if self._dirty:
                self._resync()
            wait = self.timeout_s if wait_s is None else wait_s
            self._send_line(line)
            lines = self._await_ok(line, time.monotonic() + wait, wait_s=wait, allow_banner=allow_banner)
            assert lines is not None
            return lines

    def _send_line(self, line: str) -> None:
        logger.debug("%s -> %r", self._label(), line)
        self._write(line.encode("ascii") + b"\n", line)

    def _write(self, data: bytes, what: str) -> None:
        import serial

        ser = self._serial
        if ser is None:
            raise DeviceError(f"{self._label()}: port is closed (sending {what!r})")
        try:
            ser.write(data)
        except serial.SerialTimeoutException as exc:
            self._dirty = True
            raise DeviceTimeout(f"{self._label()}: writing {what!r} timed out after {self.timeout_s:g} s") from exc
        except (serial.SerialException, OSError) as exc:
            self._dirty = True
            raise self._port_lost(what, exc) from exc

    def _port_lost(self, what: str, exc: BaseException, *, reading: bool = False) -> DeviceError:
        doing = ("draining stale input" if what == "(draining)" else f"reading the reply to {what!r}") if reading else f"sending {what!r}"
        return DeviceError(
            f"{self._label()}: serial port {self._port_path} failed while {doing} ({exc}); "
            f"was the controller unplugged or powered off?"
        )

    def _readline(self, deadline_s: float, what: str) -> str | None:
        """The next line (stripped), or None once ``deadline_s`` has passed."""
        import serial

        ser = self._serial
        if ser is None:
            raise DeviceError(f"{self._label()}: port is closed (waiting for the reply to {what!r})")
        while True:
            end = self._rx.find(b"\n")
            if end >= 0:
                raw = bytes(self._rx[:end])
                del self._rx[: end + 1]
                text = raw.decode("ascii", errors="replace").strip()
                logger.debug("%s <- %r", self._label(), text)
                return text
            expired = time.monotonic() >= deadline_s
            try:
                waiting = ser.in_waiting
                if expired and not waiting:
                    return None
                chunk = ser.read(max(1, waiting))
            except (serial.SerialException, OSError) as exc:
                self._dirty = True
                raise self._port_lost(what, exc, reading=True) from exc
            if chunk:
                self._last_rx_s = time.monotonic()
            self._rx += chunk
            if expired and self._rx.find(b"\n") < 0:
                return None

    def _drain(self) -> list[str]:
        """Read and return lines until the input has been quiet for a moment (bounded)."""
        lines: list[str] = []
        hard_deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < hard_deadline:
            text = self._readline(min(hard_deadline, time.monotonic() + _QUIET_S), "(draining)")
            if text is None:
                break
            if text:
                lines.append(text)
        return lines

    def _resync(self) -> None:
        """After a failed exchange: discard whatever late replies are still coming."""
        self._dirty = False
        self._rx.clear()
        dropped = self._drain()
        self._rx.clear()
        if dropped:
            logger.debug("%s: dropped stale input %r", self._label(), dropped)

    def _await_ok(
        self,
        line: str,
        deadline_s: float,
        *,
        wait_s: float,
        soft_deadline_s: float | None = None,
        allow_banner: bool = False,
    ) -> list[str] | None:
        """Read until the ``ok`` for ``line``; return the data lines before it, or None when
        ``soft_deadline_s`` (earlier than ``deadline_s``) passed first."""
        data: list[str] = []
        refusal: DeviceError | None = None
        try:
            while True:
                soft = soft_deadline_s is not None and soft_deadline_s < deadline_s
                text = self._readline(soft_deadline_s if soft else deadline_s, line)  # type: ignore[arg-type]
                if text is None:
                    if soft:
                        return None
                    raise DeviceTimeout(f"{self._label()}: no reply to {line!r} within {wait_s:g} s")
                kind = self._classify(text, line, allow_banner=allow_banner)
                if kind == "ok":
                    if refusal is not None:
                        raise refusal
                    return data
                if kind == "refused" and refusal is None:
                    refusal = self._marlin_refusal(text, line)
                elif kind == "data":
                    data.append(text)
                elif kind == "status":
                    self._parse_grbl_status(text)  # unsolicited report: keep the work offset
        except DeviceError as exc:
            if exc is not refusal and not self._is_grbl_error(exc):
                self._dirty = True
            raise

    @staticmethod
    def _is_grbl_error(exc: DeviceError) -> bool:
        return isinstance(exc, ProtocolError) and " refused with error:" in str(exc)

    def _classify(self, text: str, line: str, *, allow_banner: bool = False) -> str:
        """``ok``, ``data``, ``info``, ``status`` or ``refused``; raises for alarms, errors,
        resets and unparseable lines."""
        if not text:
            return "info"
        if self.flavor == "grbl":
            if text == "ok":
                return "ok"
            if text.startswith("error:"):
                code = text[6:].strip()
                meaning = GRBL_ERRORS.get(int(code), "unknown error code") if code.isdigit() else code
                raise ProtocolError(f"{self._label()}: {line!r} refused with error:{code} ({meaning})")
            if text.startswith("ALARM:"):
                raise DeviceError(f"{self._label()}: {text} ({self._alarm_meaning(text)}) after sending {line!r}")
            if text.startswith("<") and text.endswith(">"):
                return "status"
            if text.startswith(">"):  # a startup block ($N) executed after reset or homing: ">G54:ok"
                if ":error:" in text:
                    logger.warning("%s: GRBL startup block failed: %s", self._label(), text)
                else:
                    logger.info("%s: GRBL startup block: %s", self._label(), text)
                return "info"
            if text.startswith("[") and text.endswith("]"):
                if text.startswith("[MSG:"):
                    logger.info("%s: %s", self._label(), text)
                    return "info"
                return "data"
            if re.match(r"^\$N?\d+=", text):
                return "data"
            if text.startswith("Grbl") and not allow_banner:
                raise DeviceError(
                    f"{self._label()}: the controller reset itself ({text!r}) while waiting for the reply to {line!r}; "
                    f"queued moves were dropped and the position may be lost"
                )
            if text.startswith("Grbl"):
                return "info"
        else:
            if text == "ok" or text.startswith("ok "):
                return "ok"
            lower = text.lower()
            if lower.startswith(("echo:busy", "busy:")):
                return "info"
            if lower.startswith("echo:soft endstops"):  # M211's report
                return "data"
            if lower.startswith("echo:unknown command") or re.match(r"echo:\s*home .* first", lower):
                return "refused"
            if text.startswith(("Error:", "!!")):
                if "halted" in lower or "kill" in lower:
                    raise DeviceError(f"{self._label()}: Marlin halted ({text}) after {line!r}; reset the board")
                return "refused"
            if text.startswith("Resend:"):
                return "refused"
            if text.startswith(("echo:", "//")):
                return "info"
            if text == "start":
                if allow_banner:
                    return "info"
                raise DeviceError(
                    f"{self._label()}: the controller reset itself ('start') while waiting for the reply to {line!r}; "
                    f"the position may be lost"
                )
            if text.startswith(("X:", "FIRMWARE_NAME:", "Cap:", "T:")):
                return "data"
        raise ProtocolError(f"{self._label()}: unparseable reply {text!r} to {line!r}")

    def _marlin_refusal(self, text: str, line: str) -> DeviceError:
        if re.match(r"echo:\s*home .* first", text.lower()):
            return DeviceError(
                f"{self._label()}: Marlin refused {line!r}: {text[5:].strip()} (homing required: set focus.home_on_start: true "
                f"(home_on_start=True or home() in Python))"
            )
        return ProtocolError(f"{self._label()}: Marlin refused {line!r}: {text}")

    @staticmethod
    def _alarm_meaning(text: str) -> str:
        code = text.split(":", 1)[1].strip()
        return GRBL_ALARMS.get(int(code), "unknown alarm") if code.isdigit() else code

    # ------------------------------------------------------------------ GRBL status
    def _grbl_status(self) -> StageStatus:
        """Real-time ``?`` -> the next ``<...>`` report (an outstanding sync ``ok`` may arrive first)."""
        if self._dirty and self._sync is None:
            self._resync()
        self._write(b"?", "?")
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                text = self._readline(deadline, "?")
                if text is None:
                    raise DeviceTimeout(f"{self._label()}: no status report to '?' within {self.timeout_s:g} s")
                kind = self._classify(text, "?")
                if kind == "status":
                    status = self._parse_grbl_status(text)
                    self._last_status = status
                    return status
                if kind == "ok":
                    if self._sync is None:
                        raise ProtocolError(f"{self._label()}: unexpected 'ok' while waiting for the status report to '?'")
                    self._sync_done()
        except DeviceError as exc:
            if not self._is_grbl_error(exc):
                self._dirty = True
            raise

    def _parse_grbl_status(self, text: str) -> StageStatus:
        body = text[1:-1]
        fields: dict[str, tuple[float, ...]] = {}
        try:
            if "|" in body:  # GRBL 1.1: <State|MPos:x,y,z|FS:f,s|WCO:x,y,z>
                state, *parts = body.split("|")
                for part in parts:
                    key, _, value = part.partition(":")
                    if key in ("MPos", "WPos", "WCO"):
                        fields[key] = tuple(float(v) for v in value.split(","))
            else:  # GRBL 0.9: <Idle,MPos:x,y,z,WPos:x,y,z>
                state = body.split(",", 1)[0]
                for key in ("MPos", "WPos"):
                    match = re.search(key + r":(-?[\d.]+),(-?[\d.]+),(-?[\d.]+)", body)
                    if match:
                        fields[key] = tuple(float(v) for v in match.groups())
        except ValueError:
            raise ProtocolError(f"{self._label()}: unparseable status report {text!r}") from None
        if "WCO" in fields:
            self._wco_mm = fields["WCO"]
        index = _AXES.index(self.axis)
        if "MPos" in fields:
            machine = fields["MPos"]
            offset = self._wco_mm[index] if self._wco_mm and index < len(self._wco_mm) else 0.0
            work = machine[index] - offset if index < len(machine) else math.nan
        elif "WPos" in fields:
            work_all = fields["WPos"]
            wco = self._wco_mm or (0.0,) * len(work_all)
            machine = tuple(w + o for w, o in zip(work_all, wco))
            work = work_all[index] if index < len(work_all) else math.nan
        else:
            raise ProtocolError(f"{self._label()}: status report {text!r} has no MPos or WPos")
        if not state or math.isnan(work):
            raise ProtocolError(f"{self._label()}: status report {text!r} has no state or no {self.axis} position")
        return StageStatus(state, work, machine, text)

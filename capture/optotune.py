"""Optotune Lens Driver 4 (LD4 / LD4i) as a :class:`~capture.devices.FocusActuator`.

The LD4 is a USB CDC-ACM serial port (115200 8N1) speaking the binary protocol of
:mod:`capture.ld4_protocol`. This driver:

- sends every command with its CRC, drains stale input before each query, reads every
  reply by its fixed length (never up to CRLF: binary payloads may contain ``0D 0A``) and
  checks its CRC and CRLF;
- retries a query whose reply is corrupt, short or missing (or answered ``E1``/``N``: the
  LD4 saw a corrupted frame) up to ``retries`` times, then raises
  :class:`~capture.errors.ProtocolError` (corrupt/short) or
  :class:`~capture.errors.DeviceTimeout` (nothing at all), naming device, port and command;
  any other error reply (E2 not available in this firmware type, E3 not recognised, E4 lens
  not compatible) is a ProtocolError at once; a port that vanishes is a
  :class:`~capture.errors.DeviceError`;
- after any such error, and on close, parks the lens (current mode, ``park_current_ma``)
  on a best-effort basis and closes the port, so a failed sweep leaves the lens safe; the
  driver is then closed (``open()`` starts again with a handshake).

Set commands (``Aw``, ``PwDA``) have no reply, and the LD4 cannot report when the lens has
settled: :meth:`OptotuneLensDriver.wait_settled` returns once ``settle_time_s`` has passed
since the last write (measure your lens; EL-10-30-class lenses settle in ~15 ms). An error
the LD4 reports for a set command arrives unsolicited; it is picked up while waiting for
settling, before the next query, or (when it arrives late, after that query was sent) ahead
of the query's own reply, and raised as a ProtocolError naming that set command; except a
"CRC failed" (``E1``/``N``) seen while waiting for settling, before any frame is taken at that
focus: the set command then goes out again, up to ``retries`` times.

The firmware version (``V`` + 00, else the short ``V``) and the lens temperature (``TCA``,
else ``TA``) are informational: HARDWARE_NOTES §1.4 lists two forms of each as in use, so
``open()`` tries both and, when neither answers, logs one warning and records the value as
unknown (``identity["firmware_version"]`` None, :meth:`OptotuneLensDriver.temperature_c`
None) instead of failing.

``port="emulator"`` runs an in-process :class:`~capture.emulators.optotune.OptotuneEmulator`
on a pseudo-terminal (Linux/macOS), for tests and demos.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from capture import ld4_protocol as ld4
from capture.devices import FocusActuator
from capture.errors import DeviceError, DeviceTimeout, InputError, ProtocolError

if TYPE_CHECKING:
    import serial

    from capture.emulators.optotune import OptotuneEmulator

logger = logging.getLogger(__name__)

__all__ = ["OptotuneLensDriver"]

#: longest wait for the mode acknowledgement while parking (a failing device must not hang close)
_PARK_REPLY_TIMEOUT_S = 0.1


def _port_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the port itself failed (unplugged, closed under us)."""
    import serial

    errors: list[type[BaseException]] = [serial.SerialException, OSError]
    try:
        import termios

        errors.append(termios.error)
    except ImportError:  # Windows
        pass
    return tuple(errors)


class _Unanswered(Exception):
    """Internal: an optional query got no usable answer (see ``_informational_ask``)."""


class _Refused(_Unanswered):
    """Internal: an optional command the firmware does not offer (E2/E3)."""


#: the focal-power status byte (HARDWARE_NOTES.md, from the manual via public code [?])
_FOCAL_POWER_STATUS_BITS = (
    (7, "b7 lens temperature outside {limits}"),
    (6, "b6 focal power outside the guaranteed range"),
    (5, "b5 temperature outside the product specification"),
    (4, "b4 focal-power inversion"),
    (3, "b3 focal power unreachable"),
    (2, "b2 no temperature limits received"),
    (1, "b1 no or faulty EEPROM"),
    (0, "b0 not all hardware available"),
)


class OptotuneLensDriver(FocusActuator):
    """An Optotune electrically tunable lens on a Lens Driver 4.

    Args:
        port: serial port path (``/dev/ttyACM0``, ``COM5``) or ``"emulator"``.
        mode: ``"current"`` (unit mA) or ``"focal_power"`` (unit dpt, temperature-compensated
            by the LD4's focal-power mode; needs a lens with calibration data in its EEPROM).
        park_current_ma: current set when closing or after an error, mA.
        timeout_s: per-try reply timeout, seconds (also the write timeout).
        retries: extra tries for a query whose reply is corrupt, short or missing.
        settle_time_s: time after a set command after which the lens counts as settled.
        temperature_limits_c: (lower, upper) lens temperature limits sent with ``PwTA`` in
            focal-power mode, °C; the LD4 answers with the focal-power range it can
            guarantee within them.
        baudrate: serial speed (the LD4 uses 115200).
        name: for messages and logs; default ``"optotune LD4 on <port>"``.

    Attributes:
        identity: after open: ``serial_number``, ``firmware_type``, ``firmware_version``
            (None where neither ``V`` form answers), ``device_id`` (None where the firmware
            lacks ``IR``) and ``max_current_ma``.
        emulator: the in-process emulator when ``port == "emulator"`` (else None).
        port_path: the path actually opened (the pseudo-terminal for the emulator).
    """

    def __init__(
        self,
        port: str,
        *,
        mode: Literal["current", "focal_power"] = "current",
        park_current_ma: float = 0.0,
        timeout_s: float = 0.5,
        retries: int = 2,
        settle_time_s: float = 0.025,
        temperature_limits_c: tuple[float, float] = (20.0, 45.0),
        baudrate: int = 115200,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name or f"optotune LD4 on {port}")
        if not isinstance(port, str) or not port:
            raise InputError(f"{self.name}: port must be a serial port path or 'emulator', got {port!r}")
        if mode not in ("current", "focal_power"):
            raise InputError(f"{self.name}: mode must be 'current' or 'focal_power', got {mode!r}")
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise InputError(f"{self.name}: timeout_s must be finite and > 0, got {timeout_s}")
        if not (isinstance(retries, int) and retries >= 0):
            raise InputError(f"{self.name}: retries must be an integer >= 0, got {retries!r}")
        if not (math.isfinite(settle_time_s) and settle_time_s >= 0):
            raise InputError(f"{self.name}: settle_time_s must be finite and >= 0, got {settle_time_s}")
        if not math.isfinite(park_current_ma):
            raise InputError(f"{self.name}: park_current_ma must be finite, got {park_current_ma}")
        lower_c, upper_c = (float(t) for t in temperature_limits_c)
        if not (math.isfinite(lower_c) and math.isfinite(upper_c) and lower_c < upper_c):
            raise InputError(f"{self.name}: temperature_limits_c must be (lower, upper) with lower < upper, got {temperature_limits_c}")
        self.port = port
        self.mode = mode
        self.unit = "mA" if mode == "current" else "dpt"
        self.park_current_ma = float(park_current_ma)
        self.timeout_s = float(timeout_s)
        self.retries = retries
        self.settle_time_s = float(settle_time_s)
        self.temperature_limits_c = (lower_c, upper_c)
        self.baudrate = int(baudrate)
        self.identity: dict[str, Any] = {}
        self.emulator: OptotuneEmulator | None = None
        self.port_path = port
        self.focal_power_status = 0
        self._ser: serial.Serial | None = None
        self._io_lock = threading.RLock()
        self._max_current_ma: float | None = None
        self._firmware_type = ""
        self._limits: tuple[float, float] = (0.0, 0.0)
        self._target = 0.0
        self._written_at_s = -math.inf
        self._set_sends = 0  # how often the last set command was written (a CRC-failed one is sent again)
        self._last_set: ld4.Command | None = None
        self._device_mode = "current"  # "current", "focal_power" or "triangle"
        self._sweep: dict[str, float] | None = None
        self._port_error_types = _port_errors()
        self._handshake_ok = False
        self._refusable = False  # E2/E3 raise _Refused instead of failing (optional queries)
        self._informational = False  # any unanswered query raises _Unanswered, logged quietly
        self._temperature_command: ld4.Command | None = None  # the TCA/TA form that answered at open
        self._readback_pending = False  # a move not yet followed by any query (see _do_is_settled)

    # ------------------------------------------------------------------ properties
    @property
    def limits(self) -> tuple[float, float]:
        """Current mode: the LD4's software current limits (``CrLA``/``CrUA``) clipped to
        ±I_max, mA. Focal-power mode: the range the LD4 reported for the temperature
        limits (``PwTA``/``MwCA``), dpt. (0, 0) before the first open."""
        return self._limits

    @property
    def target(self) -> float:
        """The last commanded value, in :attr:`unit` (after quantisation to the raw step)."""
        return self._target

    @property
    def max_current_ma(self) -> float | None:
        """I_max read from ``CrMA`` at open, mA."""
        return self._max_current_ma

    @property
    def sweep_parameters(self) -> dict[str, float] | None:
        """While a triangle sweep runs: ``lower_ma``, ``upper_ma`` (quantised to the raw
        current step) and ``frequency_hz`` (quantised to 1 mHz); else None."""
        return dict(self._sweep) if self._sweep is not None else None

    # ------------------------------------------------------------------ open / close
    def _do_open(self) -> None:
        self._sweep = None
        self._last_set = None
        self._written_at_s = -math.inf
        self._handshake_ok = False
        self._max_current_ma = None
        try:
            self._open_port()
            self._initialise()
        except BaseException:
            self._shutdown(park=self._handshake_ok, reason="open failed")
            raise

    def _open_port(self) -> None:
        import serial

        if self.port == "emulator":
            from capture.emulators.optotune import OptotuneEmulator

            self.emulator = OptotuneEmulator()
            self.emulator.start()
            self.port_path = self.emulator.port
        else:
            self.port_path = self.port
        # POSIX: an advisory lock, so two programs cannot drive the lens at once
        kwargs: dict[str, Any] = {"exclusive": True} if os.name == "posix" else {}
        try:
            self._ser = serial.Serial(
                port=self.port_path, baudrate=self.baudrate, bytesize=serial.EIGHTBITS, parity=serial.PARITY_NONE,
                stopbits=serial.STOPBITS_ONE, timeout=self.timeout_s, write_timeout=self.timeout_s,
                xonxoff=False, rtscts=False, dsrdtr=False, **kwargs,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DeviceError(
                f"{self.name}: cannot open serial port {self.port_path}: {exc} "
                "(check the path, e.g. ls /dev/ttyACM* /dev/serial/by-id/, that the LD4 is plugged in, "
                "that no other program holds it, and that your user is in the dialout group)"
            ) from exc

    def _initialise(self) -> None:
        """Handshake, identity, limits, temperature, mode."""
        self._query(ld4.handshake())
        self._handshake_ok = True
        i_max = self._max_current_ma = self._ask(ld4.get_max_current(), ld4.parse_max_current_ma)
        self._firmware_type = self._ask(ld4.get_firmware_type(), ld4.parse_firmware_type)
        version, _ = self._informational_ask(
            (ld4.get_firmware_version(), ld4.get_firmware_version_short()), ld4.parse_firmware_version, "firmware version"
        )
        serial_number = self._ask(ld4.get_serial_number(), ld4.parse_serial_number)
        device_id = self._optional_ask(ld4.get_device_id(), ld4.parse_device_id)
        temperature_c, self._temperature_command = self._informational_ask(
            (ld4.get_temperature(), ld4.get_temperature_ta()), ld4.parse_temperature_c, "temperature"
        )
        self.identity = {
            "serial_number": serial_number,
            "firmware_type": self._firmware_type,
            "firmware_version": version,
            "device_id": device_id,
            "max_current_ma": i_max,
        }
        if self.mode == "current":
            upper_raw = self._ask(ld4.get_upper_limit(), ld4.parse_limit_raw)
            lower_raw = self._ask(ld4.get_lower_limit(), ld4.parse_limit_raw)
            lo = max(-i_max, ld4.raw_to_current(lower_raw, i_max))
            hi = min(i_max, ld4.raw_to_current(upper_raw, i_max))
            if not lo < hi:
                raise DeviceError(f"{self._where()}: software current limits [{lo:g}, {hi:g}] mA leave no range (set them with CwLA/CwUA)")
            self._limits = (lo, hi)
            self._enter_current_mode()
            self._target = ld4.raw_to_current(self._ask(ld4.get_current(), ld4.parse_current_raw), i_max)
        else:
            lower_c, upper_c = self.temperature_limits_c
            self._focal_power_range(ld4.set_temperature_limits(upper_c, lower_c))
            fp_lo, fp_hi = self._focal_power_range(ld4.set_mode_focal_power())
            if not fp_lo < fp_hi:
                raise DeviceError(f"{self._where()}: focal-power range [{fp_lo:g}, {fp_hi:g}] dpt is empty (status {self.focal_power_status:#04x})")
            self._limits = (fp_lo, fp_hi)
            self._device_mode = "focal_power"
            self._target = ld4.raw_to_focal_power(self._ask(ld4.get_focal_power(), ld4.parse_focal_power_raw), self._firmware_type)
        park_lo, park_hi = (-i_max, i_max) if self.mode == "focal_power" else self._limits
        if not park_lo <= self.park_current_ma <= park_hi:
            raise InputError(f"{self.name}: park_current_ma {self.park_current_ma:g} mA is outside the current limits [{park_lo:g}, {park_hi:g}] mA")
        logger.info(
            "%s: lens %s, firmware type %s version %s, device id %s, I_max %.2f mA, %s C, %s mode, limits [%g, %g] %s",
            self._where(), serial_number, self._firmware_type, version or "unknown", device_id, i_max,
            "unknown" if temperature_c is None else f"{temperature_c:.2f}",
            self.mode, self._limits[0], self._limits[1], self.unit,
        )

    def _optional_ask(self, command: ld4.Command, parser: Any) -> Any:
        """Like :meth:`_ask`, but a firmware that refuses the command (E2/E3) gives None."""
        saved = self._refusable
        self._refusable = True
        try:
            return self._ask(command, parser)
        except _Refused as refused:
            logger.info("%s: %s not supported (%s)", self._where(), command.description, refused)
            return None
        finally:
            self._refusable = saved

    def _informational_ask(self, commands: tuple[ld4.Command, ...], parser: Any, what: str) -> tuple[Any, ld4.Command | None]:
        """A query whose answer is only informational, so it must not make ``open()`` fail.

        ``commands`` are alternative forms of it (HARDWARE_NOTES §1.4), tried in order; the
        first that answers gives ``(value, command)``. A form the firmware refuses (E2/E3),
        or that gets no valid reply within the retries (a firmware that frames it differently
        answers E1), is skipped; per-try messages go to the debug log. When no form answers,
        one warning names the port and the forms tried, and the result is ``(None, None)``.
        A port failure, or another error reply (E4), still fails as usual.
        """
        saved = self._refusable, self._informational
        self._refusable = self._informational = True
        reasons: list[str] = []
        try:
            for command in commands:
                try:
                    value = self._ask(command, parser)
                except _Unanswered as exc:
                    reasons.append(f"{command.description}: {exc}")
                    continue
                if reasons:
                    logger.info("%s: %s answered by %s (after %s)", self._where(), what, command.description, "; ".join(reasons))
                return value, command
        finally:
            self._refusable, self._informational = saved
        logger.warning("%s: no answer to the %s query (%s); recorded as unknown, carrying on", self._where(), what, "; ".join(reasons))
        return None, None

    def _focal_power_range(self, command: ld4.Command) -> tuple[float, float]:
        """Send ``PwTA``/``MwCA``; warn on status bits; return (FPmin, FPmax) in dpt."""
        status, fp_max_raw, fp_min_raw = self._ask(command, ld4.parse_focal_power_range, command)
        self.focal_power_status = status
        if status:
            limits = f"focus.temperature_limits_c [{self.temperature_limits_c[0]:g}, {self.temperature_limits_c[1]:g}] C"
            bits = [text.format(limits=limits) for bit, text in _FOCAL_POWER_STATUS_BITS if status & (1 << bit)]
            logger.warning("%s: %s status %#04x: %s; focal power is not guaranteed there", self._where(), command.description,
                           status, "; ".join(bits) or "unknown bits")
        return (ld4.raw_to_focal_power(fp_min_raw, self._firmware_type), ld4.raw_to_focal_power(fp_max_raw, self._firmware_type))

    def _do_close(self) -> None:
        self._shutdown(park=True, reason="close")

    def _shutdown(self, *, park: bool, reason: str) -> None:
        """Park (best effort), close the port, stop the emulator; idempotent."""
        with self._io_lock:
            if park and self._ser is not None:
                self._park(reason)
            ser, self._ser = self._ser, None
            if ser is not None:
                try:
                    ser.close()
                except Exception as exc:  # noqa: BLE001 - closing must not fail
                    logger.warning("%s: closing the port failed: %s", self._where(), exc)
            self._sweep = None
            self._device_mode = "current"
            if self.emulator is not None:
                # let the in-process emulator serve the park frames before it stops
                park_frame = ld4.set_current(self._park_raw()).frame
                deadline_s = time.monotonic() + 0.5
                while park and self.emulator.received[-1:] != [park_frame] and time.monotonic() < deadline_s:
                    time.sleep(0.002)
                self.emulator.stop()
                self.emulator = None

    def _park(self, reason: str) -> None:
        """Current mode, then ``park_current_ma``; every failure is logged, none raised."""
        ser = self._ser
        if ser is None:
            return
        self._last_set = None  # stale errors are only logged from here on
        i_max = self._max_current_ma
        raw = self._park_raw()
        mode_cmd = ld4.set_mode_current()
        try:
            self._drain(ser)
            ser.write(mode_cmd.frame)
            data = self._read_reply(ser, mode_cmd, time.monotonic() + min(self.timeout_s, _PARK_REPLY_TIMEOUT_S))
            ld4.parse_mode_ack(data, mode_cmd)
        except Exception as exc:  # noqa: BLE001 - best effort
            logger.warning("%s: parking (%s): %s failed: %s", self._where(), reason, mode_cmd.description, exc)
        try:
            ser.write(ld4.set_current(raw).frame)
            ser.flush()
            logger.info("%s: parked at %.2f mA (%s)", self._where(), ld4.raw_to_current(raw, i_max) if i_max else 0.0, reason)
        except Exception as exc:  # noqa: BLE001 - best effort
            logger.warning("%s: parking (%s): Aw (set current) failed: %s", self._where(), reason, exc)

    def _park_raw(self) -> int:
        """The raw park current; 0 while I_max is unknown or the park current exceeds it."""
        i_max = self._max_current_ma
        if not i_max or abs(self.park_current_ma) > i_max:
            return 0
        return ld4.current_to_raw(self.park_current_ma, i_max)

    # ------------------------------------------------------------------ FocusActuator
    def _do_move(self, value: float) -> None:
        if self._device_mode == "triangle":
            raise DeviceError(f"{self._where()}: move_to while a triangle sweep runs; call stop_signal() first")
        if self.mode == "current":
            raw = ld4.current_to_raw(value, self._max_current_ma or 0.0)
            self._set(ld4.set_current(raw))
            self._target = ld4.raw_to_current(raw, self._max_current_ma or 0.0)
        else:
            raw = ld4.focal_power_to_raw(value, self._firmware_type)
            self._set(ld4.set_focal_power(raw))
            self._target = ld4.raw_to_focal_power(raw, self._firmware_type)
        self._readback_pending = True

    def _do_is_settled(self) -> bool:
        """True once ``settle_time_s`` has passed since the last set command: the LD4 cannot
        report settling (set commands have no reply, and it has no settled flag), so this is
        a fixed wait timed from the write. Meanwhile, an error reply the LD4 sent for that
        command is raised."""
        self._check_unsolicited()
        settled = time.monotonic() - self._written_at_s >= self.settle_time_s
        if settled and self._readback_pending and self._temperature_command is None:
            # Set commands have no reply, and a sweep's only other query is the per-slice
            # temperature: without TCA/TA a silent LD4 (hung, unplugged behind a hub) would go
            # unnoticed for a whole sweep. One read-back per move times out instead.
            self._readback_pending = False
            self._do_position()
        return settled

    def _do_position(self) -> float:
        if self.mode == "current":
            return ld4.raw_to_current(self._ask(ld4.get_current(), ld4.parse_current_raw), self._max_current_ma or 0.0)
        return ld4.raw_to_focal_power(self._ask(ld4.get_focal_power(), ld4.parse_focal_power_raw), self._firmware_type)

    def compensated_temperature_c(self) -> tuple[float, float] | None:
        """In focal-power mode the LD4 guarantees focal power within ``temperature_limits_c``."""
        return self.temperature_limits_c if self.mode == "focal_power" else None

    def temperature_c(self) -> float | None:
        """The lens temperature from ``TCA`` (or ``TA``, whichever answered at open), °C;
        None while closed or when neither answered at open."""
        if not self.is_open or self._temperature_command is None:
            return None
        return self._ask(self._temperature_command, ld4.parse_temperature_c)

    # ------------------------------------------------------------------ extras
    def active_mode(self) -> str:
        """The mode the LD4 reports (``MMA``): "current", "triangular", "focal power", ..."""
        self._require_open("active_mode")
        number = self._ask(ld4.get_active_mode(), ld4.parse_active_mode)
        return ld4.MODE_NAMES.get(number, f"unknown ({number})")

    def status(self) -> int:
        """The ``Sr`` status bitfield (its layout is not verified on hardware)."""
        self._require_open("status")
        return self._ask(ld4.get_status(), ld4.parse_status)

    def start_triangle(self, lower: float, upper: float, frequency_hz: float) -> None:
        """Sweep the current continuously as a triangle between ``lower`` and ``upper`` mA at
        ``frequency_hz`` (>= 0.1 Hz; keep it well below the lens's ~150 Hz resonance).

        Sends ``PwLA``, ``PwUA``, ``PwFA`` (mHz) and then ``MwTA``. ``move_to`` is refused until
        :meth:`stop_signal`. The values are in mA in either driver mode.
        """
        self._require_open("start_triangle")
        i_max = self._max_current_ma or 0.0
        lo_ma, hi_ma = (-i_max, i_max) if self.mode == "focal_power" else self._limits
        for what, value in (("lower", lower), ("upper", upper)):
            if not (math.isfinite(value) and lo_ma <= value <= hi_ma):
                raise InputError(f"{self.name}: triangle {what} current {value:g} mA outside [{lo_ma:g}, {hi_ma:g}] mA")
        if not lower < upper:
            raise InputError(f"{self.name}: triangle lower current {lower:g} mA must be below upper {upper:g} mA")
        if not (math.isfinite(frequency_hz) and frequency_hz >= ld4.MIN_FREQUENCY_HZ):
            raise InputError(f"{self.name}: triangle frequency {frequency_hz:g} Hz must be >= {ld4.MIN_FREQUENCY_HZ:g} Hz")
        if frequency_hz > 100.0:
            logger.warning("%s: triangle at %g Hz is close to the lens resonance (~150 Hz)", self._where(), frequency_hz)
        lower_raw, upper_raw = ld4.current_to_raw(lower, i_max), ld4.current_to_raw(upper, i_max)
        frequency_mhz = ld4.frequency_to_mhz(frequency_hz)
        self._set(ld4.set_signal_lower(lower_raw))
        self._set(ld4.set_signal_upper(upper_raw))
        self._set(ld4.set_signal_frequency(frequency_mhz))
        command = ld4.set_mode_triangular()
        self._ask(command, ld4.parse_mode_ack, command)
        self._device_mode = "triangle"
        self._sweep = {
            "lower_ma": ld4.raw_to_current(lower_raw, i_max),
            "upper_ma": ld4.raw_to_current(upper_raw, i_max),
            "frequency_hz": frequency_mhz / 1000.0,
        }
        logger.info("%s: triangle sweep %.3f..%.3f mA at %.3f Hz", self._where(), self._sweep["lower_ma"], self._sweep["upper_ma"], self._sweep["frequency_hz"])

    def stop_signal(self) -> None:
        """End a signal-generator sweep: back to current mode (``MwDA``) at the last target;
        a driver configured for focal-power mode then re-enters it (``MwCA``)."""
        self._require_open("stop_signal")
        self._enter_current_mode()
        self._sweep = None
        if self.mode == "focal_power":
            self._focal_power_range(ld4.set_mode_focal_power())
            self._device_mode = "focal_power"
        else:
            self._set(ld4.set_current(ld4.current_to_raw(self._target, self._max_current_ma or 0.0)))

    def _enter_current_mode(self) -> None:
        command = ld4.set_mode_current()
        self._ask(command, ld4.parse_mode_ack, command)
        self._device_mode = "current"

    # ------------------------------------------------------------------ I/O
    def _where(self) -> str:
        """The device and its port, for messages."""
        return self.name if self.port_path in self.name else f"{self.name} ({self.port_path})"

    def _set(self, command: ld4.Command) -> None:
        """Write a set command (no reply); record the write time."""
        with self._io_lock:
            ser = self._live_port(command)
            try:
                self._drain(ser)
                ser.write(command.frame)
                ser.flush()
            except self._port_error_types as exc:
                self._fail(DeviceError(f"{self._where()}: command {command.description}: port failed: {exc}"), exc)
            self._last_set = command
            self._set_sends = 1
            self._written_at_s = time.monotonic()

    def _ask(self, command: ld4.Command, parser: Any, *args: Any) -> Any:
        """Send a query and decode its reply with ``parser(reply, *args)``; a reply that
        passes the CRC but cannot be decoded is a ProtocolError naming the command."""
        data = self._query(command)
        try:
            return parser(data, *args)
        except ld4.LD4ReplyError as exc:
            if self._informational:
                raise _Unanswered(str(exc)) from exc
            self._fail(ProtocolError(f"{self._where()}: command {command.description}: {exc}"), exc)

    def _query(self, command: ld4.Command) -> bytes:
        """Write a query and return its complete, CRC-checked reply (payload + CRC + CRLF).

        A corrupt, short or missing reply (or the LD4's own "CRC failed") is retried
        ``retries`` times; each try waits at most ``timeout_s`` for its reply.

        A set command's error reply can arrive after the drain that precedes this query (USB
        latency), ahead of the query's own reply. So when a set command was written at most
        ``timeout_s`` before this query, with no reply read since (the LD4 answers in order,
        so the first reply read after the set is the only place its error can land), and that
        first reply is an error reply, the query's own reply is awaited too (up to
        ``timeout_s``): if a valid one follows, the error was the set command's and is raised
        as a ProtocolError naming it (the LD4 did not apply it, so :attr:`target` is wrong).
        If none follows, the error was this query's own and is handled as above (retried for
        E1/N); such a query error right after a set thus costs one extra ``timeout_s`` wait.
        """
        with self._io_lock:
            ser = self._live_port(command)
            tries = self.retries + 1
            problem = ""
            got_bytes = False
            log_level = logging.DEBUG if self._informational else logging.WARNING
            for attempt in range(1, tries + 1):
                try:
                    self._drain(ser)
                    pending_set = self._recent_set()
                    self._last_set = None
                    ser.write(command.frame)
                    ser.flush()
                    data = self._read_reply(ser, command, time.monotonic() + self.timeout_s)
                    if pending_set is not None:
                        self._raise_late_set_error(ser, command, pending_set, data)
                except self._port_error_types as exc:
                    self._fail(DeviceError(f"{self._where()}: command {command.description}: port failed: {exc}"), exc)
                got_bytes = got_bytes or bool(data)
                try:
                    self._check_reply(command, data)
                except ld4.LD4ReplyError as exc:
                    if data and not exc.retryable:
                        if self._refusable and isinstance(exc, ld4.LD4ErrorReply) and exc.code in (2, 3):
                            raise _Refused(str(exc)) from exc
                        self._fail(ProtocolError(f"{self._where()}: command {command.description}: {exc}"), exc)
                    problem = str(exc) if data else "no reply"
                    # a try that another follows is worth a warning; the last one's failure is raised (and reported once)
                    logger.log(log_level if attempt < tries else logging.DEBUG,
                               "%s: command %s: %s (try %d of %d)", self._where(), command.description, problem, attempt, tries)
                    continue
                if attempt > 1:
                    logger.info("%s: command %s succeeded on try %d of %d", self._where(), command.description, attempt, tries)
                return data
            if not got_bytes:
                if self._informational:
                    raise _Unanswered(f"no reply within {self.timeout_s:g} s, {tries} tries")
                hint = " (is this an Optotune LD4, and is it powered?)" if command.opcode == "Start" else ""
                self._fail(DeviceTimeout(
                    f"{self._where()}: command {command.description}: no reply within {self.timeout_s:g} s, {tries} tries{hint}"
                ), None)
            if self._informational:
                raise _Unanswered(f"{problem} after {tries} tries")
            self._fail(ProtocolError(f"{self._where()}: command {command.description}: {problem} after {tries} tries"), None)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _check_reply(command: ld4.Command, data: bytes) -> None:
        """Raise :class:`~capture.ld4_protocol.LD4ReplyError` unless ``data`` is a complete,
        CRC-checked reply to ``command``."""
        if command.opcode == "Start":
            ld4.check_handshake(data)
        else:
            ld4.payload_of(data, command.reply_len)

    def _recent_set(self) -> ld4.Command | None:
        """The last set command, if no reply has been read since it was written and it was
        written at most ``timeout_s`` ago (later, its error reply would have been drained)."""
        if self._last_set is not None and time.monotonic() - self._written_at_s <= self.timeout_s:
            return self._last_set
        return None

    def _raise_late_set_error(self, ser: serial.Serial, command: ld4.Command, set_command: ld4.Command, data: bytes) -> None:
        """``data`` is the first reply read after ``set_command``, in answer to the query
        ``command``. If it is an error reply followed by a valid reply to ``command``, the
        error was ``set_command``'s: raise it as a ProtocolError naming that command."""
        error = ld4.parse_error_reply(data)
        if error is None:
            return
        follow = self._read_reply(ser, command, time.monotonic() + self.timeout_s)
        try:
            self._check_reply(command, follow)
        except ld4.LD4ReplyError:
            if follow:
                logger.warning("%s: discarded %d byte(s) after an error reply to %s: %s",
                               self._where(), len(follow), command.description, follow.hex(" "))
            return  # no valid reply of its own followed: the error was the query's
        self._fail(ProtocolError(
            f"{self._where()}: command {set_command.description}: {error} (the error reply arrived late, "
            f"after the next command {command.description} had been sent; the set command was not applied)"
        ), error)

    def _live_port(self, command: ld4.Command) -> serial.Serial:
        if self._ser is None:
            raise DeviceError(f"{self._where()}: command {command.description}: the port is closed (after an earlier error or close())")
        return self._ser

    def _fail(self, error: DeviceError, cause: BaseException | None) -> NoReturn:
        """Park the lens (once the handshake succeeded: never poke an unknown device), close
        the port, mark the driver closed and raise ``error``."""
        logger.debug("%s", error)  # raised: the caller reports it (once)
        self._shutdown(park=self._handshake_ok, reason="after an error")
        self._open = False
        raise error from cause

    def _drain(self, ser: serial.Serial, *, resend: bool = False) -> None:
        """Discard stale input. An error reply among it belongs to the last set command (set
        commands have no reply on success): raise it as a ProtocolError naming that command.

        With ``resend`` (only while waiting for the lens to settle, i.e. before any frame is
        taken at that focus), a "CRC failed" reply (``E1``/``N``: the LD4 saw the frame
        corrupted and did not apply it) makes the set command go out again, up to ``retries``
        times, and the settle wait starts again from that write. Found later (while draining for
        a query), the set command's error still stops the driver: a frame may have been taken
        at the focus it failed to set."""
        waiting = ser.in_waiting
        if not waiting:
            return
        stale = ser.read(waiting)
        error = next((e for e in (ld4.parse_error_reply(stale[-n:]) for n in (6, 4, 3)) if e is not None), None)
        if error is not None and self._last_set is not None:
            if resend and error.retryable and self._set_sends <= self.retries:
                self._set_sends += 1
                logger.warning("%s: command %s: %s; sent again (send %d of %d)", self._where(), self._last_set.description,
                               error, self._set_sends, self.retries + 1)
                ser.write(self._last_set.frame)
                ser.flush()
                self._written_at_s = time.monotonic()
                return
            sends = f" (sent {self._set_sends} times)" if self._set_sends > 1 else ""
            self._fail(ProtocolError(f"{self._where()}: command {self._last_set.description}: {error}{sends}"), error)
        logger.log(logging.DEBUG if self._informational else logging.WARNING,
                   "%s: discarded %d stale byte(s): %s", self._where(), len(stale), stale.hex(" "))

    def _check_unsolicited(self) -> None:
        """Raise an error reply that arrived for the last set command (does not block)."""
        with self._io_lock:
            ser = self._ser
            if self._last_set is None or ser is None:
                return
            try:
                self._drain(ser, resend=True)
            except self._port_error_types as exc:
                self._fail(DeviceError(f"{self._where()}: command {self._last_set.description}: port failed: {exc}"), exc)

    def _read_reply(self, ser: serial.Serial, command: ld4.Command, deadline_s: float) -> bytes:
        """Read one reply by its fixed length until ``deadline_s`` (host monotonic). An error
        reply (``E``..., ``N\\r\\n``) is recognised by its first byte (no regular reply starts
        with E or N) and read by its own length. Returns what arrived (maybe short or empty)."""
        data = self._read_exact(ser, 1, deadline_s)
        if not data:
            return data
        if data == b"E":
            data += self._read_exact(ser, 3, deadline_s)  # E + code + (CRLF | 2 CRC bytes)
            if len(data) == 4 and ld4.parse_error_reply(data) is not None:
                return data
            return data + self._read_exact(ser, 2, deadline_s)
        if data == b"N":
            return data + self._read_exact(ser, 2, deadline_s)
        return data + self._read_exact(ser, command.reply_len - 1, deadline_s)

    @staticmethod
    def _read_exact(ser: serial.Serial, n: int, deadline_s: float) -> bytes:
        """Up to ``n`` bytes; fewer only when ``deadline_s`` (host monotonic) has passed."""
        buf = bytearray()
        while len(buf) < n:
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0:
                break
            ser.timeout = remaining_s
            buf += ser.read(n - len(buf))
        return bytes(buf)

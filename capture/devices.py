"""Device roles: one abstract base per role, with template methods.

Public methods validate arguments, check state, log and enforce finite timeouts; drivers
fill in the small private ``_do_*`` methods. Every driver of a role passes the same
conformance tests (``tests/test_device_conformance.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from capture.errors import DeviceError, DeviceTimeout, InputError

logger = logging.getLogger(__name__)

__all__ = ["Frame", "Camera", "FocusActuator"]


@dataclass
class Frame:
    """One frame, copied out of the device's buffer.

    Attributes:
        image: ``[H, W]`` or ``[H, W, 3]`` uint8/uint16, owned by this object.
        frame_id: the device's frame counter.
        timestamp_s: start of exposure, seconds, on ``timestamp_source``'s clock.
        timestamp_source: ``"camera"`` or ``"host"`` (host monotonic clock).
        exposure_s: exposure time used (None where the device does not say).
        gain_db: gain used (None where the device does not say).
        significant_bits: meaningful bits per sample (LSB-aligned in uint16 data).
    """

    image: np.ndarray
    frame_id: int
    timestamp_s: float
    timestamp_source: str
    exposure_s: float | None
    gain_db: float | None
    significant_bits: int
    meta: dict[str, Any] = field(default_factory=dict)


def _check_timeout(device: str, what: str, timeout_s: float) -> None:
    """Every wait has a finite, positive timeout."""
    if not (np.isfinite(timeout_s) and timeout_s > 0):
        raise InputError(f"{device}: {what} timeout_s must be finite and > 0, got {timeout_s}")


class _Device(ABC):
    """Open/close life cycle shared by every role: context manager, idempotent ``close()``."""

    def __init__(self, *, name: str) -> None:
        self.name = name
        self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        if self._open:
            return
        logger.debug("opening %s", self.name)
        self._do_open()
        self._open = True

    def close(self) -> None:
        """Release the device; safe to call more than once, and after a failed open."""
        if not self._open:
            return
        self._open = False
        try:
            self._do_close()
        finally:
            logger.debug("closed %s", self.name)

    def __enter__(self) -> _Device:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self, what: str) -> None:
        if not self._open:
            raise DeviceError(f"{self.name}: {what} called while the device is closed")

    @abstractmethod
    def _do_open(self) -> None: ...

    @abstractmethod
    def _do_close(self) -> None: ...


class Camera(_Device):
    """Role: a camera. ``grab`` returns the first frame whose exposure starts at or after a
    given host-monotonic time, copied out of the device buffer."""

    #: clock of ``Frame.timestamp_s``: "camera" or "host"
    timestamp_source: str = "host"

    @property
    @abstractmethod
    def image_hw(self) -> tuple[int, int]: ...

    @property
    @abstractmethod
    def exposure_s(self) -> float | None:
        """Exposure time in seconds; None where the device does not say."""

    def grab(self, *, start_after_host_s: float | None = None, timeout_s: float = 2.0) -> Frame:
        """The first frame whose exposure starts at or after ``start_after_host_s``
        (``time.monotonic()`` seconds; None = the next frame).

        Raises:
            DeviceTimeout: no such frame within ``timeout_s``.
        """
        self._require_open("grab")
        _check_timeout(self.name, "grab", timeout_s)
        after = time.monotonic() if start_after_host_s is None else float(start_after_host_s)
        frame = self._do_grab(start_after_host_s=after, deadline_host_s=time.monotonic() + timeout_s)
        if not frame.image.flags.owndata:
            frame.image = frame.image.copy()
        return frame

    @abstractmethod
    def _do_grab(self, *, start_after_host_s: float, deadline_host_s: float) -> Frame: ...


class SettleTimeout(DeviceTimeout):
    """:meth:`FocusActuator.wait_settled` ran out of time (the device answered, but did not
    report settled); other timeouts while waiting are the device's own."""


class FocusActuator(_Device):
    """Role: something that sets focus in a device unit (mA for a liquid lens, mm for a stage).

    ``move_to`` validates against the limits and returns at once; ``wait_settled`` blocks
    (finite timeout) until the device reports it has settled.
    """

    unit: str = ""
    #: the longest one move may take (a stage's travel at its feed rate; 0 for a lens, which
    #: settles in milliseconds): a sweep waits at least this long for each slice to settle
    move_timeout_s: float = 0.0
    #: set by a caller that must be able to stop a wait from another thread (continuous mode's
    #: second Ctrl-C): :meth:`wait_settled` then raises KeyboardInterrupt at its next poll
    abort_event: threading.Event | None = None

    def compensated_temperature_c(self) -> tuple[float, float] | None:
        """The lens temperatures (lower, upper) over which the device guarantees its focus
        (an LD4 in focal-power mode: its temperature limits), or None where none applies."""
        return None

    @property
    @abstractmethod
    def limits(self) -> tuple[float, float]:
        """Lowest and highest value the device accepts, in ``unit``."""

    def move_to(self, value: float) -> None:
        self._require_open("move_to")
        lo, hi = self.limits
        if not (lo <= value <= hi) or not np.isfinite(value):
            raise InputError(f"{self.name}: target {value:.4g} {self.unit} outside the device limits [{lo:g}, {hi:g}] {self.unit}")
        logger.debug("%s: move to %.4f %s", self.name, value, self.unit)
        self._do_move(float(value))

    def wait_settled(self, *, timeout_s: float, poll_s: float = 0.002) -> float:
        """Block until settled; returns the host-monotonic time at which it was seen settled.

        Raises:
            DeviceTimeout: not settled within ``timeout_s``.
            KeyboardInterrupt: :attr:`abort_event` was set meanwhile.
        """
        self._require_open("wait_settled")
        _check_timeout(self.name, "wait_settled", timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.abort_event is not None and self.abort_event.is_set():
                raise KeyboardInterrupt(f"stopped while {self.name} was settling (target {self.target:.4g} {self.unit})")
            if self._do_is_settled():
                return time.monotonic()  # after the check: a driver's check may block until settled
            now = time.monotonic()  # after the check too: it may have taken a while
            if now >= deadline:
                raise SettleTimeout(f"{self.name}: not settled within {timeout_s:g} s (target {self.target:.4g} {self.unit})")
            time.sleep(min(poll_s, deadline - now))

    @property
    @abstractmethod
    def target(self) -> float:
        """The last commanded value, in ``unit``."""

    def position(self) -> float:
        """The value the device reports now, in ``unit``."""
        self._require_open("position")
        return self._do_position()

    def temperature_c(self) -> float | None:
        """Device temperature where it has a sensor, else None."""
        return None

    @abstractmethod
    def _do_move(self, value: float) -> None: ...

    @abstractmethod
    def _do_is_settled(self) -> bool: ...

    @abstractmethod
    def _do_position(self) -> float: ...

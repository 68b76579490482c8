"""Camera-integrated focus through the GenICam SFNC ``OpticControl`` features.

Cameras that drive a lens themselves (Basler ace 2 / boost with an Optotune or LensConnect
lens, IDS, OMRON SENTECH) expose, under ``OpticControllerSelector = OpticController0``:
``FocalPower`` (float, diopters) or ``FocusStepper`` (integer steps, 0 = closest focus),
``FocusStatus`` (NotConnected, NotInitialized, NotSupported, Busy, Ready, Error),
``FocusInitialize`` / ``OpticControllerInitialize`` and ``OpticControllerTemperature``.
The actuator probes for those nodes at open; a camera without them gets one clear line.
It shares the camera's lock, because GenApi access is not documented as thread safe.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from capture.devices import FocusActuator
from capture.errors import ConfigError, DeviceError
from capture.genicam_camera import node

logger = logging.getLogger(__name__)

__all__ = ["GenicamFocus", "FOCUS_FEATURES"]

#: feature -> unit, in the order they are probed
FOCUS_FEATURES = {"FocalPower": "dpt", "FocusStepper": "steps"}


class GenicamFocus(FocusActuator):
    """Focus by the camera's own lens controller.

    Args:
        node_map: returns the camera's remote node map (called at open, after the camera opened).
        controller: the ``OpticControllerSelector`` entry.
        feature: ``auto`` (FocalPower, else FocusStepper) or one of them.
        settle_time_s: used where the camera has no ``FocusStatus`` to report settling.
        lock: the camera's lock (None: a private one).
    """

    def __init__(
        self,
        node_map: Callable[[], Any],
        *,
        controller: str = "OpticController0",
        feature: Literal["auto", "FocalPower", "FocusStepper"] = "auto",
        settle_time_s: float = 0.05,
        lock: Any = None,
        name: str = "genicam focus",
    ) -> None:
        super().__init__(name=name)
        self._node_map_source = node_map
        self.controller = controller
        self.feature_requested = feature
        self.settle_time_s = float(settle_time_s)
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self._nm: Any = None
        self._feature = ""
        self._target = 0.0
        self._moved_at_s = 0.0

    @property
    def feature(self) -> str:
        return self._feature

    @property
    def limits(self) -> tuple[float, float]:
        n = self._focus_node()
        with self._lock:
            try:
                return float(n.min), float(n.max)
            except Exception as exc:
                raise DeviceError(f"{self.name}: reading the limits of {self._feature} failed: {exc}") from exc

    @property
    def target(self) -> float:
        return self._target

    def _focus_node(self) -> Any:
        self._require_open("limits")
        return node(self._nm, self._feature)

    def _do_open(self) -> None:
        with self._lock:
            nm = self._node_map_source()
            selector = node(nm, "OpticControllerSelector")
            if selector is not None:
                try:
                    selector.value = self.controller
                except Exception as exc:
                    raise ConfigError(f"focus.controller: {self.controller!r} not accepted by the camera's OpticControllerSelector: {exc}") from exc
            wanted = list(FOCUS_FEATURES) if self.feature_requested == "auto" else [self.feature_requested]
            present = [f for f in wanted if node(nm, f) is not None]
            if not present:
                raise ConfigError(
                    f"focus.driver: genicam: the camera has no {' or '.join(wanted)} feature (SFNC OpticControl); "
                    "use a serial focus driver (optotune, gcode) instead"
                )
            self._nm, self._feature = nm, present[0]
            self.unit = FOCUS_FEATURES[self._feature]
            status = self._status()
            if status == "NotInitialized":
                for command in ("FocusInitialize", "OpticControllerInitialize"):
                    n = node(nm, command)
                    if n is not None:
                        try:
                            n.execute()
                        except Exception as exc:
                            raise DeviceError(f"{self.name}: executing {command} (FocusStatus NotInitialized) failed: {exc}") from exc
                        break
            self._target = self._read_focus()
        logger.info("%s: %s (%s) on %s", self.name, self._feature, self.unit, self.controller)

    def _do_close(self) -> None:
        self._nm = None

    def _status(self) -> str | None:
        n = node(self._nm, "FocusStatus")
        if n is None:
            return None
        try:
            return str(n.value)
        except Exception as exc:
            raise DeviceError(f"{self.name}: reading FocusStatus failed: {exc}") from exc

    def _do_move(self, value: float) -> None:
        with self._lock:
            n = node(self._nm, self._feature)
            try:
                n.value = int(round(value)) if self._feature == "FocusStepper" else float(value)
            except Exception as exc:
                raise DeviceError(f"{self.name}: writing {self._feature} = {value:g} {self.unit} failed: {exc}") from exc
            self._target = float(round(value)) if self._feature == "FocusStepper" else float(value)
            self._moved_at_s = time.monotonic()

    def _do_is_settled(self) -> bool:
        with self._lock:
            status = self._status()
        if status is None:
            return time.monotonic() - self._moved_at_s >= self.settle_time_s
        if status in ("Error", "NotConnected", "NotSupported"):
            raise DeviceError(f"{self.name}: FocusStatus is {status} after moving {self._feature} to {self._target:g} {self.unit}")
        return status == "Ready"

    def _do_position(self) -> float:
        with self._lock:
            return self._read_focus()

    def _read_focus(self) -> float:
        """The focus feature's value; any GenApi failure (device removed, not readable) is a
        :class:`DeviceError` naming the feature. Call with the lock held."""
        try:
            return float(node(self._nm, self._feature).value)
        except Exception as exc:
            raise DeviceError(f"{self.name}: reading {self._feature} failed: {exc}") from exc

    def temperature_c(self) -> float | None:
        if self._nm is None:
            return None
        with self._lock:
            n = node(self._nm, "OpticControllerTemperature")
            try:
                return float(n.value) if n is not None else None
            except Exception:
                return None

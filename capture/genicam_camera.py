"""A GenICam machine-vision camera through harvesters (any GenTL producer).

Life cycle on open: load the producer(s), enumerate, pick the device (serial number, id or
index), configure it *before* ``start()`` (start locks Width/Height/PixelFormat on real
cameras), then start acquisition. Every feature write checks that the node exists: a feature
the device lacks is a warning that names it (and :attr:`GenicamCamera.missing_features`),
never a crash.

Getting "the first frame that starts after the lens settled":

- ``trigger: software`` (the default) where the camera has ``TriggerSoftware``: stale buffers
  are dropped, then the trigger is fired after the settle time, so the exposure starts after it;
- ``trigger: hardware``: the camera waits for its trigger line; stale buffers are dropped first;
- ``trigger: free_run`` (and the fallback when software triggering is missing): the stream
  keeps only the newest buffer (``StreamBufferHandlingMode = NewestOnly``); with ``id0`` the
  newest frame delivered when settling ended, frame ``id0 + 1`` may have started before it,
  so the first frame with id >= ``id0 + 2`` is taken; where frame ids do not count up, one
  frame is discarded.

Frames are copied out of the buffer before it is queued back. Timestamps come from the camera
where the producer gives them (``timestamp_source: camera``), else the host monotonic clock at
delivery minus the exposure (``host``). Harvesters' thread safety is not documented, so all
calls on one camera are serialised by a lock.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from capture.devices import Camera, Frame
from capture.errors import ConfigError, DeviceError, DeviceTimeout, RigError
from capture.gentl import info_field, resolve_producers
from capture.pixel_formats import to_image

logger = logging.getLogger(__name__)

__all__ = ["GenicamCamera", "TriggerMode"]

TriggerMode = Literal["software", "hardware", "free_run"]


def node(node_map: Any, name: str) -> Any | None:
    """The node ``name`` of a GenApi node map, or None where the device lacks it."""
    try:
        has = node_map.has_node(name)
    except AttributeError:  # a plain object standing in for a node map
        has = hasattr(node_map, name)
    return getattr(node_map, name) if has else None


def _producers_not_loaded(harvester: Any, producers: Sequence[Path]) -> list[Path]:
    """The producers harvesters skipped at ``update()`` (it only logs them). Read from its
    ``_producers`` list (each with a ``path_name``); an empty list where that is unavailable."""
    try:
        loaded = {str(Path(p.path_name).resolve()) for p in harvester._producers}
    except Exception:  # another harvesters release: nothing to tell
        return []
    return [p for p in producers if str(Path(p).resolve()) not in loaded]


@contextlib.contextmanager
def _own_sigint() -> Iterator[None]:
    """Keep the process's Ctrl-C handler across harvesters' ``Harvester.create``: created in
    the main thread, its ImageAcquirer installs a SIGINT handler of its own that only stops
    the acquisition, so Ctrl-C at a prompt or mid-sweep did nothing until the next grab
    failed as "disconnected" (exit 3) instead of stopping the run (exit 130)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


class GenicamCamera(Camera):
    """A camera on a GenTL producer.

    Args:
        producer: a ``.cti`` path, ``"viky"``, or None to search ``GENICAM_GENTL64_PATH``.
        serial_number / device_id / index: which device (at most one; default index 0).
        pixel_format: e.g. ``Mono8``, ``Mono12``, ``RGB8``, ``BayerRG8`` (None keeps the device's).
        exposure_s, gain_db: fixed photometry (auto modes switched off); None keeps the device's.
        roi: ``(offset_x, offset_y, width, height)`` pixels, or None for the device's.
        trigger: ``software``, ``hardware`` or ``free_run``.
        trigger_source: the line for hardware triggering (``Line0``...).
        frame_rate_hz: ``AcquisitionFrameRate`` where the device has it.
        fetch_timeout_s: the longest wait for one frame (finite).
        num_buffers: buffers announced to the stream.
    """

    def __init__(
        self,
        *,
        producer: str | Path | None = None,
        serial_number: str | None = None,
        device_id: str | None = None,
        index: int | None = None,
        pixel_format: str | None = None,
        exposure_s: float | None = None,
        gain_db: float | None = None,
        roi: Sequence[int] | None = None,
        trigger: TriggerMode = "software",
        trigger_source: str = "Line0",
        frame_rate_hz: float | None = None,
        fetch_timeout_s: float = 2.0,
        num_buffers: int = 4,
        name: str | None = None,
    ) -> None:
        chosen = [k for k, v in (("serial_number", serial_number), ("id", device_id), ("index", index)) if v is not None]
        if len(chosen) > 1:
            raise ConfigError(f"camera: give at most one of serial_number, id, index (got {', '.join(chosen)})")
        super().__init__(name=name or "genicam camera")
        self.producer = producer
        self.serial_number, self.device_id, self.index = serial_number, device_id, index
        self.pixel_format_requested = pixel_format
        self.exposure_requested_s, self.gain_requested_db = exposure_s, gain_db
        self.roi = tuple(int(v) for v in roi) if roi is not None else None
        self.trigger_requested: TriggerMode = trigger
        self.trigger: TriggerMode = trigger
        self.trigger_source = trigger_source
        self.frame_rate_hz = frame_rate_hz
        self.fetch_timeout_s = float(fetch_timeout_s)
        self.num_buffers = int(num_buffers)
        self.missing_features: list[str] = []
        self.identity: dict[str, str] = {}
        self._lock = threading.RLock()
        self._harvester: Any = None
        self._acquirer: Any = None
        self._hw = (0, 0)
        self._last_frame_id = -1
        self._ids_count_up = True

    # ------------------------------------------------------------------ properties
    @property
    def image_hw(self) -> tuple[int, int]:
        return self._hw

    @property
    def exposure_s(self) -> float | None:
        """Exposure from the device where it has the feature, else None (unknown)."""
        n = self._exposure_node() if self._acquirer is not None else None
        if n is None:
            return None
        try:
            return float(n.value) * 1e-6
        except Exception:
            return None

    @property
    def node_map(self) -> Any:
        """The remote device's GenApi node map (for the SFNC focus actuator)."""
        self._require_open("node_map")
        return self._acquirer.remote_device.node_map

    @property
    def lock(self) -> threading.RLock:
        """Serialises every call on this device (shared with the in-camera focus actuator)."""
        return self._lock

    def _node(self, name: str) -> Any | None:
        return node(self._acquirer.remote_device.node_map, name)

    def _exposure_node(self) -> Any | None:
        n = self._node("ExposureTime")
        return n if n is not None else self._node("ExposureTimeAbs")

    # ------------------------------------------------------------------ open / close
    def _do_open(self) -> None:
        from harvesters.core import Harvester

        producers = resolve_producers(self.producer)
        harvester = Harvester()
        try:
            for p in producers:
                harvester.add_file(str(p), check_existence=True)
            harvester.update()
            infos = list(harvester.device_info_list)
            unloaded = _producers_not_loaded(harvester, producers)
            if unloaded and not infos:
                raise ConfigError(
                    f"camera.producer: {', '.join(map(str, unloaded))} is not a loadable GenTL producer "
                    "(harvesters could not open it: not a .cti library, or one for another platform)"
                )
            for p in unloaded:
                logger.warning("%s: GenTL producer %s could not be loaded; using the others", self.name, p)
            pick = self._pick(infos, producers)
            try:
                with _own_sigint():
                    self._acquirer = harvester.create(pick)
            except Exception as exc:
                raise DeviceError(f"{self.name}: cannot open device {pick} on {', '.join(map(str, producers))}: {exc}") from exc
            self._harvester = harvester
            info = infos[pick]
            self.identity = {k: str(info_field(info, a)) for k, a in (("id", "id_"), ("serial_number", "serial_number"), ("model", "model"), ("vendor", "vendor"))}
            self.identity["producer"] = ", ".join(str(p) for p in producers)
            self.name = f"genicam {self.identity['model']} #{self.identity['serial_number']}"
            try:
                self._configure()
            except RigError:
                raise
            except Exception as exc:  # a GenApi AccessException, OutOfRange, a removed device
                raise DeviceError(f"{self.name}: configuring the camera failed: {exc}") from exc
            try:
                self._acquirer.start()
            except Exception as exc:
                raise DeviceError(f"{self.name}: starting acquisition failed: {exc}") from exc
        except BaseException:
            self._teardown(harvester)
            raise
        logger.info("%s open: %dx%d, trigger %s, producer %s", self.name, self._hw[1], self._hw[0], self.trigger, self.identity["producer"])

    def _pick(self, infos: list[Any], producers: list[Path]) -> int:
        where = ", ".join(str(p) for p in producers)
        if not infos:
            raise DeviceError(f"{self.name}: no camera found on {where}")
        found = "; ".join(f"[{i}] id {info_field(d, 'id_')}, serial {info_field(d, 'serial_number')}" for i, d in enumerate(infos))
        if self.serial_number is not None:
            hits = [i for i, d in enumerate(infos) if str(info_field(d, "serial_number")) == str(self.serial_number)]
            what = f"serial_number {self.serial_number!r}"
        elif self.device_id is not None:
            hits = [i for i, d in enumerate(infos) if str(info_field(d, "id_")) == str(self.device_id)]
            what = f"id {self.device_id!r}"
        else:
            index = 0 if self.index is None else int(self.index)
            hits = [index] if 0 <= index < len(infos) else []
            what = f"index {index}"
        if not hits:
            raise DeviceError(f"{self.name}: no camera with {what} on {where}; found: {found}")
        return hits[0]

    def _configure(self) -> None:
        ia = self._acquirer
        ia.num_buffers = max(self.num_buffers, ia.min_num_buffers)
        nm = ia.remote_device.node_map
        if self.pixel_format_requested is not None:
            pf = self._require_feature("PixelFormat", "pixel_format")
            options = _symbolics(pf)
            if options and self.pixel_format_requested not in options:
                raise ConfigError(f"camera.pixel_format: {self.pixel_format_requested!r} not offered by {self.name}; valid: {', '.join(options)}")
            pf.value = self.pixel_format_requested
        if self.roi is not None:
            self._set_roi(nm)
        if self.frame_rate_hz is not None:
            self._set("AcquisitionFrameRateEnable", True, quiet=True)
            self._set("AcquisitionFrameRate", float(self.frame_rate_hz), field=("frame_rate_hz", 1.0, "Hz"))
        if self.exposure_requested_s is not None:
            self._set("ExposureAuto", "Off", quiet=True)
            exposure = ("exposure_s", 1e-6, "s")  # the features are in microseconds, the field in seconds
            if not self._set("ExposureTime", self.exposure_requested_s * 1e6, quiet=True, field=exposure):
                self._set("ExposureTimeAbs", self.exposure_requested_s * 1e6, report_as="ExposureTime", field=exposure)
        if self.gain_requested_db is not None:
            self._set("GainAuto", "Off", quiet=True)
            self._set("Gain", float(self.gain_requested_db), field=("gain_db", 1.0, "dB"))
        self._setup_trigger()
        if self.trigger == "free_run":
            stream = node(ia.data_streams[0].node_map, "StreamBufferHandlingMode")
            if stream is not None:
                stream.value = "NewestOnly"
            else:
                self._missing("StreamBufferHandlingMode", "stale frames are skipped by frame id only")
        self._hw = (int(nm.Height.value), int(nm.Width.value))

    def _setup_trigger(self) -> None:
        if self.trigger == "free_run":
            self._set("TriggerMode", "Off", quiet=True)
            return
        has_trigger = self._node("TriggerMode") is not None
        if self.trigger == "software" and (not has_trigger or self._node("TriggerSoftware") is None):
            self._missing("TriggerSoftware", "falling back to free_run with NewestOnly buffers")
            self.trigger = "free_run"
            return
        if self.trigger == "hardware" and not has_trigger:
            raise ConfigError(f"camera.trigger: hardware triggering needs TriggerMode, which {self.name} does not have")
        self._set("TriggerSelector", "FrameStart", quiet=True)
        self._set("TriggerMode", "On")
        if self.trigger == "hardware":
            options = _symbolics(self._node("TriggerSource")) if self._node("TriggerSource") is not None else ()
            if options and self.trigger_source not in options:
                raise ConfigError(f"camera.trigger_source: {self.trigger_source!r} not offered by {self.name}; valid: {', '.join(options)}")
        self._set("TriggerSource", "Software" if self.trigger == "software" else self.trigger_source)
        if self.trigger == "hardware":
            self._set("TriggerActivation", "RisingEdge", quiet=True)

    def _set_roi(self, nm: Any) -> None:
        x, y, w, h = self.roi  # type: ignore[misc]
        for feature in ("OffsetX", "OffsetY"):
            if self._node(feature) is not None:
                self._node(feature).value = 0
        for feature, value in (("Width", w), ("Height", h), ("OffsetX", x), ("OffsetY", y)):
            n = self._node(feature)
            if n is None:
                self._missing(feature, "roi not fully applied")
                continue
            lo, hi, inc = int(n.min), int(n.max), int(getattr(n, "inc", 1) or 1)
            if not lo <= value <= hi or (value - lo) % inc:
                raise ConfigError(f"camera.roi: {feature} {value} not accepted by {self.name} (min {lo}, max {hi}, step {inc})")
            n.value = int(value)

    def _require_feature(self, feature: str, field: str) -> Any:
        n = self._node(feature)
        if n is None:
            raise ConfigError(f"camera.{field}: {self.name} has no {feature} feature")
        return n

    def _set(self, feature: str, value: Any, *, quiet: bool = False, report_as: str | None = None,
             field: tuple[str, float, str] | None = None) -> bool:
        """Write a feature if the device has it (True); a missing one is a warning unless ``quiet``.

        ``field`` is ``(config field, scale, unit)`` for a number the user configured (the
        field's value is the feature's times ``scale``): a value outside the node's min/max, or
        one the device refuses as out of range, is a :class:`ConfigError` naming
        ``camera.<field>`` and the allowed range. Other write failures are device errors.
        """
        n = self._node(feature)
        if n is None:
            if not quiet:
                self._missing(report_as or feature, f"{value!r} not applied")
            return False
        limits = _limits(n) if field is not None else None
        if limits is not None and not limits[0] <= value <= limits[1]:
            raise self._out_of_range(feature, value, field, limits)  # type: ignore[arg-type]
        try:
            n.value = value
        except Exception as exc:
            if field is not None and type(exc).__name__ == "OutOfRangeException":
                raise self._out_of_range(feature, value, field, _limits(n), exc) from exc
            raise DeviceError(f"{self.name}: writing {feature} = {value!r} failed: {exc}") from exc
        return True

    def _out_of_range(self, feature: str, value: Any, field: tuple[str, float, str],
                      limits: tuple[float, float] | None, exc: BaseException | None = None) -> ConfigError:
        name, scale, unit = field
        if limits is not None:
            allowed = f"{self.name} allows {limits[0] * scale:g} to {limits[1] * scale:g} {unit} ({feature})"
        else:  # the node gave no min/max: the device's own words, on one line
            allowed = f"{self.name} refused it ({feature}): {' '.join(str(exc).split()).split(' : ')[0]}"
        return ConfigError(f"camera.{name}: {value * scale:g} {unit} is out of range; {allowed}")

    def _missing(self, feature: str, consequence: str) -> None:
        self.missing_features.append(feature)
        logger.warning("%s has no %s feature: %s", self.name, feature, consequence)

    def _do_close(self) -> None:
        with self._lock:
            self._teardown(self._harvester)

    def _teardown(self, harvester: Any) -> None:
        ia, self._acquirer, self._harvester = self._acquirer, None, None
        for step in (lambda: ia and ia.stop(), lambda: ia and ia.destroy(), lambda: harvester and harvester.reset()):
            try:
                step()
            except Exception as exc:  # closing must not fail on a device that already went away
                logger.debug("%s: ignored during close: %s", self.name, exc)

    # ------------------------------------------------------------------ grabbing
    def _do_grab(self, *, start_after_host_s: float, deadline_host_s: float) -> Frame:
        with self._lock:
            if start_after_host_s > deadline_host_s:
                time.sleep(max(0.0, deadline_host_s - time.monotonic()))
                raise DeviceTimeout(f"{self.name}: grab: no frame can start after the requested time before the timeout")
            wait_s = start_after_host_s - time.monotonic()
            if wait_s > 0:
                time.sleep(wait_s)
            if self.trigger == "free_run":
                return self._grab_free_run(deadline_host_s)
            self._drain()
            if self.trigger == "software":
                self._execute("TriggerSoftware")
            return self._fetch(deadline_host_s)

    def _grab_free_run(self, deadline_host_s: float) -> Frame:
        newest = self._drain()
        id0 = max(self._last_frame_id, newest)
        discard = not self._ids_count_up or id0 < 0
        while True:
            frame = self._fetch(deadline_host_s)
            if discard:
                discard = False
                continue
            if not self._ids_count_up or frame.frame_id >= id0 + 2:
                return frame

    def _drain(self) -> int:
        """Requeue every buffer already delivered; the newest frame id seen, or -1."""
        newest = -1
        while True:
            try:
                buf = self._acquirer.try_fetch(timeout=0.001)
            except Exception as exc:
                raise self._lost("drain the stream", exc) from exc
            if buf is None:
                return newest
            try:
                newest = max(newest, int(buf.frame_id))
            finally:
                buf.queue()

    def _execute(self, command: str) -> None:
        n = self._node(command)
        try:
            n.execute()
        except Exception as exc:
            raise self._lost(f"execute {command}", exc) from exc

    def _fetch(self, deadline_host_s: float) -> Frame:
        from genicam.gentl import TimeoutException

        timeout_s = max(0.001, min(self.fetch_timeout_s, deadline_host_s - time.monotonic()))
        try:
            buf = self._acquirer.fetch(timeout=timeout_s)
        except TimeoutException as exc:
            raise DeviceTimeout(f"{self.name}: fetch: no frame within {timeout_s:.3g} s (trigger {self.trigger}; is the camera streaming / the trigger wired?)") from exc
        except Exception as exc:
            raise self._lost("fetch", exc) from exc
        host_s = time.monotonic()
        try:
            if not buf.payload.components:
                raise DeviceError(f"{self.name}: fetch: buffer {buf.frame_id} has no image component")
            c = buf.payload.components[0]
            image, bits = to_image(
                c.data, width=int(c.width), height=int(c.height), pixel_format=str(c.data_format),
                components_per_pixel=float(c.num_components_per_pixel),
            )
            frame_id = int(buf.frame_id)
            try:
                stamp_s, source = int(buf.timestamp_ns) * 1e-9, "camera"
            except Exception:  # NotAvailableException where the producer has no timestamps
                stamp_s, source = host_s - (self.exposure_s or 0.0), "host"
        finally:
            buf.queue()
        if frame_id <= self._last_frame_id:
            self._ids_count_up = False
        self._last_frame_id = frame_id
        self.timestamp_source = source
        return Frame(
            image=image, frame_id=frame_id, timestamp_s=stamp_s, timestamp_source=source,
            exposure_s=self.exposure_s,
            gain_db=self._gain_db(), significant_bits=bits, meta={"pixel_format": str(c.data_format)},
        )

    def _gain_db(self) -> float | None:
        n = self._node("Gain")
        try:
            return float(n.value) if n is not None else None
        except Exception:
            return None

    def _lost(self, what: str, exc: BaseException) -> DeviceError:
        return DeviceError(f"{self.name}: {what} failed, the device may have been disconnected: {type(exc).__name__}: {exc}")


def _limits(num_node: Any) -> tuple[float, float] | None:
    """``(min, max)`` of an IFloat / IInteger node, or None where it has none (or cannot say now)."""
    try:
        lo, hi = num_node.min, num_node.max
        if lo is None or hi is None:
            return None
        return float(lo), float(hi)
    except Exception:  # not a number node, or the limits are not readable in this state
        return None


def _symbolics(enum_node: Any) -> tuple[str, ...]:
    try:
        return tuple(str(s) for s in enum_node.symbolics)
    except Exception:
        return ()

"""The GenICam camera (real harvesters against the real viky.cti GenTL producer), pixel
formats, producer discovery, and the paths viky lacks (software trigger, exposure, in-camera
focus) on node-map stand-ins (tests/genicam_doubles.py)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from capture.errors import ConfigError, DeviceError, DeviceTimeout
from capture.genicam_camera import GenicamCamera
from capture.genicam_focus import GenicamFocus
from capture.gentl import find_producers, list_cameras, resolve_producers, viky_path
from capture.pixel_formats import SUPPORTED_FORMATS, significant_bits_of, to_image
from tests.genicam_doubles import FakeLens, FakeNode, FakeNodeMap

VIKY = viky_path()
needs_viky = pytest.mark.skipif(not VIKY.is_file(), reason=f"viky.cti not found at {VIKY} (genicam wheel)")


# ----------------------------------------------------------------------------- pixel formats
def test_mono_formats_keep_their_bits() -> None:
    data = np.arange(12, dtype=np.uint16) * 300  # up to 3300 < 4096
    image, bits = to_image(data, width=4, height=3, pixel_format="Mono12")
    assert image.shape == (3, 4) and image.dtype == np.uint16 and bits == 12
    assert image[2, 3] == 3300
    image8, bits8 = to_image(np.arange(12, dtype=np.uint8), width=4, height=3, pixel_format="Mono8")
    assert image8.dtype == np.uint8 and bits8 == 8 and image8.flags.owndata
    assert significant_bits_of("Mono10p") == 10 and significant_bits_of("BayerGB16") == 16


def test_colour_formats_become_rgb() -> None:
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 30
    out, _ = to_image(rgb.ravel(), width=3, height=2, pixel_format="RGB8", components_per_pixel=3.0)
    np.testing.assert_array_equal(out, rgb)
    out, _ = to_image(rgb[..., ::-1].ravel(), width=3, height=2, pixel_format="BGR8", components_per_pixel=3.0)
    np.testing.assert_array_equal(out, rgb)
    rgba = np.concatenate([rgb, np.full((2, 3, 1), 255, np.uint8)], axis=2)
    out, _ = to_image(rgba.ravel(), width=3, height=2, pixel_format="RGBa8", components_per_pixel=4.0)
    np.testing.assert_array_equal(out, rgb)
    assert out.flags.c_contiguous


def _mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """A GenICam Bayer mosaic: ``pattern`` names the colours of row 0, columns 0-1, then row 1."""
    idx = {"R": 0, "G": 1, "B": 2}
    layout = {"RG": "RGGB", "GR": "GRBG", "GB": "GBRG", "BG": "BGGR"}[pattern]
    out = np.zeros(rgb.shape[:2], rgb.dtype)
    for k, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[dy::2, dx::2] = rgb[dy::2, dx::2, idx[layout[k]]]
    return out


@pytest.mark.parametrize("pattern", ["RG", "GR", "GB", "BG"])
def test_bayer_patterns_demosaic_to_the_right_colours(pattern: str) -> None:
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 30  # red, green, blue all different
    mosaic = _mosaic(rgb, pattern)
    out, bits = to_image(mosaic.ravel(), width=16, height=16, pixel_format=f"Bayer{pattern}8")
    assert bits == 8 and out.shape == (16, 16, 3)
    np.testing.assert_allclose(out[4:12, 4:12].reshape(-1, 3).mean(axis=0), [200, 100, 30], atol=2)


def test_opencv_bayer_naming_is_what_the_mapping_assumes() -> None:
    """Guards the table: OpenCV's BayerBG is GenICam's BayerRG (R at (0, 0))."""
    mosaic = _mosaic(np.dstack([np.full((8, 8), v, np.uint8) for v in (200, 100, 30)]), "RG")
    bgr = cv2.cvtColor(mosaic, cv2.COLOR_BayerBG2BGR)
    assert tuple(bgr[4, 4]) == pytest.approx((30, 100, 200), abs=2)


def test_bad_buffers_are_one_clear_error() -> None:
    with pytest.raises(DeviceError, match="not supported"):
        to_image(np.zeros(4, np.uint8), width=2, height=2, pixel_format="YUV422_8")
    with pytest.raises(DeviceError, match="expected 2x2x1 = 4"):
        to_image(np.zeros(5, np.uint8), width=2, height=2, pixel_format="Mono8")
    assert "BayerRG12" in SUPPORTED_FORMATS


# ----------------------------------------------------------------------------- producers
def test_no_producer_lists_the_places_searched(tmp_path: Path, monkeypatch) -> None:
    empty = tmp_path / "gentl"
    empty.mkdir()
    monkeypatch.setenv("GENICAM_GENTL64_PATH", f"{empty}:{tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match=rf"camera.producer: no GenTL producer.*{empty}.*nowhere"):
        resolve_producers(None)


def test_a_wrong_producer_path_lists_the_paths_searched(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GENICAM_GENTL64_PATH", str(tmp_path))
    with pytest.raises(ConfigError, match=rf"camera.producer: /opt/none/x.cti not found; searched /opt/none/x.cti, {tmp_path}/x.cti"):
        resolve_producers("/opt/none/x.cti")


@needs_viky
def test_producers_are_found_through_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("GENICAM_GENTL64_PATH", str(VIKY.parent))
    found, searched = find_producers()
    assert VIKY in found and searched == [VIKY.parent]
    assert resolve_producers(None) == found
    assert resolve_producers("viky") == [VIKY]


@needs_viky
def test_viky_offers_three_cameras() -> None:
    cams = list_cameras([VIKY])
    assert [c.serial_number for c in cams] == ["0", "1", "2"]
    assert all(c.model == "Viky" for c in cams)


# ----------------------------------------------------------------------------- viky camera
@needs_viky
@pytest.mark.parametrize("how", [{"serial_number": "2"}, {"device_id": "VikyTL_DEV_blue"}, {"index": 2}])
def test_viky_device_chosen_by_serial_id_or_index(how: dict) -> None:
    with GenicamCamera(producer="viky", pixel_format="Mono8", **how) as cam:
        assert cam.identity["serial_number"] == "2" and cam.identity["id"] == "VikyTL_DEV_blue"


@needs_viky
def test_opening_a_camera_keeps_the_ctrl_c_handler() -> None:
    """harvesters' ImageAcquirer, created in the main thread, installs its own SIGINT handler,
    which only stops its acquisition: Ctrl-C at a calibration prompt or mid-sweep did nothing
    until the next grab failed as "disconnected" (exit 3)."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    with GenicamCamera(producer="viky", index=0, pixel_format="Mono8"):
        assert signal.getsignal(signal.SIGINT) is before
    assert signal.getsignal(signal.SIGINT) is before


@needs_viky
def test_an_absent_camera_lists_those_found() -> None:
    cam = GenicamCamera(producer="viky", serial_number="77")
    with pytest.raises(DeviceError, match=r"no camera with serial_number '77'.*found: \[0\] id VikyTL_DEV_red, serial 0"):
        cam.open()
    assert not cam.is_open


@needs_viky
@pytest.mark.parametrize(("fmt", "shape"), [("Mono8", (400, 400)), ("RGBa8", (400, 400, 3))])
def test_viky_frames_in_each_format(fmt: str, shape: tuple) -> None:
    with GenicamCamera(producer="viky", index=0, pixel_format=fmt, frame_rate_hz=100) as cam:
        frame = cam.grab(timeout_s=2.0)
    assert frame.image.shape == shape and frame.image.dtype == np.uint8
    assert frame.meta["pixel_format"] == fmt and frame.significant_bits == 8
    assert 200 < frame.image.mean() < 256  # the ball on a near-white background
    assert frame.timestamp_source == "host"  # viky has no timestamps: the stack says so


@needs_viky
def test_viky_missing_features_are_warnings_not_crashes(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="capture.genicam_camera")
    with GenicamCamera(producer="viky", index=0, pixel_format="Mono8", exposure_s=0.004, gain_db=3.0, trigger="software") as cam:
        assert cam.trigger == "free_run"  # no TriggerSoftware on viky
        assert {"TriggerSoftware", "ExposureTime", "Gain"} <= set(cam.missing_features)
        assert cam.exposure_s is None
        assert cam.grab().gain_db is None
        stream = cam._acquirer.data_streams[0].node_map
        assert stream.StreamBufferHandlingMode.value == "NewestOnly"
    text = caplog.text
    assert "has no TriggerSoftware feature" in text and "has no ExposureTime feature" in text and "has no Gain feature" in text


@needs_viky
def test_viky_roi_and_a_bad_pixel_format() -> None:
    with GenicamCamera(producer="viky", index=1, pixel_format="Mono8", roi=(0, 0, 320, 240)) as cam:
        assert cam.image_hw == (240, 320)
        assert cam.grab().image.shape == (240, 320)
        assert "OffsetX" in cam.missing_features
    with pytest.raises(ConfigError, match=r"camera.roi: Width 5000 not accepted .*max 800"):
        GenicamCamera(producer="viky", index=1, roi=(0, 0, 5000, 240)).open()
    with pytest.raises(ConfigError, match=r"camera.pixel_format: 'Mono12' not offered .*valid: RGBa8, Mono8"):
        GenicamCamera(producer="viky", index=1, pixel_format="Mono12").open()


@needs_viky
def test_a_frame_rate_outside_the_device_range_is_a_config_error_naming_the_field() -> None:
    cam = GenicamCamera(producer="viky", serial_number="0", pixel_format="Mono8", frame_rate_hz=500)
    with pytest.raises(ConfigError, match=r"^camera.frame_rate_hz: 500 Hz is out of range; genicam Viky #0 allows 1 to 200 Hz") as err:
        cam.open()
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    assert not cam.is_open


@needs_viky
def test_an_out_of_range_refusal_on_write_is_a_config_error_too(monkeypatch) -> None:
    """Where the node's limits cannot be read first, the device's OutOfRangeException on the write maps the same way."""
    monkeypatch.setattr("capture.genicam_camera._limits", lambda n: None)
    with pytest.raises(ConfigError, match=r"^camera.frame_rate_hz: 500 Hz is out of range; genicam Viky #0 refused it \(AcquisitionFrameRate\): Value 500.* 200") as err:
        GenicamCamera(producer="viky", index=0, pixel_format="Mono8", frame_rate_hz=500).open()
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


@needs_viky
def test_free_run_takes_a_frame_that_started_after_settling() -> None:
    with GenicamCamera(producer="viky", index=0, pixel_format="Mono8", frame_rate_hz=50) as cam:
        first = cam.grab()
        time.sleep(0.1)  # frames pile up meanwhile; NewestOnly keeps one
        settled_at = time.monotonic()
        later = cam.grab(start_after_host_s=settled_at)
        # the newest frame when settling ended was about first + 5; the frame taken is 2 later
        assert later.frame_id >= first.frame_id + 5 + 2 - 1
        assert later.timestamp_s >= settled_at  # host clock: delivery minus an unknown exposure


@needs_viky
def test_buffers_are_queued_back(monkeypatch) -> None:
    """Fetching far more frames than buffers works only if each buffer goes back to the queue."""
    with GenicamCamera(producer="viky", index=0, pixel_format="Mono8", frame_rate_hz=200, num_buffers=2) as cam:
        ids = [cam.grab(timeout_s=1.0).frame_id for _ in range(12)]
    assert ids == sorted(ids) and len(set(ids)) == 12


@needs_viky
def test_camera_timeout_names_the_camera() -> None:
    with GenicamCamera(producer="viky", index=0, pixel_format="Mono8", frame_rate_hz=1, fetch_timeout_s=0.2) as cam:
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match=r"genicam Viky #0: fetch: no frame within 0.2 s"):
            cam.grab(timeout_s=5.0)
        assert time.monotonic() - t0 < 1.0


@needs_viky
def test_a_vanished_device_is_a_clean_error_and_close_still_works() -> None:
    cam = GenicamCamera(producer="viky", index=0, pixel_format="Mono8", frame_rate_hz=100)
    cam.open()
    cam._acquirer.destroy()  # the device goes away under the driver
    with pytest.raises(DeviceError, match="genicam Viky #0: .* failed, the device may have been disconnected"):
        cam.grab(timeout_s=1.0)
    cam.close()
    assert not cam.is_open


# ----------------------------------------------------------------------------- trigger path on a stand-in
class _FakeBuffer:
    def __init__(self, frame_id: int, data: np.ndarray, ts_ns: int | None) -> None:
        self.frame_id = frame_id
        self._ts = ts_ns
        self.queued = False
        comp = type("C", (), {})()
        comp.data, comp.width, comp.height, comp.data_format, comp.num_components_per_pixel = data.ravel(), 8, 6, "Mono12", 1.0
        self.payload = type("P", (), {"components": [comp]})()

    @property
    def timestamp_ns(self) -> int:
        if self._ts is None:
            raise RuntimeError("not available")
        return self._ts

    def queue(self) -> None:
        self.queued = True


class _FakeAcquirer:
    """Delivers one frame per TriggerSoftware, stamped with the trigger time."""

    def __init__(self) -> None:
        self.pending: list[_FakeBuffer] = []
        self.handed: list[_FakeBuffer] = []
        self.triggered_at: list[float] = []
        self.min_num_buffers, self.num_buffers = 1, 1
        self.k = 0
        nm = FakeNodeMap(
            Width=FakeNode(8, min=8, max=8), Height=FakeNode(6, min=6, max=6),
            PixelFormat=FakeNode("Mono8", symbolics=("Mono8", "Mono12")),
            ExposureAuto=FakeNode("Continuous", symbolics=("Off", "Continuous")), ExposureTime=FakeNode(10000.0, min=10.0, max=1e6),
            GainAuto=FakeNode("Continuous", symbolics=("Off", "Continuous")), Gain=FakeNode(0.0, min=0.0, max=24.0),
            TriggerSelector=FakeNode("FrameStart", symbolics=("FrameStart",)), TriggerMode=FakeNode("Off", symbolics=("Off", "On")),
            TriggerSource=FakeNode("Line0", symbolics=("Line0", "Software")), TriggerSoftware=FakeNode(on_execute=self._trigger),
        )
        self.remote_device = type("R", (), {"node_map": nm})()
        self.data_streams = [type("S", (), {"node_map": FakeNodeMap()})()]

    def _trigger(self) -> None:
        self.k += 1
        self.triggered_at.append(time.monotonic())
        self.pending.append(_FakeBuffer(self.k, np.full((6, 8), 4000, np.uint16), int(time.monotonic() * 1e9)))

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def destroy(self) -> None: ...

    def try_fetch(self, timeout: float) -> _FakeBuffer | None:
        return None

    def fetch(self, timeout: float) -> _FakeBuffer:
        from genicam.gentl import TimeoutException

        if not self.pending:
            time.sleep(timeout)
            raise TimeoutException("no buffer")
        buf = self.pending.pop(0)
        self.handed.append(buf)
        return buf


class _FakeHarvester:
    last_acquirer: _FakeAcquirer | None = None

    def __init__(self) -> None:
        info = type("I", (), {"id_": "cam0", "serial_number": "SN1", "model": "Stand-in", "vendor": "tests"})()
        self.device_info_list = [info]

    def add_file(self, path: str, check_existence: bool = False) -> None: ...
    def update(self) -> None: ...
    def reset(self) -> None: ...

    def create(self, index: int) -> _FakeAcquirer:
        _FakeHarvester.last_acquirer = _FakeAcquirer()
        return _FakeHarvester.last_acquirer


def test_software_trigger_fires_after_settling_with_fixed_photometry(tmp_path: Path, monkeypatch) -> None:
    cti = tmp_path / "standin.cti"
    cti.write_bytes(b"")
    monkeypatch.setattr("harvesters.core.Harvester", _FakeHarvester)
    with GenicamCamera(producer=str(cti), pixel_format="Mono12", exposure_s=0.002, gain_db=6.0, trigger="software") as cam:
        ia = _FakeHarvester.last_acquirer
        nm = ia.remote_device.node_map
        assert (nm.TriggerSelector.value, nm.TriggerMode.value, nm.TriggerSource.value) == ("FrameStart", "On", "Software")
        assert nm.ExposureAuto.value == "Off" and nm.ExposureTime.value == pytest.approx(2000.0)
        assert nm.GainAuto.value == "Off" and nm.Gain.value == 6.0
        assert cam.missing_features == []
        settle = time.monotonic() + 0.03
        frame = cam.grab(start_after_host_s=settle, timeout_s=1.0)
    assert ia.triggered_at[0] >= settle  # the exposure was triggered after settling
    assert frame.timestamp_source == "camera" and frame.timestamp_s == pytest.approx(ia.triggered_at[0], abs=1e-3)
    assert frame.image.dtype == np.uint16 and frame.significant_bits == 12 and frame.exposure_s == pytest.approx(0.002)
    assert all(b.queued for b in ia.handed)  # every buffer went back


def test_hardware_trigger_without_trigger_mode_is_a_config_error(tmp_path: Path, monkeypatch) -> None:
    cti = tmp_path / "standin.cti"
    cti.write_bytes(b"")

    class _NoTrigger(_FakeHarvester):
        def create(self, index: int) -> _FakeAcquirer:
            ia = super().create(index)
            del ia.remote_device.node_map._nodes["TriggerMode"]
            return ia

    monkeypatch.setattr("harvesters.core.Harvester", _NoTrigger)
    with pytest.raises(ConfigError, match="camera.trigger: hardware triggering needs TriggerMode"):
        GenicamCamera(producer=str(cti), trigger="hardware").open()


# ----------------------------------------------------------------------------- in-camera focus
@pytest.mark.parametrize(("feature", "unit", "target"), [("FocalPower", "dpt", 3.25), ("FocusStepper", "steps", 420)])
def test_in_camera_focus_moves_and_waits_for_ready(feature: str, unit: str, target: float) -> None:
    lens = FakeLens(feature, busy_s=0.05)
    with GenicamFocus(lambda: lens.node_map) as focus:
        assert focus.feature == feature and focus.unit == unit
        assert focus.limits == ((-2.0, 10.0) if feature == "FocalPower" else (0.0, 1000.0))
        focus.move_to(target)
        t0 = time.monotonic()
        focus.wait_settled(timeout_s=1.0)
        assert time.monotonic() - t0 >= 0.04  # it waited for FocusStatus Ready
        assert focus.position() == pytest.approx(target)
        assert focus.temperature_c() == pytest.approx(36.5)


def test_in_camera_focus_initialises_and_reports_errors() -> None:
    lens = FakeLens("FocalPower", initialized=False)
    with GenicamFocus(lambda: lens.node_map) as focus:
        assert lens.node_map.FocusInitialize.executed == 1 and lens.initialized
        focus.move_to(1.0)
        lens.error = True
        with pytest.raises(DeviceError, match="FocusStatus is Error after moving FocalPower to 1"):
            focus.wait_settled(timeout_s=1.0)


def test_in_camera_focus_without_status_waits_the_settle_time() -> None:
    lens = FakeLens("FocalPower", status=False)
    with GenicamFocus(lambda: lens.node_map, settle_time_s=0.05) as focus:
        focus.move_to(2.0)
        t0 = time.monotonic()
        focus.wait_settled(timeout_s=1.0)
        assert 0.04 <= time.monotonic() - t0 < 0.5


@needs_viky
def test_in_camera_focus_on_a_camera_without_optic_control() -> None:
    with GenicamCamera(producer="viky", index=0) as cam:
        focus = GenicamFocus(lambda: cam.node_map, lock=cam.lock)
        with pytest.raises(ConfigError, match="no FocalPower or FocusStepper feature"):
            focus.open()
        assert not focus.is_open


@pytest.mark.parametrize(("setting", "message"), [
    ({"exposure_s": 2.0}, r"^camera.exposure_s: 2 s is out of range; genicam Stand-in #SN1 allows 1e-05 to 1 s \(ExposureTime\)"),
    ({"gain_db": 30.0}, r"^camera.gain_db: 30 dB is out of range; genicam Stand-in #SN1 allows 0 to 24 dB \(Gain\)"),
    ({"trigger": "hardware", "trigger_source": "Line9"}, r"^camera.trigger_source: 'Line9' not offered by genicam Stand-in #SN1; valid: Line0, Software"),
])
def test_settings_the_device_does_not_allow_are_config_errors(tmp_path: Path, monkeypatch, setting: dict, message: str) -> None:
    cti = tmp_path / "standin.cti"
    cti.write_bytes(b"")
    monkeypatch.setattr("harvesters.core.Harvester", _FakeHarvester)
    with pytest.raises(ConfigError, match=message) as err:
        GenicamCamera(producer=str(cti), **setting).open()
    assert err.value.exit_code == 2


def test_a_write_the_device_fails_for_other_reasons_stays_a_device_error(tmp_path: Path, monkeypatch) -> None:
    cti = tmp_path / "standin.cti"
    cti.write_bytes(b"")

    class _Locked(_FakeHarvester):
        def create(self, index: int) -> _FakeAcquirer:
            ia = super().create(index)

            def refuse(v: object) -> None:
                raise RuntimeError("AccessException: node not writable")

            ia.remote_device.node_map._nodes["Gain"] = FakeNode(0.0, min=0.0, max=24.0, on_write=refuse)
            return ia

    monkeypatch.setattr("harvesters.core.Harvester", _Locked)
    with pytest.raises(DeviceError, match=r"writing Gain = 6.0 failed: AccessException") as err:
        GenicamCamera(producer=str(cti), gain_db=6.0).open()
    assert err.value.exit_code == 3 and not isinstance(err.value, ConfigError)


def test_a_failing_genapi_call_in_camera_focus_is_a_device_error_not_a_traceback() -> None:
    """GenApi raises its own exceptions (AccessException, a removed device): in-camera focus
    turns them into DeviceError (exit 3, one line) at open and while reading the position."""

    class AccessException(Exception):  # stands in for genicam.genapi.AccessException
        pass

    def refuse() -> None:
        raise AccessException("Node is not writable")

    lens = FakeLens("FocalPower", initialized=False)
    lens.node_map._nodes["FocusInitialize"] = FakeNode(on_execute=refuse)
    focus = GenicamFocus(lambda: lens.node_map)
    with pytest.raises(DeviceError, match=r"executing FocusInitialize \(FocusStatus NotInitialized\) failed: Node is not writable") as err:
        focus.open()
    assert err.value.exit_code == 3 and not focus.is_open

    lens = FakeLens("FocalPower")
    with GenicamFocus(lambda: lens.node_map) as focus:
        def removed() -> float:
            raise AccessException("Node is not readable (device removed)")

        lens._focus._value = removed
        with pytest.raises(DeviceError, match=r"reading FocalPower failed: Node is not readable"):
            focus.position()


def test_a_camera_without_focus_features_names_the_field() -> None:
    """The message starts with the field, so run_rig.py can prefix the config file."""
    nm = FakeNodeMap()
    with pytest.raises(ConfigError, match=r"^focus\.driver: genicam: the camera has no FocalPower or FocusStepper feature"):
        GenicamFocus(lambda: nm).open()


def test_a_failure_starting_acquisition_is_a_device_error(tmp_path: Path, monkeypatch) -> None:
    cti = tmp_path / "standin.cti"
    cti.write_bytes(b"")

    class _NoStart(_FakeHarvester):
        def create(self, index: int) -> _FakeAcquirer:
            ia = super().create(index)

            def refuse() -> None:
                raise RuntimeError("GenTL error -1004: resource in use")

            ia.start = refuse
            return ia

    monkeypatch.setattr("harvesters.core.Harvester", _NoStart)
    with pytest.raises(DeviceError, match=r"starting acquisition failed: GenTL error -1004") as err:
        GenicamCamera(producer=str(cti)).open()
    assert err.value.exit_code == 3


def test_a_file_that_is_not_a_gentl_producer_is_a_config_error(tmp_path: Path) -> None:
    """Real harvesters skips a .cti it cannot load and finds no camera; that is the producer's
    fault (exit 2 naming camera.producer), not 'no camera found' (exit 3)."""
    fake = tmp_path / "fake.cti"
    fake.write_text("not a shared library\n")
    with pytest.raises(ConfigError, match=rf"^camera\.producer: {fake} is not a loadable GenTL producer") as err:
        GenicamCamera(producer=str(fake)).open()
    assert err.value.exit_code == 2

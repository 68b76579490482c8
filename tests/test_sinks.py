"""Output sinks of continuous acquisition (issue 6, item 3): each sink on a small synthetic
stack and result, every_nth, the preview throttle, a full disk and ENOSPC, rerun optional."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import shutil
import sys
import types
from collections import namedtuple
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import yaml

from calibration.intrinsics import Intrinsics
from capture.errors import ConfigError, DiskFull
from capture.optics import LayeredScene
from capture.stack import FocalStack
from reconstruct.api import reconstruct_stack
from reconstruct.result import DepthResult
from rig.config import LiveConfig, OutputConfig
from rig.sinks import (
    CameraModel,
    DepthSink,
    OmeTiffSink,
    PointCloudSink,
    PreviewSink,
    RerunSink,
    StackSink,
    build_sinks,
    check_free_space,
    check_sinks,
    depth_to_points,
)

H, W = 24, 32
DISTANCES_M = [1.0, 0.5, 2.0, 0.7]  # deliberately unsorted


def _stack(channels: int = 3, dtype: type = np.uint8, seed: int = 0) -> FocalStack:
    rng = np.random.default_rng(seed)
    hi = np.iinfo(dtype).max
    shape = (len(DISTANCES_M), H, W) + ((channels,) if channels > 1 else ())
    images = rng.integers(0, hi, size=shape, dtype=dtype)
    meta = [{"timestamp_s": 10.0 + 0.01 * i} for i in range(len(DISTANCES_M))]
    return FocalStack(images, focus_distance_m=DISTANCES_M, slice_meta=meta)


def _result(depth_m: np.ndarray | None = None, *, unit: str = "metre", seed: int = 1) -> DepthResult:
    rng = np.random.default_rng(seed)
    depth = np.linspace(0.5, 2.0, H * W, dtype=np.float32).reshape(H, W) if depth_m is None else depth_m
    return DepthResult(
        depth=depth.astype(np.float32),
        confidence=np.full((H, W), 0.9, np.float32),
        all_in_focus=rng.integers(0, 255, size=(H, W, 3), dtype=np.uint8),
        depth_unit=unit,
        method="classical",
        backend="numpy",
        device="cpu",
        slices=len(DISTANCES_M),
        aligned=False,
    )


def _read_ply(path: Path) -> tuple[list[str], np.ndarray]:
    """Parse a binary little-endian PLY by hand: (header lines, structured vertex array)."""
    raw = path.read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    header = raw[:end].decode("ascii").splitlines()
    assert header[0] == "ply" and header[1] == "format binary_little_endian 1.0"
    types_ = {"float": "<f4", "uchar": "u1"}
    count, fields = None, []
    for line in header:
        parts = line.split()
        if parts[:2] == ["element", "vertex"]:
            count = int(parts[2])
        elif parts[0] == "property":
            fields.append((parts[2], types_[parts[1]]))
    body = np.frombuffer(raw[end:], dtype=np.dtype(fields))
    assert count == len(body)
    return header, body


def _leftovers(root: Path) -> list[str]:
    """Hidden temporary files/folders anywhere under ``root``."""
    return [str(p) for p in root.rglob(".*")]


def _intrinsics(fx: float, fy: float, cx: float, cy: float, size=(W, H), dist=(0, 0, 0, 0, 0)) -> Intrinsics:
    return Intrinsics.from_dict({
        "camera_matrix": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]],
        "distortion": list(dist),
        "image_size_px": list(size),
        "rms_reprojection_px": 0.1,
        "n_views": 10,
    })


# --------------------------------------------------------------------------- stacks, depth


def test_stack_sink_writes_a_readable_stack_folder(tmp_path):
    stack = _stack()
    sink = StackSink(tmp_path)
    assert sink.write(7, stack, None)
    back = FocalStack.read(tmp_path / "stacks" / "000007")
    np.testing.assert_array_equal(back.images, stack.images)
    np.testing.assert_allclose(back.focus_distance_m, DISTANCES_M)
    assert sink.stats()["written"] == 1 and not _leftovers(tmp_path)


@pytest.mark.parametrize("png16", [True, False])
def test_depth_sink_float32_metres_and_16_bit_png_with_scale(tmp_path, png16):
    depth = np.full((H, W), 1.25, np.float32)
    depth[0, 0] = np.nan
    DepthSink(tmp_path, png16=png16).write(3, None, _result(depth))
    out = tmp_path / "depth" / "000003"
    npy = np.load(out / "depth.npy")
    assert npy.dtype == np.float32 and npy.shape == (H, W) and np.isnan(npy[0, 0]) and npy[5, 5] == 1.25
    doc = yaml.safe_load((out / "result.yaml").read_text())
    assert (out / "depth.png").is_file() is png16
    if png16:
        png = cv2.imread(str(out / "depth.png"), cv2.IMREAD_UNCHANGED)
        assert png.dtype == np.uint16 and png[5, 5] == 1250 and png[0, 0] == 0
        assert doc["png16_scale_m"] == 0.001
    else:
        assert "png16_scale_m" not in doc


# --------------------------------------------------------------------------- point clouds


def test_point_cloud_of_a_fronto_parallel_plane(tmp_path):
    depth = np.ones((H, W), np.float32)
    depth[2, 3] = depth[10, 20] = np.nan
    result = _result(depth)
    fx, fy, cx, cy = 40.0, 44.0, 15.2, 11.7
    sink = PointCloudSink(tmp_path, CameraModel.from_intrinsics(_intrinsics(fx, fy, cx, cy)))
    sink.write(5, None, result)
    header, pts = _read_ply(tmp_path / "depth" / "000005" / "points.ply")
    assert len(pts) == H * W - 2
    assert [line.split()[-1] for line in header if line.startswith("property")] == ["x", "y", "z", "red", "green", "blue"]
    v, u = np.nonzero(np.isfinite(depth))  # row-major, as written
    np.testing.assert_allclose(pts["z"], 1.0)
    np.testing.assert_allclose(pts["x"], (u - cx) * 1.0 / fx, atol=1e-6)
    np.testing.assert_allclose(pts["y"], (v - cy) * 1.0 / fy, atol=1e-6)
    rgb = result.all_in_focus[v, u]
    np.testing.assert_array_equal(np.stack([pts["red"], pts["green"], pts["blue"]], 1), rgb)
    assert not _leftovers(tmp_path)


def test_point_cloud_with_distortion_reprojects_onto_its_pixels():
    k = _intrinsics(40.0, 40.0, 16.0, 12.0, dist=(-0.2, 0.05, 0.001, -0.002, 0.0))
    camera = CameraModel.from_intrinsics(k)
    depth = np.full((H, W), 2.0, np.float32)
    xyz, _ = depth_to_points(depth, camera)
    uv, _ = cv2.projectPoints(xyz.astype(np.float64), np.zeros(3), np.zeros(3), k.camera_matrix, k.distortion)
    v, u = np.mgrid[0:H, 0:W]
    np.testing.assert_allclose(uv.reshape(-1, 2), np.stack([u.ravel(), v.ravel()], 1), atol=0.02)


def test_point_cloud_maps_a_breathing_aligned_depth_into_the_calibrations_frame(tmp_path):
    """A breathing-aligned stack's depth is in its reference slice's frame; the intrinsics hold
    in the calibration's. The stack's breathing_reference_affine maps one onto the other."""
    camera = CameraModel.from_focal_length(50.0, (H, W))
    depth = np.full((H, W), 2.0, np.float32)
    plain, _ = depth_to_points(depth, camera)
    scale = [[1.004, 0.0, -0.002 * (W - 1)], [0.0, 1.004, -0.002 * (H - 1)]]  # 0.4 % about the centre
    mapped, _ = depth_to_points(depth, camera, pixel_affine=scale)
    np.testing.assert_allclose(mapped[:, :2], plain[:, :2] * 1.004, atol=1e-6)
    stack = _stack()
    stack.meta["breathing_reference_affine"] = scale
    sink = PointCloudSink(tmp_path, camera)
    sink.write(0, stack, dataclasses.replace(_result(depth), aligned=True))
    _, pts = _read_ply(tmp_path / "depth" / "000000" / "points.ply")
    np.testing.assert_allclose(pts["x"], mapped[:, 0], atol=1e-6)
    sink.write(1, stack, _result(depth))  # a depth taken without the alignment: its pixels are the slices' own
    _, pts = _read_ply(tmp_path / "depth" / "000001" / "points.ply")
    np.testing.assert_allclose(pts["x"], plain[:, 0], atol=1e-6)


def test_point_cloud_falls_back_to_the_focal_length_and_says_so(tmp_path, caplog):
    cfg = OutputConfig(record_stacks=False, preview=False, point_cloud=True)
    with caplog.at_level(logging.WARNING, logger="rig.sinks"):
        sinks = build_sinks(cfg, LiveConfig(), tmp_path, focal_length_px=50.0, image_hw=(H, W))
    assert "principal point at the image centre" in caplog.text
    assert not any(isinstance(s, PointCloudSink) for s in sinks)  # the depth sink writes it, inside each result folder
    (depth_sink,) = [s for s in sinks if isinstance(s, DepthSink)]
    depth_sink.write(0, None, _result(np.full((H, W), 2.0, np.float32)))
    assert depth_sink.point_cloud is not None and depth_sink.point_cloud.written == 1
    _, pts = _read_ply(tmp_path / "depth" / "000000" / "points.ply")
    assert len(pts) == H * W
    np.testing.assert_allclose(pts["x"][:W], (np.arange(W) - (W - 1) / 2) * 2.0 / 50.0, atol=1e-6)
    np.testing.assert_allclose(pts["y"][0], -(H - 1) / 2 * 2.0 / 50.0, atol=1e-6)


def test_the_point_cloud_appears_with_its_result_folder_never_after_it(tmp_path, monkeypatch):
    """points.ply was written into depth/NNNNNN/ after that folder had been renamed into place:
    a script picking up new result folders could read one without its cloud (10 of 40 in a review),
    and a full disk at the PLY step left one without it for good."""
    import reconstruct.result as result_mod

    cloud = PointCloudSink(tmp_path, CameraModel.from_focal_length(50.0))
    sink = DepthSink(tmp_path, point_cloud=cloud)
    seen = []
    real_move = result_mod.move_into_place
    monkeypatch.setattr(result_mod, "move_into_place",
                        lambda tmp, final, **kw: (seen.append(sorted(p.name for p in tmp.iterdir())), real_move(tmp, final, **kw))[1])
    sink.write(0, _stack(), _result())
    assert "points.ply" in seen[0] and "result.yaml" in seen[0]  # in the folder before it takes its final name
    assert (tmp_path / "depth" / "000000" / "points.ply").is_file() and cloud.written == 1
    monkeypatch.setattr("rig.sinks._write_ply", _raise_enospc)  # the disk fills at the cloud: no result folder at all
    with pytest.raises(DiskFull):
        sink.write(1, _stack(), _result())
    assert not (tmp_path / "depth" / "000001").exists() and not _leftovers(tmp_path)


def test_point_cloud_config_errors(tmp_path):
    cfg = OutputConfig(point_cloud=True)
    with pytest.raises(ConfigError, match=r"output\.point_cloud"):
        build_sinks(cfg, LiveConfig(), tmp_path)
    with pytest.raises(ConfigError, match=r"calibration\.file.*recalibrate"):
        build_sinks(cfg, LiveConfig(), tmp_path, intrinsics=_intrinsics(40, 40, 16, 12, size=(64, 48)), image_hw=(H, W))


def test_check_sinks_raises_the_config_errors_without_a_run_folder(monkeypatch):
    """The checks alone, before any folder exists (continuous mode runs them first)."""
    with pytest.raises(ConfigError, match=r"^output\.point_cloud: needs camera intrinsics"):
        check_sinks(OutputConfig(point_cloud=True), LiveConfig())
    with pytest.raises(ConfigError, match=r"^calibration\.file.*recalibrate at this resolution \(needed by output\.point_cloud\)$"):
        check_sinks(OutputConfig(point_cloud=True), LiveConfig(), intrinsics=_intrinsics(40, 40, 16, 12, size=(64, 48)), image_hw=(H, W))
    # intrinsics of another size with neither a point cloud nor rerun: nothing needs them (a run was refused for them)
    check_sinks(OutputConfig(), LiveConfig(), intrinsics=_intrinsics(40, 40, 16, 12, size=(64, 48)), image_hw=(H, W))
    camera = check_sinks(OutputConfig(point_cloud=True), LiveConfig(), focal_length_px=50.0, image_hw=(H, W))
    assert camera is not None and camera.fx_px == 50.0
    monkeypatch.setitem(sys.modules, "rerun", None)  # import rerun -> ImportError
    with pytest.raises(ConfigError, match=r"^live\.rerun.*pip install rerun-sdk"):
        check_sinks(OutputConfig(), LiveConfig(rerun=True))


def test_point_cloud_skips_relative_depth_with_one_warning(tmp_path, caplog):
    sink = PointCloudSink(tmp_path, CameraModel.from_focal_length(50.0))
    with caplog.at_level(logging.WARNING, logger="rig.sinks"):
        assert not sink.write(0, None, _result(unit="focus_index"))
        assert not sink.write(1, None, _result(unit="focus_index"))
    assert caplog.text.count("not metres") == 1
    assert sink.throttled == 2 and not (tmp_path / "depth").exists()


# --------------------------------------------------------------------------- OME-TIFF


@pytest.mark.parametrize("channels,dtype,axes", [(3, np.uint8, "ZYXS"), (1, np.uint16, "ZYX")])
def test_ome_tiff_reads_back_with_plane_positions(tmp_path, channels, dtype, axes):
    stack = _stack(channels, dtype)
    OmeTiffSink(tmp_path).write(2, stack, None)
    path = tmp_path / "stacks" / "000002.ome.tif"
    order = np.argsort(DISTANCES_M)  # near to far
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert series.axes == axes and series.dtype == dtype
        data = series.asarray()
        xml = tif.ome_metadata
    assert data.shape == stack.images.shape
    np.testing.assert_array_equal(data, stack.images[order])
    positions = [float(p) for p in re.findall(r'PositionZ="([^"]+)"', xml)]
    assert positions == sorted(DISTANCES_M)
    assert xml.count('PositionZUnit="m"') == len(DISTANCES_M)
    assert 'DeltaT="' in xml and "focus_distance_m" in xml
    assert not _leftovers(tmp_path)


def test_ome_tiff_of_an_rgba_stack_and_infinity(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (3, H, W, 4), dtype=np.uint8)
    stack = FocalStack(images, focus_distance_m=[0.5, float("inf"), 1.0])
    OmeTiffSink(tmp_path).write(0, stack, None)
    with tifffile.TiffFile(tmp_path / "stacks" / "000000.ome.tif") as tif:
        assert tif.series[0].shape == (3, H, W, 4)
        assert re.findall(r'PositionZ="([^"]+)"', tif.ome_metadata) == ["0.5", "1.0", "INF"]


# --------------------------------------------------------------------------- every_nth, preview


def test_every_nth_thins_recorded_stacks_only(tmp_path):
    cfg = OutputConfig(every_nth=3, ome_tiff=True, preview=False)
    sinks = build_sinks(cfg, LiveConfig(), tmp_path)
    assert [s.name for s in sinks] == ["stacks", "ome_tiff", "depth"]
    stack, result = _stack(), _result()
    for i in range(7):
        for s in sinks:
            s.write(i, stack, result)
    assert sorted(p.name for p in (tmp_path / "stacks").iterdir()) == [
        "000000", "000000.ome.tif", "000003", "000003.ome.tif", "000006", "000006.ome.tif"]
    assert len(list((tmp_path / "depth").iterdir())) == 7
    assert sinks[0].stats()["written"] == 3 and sinks[0].skipped == 4 and sinks[1].skipped == 4
    assert sinks[2].skipped == 0


def test_preview_refresh_is_throttled_and_atomic(tmp_path):
    now = [100.0]
    sink = PreviewSink(tmp_path, min_interval_s=1.0, clock=lambda: now[0])
    stack = _stack()
    assert sink.write(0, stack, _result(seed=1))
    first = (tmp_path / "live_preview.png").read_bytes()
    now[0] += 0.4
    assert not sink.write(1, stack, _result(seed=2))
    assert (tmp_path / "live_preview.png").read_bytes() == first
    now[0] += 0.7
    assert sink.write(2, stack, _result(seed=3))
    second = (tmp_path / "live_preview.png").read_bytes()
    assert second != first
    now[0] += 0.1
    assert not sink.write(3, stack, _result(seed=4))
    assert (sink.written, sink.throttled) == (2, 2)
    sink.close()  # writes the latest throttled result
    assert sink.written == 3 and (tmp_path / "live_preview.png").read_bytes() != second
    picture = cv2.imread(str(tmp_path / "live_preview.png"))
    assert picture.shape[0] > H and picture.shape[1] > 2 * W
    assert sorted(os.listdir(tmp_path)) == ["live_preview.png"]


# --------------------------------------------------------------------------- full disk


def _all_sinks(root: Path) -> list:
    return [
        StackSink(root, min_free_gb=1.0),
        OmeTiffSink(root, min_free_gb=1.0),
        DepthSink(root, min_free_gb=1.0),
        PointCloudSink(root, CameraModel.from_focal_length(50.0), min_free_gb=1.0),
        PreviewSink(root, min_free_gb=1.0),
    ]


def test_low_free_space_raises_disk_full_before_writing(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10e9, 9.5e9, 0.4e9))
    with pytest.raises(DiskFull, match=r"0\.4 GB free.*requires 1 GB"):
        check_free_space(tmp_path / "not" / "yet", 1.0)
    assert check_free_space(tmp_path, 0.25) == pytest.approx(0.4)
    run = tmp_path / "run"
    run.mkdir()
    for sink in _all_sinks(run):
        with pytest.raises(DiskFull, match=str(run)):
            sink.write(0, _stack(), _result())
        assert sink.written == 0
    assert list(run.rglob("*")) == []


def _raise_enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_enospc_in_a_stack_write_leaves_no_partial_stack(tmp_path, monkeypatch):
    real_fsync, calls = os.fsync, [0]

    def fsync_then_fail(fd):
        calls[0] += 1
        if calls[0] > 2:  # two slices on disk, the third fails
            _raise_enospc()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_then_fail)
    with pytest.raises(DiskFull, match="disk full while writing stack 000000"):
        StackSink(tmp_path).write(0, _stack(), None)
    assert not (tmp_path / "stacks" / "000000").exists() and not _leftovers(tmp_path)


def test_enospc_in_a_depth_write_leaves_no_partial_result(tmp_path, monkeypatch):
    def partial_save(file, arr, *args, **kwargs):
        Path(file).write_bytes(b"\x93NUMPY partial")
        _raise_enospc()

    monkeypatch.setattr(np, "save", partial_save)
    with pytest.raises(DiskFull):
        DepthSink(tmp_path).write(4, None, _result())
    assert not (tmp_path / "depth" / "000004").exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize(("free", "full"), [(4096, True), (10**12, False)])
def test_a_short_write_without_enospc_on_a_full_disk_is_a_full_disk(tmp_path, monkeypatch, free, full):
    """numpy and tifffile report a write the disk had no room for as OSError("... requested
    and ... written") without an errno: a full disk stopped the run as 'cannot write' (exit 2),
    and reconstruction went on for stacks nobody could write."""
    import rig.sinks as sinks_mod
    from capture.errors import OutputError

    def short_save(file, arr, *args, **kwargs):
        raise OSError("19200 requested and 992 written")

    monkeypatch.setattr(np, "save", short_save)
    monkeypatch.setattr(sinks_mod, "free_bytes", lambda path: free)
    with pytest.raises(DiskFull if full else OutputError) as info:
        DepthSink(tmp_path).write(2, None, _result())
    assert isinstance(info.value, DiskFull) == full
    if full:
        assert "disk full while writing stack 000002" in str(info.value) and "4096 bytes free" in str(info.value)
    assert not (tmp_path / "depth" / "000002").exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("kind", ["ply", "ome", "preview"])
def test_enospc_in_own_writers_leaves_no_final_named_file(tmp_path, monkeypatch, kind):
    sink = {
        "ply": lambda: PointCloudSink(tmp_path, CameraModel.from_focal_length(50.0)),
        "ome": lambda: OmeTiffSink(tmp_path),
        "preview": lambda: PreviewSink(tmp_path, min_interval_s=0.0),
    }[kind]()
    if kind == "preview":  # an earlier preview stays intact when a refresh fails
        sink.write(0, _stack(), _result(seed=5))
        before = (tmp_path / "live_preview.png").read_bytes()
    monkeypatch.setattr(os, "fsync", _raise_enospc)  # the file is written, its flush to disk fails
    with pytest.raises(DiskFull, match="No space left"):
        sink.write(1, _stack(), _result())
    monkeypatch.undo()
    final = sink.path_for(1)
    if kind == "preview":
        assert final.read_bytes() == before
    else:
        assert not final.exists()
    assert not _leftovers(tmp_path)


# --------------------------------------------------------------------------- rerun


def test_rerun_requested_but_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rerun", None)  # import rerun -> ImportError
    with pytest.raises(ConfigError, match=r"live\.rerun.*pip install rerun-sdk"):
        build_sinks(OutputConfig(), LiveConfig(rerun=True), tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert all(not isinstance(s, RerunSink) for s in build_sinks(OutputConfig(), LiveConfig(), tmp_path))


def test_rerun_sink_logs_depth_and_points_through_the_sdk(tmp_path, monkeypatch):
    calls: list[tuple] = []
    fake = types.ModuleType("rerun")

    def archetype(name):
        return lambda *a, **k: (name, a, k)

    for name in ("Pinhole", "Image", "DepthImage", "Points3D"):
        setattr(fake, name, archetype(name))
    fake.init = lambda *a, **k: calls.append(("init", a, k))
    fake.save = lambda *a, **k: calls.append(("save", a, k))
    fake.set_time = lambda *a, **k: calls.append(("set_time", a, k))
    fake.log = lambda path, item, **k: calls.append(("log", path, item))
    fake.disconnect = lambda: calls.append(("disconnect",))
    monkeypatch.setitem(sys.modules, "rerun", fake)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")

    sinks = build_sinks(OutputConfig(record_stacks=False, preview=False), LiveConfig(rerun=True), tmp_path,
                        focal_length_px=50.0, image_hw=(H, W))
    sink = sinks[-1]
    assert isinstance(sink, RerunSink) and sink.save_path == tmp_path / "live.rrd"
    depth = np.full((H, W), 1.5, np.float32)
    depth[0, :] = np.nan
    sink.write(9, None, _result(depth))
    sink.close()
    logged = {c[1]: c[2] for c in calls if c[0] == "log"}
    assert set(logged) == {"world/camera", "world/camera/image", "world/camera/depth", "world/points"}
    assert ("set_time", ("stack",), {"sequence": 9}) in calls
    assert not np.isnan(logged["world/camera/depth"][1][0]).any()
    xyz = logged["world/points"][1][0]
    assert xyz.shape == ((H - 1) * W, 3) and np.allclose(xyz[:, 2], 1.5)
    assert calls[-1] == ("disconnect",)


# --------------------------------------------------------------------------- end to end


def test_all_sinks_on_a_reconstructed_stack(tmp_path):
    rng = np.random.default_rng(3)
    tex = cv2.resize(rng.random((24, 32)).astype(np.float32), (64, 48), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 0.8 + 0.1
    depth_true = np.full(tex.shape, 0.8, np.float32)
    scene = LayeredScene(np.repeat(tex[..., None], 3, axis=2), depth_true)
    focus_m = [0.5, 0.65, 0.8, 1.0, 1.4]
    images = [(scene.render(1.0 / d, blur_px_per_dpt=10.0) * 255).clip(0, 255).astype(np.uint8) for d in focus_m]
    stack = FocalStack(np.stack(images), focus_distance_m=focus_m)
    result = reconstruct_stack(stack, method="classical")
    cfg = OutputConfig(point_cloud=True, ome_tiff=True)
    sinks = build_sinks(cfg, LiveConfig(), tmp_path, focal_length_px=100.0, image_hw=stack.image_hw)
    for s in sinks:
        assert s.write(0, stack, result)
        s.close()
    for rel in ("stacks/000000/stack.yaml", "stacks/000000.ome.tif", "depth/000000/depth.npy",
                "depth/000000/points.ply", "live_preview.png"):
        assert (tmp_path / rel).is_file(), rel
    _, pts = _read_ply(tmp_path / "depth" / "000000" / "points.ply")
    assert len(pts) == int(np.isfinite(result.depth).sum())
    assert np.median(pts["z"]) == pytest.approx(0.8, rel=0.1)

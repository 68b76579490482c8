"""Tests of capture.scenes: the procedural default scene and RGB-D scenes from files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from capture.errors import InputError
from capture.imageio import write_image
from capture.scenes import procedural_scene, rgbd_scene, srgb_to_linear, texture_poor_mask

ART = Path(__file__).resolve().parents[2] / "shared" / "data" / "middlebury_2001_2006" / "Art"


@pytest.fixture(scope="module")
def default_scene():
    return procedural_scene()


# --------------------------------------------------------------------------------------------
# procedural_scene
# --------------------------------------------------------------------------------------------


def test_procedural_default_spans_the_working_range(default_scene) -> None:
    s = default_scene
    assert s.image_hw == (384, 512)
    assert s.radiance.shape == (384, 512, 3) and s.radiance.dtype == np.float32
    assert s.depth_m.dtype == np.float32
    assert float(s.depth_m.min()) == pytest.approx(0.4, abs=1e-3)
    assert float(s.depth_m.max()) == pytest.approx(2.0, abs=1e-3)
    assert np.all(np.isfinite(s.depth_m))
    assert s.truth_valid.dtype == bool and s.truth_valid.all()
    assert 0.0 <= float(s.radiance.min()) and float(s.radiance.max()) <= 1.0


def test_procedural_range_follows_near_and_far() -> None:
    s = procedural_scene(160, 120, near_m=0.8, far_m=3.0, seed=2)
    assert float(s.depth_m.min()) == pytest.approx(0.8, abs=5e-3)
    assert float(s.depth_m.max()) == pytest.approx(3.0, abs=5e-3)
    with pytest.raises(InputError, match="near_m"):
        procedural_scene(64, 48, near_m=2.0, far_m=1.0)


def test_procedural_has_texture_poor_regions(default_scene) -> None:
    assert float(texture_poor_mask(default_scene.radiance).mean()) >= 0.2


def test_procedural_has_sharp_depth_edges(default_scene) -> None:
    d = default_scene.depth_m
    jumps = max(float(np.abs(np.diff(d, axis=0)).max()), float(np.abs(np.diff(d, axis=1)).max()))
    assert jumps > 0.3
    # many such edges, not a single glitch
    n_edges = int((np.abs(np.diff(d, axis=1)) > 0.3).sum())
    assert n_edges >= 100


def test_procedural_seeds() -> None:
    a = procedural_scene(128, 96, seed=1)
    b = procedural_scene(128, 96, seed=1)
    c = procedural_scene(128, 96, seed=2)
    np.testing.assert_array_equal(a.radiance, b.radiance)
    np.testing.assert_array_equal(a.depth_m, b.depth_m)
    assert float(np.abs(a.radiance - c.radiance).mean()) > 0.02
    assert a.name != c.name


def test_texture_poor_mask_flags_flat_regions() -> None:
    img = np.full((40, 40), 0.5, np.float32)
    img[:, 20:] = np.random.default_rng(0).uniform(0, 1, (40, 20)).astype(np.float32)
    mask = texture_poor_mask(img, window_px=7)
    assert mask.shape == (40, 40) and mask.dtype == bool
    assert mask[:, :15].all()
    assert not mask[:, 25:].any()


# --------------------------------------------------------------------------------------------
# rgbd_scene
# --------------------------------------------------------------------------------------------

HW = (48, 64)


def _rgb(tmp_path: Path, hw: tuple[int, int] = HW) -> tuple[Path, np.ndarray]:
    rgb = np.random.default_rng(3).integers(0, 256, (*hw, 3), dtype=np.uint8)
    path = tmp_path / "view.png"
    write_image(path, rgb)
    return path, rgb


def test_rgbd_from_depth_npy(tmp_path: Path) -> None:
    image, rgb = _rgb(tmp_path)
    depth = np.linspace(0.5, 1.8, HW[1], dtype=np.float32)[None, :].repeat(HW[0], 0)
    np.save(tmp_path / "depth.npy", depth)
    s = rgbd_scene(image, depth_path=tmp_path / "depth.npy")
    assert s.image_hw == HW
    np.testing.assert_allclose(s.radiance, srgb_to_linear(rgb / 255.0), atol=1e-6)
    np.testing.assert_allclose(s.depth_m, depth, rtol=1e-5)
    assert s.truth_valid.all()
    assert s.info["kind"] == "rgbd"


def test_rgbd_depth_holes_are_filled_and_marked(tmp_path: Path) -> None:
    image, _ = _rgb(tmp_path)
    depth = np.full(HW, 1.2, np.float32)
    depth[10:14, 20:26] = 0.0
    depth[30, 40] = np.nan
    np.save(tmp_path / "depth.npy", depth)
    s = rgbd_scene(image, depth_path=tmp_path / "depth.npy")
    holes = np.zeros(HW, bool)
    holes[10:14, 20:26] = True
    holes[30, 40] = True
    np.testing.assert_array_equal(s.truth_valid, ~holes)
    assert np.all(np.isfinite(s.depth_m)) and np.all(s.depth_m > 0)
    np.testing.assert_allclose(s.depth_m[holes], 1.2, rtol=1e-3)  # filled from neighbours


def test_rgbd_from_disparity_png(tmp_path: Path) -> None:
    image, _ = _rgb(tmp_path)
    divisor = 3.0
    disp_px = np.linspace(10, 70, HW[1])[None, :].repeat(HW[0], 0)  # near on the right
    stored = np.rint(disp_px * divisor).astype(np.uint8)
    stored[5:9, 5:9] = 0  # unknown
    write_image(tmp_path / "disp.png", stored)
    s = rgbd_scene(image, disparity_path=tmp_path / "disp.png", disparity_divisor=divisor, range_m=(0.5, 2.0))
    valid = stored > 0
    np.testing.assert_array_equal(s.truth_valid, valid)
    assert np.all(np.isfinite(s.depth_m))
    d = s.depth_m[valid]
    assert float(d.min()) == pytest.approx(0.5, abs=0.02)
    assert float(d.max()) == pytest.approx(2.0, abs=0.05)
    # inverse depth is affine in disparity (the metric-less part of a disparity map)
    inv = 1.0 / s.depth_m[20, :]
    fit = np.polyfit(stored[20, :].astype(float), inv, 1)
    assert np.abs(np.polyval(fit, stored[20, :].astype(float)) - inv).max() < 0.03
    assert fit[0] > 0  # larger disparity = nearer
    # the hole is filled for rendering with a plausible depth from its neighbours
    hole_depth = s.depth_m[5:9, 5:9]
    neighbours = s.depth_m[5:9, 3:11][:, [0, 1, -2, -1]]
    assert float(hole_depth.min()) >= float(neighbours.min()) - 0.05
    assert float(hole_depth.max()) <= float(neighbours.max()) + 0.05


def test_rgbd_resizes_to_the_camera(tmp_path: Path) -> None:
    image, _ = _rgb(tmp_path)
    np.save(tmp_path / "depth.npy", np.full(HW, 1.0, np.float32))
    s = rgbd_scene(image, depth_path=tmp_path / "depth.npy", width=32, height=24)
    assert s.image_hw == (24, 32) and s.radiance.shape == (24, 32, 3)
    assert s.truth_valid.shape == (24, 32)


def test_rgbd_needs_exactly_one_of_depth_and_disparity(tmp_path: Path) -> None:
    image, _ = _rgb(tmp_path)
    np.save(tmp_path / "depth.npy", np.ones(HW, np.float32))
    write_image(tmp_path / "disp.png", np.full(HW, 30, np.uint8))
    with pytest.raises(InputError, match="exactly one"):
        rgbd_scene(image)
    with pytest.raises(InputError, match="exactly one"):
        rgbd_scene(image, depth_path=tmp_path / "depth.npy", disparity_path=tmp_path / "disp.png", range_m=(0.5, 2.0))


def test_rgbd_size_mismatch_names_the_file(tmp_path: Path) -> None:
    image, _ = _rgb(tmp_path)
    np.save(tmp_path / "small_depth.npy", np.ones((HW[0], HW[1] - 1), np.float32))
    with pytest.raises(InputError, match="small_depth.npy"):
        rgbd_scene(image, depth_path=tmp_path / "small_depth.npy")
    write_image(tmp_path / "small_disp.png", np.full((HW[0] + 2, HW[1]), 30, np.uint8))
    with pytest.raises(InputError, match="small_disp.png"):
        rgbd_scene(image, disparity_path=tmp_path / "small_disp.png", range_m=(0.5, 2.0))


def test_rgbd_disparity_needs_a_range(tmp_path: Path) -> None:
    image, _ = _rgb(tmp_path)
    write_image(tmp_path / "disp.png", np.full(HW, 30, np.uint8))
    with pytest.raises(InputError, match="range_m"):
        rgbd_scene(image, disparity_path=tmp_path / "disp.png")


def test_rgbd_missing_files_are_named(tmp_path: Path) -> None:
    image, _ = _rgb(tmp_path)
    with pytest.raises(InputError, match="nope.npy"):
        rgbd_scene(image, depth_path=tmp_path / "nope.npy")
    with pytest.raises(InputError, match="nope.png"):
        rgbd_scene(tmp_path / "nope.png", depth_path=tmp_path / "depth.npy")


@pytest.mark.skipif(not (ART / "view1.png").is_file() or not (ART / "disp1.png").is_file(),
                    reason=f"Middlebury Art not found at {ART} (view1.png + disp1.png)")
def test_middlebury_art_scene() -> None:
    s = rgbd_scene(ART / "view1.png", disparity_path=ART / "disp1.png", disparity_divisor=3, range_m=(0.5, 2.0))
    assert s.radiance.shape == (*s.image_hw, 3)
    assert s.name == "Art"
    valid = s.truth_valid
    assert 0.9 < float(valid.mean()) < 1.0  # Art has occlusion holes
    assert float(s.depth_m[valid].min()) == pytest.approx(0.5, abs=0.01)
    assert float(s.depth_m[valid].max()) == pytest.approx(2.0, abs=0.01)
    assert np.all(np.isfinite(s.depth_m)) and float(s.depth_m.min()) >= 0.5 - 1e-3 and float(s.depth_m.max()) <= 2.0 + 1e-3

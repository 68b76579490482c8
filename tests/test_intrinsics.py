"""Tests of calibration targets (capture.targets) and intrinsics calibration (calibration.intrinsics).

The simulated camera renders chessboard scenes (through LayeredScene, with breathing and
sensor noise); calibrating from those images must recover the simulator's pinhole.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from calibration.intrinsics import (
    BoardSizeMismatch,
    MIN_CHARUCO_CORNERS,
    Intrinsics,
    board_object_points,
    calibrate_intrinsics,
    find_board,
    find_charuco,
)
from capture.errors import CalibrationError, InputError
from capture.optics import LayeredScene, ThinLens, breathing_scale
from capture.simulated import SimulatedCamera
from capture.targets import (
    DEFAULT_FOCAL_LENGTH_PX,
    BoardPose,
    board_corners_px,
    board_poses,
    chessboard_scene,
    pinhole_camera_matrix,
    planar_target_scene,
)

W, H = 640, 480
COLS, ROWS, SQUARE_M = 9, 6, 0.02
#: stopped down for calibration, so tilted boards stay sharp
LENS = ThinLens(focal_length_mm=12.0, f_number=8.0, pixel_pitch_um=7.0)
FOCUS_DPT = 1.0 / 1.2  # fixed focus for the whole calibration, as in a lab
BREATHING_PER_DPT, BREATHING_REF_DPT = 0.004, 1.5


def _simulated_view(scene, seed: int) -> np.ndarray:
    """What the simulated camera (Mono8, noisy) shows of ``scene`` at FOCUS_DPT. uint8 ``[H, W]``."""
    camera = SimulatedCamera(
        scene=scene, lens=LENS, focus_dpt_at=lambda _t: FOCUS_DPT, pixel_format="Mono8",
        breathing_per_dpt=BREATHING_PER_DPT, breathing_reference_dpt=BREATHING_REF_DPT, seed=seed,
    )
    radiance = camera.render_clean(FOCUS_DPT) @ np.array([0.299, 0.587, 0.114], np.float32)
    return camera.sensor.expose(radiance, exposure_s=0.01, gain_db=0.0, out_bits=8, rng=np.random.default_rng(seed))


@pytest.fixture(scope="module")
def views() -> list[np.ndarray]:
    poses = board_poses(10, width=W, height=H, focal_length_px=LENS.focal_length_px, seed=3)
    return [
        _simulated_view(
            chessboard_scene(W, H, cols=COLS, rows=ROWS, square_m=SQUARE_M, focal_length_px=LENS.focal_length_px,
                             **pose.as_kwargs()),
            seed=i,
        )
        for i, pose in enumerate(poses)
    ]


@pytest.fixture(scope="module")
def true_focal_length_px() -> float:
    """The simulator's pinhole at FOCUS_DPT: v / pitch times the breathing magnification."""
    scale = breathing_scale(FOCUS_DPT, breathing_per_dpt=BREATHING_PER_DPT, reference_dpt=BREATHING_REF_DPT)
    return LENS.focal_length_px * scale


@pytest.fixture(scope="module")
def calibrated(views) -> Intrinsics:
    return calibrate_intrinsics(views, cols=COLS, rows=ROWS, square_m=SQUARE_M)


# --------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------


def test_pinhole_is_the_sensor_distance_in_pixels() -> None:
    near = ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=7.0, base_focus_m=0.5)
    k = pinhole_camera_matrix(W, H, near.focal_length_px)
    assert k[0, 0] == k[1, 1] == pytest.approx(near.sensor_distance_m / 7e-6)
    assert near.focal_length_px > DEFAULT_FOCAL_LENGTH_PX  # sensor behind f when focused near
    assert (k[0, 2], k[1, 2]) == ((W - 1) / 2, (H - 1) / 2)
    scene = chessboard_scene(W, H, distance_m=1.2, focal_length_px=near.focal_length_px)
    np.testing.assert_allclose(scene.info["camera_matrix"], k)


def test_chessboard_geometry_and_depth() -> None:
    scene = chessboard_scene(W, H, distance_m=1.0, rotation_deg=(0.0, 30.0, 0.0), offset_m=(0.0, 0.0))
    assert scene.radiance.shape == (H, W, 3) and scene.radiance.dtype == np.float32
    assert scene.depth_m.shape == (H, W) and scene.depth_m.dtype == np.float32
    assert 0.0 <= scene.radiance.min() and scene.radiance.max() <= 1.0
    assert scene.info["board_fully_in_view"]
    # the board centre is at 1 m; +30 deg about y (pointing down) turns the board's right edge
    # toward the camera
    cy, cx = (H - 1) // 2, (W - 1) // 2
    assert scene.depth_m[cy, cx] == pytest.approx(1.0, abs=0.01)
    assert scene.depth_m[cy, cx + 100] < scene.depth_m[cy, cx - 100]
    z_right = scene.depth_m[cy, cx + 100]
    # plane z = 1 - tan(30) x with x = (u - cx) z / f
    expected = 1.0 / (1.0 + math.tan(math.radians(30.0)) * (cx + 100 - (W - 1) / 2) / DEFAULT_FOCAL_LENGTH_PX)
    assert z_right == pytest.approx(expected, rel=1e-4)
    assert scene.depth_m[0, 0] == pytest.approx(4.0)  # background plane
    # the rendered corners are where the pinhole puts them
    corners = find_board(scene.radiance, COLS, ROWS)
    assert corners is not None
    truth = np.asarray(scene.info["corners_px"])
    dist = np.linalg.norm(corners[:, None, :] - truth[None], axis=2).min(axis=1)
    assert dist.mean() < 0.12 and dist.max() < 0.3


def test_board_poses_are_varied_and_keep_the_board_in_view() -> None:
    poses = board_poses(12, width=W, height=H, seed=1)
    assert len(poses) == 12
    tilts = np.array([max(abs(p.rotation_deg[0]), abs(p.rotation_deg[1])) for p in poses])
    assert tilts.min() >= 0.45 * 35.0 - 1e-9 and tilts.max() <= 35.0
    assert np.ptp([p.offset_m[0] for p in poses]) > 0.02
    for pose in poses[:4]:
        corners = board_corners_px(W, H, **pose.as_kwargs())
        assert np.all((corners >= 0) & (corners <= [W - 1, H - 1]))
    assert board_poses(3, width=W, height=H, seed=1) == poses[:3]
    with pytest.raises(InputError, match="smaller fill"):
        board_poses(2, width=W, height=H, fill=(1.2, 1.3))


@pytest.mark.parametrize("texture", ["random", "dead_leaves"])
def test_planar_target_has_a_clear_sharpness_peak_at_its_distance(texture: str) -> None:
    distance_m = 0.8
    scene = planar_target_scene(320, 240, distance_m=distance_m, texture=texture, seed=4)
    assert np.all(scene.depth_m == np.float32(distance_m))
    centre = scene.radiance[90:150, 130:190, 0]
    assert centre.std() > 0.2  # high contrast at the image centre
    layered = LayeredScene(scene.radiance, scene.depth_m)
    blur = ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=7.0).blur_px_per_dpt
    focus_dpt = 1.0 / distance_m + np.linspace(-0.6, 0.6, 13)

    def sharpness(img: np.ndarray) -> float:
        lap = np.diff(img[90:150, 130:190, 0], 2, axis=0)[:, 1:-1] + np.diff(img[90:150, 130:190, 0], 2, axis=1)[1:-1]
        return float(np.mean(lap**2))

    curve = np.array([sharpness(layered.render(f, blur_px_per_dpt=blur)) for f in focus_dpt])
    assert int(np.argmax(curve)) == 6
    assert curve[6] > 5.0 * max(curve[0], curve[-1])
    assert np.all(np.diff(curve[:7]) > 0) and np.all(np.diff(curve[6:]) < 0)


def test_targets_refuse_bad_arguments() -> None:
    with pytest.raises(InputError, match="texture"):
        planar_target_scene(64, 48, distance_m=1.0, texture="stripes")
    with pytest.raises(InputError, match="distance_m"):
        planar_target_scene(64, 48, distance_m=0.0)
    with pytest.raises(InputError, match="background"):
        chessboard_scene(64, 48, distance_m=1.0, background="sky")


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------


def test_calibration_recovers_the_simulators_focal_length(calibrated: Intrinsics, true_focal_length_px: float) -> None:
    assert calibrated.n_views == 10
    assert calibrated.fx_px == pytest.approx(true_focal_length_px, rel=0.01)
    assert calibrated.fy_px == pytest.approx(true_focal_length_px, rel=0.01)
    assert calibrated.focal_length_px == pytest.approx(true_focal_length_px, rel=0.003)
    cx, cy = calibrated.principal_point_px
    assert abs(cx - (W - 1) / 2) < 5.0 and abs(cy - (H - 1) / 2) < 5.0
    assert calibrated.rms_reprojection_px < 0.5
    assert len(calibrated.per_view_rms_px) == 10 and max(calibrated.per_view_rms_px) < 0.5
    assert calibrated.image_size == (W, H)
    # OpenCV's own uncertainty estimate is small and covers the error
    assert len(calibrated.std_px) == 4 and max(calibrated.std_px) < 5.0
    assert abs(calibrated.fx_px - true_focal_length_px) < 3.0 * calibrated.std_px[0] + 0.5
    assert calibrated.focal_length_mm(7.0) == pytest.approx(calibrated.focal_length_px * 7e-3)


def test_images_without_a_board_are_skipped(views) -> None:
    plain = planar_target_scene(W, H, distance_m=1.2, seed=1).radiance  # float, colour, no board
    images = [plain] + list(views[:6])
    result = calibrate_intrinsics(images, cols=COLS, rows=ROWS, square_m=SQUARE_M, distortion_model="none")
    assert result.n_views == 6 and result.views_used == (1, 2, 3, 4, 5, 6)
    assert find_board(plain, COLS, ROWS) is None


def test_too_few_views_say_what_to_do(views) -> None:
    blank = np.full((H, W), 90, np.uint8)
    with pytest.raises(CalibrationError, match=r"found in 3 of 4 images; need at least 5: show the whole board"):
        calibrate_intrinsics([blank] + list(views[:3]), cols=COLS, rows=ROWS, square_m=SQUARE_M)


@pytest.mark.parametrize(("cols", "rows"), [(10, 7), (8, 5), (9, 7)])
def test_a_wrong_board_size_is_named_with_the_size_that_fits(views, cols: int, rows: int) -> None:
    # squares counted for inner corners (10x7 for a 9x6 board), or one side off by one
    with pytest.raises(BoardSizeMismatch) as info:
        calibrate_intrinsics(views[:5], cols=cols, rows=rows, square_m=SQUARE_M)
    assert (info.value.cols, info.value.rows) == (COLS, ROWS)
    message = str(info.value)
    assert f"a {cols}x{rows} chessboard (inner corners) was found in none of the 5 images, but a 9x6 one was" in message
    assert "set cols 9 and rows 6" in message


def test_no_board_at_any_size_is_the_plain_advice(views) -> None:
    blank = np.full((H, W), 90, np.uint8)
    with pytest.raises(CalibrationError, match="check that cols and rows count the inner corners") as info:
        calibrate_intrinsics([blank] * 5, cols=COLS, rows=ROWS, square_m=SQUARE_M)
    assert not isinstance(info.value, BoardSizeMismatch)


def test_implausible_reprojection_error_is_refused(views) -> None:
    # corrupt one view: shift half of the image by a few pixels (a board that is not flat)
    bent = views[0].copy()
    bent[:, W // 2 :] = np.roll(views[0][:, W // 2 :], 4, axis=0)
    with pytest.raises(CalibrationError, match=r"RMS reprojection error .* exceeds .*square_m, cols and rows"):
        calibrate_intrinsics([bent] + list(views[1:6]), cols=COLS, rows=ROWS, square_m=SQUARE_M, max_rms_px=0.3)


def test_intrinsics_round_trip_through_yaml(calibrated: Intrinsics) -> None:
    doc = yaml.safe_load(yaml.safe_dump({"intrinsics": calibrated.to_dict()}))["intrinsics"]
    assert doc["fx_px"] == pytest.approx(calibrated.fx_px)
    back = Intrinsics.from_dict(doc)
    np.testing.assert_allclose(back.camera_matrix, calibrated.camera_matrix)
    np.testing.assert_allclose(back.distortion, calibrated.distortion)
    assert back.image_size == calibrated.image_size and back.n_views == calibrated.n_views
    assert back.std_px == pytest.approx(calibrated.std_px) and back.views_used == calibrated.views_used
    assert back.board == {"kind": "chessboard", "cols": COLS, "rows": ROWS, "square_m": SQUARE_M}
    del doc["camera_matrix"]
    with pytest.raises(CalibrationError, match="camera_matrix: missing"):
        Intrinsics.from_dict(doc)


def test_find_board_takes_any_camera_format(views) -> None:
    ref = find_board(views[1], COLS, ROWS)
    assert ref is not None and ref.shape == (COLS * ROWS, 2)
    as16 = views[1].astype(np.uint16) * 16  # 12-bit data in uint16
    as_rgb = np.repeat(views[1][..., None], 3, axis=2)
    for image in (as16, as_rgb, views[1].astype(np.float32) / 255.0):
        corners = find_board(image, COLS, ROWS)
        assert corners is not None
        np.testing.assert_allclose(corners, ref, atol=0.05)
    assert board_object_points(COLS, ROWS, SQUARE_M)[COLS + 1].tolist() == pytest.approx([SQUARE_M, SQUARE_M, 0.0])



def test_charuco_calibration_uses_partly_hidden_boards(true_focal_length_px: float) -> None:
    poses = board_poses(8, width=W, height=H, focal_length_px=LENS.focal_length_px, seed=5)
    # two more views with the board cut by the image border: a plain chessboard would be lost
    poses += [
        BoardPose(rotation_deg=(5.0, 30.0, 4.0), offset_m=(0.17, 0.0), distance_m=1.1),
        BoardPose(rotation_deg=(-28.0, 3.0, -6.0), offset_m=(-0.02, -0.13), distance_m=1.05),
    ]
    images = []
    for i, pose in enumerate(poses):
        scene = chessboard_scene(W, H, focal_length_px=LENS.focal_length_px, pattern="charuco", **pose.as_kwargs())
        images.append(_simulated_view(scene, seed=20 + i))
    assert not scene.info["board_fully_in_view"]
    assert find_board(images[-1], COLS, ROWS) is None
    found = find_charuco(images[-1], COLS, ROWS, square_m=SQUARE_M)
    assert found is not None and MIN_CHARUCO_CORNERS <= len(found[1]) < COLS * ROWS
    # where the pinhole puts them, then scaled about the centre by the simulated breathing
    centre = np.array([(W - 1) / 2, (H - 1) / 2])
    truth = centre + (np.asarray(scene.info["corners_px"])[found[1]] - centre) * true_focal_length_px / LENS.focal_length_px
    assert np.abs(found[0] - truth).max() < 0.3
    result = calibrate_intrinsics(images, cols=COLS, rows=ROWS, square_m=SQUARE_M, board="charuco")
    assert result.n_views == 10
    assert result.focal_length_px == pytest.approx(true_focal_length_px, rel=0.01)
    assert result.rms_reprojection_px < 0.5
    assert result.board["kind"] == "charuco" and result.board["dictionary"] == "DICT_5X5_100"


def test_views_that_pin_the_camera_down_poorly_give_a_warning(views, caplog: pytest.LogCaptureFixture) -> None:
    """Boards held nearly parallel to the sensor passed every check (reprojection 0.05 px,
    OpenCV's fx standard deviation 0.8 px) with fx 36 % off, written without a word."""
    with caplog.at_level("WARNING", logger="calibration.intrinsics"):
        calibrate_intrinsics(views, cols=COLS, rows=ROWS, square_m=SQUARE_M)
    assert "intrinsics:" not in caplog.text  # tilted, sharp views: quiet
    flat = [BoardPose(rotation_deg=(a, b, c), offset_m=(ox, oy), distance_m=1.2) for a, b, c, ox, oy in
            [(1, 0, 0, 0, 0), (0, 1.5, 10, 0.01, 0), (-1, 0, 20, 0, 0.01), (0, -1, 30, -0.01, 0), (1, 1, 40, 0, -0.01), (-1, -1, 5, 0.005, 0.005)]]
    images = [_simulated_view(chessboard_scene(W, H, cols=COLS, rows=ROWS, square_m=SQUARE_M, focal_length_px=LENS.focal_length_px,
                                               **pose.as_kwargs()), seed=i) for i, pose in enumerate(flat)]
    with caplog.at_level("WARNING", logger="calibration.intrinsics"):
        result = calibrate_intrinsics(images, cols=COLS, rows=ROWS, square_m=SQUARE_M)
    assert abs(result.fx_px / LENS.focal_length_px - 1) > 0.1  # what the warning is about
    assert "tilted by at most 2 degrees in 6 views, which leaves the focal length undetermined" in caplog.text

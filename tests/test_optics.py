"""Tests of capture.optics: thin-lens blur, disc PSF, layered defocus rendering, focus
breathing and the sensor model."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from capture.errors import InputError
from capture.optics import (
    LayeredScene,
    SensorModel,
    ThinLens,
    apply_breathing,
    breathing_scale,
    coc_diameter_px,
    disc_kernel,
)

H, W = 72, 96


def _texture(seed: int = 0, hw: tuple[int, int] = (H, W)) -> np.ndarray:
    """A textured linear-radiance image ``[H, W, 3]`` in [0.1, 0.9]."""
    rng = np.random.default_rng(seed)
    img = rng.uniform(0.1, 0.9, size=(*hw, 3)).astype(np.float32)
    return cv2.GaussianBlur(img, (0, 0), 0.7)


# --------------------------------------------------------------------------------------------
# ThinLens and the circle of confusion
# --------------------------------------------------------------------------------------------


def _hand_coc_px(*, f_m: float, n: float, pitch_m: float, base_focus_m: float, focus_dpt: float, object_dpt: float) -> float:
    """Blur disc from first principles: a lens of fixed sensor distance ``v`` (set by the base
    focus) whose optical power is changed to focus at ``focus_dpt``; the object's image lies at
    ``v_s``, and similar triangles through the aperture give ``c = A |v - v_s| / v_s``."""
    aperture = f_m / n
    base_dpt = 0.0 if math.isinf(base_focus_m) else 1.0 / base_focus_m
    v = 1.0 / (1.0 / f_m - base_dpt)
    power = 1.0 / v + focus_dpt  # total power that images focus_dpt onto the sensor
    v_s = 1.0 / (power - object_dpt)
    return aperture * abs(v - v_s) / v_s / pitch_m


def test_blur_per_diopter_matches_hand_computation() -> None:
    lens = ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=7.0)
    # A = 12 mm / 2 = 6 mm, v = f = 12 mm (focused at infinity), k = A v / pitch
    assert lens.aperture_m == pytest.approx(6e-3)
    assert lens.sensor_distance_m == pytest.approx(12e-3)
    assert lens.blur_px_per_dpt == pytest.approx(6e-3 * 12e-3 / 7e-6, rel=1e-9)
    assert lens.blur_px_per_dpt == pytest.approx(10.2857, abs=1e-3)
    assert lens.focal_length_px == pytest.approx(12e-3 / 7e-6)


@pytest.mark.parametrize("base_focus_m", [math.inf, 0.5])
@pytest.mark.parametrize(("focus_dpt", "object_dpt"), [(2.0, 0.5), (0.5, 2.0), (1.0, 1.7), (2.5, 0.0)])
def test_coc_equals_geometric_blur_disc(base_focus_m: float, focus_dpt: float, object_dpt: float) -> None:
    lens = ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=7.0, base_focus_m=base_focus_m)
    got = coc_diameter_px(object_dpt, focus_dpt, blur_px_per_dpt=lens.blur_px_per_dpt)
    want = _hand_coc_px(f_m=12e-3, n=2.0, pitch_m=7e-6, base_focus_m=base_focus_m, focus_dpt=focus_dpt, object_dpt=object_dpt)
    assert got == pytest.approx(want, rel=1e-9)


def test_coc_is_linear_in_diopters_and_zero_at_focus() -> None:
    k = 10.0
    objects = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    coc = coc_diameter_px(objects, 1.5, blur_px_per_dpt=k)
    np.testing.assert_allclose(coc, k * np.abs(1.5 - objects), rtol=0, atol=1e-12)
    assert coc[3] == 0.0
    # equal steps in diopters give equal steps in blur on each side of focus
    np.testing.assert_allclose(np.diff(coc[:4]), -5.0)
    np.testing.assert_allclose(np.diff(coc[3:]), 5.0)
    assert coc_diameter_px(1.5, 1.5, blur_px_per_dpt=k) == 0.0


def test_base_focus_moves_the_sensor() -> None:
    far = ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=7.0)
    near = ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=7.0, base_focus_m=0.5)
    v = 1.0 / (1.0 / 0.012 - 1.0 / 0.5)  # lens equation
    assert near.sensor_distance_m == pytest.approx(v, rel=1e-12)
    assert near.sensor_distance_m > far.sensor_distance_m
    assert near.blur_px_per_dpt == pytest.approx(far.blur_px_per_dpt * v / 0.012, rel=1e-12)
    assert near.blur_px_per_dpt == pytest.approx(10.5387, abs=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"f_number": 0.0}, "f_number"),
        ({"f_number": -2.0}, "f_number"),
        ({"focal_length_mm": 0.0}, "focal_length_mm"),
        ({"pixel_pitch_um": -1.0}, "pixel_pitch_um"),
        ({"base_focus_m": 0.0}, "base_focus_m"),
        ({"base_focus_m": 0.010}, "base_focus_m"),  # inside the 12 mm focal length
        ({"base_focus_m": 0.012}, "base_focus_m"),  # at the focal length: sensor at infinity
    ],
)
def test_invalid_optics_raise_input_error(kwargs: dict, field: str) -> None:
    args = {"focal_length_mm": 12.0, "f_number": 2.0, "pixel_pitch_um": 7.0} | kwargs
    with pytest.raises(InputError, match=field):
        ThinLens(**args)


# --------------------------------------------------------------------------------------------
# disc_kernel
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("diameter", [1.2, 2.0, 3.7, 7.0, 10.29, 20.0])
def test_disc_kernel_is_normalised_and_symmetric(diameter: float) -> None:
    k = disc_kernel(diameter)
    assert k.dtype == np.float32
    assert k.ndim == 2 and k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-5)
    assert np.all(k >= 0)
    np.testing.assert_allclose(k, k.T, atol=1e-7)
    np.testing.assert_allclose(k, k[::-1, :], atol=1e-7)
    np.testing.assert_allclose(k, k[:, ::-1], atol=1e-7)
    c = k.shape[0] // 2
    assert k[c, c] == k.max()


@pytest.mark.parametrize("diameter", [0.0, 0.3, 0.99, 1.0])
def test_disc_kernel_is_identity_below_one_pixel(diameter: float) -> None:
    k = disc_kernel(diameter)
    assert k.shape == (1, 1)
    assert k[0, 0] == 1.0


def test_disc_kernel_support_grows_with_diameter() -> None:
    sizes = [disc_kernel(d).shape[0] for d in (1.5, 3.0, 5.0, 9.0, 17.0, 33.0)]
    assert sizes == sorted(sizes)
    assert len(set(sizes)) == len(sizes)
    # the support covers the disc and not much more
    for d in (5.0, 9.0, 17.0, 33.0):
        assert d <= disc_kernel(d).shape[0] <= d + 2


@pytest.mark.parametrize("diameter", [5.0, 7.0, 10.29, 15.0, 31.0])
def test_disc_kernel_second_moment_matches_a_uniform_disc(diameter: float) -> None:
    k = disc_kernel(diameter).astype(np.float64)
    half = k.shape[0] // 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    second_moment = float((k * (xx**2 + yy**2)).sum())
    # a uniform disc of radius R has E[r^2] = R^2 / 2 = d^2 / 8
    assert second_moment == pytest.approx(diameter**2 / 8.0, rel=0.10)


# --------------------------------------------------------------------------------------------
# LayeredScene
# --------------------------------------------------------------------------------------------

K = ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=7.0).blur_px_per_dpt


def test_plane_in_focus_renders_the_radiance() -> None:
    radiance = _texture(1)
    scene = LayeredScene(radiance, np.full((H, W), 1.0, np.float32))
    out = scene.render(1.0, blur_px_per_dpt=K)
    assert out.shape == radiance.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, radiance, atol=1e-4)


@pytest.mark.parametrize("focus_dpt", [2.0, 0.25, 1.6])
def test_plane_out_of_focus_is_the_disc_blur(focus_dpt: float) -> None:
    radiance = _texture(2)
    scene = LayeredScene(radiance, np.full((H, W), 1.0, np.float32))
    out = scene.render(focus_dpt, blur_px_per_dpt=K)
    kernel = disc_kernel(K * abs(focus_dpt - 1.0))
    assert kernel.shape[0] > 1
    want = cv2.filter2D(radiance, cv2.CV_32F, kernel)
    m = kernel.shape[0] // 2 + 1
    np.testing.assert_allclose(out[m:-m, m:-m], want[m:-m, m:-m], atol=1e-4)
    # and it really is blurred: contrast drops
    assert out[m:-m, m:-m].std() < 0.8 * radiance[m:-m, m:-m].std()


def test_single_plane_preserves_energy_across_focus() -> None:
    radiance = _texture(3)
    scene = LayeredScene(radiance, np.full((H, W), 0.8, np.float32))
    means = [float(scene.render(f, blur_px_per_dpt=K).mean()) for f in (0.0, 0.5, 1.25, 2.0, 3.0)]
    assert max(means) - min(means) < 0.01 * float(radiance.mean())


def _occlusion_scene() -> tuple[LayeredScene, np.ndarray, tuple[slice, slice]]:
    """A far plane (2 m, 0.5 dpt, grey 0.2) behind a sharp red square (0.5 m, 2 dpt)."""
    radiance = np.full((H, W, 3), 0.2, np.float32)
    depth = np.full((H, W), 2.0, np.float32)
    sq = (slice(16, 56), slice(28, 68))
    radiance[sq] = (0.9, 0.1, 0.1)
    depth[sq] = 0.5
    return LayeredScene(radiance, depth), radiance, sq


def test_occlusion_near_square_in_focus_shows_no_far_plane() -> None:
    scene, _radiance, (ys, xs) = _occlusion_scene()
    out = scene.render(2.0, blur_px_per_dpt=K)  # focused on the square
    inside = out[ys, xs]
    np.testing.assert_allclose(inside, np.broadcast_to(np.float32([0.9, 0.1, 0.1]), inside.shape), atol=1e-5)
    # the blurred background stays background colour far from the square
    np.testing.assert_allclose(out[:4, :4], 0.2, atol=1e-5)


def test_occlusion_far_focus_blurs_the_square_edge_over_the_background() -> None:
    scene, _radiance, (ys, xs) = _occlusion_scene()
    out = scene.render(0.5, blur_px_per_dpt=K)  # focused on the far plane: square blur 1.5 dpt
    blur_d = K * 1.5
    assert blur_d > 10
    # pixels just outside the square's left edge mix square and background
    just_outside = out[36, xs.start - 2, 0]
    assert 0.2 + 0.05 < just_outside < 0.9 - 0.05
    # the mix falls off smoothly with distance from the edge, down to the background
    row = out[36, xs.start - 10 : xs.start, 0]
    assert np.all(np.diff(row) >= -1e-6)
    assert row[0] == pytest.approx(0.2, abs=0.02) and row[-1] > 0.45
    # far from the square, the (in-focus) background is untouched
    np.testing.assert_allclose(out[:3, :3], 0.2, atol=1e-5)
    # the square's centre is farther than the blur radius from its edges: unchanged
    np.testing.assert_allclose(out[36, 48], [0.9, 0.1, 0.1], atol=1e-4)


def test_defocused_near_edge_has_no_sharp_step() -> None:
    scene, _radiance, (ys, xs) = _occlusion_scene()
    out = scene.render(0.5, blur_px_per_dpt=K)  # square blurred by ~15 px
    row = out[36, :, 0]
    # a 0.7 step blurred by a 15 px disc rises by at most ~0.7 * 2 / (pi * 7.7) ~ 0.06 per pixel
    assert float(np.abs(np.diff(row)).max()) < 0.1
    # the hidden background shows through the blurred rim: just inside the edge is a mix too,
    # and the edge itself sits half way between background and square, as through a real lens
    assert 0.2 + 0.05 < out[36, xs.start + 1, 0] < 0.9 - 0.05
    assert 0.5 * (out[36, xs.start - 1, 0] + out[36, xs.start, 0]) == pytest.approx(0.55, abs=0.05)


def test_layered_scene_rejects_bad_depth() -> None:
    with pytest.raises(InputError):
        LayeredScene(_texture(), np.zeros((H, W), np.float32))
    with pytest.raises(InputError):
        LayeredScene(_texture(), np.full((H, W + 1), 1.0, np.float32))


# --------------------------------------------------------------------------------------------
# Focus breathing
# --------------------------------------------------------------------------------------------


def test_breathing_scale_model() -> None:
    assert breathing_scale(1.5, breathing_per_dpt=0.004, reference_dpt=1.5) == 1.0
    assert breathing_scale(2.5, breathing_per_dpt=0.004, reference_dpt=1.5) == pytest.approx(1.004)
    assert breathing_scale(0.5, breathing_per_dpt=0.004, reference_dpt=1.5) == pytest.approx(0.996)


def test_apply_breathing_scale_one_is_identity() -> None:
    img = _texture(4)
    np.testing.assert_array_equal(apply_breathing(img, 1.0), img)


def _centroid(img: np.ndarray) -> tuple[float, float]:
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    w = img / img.sum()
    return float((xx * w).sum()), float((yy * w).sum())


@pytest.mark.parametrize("scale", [1.1, 0.9])
def test_apply_breathing_scales_about_the_centre(scale: float) -> None:
    x0, y0 = 78.0, 20.0
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    dot = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 1.5**2)).astype(np.float32)
    out = apply_breathing(dot, scale)
    assert out.shape == dot.shape and out.dtype == dot.dtype
    cx, cy = (W - 1) / 2.0, (H - 1) / 2.0
    want_x, want_y = cx + scale * (x0 - cx), cy + scale * (y0 - cy)
    got_x, got_y = _centroid(out)
    assert got_x == pytest.approx(want_x, abs=0.15)
    assert got_y == pytest.approx(want_y, abs=0.15)
    # enlarging moves an off-centre dot outward, shrinking inward
    moved_out = math.hypot(got_x - cx, got_y - cy) > math.hypot(x0 - cx, y0 - cy)
    assert moved_out == (scale > 1)


# --------------------------------------------------------------------------------------------
# SensorModel
# --------------------------------------------------------------------------------------------


def test_sensor_without_noise_is_deterministic_and_linear() -> None:
    sensor = SensorModel(full_well_e=10_000.0, read_noise_e=3.0, electrons_per_s=800_000.0, adc_bits=12, noise=False)
    radiance = np.linspace(0.0, 1.0, 101, dtype=np.float32).reshape(1, -1)
    exposure_s = 0.01  # 8000 e- at radiance 1
    rng = np.random.default_rng(0)
    dn16 = sensor.expose(radiance, exposure_s=exposure_s, gain_db=0.0, out_bits=16, rng=rng)
    electrons = np.minimum(radiance.astype(np.float64) * 800_000.0 * exposure_s, 10_000.0)
    want16 = np.rint(electrons / 10_000.0 * 4095)
    assert dn16.dtype == np.uint16
    np.testing.assert_allclose(dn16.astype(np.float64), want16, atol=1)
    dn8 = sensor.expose(radiance, exposure_s=exposure_s, gain_db=0.0, out_bits=8, rng=rng)
    assert dn8.dtype == np.uint8
    np.testing.assert_allclose(dn8.astype(np.float64), np.rint(electrons / 10_000.0 * 255), atol=1)
    # deterministic
    again = sensor.expose(radiance, exposure_s=exposure_s, gain_db=0.0, out_bits=16, rng=np.random.default_rng(9))
    np.testing.assert_array_equal(again, dn16)


def test_sensor_clips_at_full_well() -> None:
    sensor = SensorModel(full_well_e=10_000.0, electrons_per_s=800_000.0, adc_bits=12, noise=False)
    radiance = np.array([[0.5, 1.0]], np.float32)
    dn = sensor.expose(radiance, exposure_s=0.05, gain_db=0.0, out_bits=16, rng=np.random.default_rng(0))
    # 0.5 * 40000 e- and 40000 e- both exceed the 10000 e- full well
    assert dn.tolist() == [[4095, 4095]]


def test_a_saturated_pixel_reads_full_scale_with_noise_on() -> None:
    """The well was clipped before the noise was added: saturated highlights came out as noise
    texture (mean 4078.6, std 24 DN at twice the full well) that a focus measure picks up."""
    sensor = SensorModel(full_well_e=10_000.0, read_noise_e=3.0, electrons_per_s=800_000.0, adc_bits=12, noise=True)
    radiance = np.full((100, 100), 2.0, np.float32)  # 16 000 e- in 10 ms
    dn = sensor.expose(radiance, exposure_s=0.01, gain_db=0.0, out_bits=16, rng=np.random.default_rng(0))
    assert (dn == 4095).all()
    dn8 = sensor.expose(radiance, exposure_s=0.01, gain_db=0.0, out_bits=8, rng=np.random.default_rng(0))
    assert (dn8 == 255).all()


@pytest.mark.parametrize("level", [0.1, 0.6])
def test_sensor_noise_matches_shot_plus_read_noise(level: float) -> None:
    sensor = SensorModel(full_well_e=10_000.0, read_noise_e=3.0, electrons_per_s=800_000.0, adc_bits=12, noise=True)
    exposure_s = 0.01
    flat = np.full((200, 200), level, np.float32)
    dn = sensor.expose(flat, exposure_s=exposure_s, gain_db=0.0, out_bits=16, rng=np.random.default_rng(5)).astype(np.float64)
    electrons = level * 800_000.0 * exposure_s
    dn_per_e = 4095 / 10_000.0
    assert dn.mean() == pytest.approx(electrons * dn_per_e, rel=0.01)
    assert dn.std() == pytest.approx(math.sqrt(electrons + 3.0**2) * dn_per_e, rel=0.10)


def test_mono16_keeps_adc_bits() -> None:
    for bits in (10, 12):
        sensor = SensorModel(adc_bits=bits, noise=True)
        bright = np.ones((64, 64), np.float32)
        dn = sensor.expose(bright, exposure_s=0.1, gain_db=6.0, out_bits=16, rng=np.random.default_rng(1))
        assert dn.dtype == np.uint16
        assert int(dn.max()) == 2**bits - 1


def test_gain_scales_digital_numbers() -> None:
    sensor = SensorModel(full_well_e=10_000.0, electrons_per_s=800_000.0, adc_bits=12, noise=False)
    radiance = np.linspace(0.02, 0.12, 50, dtype=np.float32).reshape(1, -1)  # unsaturated at +12 dB
    rng = np.random.default_rng(0)
    dn0 = sensor.expose(radiance, exposure_s=0.01, gain_db=0.0, out_bits=16, rng=rng).astype(np.float64)
    for g in (6.0, 12.0):
        dn = sensor.expose(radiance, exposure_s=0.01, gain_db=g, out_bits=16, rng=rng).astype(np.float64)
        electrons = radiance.astype(np.float64) * 8000.0
        np.testing.assert_allclose(dn, np.rint(electrons * 0.4095 * 10 ** (g / 20)), atol=1)
        np.testing.assert_allclose(dn / dn0, 10 ** (g / 20), rtol=0.02)


def test_sensor_rejects_unknown_bit_depth() -> None:
    with pytest.raises(InputError, match="out_bits"):
        SensorModel().expose(np.zeros((2, 2), np.float32), exposure_s=0.01, gain_db=0.0, out_bits=12, rng=np.random.default_rng(0))

"""Slice registration and focus-breathing calibration (issue 5, item 2): calibration.alignment."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from calibration.alignment import (
    BreathingModel,
    estimate_pair,
    estimate_stack_alignment,
    fit_breathing,
    misregistration,
    scale_shift_params,
)
from capture.errors import CalibrationError, ReconstructionError
from capture.optics import (
    LayeredScene,
    SensorModel,
    apply_breathing,
    breathing_scale,
    disc_kernel,
)
from capture.scenes import procedural_scene
from capture.stack import FocalStack
from reconstruct import reconstruct_stack
from reconstruct.classical import ClassicalParams, depth_from_focus
from reconstruct.metrics import depth_metrics
from tests.conftest import SHARED_DATA

PCB = SHARED_DATA / "pcb_macro_stack"
_BT601 = np.array([0.299, 0.587, 0.114], np.float32)


# --------------------------------------------------------------------------------------------
# Synthetic slices: a textured image, defocus, breathing about the centre, a shift, noise
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def texture() -> np.ndarray:
    """float32 [192, 256] grey texture in [0, 1] (the procedural scene's radiance)."""
    return np.ascontiguousarray(procedural_scene(256, 192, seed=1).radiance @ _BT601)


def _slice(texture: np.ndarray, *, magnification: float, blur_px: float, shift_px: tuple[float, float],
           rng: np.random.Generator, noise: float = 0.004) -> np.ndarray:
    """[H, W] float32: defocus (disc of ``blur_px``), breathing ``magnification`` about the
    centre, then a shift ``shift_px`` (x, y), then Gaussian noise."""
    img = cv2.filter2D(texture, -1, disc_kernel(blur_px), borderType=cv2.BORDER_REFLECT)
    img = apply_breathing(img, magnification)
    if shift_px != (0.0, 0.0):
        move = np.array([[1.0, 0.0, shift_px[0]], [0.0, 1.0, shift_px[1]]])
        img = cv2.warpAffine(img, move, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return (img + rng.normal(0.0, noise, img.shape)).astype(np.float32)


def _true_alignment(m: float, shift: tuple[float, float], m_ref: float, shift_ref: tuple[float, float]) -> tuple[float, float, float]:
    """(scale, dx, dy) about the centre that maps a slice (m, shift) onto the reference (m_ref, shift_ref).

    A scene point at ``c + u`` appears at ``c + m u + shift``; so ``p_ref = c + (m_ref / m) (p - c - shift) + shift_ref``.
    """
    s = m_ref / m
    return s, shift_ref[0] - s * shift[0], shift_ref[1] - s * shift[1]


@pytest.mark.parametrize("motion", ["scale_shift", "similarity", "affine"])
def test_stack_alignment_recovers_breathing_and_shift(texture, motion):
    """Seven slices, blur 0..6 px, breathing 1 % per diopter, hand-held shifts up to 1.5 px:
    every slice's scale within 1e-3 and its shift within 0.1 px of the truth."""
    rng = np.random.default_rng(7)
    focus_dpt = np.linspace(0.5, 3.5, 7)
    target_dpt, blur_per_dpt, b = 2.0, 4.0, 0.01
    mags = [breathing_scale(d, breathing_per_dpt=b, reference_dpt=target_dpt) for d in focus_dpt]
    shifts = [(float(x), float(y)) for x, y in rng.uniform(-1.5, 1.5, (7, 2))]
    slices = [
        _slice(texture, magnification=m, blur_px=blur_per_dpt * abs(d - target_dpt), shift_px=sh, rng=rng)
        for d, m, sh in zip(focus_dpt, mags, shifts)
    ]
    images = np.clip(np.rint(np.stack(slices) * 65535), 0, 65535).astype(np.uint16)
    order = np.array([3, 0, 6, 1, 5, 2, 4])  # slices in any order: the result follows the stack's order
    stack = FocalStack(images[order], focus_distance_m=1.0 / focus_dpt[order])
    affines = estimate_stack_alignment(stack, motion=motion)
    assert len(affines) == 7 and all(a.shape == (2, 3) for a in affines)
    ref = 3  # the middle slice in focus order
    for pos, k in enumerate(order):
        scale, dx, dy = scale_shift_params(affines[pos], stack.image_hw)
        t_scale, t_dx, t_dy = _true_alignment(mags[k], shifts[k], mags[ref], shifts[ref])
        assert scale == pytest.approx(t_scale, abs=1e-3), (k, scale, t_scale)
        assert abs(dx - t_dx) < 0.1 and abs(dy - t_dy) < 0.1, (k, dx, t_dx, dy, t_dy)
    np.testing.assert_allclose(affines[int(np.nonzero(order == ref)[0][0])], np.eye(2, 3), atol=1e-12)
    if motion != "affine":  # constrained models come back exactly constrained
        for a in affines:
            assert a[0, 0] == pytest.approx(a[1, 1], abs=1e-12) and a[0, 1] == pytest.approx(-a[1, 0], abs=1e-12)
            if motion == "scale_shift":
                assert a[0, 1] == 0.0 and a[1, 0] == 0.0

    aligned = stack.with_alignment(affines)
    assert aligned.has_alignment and not stack.has_alignment
    assert misregistration(aligned) < 0.5 * misregistration(stack)


def test_pair_affine_convention(texture):
    """The affine maps moving pixels onto the reference (cv2.warpAffine without WARP_INVERSE_MAP)."""
    rng = np.random.default_rng(1)
    ref = _slice(texture, magnification=1.0, blur_px=1.0, shift_px=(0.0, 0.0), rng=rng)
    moving = _slice(texture, magnification=1.015, blur_px=2.0, shift_px=(2.0, -1.0), rng=rng)
    reg = estimate_pair(moving, ref)
    assert reg.converged and reg.correlation > 0.9 and reg.motion == "scale_shift"
    warped = cv2.warpAffine(moving, reg.affine, (256, 192), flags=cv2.INTER_LINEAR)
    inner = (slice(20, -20), slice(20, -20))
    before = np.abs(moving - ref)[inner].mean()
    after = np.abs(warped - ref)[inner].mean()
    assert after < 0.5 * before
    scale, dx, dy = reg.scale_shift((192, 256))
    assert scale == pytest.approx(1 / 1.015, abs=1e-3)
    assert dx == pytest.approx(-2.0 / 1.015, abs=0.1) and dy == pytest.approx(1.0 / 1.015, abs=0.1)


# --------------------------------------------------------------------------------------------
# Breathing calibration on a flat textured target
# --------------------------------------------------------------------------------------------


def _target_frame(texture: np.ndarray, current_ma: float, rng: np.random.Generator, *, b: float) -> np.ndarray:
    """uint8 [H, W] frame of a flat target at 0.8 m, lens at ``current_ma`` (D = -0.5 + 0.02 I dpt)."""
    focus = -0.5 + 0.02 * current_ma
    img = cv2.filter2D(texture, -1, disc_kernel(4.0 * abs(focus - 1.25)), borderType=cv2.BORDER_REFLECT)
    img = apply_breathing(img, breathing_scale(focus, breathing_per_dpt=b, reference_dpt=1.5))
    return np.clip(np.rint((img + rng.normal(0.0, 0.004, img.shape)) * 255), 0, 255).astype(np.uint8)


def _true_magnification(current_ma: float, reference_ma: float, b: float) -> float:
    def m(i: float) -> float:
        return breathing_scale(-0.5 + 0.02 * i, breathing_per_dpt=b, reference_dpt=1.5)

    return m(current_ma) / m(reference_ma)


@pytest.mark.parametrize("b", [0.004, 0.02])
def test_fit_breathing_interpolates_within_1e3(texture, b):
    rng = np.random.default_rng(3)
    nodes_ma = [50.0, 70.0, 90.0, 110.0, 130.0, 150.0]  # 0.5 .. 2.5 dpt
    shuffled = [90.0, 50.0, 150.0, 70.0, 130.0, 110.0]
    frames = [_target_frame(texture, i, rng, b=b) for i in shuffled]
    model = fit_breathing(frames, shuffled, reference_value=100.0, actuator_unit="mA")
    assert model.value_range == (50.0, 150.0)
    assert model.scale_at(100.0) == pytest.approx(1.0, abs=1e-9)
    for node in nodes_ma:
        assert model.scale_at(node) == pytest.approx(_true_magnification(node, 100.0, b), abs=1e-3)
    for held_out in (57.0, 100.0, 123.5, 149.0):
        truth = _true_magnification(held_out, 100.0, b)
        assert model.scale_at(held_out) == pytest.approx(truth, abs=1e-3), held_out
        # the interpolated affine aligns a frame taken at the held-out setting onto the reference
        scale, dx, dy = scale_shift_params(model.affine_at(held_out), model.image_hw)
        assert scale == pytest.approx(1 / truth, abs=1e-3)
        assert abs(dx) < 0.1 and abs(dy) < 0.1  # breathing is about the centre here

    # refusal outside the calibrated range (a small tolerance is allowed)
    model.affine_at(150.0 + 0.1)
    for outside in (49.0, 151.0, -1e3):
        with pytest.raises(CalibrationError, match="outside the calibrated range"):
            model.scale_at(outside)

    # calibration.yaml round trip
    text = yaml.safe_dump({"breathing": model.to_dict()})
    again = BreathingModel.from_dict(yaml.safe_load(text)["breathing"])
    np.testing.assert_allclose(again.affines, model.affines, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(again.actuator_values, model.actuator_values)
    assert again.image_hw == model.image_hw and again.actuator_unit == "mA"
    assert again.reference_value == 100.0 and again.motion == "scale_shift"
    assert again.scale_at(123.5) == pytest.approx(model.scale_at(123.5), abs=1e-12)


def test_breathing_model_applies_to_a_stack_and_refuses_bad_input(texture):
    rng = np.random.default_rng(4)
    values = [50.0, 100.0, 150.0]
    model = fit_breathing([_target_frame(texture, v, rng, b=0.02) for v in values], values, actuator_unit="mA")
    assert model.reference_value == 100.0
    images = np.stack([_target_frame(texture, v, rng, b=0.02) for v in (60.0, 140.0)])
    meta = [{"actuator_value": 60.0}, {"actuator_value": 140.0}]
    stack = FocalStack(images, focus_distance_m=[1 / 0.7, 1 / 2.3], slice_meta=meta)
    out = model.align_stack(stack)
    assert out.has_alignment
    # FOCAL_STACK_FORMAT.md: the reference slice has the identity. The table's reference (100 mA)
    # lies between the slices, so the stack's reference is the slice nearest it (of two equally
    # near, the lower value, 60 mA, in either capture order), and the other slice maps onto that
    # one: inv(A(60)) @ A(140)
    assert out.slice_meta[0]["alignment"] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    as3 = lambda a: np.vstack([a, [0.0, 0.0, 1.0]])  # noqa: E731
    np.testing.assert_allclose(out.slice_meta[1]["alignment"], (np.linalg.inv(as3(model.affine_at(60.0))) @ as3(model.affine_at(140.0)))[:2],
                               atol=1e-12)
    # what a point cloud applies before the intrinsics: the reference slice onto the table's frame
    np.testing.assert_allclose(out.meta["breathing_reference_affine"], model.affine_at(60.0), atol=1e-12)
    reversed_order = model.align_stack(FocalStack(images[::-1], focus_distance_m=[1 / 2.3, 1 / 0.7], slice_meta=meta[::-1]))
    assert reversed_order.slice_meta[1]["alignment"] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]  # the 60 mA slice again
    with pytest.raises(CalibrationError, match="no actuator_value"):
        model.align_stack(FocalStack(images, focus_distance_m=[1.0, 2.0]))
    with pytest.raises(CalibrationError, match="recalibrate"):
        model.align_stack(FocalStack(images[:, :100, :100], focus_distance_m=[1.0, 2.0], slice_meta=stack.slice_meta))
    with pytest.raises(CalibrationError, match="repeated"):
        fit_breathing([images[0], images[1]], [60.0, 60.0])
    with pytest.raises(CalibrationError, match="2 or more"):
        fit_breathing([images[0]], [60.0])
    with pytest.raises(CalibrationError, match="strictly increasing"):
        BreathingModel([1.0, 0.0], np.stack([np.eye(2, 3)] * 2), image_hw=(8, 8), reference_value=0.5)
    with pytest.raises(CalibrationError, match="missing key"):
        BreathingModel.from_dict({"actuator_values": [0.0, 1.0]})


# --------------------------------------------------------------------------------------------
# Failure is loud
# --------------------------------------------------------------------------------------------


def test_textureless_pair_fails_loudly():
    rng = np.random.default_rng(5)
    flat = np.full((120, 160), 0.5, np.float32)
    noisy_a = (flat + rng.normal(0, 0.01, flat.shape)).astype(np.float32)
    noisy_b = (flat + rng.normal(0, 0.01, flat.shape)).astype(np.float32)
    with pytest.raises(CalibrationError, match="texture"):
        estimate_pair(flat, flat)
    with pytest.raises(CalibrationError):
        estimate_pair(noisy_a, noisy_b)
    reg = estimate_pair(noisy_a, noisy_b, strict=False)
    assert not reg.converged and reg.message
    with pytest.raises(CalibrationError):
        fit_breathing([flat, flat, flat], [0.0, 1.0, 2.0])
    stack = FocalStack(np.stack([np.rint(noisy_a * 255), np.rint(noisy_b * 255)]).astype(np.uint8), focus_distance_m=[1.0, 2.0])
    with pytest.raises(ReconstructionError, match="could not estimate"):
        reconstruct_stack(stack, align="estimate")


# --------------------------------------------------------------------------------------------
# The real, hand-held stack
# --------------------------------------------------------------------------------------------


def _read_pcb(folder: str) -> FocalStack:
    path = PCB / folder
    if not path.is_dir():
        pytest.skip(f"real-data test skipped: {path} is absent (the pcb_macro_stack data set lives in ../shared/data)")
    files = sorted(p for p in path.iterdir() if p.name.lower().startswith("pcb_") and p.suffix.lower() == ".jpg")
    assert len(files) >= 7, files
    # JPEG decoding at 1/4 size (512x384): fast, and plenty for a registration check
    images = [cv2.cvtColor(cv2.imread(str(f), cv2.IMREAD_REDUCED_COLOR_4), cv2.COLOR_BGR2RGB) for f in files]
    # the README: the index increases as focus moves nearer
    return FocalStack(np.stack(images), focus_index=list(range(len(images))), image_names=[f.name for f in files])


def _gradient_energy(image: np.ndarray, border_frac: float = 0.1) -> float:
    """Mean squared Sobel gradient of a grey [H, W] image, borders left out."""
    gx = cv2.Sobel(image, cv2.CV_32F, 1, 0)
    gy = cv2.Sobel(image, cv2.CV_32F, 0, 1)
    h, w = image.shape
    by, bx = int(border_frac * h), int(border_frac * w)
    return float(np.mean((gx * gx + gy * gy)[by : h - by, bx : w - bx]))


@pytest.mark.parametrize("folder", ["depthmap", "pcb"])
def test_alignment_reduces_misregistration_on_the_real_pcb_stack(folder):
    """Measured (OpenCV 5.0, 512x384): misregistration 0.389 -> 0.120 (depthmap) and
    0.135 -> 0.050 (pcb); fused sharpness 0.206 -> 0.233 and 0.424 -> 0.433."""
    stack = _read_pcb(folder)
    affines = estimate_stack_alignment(stack)
    scales = [scale_shift_params(a, stack.image_hw)[0] for a in affines]
    assert max(scales) - min(scales) > 0.02  # the breathing is real: several per cent over the stack
    registered = stack.with_alignment(affines)
    warped = registered.aligned(interpolation="lanczos")
    before, after = misregistration(stack), misregistration(registered)
    assert after == pytest.approx(misregistration(warped), abs=0.02)
    assert after <= 0.6 * before, (before, after)

    def fused_sharpness(s: FocalStack) -> float:
        out = depth_from_focus(s.to_grey_float(), s.focus_dpt, params=ClassicalParams(fill=False))
        return _gradient_energy(out.all_in_focus)

    sharp_before, sharp_after = fused_sharpness(stack), fused_sharpness(warped)
    assert sharp_after >= 0.97 * sharp_before, (sharp_before, sharp_after)


# --------------------------------------------------------------------------------------------
# Reconstruction with estimated alignment on a breathing simulated stack
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2, 5])
def test_estimated_alignment_lowers_depth_error_under_strong_breathing(seed):
    """9 slices of the procedural scene, 0.5..2.5 dpt, breathing 5 %/dpt about the middle slice
    (whose frame is the truth's): the classical depth error drops with align='estimate'.

    Measured AbsRel none -> estimate: 0.168 -> 0.154 (seed 2), 0.170 -> 0.137 (seed 5); the
    same scene without breathing gives 0.107 and 0.106."""
    scene = procedural_scene(192, 144, seed=seed)
    layered = LayeredScene(scene.radiance, scene.depth_m)
    focus = np.linspace(0.5, 2.5, 9)
    rng = np.random.default_rng(0)
    frames = []
    for d in focus:
        img = layered.render(d, blur_px_per_dpt=4.0)
        img = apply_breathing(img, breathing_scale(d, breathing_per_dpt=0.05, reference_dpt=focus[4]))
        frames.append(SensorModel().expose(img, exposure_s=0.01, gain_db=0.0, out_bits=8, rng=rng))
    stack = FocalStack(np.stack(frames[::-1]), focus_distance_m=1.0 / focus[::-1])
    plain = reconstruct_stack(stack, method="classical", align="none")
    estimated = reconstruct_stack(stack, method="classical", align="estimate")
    assert estimated.aligned and not plain.aligned
    assert estimated.depth.shape == scene.depth_m.shape == (144, 192)
    err_plain = depth_metrics(plain.depth, scene.depth_m)["abs_rel"]
    err_est = depth_metrics(estimated.depth, scene.depth_m)["abs_rel"]
    assert err_est < 0.95 * err_plain, (err_plain, err_est)
    assert math.isfinite(err_est)


def test_fit_breathing_keeps_the_tolerance_it_is_given(texture):
    """A calibration session gives the table the focus model's tolerance (in actuator units)."""
    rng = np.random.default_rng(6)
    values = [50.0, 100.0, 150.0]
    frames = [_target_frame(texture, v, rng, b=0.004) for v in values]
    model = fit_breathing(frames, values, actuator_unit="mA", tolerance_frac=0.02)
    assert model.tolerance_frac == 0.02
    model.affine_at(151.9)  # 2 % of the 100 mA span beyond its end
    with pytest.raises(CalibrationError, match=r"actuator value 152\.1 mA is outside the calibrated range 50\.\.150 mA"):
        model.affine_at(152.1)
    assert BreathingModel.from_dict(yaml.safe_load(yaml.safe_dump(model.to_dict()))).tolerance_frac == 0.02
    bare = BreathingModel([0.0, 1.0], np.stack([np.eye(2, 3)] * 2), image_hw=(8, 8), reference_value=0.5)
    with pytest.raises(CalibrationError, match=r"actuator value 2 is outside the calibrated range 0\.\.1;"):  # no unit: no blank
        bare.affine_at(2.0)


def test_pixels_outside_a_slice_after_alignment_get_confidence_zero() -> None:
    """Warped slices show reflected border content near the edges: those pixels have no focus
    curve of their own and were as confident as any (implausible depth twice as often there)."""
    from capture.stack import FocalStack
    from reconstruct.api import reconstruct_stack

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 40, 60), dtype=np.uint8)
    shift = [[1.0, 0.0, 6.0], [0.0, 1.0, 0.0]]  # slice 2 moved 6 px right: its left 6 columns are border
    identity = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    stack = FocalStack(images, focus_distance_m=[2.0, 1.0, 0.7, 0.5],
                       slice_meta=[{"alignment": shift if i == 2 else identity} for i in range(4)])
    coverage = stack.alignment_coverage()
    assert not coverage[:, :6].any() and coverage[:, 6:].all()
    res = reconstruct_stack(stack, method="classical", align="apply")
    assert (res.confidence[:, :6] == 0).all() and res.confidence[:, 6:].max() > 0
    assert res.extra["alignment_coverage"] == pytest.approx(54 / 60, abs=1e-3)
    plain = FocalStack(images, focus_distance_m=[2.0, 1.0, 0.7, 0.5])
    assert plain.alignment_coverage().all()
    assert "alignment_coverage" not in reconstruct_stack(plain, method="classical", align="apply").extra

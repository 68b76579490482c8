"""Classical depth from focus: focus measures, sub-slice refinement, confidence, fill, fusion."""

from __future__ import annotations

import numpy as np
import pytest

from capture.errors import ReconstructionError
from capture.optics import LayeredScene
from capture.stack import FocalStack
from reconstruct.api import reconstruct_stack
from reconstruct.classical import FOCUS_MEASURES, ClassicalParams, depth_from_focus, focus_measure, fuse_all_in_focus
from reconstruct.fill import edge_aware_fill

K_PX_PER_DPT = 10.0


def _texture(h=80, w=96, seed=0):
    rng = np.random.default_rng(seed)
    import cv2

    base = rng.random((h // 2, w // 2)).astype(np.float32)
    return cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 0.8 + 0.1


def _stack_of(depth_m: np.ndarray, radiance: np.ndarray, focus_dpt: np.ndarray, noise=0.0, seed=0) -> np.ndarray:
    scene = LayeredScene(radiance[..., None], depth_m)
    rng = np.random.default_rng(seed)
    out = []
    for f in focus_dpt:
        img = scene.render(float(f), blur_px_per_dpt=K_PX_PER_DPT)[..., 0]
        out.append(np.clip(img + noise * rng.standard_normal(img.shape), 0, 1).astype(np.float32))
    return np.stack(out)


FOCUS = np.linspace(0.5, 2.5, 10)


@pytest.mark.parametrize("measure", FOCUS_MEASURES)
@pytest.mark.parametrize("refine", ["parabola", "gaussian"])
def test_plane_between_slices_is_found_to_sub_slice_accuracy(measure, refine):
    true_dpt = 1.37  # between slices 3 (1.389) and 4 (1.611)... and not on one
    tex = _texture()
    grey = _stack_of(np.full(tex.shape, 1 / true_dpt, np.float32), tex, FOCUS, noise=0.003)
    out = depth_from_focus(grey, FOCUS, params=ClassicalParams(focus_measure=measure, refine=refine))
    core = out.focus_dpt[10:-10, 10:-10]
    step = FOCUS[1] - FOCUS[0]
    assert np.median(np.abs(core - true_dpt)) < 0.25 * step, (measure, refine, np.median(core))
    assert np.median(out.confidence[10:-10, 10:-10]) > 0.3


def test_refinement_beats_picking_the_nearest_slice():
    tex = _texture(seed=1)
    errs_refined, errs_argmax = [], []
    for true_dpt in (0.83, 1.05, 1.52, 2.1):
        grey = _stack_of(np.full(tex.shape, 1 / true_dpt, np.float32), tex, FOCUS, noise=0.002)
        out = depth_from_focus(grey, FOCUS)
        errs_refined.append(np.median(np.abs(out.focus_dpt - true_dpt)))
        nearest = FOCUS[np.argmax(focus_measure(grey), axis=0)]
        errs_argmax.append(np.median(np.abs(nearest - true_dpt)))
    assert np.mean(errs_refined) < 0.6 * np.mean(errs_argmax)


def test_textureless_stack_has_no_confidence_and_no_depth():
    grey = np.full((10, 40, 50), 0.5, np.float32) + np.random.default_rng(0).normal(0, 0.002, (10, 40, 50)).astype(np.float32)
    out = depth_from_focus(grey, FOCUS, params=ClassicalParams(fill=False))
    assert out.confidence.max() < 0.3
    assert np.isnan(out.focus_dpt).mean() > 0.99
    filled = depth_from_focus(grey, FOCUS)  # nothing reliable to fill from: NaN, not invented
    assert np.isnan(filled.focus_dpt).mean() > 0.99


def test_two_planes_with_a_sharp_edge():
    tex = _texture(80, 120, seed=2)
    depth = np.full(tex.shape, 1 / 0.7, np.float32)
    depth[:, 60:] = 1 / 2.2
    grey = _stack_of(depth, tex, FOCUS, noise=0.002)
    out = depth_from_focus(grey, FOCUS)
    assert np.median(out.focus_dpt[:, 5:50]) == pytest.approx(0.7, abs=0.06)
    assert np.median(out.focus_dpt[:, 70:-5]) == pytest.approx(2.2, abs=0.06)


def test_unsorted_or_duplicate_focus_is_refused():
    grey = np.zeros((3, 8, 8), np.float32)
    with pytest.raises(ReconstructionError, match="increasing"):
        depth_from_focus(grey, np.array([1.0, 0.5, 2.0]))
    with pytest.raises(ReconstructionError, match="increasing"):
        depth_from_focus(grey, np.array([1.0, 1.0, 2.0]))
    with pytest.raises(ReconstructionError, match="unknown measure"):
        focus_measure(grey, name="sobel")


def test_all_in_focus_takes_each_pixel_from_its_sharp_slice():
    slices = np.stack([np.full((4, 4), v, np.float32) for v in (0.0, 10.0, 20.0)])
    pos = np.array([[0.0, 1.0, 2.0, 0.5]] * 4, np.float32)
    aif = fuse_all_in_focus(slices, pos)
    np.testing.assert_allclose(aif[0], [0.0, 10.0, 20.0, 5.0])
    colour = np.repeat(slices[..., None], 3, axis=3)
    assert fuse_all_in_focus(colour, pos).shape == (4, 4, 3)


def test_fill_keeps_reliable_pixels_and_respects_colour_edges():
    h, w = 60, 80
    guide = np.zeros((h, w, 3), np.float32)
    guide[:, :40] = (0.8, 0.2, 0.1)  # red region, depth 1
    guide[:, 40:] = (0.1, 0.2, 0.8)  # blue region, depth 3
    value = np.where(np.arange(w)[None, :] < 40, 1.0, 3.0).astype(np.float32).repeat(h, 0).reshape(h, w)
    conf = np.zeros((h, w), np.float32)
    conf[:, 0:6] = 1.0  # only the far left of red and far right of blue are reliable
    conf[:, -6:] = 1.0
    out = edge_aware_fill(value, conf, guide, confidence_floor=0.5)
    np.testing.assert_array_equal(out[conf >= 0.5], value[conf >= 0.5])
    assert np.abs(out[:, 10:36] - 1.0).max() < 0.15
    assert np.abs(out[:, 44:70] - 3.0).max() < 0.15


def test_focus_index_stack_gives_depth_in_index_units():
    tex = _texture(seed=4)
    grey = _stack_of(np.full(tex.shape, 1 / 1.5, np.float32), tex, FOCUS)
    images = (grey * 255).astype(np.uint8)
    stack = FocalStack(images, focus_index=list(range(10)))
    result = reconstruct_stack(stack)
    assert result.depth_unit == "focus_index"
    expected_index = np.interp(1.5, FOCUS, np.arange(10))
    assert np.median(result.depth[10:-10, 10:-10]) == pytest.approx(expected_index, abs=0.3)


def test_method_errors_are_clear(tmp_path):
    from capture.errors import InputError

    stack = FocalStack(np.zeros((2, 8, 8), np.uint8), focus_distance_m=[1.0, 2.0])
    with pytest.raises(InputError, match="not found"):
        reconstruct_stack(stack, method="dualfocus", weights=tmp_path / "none.safetensors")
    with pytest.raises(InputError, match="safetensors"):
        reconstruct_stack(stack, method="dualfocus", weights=tmp_path / "model.pt")
    with pytest.raises(ReconstructionError, match="registered: dualfocus-s"):
        reconstruct_stack(stack, method="dualfocus", model="dualfocus-xl")
    with pytest.raises(ReconstructionError, match="valid: dualfocus, classical"):
        reconstruct_stack(stack, method="magic")
    with pytest.raises(ReconstructionError, match="estimate"):
        reconstruct_stack(stack, align="estimate")

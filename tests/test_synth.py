"""Training-data synthesis: shapes, masks, randomisation bounds, degenerate crops."""

from __future__ import annotations

import numpy as np
import pytest

from reconstruct.synth import RgbdSource, SynthRanges, render_item


def _flat_source(value: float = 30.0, size: int = 140) -> RgbdSource:
    rng = np.random.default_rng(0)
    rgb = rng.random((size, size, 3)).astype(np.float32)
    disp = np.full((size, size), value, np.float32)
    disp[:, : size // 8] = value * 3  # a far-off sliver: would blur without bound
    return RgbdSource("flat", rgb, disp, np.ones((size, size), bool))


def test_item_shapes_and_mask():
    item = render_item(np.random.default_rng(1), [_flat_source()], SynthRanges(procedural_share=0.0))
    n, s = item["stack"].shape[0], item["stack"].shape[1]
    assert 3 <= n <= 12 and item["stack"].shape == (n, s, s, 3) and item["stack"].dtype == np.uint8
    assert item["focus"].shape == (n,)
    assert item["target"].shape == (s, s) and item["mask"].shape == (s, s)
    assert np.all(item["target"][item["mask"]] >= 0) and np.all(item["target"][item["mask"]] <= 1)


@pytest.mark.parametrize("seed", range(6))
def test_nearly_flat_crops_render_with_bounded_blur(seed):
    """Regression: a crop of almost constant disparity once asked OpenCV for a 54 GB kernel."""
    item = render_item(np.random.default_rng(seed), [_flat_source()], SynthRanges(procedural_share=0.0, max_blur_px=(20.0, 20.0)))
    f = np.sort(item["focus"])
    assert f[-1] - f[0] >= 0.5 * 0.05 * 30.0  # the sweep kept a sensible span


def test_procedural_only_when_no_sources():
    item = render_item(np.random.default_rng(2), [], SynthRanges())
    assert item["stack"].ndim == 4 and item["mask"].any()


def test_a_manifest_without_the_expected_columns_is_one_error_naming_it(tmp_path) -> None:
    from capture.errors import InputError
    from reconstruct.synth import load_middlebury

    (tmp_path / "manifest.csv").write_text("name,image\nArt,art.png\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"manifest.csv: no gt_disparity, gt_scale, rgb, scene column"):
        load_middlebury(tmp_path)


def _scene_folder(tmp_path, *, rgb=None, disp=None, row: str = "s1,s1.png,s1d.png,4,0", bom: bool = False):
    """A one-scene Middlebury-layout folder: 40x30 RGB and disparity PNGs and a manifest."""
    import cv2

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8) if rgb is None else rgb
    disp = np.full((30, 40), 80, np.uint8) if disp is None else disp
    cv2.imwrite(str(tmp_path / "s1.png"), rgb)
    cv2.imwrite(str(tmp_path / "s1d.png"), disp)
    text = "scene,rgb,gt_disparity,gt_scale,unknown_value\n" + row + "\n"
    (tmp_path / "manifest.csv").write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(("row", "disp", "words"), [
    ("s1,s1.png,s1d.png,three,0", None, r"line 2: gt_scale: expected a positive number .*'three'"),
    ("s1,s1.png,s1d.png,,0", None, r"line 2: gt_scale: empty or missing"),
    ("s1,s1.png,s1d.png,0,0", None, r"line 2: gt_scale: expected a positive number .*'0'"),
    ("s1,s1.png,s1d.png,-4,0", None, r"line 2: gt_scale: expected a positive number"),
    ("s1,s1.png", None, r"line 2: gt_disparity, gt_scale: empty or missing"),
    ("s1,s1.png,s1d.png,4,unknown", None, r"line 2: unknown_value: expected the number .*'unknown'"),
    ("s1,s1.png,s1d.png,4,0", np.zeros((30, 40), np.uint8), r"line 2: scene 's1': s1d.png has no known disparity"),
    ("s1,s1.png,s1d.png,4,0", np.full((20, 40), 80, np.uint8), r"line 2: scene 's1': s1.png is 40x30 px but s1d.png is 40x20"),
    ("s1,s1.png,s1d.png,4,0\ns1,s1.png,s1d.png,4,0", None, r"line 3: scene 's1' is listed twice"),
])
def test_a_bad_manifest_row_is_one_error_naming_the_line(tmp_path, row: str, disp, words: str) -> None:
    """Each of these was a traceback (exit 1) or, worse, trained on silently: truth not lined
    up with its image, a scene without any truth."""
    from capture.errors import InputError
    from reconstruct.synth import load_middlebury

    folder = _scene_folder(tmp_path, disp=disp, row=row)
    with pytest.raises(InputError, match=r"manifest.csv: " + words):
        load_middlebury(folder)


def test_manifest_values_are_read_as_spreadsheets_write_them(tmp_path) -> None:
    """unknown_value '255.0' (as pandas writes an integer column with gaps) was ignored, so the
    unknown marker became truth; a byte-order mark hid the scene column; 16-bit RGB was read as
    if 8-bit (257x too bright)."""
    from reconstruct.synth import load_middlebury

    disp = np.full((30, 40), 80, np.uint8)
    disp[:5] = 255
    rgb8 = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    src8 = load_middlebury(_scene_folder(tmp_path, rgb=rgb8, disp=disp, row="s1,s1.png,s1d.png,4,255.0", bom=True))[0]
    assert src8.known.sum() == 25 * 40 and float(src8.disparity[src8.known].max()) == pytest.approx(20.0)
    rgb16 = rgb8.astype(np.uint16) * 257
    src16 = load_middlebury(_scene_folder(tmp_path, rgb=rgb16, disp=disp, row="s1,s1.png,s1d.png,4,255"))[0]
    assert np.allclose(src16.rgb, src8.rgb, atol=1e-5)
    # 'none' (as the shared Middlebury manifest writes it): no marker, every positive value known
    assert load_middlebury(_scene_folder(tmp_path, rgb=rgb8, disp=disp, row="s1,s1.png,s1d.png,4,none"))[0].known.all()


@pytest.mark.parametrize("seed", range(4))
def test_grey_stacks_are_grey_through_noise_and_jpeg(seed) -> None:
    """The grey conversion came before the noise, drawn per channel: 'grey' stacks carried
    colour speckle (mean |R - G| of 6 grey levels at noise 0.02)."""
    ranges = SynthRanges(procedural_share=0.0, grey_share=1.0, noise_sigma=(0.015, 0.02), jpeg_share=0.5 if seed % 2 else 0.0)
    stack = render_item(np.random.default_rng(seed), [_flat_source()], ranges)["stack"]
    assert np.array_equal(stack[..., 0], stack[..., 1]) and np.array_equal(stack[..., 1], stack[..., 2])
    assert stack.std() > 0  # not blank: the noise and the texture are there


def test_colour_stacks_keep_independent_channel_noise() -> None:
    ranges = SynthRanges(procedural_share=0.0, grey_share=0.0, noise_sigma=(0.02, 0.02), jpeg_share=0.0)
    stack = render_item(np.random.default_rng(0), [_flat_source()], ranges)["stack"]
    assert not np.array_equal(stack[..., 0], stack[..., 1])


def test_a_crop_larger_than_the_scaled_scene_keeps_its_aspect() -> None:
    """Each side was raised to the crop size on its own, squashing wide scenes; disparity was
    scaled by the width's factor only. Here disparity = the row index, so after a uniform
    scale (and disparity scaled with it) it still grows by 1 per row."""
    from reconstruct.synth import _crop_source

    h, w = 60, 180
    disp = np.repeat(np.arange(1, h + 1, dtype=np.float32)[:, None], w, axis=1)
    src = RgbdSource("wide", np.zeros((h, w, 3), np.float32), disp, np.ones((h, w), bool))
    _rgb, out, _known = _crop_source(np.random.default_rng(0), src, 96, 0.5)
    slope = np.polyfit(np.arange(out.shape[0]), out[:, 48], 1)[0]  # nearest-neighbour steps: fit, not diff
    assert slope == pytest.approx(1.0, abs=0.05)


def test_excluded_scenes_are_matched_ignoring_case(tmp_path) -> None:
    """A manifest spelling a report scene 'art' must not put it into training."""
    from reconstruct.synth import load_middlebury

    folder = _scene_folder(tmp_path, row="art,s1.png,s1d.png,4,0")
    assert load_middlebury(folder, exclude=("Art",)) == []
    assert [s.name for s in load_middlebury(folder)] == ["art"]

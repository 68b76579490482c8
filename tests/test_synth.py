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
